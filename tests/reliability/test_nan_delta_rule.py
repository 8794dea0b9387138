"""NaN/Inf containment of the delta-rule op (`moejax.kernels.delta_rule`, `nonfinite.contain`).

A NaN or ±inf in one input at step s of sequence B0, head H0 must leave the outputs of (B0, H0)
before s, every output and final state of the other sequence and the other head, and (for the
chunkwise paths) the gradients of a loss on those, exactly as they are without it. g = −inf is no
bad input but a full reset: every impl must equal the recurrence there, gradients included.

Shapes are tiny (T = 40 with C = 16: chunks [0, 16), [16, 32) and the ragged [32, 40)); the bad
value goes to the first, a middle or the last step of the second chunk, or into the ragged one.
Jitted functions are shared across cases (the bad value is data), so each (impl, mode) compiles
once. The Pallas kernel (GPU kernel in interpret mode on CPU) runs a few cases only.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moejax.kernels.delta_rule import delta_rule
from moejax.kernels.delta_rule.reference import delta_rule_reference
from moejax.testing import RATIO_F32, assert_close
from tests.kernels.delta_rule.inputs import MODES, cotangents, make_inputs, seed_of

B, T, H, Dk, Dv, C = 2, 40, 2, 8, 8, 16
B0, H0 = 0, 1  # the sequence and head that get the bad value
POSITIONS = {"first": 16, "middle": 23, "last": 31, "ragged": 37}
VALUES = {"nan": np.nan, "inf": np.inf, "-inf": -np.inf}
NAMES = ("q", "k", "v", "beta", "g", "lam", "initial_state")
EXACT = 1e-6  # the same computation on the same finite numbers: equal up to rounding


@functools.cache
def _inputs(mode):  # callers copy before changing it
    return make_inputs(mode, B=B, T=T, H=H, Dk=Dk, Dv=Dv, seed=seed_of(f"nan-{mode}"))


def _call(args, impl):
    return delta_rule(args["q"], args["k"], args["v"], args["beta"], g=args["g"],
                      lam=args["lam"], initial_state=args["initial_state"], impl=impl,
                      chunk_size=C)


@functools.partial(jax.jit, static_argnames=("impl",))
def _eval(args, w_o, w_S, *, impl):
    """`(o, S, grads of Σ o·w_o + Σ S·w_S)`: one compile per (impl, mode) serves every test."""
    def loss(args):
        o, S = _call(args, impl)
        return jnp.sum(o * w_o) + jnp.sum(S * w_S), (o, S)

    (_, (o, S)), grads = jax.value_and_grad(loss, has_aux=True)(args)
    return o, S, grads


def _run(args, *, impl):
    o, S, _ = _eval(args, jnp.zeros((B, T, H, Dv)), jnp.zeros((B, H, Dk, Dv)), impl=impl)
    return o, S


def _grads(args, w_o, w_S, *, impl):
    return _eval(args, w_o, w_S, impl=impl)[2]


@functools.cache
def _clean(impl, mode, s):
    """Outputs and the weighted loss's gradients (`_clean_weights(s)`) of the clean input."""
    o, S, grads = _eval(_inputs(mode), *_clean_weights(s), impl=impl)
    return (o, S), grads


def _with_bad(args, name, value, s):
    """`args` with `value` at step s of (B0, H0) (one channel of q/k/v)."""
    a = dict(args)
    if name == "initial_state":
        a[name] = a[name].at[B0, H0, 2, 3].set(value)
    elif a[name].ndim == 4:
        a[name] = a[name].at[B0, s, H0, 3].set(value)
    else:
        a[name] = a[name].at[B0, s, H0].set(value)
    return a


def _writes_state(mode, name):
    """Does a bad `name` reach the state? q only reads it unless lam mixes q into the key."""
    return name != "q" or MODES[mode][1]


@functools.cache
def _clean_weights(s):
    """Loss weights on everything the bad value at s must not reach (random, fixed)."""
    k1, k2 = jax.random.split(jax.random.key(s))
    w_o = np.array(jax.random.normal(k1, (B, T, H, Dv)))
    w_S = np.array(jax.random.normal(k2, (B, H, Dk, Dv)))
    w_o[B0, s:, H0] = 0.0
    w_S[B0, H0] = 0.0
    return jnp.asarray(w_o), jnp.asarray(w_S)


def _bad_cases():
    for mode, (use_g, use_lam) in MODES.items():
        names = ["q", "k", "v", "beta"] + ["g"] * use_g + ["lam"] * use_lam
        for name in names:
            # −inf is a valid g (a reset, tested below); +inf/NaN are the bad ones.
            values = ("nan", "inf") if name == "g" else ("nan", "inf", "-inf")
            for value in values:
                for pos in POSITIONS:
                    # Default run: NaN at every position, ±Inf mid-chunk; the rest under -m slow.
                    marks = () if value == "nan" or pos == "middle" else (pytest.mark.slow,)
                    yield pytest.param(mode, name, value, pos, id=f"{mode}-{name}-{value}-{pos}",
                                       marks=marks)
        yield pytest.param(mode, "initial_state", "nan", "first",
                           id=f"{mode}-initial_state-nan")


BAD_CASES = list(_bad_cases())


def _check_outputs(mode, name, impl, clean, bad, s):
    (o0, S0), (o, S) = clean, bad
    o0, S0, o, S = map(np.asarray, (o0, S0, o, S))
    other_b, other_h = 1 - B0, 1 - H0
    if name == "initial_state":
        s = 0
    assert_close("o before the bad step", o0[B0, :s, H0], o[B0, :s, H0], ratio=EXACT)
    assert_close("o of the other sequence", o0[other_b], o[other_b], ratio=EXACT)
    assert_close("o of the other head", o0[B0, :, other_h], o[B0, :, other_h], ratio=EXACT)
    assert_close("S of the other sequence", S0[other_b], S[other_b], ratio=EXACT)
    assert_close("S of the other head", S0[B0, other_h], S[B0, other_h], ratio=EXACT)
    # The bad value is not hidden: the output at its step is non-finite.
    assert not np.isfinite(o[B0, s, H0]).all(), "o at the bad step is finite"
    if _writes_state(mode, name):
        assert not np.isfinite(S[B0, H0]).all(), "final state of the bad sequence is finite"
        if impl != "reference":  # contained: every later step of (B0, H0) is NaN
            assert np.isnan(o[B0, s:, H0]).all()
    else:  # a bad q only reads the state: later steps and the state are untouched
        assert_close("o after a bad q", o0[B0, s + 1:, H0], o[B0, s + 1:, H0], ratio=EXACT)
        assert_close("S after a bad q", S0[B0, H0], S[B0, H0], ratio=EXACT)


# The reference is causal by construction (a scan): its sweep runs under -m slow.
@pytest.mark.parametrize("impl", [pytest.param("reference", marks=pytest.mark.slow), "chunk"])
@pytest.mark.parametrize("mode,name,value,pos", BAD_CASES)
def test_outputs_stay_causal(impl, mode, name, value, pos):
    args, s = _inputs(mode), POSITIONS[pos]
    bad = _run(_with_bad(args, name, VALUES[value], s), impl=impl)
    _check_outputs(mode, name, impl, _clean(impl, mode, s)[0], bad, s)


@pytest.mark.parametrize("mode,name,value,pos", BAD_CASES)
def test_chunk_gradients_stay_clean(mode, name, value, pos):
    """Gradients of a loss on everything before/beside the bad value are those of the clean
    input, everywhere (0 at and after the bad step of (B0, H0), as for the clean input)."""
    args, s = _inputs(mode), POSITIONS[pos]
    s_w = 0 if name == "initial_state" else s
    clean = _clean("chunk", mode, s_w)[1]
    bad = _grads(_with_bad(args, name, VALUES[value], s), *_clean_weights(s_w), impl="chunk")
    for n in NAMES:
        if args[n] is not None:
            assert_close(f"d{n}", clean[n], bad[n], ratio=EXACT)


@pytest.mark.parametrize("mode,name,value,pos",
                         [c for c in BAD_CASES if c.values[2:] == ("nan", "middle")])
def test_reference_gradients_of_other_sequences_stay_clean(mode, name, value, pos):
    """The oracle's gradients for the other sequence and head are those of the clean input.
    Its gradients at earlier steps of (B0, H0) are not asked for: its backward forms 0 · NaN
    there (documented in `delta_rule`)."""
    args, s = _inputs(mode), POSITIONS[pos]
    clean = _clean("reference", mode, s)[1]
    bad = _grads(_with_bad(args, name, VALUES[value], s), *_clean_weights(s), impl="reference")
    for n in NAMES:
        if args[n] is None:
            continue
        assert_close(f"d{n} other sequence", clean[n][1 - B0], bad[n][1 - B0], ratio=EXACT)
        head = (B0, 1 - H0) if n == "initial_state" else (B0, slice(None), 1 - H0)
        assert_close(f"d{n} other head", clean[n][head], bad[n][head], ratio=EXACT)


# g = −inf (and a g whose exp underflows to 0): a full reset, S' = 0, equal to the recurrence.
RESETS = {
    "first": (16,),
    "middle": (23,),
    "last": (31,),
    "t0": (0,),
    "ragged": (37,),
    "two-in-chunk": (18, 27),
    "whole-chunk": tuple(range(16, 32)),
}


def _with_resets(args, steps, value):
    g = args["g"]
    for i, t in enumerate(steps):  # both sequences, alternating heads
        g = g.at[B0, t, H0].set(value).at[1 - B0, t, i % H].set(value)
    return dict(args, g=g)


@functools.cache
def _reset_oracle(mode, resets, value):
    args = _with_resets(_inputs(mode), RESETS[resets], value)
    do, dS = cotangents(B, T, H, Dk, Dv, seed_of(f"reset-{mode}"))
    o, S = delta_rule_reference(*[args[n] for n in NAMES], scale=Dk**-0.5)  # the bare oracle
    return args, do, dS, (o, S), _grads(args, do, dS, impl="reference")


def _check_reset(impl, mode, resets, value):
    args, do, dS, (o_ref, S_ref), g_ref = _reset_oracle(mode, resets, value)
    assert np.isfinite(np.asarray(o_ref)).all() and np.isfinite(np.asarray(S_ref)).all()
    o, S = _run(args, impl=impl)
    assert_close("o", o_ref, o, ratio=RATIO_F32)
    assert_close("S", S_ref, S, ratio=RATIO_F32)
    grads = _grads(args, do, dS, impl=impl)
    for n in NAMES:
        if args[n] is not None:
            assert_close(f"d{n}", g_ref[n], grads[n], ratio=1e-4)
    # d/dg at a reset is exp(g) · (...) = 0 in the recurrence.
    assert np.all(np.asarray(grads["g"])[B0, list(RESETS[resets]), H0] == 0.0)


@pytest.mark.parametrize("value", [-np.inf, -1e30], ids=["-inf", "-1e30"])
@pytest.mark.parametrize("resets", list(RESETS))
@pytest.mark.parametrize("mode", ["gated_deltanet", "gated_qdelta"])
def test_chunk_reset_equals_reference(mode, resets, value):
    _check_reset("chunk", mode, resets, value)


# Interpret-mode Pallas is slow: one bad-value case and one reset case (with gradients).
def test_pallas_nan_stays_causal():
    mode, name, s = "gated_qdelta", "k", POSITIONS["middle"]
    args = _inputs(mode)
    bad_args = _with_bad(args, name, np.nan, s)
    _check_outputs(mode, name, "pallas", _run(args, impl="pallas"),
                   _run(bad_args, impl="pallas"), s)
    w_o, w_S = _clean_weights(s)
    clean = _grads(args, w_o, w_S, impl="pallas")
    bad = _grads(bad_args, w_o, w_S, impl="pallas")
    for n in NAMES:
        assert_close(f"d{n}", clean[n], bad[n], ratio=EXACT)


def test_pallas_reset_equals_reference():
    _check_reset("pallas", "gated_qdelta", "two-in-chunk", -np.inf)
