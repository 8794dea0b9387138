"""Norms against NumPy float64: RMSNorm (plain and zero-centred), gated RMSNorm, L2 normalise."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moejax.layers import norms

EPS = 1e-6


def _x(shape=(2, 3, 16), seed=0, scale=3.0):
    return np.random.default_rng(seed).normal(0.0, scale, shape).astype(np.float32)


def _np_rms_norm(x, w, eps=EPS):
    x = np.asarray(x, np.float64)
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * np.asarray(w, np.float64)


def _silu(z):
    return z / (1.0 + np.exp(-z))


def test_rms_norm_matches_numpy():
    x, w = _x(), _x((16,), seed=1, scale=1.0)
    got = norms.rms_norm({"scale": jnp.asarray(w)}, jnp.asarray(x))
    chex.assert_shape(got, x.shape)
    chex.assert_type(got, jnp.float32)
    np.testing.assert_allclose(np.asarray(got), _np_rms_norm(x, w), rtol=1e-5, atol=1e-6)
    # eps enters under the root: a large eps shrinks the output by sqrt(ms / (ms + eps)).
    got_eps = norms.rms_norm({"scale": jnp.asarray(w)}, jnp.asarray(x), eps=4.0)
    np.testing.assert_allclose(np.asarray(got_eps), _np_rms_norm(x, w, eps=4.0), rtol=1e-5,
                               atol=1e-6)


def test_rms_norm_unit_rms_and_scale_invariance():
    x = jnp.asarray(_x())
    p = norms.rms_norm_init(16)
    chex.assert_trees_all_equal(p, {"scale": jnp.ones((16,), jnp.float32)})
    y = norms.rms_norm(p, x)
    np.testing.assert_allclose(np.sqrt(np.mean(np.asarray(y) ** 2, axis=-1)), 1.0, rtol=1e-5)
    chex.assert_trees_all_close(norms.rms_norm(p, 7.5 * x), y, rtol=1e-5, atol=1e-6)


def test_zero_centered_scales_by_one_plus_w():
    x, w = jnp.asarray(_x()), jnp.asarray(_x((16,), seed=2, scale=0.5))
    p0 = norms.rms_norm_init(16, zero_centered=True)
    chex.assert_trees_all_equal(p0, {"scale": jnp.zeros((16,), jnp.float32)})
    # Fresh zero-centred params are the identity scale, like fresh plain params.
    chex.assert_trees_all_close(norms.rms_norm(p0, x, zero_centered=True),
                                norms.rms_norm(norms.rms_norm_init(16), x), rtol=1e-6)
    got = norms.rms_norm({"scale": w}, x, zero_centered=True)
    np.testing.assert_allclose(np.asarray(got), _np_rms_norm(x, np.asarray(w) + 1.0), rtol=1e-5,
                               atol=1e-6)
    assert not np.allclose(np.asarray(got), np.asarray(norms.rms_norm({"scale": w}, x)))


def test_rms_norm_bf16_is_computed_in_float32():
    x32, w = _x(), _x((16,), seed=3, scale=1.0)
    x = jnp.asarray(x32, jnp.bfloat16)
    got = norms.rms_norm({"scale": jnp.asarray(w)}, x)
    chex.assert_type(got, jnp.bfloat16)
    ref = _np_rms_norm(np.asarray(x.astype(jnp.float32)), w)
    np.testing.assert_allclose(np.asarray(got.astype(jnp.float32)), ref, rtol=1e-2, atol=1e-2)


def test_zero_input_stays_finite():
    y = norms.rms_norm(norms.rms_norm_init(4), jnp.zeros((2, 4)))
    chex.assert_tree_all_finite(y)
    np.testing.assert_array_equal(np.asarray(y), 0.0)
    chex.assert_tree_all_finite(norms.l2_normalize(jnp.zeros((2, 4))))


def test_gated_rms_norm_matches_numpy():
    x, g, w = _x(), _x(seed=4, scale=2.0), _x((16,), seed=5, scale=1.0)
    got = norms.gated_rms_norm({"scale": jnp.asarray(w)}, jnp.asarray(x), jnp.asarray(g))
    ref = _np_rms_norm(x, w) * _silu(np.asarray(g, np.float64))
    np.testing.assert_allclose(np.asarray(got), ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_l2_normalize_matches_numpy(dtype):
    x = _x()
    got = norms.l2_normalize(jnp.asarray(x, dtype))
    chex.assert_type(got, dtype)
    xf = np.asarray(jnp.asarray(x, dtype).astype(jnp.float32), np.float64)
    ref = xf / np.sqrt(np.sum(xf * xf, axis=-1, keepdims=True) + EPS)
    tol = 1e-5 if dtype == jnp.float32 else 1e-2
    np.testing.assert_allclose(np.asarray(got.astype(jnp.float32)), ref, rtol=tol, atol=tol)
    np.testing.assert_allclose(np.linalg.norm(np.asarray(got, np.float64), axis=-1), 1.0,
                               rtol=10 * tol)


def test_jit_matches_eager():
    x, w = jnp.asarray(_x()), {"scale": jnp.asarray(_x((16,), seed=6, scale=1.0))}
    f = jax.jit(lambda p, a: norms.rms_norm(p, a, zero_centered=True))
    chex.assert_trees_all_close(f(w, x), norms.rms_norm(w, x, zero_centered=True), rtol=1e-6)
