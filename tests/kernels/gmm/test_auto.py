"""`impl="auto"` (on CPU: the chunk path; see test_lowering.py for CUDA/TPU) and the default."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from moejax import testing
from moejax.kernels.gmm import gmm, reference
from tests.kernels.gmm.test_base import GmmTestBase, make_inputs


class TestAuto(GmmTestBase):
    impl = "auto"


def test_bf16(rng):
    """The default impl in bf16: output dtype, value, and the dtype of the rhs gradient."""
    sizes = (5, 0, 11)
    lhs, rhs, grad, gs = make_inputs(rng, 16, 32, 24, sizes, jnp.bfloat16)
    out = gmm(lhs, rhs, gs)
    assert out.dtype == jnp.bfloat16
    testing.assert_close("gmm bf16", reference.gmm_loop(lhs, rhs, sizes), out,
                         ratio=testing.RATIO_BF16_OUT)
    drhs = jax.grad(lambda b: jnp.sum(gmm(lhs, b, gs).astype(jnp.float32) ** 2))(rhs)
    assert drhs.dtype == jnp.bfloat16
