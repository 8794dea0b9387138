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

Per-channel decay (`gk`, KDA). With `gk_t ∈ R^{Dk}` the decay scales row d of the state by
`exp(gk_td)` (the scalar g, if also given, is added to every channel). `γ`, `exp(G_C − G_t)`
become per-channel vectors, and the pair factors per-channel: `A_tj = β_t Σ_d x_td k_jd
exp(G_td − G_jd)` and `P_tj = Σ_d q_td k_jd exp(G_td − G_jd)`, no longer a matrix product times
a `[C, C]` mask. They are formed exactly in log space by a binary split of the chunk (C padded
to a power of two with zero rows and columns): a block of 2h steps is split at r, the last step
of its first half, and every pair of a second-half row t and a first-half column j is
`exp(G_t − G_r) · exp(G_r − G_j)`, a row factor times a column factor, so the block's pairs are
one matrix product `[h, Dk] × [Dk, h]`; the halves are split in turn, down to h = 1, and the
diagonal is `Σ_d q_td k_td` (or x). Each level costs `[C/2, Dk]` factors and one batched
product; A and P share the column factors. With gk ≤ 0 every factor is ≤ 1: nothing overflows,
and a factor underflows only where the product does. Resets (`gk_td = −inf`) are counted per
channel as above. The VJP is written out: per level `dR = row ⊙ (dM Kl)`, `dK = col ⊙ (dMᵀ Rr)`,
and, as `∂M_tj/∂G_sd = R_td k_jd e_tjd (δ_ts − δ_js)`, `dG = Σ_R R ⊙ dR − k ⊙ dK` (no
derivative of an exp is formed). Results do not depend on C.

Packed sequences (`cu_seqlens`, B = 1). Each sequence is moved to start on a chunk boundary
(a static bound of `(T + N(C − 1)) / C` chunks holds them all; the gaps are padding with β = 0,
which leaves the state as it is). The scan over chunks then sets the state to the sequence's
initial state at its first chunk and records it after its last one; the outputs are gathered
back to the packed positions. So every sequence gets exactly its result alone, for any C.

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

from moejax.kernels.delta_rule import packing
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


def check_authors_options(pairing, lam, gk, cu_seqlens) -> None:
    """`ValueError` for `pairing="authors"` (with a λ, where it differs from the recurrence)
    together with gk or cu_seqlens, which the released kernel does not have."""
    if pairing == "authors" and lam is not None and (gk is not None or cu_seqlens is not None):
        raise ValueError("pairing='authors' (the released Q-Delta kernel) has no per-channel "
                         "decay gk nor packed sequences cu_seqlens; use pairing='recurrence'")


def delta_rule_chunk(q, k, v, beta, g=None, lam=None, initial_state=None, gk=None,
                     cu_seqlens=None, *, scale, chunk_size, pairing="recurrence"):
    """Chunkwise delta rule; same contract as `reference.delta_rule_reference`.

    Non-finite inputs are contained (`nonfinite.contain`): a NaN/±inf at step s of a sequence
    and head leaves its outputs before s, everything of other sequences and heads, and their
    gradients as they are without it; g = −inf (or gk = −inf in a channel) is a reset, as in
    the recurrence.

    Args:
      q, k: `[B, T, H, Dk]`.
      v: `[B, T, H, Dv]`.
      beta: `[B, T, H]`.
      g: `[B, T, H]` log decays or None.
      lam: `[B, T, H]` Q-Delta query mixing or None.
      initial_state: `[B, H, Dk, Dv]` (`[N, H, Dk, Dv]` with cu_seqlens) or None (zeros).
      gk: `[B, T, H, Dk]` per-key-channel log decays (module docstring) or None.
      cu_seqlens: `[N + 1]` int boundaries of packed sequences in a row of B = 1, or None.
      scale: readout scale.
      chunk_size: C, any positive int (64 with `pairing="authors"`).
      pairing: "recurrence" (default: the recurrence, whatever C) or "authors" (the released
        Q-Delta kernel's `A_tj = β_t k_t·x_j`, module docstring; C = 64, results depend on it;
        not with gk or cu_seqlens).

    Returns:
      `(o [B, T, H, Dv] float32, S [B, H, Dk, Dv] float32)`; S is `[N, H, Dk, Dv]` with
      cu_seqlens.

    Raises:
      ValueError: an unknown pairing, or `pairing="authors"` with chunk_size other than 64, or
        with gk or cu_seqlens.
    """
    check_pairing(pairing, chunk_size)
    check_authors_options(pairing, lam, gk, cu_seqlens)
    authors = pairing == "authors" and lam is not None
    return contain(_delta_rule_chunk, q, k, v, beta, g, lam, initial_state, gk=gk,
                   cu_seqlens=cu_seqlens, scale=scale, chunk_size=chunk_size, authors=authors)


def _delta_rule_chunk(q, k, v, beta, g, lam, initial_state, *, scale, chunk_size, authors,
                      gk=None, cu_seqlens=None):
    """`delta_rule_chunk` on finite inputs (g, gk may be −inf)."""
    f32 = lambda a: None if a is None else a.astype(compute_dtype(a.dtype))
    steps = tuple(map(f32, (q, k, v, beta, g, lam, gk)))
    initial_state = f32(initial_state)
    B, T, H, Dk = q.shape
    Dv = v.shape[-1]
    C = min(chunk_size, T)  # one chunk of T ≤ C steps is the same as one padded to C
    if cu_seqlens is None:
        pad = -T % C
        if pad:
            widths = lambda a: [(0, 0), (0, pad)] + [(0, 0)] * (a.ndim - 2)
            steps = tuple(None if a is None else jnp.pad(a, widths(a)) for a in steps)
        S0 = (jnp.zeros((B, H, Dk, Dv), steps[0].dtype) if initial_state is None
              else initial_state)
        O, S, _ = _chunk_scan(*steps, S0, scale=scale, C=C, authors=authors)
        return O[:, :T], S
    return _packed_chunk(steps, initial_state, cu_seqlens, scale=scale, C=C)


def _packed_chunk(steps, initial_state, cu_seqlens, *, scale, C):
    """`_delta_rule_chunk` for packed sequences (module docstring, "Packed sequences")."""
    q, v = steps[0], steps[2]
    _, T, H, Dk = q.shape
    Dv = v.shape[-1]
    N = cu_seqlens.shape[0] - 1
    lay = packing.layout(cu_seqlens, T, C)
    steps = tuple(packing.spread(a, lay, C) for a in steps)
    h0 = (jnp.zeros((N, H, Dk, Dv), q.dtype) if initial_state is None else initial_state)
    S0 = jnp.zeros((1, H, Dk, Dv), q.dtype)
    O, _, ends = _chunk_scan(*steps, S0, scale=scale, C=C, authors=False,
                             restart=(lay.restart, h0[lay.chunk_seq][:, None]))
    return O[:, lay.pos], ends[lay.last, 0]


def _channel_gates(gk):
    """Per-channel log decays of every chunk, resets taken out: `(G [..., C, Dk]` the cumsum of
    the finite steps, `n [..., C, Dk]` the count of resets in [0, t]); `exp(G_t − G_j)` is the
    decay over (j, t] where `n_t == n_j`, else 0."""
    C = gk.shape[-2]
    reset = jnp.exp(gk) == 0
    # Sums over time as batched products with a lower-triangular ones matrix: XLA:CPU runs a
    # cumsum along the second-to-last axis transposed and repeats that transpose in every
    # consumer (and a product with an unbatched matrix transposes its result).
    tril = jnp.broadcast_to(jnp.tril(jnp.ones((C, C), gk.dtype)), gk.shape[:-2] + (C, C))
    G = _mm("...ts,...sd->...td", tril, jnp.where(reset, 0.0, gk))
    n = _mm("...ts,...sd->...td", tril, reset.astype(gk.dtype)).astype(jnp.int32)  # exact counts
    return G, n


def _masked_exp(valid, diff):
    return jnp.where(valid, jnp.exp(jnp.where(valid, diff, 0.0)), 0.0)


def _pair_levels(G, n, lead):
    """The levels of the binary split of a chunk (C a power of two): for half-lengths h = 1, 2,
    .., C/2, the blocks of 2h steps split at r, the last step of their first half; yields
    `(h, nb, row [.., nb, h, D], col [.., nb, h, D])` with `row = exp(G_t − G_r)` for the second
    half's steps t and `col = exp(G_r − G_j)` for the first half's steps j, 0 where a reset lies
    in between. Both are ≤ 1 for gk ≤ 0."""
    C, D = G.shape[-2:]
    h = 1
    while h < C:
        nb = C // (2 * h)
        Gh, nh = G.reshape(*lead, nb, 2, h, D), n.reshape(*lead, nb, 2, h, D)
        Gr, nr = Gh[..., 0, h - 1:h, :], nh[..., 0, h - 1:h, :]
        row = _masked_exp(nh[..., 1, :, :] == nr, Gh[..., 1, :, :] - Gr)
        col = _masked_exp(nh[..., 0, :, :] == nr, Gr - Gh[..., 0, :, :])
        yield h, nb, row, col
        h *= 2


def _first_halves(a, lead, nb, h, half):
    return a.reshape(*lead, nb, 2, h, a.shape[-1])[..., half, :, :]


def _pairs_tree_impl(Rs, K, G, n):
    """The pairs and, per level, `(row, col, Kl, (Rr for each R))` (kept for the VJP)."""
    C = K.shape[-2]
    lead = K.shape[:-2]
    # Blocks [.., nb, 2h, 2h] per row array, built from the diagonal up.
    Ms = [_mm("...d,...d->...", R, K)[..., :, None, None] for R in Rs]
    levels = []
    for h, nb, row, col in _pair_levels(G, n, lead):
        Kl = _first_halves(K, lead, nb, h, 0) * col
        Rrs = tuple(_first_halves(R, lead, nb, h, 1) * row for R in Rs)
        levels.append((row, col, Kl, Rrs))
        new = []
        for Rr, M in zip(Rrs, Ms, strict=True):
            off = _mm("...id,...jd->...ij", Rr, Kl)
            Mb = M.reshape(*lead, nb, 2, h, h)
            top = jnp.concatenate([Mb[..., 0, :, :], jnp.zeros_like(off)], -1)
            bot = jnp.concatenate([off, Mb[..., 1, :, :]], -1)
            new.append(jnp.concatenate([top, bot], -2))
        Ms = new
    return tuple(M.reshape(*lead, C, C) for M in Ms), levels


@jax.custom_vjp
def _pairs_tree(Rs, K, G, n):
    """`M_tj = Σ_d R_td K_jd exp(G_td − G_jd)` for j ≤ t (0 above the diagonal and across
    resets) for each R of the tuple Rs, C a power of two."""
    return _pairs_tree_impl(Rs, K, G, n)[0]


def _pairs_tree_fwd(Rs, K, G, n):
    Ms, levels = _pairs_tree_impl(Rs, K, G, n)
    return Ms, (Rs, K, levels)


def _pairs_tree_bwd(res, dMs):
    """Written out: per level `dR_t += row_t ⊙ (dOff Kl)_t`, `dK_j += col_j ⊙ (dOffᵀ Rr)_j` and,
    as `∂M_tj/∂G_sd = R_td K_jd e_tjd (δ_ts − δ_js)`, `dG = Σ_R R ⊙ dR − K ⊙ dK`."""
    Rs, K, levels = res
    C, D = K.shape[-2:]
    lead = K.shape[:-2]
    curs = [dM.reshape(*lead, 1, C, C) for dM in dMs]
    dRs = [0.0] * len(Rs)
    dK = 0.0
    for row, col, Kl, Rrs in reversed(levels):
        nb, h = row.shape[-3:-1]
        dKl = 0.0
        for i, (Rr, cur) in enumerate(zip(Rrs, curs, strict=True)):
            d_off = cur[..., :, h:, :h]  # [.., nb, h, h]
            curs[i] = jnp.stack([cur[..., :, :h, :h], cur[..., :, h:, h:]], axis=-3).reshape(
                *lead, 2 * nb, h, h)
            dRr = _mm("...ij,...jd->...id", d_off, Kl) * row
            dKl = dKl + _mm("...ij,...id->...jd", d_off, Rr)
            dRs[i] = dRs[i] + jnp.stack([jnp.zeros_like(dRr), dRr], axis=-3).reshape(*lead, C, D)
        dKl = dKl * col
        dK = dK + jnp.stack([dKl, jnp.zeros_like(dKl)], axis=-3).reshape(*lead, C, D)
    diags = [cur.reshape(*lead, C, 1) for cur in curs]
    dRs = [dR + d * K for dR, d in zip(dRs, diags, strict=True)]
    dK = dK + sum(d * R for d, R in zip(diags, Rs, strict=True))
    dG = sum(R * dR for R, dR in zip(Rs, dRs, strict=True)) - K * dK
    return tuple(dRs), dK, dG, None


_pairs_tree.defvjp(_pairs_tree_fwd, _pairs_tree_bwd)


def _channel_pairs(rows, K, G, n):
    """`M_tj = Σ_d R_td K_jd exp(G_td − G_jd)` for j ≤ t, 0 above the diagonal and wherever a
    reset lies in (j, t], for each `R` of `rows` — exactly in log space by a binary split of the
    chunk (module docstring). The factors are formed once for all of `rows` (A's X and P's Q
    share them; A's strict mask is applied by the caller). The VJP is written out.

    Args:
      rows: `[..., C, Dk]` row vectors (a tuple); K: `[..., C, Dk]` column vectors; G, n:
        `_channel_gates` of the chunk.

    Returns:
      a tuple of `[..., C, C]`, one per row array.
    """
    C = K.shape[-2]
    P2 = 1 << (C - 1).bit_length()
    if P2 != C:  # pad to a power of two: zero rows and columns, no decay, no reset
        pad = lambda a, mode: jnp.pad(a, [(0, 0)] * (a.ndim - 2) + [(0, P2 - C), (0, 0)],
                                      mode=mode)
        rows, K = tuple(pad(R, "constant") for R in rows), pad(K, "constant")
        G, n = pad(G, "edge"), pad(n, "edge")
    return tuple(M[..., :C, :C] for M in _pairs_tree(tuple(rows), K, G, n))


def _chunk_scan(q, k, v, beta, g, lam, gk, S0, *, scale, C, authors, restart=None):
    """The chunk math on padded inputs (T a multiple of C).

    Args:
      q .. gk: as `delta_rule_chunk`, T a multiple of C (float, finite but for −inf decays).
      S0: `[B, H, Dk, Dv]` start state.
      restart: None, or `(start [N] bool, h0 [N, B, H, Dk, Dv])`: chunk c begins with state
        `h0[c]` where `start[c]` (packed sequences).

    Returns:
      `(O [B, T, H, Dv], S [B, H, Dk, Dv] the final state, ends [N, B, H, Dk, Dv] the state after
      each chunk, or None without restart)`.
    """
    B, T, H, Dk = q.shape
    x = k if lam is None else k + lam[..., None] * q
    Q, K, X, V = (_to_chunks(a, C) for a in (q, k, x, v))  # [N, B, H, C, D]
    b = _to_chunks(beta, C)  # [N, B, H, C]

    incl = jnp.tril(jnp.ones((C, C), jnp.bool_))
    strict = jnp.tril(jnp.ones((C, C), jnp.bool_), -1)
    # Per row t: the decay since the chunk start (γ) and to the chunk end, [N, B, H, C, 1 or Dk].
    if gk is not None:
        gk = gk if g is None else gk + g[..., None]
        G, n = _channel_gates(_to_chunks(gk, C))  # [N, B, H, C, Dk]
        gamma = _masked_exp(n == 0, G)
        decay_out = _masked_exp(n == n[..., -1:, :], G[..., -1:, :] - G)
        M, P = _channel_pairs((X, Q), K, G, n)  # A's strict mask comes below
    else:
        if g is None:
            Gam = gamma = decay_out = None
        else:
            Gam, gamma, decay_out = _gates(_to_chunks(g, C), C)  # [N, B, H, C(, C)]
            gamma, decay_out = gamma[..., None], decay_out[..., None]
        decayed = lambda M: M if Gam is None else M * Gam
        # A_tj pairs x_t with k_j (the recurrence) or, with the authors' pairing, k_t with x_j.
        M = decayed(_mm("...tk,...jk->...tj", K, X) if authors
                    else _mm("...tk,...jk->...tj", X, K))
        P = decayed(_mm("...tk,...jk->...tj", Q, K))
    # Masks are `where`s: a masked entry is 0 whatever the product held.
    A = jnp.where(strict, b[..., :, None] * M, 0.0)
    P = jnp.where(incl, P, 0.0)
    Tm = unit_lower_inverse(A)
    Xw = b[..., None] * X if gamma is None else (b[..., None] * gamma) * X
    W = _mm("...tj,...jk->...tk", Tm, Xw)
    Ut = _mm("...tj,...jv->...tv", Tm, b[..., None] * V)
    Qd = Q if gamma is None else gamma * Q
    Kd = K if decay_out is None else decay_out * K
    gamma_C = None if gamma is None else gamma[..., -1, :]  # [N, B, H, 1 or Dk]

    def body(S, xs):
        W_c, Ut_c, P_c, Qd_c, Kd_c, gC, rs = xs
        if rs is not None:
            S = jnp.where(rs[0], rs[1], S)
        U = Ut_c - _mm("bhck,bhkv->bhcv", W_c, S)
        O = scale * (_mm("bhck,bhkv->bhcv", Qd_c, S) + _mm("bhct,bhtv->bhcv", P_c, U))
        S = S if gC is None else gC[..., None] * S
        S = S + _mm("bhck,bhcv->bhkv", Kd_c, U)
        return S, (O, None if rs is None else S)

    S, (O, ends) = jax.lax.scan(body, S0, (W, Ut, P, Qd, Kd, gamma_C, restart))
    return _from_chunks(O), S, ends
