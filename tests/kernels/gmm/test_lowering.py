"""Real lowering of the Pallas gmm kernels on a CPU-only host, through `jax.export`.

Exporting for `platforms=["cuda"]` runs the Pallas→Triton lowering (the Triton IR is embedded in
the custom call) and `platforms=["tpu"]` the Pallas→Mosaic lowering, so unsupported ops, illegal
block shapes or index maps fail here without a GPU or TPU. Forward and backward (gmm with rhs
transposed, tgmm) are both exported.
"""

import jax
import jax.numpy as jnp
import pytest
from jax.experimental.pallas import triton as plgpu

from moejax.kernels.gmm import gmm, pallas_gpu, pallas_tpu, tgmm

_TRITON = getattr(plgpu, "CUSTOM_CALL_TARGET_NAME", "__gpu$xla.gpu.triton")
_MARKER = {"cuda": _TRITON, "tpu": "tpu_custom_call"}
# (M, K, N, G): tile multiples, and M/K/N that are not (partial tiles, K past one TPU block).
SHAPES = [(512, 256, 384, 8), (100, 600, 40, 3)]


def _spec(shape, dtype=jnp.bfloat16):
    return jax.ShapeDtypeStruct(shape, dtype)


def _export(fn, platform, *specs):
    checks = [jax.export.DisabledSafetyCheck.custom_call(_TRITON)]  # no stability guarantee
    exp = jax.export.export(jax.jit(fn), platforms=[platform], disabled_checks=checks)(*specs)
    return exp.mlir_module()


def _train_step(impl):
    def f(lhs, rhs, gs, dout):
        out, vjp = jax.vjp(lambda a, b: gmm(a, b, gs, impl=impl), lhs, rhs)
        return out, *vjp(dout)
    return f


@pytest.mark.parametrize("impl", ["pallas", "auto"])
@pytest.mark.parametrize("platform", ["cuda", "tpu"])
@pytest.mark.parametrize("m,k,n,g", SHAPES, ids=[f"M{m}-K{k}-N{n}-G{g}" for m, k, n, g in SHAPES])
def test_gmm_fwd_bwd_lowers(platform, impl, m, k, n, g):
    text = _export(_train_step(impl), platform, _spec((m, k)), _spec((g, k, n)),
                   _spec((g,), jnp.int32), _spec((m, n)))
    # Forward gmm, dlhs (gmm with rhs transposed), drhs (tgmm): three kernels.
    assert text.count(_MARKER[platform]) == 3, platform
    other = _MARKER["tpu" if platform == "cuda" else "cuda"]
    assert other not in text


@pytest.mark.parametrize("platform", ["cuda", "tpu"])
def test_tgmm_lowers_fp32(platform):
    m, k, n, g = 100, 72, 40, 5
    text = _export(lambda a, c, s: tgmm(a, c, s, impl="pallas"), platform,
                   _spec((m, k), jnp.float32), _spec((m, n), jnp.float32),
                   _spec((g,), jnp.int32))
    assert text.count(_MARKER[platform]) == 1


def test_auto_on_cpu_uses_no_kernel():
    text = _export(_train_step("auto"), "cpu", _spec((64, 32)), _spec((4, 32, 16)),
                   _spec((4,), jnp.int32), _spec((64, 16)))
    assert _TRITON not in text and "tpu_custom_call" not in text


@pytest.mark.parametrize("platform,mod", [("cuda", pallas_gpu), ("tpu", pallas_tpu)])
def test_benchmark_shape_default_blocks_lower(platform, mod):
    """The expert matmul of the benchmark (E=64, d=2048, f=5632) with default block sizes."""
    m, k, n, g = 2 * 16384, 2048, 5632, 64
    text = _export(mod.gmm, platform, _spec((m, k)), _spec((g, k, n)), _spec((g,), jnp.int32))
    assert _MARKER[platform] in text


def test_auto_on_cuda_falls_back_for_uncovered_dtype():
    """fp16 is outside the GPU kernel's compile check: "auto" lowers to ragged_dot on CUDA."""
    text = _export(_train_step("auto"), "cuda", _spec((64, 32), jnp.float16),
                   _spec((4, 32, 16), jnp.float16), _spec((4,), jnp.int32),
                   _spec((64, 16), jnp.float16))
    assert _TRITON not in text
    covered = _export(_train_step("auto"), "cuda", _spec((64, 32), jnp.float32),
                      _spec((4, 32, 16), jnp.float32), _spec((4,), jnp.int32),
                      _spec((64, 16), jnp.float32))
    assert covered.count(_TRITON) == 3
