"""Tests for moejax.routers.dense_to_sparse (EvoMoE annealed Gumbel-softmax gate; the shared
contract, gradients and the rng requirement included: test_contract.py)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from moejax.routers import dense_to_sparse as dts
from tests.routers import helpers_p as H

CFG = dts.Config(d_model=H.D, num_experts=H.E, anneal_steps=100)


CFG2 = dts.Config(d_model=H.D, num_experts=H.E, anneal_steps=100, threshold=0.0,
                  renormalize=True, load_balance_weight=1e-2)


@given(case=H.cases(), step=st.sampled_from([0, 50, 1000]),
       cfg_train=st.sampled_from([(CFG, True), (CFG, False), (CFG2, True)]))
@H.FAST
def test_properties(case, step, cfg_train):
    (seed, scale, active), (cfg, train) = case, cfg_train
    params, state = H.setup(dts, cfg, seed, active)
    state = {**state, "step": jnp.int32(step)}
    out, new_state = H.jitted(dts)(params, state, H.make_x(seed, scale=scale), cfg=cfg,
                                   train=train, rng=jax.random.key(seed) if train else None)
    w, m = np.asarray(out.weights), np.asarray(out.mask)
    assert np.all(w[m] >= cfg.threshold)  # ... or the arg-max
    if cfg.renormalize:
        np.testing.assert_allclose(w.sum(-1), 1.0, rtol=1e-5)
    assert int(new_state["step"]) == step + int(train)
    assert dts.max_assignments(cfg) == H.E


def test_temperature_schedule():
    # Linear 2.0 -> 0.3 over 100 steps: τ(50) = 2.0 − 1.7/2 = 1.15; constant afterwards.
    for step, tau in [(0, 2.0), (50, 1.15), (100, 0.3), (10_000, 0.3)]:
        np.testing.assert_allclose(float(dts.temperature(jnp.int32(step), CFG)), tau, rtol=1e-6)


def test_dense_to_sparse_over_training():
    params, state = H.setup(dts, CFG, 0)
    x = H.make_x(1, 512)
    avg_k = []
    for step in (0, 25, 50, 75, 100):
        st_ = {"step": jnp.int32(step)}
        out, _ = H.jitted(dts)(params, st_, x, cfg=CFG, train=True, rng=jax.random.key(2))
        avg_k.append(float(out.metrics["avg_k"]))
    assert avg_k[0] > 0.95 * H.E, avg_k  # (nearly) dense at the start
    assert all(a > b for a, b in zip(avg_k, avg_k[1:], strict=False)), avg_k
    assert avg_k[-1] < 0.5 * H.E, avg_k  # sparse at the end


def test_noise_only_at_train():
    # Two PRNG keys: equal outputs at eval (no noise, rng ignored), different at train.
    params, state = H.setup(dts, CFG, 0)
    x = H.make_x(3)
    f = H.jitted(dts)
    outs = [f(params, state, x, cfg=CFG, train=False, rng=jax.random.key(s))[0] for s in (0, 1)]
    np.testing.assert_array_equal(outs[0].weights, outs[1].weights)
    outs = [f(params, state, x, cfg=CFG, train=True, rng=jax.random.key(s))[0] for s in (0, 1)]
    assert not np.array_equal(outs[0].weights, outs[1].weights)


@pytest.mark.parametrize("kwargs, field", [
    ({"tau_start": 0.0}, "tau_start"), ({"tau_end": -0.3}, "tau_end"),
    ({"anneal_steps": 0}, "anneal_steps"), ({"threshold": 1.0}, "threshold"),
    ({"threshold": -0.1}, "threshold"), ({"renormalize": 1}, "renormalize"),
])
def test_bad_config(kwargs, field):
    with pytest.raises(ValueError, match=field):
        dts.Config(d_model=4, num_experts=4, **kwargs)
