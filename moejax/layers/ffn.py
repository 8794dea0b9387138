"""Dense feed-forward block: SwiGLU `W_down (SiLU(W_gate x) ⊙ W_up x)` or GELU MLP.

Axis letters: d model width, f hidden width.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from moejax.validation import check_range

Array = jax.Array

ACTIVATIONS = ("swiglu", "gelu")


def init(key: Array, d_model: int, d_ff: int, activation: str = "swiglu", *,
         init_std: float | None = None) -> dict:
    """Params `w_up: [d, f]`, `w_down: [f, d]` (+ `w_gate: [d, f]` for SwiGLU).

    `init_std`: every matrix N(0, init_std²) (fla's `GatedMLP` under `_init_weights`, 0.02 in
    the Q-Delta authors' models; `LMConfig.init_std` passes it); None = fan-in init,
    N(0, 1/fan_in).
    """
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    if init_std is not None:
        check_range("init_std", init_std, 0.0, math.inf, hi_open=True)
    k1, k2, k3 = jax.random.split(key, 3)
    scale = lambda fan_in: fan_in**-0.5 if init_std is None else init_std
    p = {
        "w_up": jax.random.normal(k1, (d_model, d_ff), jnp.float32) * scale(d_model),
        "w_down": jax.random.normal(k2, (d_ff, d_model), jnp.float32) * scale(d_ff),
    }
    if activation == "swiglu":
        p["w_gate"] = jax.random.normal(k3, (d_model, d_ff), jnp.float32) * scale(d_model)
    return p


def apply(params: dict, x: Array) -> Array:
    """`x` `[..., d]` → `[..., d]` in x's dtype (SwiGLU when params hold `w_gate`)."""
    w = lambda name: params[name].astype(x.dtype)
    h = x @ w("w_up")
    h = jax.nn.silu(x @ w("w_gate")) * h if "w_gate" in params else jax.nn.gelu(h)
    return h @ w("w_down")
