"""The Pallas GPU (Triton) kernels of `pallas_gpu.py` in interpret mode on CPU, against the oracle.

`impl="pallas"` on CPU runs the GPU kernels with `interpret=True` (GPU semantics), so the shared
test base exercises them through the public op (`TestPallasGpu`). The direct calls below
(`ops.delta_rule_pallas` with fixed `DeltaRuleOptions`) check what the public op cannot reach:
Dv tiling, head-dim padding, numerical gradients, the options' precision rules, and (slow) the
fp32/bf16 matrix, resets and non-finite inputs. fp32 inputs with full-precision dots must match
to relative RMSE 1e-5; bf16 inputs (bf16 tensor-core dots, float32 accumulation) to 5e-3 (o, S)
and 8e-3 (every gradient), against the oracle run in float32 on the bf16-rounded inputs.
Interpret mode is slow: the default run keeps a representative subset (every mode, every chunk
size, T ∈ {1, 63, 100, 300}, ragged head dims, bf16); the full matrix is behind `-m slow`. A
deviceless sm_90a compile of the kernels runs where the gpu-compile extra is installed
(tests/gpu_compile).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from moejax.kernels.delta_rule import pallas_gpu
from moejax.kernels.delta_rule.ops import delta_rule_pallas
from moejax.kernels.delta_rule.pallas_common import DeltaRuleOptions
from moejax.kernels.delta_rule.pallas_gpu_kernel import Cfg
from moejax.kernels.delta_rule.reference import delta_rule_reference
from moejax.testing import RATIO_F32, assert_close
from tests.kernels.delta_rule.inputs import MODES, cotangents, make_inputs, seed_of
from tests.kernels.delta_rule.test_base import CHUNKS, DeltaRuleTestBase

PALLAS_T = (1, 63, 100, 300)
# (mode, chunk_size, T): each mode, chunk size and T at least once.
FAST_CASES = [("gated_qdelta", 32, 100), ("deltanet", 16, 63), ("gated_deltanet", 64, 1),
              ("qdelta", 64, 300)]
FULL_CASES = [(m, c, t) for m in MODES for c in CHUNKS for t in PALLAS_T
              if (m, c, t) not in FAST_CASES]
ARG_NAMES = ("q", "k", "v", "beta", "g", "lam", "initial_state")
NAMES = ARG_NAMES
BF16_OUT, BF16_GRAD = 5e-3, 8e-3  # issue thresholds for bf16 inputs


class TestPallasGpu(DeltaRuleTestBase):
    impl = "pallas"

    def ratios(self, dtype):
        # DESIGN/issue thresholds: fp32 1e-5 / 1e-4; bf16 5e-3 outputs, 8e-3 gradients.
        if dtype == jnp.bfloat16:
            return 5e-3, 8e-3, 8e-3
        return 1e-5, 1e-4, 1e-4

    @pytest.mark.parametrize("mode,chunk_size,T", FAST_CASES)
    def test_matches_oracle_fp32(self, mode, chunk_size, T):
        self._check_against_oracle(mode, T, chunk_size)

    @pytest.mark.slow
    @pytest.mark.parametrize("mode,chunk_size,T", FULL_CASES)
    def test_matches_oracle_fp32_full(self, mode, chunk_size, T):
        self._check_against_oracle(mode, T, chunk_size)

    @pytest.mark.parametrize("mode", ["gated_qdelta"])
    def test_matches_oracle_bf16(self, mode):
        self._check_against_oracle(mode, 100, 32, dtype=jnp.bfloat16)

    @pytest.mark.slow
    @pytest.mark.parametrize("mode", ["deltanet", "gated_deltanet", "qdelta"])
    def test_matches_oracle_bf16_full(self, mode):
        self._check_against_oracle(mode, 100, 32, dtype=jnp.bfloat16)

    @pytest.mark.parametrize("Dk,Dv", [(60, 100)], ids=["Dk60-Dv100"])
    def test_ragged_head_dims(self, Dk, Dv):
        self._check_against_oracle("gated_qdelta", 100, 32, Dk=Dk, Dv=Dv, B=1, H=1)

    @pytest.mark.slow
    @pytest.mark.parametrize("Dk,Dv", [(7, 5), (20, 36), (128, 96)])
    def test_ragged_head_dims_full(self, Dk, Dv):
        self._check_against_oracle("gated_qdelta", 100, 32, Dk=Dk, Dv=Dv, B=1, H=3)

    @pytest.mark.parametrize("mode", ["gated_qdelta"])
    def test_split_sequence_carries_state(self, mode):
        super().test_split_sequence_carries_state(mode)

    @pytest.mark.slow
    @pytest.mark.parametrize("mode", ["deltanet", "gated_deltanet", "qdelta"])
    def test_split_sequence_carries_state_full(self, mode):
        super().test_split_sequence_carries_state(mode)

    @pytest.mark.slow
    @pytest.mark.parametrize("mode", list(MODES))
    def test_decode_loop_equals_full(self, mode):
        super().test_decode_loop_equals_full(mode)

    @pytest.mark.slow
    def test_no_final_state(self):
        super().test_no_final_state()


def _opts(**kw):
    return DeltaRuleOptions(scale=kw.pop("scale", 0.25), interpret=True, **kw)


_kernel = jax.jit(delta_rule_pallas, static_argnames="opts")


def _run(a, opts):
    return _kernel(*[a[n] for n in ARG_NAMES], opts=opts)


def test_block_v_tiles_match_untiled():
    """Dv split over several programs equals one tile (state columns are independent)."""
    a = make_inputs("gated_qdelta", B=1, T=40, H=1, Dk=16, Dv=64)
    o1, S1 = _run(a, _opts(chunk_size=16, block_v=16))
    o2, S2 = _run(a, _opts(chunk_size=16, block_v=64))
    assert_close("o", o2, o1, ratio=RATIO_F32)
    assert_close("S", S2, S1, ratio=RATIO_F32)


def test_head_dim_padding_is_exact():
    """Zero-padding Dk/Dv inside the op gives the result of the unpadded math."""
    a = make_inputs("gated_qdelta", B=1, T=20, H=1, Dk=16, Dv=16)
    pad = lambda x, n: jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, n)])
    b = dict(a, q=pad(a["q"], 5), k=pad(a["k"], 5), v=pad(a["v"], 3),
             initial_state=jnp.pad(a["initial_state"], ((0, 0), (0, 0), (0, 5), (0, 3))))
    o1, S1 = _run(a, _opts(chunk_size=16))
    o2, S2 = _run(b, _opts(chunk_size=16))
    assert_close("o", o1, o2[..., :16], ratio=RATIO_F32)
    assert_close("S", S1, S2[..., :16, :16], ratio=RATIO_F32)
    assert float(jnp.max(jnp.abs(o2[..., 16:]))) == 0.0


def test_check_grads():
    """Numerical vs custom-VJP gradients of the kernels themselves (float32, tiny shape)."""
    a = make_inputs("gated_qdelta", B=1, T=5, H=1, Dk=4, Dv=3)
    opts = _opts(chunk_size=16)

    def f(*args):
        o, S = delta_rule_pallas(*args, opts)
        return jnp.sum(jnp.sin(o)) + jnp.sum(S**2)

    check_grads(jax.jit(f), [a[n] for n in ARG_NAMES], order=1, modes=["rev"], atol=1e-2,
                rtol=1e-2, eps=1e-3)


@pytest.mark.slow
def test_oracle_direct_no_initial_state():
    a = make_inputs("qdelta", B=1, T=17, H=2, Dk=8, Dv=8, initial_state=False)
    h0 = jnp.zeros((1, 2, 8, 8))
    o, S = _run(dict(a, initial_state=h0), _opts(chunk_size=16))
    o_ref, S_ref = delta_rule_reference(*[a[n] for n in ARG_NAMES], scale=0.25)
    assert_close("o", o_ref, o, ratio=RATIO_F32)
    assert_close("S", S_ref, S, ratio=RATIO_F32)


# ------------------------------------------------------------------------------ direct matrix


def _tc_opts(C, scale):
    return DeltaRuleOptions(scale=scale, chunk_size=C, interpret=True)


def _run_impl(impl, a, C):
    xs = [a[n] for n in NAMES]
    scale = a["q"].shape[-1] ** -0.5
    if impl == "reference":
        return delta_rule_reference(*xs, scale=scale)
    return delta_rule_pallas(*xs, _tc_opts(C, scale))


@functools.partial(jax.jit, static_argnames=("impl", "C"))
def _value_and_grads(a, do, dS, *, impl, C):
    def loss(a):
        o, S = _run_impl(impl, a, C)
        return jnp.sum(o.astype(jnp.float32) * do) + jnp.sum(S * dS), (o, S)

    (_, (o, S)), grads = jax.value_and_grad(loss, has_aux=True)(a)
    return o, S, grads


@functools.partial(jax.jit, static_argnames=("impl", "C"))
def _value(a, *, impl, C):
    return _run_impl(impl, a, C)


def _inputs(mode, T, dtype, B, H, Dk, Dv, tag=""):
    seed = seed_of(f"triton-{tag}{mode}-{T}-{Dk}-{Dv}")
    a = make_inputs(mode, B=B, T=T, H=H, Dk=Dk, Dv=Dv, seed=seed, dtype=dtype)
    return a, seed


def _check(mode, T, C, dtype=jnp.float32, *, B=1, H=2, Dk=20, Dv=36, grads=True):
    a, seed = _inputs(mode, T, dtype, B, H, Dk, Dv)
    a32 = jax.tree.map(lambda x: x.astype(jnp.float32), a)
    r_out, r_grad = (RATIO_F32, RATIO_F32) if dtype == jnp.float32 else (BF16_OUT, BF16_GRAD)
    if not grads:
        o_ref, S_ref = _value(a32, impl="reference", C=C)
        o, S = _value(a, impl="triton", C=C)
    else:
        do, dS = cotangents(B, T, H, Dk, Dv, seed)
        o_ref, S_ref, g_ref = _value_and_grads(a32, do, dS, impl="reference", C=C)
        o, S, g = _value_and_grads(a, do, dS, impl="triton", C=C)
    assert o.dtype == jnp.float32 and S.dtype == jnp.float32
    assert_close("o", o_ref, o, ratio=r_out)
    assert_close("S", S_ref, S, ratio=r_out)
    if grads:
        for name in NAMES:
            if a[name] is not None:
                assert g[name].dtype == a[name].dtype
                assert_close(f"d{name}", g_ref[name], g[name], ratio=r_grad)


# `TestPallasGpu` (every mode, fp32 and bf16) runs these kernels through the public op already;
# the direct calls below join the slow matrix.
@pytest.mark.slow
def test_fp32_matches_oracle():
    """The fullest mode, T not a multiple of the chunk, ragged head dims, all gradients."""
    _check("gated_qdelta", 37, 16)


@pytest.mark.slow
def test_bf16_matches_oracle():
    _check("gated_qdelta", 37, 16, jnp.bfloat16)


def test_single_step_forward():
    _check("deltanet", 1, 64, grads=False)


def test_options_follow_matmul_precision():
    opts = DeltaRuleOptions(scale=0.5, chunk_size=32, interpret=True)
    with jax.default_matmul_precision("highest"):
        full = opts.resolved()
    with jax.default_matmul_precision("default"):
        fast = opts.resolved()
    assert (full.fp32_precision, fast.fp32_precision) == ("tf32x3", "tf32")
    assert (full.scale, full.chunk_size, full.interpret) == (0.5, 32, True)
    explicit = DeltaRuleOptions(scale=1.0, fp32_precision="ieee")
    with jax.default_matmul_precision("highest"):
        assert explicit.resolved().fp32_precision == "ieee"
    # bf16 inputs: bf16 dots, the solve's float32 dots at TF32; interpret: HIGHEST.
    compiled = DeltaRuleOptions(scale=1.0, fp32_precision="tf32x3")
    assert (Cfg.make(jnp.bfloat16, compiled).cd, Cfg.make(jnp.bfloat16, compiled).fp) == (
        "bfloat16", "tf32")
    assert Cfg.make(jnp.float32, compiled).fp == "tf32x3"
    assert Cfg.make(jnp.float32, _tc_opts(64, 1.0).resolved()).fp == "ieee"
    assert [pallas_gpu.kernel_chunk(DeltaRuleOptions(scale=1.0, chunk_size=c), t)
            for c, t in ((128, 1000), (32, 1000), (64, 5), (1, 100))] == [64, 32, 16, 16]
    with pytest.raises(ValueError, match="fp32_precision"):
        DeltaRuleOptions(scale=1.0, fp32_precision="bf16")


# ------------------------------------------------------------------------------ slow matrix

FP32_CASES = [(m, T, C) for m in MODES for T, C in ((1, 16), (63, 32), (100, 64), (130, 64))]


@pytest.mark.slow
@pytest.mark.parametrize("mode,T,C", FP32_CASES, ids=[f"{m}-T{t}-C{c}" for m, t, c in FP32_CASES])
def test_fp32_matches_oracle_full(mode, T, C):
    _check(mode, T, C, B=2)


@pytest.mark.slow
@pytest.mark.parametrize("C", [32, 64])
@pytest.mark.parametrize("mode", list(MODES))
def test_bf16_matches_oracle_full(mode, C):
    _check(mode, 100, C, jnp.bfloat16, B=2)


@pytest.mark.slow
@pytest.mark.parametrize("Dk,Dv", [(7, 5), (60, 100), (80, 72)])
def test_ragged_head_dims(Dk, Dv):
    """Padding to powers of two; (80, 72) pads to 128 and runs two Dk and two Dv tiles."""
    _check("gated_qdelta", 40, 16, Dk=Dk, Dv=Dv)


@pytest.mark.slow
def test_multi_tile_bf16():
    _check("gated_qdelta", 40, 32, jnp.bfloat16, Dk=80, Dv=72)


@pytest.mark.slow
@pytest.mark.parametrize("mode", list(MODES))
def test_split_sequence_carries_state(mode):
    a, _ = _inputs(mode, 100, jnp.float32, 2, 2, 20, 36, tag="split-")
    cut = lambda sl: {n: None if x is None or n == "initial_state" else x[:, sl]
                      for n, x in a.items()}
    o, S = _value(a, impl="triton", C=16)
    o1, S1 = _value(dict(cut(slice(0, 37)), initial_state=a["initial_state"]), impl="triton", C=16)
    o2, S2 = _value(dict(cut(slice(37, None)), initial_state=S1), impl="triton", C=16)
    assert_close("o", o, jnp.concatenate([o1, o2], axis=1), ratio=RATIO_F32)
    assert_close("S", S, S2, ratio=RATIO_F32)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["gated_deltanet", "gated_qdelta"])
def test_reset_gate_matches_oracle(mode):
    """g = −inf zeroes the state (a full reset): exact, finite, gradients included."""
    B, T, H, Dk, Dv = 1, 40, 2, 16, 16
    a, seed = _inputs(mode, T, jnp.float32, B, H, Dk, Dv, tag="reset-")
    a["g"] = a["g"].at[:, 5].set(-jnp.inf).at[:, 21].set(-jnp.inf).at[:, 22, 1].set(-jnp.inf)
    do, dS = cotangents(B, T, H, Dk, Dv, seed)
    o_ref, S_ref, g_ref = _value_and_grads(a, do, dS, impl="reference", C=16)
    o, S, g = _value_and_grads(a, do, dS, impl="triton", C=16)
    assert_close("o", o_ref, o, ratio=RATIO_F32)
    assert_close("S", S_ref, S, ratio=RATIO_F32)
    for name in NAMES:
        if a[name] is not None:
            assert_close(f"d{name}", g_ref[name], g[name], ratio=RATIO_F32)


@pytest.mark.slow
def test_nonfinite_input_stays_causal():
    """A NaN in v at step s: outputs before s and their gradients are those of the clean input."""
    B, T, H, Dk, Dv, s = 1, 40, 1, 16, 16, 23
    a, seed = _inputs("gated_qdelta", T, jnp.float32, B, H, Dk, Dv, tag="nan-")
    bad = dict(a, v=a["v"].at[0, s, 0, 3].set(jnp.nan))
    do, dS = cotangents(B, T, H, Dk, Dv, seed)
    do = do.at[:, s:].set(0.0)
    dS = jnp.zeros_like(dS)
    o, _, g = _value_and_grads(a, do, dS, impl="triton", C=16)
    o_bad, S_bad, g_bad = _value_and_grads(bad, do, dS, impl="triton", C=16)
    np.testing.assert_array_equal(np.asarray(o_bad[:, :s]), np.asarray(o[:, :s]))
    assert np.all(np.isnan(np.asarray(o_bad[:, s:]))) and np.all(np.isnan(np.asarray(S_bad)))
    for name in ("q", "k", "beta", "g", "lam", "initial_state"):
        np.testing.assert_allclose(np.asarray(g_bad[name]), np.asarray(g[name]), rtol=1e-6,
                                   atol=1e-7, err_msg=name)
