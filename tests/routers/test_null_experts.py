"""Tests for moejax.routers.null_experts (AdaMoE null experts in the top-k pool; the shared
contract, gradients to w_g and w_null included: test_contract.py)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from moejax.routers import null_experts
from tests.routers import helpers_p as H

CFG = null_experts.Config(d_model=H.D, num_experts=H.E, top_k=2, num_null=3)


@given(case=H.cases(), cfg=st.sampled_from([
    CFG, null_experts.Config(d_model=H.D, num_experts=H.E, top_k=4, num_null=1),
    null_experts.Config(d_model=H.D, num_experts=H.E, top_k=2, num_null=0)]))
@H.FAST
def test_properties(case, cfg):
    seed, scale, active = case
    params, state = H.setup(null_experts, cfg, seed, active)
    out, _ = H.jitted(null_experts)(params, state, H.make_x(seed, scale=scale), cfg=cfg,
                                    train=True)
    # Tokens may go to nulls only, so zero real experts is allowed; probs cover the real
    # experts' share only (test_contract's MIN_K and PROBS_SUM_TO_ONE).
    w, m, p = np.asarray(out.weights), np.asarray(out.mask), np.asarray(out.probs)
    k_real = m.sum(-1)
    assert np.all(k_real <= cfg.top_k) and null_experts.max_assignments(cfg) == cfg.top_k
    assert np.all(p.sum(-1) <= 1 + 1e-5) and np.all(w.sum(-1) <= 1 + 1e-5)
    # Renormalised over the k selected slots: real weights are probs / (selected mass).
    n_slots = min(cfg.top_k, int(active.sum()) + cfg.num_null)
    if cfg.num_null == 0:
        np.testing.assert_array_equal(k_real, n_slots)
        np.testing.assert_allclose(w.sum(-1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(float(out.metrics["avg_real_k"]), k_real.mean(), rtol=1e-6)
    np.testing.assert_allclose(float(out.metrics["null_weight"]), 1 - w.sum(-1).mean(),
                               atol=1e-5)


def test_all_tokens_to_nulls():
    # Null gate rows aligned with every input and large: the top-2 of 3 nulls win everywhere.
    params, state = H.setup(null_experts, CFG, 0)
    x = jnp.abs(H.make_x(1)) + 0.1
    params = {**params, "w_null": jnp.full((3, H.D), 10.0)}
    out, _ = H.jitted(null_experts)(params, state, x, cfg=CFG, train=True)
    assert not np.asarray(out.mask).any() and not np.asarray(out.weights).any()
    assert float(out.metrics["avg_real_k"]) == 0.0 and float(out.metrics["null_share"]) == 1.0
    np.testing.assert_allclose(float(out.metrics["null_weight"]), 1.0, rtol=1e-6)


def test_balance_loss_over_all_slots_by_hand():
    # A zero gate gives uniform probs 1/(E+m) over all E+m = 9 slots, so P_e = 1/9 for every e
    # and Σ_e f_e P_e = 1/9 whatever f is: the loss is α·(E+m)·(1/9) = α = 0.01 exactly. Over
    # the 6 real experts only it would be α·6·(1/9) = 0.00667.
    params, state = H.setup(null_experts, CFG, 0)
    params = jax.tree.map(jnp.zeros_like, params)
    out, _ = H.jitted(null_experts)(params, state, H.make_x(3), cfg=CFG, train=True)
    np.testing.assert_allclose(float(out.aux_loss), 0.01, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(out.probs), 1 / 9, rtol=1e-6)


@pytest.mark.parametrize("kwargs, field", [
    ({"num_null": -1}, "num_null"), ({"num_null": 1.5}, "num_null"),
    ({"load_balance_weight": -1.0}, "load_balance_weight"),
])
def test_bad_config(kwargs, field):
    with pytest.raises(ValueError, match=field):
        null_experts.Config(d_model=4, num_experts=4, **kwargs)
