"""Dense feed-forward block against NumPy float64: SwiGLU and GELU (tanh) MLP."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moejax.layers import ffn

D, F = 8, 12


def _np(params):
    return {k: np.asarray(v, np.float64) for k, v in params.items()}


def _x(dtype=jnp.float32):
    return jax.random.normal(jax.random.key(1), (2, 3, D)).astype(dtype)


def test_init_shapes_and_fan_in_scale():
    p = ffn.init(jax.random.key(0), D, F)
    chex.assert_shape([p["w_up"], p["w_gate"], p["w_down"]], [(D, F), (D, F), (F, D)])
    chex.assert_type(list(p.values()), jnp.float32)
    assert set(ffn.init(jax.random.key(0), D, F, "gelu")) == {"w_up", "w_down"}
    big = ffn.init(jax.random.key(0), 64, 128)
    np.testing.assert_allclose(float(jnp.std(big["w_up"])), 64**-0.5, rtol=0.05)
    np.testing.assert_allclose(float(jnp.std(big["w_down"])), 128**-0.5, rtol=0.05)
    with pytest.raises(ValueError, match="activation"):
        ffn.init(jax.random.key(0), D, F, "relu")


def test_init_std_scales_every_matrix():
    p = ffn.init(jax.random.key(0), 64, 128, init_std=0.02)
    for name in ("w_up", "w_gate", "w_down"):
        np.testing.assert_allclose(float(jnp.std(p[name])), 0.02, rtol=0.05, err_msg=name)
    with pytest.raises(ValueError, match="init_std must be in"):
        ffn.init(jax.random.key(0), 64, 128, init_std=-1.0)


def test_swiglu_matches_numpy():
    p = ffn.init(jax.random.key(0), D, F)
    x = _x()
    got = ffn.apply(p, x)
    chex.assert_shape(got, x.shape)
    w, xn = _np(p), np.asarray(x, np.float64)
    g = xn @ w["w_gate"]
    ref = (g / (1.0 + np.exp(-g)) * (xn @ w["w_up"])) @ w["w_down"]
    np.testing.assert_allclose(np.asarray(got), ref, rtol=1e-5, atol=1e-6)


def test_gelu_matches_numpy():
    p = ffn.init(jax.random.key(0), D, F, "gelu")
    x = _x()
    w, xn = _np(p), np.asarray(x, np.float64)
    h = xn @ w["w_up"]
    gelu = 0.5 * h * (1.0 + np.tanh(np.sqrt(2.0 / np.pi) * (h + 0.044715 * h**3)))
    np.testing.assert_allclose(np.asarray(ffn.apply(p, x)), gelu @ w["w_down"], rtol=1e-5,
                               atol=1e-6)


def test_bf16_input_gives_bf16_output():
    p = ffn.init(jax.random.key(0), D, F)
    got = jax.jit(ffn.apply)(p, _x(jnp.bfloat16))
    chex.assert_type(got, jnp.bfloat16)
    ref = ffn.apply(p, _x(jnp.bfloat16).astype(jnp.float32))
    chex.assert_trees_all_close(got.astype(jnp.float32), ref, rtol=5e-2, atol=5e-2)
