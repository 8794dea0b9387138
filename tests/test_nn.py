"""Tests for moejax.nn: the NNX wrappers equal the pure functions and keep state correctly."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from moejax.layers import delta_mixer as dm
from moejax.moe import layer as moe_layer
from moejax.nn import DeltaMixer, MoE, RouterState
from moejax.testing import RATIO_F32, assert_close

D, F, E = 8, 16, 4


def _moe(router="topk", **kw):
    cfg = moe_layer.MoEConfig(d_model=D, d_ff=F, num_experts=E, router=router, top_k=2, **kw)
    return cfg, MoE(cfg, rngs=nnx.Rngs(0))


def _x(shape=(2, 5, D), seed=1):
    return jax.random.normal(jax.random.key(seed), shape)


def _assert_trees_close(name, ref, got):
    assert jax.tree.structure(ref) == jax.tree.structure(got), name
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(ref), jax.tree.leaves(got),
                            strict=True):
        assert_close(f"{name}{jax.tree_util.keystr(path)}", a, b, ratio=RATIO_F32)


@pytest.mark.parametrize("router,train", [("topk", False), ("star", True), ("aux_free", True)])
def test_moe_equals_pure_function(router, train):
    cfg, moe = _moe(router)
    params, state = moe.as_pure()
    x = _x()
    y_ref, state_ref, aux_ref = moe_layer.moe_apply(params, state, x, cfg=cfg, train=train)
    y, aux = moe(x, train=train)
    assert_close("y", y_ref, y, ratio=RATIO_F32)
    assert_close("aux_loss", aux_ref["aux_loss"], aux["aux_loss"], ratio=RATIO_F32)
    _assert_trees_close("state", state_ref, moe.as_pure()[1])


def test_moe_from_pure_wraps_given_arrays():
    cfg = moe_layer.MoEConfig(d_model=D, d_ff=F, num_experts=E, router="star")
    params, state = moe_layer.init(jax.random.key(3), cfg)
    moe = MoE.from_pure(cfg, params, state)
    _assert_trees_close("params", params, moe.as_pure()[0])
    x = _x()
    y_ref, _, _ = moe_layer.moe_apply(params, state, x, cfg=cfg, train=False)
    assert_close("y", y_ref, moe(x, train=False)[0], ratio=RATIO_F32)
    with pytest.raises(ValueError, match="state"):
        MoE.from_pure(cfg, params, {"router": {}})


def test_star_subspace_updates_only_in_training():
    _, moe = _moe("star")
    v0 = np.asarray(moe.router_state["router"]["v"].get_value())
    moe(_x(), train=False)
    np.testing.assert_array_equal(v0, moe.router_state["router"]["v"].get_value())
    moe(_x(), train=True)
    v1 = np.asarray(moe.router_state["router"]["v"].get_value())
    assert np.abs(v1 - v0).max() > 0
    np.testing.assert_allclose(np.linalg.norm(v1, axis=-1), 1.0, rtol=1e-5)


def test_nan_token_leaves_router_state_finite():
    _, moe = _moe("star")
    x = _x().at[0, 2, 1].set(jnp.nan)  # one bad token of 10
    _, aux = moe(x, train=True)
    v = np.asarray(moe.router_state["router"]["v"].get_value())
    assert np.all(np.isfinite(v))
    np.testing.assert_allclose(np.linalg.norm(v, axis=-1), 1.0, rtol=1e-5)
    assert float(aux["metrics"]["nonfinite_tokens"]) == 1.0
    y, _ = moe(_x(seed=2), train=True)  # the next batch is routed as usual
    assert np.all(np.isfinite(np.asarray(y))) and np.abs(np.asarray(y)).max() > 0


def test_aux_free_bias_changes_after_train_call():
    _, moe = _moe("aux_free")
    x = _x((64, D)) + 2.0  # shifted inputs: a skewed load
    _, aux = moe(x, train=True)
    bias = np.asarray(moe.router_state["router"]["bias"].get_value())
    load = np.asarray(aux["load"])
    np.testing.assert_array_equal(np.sign(bias), np.sign(load.mean() - load))
    assert np.abs(bias).max() > 0
    moe(x, train=False)
    np.testing.assert_array_equal(bias, moe.router_state["router"]["bias"].get_value())


def test_router_state_is_not_a_param():
    _, moe = _moe("star")
    assert jax.tree.leaves(nnx.state(moe, RouterState))
    params = nnx.state(moe, nnx.Param)
    assert "router_state" not in params
    assert isinstance(moe.router_state["router"]["v"], RouterState)
    assert not isinstance(moe.router_state["router"]["v"], nnx.Param)


def test_moe_under_nnx_jit_updates_state_like_eager():
    cfg, eager = _moe("star")
    _, jitted = _moe("star")
    step = nnx.jit(lambda m, x: m(x, train=True))
    for seed in range(3):
        x = _x(seed=seed)
        y_e, _ = eager(x, train=True)
        y_j, _ = step(jitted, x)
        assert_close(f"y[{seed}]", y_e, y_j, ratio=RATIO_F32)
    _assert_trees_close("state", eager.as_pure()[1], jitted.as_pure()[1])


def _pure_loss(params, state, x, cfg):
    y, new_state, aux = moe_layer.moe_apply(params, state, x, cfg=cfg, train=True)
    return jnp.mean(y**2) + aux["aux_loss"], new_state


def test_nnx_grad_wrt_params_only_and_state_still_updates():
    cfg, moe = _moe("star", router_kwargs={"load_balance_weight": 1e-2})
    params, state = moe.as_pure()
    x = _x()
    pure_grad = jax.jit(jax.value_and_grad(_pure_loss, has_aux=True), static_argnums=3)
    (loss_ref, state_ref), grads_ref = pure_grad(params, state, x, cfg)

    @nnx.jit
    def grad_step(m, x):
        def loss_fn(m):
            y, aux = m(x, train=True)
            return jnp.mean(y**2) + aux["aux_loss"]
        return nnx.value_and_grad(loss_fn)(m)

    loss, grads = grad_step(moe, x)
    assert_close("loss", loss_ref, loss, ratio=RATIO_F32)
    assert jax.tree.leaves(nnx.state(grads, RouterState)) == []
    _assert_trees_close("grads", grads_ref, nnx.to_pure_dict(grads)["params"])
    _assert_trees_close("state", state_ref, moe.as_pure()[1])  # updated through nnx.grad


def test_optimizer_steps_reduce_loss():
    cfg, moe = _moe("aux_free")
    opt = nnx.Optimizer(moe, optax.adam(1e-2), wrt=nnx.Param)
    x, target = _x((32, D), seed=4), _x((32, D), seed=5)

    @nnx.jit
    def train_step(m, opt, x, target):
        def loss_fn(m):
            y, aux = m(x, train=True)
            return jnp.mean((y - target) ** 2) + aux["aux_loss"]
        loss, grads = nnx.value_and_grad(loss_fn)(m)
        opt.update(m, grads)
        return loss

    bias0 = np.asarray(moe.router_state["router"]["bias"].get_value())
    losses = [float(train_step(moe, opt, x, target)) for _ in range(8)]
    assert losses[-1] < losses[0]
    assert np.abs(moe.router_state["router"]["bias"].get_value() - bias0).max() > 0


def test_moe_accepts_nnx_rngs_for_stochastic_router():
    _, moe = _moe("noisy_topk")
    x = _x()
    with pytest.raises(ValueError, match="rng"):
        moe(x, train=True)
    rngs = nnx.Rngs(7)
    y1, _ = moe(x, train=True, rng=rngs)
    y2, _ = moe(x, train=True, rng=rngs)  # the stream advanced: new noise
    y3, _ = moe(x, train=True, rng=nnx.Rngs(7))
    assert_close("same key", y1, y3, ratio=RATIO_F32)
    assert np.abs(np.asarray(y1) - np.asarray(y2)).max() > 0


def _mixer(mode="gated_qdelta"):
    cfg = dm.DeltaMixerConfig(d_model=16, num_heads=2, head_dim=4, mode=mode, chunk_size=8)
    return cfg, DeltaMixer(cfg, rngs=nnx.Rngs(0))


def test_delta_mixer_equals_pure_and_decodes():
    cfg, mixer = _mixer()
    params = mixer.as_pure()
    x = _x((2, 11, 16))

    @nnx.jit
    def run(m, x):  # the wrapper's full pass, the pure one, and a 6-token prefill
        return m(x), dm.apply(m.as_pure(), x, cfg=cfg), m(x[:, :6])[1]

    (y, cache_full), (y_ref, cache_ref), cache = run(mixer, x)
    assert_close("y", y_ref, y, ratio=RATIO_F32)
    _assert_trees_close("cache", cache_ref, cache_full)
    step = nnx.jit(lambda m, xt, c: m.step(xt, c))
    ys = []
    for t in range(6, 11):
        yt, cache = step(mixer, x[:, t], cache)
        ys.append(yt)
    assert_close("decode", y_ref[:, 6:], jnp.stack(ys, axis=1), ratio=RATIO_F32)
    fresh = mixer.init_cache(2)
    _assert_trees_close("init_cache", dm.init_cache(cfg, 2), fresh)
    assert_close("step from fresh cache", y_ref[:, 0], step(mixer, x[:, 0], fresh)[0],
                 ratio=RATIO_F32)
    again = DeltaMixer.from_pure(cfg, params)
    assert_close("from_pure", y_ref, run(again, x)[0][0], ratio=RATIO_F32)


def test_delta_mixer_grad_and_optimizer():
    cfg, mixer = _mixer("qdelta")
    x, target = _x((2, 9, 16), seed=2), _x((2, 9, 16), seed=3)
    opt = nnx.Optimizer(mixer, optax.adam(1e-2), wrt=nnx.Param)

    @nnx.jit
    def train_step(m, opt):
        pure_loss = lambda p: jnp.mean((dm.apply(p, x, cfg=cfg)[0] - target) ** 2)
        grads_ref = jax.grad(pure_loss)(m.as_pure())
        loss, grads = nnx.value_and_grad(lambda m: jnp.mean((m(x)[0] - target) ** 2))(m)
        opt.update(m, grads)
        return loss, grads, grads_ref

    loss0, grads, grads_ref = train_step(mixer, opt)
    _assert_trees_close("grads", grads_ref, nnx.to_pure_dict(grads)["params"])
    losses = [float(train_step(mixer, opt)[0]) for _ in range(4)]
    assert losses[-1] < float(loss0)


def test_delta_mixer_wrapper_passes_segment_ids():
    cfg, mixer = _mixer("kda")
    x = _x((1, 12, 16))
    seg = jnp.array([[0] * 5 + [1] * 7])
    y, _ = mixer(x, segment_ids=seg)
    y_ref, _ = dm.apply(mixer.as_pure(), x, cfg=cfg, segment_ids=seg)
    assert_close("y", y_ref, y, ratio=RATIO_F32)
    assert_close("doc 1 alone", mixer(x[:, 5:])[0], y[:, 5:], ratio=RATIO_F32)


def test_delta_mixer_wrapper_passes_cu_seqlens():
    cfg, mixer = _mixer("kda")
    x = _x((1, 12, 16))
    y, cache = mixer(x, cache=mixer.init_cache(2), cu_seqlens=jnp.array([0, 5, 12]))
    assert cache["state"].shape[0] == 2
    assert_close("seq 1 alone", mixer(x[:, 5:])[0], y[:, 5:], ratio=RATIO_F32)
