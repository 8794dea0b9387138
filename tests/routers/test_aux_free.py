"""Tests for moejax.routers.aux_free (the shared contract: test_contract.py)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given

from moejax.routers import aux_free
from tests.routers import helpers


@given(case=helpers.router_cases())
@helpers.FAST
def test_properties(case):
    cfg = aux_free.Config(d_model=case.d, num_experts=case.e, top_k=case.k)
    params, state = helpers.setup(aux_free, cfg, case.seed, case.active)
    rng = np.random.default_rng(case.seed)
    state = {**state, "bias": jnp.asarray(rng.normal(size=case.e) * 0.1, jnp.float32)}
    x = helpers.make_x(case.seed, case.n, case.d, scale=case.scale)
    out, new_state = helpers.jitted(aux_free)(params, state, x, cfg=cfg, train=True)
    w, m = np.asarray(out.weights), np.asarray(out.mask)
    np.testing.assert_array_equal(m.sum(-1), case.k)
    np.testing.assert_allclose(w.sum(-1), 1.0, rtol=1e-5)
    # Weights are the sigmoid affinities of the selected experts, normalised.
    aff = 1 / (1 + np.exp(-np.asarray(x, np.float64) @ np.asarray(params["w_g"], np.float64).T))
    s = np.where(m, aff, 0.0)
    np.testing.assert_allclose(w, s / s.sum(-1, keepdims=True), rtol=1e-4, atol=1e-6)
    # Selection follows s + b: every selected score beats every unselected active one.
    score = aff + np.asarray(state["bias"])
    unselected = np.where(~m & case.active, score, -np.inf).max(-1)
    assert np.all(np.where(m, score, np.inf).min(-1) >= unselected - 1e-6)
    # The update moves every active bias by exactly γ or 0; inactive slots keep theirs.
    step = np.asarray(new_state["bias"] - state["bias"])
    assert np.all(np.isclose(np.abs(step[case.active]), 1e-3) | (step[case.active] == 0))
    assert np.all(step[~case.active] == 0)
    assert aux_free.max_assignments(cfg) == case.k


def test_bias_update_by_hand():
    # Top-1 choices of 4 tokens: experts 0, 0, 1, 2 -> load (2, 1, 1, 0), mean 1.
    # b += γ·sign(1 − load) = γ·(−1, 0, 0, +1).
    mask = np.eye(4, dtype=bool)[[0, 0, 1, 2]]
    got = aux_free.update_bias(jnp.zeros(4), mask, jnp.ones(4, bool), 0.5)
    np.testing.assert_array_equal(got, [-0.5, 0.0, 0.0, 0.5])
    # Slot 3 inactive: the mean is over the 3 active slots, 4/3; load (2, 1, 1) gives signs
    # (−1, +1, +1), and slot 3 keeps its bias.
    got = aux_free.update_bias(jnp.zeros(4), mask, jnp.array([True, True, True, False]), 0.5)
    np.testing.assert_array_equal(got, [-0.5, 0.5, 0.5, 0.0])


def test_bias_moves_load_towards_uniform():
    # Expert logits offset from +2 to -2: top-2 load starts at MaxVio ≈ 2.5. With γ = 0.01,
    # 40 training forwards bring it below 0.5; weights never see the bias.
    n, d, e = 256, 8, 8
    rng = np.random.default_rng(0)
    x = rng.normal(size=(n, d)).astype(np.float32)
    x[:, 0] = 1.0
    w = (rng.normal(size=(e, d)) * d**-0.5).astype(np.float32)
    w[:, 0] = np.linspace(2.0, -2.0, e)
    params, x = {"w_g": jnp.asarray(w)}, jnp.asarray(x)
    cfg = aux_free.Config(d_model=d, num_experts=e, top_k=2, bias_update_rate=1e-2)
    route = helpers.jitted(aux_free)

    def max_violation(state):
        out, _ = route(params, state, x, cfg=cfg, train=False)
        load = np.asarray(out.mask).sum(0)
        return load.max() / load.mean() - 1

    state = {"bias": jnp.zeros(e)}
    before = max_violation(state)
    for _ in range(40):
        _, state = route(params, state, x, cfg=cfg, train=True)
    after = max_violation(state)
    assert before > 2.0 and after < 0.5, (before, after)
    assert np.all(np.diff(np.asarray(state["bias"])) >= -1e-6)  # favoured experts pushed down


def test_eval_keeps_state_and_no_grad_into_bias():
    # (Gradients wrt params: test_contract.test_grads.)
    cfg = aux_free.Config(d_model=6, num_experts=4, top_k=2)
    params, state = helpers.setup(aux_free, cfg, 0, active=[True, True, False, True])
    x = helpers.make_x(0, 16, 6)
    _, same = helpers.jitted(aux_free)(params, state, x, cfg=cfg, train=False)
    np.testing.assert_array_equal(same["bias"], state["bias"])
    np.testing.assert_array_equal(same["active"], state["active"])

    def loss(bias):
        out, _ = aux_free.route(params, {**state, "bias": bias}, x, cfg=cfg, train=True)
        return jnp.sum(out.weights**2)

    np.testing.assert_array_equal(jax.jit(jax.grad(loss))(state["bias"]), 0.0)


def test_missing_bias_raises():
    cfg = aux_free.Config(d_model=3, num_experts=3, top_k=1)
    with pytest.raises(ValueError, match="bias"):
        aux_free.route({"w_g": jnp.eye(3)}, {}, jnp.ones((2, 3)), cfg=cfg, train=True)


@pytest.mark.parametrize(
    "kwargs, field",
    [(dict(bias_update_rate=-1e-3), "bias_update_rate"), (dict(axis_name=3), "axis_name"),
     (dict(axis_name=()), "axis_name"), (dict(n_group=3), "n_group=3 must divide"),
     (dict(n_group=4), "groups of >= 2"), (dict(n_group=2, topk_group=3), "topk_group"),
     (dict(n_group=2, topk_group=1, top_k=3), "top_k=3 exceeds"),
     (dict(norm_topk_prob=1), "norm_topk_prob"),
     (dict(routed_scaling_factor=-1.0), "routed_scaling_factor")],
)
def test_bad_config(kwargs, field):
    with pytest.raises(ValueError, match=field):
        aux_free.Config(d_model=4, num_experts=4, **kwargs)


@pytest.mark.parametrize("n_group,topk_group,norm,factor", [
    (1, 1, True, 1.0), (4, 2, True, 2.5), (4, 1, False, 1.0), (8, 3, False, 0.7)])
def test_deepseek_v3_routing_equals_transformers(n_group, topk_group, norm, factor):
    """Group-limited selection, `norm_topk_prob` and `routed_scaling_factor` as transformers'
    `DeepseekV3TopkRouter`, whose `e_score_correction_bias` is our state's bias."""
    torch = pytest.importorskip("torch")
    ds = pytest.importorskip("transformers.models.deepseek_v3.modeling_deepseek_v3")
    from transformers import DeepseekV3Config

    E, d, k, N = 16, 12, 3, 64
    cfg = aux_free.Config(d_model=d, num_experts=E, top_k=k, n_group=n_group,
                          topk_group=topk_group, norm_topk_prob=norm,
                          routed_scaling_factor=factor)
    ks = jax.random.split(jax.random.key(n_group), 3)
    w = jax.random.normal(ks[0], (E, d))
    bias = 0.3 * jax.random.normal(ks[1], (E,))
    x = jax.random.normal(ks[2], (N, d))
    out, _ = aux_free.route({"w_g": w}, {"bias": bias}, x, cfg=cfg, train=False)
    hf = ds.DeepseekV3TopkRouter(DeepseekV3Config(
        hidden_size=d, n_routed_experts=E, num_experts_per_tok=k, n_group=n_group,
        topk_group=topk_group, norm_topk_prob=norm, routed_scaling_factor=factor))
    with torch.no_grad():
        hf.weight.copy_(torch.tensor(np.asarray(w)))
        hf.e_score_correction_bias.copy_(torch.tensor(np.asarray(bias)))
        _, tw, ti = hf(torch.tensor(np.asarray(x)))
    ref = np.zeros((N, E), np.float32)
    np.put_along_axis(ref, ti.numpy(), tw.numpy(), axis=1)
    np.testing.assert_array_equal(np.asarray(out.mask), ref > 0)
    np.testing.assert_allclose(np.asarray(out.weights), ref, rtol=1e-5, atol=1e-7)
