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


def _scan_inputs(q, k, v, beta, g, lam, initial_state):
    """The scans' inputs: `(xs, S0)`, the per-step arrays cast to the compute dtype and made
    time-major (None stays None), and the start state (zeros when None)."""
    f32 = lambda a: None if a is None else a.astype(compute_dtype(a.dtype))
    q, k, v, beta, g, lam = map(f32, (q, k, v, beta, g, lam))
    B, _, H, Dk = q.shape
    S0 = (jnp.zeros((B, H, Dk, v.shape[-1]), q.dtype) if initial_state is None
          else f32(initial_state))
    tm = lambda a: None if a is None else jnp.moveaxis(a, 1, 0)
    return tuple(map(tm, (q, k, v, beta, g, lam))), S0


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
    xs, S0 = _scan_inputs(q, k, v, beta, g, lam, initial_state)

    def body(S, inp):
        q_t, k_t, v_t, b_t, g_t, l_t = inp
        o_t, S = recurrent_step(S, q_t, k_t, v_t, b_t, g_t, l_t, scale=scale)
        return S, o_t

    S, o = jax.lax.scan(body, S0, xs)
    return jnp.moveaxis(o, 0, 1), S


def delta_rule_authors_scan(q, k, v, beta, g=None, lam=None, initial_state=None, *, scale,
                            chunk_size=64):
    """The released Q-Delta chunk kernel's output (`pairing="authors"`), token by token.

    That kernel is not the recurrence (`chunk.py`, "The authors' pairing"): within each chunk of
    `chunk_size` steps (from step 0 of the call) the writes made earlier in the chunk are read
    with k_t against x-keys. Per batch and head, with the state S, the decayed chunk-start
    state P and a chunk-local memory R `[Dk, Dv]` keyed by x (P = S and R = 0 at a chunk start):

        S' = exp(g_t) S,   P' = exp(g_t) P,   R' = exp(g_t) R
        u_t = beta_t (v_t − P'ᵀ x_t − R'ᵀ k_t)
        S_t = S' + k_t u_tᵀ,   P_t = P',   R_t = R' + x_t u_tᵀ,   o_t = scale · S_tᵀ q_t

    Sequential and free of matrix inverses: the tests' check on the chunk path and the
    kernels, and what `impl="reference"` runs with `pairing="authors"`. Without lam (x = k)
    `R'ᵀ k_t = (S' − P')ᵀ x_t`, so this is the recurrence; `chunk_size=1` is too.

    Args and returns: as `delta_rule_reference`; `chunk_size` the released kernel's 64.
    """
    xs, S0 = _scan_inputs(q, k, v, beta, g, lam, initial_state)
    xs = (*xs, jnp.arange(q.shape[1]) % chunk_size == 0)  # chunk starts
    mv = lambda M, a: jnp.einsum("bhkv,bhk->bhv", M, a, precision=_HIGHEST)

    def body(carry, inp):
        S, P, R = carry
        q_t, k_t, v_t, b_t, g_t, l_t, start_t = inp
        P = jnp.where(start_t, S, P)
        R = jnp.where(start_t, jnp.zeros_like(R), R)
        if g_t is not None:
            d = jnp.exp(g_t)[..., None, None]
            S, P, R = d * S, d * P, d * R
        x_t = k_t if l_t is None else k_t + l_t[..., None] * q_t
        u = b_t[..., None] * (v_t - mv(P, x_t) - mv(R, k_t))
        S = S + k_t[..., :, None] * u[..., None, :]
        R = R + x_t[..., :, None] * u[..., None, :]
        return (S, P, R), scale * mv(S, q_t)

    (S, _, _), o = jax.lax.scan(body, (S0, S0, jnp.zeros_like(S0)), xs)
    return jnp.moveaxis(o, 0, 1), S
