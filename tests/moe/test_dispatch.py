"""Tests for moejax.moe.dispatch on hand-made router decisions (no router involved)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moejax.moe import dispatch

# 5 tokens, 3 experts. Expert 0 is wanted by tokens 0, 1, 2, 4; expert 1 by 0, 3; expert 2 by 3.
MASK = np.array([[1, 1, 0], [1, 0, 0], [1, 0, 0], [0, 1, 1], [1, 0, 0]], bool)
WEIGHTS = MASK * np.array([[0.6, 0.4, 0.0], [1.0, 0, 0], [0.7, 0, 0], [0, 0.2, 0.8], [0.9, 0, 0]])


def _x(n=5, d=3):
    return jnp.arange(1.0, n * d + 1).reshape(n, d)


def _oracle(x, weights, kept):
    scale = np.arange(1, weights.shape[1] + 1)
    return np.einsum("ne,e,nd->nd", weights * kept, scale, np.asarray(x))


def _scale_experts(xe):
    """Expert e multiplies by (e + 1): easy to follow through dispatch and combine."""
    return xe * jnp.arange(1.0, xe.shape[0] + 1)[:, None, None]


def test_compute_capacity():
    assert dispatch.compute_capacity(5, 3, 2, 1.0) == 4  # ceil(1.0 * 5 * 2 / 3)
    assert dispatch.compute_capacity(5, 3, 2, 100.0) == 5  # capped at N
    assert dispatch.compute_capacity(5, 3, 1, 0.01) == 1  # at least 1
    with pytest.raises(ValueError, match="capacity_factor must be > 0"):
        dispatch.compute_capacity(5, 3, 2, 0.0)


def test_capacity_drops_by_token_order():
    plan = dispatch.capacity_plan(jnp.asarray(WEIGHTS), jnp.asarray(MASK), capacity=2)
    # Expert 0 keeps tokens 0 and 1 (slots 0, 1); tokens 2 and 4 overflow. Others fit.
    kept = MASK.copy()
    kept[2, 0] = kept[4, 0] = False
    np.testing.assert_array_equal(plan.kept, kept)
    np.testing.assert_array_equal(np.argmax(plan.dispatch[:, 0], -1)[:2], [0, 1])
    # 2 of 7 assignments dropped; tokens 2 and 4 lost every assignment.
    np.testing.assert_allclose(plan.stats["dropped_fraction"], 2 / 7, rtol=1e-6)
    np.testing.assert_allclose(plan.stats["dropped_token_fraction"], 2 / 5)
    x = _x()
    y = dispatch.capacity_combine(plan, _scale_experts(dispatch.capacity_dispatch(plan, x)))
    np.testing.assert_allclose(y, _oracle(x, WEIGHTS, kept), rtol=1e-6)
    np.testing.assert_array_equal(y[2], 0.0)  # dropped tokens get zero MoE output
    np.testing.assert_array_equal(y[4], 0.0)


def test_capacity_nothing_dropped_when_large():
    plan = dispatch.capacity_plan(jnp.asarray(WEIGHTS), jnp.asarray(MASK), capacity=5)
    assert float(plan.stats["dropped_fraction"]) == 0.0
    x = _x()
    y = dispatch.capacity_combine(plan, _scale_experts(dispatch.capacity_dispatch(plan, x)))
    np.testing.assert_allclose(y, _oracle(x, WEIGHTS, MASK), rtol=1e-6)


def test_sort_plan_layout():
    plan = dispatch.sort_plan(jnp.asarray(WEIGHTS), jnp.asarray(MASK), k=2)
    np.testing.assert_array_equal(plan.group_sizes, [4, 2, 1])  # 3 unused slots sort last
    # Sorted rows: expert 0 <- tokens 0,1,2,4; expert 1 <- 0,3; expert 2 <- 3 (stable order).
    np.testing.assert_array_equal(plan.token[:7], [0, 1, 2, 4, 0, 3, 3])
    np.testing.assert_array_equal(plan.expert, [[0, 1], [0, 3], [0, 3], [2, 1], [0, 3]])
    np.testing.assert_allclose(plan.weights, [[0.6, 0.4], [1, 0], [0.7, 0], [0.8, 0.2], [0.9, 0]])
    assert float(plan.stats["dropped_fraction"]) == 0.0


def _grouped_scale(plan, xs):
    """Row r of the sorted rows belongs to expert e: scale by e + 1; unused rows zero."""
    bounds = np.cumsum(np.asarray(plan.group_sizes))
    rows = np.arange(xs.shape[0])
    expert = np.searchsorted(bounds, rows, side="right")
    return jnp.where((expert < len(bounds))[:, None], xs * (expert + 1.0)[:, None], 0.0)


@pytest.mark.parametrize("k", [2, 3])
def test_dropless_matches_oracle(k):
    plan = dispatch.sort_plan(jnp.asarray(WEIGHTS), jnp.asarray(MASK), k=k)
    x = _x()
    xs = dispatch.permute(plan, x)
    assert xs.shape == (5 * k, 3)  # O(N·k·d), no E axis
    y = dispatch.unpermute(plan, _grouped_scale(plan, xs))
    np.testing.assert_allclose(y, _oracle(x, WEIGHTS, MASK), rtol=1e-6)


def test_dropless_counts_contract_violations():
    # k=1 but tokens 0 and 3 chose two experts: the smaller weight is dropped and counted.
    plan = dispatch.sort_plan(jnp.asarray(WEIGHTS), jnp.asarray(MASK), k=1)
    np.testing.assert_array_equal(plan.group_sizes, [4, 0, 1])
    np.testing.assert_allclose(plan.stats["dropped_fraction"], 2 / 7, rtol=1e-6)
    assert float(plan.stats["dropped_token_fraction"]) == 0.0


def test_capacity_equals_dropless_random():
    rng = np.random.default_rng(0)
    n, e, k, d = 16, 4, 2, 3
    scores = rng.random((n, e))
    mask = scores >= np.sort(scores, -1)[:, -k][:, None]
    weights = jnp.asarray(mask * scores, jnp.float32)
    x = jnp.asarray(rng.normal(size=(n, d)), jnp.float32)
    cap = dispatch.capacity_plan(weights, jnp.asarray(mask), capacity=n)
    y_cap = dispatch.capacity_combine(cap, _scale_experts(dispatch.capacity_dispatch(cap, x)))
    srt = dispatch.sort_plan(weights, jnp.asarray(mask), k=k)
    y_drop = dispatch.unpermute(srt, _grouped_scale(srt, dispatch.permute(srt, x)))
    np.testing.assert_allclose(y_cap, y_drop, rtol=1e-5, atol=1e-6)
    # Gradients w.r.t. the combine weights and x agree as well.
    def loss_cap(w, x):
        p = dispatch.capacity_plan(w, jnp.asarray(mask), capacity=n)
        return jnp.sum(dispatch.capacity_combine(p, dispatch.capacity_dispatch(p, x)) ** 2)
    def loss_drop(w, x):
        p = dispatch.sort_plan(w, jnp.asarray(mask), k=k)
        return jnp.sum(dispatch.unpermute(p, dispatch.permute(p, x)) ** 2)
    grads = jax.jit(lambda w, x: (jax.grad(loss_cap, (0, 1))(w, x),
                                  jax.grad(loss_drop, (0, 1))(w, x)))(weights, x)
    for g_cap, g_drop in zip(*grads, strict=True):
        np.testing.assert_allclose(g_cap, g_drop, rtol=1e-5, atol=1e-5)
