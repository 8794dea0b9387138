"""Delta-rule token mixer: Q-Delta, gated Q-Delta, DeltaNet, Gated DeltaNet and Kimi Delta
Attention (DESIGN §3 "Layer").

Per head h, from the input `h_t` `[d]` (fla / Gated DeltaNet conventions):

    q, k, v  = SiLU(ShortConv(W_q h)), SiLU(ShortConv(W_k h)), SiLU(ShortConv(W_v h))
    q, k     = L2Norm(q), L2Norm(k)                         per head
    beta     = σ(W_β h)                 (2σ(·) with allow_neg_eigval)
    lam      = σ(W_λ h − 0.9)           (2σ(·) with allow_neg_eigval; Q-Delta modes only; 0.9 is
                                         a fixed constant, as the authors' `lamb_bias`. With
                                         `learnable_lam_bias`: σ(W_λ h + b_λ − 0.9), b_λ a
                                         trained per-head bias starting at 0 — the upcycling
                                         path sets it very negative, so Q-Delta ≈ DeltaNet)
    g        = −exp(A_log) · softplus(W_a h + dt_bias)      (gated modes only)
    o        = delta_rule(q, k, v, beta, g=g, lam=lam)
    y        = W_out · [RMSNorm(o_h) ⊙ SiLU(W_o' h)]_h

Kimi Delta Attention (`kda`, Kimi Linear; and `kda_qdelta`, gated Q-Delta with KDA's gate) has a
decay per key channel instead of g, from a low-rank projection (rank `decay_rank`, default Dk),
with A per head and dt_bias per channel, and a low-rank output gate (rank `gate_rank`, default
Dk) through a sigmoid:

    gk       = −exp(A_log_h) · softplus(W_fb W_fa h + dt_bias)    [H, Dk]
    o        = delta_rule(q, k, v, beta, gk=gk, lam=lam)
    y        = W_out · [RMSNorm(o_h) ⊙ σ(W_gb W_ga h)]_h

Initialisation (`init_std`, default 0.02, the authors' and fla's `initializer_range`): every
projection and the short convs (no bias) N(0, init_std²); `init_std=None` gives the fan-in
alternative, N(0, 1/fan_in) projections and uniform ±1/√K convs. Gated modes, as the authors'
`QDelta` layer and fla's Gated DeltaNet: A ~ U(a_init_min, 16) with a_init_min = 0 (A_log =
log A), dt log-uniform in [1e-3, 1e-1] floored at 1e-4, dt_bias = softplus⁻¹(dt). The output
norm's scale starts at 1.

Grouped key heads (Qwen3-Next): q and k may have fewer heads than v (`num_key_heads` divides
`num_heads`); value head h then reads key/query head h // (num_heads / num_key_heads).

Pure `init` / `apply`, plus `init_cache` / `step` for token-by-token decoding: `apply` with a
cache continues a sequence (prefill), `step` advances it one token with `delta_rule_step`; the
two agree with one full-sequence `apply`. Axis letters: B batch, T time, d model width, H heads,
Dk key head dim, Dv value head dim.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

from moejax.kernels.delta_rule import delta_rule, delta_rule_step
from moejax.kernels.delta_rule.ops import IMPL_NAMES, PAIRINGS  # noqa: F401 (PAIRINGS re-exported)
from moejax.layers.norms import GATE_ACTIVATIONS, gated_rms_norm, l2_normalize, rms_norm_init
from moejax.layers.segments import check_cu_seqlens, check_segment_ids, document_starts
from moejax.layers.short_conv import (
    short_conv,
    short_conv_cache,
    short_conv_init,
    short_conv_packed,
)
from moejax.validation import (
    check_array,
    check_bool,
    check_choice,
    check_int,
    check_number,
    check_range,
)

Array = jax.Array

MODES = ("qdelta", "gated_qdelta", "deltanet", "gated_deltanet", "kda", "kda_qdelta")
CHANNEL_DECAY_MODES = ("kda", "kda_qdelta")  # a decay per key channel (gk), KDA's gate

LAM_SHIFT = 0.9  # λ = σ(W_λ h − LAM_SHIFT): the authors' fixed `lamb_bias`
INIT_STD = 0.02  # the authors' / fla's `initializer_range`
A_INIT_MAX = 16.0  # A ~ U(a_init_min, 16)
_A_FLOOR = 1e-6  # A = 0 exactly (probability 2^-23 per head) would give A_log = -inf
_DT_MIN, _DT_MAX, _DT_FLOOR = 1e-3, 1e-1, 1e-4


_EXACT = 1e-6  # relative slack when a float product must be an integer (float rounding)


def resolve_value_dim(head_dim: int, expand_v: float, value_head_dim: int | None, *,
                      default_expand_v: float = 2.0) -> tuple[int, float]:
    """The integer value head dim Dv and the matching `expand_v = Dv / Dk`.

    `value_head_dim`, when given, is Dv; `expand_v` must then agree with it (up to float
    rounding) or be left at `default_expand_v`. Without it Dv = `expand_v · head_dim`, which must
    be an integer up to float rounding (so `expand_v = 30 / 22` gives 30, though the float
    product is 29.999999999999996).

    Raises:
      ValueError: naming `expand_v` / `value_head_dim` when they give no integer or disagree.
    """
    check_number("expand_v", expand_v)
    if not expand_v > 0:
        raise ValueError(f"expand_v must be > 0, got {expand_v}")
    product = expand_v * head_dim
    if value_head_dim is not None:
        check_int("value_head_dim", value_head_dim, lo=1)
        if expand_v != default_expand_v and abs(product - value_head_dim) > _EXACT * value_head_dim:
            raise ValueError(
                f"expand_v={expand_v} and value_head_dim={value_head_dim} disagree (expand_v * "
                f"head_dim = {product:g} with head_dim={head_dim}); give only value_head_dim")
        return int(value_head_dim), value_head_dim / head_dim
    dv = round(product)
    if dv < 1 or abs(product - dv) > _EXACT * max(dv, 1):
        raise ValueError(
            f"expand_v must be > 0 with expand_v * head_dim an integer, got expand_v={expand_v}, "
            f"head_dim={head_dim} (product {product:g}); or give value_head_dim")
    return dv, float(expand_v)


@dataclasses.dataclass(frozen=True, kw_only=True)
class DeltaMixerConfig:
    """Configuration of a delta-rule mixer layer.

    Attributes:
      d_model: model width d.
      num_heads: H, the value heads (one delta-rule state each).
      head_dim: key/query head dim Dk.
      num_key_heads: query/key heads (grouped, must divide H); None = H.
      expand_v: value head dim Dv = expand_v · Dk when `value_head_dim` is None (the product
        must be an integer up to float rounding). With `value_head_dim` it is set to
        `value_head_dim / head_dim` (a value other than the default must agree with it).
      value_head_dim: Dv as an integer (exact for any Dk, Dv, e.g. Qwen3-Next's 22 and 30);
        None = expand_v · Dk.
      mode: one of "qdelta", "gated_qdelta", "deltanet", "gated_deltanet", "kda" (Kimi Delta
        Attention: Gated DeltaNet with a decay per key channel) and "kda_qdelta" (gated Q-Delta
        with KDA's per-channel decay).
      conv_size: short-conv kernel size (≥ 1; 1 disables the temporal mixing of the conv).
      allow_neg_eigval: beta = 2σ(·), lam = 2σ(· − 0.9), so transitions may have negative
        eigenvalues.
      chunk_size: chunk length of the chunkwise path.
      impl: `delta_rule` implementation ("auto", "reference", "chunk", "pallas").
      pairing: "recurrence" (default, the recurrence of DESIGN §3) or "authors" (the released
        Q-Delta chunk kernel's k_t·x_j pairing, `delta_rule(pairing=...)`: its output depends on
        the chunk size, so it needs chunk_size 64, the size their models were trained at; for
        running models trained with their code as trained. Decoding steps are the same in both).
      norm_eps: epsilon of the output RMSNorm (> 0).
      init_std: std of the N(0, init_std²) init of every projection and short conv (> 0;
        default 0.02, the authors'); None = fan-in init (N(0, 1/fan_in), convs U(±1/√K)).
      learnable_lam_bias: Q-Delta modes get a trained per-head bias b_λ (starting at 0) in
        λ = σ(W_λ h + b_λ − 0.9); off by default (the authors' λ has only the fixed 0.9). The
        upcycling path (`moejax.interop.upcycle.to_qdelta`) turns it on to start at λ ≈ 0.
      a_init_min: A ~ U(a_init_min, 16) in the gated modes' decay (in [0, 16); default 0, the
        authors' and fla's; 1.0 is moejax's earlier init and Kimi Linear's KDA init).
      decay_rank: rank of KDA's low-rank decay projection `W_fb W_fa` (KDA modes); None = Dk,
        Kimi Linear's.
      gate_rank: rank of a low-rank output gate `W_gb W_ga`; None = the mode's (Dk for the KDA
        modes, as Kimi Linear; a full `[d, H·Dv]` matrix otherwise), 0 = full.
      output_gate: the output gate's activation, "silu" or "sigmoid"; None = the mode's
        (sigmoid for KDA modes, as Kimi Linear; SiLU otherwise, as Gated DeltaNet).

    Raises (on construction):
      ValueError / ArgumentTypeError: naming the field (a str or None where a number belongs is
        an `ArgumentTypeError`, also a `TypeError`).
    """

    d_model: int
    num_heads: int
    head_dim: int
    num_key_heads: int | None = None
    expand_v: float = 2.0
    value_head_dim: int | None = None
    mode: str = "qdelta"
    conv_size: int = 4
    allow_neg_eigval: bool = False
    chunk_size: int = 64
    impl: str = "auto"
    pairing: str = "recurrence"
    norm_eps: float = 1e-6
    init_std: float | None = INIT_STD
    learnable_lam_bias: bool = False
    a_init_min: float = 0.0
    decay_rank: int | None = None
    gate_rank: int | None = None
    output_gate: str | None = None

    def __post_init__(self):
        for name in ("d_model", "num_heads", "head_dim", "conv_size", "chunk_size"):
            check_int(name, getattr(self, name), lo=1)
        if self.num_key_heads is not None:
            check_int("num_key_heads", self.num_key_heads, lo=1)
            if self.num_heads % self.num_key_heads:
                raise ValueError(f"num_key_heads={self.num_key_heads} must divide num_heads="
                                 f"{self.num_heads}")
        check_choice("mode", self.mode, MODES)
        check_choice("impl", self.impl, IMPL_NAMES)
        check_choice("pairing", self.pairing, PAIRINGS)
        if self.pairing == "authors" and self.mode in CHANNEL_DECAY_MODES:
            raise ValueError(f"pairing='authors' (the released Q-Delta kernel) has no "
                             f"per-channel decay: not with mode={self.mode!r}")
        if self.pairing == "authors" and self.chunk_size != 64:
            raise ValueError(f"chunk_size must be 64 with pairing='authors' (the released "
                             f"kernel's chunk size), got {self.chunk_size}")
        check_bool("allow_neg_eigval", self.allow_neg_eigval)
        check_bool("learnable_lam_bias", self.learnable_lam_bias)
        check_init_std(self.init_std)
        check_range("a_init_min", self.a_init_min, 0.0, A_INIT_MAX, lo_open=False, hi_open=True)
        check_number("norm_eps", self.norm_eps)
        if not self.norm_eps > 0:
            raise ValueError(f"norm_eps must be > 0, got {self.norm_eps}")
        _, expand_v = resolve_value_dim(self.head_dim, self.expand_v, self.value_head_dim)
        object.__setattr__(self, "expand_v", expand_v)
        kda = self.mode in CHANNEL_DECAY_MODES
        if self.decay_rank is not None:
            check_int("decay_rank", self.decay_rank, lo=1)
            if not kda:
                raise ValueError(f"decay_rank is the rank of KDA's decay projection: only for "
                                 f"modes {CHANNEL_DECAY_MODES}, got mode={self.mode!r}")
        elif kda:
            object.__setattr__(self, "decay_rank", self.head_dim)
        if self.gate_rank is None:
            object.__setattr__(self, "gate_rank", self.head_dim if kda else 0)
        check_int("gate_rank", self.gate_rank, lo=0)
        if self.output_gate is None:
            object.__setattr__(self, "output_gate", "sigmoid" if kda else "silu")
        check_choice("output_gate", self.output_gate, tuple(GATE_ACTIVATIONS))

    @property
    def value_dim(self) -> int:
        """Dv, the value head dim (an int)."""
        return resolve_value_dim(self.head_dim, self.expand_v, self.value_head_dim)[0]

    @property
    def key_heads(self) -> int:
        return self.num_heads if self.num_key_heads is None else self.num_key_heads

    @property
    def gated(self) -> bool:
        """Whether the state decays (a scalar g per head, or KDA's gk per key channel)."""
        return self.mode in ("gated_qdelta", "gated_deltanet", *CHANNEL_DECAY_MODES)

    @property
    def channel_decay(self) -> bool:
        """Whether the decay is per key channel (KDA's gk) rather than per head."""
        return self.mode in CHANNEL_DECAY_MODES

    @property
    def query_mixing(self) -> bool:
        return self.mode in ("qdelta", "gated_qdelta", "kda_qdelta")


def check_init_std(init_std, name: str = "init_std") -> None:
    """`init_std` must be None (fan-in init) or a finite number > 0 (ValueError naming `name`)."""
    if init_std is not None:
        check_range(name, init_std, 0.0, math.inf, hi_open=True)


def dense_init(key: jax.Array, fan_in: int, fan_out: int, std: float | None) -> Array:
    """A `[fan_in, fan_out]` float32 matrix, N(0, std²); `std=None`: N(0, 1/fan_in)."""
    scale = fan_in**-0.5 if std is None else std
    return jax.random.normal(key, (fan_in, fan_out), jnp.float32) * scale


def _output_gate_init(key: jax.Array, cfg: DeltaMixerConfig) -> dict:
    """The output gate's weights: `w_og` `[d, H·Dv]`, or the low-rank `w_og_a` `[d, r]` and
    `w_og_b` `[r, H·Dv]` (`gate_rank` r > 0)."""
    d, HDv, std = cfg.d_model, cfg.num_heads * cfg.value_dim, cfg.init_std
    if not cfg.gate_rank:
        return {"w_og": dense_init(key, d, HDv, std)}
    k_a, k_b = jax.random.split(key)
    return {"w_og_a": dense_init(k_a, d, cfg.gate_rank, std),
            "w_og_b": dense_init(k_b, cfg.gate_rank, HDv, std)}


def init(key: jax.Array, cfg: DeltaMixerConfig) -> dict:
    """Parameters of one mixer layer (float32); see the module docstring for the init."""
    d, H, Dk, Dv = cfg.d_model, cfg.num_heads, cfg.head_dim, cfg.value_dim
    Hk = cfg.key_heads
    std = cfg.init_std
    ks = iter(jax.random.split(key, 12))
    dense = lambda fan_in, fan_out: dense_init(next(ks), fan_in, fan_out, std)
    conv = lambda channels: short_conv_init(next(ks), channels, cfg.conv_size, std=std)
    p = {
        "w_q": dense(d, Hk * Dk),
        "w_k": dense(d, Hk * Dk),
        "w_v": dense(d, H * Dv),
        "conv_q": conv(Hk * Dk),
        "conv_k": conv(Hk * Dk),
        "conv_v": conv(H * Dv),
        "w_beta": dense(d, H),
        **_output_gate_init(next(ks), cfg),
        "o_norm": rms_norm_init(Dv),
        "w_out": dense(H * Dv, d),
    }
    if cfg.query_mixing:
        p["w_lam"] = dense(d, H)
        if cfg.learnable_lam_bias:
            p["b_lam"] = jnp.zeros((H,), jnp.float32)
    if cfg.gated:
        k_a, k_dt = jax.random.split(next(ks))
        if cfg.channel_decay:  # KDA: low-rank projection to a decay per key channel
            k_a, k_b = jax.random.split(k_a)
            p["w_f_a"] = dense_init(k_a, d, cfg.decay_rank, std)
            p["w_f_b"] = dense_init(k_b, cfg.decay_rank, H * Dk, std)
        else:
            p["w_a"] = dense_init(k_a, d, H, std)
        # The authors' / fla's init: A ~ U(a_init_min, 16), dt log-uniform in [1e-3, 1e-1]
        # floored at 1e-4, dt_bias = softplus⁻¹(dt) (per key channel for KDA).
        A = jax.random.uniform(next(ks), (H,), jnp.float32, cfg.a_init_min, A_INIT_MAX)
        p["A_log"] = jnp.log(jnp.maximum(A, _A_FLOOR))
        n_dt = H * Dk if cfg.channel_decay else H
        dt = jnp.exp(jax.random.uniform(k_dt, (n_dt,), jnp.float32, math.log(_DT_MIN),
                                        math.log(_DT_MAX)))
        dt = jnp.maximum(dt, _DT_FLOOR)
        p["dt_bias"] = dt + jnp.log(-jnp.expm1(-dt))
    return p


def init_cache(cfg: DeltaMixerConfig, batch: int, dtype=jnp.float32) -> dict:
    """Decode cache of a fresh sequence: conv histories and a zero delta-rule state."""
    H, Dk, Dv, K = cfg.num_heads, cfg.head_dim, cfg.value_dim, cfg.conv_size
    Hk = cfg.key_heads
    return {
        "conv_q": short_conv_cache(batch, Hk * Dk, K, dtype),
        "conv_k": short_conv_cache(batch, Hk * Dk, K, dtype),
        "conv_v": short_conv_cache(batch, H * Dv, K, dtype),
        "state": jnp.zeros((batch, H, Dk, Dv), jnp.float32),
    }


def _features(params, x, cache, cfg, segment_ids=None, cu_seqlens=None):
    """Projections, convs and gates for `x` `[B, T, d]`; returns (feats dict, new conv caches).
    With `segment_ids` the convs restart at each document and the decay is −inf at its first
    step (`document_starts`), so the delta-rule state restarts from zero there. With
    `cu_seqlens` (packed sequences, B = 1) each sequence's convs continue its own cache row."""
    B, T, _ = x.shape
    H, Dk, Dv = cfg.num_heads, cfg.head_dim, cfg.value_dim
    mm = lambda w: x @ w.astype(x.dtype)
    cache = cache or {}
    if cu_seqlens is None:
        conv = lambda name, w: short_conv(params[name], mm(params[w]), cache.get(name),
                                          segment_ids)
    else:
        conv = lambda name, w: short_conv_packed(params[name], mm(params[w]), cu_seqlens,
                                                 cache.get(name))
    q, cq = conv("conv_q", "w_q")
    k, ck = conv("conv_k", "w_k")
    v, cv = conv("conv_v", "w_v")
    rep = H // cfg.key_heads  # grouped key heads: value head h reads key head h // rep
    q = jnp.repeat(l2_normalize(jax.nn.silu(q).reshape(B, T, -1, Dk)), rep, axis=2)
    k = jnp.repeat(l2_normalize(jax.nn.silu(k).reshape(B, T, -1, Dk)), rep, axis=2)
    v = jax.nn.silu(v).reshape(B, T, H, Dv)
    mult = 2.0 if cfg.allow_neg_eigval else 1.0
    f32 = lambda w: mm(w).astype(jnp.float32)
    feats = {"q": q, "k": k, "v": v, "beta": mult * jax.nn.sigmoid(f32(params["w_beta"])),
             "g": None, "lam": None, "gk": None}
    if cfg.query_mixing:
        logit = f32(params["w_lam"]) - LAM_SHIFT
        if cfg.learnable_lam_bias:
            logit = logit + params["b_lam"]
        feats["lam"] = mult * jax.nn.sigmoid(logit)
    if cfg.channel_decay:
        low = (x @ params["w_f_a"].astype(x.dtype)) @ params["w_f_b"].astype(x.dtype)
        a = jax.nn.softplus(low.astype(jnp.float32) + params["dt_bias"]).reshape(B, T, H, Dk)
        feats["gk"] = -jnp.exp(params["A_log"])[:, None] * a
    elif cfg.gated:
        a = jax.nn.softplus(f32(params["w_a"]) + params["dt_bias"])
        feats["g"] = -jnp.exp(params["A_log"]) * a
    if segment_ids is not None:
        start = document_starts(segment_ids)  # [B, T]
        if feats["gk"] is not None:
            feats["gk"] = jnp.where(start[..., None, None], -jnp.inf, feats["gk"])
        else:  # a reset needs a decay: g = 0 elsewhere in the ungated modes (no decay)
            g = jnp.zeros((B, T, H), jnp.float32) if feats["g"] is None else feats["g"]
            feats["g"] = jnp.where(start[..., None], -jnp.inf, g)
    return feats, {"conv_q": cq, "conv_k": ck, "conv_v": cv}


def _output(params, x, o, cfg):
    """Gated RMSNorm per head and out-projection: `o` `[B, T, H, Dv]` → `[B, T, d]`."""
    B, T, _ = x.shape
    if cfg.gate_rank:
        gate = (x @ params["w_og_a"].astype(x.dtype)) @ params["w_og_b"].astype(x.dtype)
    else:
        gate = x @ params["w_og"].astype(x.dtype)
    gate = gate.reshape(B, T, cfg.num_heads, cfg.value_dim)
    y = gated_rms_norm(params["o_norm"], o, gate, eps=cfg.norm_eps,
                       activation=cfg.output_gate).astype(x.dtype)
    return y.reshape(B, T, -1) @ params["w_out"].astype(x.dtype)


def _check_x(x, cfg, *, ndim):
    shape = "[B, T, d_model]" if ndim == 3 else "[B, d_model]"
    check_array("x" if ndim == 3 else "x_t", x)
    if x.ndim != ndim or x.shape[-1] != cfg.d_model:
        raise ValueError(f"x must be {shape} with d_model={cfg.d_model}, got shape {x.shape}")


def apply(params: dict, x: Array, *, cfg: DeltaMixerConfig, cache: dict | None = None,
          segment_ids: Array | None = None, cu_seqlens: Array | None = None
          ) -> tuple[Array, dict]:
    """Mixes a sequence; with `cache`, continues the sequence the cache came from.

    Args:
      params: from `init`.
      x: `[B, T, d]`.
      cfg: layer config.
      cache: from `init_cache`, a previous `apply` or `step`; None starts a fresh sequence.
      segment_ids: `[B, T]` int document ids of packed rows, or None: each document (a run of
        equal ids) is mixed as if alone — short convs and the delta-rule state restart at its
        first step (a reset, `g` or `gk` = −inf there, so every impl takes it).
      cu_seqlens: `[N + 1]` int boundaries of N sequences packed in one row (B = 1), or None:
        sequence n continues row n of `cache` (N rows; None: fresh), as if alone, and the new
        cache has N rows (`delta_rule(cu_seqlens=)`); e.g. a batch of prompts of different
        lengths prefilled without padding. Not with `segment_ids`.

    Returns:
      `(y [B, T, d] in x's dtype, new_cache)`.
    """
    _check_x(x, cfg, ndim=3)
    if segment_ids is not None:
        check_segment_ids(segment_ids, x.shape[:2])
    if cu_seqlens is not None:
        n = check_cu_seqlens(cu_seqlens, x.shape, segment_ids)
        if cache is not None and cache["state"].shape[0] != n:
            raise ValueError(f"the cache for {n} packed sequences (cu_seqlens) must have {n} "
                             f"rows, got {cache['state'].shape[0]}")
    f, conv = _features(params, x, cache, cfg, segment_ids, cu_seqlens)
    o, S = delta_rule(
        f["q"], f["k"], f["v"], f["beta"], g=f["g"], lam=f["lam"], gk=f["gk"],
        initial_state=None if cache is None else cache["state"], cu_seqlens=cu_seqlens,
        chunk_size=cfg.chunk_size, impl=cfg.impl, pairing=cfg.pairing,
    )
    return _output(params, x, o, cfg), {**conv, "state": S}


def step(params: dict, x_t: Array, cache: dict, *, cfg: DeltaMixerConfig) -> tuple[Array, dict]:
    """Decodes one token: `x_t` `[B, d]` → `(y_t [B, d], new_cache)` via `delta_rule_step`."""
    _check_x(x_t, cfg, ndim=2)
    x = x_t[:, None]
    f, conv = _features(params, x, cache, cfg)
    first = lambda a: None if a is None else a[:, 0]
    o_t, S = delta_rule_step(cache["state"], first(f["q"]), first(f["k"]), first(f["v"]),
                             first(f["beta"]), g_t=first(f["g"]), lam_t=first(f["lam"]),
                             gk_t=first(f["gk"]))
    y = _output(params, x, o_t[:, None], cfg)
    return y[:, 0], {**conv, "state": S}
