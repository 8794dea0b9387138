"""Reference grouped matmuls on `jax.lax.ragged_dot`, plus per-group loop oracles for tests.

Axis letters: M rows of `lhs` (grouped contiguously: group 0 first, then group 1, ...), K the
contracting width, N the output width, G groups.

  gmm(lhs [M, K], rhs [G, K, N], sizes [G]) -> [M, N]      out[rows of g] = lhs[rows of g] @ rhs[g]
  tgmm(lhs [M, K], grad [M, N], sizes [G]) -> [G, K, N]  out[g] = lhs[rows of g]^T @ grad[rows of g]

Rows past `sum(group_sizes)` belong to no group: `gmm` writes zeros there and `tgmm` ignores them.
Both accumulate in float32 (`preferred_element_type`) and cast to the input dtype. Matmul precision
follows `jax_default_matmul_precision`. These functions do not validate; `ops.py` does.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array

# gmm with `transpose_rhs`: rhs is [G, N, K] and its last dimension is contracted.
_GMM_T_DIMS = jax.lax.RaggedDotDimensionNumbers(
    dot_dimension_numbers=(([1], [2]), ([], [])),
    lhs_ragged_dimensions=[0],
    rhs_group_dimensions=[0],
)
# tgmm contracts the ragged (row) dimension of both operands; each group yields one [K, N] block.
_TGMM_DIMS = jax.lax.RaggedDotDimensionNumbers(
    dot_dimension_numbers=(([0], [0]), ([], [])),
    lhs_ragged_dimensions=[0],
    rhs_group_dimensions=[],
)


def gmm(
    lhs: Array, rhs: Array, group_sizes: Array, *, transpose_rhs: bool = False, out_dtype=None
) -> Array:
    """Grouped matmul `out[rows of g] = lhs[rows of g] @ rhs[g]` via `jax.lax.ragged_dot`.

    Args:
      lhs: `[M, K]` rows grouped contiguously by `group_sizes`.
      rhs: `[G, K, N]` one matrix per group (`[G, N, K]` if `transpose_rhs`).
      group_sizes: `<int32>[G]`, non-negative, `sum ≤ M`.
      transpose_rhs: multiply by `rhs[g]^T` instead, without materialising the transpose.
      out_dtype: result dtype; defaults to `lhs.dtype`.

    Returns:
      `[M, N]`; rows past `sum(group_sizes)` are zero.
    """
    group_sizes = group_sizes.astype(jnp.int32)
    if transpose_rhs:
        out = jax.lax.ragged_dot_general(
            lhs, rhs, group_sizes, _GMM_T_DIMS, preferred_element_type=jnp.float32
        )
    else:
        out = jax.lax.ragged_dot(lhs, rhs, group_sizes, preferred_element_type=jnp.float32)
    return out.astype(out_dtype or lhs.dtype)


def tgmm(lhs: Array, grad: Array, group_sizes: Array, *, out_dtype=None) -> Array:
    """Transposed grouped matmul `out[g] = lhs[rows of g]^T @ grad[rows of g]`.

    Uses `jax.lax.ragged_dot_general` with the ragged dimension contracted (the weight gradient
    of `gmm`), so no `[M, G, ...]` intermediate is built.

    Args:
      lhs: `[M, K]` rows grouped contiguously by `group_sizes`.
      grad: `[M, N]` same row grouping.
      group_sizes: `<int32>[G]`, non-negative, `sum ≤ M`.
      out_dtype: result dtype; defaults to `lhs.dtype`.

    Returns:
      `[G, K, N]`; empty groups give zero blocks, rows past `sum(group_sizes)` are ignored.
    """
    out = jax.lax.ragged_dot_general(
        lhs, grad, group_sizes.astype(jnp.int32), _TGMM_DIMS, preferred_element_type=jnp.float32
    )
    return out.astype(out_dtype or lhs.dtype)


def _offsets(group_sizes) -> np.ndarray:
    sizes = np.asarray(group_sizes, np.int64)
    return np.concatenate([[0], np.cumsum(sizes)])


def gmm_loop(lhs, rhs, group_sizes) -> np.ndarray:
    """Oracle for `gmm`: a Python loop over groups in float64 NumPy (concrete inputs only).

    Args:
      lhs: `[M, K]`. rhs: `[G, K, N]`. group_sizes: `[G]` concrete integers.

    Returns:
      `<float64>[M, N]`, zero past `sum(group_sizes)`.
    """
    lhs = np.asarray(lhs, np.float64)
    rhs = np.asarray(rhs, np.float64)
    off = _offsets(group_sizes)
    out = np.zeros((lhs.shape[0], rhs.shape[-1]), np.float64)
    for g in range(rhs.shape[0]):
        out[off[g] : off[g + 1]] = lhs[off[g] : off[g + 1]] @ rhs[g]
    return out


def tgmm_loop(lhs, grad, group_sizes) -> np.ndarray:
    """Oracle for `tgmm`: a Python loop over groups in float64 NumPy (concrete inputs only).

    Args:
      lhs: `[M, K]`. grad: `[M, N]`. group_sizes: `[G]` concrete integers.

    Returns:
      `<float64>[G, K, N]`.
    """
    lhs = np.asarray(lhs, np.float64)
    grad = np.asarray(grad, np.float64)
    off = _offsets(group_sizes)
    out = np.zeros((len(off) - 1, lhs.shape[1], grad.shape[1]), np.float64)
    for g in range(len(off) - 1):
        out[g] = lhs[off[g] : off[g + 1]].T @ grad[off[g] : off[g + 1]]
    return out
