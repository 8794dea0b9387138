"""Causal softmax attention and sigmoid-gated softmax attention, with rotary positions and a
KV cache for decoding.

    q, k, v = W_q h, W_k h, W_v h                  k, v have Hkv heads (GQA: Hkv divides H)
    qk_norm: q, k ← RMSNorm(q), RMSNorm(k)        per head, before rotary (Qwen3)
    q, k ← rotary(q), rotary(k)                    on the first `rotary_dim` channels of a head
    o = softmax(q kᵀ / √Dh + causal) v             via `jax.nn.dot_product_attention`; query head
                                                   h reads kv head h // (H / Hkv)
    gated: o ← o ⊙ σ(W_gate h)                    per head and channel, before the out-projection
    y = W_out o

Axis letters: B batch, T query time, S key time (cache length), H heads, Hkv key/value heads,
Dh head dim, d width.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

from moejax.layers.norms import rms_norm, rms_norm_init
from moejax.layers.segments import (
    attention_mask,
    check_attention_input,
    fresh_or_nan,
    key_mask,
    pack,
    scatter_rows,
)
from moejax.validation import check_bool, check_int, check_number, check_range

Array = jax.Array


@dataclasses.dataclass(frozen=True, kw_only=True)
class AttentionConfig:
    """Attention layer options.

    Attributes:
      d_model: model width d.
      num_heads: H.
      head_dim: Dh.
      gated: multiply the attention output by σ(W_gate h) (sigmoid-gated softmax attention).
      rope_theta: rotary base (> 0).
      num_kv_heads: Hkv, key/value heads (grouped-query attention); None = H. Must divide H.
      rotary_dim: leading channels of each head that rotate (even, ≤ Dh); None = Dh. Qwen3-Next
        rotates a quarter of each head.
      qk_norm: RMSNorm over each query and key head before rotary (Qwen3).
      zero_centered_norm: the q/k norms scale by `(1 + w)` (Qwen3-Next) instead of `w`.
      norm_eps: epsilon of the q/k norms (> 0).
      init_std: std of the N(0, init_std²) init of every projection (> 0; default 0.02, fla's
        `initializer_range`, as the Q-Delta authors' hybrid layers); None = fan-in init,
        N(0, 1/fan_in).

    Raises (on construction):
      ValueError / ArgumentTypeError (also a `TypeError`): naming the field.
    """

    d_model: int
    num_heads: int
    head_dim: int
    gated: bool = False
    rope_theta: float = 10000.0
    num_kv_heads: int | None = None
    rotary_dim: int | None = None
    qk_norm: bool = False
    zero_centered_norm: bool = False
    norm_eps: float = 1e-6
    init_std: float | None = 0.02

    def __post_init__(self):
        for name in ("d_model", "num_heads", "head_dim"):
            check_int(name, getattr(self, name), lo=1)
        if self.num_kv_heads is not None:
            check_int("num_kv_heads", self.num_kv_heads, lo=1)
        if self.num_heads % self.kv_heads:
            raise ValueError(f"num_kv_heads={self.num_kv_heads} must divide "
                             f"num_heads={self.num_heads}")
        rd = self.rotary
        check_int("rotary_dim", rd, lo=0, hi=self.head_dim)
        if rd % 2:
            raise ValueError(f"rotary_dim must be an even int in [0, head_dim={self.head_dim}], "
                             f"got {rd!r}")
        for name in ("gated", "qk_norm", "zero_centered_norm"):
            check_bool(name, getattr(self, name))
        for name in ("rope_theta", "norm_eps"):
            check_number(name, getattr(self, name))
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.init_std is not None:
            check_range("init_std", self.init_std, 0.0, math.inf, hi_open=True)

    @property
    def kv_heads(self) -> int:
        return self.num_heads if self.num_kv_heads is None else self.num_kv_heads

    @property
    def rotary(self) -> int:
        return self.head_dim if self.rotary_dim is None else self.rotary_dim


def init(key: Array, cfg: AttentionConfig) -> dict:
    """Params `w_q: [d, H·Dh]`, `w_k, w_v: [d, Hkv·Dh]`, `w_out: [H·Dh, d]` (+ `w_gate:
    [d, H·Dh]` when gated, `q_norm, k_norm: {"scale": [Dh]}` with qk_norm); projections
    N(0, init_std²), or N(0, 1/fan_in) when `init_std` is None."""
    d, hd, kvd = cfg.d_model, cfg.num_heads * cfg.head_dim, cfg.kv_heads * cfg.head_dim
    ks = jax.random.split(key, 5)
    std = lambda fan_in: fan_in**-0.5 if cfg.init_std is None else cfg.init_std
    dense = lambda k, i, o: jax.random.normal(k, (i, o), jnp.float32) * std(i)
    p = {"w_q": dense(ks[0], d, hd), "w_k": dense(ks[1], d, kvd), "w_v": dense(ks[2], d, kvd),
         "w_out": dense(ks[3], hd, d)}
    if cfg.gated:
        p["w_gate"] = dense(ks[4], d, hd)
    if cfg.qk_norm:
        p["q_norm"] = rms_norm_init(cfg.head_dim, zero_centered=cfg.zero_centered_norm)
        p["k_norm"] = rms_norm_init(cfg.head_dim, zero_centered=cfg.zero_centered_norm)
    return p


def init_cache(cfg: AttentionConfig, batch: int, max_len: int, dtype=jnp.float32) -> dict:
    """Empty KV cache with room for `max_len` positions; `pos` is the next position to write,
    `start` `[B]` each row's first valid position (not 0 after a packed prefill,
    `segments.Packed`)."""
    shape = (batch, max_len, cfg.kv_heads, cfg.head_dim)
    return {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype),
            "pos": jnp.zeros((), jnp.int32), "start": jnp.zeros((batch,), jnp.int32)}


def rotary(x: Array, positions: Array, theta: float, rotary_dim: int | None = None) -> Array:
    """Rotary embedding (rotate-half convention) of `x` `[B, T, H, Dh]` at `positions` `[T]`.

    Only the first `rotary_dim` channels of each head rotate (frequencies
    `theta^(-2i / rotary_dim)`); the rest pass through (partial rotary).
    """
    rd = x.shape[-1] if rotary_dim is None else rotary_dim
    if rd == 0:
        return x
    half = rd // 2
    freq = theta ** (-jnp.arange(half, dtype=jnp.float32) / half)
    ang = positions.astype(jnp.float32)[:, None] * freq[None, :]  # [T, half]
    cos, sin = jnp.cos(ang)[None, :, None, :], jnp.sin(ang)[None, :, None, :]
    x1, x2 = x[..., :half].astype(jnp.float32), x[..., half:rd].astype(jnp.float32)
    rot = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1).astype(x.dtype)
    return jnp.concatenate([rot, x[..., rd:]], -1)


def apply(params: dict, x: Array, *, cfg: AttentionConfig, cache: dict | None = None,
          segment_ids: Array | None = None, cu_seqlens: Array | None = None
          ) -> tuple[Array, dict | None]:
    """Causal attention over `x` `[B, T, d]`; with `cache`, appends to it and attends to it.

    `segment_ids` (`[B, T]` int document ids of packed rows, no cache): a query attends only
    to keys of its own document. Positions keep counting across documents; rotary scores
    depend only on the distance, so each document gets what it gets alone.

    `cu_seqlens` (`[N + 1]`, B = 1): N prompts packed in one row, each attending to itself;
    with `cache` (fresh, N rows) each prompt fills its own row, right-aligned
    (`segments.Packed`), so decoding continues all N at one position.

    Returns:
      `(y [B, T, d], new_cache)` (`new_cache` is None when `cache` is None).
    """
    check_attention_input(x, cfg.d_model, segment_ids, cache, cu_seqlens)
    if cu_seqlens is not None:
        return _apply_packed(params, x, cfg, cache, cu_seqlens)
    T = x.shape[1]
    start = jnp.zeros((), jnp.int32) if cache is None else cache["pos"]
    positions = start + jnp.arange(T)
    q, k, v = _qkv(params, x, cfg, positions)
    if cache is None:
        o = jax.nn.dot_product_attention(q, k, v, mask=attention_mask(segment_ids),
                                         is_causal=True)
        new_cache = None
    else:
        ck = jax.lax.dynamic_update_slice_in_dim(cache["k"], k.astype(cache["k"].dtype), start, 1)
        cv = jax.lax.dynamic_update_slice_in_dim(cache["v"], v.astype(cache["v"].dtype), start, 1)
        mask = key_mask(cache["start"], positions, ck.shape[1])
        o = jax.nn.dot_product_attention(q, ck.astype(x.dtype), cv.astype(x.dtype), mask=mask)
        new_cache = {**cache, "k": ck, "v": cv, "pos": start + T}
    return _out(params, x, o, cfg), new_cache


def _qkv(params, x, cfg: AttentionConfig, positions):
    """Rotated (and q/k-normed) `q [B, T, H, Dh]`, `k, v [B, T, Hkv, Dh]` at `positions`."""
    B, T, _ = x.shape
    proj = lambda name: (x @ params[name].astype(x.dtype)).reshape(B, T, -1, cfg.head_dim)
    q, k, v = proj("w_q"), proj("w_k"), proj("w_v")
    if cfg.qk_norm:
        norm = lambda name, a: rms_norm(params[name], a, eps=cfg.norm_eps,
                                        zero_centered=cfg.zero_centered_norm)
        q, k = norm("q_norm", q), norm("k_norm", k)
    return (rotary(q, positions, cfg.rope_theta, cfg.rotary),
            rotary(k, positions, cfg.rope_theta, cfg.rotary), v)


def _out(params, x, o, cfg: AttentionConfig):
    """The (gated) out-projection of `o` `[B, T, H, Dh]`."""
    B, T, _ = x.shape
    if cfg.gated:
        gate = (x @ params["w_gate"].astype(x.dtype)).reshape(o.shape)
        o = o * jax.nn.sigmoid(gate)
    return o.reshape(B, T, -1) @ params["w_out"].astype(x.dtype)


def _apply_packed(params, x, cfg: AttentionConfig, cache, cu_seqlens):
    """`apply` for prompts packed by `cu_seqlens`: each attends to itself; with a (fresh) cache
    of N rows, prompt n's keys land right-aligned in row n (`segments.Packed`)."""
    T = x.shape[1]
    packed = pack(cu_seqlens, T)
    positions = jnp.arange(T) if cache is None else packed.slot
    q, k, v = _qkv(params, x, cfg, positions)
    o = jax.nn.dot_product_attention(q, k, v, mask=attention_mask(packed.segment_ids),
                                     is_causal=True)
    y = _out(params, x, o, cfg)
    if cache is None:
        return y, None
    N, S = cache["k"].shape[:2]
    new_cache = {"k": scatter_rows(N, S, k, packed, cache["k"].dtype),
                 "v": scatter_rows(N, S, v, packed, cache["v"].dtype),
                 "pos": packed.P, "start": packed.start}
    return fresh_or_nan(y, cache, packed, S), new_cache
