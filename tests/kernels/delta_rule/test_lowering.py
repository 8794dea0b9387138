"""The Pallas kernels lower for real GPU (Triton) and TPU (Mosaic) on a CPU-only machine.

`jax.export` with `platforms=["cuda"]` / `["tpu"]` runs the Pallas lowering of the public op's
`impl="pallas"` (and `"auto"`) branch for that platform: forward and gradient, fp32 and bf16,
every mode, ragged head dims and T not a multiple of the chunk.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest

from moejax.kernels.delta_rule import delta_rule
from tests.kernels.delta_rule.inputs import MODES

B, T, H, Dk, Dv = 1, 100, 2, 20, 36
TRITON = "__gpu$xla.gpu.triton"
MOSAIC = "tpu_custom_call"
MARKER = {"cuda": TRITON, "tpu": MOSAIC}
# Triton custom calls carry no compatibility guarantee; we only inspect the module.
DISABLED = [jax.export.DisabledSafetyCheck.custom_call(TRITON)]


def _structs(mode, dtype):
    use_g, use_lam = MODES[mode]
    sd = jax.ShapeDtypeStruct
    vec = sd((B, T, H), dtype)
    return (sd((B, T, H, Dk), dtype), sd((B, T, H, Dk), dtype), sd((B, T, H, Dv), dtype), vec,
            vec if use_g else None, vec if use_lam else None, sd((B, H, Dk, Dv), jnp.float32))


def _fwd(impl, chunk_size):
    def f(q, k, v, beta, g, lam, h0):
        return delta_rule(q, k, v, beta, g=g, lam=lam, initial_state=h0, impl=impl,
                          chunk_size=chunk_size)
    return f


def _grad(impl, chunk_size):
    def loss(q, k, v, beta, g, lam, h0):
        o, S = _fwd(impl, chunk_size)(q, k, v, beta, g, lam, h0)
        return jnp.sum(o.astype(jnp.float32) ** 2) + jnp.sum(S)
    return jax.grad(loss, argnums=(0, 1, 2, 3, 4, 5, 6))


def _export(fn, platform, args):
    exp = jax.export.export(jax.jit(fn), platforms=[platform], disabled_checks=DISABLED)(*args)
    return exp.mlir_module()


@pytest.mark.parametrize("platform", ["cuda", "tpu"])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("mode", ["deltanet", "gated_qdelta"])
def test_pallas_lowers(platform, dtype, mode):
    args = _structs(mode, dtype)
    fwd = _export(_fwd("pallas", 64), platform, args)
    grad = _export(_grad("pallas", 64), platform, args)
    other = MARKER["tpu" if platform == "cuda" else "cuda"]
    for text in (fwd, grad):
        assert MARKER[platform] in text and other not in text
    # forward: intra + state; backward adds state-with-chunk-states, state_bwd and intra_bwd.
    assert fwd.count("delta_rule_state_fwd") >= 1
    for name in ("delta_rule_intra_fwd", "delta_rule_state_bwd", "delta_rule_intra_bwd"):
        assert name in grad


@pytest.mark.slow
@pytest.mark.parametrize("platform", ["cuda", "tpu"])
@pytest.mark.parametrize("chunk_size", [16, 32, 64])
@pytest.mark.parametrize("mode", ["gated_deltanet", "qdelta"])
def test_pallas_lowers_full(platform, chunk_size, mode):
    args = _structs(mode, jnp.bfloat16)
    assert MARKER[platform] in _export(_grad("pallas", chunk_size), platform, args)


@pytest.mark.parametrize("platform", ["cuda", "tpu"])
def test_auto_is_pallas_on_accelerators(platform):
    text = _export(_fwd("auto", 64), platform, _structs("qdelta", jnp.float32))
    assert MARKER[platform] in text


def test_auto_is_chunk_on_cpu():
    text = _export(_fwd("auto", 64), "cpu", _structs("qdelta", jnp.float32))
    assert TRITON not in text and MOSAIC not in text


@pytest.mark.parametrize("platform", ["cuda", "tpu"])
def test_pallas_lowers_float64_inputs(platform):
    """x64 mode: float64 inputs are rounded to float32 before the kernels (Mosaic has no
    float64), forward and gradient; o comes back in float64 (documented in `delta_rule`)."""
    with jax.enable_x64(True):
        args = _structs("gated_qdelta", jnp.float64)
        for fn in (_fwd("pallas", 64), _grad("pallas", 64)):
            assert MARKER[platform] in _export(fn, platform, args)
        o, S = jax.eval_shape(_fwd("pallas", 64), *args)
    assert o.dtype == jnp.float64 and S.dtype == jnp.float32


def test_auto_on_cuda_falls_back_outside_the_compile_check():
    """Head dims past the compile check's 256/512 (or fp16) lower to the jnp chunk path on
    CUDA under impl="auto"; covered inputs get the Triton kernels."""
    def export(dk, dv, dtype):
        S = lambda *s, d=dtype: jax.ShapeDtypeStruct(s, d)  # noqa: E731
        fn = lambda q, k, v, b: delta_rule(q, k, v, b, impl="auto")[0]  # noqa: E731
        checks = [jax.export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")]
        return jax.export.export(jax.jit(fn), platforms=["cuda"], disabled_checks=checks)(
            S(1, 32, 2, dk), S(1, 32, 2, dk), S(1, 32, 2, dv), S(1, 32, 2)).mlir_module()

    assert "triton" in export(64, 128, jnp.bfloat16)
    assert "triton" not in export(320, 128, jnp.bfloat16)
    assert "triton" not in export(64, 640, jnp.float32)
    assert "triton" not in export(64, 128, jnp.float16)
