"""Bad input to `delta_rule` and `delta_rule_step`: refused with a message naming the argument."""

from __future__ import annotations

import math

import jax.numpy as jnp

from moejax.kernels.delta_rule import delta_rule, delta_rule_step
from moejax.validation import ArgumentTypeError
from tests.reliability.cases import Case

B, T, H, Dk, Dv = 1, 5, 2, 4, 3


def _rule(**over):
    def call():
        a = {"q": jnp.ones((B, T, H, Dk)), "k": jnp.ones((B, T, H, Dk)),
             "v": jnp.ones((B, T, H, Dv)), "beta": jnp.ones((B, T, H))}
        a.update(over)
        pos = [a.pop(n) for n in ("q", "k", "v", "beta")]
        return delta_rule(*pos, **a)
    return call


def _step(**over):
    def call():
        a = {"S": jnp.zeros((B, H, Dk, Dv)), "q_t": jnp.ones((B, H, Dk)),
             "k_t": jnp.ones((B, H, Dk)), "v_t": jnp.ones((B, H, Dv)), "beta_t": jnp.ones((B, H))}
        a.update(over)
        pos = [a.pop(n) for n in ("S", "q_t", "k_t", "v_t", "beta_t")]
        return delta_rule_step(*pos, **a)
    return call


_nested = [[[[1.0] * Dk] * H] * T] * B  # q as nested Python lists

CASES: list[Case] = [
    Case("delta_rule-none-beta", _rule(beta=None), ArgumentTypeError, ("beta", "array")),
    Case("delta_rule-list-q", _rule(q=_nested), ArgumentTypeError, ("q", "array", "jnp.asarray")),
    Case("delta_rule-str-v", _rule(v="values"), ArgumentTypeError, ("v", "array", "str")),
    Case("delta_rule-list-g", _rule(g=[[0.0] * H] * T), ArgumentTypeError, ("g", "array")),
    Case("delta_rule-float-initial_state", _rule(initial_state=0.0), ArgumentTypeError,
         ("initial_state", "array")),
    Case("delta_rule-int-q", _rule(q=jnp.ones((B, T, H, Dk), jnp.int32)), ValueError,
         ("q", "floating")),
    Case("delta_rule-zero-chunk_size", _rule(chunk_size=0), ValueError, ("chunk_size", ">= 1")),
    Case("delta_rule-float-chunk_size", _rule(chunk_size=16.0), ArgumentTypeError,
         ("chunk_size", "int")),
    Case("delta_rule-unknown-impl", _rule(impl="triton"), ValueError,
         ("impl", "triton", "chunk", "pallas")),
    Case("delta_rule-str-scale", _rule(scale="0.5"), ArgumentTypeError, ("scale", "number")),
    Case("delta_rule-nan-scale", _rule(scale=math.nan), ValueError, ("scale", "finite")),
    Case("delta_rule-str-return_final_state", _rule(return_final_state="yes"),
         ArgumentTypeError, ("return_final_state", "bool")),
    Case("delta_rule_step-none-S", _step(S=None), ArgumentTypeError, ("S", "array")),
    Case("delta_rule_step-list-beta_t", _step(beta_t=[[0.5] * H] * B), ArgumentTypeError,
         ("beta_t", "array")),
    Case("delta_rule_step-str-lam_t", _step(lam_t="0.5"), ArgumentTypeError, ("lam_t", "array")),
    Case("delta_rule_step-str-scale", _step(scale="0.5"), ArgumentTypeError, ("scale", "number")),
]
