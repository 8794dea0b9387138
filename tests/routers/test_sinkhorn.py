"""Tests for moejax.routers.sinkhorn (the shared contract: test_contract.py)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given

from moejax.routers import sinkhorn
from tests.routers import helpers


def skewed_case(n=256, d=8, e=8):
    """Inputs whose logits carry a per-expert offset from +2 (expert 0) to -2 (expert E-1)."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(n, d)).astype(np.float32)
    x[:, 0] = 1.0
    w = (rng.normal(size=(e, d)) * d**-0.5).astype(np.float32)
    w[:, 0] = np.linspace(2.0, -2.0, e)
    return {"w_g": jnp.asarray(w)}, jnp.asarray(x)


def max_violation(mask) -> float:
    load = np.asarray(mask).sum(0)
    return float(load.max() / load.mean() - 1)


@given(case=helpers.router_cases())
@helpers.FAST
def test_properties(case):
    cfg = sinkhorn.Config(d_model=case.d, num_experts=case.e, top_k=case.k)
    out, _, _, _, _ = helpers.run_case(sinkhorn, cfg, case, train=True)
    w, p, m = np.asarray(out.weights), np.asarray(out.probs), np.asarray(out.mask)
    np.testing.assert_array_equal(m.sum(-1), case.k)
    np.testing.assert_array_equal(w[m], p[m])  # weights from the unbalanced probs
    assert sinkhorn.max_assignments(cfg) == case.k


def test_sinkhorn_log_balances_and_skips_empty_columns():
    # Column 2 is an inactive slot (-inf): it stays empty and nothing divides by zero.
    logits = np.random.default_rng(0).normal(size=(6, 4)).astype(np.float32) * 3
    logits[:, 2] = -np.inf
    bal = np.exp(np.asarray(jax.jit(sinkhorn.sinkhorn_log, static_argnums=1)(logits, 50)))
    assert np.all(np.isfinite(bal)) and np.all(bal[:, 2] == 0)
    np.testing.assert_allclose(bal.sum(0)[[0, 1, 3]], 1.0, rtol=1e-5)  # columns: unit mass
    np.testing.assert_allclose(bal.sum(1), 3 / 6, rtol=1e-3)  # rows: equal share of 3 columns


def test_balances_skewed_load():
    # Plain top-2 sends almost everything to the first experts (MaxVio ~2.5); three Sinkhorn
    # iterations bring the selection close to uniform.
    params, x = skewed_case()
    cfg = sinkhorn.Config(d_model=8, num_experts=8, top_k=2, num_iters=3)
    route = helpers.jitted(sinkhorn)
    balanced, _ = route(params, {}, x, cfg=cfg, train=True)
    plain, _ = route(params, {}, x, cfg=cfg, train=False)  # balance_at_eval=False
    assert max_violation(plain.mask) > 2.0
    assert max_violation(balanced.mask) < 0.3
    np.testing.assert_array_equal(balanced.probs, plain.probs)  # same unbalanced probs
    at_eval, _ = route(params, {}, x, cfg=sinkhorn.Config(
        d_model=8, num_experts=8, top_k=2, num_iters=3, balance_at_eval=True), train=False)
    np.testing.assert_array_equal(at_eval.mask, balanced.mask)


def test_eval_is_plain_top_k():
    params, x = skewed_case(n=16)
    cfg = sinkhorn.Config(d_model=8, num_experts=8, top_k=3)
    out, _ = helpers.jitted(sinkhorn)(params, {}, x, cfg=cfg, train=False)
    top3 = np.argsort(-np.asarray(out.probs), axis=-1)[:, :3]
    expected = np.zeros((16, 8), bool)
    np.put_along_axis(expected, top3, True, axis=-1)
    np.testing.assert_array_equal(out.mask, expected)


@pytest.mark.parametrize(
    "kwargs, field",
    [(dict(num_iters=0), "num_iters"), (dict(balance_at_eval="yes"), "balance_at_eval")],
)
def test_bad_config(kwargs, field):
    with pytest.raises(ValueError, match=field):
        sinkhorn.Config(d_model=4, num_experts=4, **kwargs)
