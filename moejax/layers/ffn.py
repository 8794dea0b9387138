"""Dense feed-forward block: SwiGLU `W_down (SiLU(W_gate x) ⊙ W_up x)` or GELU MLP.

Axis letters: d model width, f hidden width.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array

ACTIVATIONS = ("swiglu", "gelu")


def init(key: Array, d_model: int, d_ff: int, activation: str = "swiglu") -> dict:
    """Params `w_up: [d, f]`, `w_down: [f, d]` (+ `w_gate: [d, f]` for SwiGLU), fan-in init."""
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    k1, k2, k3 = jax.random.split(key, 3)
    p = {
        "w_up": jax.random.normal(k1, (d_model, d_ff), jnp.float32) * d_model**-0.5,
        "w_down": jax.random.normal(k2, (d_ff, d_model), jnp.float32) * d_ff**-0.5,
    }
    if activation == "swiglu":
        p["w_gate"] = jax.random.normal(k3, (d_model, d_ff), jnp.float32) * d_model**-0.5
    return p


def apply(params: dict, x: Array) -> Array:
    """`x` `[..., d]` → `[..., d]` in x's dtype (SwiGLU when params hold `w_gate`)."""
    w = lambda name: params[name].astype(x.dtype)
    h = x @ w("w_up")
    h = jax.nn.silu(x @ w("w_gate")) * h if "w_gate" in params else jax.nn.gelu(h)
    return h @ w("w_down")
