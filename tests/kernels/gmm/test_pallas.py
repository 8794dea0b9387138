"""Pallas gmm/tgmm kernels in interpret mode on CPU, against the per-group loop oracles.

The GPU (Triton) kernels run with `interpret=True` (GPU semantics), the TPU (Mosaic) kernels in
generic and TPU interpret mode. Small block sizes make tiles straddle group boundaries and leave
partial tiles in M, K and N. Interpret mode is slow, so the default cases are tiny; the sweep is
`@pytest.mark.slow`.
"""

import dataclasses
import functools
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import tpu as pltpu
from jax.test_util import check_grads

from moejax import testing
from moejax.kernels.gmm import gmm, metadata, pallas_gpu, pallas_tpu, reference, tgmm
from moejax.moe.layer import MoEConfig, init, moe_apply

GPU_BLOCKS = pallas_gpu.BlockSizes(block_m=16, block_k=16, block_n=16)
TPU_BLOCKS = pallas_tpu.BlockSizes(block_m=16, block_k=128, block_n=128)

# (M, K, N, group_sizes): uneven groups with boundaries inside tiles, empty groups, sum < M
# (tail rows), all rows in one group, no rows at all; M, K, N not multiples of the blocks.
GPU_CASES = [
    (40, 20, 36, (5, 0, 17, 0, 10)),
    (24, 8, 5, (0, 24, 0)),
    (7, 3, 2, (0, 0)),
]
TPU_CASES = [
    (40, 136, 130, (5, 0, 17, 0, 10)),  # two K blocks (the last partial), a partial N block.
    (24, 8, 5, (0, 24, 0)),
]
_ids = lambda cases: [f"M{m}-K{k}-N{n}-G{len(g)}-sum{sum(g)}" for m, k, n, g in cases]


@pytest.fixture
def rng(request):
    return np.random.default_rng(zlib.crc32(request.node.name.encode()))


def _inputs(rng, m, k, n, sizes, dtype=jnp.float32):
    lhs = jnp.asarray(rng.standard_normal((m, k)), dtype)
    rhs = jnp.asarray(rng.standard_normal((len(sizes), k, n)), dtype)
    grad = jnp.asarray(rng.standard_normal((m, n)), dtype)
    return lhs, rhs, grad, jnp.asarray(sizes, jnp.int32)


def _check_kernels(out, out_t, tout, lhs, rhs, grad, sizes, ratio=testing.RATIO_F32):
    want = reference.gmm_loop(lhs, rhs, sizes)
    testing.assert_close("gmm", want, out, ratio=ratio)
    testing.assert_close("gmm transpose_rhs", want, out_t, ratio=ratio)
    testing.assert_close("tgmm", reference.tgmm_loop(lhs, grad, sizes), tout, ratio=ratio)
    np.testing.assert_array_equal(np.asarray(out, np.float32)[sum(sizes):], 0.0)  # tail rows
    for g, size in enumerate(sizes):
        if size == 0:
            np.testing.assert_array_equal(np.asarray(tout[g], np.float32), 0.0)


@functools.partial(jax.jit, static_argnames=("mod", "block_sizes", "interpret"))
def _run_kernels(lhs, rhs, grad, gs, *, mod, block_sizes, interpret):
    kw = dict(block_sizes=block_sizes, interpret=interpret)
    return (mod.gmm(lhs, rhs, gs, **kw),
            mod.gmm(lhs, jnp.swapaxes(rhs, 1, 2), gs, transpose_rhs=True, **kw),
            mod.tgmm(lhs, grad, gs, **kw))


@pytest.mark.parametrize("m,k,n,sizes", GPU_CASES, ids=_ids(GPU_CASES))
def test_gpu_kernels_interpret(rng, m, k, n, sizes):
    lhs, rhs, grad, gs = _inputs(rng, m, k, n, sizes)
    outs = _run_kernels(lhs, rhs, grad, gs, mod=pallas_gpu, block_sizes=GPU_BLOCKS,
                        interpret=True)
    _check_kernels(*outs, lhs, rhs, grad, sizes)


# Generic interpret mode for every case; TPU interpret mode (slower) for the first.
_TPU_RUNS = [(*c, "generic") for c in TPU_CASES] + [(*TPU_CASES[0], "tpu")]
_TPU_IDS = [f"{i}-{r[-1]}" for i, r in zip(_ids([r[:4] for r in _TPU_RUNS]), _TPU_RUNS,
                                           strict=True)]


@pytest.mark.parametrize("m,k,n,sizes,mode", _TPU_RUNS, ids=_TPU_IDS)
def test_tpu_kernels_interpret(rng, m, k, n, sizes, mode):
    lhs, rhs, grad, gs = _inputs(rng, m, k, n, sizes)
    interpret = True if mode == "generic" else pltpu.InterpretParams()
    outs = _run_kernels(lhs, rhs, grad, gs, mod=pallas_tpu, block_sizes=TPU_BLOCKS,
                        interpret=interpret)
    _check_kernels(*outs, lhs, rhs, grad, sizes)


def test_kernels_bf16_and_preferred_element_type(rng):
    sizes = (5, 0, 17, 0, 10)
    lhs, rhs, grad, gs = _inputs(rng, 40, 20, 36, sizes, jnp.bfloat16)
    out = pallas_gpu.gmm(lhs, rhs, gs, block_sizes=GPU_BLOCKS, interpret=True)
    assert out.dtype == jnp.bfloat16
    testing.assert_close("gpu gmm bf16", reference.gmm_loop(lhs, rhs, sizes), out,
                         ratio=testing.RATIO_BF16_OUT)
    out32 = pallas_tpu.gmm(lhs, rhs, gs, out_dtype=jnp.float32, block_sizes=TPU_BLOCKS,
                           interpret=True)
    assert out32.dtype == jnp.float32
    testing.assert_close("tpu gmm bf16->f32", reference.gmm_loop(lhs, rhs, sizes), out32,
                         ratio=testing.RATIO_BF16_OUT)


@functools.partial(jax.jit, static_argnames="impl")
def _forward_and_vjps(lhs, rhs, grad, dw, gs, *, impl):
    out, vjp = jax.vjp(lambda a, b: gmm(a, b, gs, impl=impl), lhs, rhs)
    tout, tvjp = jax.vjp(lambda a, c: tgmm(a, c, gs, impl=impl), lhs, grad)
    return (out, *vjp(grad), tout, *tvjp(dw))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_ops_pallas_values_and_vjps(rng, dtype):
    """ops.gmm/tgmm(impl="pallas") (on CPU: the Triton kernel, interpreted) and their VJPs."""
    m, k, n, sizes = 40, 20, 36, (5, 0, 17, 0, 10)
    dtype = jnp.dtype(dtype)
    lhs, rhs, grad, gs = _inputs(rng, m, k, n, sizes, dtype)
    dw = jnp.asarray(rng.standard_normal((len(sizes), k, n)), dtype)
    got = _forward_and_vjps(lhs, rhs, grad, dw, gs, impl="pallas")
    t = lambda x: np.swapaxes(np.asarray(x, np.float32), 1, 2)
    want = {
        "gmm": reference.gmm_loop(lhs, rhs, sizes),
        "gmm dlhs": reference.gmm_loop(grad, t(rhs), sizes),
        "gmm drhs": reference.tgmm_loop(lhs, grad, sizes),
        "tgmm": reference.tgmm_loop(lhs, grad, sizes),
        "tgmm dlhs": reference.gmm_loop(grad, t(dw), sizes),
        "tgmm dgrad": reference.gmm_loop(lhs, dw, sizes),
    }
    f32 = dtype == jnp.float32
    for (name, ref), g in zip(want.items(), got, strict=True):
        assert g.dtype == dtype, name
        ratio = testing.RATIO_F32 if f32 else (
            testing.RATIO_BF16_OUT if name in ("gmm", "tgmm") else testing.RATIO_BF16_GRAD)
        testing.assert_close(f"pallas {dtype} {name}", ref, g, ratio=ratio)
    np.testing.assert_array_equal(np.asarray(got[1], np.float32)[sum(sizes):], 0.0)


def test_check_grads(rng):
    lhs, rhs, grad, gs = _inputs(rng, 10, 6, 7, (0, 4, 0, 5, 0))  # empty groups, sum < M
    check_grads(jax.jit(lambda a, b: gmm(a, b, gs, impl="pallas")), (lhs, rhs), order=1,
                modes=["rev"], eps=1e-3)
    check_grads(jax.jit(lambda a, c: tgmm(a, c, gs, impl="pallas")), (lhs, grad), order=1,
                modes=["rev"], eps=1e-3)


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


def test_metadata_schedule():
    """Every output row is covered by exactly one gmm visit; tgmm visits every group."""
    sizes = (5, 0, 17, 0, 10)
    meta = jax.device_get(metadata.make_group_metadata(jnp.asarray(sizes, jnp.int32), m=40,
                                                       tm=16, for_tgmm=False))
    assert meta.tile.shape == (metadata.num_visits(40, 16, 5),)
    cover = np.zeros(40, int)
    for t, lo, hi in zip(meta.tile, meta.lo, meta.hi, strict=True):
        rows = np.arange(t * 16, min(t * 16 + 16, 40))
        cover[rows[(rows >= lo) & (rows < hi)]] += 1
    np.testing.assert_array_equal(cover, 1)
    assert np.all(np.diff(meta.tile) >= 0)  # a tile's visits are consecutive
    tmeta = jax.device_get(metadata.make_group_metadata(jnp.asarray(sizes, jnp.int32), m=40,
                                                        tm=16, for_tgmm=True))
    assert set(tmeta.group.tolist()) == set(range(5))
    assert int(tmeta.compute.sum()) == 1 + 2 + 1  # group 0: tile 0; group 2: 0-1; group 4: 1-2
    assert int(tmeta.first.sum()) == int(tmeta.last.sum()) == 5  # one store per group


def test_block_sizes_validation():
    with pytest.raises(ValueError, match="block_m=24 must be a power of two"):
        pallas_gpu.BlockSizes(block_m=24)
    with pytest.raises(ValueError, match="block_k=100 must be a positive multiple of 128"):
        pallas_tpu.BlockSizes(block_k=100)
    assert pallas_gpu.BlockSizes.get_default() == pallas_gpu.BlockSizes()
    hash(pallas_tpu.BlockSizes.get_default())  # static jit argument


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(4))
def test_random_sweep(seed):
    """Random group sizes (zeros allowed) and shapes, both kernels, fp32 and bf16."""
    rng = np.random.default_rng(seed)
    g = int(rng.integers(1, 9))
    m, k, n = (int(x) for x in rng.integers(1, 80, size=3))
    total = int(rng.integers(0, m + 1))  # sum ≤ M: tail rows when < M
    sizes = rng.multinomial(total, rng.dirichlet(np.ones(g)))
    sizes = tuple(int(x) for x in np.where(rng.random(g) < 0.3, 0, sizes))  # empty groups
    for dtype, ratio in ((jnp.float32, testing.RATIO_F32),
                         (jnp.bfloat16, testing.RATIO_BF16_OUT)):
        lhs, rhs, grad, gs = _inputs(rng, m, k, n, sizes, dtype)
        for mod, bs in ((pallas_gpu, GPU_BLOCKS), (pallas_tpu, TPU_BLOCKS)):
            outs = _run_kernels(lhs, rhs, grad, gs, mod=mod, block_sizes=bs, interpret=True)
            _check_kernels(*outs, lhs, rhs, grad, sizes, ratio=ratio)
