"""Expert parallelism against the single-device layer, on 8 simulated CPU devices.

Oracle: `moe_apply` with `parallel=None` (dropless dispatcher) on the same global batch. With
buffers large enough to drop nothing, EP must give the same output, loss, metrics, router state
and gradients (fp32, relative RMSE ≤ 1e-5). With tight buffers, a NumPy model of the
per-source, per-destination buffers says which assignments drop.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

from moejax import parallel, testing
from moejax.moe.layer import MoEConfig, init, moe_apply
from moejax.parallel import mesh as mesh_lib
from moejax.routers import ROUTER_NAMES, get_router

B, T, D, F, E, K = 8, 4, 8, 16, 8, 2  # N = 32 tokens: 4 per device on 8 devices
MESHES = ((1, 8), (2, 4), (4, 2), (8, 1))
SUITE = ("cv", "max_vio", "load_entropy", "dead_experts", "avg_k", "active_experts",
         "dropped_fraction", "dropped_token_fraction")


def _cfg(name, mesh_shape=None, **overrides):
    # gmm_impl="reference" (ragged_dot) compiles faster on CPU than the chunked scan.
    cfg = MoEConfig(d_model=D, d_ff=F, num_experts=E, router=name, top_k=K,
                    gmm_impl="reference", **overrides)
    if mesh_shape is None:
        return cfg
    data, expert, *fsdp = mesh_shape  # (data, expert) or (data, expert, fsdp)
    ep = parallel.ExpertParallel(mesh=parallel.make_mesh(data, expert, fsdp=fsdp[0] if fsdp else 1))
    return dataclasses.replace(cfg, parallel=ep)


def _data(cfg):
    params, state = init(jax.random.key(0), cfg)
    x = jax.random.normal(jax.random.key(1), (B, T, D))
    return params, state, x


@functools.partial(jax.jit, static_argnames=("cfg", "ep_cfg"))
def _both(params, state, x, rng, *, cfg, ep_cfg):
    """value_and_grad of the layer, single-device and EP, in one compile."""
    proj = jax.random.normal(jax.random.key(4), x.shape)

    def run(c):
        def loss(params, x):
            y, new_state, aux = moe_apply(params, state, x, cfg=c, train=True, rng=rng)
            return jnp.sum(y * proj) + aux["aux_loss"], (y, new_state, aux)
        return jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(params, x)

    return run(cfg), run(ep_cfg)


def _check_equal(name, cfg, ep_cfg):
    params, state, x = _data(cfg)
    ((l_ref, (y_ref, s_ref, a_ref)), g_ref), ((l_ep, (y_ep, s_ep, a_ep)), g_ep) = _both(
        params, state, x, jax.random.key(2), cfg=cfg, ep_cfg=ep_cfg)
    testing.assert_close(f"{name} y", y_ref, y_ep, ratio=testing.RATIO_F32)
    testing.assert_close(f"{name} loss", l_ref, l_ep, ratio=testing.RATIO_F32)
    testing.assert_close(f"{name} aux_loss", a_ref["aux_loss"], a_ep["aux_loss"],
                         ratio=testing.RATIO_F32)
    testing.assert_close(f"{name} load", a_ref["load"], a_ep["load"], ratio=testing.RATIO_F32)
    np.testing.assert_array_equal(a_ref["top1"], a_ep["top1"])
    assert set(SUITE) <= set(a_ep["metrics"]) and set(a_ref["metrics"]) == set(a_ep["metrics"])
    for key, ref in a_ref["metrics"].items():
        testing.assert_close(f"{name} metric {key}", ref, a_ep["metrics"][key],
                             ratio=testing.RATIO_F32)
    assert float(a_ep["metrics"]["dropped_fraction"]) == 0.0
    for (path, r), g in zip(jax.tree_util.tree_flatten_with_path(s_ref)[0],
                            jax.tree.leaves(s_ep), strict=True):
        testing.assert_close(f"{name} state {jax.tree_util.keystr(path)}", r, g,
                             ratio=testing.RATIO_F32)
    for (path, r), g in zip(jax.tree_util.tree_flatten_with_path(g_ref)[0],
                            jax.tree.leaves(g_ep), strict=True):
        testing.assert_close(f"{name} grad {jax.tree_util.keystr(path)}", r, g,
                             ratio=testing.RATIO_F32)
    assert float(jnp.max(jnp.abs(g_ep[0]["experts"]["w_up"]))) > 0


@pytest.mark.parametrize("name", ROUTER_NAMES)
def test_every_router_matches_single_device(name):
    # Tokens over all three axes: data 2 × fsdp 2 × expert 2.
    get_router(name)
    _check_equal(name, _cfg(name), _cfg(name, (2, 2, 2)))


@pytest.mark.parametrize("mesh_shape", [(1, 8), (4, 2), (8, 1)], ids=str)
def test_meshes_match_single_device(mesh_shape):
    # Other routers on other meshes: STAR on (1, 8) and aux-free on (8, 1) in the router-state
    # test below (outputs, state and params after SGD steps); every pair in the slow sweep.
    name = "topk"
    _check_equal(name, _cfg(name), _cfg(name, mesh_shape))


def test_capacity_dispatcher_without_drops_and_one_device_mesh():
    # cf = E/K makes every per-destination buffer hold all assignments it could receive.
    _check_equal("capacity", _cfg("top_p"),
                 _cfg("top_p", (2, 4), dispatcher="capacity", capacity_factor=E / K))
    one = parallel.ExpertParallel(mesh=parallel.single_device_mesh())
    _check_equal("1 device", _cfg("topk"), dataclasses.replace(_cfg("topk"), parallel=one))


@pytest.mark.slow
@pytest.mark.parametrize("mesh_shape", MESHES, ids=str)
@pytest.mark.parametrize("name", ROUTER_NAMES)
def test_every_router_every_mesh(name, mesh_shape):
    _check_equal(name, _cfg(name), _cfg(name, mesh_shape))


# ------------------------------------------------------------------------ router state


def _assert_replicated_and_equal(name, ref, arr):
    shards = [np.asarray(s.data) for s in arr.addressable_shards]
    assert len(shards) == 8 and arr.sharding.is_fully_replicated, name
    for s in shards[1:]:
        np.testing.assert_array_equal(shards[0], s, err_msg=name)
    testing.assert_close(name, ref, shards[0], ratio=testing.RATIO_F32)


@pytest.mark.parametrize(("name", "mesh_shape"), [("star", (1, 8)), ("aux_free", (8, 1))])
def test_router_state_after_steps_is_global(name, mesh_shape):
    # STAR takes a visible GHA step (η = 0.1); aux-free biases move by γ per step.
    kwargs = {"star": {"eta": 0.1}, "aux_free": {"bias_update_rate": 0.1}}[name]
    cfg = _cfg(name, router_kwargs=kwargs)
    ep_cfg = _cfg(name, mesh_shape, router_kwargs=kwargs)
    params, state, _ = _data(cfg)

    @functools.partial(jax.jit, static_argnames="c")
    def step(params, state, x, c):
        def loss(p):
            y, new_state, aux = moe_apply(p, state, x, cfg=c, train=True)
            return jnp.mean(y**2) + aux["aux_loss"], new_state
        grads, new_state = jax.grad(loss, has_aux=True)(params)
        return jax.tree.map(lambda p, g: p - 0.5 * g, params, grads), new_state

    p_ref, s_ref, p_ep, s_ep = params, state, params, state
    for i in range(3):
        x = jax.random.normal(jax.random.key(10 + i), (B, T, D)) + 0.5 * i
        p_ref, s_ref = step(p_ref, s_ref, x, cfg)
        p_ep, s_ep = step(p_ep, s_ep, parallel.shard_batch(x, ep_cfg.parallel.mesh), ep_cfg)
    leaf = {"star": "v", "aux_free": "bias"}[name]
    assert float(jnp.max(jnp.abs(s_ref["router"][leaf] - state["router"][leaf]))) > 1e-3
    _assert_replicated_and_equal(f"{name} state", s_ref["router"][leaf], s_ep["router"][leaf])
    for a, b in zip(jax.tree.leaves(p_ref), jax.tree.leaves(p_ep), strict=True):
        testing.assert_close(f"{name} params", a, b, ratio=testing.RATIO_F32)


def test_router_axis_name_inside_own_shard_map():
    # Routers called inside a user's shard_map reduce over `axis_name` (STAR GHA, aux-free loads).
    mesh = parallel.make_mesh(2, 4)
    x = jax.random.normal(jax.random.key(5), (B * T, D)) + 0.3
    for name, kw, leaf in (("star", {"eta": 0.1}, "v"),
                           ("aux_free", {"bias_update_rate": 0.1}, "bias")):
        mod = get_router(name)
        cfg = mod.Config(d_model=D, num_experts=E, top_k=K, **kw)
        cfg_ax = dataclasses.replace(cfg, axis_name=mesh_lib.AXES)
        params, state = mod.init(jax.random.key(0), cfg)
        _, ref = mod.route(params, state, x, cfg=cfg, train=True)

        def body(params, state, x, cfg_ax=cfg_ax, mod=mod):
            return mod.route(params, state, x, cfg=cfg_ax, train=True)[1]

        got = jax.jit(mesh_lib.shard_map(body, mesh=mesh, in_specs=(P(), P(), P(mesh_lib.AXES)),
                                         out_specs=P()))(params, state, x)
        testing.assert_close(f"{name} axis_name", ref[leaf], got[leaf], ratio=testing.RATIO_F32)
        assert float(jnp.max(jnp.abs(ref[leaf] - state[leaf]))) > 1e-3


# ------------------------------------------------------------------------ capacity drops


def _np_expert(bank, e, x):
    bank = {k: np.asarray(v, np.float64) for k, v in bank.items()}
    g, up = x @ bank["w_gate"][e], x @ bank["w_up"][e]
    return (g / (1.0 + np.exp(-g)) * up) @ bank["w_down"][e]


def test_tight_capacity_drops_are_counted_and_zero():
    mesh_shape, cf = (2, 4), 0.5
    ep_cfg = _cfg("topk", mesh_shape, dispatcher="capacity", capacity_factor=cf)
    params, state, x = _data(ep_cfg)
    compiled = jax.jit(functools.partial(moe_apply, cfg=ep_cfg, train=True)).lower(
        params, state, x).compile()
    y, _, aux = compiled(params, state, x)
    out, _ = get_router("topk").route(params["router"], state["router"], x.reshape(-1, D),
                                      cfg=ep_cfg.router_config, train=True)
    # NumPy model: each device's n tokens, in order, fill C rows per destination device.
    weights, mask = np.asarray(out.weights, np.float64), np.asarray(out.mask)
    xs = np.asarray(x, np.float64).reshape(-1, D)
    shards, n_exp = mesh_shape[0] * mesh_shape[1], mesh_shape[1]
    n, e_local = xs.shape[0] // shards, E // n_exp
    c = int(np.ceil(cf * n * K / n_exp))
    ref, dropped = np.zeros_like(xs), 0
    for s in range(shards):
        fill = np.zeros(n_exp, int)
        for t in range(s * n, (s + 1) * n):
            for e in np.argsort(-np.where(mask[t], weights[t], -np.inf), kind="stable")[:K]:
                if not mask[t, e]:
                    continue
                fill[e // e_local] += 1
                if fill[e // e_local] > c:
                    dropped += 1
                    continue
                ref[t] += weights[t, e] * _np_expert(params["experts"], e, xs[t])
    assert dropped > 0
    testing.assert_close("tight capacity", ref, np.asarray(y).reshape(-1, D),
                         ratio=testing.RATIO_F32)
    np.testing.assert_allclose(aux["metrics"]["dropped_fraction"], dropped / mask.sum(),
                               rtol=1e-6)
    lost = np.all(ref == 0, axis=-1)
    assert lost.any()
    np.testing.assert_array_equal(np.asarray(y).reshape(-1, D)[lost], 0.0)
    np.testing.assert_allclose(aux["metrics"]["dropped_token_fraction"], lost.mean(), rtol=1e-6)


# ------------------------------------------------------------------------ training step


def test_jitted_training_step_over_mesh():
    cfg = _cfg("aux_free", (2, 4))
    mesh = cfg.parallel.mesh
    params, state, x = _data(cfg)
    params, state = parallel.shard_params(params, mesh), parallel.replicate(state, mesh)
    opt = optax.adam(1e-2)
    opt_state = opt.init(params)

    @jax.jit
    def train_step(params, opt_state, state, x):
        def loss(p):
            y, new_state, aux = moe_apply(p, state, x, cfg=cfg, train=True)
            return jnp.mean((y - x) ** 2) + aux["aux_loss"], new_state
        (value, new_state), grads = jax.value_and_grad(loss, has_aux=True)(params)
        updates, opt_state = opt.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, new_state, value

    x = parallel.shard_batch(x, mesh)
    losses = []
    for _ in range(3):
        params, opt_state, state, value = train_step(params, opt_state, state, x)
        losses.append(float(value))
    assert np.all(np.isfinite(losses)) and losses[-1] < losses[0]
    assert params["experts"]["w_up"].sharding.spec == P("expert")
    assert params["experts"]["w_up"].addressable_shards[0].data.shape == (E // 4, D, F)
