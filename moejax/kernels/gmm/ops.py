"""Public grouped matmuls: validation, `impl` dispatch and the custom VJPs.

Axis letters: M rows of `lhs` (grouped contiguously by `group_sizes`), K contracting width,
N output width, G groups.

Backends (`impl`): "reference" (`jax.lax.ragged_dot`), "chunk" (plain-JAX tile scan, flat in G
on CPU), "pallas" (Pallas kernels chosen at lowering time with `jax.lax.platform_dependent`: the
Triton kernel of `pallas_gpu.py` on CUDA, the Mosaic kernel of `pallas_tpu.py` on TPU, the
Triton kernel in interpret mode on CPU, `ragged_dot` elsewhere) and "auto" (lowering-time
choice: the Pallas kernel on CUDA/TPU, chunk on CPU, reference elsewhere). On CUDA, "auto" takes
the Triton kernel only for the dtypes the deviceless sm_90a compile check covers
(`GPU_KERNEL_DTYPES`, see `moejax.kernels.gpu_compile`); any other dtype falls back to
`ragged_dot` and says so once (a `UserWarning` naming the dtype and shapes).

The backward passes are built from the forward ops (megablox): for `out = gmm(lhs, rhs)`,
`dlhs = gmm(dout, rhs, transpose_rhs=True)` and `drhs = tgmm(lhs, dout)`; for
`out = tgmm(lhs, grad)`, `dlhs = gmm(grad, dout, transpose_rhs=True)` and
`dgrad = gmm(lhs, dout)`. A backend therefore only supplies forward `gmm` and `tgmm`; the
Pallas kernels plug into `_BACKENDS` without a backward of their own.

Data-dependent checks (negative group sizes, `sum(group_sizes) > M`) cannot raise inside `jit`;
`checked_gmm` / `checked_tgmm` run them through `jax.experimental.checkify`, and
`check_group_sizes` can be called inside any function the caller checkifies.
"""

from __future__ import annotations

import dataclasses
import functools
import warnings
from collections.abc import Callable, Sequence
from types import MappingProxyType
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.experimental import checkify

from moejax.kernels import gpu_compile
from moejax.kernels.gmm import chunk, pallas_gpu, pallas_tpu, reference

Array = jax.Array

IMPL_NAMES: tuple[str, ...] = ("auto", "reference", "chunk", "pallas")


class GmmImplUnavailableError(NotImplementedError, ValueError):
    """A requested gmm backend does not exist yet (or cannot run these arguments).

    Subclasses both `NotImplementedError` (so `impl` sequences fall back, STYLE §6.6) and
    `ValueError` (it is a bad argument value from the caller's point of view).
    """


class _Backend(NamedTuple):
    gmm: Callable[..., Array]  # (lhs, rhs, group_sizes, *, transpose_rhs) -> [M, N]
    tgmm: Callable[..., Array]  # (lhs, grad, group_sizes) -> [G, K, N]


def _pallas_gmm(lhs, rhs, group_sizes, *, transpose_rhs=False):
    # Chosen at lowering time, so jax.export(platforms=["cuda"]) on a CPU host gets the Triton
    # kernel and platforms=["tpu"] the Mosaic one; on CPU the Triton kernel is interpreted.
    part = functools.partial
    return jax.lax.platform_dependent(
        lhs, rhs, group_sizes,
        cpu=part(pallas_gpu.gmm, transpose_rhs=transpose_rhs, interpret=True),
        cuda=part(pallas_gpu.gmm, transpose_rhs=transpose_rhs),
        tpu=part(pallas_tpu.gmm, transpose_rhs=transpose_rhs),
        default=part(reference.gmm, transpose_rhs=transpose_rhs))


def _pallas_tgmm(lhs, grad, group_sizes):
    return jax.lax.platform_dependent(
        lhs, grad, group_sizes, cpu=functools.partial(pallas_gpu.tgmm, interpret=True),
        cuda=pallas_gpu.tgmm, tpu=pallas_tpu.tgmm, default=reference.tgmm)


# Input dtypes whose Triton kernels the sm_90a compile check covers (tests/gpu_compile).
GPU_KERNEL_DTYPES = tuple(jnp.dtype(d) for d in gpu_compile.COVERED_DTYPES)


def _gpu_kernel_or_fallback(kernel: Callable, fallback: Callable, op: str, *arrays: Array
                            ) -> Callable:
    """`kernel` when the compile check covers these inputs, else `fallback` (with a warning when
    running on a GPU, where the choice matters)."""
    if arrays[0].dtype in GPU_KERNEL_DTYPES:
        return kernel
    if jax.default_backend() == "gpu":
        shapes = ", ".join(f"{tuple(a.shape)}" for a in arrays)
        warnings.warn(f"{op}(impl='auto'): dtype {arrays[0].dtype} (shapes {shapes}) is not "
                      f"covered by the GPU kernel's compile check (covered: "
                      f"{', '.join(map(str, GPU_KERNEL_DTYPES))}); using jax.lax.ragged_dot",
                      stacklevel=3)
    return fallback


def _auto_gmm(lhs, rhs, group_sizes, *, transpose_rhs=False):
    # Chosen at lowering time, so jax.export(platforms=[...]) picks per platform.
    part = functools.partial
    cuda = _gpu_kernel_or_fallback(pallas_gpu.gmm, reference.gmm, "gmm", lhs, rhs)
    return jax.lax.platform_dependent(
        lhs, rhs, group_sizes,
        cpu=part(chunk.gmm, transpose_rhs=transpose_rhs),
        cuda=part(cuda, transpose_rhs=transpose_rhs),
        tpu=part(pallas_tpu.gmm, transpose_rhs=transpose_rhs),
        default=part(reference.gmm, transpose_rhs=transpose_rhs))


def _auto_tgmm(lhs, grad, group_sizes):
    cuda = _gpu_kernel_or_fallback(pallas_gpu.tgmm, reference.tgmm, "tgmm", lhs, grad)
    return jax.lax.platform_dependent(lhs, grad, group_sizes, cpu=chunk.tgmm, cuda=cuda,
                                      tpu=pallas_tpu.tgmm, default=reference.tgmm)


_BACKENDS = MappingProxyType({
    "reference": _Backend(gmm=reference.gmm, tgmm=reference.tgmm),
    "chunk": _Backend(gmm=chunk.gmm, tgmm=chunk.tgmm),
    "pallas": _Backend(gmm=_pallas_gmm, tgmm=_pallas_tgmm),
    "auto": _Backend(gmm=_auto_gmm, tgmm=_auto_tgmm),
})


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class _Options:
    """Static options: the single non-differentiable argument of the custom VJPs."""

    backend: str
    transpose_rhs: bool = False


def _resolve_impl(impl: str | Sequence[str]) -> str:
    """Maps `impl` (a name or a sequence tried in order) to a key of `_BACKENDS`."""
    names = (impl,) if isinstance(impl, str) else tuple(impl)
    if not names:
        raise ValueError(f"impl must name at least one of {IMPL_NAMES}, got {impl!r}")
    errors = []
    for name in names:
        if name not in IMPL_NAMES:
            raise ValueError(f"Unknown gmm impl {name!r}; valid: {', '.join(IMPL_NAMES)}")
        if name not in _BACKENDS:  # named in IMPL_NAMES but not registered (yet).
            errors.append(GmmImplUnavailableError(
                f"impl={name!r}: this gmm backend is not available; use impl='reference' or "
                f"impl='auto'"))
            continue
        return name
    if len(errors) == 1:
        raise errors[0]
    raise ExceptionGroup(f"no gmm impl in {names} can run", errors)


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


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _gmm(opts: _Options, lhs: Array, rhs: Array, group_sizes: Array) -> Array:
    return _BACKENDS[opts.backend].gmm(lhs, rhs, group_sizes, transpose_rhs=opts.transpose_rhs)


def _gmm_fwd_rule(opts, lhs, rhs, group_sizes):
    return _gmm(opts, lhs, rhs, group_sizes), (lhs, rhs, group_sizes)


def _gmm_bwd_rule(opts, residuals, dout):
    lhs, rhs, group_sizes = residuals
    dout = dout.astype(lhs.dtype)
    flipped = dataclasses.replace(opts, transpose_rhs=not opts.transpose_rhs)
    dlhs = _gmm(flipped, dout, rhs, group_sizes)
    plain = _Options(backend=opts.backend)
    if opts.transpose_rhs:  # out = lhs @ rhs[g]^T, rhs [G, N, K]: drhs[g] = dout_g^T lhs_g.
        drhs = _tgmm(plain, dout, lhs, group_sizes)
    else:
        drhs = _tgmm(plain, lhs, dout, group_sizes)
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
        Triton kernel in interpret mode on CPU — slow, for tests), or a sequence tried in order.

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
    opts = _Options(backend=_resolve_impl(impl))
    return _gmm(opts, lhs, rhs, group_sizes.astype(jnp.int32))


# ------------------------------------------------------------------------------------ tgmm


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _tgmm(opts: _Options, lhs: Array, grad: Array, group_sizes: Array) -> Array:
    return _BACKENDS[opts.backend].tgmm(lhs, grad, group_sizes)


def _tgmm_fwd_rule(opts, lhs, grad, group_sizes):
    return _tgmm(opts, lhs, grad, group_sizes), (lhs, grad, group_sizes)


def _tgmm_bwd_rule(opts, residuals, dout):
    lhs, grad, group_sizes = residuals
    dout = dout.astype(lhs.dtype)  # [G, K, N]
    dlhs = _gmm(_Options(backend=opts.backend, transpose_rhs=True), grad, dout, group_sizes)
    dgrad = _gmm(_Options(backend=opts.backend), lhs, dout, group_sizes)
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
    opts = _Options(backend=_resolve_impl(impl))
    return _tgmm(opts, lhs, grad, group_sizes.astype(jnp.int32))


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
