"""The jnp chunkwise path against the oracle, plus chunk-path-only checks."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.test_util import check_grads

from moejax.kernels.delta_rule import delta_rule
from tests.kernels.delta_rule.inputs import make_inputs
from tests.kernels.delta_rule.test_base import DeltaRuleTestBase


class TestChunk(DeltaRuleTestBase):
    impl = "chunk"


def test_check_grads_float64():
    """Numerical vs autodiff gradients of the chunk path, in float64, small shapes."""
    with jax.enable_x64(True):
        a = make_inputs("gated_qdelta", B=1, T=11, H=1, Dk=4, Dv=3, dtype=jnp.float64)

        def f(q, k, v, beta, g, lam, h0):
            o, S = delta_rule(q, k, v, beta, g=g, lam=lam, initial_state=h0, impl="chunk",
                              chunk_size=4)
            return jnp.sum(jnp.sin(o)) + jnp.sum(S**2)

        args = [a[n] for n in ("q", "k", "v", "beta", "g", "lam", "initial_state")]
        check_grads(f, args, order=1, modes=["rev"], atol=1e-6, rtol=1e-6)


def test_long_bf16_sequence_is_finite():
    a = make_inputs("gated_qdelta", B=1, T=16384, H=1, Dk=16, Dv=16, dtype=jnp.bfloat16)
    o, S = delta_rule(a["q"], a["k"], a["v"], a["beta"], g=a["g"], lam=a["lam"],
                      initial_state=a["initial_state"], impl="chunk")
    assert o.dtype == jnp.bfloat16
    assert np.isfinite(np.asarray(o, np.float32)).all() and np.isfinite(np.asarray(S)).all()


def test_auto_is_chunk():
    a = make_inputs("qdelta", T=40)
    run = lambda impl: delta_rule(a["q"], a["k"], a["v"], a["beta"], lam=a["lam"], impl=impl)
    np.testing.assert_array_equal(np.asarray(run("auto")[0]), np.asarray(run("chunk")[0]))
