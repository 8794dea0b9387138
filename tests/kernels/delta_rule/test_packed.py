"""Packed variable-length sequences (`cu_seqlens`): every impl that takes them gives each
sequence exactly what it gets alone (outputs, per-sequence final states, gradients), for any
chunk size; a bad value in one sequence stays in it; bad boundaries are refused."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moejax.kernels.delta_rule import delta_rule
from moejax.testing import RATIO_F32, assert_close
from tests.kernels.delta_rule.test_channel_decay import NAMES, make_gk_inputs

# Lengths 5, 35, 1 (a one-step sequence), 49: T = 90; chunks of 16 and 64 cut them unevenly.
CU = (0, 5, 40, 41, 90)
STEP_NAMES = ("q", "k", "v", "beta", "g", "lam", "gk")


def _inputs(mode, seed, *, gk=True):
    a = make_gk_inputs(mode, B=1, T=CU[-1], H=2, Dk=8, Dv=6, seed=seed, initial_state=False)
    if not gk:
        a["gk"] = None
    a["initial_state"] = jax.random.normal(jax.random.key(seed + 3), (len(CU) - 1, 2, 8, 6))
    return a


def _packed(a, impl, chunk_size, cu=CU):
    return delta_rule(a["q"], a["k"], a["v"], a["beta"], g=a["g"], lam=a["lam"], gk=a["gk"],
                      initial_state=a["initial_state"], cu_seqlens=jnp.asarray(cu),
                      impl=impl, chunk_size=chunk_size)


def _alone(a, n, cu=CU):
    sl = slice(cu[n], cu[n + 1])
    cut = lambda x: None if x is None else x[:, sl]
    return delta_rule(*(cut(a[m]) for m in ("q", "k", "v", "beta")), g=cut(a["g"]),
                      lam=cut(a["lam"]), gk=cut(a["gk"]),
                      initial_state=a["initial_state"][n:n + 1], impl="reference")


@pytest.mark.parametrize("impl,chunk_size,mode,gk", [
    ("reference", 64, "kda_gated_qdelta", True),
    ("chunk", 16, "kda_gated_qdelta", True),
    ("chunk", 64, "kda", True),
    ("chunk", 7, "kda_qdelta", False),     # gated Q-Delta without gk: the scalar-decay path
    ("chunk", 32, "kda_gated", False),
    ("pallas", 16, "kda_gated_qdelta", True),  # the GPU kernels in interpret mode on CPU
])
def test_packed_equals_each_sequence_alone(impl, chunk_size, mode, gk):
    a = _inputs(mode, 1, gk=gk)
    o, S = _packed(a, impl, chunk_size)
    assert S.shape == (len(CU) - 1, 2, 8, 6)
    for n in range(len(CU) - 1):
        o1, S1 = _alone(a, n)
        assert_close(f"o[{n}]", o1, o[:, CU[n]:CU[n + 1]], ratio=RATIO_F32)
        assert_close(f"S[{n}]", S1[0], S[n], ratio=RATIO_F32)


@functools.partial(jax.jit, static_argnames=("impl", "chunk_size"))
def _value_and_grads(args, do, dS, cu, *, impl, chunk_size):
    def loss(args):
        o, S = delta_rule(args["q"], args["k"], args["v"], args["beta"], g=args["g"],
                          lam=args["lam"], gk=args["gk"], initial_state=args["initial_state"],
                          cu_seqlens=cu, impl=impl, chunk_size=chunk_size)
        return jnp.sum(o * do) + jnp.sum(S * dS)
    return jax.grad(loss)(args)


def test_packed_gradients_match_the_reference():
    """Under jit (traced cu_seqlens), the chunk path's gradients of every input equal the packed
    reference's."""
    a = _inputs("kda_gated_qdelta", 2)
    ks = jax.random.split(jax.random.key(9))
    do = jax.random.normal(ks[0], (1, CU[-1], 2, 6))
    dS = jax.random.normal(ks[1], (len(CU) - 1, 2, 8, 6))
    cu = jnp.asarray(CU)
    g_ref = _value_and_grads(a, do, dS, cu, impl="reference", chunk_size=64)
    grads = _value_and_grads(a, do, dS, cu, impl="chunk", chunk_size=16)
    for name in NAMES:
        assert_close(f"d{name}", g_ref[name], grads[name], ratio=1e-4)


def test_a_bad_value_stays_in_its_sequence():
    a = _inputs("kda_qdelta", 3)
    bad = {**a, "v": a["v"].at[0, 20, 0, 1].set(jnp.nan)}  # in sequence 1 = [5, 40)
    o, S = _packed(a, "chunk", 16)
    ob, Sb = _packed(bad, "chunk", 16)
    same = lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    same(ob[:, :20], o[:, :20])
    same(ob[:, 40:], o[:, 40:])
    same(ob[:, :, 1], o[:, :, 1])
    assert np.isnan(np.asarray(ob[0, 20:40, 0])).all()
    same(Sb[jnp.array([0, 2, 3])], S[jnp.array([0, 2, 3])])
    assert np.isnan(np.asarray(Sb[1, 0])).all()


def test_without_initial_state_each_sequence_starts_from_zero():
    a = {**_inputs("kda", 4), "initial_state": None}
    o, S = _packed(a, "chunk", 16)
    ref = [_alone({**a, "initial_state": jnp.zeros((len(CU) - 1, 2, 8, 6))}, n)
           for n in range(len(CU) - 1)]
    assert_close("o", jnp.concatenate([r[0] for r in ref], axis=1), o, ratio=RATIO_F32)
    assert_close("S", jnp.concatenate([r[1] for r in ref]), S, ratio=RATIO_F32)


def test_auto_takes_the_chunk_path_on_cpu():
    a = _inputs("kda_gated", 5, gk=False)
    np.testing.assert_array_equal(np.asarray(_packed(a, "auto", 64)[0]),
                                  np.asarray(_packed(a, "chunk", 64)[0]))


@pytest.mark.parametrize("cu,over,match", [
    ([0, 5, 5, 8], {}, r"cu_seqlens must start at 0, increase strictly and end at T=8"),
    ([0, 5, 7], {}, r"end at T=8, got \[0, 5, 7\]"),
    ([1, 5, 8], {}, r"start at 0"),
    ([[0, 8]], {}, r"cu_seqlens must be \[N \+ 1\]"),
    ([0], {}, r"cu_seqlens must be \[N \+ 1\]"),
    ([0.0, 8.0], {}, r"cu_seqlens must be an integer array"),
    ([0, 8], {"B": 2}, r"q must have B = 1, got B=2"),
    ([0, 3, 8], {"h0": (1, 3, 4, 5)}, r"initial_state must be \[N, H, Dk, Dv\] = \[2, 3, 4, 5\]"),
    ([0, 3, 8], {"lam": True, "pairing": "authors"}, r"pairing='authors'.*cu_seqlens"),
])
def test_bad_cu_seqlens_is_refused(cu, over, match):
    B = over.get("B", 1)
    q = jnp.ones((B, 8, 3, 4))
    kw = {}
    if "h0" in over:
        kw["initial_state"] = jnp.zeros(over["h0"])
    if over.get("lam"):
        kw["lam"], kw["pairing"] = jnp.ones((B, 8, 3)), over["pairing"]
    with pytest.raises(ValueError, match=match):
        delta_rule(q, q, jnp.ones((B, 8, 3, 5)), jnp.ones((B, 8, 3)),
                   cu_seqlens=jnp.asarray(cu), **kw)
