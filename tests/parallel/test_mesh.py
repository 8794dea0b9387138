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
