"""Tests for moejax.routers.expert_choice (the shared contract: test_contract.py)."""

import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from moejax.routers import expert_choice
from tests.routers import helpers

# 4 tokens × 3 experts; rows sum to 1 and no column has ties.
PROBS = np.array(
    [[0.7, 0.2, 0.1],
     [0.05, 0.8, 0.15],
     [0.6, 0.35, 0.05],
     [0.2, 0.2, 0.6]], np.float32)


@given(case=helpers.router_cases(), cf=st.sampled_from([0.5, 2.0]))
@helpers.FAST
def test_properties(case, cf):
    cfg = expert_choice.Config(d_model=case.d, num_experts=case.e, top_k=case.k,
                               capacity_factor=cf)
    out, _, _, _, _ = helpers.run_case(expert_choice, cfg, case, train=True)
    c = expert_choice.capacity(case.n, cfg)
    w, p, m = np.asarray(out.weights), np.asarray(out.probs), np.asarray(out.mask)
    per_expert = m.sum(0)
    assert np.all(per_expert <= c)  # an expert never exceeds its capacity
    np.testing.assert_array_equal(per_expert[case.active], c)  # and active ones fill it
    np.testing.assert_array_equal(w[m], p[m])
    for e in np.flatnonzero(case.active):  # each expert took its C most probable tokens
        if c < case.n:
            assert p[m[:, e], e].min() >= p[~m[:, e], e].max()
    assert float(out.metrics["capacity"]) == c
    assert expert_choice.max_assignments(cfg) == case.e


@pytest.mark.parametrize(
    "n, e, k, cf, expected",
    [
        (10, 4, 2, 1.0, 5),  # 1·10·2/4 = 5
        (10, 4, 2, 1.25, 7),  # ceil(6.25)
        (3, 2, 2, 4.0, 3),  # 12 clipped to N
        (1, 8, 1, 0.5, 1),  # ceil(0.0625)
    ],
)
def test_capacity(n, e, k, cf, expected):
    cfg = expert_choice.Config(d_model=2, num_experts=e, top_k=k, capacity_factor=cf)
    assert expert_choice.capacity(n, cfg) == expected


def test_by_hand():
    # C = ceil(1·4·1/3) = 2. Columns: e0 (.7,.05,.6,.2) -> tokens 0, 2; e1 (.2,.8,.35,.2) ->
    # tokens 1, 2; e2 (.1,.15,.05,.6) -> tokens 3, 1. Token 1 goes to e1 and e2, token 2 to e0
    # and e1, tokens 0 and 3 to one expert each; nobody is left out.
    cfg = expert_choice.Config(d_model=3, num_experts=3, top_k=1)
    out, _ = helpers.jitted(expert_choice)({"w_g": jnp.eye(3)}, {}, jnp.log(PROBS), cfg=cfg,
                                           train=False)
    expected = np.array([[1, 0, 0], [0, 1, 1], [1, 1, 0], [0, 0, 1]], bool)
    np.testing.assert_array_equal(out.mask, expected)
    np.testing.assert_allclose(out.weights, np.where(expected, PROBS, 0), rtol=1e-6)
    assert float(out.metrics["unrouted_fraction"]) == 0.0
    assert float(out.aux_loss) == 0.0


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(capacity_factor=0.0), "capacity_factor"),
        (dict(capacity_factor=-1.0), "capacity_factor"),
        (dict(capacity_factor=float("nan")), "capacity_factor"),
    ],
)
def test_bad_config(kwargs, field):
    with pytest.raises(ValueError, match=field):
        expert_choice.Config(d_model=4, num_experts=4, **kwargs)
