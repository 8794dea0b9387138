"""`impl` dispatch shared by the kernel op families (`delta_rule`, `gmm`), as tokamax's `api.py`.

An op family registers, per `impl` name, the implementations to try on each platform, in order
(`Table`). `dispatch` builds one `jax.lax.platform_dependent` branch per platform, so the choice
is made when lowering (`jax.export(..., platforms=["cuda"])` on a CPU host gets the GPU kernel).
Inside a branch the candidates are tried in order: an implementation whose `check` raises
`NotImplementedError` for the arguments (dtype, head dims, ...) is skipped before anything is
traced, and the next one runs. Falling back on the platform this process runs on (cuda/rocm on
a GPU host, tpu on a TPU host) warns, once per message. If every candidate refuses, the branch
raises `KernelUnavailableError` (one reason) or an `ExceptionGroup` on the host platform; a
branch for another platform (only ever lowered by `jax.export`) lowers its first candidate
as asked, since `platform_dependent` traces every branch and an error there would break the
host's own branch too.

Platform keys are those of `jax.lax.platform_dependent`: "cpu", "cuda", "rocm", "tpu" and
"default" (any platform not named).
"""

from __future__ import annotations

import dataclasses
import functools
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax

# platform_dependent key -> what `jax.default_backend()` says on such a host.
_HOST_BACKEND = {"cpu": "cpu", "cuda": "gpu", "rocm": "gpu", "tpu": "tpu"}


class KernelUnavailableError(NotImplementedError, ValueError):
    """No implementation named by `impl` can run these arguments on this platform.

    Subclasses both `NotImplementedError` (so a sequence of names falls back) and `ValueError`
    (from the caller's side it is a bad argument value).
    """


@dataclasses.dataclass(frozen=True, slots=True)
class Implementation:
    """One way to run an op.

    Attributes:
      fn: `fn(*args, **kwargs)`, the implementation.
      description: how a fallback warning names it ("the jnp chunk path").
      check: `check(*args, **kwargs)` raises `NotImplementedError`, saying what it does not
        cover, for arguments `fn` cannot handle (None: it handles all).
    """

    fn: Callable[..., Any]
    description: str
    check: Callable[..., None] | None = None


# impl name -> platform key -> implementations to try, in order.
Table = Mapping[str, Mapping[str, Sequence[Implementation]]]


def impl_names(op: str, impl: str | Sequence[str], valid: Sequence[str]) -> tuple[str, ...]:
    """`impl` (a name or a sequence tried in order) as a tuple of valid names.

    Raises:
      ValueError: an empty sequence, or a name not in `valid` (the message lists them).
    """
    names = (impl,) if isinstance(impl, str) else tuple(impl)
    if not names:
        raise ValueError(f"impl must name at least one of {tuple(valid)}, got {impl!r}")
    for name in names:
        if name not in valid:
            raise ValueError(f"Unknown {op} impl {name!r}; valid: {', '.join(valid)}")
    return names


def _candidates(table: Table, names: Sequence[str], platform: str) -> list[Implementation]:
    out: list[Implementation] = []
    for name in names:
        per_platform = table[name]
        out.extend(per_platform.get(platform, per_platform.get("default", ())))
    return out


def _on_host(platform: str, listed: set[str]) -> bool:
    """Whether branch `platform` is the one this process runs (`jax.default_backend()`)."""
    host = jax.default_backend()
    if platform == "default":
        return not any(_HOST_BACKEND.get(p) == host for p in listed)
    return _HOST_BACKEND.get(platform) == host


def _first_that_runs(label: str, platform: str, listed: set[str],
                     candidates: Sequence[Implementation], kwargs: Mapping[str, Any], *args):
    errors: list[NotImplementedError] = []
    on_host = _on_host(platform, listed)
    for cand in candidates:
        try:
            if cand.check is not None:
                cand.check(*args, **kwargs)
        except NotImplementedError as err:
            errors.append(err)
            continue
        if errors and on_host:
            warnings.warn(f"{label}: {errors[0]}; using {cand.description}", stacklevel=2)
        return cand.fn(*args, **kwargs)
    if not on_host and candidates:  # lowered only for export: lower what was asked for
        return candidates[0].fn(*args, **kwargs)
    if not errors:
        raise KernelUnavailableError(f"{label}: no implementation for platform {platform!r}")
    if len(errors) == 1:
        raise KernelUnavailableError(f"{label}: {errors[0]}") from errors[0]
    raise ExceptionGroup(f"{label}: no implementation can run these arguments", errors)


def dispatch(op: str, impl: str | Sequence[str], table: Table, *args, **kwargs):
    """Runs the first implementation of `impl` that accepts `args` on the lowering platform.

    Args:
      op: the op's name, for messages ("delta_rule", "gmm").
      impl: a name of `table` or a sequence of names; per platform their implementations are
        tried in the order given (names already checked, see `impl_names`).
      table: the op family's `Table`.
      *args: positional arguments of the implementations (arrays or None; what
        `jax.lax.platform_dependent` passes to each branch).
      **kwargs: static keyword arguments, bound into every branch.

    Returns:
      The chosen implementation's result.
    """
    names = (impl,) if isinstance(impl, str) else tuple(impl)
    label = f"{op}(impl={impl!r})"
    platforms = {p for name in names for p in table[name]}
    if platforms == {"default"}:  # the same on every platform: no platform_dependent
        return _first_that_runs(label, "default", platforms,
                                _candidates(table, names, "default"), kwargs, *args)
    # Platforms with the same candidates (cuda and rocm) and host status share one branch
    # object, which `platform_dependent` traces once.
    shared: dict[tuple, Callable] = {}
    branches = {}
    for p in sorted(platforms):
        cands = tuple(_candidates(table, names, p))
        key = (cands, _on_host(p, platforms))
        if key not in shared:
            shared[key] = functools.partial(_first_that_runs, label, p, platforms, cands,
                                            kwargs)
        branches[p] = shared[key]
    return jax.lax.platform_dependent(*args, **branches)
