"""Depthwise causal short conv: NumPy convolution, causality, and chunked / token-by-token decode
through the cache equal to one full pass."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moejax.layers import short_conv as sc

B, T, D = 2, 11, 5


def _setup(k=4, seed=0):
    params = sc.short_conv_init(jax.random.key(seed), D, k)
    x = jax.random.normal(jax.random.key(seed + 1), (B, T, D))
    return params, x


def _np_conv(w, x, history=None):
    """Per channel `np.convolve` of [history, x] with the flipped kernel, the last T outputs."""
    w, x = np.asarray(w, np.float64), np.asarray(x, np.float64)
    k = w.shape[0]
    hist = np.zeros((x.shape[0], k - 1, x.shape[2])) if history is None else np.asarray(history)
    full = np.concatenate([hist, x], axis=1)
    y = np.zeros_like(x)
    for b in range(x.shape[0]):
        for d in range(x.shape[2]):
            conv = np.convolve(full[b, :, d], w[::-1, d], mode="full")
            y[b, :, d] = conv[k - 1 : k - 1 + x.shape[1]]
    return y


@pytest.mark.parametrize("k", [1, 2, 4])
def test_matches_numpy_convolution(k):
    params, x = _setup(k)
    chex.assert_shape(params["w"], (k, D))
    assert float(jnp.max(jnp.abs(params["w"]))) <= k**-0.5
    y, cache = sc.short_conv(params, x)
    chex.assert_shape(y, (B, T, D))
    chex.assert_shape(cache, (B, k - 1, D))
    np.testing.assert_allclose(np.asarray(y), _np_conv(params["w"], x), rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(cache), np.asarray(x[:, T - (k - 1) :]))


def test_history_in_cache_is_used():
    params, x = _setup()
    hist = jax.random.normal(jax.random.key(7), (B, 3, D))
    y, _ = sc.short_conv(params, x, hist)
    np.testing.assert_allclose(np.asarray(y), _np_conv(params["w"], x, hist), rtol=1e-5,
                               atol=1e-6)
    chex.assert_trees_all_equal(sc.short_conv(params, x, sc.short_conv_cache(B, D))[0],
                                sc.short_conv(params, x)[0])


def test_causal():
    params, x = _setup()
    y, _ = sc.short_conv(params, x)
    t0 = 6
    y2, _ = sc.short_conv(params, x.at[:, t0].add(10.0))
    np.testing.assert_array_equal(np.asarray(y2[:, :t0]), np.asarray(y[:, :t0]))
    assert float(jnp.min(jnp.abs(y2[:, t0] - y[:, t0]))) > 0  # w[K-1] != 0 on every channel


def test_chunks_and_steps_through_the_cache_equal_full():
    params, x = _setup()
    y, cache = sc.short_conv(params, x)
    ys, c = [], sc.short_conv_cache(B, D)
    for a, b in [(0, 2), (2, 3), (3, 8), (8, 11)]:  # chunks shorter and longer than K-1 = 3
        yc, c = sc.short_conv(params, x[:, a:b], c)
        ys.append(yc)
    chex.assert_trees_all_close(jnp.concatenate(ys, axis=1), y, rtol=1e-6, atol=1e-6)
    chex.assert_trees_all_equal(c, cache)
    step = jax.jit(sc.short_conv)
    ys, c = [], sc.short_conv_cache(B, D)
    for t in range(T):
        yt, c = step(params, x[:, t : t + 1], c)
        ys.append(yt)
    chex.assert_trees_all_close(jnp.concatenate(ys, axis=1), y, rtol=1e-6, atol=1e-6)
    chex.assert_trees_all_equal(c, cache)


def test_bf16_keeps_dtype():
    params, x = _setup()
    y, cache = sc.short_conv(params, x.astype(jnp.bfloat16))
    chex.assert_type([y, cache], jnp.bfloat16)
    np.testing.assert_allclose(np.asarray(y, np.float32),
                               _np_conv(params["w"], x.astype(jnp.bfloat16).astype(jnp.float32)),
                               rtol=2e-2, atol=2e-2)


def test_init_std_gives_normal_weights():
    """`std` (the delta mixers' `init_std`, fla's N(0, 0.02²)) replaces the uniform default."""
    w = np.asarray(sc.short_conv_init(jax.random.key(0), 4096, 4, std=0.02)["w"])
    assert w.shape == (4, 4096)
    np.testing.assert_allclose(w.std(), 0.02, rtol=0.03)
    assert abs(w.mean()) < 1e-3 and np.abs(w).max() > 0.06  # normal tails, not U(±0.5)
    u = np.asarray(sc.short_conv_init(jax.random.key(0), 4096, 4)["w"])
    np.testing.assert_allclose(u.std(), 0.5 / np.sqrt(3), rtol=0.03)
