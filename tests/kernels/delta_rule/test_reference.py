"""The oracle itself against the math of DESIGN §3, written out in float64 numpy loops."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from moejax.kernels.delta_rule import delta_rule, delta_rule_step
from tests.kernels.delta_rule.inputs import MODES, make_inputs


def _numpy_recurrence(q, k, v, beta, g, lam, h0, scale):
    B, T, H, Dk = q.shape
    o = np.zeros(v.shape)
    S = h0.copy()
    for b in range(B):
        for h in range(H):
            s = S[b, h]
            for t in range(T):
                x = k[b, t, h] + (0.0 if lam is None else lam[b, t, h] * q[b, t, h])
                if g is not None:
                    s = np.exp(g[b, t, h]) * s
                s = s + beta[b, t, h] * np.outer(k[b, t, h], v[b, t, h] - s.T @ x)
                o[b, t, h] = scale * s.T @ q[b, t, h]
            S[b, h] = s
    return o, S


@pytest.mark.parametrize("mode", list(MODES))
def test_reference_matches_written_out_recurrence(mode):
    a = make_inputs(mode, B=2, T=17, H=2, Dk=5, Dv=3)
    npa = {n: None if x is None else np.asarray(x, np.float64) for n, x in a.items()}
    o_np, S_np = _numpy_recurrence(npa["q"], npa["k"], npa["v"], npa["beta"], npa["g"],
                                   npa["lam"], npa["initial_state"], scale=5**-0.5)
    o, S = delta_rule(a["q"], a["k"], a["v"], a["beta"], g=a["g"], lam=a["lam"],
                      initial_state=a["initial_state"], impl="reference")
    np.testing.assert_allclose(np.asarray(o), o_np, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(S), S_np, rtol=1e-5, atol=1e-5)


def _unit(rng, n):
    x = rng.normal(size=n)
    return x / np.linalg.norm(x)


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    beta=st.floats(1e-3, 1 - 1e-3),
    lam=st.floats(1e-3, 1 - 1e-3),
    dim=st.integers(2, 8),
)
def test_qdelta_transition_eigenvalue_in_unit_interval(seed, beta, lam, dim):
    """With unit q, k and β, λ ∈ (0, 1), `I − β k xᵀ` has its non-unit eigenvalue in (−1, 1).

    The transition is read off the real decode step: with v = 0 and S = I, one step returns it.
    """
    rng = np.random.default_rng(seed)
    q, k = _unit(rng, dim), _unit(rng, dim)
    f = lambda a: jnp.asarray(a, jnp.float32)[None, None]
    _, M = delta_rule_step(jnp.eye(dim)[None, None], f(q), f(k), jnp.zeros((1, 1, dim)),
                           f(beta), lam_t=f(lam))
    M = np.asarray(M[0, 0], np.float64)
    expected = 1 - beta * (1 + lam * k @ q)
    eig = np.sort_complex(np.linalg.eigvals(M))
    non_unit = eig[np.argmin(np.abs(eig - expected))]
    assert abs(non_unit.imag) < 1e-5 and abs(non_unit.real - expected) < 1e-4
    assert -1 < expected < 1
    assert np.sum(np.abs(eig - 1) < 1e-4) >= dim - 1  # the rest are unit eigenvalues
