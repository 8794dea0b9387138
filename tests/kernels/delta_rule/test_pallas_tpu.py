"""The Pallas TPU (Mosaic) kernel in TPU interpret mode on CPU against the oracle.

`impl="pallas"` on CPU runs the GPU kernels, so these tests call the TPU kernels directly
(`ops.delta_rule_pallas` with `backend="tpu"`, `interpret=True`, i.e.
`pltpu.InterpretParams()`), with the shared oracle and cotangents of `test_base`. Full matrix
behind `-m slow`.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import pytest

from moejax.kernels.delta_rule.ops import delta_rule_pallas
from moejax.kernels.delta_rule.pallas_common import DeltaRuleOptions
from moejax.testing import RATIO_F32, assert_close
from tests.kernels.delta_rule.inputs import MODES, make_inputs
from tests.kernels.delta_rule.test_base import CHUNKS, GRAD_NAMES, _oracle

PALLAS_T = (1, 63, 100, 300)
FAST_CASES = [("gated_qdelta", 16, 63), ("deltanet", 64, 100)]
FULL_CASES = [(m, c, t) for m in MODES for c in CHUNKS for t in PALLAS_T
              if (m, c, t) not in FAST_CASES]


def _opts(Dk, chunk_size, **kw):
    return DeltaRuleOptions(scale=Dk**-0.5, chunk_size=chunk_size, interpret=True, backend="tpu",
                            **kw)


@functools.partial(jax.jit, static_argnames=("opts",))
def _value_and_grads(args, do, dS, *, opts):
    def loss(args):
        h0 = args["initial_state"]
        o, S = delta_rule_pallas(args["q"], args["k"], args["v"], args["beta"], args["g"],
                                 args["lam"], h0, opts)
        return jnp.sum(o * do) + jnp.sum(S * dS), (o, S)

    (_, (o, S)), grads = jax.value_and_grad(loss, has_aux=True)(args)
    return o, S, grads


def _check(mode, T, chunk_size, dtype=jnp.float32, B=2, H=2, Dk=20, Dv=36, **kw):
    args, do, dS, (o_ref, S_ref, g_ref) = _oracle(mode, T, jnp.dtype(dtype).name, B=B, H=H,
                                                  Dk=Dk, Dv=Dv)
    o, S, grads = _value_and_grads(args, do, dS, opts=_opts(Dk, chunk_size, **kw))
    bf16 = dtype == jnp.bfloat16
    r_out, r_grad = (5e-3, 8e-3) if bf16 else (RATIO_F32, 1e-4)
    assert_close("o", o_ref, o, ratio=r_out)
    assert_close("S", S_ref, S, ratio=r_out)
    for name in GRAD_NAMES:
        if args[name] is not None:
            assert grads[name].dtype == args[name].dtype
            assert_close(f"d{name}", g_ref[name], grads[name], ratio=r_grad)


@pytest.mark.parametrize("mode,chunk_size,T", FAST_CASES)
def test_matches_oracle_fp32(mode, chunk_size, T):
    _check(mode, T, chunk_size)


@pytest.mark.slow
@pytest.mark.parametrize("mode,chunk_size,T", FULL_CASES)
def test_matches_oracle_fp32_full(mode, chunk_size, T):
    _check(mode, T, chunk_size)


@pytest.mark.slow
@pytest.mark.parametrize("mode", list(MODES))
def test_matches_oracle_bf16(mode):
    _check(mode, 100, 32, dtype=jnp.bfloat16)


@pytest.mark.slow
@pytest.mark.parametrize("Dk,Dv", [(60, 100), (7, 5), (130, 36)])
def test_ragged_head_dims(Dk, Dv):
    _check("gated_qdelta", 100, 32, Dk=Dk, Dv=Dv, B=1, H=3)


def test_bf16_and_block_v_tiles():
    """bf16 inputs, and Dv = 200 padded to 256 split into two 128-lane state tiles."""
    _check("gated_deltanet", 40, 16, dtype=jnp.bfloat16, B=1, H=1, Dv=200, block_v=128)


def test_matches_gpu_kernel_forward():
    """The TPU kernels' forward equals the GPU kernels' (both interpreted)."""
    a = make_inputs("gated_qdelta", B=1, T=33, H=1, Dk=8, Dv=8)
    args = [a[n] for n in GRAD_NAMES]
    run = jax.jit(delta_rule_pallas, static_argnames="opts")
    gpu = run(*args, opts=DeltaRuleOptions(scale=0.3, chunk_size=16, interpret=True))
    tpu = run(*args, opts=DeltaRuleOptions(scale=0.3, chunk_size=16, interpret=True,
                                           backend="tpu"))
    for name, x, y in zip(("o", "S"), gpu, tpu, strict=True):
        assert_close(name, x, y, ratio=RATIO_F32)
