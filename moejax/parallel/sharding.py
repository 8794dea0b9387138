"""Placing params, optimizer state and batches on a `('data', 'fsdp', 'expert')` mesh, and
restoring them onto another one. The one place of the sharding rules (DESIGN §5).

Axis letters: B batch, E experts, D / F / X sizes of the `'data'` / `'fsdp'` / `'expert'` axes.

Parameter rule (`param_spec`, a pure function of a leaf's path, shape and the mesh's sizes):

* an expert bank (any leaf below a dict key `"experts"`, `[E, ...]`) is sharded over `'expert'`
  on its leading axis, and its largest other dim divisible by F over `'fsdp'`;
* every other matrix (ndim >= 2) of at least `FSDP_MIN_SIZE` elements has its largest dim
  divisible by F sharded over `'fsdp'` (ZeRO-3: XLA gathers it where it is used and
  reduce-scatters its gradient);
* vectors, scalars and small matrices are replicated, as are the model state (router state)
  and the step hooks' state (`moejax.train.steps.state_shardings`).

The optimizer state follows its parameter: its moments have the parameter's path below the
optimizer's own keys and its shape, so the same rule gives them the same spec (scalars, e.g. the
step count and the injected learning rate, are replicated).

Activations: a batch's rows are split over `('data', 'fsdp')` (`batch_spec`; replicated over
`'expert'`), MoE tokens over all three axes (`TOKENS`, `moejax.parallel.ExpertParallel`).

Checkpoints: orbax stores each array with its global shape, so a state saved from one mesh
restores onto any other (or one device) by asking for the target shardings (`restore_params`,
`moejax.train.loop`).

Example:
  >>> mesh = mesh_lib.make_mesh(data=2, expert=4)
  >>> params = shard_params(params, mesh)          # experts over 'expert', rest replicated
  >>> x = shard_batch(x, mesh)                     # [B, ...] rows over every axis
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Mapping
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from moejax.parallel import mesh as mesh_lib

Array = jax.Array
Rule = Callable[[tuple, Any], P]

TOKENS = P(mesh_lib.AXES)  # MoE tokens: leading axis over ('data', 'fsdp', 'expert')
FSDP_MIN_SIZE = 1024  # elements; smaller matrices stay replicated (not worth a gather)


def _largest_divisible_dim(shape: tuple[int, ...], size: int, skip: int | None) -> int | None:
    """The largest dim of `shape` (other than `skip`) divisible by `size`; ties: the first."""
    best = None
    for dim, n in enumerate(shape):
        if dim != skip and n % size == 0 and (best is None or n > shape[best]):
            best = dim
    return best


def param_spec(path: tuple, leaf: Any, mesh_shape: Mapping[str, int] | None = None, *,
               expert_axis: str = mesh_lib.EXPERT, fsdp_axis: str = mesh_lib.FSDP,
               min_fsdp_size: int = FSDP_MIN_SIZE) -> P:
    """The default rule (see the module docstring) for one leaf.

    Args:
      path: the leaf's key path (`jax.tree_util.tree_map_with_path`).
      leaf: an array or `ShapeDtypeStruct`.
      mesh_shape: the mesh's axis sizes; None (or no `fsdp_axis` in it): no FSDP, i.e. expert
        banks over `expert_axis` and everything else replicated. A mesh without
        `expert_axis` replicates the banks.
      expert_axis, fsdp_axis: the axis names.
      min_fsdp_size: matrices with fewer elements are not split over `fsdp_axis`.
    """
    shape = tuple(getattr(leaf, "shape", ()))
    keys = [getattr(k, "key", None) for k in path]
    fsdp = int((mesh_shape or {}).get(fsdp_axis, 1))
    spec: list[Any] = [None] * len(shape)
    expert_dim = None
    has_expert = mesh_shape is None or expert_axis in mesh_shape
    if "experts" in keys and len(shape) >= 1 and has_expert:
        spec[0], expert_dim = expert_axis, 0
    if fsdp > 1 and len(shape) >= 2 and math.prod(shape) >= min_fsdp_size:
        dim = _largest_divisible_dim(shape, fsdp, expert_dim)
        if dim is not None:
            spec[dim] = fsdp_axis
    while spec and spec[-1] is None:
        spec.pop()
    return P(*spec)


def mesh_rule(mesh: Mesh) -> Rule:
    """`param_spec` for `mesh`'s sizes, as a `(path, leaf) -> PartitionSpec` rule."""
    return functools.partial(param_spec, mesh_shape={a: int(n) for a, n in mesh.shape.items()})


def param_shardings(params: Any, mesh: Mesh, *, rule: Rule | None = None) -> Any:
    """`NamedSharding`s for `params` (arrays or `ShapeDtypeStruct`s) by `rule(path, leaf)`
    (default `mesh_rule(mesh)`).

    Raises:
      ValueError: if a sharded leading axis is not divisible by its mesh axis (names both).
    """
    mesh_lib.check_mesh(mesh, (mesh_lib.DATA,))
    rule = mesh_rule(mesh) if rule is None else rule

    def one(path, leaf):
        spec = rule(path, leaf)
        for dim, names in enumerate(spec):
            names = (names,) if isinstance(names, str) else (names or ())
            size = 1
            for name in names:
                size *= mesh.shape[name]
            if leaf.shape[dim] % size:
                raise ValueError(f"param {jax.tree_util.keystr(path)} has {leaf.shape[dim]} "
                                 f"rows on axis {dim}, not divisible by mesh axes {names} of "
                                 f"size {size}")
        return NamedSharding(mesh, spec)

    return jax.tree_util.tree_map_with_path(one, params)


def shard_params(params: Any, mesh: Mesh, *, rule: Rule | None = None) -> Any:
    """`jax.device_put`s `params` onto `mesh` by `rule` (default `mesh_rule(mesh)`)."""
    return jax.device_put(params, param_shardings(params, mesh, rule=rule))


def replicate(tree: Any, mesh: Mesh) -> Any:
    """Places every leaf of `tree` (e.g. router state) fully replicated on `mesh`."""
    return jax.device_put(tree, NamedSharding(mesh, P()))


def token_axes(mesh: Mesh) -> tuple[str, ...]:
    """The axes of `AXES` that `mesh` has: MoE tokens are split over all of them."""
    return tuple(a for a in mesh_lib.AXES if a in mesh.shape)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """MoE tokens: the leading axis over every mesh axis (`token_axes`), the others whole."""
    mesh_lib.check_mesh(mesh)
    return NamedSharding(mesh, P(token_axes(mesh)))


def shard_batch(batch: Any, mesh: Mesh) -> Any:
    """`jax.device_put`s every leaf `[N, ...]` with N split over every mesh axis (MoE tokens).

    Raises:
      ValueError: if N is not divisible by the product of the axes (naming them).
    """
    sharding = batch_sharding(mesh)
    axes = token_axes(mesh)
    sizes = [mesh_lib.axis_size(mesh, a) for a in axes]
    total = math.prod(sizes)
    for leaf in jax.tree.leaves(batch):
        if leaf.ndim < 1 or leaf.shape[0] % total:
            raise ValueError(f"batch of shape {leaf.shape}: the leading axis must be divisible "
                             f"by {'×'.join(axes)} = {'×'.join(map(str, sizes))} = {total}")
    return jax.device_put(batch, sharding)


def batch_spec(mesh: Mesh) -> P:
    """A model batch's spec: rows over the `('data', 'fsdp')` axes `mesh` has."""
    return P(mesh_lib.batch_axes(mesh))


def batch_shard(sharding: NamedSharding, rows: int) -> tuple[int, int]:
    """Which share of a `rows`-row batch with `sharding` this process holds: `(index, count)`,
    rows `[index·rows/count, (index+1)·rows/count)` (what it must read of the data: e.g.
    `grain.sharding.ShardOptions(index, count)` for `moejax.data.iterator`). `(0, 1)` with one
    process, and wherever the batch is replicated over the processes (a mesh whose batch axes
    do not span them).

    Raises:
      ValueError: `rows` does not split over the batch axes, or this process's devices hold a
        block of rows that is not contiguous or does not tile the batch (a mesh whose device
        order mixes processes along the batch axes).
    """
    spec = tuple(sharding.spec)
    axes = spec[0] if spec else None
    axes = () if axes is None else ((axes,) if isinstance(axes, str) else tuple(axes))
    parts = math.prod(int(sharding.mesh.shape[a]) for a in axes)
    if rows % parts:
        raise ValueError(f"batch_size={rows} is not divisible by the batch axes "
                         f"{'×'.join(axes)} = {parts} of the mesh")
    blocks = sorted({(s[0].start or 0, rows if s[0].stop is None else s[0].stop)
                     for s in sharding.addressable_devices_indices_map((rows,)).values()})
    start, stop = blocks[0][0], blocks[-1][1]
    contiguous = all(a[1] == b[0] for a, b in zip(blocks, blocks[1:], strict=False))
    if not contiguous or rows % (stop - start) or start % (stop - start):
        raise ValueError(f"this process's devices hold rows {blocks} of a batch of {rows}: not "
                         "one contiguous block; order the mesh's devices by process")
    return start // (stop - start), rows // (stop - start)


def bytes_per_device(tree: Any) -> int:
    """The most bytes any one device holds of `tree` (arrays or `ShapeDtypeStruct`s with
    shardings): the sum over leaves of the shard's size (NamedShardings split evenly)."""
    per_device: dict[Any, int] = {}
    for leaf in jax.tree.leaves(tree):
        sharding = getattr(leaf, "sharding", None)
        itemsize = np.dtype(leaf.dtype).itemsize
        if sharding is None:
            per_device[None] = per_device.get(None, 0) + math.prod(leaf.shape) * itemsize
            continue
        nbytes = math.prod(sharding.shard_shape(tuple(leaf.shape))) * itemsize
        for device in sharding.device_set:
            per_device[device] = per_device.get(device, 0) + nbytes
    return max(per_device.values(), default=0)


def restore_params(directory, like: Any, mesh: Mesh, *, rule: Rule | None = None) -> Any:
    """Restores an orbax `StandardCheckpointer` checkpoint of params onto `mesh`.

    Args:
      directory: checkpoint path written by `ocp.StandardCheckpointer().save(directory, params)`
        (from any mesh, or one device).
      like: params or `ShapeDtypeStruct`s with the saved global shapes and dtypes.
      mesh: target mesh; each leaf is restored directly into its `rule` sharding.

    Returns:
      params placed as `shard_params(params, mesh, rule=rule)` would place them.
    """
    import orbax.checkpoint as ocp  # noqa: PLC0415 - optional dependency, only for checkpoints

    shardings = param_shardings(like, mesh, rule=rule)
    abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                            like, shardings)
    with ocp.StandardCheckpointer() as ckptr:
        return ckptr.restore(directory, abstract)
