"""Decoder-only language model: pre-norm blocks of (mixer × FFN), byte-level vocabulary.

    h_0 = Embed(tokens)
    h  ← h + Mixer(RMSNorm(h))          mixer ∈ qdelta, gated_qdelta, deltanet, gated_deltanet,
                                         softmax, gated_softmax
    h  ← h + FFN(RMSNorm(h))            ffn ∈ dense (SwiGLU), moe (any router of moejax.routers)
    logits = RMSNorm(h) · Eᵀ            (tied embeddings by default)

Pure functions: `init`, `apply`, `loss_fn`, and decoding with `init_cache` / `prefill` /
`decode_step` / `generate` (KV cache for softmax mixers, recurrent state + conv cache for delta
mixers). Axis letters: B batch, T time, d width, V vocabulary, L layers, E experts.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import optax

from moejax.layers import attention, delta_mixer, ffn
from moejax.layers.norms import rms_norm, rms_norm_init
from moejax.moe import layer as moe_layer
from moejax.routers import base as router_base

Array = jax.Array

DELTA_MIXERS = delta_mixer.MODES
MIXERS = (*DELTA_MIXERS, "softmax", "gated_softmax")
FFNS = ("moe", "dense")
DTYPES = ("float32", "bfloat16")


@dataclasses.dataclass(frozen=True, kw_only=True)
class LMConfig:
    """Model configuration (frozen, hashable, validated at construction).

    Attributes:
      vocab_size: V (256 for bytes).
      d_model: d.
      num_layers: L.
      num_heads: heads of the mixer (delta mixers: value heads, one state each).
      head_dim: key/query head dim (delta mixers) or head dim (softmax mixers).
      expand_v: delta mixers' value head dim = expand_v · head_dim.
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
    """

    vocab_size: int = 256
    d_model: int = 128
    num_layers: int = 2
    num_heads: int = 4
    head_dim: int = 32
    expand_v: float = 2.0
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
        for name in ("vocab_size", "d_model", "num_layers", "num_heads", "head_dim", "d_ff",
                     "max_seq_len"):
            router_base.check_int(name, getattr(self, name), lo=1)
        for name in ("dense_d_ff", "attn_num_heads", "attn_head_dim"):
            if getattr(self, name) is not None:
                router_base.check_int(name, getattr(self, name), lo=1)
        # JSON round trips give lists: store tuples so the config stays hashable.
        for name in ("layer_mixers", "layer_ffns"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        kwargs = self.router_kwargs
        pairs = kwargs.items() if isinstance(kwargs, dict) else kwargs
        object.__setattr__(self, "router_kwargs", tuple(sorted(tuple(p) for p in pairs)))
        self._check_choices("mixer", (self.mixer,), MIXERS)
        self._check_choices("ffn", (self.ffn,), FFNS)
        self._check_choices("layer_mixers", self.layer_mixers, MIXERS, per_layer=True)
        self._check_choices("layer_ffns", self.layer_ffns, FFNS, per_layer=True)
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {DTYPES}, got {self.dtype!r}")
        if not 0.0 <= self.rotary_fraction <= 1.0:
            raise ValueError(f"rotary_fraction must be in [0, 1], got {self.rotary_fraction}")
        # Build the sub-configs once: they validate their own fields.
        mixer_cfgs = {m: self._make_mixer_cfg(m) for m in set(self.mixers)}
        object.__setattr__(self, "_mixer_cfgs", mixer_cfgs)
        object.__setattr__(self, "_moe_cfg", self._make_moe_cfg())

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
                num_key_heads=self.num_key_heads, expand_v=self.expand_v, mode=mixer,
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


def _check_tokens(tokens: Array, cfg: LMConfig, *, offset: int = 0) -> None:
    if tokens.ndim != 2:
        raise ValueError(f"tokens must be [B, T] integers, got shape {tokens.shape}")
    if not jnp.issubdtype(tokens.dtype, jnp.integer):
        raise ValueError(f"tokens must be integers, got dtype {tokens.dtype}")
    if tokens.shape[1] + offset > cfg.max_seq_len:
        raise ValueError(f"sequence length {tokens.shape[1] + offset} exceeds the model's "
                         f"max_seq_len={cfg.max_seq_len}")


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
    h = params["embed"][tokens].astype(cfg.compute_dtype)
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
      tokens: `[B, T]` int token ids.
      cfg: model config.
      train: training mode (router noise and router-state updates).
      rng: PRNG key for stochastic routers.
      positions: optional `[B, P]` indices; logits are then computed only there (`[B, P, V]`),
        e.g. MQAR answer positions, never materialising `[B, T, V]`.

    Returns:
      `(logits float32 [B, T or P, V], new_state, aux)`; `aux` has `aux_loss` (summed over MoE
      layers), `metrics` (MoE metrics averaged over layers) and, for MoE, `load` `[L, E]` and
      `top1` `[L, B·T]` (each token's top-1 expert per layer, for routing metrics).
    """
    _check_tokens(tokens, cfg)
    h, new_state, aux, _ = _forward(params, state, tokens, cfg, train=train, rng=rng)
    if positions is not None:
        h = jnp.take_along_axis(h, positions[..., None], axis=1)
    return logits_from_hidden(params, h, cfg), new_state, aux


def loss_fn(params: dict, state: dict, batch: dict, *, cfg: LMConfig, train: bool,
            rng: Array | None = None) -> tuple[Array, tuple[dict, dict]]:
    """Mean next-token cross-entropy (over `loss_mask` if given) plus MoE aux losses.

    Args:
      batch: `{"inputs": [B, T] int, "targets": [B, T] int, optional "loss_mask": [B, T]}`.

    Returns:
      `(loss, (new_state, metrics))`; metrics: `loss`, `ce` (nats/token), `aux_loss`, MoE
      metrics prefixed `moe/`, and `load` `[L, E]` for MoE models.
    """
    logits, new_state, aux = apply(params, state, batch["inputs"], cfg=cfg, train=train, rng=rng)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"])
    mask = batch.get("loss_mask")
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
    """
    _check_tokens(tokens, cfg)
    h, _, _, cache = _forward(params, state, tokens, cfg, train=False, rng=None, caches=cache)
    return logits_from_hidden(params, h[:, -1], cfg), cache


def decode_step(params: dict, state: dict, token: Array, cache: list, *, cfg: LMConfig
                ) -> tuple[Array, list]:
    """One token per sequence: `token` `[B]` → `(logits [B, V], new_cache)`.

    Delta mixers advance with `delta_rule_step` (the recurrent form), softmax mixers append to
    their KV cache.
    """
    h = params["embed"][token].astype(cfg.compute_dtype)
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
    """Samples `[B]` tokens from `logits` `[B, V]`: greedy at temperature 0, else nucleus."""
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


def generate(params: dict, state: dict, prompt: Array, *, cfg: LMConfig, key: Array,
             max_new_tokens: int, temperature: float = 1.0, top_p: float = 1.0) -> Array:
    """Samples a continuation of `prompt` `[B, T0]`; returns `[B, T0 + max_new_tokens]`.

    Args:
      temperature: ≥ 0; 0 is greedy.
      top_p: nucleus mass in (0, 1].
    """
    _check_tokens(prompt, cfg, offset=max_new_tokens)
    if not temperature >= 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be a positive int, got {max_new_tokens!r}")
    return _generate(params, state, prompt, key, cfg=cfg, max_new_tokens=max_new_tokens,
                     temperature=float(temperature), top_p=float(top_p))
