"""The delta-rule recurrence, token by token: the oracle every fast path is tested against.

DESIGN §3 "Recurrence", per batch b and head h, with state `S` of shape `[Dk, Dv]`:

    x_t = k_t + lam_t * q_t                  (x_t = k_t when lam is None: DeltaNet / GDN)
    S'  = exp(g_t) * S_{t-1}                 (S' = S_{t-1} when g is None)
    S_t = S' + beta_t * k_t (v_t - S'^T x_t)^T
    o_t = scale * S_t^T q_t                  (x_t uses the unscaled q)

Axis letters: B batch, T time, H heads, Dk key/query head dim, Dv value head dim.
Everything is computed in float32 (float64 for float64 inputs) with full-precision dots.
`g_t = −inf` is a full reset (`exp(g_t) S = 0`). Non-finite inputs go through plain IEEE
arithmetic: outputs stay causal (a NaN at step s reaches no output before s, nor other
sequences or heads), but the backward can form `0 · NaN` at earlier steps of the same
sequence and head; the chunkwise paths contain that (`nonfinite.py`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array

_HIGHEST = jax.lax.Precision.HIGHEST


def compute_dtype(dtype):
    """float32 for half/single inputs, float64 for float64 inputs (used by gradient checks)."""
    return jnp.promote_types(dtype, jnp.float32)


def recurrent_step(S, q_t, k_t, v_t, beta_t, g_t=None, lam_t=None, *, scale):
    """One step of the recurrence (all float32).

    Args:
      S: `[B, H, Dk, Dv]` state before the step.
      q_t, k_t: `[B, H, Dk]`.
      v_t: `[B, H, Dv]`.
      beta_t: `[B, H]` write strength.
      g_t: `[B, H]` log decay, or None (no decay).
      lam_t: `[B, H]` query mixing of Q-Delta, or None (x_t = k_t).
      scale: readout scale.

    Returns:
      `(o_t [B, H, Dv], S_t [B, H, Dk, Dv])`.
    """
    x_t = k_t if lam_t is None else k_t + lam_t[..., None] * q_t
    if g_t is not None:
        S = jnp.exp(g_t)[..., None, None] * S
    pred = jnp.einsum("bhkv,bhk->bhv", S, x_t, precision=_HIGHEST)
    err = beta_t[..., None] * (v_t - pred)
    S = S + k_t[..., :, None] * err[..., None, :]
    o_t = scale * jnp.einsum("bhkv,bhk->bhv", S, q_t, precision=_HIGHEST)
    return o_t, S


def delta_rule_reference(q, k, v, beta, g=None, lam=None, initial_state=None, *, scale):
    """`lax.scan` over time of `recurrent_step`.

    Args:
      q, k: `[B, T, H, Dk]`.
      v: `[B, T, H, Dv]`.
      beta: `[B, T, H]`.
      g: `[B, T, H]` log decays or None.
      lam: `[B, T, H]` Q-Delta query mixing or None.
      initial_state: `[B, H, Dk, Dv]` or None (zeros).
      scale: readout scale.

    Returns:
      `(o [B, T, H, Dv] float32, S [B, H, Dk, Dv] float32)`.
    """
    f32 = lambda a: None if a is None else a.astype(compute_dtype(a.dtype))
    q, k, v, beta, g, lam = map(f32, (q, k, v, beta, g, lam))
    B, _, H, Dk = q.shape
    Dv = v.shape[-1]
    S0 = jnp.zeros((B, H, Dk, Dv), q.dtype) if initial_state is None else f32(initial_state)

    # Time-major for the scan.
    tm = lambda a: None if a is None else jnp.moveaxis(a, 1, 0)
    xs = (tm(q), tm(k), tm(v), tm(beta), tm(g), tm(lam))

    def body(S, inp):
        q_t, k_t, v_t, b_t, g_t, l_t = inp
        o_t, S = recurrent_step(S, q_t, k_t, v_t, b_t, g_t, l_t, scale=scale)
        return S, o_t

    S, o = jax.lax.scan(body, S0, xs)
    return jnp.moveaxis(o, 0, 1), S
