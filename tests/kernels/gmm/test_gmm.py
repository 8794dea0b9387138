"""Tests for moejax.kernels.gmm: values and gradients against the per-group loop oracles."""

import functools
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental import checkify
from jax.test_util import check_grads

from moejax import testing
from moejax.kernels.gmm import (
    GmmImplUnavailableError,
    checked_gmm,
    checked_tgmm,
    chunk,
    gmm,
    reference,
    tgmm,
)

# (M, K, N, group_sizes): uneven, empty groups, everything in one group, sum < M, sum = 0.
CASES = [
    (12, 8, 5, (3, 5, 4)),
    (10, 6, 7, (0, 4, 0, 6, 0)),
    (9, 4, 3, (0, 9, 0)),
    (16, 5, 6, (2, 3, 1)),
    (7, 3, 2, (0, 0)),
    (1, 2, 3, (1,)),
]
IDS = [f"M{m}-K{k}-N{n}-G{len(g)}-sum{sum(g)}" for m, k, n, g in CASES]
IMPLS = ["reference", "chunk", "auto"]


@pytest.fixture
def rng(request):
    return np.random.default_rng(zlib.crc32(request.node.name.encode()))


def _inputs(rng, m, k, n, sizes, dtype=jnp.float32):
    lhs = jnp.asarray(rng.standard_normal((m, k)), dtype)
    rhs = jnp.asarray(rng.standard_normal((len(sizes), k, n)), dtype)
    grad = jnp.asarray(rng.standard_normal((m, n)), dtype)
    return lhs, rhs, grad, jnp.asarray(sizes, jnp.int32)


@functools.partial(jax.jit, static_argnames="impl")
def _forward_and_vjps(lhs, rhs, grad, dw, gs, *, impl):
    """gmm and tgmm outputs plus their VJPs (cotangents `grad` and `dw`), in one compile."""
    out, vjp = jax.vjp(lambda a, b: gmm(a, b, gs, impl=impl), lhs, rhs)
    tout, tvjp = jax.vjp(lambda a, c: tgmm(a, c, gs, impl=impl), lhs, grad)
    return (out, *vjp(grad), tout, *tvjp(dw))


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("m,k,n,sizes", CASES, ids=IDS)
def test_values_and_vjps_match_loop(rng, m, k, n, sizes, impl):
    lhs, rhs, grad, gs = _inputs(rng, m, k, n, sizes)
    dw = jnp.asarray(rng.standard_normal((len(sizes), k, n)), jnp.float32)
    out, dlhs, drhs, tout, tdlhs, tdgrad = _forward_and_vjps(lhs, rhs, grad, dw, gs, impl=impl)
    t = np.swapaxes  # [G, K, N] <-> [G, N, K]
    want = {
        "gmm": reference.gmm_loop(lhs, rhs, sizes),
        "gmm dlhs": reference.gmm_loop(grad, t(np.asarray(rhs), 1, 2), sizes),
        "gmm drhs": reference.tgmm_loop(lhs, grad, sizes),
        "tgmm": reference.tgmm_loop(lhs, grad, sizes),
        "tgmm dlhs": reference.gmm_loop(grad, t(np.asarray(dw), 1, 2), sizes),
        "tgmm dgrad": reference.gmm_loop(lhs, dw, sizes),
    }
    for (name, ref), got in zip(want.items(), (out, dlhs, drhs, tout, tdlhs, tdgrad), strict=True):
        testing.assert_close(f"{impl} {name}", ref, got, ratio=testing.RATIO_F32)
    np.testing.assert_array_equal(np.asarray(out)[sum(sizes):], 0.0)  # tail rows are zero
    np.testing.assert_array_equal(np.asarray(dlhs)[sum(sizes):], 0.0)
    assert tout.shape == (len(sizes), k, n)
    for g, size in enumerate(sizes):
        if size == 0:
            np.testing.assert_array_equal(np.asarray(tout[g]), 0.0)  # empty group: zero block


def test_custom_vjp_equals_ragged_dot_autodiff(rng):
    lhs, rhs, grad, gs = _inputs(rng, 10, 6, 7, (0, 4, 0, 5, 0))
    got = jax.vjp(lambda a, b: gmm(a, b, gs, impl="reference"), lhs, rhs)[1](grad)
    want = jax.vjp(lambda a, b: jax.lax.ragged_dot(a, b, gs), lhs, rhs)[1](grad)
    for name, w, g in zip(("dlhs", "drhs"), want, got, strict=True):
        testing.assert_close(name, w, g, ratio=testing.RATIO_F32)


@pytest.mark.parametrize("impl,order", [("reference", 2), ("chunk", 1)])
def test_check_grads(rng, impl, order):
    lhs, rhs, grad, gs = _inputs(rng, 10, 6, 7, (0, 4, 0, 5, 0))  # empty groups, sum < M
    f = jax.jit(lambda a, b: gmm(a, b, gs, impl=impl))
    check_grads(f, (lhs, rhs), order=order, modes=["rev"], eps=1e-3)
    f = jax.jit(lambda a, b: tgmm(a, b, gs, impl=impl))
    check_grads(f, (lhs, grad), order=order, modes=["rev"], eps=1e-3)


@functools.partial(jax.jit, static_argnames="block_m")
def _chunk_all(lhs, rhs, grad, gs, *, block_m):
    return (chunk.gmm(lhs, rhs, gs, block_m=block_m),
            chunk.gmm(lhs, jnp.swapaxes(rhs, 1, 2), gs, transpose_rhs=True, block_m=block_m),
            chunk.tgmm(lhs, grad, gs, block_m=block_m))


@pytest.mark.parametrize("block_m", [1, 3])
@pytest.mark.parametrize("m,k,n,sizes", CASES, ids=IDS)
def test_chunk_tiles_straddling_groups(rng, m, k, n, sizes, block_m):
    """Small tiles: tiles cut across group boundaries, M not a multiple of the tile."""
    lhs, rhs, grad, gs = _inputs(rng, m, k, n, sizes)
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


def test_bf16(rng):
    sizes = (5, 0, 11)
    lhs, rhs, grad, gs = _inputs(rng, 16, 32, 24, sizes, jnp.bfloat16)
    out = gmm(lhs, rhs, gs)
    assert out.dtype == jnp.bfloat16
    testing.assert_close("gmm bf16", reference.gmm_loop(lhs, rhs, sizes), out,
                         ratio=testing.RATIO_BF16_OUT)
    drhs = jax.grad(lambda b: jnp.sum(gmm(lhs, b, gs).astype(jnp.float32) ** 2))(rhs)
    assert drhs.dtype == jnp.bfloat16


def test_checkify_catches_bad_group_sizes(rng):
    lhs, rhs, grad, _ = _inputs(rng, 6, 3, 2, (1, 1))
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
    lhs, rhs, grad, gs = _inputs(rng, 6, 3, 2, (2, 4))
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
