"""Decoder-only language model: pre-norm blocks of (mixer × FFN), byte-level vocabulary.

    h_0 = Embed(tokens)
    h  ← h + Mixer(RMSNorm(h))          mixer ∈ qdelta, gated_qdelta, deltanet, gated_deltanet,
                                         softmax, gated_softmax
    h  ← h + FFN(RMSNorm(h))            ffn ∈ dense (SwiGLU), moe (any router of moejax.routers)
    logits = RMSNorm(h) · Eᵀ            (tied embeddings by default)

Pure functions: `init`, `apply`, `loss_fn`, and decoding with `init_cache` / `prefill` /
`decode_step` / `generate` (KV cache for softmax mixers, recurrent state + conv cache for delta
mixers). Axis letters: B batch, T time, d width, V vocabulary, L layers, E experts.

Token ids must lie in [0, V). Called eagerly (concrete ids) `apply`, `prefill`, `decode_step`,
`generate` and `loss_fn` raise `ValueError` naming the argument and the range; under `jit` the
ids are traced and cannot be checked there, so they are clamped (`embed`: ids < 0 read row 0,
ids ≥ V row V − 1) — run `checked_apply` / `checked_loss_fn` (`jax.experimental.checkify`) to
have them reported under `jit` as well.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import optax
from jax.experimental import checkify

from moejax.kernels.delta_rule import ops as delta_rule_ops
from moejax.layers import attention, delta_mixer, ffn
from moejax.layers.norms import rms_norm, rms_norm_init
from moejax.moe import layer as moe_layer
from moejax.routers import base as router_base
from moejax.validation import (
    ArgumentTypeError,
    check_array,
    check_bool,
    check_choice,
    check_int,
    check_number,
    check_range,
)

Array = jax.Array

DELTA_MIXERS = delta_mixer.MODES
MIXERS = (*DELTA_MIXERS, "softmax", "gated_softmax")
FFNS = ("moe", "dense")
DTYPES = ("float32", "bfloat16")
DELTA_IMPLS = delta_rule_ops.IMPL_NAMES

_INT_FIELDS = (("vocab_size", 1), ("d_model", 1), ("num_layers", 1), ("num_heads", 1),
               ("head_dim", 1), ("d_ff", 1), ("num_experts", 1), ("top_k", 1),
               ("num_shared", 0), ("conv_size", 1), ("chunk_size", 1), ("max_seq_len", 1))
_OPTIONAL_INT_FIELDS = ("dense_d_ff", "d_ff_shared", "num_key_heads", "attn_num_heads",
                        "attn_head_dim", "num_kv_heads")  # value_head_dim: resolve_value_dim
_BOOL_FIELDS = ("shared_gate", "allow_neg_eigval", "qk_norm", "zero_centered_norm",
                "tie_embeddings")
_POSITIVE_FLOAT_FIELDS = ("capacity_factor", "rope_theta", "norm_eps")


def _router_kwargs(kwargs: Any) -> tuple[tuple[str, Any], ...]:
    """`router_kwargs` as sorted `(name, value)` pairs (a dict or pairs; JSON gives lists)."""
    pairs = kwargs.items() if isinstance(kwargs, Mapping) else kwargs
    if isinstance(pairs, str) or not isinstance(pairs, Iterable):
        raise ArgumentTypeError(f"router_kwargs must be a dict or (name, value) pairs, got "
                                f"{kwargs!r}")
    out = []
    for p in pairs:
        if isinstance(p, str) or not isinstance(p, Sequence) or len(p) != 2 \
                or not isinstance(p[0], str):
            raise ArgumentTypeError(f"router_kwargs must be a dict or (name, value) pairs, got "
                                    f"the entry {p!r}")
        out.append(tuple(p))
    return tuple(sorted(out))


@dataclasses.dataclass(frozen=True, kw_only=True)
class LMConfig:
    """Model configuration (frozen, hashable, validated at construction).

    Attributes:
      vocab_size: V (256 for bytes).
      d_model: d.
      num_layers: L.
      num_heads: heads of the mixer (delta mixers: value heads, one state each).
      head_dim: key/query head dim (delta mixers) or head dim (softmax mixers).
      expand_v: delta mixers' value head dim = expand_v · head_dim when `value_head_dim` is None
        (the product must be an integer up to float rounding). With `value_head_dim` it is set
        to `value_head_dim / head_dim` (a value other than the default must agree with it).
      value_head_dim: delta mixers' value head dim as an integer (exact for any pair, e.g.
        Qwen3-Next's key/value head dims 22 and 30); None = expand_v · head_dim. See
        `value_dim`.
      mixer: one of MIXERS, used by every layer unless `layer_mixers` is given.
      ffn: "moe" or "dense", used by every layer unless `layer_ffns` is given.
      layer_mixers: per-layer mixers (length L), e.g. Qwen3-Next's three Gated DeltaNet layers
        then one gated softmax layer; () = `mixer` everywhere.
      layer_ffns: per-layer FFN kinds (length L); () = `ffn` everywhere.
      d_ff: hidden width of each routed expert (and of dense FFNs unless `dense_d_ff`).
      dense_d_ff: hidden width of the dense FFN layers; None = d_ff.
      num_experts, top_k, router, router_kwargs, dispatcher, capacity_factor, num_shared,
        d_ff_shared, shared_gate: MoE options (see `moejax.moe.layer.MoEConfig`).
      conv_size, chunk_size, allow_neg_eigval, delta_impl: delta-mixer options.
      num_key_heads: delta mixers' query/key heads (grouped, divides num_heads); None = all.
      attn_num_heads, attn_head_dim: softmax mixers' heads and head dim; None = num_heads,
        head_dim (hybrid models give their attention layers other shapes).
      num_kv_heads: softmax mixers' key/value heads (grouped-query attention); None = all.
      qk_norm: RMSNorm on each query/key head of softmax mixers (Qwen3).
      rope_theta: rotary base of softmax mixers.
      rotary_fraction: share of each attention head's channels that rotate (Qwen3-Next: 0.25).
      zero_centered_norm: every RMSNorm of the model except the delta mixers' output norm scales
        by `(1 + w)`, w starting at 0 (Qwen3-Next).
      max_seq_len: longest sequence the model accepts (positions of attention caches).
      tie_embeddings: share the input embedding with the output projection.
      dtype: compute dtype, "float32" or "bfloat16" (params stay float32; logits and losses are
        float32).
      norm_eps: RMSNorm epsilon.

    Every field is checked on construction, whether or not the model uses it: ints must be ints
    (Python or NumPy, never bool or str), numbers real and finite, flags bools, names one of
    their choices. A value of the wrong kind raises `moejax.validation.ArgumentTypeError` (a
    `TypeError` and a `ValueError`), one out of range a `ValueError`; both name the field.
    Configs read from JSON go through `from_dict`, which also names unknown keys.
    """

    vocab_size: int = 256
    d_model: int = 128
    num_layers: int = 2
    num_heads: int = 4
    head_dim: int = 32
    expand_v: float = 2.0
    value_head_dim: int | None = None
    mixer: str = "qdelta"
    ffn: str = "moe"
    layer_mixers: tuple[str, ...] = ()
    layer_ffns: tuple[str, ...] = ()
    d_ff: int = 256
    dense_d_ff: int | None = None
    num_experts: int = 8
    top_k: int = 2
    router: str = "topk"
    router_kwargs: tuple[tuple[str, Any], ...] = ()
    dispatcher: str = "dropless"
    capacity_factor: float = 1.25
    num_shared: int = 0
    d_ff_shared: int | None = None
    shared_gate: bool = False
    conv_size: int = 4
    chunk_size: int = 64
    allow_neg_eigval: bool = False
    delta_impl: str = "auto"
    num_key_heads: int | None = None
    attn_num_heads: int | None = None
    attn_head_dim: int | None = None
    num_kv_heads: int | None = None
    qk_norm: bool = False
    rope_theta: float = 10000.0
    rotary_fraction: float = 1.0
    zero_centered_norm: bool = False
    max_seq_len: int = 2048
    tie_embeddings: bool = True
    dtype: str = "float32"
    norm_eps: float = 1e-6

    def __post_init__(self):
        for name, lo in _INT_FIELDS:
            check_int(name, getattr(self, name), lo=lo)
            object.__setattr__(self, name, int(getattr(self, name)))
        for name in _OPTIONAL_INT_FIELDS:
            if getattr(self, name) is not None:
                check_int(name, getattr(self, name), lo=1)
                object.__setattr__(self, name, int(getattr(self, name)))
        for name in _BOOL_FIELDS:
            check_bool(name, getattr(self, name))
            object.__setattr__(self, name, bool(getattr(self, name)))
        for name in _POSITIVE_FLOAT_FIELDS:
            value = getattr(self, name)
            check_number(name, value)
            if not value > 0:
                raise ValueError(f"{name} must be > 0, got {value}")
            object.__setattr__(self, name, float(value))
        check_range("rotary_fraction", self.rotary_fraction, 0.0, 1.0, lo_open=False)
        object.__setattr__(self, "rotary_fraction", float(self.rotary_fraction))
        _, expand_v = delta_mixer.resolve_value_dim(self.head_dim, self.expand_v,
                                                    self.value_head_dim)
        object.__setattr__(self, "expand_v", expand_v)
        # JSON round trips give lists: store tuples so the config stays hashable.
        for name in ("layer_mixers", "layer_ffns"):
            value = getattr(self, name)
            if isinstance(value, str) or not isinstance(value, list | tuple):
                raise ArgumentTypeError(f"{name} must be a list or tuple of names (one per "
                                        f"layer), got {value!r}")
            object.__setattr__(self, name, tuple(value))
        object.__setattr__(self, "router_kwargs", _router_kwargs(self.router_kwargs))
        self._check_choices("mixer", (self.mixer,), MIXERS)
        self._check_choices("ffn", (self.ffn,), FFNS)
        self._check_choices("layer_mixers", self.layer_mixers, MIXERS, per_layer=True)
        self._check_choices("layer_ffns", self.layer_ffns, FFNS, per_layer=True)
        check_choice("dtype", self.dtype, DTYPES)
        check_choice("delta_impl", self.delta_impl, DELTA_IMPLS)
        router_base.get_router(self.router)  # an unknown router, even in a dense model
        # Build the sub-configs once: they validate their own fields.
        mixer_cfgs = {m: self._make_mixer_cfg(m) for m in set(self.mixers)}
        object.__setattr__(self, "_mixer_cfgs", mixer_cfgs)
        object.__setattr__(self, "_moe_cfg", self._make_moe_cfg())

    @classmethod
    def from_dict(cls, fields: Any, *, source: str = "model config") -> LMConfig:
        """The config of a JSON object (`to_dict`'s output, or an older saved one).

        Configs saved before `value_head_dim` existed (only `expand_v`) load unchanged.

        Args:
          fields: the parsed JSON object.
          source: what to name in messages (e.g. the file's path).

        Raises:
          ValueError / ArgumentTypeError: `fields` is not an object, holds an unknown key, or a
            field is invalid; the message starts with `source` and names the key.
        """
        if not isinstance(fields, Mapping):
            raise ArgumentTypeError(f"{source}: an LMConfig must be a JSON object of fields, got "
                                    f"{type(fields).__name__}")
        known = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(str(k) for k in fields if k not in known)
        if unknown:
            raise ValueError(f"{source}: unknown LMConfig field(s) {', '.join(unknown)}; known "
                             f"fields: {', '.join(known)}")
        try:
            return cls(**fields)
        except ArgumentTypeError as e:
            raise ArgumentTypeError(f"{source}: {e}") from e
        except ValueError as e:
            raise ValueError(f"{source}: {e}") from e

    def _check_choices(self, name, values, valid, *, per_layer=False):
        if per_layer and values and len(values) != self.num_layers:
            raise ValueError(f"{name} must list one entry per layer (num_layers="
                             f"{self.num_layers}), got {len(values)}")
        bad = [v for v in values if v not in valid]
        if bad:
            raise ValueError(f"{name} must be one of {valid}, got {bad[0]!r}")

    @property
    def mixers(self) -> tuple[str, ...]:
        """The mixer of each layer."""
        return self.layer_mixers or (self.mixer,) * self.num_layers

    @property
    def ffns(self) -> tuple[str, ...]:
        """The FFN kind of each layer."""
        return self.layer_ffns or (self.ffn,) * self.num_layers

    def _make_mixer_cfg(self, mixer: str):
        if mixer in DELTA_MIXERS:
            return delta_mixer.DeltaMixerConfig(
                d_model=self.d_model, num_heads=self.num_heads, head_dim=self.head_dim,
                num_key_heads=self.num_key_heads, expand_v=self.expand_v,
                value_head_dim=self.value_dim, mode=mixer,
                conv_size=self.conv_size, allow_neg_eigval=self.allow_neg_eigval,
                chunk_size=self.chunk_size, impl=self.delta_impl, norm_eps=self.norm_eps)
        head_dim = self.attn_head_dim or self.head_dim
        rotary_dim = (head_dim if self.rotary_fraction == 1.0  # AttentionConfig checks it is even
                      else 2 * int(head_dim * self.rotary_fraction // 2))
        return attention.AttentionConfig(
            d_model=self.d_model, num_heads=self.attn_num_heads or self.num_heads,
            head_dim=head_dim, gated=mixer == "gated_softmax", rope_theta=self.rope_theta,
            num_kv_heads=self.num_kv_heads, rotary_dim=rotary_dim, qk_norm=self.qk_norm,
            zero_centered_norm=self.zero_centered_norm, norm_eps=self.norm_eps)

    def _make_moe_cfg(self):
        if "moe" not in self.ffns:
            return None
        return moe_layer.MoEConfig(
            d_model=self.d_model, d_ff=self.d_ff, num_experts=self.num_experts,
            router=self.router, top_k=self.top_k, router_kwargs=self.router_kwargs,
            dispatcher=self.dispatcher, capacity_factor=self.capacity_factor,
            num_shared=self.num_shared, d_ff_shared=self.d_ff_shared,
            shared_gate=self.shared_gate)

    def mixer_config(self, layer: int):
        """The `DeltaMixerConfig` or `AttentionConfig` of layer `layer`."""
        return self._mixer_cfgs[self.mixers[layer]]

    @property
    def value_dim(self) -> int:
        """Delta mixers' value head dim Dv (an int: `value_head_dim`, or expand_v · head_dim)."""
        return delta_mixer.resolve_value_dim(self.head_dim, self.expand_v,
                                             self.value_head_dim)[0]

    @property
    def moe_config(self) -> moe_layer.MoEConfig | None:
        return self._moe_cfg

    @property
    def compute_dtype(self):
        return jnp.dtype(self.dtype)

    def to_dict(self) -> dict:
        """JSON-able fields (for checkpoints and run directories)."""
        d = dataclasses.asdict(self)
        d["router_kwargs"] = [list(p) for p in self.router_kwargs]
        d["layer_mixers"], d["layer_ffns"] = list(self.layer_mixers), list(self.layer_ffns)
        return d


PRESETS: dict[str, dict] = {
    # Seconds per step on a CPU: for tests.
    "tiny": dict(d_model=32, num_layers=2, num_heads=2, head_dim=16, d_ff=64, num_experts=4,
                 top_k=2, chunk_size=16, max_seq_len=256),
    # The `make demo` model: Q-Delta mixer + STAR-routed MoE; trains visibly in minutes on CPU.
    "demo": dict(d_model=128, num_layers=4, num_heads=4, head_dim=32, expand_v=1.0, d_ff=256,
                 num_experts=8, top_k=2, router="star", router_kwargs=(("eta", 5e-5),),
                 mixer="qdelta", chunk_size=32, max_seq_len=1024),
    # Qwen3-Next's layout with this research line's parts: three gated Q-Delta layers (grouped
    # key heads) per gated softmax layer (GQA, q/k norm, partial rotary), zero-centred norms,
    # STAR-routed MoE with a sigmoid-gated shared expert.
    "hybrid": dict(d_model=128, num_layers=4, num_heads=4, num_key_heads=2, head_dim=32,
                   expand_v=1.0, layer_mixers=("gated_qdelta",) * 3 + ("gated_softmax",),
                   mixer="gated_qdelta", attn_num_heads=4, attn_head_dim=32, num_kv_heads=2,
                   qk_norm=True, rotary_fraction=0.5, zero_centered_norm=True, d_ff=128,
                   num_experts=8, top_k=2, num_shared=1, d_ff_shared=128, shared_gate=True,
                   router="star", router_kwargs=(("eta", 5e-5),), chunk_size=32,
                   max_seq_len=1024),
    "small": dict(d_model=512, num_layers=8, num_heads=8, head_dim=64, d_ff=1024,
                  num_experts=16, top_k=2, chunk_size=64, max_seq_len=4096),
    # DESIGN §3 paper-scale mixer config (340M with a dense SwiGLU FFN); for GPU/TPU.
    "340m": dict(d_model=1024, num_layers=21, num_heads=6, head_dim=128, expand_v=2.0,
                 ffn="dense", d_ff=2816, chunk_size=64, max_seq_len=4096),
}


def get_preset(name: str, **overrides) -> LMConfig:
    """The preset `name` with fields replaced by `overrides`."""
    if name not in PRESETS:
        raise ValueError(f"Unknown preset {name!r}; known presets: {', '.join(PRESETS)}")
    return LMConfig(**{**PRESETS[name], **overrides})


# ----------------------------------------------------------------------------- parameters


def init(key: Array, cfg: LMConfig) -> tuple[dict, dict]:
    """Returns `(params, state)`; state holds each MoE layer's router state."""
    k_emb, k_out, *k_layers = jax.random.split(key, 2 + cfg.num_layers)
    params: dict = {
        "embed": jax.random.normal(k_emb, (cfg.vocab_size, cfg.d_model), jnp.float32) * 0.02,
        "blocks": [],
    }
    if not cfg.tie_embeddings:
        params["unembed"] = (jax.random.normal(k_out, (cfg.d_model, cfg.vocab_size), jnp.float32)
                             * cfg.d_model**-0.5)
    state: dict = {"blocks": []}
    norm_init = functools.partial(rms_norm_init, zero_centered=cfg.zero_centered_norm)
    params["final_norm"] = norm_init(cfg.d_model)
    for i, k in enumerate(k_layers):
        k_mix, k_ffn = jax.random.split(k)
        mixer_mod = delta_mixer if cfg.mixers[i] in DELTA_MIXERS else attention
        block = {"norm1": norm_init(cfg.d_model), "norm2": norm_init(cfg.d_model),
                 "mixer": mixer_mod.init(k_mix, cfg.mixer_config(i))}
        if cfg.ffns[i] == "moe":
            block["ffn"], moe_state = moe_layer.init(k_ffn, cfg.moe_config)
        else:
            block["ffn"], moe_state = ffn.init(k_ffn, cfg.d_model, cfg.dense_d_ff or cfg.d_ff), {}
        params["blocks"].append(block)
        state["blocks"].append(moe_state)
    return params, state


def num_params(params) -> int:
    return sum(int(x.size) for x in jax.tree.leaves(params))


# ----------------------------------------------------------------------------- forward


def _concrete(x: Any) -> bool:
    """Whether `x`'s values can be read on the host now (not a tracer, fully addressable)."""
    if isinstance(x, jax.core.Tracer):
        return False
    return not isinstance(x, jax.Array) or x.is_fully_addressable


def _check_ids(name: str, ids: Any, size: int, what: str) -> None:
    """Outside jit: raises unless every id of `ids` lies in [0, size) (`what` names `size`)."""
    if not _concrete(ids) or ids.size == 0:
        return
    with jax.ensure_compile_time_eval():  # a concrete constant inside a trace, too
        lo, hi = int(ids.min()), int(ids.max())
    if lo < 0 or hi >= size:
        raise ValueError(f"{name} must be in [0, {what}={size}), got ids from {lo} to {hi}")


def check_tokens(tokens: Any, cfg: LMConfig, *, offset: int = 0, name: str = "tokens",
                  ndim: int = 2) -> None:
    """Checks token ids for `cfg`: an int array of rank `ndim` (`[B, T]`, or `[B]` for decoding)
    whose length plus `offset` fits `max_seq_len`; when the values are concrete (outside `jit`,
    or a constant inside it) also that every id lies in [0, vocab_size).

    Raises:
      ArgumentTypeError: `tokens` is not an array (None, a list, a str).
      ValueError: wrong rank, a non-integer dtype, too long, or an id out of range; the message
        names `name` and the valid range.
    """
    check_array(name, tokens)
    shape = "[B, T]" if ndim == 2 else "[B]"
    if tokens.ndim != ndim:
        raise ValueError(f"{name} must be {shape} integers, got shape {tokens.shape}")
    if not jnp.issubdtype(tokens.dtype, jnp.integer):
        raise ValueError(f"{name} must be integers, got dtype {tokens.dtype}")
    if ndim == 2 and tokens.shape[1] + offset > cfg.max_seq_len:
        raise ValueError(f"sequence length {tokens.shape[1] + offset} exceeds the model's "
                         f"max_seq_len={cfg.max_seq_len}")
    _check_ids(name, tokens, cfg.vocab_size, "vocab_size")


def _check_positions(positions: Any, tokens: Array) -> None:
    check_array("positions", positions)
    B, T = tokens.shape
    if positions.ndim != 2 or positions.shape[0] != B:
        raise ValueError(f"positions must be [B, P] with B={B}, got shape {positions.shape}")
    if not jnp.issubdtype(positions.dtype, jnp.integer):
        raise ValueError(f"positions must be integers, got dtype {positions.dtype}")
    _check_ids("positions", positions, T, "T")


def _in_range_check(name: str, ids: Array, size: int, what: str) -> None:
    """A `checkify` check that `ids` lie in [0, size) (only under `checkify.checkify`)."""
    checkify.check(jnp.all((ids >= 0) & (ids < size)),
                   f"{name} must be in [0, {what}={size}), got ids from {{lo}} to {{hi}}",
                   lo=jnp.min(ids), hi=jnp.max(ids))


def embed(params: dict, tokens: Array, cfg: LMConfig) -> Array:
    """Token embeddings `[..., d]` in the compute dtype.

    Out-of-range ids are clamped (explicitly, both sides): an id < 0 reads row 0, an id ≥ V
    row V − 1. Eager calls of `apply`/`prefill`/`generate` refuse such ids first; under `jit`
    use `checked_apply` to have them reported.
    """
    return jnp.take(params["embed"], tokens, axis=0, mode="clip").astype(cfg.compute_dtype)


def norm(params: dict, h: Array, cfg: LMConfig) -> Array:
    """The model's RMSNorm (zero-centred `(1 + w)` scale when `cfg.zero_centered_norm`)."""
    return rms_norm(params, h, eps=cfg.norm_eps, zero_centered=cfg.zero_centered_norm)


def mixer_apply(block_params: dict, h: Array, cfg: LMConfig, layer: int, cache=None):
    """Layer `layer`'s token mixer on normed inputs `h` `[B, T, d]` → `(y, new_cache)`."""
    mod = delta_mixer if cfg.mixers[layer] in DELTA_MIXERS else attention
    return mod.apply(block_params, h, cfg=cfg.mixer_config(layer), cache=cache)


def ffn_apply(block_params: dict, moe_state: dict, h: Array, cfg: LMConfig, layer: int, *,
              train: bool, rng: Array | None):
    """Layer `layer`'s FFN on normed inputs → `(y, new_moe_state, aux or None)`."""
    if cfg.ffns[layer] == "dense":
        return ffn.apply(block_params, h), moe_state, None
    return moe_layer.moe_apply(block_params, moe_state, h, cfg=cfg.moe_config, train=train,
                               rng=rng)


def _forward(params, state, tokens, cfg, *, train, rng, caches=None):
    """Runs the blocks; returns (final hidden [B, T, d], new_state, aux, new caches)."""
    h = embed(params, tokens, cfg)
    new_blocks, new_caches, auxes = [], [], []
    for i, block in enumerate(params["blocks"]):
        y, cache = mixer_apply(block["mixer"], norm(block["norm1"], h, cfg), cfg, i,
                               None if caches is None else caches[i])
        h = h + y
        layer_rng = None if rng is None else jax.random.fold_in(rng, i)
        y, moe_state, aux = ffn_apply(block["ffn"], state["blocks"][i],
                                      norm(block["norm2"], h, cfg), cfg, i, train=train,
                                      rng=layer_rng)
        h = h + y
        new_blocks.append(moe_state)
        new_caches.append(cache)
        if aux is not None:
            auxes.append(aux)
    h = norm(params["final_norm"], h, cfg)
    return h, {**state, "blocks": new_blocks}, _merge_aux(auxes), new_caches


def _merge_aux(auxes: list[dict]) -> dict:
    """Sums aux losses over MoE layers, averages their scalar metrics, stacks loads `[L, E]` and
    top-1 experts `[L, B·T]`."""
    if not auxes:
        return {"aux_loss": jnp.zeros((), jnp.float32), "metrics": {}}
    metrics = {name: jnp.mean(jnp.stack([a["metrics"][name] for a in auxes]))
               for name in auxes[0]["metrics"]}
    return {"aux_loss": sum(a["aux_loss"] for a in auxes), "metrics": metrics,
            "load": jnp.stack([a["load"] for a in auxes]),
            "top1": jnp.stack([a["top1"] for a in auxes])}


def logits_from_hidden(params: dict, h: Array, cfg: LMConfig) -> Array:
    """`h` `[..., d]` → float32 logits `[..., V]`."""
    w = params["embed"].T if cfg.tie_embeddings else params["unembed"]
    return jnp.einsum("...d,dv->...v", h.astype(jnp.float32), w.astype(jnp.float32))


def apply(params: dict, state: dict, tokens: Array, *, cfg: LMConfig, train: bool = False,
          rng: Array | None = None, positions: Array | None = None
          ) -> tuple[Array, dict, dict]:
    """Forward pass.

    Args:
      params, state: from `init` (state: MoE router states).
      tokens: `[B, T]` int token ids in [0, vocab_size).
      cfg: model config.
      train: training mode (router noise and router-state updates).
      rng: PRNG key for stochastic routers.
      positions: optional `[B, P]` int indices in [0, T); logits are then computed only there
        (`[B, P, V]`), e.g. MQAR answer positions, never materialising `[B, T, V]`.

    Returns:
      `(logits float32 [B, T or P, V], new_state, aux)`; `aux` has `aux_loss` (summed over MoE
      layers), `metrics` (MoE metrics averaged over layers) and, for MoE, `load` `[L, E]` and
      `top1` `[L, B·T]` (each token's top-1 expert per layer, for routing metrics).

    Raises:
      ValueError / ArgumentTypeError: `tokens` or `positions` not an int array of the right
        shape, a sequence longer than `max_seq_len`, or, when the values are concrete (called
        outside `jit`), ids outside [0, vocab_size) / positions outside [0, T).

    Out-of-range values under `jit` (traced, so not checked here): token ids are clamped to
    [0, V − 1] (see `embed`) and out-of-range positions give NaN logits. `checked_apply`
    reports both under `jit`.
    """
    return _apply(params, state, tokens, cfg=cfg, train=train, rng=rng, positions=positions,
                  check=False)


def _apply(params, state, tokens, *, cfg, train, rng, positions, check, name="tokens"):
    check_tokens(tokens, cfg, name=name)
    if positions is not None:
        _check_positions(positions, tokens)
    if check:
        _in_range_check(name, tokens, cfg.vocab_size, "vocab_size")
        if positions is not None:
            _in_range_check("positions", positions, tokens.shape[1], "T")
    h, new_state, aux, _ = _forward(params, state, tokens, cfg, train=train, rng=rng)
    if positions is not None:
        T = tokens.shape[1]
        valid = (positions >= 0) & (positions < T)
        h = jnp.take_along_axis(h, jnp.where(valid, positions, 0)[..., None], axis=1)
        h = jnp.where(valid[..., None], h, jnp.nan)
    return logits_from_hidden(params, h, cfg), new_state, aux


def checked_apply(params: dict, state: dict, tokens: Array, *, cfg: LMConfig,
                  train: bool = False, rng: Array | None = None,
                  positions: Array | None = None):
    """`apply` with `checkify` checks that token ids lie in [0, vocab_size) and positions in
    [0, T), so out-of-range values are reported under `jit` too (plain `apply` clamps them).

    Returns:
      `(err, (logits, new_state, aux))`; `err.throw()` raises `checkify.JaxRuntimeError` naming
      `tokens` (or `positions`), the valid range and the ids seen; `err.get()` is None if none.

    Example:
      >>> err, (logits, _, _) = jax.jit(functools.partial(checked_apply, cfg=cfg))(
      ...     params, state, tokens)
      >>> err.throw()
    """
    fn = functools.partial(_apply, cfg=cfg, train=train, check=True)
    return checkify.checkify(fn)(params, state, tokens, rng=rng, positions=positions)


def loss_fn(params: dict, state: dict, batch: dict, *, cfg: LMConfig, train: bool,
            rng: Array | None = None) -> tuple[Array, tuple[dict, dict]]:
    """Mean next-token cross-entropy (over `loss_mask` if given) plus MoE aux losses.

    Args:
      batch: `{"inputs": [B, T] int, "targets": [B, T] int, optional "loss_mask": [B, T]}`.

    Returns:
      `(loss, (new_state, metrics))`; metrics: `loss`, `ce` (nats/token), `aux_loss`, MoE
      metrics prefixed `moe/`, and `load` `[L, E]` for MoE models.
    """
    return _loss_fn(params, state, batch, cfg=cfg, train=train, rng=rng, check=False)


def checked_loss_fn(params: dict, state: dict, batch: dict, *, cfg: LMConfig, train: bool,
                    rng: Array | None = None):
    """`loss_fn` with `checked_apply`'s range checks on `inputs` and on `targets` (both in
    [0, vocab_size)), functionalised by `checkify`: returns `(err, (loss, (new_state,
    metrics)))`. Differentiate inside: `checkify.checkify(jax.grad(...))` or wrap the step."""
    fn = functools.partial(_loss_fn, cfg=cfg, train=train, check=True)
    return checkify.checkify(fn)(params, state, batch, rng=rng)


def _loss_fn(params, state, batch, *, cfg, train, rng, check):
    if not isinstance(batch, Mapping) or "inputs" not in batch or "targets" not in batch:
        raise ValueError(f"batch must be a dict with 'inputs' and 'targets', got "
                         f"{sorted(batch) if isinstance(batch, Mapping) else type(batch).__name__}")
    targets = batch["targets"]
    check_tokens(targets, cfg, name="batch['targets']")
    if targets.shape != batch["inputs"].shape:
        raise ValueError(f"batch['targets'] has shape {targets.shape}, batch['inputs'] "
                         f"{batch['inputs'].shape}; they must match")
    if check:
        _in_range_check("batch['targets']", targets, cfg.vocab_size, "vocab_size")
    logits, new_state, aux = _apply(params, state, batch["inputs"], cfg=cfg, train=train,
                                    rng=rng, positions=None, check=check, name="batch['inputs']")
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"])
    mask = batch.get("loss_mask")
    if mask is not None:
        check_array("batch['loss_mask']", mask)
        if mask.shape != targets.shape:
            raise ValueError(f"batch['loss_mask'] has shape {mask.shape}, batch['targets'] "
                             f"{targets.shape}; they must match")
    if mask is None:
        ce = jnp.mean(ce)
    else:
        mask = mask.astype(jnp.float32)
        ce = jnp.sum(ce * mask) / jnp.maximum(jnp.sum(mask), 1.0)
    loss = ce + aux["aux_loss"]
    metrics = {"loss": loss, "ce": ce, "aux_loss": aux["aux_loss"],
               **{f"moe/{k}": v for k, v in aux["metrics"].items()}}
    if "load" in aux:
        metrics["load"] = aux["load"]
    return loss, (new_state, metrics)


# ----------------------------------------------------------------------------- decoding


def init_cache(cfg: LMConfig, batch: int, max_len: int | None = None) -> list:
    """Per-layer decode caches for a fresh batch of sequences."""
    max_len = cfg.max_seq_len if max_len is None else max_len
    return [delta_mixer.init_cache(cfg.mixer_config(i), batch, cfg.compute_dtype)
            if m in DELTA_MIXERS else
            attention.init_cache(cfg.mixer_config(i), batch, max_len, cfg.compute_dtype)
            for i, m in enumerate(cfg.mixers)]


def prefill(params: dict, state: dict, tokens: Array, cache: list, *, cfg: LMConfig
            ) -> tuple[Array, list]:
    """Feeds `tokens` `[B, T]` through the model on top of `cache`.

    Returns:
      `(logits of the last position [B, V], new_cache)`.

    Raises:
      ValueError / ArgumentTypeError: as `apply` for `tokens` (ids checked outside `jit` only).
    """
    check_tokens(tokens, cfg)
    if tokens.shape[1] == 0:
        raise ValueError("tokens must hold at least one position, got shape "
                         f"{tokens.shape}")
    if not isinstance(cache, list | tuple) or len(cache) != cfg.num_layers:
        raise ValueError(f"cache must be a list of {cfg.num_layers} per-layer caches (from "
                         f"init_cache), got {type(cache).__name__}")
    h, _, _, cache = _forward(params, state, tokens, cfg, train=False, rng=None, caches=cache)
    return logits_from_hidden(params, h[:, -1], cfg), cache


def decode_step(params: dict, state: dict, token: Array, cache: list, *, cfg: LMConfig
                ) -> tuple[Array, list]:
    """One token per sequence: `token` `[B]` → `(logits [B, V], new_cache)`.

    Delta mixers advance with `delta_rule_step` (the recurrent form), softmax mixers append to
    their KV cache. Token ids are checked as in `apply` (their range only outside `jit`; under
    `jit` they are clamped, see `embed`).
    """
    check_tokens(token, cfg, name="token", ndim=1)
    if not isinstance(cache, list | tuple) or len(cache) != cfg.num_layers:
        raise ValueError(f"cache must be a list of {cfg.num_layers} per-layer caches (from "
                         f"init_cache or prefill), got {type(cache).__name__}")
    h = embed(params, token, cfg)
    new_caches = []
    for i, block in enumerate(params["blocks"]):
        x = norm(block["norm1"], h, cfg)
        if cfg.mixers[i] in DELTA_MIXERS:
            y, c = delta_mixer.step(block["mixer"], x, cache[i], cfg=cfg.mixer_config(i))
        else:
            y, c = attention.apply(block["mixer"], x[:, None], cfg=cfg.mixer_config(i),
                                   cache=cache[i])
            y = y[:, 0]
        h = h + y
        y, _, _ = ffn_apply(block["ffn"], state["blocks"][i], norm(block["norm2"], h, cfg), cfg,
                            i, train=False, rng=None)
        h = h + y
        new_caches.append(c)
    h = norm(params["final_norm"], h, cfg)
    return logits_from_hidden(params, h, cfg), new_caches


def sample_token(key: Array, logits: Array, *, temperature: float, top_p: float) -> Array:
    """Samples `[B]` tokens from `logits` `[B, V]`: greedy at temperature 0, else nucleus.

    `temperature` (≥ 0) and `top_p` (in (0, 1]) are Python numbers (static under `jit`).
    """
    _check_sampling(temperature, top_p)
    if temperature == 0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits / temperature
    if top_p < 1.0:
        order = jnp.argsort(-logits, axis=-1)
        sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
        probs = jax.nn.softmax(sorted_logits, axis=-1)
        keep_sorted = (jnp.cumsum(probs, axis=-1) - probs) < top_p  # always keeps the first
        keep = jnp.zeros_like(keep_sorted).at[
            jnp.arange(logits.shape[0])[:, None], order].set(keep_sorted)
        logits = jnp.where(keep, logits, -jnp.inf)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("cfg", "max_new_tokens", "temperature", "top_p"))
def _generate(params, state, prompt, key, *, cfg, max_new_tokens, temperature, top_p):
    B, T0 = prompt.shape
    cache = init_cache(cfg, B, T0 + max_new_tokens)
    logits, cache = prefill(params, state, prompt, cache, cfg=cfg)

    def body(carry, k):
        logits, cache = carry
        tok = sample_token(k, logits, temperature=temperature, top_p=top_p)
        logits, cache = decode_step(params, state, tok, cache, cfg=cfg)
        return (logits, cache), tok

    _, toks = jax.lax.scan(body, (logits, cache), jax.random.split(key, max_new_tokens))
    return jnp.concatenate([prompt, toks.T.astype(prompt.dtype)], axis=1)


def _check_sampling(temperature: Any, top_p: Any) -> None:
    check_number("temperature", temperature)
    if not temperature >= 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    check_range("top_p", top_p, 0.0, 1.0)


def generate(params: dict, state: dict, prompt: Array, *, cfg: LMConfig, key: Array,
             max_new_tokens: int, temperature: float = 1.0, top_p: float = 1.0) -> Array:
    """Samples a continuation of `prompt` `[B, T0]`; returns `[B, T0 + max_new_tokens]`.

    Args:
      prompt: `[B, T0]` int token ids in [0, vocab_size), T0 ≥ 1 (checked when concrete).
      key: a PRNG key.
      max_new_tokens: ≥ 1; T0 + max_new_tokens must not exceed `cfg.max_seq_len`.
      temperature: a number ≥ 0; 0 is greedy.
      top_p: nucleus mass in (0, 1].

    Raises:
      ValueError / ArgumentTypeError: naming the argument.
    """
    check_int("max_new_tokens", max_new_tokens, lo=1)
    _check_sampling(temperature, top_p)
    check_array("key", key)
    check_tokens(prompt, cfg, offset=max_new_tokens, name="prompt")
    if prompt.shape[1] == 0:
        raise ValueError(f"prompt must hold at least one token, got shape {prompt.shape}")
    return _generate(params, state, prompt, key, cfg=cfg, max_new_tokens=int(max_new_tokens),
                     temperature=float(temperature), top_p=float(top_p))
