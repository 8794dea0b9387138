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


def short_conv_packed(params: dict, x: Array, cu_seqlens: Array, cache: Array | None = None
                      ) -> tuple[Array, Array]:
    """`short_conv` of N sequences packed in one row, each continuing its own cache row.

    Args:
      params: `{"w": [K, D]}`.
      x: `[1, T, D]`, sequence n at steps `[cu[n], cu[n+1])`.
      cu_seqlens: `[N + 1]` int boundaries (`0 = cu[0] < … < cu[N] = T`).
      cache: `[N, K−1, D]` each sequence's previous inputs, or None for zeros.

    Returns:
      `(y [1, T, D], new_cache [N, K−1, D])`: each sequence's outputs and last K−1 inputs, as
      `short_conv` gives them for that sequence alone.
    """
    w = params["w"]
    K = w.shape[0]
    _, T, D = x.shape
    N = cu_seqlens.shape[0] - 1
    cu = cu_seqlens.astype(jnp.int32)
    if cache is None:
        cache = jnp.zeros((N, K - 1, D), x.dtype)
    hist = cache.astype(x.dtype)

    def read(n, rel):
        """Input `rel` steps into sequence n (negative: from its cache row)."""
        from_x = rel >= 0
        xi = jnp.clip(cu[n] + rel, 0, T - 1)
        ci = jnp.clip(K - 1 + rel, 0, K - 2) if K > 1 else jnp.zeros_like(rel)
        got_x = x[0, xi]
        got_c = hist[n, ci] if K > 1 else jnp.zeros_like(got_x)
        return jnp.where(from_x[..., None], got_x, got_c)

    t = jnp.arange(T, dtype=jnp.int32)
    seq = jnp.searchsorted(cu[1:], t, side="right").astype(jnp.int32)
    off = t - cu[seq]
    y = sum(w[i].astype(jnp.float32) * read(seq, off + i - (K - 1)).astype(jnp.float32)
            for i in range(K))
    lengths = cu[1:] - cu[:-1]
    n = jnp.arange(N, dtype=jnp.int32)[:, None]
    rel = lengths[:, None] - (K - 1) + jnp.arange(K - 1, dtype=jnp.int32)[None, :]
    new_cache = read(jnp.broadcast_to(n, rel.shape), rel)  # [N, K-1, D]
    return y.astype(x.dtype)[None], new_cache
