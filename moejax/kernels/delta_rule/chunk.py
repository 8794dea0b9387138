"""Chunkwise-parallel delta rule in plain jnp (DESIGN §3 "Chunkwise form").

Within a chunk of C steps with start state `S0`, `G_t = Σ_{s≤t} g_s`, `γ_t = exp(G_t)` and
`Γ_tj = exp(G_t − G_j)` for j ≤ t (computed in log space, masked before the exp):

    A  = strict_tril( diag(β) (X Kᵀ ⊙ Γ) )        A_tj = β_t (x_t·k_j) Γ_tj, j < t
    W  = (I + A)⁻¹ diag(βγ) X,   Ũ = (I + A)⁻¹ diag(β) V,   U = Ũ − W S0
    O  = scale · ( diag(γ) Q S0 + (Q Kᵀ ⊙ Γ ⊙ tril_incl) U )
    S_C = γ_C S0 + (K ⊙ (γ_C/γ))ᵀ U

`(I + A)⁻¹` is formed by forward substitution (`unit_lower_inverse`). Everything that
does not depend on the state is computed for all chunks at once; only the three state products
run in a `lax.scan` over chunks, so autodiff keeps one `[Dk, Dv]` state per *chunk*, never one
per time step. T is zero-padded to a multiple of C with β = 0 and g = 0 on the padding: those
steps leave the state untouched, so results do not depend on the chunk size.

Full resets. A step with `exp(g_s) = 0` (g = −inf, or so negative that the exp underflows, as
in the recurrence) zeroes the state. `G_t − G_j` would then be `−inf − (−inf) = NaN`, so the
log decays are split: `G` sums only the other steps' g, and a count of resets masks (with
`where`, before the exp) every factor whose span contains one: `Γ_tj = 0` if a reset lies in
(j, t], `γ_t = 0` if one lies in [0, t], `exp(G_C − G_t) = 0` if one lies in (t, C−1]. Results
equal the recurrence's, gradients included.

Non-finite inputs. All masks are `where`s, never multiplications; the products of the chunk
would still carry a NaN at step s into rows t < s (`0 · NaN`), so `delta_rule_chunk` runs the
math under `nonfinite.contain`: outputs before s, other sequences and heads, and their
gradients are unaffected; outputs from s on are NaN.

The authors' pairing (`pairing="authors"`, a compatibility option; DESIGN §3). The released
Q-Delta chunk kernel (psmiz/Q-Delta, `qdelta/qdelta_rule/chunk.py`: `chunk_scaled_dot_kxt_fwd`,
`solve_tril`, `recompute_w_u_fwd`, `chunk_gated_delta_rule_fwd_h`, `chunk_fwd_o`, with C = 64
hard-coded) computes, per chunk of 64 steps counted from the call's first step, with `G` the
chunk-local cumsum of g and `x_t = k_t + λ_t q_t` (unscaled q):

    A_tj = β_t (k_t·x_j) exp(G_t − G_j), j < t    chunk_scaled_dot_kxt: the row's k, the column's x
    Ai   = (I + A)⁻¹                               solve_tril
    W    = Ai diag(β exp(G)) X,  Ũ = Ai diag(β) V  recompute_w_u: x (not k) in W, v in Ũ
    U    = Ũ − W S0                                chunk_delta_h: the start state read with W
    S_C  = exp(G_C) S0 + Kᵀ diag(exp(G_C − G)) U   chunk_delta_h: k writes
    O    = scale (diag(exp G) Q S0 + (Q Kᵀ ⊙ Γ ⊙ tril_incl) U)   chunk_o: q reads k

Everything but A is the recurrence's chunk form above; A pairs the row's k with the column's x
where the recurrence needs the row's x and the column's k. In token form (what
`reference.delta_rule_authors_scan` runs, with no matrix inverse):
`u_t = β_t (v_t − (γ_t S0)ᵀ x_t − Σ_{j<t, same chunk} Γ_tj (k_t·x_j) u_j)`,
`S_t = exp(g_t) S_{t−1} + k_t u_tᵀ`, `o_t = scale · S_tᵀ q_t`: the chunk's start state is read
with x_t, as in the recurrence, but the writes made earlier in the same chunk are read with k_t
against x-keys. At C = 1 it is the recurrence; for C > 1 the output depends on C and on where
the chunks start, so the option runs C = 64 only (a call of T ≤ 64 steps is one chunk; a
single-step call is the recurrence step). Without λ (x = k) A is the same matrix in both
pairings, and λ = None runs the recurrence's code. Gradients are those of this forward (its A
part in the released backward, `prepare_wy_repr_bwd`, is the same derivative).

Axis letters: B batch, T time, H heads, Dk/Dv head dims, N number of chunks, C chunk length.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from moejax.kernels.delta_rule.nonfinite import contain
from moejax.kernels.delta_rule.reference import compute_dtype

Array = jax.Array

_HIGHEST = jax.lax.Precision.HIGHEST


def _mm(spec, a, b):
    return jnp.einsum(spec, a, b, precision=_HIGHEST)


def _to_chunks(a, C):
    """`[B, T, H, ...]` (T a multiple of C) → `[N, B, H, C, ...]`."""
    B, T, H = a.shape[:3]
    a = a.reshape(B, T // C, C, H, *a.shape[3:])
    return jnp.moveaxis(jnp.moveaxis(a, 1, 0), 2, 3)


def _from_chunks(a):
    """`[N, B, H, C, D]` → `[B, N·C, H, D]`."""
    N, B, H, C, D = a.shape
    return jnp.moveaxis(a, 0, 1).transpose(0, 1, 3, 2, 4).reshape(B, N * C, H, D)


@jax.custom_vjp
def unit_lower_inverse(A):
    """`(I + A)⁻¹` for strictly lower-triangular `A` `[..., C, C]`, by forward substitution.

    Row by row, `T_i = e_i − Σ_{j<i} A_ij T_j`: C sequential steps, each a batched vector-matrix
    product (XLA:CPU's batched triangular solve is far slower at these sizes). The VJP is written
    out — `dA = −strict_tril(Tᵀ dT Tᵀ)` — so autodiff does not store the C intermediate matrices.
    """
    C = A.shape[-1]
    eye = jnp.broadcast_to(jnp.eye(C, dtype=A.dtype), A.shape)

    def row(i, T):
        a_i = jax.lax.dynamic_index_in_dim(A, i, axis=-2, keepdims=False)  # [..., C]
        e_i = jax.lax.dynamic_index_in_dim(eye, i, axis=-2, keepdims=False)
        t_i = e_i - _mm("...j,...jc->...c", a_i, T)  # rows j >= i of T are still zero
        return jax.lax.dynamic_update_index_in_dim(T, t_i, i, axis=-2)

    return jax.lax.fori_loop(0, C, row, jnp.zeros_like(A))


def _unit_lower_inverse_fwd(A):
    T = unit_lower_inverse(A)
    return T, T


def _unit_lower_inverse_bwd(T, dT):
    C = T.shape[-1]
    dA = -_mm("...ji,...jk->...ik", T, _mm("...jk,...lk->...jl", dT, T))
    return (jnp.where(jnp.tril(jnp.ones((C, C), jnp.bool_), -1), dA, 0.0),)


unit_lower_inverse.defvjp(_unit_lower_inverse_fwd, _unit_lower_inverse_bwd)


def _gates(g, C):
    """Decay factors of every chunk from the log decays `g` `[N, B, H, C]`, resets included.

    Returns `(Γ [N, B, H, C, C] (0 above the diagonal), γ [N, B, H, C], exp(G_C − G_t)
    [N, B, H, C])` (module docstring, "Full resets").
    """
    idx = jnp.arange(C)
    incl = idx[:, None] >= idx[None, :]
    reset = jnp.exp(g) == 0  # the step zeroes the state, as exp(g) · S does in the recurrence
    G = jnp.cumsum(jnp.where(reset, 0.0, g), axis=-1)  # finite: resets taken out
    n = jnp.cumsum(reset, axis=-1, dtype=jnp.int32)  # resets in [0, t]
    keep = incl & (n[..., :, None] == n[..., None, :])  # j <= t, no reset in (j, t]
    diff = jnp.where(keep, G[..., :, None] - G[..., None, :], 0.0)
    Gam = jnp.where(keep, jnp.exp(diff), 0.0)
    gamma = jnp.where(n == 0, jnp.exp(G), 0.0)
    decay_out = jnp.where(n == n[..., -1:], jnp.exp(G[..., -1:] - G), 0.0)
    return Gam, gamma, decay_out


# How A pairs the chunk's keys (module docstring): the default, and the released kernel's.
PAIRINGS = ("recurrence", "authors")
AUTHORS_CHUNK = 64  # the released Q-Delta kernel's fixed chunk length


def check_pairing(pairing, chunk_size) -> None:
    """`ValueError` unless `pairing` is one of `PAIRINGS`, and unless `chunk_size` is 64 with
    `pairing="authors"` (the only chunk length the released kernel runs)."""
    if not isinstance(pairing, str) or pairing not in PAIRINGS:
        raise ValueError(f"pairing must be one of {PAIRINGS}, got {pairing!r}")
    if pairing == "authors" and chunk_size != AUTHORS_CHUNK:
        raise ValueError(
            f"chunk_size must be {AUTHORS_CHUNK} with pairing='authors' (the released Q-Delta "
            f"kernel's chunk length; its output depends on it), got {chunk_size!r}")


def delta_rule_chunk(q, k, v, beta, g=None, lam=None, initial_state=None, *, scale, chunk_size,
                     pairing="recurrence"):
    """Chunkwise delta rule; same contract as `reference.delta_rule_reference`.

    Non-finite inputs are contained (`nonfinite.contain`): a NaN/±inf at step s of a sequence
    and head leaves its outputs before s, everything of other sequences and heads, and their
    gradients as they are without it; g = −inf is a full reset, as in the recurrence.

    Args:
      q, k: `[B, T, H, Dk]`.
      v: `[B, T, H, Dv]`.
      beta: `[B, T, H]`.
      g: `[B, T, H]` log decays or None.
      lam: `[B, T, H]` Q-Delta query mixing or None.
      initial_state: `[B, H, Dk, Dv]` or None (zeros).
      scale: readout scale.
      chunk_size: C, any positive int (64 with `pairing="authors"`).
      pairing: "recurrence" (default: the recurrence, whatever C) or "authors" (the released
        Q-Delta kernel's `A_tj = β_t k_t·x_j`, module docstring; C = 64, results depend on it).

    Returns:
      `(o [B, T, H, Dv] float32, S [B, H, Dk, Dv] float32)`.

    Raises:
      ValueError: an unknown pairing, or `pairing="authors"` with chunk_size other than 64.
    """
    check_pairing(pairing, chunk_size)
    return contain(_delta_rule_chunk, q, k, v, beta, g, lam, initial_state, scale=scale,
                   chunk_size=chunk_size, authors=pairing == "authors" and lam is not None)


def _delta_rule_chunk(q, k, v, beta, g, lam, initial_state, *, scale, chunk_size, authors):
    """`delta_rule_chunk` on finite inputs (g may be −inf)."""
    f32 = lambda a: None if a is None else a.astype(compute_dtype(a.dtype))
    q, k, v, beta, g, lam = map(f32, (q, k, v, beta, g, lam))
    B, T, H, Dk = q.shape
    Dv = v.shape[-1]
    C = min(chunk_size, T)  # one chunk of T ≤ C steps is the same as one padded to C
    pad = -T % C
    if pad:
        widths = lambda a: [(0, 0), (0, pad)] + [(0, 0)] * (a.ndim - 2)
        pad_t = lambda a: None if a is None else jnp.pad(a, widths(a))
        q, k, v, beta, g, lam = map(pad_t, (q, k, v, beta, g, lam))

    x = k if lam is None else k + lam[..., None] * q
    Q, K, X, V = (_to_chunks(a, C) for a in (q, k, x, v))  # [N, B, H, C, D]
    b = _to_chunks(beta, C)  # [N, B, H, C]

    incl = jnp.tril(jnp.ones((C, C), jnp.bool_))
    strict = jnp.tril(jnp.ones((C, C), jnp.bool_), -1)
    if g is None:
        Gam = gamma = gamma_C = decay_out = None
    else:
        Gam, gamma, decay_out = _gates(_to_chunks(g, C), C)  # [N, B, H, C(, C)]
        gamma_C = gamma[..., -1]
    decayed = lambda M: M if Gam is None else M * Gam

    # Masks are `where`s: a masked entry is 0 whatever the product held. A_tj pairs x_t with
    # k_j (the recurrence) or, with the authors' pairing, k_t with x_j.
    M = _mm("...tk,...jk->...tj", K, X) if authors else _mm("...tk,...jk->...tj", X, K)
    A = jnp.where(strict, b[..., :, None] * decayed(M), 0.0)
    wb = b if gamma is None else b * gamma
    Tm = unit_lower_inverse(A)
    W = _mm("...tj,...jk->...tk", Tm, wb[..., None] * X)
    Ut = _mm("...tj,...jv->...tv", Tm, b[..., None] * V)
    P = jnp.where(incl, decayed(_mm("...tk,...jk->...tj", Q, K)), 0.0)
    Qd = Q if gamma is None else gamma[..., None] * Q
    Kd = K if decay_out is None else decay_out[..., None] * K

    S0 = jnp.zeros((B, H, Dk, Dv), q.dtype) if initial_state is None else f32(initial_state)

    def body(S, xs):
        W_c, Ut_c, P_c, Qd_c, Kd_c, gC = xs
        U = Ut_c - _mm("bhck,bhkv->bhcv", W_c, S)
        O = scale * (_mm("bhck,bhkv->bhcv", Qd_c, S) + _mm("bhct,bhtv->bhcv", P_c, U))
        S = S if gC is None else gC[..., None, None] * S
        S = S + _mm("bhck,bhcv->bhkv", Kd_c, U)
        return S, O

    S, O = jax.lax.scan(body, S0, (W, Ut, P, Qd, Kd, gamma_C))
    return _from_chunks(O)[:, :T], S
