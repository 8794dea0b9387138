"""Grouped matmuls in plain JAX: a `lax.scan` over (row tile, group) visits, as megablox does.

Axis letters: M rows of `lhs` (grouped contiguously), K contracting width, N output width,
G groups, tm rows per tile, V visits.

Why: on CPU `jax.lax.ragged_dot` lowers to a dense product over an expanded `[G, M, K]` operand,
so its time and memory grow linearly with G (the number of experts). Here the rows are cut into
tiles of `tm`; a tile that straddles a group boundary is visited once per group it touches, so
there are at most `V = ⌈M/tm⌉ + G − 1` visits, each one `[tm, K] @ [K, N]` product with the rows
outside the visited group masked. Work is `O(M·K·N + G·tm·K·N)` and scratch memory
`O(M·N + tm·K)` — flat in G. This is the default on CPU (`impl="auto"`); GPU/TPU use the
Pallas kernels (`pallas_gpu.py`, `pallas_tpu.py`).

Same contract as `reference.gmm` / `reference.tgmm` (no validation here; `ops.py` validates).
Both are jitted (static options), so eager calls reuse one compiled scan per shape.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

Array = jax.Array


def default_block_m(m: int) -> int:
    """Rows per tile: 256, or `m` rounded up to a multiple of 8 when smaller."""
    return max(8, min(256, -(-m // 8) * 8))


def _visits(group_sizes: Array, num_tiles: int, tm: int):
    """Schedule of (group, tile) visits in group order, padded to the static bound V.

    Returns:
      `(group [V], tile [V], valid [V], starts [G], ends [G])`; `valid` is False for padding.
    """
    num_groups = group_sizes.shape[0]
    ends = jnp.cumsum(group_sizes)
    starts = ends - group_sizes
    nonempty = group_sizes > 0
    first = starts // tm
    count = jnp.where(nonempty, (ends - 1) // tm - first + 1, 0)  # tiles group g touches
    cum = jnp.cumsum(count)
    v = jnp.arange(num_tiles + num_groups - 1, dtype=jnp.int32)
    # NOTE: side="right" skips empty groups (their cum equals the previous one).
    group = jnp.minimum(jnp.searchsorted(cum, v, side="right"), num_groups - 1)
    valid = v < cum[-1]
    tile = jnp.where(valid, first[group] + v - (cum - count)[group], 0)
    return group.astype(jnp.int32), tile.astype(jnp.int32), valid, starts, ends


def _row_mask(tile, group, valid, starts, ends, tm):
    rows = tile * tm + jnp.arange(tm, dtype=jnp.int32)
    return valid & (rows >= starts[group]) & (rows < ends[group])  # [tm]


@functools.partial(jax.jit, static_argnames=("transpose_rhs", "out_dtype", "block_m"))
def gmm(lhs: Array, rhs: Array, group_sizes: Array, *, transpose_rhs: bool = False,
        out_dtype=None, block_m: int | None = None) -> Array:
    """Grouped matmul `out[rows of g] = lhs[rows of g] @ rhs[g]` by tile visits.

    Args:
      lhs: `[M, K]` rows grouped contiguously by `group_sizes`.
      rhs: `[G, K, N]` (`[G, N, K]` if `transpose_rhs`).
      group_sizes: `<int32>[G]`, non-negative, `sum ≤ M`.
      transpose_rhs: multiply by `rhs[g]^T`.
      out_dtype: result dtype; defaults to `lhs.dtype`.
      block_m: rows per tile tm; default `default_block_m(M)`.

    Returns:
      `[M, N]`, zero past `sum(group_sizes)`; float32 accumulation.
    """
    lhs, rhs = jnp.asarray(lhs), jnp.asarray(rhs)
    m = lhs.shape[0]
    n = rhs.shape[1] if transpose_rhs else rhs.shape[2]
    out_dtype = out_dtype or lhs.dtype
    if m == 0 or rhs.shape[0] == 0:
        return jnp.zeros((m, n), out_dtype)
    tm = block_m or default_block_m(m)
    num_tiles = -(-m // tm)
    lhs_p = jnp.pad(lhs, ((0, num_tiles * tm - m), (0, 0)))
    group, tile, valid, starts, ends = _visits(group_sizes.astype(jnp.int32), num_tiles, tm)
    contract = (((1,), (1,)), ((), ())) if transpose_rhs else (((1,), (0,)), ((), ()))

    def visit(out, xs):
        g, t, ok = xs
        x = lax.dynamic_slice_in_dim(lhs_p, t * tm, tm)
        w = lax.dynamic_index_in_dim(rhs, g, keepdims=False)
        y = lax.dot_general(x, w, contract, preferred_element_type=jnp.float32)
        y = jnp.where(_row_mask(t, g, ok, starts, ends, tm)[:, None], y, 0.0)
        acc = lax.dynamic_slice_in_dim(out, t * tm, tm) + y
        return lax.dynamic_update_slice_in_dim(out, acc, t * tm, 0), None

    out, _ = lax.scan(visit, jnp.zeros((num_tiles * tm, n), jnp.float32), (group, tile, valid))
    return out[:m].astype(out_dtype)


@functools.partial(jax.jit, static_argnames=("out_dtype", "block_m"))
def tgmm(lhs: Array, grad: Array, group_sizes: Array, *, out_dtype=None,
         block_m: int | None = None) -> Array:
    """Transposed grouped matmul `out[g] = lhs[rows of g]^T @ grad[rows of g]` by tile visits.

    Args:
      lhs: `[M, K]` rows grouped contiguously by `group_sizes`.
      grad: `[M, N]` same row grouping.
      group_sizes: `<int32>[G]`, non-negative, `sum ≤ M`.
      out_dtype: result dtype; defaults to `lhs.dtype`.
      block_m: rows per tile tm; default `default_block_m(M)`.

    Returns:
      `[G, K, N]`; empty groups give zero blocks; float32 accumulation.
    """
    lhs, grad = jnp.asarray(lhs), jnp.asarray(grad)
    (m, k), n, num_groups = lhs.shape, grad.shape[1], group_sizes.shape[0]
    out_dtype = out_dtype or lhs.dtype
    if m == 0 or num_groups == 0:
        return jnp.zeros((num_groups, k, n), out_dtype)
    tm = block_m or default_block_m(m)
    num_tiles = -(-m // tm)
    pad = ((0, num_tiles * tm - m), (0, 0))
    lhs_p, grad_p = jnp.pad(lhs, pad), jnp.pad(grad, pad)
    group, tile, valid, starts, ends = _visits(group_sizes.astype(jnp.int32), num_tiles, tm)

    def visit(out, xs):
        g, t, ok = xs
        x = lax.dynamic_slice_in_dim(lhs_p, t * tm, tm)
        x = jnp.where(_row_mask(t, g, ok, starts, ends, tm)[:, None], x, jnp.zeros_like(x))
        y = lax.dynamic_slice_in_dim(grad_p, t * tm, tm)
        blk = lax.dot_general(x, y, (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32)
        return out.at[g].add(blk), None

    out, _ = lax.scan(visit, jnp.zeros((num_groups, k, n), jnp.float32), (group, tile, valid))
    return out.astype(out_dtype)
