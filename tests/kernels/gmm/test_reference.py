"""`impl="reference"` (`jax.lax.ragged_dot`) against the loop oracles, and its custom VJP."""

from __future__ import annotations

import jax

from moejax import testing
from moejax.kernels.gmm import gmm
from tests.kernels.gmm.test_base import GmmTestBase, make_inputs


class TestReference(GmmTestBase):
    impl = "reference"
    check_grads_order = 2


def test_custom_vjp_equals_ragged_dot_autodiff(rng):
    lhs, rhs, grad, gs = make_inputs(rng, 10, 6, 7, (0, 4, 0, 5, 0))
    got = jax.vjp(lambda a, b: gmm(a, b, gs, impl="reference"), lhs, rhs)[1](grad)
    want = jax.vjp(lambda a, b: jax.lax.ragged_dot(a, b, gs), lhs, rhs)[1](grad)
    for name, w, g in zip(("dlhs", "drhs"), want, got, strict=True):
        testing.assert_close(name, w, g, ratio=testing.RATIO_F32)
