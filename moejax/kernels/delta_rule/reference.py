"""The delta-rule recurrence, token by token: the oracle every fast path is tested against.

DESIGN §3 "Recurrence", per batch b and head h, with state `S` of shape `[Dk, Dv]`:

    x_t = k_t + lam_t * q_t                  (x_t = k_t when lam is None: DeltaNet / GDN)
    S'  = exp(g_t) * diag(exp(gk_t)) S_{t-1} (g, gk: each 0 when None; gk is KDA's per-key-
                                              channel log decay [Dk], scaling row d of S)
    S_t = S' + beta_t * k_t (v_t - S'^T x_t)^T
    o_t = scale * S_t^T q_t                  (x_t uses the unscaled q)

Axis letters: B batch, T time, H heads, Dk key/query head dim, Dv value head dim.
Everything is computed in float32 (float64 for float64 inputs) with full-precision dots.
`g_t = −inf` is a full reset (`exp(g_t) S = 0`), `gk_t[d] = −inf` a reset of row d.

Packed sequences (`cu_seqlens`, B = 1): the sequences `[cu[n], cu[n+1])` run one after the
other in one row; at each start the state is set to that sequence's initial state (row n of
`initial_state` `[N, H, Dk, Dv]`, zeros when None) and at each end it is recorded, so the final
state is `[N, H, Dk, Dv]` and every sequence's outputs are those it has alone.

Non-finite inputs go through plain IEEE arithmetic: outputs stay causal (a NaN at step s
reaches no output before s, nor other sequences or heads), but the backward can form `0 · NaN`
at earlier steps of the same sequence and head; the chunkwise paths contain that
(`nonfinite.py`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array

_HIGHEST = jax.lax.Precision.HIGHEST


def compute_dtype(dtype):
    """float32 for half/single inputs, float64 for float64 inputs (used by gradient checks)."""
    return jnp.promote_types(dtype, jnp.float32)


def recurrent_step(S, q_t, k_t, v_t, beta_t, g_t=None, lam_t=None, gk_t=None, *, scale):
    """One step of the recurrence (all float32).

    Args:
      S: `[B, H, Dk, Dv]` state before the step.
      q_t, k_t: `[B, H, Dk]`.
      v_t: `[B, H, Dv]`.
      beta_t: `[B, H]` write strength.
      g_t: `[B, H]` log decay, or None (no decay).
      lam_t: `[B, H]` query mixing of Q-Delta, or None (x_t = k_t).
      gk_t: `[B, H, Dk]` per-key-channel log decay (KDA), or None.
      scale: readout scale.

    Returns:
      `(o_t [B, H, Dv], S_t [B, H, Dk, Dv])`.
    """
    x_t = k_t if lam_t is None else k_t + lam_t[..., None] * q_t
    if g_t is not None:
        S = jnp.exp(g_t)[..., None, None] * S
    if gk_t is not None:
        S = jnp.exp(gk_t)[..., None] * S
    pred = jnp.einsum("bhkv,bhk->bhv", S, x_t, precision=_HIGHEST)
    err = beta_t[..., None] * (v_t - pred)
    S = S + k_t[..., :, None] * err[..., None, :]
    o_t = scale * jnp.einsum("bhkv,bhk->bhv", S, q_t, precision=_HIGHEST)
    return o_t, S


def _scan_inputs(q, k, v, beta, g, lam, initial_state, gk=None):
    """The scans' inputs: `(xs, S0)`, the per-step arrays `(q, k, v, beta, g, lam, gk)` cast to
    the compute dtype and made time-major (None stays None), and the start state (zeros when
    None)."""
    f32 = lambda a: None if a is None else a.astype(compute_dtype(a.dtype))
    q, k, v, beta, g, lam, gk = map(f32, (q, k, v, beta, g, lam, gk))
    B, _, H, Dk = q.shape
    S0 = (jnp.zeros((B, H, Dk, v.shape[-1]), q.dtype) if initial_state is None
          else f32(initial_state))
    tm = lambda a: None if a is None else jnp.moveaxis(a, 1, 0)
    return tuple(map(tm, (q, k, v, beta, g, lam, gk))), S0


def sequence_index(cu_seqlens, T):
    """Per step of a packed row: `(seq [T] int32, start [T] bool, end [T] bool)`, the sequence
    each step belongs to and whether it is that sequence's first / last step."""
    cu = cu_seqlens.astype(jnp.int32)
    t = jnp.arange(T, dtype=jnp.int32)
    seq = jnp.searchsorted(cu[1:], t, side="right").astype(jnp.int32)
    return seq, t == cu[seq], t == cu[seq + 1] - 1


def delta_rule_reference(q, k, v, beta, g=None, lam=None, initial_state=None, gk=None,
                         cu_seqlens=None, *, scale):
    """`lax.scan` over time of `recurrent_step`.

    Args:
      q, k: `[B, T, H, Dk]`.
      v: `[B, T, H, Dv]`.
      beta: `[B, T, H]`.
      g: `[B, T, H]` log decays or None.
      lam: `[B, T, H]` Q-Delta query mixing or None.
      initial_state: `[B, H, Dk, Dv]` (`[N, H, Dk, Dv]` with cu_seqlens) or None (zeros).
      gk: `[B, T, H, Dk]` per-key-channel log decays or None.
      cu_seqlens: `[N + 1]` int sequence boundaries of a packed row (B = 1), or None.
      scale: readout scale.

    Returns:
      `(o [B, T, H, Dv] float32, S [B, H, Dk, Dv] float32)`; S is `[N, H, Dk, Dv]`, each
      sequence's final state, with cu_seqlens.
    """
    if cu_seqlens is not None:
        return _packed_reference(q, k, v, beta, g, lam, initial_state, gk, cu_seqlens,
                                 scale=scale)
    xs, S0 = _scan_inputs(q, k, v, beta, g, lam, initial_state, gk)

    def body(S, inp):
        o_t, S = recurrent_step(S, *inp, scale=scale)
        return S, o_t

    S, o = jax.lax.scan(body, S0, xs)
    return jnp.moveaxis(o, 0, 1), S


def _packed_reference(q, k, v, beta, g, lam, initial_state, gk, cu_seqlens, *, scale):
    """`delta_rule_reference` for a packed row (module docstring, "Packed sequences")."""
    N = cu_seqlens.shape[0] - 1
    _, T, H, Dk = q.shape
    Dv = v.shape[-1]
    xs, _ = _scan_inputs(q, k, v, beta, g, lam, None, gk)
    dt = xs[0].dtype
    h0 = (jnp.zeros((N, H, Dk, Dv), dt) if initial_state is None
          else initial_state.astype(compute_dtype(initial_state.dtype)))
    seq, start, end = sequence_index(cu_seqlens, T)

    def body(carry, inp):
        S, finals = carry
        n, first, last, step = inp
        S = jnp.where(first, h0[n][None], S)
        o_t, S = recurrent_step(S, *step, scale=scale)
        finals = finals.at[n].set(jnp.where(last, S[0], finals[n]))
        return (S, finals), o_t

    S0 = jnp.zeros((1, H, Dk, Dv), dt)
    (_, finals), o = jax.lax.scan(body, (S0, jnp.zeros_like(h0)), (seq, start, end, xs))
    return jnp.moveaxis(o, 0, 1), finals


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
    xs = (*xs[:6], jnp.arange(q.shape[1]) % chunk_size == 0)  # gk is None; chunk starts
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
