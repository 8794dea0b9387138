"""Tests for moejax.routers.common (the gate helpers the routers share)."""

import jax
import jax.numpy as jnp
import numpy as np

from moejax.routers import base, common

CFG = base.RouterConfig(d_model=64, num_experts=8)


@jax.jit
def _helpers(scores, mask, x, valid):
    return (common.topk_mask(scores, 2), common.masked_weights(scores, mask, renormalize=False),
            common.masked_weights(scores, mask, renormalize=True), common.finite_tokens(x),
            common.valid_mean(x[:, 0], valid), common.valid_mean(x, jnp.zeros_like(valid)))


SCORES = np.array([[0.1, 0.4, 0.4, 0.1], [0.3, 0.2, 0.1, 0.4]], np.float32)
MASK = np.array([[True, True, False, False], [False, False, False, False]])
X = np.array([[1.0, 2.0], [np.nan, 0.0], [3.0, -np.inf], [5.0, 6.0]], np.float32)
VALID = np.array([True, False, False, True])


def test_helpers_by_hand():
    top2, w, w_norm, (x_safe, finite), mean, empty = _helpers(SCORES, MASK, X, VALID)
    # Row 0: 0.4 twice -> experts 1 and 2 (ties: lowest index wins over expert 0/3's 0.1).
    np.testing.assert_array_equal(top2, [[False, True, True, False], [True, False, False, True]])
    np.testing.assert_array_equal(w, np.where(MASK, SCORES, 0))
    np.testing.assert_allclose(w_norm, [[0.2, 0.8, 0, 0], [0, 0, 0, 0]], rtol=1e-6)  # 0/0 -> 0
    np.testing.assert_array_equal(finite, [True, False, False, True])
    np.testing.assert_array_equal(x_safe, [[1, 2], [0, 0], [0, 0], [5, 6]])
    assert x_safe.dtype == jnp.float32
    assert float(mean) == 3.0  # (1 + 5) / 2 over the valid rows
    np.testing.assert_array_equal(empty, [0.0, 0.0])  # no valid token: 0, shape [d]


def test_topk_mask_ties_go_to_the_lowest_index():
    got = jax.jit(common.topk_mask, static_argnums=1)(jnp.zeros((1, 5)), 2)
    np.testing.assert_array_equal(got, [[True, True, False, False, False]])


def test_mask_inactive():
    logits = jnp.ones((2, 3))
    assert common.mask_inactive(logits, {}) is logits
    assert common.mask_inactive(logits, {"bias": jnp.zeros(3)}) is logits
    got = common.mask_inactive(logits, {"active": jnp.array([True, False, True])})
    np.testing.assert_array_equal(got, [[1, -np.inf, 1]] * 2)


def test_gate():
    w = common.init_gate(jax.random.key(0), CFG)
    assert w.shape == (8, 64) and w.dtype == jnp.float32
    assert 0.8 / 8 < float(jnp.std(w)) < 1.2 / 8  # std d**-0.5
    x = jnp.asarray(np.random.default_rng(0).normal(size=(3, 64)), jnp.bfloat16)
    logits = common.gate_logits({"w_g": w.astype(jnp.bfloat16), "z": w}, x, name="z")
    assert logits.dtype == jnp.float32 and logits.shape == (3, 8)
    want = np.asarray(x, np.float64) @ np.asarray(w, np.float64).T
    np.testing.assert_allclose(logits, want, rtol=1e-5, atol=1e-5)  # f32 math, full precision
