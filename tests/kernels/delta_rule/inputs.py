"""Deterministic delta-rule inputs shared by the op tests."""

from __future__ import annotations

import zlib

import jax
import jax.numpy as jnp

MODES = {  # mode -> (uses g, uses lam)
    "deltanet": (False, False),
    "gated_deltanet": (True, False),
    "qdelta": (False, True),
    "gated_qdelta": (True, True),
}


def seed_of(name: str) -> int:
    """A stable seed from a test id (tokamax: seed the RNG from the test name)."""
    return zlib.crc32(name.encode())


def make_inputs(mode, *, B=2, T=63, H=2, Dk=20, Dv=36, seed=0, dtype=jnp.float32,
                initial_state=True):
    """Inputs in the ranges the layer produces: unit q/k, β, λ ∈ (0, 1), g < 0."""
    use_g, use_lam = MODES[mode]
    ks = jax.random.split(jax.random.key(seed), 8)
    unit = lambda a: a / jnp.linalg.norm(a, axis=-1, keepdims=True)
    args = {
        "q": unit(jax.random.normal(ks[0], (B, T, H, Dk))),
        "k": unit(jax.random.normal(ks[1], (B, T, H, Dk))),
        "v": jax.random.normal(ks[2], (B, T, H, Dv)),
        "beta": jax.nn.sigmoid(jax.random.normal(ks[3], (B, T, H))),
        "g": jax.nn.log_sigmoid(jax.random.normal(ks[4], (B, T, H)) + 3.0) if use_g else None,
        "lam": jax.nn.sigmoid(jax.random.normal(ks[5], (B, T, H))) if use_lam else None,
        "initial_state": jax.random.normal(ks[6], (B, H, Dk, Dv)) if initial_state else None,
    }
    return {n: None if a is None else a.astype(dtype) for n, a in args.items()}


def cotangents(B, T, H, Dk, Dv, seed):
    k1, k2 = jax.random.split(jax.random.key(seed + 1))
    return jax.random.normal(k1, (B, T, H, Dv)), jax.random.normal(k2, (B, H, Dk, Dv))
