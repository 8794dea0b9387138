"""Tests for moejax.routers.star (GHA subspace + rotated, σ(a)-mixed routing; DESIGN §4; the
shared contract: test_contract.py)."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from moejax.routers import aux_free, star
from tests.routers import helpers_p as H

CFG = star.Config(d_model=H.D, num_experts=H.E, top_k=2, orthogonal_r=True)
CFG_FREE = star.Config(d_model=H.D, num_experts=H.E, top_k=1, orthogonal_r=False,
                       gha_only=True, load_balance_weight=1e-2, eta=1e-2)
CFG_ETA = star.Config(d_model=H.D, num_experts=H.E, eta=0.1, orthogonal_r=False)


# expm(P − P^T) is slow to compile on CPU, so only one of the three variants uses it.
@given(case=H.cases(), cfg_train=st.sampled_from([(CFG, True), (CFG_FREE, True),
                                                  (CFG_FREE, False)]))
@H.FAST
def test_properties(case, cfg_train):
    (seed, scale, active), (cfg, train) = case, cfg_train
    params, state = H.setup(star, cfg, seed, active)
    out, new_state = H.jitted(star)(params, state, H.make_x(seed, scale=scale), cfg=cfg,
                                    train=train)
    np.testing.assert_array_equal(np.asarray(out.mask).sum(-1), min(cfg.top_k, active.sum()))
    assert star.max_assignments(cfg) == cfg.top_k
    v = np.asarray(new_state["v"])
    np.testing.assert_allclose(np.linalg.norm(v, axis=-1), 1.0, rtol=1e-5)
    assert np.array_equal(v, state["v"]) != train  # V moves exactly when training
    np.testing.assert_allclose(float(out.metrics["mix_mean"]), 0.5)  # a = 0 at init


# d = 8 > E = 3; η large so a few hundred GHA steps converge. R plays no part in the GHA step,
# so the (default) free R avoids compiling expm again.
CFG_GHA = star.Config(d_model=8, num_experts=3, top_k=1, eta=0.02)


def test_init():
    # (Param and state names, V being state and not a param: test_contract.test_init_structure.)
    params, state = H.setup(star, CFG, 0)
    v = np.asarray(state["v"])
    np.testing.assert_allclose(np.linalg.norm(v, axis=-1), 1.0, rtol=1e-6)  # E > d: unit rows
    np.testing.assert_array_equal(star.rotation(params, CFG), np.eye(H.E))  # P = 0: R = I
    # The authors' defaults: W_g ~ N(0, 0.01²), free R with orthogonal init, V = normalise(randn)
    # (unit rows, not orthogonal to each other).
    cfg = star.Config(d_model=64, num_experts=8)
    params, state = H.setup(star, cfg, 0)
    assert set(params) == {"w_g", "r", "a"} and state["v"].dtype == np.float32
    np.testing.assert_allclose(np.std(np.asarray(params["w_g"])), 0.01, rtol=0.1)
    r, v = np.asarray(params["r"]), np.asarray(state["v"])
    np.testing.assert_allclose(r @ r.T, np.eye(8), atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(v, axis=-1), 1.0, rtol=1e-6)
    assert np.abs(v @ v.T - np.eye(8)).max() > 0.1  # independent random rows
    # The old options: 1/√d gate, orthonormal V by QR.
    old = dataclasses.replace(cfg, gate_init_std=None, v_init="orthonormal")
    params, state = H.setup(star, old, 0)
    np.testing.assert_allclose(np.std(np.asarray(params["w_g"])), 64**-0.5, rtol=0.1)
    v = np.asarray(state["v"])
    np.testing.assert_allclose(v @ v.T, np.eye(8), atol=1e-5)
    # bf16 storage: the same normalised rows, rounded.
    bf = dataclasses.replace(cfg, v_dtype="bfloat16")
    _, state_bf = H.setup(star, bf, 0)
    _, state_f = H.setup(star, cfg, 0)
    assert state_bf["v"].dtype == jnp.bfloat16
    np.testing.assert_array_equal(state_bf["v"], state_f["v"].astype(jnp.bfloat16))


def test_lm_recipe():
    cfg = star.lm_recipe(64, 8)
    assert (cfg.top_k, cfg.load_balance_weight, cfg.eta, cfg.renormalize) == (1, 1e-2, 5e-5,
                                                                             False)
    assert (cfg.v_dtype, cfg.gha_steps, cfg.gate_init_std, cfg.orthogonal_r) == (
        "float32", 1, 0.01, False)
    quirks = star.lm_recipe(64, 8, quirks=True, eta=0.0)
    assert (quirks.v_dtype, quirks.gha_steps, quirks.eta) == ("bfloat16", 2, 0.0)
    with pytest.raises(ValueError, match="quirks"):
        star.lm_recipe(64, 8, quirks=1)


def test_gha_step_by_hand():
    # V = I, one token x = (1, 1), so y = (1, 1). Sanger: Δv_1 = y_1 (x − y_1 v_1) = (0, 1);
    # Δv_2 = y_2 (x − y_1 v_1 − y_2 v_2) = (0, 0). With η = 0.5, v_1 = (1, 0.5)/√1.25.
    v = jax.jit(star.gha_step, static_argnames="eta")(jnp.eye(2), jnp.ones((1, 2)), eta=0.5)
    np.testing.assert_allclose(v, [[1 / 1.25**0.5, 0.5 / 1.25**0.5], [0.0, 1.0]], rtol=1e-6)
    # Non-finite tokens are left out of the sums and of N: the same step as above.
    x = jnp.array([[1.0, 1.0], [jnp.nan, 0.0], [jnp.inf, 1.0]])
    v = jax.jit(star.gha_step, static_argnames="eta")(jnp.eye(2), x, eta=0.5)
    np.testing.assert_allclose(v, [[1 / 1.25**0.5, 0.5 / 1.25**0.5], [0.0, 1.0]], rtol=1e-6)


def test_bf16_storage_loses_small_steps():
    # One row v = (0.6, 0.8) (exact in bf16? no: 0.6 rounds to 0.6015625), one token x = (1, 0):
    # y = v_1, Δv = y (x − y v). At η = 1e-4 the step (≈ 4e-5) is far below half a bf16 ulp of
    # the entries (2^-9), so the bf16 buffer never changes while the float32 one does.
    gha = jax.jit(star.gha_step, static_argnames=("eta", "dtype"))
    v0, x = jnp.array([[0.6, 0.8]]), jnp.array([[1.0, 0.0]])
    v_bf = v0.astype(jnp.bfloat16)
    out = gha(v_bf, x, eta=1e-4, dtype=jnp.bfloat16)
    assert out.dtype == jnp.bfloat16
    np.testing.assert_array_equal(out, v_bf)
    assert np.abs(np.asarray(gha(v0, x, eta=1e-4)) - np.asarray(v0)).max() > 1e-5
    # A large step: the float32 step from the bf16 values, rounded after the add and the
    # normalisation (computed here by hand in float64).
    v = np.asarray(v_bf, np.float64)
    y = v @ x[0]
    s = v + 0.5 * y * (np.asarray(x[0]) - y * v)
    s = np.asarray(jnp.asarray(s, jnp.float32).astype(jnp.bfloat16), np.float64)
    want = jnp.asarray(s / np.linalg.norm(s), jnp.float32).astype(jnp.bfloat16)
    np.testing.assert_array_equal(gha(v_bf, x, eta=0.5, dtype=jnp.bfloat16), want)


def test_gha_steps_and_routing_order():
    # gha_steps=2 is two steps on the same tokens; the routing of that forward uses the updated
    # V (the same weights as an eval forward from the updated state); η = 0 never moves V.
    cfg = dataclasses.replace(CFG_ETA, gha_steps=2)
    params, state = H.setup(star, cfg, 0)
    x = H.make_x(9)
    gha = jax.jit(star.gha_step, static_argnames="eta")
    want = gha(gha(state["v"], x, eta=cfg.eta), x, eta=cfg.eta)
    out, new_state = H.jitted(star)(params, state, x, cfg=cfg, train=True)
    np.testing.assert_allclose(new_state["v"], want, atol=1e-6)
    assert np.abs(np.asarray(want) - np.asarray(gha(state["v"], x, eta=cfg.eta))).max() > 1e-3
    ref, _ = H.jitted(star)(params, {**state, "v": want}, x, cfg=cfg, train=False)
    np.testing.assert_allclose(out.weights, ref.weights, atol=1e-6)
    frozen = dataclasses.replace(cfg, eta=0.0)
    _, still = H.jitted(star)(params, state, x, cfg=frozen, train=True)
    np.testing.assert_array_equal(still["v"], state["v"])


def test_overflowing_step_keeps_v():
    # Finite tokens whose products overflow float32: the step is skipped, V stays finite.
    v = jnp.eye(2)
    x = jnp.array([[1e30, 1e30], [1.0, 0.0]])
    out = jax.jit(star.gha_step, static_argnames="eta")(v, x, eta=0.1)
    np.testing.assert_array_equal(out, v)


def test_gha_converges_to_principal_subspace():
    n, steps = 256, 300
    d, e = CFG_GHA.d_model, CFG_GHA.num_experts
    lam = np.array([10.0, 6.0, 3.0, 1.0, 0.5, 0.3, 0.2, 0.1])
    q = np.linalg.qr(np.random.default_rng(0).normal(size=(d, d)))[0]
    evals, evecs = np.linalg.eigh(q @ np.diag(lam) @ q.T)  # zero-mean Gaussian's covariance
    top = evecs[:, np.argsort(evals)[::-1][:e]]  # [d, e], principal directions
    params, state = H.setup(star, CFG_GHA, 1)
    root = jnp.asarray(q * np.sqrt(lam), jnp.float32)  # x = z root^T has that covariance

    @jax.jit
    def run(state):
        def body(state, key):
            x = jax.random.normal(key, (n, d)) @ root.T
            return star.route(params, state, x, cfg=CFG_GHA, train=True)[1], None
        return jax.lax.scan(body, state, jax.random.split(jax.random.key(2), steps))[0]

    v = np.asarray(run(state)["v"], np.float64)
    cosines = np.linalg.svd(top.T @ np.linalg.qr(v.T)[0], compute_uv=False)
    assert cosines.min() > 0.99, f"principal angles too large: cos = {cosines}"
    # Sanger's ordering: row i tracks the i-th eigenvector (up to sign).
    assert np.all(np.abs(np.sum(v * top.T, axis=-1)) > 0.95)


def test_training_keeps_r_orthogonal_and_v_gradient_free():
    # 20 SGD steps on all params (P included) through training forwards (GHA step on).
    params, state = H.setup(star, CFG, 0)
    x = H.make_x(5, 64)
    proj = jax.random.normal(jax.random.key(1), (64, H.E))

    @jax.jit
    def sgd(params):
        def loss(p, s):
            out, _ = star.route(p, s, x, cfg=CFG, train=True)
            return jnp.sum(out.weights * proj)
        g, g_state = jax.grad(loss, argnums=(0, 1))(params, state)
        return jax.tree.map(lambda p, g: p - 5.0 * g, params, g), g, g_state

    for _ in range(20):
        params, g, g_state = sgd(params)
        np.testing.assert_array_equal(g_state["v"], 0.0)  # no gradient flows into V
        assert all(H.nonzero(g[name]) for name in ("w_g", "p", "a"))
    p = np.asarray(params["p"])
    assert np.abs(p - p.T).max() > 0.05  # R really moved ...
    r = np.asarray(star.rotation(params, CFG))
    np.testing.assert_allclose(r @ r.T, np.eye(H.E), atol=1e-5)  # ... and stayed orthogonal


def test_gha_only_gradients():
    params, state = H.setup(star, CFG_FREE, 0)
    g, g_state = H.grads(star, CFG_FREE, params, state, H.make_x(6), train=True, wrt="both")
    np.testing.assert_array_equal(g_state["v"], 0.0)
    # Routes by x Z^T alone: no gradient to the gate or the mixing, only to R.
    assert not H.nonzero(g["w_g"]) and not H.nonzero(g["a"]) and H.nonzero(g["r"])


@pytest.mark.parametrize("ttu", [False, True])
def test_test_time_update(ttu):
    cfg = dataclasses.replace(CFG_ETA, test_time_update=ttu)
    params, state = H.setup(star, CFG_ETA, 0)
    out, new_state = H.jitted(star)(params, state, H.make_x(7), cfg=cfg, train=False)
    assert np.array_equal(new_state["v"], state["v"]) != ttu
    assert (float(out.metrics["v_update_norm"]) > 0) == ttu


def test_global_means_over_axis_name():
    # 4 data-parallel shards via vmap(axis_name=...) hold the same V as one device on all tokens.
    cfg, cfg_ax = CFG_ETA, dataclasses.replace(CFG_ETA, axis_name="data")
    params, state = H.setup(star, cfg, 0)
    x = H.make_x(8, 4 * H.N)
    route = functools.partial(star.route, params, state, cfg=cfg_ax, train=True)
    out_ax, state_ax = jax.jit(jax.vmap(route, axis_name="data"))(x.reshape(4, H.N, H.D))
    out, new_state = H.jitted(star)(params, state, x, cfg=cfg, train=True)
    for shard_v in np.asarray(state_ax["v"]):
        np.testing.assert_allclose(shard_v, new_state["v"], atol=1e-6)
    np.testing.assert_allclose(out_ax.weights.reshape(-1, H.E), out.weights, atol=1e-6)


# ------------------------------------------- DeepSeek-V3 / aux-free options (upcycled routers)


def _aux_pair(n_group, topk_group, norm, factor, E=16, d=12, k=3):
    aux = aux_free.Config(d_model=d, num_experts=E, top_k=k, n_group=n_group,
                          topk_group=topk_group, norm_topk_prob=norm,
                          routed_scaling_factor=factor, bias_update_rate=1e-2)
    cfg = star.Config(d_model=d, num_experts=E, top_k=k, n_group=n_group, topk_group=topk_group,
                      renormalize=norm, routed_scaling_factor=factor, score_fn="sigmoid",
                      selection_bias=True, bias_update_rate=1e-2)
    return aux, cfg


@pytest.mark.parametrize("n_group,topk_group,norm,factor", [
    (1, 1, True, 1.0), (4, 2, True, 2.5), (4, 1, False, 1.0), (8, 3, False, 0.7)])
def test_aux_free_options_route_as_aux_free_at_full_mix(n_group, topk_group, norm, factor):
    """With aux-free's options, its W_g and σ(a) = 1 (in float32), STAR's selection, weights,
    probs and bias update are aux-free's, bit for bit (aux-free itself equals transformers'
    DeepseekV3TopkRouter: test_aux_free); at σ(a) = 0.5 the subspace term changes them."""
    aux, cfg = _aux_pair(n_group, topk_group, norm, factor)
    E, d = cfg.num_experts, cfg.d_model
    ks = jax.random.split(jax.random.key(n_group), 4)
    w = jax.random.normal(ks[0], (E, d))
    bias = 0.3 * jax.random.normal(ks[1], (E,))
    x = jax.random.normal(ks[2], (64, d)).at[5].set(jnp.nan)  # a bad token: routed nowhere
    active = jnp.ones((E,), bool).at[3].set(False)
    params, state = star.init(ks[3], cfg)
    np.testing.assert_array_equal(state["bias"], np.zeros(E))
    full = {**params, "w_g": w, "a": jnp.full((E,), 30.0)}  # σ(30) = 1 in float32
    assert float(jax.nn.sigmoid(full["a"][0])) == 1.0
    for extra in ({}, {"active": active}):
        ref, ref_state = aux_free.route({"w_g": w}, {"bias": bias, **extra}, x, cfg=aux,
                                        train=True)
        out, new_state = star.route(full, {**state, "bias": bias, **extra}, x, cfg=cfg,
                                    train=True)
        for name in ("mask", "weights", "probs"):
            np.testing.assert_array_equal(getattr(out, name), getattr(ref, name), err_msg=name)
        np.testing.assert_array_equal(new_state["bias"], ref_state["bias"])
        assert not np.array_equal(new_state["bias"], bias)  # the update is on
        np.testing.assert_array_equal(out.metrics["bias_abs_max"], ref.metrics["bias_abs_max"])
        assert not np.asarray(out.mask)[5].any()
    half, _ = star.route({**params, "w_g": w}, {**state, "bias": bias}, x, cfg=cfg, train=False)
    assert np.abs(np.asarray(half.weights) - np.asarray(ref.weights)).max() > 1e-3


@pytest.mark.parametrize("score_fn", star.SCORE_FNS)
def test_selection_bias_steers_selection_not_weights(score_fn):
    cfg = star.Config(d_model=H.D, num_experts=H.E, top_k=2, score_fn=score_fn,
                      selection_bias=True, routed_scaling_factor=2.0)
    params, state = H.setup(star, cfg, 0)
    x = H.make_x(3)
    plain, _ = star.route(params, state, x, cfg=cfg, train=True)  # bias 0, rate 0
    boosted, new_state = star.route(params, {**state, "bias": jnp.zeros(H.E).at[4].set(10.0)}, x,
                                    cfg=cfg, train=True)
    np.testing.assert_array_equal(new_state["bias"][4], 10.0)  # bias_update_rate 0: fixed
    assert np.asarray(boosted.mask)[:, 4].all()  # selected by every token ...
    # ... with its unbiased score as weight (× the scaling factor): the probs for softmax,
    # σ(logits) for sigmoid (whose probs are those normalised).
    if score_fn == "softmax":
        scores = np.asarray(plain.probs)
    else:
        scores = np.asarray(jax.nn.sigmoid(_mixed_logits(params, new_state, x, cfg)))
        np.testing.assert_allclose(plain.probs, scores / scores.sum(-1, keepdims=True),
                                   rtol=1e-5)
    np.testing.assert_allclose(boosted.weights, 2.0 * np.where(boosted.mask, scores, 0.0),
                               rtol=1e-5)


def _mixed_logits(params, state, x, cfg):
    z = star.rotation(params, cfg) @ state["v"]
    mix = jax.nn.sigmoid(params["a"])
    return mix * (x @ params["w_g"].T) + (1 - mix) * (x @ z.T)


def test_general_selection_path_agrees_with_the_default_one():
    # A zero selection bias takes the biased / grouped selection code; it selects and weighs as
    # the default (plain top-k) code does, softmax and sigmoid alike.
    for score_fn in star.SCORE_FNS:
        cfg = star.Config(d_model=H.D, num_experts=H.E, top_k=2, score_fn=score_fn,
                          renormalize=True)
        biased = dataclasses.replace(cfg, selection_bias=True)
        params, state = H.setup(star, cfg, 1, active=np.array([1, 1, 0, 1, 1, 1], bool))
        x = H.make_x(4).at[2].set(jnp.inf)
        a, _ = star.route(params, state, x, cfg=cfg, train=False)
        b, _ = star.route(params, {**state, "bias": jnp.zeros(H.E)}, x, cfg=biased, train=False)
        np.testing.assert_array_equal(a.mask, b.mask)
        np.testing.assert_array_equal(a.weights, b.weights)


def test_aux_free_options_gradients_and_state():
    _, cfg = _aux_pair(4, 2, True, 2.5, E=8, d=H.D, k=2)
    params, state = H.setup(star, cfg, 0)
    assert set(state) == {"v", "bias"} and state["bias"].dtype == np.float32
    state = {**state, "bias": 0.1 * jax.random.normal(jax.random.key(1), (8,))}
    g, g_state = H.grads(star, cfg, params, state, H.make_x(6), train=True, wrt="both")
    np.testing.assert_array_equal(g_state["bias"], 0.0)  # selection only: no gradient
    np.testing.assert_array_equal(g_state["v"], 0.0)
    assert all(H.nonzero(g[name]) for name in ("w_g", "r", "a"))
    _, kept = star.route(params, state, H.make_x(6), cfg=cfg, train=False)  # eval: no update
    np.testing.assert_array_equal(kept["bias"], state["bias"])
    with pytest.raises(ValueError, match=r"selection_bias=True needs state\['bias'\]"):
        star.route(params, {"v": state["v"]}, H.make_x(6), cfg=cfg, train=False)


@pytest.mark.parametrize("kwargs, field", [
    ({"eta": -1e-3}, "eta"), ({"eta": float("nan")}, "eta"), ({"orthogonal_r": 1}, "orthogonal_r"),
    ({"score_fn": "tanh"}, "score_fn"), ({"selection_bias": 1}, "selection_bias"),
    ({"bias_update_rate": -1.0}, "bias_update_rate"),
    ({"bias_update_rate": 1e-3}, "set selection_bias=True"), ({"n_group": 0}, "n_group"),
    ({"n_group": 4}, "n_group=4 must divide"), ({"n_group": 6}, "groups of >= 2"),
    ({"n_group": 3, "topk_group": 4}, "topk_group"),
    ({"n_group": 3, "topk_group": 1, "top_k": 3}, "top_k=3 exceeds"),
    ({"routed_scaling_factor": 0.0}, "routed_scaling_factor"),
    ({"gate_init_std": 0.0}, "gate_init_std"), ({"v_init": "qr"}, "v_init"),
    ({"v_dtype": "float16"}, "v_dtype"), ({"gha_steps": 0}, "gha_steps"),
    ({"test_time_update": None}, "test_time_update"), ({"axis_name": 3}, "axis_name"),
    ({"load_balance_weight": -1.0}, "load_balance_weight"), ({"axis_name": ("data", 1)},
                                                              "axis_name"),
])
def test_bad_config(kwargs, field):
    with pytest.raises(ValueError, match=field):
        star.Config(d_model=4, num_experts=6, **kwargs)
