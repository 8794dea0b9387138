"""Bad input to the public delta-rule ops: a ValueError naming the argument."""

from __future__ import annotations

import jax.numpy as jnp
import pytest

from moejax.kernels.delta_rule import delta_rule, delta_rule_step

B, T, H, Dk, Dv = 2, 8, 3, 4, 5


def _args(**over):
    a = {
        "q": jnp.ones((B, T, H, Dk)),
        "k": jnp.ones((B, T, H, Dk)),
        "v": jnp.ones((B, T, H, Dv)),
        "beta": jnp.ones((B, T, H)),
    }
    a.update(over)
    return a


def _call(**over):
    a = _args(**over)
    kw = {n: a.pop(n) for n in list(a) if n not in ("q", "k", "v", "beta")}
    return delta_rule(a["q"], a["k"], a["v"], a["beta"], **kw)


@pytest.mark.parametrize(
    "over,match",
    [
        ({"q": jnp.ones((B, T, H))}, r"q must be \[B, T, H, D\]"),
        ({"k": jnp.ones((B, T + 1, H, Dk))}, r"k must have the shape of q"),
        ({"k": jnp.ones((B, T, H, Dk + 1))}, r"k must have the shape of q"),
        ({"v": jnp.ones((B + 1, T, H, Dv))}, r"v must be \[B, T, H, Dv\]"),
        ({"v": jnp.ones((B, T, H + 1, Dv))}, r"v must be \[B, T, H, Dv\]"),
        ({"beta": jnp.ones((B, T))}, r"beta must be \[B, T, H\]"),
        ({"beta": jnp.ones((B, T, H, 1))}, r"beta must be \[B, T, H\]"),
        ({"g": jnp.ones((B, T, H, 1))}, r"g must be \[B, T, H\]"),
        ({"lam": jnp.ones((B, T + 2, H))}, r"lam must be \[B, T, H\]"),
        ({"initial_state": jnp.ones((B, H, Dv, Dk))}, r"initial_state must be \[B, H, Dk, Dv\]"),
        ({"chunk_size": 0}, r"chunk_size must be >= 1, got 0"),
        ({"chunk_size": -16}, r"chunk_size must be >= 1, got -16"),
        ({"chunk_size": 16.0}, r"chunk_size must be an int"),
        ({"chunk_size": True}, r"chunk_size must be an int"),
        ({"impl": "triton"}, r"impl must be one of \('auto', 'reference', 'chunk', 'pallas'\), "
                             r"got 'triton'"),
        ({"q": jnp.ones((B, T, H, Dk), jnp.int32)}, r"q must be a floating-point array"),
        ({"beta": jnp.ones((B, T, H), jnp.int8)}, r"beta must be a floating-point array"),
        ({"q": jnp.ones((B, 0, H, Dk)), "k": jnp.ones((B, 0, H, Dk)),
          "v": jnp.ones((B, 0, H, Dv)), "beta": jnp.ones((B, 0, H))}, r"T >= 1"),
    ],
    ids=lambda x: x if isinstance(x, str) else None,
)
def test_delta_rule_rejects(over, match):
    with pytest.raises(ValueError, match=match):
        _call(**over)


@pytest.mark.parametrize(
    "name,value,match",
    [
        ("S", jnp.ones((B, H, Dk, Dk)), r"S must be \[B, H, Dk, Dv\]"),
        ("q_t", jnp.ones((B, H)), r"q_t must be \[B, H, D\]"),
        ("k_t", jnp.ones((B, H, Dk + 1)), r"k_t must have the shape of q_t"),
        ("beta_t", jnp.ones((B,)), r"beta_t must be \[B, H\]"),
        ("lam_t", jnp.ones((B, H, 1)), r"lam_t must be \[B, H\]"),
        ("v_t", jnp.ones((B, H, Dv), jnp.int32), r"v_t must be a floating-point array"),
    ],
)
def test_delta_rule_step_rejects(name, value, match):
    a = {"S": jnp.zeros((B, H, Dk, Dv)), "q_t": jnp.ones((B, H, Dk)), "k_t": jnp.ones((B, H, Dk)),
         "v_t": jnp.ones((B, H, Dv)), "beta_t": jnp.ones((B, H))}
    kw = {}
    if name in a:
        a[name] = value
    else:
        kw[name] = value
    with pytest.raises(ValueError, match=match):
        delta_rule_step(a["S"], a["q_t"], a["k_t"], a["v_t"], a["beta_t"], **kw)
