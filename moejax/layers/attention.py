"""Causal softmax attention and sigmoid-gated softmax attention, with rotary positions and a
KV cache for decoding.

    o = softmax(q kᵀ / √Dh + causal) v             via `jax.nn.dot_product_attention`
    gated: o ← o ⊙ σ(W_gate h)                    per head and channel, before the out-projection
    y = W_out o

Axis letters: B batch, T query time, S key time (cache length), H heads, Dh head dim, d width.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

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
    """

    d_model: int
    num_heads: int
    head_dim: int
    gated: bool = False
    rope_theta: float = 10000.0

    def __post_init__(self):
        for name in ("d_model", "num_heads", "head_dim"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if self.head_dim % 2:
            raise ValueError(f"head_dim must be even for rotary embeddings, got {self.head_dim}")
        if not self.rope_theta > 0:
            raise ValueError(f"rope_theta must be > 0, got {self.rope_theta}")


def init(key: Array, cfg: AttentionConfig) -> dict:
    """Params `w_q, w_k, w_v: [d, H·Dh]`, `w_out: [H·Dh, d]` (+ `w_gate: [d, H·Dh]`)."""
    d, hd = cfg.d_model, cfg.num_heads * cfg.head_dim
    ks = jax.random.split(key, 5)
    dense = lambda k, i, o: jax.random.normal(k, (i, o), jnp.float32) * i**-0.5
    p = {"w_q": dense(ks[0], d, hd), "w_k": dense(ks[1], d, hd), "w_v": dense(ks[2], d, hd),
         "w_out": dense(ks[3], hd, d)}
    if cfg.gated:
        p["w_gate"] = dense(ks[4], d, hd)
    return p


def init_cache(cfg: AttentionConfig, batch: int, max_len: int, dtype=jnp.float32) -> dict:
    """Empty KV cache with room for `max_len` positions; `pos` is the next position to write."""
    shape = (batch, max_len, cfg.num_heads, cfg.head_dim)
    return {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype),
            "pos": jnp.zeros((), jnp.int32)}


def rotary(x: Array, positions: Array, theta: float) -> Array:
    """Rotary embedding (rotate-half convention) of `x` `[B, T, H, Dh]` at `positions` `[T]`."""
    half = x.shape[-1] // 2
    freq = theta ** (-jnp.arange(half, dtype=jnp.float32) / half)
    ang = positions.astype(jnp.float32)[:, None] * freq[None, :]  # [T, half]
    cos, sin = jnp.cos(ang)[None, :, None, :], jnp.sin(ang)[None, :, None, :]
    x1, x2 = x[..., :half].astype(jnp.float32), x[..., half:].astype(jnp.float32)
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1).astype(x.dtype)


def apply(params: dict, x: Array, *, cfg: AttentionConfig, cache: dict | None = None
          ) -> tuple[Array, dict | None]:
    """Causal attention over `x` `[B, T, d]`; with `cache`, appends to it and attends to it.

    Returns:
      `(y [B, T, d], new_cache)` (`new_cache` is None when `cache` is None).
    """
    if x.ndim != 3 or x.shape[-1] != cfg.d_model:
        raise ValueError(f"x must be [B, T, d_model] with d_model={cfg.d_model}, got {x.shape}")
    B, T, _ = x.shape
    H, Dh = cfg.num_heads, cfg.head_dim
    proj = lambda name: (x @ params[name].astype(x.dtype)).reshape(B, T, H, Dh)
    q, k, v = proj("w_q"), proj("w_k"), proj("w_v")
    start = jnp.zeros((), jnp.int32) if cache is None else cache["pos"]
    positions = start + jnp.arange(T)
    q, k = rotary(q, positions, cfg.rope_theta), rotary(k, positions, cfg.rope_theta)
    if cache is None:
        o = jax.nn.dot_product_attention(q, k, v, is_causal=True)
        new_cache = None
    else:
        ck = jax.lax.dynamic_update_slice_in_dim(cache["k"], k.astype(cache["k"].dtype), start, 1)
        cv = jax.lax.dynamic_update_slice_in_dim(cache["v"], v.astype(cache["v"].dtype), start, 1)
        S = ck.shape[1]
        mask = jnp.arange(S)[None, :] <= positions[:, None]  # [T, S]: causal over the cache
        o = jax.nn.dot_product_attention(q, ck.astype(x.dtype), cv.astype(x.dtype),
                                         mask=mask[None, None])
        new_cache = {"k": ck, "v": cv, "pos": start + T}
    if cfg.gated:
        o = o * jax.nn.sigmoid(proj("w_gate"))
    return o.reshape(B, T, H * Dh) @ params["w_out"].astype(x.dtype), new_cache
