"""Tests for moejax.routers.noisy_topk (the shared contract: test_contract.py)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given

from moejax.routers import noisy_topk, topk
from tests.routers import helpers


@given(case=helpers.router_cases())
@helpers.FAST
def test_properties(case):
    cfg = noisy_topk.Config(d_model=case.d, num_experts=case.e, top_k=case.k)
    out, _, _, _, _ = helpers.run_case(noisy_topk, cfg, case, train=True,
                                       rng=jax.random.key(case.seed))
    np.testing.assert_array_equal(np.asarray(out.mask).sum(-1), case.k)
    assert noisy_topk.max_assignments(cfg) == case.k


def test_two_key_determinism():
    cfg = noisy_topk.Config(d_model=6, num_experts=5, top_k=2)
    params, state = helpers.setup(noisy_topk, cfg, 0)
    x = helpers.make_x(0, 32, 6)
    route = helpers.jitted(noisy_topk)
    key1, key2 = jax.random.key(1), jax.random.key(2)
    train1, _ = route(params, state, x, cfg=cfg, train=True, rng=key1)
    train2, _ = route(params, state, x, cfg=cfg, train=True, rng=key2)
    again1, _ = route(params, state, x, cfg=cfg, train=True, rng=key1)
    assert not np.array_equal(train1.weights, train2.weights)  # noisy: differs per key
    np.testing.assert_array_equal(train1.weights, again1.weights)  # same key, same draw
    eval1, _ = route(params, state, x, cfg=cfg, train=False, rng=key1)
    eval2, _ = route(params, state, x, cfg=cfg, train=False, rng=key2)
    eval_none, _ = route(params, state, x, cfg=cfg, train=False)
    np.testing.assert_array_equal(eval1.weights, eval2.weights)  # deterministic at eval
    np.testing.assert_array_equal(eval1.weights, eval_none.weights)
    # At eval it is plain top-k on the same gate.
    ref, _ = helpers.jitted(topk)({"w_g": params["w_g"]}, {}, x,
                                  cfg=topk.Config(d_model=6, num_experts=5, top_k=2), train=False)
    np.testing.assert_array_equal(eval1.weights, ref.weights)


def test_no_noise_gradient_at_eval():
    # (Training gradients, w_g and w_noise both non-zero: test_contract.test_grads.)
    cfg = noisy_topk.Config(d_model=6, num_experts=5, top_k=2)
    params, state = helpers.setup(noisy_topk, cfg, 0, active=[True, False, True, True, True])
    x = helpers.make_x(0, 16, 6)
    grads = helpers.check_grad(noisy_topk, cfg, params, state, x, train=False)
    assert float(jnp.max(jnp.abs(grads["w_noise"]))) == 0  # no noise at eval


@pytest.mark.parametrize(
    "kwargs, field",
    [(dict(load_balance_weight=-0.1), "load_balance_weight")],
)
def test_bad_config(kwargs, field):
    with pytest.raises(ValueError, match=field):
        noisy_topk.Config(d_model=4, num_experts=5, **kwargs)
