"""Shared test base for every `delta_rule` implementation (tokamax style).

A backend test file subclasses `DeltaRuleTestBase`, sets `impl` (and tolerance hooks), and
inherits every test. Each implementation is compared with the `lax.scan` oracle: outputs, final
state and the gradients of every input — `initial_state` included — under random cotangents for
both outputs.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moejax.kernels.delta_rule import delta_rule, delta_rule_step
from moejax.testing import (
    RATIO_BF16_GATE_GRAD,
    RATIO_BF16_GRAD,
    RATIO_BF16_OUT,
    RATIO_F32,
    assert_close,
)
from tests.kernels.delta_rule.inputs import MODES, cotangents, make_inputs, seed_of

GRAD_NAMES = ("q", "k", "v", "beta", "g", "lam", "initial_state")
ALL_T = (1, 63, 100, 1000)
CHUNKS = (16, 32, 64)
# The default run: every mode at every T, the chunk size rotating, so each (mode, C) and each
# (C, T) pair occurs (16 compiles instead of 48); the whole grid is the slow test.
ORACLE_CASES = [(m, CHUNKS[(i + j) % len(CHUNKS)], t)
                for i, m in enumerate(MODES) for j, t in enumerate(ALL_T)]
ORACLE_CASES_FULL = [(m, c, t) for m in MODES for c in CHUNKS for t in ALL_T
                     if (m, c, t) not in ORACLE_CASES]


def _loss(impl, chunk_size, do, dS):
    def f(args):
        o, S = delta_rule(args["q"], args["k"], args["v"], args["beta"], g=args["g"],
                          lam=args["lam"], initial_state=args["initial_state"], impl=impl,
                          chunk_size=chunk_size)
        return jnp.sum(o.astype(jnp.float32) * do) + jnp.sum(S * dS), (o, S)
    return f


@functools.partial(jax.jit, static_argnames=("impl", "chunk_size"))
def value_and_grads(args, do, dS, *, impl, chunk_size):
    (_, (o, S)), grads = jax.value_and_grad(_loss(impl, chunk_size, do, dS), has_aux=True)(args)
    return o, S, grads


@functools.lru_cache(maxsize=64)
def _oracle(mode, T, dtype_name, B=2, H=2, Dk=20, Dv=36):
    """Oracle outputs and grads on the float32 version of the (possibly bf16-rounded) inputs."""
    seed = seed_of(f"{mode}-{T}-{B}-{H}-{Dk}-{Dv}")
    args = make_inputs(mode, B=B, T=T, H=H, Dk=Dk, Dv=Dv, seed=seed, dtype=jnp.dtype(dtype_name))
    do, dS = cotangents(B, T, H, Dk, Dv, seed)
    args32 = jax.tree.map(lambda a: a.astype(jnp.float32), args)
    return args, do, dS, value_and_grads(args32, do, dS, impl="reference", chunk_size=64)


class DeltaRuleTestBase:
    """Every test of a `delta_rule` implementation; subclasses set `impl`."""

    impl: str = ""

    def ratios(self, dtype):
        """Tolerance hook: (output/state ratio, q/k/v grad ratio, gate grad ratio)."""
        if dtype == jnp.bfloat16:
            return RATIO_BF16_OUT, RATIO_BF16_GRAD, RATIO_BF16_GATE_GRAD
        return RATIO_F32, 1e-4, 1e-4

    def _check_against_oracle(self, mode, T, chunk_size, dtype=jnp.float32, **shape):
        args, do, dS, (o_ref, S_ref, g_ref) = _oracle(mode, T, jnp.dtype(dtype).name, **shape)
        o, S, grads = value_and_grads(args, do, dS, impl=self.impl, chunk_size=chunk_size)
        r_out, r_qkv, r_gate = self.ratios(dtype)
        assert o.dtype == dtype
        assert_close("o", o_ref, o, ratio=r_out)
        assert_close("S", S_ref, S, ratio=r_out)
        for name in GRAD_NAMES:
            if args[name] is None:
                continue
            ratio = r_gate if name in ("beta", "g", "lam") else r_qkv
            assert grads[name].dtype == args[name].dtype
            assert_close(f"d{name}", g_ref[name], grads[name], ratio=ratio)

    @pytest.mark.parametrize("mode,chunk_size,T", ORACLE_CASES)
    def test_matches_oracle_fp32(self, mode, chunk_size, T):
        self._check_against_oracle(mode, T, chunk_size)

    @pytest.mark.slow
    @pytest.mark.parametrize("mode,chunk_size,T", ORACLE_CASES_FULL)
    def test_matches_oracle_fp32_full(self, mode, chunk_size, T):
        self._check_against_oracle(mode, T, chunk_size)

    @pytest.mark.parametrize("mode", list(MODES))
    def test_matches_oracle_bf16(self, mode):
        self._check_against_oracle(mode, 100, 32, dtype=jnp.bfloat16)

    @pytest.mark.parametrize("Dk,Dv", [(60, 100), (7, 5)], ids=["Dk60-Dv100", "Dk7-Dv5"])
    def test_ragged_head_dims(self, Dk, Dv):
        self._check_against_oracle("gated_qdelta", 100, 32, Dk=Dk, Dv=Dv, B=1, H=3)

    @pytest.mark.parametrize("mode", list(MODES))
    def test_split_sequence_carries_state(self, mode):
        a = make_inputs(mode, T=100, seed=seed_of(f"split-{mode}"))
        run = lambda sl, h0: delta_rule(
            a["q"][:, sl], a["k"][:, sl], a["v"][:, sl], a["beta"][:, sl],
            g=None if a["g"] is None else a["g"][:, sl],
            lam=None if a["lam"] is None else a["lam"][:, sl],
            initial_state=h0, impl=self.impl, chunk_size=16)
        o, S = run(slice(None), a["initial_state"])
        o1, S1 = run(slice(0, 37), a["initial_state"])
        o2, S2 = run(slice(37, None), S1)
        assert_close("o", o, jnp.concatenate([o1, o2], axis=1), ratio=RATIO_F32)
        assert_close("S", S, S2, ratio=RATIO_F32)

    @pytest.mark.parametrize("mode", list(MODES))
    def test_decode_loop_equals_full(self, mode):
        a = make_inputs(mode, T=20, seed=seed_of(f"decode-{mode}"))
        o, S = delta_rule(a["q"], a["k"], a["v"], a["beta"], g=a["g"], lam=a["lam"],
                          initial_state=a["initial_state"], impl=self.impl, chunk_size=16)
        at = lambda x, t: None if x is None else x[:, t]
        state, outs = a["initial_state"], []
        for t in range(20):
            o_t, state = delta_rule_step(state, at(a["q"], t), at(a["k"], t), at(a["v"], t),
                                         at(a["beta"], t), g_t=at(a["g"], t),
                                         lam_t=at(a["lam"], t))
            outs.append(o_t)
        assert_close("o", o, jnp.stack(outs, axis=1), ratio=RATIO_F32)
        assert_close("S", S, state, ratio=RATIO_F32)

    def test_no_final_state(self):
        a = make_inputs("qdelta", T=10)
        o, S = delta_rule(a["q"], a["k"], a["v"], a["beta"], lam=a["lam"], impl=self.impl,
                          return_final_state=False)
        assert S is None and o.shape == (2, 10, 2, 36)

    def test_scale(self):
        a = make_inputs("deltanet", T=30, initial_state=False)
        o1, _ = delta_rule(a["q"], a["k"], a["v"], a["beta"], scale=1.0, impl=self.impl)
        o2, _ = delta_rule(a["q"], a["k"], a["v"], a["beta"], scale=0.1, impl=self.impl)
        np.testing.assert_allclose(0.1 * np.asarray(o1), np.asarray(o2), rtol=1e-5, atol=1e-6)
