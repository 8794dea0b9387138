"""Public grouped matmuls: validation, `impl` dispatch and the custom VJPs.

Axis letters: M rows of `lhs` (grouped contiguously by `group_sizes`), K contracting width,
N output width, G groups.

Backends (`impl`): "reference" (`jax.lax.ragged_dot`), "chunk" (plain-JAX tile scan, flat in G
on CPU), "pallas" (Pallas kernels chosen at lowering time through `moejax.kernels.dispatch`: the
Triton kernel of `pallas_gpu.py` on CUDA, the Mosaic kernel of `pallas_tpu.py` on TPU, the
Triton kernel in interpret mode on CPU, `ragged_dot` elsewhere) and "auto" (lowering-time
choice: the Pallas kernel on CUDA/TPU, chunk on CPU, reference elsewhere). A sequence of names
is tried in order. On CUDA the Triton kernel refuses (`pallas_gpu.check_supported`,
`NotImplementedError`) the dtypes the deviceless sm_90a compile check does not cover
(`pallas_common.GPU_KERNEL_DTYPES`, see `moejax.kernels.gpu_compile`); "auto" then falls back to
`ragged_dot` and says so once on a GPU host (a `UserWarning` naming the dtype and shapes).

The backward passes are built from the forward ops (megablox): for `out = gmm(lhs, rhs)`,
`dlhs = gmm(dout, rhs, transpose_rhs=True)` and `drhs = tgmm(lhs, dout)`; for
`out = tgmm(lhs, grad)`, `dlhs = gmm(grad, dout, transpose_rhs=True)` and
`dgrad = gmm(lhs, dout)`. A backend therefore only supplies forward `gmm` and `tgmm`; the
Pallas kernels plug into `_GMM_IMPLS` / `_TGMM_IMPLS` without a backward of their own. Both
custom VJPs take one static `_Options` (the `impl` and `transpose_rhs`), by name.

Data-dependent checks (negative group sizes, `sum(group_sizes) > M`) cannot raise inside `jit`;
`checked_gmm` / `checked_tgmm` run them through `jax.experimental.checkify`, and
`check_group_sizes` can be called inside any function the caller checkifies.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from types import MappingProxyType

import jax
import jax.numpy as jnp
from jax.experimental import checkify

from moejax.kernels import dispatch
from moejax.kernels.gmm import chunk, pallas_gpu, pallas_tpu, reference

Array = jax.Array

IMPL_NAMES: tuple[str, ...] = ("auto", "reference", "chunk", "pallas")

# A requested gmm backend cannot run these arguments: both a `NotImplementedError` (so `impl`
# sequences fall back, STYLE §6.6) and a `ValueError` (a bad argument value from the caller's
# point of view). Kept under its old name.
GmmImplUnavailableError = dispatch.KernelUnavailableError


def _table(ref, chk, gpu, tpu, op: str) -> dispatch.Table:
    """name -> platform -> implementations, for the forward op `op` ("gmm" or "tgmm")."""
    impl = dispatch.Implementation
    ref = impl(ref, "jax.lax.ragged_dot")
    gpu_kernel = impl(gpu, "the GPU kernel", check=functools.partial(pallas_gpu.check_supported,
                                                                     op))
    return MappingProxyType({
        "reference": {"default": (ref,)},
        "chunk": {"default": (impl(chk, "the plain-JAX tile scan"),)},
        "pallas": {"cpu": (impl(functools.partial(gpu, interpret=True),
                                "the GPU kernel in interpret mode"),),
                   "cuda": (gpu_kernel,), "tpu": (impl(tpu, "the TPU kernel"),),
                   "default": (ref,)},
        "auto": {"cpu": (impl(chk, "the plain-JAX tile scan"),), "cuda": (gpu_kernel, ref),
                 "tpu": (impl(tpu, "the TPU kernel"),), "default": (ref,)},
    })


# gmm implementations: (lhs, rhs, group_sizes, *, transpose_rhs) -> [M, N].
_GMM_IMPLS = _table(reference.gmm, chunk.gmm, pallas_gpu.gmm, pallas_tpu.gmm, "gmm")
# tgmm implementations: (lhs, grad, group_sizes) -> [G, K, N].
_TGMM_IMPLS = _table(reference.tgmm, chunk.tgmm, pallas_gpu.tgmm, pallas_tpu.tgmm, "tgmm")


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class _Options:
    """Static options: the single non-differentiable argument of the custom VJPs.

    Attributes:
      impl: the `impl` name, or a tuple of names tried in order (validated).
      transpose_rhs: gmm multiplies by `rhs[g]^T` (rhs `[G, N, K]`); unused by tgmm.
    """

    impl: str | tuple[str, ...]
    transpose_rhs: bool = False


def _options(impl: str | Sequence[str]) -> _Options:
    """Validates `impl` (a name or a sequence tried in order) into `_Options`."""
    names = dispatch.impl_names("gmm", impl, IMPL_NAMES)
    return _Options(impl=impl if isinstance(impl, str) else names)


def _validate_args(*, lhs: Array, other: Array, group_sizes: Array, other_name: str,
                   other_ndim: int) -> None:
    """Checks ranks, dtypes and static shapes; raises ValueError naming the argument."""
    if lhs.ndim != 2:
        raise ValueError(f"Expected 2-tensor for 'lhs' [M, K] but got {lhs.ndim}-tensor "
                         f"of shape {lhs.shape}")
    if other.ndim != other_ndim:
        raise ValueError(f"Expected {other_ndim}-tensor for {other_name!r} but got "
                         f"{other.ndim}-tensor of shape {other.shape}")
    if not jnp.issubdtype(lhs.dtype, jnp.floating):
        raise ValueError(f"'lhs' must be a float array, got dtype {lhs.dtype}")
    if lhs.dtype != other.dtype:
        raise ValueError(f"'lhs' and {other_name!r} must have the same dtype, got "
                         f"{lhs.dtype} and {other.dtype}")
    if group_sizes.ndim != 1:
        raise ValueError(f"Expected 1-tensor for 'group_sizes' [G] but got shape "
                         f"{group_sizes.shape}")
    if not jnp.issubdtype(group_sizes.dtype, jnp.integer):
        raise ValueError(f"'group_sizes' must be an integer array (int32), got dtype "
                         f"{group_sizes.dtype}")


# ------------------------------------------------------------------------------------- gmm


@functools.partial(jax.custom_vjp, nondiff_argnames=("opts",))
def _gmm(lhs: Array, rhs: Array, group_sizes: Array, opts: _Options) -> Array:
    return dispatch.dispatch("gmm", opts.impl, _GMM_IMPLS, lhs, rhs, group_sizes,
                             transpose_rhs=opts.transpose_rhs)


def _gmm_fwd_rule(lhs, rhs, group_sizes, opts):
    return _gmm(lhs, rhs, group_sizes, opts), (lhs, rhs, group_sizes)


def _gmm_bwd_rule(opts, residuals, dout):
    lhs, rhs, group_sizes = residuals
    dout = dout.astype(lhs.dtype)
    flipped = dataclasses.replace(opts, transpose_rhs=not opts.transpose_rhs)
    dlhs = _gmm(dout, rhs, group_sizes, flipped)
    plain = _Options(impl=opts.impl)
    if opts.transpose_rhs:  # out = lhs @ rhs[g]^T, rhs [G, N, K]: drhs[g] = dout_g^T lhs_g.
        drhs = _tgmm(dout, lhs, group_sizes, plain)
    else:
        drhs = _tgmm(lhs, dout, group_sizes, plain)
    return dlhs, drhs.astype(rhs.dtype), None


_gmm.defvjp(_gmm_fwd_rule, _gmm_bwd_rule)


def gmm(lhs: Array, rhs: Array, group_sizes: Array, *,
        impl: str | Sequence[str] = "auto") -> Array:
    """Grouped matmul: `out[rows of g] = lhs[rows of g] @ rhs[g]`.

    Args:
      lhs: `[M, K]` float array, rows grouped contiguously (group 0's rows first).
      rhs: `[G, K, N]` array of `lhs.dtype`, one matrix per group.
      group_sizes: `<int>[G]` rows per group, non-negative with `sum ≤ M` (not checked under
        `jit`; use `checked_gmm` for that). Zero-sized groups are allowed.
      impl: "auto" (default: resolved at lowering time with `jax.lax.platform_dependent` —
        the Pallas kernel on CUDA and TPU, "chunk" on CPU, "reference" elsewhere), "reference"
        (`jax.lax.ragged_dot`; on CPU its cost grows linearly with G), "chunk" (`lax.scan`
        over row tiles, flat in G), "pallas" (Triton kernel on CUDA, Mosaic kernel on TPU, the
        Triton kernel in interpret mode on CPU — slow, for tests), or a sequence tried in order
        (a name whose kernel refuses the inputs, e.g. "pallas" for float16 on CUDA, passes to
        the next; if none can run, `GmmImplUnavailableError`).

    Returns:
      `[M, N]` of `lhs.dtype` (float32 accumulation); rows past `sum(group_sizes)` are zero.
      Differentiable in `lhs` and `rhs` (custom VJP: `gmm` with rhs transposed plus `tgmm`).

    Example:
      >>> lhs = jnp.ones((5, 3)); rhs = jnp.ones((2, 3, 4))
      >>> gmm(lhs, rhs, jnp.array([2, 2], jnp.int32))[:, 0]
      Array([3., 3., 3., 3., 0.], dtype=float32)
    """
    _validate_args(lhs=lhs, other=rhs, group_sizes=group_sizes, other_name="rhs", other_ndim=3)
    if lhs.shape[1] != rhs.shape[1]:
        raise ValueError(f"'lhs' [M, K] and 'rhs' [G, K, N] disagree on K: lhs {lhs.shape}, "
                         f"rhs {rhs.shape}")
    if group_sizes.shape[0] != rhs.shape[0]:
        raise ValueError(f"'group_sizes' has {group_sizes.shape[0]} entries but 'rhs' has "
                         f"G={rhs.shape[0]} groups")
    return _gmm(lhs, rhs, group_sizes.astype(jnp.int32), _options(impl))


# ------------------------------------------------------------------------------------ tgmm


@functools.partial(jax.custom_vjp, nondiff_argnames=("opts",))
def _tgmm(lhs: Array, grad: Array, group_sizes: Array, opts: _Options) -> Array:
    return dispatch.dispatch("tgmm", opts.impl, _TGMM_IMPLS, lhs, grad, group_sizes)


def _tgmm_fwd_rule(lhs, grad, group_sizes, opts):
    return _tgmm(lhs, grad, group_sizes, opts), (lhs, grad, group_sizes)


def _tgmm_bwd_rule(opts, residuals, dout):
    lhs, grad, group_sizes = residuals
    dout = dout.astype(lhs.dtype)  # [G, K, N]
    dlhs = _gmm(grad, dout, group_sizes, _Options(impl=opts.impl, transpose_rhs=True))
    dgrad = _gmm(lhs, dout, group_sizes, _Options(impl=opts.impl))
    return dlhs, dgrad, None


_tgmm.defvjp(_tgmm_fwd_rule, _tgmm_bwd_rule)


def tgmm(lhs: Array, grad: Array, group_sizes: Array, *,
         impl: str | Sequence[str] = "auto") -> Array:
    """Transposed grouped matmul: `out[g] = lhs[rows of g]^T @ grad[rows of g]`.

    This is the weight gradient of `gmm`.

    Args:
      lhs: `[M, K]` float array, rows grouped contiguously.
      grad: `[M, N]` array of `lhs.dtype`, same row grouping.
      group_sizes: `<int>[G]`, non-negative with `sum ≤ M`; rows past the sum are ignored.
      impl: as for `gmm`.

    Returns:
      `[G, K, N]` of `lhs.dtype`; empty groups give zero blocks. Differentiable in both inputs.

    Example:
      >>> tgmm(jnp.ones((5, 3)), jnp.ones((5, 4)), jnp.array([2, 0], jnp.int32))[:, 0, 0]
      Array([2., 0.], dtype=float32)
    """
    _validate_args(lhs=lhs, other=grad, group_sizes=group_sizes, other_name="grad", other_ndim=2)
    if lhs.shape[0] != grad.shape[0]:
        raise ValueError(f"'lhs' [M, K] and 'grad' [M, N] disagree on M: lhs {lhs.shape}, "
                         f"grad {grad.shape}")
    return _tgmm(lhs, grad, group_sizes.astype(jnp.int32), _options(impl))


# ------------------------------------------------------------------------ checkify wrappers


def check_group_sizes(group_sizes: Array, num_rows: int) -> None:
    """`checkify.check`s that `group_sizes >= 0` and `sum(group_sizes) <= num_rows`.

    Only valid inside a function transformed by `checkify.checkify` (or eagerly, outside `jit`).
    """
    checkify.check(jnp.all(group_sizes >= 0),
                   "gmm: group_sizes must be non-negative, got min {m}", m=jnp.min(group_sizes))
    checkify.check(jnp.sum(group_sizes) <= num_rows,
                   f"gmm: sum(group_sizes)={{s}} exceeds the M={num_rows} rows of lhs",
                   s=jnp.sum(group_sizes))


def _gmm_checked(lhs, rhs, group_sizes, *, impl):
    check_group_sizes(group_sizes, lhs.shape[0])
    return gmm(lhs, rhs, group_sizes, impl=impl)


def _tgmm_checked(lhs, grad, group_sizes, *, impl):
    check_group_sizes(group_sizes, lhs.shape[0])
    return tgmm(lhs, grad, group_sizes, impl=impl)


def checked_gmm(lhs: Array, rhs: Array, group_sizes: Array, *,
                impl: str | Sequence[str] = "auto") -> tuple[checkify.Error, Array]:
    """`gmm` plus the data-dependent group-size checks; returns `(err, out)`.

    Works under `jit`; afterwards `err.get()` gives the message (None if fine) and `err.throw()`
    raises `checkify.JaxRuntimeError`.
    """
    fn = checkify.checkify(functools.partial(_gmm_checked, impl=impl))
    return fn(lhs, rhs, group_sizes)


def checked_tgmm(lhs: Array, grad: Array, group_sizes: Array, *,
                 impl: str | Sequence[str] = "auto") -> tuple[checkify.Error, Array]:
    """`tgmm` plus the data-dependent group-size checks; returns `(err, out)`."""
    fn = checkify.checkify(functools.partial(_tgmm_checked, impl=impl))
    return fn(lhs, grad, group_sizes)
