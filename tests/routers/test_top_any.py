"""Tests for moejax.routers.top_any (DynMoE top-any gating with trainable thresholds; the shared
contract, straight-through gradients to w_g and the thresholds included: test_contract.py)."""

import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from moejax.routers import top_any
from tests.routers import helpers_p as H

CFG = top_any.Config(d_model=H.D, num_experts=H.E)


def _gates(params, x, tau):
    """Reference gates σ(cos(x, w_e) / τ) and thresholds σ(G) in float64."""
    x, w = np.asarray(x, np.float64), np.asarray(params["w_g"], np.float64)
    cos = (x / np.linalg.norm(x, axis=-1, keepdims=True)) @ (
        w / np.linalg.norm(w, axis=-1, keepdims=True)).T
    sig = lambda z: 1 / (1 + np.exp(-z))
    return sig(cos / tau), sig(np.asarray(params["thresholds"], np.float64))


@given(case=H.cases(), shift=st.floats(-2.0, 2.0), cfg=st.sampled_from(
    [CFG, top_any.Config(d_model=H.D, num_experts=H.E, tau=0.1, load_balance_weight=1e-2)]))
@H.FAST
def test_properties(case, shift, cfg):
    seed, scale, active = case
    params, state = H.setup(top_any, cfg, seed, active)
    params = {**params, "thresholds": params["thresholds"] + shift}
    x = H.make_x(seed, scale=scale)
    out, _ = H.jitted(top_any)(params, state, x, cfg=cfg, train=True)
    w, m = np.asarray(out.weights), np.asarray(out.mask)
    k = m.sum(-1)
    np.testing.assert_allclose(w[m], np.repeat(1.0 / k, k), rtol=1e-6)  # 1/k each (DynMoE)
    gate, thr = _gates(params, x, cfg.tau)
    above = (gate > thr) & active
    clear = np.abs(gate - thr).min(-1) > 1e-5  # rows with no float32 borderline decision
    some = above.any(-1)
    np.testing.assert_array_equal(m[clear & some], above[clear & some])
    # Tokens with no expert above threshold fall back to their (active) arg-max alone.
    fallback = np.where(active, gate, -1).argmax(-1)
    rows = clear & ~some
    np.testing.assert_array_equal(m[rows], np.eye(H.E, dtype=bool)[fallback[rows]])
    assert top_any.max_assignments(cfg) == H.E


def test_argmax_fallback_when_thresholds_unreachable():
    params, state = H.setup(top_any, CFG, 0)
    params = {**params, "thresholds": jnp.full((H.E,), 50.0)}  # σ(50) = 1 > every gate
    x = H.make_x(1)
    out, _ = H.jitted(top_any)(params, state, x, cfg=CFG, train=True)
    gate, _ = _gates(params, x, CFG.tau)
    np.testing.assert_array_equal(out.mask, np.eye(H.E, dtype=bool)[gate.argmax(-1)])
    np.testing.assert_array_equal(out.weights, np.asarray(out.mask, np.float32))
    assert float(out.metrics["no_expert_frac"]) == 1.0


@pytest.mark.parametrize("kwargs, field", [
    ({"tau": 0.0}, "tau"), ({"tau": -1.0}, "tau"), ({"threshold_init": float("nan")},
                                                    "threshold_init"),
    ({"load_balance_weight": -1.0}, "load_balance_weight"),
])
def test_bad_config(kwargs, field):
    with pytest.raises(ValueError, match=field):
        top_any.Config(d_model=4, num_experts=4, **kwargs)
