"""Normalisation layers as pure functions over parameter pytrees."""

from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array


def rms_norm_init(dim: int, *, zero_centered: bool = False) -> dict:
    """Params `{"scale": [dim]}`: ones, or zeros when the scale is applied as `(1 + w)`."""
    fill = jnp.zeros if zero_centered else jnp.ones
    return {"scale": fill((dim,), jnp.float32)}


def rms_norm(params: dict, x: Array, *, eps: float = 1e-6, zero_centered: bool = False) -> Array:
    """`x / rms(x) · w` over the last axis, computed in float32, returned in x's dtype."""
    xf = x.astype(jnp.float32)
    y = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
    w = params["scale"] + 1.0 if zero_centered else params["scale"]
    return (y * w).astype(x.dtype)


GATE_ACTIVATIONS = {"silu": jax.nn.silu, "sigmoid": jax.nn.sigmoid}


def gated_rms_norm(params: dict, x: Array, gate: Array, *, eps: float = 1e-6,
                   activation: str = "silu") -> Array:
    """`RMSNorm(x) ⊙ act(gate)`, float32 inside: SiLU is the Gated DeltaNet output norm, sigmoid
    Kimi Linear's (KDA)."""
    y = rms_norm(params, x.astype(jnp.float32), eps=eps)
    return (y * GATE_ACTIVATIONS[activation](gate.astype(jnp.float32))).astype(x.dtype)


def l2_normalize(x: Array, *, eps: float = 1e-6) -> Array:
    """`x / ‖x‖₂` over the last axis (float32 inside)."""
    xf = x.astype(jnp.float32)
    return (xf * jax.lax.rsqrt(jnp.sum(xf * xf, axis=-1, keepdims=True) + eps)).astype(x.dtype)
