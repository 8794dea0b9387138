"""The LM trained by the library loop on a `('data', 'fsdp', 'expert')` mesh of 8 simulated CPU
devices computes what it computes on one device: dense and MoE (topk, STAR, aux-loss-free, top-p
routers; expert-parallel over `'expert'`), params and optimizer state placed by the sharding rule,
and the bytes they take per device under FSDP."""

from __future__ import annotations

import functools

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from moejax import parallel
from moejax.models import lm
from moejax.parallel import mesh as mesh_lib
from moejax.parallel import sharding as sharding_lib
from moejax.train import loop

STEPS, B, T, V = 10, 8, 16, 64


def _cfg(ffn="moe", router="topk", **moe):
    return lm.LMConfig(vocab_size=V, d_model=32, num_layers=1, num_heads=2, head_dim=16, d_ff=64,
                       mixer="softmax", chunk_size=8, max_seq_len=T, ffn=ffn,
                       moe=dict(num_experts=4, top_k=2, router=router, **moe))


def _tcfg(**kw):
    return loop.TrainConfig(**{**dict(steps=STEPS, lr=3e-3, warmup_steps=2, batch_size=B,
                                      seq_len=T, log_every=1, eval_every=0, eval_batches=1),
                               **kw})


@functools.cache
def _batches():
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, V, size=(STEPS, B, T + 1)).astype(np.int32)
    return [{"inputs": t[:, :-1], "targets": t[:, 1:]} for t in tokens]


def _losses(cfg, mesh):
    tcfg = _tcfg()
    state = loop.init_state(lm, cfg, tcfg, jax.random.key(0), mesh=mesh)
    fit = loop.fit(state, _batches(), model=lm, model_cfg=cfg, train_cfg=tcfg,
                   rng=jax.random.key(1), mesh=mesh)
    return np.asarray([r["loss"] for r in fit.records]), fit.state


CASES = {
    "dense": _cfg(ffn="dense"),
    "topk": _cfg(),
    "star": _cfg(router="star"),
    "aux_free": _cfg(router="aux_free"),
    "top_p": _cfg(router="top_p"),
}
# Every router under EP on a (2, 2, 2) mesh is compared layer by layer in
# test_expert_parallel; here the whole LM through the loop (about 20 s a case on a CPU).
FAST = ("dense", "topk")


@pytest.mark.parametrize("name", [n if n in FAST else pytest.param(n, marks=pytest.mark.slow)
                                  for n in CASES])
def test_mesh_2x2x2_trains_like_one_device(name):
    cfg = CASES[name]
    mesh = parallel.make_mesh(2, 2, fsdp=2)
    want, _ = _losses(cfg, parallel.single_device_mesh())
    got, state = _losses(cfg, mesh)
    assert len(got) == STEPS
    np.testing.assert_allclose(got, want, rtol=1e-4)
    # The state stayed where the rule puts it: expert banks over 'expert' (and 'fsdp').
    if cfg.ffns[0] == "moe":
        w_up = state.params["blocks"][0]["ffn"]["experts"]["w_up"]
        assert w_up.sharding.spec[0] == "expert" and "fsdp" in w_up.sharding.spec
        moments = [leaf for path, leaf in jax.tree_util.tree_flatten_with_path(state.opt_state)[0]
                   if jax.tree_util.keystr(path).endswith("[0]['ffn']['experts']['w_up']")]
        assert len(moments) == 2  # Adam's mu and nu, placed as their parameter
        assert all(m.sharding.spec == w_up.sharding.spec for m in moments)


def test_lm_place_runs_moe_expert_parallel_only_on_an_expert_axis():
    cfg = CASES["topk"]
    assert lm.place(cfg, parallel.make_mesh(4, 1, fsdp=2)) is cfg  # expert = 1: unchanged
    placed = lm.place(cfg, parallel.make_mesh(2, 4))
    assert placed.moe.parallel.token_axes == ("data", "fsdp", "expert")
    assert lm.place(CASES["dense"], parallel.make_mesh(2, 4)) is CASES["dense"]
    with pytest.raises(ValueError, match=r"num_experts=4 is not divisible by the 'expert' mesh "
                                         r"axis of size 8"):
        lm.place(cfg, parallel.make_mesh(1, 8))


def test_fsdp_8_holds_an_eighth_of_params_and_optimizer_state():
    cfg = _cfg().replace(d_model=64, d_ff=128)
    tcfg = _tcfg()
    sizes = {}
    for spec in ("data:8", "fsdp:8"):
        state = loop.init_state(lm, cfg, tcfg, jax.random.key(0),
                                mesh=mesh_lib.mesh_from_spec(spec))
        held = {"params": state.params, "opt_state": state.opt_state}
        sizes[spec] = sharding_lib.bytes_per_device(held)
    total = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(held))
    assert sizes["data:8"] == total  # replicated
    assert sizes["fsdp:8"] <= total / 8 * 1.10, (sizes, total)


def test_param_rule_fsdp_and_experts():
    shape = lambda *s: jax.ShapeDtypeStruct(s, np.float32)
    key = jax.tree_util.DictKey
    spec = functools.partial(sharding_lib.param_spec,
                             mesh_shape={"data": 1, "fsdp": 4, "expert": 2})
    assert spec((key("experts"), key("w_up")), shape(8, 32, 64)) == P("expert", None, "fsdp")
    assert spec((key("experts"), key("w_down")), shape(8, 64, 32)) == P("expert", "fsdp")
    assert spec((key("embed"),), shape(256, 64)) == P("fsdp")
    assert spec((key("w"),), shape(64, 256)) == P(None, "fsdp")
    assert spec((key("w"),), shape(300, 6)) == P("fsdp")  # the largest dim that divides
    assert spec((key("w"),), shape(6, 300)) == P(None, "fsdp")
    assert spec((key("norm"),), shape(4096)) == P()  # vectors stay replicated
    assert spec((key("w_g"),), shape(4, 32)) == P()  # small matrices too
    assert spec((key("w"),), shape(7, 333)) == P()  # no dim divides
