"""The `('data', 'fsdp', 'expert')` device mesh (DESIGN §5), mesh specs, and `shard_map` compat.

Axis letters: D, F, X sizes of the `'data'`, `'fsdp'` and `'expert'` axes; D·F·X devices.

* `'data'`: batch rows split, parameters replicated (gradients all-reduced).
* `'fsdp'`: batch rows split, and every large parameter (with its optimizer state) split over
  its largest divisible dim, gathered where it is used (ZeRO-3); see `moejax.parallel.sharding`.
* `'expert'`: MoE tokens split and expert banks split over their leading (expert) axis, tokens
  moved by `all_to_all` (`moejax.parallel.expert_parallel`).

Later axes (tensor, sequence) join `AXES` and the spec grammar unchanged. A mesh is written
`"data:2,fsdp:2,expert:2"` (`parse_mesh_spec`; axes left out are 1) — the `--mesh` flag and
`TrainConfig.mesh`. A `(1, 1, 1)` mesh on one device runs the same code as no mesh.

Axis types: every axis is `AxisType.Auto`. The router, the losses and the load metrics run as
ordinary `jnp` code on global arrays, and XLA's SPMD partitioner shards them along the tokens and
turns their means over N into all-reduces; with `Explicit` axes every such op (reshape, top-k
over tokens, reductions) would need its own `out_sharding`. The token exchange is written by hand
inside `shard_map`, where the axes are `Manual` anyway.

Example:
  >>> mesh = make_mesh(data=2, expert=4)      # needs 8 devices
  >>> dict(mesh.shape)
  {'data': 2, 'fsdp': 1, 'expert': 4}
  >>> parse_mesh_spec("fsdp:4,data:2")
  (('data', 2), ('fsdp', 4), ('expert', 1))
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import jax
from jax.sharding import Mesh

from moejax.validation import ArgumentTypeError, check_int

DATA: str = "data"
FSDP: str = "fsdp"
EXPERT: str = "expert"
AXES: tuple[str, ...] = (DATA, FSDP, EXPERT)  # the mesh's axis order
BATCH_AXES: tuple[str, ...] = (DATA, FSDP)  # the axes batch rows are split over
MeshSpec = tuple[tuple[str, int], ...]  # ((axis, size), ...) in AXES order, every axis

try:  # jax >= 0.5
    from jax.sharding import AxisType as _AxisType
except ImportError:  # pragma: no cover - older jax: every mesh axis is Auto
    _AxisType = None

try:  # jax >= 0.7: `jax.shard_map` with `check_vma`
    _shard_map = jax.shard_map
    _CHECK_KW = "check_vma"
except AttributeError:  # pragma: no cover - older jax
    from jax.experimental.shard_map import shard_map as _shard_map
    _CHECK_KW = "check_rep"


def shard_map(f, *, mesh: Mesh, in_specs, out_specs, check: bool = True):
    """`jax.shard_map` (or the experimental one on older jax) with the check flag renamed."""
    return _shard_map(f, mesh=mesh, in_specs=in_specs, out_specs=out_specs,
                      **{_CHECK_KW: check})


def make_mesh(data: int | None = None, expert: int = 1, *, fsdp: int = 1,
              devices: Sequence[jax.Device] | None = None) -> Mesh:
    """Builds a `('data', 'fsdp', 'expert')` mesh of `data·fsdp·expert` devices, `Auto` axes.

    Args:
      data: D; default: all given devices divided by `fsdp·expert`.
      expert: X, devices that share one copy of the expert bank (each holds E/X experts).
      fsdp: F, devices that share one copy of every large parameter (ZeRO-3).
      devices: devices to use (default `jax.devices()`, every process's); the first D·F·X
        are taken.

    Returns:
      `jax.sharding.Mesh` with axis names `AXES`.

    Raises:
      ValueError: if the sizes are not positive or there are not enough devices.
    """
    devices = list(jax.devices() if devices is None else devices)
    check_int("expert", expert, lo=1)
    check_int("fsdp", fsdp, lo=1)
    if data is None:
        if len(devices) % (fsdp * expert):
            raise ValueError(f"{len(devices)} devices are not divisible by fsdp×expert = "
                             f"{fsdp}×{expert}")
        data = len(devices) // (fsdp * expert)
    check_int("data", data, lo=1)
    shape = (int(data), int(fsdp), int(expert))
    size = shape[0] * shape[1] * shape[2]
    if size > len(devices):
        raise ValueError(f"a (data={shape[0]}, fsdp={shape[1]}, expert={shape[2]}) mesh needs "
                         f"{size} devices, only {len(devices)} available")
    kwargs = {"devices": devices[:size]}
    if _AxisType is not None:
        kwargs["axis_types"] = (_AxisType.Auto,) * len(AXES)
    return jax.make_mesh(shape, AXES, **kwargs)


def single_device_mesh(device: jax.Device | None = None) -> Mesh:
    """A `(1, 1, 1)` mesh on one device (default the first)."""
    return make_mesh(1, 1, devices=[device or jax.devices()[0]])


def parse_mesh_spec(spec: Any, *, name: str = "mesh") -> MeshSpec:
    """A mesh spec in canonical form: every axis of `AXES` with its size, in that order.

    Args:
      spec: `"data:2,fsdp:2,expert:2"` (axes in any order; left out: 1), a mapping
        `{"fsdp": 8}`, or `(axis, size)` pairs.
      name: the argument's name in error messages (e.g. "--mesh").

    Raises:
      ValueError / ArgumentTypeError: an unknown or repeated axis, a size that is not an
        integer >= 1, or a malformed string (each naming `name`).
    """
    if isinstance(spec, str):
        pairs = []
        for part in filter(None, (p.strip() for p in spec.split(","))):
            axis, sep, size = part.partition(":")
            if not sep or not size.strip().lstrip("-").isdigit():
                raise ValueError(f"{name}: {part!r} is not AXIS:SIZE (e.g. "
                                 f"'data:2,fsdp:2,expert:2'), in {spec!r}")
            pairs.append((axis.strip(), int(size)))
    elif isinstance(spec, Mapping):
        pairs = list(spec.items())
    elif isinstance(spec, Sequence) and all(
            isinstance(p, Sequence) and not isinstance(p, str) and len(p) == 2 for p in spec):
        pairs = [tuple(p) for p in spec]
    else:
        raise ArgumentTypeError(f"{name} must be a string like 'data:2,fsdp:2,expert:2', a "
                                f"mapping or (axis, size) pairs, got {spec!r}")
    if not pairs:
        raise ValueError(f"{name} is empty; give e.g. 'data:8'")
    sizes: dict[str, int] = {}
    for axis, size in pairs:
        if axis not in AXES:
            raise ValueError(f"{name}: unknown mesh axis {axis!r}; the axes are "
                             f"{', '.join(AXES)}")
        if axis in sizes:
            raise ValueError(f"{name}: axis {axis!r} is given twice")
        check_int(f"{name}: the size of {axis!r}", size, lo=1)
        sizes[axis] = int(size)
    return tuple((axis, sizes.get(axis, 1)) for axis in AXES)


def format_mesh_spec(spec: Any) -> str:
    """`"data:2,fsdp:2,expert:2"` for a mesh spec (any form `parse_mesh_spec` reads) or a
    `Mesh` (its `AXES` sizes; missing ones are 1)."""
    if isinstance(spec, Mesh):
        spec = {a: int(spec.shape[a]) for a in AXES if a in spec.shape}
    return ",".join(f"{a}:{n}" for a, n in parse_mesh_spec(spec))


def mesh_from_spec(spec: Any, *, devices: Sequence[jax.Device] | None = None,
                   name: str = "mesh") -> Mesh:
    """The mesh a spec describes, over all `devices` (default every process's devices).

    Raises:
      ValueError: the spec is malformed, or the product of its sizes is not the device count
        (the message names `name` and the count).
    """
    sizes = dict(parse_mesh_spec(spec, name=name))
    devices = list(jax.devices() if devices is None else devices)
    product = sizes[DATA] * sizes[FSDP] * sizes[EXPERT]
    if product != len(devices):
        raise ValueError(
            f"{name}={format_mesh_spec(sizes)} has {product} devices (the product of its sizes) "
            f"but there are {len(devices)} ({jax.process_count()} process(es)); the sizes "
            f"must multiply to {len(devices)}, e.g. data:{len(devices)}")
    return make_mesh(sizes[DATA], sizes[EXPERT], fsdp=sizes[FSDP], devices=devices)


def axis_size(mesh: Mesh, axis: str) -> int:
    """The size of `axis` in `mesh`, 1 if the mesh does not have it."""
    return int(mesh.shape[axis]) if axis in mesh.shape else 1


def batch_axes(mesh: Mesh) -> tuple[str, ...]:
    """The `BATCH_AXES` `mesh` has (batch rows split over them)."""
    return tuple(a for a in BATCH_AXES if a in mesh.shape)


def num_batch_shards(mesh: Mesh) -> int:
    """D·F: how many parts a batch's rows are split into."""
    n = 1
    for axis in batch_axes(mesh):
        n *= axis_size(mesh, axis)
    return n


def check_mesh(mesh: Mesh, axes: Sequence[str] = (DATA, EXPERT)) -> None:
    """Raises ValueError unless every name in `axes` is an axis of `mesh` (naming what it has)."""
    if not isinstance(mesh, Mesh):
        raise ValueError(f"mesh must be a jax.sharding.Mesh, got {type(mesh).__name__}")
    missing = [a for a in axes if a not in mesh.shape]
    if missing:
        raise ValueError(f"mesh is missing axis {missing[0]!r}: needs axes {tuple(axes)}, mesh "
                         f"has {dict(mesh.shape)}")
