"""Tests for moejax.routers.topk (the shared contract: test_contract.py; the losses by hand:
test_losses.py)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given

from moejax.routers import topk
from tests.routers import helpers
from tests.routers.helpers import PROBS, SHIFT


@given(case=helpers.router_cases())
@helpers.FAST
def test_properties(case):
    cfg = topk.Config(d_model=case.d, num_experts=case.e, top_k=case.k)
    out, _, _, _, _ = helpers.run_case(topk, cfg, case, train=True)
    w, p, m = np.asarray(out.weights), np.asarray(out.probs), np.asarray(out.mask)
    np.testing.assert_array_equal(m.sum(-1), case.k)  # exactly k per token
    np.testing.assert_array_equal(w[m], p[m])
    # The selected probabilities are the k largest of each row.
    kth = np.sort(p, axis=-1)[:, -case.k]
    assert np.all(p[m].reshape(case.n, case.k) >= kth[:, None])
    assert topk.max_assignments(cfg) == case.k


def test_switch_and_z_loss_by_hand():
    # The numbers of test_losses.test_switch_and_z_loss_by_hand through the router: W_g = I,
    # x = logits, top-1 choices 0, 1, 0, 2; Switch 0.0105, z 0.0015.
    mask = np.eye(3, dtype=bool)[[0, 1, 0, 2]]
    logits = np.log(PROBS) + SHIFT[:, None]
    cfg = topk.Config(d_model=3, num_experts=3, top_k=1)
    out, _ = helpers.jitted(topk)({"w_g": jnp.eye(3)}, {}, jnp.asarray(logits), cfg=cfg, train=True)
    np.testing.assert_allclose(out.probs, PROBS, rtol=1e-6)
    np.testing.assert_array_equal(out.mask, mask)
    assert float(out.metrics["switch_loss"]) == pytest.approx(0.0105, abs=1e-7)
    assert float(out.metrics["z_loss"]) == pytest.approx(0.0015, abs=1e-7)
    assert float(out.aux_loss) == pytest.approx(0.012, abs=1e-7)


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


def test_init_std():
    params, _ = topk.init(jax.random.key(0), topk.Config(d_model=64, num_experts=8))
    assert 0.8 / 8 < float(jnp.std(params["w_g"])) < 1.2 / 8  # std d**-0.5


def test_bf16_input_renormalized():
    # (Gradients, with renormalize and an inactive slot: test_contract.test_grads.)
    cfg = topk.Config(d_model=8, num_experts=5, top_k=2, renormalize=True)
    params, state = helpers.setup(topk, cfg, 0, active=[True, True, False, True, True])
    x = helpers.make_x(0, 16, 8)
    bf16, _ = helpers.jitted(topk)(params, state, x.astype(jnp.bfloat16), cfg=cfg, train=False)
    assert bf16.weights.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(bf16.weights).sum(-1), 1.0, rtol=1e-5)  # renormalize


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(load_balance_weight=-1.0), "load_balance_weight"),
        (dict(z_loss_weight=float("nan")), "z_loss_weight"),
        (dict(renormalize=1), "renormalize"),
    ],
)
def test_bad_config(kwargs, field):
    with pytest.raises(ValueError, match=field):
        topk.Config(d_model=4, num_experts=4, **kwargs)
