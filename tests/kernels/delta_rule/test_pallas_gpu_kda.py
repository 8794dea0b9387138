"""The Pallas GPU (Triton) kernels, in interpret mode on CPU, with per-key-channel decay `gk`
(Kimi Delta Attention) and chunk restarts (packed sequences, `cu_seqlens`), against the oracle.

Through `ops.delta_rule_pallas` with fixed `DeltaRuleOptions` (as `test_pallas_gpu.py`): values
and the gradients of every input (initial states included), fp32 tight (relative RMSE 1e-5 for
o and S, 1e-4 for gradients) and bf16 loose; T not a multiple of C, C ∈ {16, 32, 64}, with and
without λ, decays down to e^-40 per step and gk = −inf resets of single channels and of whole
rows. Packed sequences: ragged lengths (not multiples of C), a one-step sequence, with g, λ and
gk. Interpret mode is slow, so shapes stay small (Dk, Dv ≤ 32, T ≤ 80).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moejax.kernels.delta_rule.ops import delta_rule, delta_rule_pallas
from moejax.kernels.delta_rule.pallas_common import DeltaRuleOptions
from moejax.testing import RATIO_BF16_GRAD, RATIO_BF16_OUT, RATIO_F32, assert_close
from tests.kernels.delta_rule.inputs import seed_of
from tests.kernels.delta_rule.test_channel_decay import NAMES, make_gk_inputs

GRAD_RATIO = 1e-4
# Lengths 5, 17, 1 (a one-step sequence), 20: T = 43; chunks of 16 cut them unevenly.
CU = (0, 5, 22, 23, 43)


def _loss(a, do, dS, *, impl, C, cu):
    if impl == "pallas":
        opts = DeltaRuleOptions(scale=a["q"].shape[-1] ** -0.5, chunk_size=C, backend="gpu",
                                interpret=True)
        o, S = delta_rule_pallas(a["q"], a["k"], a["v"], a["beta"], a["g"], a["lam"],
                                 a["initial_state"], opts, gk=a["gk"], cu_seqlens=cu)
    else:
        o, S = delta_rule(a["q"], a["k"], a["v"], a["beta"], g=a["g"], lam=a["lam"], gk=a["gk"],
                          initial_state=a["initial_state"], cu_seqlens=cu, impl=impl)
    return jnp.sum(o.astype(jnp.float32) * do) + jnp.sum(S * dS), (o, S)


@functools.partial(jax.jit, static_argnames=("impl", "C"))
def _value_and_grads(a, do, dS, cu=None, *, impl, C=64):
    (_, (o, S)), grads = jax.value_and_grad(
        functools.partial(_loss, do=do, dS=dS, impl=impl, C=C, cu=cu), has_aux=True)(a)
    return o, S, grads


def _cotangents(o_shape, S_shape, seed):
    k1, k2 = jax.random.split(jax.random.key(seed + 1))
    return jax.random.normal(k1, o_shape), jax.random.normal(k2, S_shape)


def _compare(a, C, *, cu=None, dtype=jnp.float32, names=NAMES, finite_gk=None):
    """Values and gradients of the kernels (inputs in `dtype`) against the reference run in
    float32 on the same (rounded) inputs."""
    a = {n: None if x is None else x.astype(dtype) for n, x in a.items()}
    a32 = {n: None if x is None else x.astype(jnp.float32) for n, x in a.items()}
    S_shape = a["initial_state"].shape
    do, dS = _cotangents(a["v"].shape, S_shape, seed_of(f"{C}-{a['v'].shape}"))
    cu = None if cu is None else jnp.asarray(cu)
    o_ref, S_ref, g_ref = _value_and_grads(a32, do, dS, cu, impl="reference")
    o, S, g = _value_and_grads(a, do, dS, cu, impl="pallas", C=C)
    r_out, r_grad = ((RATIO_F32, GRAD_RATIO) if dtype == jnp.float32
                     else (RATIO_BF16_OUT, RATIO_BF16_GRAD))
    assert o.dtype == jnp.float32 and S.dtype == jnp.float32
    assert_close("o", o_ref, o, ratio=r_out)
    assert_close("S", S_ref, S, ratio=r_out)
    for name in names:
        if a[name] is None:
            continue
        assert g[name].dtype == a[name].dtype
        ref, got = g_ref[name], g[name].astype(jnp.float32)
        if name == "gk" and finite_gk is not None:  # d/dgk at gk = −inf is 0 (exp(−inf) = 0)
            assert np.isfinite(np.asarray(got)).all()
            ref, got = jnp.where(finite_gk, ref, 0.0), jnp.where(finite_gk, got, 0.0)
        assert_close(f"d{name}", ref, got, ratio=r_grad)



# ------------------------------------------------------------------------------ restarts


def _packed_inputs(mode, seed, *, gk, Dk=8, Dv=6, cu=CU):
    a = make_gk_inputs(mode, B=1, T=cu[-1], H=2, Dk=Dk, Dv=Dv, seed=seed, initial_state=False)
    if not gk:
        a["gk"] = None
    a["initial_state"] = jax.random.normal(jax.random.key(seed + 3), (len(cu) - 1, 2, Dk, Dv))
    return a


@pytest.mark.parametrize("mode,C", [("kda_gated_qdelta", 16),
                                    pytest.param("kda_qdelta", 64, marks=pytest.mark.slow),
                                    pytest.param("kda_gated", 32, marks=pytest.mark.slow)])
def test_packed_matches_reference(mode, C):
    """Scalar-gate modes (no gk): packed sequences equal each alone (the packed reference),
    values and gradients of every input, the per-sequence initial states included."""
    _compare(_packed_inputs(mode, seed_of(f"packed-{mode}"), gk=False), C, cu=CU)


@pytest.mark.slow  # test_packed.py runs impl="pallas" packed == alone by default
def test_packed_equals_each_sequence_alone():
    a = _packed_inputs("kda_gated_qdelta", 11, gk=False)
    opts = DeltaRuleOptions(scale=8**-0.5, chunk_size=16, interpret=True)
    run = jax.jit(functools.partial(delta_rule_pallas, opts=opts))
    args = lambda a, sl: [None if a[n] is None else a[n][:, sl]
                          for n in ("q", "k", "v", "beta", "g", "lam")]
    o, S = run(*args(a, slice(None)), a["initial_state"], cu_seqlens=jnp.asarray(CU))
    for n in range(len(CU) - 1):
        o1, S1 = run(*args(a, slice(CU[n], CU[n + 1])), a["initial_state"][n:n + 1])
        assert_close(f"o[{n}]", o1, o[:, CU[n]:CU[n + 1]], ratio=RATIO_F32)
        assert_close(f"S[{n}]", S1[0], S[n], ratio=RATIO_F32)


def test_packed_with_gk_matches_reference():
    _compare(_packed_inputs("kda_gated_qdelta", 12, gk=True), 16, cu=CU)


# ------------------------------------------------------------------------------ gk


@pytest.mark.parametrize("mode,C,T", [
    pytest.param("kda", 16, 37, marks=pytest.mark.slow), ("kda_qdelta", 64, 70),
    pytest.param("kda_gated_qdelta", 32, 50, marks=pytest.mark.slow),
    pytest.param("kda_gated", 16, 1, marks=pytest.mark.slow)])
def test_gk_matches_reference_fp32(mode, C, T):
    a = make_gk_inputs(mode, B=2, T=T, H=2, Dk=12, Dv=10, seed=seed_of(f"kda-{mode}-{T}"))
    _compare(a, C)


def test_gk_ragged_head_dims_fp32():
    """Dk = 20 pads to 32, Dv = 24 to 32."""
    a = make_gk_inputs("kda_qdelta", B=1, T=40, H=1, Dk=20, Dv=24, seed=21)
    _compare(a, 16)


def test_gk_matches_reference_bf16():
    a = make_gk_inputs("kda_gated_qdelta", B=2, T=50, H=2, Dk=12, Dv=10, seed=3)
    _compare(a, 16, dtype=jnp.bfloat16, names=("q", "k", "v", "gk", "initial_state"))


@pytest.mark.parametrize("C", [16, pytest.param(64, marks=pytest.mark.slow)])
def test_gk_strong_decay_and_channel_resets_are_exact(C):
    """Decays of e^-40 per step and −inf in single channels and whole rows: nothing overflows,
    values and gradients stay the recurrence's (every pair factor ≤ 1, masked before the exp)."""
    a = make_gk_inputs("kda_qdelta", B=2, T=80, H=2, Dk=12, Dv=10, seed=5, scale=40.0)
    gk = (a["gk"].at[0, 10, 0, 3].set(-jnp.inf).at[1, 50, 1, :].set(-jnp.inf)
          .at[0, 33, 1, 0].set(-jnp.inf).at[0, 40, 1, 0].set(-jnp.inf))
    _compare({**a, "gk": gk}, C, finite_gk=jnp.isfinite(gk))


@pytest.mark.slow
def test_gk_mild_decay_long_chunks():
    """Slow decays (many channels near 0): cross-block factors over a whole chunk of 64."""
    a = make_gk_inputs("kda_gated_qdelta", B=1, T=80, H=2, Dk=16, Dv=8, seed=8, scale=0.05)
    _compare(a, 64)


def test_public_op_takes_gk_and_cu_seqlens():
    """`delta_rule(impl="pallas")` (the GPU kernels in interpret mode on CPU) now runs gk and
    cu_seqlens itself instead of refusing them."""
    a = _packed_inputs("kda_gated_qdelta", 13, gk=True)
    run = lambda impl: delta_rule(a["q"], a["k"], a["v"], a["beta"], g=a["g"], lam=a["lam"],
                                  gk=a["gk"], initial_state=a["initial_state"],
                                  cu_seqlens=jnp.asarray(CU), impl=impl, chunk_size=16)
    o, S = run("pallas")
    o_ref, S_ref = run("reference")
    assert_close("o", o_ref, o, ratio=RATIO_F32)
    assert_close("S", S_ref, S, ratio=RATIO_F32)
