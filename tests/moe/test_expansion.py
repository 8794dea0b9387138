"""Tests for MASS expansion mechanics (`moejax.moe.expansion`, DESIGN §5)."""

import dataclasses

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
    """A unit bank-tree direction (numpy) orthogonal, leaf by leaf (so also over the fc1 leaves
    and over all leaves jointly), to `slot`'s W."""
    leaves, treedef = jax.tree.flatten(jax.device_get(params["experts"]))
    rng = np.random.default_rng(seed)
    u = [rng.standard_normal(leaf.shape[1:]) for leaf in leaves]
    w = [leaf[slot].astype(np.float64) for leaf in leaves]
    u = [a - np.vdot(a, b) / np.vdot(b, b) * b for a, b in zip(u, w, strict=True)]
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
    (dict(total_steps=100, statistic="mine"), "statistic"),
    (dict(total_steps=100, alignment="never"), "alignment"),
    (dict(total_steps=100, removal=True), "removal"),
    (dict(total_steps=100, cos_leaves="w_up"), "cos_leaves"),
    (dict(total_steps=100, source="last"), "source"),
])
def test_config_bad_values_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        ex.ExpansionConfig(**kwargs)


def test_config_defaults_follow_the_authors():
    cfg = ex.ExpansionConfig(total_steps=10_000)
    assert (cfg.k_init, cfg.k_max, cfg.t_warm, cfg.omega, cfg.expand_until) == (8, 16, 500, 900,
                                                                                1000)
    assert (cfg.p_threshold, cfg.cos_delta, cfg.redundancy_weight, cfg.removal_patience) == (
        0.01, 1e-3, 0.01, 3)
    assert (cfg.statistic, cfg.alignment, cfg.removal, cfg.cos_leaves, cfg.source) == (
        "authors", "once", "authors", "fc1", "first")
    small = ex.ExpansionConfig(total_steps=200)
    assert (small.t_warm, small.omega, small.expand_until) == (30, 60, 20)
    hash(cfg)  # static argument of jit


def test_init_state_is_fixed_shape():
    cfg = ex.ExpansionConfig(total_steps=1000, k_init=3, k_max=5, window=7)
    st = ex.init_expansion_state(cfg)
    np.testing.assert_array_equal(st["active"], [True] * 3 + [False] * 2)
    np.testing.assert_array_equal(st["clone_src"], [-1] * 5)
    assert st["g_win"].shape == st["z_win"].shape == (7, 5)
    assert int(st["newest"]) == -1 and int(st["n_clones"]) == 0
    assert int(st["patience"]) == cfg.removal_patience and not bool(st["stopped"])


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


def _run_drift(series, cfg, resets=()):
    """Feeds `series` `[T, K]` through `drift_test`; returns drift `[T, K]`, p-values `[T, K]`.
    `resets`: (step, slot) pairs whose count restarts after that step (windows kept), as a
    clone source's does."""
    if not resets:
        def body(st, g):
            st, pv, d = ex.drift_test(st, g, cfg)
            return st, (d, pv)

        run = jax.jit(lambda xs: jax.lax.scan(body, ex.init_expansion_state(cfg), xs)[1])
        drift, p = run(jnp.asarray(series, jnp.float32))
        return np.asarray(drift), np.asarray(p)
    step = jax.jit(lambda st, g: ex.drift_test(st, g, cfg))
    reset = jax.jit(lambda st, sel: ex._reset_tracking(st, sel, windows=False))
    st, drift, p = ex.init_expansion_state(cfg), [], []
    for t, g in enumerate(np.asarray(series, np.float32)):
        st, pv, d = step(st, jnp.asarray(g))
        drift.append(np.asarray(d))
        p.append(np.asarray(pv))
        for ts, slot in resets:
            if ts == t:
                st = reset(st, jnp.arange(series.shape[1]) == slot)
    return np.stack(drift), np.stack(p)


def _authors_drift(series, t_warm, window, p_limit, resets=()):
    """The authors' statistic (`_update_mass_statistics` + `_compute_p_value`) in plain Python:
    deques of the last ω norms and z's, z against the window including the new norm."""
    from collections import deque
    from statistics import NormalDist

    t_steps, k = series.shape
    count = [0] * k
    g_win = [deque(maxlen=window) for _ in range(k)]
    z_win = [deque(maxlen=window) for _ in range(k)]
    p = np.ones((t_steps, k))
    for t in range(t_steps):
        for e in range(k):
            g = float(series[t, e])
            count[e] += 1
            g_win[e].append(g)
            if count[e] >= t_warm:
                w = np.asarray(g_win[e], np.float64)
                z_win[e].append((g - w.mean()) / w.std(ddof=1))
            if count[e] >= t_warm and len(g_win[e]) == window:
                p[t, e] = 1 - NormalDist().cdf(sum(z_win[e]) / np.sqrt(window))
        for ts, slot in resets:
            if ts == t:
                count[slot] = 0
    return p < p_limit, p


def test_authors_statistic_matches_their_algorithm():
    cfg = ex.ExpansionConfig(total_steps=1000, k_init=4, k_max=4, warm_steps=6, window=10,
                             p_threshold=0.05)
    rng = np.random.default_rng(3)
    series = 1.0 + 0.1 * rng.standard_normal((60, 4))
    series[30:, 1] += 0.4  # a jump in slot 1
    series[:, 2] = np.linspace(1.0, 2.0, 60) + 0.01 * rng.standard_normal(60)  # a trend
    resets = ((20, 3), (40, 1))  # slot 3 and 1 were clone sources: counts restart
    drift, p = _run_drift(series, cfg, resets)
    want_drift, want_p = _authors_drift(series, 6, 10, 0.05, resets)
    np.testing.assert_allclose(p, want_p, rtol=2e-4, atol=1e-6)
    np.testing.assert_array_equal(drift, want_drift)
    assert (p[:9] == 1).all()  # untested until the g-window is full (ω = 10 > T_warm = 6)
    assert drift[:, 2].any() and drift[31:40, 1].any()
    assert (p[41:46, 1] == 1).all() and (p[46:, 1] < 1).all()  # count restarts, windows kept


def test_authors_statistic_tracks_only_in_the_expansion_phase():
    cfg = ex.ExpansionConfig(total_steps=100, k_init=2, k_max=2, warm_steps=2, window=3)
    st = ex.init_expansion_state(cfg)
    st, p, _ = jax.jit(lambda s, g: ex.drift_test(s, g, cfg, in_phase=False))(st, jnp.ones(2))
    assert int(st["count"].sum()) == 0 and int(st["g_len"].sum()) == 0 and (p == 1).all()


@pytest.mark.parametrize("statistic", ["authors", "previous"])
def test_quiet_on_stationary_noise(statistic):
    cfg = ex.ExpansionConfig(total_steps=1000, k_init=16, k_max=16, statistic=statistic)
    series = 1.0 + 0.1 * np.random.default_rng(0).standard_normal((600, 16))
    drift, _ = _run_drift(series, cfg)
    first = cfg.omega - 1 if statistic == "authors" else cfg.t_warm
    assert not drift[:first].any()  # nothing is tested before T_warm (authors: a full window)
    rate = drift[first:].mean()
    assert rate < 0.01, rate  # both conservative under i.i.d. noise (≈0.3% per step and slot)


@pytest.mark.parametrize("statistic", ["authors", "previous"])
def test_z_test_fires_on_upward_jump_only(statistic):
    cfg = ex.ExpansionConfig(total_steps=1000, k_init=16, k_max=16, statistic=statistic)
    series = 1.0 + 0.1 * np.random.default_rng(1).standard_normal((300, 16))
    up, down = series.copy(), series.copy()
    up[200:] += 0.3  # a 3σ jump
    down[200:] -= 0.3
    drift_up, p_up = _run_drift(up, cfg)
    first = [np.flatnonzero(drift_up[200:, e])[:1] for e in range(16)]
    assert all(len(f) == 1 and f[0] < 30 for f in first), first
    assert np.median(p_up[210]) < 0.1 * np.median(p_up[150])  # p-values collapse after it
    drift_down, _ = _run_drift(down, cfg)
    assert not drift_down[200:].any()  # one-sided: falling gradient norms never count


@pytest.mark.parametrize("statistic", ["authors", "previous"])
def test_inactive_slots_are_not_tracked(statistic):
    cfg = ex.ExpansionConfig(total_steps=1000, k_init=2, k_max=4, warm_steps=2, window=5,
                             statistic=statistic)
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


# ----------------------------------------------------------------------------- alignment


def test_align_gradients_by_hand():
    """The authors' `_edit_grad_align`: per hidden unit (column r of w_gate / w_up) the source's
    gradient becomes its projection onto w_r, its gate row's onto that row; the copy gets the
    source's original fc1 and gate-row gradients (w_down: zero, as for a fresh slot)."""
    params = _params(11)
    grads = jax.tree.map(lambda p: _normal(12, p.shape), params)
    out = jax.jit(ex.align_gradients)(grads, params, jnp.int32(1), jnp.int32(4))
    for name in ("w_gate", "w_up"):
        g, w = np.asarray(grads["experts"][name][1], np.float64), np.asarray(
            params["experts"][name][1], np.float64)
        want = np.stack([(g[:, r] @ w[:, r]) / (w[:, r] @ w[:, r]) * w[:, r]
                         for r in range(F)], axis=1)
        np.testing.assert_allclose(out["experts"][name][1], want, rtol=1e-4, atol=1e-6)
        np.testing.assert_array_equal(out["experts"][name][4], grads["experts"][name][1])
    gr, wr = np.asarray(grads["router"]["w_g"][1]), np.asarray(params["router"]["w_g"][1])
    np.testing.assert_allclose(out["router"]["w_g"][1], (gr @ wr) / (wr @ wr) * wr, rtol=1e-4,
                               atol=1e-6)
    np.testing.assert_array_equal(out["router"]["w_g"][4], grads["router"]["w_g"][1])
    np.testing.assert_array_equal(out["experts"]["w_down"][1], grads["experts"]["w_down"][1])
    assert not np.asarray(out["experts"]["w_down"][4]).any()
    for tree_out, tree_in in ((out["experts"], grads["experts"]), (out["router"], grads["router"])):
        for name in tree_in:
            for e in (0, 2, 3, 5):
                np.testing.assert_array_equal(tree_out[name][e], tree_in[name][e])
    same = ex.align_gradients(grads, params, 1, 4, enabled=jnp.bool_(False))
    chex.assert_trees_all_equal(same, grads)
    copy_only = ex.align_gradients(grads, params, 1, 4, project_source=False)
    np.testing.assert_array_equal(copy_only["experts"]["w_up"][1], grads["experts"]["w_up"][1])
    np.testing.assert_array_equal(copy_only["experts"]["w_up"][4], grads["experts"]["w_up"][1])


def test_upcycle_copies_one_dense_ffn_into_every_slot():
    from moejax.layers import ffn

    moe = _params(13)
    dense = ffn.init(jax.random.key(1), D, F)
    out = ex.upcycle(moe, dense)
    for name in ("w_gate", "w_up", "w_down"):
        for e in range(K):
            np.testing.assert_array_equal(out["experts"][name][e], dense[name])
    np.testing.assert_array_equal(out["router"]["w_g"], moe["router"]["w_g"])
    with pytest.raises(ValueError, match="do not match"):
        ex.upcycle(moe, {k: v for k, v in dense.items() if k != "w_gate"})
    with pytest.raises(ValueError, match="shape"):
        ex.upcycle(moe, ffn.init(jax.random.key(1), D, F + 1))


# ----------------------------------------------------------------------------- expansion_step


def _run_steps(step_offset, n_steps=45, jump_at=25, **overrides):
    cfg = ex.ExpansionConfig(**{**dict(total_steps=1000, k_init=4, k_max=K, warm_steps=10,
                                       window=20, p_threshold=0.01, cos_delta=1e-3),
                                **overrides})
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
    states = []
    for t in range(n_steps):
        grads = _drifting_grads(params, u, t, jump_at, rng)
        new_params, out_grads, opt_state, st, info = jitted(params, grads, opt_state, st,
                                                            t + step_offset)
        infos.append({**jax.device_get(info), "grads_in": grads, "grads_out": out_grads,
                      "params_in": params})
        states.append(jax.device_get(st))
        params = new_params
        chex.assert_trees_all_equal_shapes_and_dtypes((params, opt_state, st), before)
    return cfg, before, (params, opt_state, st), infos, len(traces), states


def test_expansion_step_clones_once_without_recompiling():
    cfg, (p0, o0, _), (params, opt_state, st), infos, n_traces, states = _run_steps(0, 37)
    assert n_traces == 1
    cloned = [t for t, i in enumerate(infos) if i["cloned"]]
    assert len(cloned) == 1 and 25 <= cloned[0] < 37, cloned  # after the jump
    t = cloned[0]
    info = infos[t]
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
    # The returned gradients are the aligned ones at the clone step only.
    want = ex.align_gradients(info["grads_in"], info["params_in"], 1, 4)
    chex.assert_trees_all_close(info["grads_out"], want, rtol=1e-6)
    for i in infos[:t] + infos[t + 1:]:
        chex.assert_trees_all_equal(i["grads_out"], i["grads_in"])
    # Only the source's count restarted (its windows kept); the copy starts empty.
    s = states[t]
    assert int(s["count"][1]) == 0 and int(s["g_len"][1]) == cfg.omega
    assert int(s["count"][4]) == int(s["g_len"][4]) == int(s["z_len"][4]) == 0
    assert (s["count"][[0, 2, 3]] == t + 1).all()


def test_a_source_clones_again_once_its_count_is_warm():
    """Its windows were kept, so the drift still shows T_warm steps later (the authors' rule);
    the copy cannot be tested before its own window has filled."""
    cfg, *_, infos, _, states = _run_steps(0, 45)
    cloned = [t for t, i in enumerate(infos) if i["cloned"]]
    assert len(cloned) == 2 and cloned[1] - cloned[0] == cfg.t_warm, cloned
    assert [(int(infos[t]["src"]), int(infos[t]["dst"])) for t in cloned] == [(1, 4), (1, 5)]
    assert all(infos[t]["p_value"][4] == 1 for t in range(cloned[0], 45))


def test_expansion_step_previous_statistic_restarts_both_histories():
    *_, infos, _, states = _run_steps(0, statistic="previous", alignment="always")
    t = next(t for t, i in enumerate(infos) if i["cloned"])
    assert int(states[t]["g_len"][1]) == int(states[t]["g_len"][4]) == 0
    # alignment="always": the source's gradient is left for `project_gradients`.
    np.testing.assert_array_equal(infos[t]["grads_out"]["experts"]["w_up"][1],
                                  infos[t]["grads_in"]["experts"]["w_up"][1])


def test_expansion_disabled_after_expand_fraction():
    cfg, (p0, _, s0), (params, _, st), infos, _, _ = _run_steps(
        step_offset=100, statistic="previous")  # expand_until 100
    assert any(i["drift"][1] for i in infos)  # the drift is still detected ...
    assert not any(i["cloned"] for i in infos)  # ... but nothing grows
    np.testing.assert_array_equal(st["active"], s0["active"])
    chex.assert_trees_all_equal(params, p0)
    _, _, _, infos, _, _ = _run_steps(step_offset=100)  # authors: not even tracked
    assert not any(i["drift"].any() for i in infos) and all((i["p_value"] == 1).all()
                                                             for i in infos)


def test_authors_removal_rule_and_patience():
    """Every step clones slot 0 (its norms keep rising, δ = 1 passes every cosine). From the
    third clone on, each new drift first judges the newest clone with `loss_gap`: gap > 0 keeps
    it; gap ≤ 0 replaces it (patience 3 → 2 → 1 → 0, the number of experts unchanged); a no-rise
    at patience 0 masks it for good and stops expansion."""
    cfg = ex.ExpansionConfig(total_steps=1000, k_init=2, k_max=12, warm_steps=1, window=2,
                             p_threshold=0.5, cos_delta=1.0, removal_patience=3)
    params = _params(9, k=12)
    opt_state = optax.adam(1e-3).init(params)
    gaps = [1.0, 1.0, 1.0, -1.0, 0.0, -1.0, 1.0, -1.0, 1.0]

    @jax.jit
    def step(params, grads, opt_state, st, t, gap):
        return ex.expansion_step(params, grads, opt_state, st, t, cfg, loss_gap=lambda: gap)

    st, log, t = ex.init_expansion_state(cfg), [], 0
    for t in range(40):
        scale = (1.0 + t) ** 2  # norms rising; random directions: |cos| < 1
        grads = jax.tree.map(lambda p, s=scale, t=t: _normal(t, p.shape) * s, params)
        gap = gaps[min(sum(e["checked"] for e in log), len(gaps) - 1)]
        params, _, opt_state, st, info = step(params, grads, opt_state, st, t, gap)
        log.append({k: np.asarray(v) for k, v in info.items()} | {"gap": gap})
        if bool(st["stopped"]):
            break
    events = [(bool(e["checked"]), bool(e["removed"]), bool(e["stopped_now"]), bool(e["cloned"]),
               int(e["n_active"])) for e in log if e["found"]]
    # (checked, removed, stopped now, cloned, active after)
    assert events[:2] == [(False, False, False, True, 3), (False, False, False, True, 4)]
    want = [(True, False, False, True, 5), (True, False, False, True, 6),
            (True, False, False, True, 7),                  # gaps +1, +1, +1: kept
            (True, True, False, True, 7), (True, True, False, True, 7),  # -1, 0: replaced
            (True, True, False, True, 7),                   # -1: replaced, patience now 0
            (True, False, False, True, 8),                  # +1: kept
            (True, False, True, False, 7)]                  # -1 at patience 0: masked, stop
    assert events[2:] == want, events
    assert bool(st["stopped"]) and int(st["patience"]) == 0
    assert int(st["n_clones"]) == 9 and int(st["n_removed"]) == 4
    assert int(np.sum(st["active"])) == 7 and int(st["newest"]) == -1
    # Every active clone has an active source; the masked slot left the pairs.
    src = np.asarray(st["clone_src"])
    assert ((src >= 0) == (np.arange(12) >= 2) & np.asarray(st["active"])).all()
    after = step(params, grads, opt_state, st, t + 1, -1.0)[4]
    assert not bool(after["cloned"]) and not bool(after["checked"])  # stopped for good


def test_strikes_removal_update():
    cfg = ex.ExpansionConfig(total_steps=1000, k_init=4, k_max=K, removal_patience=3,
                             removal="strikes")
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


# ----------------------------------------------------------------------------- training hooks


@pytest.mark.slow  # one LM train-step compilation with the hooks: ~10 s alone, a minute loaded
def test_mass_hooks_clone_before_the_update():
    """In the library loop the clone happens before the optimizer step, as in the authors' loop:
    the step's update is the optimizer's on the cloned params with the aligned gradients."""
    from moejax.models import lm, trees
    from moejax.train import steps

    mcfg = lm.LMConfig(vocab_size=16, d_model=8, num_layers=1, num_heads=1, head_dim=8,
                       ffn="moe", d_ff=4, max_seq_len=8,
                       moe=dict(num_experts=4, top_k=1, router="top_p",
                                router_kwargs=(("top_p", 0.5),)))
    # Adam with a large ε: the gate's tiny gradients are not blown up to ±lr by rounding.
    opt = optax.adam(0.1, eps=0.1)
    ecfg = ex.ExpansionConfig(total_steps=20, k_init=2, k_max=4, warm_steps=1, window=2,
                              cos_delta=1.0, expand_fraction=1.0, opt_prefix=trees.ffn_path(0))
    eval_loss = lambda p, s, b: lm.loss_fn(p, s, b, cfg=mcfg, train=False)[0]  # noqa: E731
    hooks = ex.mass_hooks(eval_loss, (ecfg,), opt)
    step = jax.jit(lambda st, b, r: steps.train_step(st, b, r, model=lm, model_cfg=mcfg,
                                                     optimizer=opt, hooks=hooks))
    rng = np.random.default_rng(0)
    batch = {k: jnp.asarray(rng.integers(0, 16, (4, 8)), jnp.int32) for k in ("inputs", "targets")}
    state = steps.init_train_state(lm, mcfg, opt, jax.random.key(0), hooks)
    state, m = step(state, batch, jax.random.key(1))  # step 0: nothing is testable yet
    assert int(m["mass/cloned"]) == 0
    # Slot 0's windows full of large z's: it drifts at the next step, and δ = 1 lets it clone.
    e = dict(state.extra["expansion"][0])
    e.update(z_win=e["z_win"].at[:, 0].set(10.0), z_len=e["z_len"].at[0].set(2))
    pre = dataclasses.replace(state, extra={"expansion": [e]})
    new, m = step(pre, batch, jax.random.key(2))
    assert int(m["mass/cloned"]) == 1
    np.testing.assert_array_equal(new.extra["expansion"][0]["active"], [1, 1, 1, 0])
    np.testing.assert_array_equal(new.model_state["blocks"][0]["router"]["active"], [1, 1, 1, 0])

    @jax.jit
    def expected(pre):
        grads = jax.grad(lambda p: lm.loss_fn(p, pre.model_state, batch, cfg=mcfg, train=True,
                                              rng=jax.random.key(2))[0])(pre.params)
        ffn = trees.ffn_params(pre.params, 0)
        want_grads = trees.replace_ffn_params(grads, 0, ex.align_gradients(
            trees.ffn_params(grads, 0), ffn, 0, 2))
        want_params = trees.replace_ffn_params(pre.params, 0, ex.clone_expert(ffn, 0, 2))
        updates, _ = opt.update(want_grads, pre.opt_state, want_params)
        return optax.apply_updates(want_params, updates)

    ffn = trees.ffn_params(pre.params, 0)
    want = expected(pre)
    chex.assert_trees_all_close(new.params, want, rtol=1e-5, atol=1e-6)
    copy = trees.ffn_params(new.params, 0)["experts"]["w_up"]
    assert not np.allclose(copy[2], ffn["experts"]["w_up"][0])  # the copy was updated too


def test_slot_cosine_over_fc1_or_all_leaves():
    params, grads = _params(14)["experts"], _params(15)["experts"]
    flat = lambda t, e, names: np.concatenate([np.asarray(t[n][e]).ravel() for n in names])  # noqa: E731
    for leaves, names in (("fc1", ("w_gate", "w_up")), ("all", ("w_gate", "w_up", "w_down"))):
        got = np.asarray(ex.slot_cosine(grads, params, leaves=leaves))
        for e in range(K):
            g, w = flat(grads, e, names), flat(params, e, names)
            np.testing.assert_allclose(got[e], g @ w / np.linalg.norm(g) / np.linalg.norm(w),
                                       rtol=1e-4, atol=1e-6)
    with pytest.raises(ValueError, match="leaves"):
        ex.slot_cosine(grads, params, leaves="w_up")


@pytest.mark.parametrize("source, want", [("first", 1), ("min_p", 3)])
def test_source_rule_first_passing_or_smallest_p(source, want):
    """Slots 1 and 3 drift (3 more strongly) and pass δ = 1: the authors take the lowest index,
    `source="min_p"` the smallest p-value."""
    cfg = ex.ExpansionConfig(total_steps=1000, k_init=4, k_max=K, warm_steps=1, window=2,
                             p_threshold=0.2, cos_delta=1.0, source=source)
    st = ex.init_expansion_state(cfg)
    z = jnp.zeros((2, K)).at[:, 1].set(1.5).at[:, 3].set(5.0)
    st = {**st, "z_win": z, "z_len": st["z_len"].at[:4].set(2),
          "g_win": jnp.ones((2, K)), "g_len": st["g_len"].at[:4].set(2),
          "count": st["count"].at[:4].set(5)}
    params = _params(16)
    grads = jax.tree.map(lambda p: _normal(17, p.shape), params)
    opt_state = optax.adam(1e-3).init(params)
    *_, info = jax.jit(lambda p, g, o, s: ex.expansion_step(p, g, o, s, 10, cfg))(
        params, grads, opt_state, st)
    assert np.asarray(info["drift"]).tolist() == [False, True, False, True, False, False]
    assert int(info["src"]) == want and int(info["dst"]) == 4
