"""Depthwise causal short convolution with a decode cache (the q/k/v conv of DeltaNet layers).

`y_t = Σ_{i<K} w_i · x_{t−K+1+i}` per channel, where inputs before the sequence start come from
`cache` (the last K−1 inputs seen, zeros for a fresh sequence). Axis letters: B batch, T time,
D channels, K kernel size.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array


def short_conv_init(key: jax.Array, channels: int, kernel_size: int = 4, *,
                    std: float | None = None) -> dict:
    """Params `{"w": [K, D]}` (no bias, as fla's `ShortConvolution(bias=False)`).

    Args:
      key: PRNG key.
      channels: D.
      kernel_size: K.
      std: the weights are N(0, std²) (fla's `_init_weights` with `initializer_range`, the
        Q-Delta authors' 0.02); None = uniform in ±1/√K (PyTorch Conv1d's own default for a
        depthwise conv).
    """
    if std is None:
        bound = kernel_size**-0.5
        w = jax.random.uniform(key, (kernel_size, channels), jnp.float32, -bound, bound)
    else:
        w = jax.random.normal(key, (kernel_size, channels), jnp.float32) * std
    return {"w": w}


def short_conv_cache(batch: int, channels: int, kernel_size: int = 4, dtype=jnp.float32):
    """An empty cache `[B, K−1, D]` for a fresh sequence."""
    return jnp.zeros((batch, kernel_size - 1, channels), dtype)


def short_conv(params: dict, x: Array, cache: Array | None = None,
               segment_ids: Array | None = None) -> tuple[Array, Array]:
    """Causal depthwise conv over time.

    Args:
      params: `{"w": [K, D]}`.
      x: `[B, T, D]`.
      cache: `[B, K−1, D]` previous inputs, or None for zeros.
      segment_ids: `[B, T]` int document ids of packed rows, or None. A tap reads only inputs
        of the output's own document (the others count as zeros), so the conv restarts at each
        document's first step as for a fresh sequence; the cache's inputs belong to the
        document of step 0.

    Returns:
      `(y [B, T, D], new_cache [B, K−1, D])` — the cache holds the last K−1 inputs.
    """
    w = params["w"]
    K = w.shape[0]
    B, T, D = x.shape
    if cache is None:
        cache = jnp.zeros((B, K - 1, D), x.dtype)
    xp = jnp.concatenate([cache.astype(x.dtype), x], axis=1)  # [B, K-1+T, D]
    taps = [xp[:, i : i + T].astype(jnp.float32) for i in range(K)]
    if segment_ids is not None:
        sp = jnp.concatenate([jnp.repeat(segment_ids[:, :1], K - 1, axis=1), segment_ids], 1)
        taps = [jnp.where((sp[:, i : i + T] == segment_ids)[..., None], tap, 0.0)
                for i, tap in enumerate(taps)]
    y = sum(w[i].astype(jnp.float32) * tap for i, tap in enumerate(taps))
    return y.astype(x.dtype), xp[:, T:]
