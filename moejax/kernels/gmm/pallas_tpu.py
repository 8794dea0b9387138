"""Grouped matmuls as Pallas kernels for TPU (Mosaic lowering).

Axis letters: M rows of `lhs` (grouped contiguously by `group_sizes`), K contracting width,
N output width, G groups, V visits (see `pallas_common.py`); tm, tk, tn block sizes.

The visit schedule (`pallas_common.make_group_metadata`) is passed as scalar-prefetch operands
(`PrefetchScalarGridSpec`): it lives in SMEM and drives the BlockSpec index maps, so the
pipeline DMAs exactly the lhs/rhs blocks each visit needs.

`gmm`: grid `(⌈N/tn⌉, V, ⌈K/tk⌉)`. The output block `(tile, j)` stays resident in VMEM while
the consecutive visits of one row tile run; the first visit zeroes it, each visit of a real
group accumulates `lhs_tile @ rhs[group]` over K in a float32 VMEM scratch and, at the last K
step, selects the rows of its group into the block. Tail visits (rows past `sum(group_sizes)`)
and padding visits skip the matmul and keep their K block index fixed, so they cost no DMA.

`tgmm`: grid `(⌈K/tk⌉, ⌈N/tn⌉, V)`. The output block `(group, i, j)` stays resident while the
group's visits run; rows outside the group are masked to zero before `lhs_tileᵀ @ grad_tile`;
the block is written at the group's last visit (empty groups: zeros).

Blocks follow the TPU layout: the last two block dims are multiples of (8, 128) or span the
whole dimension (`BlockSizes` checks the former, `pallas_common.fit_block` the latter for small
dimensions). M, K, N need not be multiples of their blocks: edge blocks are masked in-kernel
(K) or clipped on write-back (M, N). bf16 (or fp32) in, fp32 accumulation.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from moejax.kernels.gmm import pallas_common as pc

Array = jax.Array

# jax ≤ 0.6 spelled it TPUCompilerParams; current releases CompilerParams.
_CompilerParams = (pltpu.CompilerParams if hasattr(pltpu, "CompilerParams")
                   else pltpu.TPUCompilerParams)


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class BlockSizes:
    """Tile sizes of the Mosaic kernels (static, hashable).

    Attributes:
      block_m: rows per tile, a multiple of 16 (bf16 sublane packing); used as is when M is
        larger, else the whole M.
      block_k: contracting width per step, a multiple of 128.
      block_n: output columns per block, a multiple of 128.
    """

    block_m: int = 128
    block_k: int = 512
    block_n: int = 512

    def __post_init__(self):
        for name, align in (("block_m", 16), ("block_k", 128), ("block_n", 128)):
            val = getattr(self, name)
            if val <= 0 or val % align:
                raise ValueError(f"{name}={val} must be a positive multiple of {align} "
                                 f"(TPU layout)")

    @classmethod
    def get_default(cls) -> BlockSizes:
        return cls()


def _row_mask(meta: pc.GroupMetadata, v, tm: int, width: int):
    rows = meta.tile[v] * tm + lax.broadcasted_iota(jnp.int32, (tm, width), 0)
    return (rows >= meta.lo[v]) & (rows < meta.hi[v])


def _mask_k(x, kk, *, dim: int, k_rem: int, tiles_k: int):
    """Zeroes columns (`dim`) past K in the last, partial K block (its VMEM tail is garbage)."""
    if k_rem == 0:
        return x
    idx = lax.broadcasted_iota(jnp.int32, x.shape, dim)
    ok = (kk < tiles_k - 1) | (idx < k_rem)
    return jnp.where(ok, x.astype(jnp.float32), 0.0).astype(x.dtype)


# ------------------------------------------------------------------------------------- gmm


def _gmm_fwd_kernel(meta, lhs_ref, rhs_ref, out_ref, acc_ref, *, tm, tn, k_rem, tiles_k,
                    transpose_rhs):
    v, kk = pl.program_id(1), pl.program_id(2)

    @pl.when((kk == 0) & (meta.first[v] > 0))
    def _zero_out():  # first visit of this row tile: rows of no group (tail) stay zero.
        out_ref[...] = jnp.zeros_like(out_ref)

    @pl.when(kk == 0)
    def _zero_acc():
        acc_ref[...] = jnp.zeros_like(acc_ref)

    @pl.when(meta.compute[v] > 0)
    def _accumulate():
        mask = functools.partial(_mask_k, kk=kk, k_rem=k_rem, tiles_k=tiles_k)
        x = mask(lhs_ref[...], dim=1)
        w = mask(rhs_ref[...], dim=1 if transpose_rhs else 0)
        dims = (((1,), (1,)), ((), ())) if transpose_rhs else (((1,), (0,)), ((), ()))
        acc_ref[...] += lax.dot_general(x, w, dims, preferred_element_type=jnp.float32)

    @pl.when((kk == tiles_k - 1) & (meta.compute[v] > 0))
    def _store():
        rows = _row_mask(meta, v, tm, tn)
        out_ref[...] = jnp.where(rows, acc_ref[...],
                                 out_ref[...].astype(jnp.float32)).astype(out_ref.dtype)


@functools.partial(jax.jit, static_argnames=("transpose_rhs", "out_dtype", "block_sizes",
                                             "interpret"))
def gmm(lhs: Array, rhs: Array, group_sizes: Array, *, transpose_rhs: bool = False,
        out_dtype=None, block_sizes: BlockSizes | None = None, interpret=False) -> Array:
    """Grouped matmul `out[rows of g] = lhs[rows of g] @ rhs[g]` (Mosaic kernel).

    Args:
      lhs: `[M, K]` rows grouped contiguously by `group_sizes`.
      rhs: `[G, K, N]` (`[G, N, K]` if `transpose_rhs`), same dtype as `lhs`.
      group_sizes: `<int32>[G]`, non-negative, `sum ≤ M` (not checked; see `ops.checked_gmm`).
      transpose_rhs: multiply by `rhs[g]^T` without materialising it.
      out_dtype: result dtype (the `preferred_element_type`); defaults to `lhs.dtype`.
      block_sizes: `BlockSizes`; default `BlockSizes.get_default()`.
      interpret: `False`, `True` (generic interpret mode) or a `pltpu.InterpretParams` (TPU
        interpret mode), to run on CPU.

    Returns:
      `[M, N]`; rows past `sum(group_sizes)` are zero; float32 accumulation.
    """
    bs = block_sizes or BlockSizes.get_default()
    (m, k), num_groups = lhs.shape, rhs.shape[0]
    n = rhs.shape[1] if transpose_rhs else rhs.shape[2]
    out_dtype = jnp.dtype(out_dtype or lhs.dtype)
    if m == 0 or num_groups == 0 or n == 0 or k == 0:
        return jnp.zeros((m, n), out_dtype)
    tm, tk, tn = pc.fit_block(m, bs.block_m), pc.fit_block(k, bs.block_k), pc.fit_block(n,
                                                                                     bs.block_n)
    tiles_k, tiles_n = pl.cdiv(k, tk), pl.cdiv(n, tn)
    meta = pc.make_group_metadata(group_sizes, m=m, tm=tm, for_tgmm=False)

    def k_index(v, kk, meta):  # visits without a matmul keep the last K block: no new DMA.
        return jnp.where(meta.compute[v] > 0, kk, tiles_k - 1)

    def lhs_map(j, v, kk, meta):
        return meta.tile[v], k_index(v, kk, meta)

    def rhs_map(j, v, kk, meta):
        kb = k_index(v, kk, meta)
        return (meta.group[v], j, kb) if transpose_rhs else (meta.group[v], kb, j)

    def out_map(j, v, kk, meta):
        return meta.tile[v], j

    rhs_block = (None, tn, tk) if transpose_rhs else (None, tk, tn)
    kernel = functools.partial(_gmm_fwd_kernel, tm=tm, tn=tn, k_rem=k % tk, tiles_k=tiles_k,
                               transpose_rhs=transpose_rhs)
    out_shape = jax.ShapeDtypeStruct((m, n), out_dtype)
    return pl.pallas_call(
        kernel,
        out_shape=out_shape,
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=1,
            grid=(tiles_n, meta.tile.shape[0], tiles_k),
            in_specs=[pl.BlockSpec((tm, tk), lhs_map), pl.BlockSpec(rhs_block, rhs_map)],
            out_specs=pl.BlockSpec((tm, tn), out_map),
            scratch_shapes=[pltpu.VMEM((tm, tn), jnp.float32)],
        ),
        compiler_params=_CompilerParams(
            dimension_semantics=("parallel", "arbitrary", "arbitrary")),
        interpret=interpret,
        cost_estimate=pc.cost_estimate(2 * m * k * n, lhs, rhs, out_shape),
        name="moejax_gmm",
    )(meta, lhs, rhs)


# ------------------------------------------------------------------------------------ tgmm


def _tgmm_fwd_kernel(meta, lhs_ref, grad_ref, out_ref, acc_ref, *, tm, tk, tn):
    v = pl.program_id(2)

    @pl.when(meta.first[v] > 0)
    def _zero_acc():
        acc_ref[...] = jnp.zeros_like(acc_ref)

    @pl.when(meta.compute[v] > 0)
    def _accumulate():
        # Rows outside the group (and the garbage past M in an edge block) become exact zeros.
        x = jnp.where(_row_mask(meta, v, tm, tk), lhs_ref[...].astype(jnp.float32), 0.0)
        y = jnp.where(_row_mask(meta, v, tm, tn), grad_ref[...].astype(jnp.float32), 0.0)
        x = x.swapaxes(0, 1).astype(lhs_ref.dtype)  # [tk, tm]: transpose in 32 bits.
        acc_ref[...] += lax.dot_general(x, y.astype(grad_ref.dtype), (((1,), (0,)), ((), ())),
                                        preferred_element_type=jnp.float32)

    @pl.when(meta.last[v] > 0)
    def _store():
        out_ref[...] = acc_ref[...].astype(out_ref.dtype)


@functools.partial(jax.jit, static_argnames=("out_dtype", "block_sizes", "interpret"))
def tgmm(lhs: Array, grad: Array, group_sizes: Array, *, out_dtype=None,
         block_sizes: BlockSizes | None = None, interpret=False) -> Array:
    """Transposed grouped matmul `out[g] = lhs[rows of g]^T @ grad[rows of g]` (Mosaic kernel).

    Args:
      lhs: `[M, K]` rows grouped contiguously by `group_sizes`.
      grad: `[M, N]` same row grouping and dtype.
      group_sizes: `<int32>[G]`, non-negative, `sum ≤ M`; rows past the sum are ignored.
      out_dtype: result dtype; defaults to `lhs.dtype`.
      block_sizes: `BlockSizes`; default `BlockSizes.get_default()`.
      interpret: as for `gmm`.

    Returns:
      `[G, K, N]`; empty groups give zero blocks; float32 accumulation.
    """
    bs = block_sizes or BlockSizes.get_default()
    (m, k), n, num_groups = lhs.shape, grad.shape[1], group_sizes.shape[0]
    out_dtype = jnp.dtype(out_dtype or lhs.dtype)
    if m == 0 or num_groups == 0 or k == 0 or n == 0:
        return jnp.zeros((num_groups, k, n), out_dtype)
    tm, tk, tn = pc.fit_block(m, bs.block_m), pc.fit_block(k, bs.block_k), pc.fit_block(n,
                                                                                     bs.block_n)
    meta = pc.make_group_metadata(group_sizes, m=m, tm=tm, for_tgmm=True)

    def lhs_map(i, j, v, meta):
        return meta.tile[v], i

    def grad_map(i, j, v, meta):
        return meta.tile[v], j

    def out_map(i, j, v, meta):
        return meta.group[v], i, j

    kernel = functools.partial(_tgmm_fwd_kernel, tm=tm, tk=tk, tn=tn)
    out_shape = jax.ShapeDtypeStruct((num_groups, k, n), out_dtype)
    return pl.pallas_call(
        kernel,
        out_shape=out_shape,
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=1,
            grid=(pl.cdiv(k, tk), pl.cdiv(n, tn), meta.tile.shape[0]),
            in_specs=[pl.BlockSpec((tm, tk), lhs_map), pl.BlockSpec((tm, tn), grad_map)],
            out_specs=pl.BlockSpec((None, tk, tn), out_map),
            scratch_shapes=[pltpu.VMEM((tk, tn), jnp.float32)],
        ),
        compiler_params=_CompilerParams(
            dimension_semantics=("parallel", "parallel", "arbitrary")),
        interpret=interpret,
        cost_estimate=pc.cost_estimate(2 * m * k * n, lhs, grad, out_shape),
        name="moejax_tgmm",
    )(meta, lhs, grad)
