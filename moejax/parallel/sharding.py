"""Placing params and batches on a `('data', 'expert')` mesh, and restoring them onto another one.

Axis letters: B batch, E experts, D / X sizes of the `'data'` / `'expert'` axes.

Rules (DESIGN §5): an expert bank (any leaf below a dict key `"experts"`, `[E, ...]`) is sharded
over `'expert'` on its leading axis and replicated over `'data'`; every other param (router,
shared experts, the rest of a model) is replicated. A batch is sharded on its leading axis over
both axes, `P(('data', 'expert'))`, so each device holds B/(D·X) rows.

Checkpoints: orbax stores each array with its global shape, so params saved from one mesh restore
onto any other (or one device) by asking for the target shardings (`restore_params`).

Example:
  >>> mesh = mesh_lib.make_mesh(data=2, expert=4)
  >>> params = shard_params(params, mesh)          # experts over 'expert', rest replicated
  >>> x = shard_batch(x, mesh)                     # [B, ...] rows over ('data', 'expert')
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from moejax.parallel import mesh as mesh_lib

Array = jax.Array
Rule = Callable[[tuple, Any], P]

TOKENS = P(mesh_lib.AXES)  # leading axis over ('data', 'expert')


def param_spec(path: tuple, leaf: Any, *, expert_axis: str = mesh_lib.EXPERT) -> P:
    """Default rule: `P(expert_axis)` for leaves below a key `"experts"`, else replicated `P()`."""
    keys = [getattr(k, "key", None) for k in path]
    if "experts" in keys and getattr(leaf, "ndim", 0) >= 1:
        return P(expert_axis)
    return P()


def param_shardings(params: Any, mesh: Mesh, *, rule: Rule = param_spec) -> Any:
    """`NamedSharding`s for `params` (arrays or `ShapeDtypeStruct`s) by `rule(path, leaf)`.

    Raises:
      ValueError: if a sharded leading axis is not divisible by its mesh axis (names both).
    """
    mesh_lib.check_mesh(mesh)

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


def shard_params(params: Any, mesh: Mesh, *, rule: Rule = param_spec) -> Any:
    """`jax.device_put`s `params` onto `mesh` by `rule` (expert banks over `'expert'`)."""
    return jax.device_put(params, param_shardings(params, mesh, rule=rule))


def replicate(tree: Any, mesh: Mesh) -> Any:
    """Places every leaf of `tree` (e.g. router state) fully replicated on `mesh`."""
    return jax.device_put(tree, NamedSharding(mesh, P()))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) axis over `('data', 'expert')`, the other axes whole."""
    mesh_lib.check_mesh(mesh)
    return NamedSharding(mesh, TOKENS)


def shard_batch(batch: Any, mesh: Mesh) -> Any:
    """`jax.device_put`s every leaf `[B, ...]` with B split over `('data', 'expert')`.

    Raises:
      ValueError: if B is not divisible by D·X (the message names B, D and X).
    """
    sharding = batch_sharding(mesh)
    d, x = mesh.shape[mesh_lib.DATA], mesh.shape[mesh_lib.EXPERT]
    for leaf in jax.tree.leaves(batch):
        if leaf.ndim < 1 or leaf.shape[0] % (d * x):
            raise ValueError(f"batch of shape {leaf.shape}: the leading axis must be divisible "
                             f"by data×expert = {d}×{x} = {d * x}")
    return jax.device_put(batch, sharding)


def restore_params(directory, like: Any, mesh: Mesh, *, rule: Rule = param_spec) -> Any:
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
