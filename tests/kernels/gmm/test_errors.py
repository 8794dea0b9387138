"""Bad input to the public gmm ops: a ValueError naming the argument; checkified group sizes."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest
from jax.experimental import checkify

from moejax import testing
from moejax.kernels.gmm import (
    GmmImplUnavailableError,
    checked_gmm,
    checked_tgmm,
    gmm,
    reference,
    tgmm,
)
from tests.kernels.gmm.test_base import make_inputs


def test_checkify_catches_bad_group_sizes(rng):
    lhs, rhs, grad, _ = make_inputs(rng, 6, 3, 2, (1, 1))
    err, _ = jax.jit(checked_gmm)(lhs, rhs, jnp.array([1, 2], jnp.int32))
    assert err.get() is None
    err, _ = jax.jit(checked_gmm)(lhs, rhs, jnp.array([3, -1], jnp.int32))
    assert "non-negative" in err.get()
    err, _ = checked_gmm(lhs, rhs, jnp.array([4, 3], jnp.int32))
    assert "exceeds the M=6 rows" in err.get()
    with pytest.raises(checkify.JaxRuntimeError, match="exceeds"):
        err.throw()
    err, _ = checked_tgmm(lhs, grad, jnp.array([5, 5], jnp.int32))
    assert "exceeds" in err.get()


def test_bad_input(rng):
    lhs, rhs, grad, gs = make_inputs(rng, 6, 3, 2, (2, 4))
    with pytest.raises(ValueError, match="2-tensor for 'lhs'"):
        gmm(lhs[None], rhs, gs)
    with pytest.raises(ValueError, match="3-tensor for 'rhs'"):
        gmm(lhs, rhs[0], gs)
    with pytest.raises(ValueError, match="same dtype"):
        gmm(lhs, rhs.astype(jnp.bfloat16), gs)
    with pytest.raises(ValueError, match="disagree on K"):
        gmm(lhs[:, :2], rhs, gs)
    with pytest.raises(ValueError, match="has 3 entries"):
        gmm(lhs, rhs, jnp.array([1, 2, 3], jnp.int32))
    with pytest.raises(ValueError, match="integer"):
        gmm(lhs, rhs, gs.astype(jnp.float32))
    with pytest.raises(ValueError, match="1-tensor for 'group_sizes'"):
        gmm(lhs, rhs, gs[None])
    with pytest.raises(ValueError, match="disagree on M"):
        tgmm(lhs, grad[:5], gs)
    with pytest.raises(ValueError, match="2-tensor for 'grad'"):
        tgmm(lhs, grad[None], gs)
    with pytest.raises(ValueError, match="Unknown gmm impl 'triton'.*reference"):
        gmm(lhs, rhs, gs, impl="triton")
    with pytest.raises(ValueError, match="at least one"):
        gmm(lhs, rhs, gs, impl=())
    # "pallas" is available (tests/kernels/gmm/test_pallas.py); a sequence takes the first one.
    assert issubclass(GmmImplUnavailableError, NotImplementedError)
    out = gmm(lhs, rhs, gs, impl=("reference", "pallas"))
    testing.assert_close("sequence", reference.gmm_loop(lhs, rhs, (2, 4)), out,
                         ratio=testing.RATIO_F32)
