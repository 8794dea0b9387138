"""The Pallas GPU (Triton) gmm/tgmm kernels in interpret mode on CPU, against the loop oracles.

`impl="pallas"` on CPU runs the Triton kernels with `interpret=True` (GPU semantics), so the
shared test base exercises them through the public ops (`TestPallasGpu`, VJPs included). The
direct kernel calls use small block sizes, so tiles straddle group boundaries and leave partial
tiles in M, K and N. Interpret mode is slow: the default cases are tiny; the sweep is
`@pytest.mark.slow`.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import pytest

from moejax import testing
from moejax.kernels.gmm import pallas_gpu, reference
from moejax.moe.layer import MoEConfig, init, moe_apply
from tests.kernels.gmm.kernels import check_kernels, check_random_sweep, run_kernels
from tests.kernels.gmm.test_base import BF16_CASE, CASES, GmmTestBase, case_ids, make_inputs

GPU_BLOCKS = pallas_gpu.BlockSizes(block_m=16, block_k=16, block_n=16)
# (M, K, N, group_sizes): uneven groups with boundaries inside tiles, empty groups, sum < M
# (tail rows), all rows in one group, no rows at all; M, K, N not multiples of the blocks.
GPU_CASES = [
    (40, 20, 36, (5, 0, 17, 0, 10)),
    (24, 8, 5, (0, 24, 0)),
    (7, 3, 2, (0, 0)),
]


class TestPallasGpu(GmmTestBase):
    """ops.gmm/tgmm(impl="pallas"): on CPU the Triton kernels, interpreted, and their VJPs."""

    impl = "pallas"

    @pytest.mark.parametrize("m,k,n,sizes", [BF16_CASE], ids=case_ids([BF16_CASE]))
    def test_values_and_vjps_match_loop(self, rng, m, k, n, sizes):
        self._check_values_and_vjps(rng, m, k, n, sizes)

    @pytest.mark.slow
    @pytest.mark.parametrize("m,k,n,sizes", CASES, ids=case_ids(CASES))
    def test_values_and_vjps_match_loop_full(self, rng, m, k, n, sizes):
        self._check_values_and_vjps(rng, m, k, n, sizes)


@pytest.mark.parametrize("m,k,n,sizes", GPU_CASES, ids=case_ids(GPU_CASES))
def test_gpu_kernels_interpret(rng, m, k, n, sizes):
    lhs, rhs, grad, gs = make_inputs(rng, m, k, n, sizes)
    outs = run_kernels(lhs, rhs, grad, gs, mod=pallas_gpu, block_sizes=GPU_BLOCKS,
                       interpret=True)
    check_kernels(*outs, lhs, rhs, grad, sizes)


def test_kernels_bf16(rng):
    sizes = (5, 0, 17, 0, 10)
    lhs, rhs, grad, gs = make_inputs(rng, 40, 20, 36, sizes, jnp.bfloat16)
    out = pallas_gpu.gmm(lhs, rhs, gs, block_sizes=GPU_BLOCKS, interpret=True)
    assert out.dtype == jnp.bfloat16
    testing.assert_close("gpu gmm bf16", reference.gmm_loop(lhs, rhs, sizes), out,
                         ratio=testing.RATIO_BF16_OUT)


def test_block_sizes_validation():
    with pytest.raises(ValueError, match="block_m=24 must be a power of two"):
        pallas_gpu.BlockSizes(block_m=24)
    assert pallas_gpu.BlockSizes.get_default() == pallas_gpu.BlockSizes()


def test_check_supported():
    """The compiled kernels refuse dtypes outside the compile check (so "auto" falls back)."""
    f16 = jax.ShapeDtypeStruct((8, 4), jnp.float16)
    with pytest.raises(NotImplementedError, match="dtype float16 .* not covered"):
        pallas_gpu.check_supported("gmm", f16, jax.ShapeDtypeStruct((2, 4, 3), jnp.float16))
    pallas_gpu.check_supported("gmm", jax.ShapeDtypeStruct((8, 4), jnp.bfloat16), f16)


def test_moe_layer_pallas_equals_reference():
    cfg = MoEConfig(d_model=8, d_ff=16, num_experts=4, top_k=2, dispatcher="dropless",
                    gmm_impl="reference")
    params, state = init(jax.random.key(0), cfg)
    x = jax.random.normal(jax.random.key(1), (3, 5, 8))

    @functools.partial(jax.jit, static_argnames="impl")
    def run(params, x, impl):
        c = dataclasses.replace(cfg, gmm_impl=impl)

        def loss(params, x):
            y, _, _ = moe_apply(params, state, x, cfg=c, train=True)
            return jnp.sum(y**2), y
        return jax.grad(loss, argnums=(0, 1), has_aux=True)(params, x)

    (g_ref, y_ref), (g_pal, y_pal) = run(params, x, "reference"), run(params, x, "pallas")
    testing.assert_close("moe y", y_ref, y_pal, ratio=testing.RATIO_F32)
    flat_ref, _ = jax.tree_util.tree_flatten_with_path(g_ref)
    for (path, a), b in zip(flat_ref, jax.tree.leaves(g_pal), strict=True):
        testing.assert_close(f"moe grad {jax.tree_util.keystr(path)}", a, b, ratio=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(4))
def test_random_sweep(seed):
    check_random_sweep(seed, mod=pallas_gpu, block_sizes=GPU_BLOCKS)
