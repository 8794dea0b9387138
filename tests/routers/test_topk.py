"""Tests for moejax.routers.topk (and the Switch / z-loss of moejax.moe.losses)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given

from moejax.moe import losses
from moejax.routers import base, topk
from tests.routers import helpers

# 4 tokens × 3 experts; rows sum to 1.
PROBS = np.array(
    [[0.7, 0.2, 0.1],
     [0.1, 0.8, 0.1],
     [0.6, 0.3, 0.1],
     [0.2, 0.2, 0.6]], np.float32)
# Row i of the logits is log(PROBS[i]) + c_i: softmax gives PROBS back, logsumexp gives c_i.
SHIFT = np.array([0.0, 1.0, 2.0, -1.0], np.float32)


@given(case=helpers.router_cases())
@helpers.FAST
def test_properties(case):
    cfg = topk.Config(d_model=case.d, num_experts=case.e, top_k=case.k)
    out, new_state, _, state, _ = helpers.run_case(topk, cfg, case, train=True)
    helpers.check_output(out, n=case.n, e=case.e, active=case.active)
    np.testing.assert_array_equal(new_state["active"], state["active"])
    w, p, m = np.asarray(out.weights), np.asarray(out.probs), np.asarray(out.mask)
    np.testing.assert_array_equal(m.sum(-1), case.k)  # exactly k per token
    np.testing.assert_array_equal(w[m], p[m])
    # The selected probabilities are the k largest of each row.
    kth = np.sort(p, axis=-1)[:, -case.k]
    assert np.all(p[m].reshape(case.n, case.k) >= kth[:, None])
    assert topk.max_assignments(cfg) == case.k


def test_switch_and_z_loss_by_hand():
    # Top-1 choices: experts 0, 1, 0, 2 -> counts (2, 1, 1), f = (0.5, 0.25, 0.25).
    # Mean probs P = (1.6/4, 1.5/4, 0.9/4) = (0.4, 0.375, 0.225).
    # Σ f·P = 0.2 + 0.09375 + 0.05625 = 0.35; Switch = α·E·0.35 = 0.01·3·0.35 = 0.0105.
    # logsumexp of row i is SHIFT[i] = (0, 1, 2, -1); z = 1e-3·mean(0, 1, 4, 1) = 1e-3·1.5 = 0.0015.
    mask = np.eye(3, dtype=bool)[[0, 1, 0, 2]]
    logits = np.log(PROBS) + SHIFT[:, None]
    switch, z = jax.jit(lambda p, m, l: (losses.switch_load_balance_loss(p, m, weight=1e-2),
                                         losses.router_z_loss(l, weight=1e-3)))(PROBS, mask, logits)
    assert float(switch) == pytest.approx(0.0105, abs=1e-7)
    assert float(z) == pytest.approx(0.0015, abs=1e-7)

    # The same numbers through the router: W_g = I, x = logits.
    cfg = topk.Config(d_model=3, num_experts=3, top_k=1)
    out, _ = helpers.jitted(topk)({"w_g": jnp.eye(3)}, {}, jnp.asarray(logits), cfg=cfg, train=True)
    np.testing.assert_allclose(out.probs, PROBS, rtol=1e-6)
    np.testing.assert_array_equal(out.mask, mask)
    assert float(out.metrics["switch_loss"]) == pytest.approx(0.0105, abs=1e-7)
    assert float(out.metrics["z_loss"]) == pytest.approx(0.0015, abs=1e-7)
    assert float(out.aux_loss) == pytest.approx(0.012, abs=1e-7)


def test_losses_over_valid_tokens_by_hand():
    # Token 1 invalid: the other top-1 choices 0, 0, 2 -> f = (2/3, 0, 1/3);
    # P = ((0.7 + 0.6 + 0.2)/3, (0.2 + 0.3 + 0.2)/3, (0.1 + 0.1 + 0.6)/3) = (1.5, 0.7, 0.8)/3;
    # Σ f·P = 1/3 + 0.8/9 = 3.8/9; Switch = 0.01·3·3.8/9 = 0.0114/0.9. z = 1e-3·mean(0, 4, 1).
    valid = jnp.array([True, False, True, True])
    mask = np.eye(3, dtype=bool)[[0, 1, 0, 2]]  # the invalid row's choice is ignored
    logits = np.log(PROBS) + SHIFT[:, None]
    switch = losses.switch_load_balance_loss(PROBS, mask, weight=1e-2, valid=valid)
    z = losses.router_z_loss(logits, weight=1e-3, valid=valid)
    assert float(switch) == pytest.approx(0.0114 / 0.9, abs=1e-7)
    assert float(z) == pytest.approx(1e-3 * 5 / 3, abs=1e-7)


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_nonfinite_token_routed_nowhere(bad):
    # The same four tokens plus a fifth with a non-finite entry: that one selects nothing, the
    # others are routed and weighed as before, and the losses are the by-hand ones above.
    cfg = topk.Config(d_model=3, num_experts=3, top_k=1)
    logits = np.log(PROBS) + SHIFT[:, None]
    x = jnp.asarray(np.concatenate([logits, [[0.0, bad, 1.0]]]), jnp.float32)
    out, _ = helpers.jitted(topk)({"w_g": jnp.eye(3)}, {}, x, cfg=cfg, train=True)
    np.testing.assert_array_equal(out.mask, np.eye(3, dtype=bool)[[0, 1, 0, 2]].tolist()
                                  + [[False] * 3])
    np.testing.assert_array_equal(out.weights[4], 0.0)
    np.testing.assert_allclose(out.probs[:4], PROBS, rtol=1e-6)
    assert float(out.metrics["switch_loss"]) == pytest.approx(0.0105, abs=1e-7)
    assert float(out.metrics["z_loss"]) == pytest.approx(0.0015, abs=1e-7)


def test_loss_weights_zero_disable():
    cfg = topk.Config(d_model=3, num_experts=3, top_k=2, load_balance_weight=0.0,
                      z_loss_weight=0.0)
    out, _ = helpers.jitted(topk)({"w_g": jnp.eye(3)}, {}, jnp.asarray(np.log(PROBS)), cfg=cfg,
                                  train=True)
    assert float(out.aux_loss) == 0.0 and out.aux_loss.dtype == jnp.float32
    assert set(out.metrics) == {"switch_loss", "z_loss"}


def test_init():
    cfg = topk.Config(d_model=64, num_experts=8)
    helpers.check_init(topk, cfg)
    params, state = topk.init(jax.random.key(0), cfg)
    assert state == {}
    assert 0.8 / 8 < float(jnp.std(params["w_g"])) < 1.2 / 8  # std d**-0.5


def test_jit_grad_and_bf16_input():
    cfg = topk.Config(d_model=8, num_experts=5, top_k=2, renormalize=True)
    params, state = helpers.setup(topk, cfg, 0, active=[True, True, False, True, True])
    x = helpers.make_x(0, 16, 8)
    grads = helpers.check_grad(topk, cfg, params, state, x, train=True)
    assert float(jnp.max(jnp.abs(grads["w_g"][2]))) == 0  # inactive slot: no gradient
    bf16, _ = helpers.jitted(topk)(params, state, x.astype(jnp.bfloat16), cfg=cfg, train=False)
    assert bf16.weights.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(bf16.weights).sum(-1), 1.0, rtol=1e-5)  # renormalize


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(top_k=5), "top_k"),
        (dict(load_balance_weight=-1.0), "load_balance_weight"),
        (dict(z_loss_weight=float("nan")), "z_loss_weight"),
        (dict(renormalize=1), "renormalize"),
    ],
)
def test_bad_config(kwargs, field):
    with pytest.raises(ValueError, match=field):
        topk.Config(d_model=4, num_experts=4, **kwargs)


def test_bad_input_width():
    cfg = topk.Config(d_model=4, num_experts=3)
    params, state = topk.init(jax.random.key(0), cfg)
    with pytest.raises(ValueError, match="d_model"):
        topk.route(params, state, jnp.ones((2, 5)), cfg=cfg, train=False)
    with pytest.raises(ValueError, match="x"):
        topk.route(params, state, jnp.ones((2, 3, 4)), cfg=cfg, train=False)


def test_registered():
    assert base.get_router("topk") is topk
    assert base.router_name(topk.Config(d_model=2, num_experts=2)) == "topk"
