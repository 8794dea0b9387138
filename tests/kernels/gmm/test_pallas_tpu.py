"""The Pallas TPU (Mosaic) gmm/tgmm kernels on CPU, against the loop oracles.

`impl="pallas"` on CPU runs the GPU kernels, so these tests call the TPU kernels directly, in
generic and TPU interpret mode. Small block sizes make tiles straddle group boundaries and leave
partial tiles in M, K and N (two K blocks, the last partial). The sweep is `@pytest.mark.slow`.
"""

from __future__ import annotations

import jax.numpy as jnp
import pytest
from jax.experimental.pallas import tpu as pltpu

from moejax import testing
from moejax.kernels.gmm import pallas_tpu, reference
from tests.kernels.gmm.kernels import check_kernels, check_random_sweep, run_kernels
from tests.kernels.gmm.test_base import case_ids, make_inputs

TPU_BLOCKS = pallas_tpu.BlockSizes(block_m=16, block_k=128, block_n=128)
TPU_CASES = [
    (40, 136, 130, (5, 0, 17, 0, 10)),  # two K blocks (the last partial), a partial N block.
    (24, 8, 5, (0, 24, 0)),
]
# Generic interpret mode for every case; TPU interpret mode (slower) for the first.
_TPU_RUNS = [(*c, "generic") for c in TPU_CASES] + [(*TPU_CASES[0], "tpu")]
_TPU_IDS = [f"{i}-{r[-1]}" for i, r in zip(case_ids([r[:4] for r in _TPU_RUNS]), _TPU_RUNS,
                                           strict=True)]


@pytest.mark.parametrize("m,k,n,sizes,mode", _TPU_RUNS, ids=_TPU_IDS)
def test_tpu_kernels_interpret(rng, m, k, n, sizes, mode):
    lhs, rhs, grad, gs = make_inputs(rng, m, k, n, sizes)
    interpret = True if mode == "generic" else pltpu.InterpretParams()
    outs = run_kernels(lhs, rhs, grad, gs, mod=pallas_tpu, block_sizes=TPU_BLOCKS,
                       interpret=interpret)
    check_kernels(*outs, lhs, rhs, grad, sizes)


def test_kernels_bf16_preferred_element_type(rng):
    sizes = (5, 0, 17, 0, 10)
    lhs, rhs, grad, gs = make_inputs(rng, 40, 20, 36, sizes, jnp.bfloat16)
    out32 = pallas_tpu.gmm(lhs, rhs, gs, out_dtype=jnp.float32, block_sizes=TPU_BLOCKS,
                           interpret=True)
    assert out32.dtype == jnp.float32
    testing.assert_close("tpu gmm bf16->f32", reference.gmm_loop(lhs, rhs, sizes), out32,
                         ratio=testing.RATIO_BF16_OUT)


def test_block_sizes_validation():
    with pytest.raises(ValueError, match="block_k=100 must be a positive multiple of 128"):
        pallas_tpu.BlockSizes(block_k=100)
    hash(pallas_tpu.BlockSizes.get_default())  # static jit argument


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(4))
def test_random_sweep(seed):
    check_random_sweep(seed, mod=pallas_tpu, block_sizes=TPU_BLOCKS)
