"""Shared test base for every `gmm`/`tgmm` implementation (tokamax style).

A backend test file subclasses `GmmTestBase`, sets `impl` (and the tolerance hook), and inherits
every test. Each implementation is compared with the per-group float64 loop oracles: `gmm` and
`tgmm` outputs and both VJPs of each (`gmm`: dlhs, drhs; `tgmm`: dlhs, dgrad) under random
cotangents, on uneven groups, empty groups, `sum(group_sizes) < M` (tail rows) and no rows at
all; plus numerical gradients. The `rng` fixture (conftest.py) is seeded from the test name.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from moejax import testing
from moejax.kernels.gmm import gmm, reference, tgmm

# (M, K, N, group_sizes): uneven, empty groups, everything in one group, sum < M, sum = 0.
CASES = [
    (12, 8, 5, (3, 5, 4)),
    (10, 6, 7, (0, 4, 0, 6, 0)),
    (9, 4, 3, (0, 9, 0)),
    (16, 5, 6, (2, 3, 1)),
    (7, 3, 2, (0, 0)),
    (1, 2, 3, (1,)),
]
# Boundaries inside tiles of 16, empty groups, tail rows; M, K, N not multiples of 16.
BF16_CASE = (40, 20, 36, (5, 0, 17, 0, 10))


def case_ids(cases):
    return [f"M{m}-K{k}-N{n}-G{len(g)}-sum{sum(g)}" for m, k, n, g in cases]


def make_inputs(rng, m, k, n, sizes, dtype=jnp.float32):
    """`(lhs [M, K], rhs [G, K, N], grad [M, N], group_sizes <int32>[G])`."""
    lhs = jnp.asarray(rng.standard_normal((m, k)), dtype)
    rhs = jnp.asarray(rng.standard_normal((len(sizes), k, n)), dtype)
    grad = jnp.asarray(rng.standard_normal((m, n)), dtype)
    return lhs, rhs, grad, jnp.asarray(sizes, jnp.int32)


@functools.partial(jax.jit, static_argnames="impl")
def forward_and_vjps(lhs, rhs, grad, dw, gs, *, impl):
    """gmm and tgmm outputs plus their VJPs (cotangents `grad` and `dw`), in one compile."""
    out, vjp = jax.vjp(lambda a, b: gmm(a, b, gs, impl=impl), lhs, rhs)
    tout, tvjp = jax.vjp(lambda a, c: tgmm(a, c, gs, impl=impl), lhs, grad)
    return (out, *vjp(grad), tout, *tvjp(dw))


class GmmTestBase:
    """Every test of a gmm implementation; subclasses set `impl`."""

    impl: str = ""
    check_grads_order: int = 1

    def ratio(self, dtype, name: str) -> float:
        """Tolerance hook: relative-RMSE ratio for output or gradient `name` at `dtype`."""
        if dtype == jnp.float32:
            return testing.RATIO_F32
        return testing.RATIO_BF16_OUT if name in ("gmm", "tgmm") else testing.RATIO_BF16_GRAD

    def _check_values_and_vjps(self, rng, m, k, n, sizes, dtype=jnp.float32):
        dtype = jnp.dtype(dtype)
        lhs, rhs, grad, gs = make_inputs(rng, m, k, n, sizes, dtype)
        dw = jnp.asarray(rng.standard_normal((len(sizes), k, n)), dtype)
        got = forward_and_vjps(lhs, rhs, grad, dw, gs, impl=self.impl)
        t = lambda x: np.swapaxes(np.asarray(x, np.float32), 1, 2)  # [G, K, N] <-> [G, N, K]
        want = {
            "gmm": reference.gmm_loop(lhs, rhs, sizes),
            "gmm dlhs": reference.gmm_loop(grad, t(rhs), sizes),
            "gmm drhs": reference.tgmm_loop(lhs, grad, sizes),
            "tgmm": reference.tgmm_loop(lhs, grad, sizes),
            "tgmm dlhs": reference.gmm_loop(grad, t(dw), sizes),
            "tgmm dgrad": reference.gmm_loop(lhs, dw, sizes),
        }
        for (name, ref), g in zip(want.items(), got, strict=True):
            assert g.dtype == dtype, name
            testing.assert_close(f"{self.impl} {dtype} {name}", ref, g,
                                 ratio=self.ratio(dtype, name))
        out, dlhs, _, tout, _, _ = got
        np.testing.assert_array_equal(np.asarray(out, np.float32)[sum(sizes):], 0.0)  # tail
        np.testing.assert_array_equal(np.asarray(dlhs, np.float32)[sum(sizes):], 0.0)
        assert tout.shape == (len(sizes), k, n)
        for g, size in enumerate(sizes):
            if size == 0:  # empty group: zero block
                np.testing.assert_array_equal(np.asarray(tout[g], np.float32), 0.0)

    @pytest.mark.parametrize("m,k,n,sizes", CASES, ids=case_ids(CASES))
    def test_values_and_vjps_match_loop(self, rng, m, k, n, sizes):
        self._check_values_and_vjps(rng, m, k, n, sizes)

    def test_values_and_vjps_bf16(self, rng):
        self._check_values_and_vjps(rng, *BF16_CASE, dtype=jnp.bfloat16)

    def test_check_grads(self, rng):
        lhs, rhs, grad, gs = make_inputs(rng, 10, 6, 7, (0, 4, 0, 5, 0))  # empty groups, sum < M
        order = self.check_grads_order
        f = jax.jit(lambda a, b: gmm(a, b, gs, impl=self.impl))
        check_grads(f, (lhs, rhs), order=order, modes=["rev"], eps=1e-3)
        f = jax.jit(lambda a, c: tgmm(a, c, gs, impl=self.impl))
        check_grads(f, (lhs, grad), order=order, modes=["rev"], eps=1e-3)
