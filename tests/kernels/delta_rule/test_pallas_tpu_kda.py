"""The TPU (Mosaic) kernels' per-channel decay `gk` (Kimi Delta Attention) and chunk restarts
(packed sequences, `cu_seqlens`), in TPU interpret mode on CPU, against the token-scan oracle:
values and the gradients of every input (initial states included).

As `test_pallas_tpu.py`, the kernels are called directly (`ops.delta_rule_pallas` with
`backend="tpu"`, `interpret=True`). Shapes are small: TPU interpret mode is slow.
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
from tests.kernels.delta_rule.inputs import cotangents, seed_of
from tests.kernels.delta_rule.test_channel_decay import NAMES, make_gk_inputs

# Packed lengths 5, 35, 1 (a one-step sequence), 49: T = 90; chunks of 16 cut them unevenly.
CU = (0, 5, 40, 41, 90)


def _opts(Dk, chunk_size):
    return DeltaRuleOptions(scale=Dk**-0.5, chunk_size=chunk_size, interpret=True, backend="tpu")


def _loss(run, do, dS):
    def f(args):
        o, S = run(args)
        return jnp.sum(o.astype(jnp.float32) * do) + jnp.sum(S * dS), (o, S)
    return f


@functools.partial(jax.jit, static_argnames=("chunk_size", "packed"))
def _kernel_value_and_grads(args, do, dS, *, chunk_size, packed):
    Dk = args["q"].shape[-1]

    def run(a):
        return delta_rule_pallas(a["q"], a["k"], a["v"], a["beta"], a["g"], a["lam"],
                                 a["initial_state"], _opts(Dk, chunk_size), gk=a["gk"],
                                 cu_seqlens=jnp.asarray(CU) if packed else None)

    (_, (o, S)), grads = jax.value_and_grad(_loss(run, do, dS), has_aux=True)(args)
    return o, S, grads


@functools.partial(jax.jit, static_argnames=("packed",))
def _oracle_value_and_grads(args, do, dS, *, packed):
    def run(a):
        return delta_rule(a["q"], a["k"], a["v"], a["beta"], g=a["g"], lam=a["lam"], gk=a["gk"],
                          initial_state=a["initial_state"], impl="reference",
                          scale=a["q"].shape[-1] ** -0.5,
                          cu_seqlens=jnp.asarray(CU) if packed else None)

    (_, (o, S)), grads = jax.value_and_grad(_loss(run, do, dS), has_aux=True)(args)
    return o, S, grads


def _check(a, do, dS, chunk_size, *, packed=False, bf16=False, finite_gk_only=False):
    a32 = jax.tree.map(lambda x: x.astype(jnp.float32), a)
    o_ref, S_ref, g_ref = _oracle_value_and_grads(a32, do, dS, packed=packed)
    o, S, grads = _kernel_value_and_grads(a, do, dS, chunk_size=chunk_size, packed=packed)
    r_out, r_grad = (RATIO_BF16_OUT, RATIO_BF16_GRAD) if bf16 else (RATIO_F32, 1e-4)
    assert_close("o", o_ref, o, ratio=r_out)
    assert_close("S", S_ref, S, ratio=r_out)
    for name in NAMES:
        if a[name] is None:
            continue
        assert grads[name].dtype == a[name].dtype
        ref, got = g_ref[name], grads[name]
        if name == "gk" and finite_gk_only:  # d/dgk at gk = −inf: the reference's is not 0
            finite = jnp.isfinite(a["gk"])
            assert np.isfinite(np.asarray(got)).all()
            ref, got = jnp.where(finite, ref, 0.0), jnp.where(finite, got, 0.0)
        assert_close(f"d{name}", ref, got, ratio=r_grad)


def _packed_inputs(mode, seed, *, gk):
    a = make_gk_inputs(mode, B=1, T=CU[-1], H=2, Dk=8, Dv=6, seed=seed, initial_state=False)
    if not gk:
        a["gk"] = None
    a["initial_state"] = jax.random.normal(jax.random.key(seed + 3), (len(CU) - 1, 2, 8, 6))
    ks = jax.random.split(jax.random.key(seed + 9))
    do = jax.random.normal(ks[0], (1, CU[-1], 2, 6))
    dS = jax.random.normal(ks[1], (len(CU) - 1, 2, 8, 6))
    return a, do, dS



# ------------------------------------------------------------------------------------------
# Chunk restarts (packed sequences).


@pytest.mark.parametrize("mode", [pytest.param("kda_gated_qdelta", marks=pytest.mark.slow), "kda"])
def test_packed_matches_reference(mode):
    """Restarts without gk: gated Q-Delta (scalar g and λ), and plain DeltaNet."""
    a, do, dS = _packed_inputs(mode, seed_of(f"tpu-packed-{mode}"), gk=False)
    _check(a, do, dS, 16, packed=True)


@pytest.mark.slow
def test_packed_each_sequence_alone():
    """Outputs and final states of the packed call equal each sequence run by itself."""
    a, _, _ = _packed_inputs("kda_gated", 21, gk=False)
    run = jax.jit(delta_rule_pallas, static_argnames="opts")
    o, S = run(a["q"], a["k"], a["v"], a["beta"], a["g"], None, a["initial_state"],
               _opts(8, 16), cu_seqlens=jnp.asarray(CU))
    for n in range(len(CU) - 1):
        cut = lambda x, n=n: x[:, CU[n]:CU[n + 1]]
        o1, S1 = delta_rule(*(cut(a[m]) for m in ("q", "k", "v", "beta")), g=cut(a["g"]),
                            initial_state=a["initial_state"][n:n + 1], impl="reference",
                            scale=8**-0.5)
        assert_close(f"o[{n}]", o1, o[:, CU[n]:CU[n + 1]], ratio=RATIO_F32)
        assert_close(f"S[{n}]", S1[0], S[n], ratio=RATIO_F32)


# ------------------------------------------------------------------------------------------
# Per-channel decay.

# (mode, chunk size, T): T not a multiple of C, two chunk sizes (sub-chunks of 4 and 8), with
# and without λ and g.
GK_CASES = [pytest.param("kda", 16, 40, marks=pytest.mark.slow), ("kda_gated_qdelta", 64, 71)]


@pytest.mark.parametrize("mode,chunk_size,T", GK_CASES)
def test_gk_matches_reference_fp32(mode, chunk_size, T):
    seed = seed_of(f"tpu-gk-{mode}-{T}")
    a = make_gk_inputs(mode, B=1, T=T, H=2, Dk=12, Dv=10, seed=seed)
    do, dS = cotangents(1, T, 2, 12, 10, seed)
    _check(a, do, dS, chunk_size)


def test_gk_strong_decay_and_channel_resets_are_exact():
    """Decays down to e^-40 per step and −inf in single channels (and a whole step): values and
    gradients stay the recurrence's, nothing overflows."""
    a = make_gk_inputs("kda_qdelta", B=1, T=48, H=2, Dk=12, Dv=10, seed=5, scale=40.0)
    gk = a["gk"].at[0, 10, 0, 3].set(-jnp.inf).at[0, 20, 1, :].set(-jnp.inf)
    a = {**a, "gk": gk.at[0, 33, 0, 7].set(-jnp.inf)}
    do, dS = cotangents(1, 48, 2, 12, 10, 5)
    _check(a, do, dS, 16, finite_gk_only=True)


@pytest.mark.slow  # test_pallas_gpu_kda.py checks bf16 by default
def test_gk_bf16():
    a = make_gk_inputs("kda_qdelta", B=1, T=40, H=2, Dk=12, Dv=10, seed=3, dtype=jnp.bfloat16)
    do, dS = cotangents(1, 40, 2, 12, 10, 3)
    _check(a, do, dS, 16, bf16=True)


def test_gk_packed_matches_reference():
    """gk with cu_seqlens (g and λ too): restarts and per-channel decay together."""
    a, do, dS = _packed_inputs("kda_gated_qdelta", 31, gk=True)
    _check(a, do, dS, 16, packed=True)


@pytest.mark.parametrize("packed", [False, True], ids=["gk", "gk_packed"])
def test_gk_and_restarts_lower_for_tpu(packed):
    """`impl="pallas"` exported for TPU runs the Mosaic lowering of the gk and restart kernels
    (forward and gradient); `tests/tpu_compile` compiles them to the end where libtpu is."""
    sd = jax.ShapeDtypeStruct
    T, H, Dk, Dv = 50, 2, 20, 36
    vec = sd((1, T, H), jnp.bfloat16)
    args = (sd((1, T, H, Dk), jnp.bfloat16), sd((1, T, H, Dk), jnp.bfloat16),
            sd((1, T, H, Dv), jnp.bfloat16), vec, vec, sd((1, T, H, Dk), jnp.float32))
    cu = sd((4,), jnp.int32) if packed else None

    def loss(q, k, v, beta, lam, gk, cu):
        o, S = delta_rule(q, k, v, beta, lam=lam, gk=gk, cu_seqlens=cu, impl="pallas",
                          chunk_size=16)
        return jnp.sum(o.astype(jnp.float32) ** 2) + jnp.sum(S)

    grad = jax.grad(loss, argnums=(0, 1, 2, 3, 4, 5))
    text = jax.export.export(jax.jit(grad), platforms=["tpu"])(*args, cu).mlir_module()
    assert "tpu_custom_call" in text
    for name in ("delta_rule_intra_fwd_gk", "delta_rule_state_fwd", "delta_rule_state_bwd",
                 "delta_rule_intra_bwd_gk"):
        assert name in text
