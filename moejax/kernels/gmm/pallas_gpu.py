"""Grouped matmuls as Pallas kernels for GPU (Triton lowering).

Axis letters: M rows of `lhs` (grouped contiguously by `group_sizes`), K contracting width,
N output width, G groups, V visits (see `pallas_common.py`); tm, tk, tn block sizes.

`gmm`: the grid is `(⌈N/tn⌉, V)`. Program `(j, v)` reads its visit `(tile, group, lo, hi)` from
the schedule (computed outside the kernel in plain XLA), loops over K in blocks of `tk`
accumulating `lhs[tile rows, :] @ rhs[group][:, j-th column block]` in float32, and stores only
the rows of the tile inside `[lo, hi)` (masked store). Every output row belongs to exactly one
visit (the schedule's tail group covers rows past `sum(group_sizes)` and stores zeros), so
programs never write the same element and no atomics are needed. Loads past M, K or N are masked,
so no dimension has to be a multiple of its block.

`tgmm`: the grid is `(⌈N/tn⌉, ⌈K/tk⌉, G)`; program `(j, i, g)` owns output block
`out[g, i-th K block, j-th N block]` and loops over the rows of group g in chunks of tm
(a loop with a data-dependent trip count, zero for empty groups, which store zeros).

The first grid dimension (CUDA's fastest-launched) is the N block, so programs running together
share one lhs row tile (gmm) or one lhs row slab (tgmm) in L2 while they sweep N.

Triton needs power-of-two block shapes of at least 16; `BlockSizes` holds the requested sizes
and `pallas_common.pow2_block` shrinks them for small dimensions. bf16 (or fp32) in, fp32
accumulation, output in `out_dtype` (default `lhs.dtype`). On CPU, pass `interpret=True` (GPU
semantics). `check_supported` raises `NotImplementedError` for dtypes outside the sm_90a compile
check, so `ops.py`'s `impl="auto"` falls back (the kernels themselves do not check).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from moejax.kernels.gmm import pallas_common as pc

Array = jax.Array

# jax ≤ 0.6 spelled the compiler params TritonCompilerParams; current releases CompilerParams.
_CompilerParams = (plgpu.CompilerParams if hasattr(plgpu, "CompilerParams")
                   else plgpu.TritonCompilerParams)


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class BlockSizes:
    """Tile sizes and launch options of the Triton kernels (static, hashable).

    Attributes:
      block_m: rows per tile (power of two ≥ 16).
      block_k: contracting width per step (power of two ≥ 16).
      block_n: output columns per program (power of two ≥ 16).
      num_warps: warps per program.
      num_stages: software-pipelining stages of the K loop.
    """

    block_m: int = 64
    block_k: int = 64
    block_n: int = 128
    num_warps: int = 4
    num_stages: int = 3

    def __post_init__(self):
        for name in ("block_m", "block_k", "block_n"):
            val = getattr(self, name)
            if val < 16 or val & (val - 1):
                raise ValueError(f"{name}={val} must be a power of two ≥ 16 (Triton blocks)")

    @classmethod
    def get_default(cls) -> BlockSizes:
        return cls()


def check_supported(op: str, lhs: Array, other: Array, *_, **__) -> None:
    """Raises `NotImplementedError` for input dtypes the kernels' sm_90a compile check does not
    cover (`pallas_common.GPU_KERNEL_DTYPES`: bfloat16, float32), naming dtype and shapes.

    Args:
      op: "gmm" or "tgmm" (unused: the dispatcher's message names the op).
      lhs, other: the two matrix operands (`rhs` or `grad`); further arguments are ignored.
    """
    del op
    if lhs.dtype in pc.GPU_KERNEL_DTYPES:
        return
    shapes = ", ".join(f"{tuple(a.shape)}" for a in (lhs, other))
    raise NotImplementedError(
        f"dtype {lhs.dtype} (shapes {shapes}) is not covered by the GPU kernel's compile check "
        f"(covered: {', '.join(map(str, pc.GPU_KERNEL_DTYPES))})")


# ------------------------------------------------------------------------------------- gmm


def _gmm_fwd_kernel(tile_ref, group_ref, lo_ref, hi_ref, compute_ref, lhs_ref, rhs_ref, out_ref,
                    *, tm, tk, tn, k, n, transpose_rhs):
    j, v = pl.program_id(0), pl.program_id(1)
    tile, group = tile_ref[v], group_ref[v]
    lo, hi, compute = lo_ref[v], hi_ref[v], compute_ref[v]
    rows = tile * tm + lax.broadcasted_iota(jnp.int32, (tm,), 0)
    row_ok = (rows >= lo) & (rows < hi)
    cols = j * tn + lax.broadcasted_iota(jnp.int32, (tn,), 0)
    col_ok = cols < n
    row_slice, col_slice = pl.ds(tile * tm, tm), pl.ds(j * tn, tn)

    def body(i, acc):
        k_ok = i * tk + lax.broadcasted_iota(jnp.int32, (tk,), 0) < k
        x = plgpu.load(lhs_ref.at[row_slice, pl.ds(i * tk, tk)],
                       mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        if transpose_rhs:  # rhs [G, N, K]: block [tn, tk], contract its last dim.
            w = plgpu.load(rhs_ref.at[group, col_slice, pl.ds(i * tk, tk)],
                           mask=col_ok[:, None] & k_ok[None, :], other=0.0)
            dims = (((1,), (1,)), ((), ()))
        else:
            w = plgpu.load(rhs_ref.at[group, pl.ds(i * tk, tk), col_slice],
                           mask=k_ok[:, None] & col_ok[None, :], other=0.0)
            dims = (((1,), (0,)), ((), ()))
        return acc + lax.dot_general(x, w, dims, preferred_element_type=jnp.float32)

    # Tail (zero) and padding visits run no K step; the store mask handles the rest. `compute`
    # is an int32 0/1, so the trip count stays int32 (a `jnp.where` of two Python ints takes the
    # predicate's i1 type in Triton's lowering, and scf.for then refuses the mixed bounds).
    num_k = compute * pl.cdiv(k, tk)
    acc = lax.fori_loop(0, num_k, body, jnp.zeros((tm, tn), jnp.float32))
    plgpu.store(out_ref.at[row_slice, col_slice], acc.astype(out_ref.dtype),
                mask=row_ok[:, None] & col_ok[None, :])


@functools.partial(jax.jit, static_argnames=("transpose_rhs", "out_dtype", "block_sizes",
                                             "interpret"))
def gmm(lhs: Array, rhs: Array, group_sizes: Array, *, transpose_rhs: bool = False,
        out_dtype=None, block_sizes: BlockSizes | None = None,
        interpret: bool = False) -> Array:
    """Grouped matmul `out[rows of g] = lhs[rows of g] @ rhs[g]` (Triton kernel).

    Args:
      lhs: `[M, K]` rows grouped contiguously by `group_sizes`.
      rhs: `[G, K, N]` (`[G, N, K]` if `transpose_rhs`), same dtype as `lhs`.
      group_sizes: `<int32>[G]`, non-negative, `sum ≤ M` (not checked; see `ops.checked_gmm`).
      transpose_rhs: multiply by `rhs[g]^T` without materialising it.
      out_dtype: result dtype (the `preferred_element_type`); defaults to `lhs.dtype`.
      block_sizes: `BlockSizes`; default `BlockSizes.get_default()`.
      interpret: run the kernel in Pallas interpret mode (CPU).

    Returns:
      `[M, N]`; rows past `sum(group_sizes)` are zero; float32 accumulation.
    """
    bs = block_sizes or BlockSizes.get_default()
    (m, k), num_groups = lhs.shape, rhs.shape[0]
    n = rhs.shape[1] if transpose_rhs else rhs.shape[2]
    out_dtype = jnp.dtype(out_dtype or lhs.dtype)
    if m == 0 or num_groups == 0 or n == 0:
        return jnp.zeros((m, n), out_dtype)
    if k == 0:
        return jnp.zeros((m, n), out_dtype)
    tm, tk, tn = (pc.pow2_block(m, bs.block_m), pc.pow2_block(k, bs.block_k),
                  pc.pow2_block(n, bs.block_n))
    meta = pc.make_group_metadata(group_sizes, m=m, tm=tm, for_tgmm=False)
    num_v = meta.tile.shape[0]
    kernel = functools.partial(_gmm_fwd_kernel, tm=tm, tk=tk, tn=tn, k=k, n=n,
                               transpose_rhs=transpose_rhs)
    out_shape = jax.ShapeDtypeStruct((m, n), out_dtype)
    return pl.pallas_call(
        kernel,
        out_shape=out_shape,
        grid=(pl.cdiv(n, tn), num_v),
        compiler_params=_CompilerParams(num_warps=bs.num_warps, num_stages=bs.num_stages),
        interpret=interpret,
        cost_estimate=pc.cost_estimate(2 * m * k * n, lhs, rhs, out_shape),
        name="moejax_gmm",
    )(meta.tile, meta.group, meta.lo, meta.hi, meta.compute, lhs, rhs)


# ------------------------------------------------------------------------------------ tgmm


def _tgmm_fwd_kernel(offsets_ref, lhs_ref, grad_ref, out_ref, *, tm, tk, tn, k, n):
    j, i, g = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    start, end = offsets_ref[g], offsets_ref[g + 1]
    k_ok = i * tk + lax.broadcasted_iota(jnp.int32, (tk,), 0) < k
    n_ok = j * tn + lax.broadcasted_iota(jnp.int32, (tn,), 0) < n

    def body(t, acc):
        r0 = start + t * tm
        row_ok = r0 + lax.broadcasted_iota(jnp.int32, (tm,), 0) < end
        x = plgpu.load(lhs_ref.at[pl.ds(r0, tm), pl.ds(i * tk, tk)],
                       mask=row_ok[:, None] & k_ok[None, :], other=0.0)  # [tm, tk]
        y = plgpu.load(grad_ref.at[pl.ds(r0, tm), pl.ds(j * tn, tn)],
                       mask=row_ok[:, None] & n_ok[None, :], other=0.0)  # [tm, tn]
        return acc + lax.dot_general(x, y, (((0,), (0,)), ((), ())),
                                     preferred_element_type=jnp.float32)

    num_t = pl.cdiv(jnp.maximum(end - start, 0), tm)  # 0 for empty groups: they store zeros.
    acc = lax.fori_loop(0, num_t, body, jnp.zeros((tk, tn), jnp.float32))
    plgpu.store(out_ref.at[g, pl.ds(i * tk, tk), pl.ds(j * tn, tn)], acc.astype(out_ref.dtype),
                mask=k_ok[:, None] & n_ok[None, :])


@functools.partial(jax.jit, static_argnames=("out_dtype", "block_sizes", "interpret"))
def tgmm(lhs: Array, grad: Array, group_sizes: Array, *, out_dtype=None,
         block_sizes: BlockSizes | None = None, interpret: bool = False) -> Array:
    """Transposed grouped matmul `out[g] = lhs[rows of g]^T @ grad[rows of g]` (Triton kernel).

    Args:
      lhs: `[M, K]` rows grouped contiguously by `group_sizes`.
      grad: `[M, N]` same row grouping and dtype.
      group_sizes: `<int32>[G]`, non-negative, `sum ≤ M`; rows past the sum are ignored.
      out_dtype: result dtype; defaults to `lhs.dtype`.
      block_sizes: `BlockSizes`; default `BlockSizes.get_default()`.
      interpret: run the kernel in Pallas interpret mode (CPU).

    Returns:
      `[G, K, N]`; empty groups give zero blocks; float32 accumulation.
    """
    bs = block_sizes or BlockSizes.get_default()
    (m, k), n, num_groups = lhs.shape, grad.shape[1], group_sizes.shape[0]
    out_dtype = jnp.dtype(out_dtype or lhs.dtype)
    if m == 0 or num_groups == 0 or k == 0 or n == 0:
        return jnp.zeros((num_groups, k, n), out_dtype)
    tm, tk, tn = (pc.pow2_block(m, bs.block_m), pc.pow2_block(k, bs.block_k),
                  pc.pow2_block(n, bs.block_n))
    ends = jnp.minimum(jnp.cumsum(jnp.maximum(group_sizes.astype(jnp.int32), 0)), m)
    offsets = jnp.concatenate([jnp.zeros((1,), jnp.int32), ends.astype(jnp.int32)])
    kernel = functools.partial(_tgmm_fwd_kernel, tm=tm, tk=tk, tn=tn, k=k, n=n)
    out_shape = jax.ShapeDtypeStruct((num_groups, k, n), out_dtype)
    return pl.pallas_call(
        kernel,
        out_shape=out_shape,
        grid=(pl.cdiv(n, tn), pl.cdiv(k, tk), num_groups),
        compiler_params=_CompilerParams(num_warps=bs.num_warps, num_stages=bs.num_stages),
        interpret=interpret,
        cost_estimate=pc.cost_estimate(2 * m * k * n, lhs, grad, out_shape),
        name="moejax_tgmm",
    )(offsets, lhs, grad)
