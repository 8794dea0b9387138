"""Direct calls of the Pallas gmm kernels (interpret mode) and their checks, shared by the
backend test files."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from moejax import testing
from moejax.kernels.gmm import reference


def check_kernels(out, out_t, tout, lhs, rhs, grad, sizes, ratio=testing.RATIO_F32):
    """gmm, gmm with rhs transposed and tgmm of one kernel module against the loop oracles."""
    want = reference.gmm_loop(lhs, rhs, sizes)
    testing.assert_close("gmm", want, out, ratio=ratio)
    testing.assert_close("gmm transpose_rhs", want, out_t, ratio=ratio)
    testing.assert_close("tgmm", reference.tgmm_loop(lhs, grad, sizes), tout, ratio=ratio)
    np.testing.assert_array_equal(np.asarray(out, np.float32)[sum(sizes):], 0.0)  # tail rows
    for g, size in enumerate(sizes):
        if size == 0:
            np.testing.assert_array_equal(np.asarray(tout[g], np.float32), 0.0)


@functools.partial(jax.jit, static_argnames=("mod", "block_sizes", "interpret"))
def run_kernels(lhs, rhs, grad, gs, *, mod, block_sizes, interpret):
    """`(gmm, gmm with rhs transposed, tgmm)` of kernel module `mod`."""
    kw = dict(block_sizes=block_sizes, interpret=interpret)
    return (mod.gmm(lhs, rhs, gs, **kw),
            mod.gmm(lhs, jnp.swapaxes(rhs, 1, 2), gs, transpose_rhs=True, **kw),
            mod.tgmm(lhs, grad, gs, **kw))


def random_case(seed: int):
    """Random group count, sizes (zeros allowed, `sum ≤ M`) and shapes, and its generator."""
    rng = np.random.default_rng(seed)
    g = int(rng.integers(1, 9))
    m, k, n = (int(x) for x in rng.integers(1, 80, size=3))
    total = int(rng.integers(0, m + 1))  # sum ≤ M: tail rows when < M
    sizes = rng.multinomial(total, rng.dirichlet(np.ones(g)))
    sizes = tuple(int(x) for x in np.where(rng.random(g) < 0.3, 0, sizes))  # empty groups
    return rng, (m, k, n, sizes)


def check_random_sweep(seed: int, *, mod, block_sizes) -> None:
    """Random group sizes (zeros allowed) and shapes, fp32 and bf16: `mod`'s raw kernels (in
    interpret mode) against the reference."""
    from tests.kernels.gmm.test_base import make_inputs

    rng, (m, k, n, sizes) = random_case(seed)
    for dtype, ratio in ((jnp.float32, testing.RATIO_F32),
                         (jnp.bfloat16, testing.RATIO_BF16_OUT)):
        lhs, rhs, grad, gs = make_inputs(rng, m, k, n, sizes, dtype)
        outs = run_kernels(lhs, rhs, grad, gs, mod=mod, block_sizes=block_sizes, interpret=True)
        check_kernels(*outs, lhs, rhs, grad, sizes, ratio=ratio)
