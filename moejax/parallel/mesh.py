"""The `('data', 'expert')` device mesh of expert parallelism (DESIGN §5), and `shard_map` compat.

Axis letters: D size of the `'data'` axis, X size of the `'expert'` axis, D·X devices.

Tokens are sharded over both axes (each device holds N/(D·X) of them); expert banks are sharded
over `'expert'` (each device holds E/X experts) and replicated over `'data'`. A `(1, 1)` mesh on
one device runs the same code as the single-device layer.

Axis types: both axes are `AxisType.Auto`. The router, the losses and the load metrics run as
ordinary `jnp` code on global arrays, and XLA's SPMD partitioner shards them along the tokens and
turns their means over N into all-reduces; with `Explicit` axes every such op (reshape, top-k
over tokens, reductions) would need its own `out_sharding`. The token exchange is written by hand
inside `shard_map`, where both axes are `Manual` anyway.

Example:
  >>> mesh = make_mesh(data=2, expert=4)      # needs 8 devices
  >>> dict(mesh.shape)
  {'data': 2, 'expert': 4}
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
from jax.sharding import Mesh

from moejax.validation import check_int

DATA: str = "data"
EXPERT: str = "expert"
AXES: tuple[str, str] = (DATA, EXPERT)

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


def make_mesh(data: int | None = None, expert: int = 1, *,
              devices: Sequence[jax.Device] | None = None) -> Mesh:
    """Builds a `('data', 'expert')` mesh of `data·expert` devices with `Auto` axes.

    Args:
      data: D; default: all given devices divided by `expert`.
      expert: X, devices that share one copy of the expert bank (each holds E/X experts).
      devices: devices to use (default `jax.devices()`); the first D·X are taken.

    Returns:
      `jax.sharding.Mesh` with axis names `('data', 'expert')`.

    Raises:
      ValueError: if the sizes are not positive or there are not enough devices.
    """
    devices = list(jax.devices() if devices is None else devices)
    check_int("expert", expert, lo=1)
    if data is None:
        if len(devices) % expert:
            raise ValueError(f"{len(devices)} devices are not divisible by expert={expert}")
        data = len(devices) // expert
    check_int("data", data, lo=1)
    data, expert = int(data), int(expert)
    if data * expert > len(devices):
        raise ValueError(f"a (data={data}, expert={expert}) mesh needs {data * expert} devices, "
                         f"only {len(devices)} available")
    kwargs = {"devices": devices[:data * expert]}
    if _AxisType is not None:
        kwargs["axis_types"] = (_AxisType.Auto, _AxisType.Auto)
    return jax.make_mesh((data, expert), AXES, **kwargs)


def single_device_mesh(device: jax.Device | None = None) -> Mesh:
    """A `(1, 1)` `('data', 'expert')` mesh on one device (default the first)."""
    return make_mesh(1, 1, devices=[device or jax.devices()[0]])


def check_mesh(mesh: Mesh, axes: Sequence[str] = AXES) -> None:
    """Raises ValueError unless every name in `axes` is an axis of `mesh` (naming what it has)."""
    if not isinstance(mesh, Mesh):
        raise ValueError(f"mesh must be a jax.sharding.Mesh, got {type(mesh).__name__}")
    missing = [a for a in axes if a not in mesh.shape]
    if missing:
        raise ValueError(f"mesh is missing axis {missing[0]!r}: needs axes {tuple(axes)}, mesh "
                         f"has {dict(mesh.shape)}")
