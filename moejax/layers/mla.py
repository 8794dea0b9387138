"""Multi-head latent attention (MLA; DeepSeek-V2/V3, and Kimi Linear's variant without RoPE),
with the compressed-latent KV cache for decoding.

    q        = W_q h                         or, with `q_lora_rank`, W_qb RMSNorm(W_qa h)
    q        = [q_nope (Dn), q_rope (Dr)]    per head
    [c, kr]  = W_kva h                       c the kv latent [r]; kr one rope key for all heads
    c        = RMSNorm(c)
    [k_nope, v] = W_kvb c                    per head: Dn key and Dv value channels
    q_rope, kr ← rotary(q_rope), rotary(kr)  `rope`: "interleave" (DeepSeek's pair layout),
                                             "half" (rotate-half), "none" (Kimi Linear: NoPE)
    o        = softmax(q·[k_nope, kr] · scale + causal) v,   scale = (Dn + Dr)^-1/2 by default
    y        = W_out o

The decode cache holds only the normed latent `c` `[B, S, r]` and the rotated rope key
`kr` `[B, S, Dr]`: `r + Dr` numbers per token instead of `2 · H · D` for standard attention. A
cached call never expands them: it absorbs `W_kvb` into the query and the output (`q_nope W_uk`
is scored against c, the attention-weighted c is mapped by `W_uv`), which is the same function.
Axis letters: B batch, T query time, S key time, H heads, d width, r kv latent rank.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

from moejax.layers.attention import rotary
from moejax.layers.norms import rms_norm, rms_norm_init
from moejax.layers.segments import (
    attention_mask,
    check_attention_input,
    fresh_or_nan,
    key_mask,
    pack,
    scatter_rows,
)
from moejax.validation import check_choice, check_int, check_range

Array = jax.Array

ROPE_LAYOUTS = ("interleave", "half", "none")


@dataclasses.dataclass(frozen=True, kw_only=True)
class MLAConfig:
    """MLA layer options (the names of transformers' DeepSeek-V3 config in brackets).

    Attributes:
      d_model: d.
      num_heads: H.
      kv_lora_rank: r, the kv latent width [kv_lora_rank].
      q_lora_rank: rank of the low-rank query path, or None for a full `W_q` [q_lora_rank].
      qk_nope_head_dim: Dn, key/query channels without position [qk_nope_head_dim].
      qk_rope_head_dim: Dr, the rotary channels (one key shared by all heads; even)
        [qk_rope_head_dim].
      v_head_dim: Dv [v_head_dim].
      rope: "interleave" (DeepSeek: channel pairs (0, 1), (2, 3), ... rotate together, as
        `rope_interleave=True`), "half" (rotate-half pairs (i, i + Dr/2)) or "none" (Kimi
        Linear: the Dr channels carry no position).
      rope_theta: rotary base (> 0).
      softmax_scale: the score scale; None = (Dn + Dr)^-1/2 (DeepSeek's YaRN mscale², for a
        long-context checkpoint, is a factor the caller folds in here).
      norm_eps: epsilon of the latent RMSNorms (transformers' 1e-6).
      init_std: std of the N(0, init_std²) init of every projection; None = N(0, 1/fan_in).

    Raises (on construction):
      ValueError / ArgumentTypeError: naming the field.
    """

    d_model: int
    num_heads: int
    kv_lora_rank: int
    q_lora_rank: int | None = None
    qk_nope_head_dim: int = 128
    qk_rope_head_dim: int = 64
    v_head_dim: int = 128
    rope: str = "interleave"
    rope_theta: float = 10000.0
    softmax_scale: float | None = None
    norm_eps: float = 1e-6
    init_std: float | None = 0.02

    def __post_init__(self):
        for name in ("d_model", "num_heads", "kv_lora_rank", "v_head_dim"):
            check_int(name, getattr(self, name), lo=1)
        check_int("qk_nope_head_dim", self.qk_nope_head_dim, lo=0)
        check_int("qk_rope_head_dim", self.qk_rope_head_dim, lo=0)
        if self.qk_rope_head_dim % 2:
            raise ValueError(f"qk_rope_head_dim must be even, got {self.qk_rope_head_dim}")
        if self.qk_head_dim == 0:
            raise ValueError("qk_nope_head_dim + qk_rope_head_dim must be >= 1")
        if self.q_lora_rank is not None:
            check_int("q_lora_rank", self.q_lora_rank, lo=1)
        check_choice("rope", self.rope, ROPE_LAYOUTS)
        check_range("rope_theta", self.rope_theta, 0.0, math.inf, hi_open=True)
        if self.softmax_scale is not None:
            check_range("softmax_scale", self.softmax_scale, 0.0, math.inf, hi_open=True)
        check_range("norm_eps", self.norm_eps, 0.0, math.inf, hi_open=True)
        if self.init_std is not None:
            check_range("init_std", self.init_std, 0.0, math.inf, hi_open=True)

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def scale(self) -> float:
        return self.qk_head_dim**-0.5 if self.softmax_scale is None else self.softmax_scale

    @property
    def cache_width(self) -> int:
        """Numbers cached per token: the latent and the rope key, `r + Dr`."""
        return self.kv_lora_rank + self.qk_rope_head_dim


def init(key: Array, cfg: MLAConfig) -> dict:
    """Params: `w_q` `[d, H·(Dn+Dr)]` (or `w_q_a` `[d, rq]`, `q_a_norm`, `w_q_b`
    `[rq, H·(Dn+Dr)]`), `w_kv_a` `[d, r + Dr]`, `kv_a_norm`, `w_kv_b` `[r, H·(Dn+Dv)]`, `w_out`
    `[H·Dv, d]`; projections N(0, init_std²) (N(0, 1/fan_in) when None), norm scales 1."""
    H, r = cfg.num_heads, cfg.kv_lora_rank
    ks = iter(jax.random.split(key, 6))
    std = lambda fan_in: fan_in**-0.5 if cfg.init_std is None else cfg.init_std
    dense = lambda i, o: jax.random.normal(next(ks), (i, o), jnp.float32) * std(i)
    p = {}
    if cfg.q_lora_rank is None:
        p["w_q"] = dense(cfg.d_model, H * cfg.qk_head_dim)
    else:
        p["w_q_a"] = dense(cfg.d_model, cfg.q_lora_rank)
        p["q_a_norm"] = rms_norm_init(cfg.q_lora_rank)
        p["w_q_b"] = dense(cfg.q_lora_rank, H * cfg.qk_head_dim)
    p["w_kv_a"] = dense(cfg.d_model, r + cfg.qk_rope_head_dim)
    p["kv_a_norm"] = rms_norm_init(r)
    p["w_kv_b"] = dense(r, H * (cfg.qk_nope_head_dim + cfg.v_head_dim))
    p["w_out"] = dense(H * cfg.v_head_dim, cfg.d_model)
    return p


def init_cache(cfg: MLAConfig, batch: int, max_len: int, dtype=jnp.float32) -> dict:
    """Empty latent cache with room for `max_len` positions; `pos` is the next to write,
    `start` `[B]` each row's first valid position (not 0 after a packed prefill,
    `segments.Packed`)."""
    return {"c": jnp.zeros((batch, max_len, cfg.kv_lora_rank), dtype),
            "k_rope": jnp.zeros((batch, max_len, cfg.qk_rope_head_dim), dtype),
            "pos": jnp.zeros((), jnp.int32), "start": jnp.zeros((batch,), jnp.int32)}


def _rope(x: Array, positions: Array, cfg: MLAConfig) -> Array:
    """The rotary of `cfg.rope` on `x` `[B, T, H, Dr]`; "interleave" takes the pairs
    (2i, 2i + 1) and returns them in the rotate-half layout (DeepSeek's, as transformers'
    `apply_rotary_pos_emb_interleave`), the same for q and k, so scores are unchanged."""
    if cfg.rope == "none" or cfg.qk_rope_head_dim == 0:
        return x
    if cfg.rope == "interleave":
        x = jnp.concatenate([x[..., 0::2], x[..., 1::2]], axis=-1)
    return rotary(x, positions, cfg.rope_theta)


def _project(params: dict, x: Array, cfg: MLAConfig, positions: Array):
    """Queries `(q_nope [B, T, H, Dn], q_rope [B, T, H, Dr])`, the normed latent
    `c [B, T, r]` and the rope key `kr [B, T, Dr]`, rotated at `positions` `[T]`."""
    B, T, _ = x.shape
    mm = lambda a, name: a @ params[name].astype(a.dtype)
    if cfg.q_lora_rank is None:
        q = mm(x, "w_q")
    else:
        q = mm(rms_norm(params["q_a_norm"], mm(x, "w_q_a"), eps=cfg.norm_eps), "w_q_b")
    q = q.reshape(B, T, cfg.num_heads, cfg.qk_head_dim)
    Dn = cfg.qk_nope_head_dim
    q_nope, q_rope = q[..., :Dn], _rope(q[..., Dn:], positions, cfg)
    kv = mm(x, "w_kv_a")
    c = rms_norm(params["kv_a_norm"], kv[..., :cfg.kv_lora_rank], eps=cfg.norm_eps)
    kr = _rope(kv[..., None, cfg.kv_lora_rank:], positions, cfg)[:, :, 0]
    return q_nope, q_rope, c, kr


def apply(params: dict, x: Array, *, cfg: MLAConfig, cache: dict | None = None,
          segment_ids: Array | None = None, cu_seqlens: Array | None = None
          ) -> tuple[Array, dict | None]:
    """Causal MLA over `x` `[B, T, d]`; with `cache`, appends the latents and attends to them.

    `segment_ids` (`[B, T]` int document ids of packed rows, no cache): a query attends only to
    its own document. `cu_seqlens` (`[N + 1]`, B = 1): N prompts packed in one row, each
    attending to itself; with `cache` (fresh, N rows) each prompt's latents fill its own row,
    right-aligned (`segments.Packed`), so decoding continues all N at one position.

    Returns:
      `(y [B, T, d], new_cache)` (`new_cache` is None when `cache` is None).
    """
    check_attention_input(x, cfg.d_model, segment_ids, cache, cu_seqlens, cache_key="c")
    B, T, _ = x.shape
    H, Dn, Dv, r = cfg.num_heads, cfg.qk_nope_head_dim, cfg.v_head_dim, cfg.kv_lora_rank
    w_kv_b = params["w_kv_b"].astype(x.dtype).reshape(r, H, Dn + Dv)
    packed = None if cu_seqlens is None else pack(cu_seqlens, T)
    if cache is None or packed is not None:
        positions = jnp.arange(T) if cache is None else packed.slot
        q_nope, q_rope, c, kr = _project(params, x, cfg, positions)
        kv = jnp.einsum("btr,rhe->bthe", c, w_kv_b)
        k = jnp.concatenate([kv[..., :Dn], jnp.broadcast_to(kr[:, :, None], (B, T, H,
                                                                             kr.shape[-1]))], -1)
        q = jnp.concatenate([q_nope, q_rope], -1)
        D = max(cfg.qk_head_dim, Dv)  # dot_product_attention wants one head dim: zero-pad
        pad = lambda a: jnp.pad(a, [(0, 0)] * 3 + [(0, D - a.shape[-1])])
        docs = segment_ids if packed is None else packed.segment_ids
        o = jax.nn.dot_product_attention(pad(q), pad(k), pad(kv[..., Dn:]), scale=cfg.scale,
                                         mask=attention_mask(docs), is_causal=True)[..., :Dv]
        new_cache = None
        if cache is not None:  # packed prompts into a fresh cache
            N, S = cache["c"].shape[:2]
            new_cache = {"c": scatter_rows(N, S, c, packed, cache["c"].dtype),
                         "k_rope": scatter_rows(N, S, kr, packed, cache["k_rope"].dtype),
                         "pos": packed.P, "start": packed.start}
            o = fresh_or_nan(o, cache, packed, S)
    else:
        start = cache["pos"]
        q_nope, q_rope, c, kr = _project(params, x, cfg, start + jnp.arange(T))
        cc = jax.lax.dynamic_update_slice_in_dim(cache["c"], c.astype(cache["c"].dtype), start, 1)
        ck = jax.lax.dynamic_update_slice_in_dim(cache["k_rope"],
                                                 kr.astype(cache["k_rope"].dtype), start, 1)
        o = _absorbed_attention(q_nope, q_rope, cc.astype(x.dtype), ck.astype(x.dtype),
                                w_kv_b, start, cache["start"], cfg)
        new_cache = {**cache, "c": cc, "k_rope": ck, "pos": start + T}
    return o.reshape(B, T, H * Dv) @ params["w_out"].astype(x.dtype), new_cache


def _absorbed_attention(q_nope, q_rope, c, kr, w_kv_b, start, row_start, cfg: MLAConfig
                        ) -> Array:
    """Attention of queries at `start + [0, T)` over the cached latents `c` `[B, S, r]` and rope
    keys `kr` `[B, S, Dr]` (causal, row b from `row_start[b]` on), with `W_kvb` absorbed:
    nothing `[B, S, H, ·]` is formed."""
    Dn = cfg.qk_nope_head_dim
    w_uk, w_uv = w_kv_b[..., :Dn], w_kv_b[..., Dn:]  # [r, H, Dn], [r, H, Dv]
    q_lat = jnp.einsum("bthn,rhn->bthr", q_nope, w_uk)
    f32 = lambda a: a.astype(jnp.float32)
    scores = (jnp.einsum("bthr,bsr->bhts", f32(q_lat), f32(c))
              + jnp.einsum("bthp,bsp->bhts", f32(q_rope), f32(kr))) * cfg.scale
    T, S = q_nope.shape[1], c.shape[1]
    mask = key_mask(row_start, start + jnp.arange(T), S)  # [B, 1, T, S]
    p = jax.nn.softmax(jnp.where(mask, scores, -jnp.inf), axis=-1)
    o_lat = jnp.einsum("bhts,bsr->bthr", p, f32(c))
    return jnp.einsum("bthr,rhv->bthv", o_lat, f32(w_uv)).astype(q_nope.dtype)
