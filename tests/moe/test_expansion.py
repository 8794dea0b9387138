"""Tests for MASS expansion mechanics (`moejax.moe.expansion`, DESIGN §5)."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from moejax.moe import expansion as ex

K, D, F = 6, 4, 3


def _normal(seed, shape):
    """Test data from numpy (no per-shape threefry compilation)."""
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.float32)


def _params(seed=0, k=K, gelu=False):
    experts = {"w_up": _normal(seed + 1, (k, D, F)), "w_down": _normal(seed + 2, (k, F, D))}
    if not gelu:
        experts["w_gate"] = _normal(seed + 3, (k, D, F))
    return {"router": {"w_g": _normal(seed, (k, D))}, "experts": experts}


def _swiglu(experts, e, x):
    h = jax.nn.silu(x @ experts["w_gate"][e]) * (x @ experts["w_up"][e])
    return h @ experts["w_down"][e]


def _orthogonal_direction(params, slot, seed):
    """A unit bank-tree direction (numpy) orthogonal, jointly over all leaves, to `slot`'s W."""
    leaves, treedef = jax.tree.flatten(jax.device_get(params["experts"]))
    rng = np.random.default_rng(seed)
    u = [rng.standard_normal(leaf.shape[1:]) for leaf in leaves]
    w = [leaf[slot].astype(np.float64) for leaf in leaves]
    coef = sum(np.vdot(a, b) for a, b in zip(u, w, strict=True)) / sum(np.vdot(b, b) for b in w)
    u = [a - coef * b for a, b in zip(u, w, strict=True)]
    norm = np.sqrt(sum(np.vdot(a, a) for a in u))
    return jax.tree.unflatten(treedef, [a / norm for a in u])


def _drifting_grads(params, u, t, jump_at, rng):
    """Slot 1: gradient ∝ u ⟂ W_1, norm 1 (+noise) doubling at `jump_at`; others ∝ W (cos 1)."""
    scale = rng.normal(1.0, 0.05, size=K)
    scale[1] *= 2.0 if t >= jump_at else 1.0

    def leaf(w, u_leaf):
        g = np.asarray(w) * scale.reshape(-1, *([1] * (w.ndim - 1)))
        g[1] = scale[1] * u_leaf
        return g.astype(np.float32)

    experts = jax.tree.map(leaf, params["experts"], u)
    return {"router": {"w_g": np.ones((K, D), np.float32)}, "experts": experts}


# ----------------------------------------------------------------------------- config / state


@pytest.mark.parametrize("kwargs, field", [
    (dict(total_steps=100, k_init=9, k_max=8), "k_init"),
    (dict(total_steps=0), "total_steps"),
    (dict(total_steps=100, p_threshold=0.0), "p_threshold"),
    (dict(total_steps=100, cos_delta=1.5), "cos_delta"),
    (dict(total_steps=100, window=1), "window"),
    (dict(total_steps=100, removal_patience=0), "removal_patience"),
    (dict(total_steps=100, expand_fraction=2.0), "expand_fraction"),
    (dict(total_steps=100, router_leaves="w_g"), "router_leaves"),
])
def test_config_bad_values_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        ex.ExpansionConfig(**kwargs)


def test_config_defaults_follow_the_spec():
    cfg = ex.ExpansionConfig(total_steps=10_000)
    assert (cfg.k_init, cfg.k_max, cfg.t_warm, cfg.omega, cfg.expand_until) == (8, 16, 500, 900,
                                                                                1000)
    small = ex.ExpansionConfig(total_steps=200)
    assert (small.t_warm, small.omega, small.expand_until) == (30, 60, 20)
    hash(cfg)  # static argument of jit


def test_init_state_is_fixed_shape():
    cfg = ex.ExpansionConfig(total_steps=1000, k_init=3, k_max=5, window=7)
    st = ex.init_expansion_state(cfg)
    np.testing.assert_array_equal(st["active"], [True] * 3 + [False] * 2)
    np.testing.assert_array_equal(st["clone_src"], [-1] * 5)
    assert st["g_hist"].shape == st["z_hist"].shape == (7, 5)
    assert int(st["newest"]) == -1 and int(st["n_clones"]) == 0


# ----------------------------------------------------------------------------- statistics


def test_fc1_grad_norm_swiglu_and_gelu():
    g = _params(1)["experts"]
    want = np.sqrt(np.sum(np.asarray(g["w_gate"]) ** 2, (1, 2))
                   + np.sum(np.asarray(g["w_up"]) ** 2, (1, 2)))
    np.testing.assert_allclose(ex.fc1_grad_norms(g), want, rtol=1e-5)
    gelu = _params(1, gelu=True)["experts"]
    np.testing.assert_allclose(ex.fc1_grad_norms(gelu),
                               np.linalg.norm(np.asarray(gelu["w_up"]).reshape(K, -1), axis=1),
                               rtol=1e-5)
    with pytest.raises(ValueError, match="w_up"):
        ex.fc1_grad_norms({"w_down": g["w_down"]})


def _run_drift(series, cfg):
    """Feeds `series` `[T, K]` through `drift_test`; returns drift `[T, K]`, p-values `[T, K]`."""
    def body(st, g):
        st, p, d = ex.drift_test(st, g, cfg)
        return st, (d, p)

    run = jax.jit(lambda xs: jax.lax.scan(body, ex.init_expansion_state(cfg), xs)[1])
    drift, p = run(jnp.asarray(series, jnp.float32))
    return np.asarray(drift), np.asarray(p)


def test_z_test_quiet_on_stationary_noise():
    cfg = ex.ExpansionConfig(total_steps=1000, k_init=16, k_max=16)  # T_warm 50, ω 90
    series = 1.0 + 0.1 * np.random.default_rng(0).standard_normal((600, 16))
    drift, _ = _run_drift(series, cfg)
    assert not drift[: cfg.t_warm].any()  # nothing is tested before T_warm
    rate = drift[cfg.t_warm:].mean()
    assert rate < 0.01, rate  # conservative: Var(s̃) ≈ 2/3 under i.i.d. noise


def test_z_test_fires_on_upward_jump_only():
    cfg = ex.ExpansionConfig(total_steps=1000, k_init=16, k_max=16)
    series = 1.0 + 0.1 * np.random.default_rng(1).standard_normal((300, 16))
    up, down = series.copy(), series.copy()
    up[200:] += 0.3  # a 3σ jump
    down[200:] -= 0.3
    drift_up, p_up = _run_drift(up, cfg)
    first = [np.flatnonzero(drift_up[200:, e])[:1] for e in range(16)]
    assert all(len(f) == 1 and f[0] < 30 for f in first), first
    assert p_up[210].max() < p_up[150].min()  # p-values collapse after the jump
    drift_down, _ = _run_drift(down, cfg)
    assert not drift_down[200:].any()  # one-sided: falling gradient norms never count


def test_inactive_slots_are_not_tracked():
    cfg = ex.ExpansionConfig(total_steps=1000, k_init=2, k_max=4, warm_steps=2, window=5)
    series = np.tile(np.arange(20.0)[:, None] ** 2, (1, 4))  # rising everywhere
    drift, p = _run_drift(series, cfg)
    assert drift[:, :2].any() and not drift[:, 2:].any()
    assert (p[:, 2:] == 1.0).all()


# ----------------------------------------------------------------------------- clone


def test_clone_copies_expert_and_gate_row_exactly():
    params = _params(2)
    params = {**params, "shared": {"w": jnp.ones((D, D))}}
    clone = jax.jit(ex.clone_expert)
    out = clone(params, jnp.int32(2), jnp.int32(5))
    for name in ("w_gate", "w_up", "w_down"):
        np.testing.assert_array_equal(out["experts"][name][5], params["experts"][name][2])
        np.testing.assert_array_equal(out["experts"][name][:5], params["experts"][name][:5])
    np.testing.assert_array_equal(out["router"]["w_g"][5], params["router"]["w_g"][2])
    chex.assert_trees_all_equal_shapes_and_dtypes(out, params)
    same = clone(params, 2, 5, enabled=jnp.bool_(False))
    chex.assert_trees_all_equal(same, params)


@pytest.mark.parametrize("router", ["top_p", "topk"])
def test_clone_is_a_functional_copy_and_masked_slots_get_no_tokens(router):
    """Invariant claimed: slot dst is a bitwise copy of src, so every token sees the same logit,
    prob and expert output for both; the pair splits the mass a doubled logit would get. The
    layer output itself is *not* preserved: with bias-free `x W_gᵀ` no gate rows a, b satisfy
    exp(a·x) + exp(b·x) = exp(w·x) for all x, so the softmax denominator always changes."""
    from moejax.routers import base

    mod = base.get_router(router)
    rcfg = base.make_config(router, d_model=D, num_experts=K, top_k=2)
    cfg = ex.ExpansionConfig(total_steps=1000, k_init=4, k_max=K)
    params, st = _params(3), ex.init_expansion_state(cfg)
    x = _normal(4, (64, D))

    route = jax.jit(lambda p, s: mod.route(p["router"], ex.with_active({}, s)["router"], x,
                                           cfg=rcfg, train=True)[0])
    out = route(params, st)
    assert not np.asarray(out.mask[:, 4:]).any() and not np.asarray(out.weights[:, 4:]).any()

    params = jax.jit(ex.clone_expert)(params, 1, 4)
    st = {**st, "active": st["active"].at[4].set(True), "clone_src": st["clone_src"].at[4].set(1)}
    out = route(params, st)
    np.testing.assert_array_equal(out.probs[:, 4], out.probs[:, 1])
    y = jax.jit(_swiglu, static_argnums=1)
    np.testing.assert_array_equal(y(params["experts"], 4, x), y(params["experts"], 1, x))
    assert not np.asarray(out.mask[:, 5]).any()  # still inactive
    both = np.asarray(out.mask[:, 1] & out.mask[:, 4])
    weights = np.asarray(out.weights)
    np.testing.assert_array_equal(weights[both, 4], weights[both, 1])


# ----------------------------------------------------------------------------- optimizer state


def _adam_state(opt, params, seed=5):
    state = opt.init(params)
    grads = jax.tree.map(lambda p: _normal(seed, p.shape), params)
    return jax.jit(opt.update)(grads, state, params)[1]


def test_reset_slot_moments_touches_only_the_clone_slot():
    moe = _params(6)
    tree = {"emb": jnp.ones((K, D)), "layers": [{"moe": moe}]}  # emb: same leading dim, not reset
    opt = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-3))
    state = _adam_state(opt, tree)
    paths = [("layers", 0, "moe", "experts", n) for n in moe["experts"]]
    paths.append(("layers", 0, "moe", "router", "w_g"))
    slot = jnp.arange(K) == 3
    new = jax.jit(lambda s, m: ex.reset_slot_moments(s, m, paths))(state, slot)
    adam, adam_new = state[1][0], new[1][0]
    for field in ("mu", "nu"):
        old_t, new_t = getattr(adam, field), getattr(adam_new, field)
        np.testing.assert_array_equal(new_t["emb"], old_t["emb"])
        for leaf_old, leaf_new in zip(jax.tree.leaves(old_t["layers"]),
                                      jax.tree.leaves(new_t["layers"]), strict=True):
            assert not np.asarray(leaf_new[3]).any() and np.asarray(leaf_old[3]).any()
            np.testing.assert_array_equal(np.delete(leaf_new, 3, 0), np.delete(leaf_old, 3, 0))
    assert int(adam_new.count) == int(adam.count)
    with pytest.raises(ValueError, match="no optimizer-state leaf"):
        ex.reset_slot_moments(state, slot)  # default paths lack the ("layers", 0, "moe") prefix


# ----------------------------------------------------------------------------- gradients, losses


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_project_gradients_source_parallel_to_weights(seed):
    params = _params(seed)
    grads = jax.tree.map(lambda p: _normal(seed + 10, p.shape), params)
    cfg = ex.ExpansionConfig(total_steps=1000, k_init=4, k_max=K)
    st = ex.init_expansion_state(cfg)
    st = {**st, "active": st["active"].at[4].set(True), "clone_src": st["clone_src"].at[4].set(1)}
    out = jax.jit(ex.project_gradients)(grads, params, st)
    flat = lambda tree, e: jnp.concatenate([leaf[e].ravel() for leaf in jax.tree.leaves(tree)])
    g, w, pg = flat(grads["experts"], 1), flat(params["experts"], 1), flat(out["experts"], 1)
    np.testing.assert_allclose(pg, jnp.vdot(g, w) / jnp.vdot(w, w) * w, rtol=1e-5, atol=1e-6)
    cos = jnp.vdot(pg, w) / (jnp.linalg.norm(pg) * jnp.linalg.norm(w))
    np.testing.assert_allclose(abs(float(cos)), 1.0, rtol=1e-5)  # parallel to W_1
    for e in (0, 2, 3, 4, 5):  # the copy (4) and everyone else keep the full gradient
        np.testing.assert_array_equal(flat(out["experts"], e), flat(grads["experts"], e))
    np.testing.assert_array_equal(out["router"]["w_g"], grads["router"]["w_g"])


def test_redundancy_loss_by_hand():
    w_g = jnp.array([[1.0, 0.0], [0.0, 2.0], [1.0, 1.0], [3.0, 0.0], [1.0, 0.0]])
    st = {"active": jnp.array([True, True, True, True, False]),
          "clone_src": jnp.array([-1, -1, 0, 1, 0])}
    # pairs: (0, 2): cos² = (1/√2)² = 0.5; (1, 3): cos² = 0; slot 4 inactive, ignored.
    loss_fn = lambda w: ex.redundancy_loss({"router": {"w_g": w}}, st, weight=0.01)
    loss, grad = jax.jit(jax.value_and_grad(loss_fn))(w_g)
    np.testing.assert_allclose(float(loss), 0.01 * 0.5, rtol=1e-6)
    assert np.isfinite(np.asarray(grad)).all() and np.abs(np.asarray(grad[2])).sum() > 0


def test_with_active_and_removal_update():
    cfg = ex.ExpansionConfig(total_steps=1000, k_init=4, k_max=K, removal_patience=3)
    st = ex.init_expansion_state(cfg)
    st = {**st, "active": st["active"].at[4:].set(True), "clone_src": st["clone_src"].at[4:].set(1),
          "newest": jnp.int32(5), "n_clones": jnp.int32(2)}
    moe_state = ex.with_active({"router": {"other": 1}}, st, drop_newest=True)
    assert moe_state["router"]["other"] == 1
    np.testing.assert_array_equal(moe_state["router"]["active"], [1, 1, 1, 1, 1, 0])
    upd = jax.jit(lambda s, a, b, t: ex.removal_update(s, a, b, t, cfg))
    for loss_masked, removed in [(0.9, False), (1.2, False), (1.0, False), (0.5, False),
                                 (0.8, True)]:  # strike, reset, strike, strike, strike → out
        st = upd(st, 1.0, loss_masked, 50)
        assert bool(st["active"][5]) != removed
    assert int(st["newest"]) == -1 and int(st["clone_src"][5]) == -1 and int(st["n_removed"]) == 1
    assert bool(st["active"][4])  # the older clone stays
    first = {**st, "newest": jnp.int32(4), "n_clones": jnp.int32(1)}  # first expansion: kept
    late = {**st, "newest": jnp.int32(4)}
    for s, t in [(first, 50), (late, cfg.expand_until)]:
        for _ in range(4):
            s = upd(s, 1.0, 0.5, t)
        assert bool(s["active"][4])


# ----------------------------------------------------------------------------- expansion_step


def _run_steps(step_offset, n_steps=45, jump_at=25):
    cfg = ex.ExpansionConfig(total_steps=1000, k_init=4, k_max=K, warm_steps=10, window=20)
    params = _params(7)
    opt = optax.adamw(1e-3)
    opt_state = _adam_state(opt, params)
    st = ex.init_expansion_state(cfg)
    traces = []

    def step_fn(params, grads, opt_state, exp_state, step):
        traces.append(1)  # runs only while tracing: one entry per compilation
        return ex.expansion_step(params, grads, opt_state, exp_state, step, cfg)

    jitted = jax.jit(step_fn)
    rng, infos, before = np.random.default_rng(0), [], (params, opt_state, st)
    u = _orthogonal_direction(params, 1, seed=0)
    for t in range(n_steps):
        grads = _drifting_grads(params, u, t, jump_at, rng)
        params, opt_state, st, info = jitted(params, grads, opt_state, st, t + step_offset)
        infos.append(jax.device_get(info))
        chex.assert_trees_all_equal_shapes_and_dtypes((params, opt_state, st), before)
    return cfg, before, (params, opt_state, st), infos, len(traces)


def test_expansion_step_clones_once_without_recompiling():
    cfg, (p0, o0, _), (params, opt_state, st), infos, n_traces = _run_steps(0)
    assert n_traces == 1
    cloned = [t for t, i in enumerate(infos) if i["cloned"]]
    assert len(cloned) == 1 and 25 <= cloned[0] < 45, cloned  # after the jump, then histories reset
    info = infos[cloned[0]]
    assert (int(info["src"]), int(info["dst"]), int(info["n_active"])) == (1, 4, 5)
    assert abs(info["cos"][1]) < cfg.cos_delta and (np.abs(info["cos"][[0, 2, 3]]) > 0.9).all()
    np.testing.assert_array_equal(st["active"], [1, 1, 1, 1, 1, 0])
    np.testing.assert_array_equal(st["clone_src"], [-1, -1, -1, -1, 1, -1])
    assert (int(st["newest"]), int(st["n_clones"])) == (4, 1)
    for name in ("w_gate", "w_up", "w_down"):
        np.testing.assert_array_equal(params["experts"][name][4], p0["experts"][name][1])
    np.testing.assert_array_equal(params["router"]["w_g"][4], p0["router"]["w_g"][1])
    for field in ("mu", "nu"):
        for old, new in zip(jax.tree.leaves(getattr(o0[0], field)),
                            jax.tree.leaves(getattr(opt_state[0], field)), strict=True):
            assert not np.asarray(new[4]).any()
            np.testing.assert_array_equal(np.delete(new, 4, 0), np.delete(old, 4, 0))


def test_expansion_disabled_after_expand_fraction():
    cfg, (p0, _, s0), (params, _, st), infos, _ = _run_steps(step_offset=100)  # expand_until 100
    assert any(i["drift"][1] for i in infos)  # the drift is still detected ...
    assert not any(i["cloned"] for i in infos)  # ... but nothing grows
    np.testing.assert_array_equal(st["active"], s0["active"])
    chex.assert_trees_all_equal(params, p0)


# ----------------------------------------------------------------------------- with the MoE layer


@pytest.mark.parametrize("dispatcher", ["dropless", "capacity"])
def test_moe_layer_masked_slots_and_top1_clone_preserves_output(dispatcher):
    """With the real layer: inactive slots get no tokens and cannot influence the output; for
    renormalised top-1 routing, cloning + activating leaves the output unchanged (the source and
    copy tie, either one gets weight 1, and they compute the same function). For top-k ≥ 2 and
    top-p the softmax denominator changes; see the router-level test above."""
    from moejax.moe import layer

    lcfg = layer.MoEConfig(d_model=D, d_ff=F, num_experts=K, router="topk", top_k=1,
                           router_kwargs={"renormalize": True}, dispatcher=dispatcher,
                           capacity_factor=float(K), gmm_impl="reference")
    params, state = layer.init(jax.random.key(0), lcfg)
    cfg = ex.ExpansionConfig(total_steps=1000, k_init=4, k_max=K)
    st = ex.init_expansion_state(cfg)
    x = _normal(8, (2, 16, D))
    apply = jax.jit(lambda p, s: layer.moe_apply(p, s, x, cfg=lcfg, train=False))

    y0, _, aux = apply(params, ex.with_active(state, st))
    assert not np.asarray(aux["load"][4:]).any()
    junk = jax.tree.map(lambda v: v.at[4:].set(100.0), params)  # inactive slots: garbage
    np.testing.assert_array_equal(apply(junk, ex.with_active(state, st))[0], y0)

    params = jax.jit(ex.clone_expert)(params, 1, 4)
    st = {**st, "active": st["active"].at[4].set(True), "clone_src": st["clone_src"].at[4].set(1)}
    y1, _, aux = apply(params, ex.with_active(state, st))
    np.testing.assert_allclose(y1, y0, rtol=0, atol=1e-6)
    assert not np.asarray(aux["load"][5]).any()
