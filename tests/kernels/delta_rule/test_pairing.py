"""`pairing="authors"`: the released Q-Delta chunk kernel's computation (psmiz/Q-Delta).

The oracle here is written in numpy, chunk by chunk with explicit loops, straight from the
released kernels (`chunk_scaled_dot_kxt_fwd` → `solve_tril` → `recompute_w_u_fwd` →
`chunk_gated_delta_rule_fwd_h` → `chunk_fwd_o`, C = 64), independent of both moejax forms of
it: the jnp chunk path and the token scan `reference.delta_rule_authors_scan`. Checked: values
(float32 to 1e-5, float64 to 1e-12), gradients (numerical in float64; token scan vs chunk path;
both Pallas backends in interpret mode vs autodiff of the chunk path), T below, at and past 64
and not a multiple of it, with and without g, resets, the state carry, that "authors" differs
from the recurrence when λ ≠ 0 and equals it without λ (bit for bit) or with λ = 0, and the
argument errors.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from moejax.kernels.delta_rule import delta_rule
from moejax.kernels.delta_rule.chunk import delta_rule_chunk
from moejax.kernels.delta_rule.ops import delta_rule_pallas
from moejax.kernels.delta_rule.pallas_common import DeltaRuleOptions
from moejax.kernels.delta_rule.reference import delta_rule_authors_scan, delta_rule_reference
from moejax.testing import RATIO_F32, assert_close, rel_rmse
from tests.kernels.delta_rule.inputs import cotangents, make_inputs, seed_of

NAMES = ("q", "k", "v", "beta", "g", "lam", "initial_state")
C = 64  # the released kernel's chunk length


def authors_numpy(q, k, v, beta, g, lam, h0, *, scale, chunk=C):
    """The released Q-Delta chunk forward, in float64 numpy, one chunk at a time.

    Per (b, h) and chunk (64 steps from step 0; the last one may be shorter), with G the
    chunk-local cumsum of g (`chunk_local_cumsum`) and x = k + λ q (unscaled q):
      A_ij = β_i (k_i · x_j) exp(G_i − G_j) for j < i      chunk_scaled_dot_kxt_fwd
      Ai = (I + A)⁻¹                                       solve_tril
      w = Ai (β exp(G) x),  u = Ai (β v)                   recompute_w_u_fwd
      v_new = u − w S;  S ← exp(G_last) S + kᵀ (exp(G_last − G) v_new)   fwd_h
      o = scale (exp(G) q S + tril_incl(q kᵀ exp(G_i − G_j)) v_new)       chunk_fwd_o
    """
    f = lambda a: None if a is None else np.asarray(a, np.float64)
    q, k, v, beta, g, lam, h0 = map(f, (q, k, v, beta, g, lam, h0))
    B, T, H, Dk = q.shape
    Dv = v.shape[-1]
    o = np.zeros((B, T, H, Dv))
    S_out = np.zeros((B, H, Dk, Dv))
    for b in range(B):
        for h in range(H):
            S = np.zeros((Dk, Dv)) if h0 is None else h0[b, h].copy()
            for c0 in range(0, T, chunk):
                idx = np.arange(c0, min(c0 + chunk, T))
                L = len(idx)
                qc, kc, vc, bc = q[b, idx, h], k[b, idx, h], v[b, idx, h], beta[b, idx, h]
                G = np.zeros(L) if g is None else np.cumsum(g[b, idx, h])
                xc = kc if lam is None else kc + lam[b, idx, h][:, None] * qc
                A = np.zeros((L, L))
                for i in range(L):
                    for j in range(i):
                        A[i, j] = bc[i] * np.dot(kc[i], xc[j]) * np.exp(G[i] - G[j])
                Ai = np.linalg.inv(np.eye(L) + A)
                w = Ai @ ((bc * np.exp(G))[:, None] * xc)
                u = Ai @ (bc[:, None] * vc)
                v_new = u - w @ S
                P = np.zeros((L, L))
                for i in range(L):
                    for j in range(i + 1):
                        P[i, j] = np.dot(qc[i], kc[j]) * np.exp(G[i] - G[j])
                o[b, idx, h] = scale * (np.exp(G)[:, None] * (qc @ S) + P @ v_new)
                S = np.exp(G[-1]) * S + kc.T @ (np.exp(G[-1] - G)[:, None] * v_new)
            S_out[b, h] = S
    return o, S_out


def _inputs(mode, T, *, B=2, H=2, Dk=20, Dv=36, dtype=jnp.float32, initial_state=True):
    return make_inputs(mode, B=B, T=T, H=H, Dk=Dk, Dv=Dv, dtype=dtype,
                       seed=seed_of(f"pairing-{mode}-{T}-{B}-{H}-{Dk}-{Dv}"),
                       initial_state=initial_state)


def _run(a, impl, pairing="authors", **kw):
    return delta_rule(a["q"], a["k"], a["v"], a["beta"], g=a["g"], lam=a["lam"],
                      initial_state=a["initial_state"], impl=impl, pairing=pairing, **kw)


def _loss_fn(fn, do, dS):
    def loss(args):
        o, S = fn(args)
        return jnp.sum(o.astype(jnp.float32) * do) + jnp.sum(S * dS)
    return loss


@functools.partial(jax.jit, static_argnames=("impl", "pairing"))
def _grads(args, do, dS, *, impl, pairing="authors"):
    return jax.grad(_loss_fn(lambda a: _run(a, impl, pairing), do, dS))(args)


# ------------------------------------------------------------------------------------------
# Values against the numpy oracle of the released kernel.


_SLOW = pytest.mark.slow
# Every (impl, mode, T) under -m slow; by default each impl × T-class at least once.
_ORACLE_CASES = [
    pytest.param(impl, mode, T, marks=() if (impl, mode, T) in {
        ("chunk", "qdelta", 1), ("chunk", "gated_qdelta", 37), ("chunk", "qdelta", 64),
        ("chunk", "gated_qdelta", 150), ("reference", "gated_qdelta", 37),
        ("reference", "qdelta", 150)} else _SLOW)
    for impl in ("chunk", "reference") for mode in ("qdelta", "gated_qdelta")
    for T in (1, 37, 64, 150)]


@pytest.mark.parametrize("impl, mode, T", _ORACLE_CASES)
def test_matches_numpy_oracle_fp32(impl, mode, T):
    a = _inputs(mode, T)
    o_ref, S_ref = authors_numpy(*(a[n] for n in NAMES), scale=20**-0.5)
    o, S = _run(a, impl)
    assert_close("o", o_ref, o, ratio=RATIO_F32)
    assert_close("S", S_ref, S, ratio=RATIO_F32)


@pytest.mark.parametrize("mode", ["qdelta", "gated_qdelta"])
def test_matches_numpy_oracle_fp64(mode):
    with jax.enable_x64(True):
        a = _inputs(mode, 150, B=1, dtype=jnp.float64)
        o_ref, S_ref = authors_numpy(*(a[n] for n in NAMES), scale=20**-0.5)
        for impl in ("chunk", "reference"):
            o, S = _run(a, impl)
            assert o.dtype == jnp.float64
            assert rel_rmse(o_ref, o) < 1e-12 and rel_rmse(S_ref, S) < 1e-12, impl


def test_no_initial_state():
    a = _inputs("gated_qdelta", 100, initial_state=False)
    o_ref, S_ref = authors_numpy(*(a[n] for n in NAMES), scale=20**-0.5)
    o, S = _run(a, "chunk")
    assert_close("o", o_ref, o, ratio=RATIO_F32)
    assert_close("S", S_ref, S, ratio=RATIO_F32)


def test_auto_is_chunk_on_cpu():
    a = _inputs("gated_qdelta", 100)
    np.testing.assert_array_equal(np.asarray(_run(a, "auto")[0]), np.asarray(_run(a, "chunk")[0]))


# ------------------------------------------------------------------------------------------
# Relation to the recurrence.


@pytest.mark.parametrize("mode", ["qdelta", "gated_qdelta"])
def test_differs_from_recurrence_with_lam(mode):
    a = _inputs(mode, 150)
    o_a, S_a = _run(a, "chunk")
    o_r, S_r = _run(a, "reference", pairing="recurrence")
    assert rel_rmse(o_r, o_a) > 1e-2 and rel_rmse(S_r, S_a) > 1e-2
    # One chunk of C steps is the recurrence at C = 1: the first step (no earlier write in its
    # chunk) is the same in both.
    np.testing.assert_allclose(np.asarray(o_a[:, 0]), np.asarray(o_r[:, 0]), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("mode, impl", [
    ("gated_deltanet", "chunk"), ("deltanet", "reference"),
    pytest.param("deltanet", "chunk", marks=_SLOW),
    pytest.param("gated_deltanet", "reference", marks=_SLOW),
    pytest.param("deltanet", "pallas", marks=_SLOW),
    pytest.param("gated_deltanet", "pallas", marks=_SLOW)])
def test_without_lam_is_the_recurrence_exactly(mode, impl):
    a = _inputs(mode, 70, B=1, H=2, Dk=8, Dv=16)
    do, dS = cotangents(1, 70, 2, 8, 16, 0)
    o_a, S_a = _run(a, impl)
    o_r, S_r = _run(a, impl, pairing="recurrence")
    np.testing.assert_array_equal(np.asarray(o_a), np.asarray(o_r))
    np.testing.assert_array_equal(np.asarray(S_a), np.asarray(S_r))
    ga = _grads(a, do, dS, impl=impl)
    gr = _grads(a, do, dS, impl=impl, pairing="recurrence")
    for n in NAMES:
        if a[n] is not None:
            np.testing.assert_array_equal(np.asarray(ga[n]), np.asarray(gr[n]), err_msg=n)


@pytest.mark.parametrize("mode", ["gated_qdelta", pytest.param("qdelta", marks=_SLOW)])
def test_lam_zero_is_the_recurrence(mode):
    """λ = 0: x = k, so the same function of everything but λ (whose gradient differs)."""
    a = _inputs(mode, 150)
    a["lam"] = jnp.zeros_like(a["lam"])
    do, dS = cotangents(2, 150, 2, 20, 36, 1)
    o_r, S_r = _run(a, "reference", pairing="recurrence")
    gr = _grads(a, do, dS, impl="reference", pairing="recurrence")
    for impl in ("chunk", "reference"):
        o, S = _run(a, impl)
        assert_close("o", o_r, o, ratio=RATIO_F32)
        assert_close("S", S_r, S, ratio=RATIO_F32)
        ga = _grads(a, do, dS, impl=impl)
        for n in ("q", "k", "v", "beta", "g", "initial_state"):
            if a[n] is not None:
                assert_close(f"d{n}", gr[n], ga[n], ratio=1e-4)
        assert rel_rmse(gr["lam"], ga["lam"]) > 1e-2


def test_chunk_one_token_scan_is_the_recurrence():
    a = _inputs("gated_qdelta", 50)
    args = [a[n] for n in NAMES]
    o1, S1 = delta_rule_authors_scan(*args, scale=0.3, chunk_size=1)
    o, S = delta_rule_reference(*args, scale=0.3)
    assert_close("o", o, o1, ratio=RATIO_F32)
    assert_close("S", S, S1, ratio=RATIO_F32)


# ------------------------------------------------------------------------------------------
# Chunk boundaries, state carry, resets.


def test_state_carry_at_chunk_boundaries():
    """Chunks start every 64 steps from the call's first step: splitting a sequence at a
    multiple of 64 and carrying the final state is the same as one call; elsewhere it is not."""
    a = _inputs("gated_qdelta", 200)
    o, S = _run(a, "chunk")
    part = lambda lo, hi, h0: {**{n: None if a[n] is None else a[n][:, lo:hi] for n in NAMES[:6]},
                               "initial_state": h0}
    o1, S1 = _run(part(0, 128, a["initial_state"]), "chunk")
    o2, S2 = _run(part(128, 200, S1), "chunk")
    assert_close("o", o, jnp.concatenate([o1, o2], axis=1), ratio=RATIO_F32)
    assert_close("S", S, S2, ratio=RATIO_F32)
    o1, S1 = _run(part(0, 100, a["initial_state"]), "chunk")
    o2, S2 = _run(part(100, 200, S1), "chunk")
    assert rel_rmse(o, jnp.concatenate([o1, o2], axis=1)) > 1e-3


def test_full_reset():
    a = _inputs("gated_qdelta", 150)
    a["g"] = a["g"].at[:, 90].set(-jnp.inf)
    o_s, S_s = _run(a, "reference")
    o, S = _run(a, "chunk")
    assert_close("o", o_s, o, ratio=RATIO_F32)
    assert_close("S", S_s, S, ratio=RATIO_F32)


# ------------------------------------------------------------------------------------------
# Gradients.


def test_check_grads_float64():
    """Numerical vs autodiff gradients of the chunk path, float64, two chunks (64 + 6)."""
    with jax.enable_x64(True):
        a = make_inputs("gated_qdelta", B=1, T=70, H=1, Dk=4, Dv=3, dtype=jnp.float64)

        def f(q, k, v, beta, g, lam, h0):
            o, S = delta_rule(q, k, v, beta, g=g, lam=lam, initial_state=h0, impl="chunk",
                              pairing="authors")
            return jnp.sum(jnp.sin(o)) + jnp.sum(S**2)

        check_grads(f, [a[n] for n in NAMES], order=1, modes=["rev"], atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("mode,T", [("qdelta", 37), ("gated_qdelta", 150)])
def test_scan_and_chunk_gradients_agree(mode, T):
    a = _inputs(mode, T)
    do, dS = cotangents(2, T, 2, 20, 36, 2)
    gs = _grads(a, do, dS, impl="reference")
    gc = _grads(a, do, dS, impl="chunk")
    for n in NAMES:
        if a[n] is not None:
            assert_close(f"d{n}", gs[n], gc[n], ratio=1e-4)


def _pallas_check(mode, T, backend, Dk=20, Dv=36):
    a = _inputs(mode, T, Dk=Dk, Dv=Dv)
    do, dS = cotangents(2, T, 2, Dk, Dv, 3)
    o_c, S_c = _run(a, "chunk")
    g_c = _grads(a, do, dS, impl="chunk")
    opts = DeltaRuleOptions(scale=Dk**-0.5, backend=backend, interpret=True, pairing="authors")

    def fn(args):
        return delta_rule_pallas(*(args[n] for n in NAMES), opts)

    o, S = jax.jit(fn)(a)
    g = jax.jit(jax.grad(_loss_fn(fn, do, dS)))(a)
    assert_close("o", o_c, o, ratio=RATIO_F32)
    assert_close("S", S_c, S, ratio=RATIO_F32)
    for n in NAMES:
        if a[n] is not None:
            assert_close(f"d{n}", g_c[n], g[n], ratio=1e-4)


@pytest.mark.parametrize("mode,T", [("gated_qdelta", 70), pytest.param("gated_qdelta", 150,
                                                                       marks=_SLOW)])
def test_pallas_gpu_interpret_matches_chunk(mode, T):
    _pallas_check(mode, T, "gpu")


@pytest.mark.slow
@pytest.mark.parametrize("mode,T,Dk,Dv", [("qdelta", 37, 20, 36), ("gated_qdelta", 1, 70, 20),
                                          ("qdelta", 64, 70, 20), ("gated_qdelta", 200, 70, 20)])
def test_pallas_gpu_interpret_matches_chunk_more(mode, T, Dk, Dv):
    _pallas_check(mode, T, "gpu", Dk=Dk, Dv=Dv)


@pytest.mark.parametrize("mode,T", [("gated_qdelta", 70), pytest.param("gated_qdelta", 150,
                                                                       marks=_SLOW)])
def test_pallas_tpu_interpret_matches_chunk(mode, T):
    _pallas_check(mode, T, "tpu")


@pytest.mark.slow
@pytest.mark.parametrize("mode,T", [("qdelta", 37), ("gated_qdelta", 64)])
def test_pallas_tpu_interpret_matches_chunk_more(mode, T):
    _pallas_check(mode, T, "tpu")


def test_public_pallas_matches_chunk():
    a = _inputs("gated_qdelta", 100)
    o_c, S_c = _run(a, "chunk")
    o, S = _run(a, "pallas")
    assert_close("o", o_c, o, ratio=RATIO_F32)
    assert_close("S", S_c, S, ratio=RATIO_F32)


# ------------------------------------------------------------------------------------------
# Errors.


@pytest.mark.parametrize("pairing", ["author", "Authors", "", None, 1, ["authors"]])
def test_bad_pairing(pairing):
    a = _inputs("qdelta", 8)
    with pytest.raises(ValueError, match=r"pairing must be one of \('recurrence', 'authors'\)"):
        _run(a, "chunk", pairing=pairing)


@pytest.mark.parametrize("impl, chunk_size", [
    ("chunk", 16), ("chunk", 128), ("auto", 32), ("reference", 32), ("pallas", 32),
    *(pytest.param(i, c, marks=_SLOW) for i in ("auto", "reference", "pallas") for c in (16, 128))])
def test_authors_requires_chunk_64(impl, chunk_size):
    a = _inputs("qdelta", 8)
    with pytest.raises(ValueError, match=r"chunk_size must be 64 with pairing='authors'"):
        _run(a, impl, chunk_size=chunk_size)
    _run(a, impl, chunk_size=64)  # the default, accepted
    _run(a, impl, pairing="recurrence", chunk_size=chunk_size)  # any C for the recurrence


def test_internal_entry_points_refuse_too():
    a = _inputs("qdelta", 8)
    with pytest.raises(ValueError, match="pairing must be one of"):
        DeltaRuleOptions(scale=1.0, pairing="x")
    with pytest.raises(ValueError, match="chunk_size must be 64"):
        DeltaRuleOptions(scale=1.0, chunk_size=32, pairing="authors")
    with pytest.raises(ValueError, match="chunk_size must be 64"):
        delta_rule_chunk(*(a[n] for n in NAMES), scale=1.0, chunk_size=16, pairing="authors")
