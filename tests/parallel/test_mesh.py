"""Mesh and placement helpers, bad input, and checkpoints restored onto another mesh shape."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from jax.sharding import PartitionSpec as P

from moejax import parallel
from moejax.moe.layer import MoEConfig, init, moe_apply

D, F, E = 8, 16, 8


def test_make_mesh_shapes():
    assert len(jax.devices()) == 8
    mesh = parallel.make_mesh(2, 4)
    assert mesh.axis_names == ("data", "fsdp", "expert")
    assert dict(mesh.shape) == {"data": 2, "fsdp": 1, "expert": 4}
    assert dict(parallel.make_mesh(expert=2).shape) == {"data": 4, "fsdp": 1, "expert": 2}
    assert dict(parallel.make_mesh(fsdp=2, expert=2).shape) == {"data": 2, "fsdp": 2,
                                                                 "expert": 2}
    assert dict(parallel.single_device_mesh().shape) == {"data": 1, "fsdp": 1, "expert": 1}
    if hasattr(jax.sharding, "AxisType"):
        assert all(t == jax.sharding.AxisType.Auto for t in mesh.axis_types)


def test_placement():
    mesh = parallel.make_mesh(2, 4)
    cfg = MoEConfig(d_model=D, d_ff=F, num_experts=E, num_shared=1)
    params, _ = init(jax.random.key(0), cfg)
    placed = parallel.shard_params(params, mesh)
    assert placed["experts"]["w_down"].sharding.spec == P("expert")
    assert placed["experts"]["w_down"].addressable_shards[0].data.shape == (2, F, D)
    assert placed["router"]["w_g"].sharding.is_fully_replicated
    assert placed["shared"]["bank"]["w_up"].sharding.is_fully_replicated
    x = parallel.shard_batch(jnp.ones((16, 3, D)), mesh)
    assert x.sharding.spec == P(("data", "fsdp", "expert"))
    assert x.addressable_shards[0].data.shape[0] == 2


def test_bad_input():
    mesh = parallel.make_mesh(2, 4)
    ep = parallel.ExpertParallel(mesh=mesh)
    with pytest.raises(ValueError, match=r"num_experts=6 .* 'expert' mesh axis of size 4"):
        MoEConfig(d_model=D, d_ff=F, num_experts=6, parallel=ep)
    cfg = MoEConfig(d_model=D, d_ff=F, num_experts=E, parallel=ep)
    params, state = init(jax.random.key(0), dataclasses.replace(cfg, parallel=None))
    with pytest.raises(ValueError, match=r"N=12 tokens .* data×fsdp×expert = 2×1×4 = 8"):
        moe_apply(params, state, jnp.ones((3, 4, D)), cfg=cfg, train=False)
    with pytest.raises(ValueError, match=r"missing axis 'expert'.*\{'data': 8\}"):
        parallel.ExpertParallel(mesh=jax.make_mesh((8,), ("data",)))
    with pytest.raises(ValueError, match=r"leading axis must be divisible by data×fsdp×expert"):
        parallel.shard_batch(jnp.ones((6, D)), mesh)
    with pytest.raises(ValueError, match=r"needs 16 devices, only 8"):
        parallel.make_mesh(4, 4)
    with pytest.raises(ValueError, match=r"6 rows on axis 0, not divisible .* size 4"):
        parallel.param_shardings({"experts": {"w_up": jnp.ones((6, 2))}}, mesh)


@pytest.mark.parametrize("target", [(4, 2), (1, 1)], ids=str)
def test_checkpoint_restores_onto_another_mesh(tmp_path, target):
    cfg = MoEConfig(d_model=D, d_ff=F, num_experts=E)
    params, _ = init(jax.random.key(0), cfg)
    saved = parallel.shard_params(params, parallel.make_mesh(2, 4))
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(tmp_path / "ckpt", saved)
        ckptr.wait_until_finished()
    mesh = parallel.make_mesh(*target) if target != (1, 1) else parallel.single_device_mesh()
    like = jax.eval_shape(lambda: params)
    restored = parallel.restore_params(tmp_path / "ckpt", like, mesh)
    jax.tree.map(np.testing.assert_array_equal, params, restored)
    w = restored["experts"]["w_up"]
    assert w.sharding.mesh.shape == mesh.shape and w.sharding.spec == P("expert")
    assert w.addressable_shards[0].data.shape[0] == E // target[1]
    assert len(w.sharding.device_set) == target[0] * target[1]


# ------------------------------------------------------------------------ mesh specs


@pytest.mark.parametrize(("spec", "want"), [
    ("data:2,fsdp:2,expert:2", (("data", 2), ("fsdp", 2), ("expert", 2))),
    ("expert:4, data:2", (("data", 2), ("fsdp", 1), ("expert", 4))),  # any order, spaces
    ({"fsdp": 8}, (("data", 1), ("fsdp", 8), ("expert", 1))),
    ([("data", 8)], (("data", 8), ("fsdp", 1), ("expert", 1))),
])
def test_parse_mesh_spec(spec, want):
    assert parallel.mesh.parse_mesh_spec(spec) == want
    assert parallel.mesh.format_mesh_spec(spec) == ",".join(f"{a}:{n}" for a, n in want)


@pytest.mark.parametrize(("spec", "match"), [
    ("data:2,tensor:4", "--mesh: unknown mesh axis 'tensor'; the axes are data, fsdp, expert"),
    ("data:2,data:4", "axis 'data' is given twice"),
    ("data=2", r"'data=2' is not AXIS:SIZE"),
    ("data:x", "is not AXIS:SIZE"),
    ("data:0", r"--mesh: the size of 'data' must be >= 1, got 0"),
    ("", "--mesh is empty"),
    (8, "must be a string like 'data:2,fsdp:2,expert:2'"),
])
def test_bad_mesh_specs_name_the_flag(spec, match):
    with pytest.raises(ValueError, match=match):
        parallel.mesh.parse_mesh_spec(spec, name="--mesh")


def test_mesh_from_spec_uses_every_device():
    mesh = parallel.mesh.mesh_from_spec("data:2,fsdp:2,expert:2")
    assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "expert": 2}
    assert mesh.devices.size == 8
    with pytest.raises(ValueError, match=r"--mesh=data:2,fsdp:1,expert:2 has 4 devices \(the "
                                         r"product of its sizes\) but there are 8"):
        parallel.mesh.mesh_from_spec("data:2,expert:2", name="--mesh")
    one = parallel.mesh.mesh_from_spec("data:1", devices=jax.devices()[:1])
    assert parallel.mesh.format_mesh_spec(one) == "data:1,fsdp:1,expert:1"


def test_batch_shard_of_one_process():
    from moejax.parallel import sharding

    mesh = parallel.make_mesh(2, 2, fsdp=2)
    batch = jax.sharding.NamedSharding(mesh, sharding.batch_spec(mesh))
    assert sharding.batch_spec(mesh) == P(("data", "fsdp"))
    assert sharding.batch_shard(batch, 8) == (0, 1)  # one process holds every row
    with pytest.raises(ValueError, match=r"batch_size=6 is not divisible by the batch axes "
                                         r"data×fsdp = 4"):
        sharding.batch_shard(batch, 6)
    # Bytes per device: a bank split over 'expert' (and 'fsdp') holds 1/4 on each device.
    bank = jax.device_put(jnp.ones((8, 64, 32)), jax.sharding.NamedSharding(
        mesh, P("expert", "fsdp")))
    # ... and the vector, on device 0 only, adds its 40 bytes there.
    assert sharding.bytes_per_device({"w": bank, "b": jnp.ones(10)}) == 8 * 64 * 32 * 4 // 4 + 40
