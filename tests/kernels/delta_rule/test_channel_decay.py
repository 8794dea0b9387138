"""Per-key-channel decay `gk` (Kimi Delta Attention): the oracle against the written-out
recurrence, the chunk path against the oracle (values, every gradient, chunk sizes, ragged T),
exactness under strong decays and per-channel resets, containment, decoding and bad input."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from moejax.kernels.delta_rule import delta_rule, delta_rule_step
from moejax.testing import RATIO_BF16_GRAD, RATIO_BF16_OUT, RATIO_F32, assert_close
from tests.kernels.delta_rule.inputs import cotangents, make_inputs, seed_of

# mode -> the make_inputs mode supplying g / lam beside gk
GK_MODES = {"kda": "deltanet", "kda_gated": "gated_deltanet", "kda_qdelta": "qdelta",
            "kda_gated_qdelta": "gated_qdelta"}
NAMES = ("q", "k", "v", "beta", "g", "lam", "initial_state", "gk")


def make_gk_inputs(mode, *, B=2, T=63, H=2, Dk=12, Dv=10, seed=0, scale=1.0,
                   dtype=jnp.float32, initial_state=True):
    """`make_inputs` plus `gk` in KDA's range: `−softplus(·)` per channel, some channels fast."""
    a = make_inputs(GK_MODES[mode], B=B, T=T, H=H, Dk=Dk, Dv=Dv, seed=seed, dtype=jnp.float32,
                    initial_state=initial_state)
    z = jax.random.normal(jax.random.key(seed + 7), (B, T, H, Dk))
    a["gk"] = -scale * jax.nn.softplus(2.0 * z - 2.0)
    return {n: None if x is None else x.astype(dtype) for n, x in a.items()}


def _numpy_recurrence(q, k, v, beta, g, lam, h0, gk, scale):
    B, T, H, _ = q.shape
    o, S = np.zeros(v.shape), h0.copy()
    for b in range(B):
        for h in range(H):
            s = S[b, h]
            for t in range(T):
                x = k[b, t, h] + (0.0 if lam is None else lam[b, t, h] * q[b, t, h])
                s = np.exp(gk[b, t, h])[:, None] * s
                if g is not None:
                    s = np.exp(g[b, t, h]) * s
                s = s + beta[b, t, h] * np.outer(k[b, t, h], v[b, t, h] - s.T @ x)
                o[b, t, h] = scale * s.T @ q[b, t, h]
            S[b, h] = s
    return o, S


def _run(a, impl, chunk_size=64, **kw):
    return delta_rule(a["q"], a["k"], a["v"], a["beta"], g=a["g"], lam=a["lam"], gk=a["gk"],
                      initial_state=a["initial_state"], impl=impl, chunk_size=chunk_size, **kw)


@pytest.mark.parametrize("mode", list(GK_MODES))
def test_reference_matches_written_out_recurrence(mode):
    a = make_gk_inputs(mode, B=1, T=13, H=2, Dk=5, Dv=3)
    npa = {n: None if x is None else np.asarray(x, np.float64) for n, x in a.items()}
    o_np, S_np = _numpy_recurrence(*(npa[n] for n in NAMES), scale=5**-0.5)
    o, S = _run(a, "reference")
    np.testing.assert_allclose(np.asarray(o), o_np, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(S), S_np, rtol=1e-5, atol=1e-5)


@functools.partial(jax.jit, static_argnames=("impl", "chunk_size"))
def _value_and_grads(args, do, dS, *, impl, chunk_size):
    def loss(args):
        o, S = _run(args, impl, chunk_size)
        return jnp.sum(o.astype(jnp.float32) * do) + jnp.sum(S * dS), (o, S)
    (_, (o, S)), grads = jax.value_and_grad(loss, has_aux=True)(args)
    return o, S, grads


# Every mode, ragged T, chunk sizes with sub-chunks of 1 (C = 7, prime), 4 and 8.
CASES = [("kda", 16, 63), ("kda_gated", 64, 100), ("kda_qdelta", 7, 30),
         ("kda_gated_qdelta", 24, 100), ("kda_gated_qdelta", 64, 1)]


@pytest.mark.parametrize("mode,chunk_size,T", CASES)
def test_chunk_matches_oracle_fp32(mode, chunk_size, T):
    seed = seed_of(f"gk-{mode}-{T}")
    a = make_gk_inputs(mode, T=T, seed=seed)
    do, dS = cotangents(2, T, 2, 12, 10, seed)
    o_ref, S_ref, g_ref = _value_and_grads(a, do, dS, impl="reference", chunk_size=64)
    o, S, grads = _value_and_grads(a, do, dS, impl="chunk", chunk_size=chunk_size)
    assert_close("o", o_ref, o, ratio=RATIO_F32)
    assert_close("S", S_ref, S, ratio=RATIO_F32)
    for name in NAMES:
        if a[name] is not None:
            assert_close(f"d{name}", g_ref[name], grads[name], ratio=1e-4)


def test_chunk_matches_oracle_bf16():
    a = make_gk_inputs("kda_gated_qdelta", T=100, seed=3, dtype=jnp.bfloat16)
    a32 = jax.tree.map(lambda x: x.astype(jnp.float32), a)
    do, dS = cotangents(2, 100, 2, 12, 10, 3)
    o_ref, S_ref, g_ref = _value_and_grads(a32, do, dS, impl="reference", chunk_size=64)
    o, S, grads = _value_and_grads(a, do, dS, impl="chunk", chunk_size=32)
    assert o.dtype == jnp.bfloat16 and grads["gk"].dtype == jnp.bfloat16
    assert_close("o", o_ref, o, ratio=RATIO_BF16_OUT)
    assert_close("S", S_ref, S, ratio=RATIO_BF16_OUT)
    for name in ("q", "k", "v", "gk"):
        assert_close(f"d{name}", g_ref[name], grads[name], ratio=RATIO_BF16_GRAD)


def test_chunk_size_invariant():
    a = make_gk_inputs("kda_qdelta", T=130, seed=11)
    o0, S0 = _run(a, "chunk", 1)
    for C in (5, 16, 36, 64):
        o, S = _run(a, "chunk", C)
        assert_close(f"o C={C}", o0, o, ratio=RATIO_F32)
        assert_close(f"S C={C}", S0, S, ratio=RATIO_F32)


def test_strong_decay_and_channel_resets_are_exact():
    """Decays of e^-40 per step, and −inf in single channels: nothing overflows; values and
    gradients stay the recurrence's (log-space sub-chunking, no exp(−G) factors)."""
    a = make_gk_inputs("kda_qdelta", T=80, seed=5, scale=40.0)
    gk = a["gk"].at[0, 10, 0, 3].set(-jnp.inf).at[1, 50, 1, :].set(-jnp.inf)
    a = {**a, "gk": gk}
    do, dS = cotangents(2, 80, 2, 12, 10, 5)
    o_ref, S_ref, g_ref = _value_and_grads(a, do, dS, impl="reference", chunk_size=64)
    o, S, grads = _value_and_grads(a, do, dS, impl="chunk", chunk_size=32)
    assert_close("o", o_ref, o, ratio=RATIO_F32)
    assert_close("S", S_ref, S, ratio=RATIO_F32)
    for name in ("q", "k", "v", "beta", "lam"):
        assert_close(f"d{name}", g_ref[name], grads[name], ratio=1e-4)
    finite = jnp.isfinite(gk)
    assert np.isfinite(np.asarray(grads["gk"])[np.asarray(finite)]).all()
    assert_close("dgk", jnp.where(finite, g_ref["gk"], 0), jnp.where(finite, grads["gk"], 0),
                 ratio=1e-4)


def test_check_grads_float64():
    with jax.enable_x64(True):
        a = make_gk_inputs("kda_gated_qdelta", B=1, T=11, H=1, Dk=4, Dv=3, dtype=jnp.float64)

        def f(*args):
            o, S = _run(dict(zip(NAMES, args, strict=True)), "chunk", 4)
            return jnp.sum(jnp.sin(o)) + jnp.sum(S**2)

        check_grads(f, [a[n] for n in NAMES], order=1, modes=["rev"], atol=1e-6, rtol=1e-6)


def test_decode_loop_equals_full():
    a = make_gk_inputs("kda_gated_qdelta", T=20, seed=2)
    o, S = _run(a, "chunk", 8)
    state, outs = a["initial_state"], []
    for t in range(20):
        o_t, state = delta_rule_step(state, a["q"][:, t], a["k"][:, t], a["v"][:, t],
                                     a["beta"][:, t], g_t=a["g"][:, t], lam_t=a["lam"][:, t],
                                     gk_t=a["gk"][:, t])
        outs.append(o_t)
    assert_close("o", o, jnp.stack(outs, axis=1), ratio=RATIO_F32)
    assert_close("S", S, state, ratio=RATIO_F32)


def test_nan_in_gk_is_contained():
    a = make_gk_inputs("kda_qdelta", T=40, seed=4)
    bad = {**a, "gk": a["gk"].at[0, 25, 1, 2].set(jnp.nan)}
    o, S = _run(a, "chunk", 16)
    ob, Sb = _run(bad, "chunk", 16)
    np.testing.assert_array_equal(np.asarray(ob[0, :25]), np.asarray(o[0, :25]))
    np.testing.assert_array_equal(np.asarray(ob[1]), np.asarray(o[1]))
    np.testing.assert_array_equal(np.asarray(ob[0, :, 0]), np.asarray(o[0, :, 0]))
    assert np.isnan(np.asarray(ob[0, 25:, 1])).all() and np.isnan(np.asarray(Sb[0, 1])).all()


def test_auto_takes_the_chunk_path_on_cpu():
    a = make_gk_inputs("kda", T=16)
    np.testing.assert_array_equal(np.asarray(_run(a, "auto")[0]), np.asarray(_run(a, "chunk")[0]))


@pytest.mark.parametrize("over,match", [
    ({"gk": jnp.zeros((2, 8, 3))}, r"gk must be \[B, T, H, Dk\] = \[2, 8, 3, 4\]"),
    ({"gk": jnp.zeros((2, 8, 3, 5))}, r"gk must be \[B, T, H, Dk\]"),
    ({"gk": jnp.zeros((2, 8, 3, 4), jnp.int32)}, r"gk must be a floating-point array"),
    ({"gk": [0.0]}, r"gk"),
    ({"gk": jnp.zeros((2, 8, 3, 4)), "lam": jnp.ones((2, 8, 3)), "pairing": "authors"},
     r"pairing='authors'.*gk"),
])
def test_bad_gk_is_refused(over, match):
    q = jnp.ones((2, 8, 3, 4))
    with pytest.raises(ValueError, match=match):
        delta_rule(q, q, jnp.ones((2, 8, 3, 5)), jnp.ones((2, 8, 3)), **over)


def test_bad_gk_t_is_refused():
    S, x = jnp.zeros((2, 3, 4, 5)), jnp.ones((2, 3, 4))
    with pytest.raises(ValueError, match=r"gk_t must be \[B, H, Dk\] = \[2, 3, 4\]"):
        delta_rule_step(S, x, x, jnp.ones((2, 3, 5)), jnp.ones((2, 3)), gk_t=jnp.ones((2, 3)))


def _pairs_direct(R, K, G, n):
    """`Σ_d R_td K_jd exp(G_td − G_jd)` for j ≤ t with no reset in (j, t], element by element."""
    C = K.shape[-2]
    keep = jnp.tril(jnp.ones((C, C), bool))[..., None] & (n[..., :, None, :] == n[..., None, :, :])
    e = jnp.where(keep, jnp.exp(jnp.where(keep, G[..., :, None, :] - G[..., None, :, :], 0.0)), 0.0)
    return jnp.einsum("...td,...jd,...tjd->...tj", R, K, e)


@pytest.mark.parametrize("C", [1, 2, pytest.param(7, marks=pytest.mark.slow), 8, 12, 16])
def test_channel_pairs_and_its_vjp(C):
    """`chunk._channel_pairs` (binary split, written-out VJP) equals the element-by-element
    pairs, and its gradients are checked numerically in float64, with resets and steps of e^-40."""
    from moejax.kernels.delta_rule import chunk
    with jax.enable_x64(True):
        ks = jax.random.split(jax.random.key(C), 4)
        X, Q, K = (jax.random.normal(k_, (2, C, 5), jnp.float64) for k_ in ks[:3])
        gk = -jax.nn.softplus(3.0 * jax.random.normal(ks[3], (2, C, 5), jnp.float64))
        gk = gk.at[0, C // 2, 1].set(-jnp.inf).at[1, C - 1, 3].set(-40.0)
        G, n = chunk._channel_gates(gk)
        M, P = chunk._channel_pairs((X, Q), K, G, n)
        np.testing.assert_allclose(M, _pairs_direct(X, K, G, n), rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(P, _pairs_direct(Q, K, G, n), rtol=1e-12, atol=1e-12)

        def f(X, Q, K, G):
            M, P = chunk._channel_pairs((X, Q), K, G, n)
            return jnp.sum(jnp.sin(M)) + jnp.sum(P**2)

        check_grads(f, (X, Q, K, G), order=1, modes=["rev"], atol=1e-6, rtol=1e-6)
