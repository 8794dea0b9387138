"""Tests for moejax.moe.metrics with loads worked out by hand."""

import math

import jax.numpy as jnp
import numpy as np
import pytest

from moejax.moe import metrics

# 4 tokens, 4 experts, 8 assignments: counts (4, 2, 2, 0) -> load (1/2, 1/4, 1/4, 0).
MASK = jnp.array([[1, 1, 0, 0], [1, 0, 1, 0], [1, 1, 0, 0], [1, 0, 1, 0]], bool)


def test_load_suite_by_hand():
    load, m = metrics.load_metrics(MASK)
    np.testing.assert_allclose(load, [0.5, 0.25, 0.25, 0.0])
    # mean 1/4; deviations (1/4, 0, 0, -1/4): std = sqrt((1/16 + 1/16) / 4) = sqrt(2)/8;
    # cv = std / mean = sqrt(2)/2.
    assert float(m["cv"]) == pytest.approx(math.sqrt(2) / 2, rel=1e-6)
    assert float(m["max_vio"]) == pytest.approx(0.5 / 0.25 - 1)  # = 1
    # H = 1/2 log 2 + 2 · 1/4 log 4 = 1.5 log 2; / log 4 = 0.75.
    assert float(m["load_entropy"]) == pytest.approx(0.75, rel=1e-6)
    assert float(m["dead_experts"]) == 1.0
    assert float(m["avg_k"]) == 2.0
    assert float(m["active_experts"]) == 4.0


def test_inactive_slots_are_left_out():
    # Expert 3 inactive: E_active = 3, mean 1/3. max_vio = (1/2)/(1/3) - 1 = 1/2;
    # entropy 1.5 log 2 / log 3; no dead experts among the active ones.
    _, m = metrics.load_metrics(MASK, active=jnp.array([True, True, True, False]))
    assert float(m["max_vio"]) == pytest.approx(0.5, rel=1e-6)
    assert float(m["load_entropy"]) == pytest.approx(1.5 * math.log(2) / math.log(3), rel=1e-6)
    assert float(m["dead_experts"]) == 0.0
    assert float(m["active_experts"]) == 3.0


def test_balanced_and_counts_over_batches():
    counts = metrics.assignment_counts(MASK) + jnp.array([0.0, 2.0, 2.0, 4.0])  # (4,4,4,4)
    load, m = metrics.load_metrics_from_counts(counts, num_tokens=8)
    np.testing.assert_allclose(load, 0.25)
    assert float(m["cv"]) == pytest.approx(0.0, abs=1e-7)
    assert float(m["max_vio"]) == pytest.approx(0.0, abs=1e-6)
    assert float(m["load_entropy"]) == pytest.approx(1.0, rel=1e-6)
    assert float(m["avg_k"]) == 2.0


def test_top1_expert():
    weights = jnp.array([[0.2, 0.7, 0.0], [0.0, 0.0, 0.0]])
    mask = jnp.array([[True, True, False], [False, False, False]])
    probs = jnp.array([[0.2, 0.7, 0.1], [0.1, 0.3, 0.6]])
    np.testing.assert_array_equal(metrics.top1_expert(weights, mask, probs), [1, 2])


def test_mutual_information():
    top1 = jnp.array([0, 1, 2, 3, 0, 1, 2, 3])
    # Labels a bijection of the expert: I = H(label) = log 4.
    assert float(metrics.mutual_information(top1, (top1 + 1) % 4, 4, 4)) == pytest.approx(
        math.log(4), rel=1e-6)
    # Independent: each expert sees labels 0 and 1 once -> I = 0.
    labels = jnp.array([0, 0, 0, 0, 1, 1, 1, 1])
    assert float(metrics.mutual_information(top1, labels, 4, 2)) == pytest.approx(0.0, abs=1e-7)
    # Experts {0,1} -> label 0, {2,3} -> label 1: I = log 2.
    labels = jnp.array([0, 0, 1, 1, 0, 0, 1, 1])
    assert float(metrics.mutual_information(top1, labels, 4, 2)) == pytest.approx(
        math.log(2), rel=1e-6)


def test_flip_rate():
    prev = jnp.array([0, 1, 2, 3])
    assert float(metrics.flip_rate(prev, jnp.array([0, 1, 3, 3]))) == 0.25
    assert float(metrics.flip_rate(prev, prev)) == 0.0


def test_valid_tokens_only():
    # Token 3 is invalid (a non-finite input): counts (3, 2, 1, 0) over 3 tokens, so load
    # (1/2, 1/3, 1/6, 0) and avg_k = 6/3 = 2; its mask row is ignored even if set.
    valid = jnp.array([True, True, True, False])
    load, m = metrics.load_metrics(MASK, valid=valid)
    np.testing.assert_allclose(load, [0.5, 1 / 3, 1 / 6, 0.0], rtol=1e-6)
    assert float(m["avg_k"]) == 2.0
    _, m = metrics.load_metrics(MASK, valid=jnp.zeros(4, bool))  # no valid token: no NaN
    assert float(m["avg_k"]) == 0.0 and float(m["cv"]) == 0.0
