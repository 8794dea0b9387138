"""`moejax.parallel.sharding` on 8 simulated CPU devices (tests/conftest.py): the default param
rule, custom rules, which rows each device holds, replication, batch placement, and bad input."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from moejax.parallel import mesh as mesh_lib
from moejax.parallel import sharding

E, D, F = 8, 3, 4


def _params():
    rng = np.random.default_rng(0)
    arr = lambda *shape: jnp.asarray(rng.normal(size=shape), jnp.float32)
    return {
        "experts": {"w_up": arr(E, D, F), "w_down": arr(E, F, D), "step": jnp.int32(3)},
        "router": {"w_g": arr(D, E)},
        "blocks": [{"moe": {"experts": {"w_up": arr(E, D, F)}}, "norm": arr(D)}],
        "embed": arr(16, D),
    }


def _coords(mesh):
    """Device -> its (data, fsdp, expert) coordinates in `mesh`."""
    return {dev: idx for idx, dev in np.ndenumerate(mesh.devices)}


def test_param_spec_rule():
    specs = jax.tree_util.tree_map_with_path(sharding.param_spec, _params())
    assert specs["experts"]["w_up"] == specs["experts"]["w_down"] == P("expert")
    assert specs["blocks"][0]["moe"]["experts"]["w_up"] == P("expert")  # any depth
    assert specs["experts"]["step"] == P()  # a scalar below "experts" cannot shard
    assert specs["router"]["w_g"] == specs["embed"] == specs["blocks"][0]["norm"] == P()
    other = sharding.param_spec((jax.tree_util.DictKey("experts"),), jnp.ones(4),
                                expert_axis="ep")
    assert other == P("ep")


def test_param_shardings_on_shapes_without_arrays():
    mesh = mesh_lib.make_mesh(2, 4)
    shapes = jax.eval_shape(_params)
    got = sharding.param_shardings(shapes, mesh)
    assert all(isinstance(s, NamedSharding) and s.mesh == mesh for s in jax.tree.leaves(got))
    assert got["experts"]["w_up"].spec == P("expert") and got["embed"].spec == P()
    # Each device's block of a bank: E/X experts, whole on the other axes.
    assert got["experts"]["w_up"].shard_shape((E, D, F)) == (E // 4, D, F)


def test_shard_params_places_expert_rows_by_expert_coordinate():
    mesh = mesh_lib.make_mesh(2, 4)
    params = _params()
    placed = sharding.shard_params(params, mesh)
    chex.assert_trees_all_equal(placed, params)  # values unchanged
    coords = _coords(mesh)
    bank = placed["experts"]["w_up"]
    assert len(bank.addressable_shards) == 8
    for shard in bank.addressable_shards:
        _, _, j = coords[shard.device]
        rows = slice(j * E // 4, (j + 1) * E // 4)
        np.testing.assert_array_equal(np.asarray(shard.data),
                                      np.asarray(params["experts"]["w_up"][rows]))
    for shard in placed["router"]["w_g"].addressable_shards:  # replicated: whole on each device
        np.testing.assert_array_equal(np.asarray(shard.data), np.asarray(params["router"]["w_g"]))


def test_custom_rule_and_divisibility():
    mesh = mesh_lib.make_mesh(2, 4)
    params = {"embed": jnp.arange(16 * 6, dtype=jnp.float32).reshape(16, 6)}
    both = lambda path, leaf: P(("data", "expert"))  # leading axis over all 8 devices
    placed = sharding.shard_params(params, mesh, rule=both)
    assert placed["embed"].sharding.spec == P(("data", "expert"))
    assert {s.data.shape for s in placed["embed"].addressable_shards} == {(2, 6)}
    cols = lambda path, leaf: P(None, "data")
    by_cols = sharding.param_shardings(params, mesh, rule=cols)["embed"]
    assert by_cols.spec == P(None, "data") and by_cols.shard_shape((16, 6)) == (16, 3)
    with pytest.raises(ValueError, match=r"\['embed'\] has 6 rows on axis 1, .* size 4"):
        sharding.param_shardings(params, mesh, rule=lambda path, leaf: P(None, "expert"))
    with pytest.raises(ValueError, match=r"12 rows on axis 0, not divisible by mesh axes "
                                         r"\('data', 'expert'\) of size 8"):
        sharding.param_shardings({"embed": jnp.ones((12,))}, mesh, rule=both)


def test_replicate():
    mesh = mesh_lib.make_mesh(4, 2)
    state = {"bias": jnp.arange(E, dtype=jnp.float32), "count": jnp.int32(7)}
    placed = sharding.replicate(state, mesh)
    for leaf, ref in zip(jax.tree.leaves(placed), jax.tree.leaves(state), strict=True):
        assert leaf.sharding.is_fully_replicated and len(leaf.sharding.device_set) == 8
        for shard in leaf.addressable_shards:
            np.testing.assert_array_equal(np.asarray(shard.data), np.asarray(ref))


@pytest.mark.parametrize("shape", [(2, 4), (8, 1), (1, 8)], ids=str)
def test_shard_batch_rows_follow_the_mesh_row_major(shape):
    mesh = mesh_lib.make_mesh(*shape)
    assert sharding.batch_sharding(mesh) == NamedSharding(mesh, P(("data", "fsdp", "expert")))
    batch = {"inputs": jnp.arange(16 * 3).reshape(16, 3), "mask": jnp.arange(16) % 3 == 0}
    placed = sharding.shard_batch(batch, mesh)
    chex.assert_trees_all_equal(placed, batch)
    coords, x = _coords(mesh), shape[1]
    for leaf, ref in zip(jax.tree.leaves(placed), jax.tree.leaves(batch), strict=True):
        assert leaf.sharding.spec == P(("data", "fsdp", "expert"))
        for shard in leaf.addressable_shards:
            i, _, j = coords[shard.device]
            k = i * x + j  # device (i, j) holds the k-th block of B / 8 rows
            np.testing.assert_array_equal(np.asarray(shard.data),
                                          np.asarray(ref[2 * k : 2 * k + 2]))


def test_bad_input():
    mesh = mesh_lib.make_mesh(2, 4)
    with pytest.raises(ValueError, match=r"shape \(\): the leading axis must be divisible by "
                                         r"data×fsdp×expert = 2×1×4 = 8"):
        sharding.shard_batch({"x": jnp.ones((8, 2)), "step": jnp.int32(0)}, mesh)
    with pytest.raises(ValueError, match=r"shape \(12, 2\)"):
        sharding.shard_batch(jnp.ones((12, 2)), mesh)
    flat = jax.make_mesh((8,), ("data",))
    with pytest.raises(ValueError, match=r"missing axis 'expert'"):
        sharding.batch_sharding(flat)
    # A mesh without 'expert' (or 'fsdp') replicates what would be split over it.
    got = sharding.param_shardings({"experts": {"w": jnp.ones((8, 64, 64))}}, flat)
    assert got["experts"]["w"].spec == P()
    with pytest.raises(ValueError, match="mesh must be a jax.sharding.Mesh"):
        sharding.shard_params({"w": jnp.ones(2)}, "mesh")
