"""`impl="chunk"` (the plain-JAX tile scan) against the loop oracles, plus chunk-only checks."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import pytest

from moejax import testing
from moejax.kernels.gmm import chunk, gmm, reference
from tests.kernels.gmm.test_base import CASES, GmmTestBase, case_ids, make_inputs


class TestChunk(GmmTestBase):
    impl = "chunk"


@functools.partial(jax.jit, static_argnames="block_m")
def _chunk_all(lhs, rhs, grad, gs, *, block_m):
    return (chunk.gmm(lhs, rhs, gs, block_m=block_m),
            chunk.gmm(lhs, jnp.swapaxes(rhs, 1, 2), gs, transpose_rhs=True, block_m=block_m),
            chunk.tgmm(lhs, grad, gs, block_m=block_m))


@pytest.mark.parametrize("block_m", [1, 3])
@pytest.mark.parametrize("m,k,n,sizes", CASES, ids=case_ids(CASES))
def test_chunk_tiles_straddling_groups(rng, m, k, n, sizes, block_m):
    """Small tiles: tiles cut across group boundaries, M not a multiple of the tile."""
    lhs, rhs, grad, gs = make_inputs(rng, m, k, n, sizes)
    out, out_t, tout = _chunk_all(lhs, rhs, grad, gs, block_m=block_m)
    ref = reference.gmm_loop(lhs, rhs, sizes)
    testing.assert_close("chunk gmm", ref, out, ratio=testing.RATIO_F32)
    testing.assert_close("chunk gmm transpose_rhs", ref, out_t, ratio=testing.RATIO_F32)
    testing.assert_close("chunk tgmm", reference.tgmm_loop(lhs, grad, sizes), tout,
                         ratio=testing.RATIO_F32)


def test_auto_memory_flat_in_groups():
    """On CPU, "auto" (chunk) scratch memory does not grow with G; ragged_dot's does."""
    def temp_bytes(impl, g):
        lhs, rhs = jnp.ones((512, 64)), jnp.ones((g, 64, 64))
        gs = jnp.full((g,), 512 // g, jnp.int32)
        mem = jax.jit(lambda a, b, s: gmm(a, b, s, impl=impl)).lower(lhs, rhs, gs).compile()
        mem = mem.memory_analysis()
        if mem is None:
            pytest.skip("no memory analysis on this backend")
        return mem.temp_size_in_bytes
    if jax.default_backend() != "cpu":
        pytest.skip("CPU-specific lowering")
    assert temp_bytes("auto", 32) <= 1.2 * temp_bytes("auto", 2) + 4096
    assert temp_bytes("reference", 32) > 4 * temp_bytes("reference", 2)
