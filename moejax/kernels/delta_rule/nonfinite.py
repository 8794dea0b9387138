"""Containment of non-finite inputs for the chunkwise paths (jnp chunk path and Pallas kernels).

Why: a chunkwise algorithm mixes the steps of a chunk through matrix products. Row t of
`Tm (diag(β) V)` or of `P U` is a sum over *every* step of the chunk, and the coefficients of the
later steps are zeros that still multiply their values, so one NaN or ±inf at step s
(`0 · NaN = NaN`, `0 · inf = NaN`) would reach the outputs of the earlier steps t < s of its chunk,
and, through their gradients, every earlier position. The recurrence never does that.

`contain` makes a chunkwise implementation as causal as the recurrence, per sequence b and head h:

1. Every non-finite entry of q, k, v, β, λ and the initial state, and every NaN or +inf of g, is
   replaced by 0 before the chunk math runs, so nothing non-finite reaches a product. (g = −inf
   is a valid input, a full reset of the state, and is kept; the chunk math handles it.)
2. The steps that held such a value are flagged and the outputs poisoned afterwards with NaN:
   a bad k, v, β or g at step s (or a bad q or λ at s when λ mixes q into the key,
   x = k + λ q) corrupts the state from s on, so o_t for every t ≥ s and the final state become
   NaN; a bad q alone (DeltaNet, Gated DeltaNet: q only reads the state) makes only o_s NaN; a
   non-finite initial state makes every output and the final state of that (b, h) NaN.

So outputs at t < s, all outputs and final states of other sequences and heads, and the
gradients of a loss on them are what they are without the bad value; outputs at steps
≥ s are NaN in every channel (the recurrence is non-finite there too, possibly in fewer
channels). Overflow *inside* the computation from finite inputs is not covered.
The cost is a few elementwise passes over the inputs and a cumulative OR of a `[B, T, H]` mask.

Axis letters: B batch, T time, H heads, Dk/Dv head dims.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from moejax.kernels.delta_rule.reference import sequence_index

Array = jax.Array


def _clean(a, ok):
    return jnp.where(ok, a, jnp.zeros((), a.dtype))


def contain(fn: Callable, q, k, v, beta, g, lam, initial_state, *args, gk=None,
            cu_seqlens=None, **kwargs):
    """`fn(q, k, v, beta, g, lam, initial_state, *args, **kwargs)` with non-finite inputs
    contained (module docstring): fn sees only finite values (and g = −inf), and its outputs
    are NaN on every row (step) that the bad values reach in the recurrence.

    Args:
      fn: a delta-rule implementation returning `(o [B, T, H, Dv], S [B, H, Dk, Dv])`.
      q, k: `[B, T, H, Dk]`; v: `[B, T, H, Dv]`; beta: `[B, T, H]`.
      g, lam: `[B, T, H]` or None.
      initial_state: `[B, H, Dk, Dv]` (`[N, H, Dk, Dv]` with cu_seqlens) or None.
      *args, **kwargs: passed on to fn.
      gk: `[B, T, H, Dk]` per-channel log decays or None (like g: NaN and +inf are bad, −inf
        a reset); passed on to fn by name when given.
      cu_seqlens: `[N + 1]` packed-sequence boundaries (B = 1) or None: the poisoning then
        stops at each sequence's end; passed on to fn by name when given.

    Returns:
      fn's `(o, S)` with the poisoned rows of o and states of S set to NaN.
    """
    fin = jnp.isfinite
    q_ok, k_ok, v_ok, b_ok = fin(q), fin(k), fin(v), fin(beta)
    read_bad = ~jnp.all(q_ok, axis=-1)  # [B, T, H]
    write_bad = ~(jnp.all(k_ok, axis=-1) & jnp.all(v_ok, axis=-1) & b_ok)
    q, k, v, beta = _clean(q, q_ok), _clean(k, k_ok), _clean(v, v_ok), _clean(beta, b_ok)
    if g is not None:
        g_ok = g < jnp.inf  # False for NaN and +inf; −inf (a full reset) is kept
        write_bad = write_bad | ~g_ok
        g = _clean(g, g_ok)
    if gk is not None:
        gk_ok = gk < jnp.inf
        write_bad = write_bad | ~jnp.all(gk_ok, axis=-1)
        gk = _clean(gk, gk_ok)
        kwargs["gk"] = gk
    if lam is not None:
        l_ok = fin(lam)
        write_bad = write_bad | read_bad | ~l_ok  # x = k + λ q carries q into the state
        lam = _clean(lam, l_ok)
    count = jnp.cumsum(write_bad, axis=1, dtype=jnp.int32)  # [B, T, H]
    if cu_seqlens is None:
        poisoned = count > 0
        last = poisoned[:, -1]  # [B, H]: the final state's
    else:  # count each sequence's bad steps from its own start
        kwargs["cu_seqlens"] = cu_seqlens
        seq, _, _ = sequence_index(cu_seqlens, q.shape[1])
        starts = cu_seqlens.astype(jnp.int32)[seq]
        poisoned = count - (count - write_bad)[:, starts] > 0
        last = poisoned[0, cu_seqlens[1:] - 1]  # [N, H]
    if initial_state is not None:
        s_ok = fin(initial_state)
        bad_start = ~jnp.all(s_ok, axis=(-2, -1))  # [B or N, H]
        poisoned = poisoned | (bad_start[:, None, :] if cu_seqlens is None
                               else bad_start[seq][None])
        last = last | bad_start
        initial_state = _clean(initial_state, s_ok)
    o, S = fn(q, k, v, beta, g, lam, initial_state, *args, **kwargs)
    o = jnp.where((poisoned | read_bad)[..., None], jnp.asarray(jnp.nan, o.dtype), o)
    S = jnp.where(last[..., None, None], jnp.asarray(jnp.nan, S.dtype), S)
    return o, S
