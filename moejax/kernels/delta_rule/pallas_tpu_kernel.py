"""Kernel bodies and chunk math of the TPU (Mosaic) delta-rule kernels.

Private to `pallas_tpu.py`, which holds the launchers. Every helper works on 2-D values only
(vectors are columns `[C, 1]` or rows `[1, C]`, reductions keep their dims) and uses only
primitives the Mosaic lowering accepts (and the Triton one, should a GPU variant reuse them):
iota, where, exp, sums, 2-D dot_general, fori_loop. Per chunk of C steps (DESIGN §3):

    G = cumsum(g),  γ = exp(G),  Γ_tj = exp(G_t − G_j) (j ≤ t),  d_t = exp(G_C − G_t)
    A  = strict_tril(diag(β) (X Kᵀ ⊙ Γ)),  Tm = (I + A)⁻¹
    W  = Tm diag(βγ) X,  Ũ = Tm diag(β) V,  U = Ũ − W S
    O  = scale (diag(γ) Q S + (Q Kᵀ ⊙ Γ) U),  S' = γ_C S + (diag(d) K)ᵀ U

`authors=True` (`pairing="authors"` with a λ, `chunk.py` "The authors' pairing"): A is
`strict_tril(diag(β)(K Xᵀ ⊙ Γ))`, the released Q-Delta kernel's pairing (`_wy` and the A part
of `chunk_bwd`).

Full resets (`exp(g_s) = 0`, e.g. g = −inf) are handled as in `chunk.py`: G sums only the other
steps' g and a running count of resets zeroes (with `where`) every factor whose span contains
one, so no `−inf − (−inf)` is formed. Masks are `where`s, never multiplications. The kernels
assume otherwise finite inputs: `ops.py` runs them under `nonfinite.contain`.

Per-channel decay (`gk`, Kimi Delta Attention; `chunk.py`, "Per-channel decay"). With a log
decay per key channel, γ, d and γ_C become `[C, Dk]` / `[Dk, 1]` factors and the pair matrices
`M_tj = Σ_d x_td k_jd exp(G_td − G_jd)` (A = strict_tril(diag(β) M)) and
`P_tj = Σ_d q_td k_jd exp(G_td − G_jd)` are no longer a product times a `[C, C]` mask. The
launcher forms them exactly in log space (`chunk._channel_pairs`, secondary chunking) together
with `Xγ = X ⊙ γ`, `Qγ = Q ⊙ γ`, `Kd = K ⊙ d` and γ_C, and the `*_gk` kernels take those
factors as they are:

    Tm = (I + strict_tril(diag(β) M))⁻¹,  W = Tm diag(β) Xγ,  Ũ = Tm diag(β) V,  U = Ũ − W S
    O  = scale (Qγ S + P U),  S' = diag(γ_C) S + Kdᵀ U

`chunk_bwd_gk` returns the gradients of those factors (and of v, β); the launcher takes them
back to q, k, λ and gk through the log-space factors' VJP.

Chunk restarts (packed sequences, `restarts=True`): before chunk n the state kernel sets the
carried state to `h0s[n]` where `rs[n]`; the backward splits the carried gradient there
(`state_bwd_kernel`).

Kernel bodies: `intra_fwd_kernel` / `intra_bwd_kernel` and their `*_gk` variants (grid
`(B·H, N)`, one chunk per program) and `state_fwd_kernel` / `state_bwd_kernel` (grid
`(B·H, Dv tiles, N)`, the chunk axis sequential, the state in a VMEM scratch).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

_HIGHEST = jax.lax.Precision.HIGHEST


def dot(a, b):
    """`a @ b` in float32."""
    return jax.lax.dot_general(a, b, (((1,), (0,)), ((), ())), precision=_HIGHEST,
                               preferred_element_type=jnp.float32)


def dot_tn(a, b):
    """`aᵀ @ b` in float32."""
    return jax.lax.dot_general(a, b, (((0,), (0,)), ((), ())), precision=_HIGHEST,
                               preferred_element_type=jnp.float32)


def dot_nt(a, b):
    """`a @ bᵀ` in float32."""
    return jax.lax.dot_general(a, b, (((1,), (1,)), ((), ())), precision=_HIGHEST,
                               preferred_element_type=jnp.float32)


def _indicator(mask):
    """1.0 where `mask`, else 0.0, in float32 (Python-float branches would be float64 under
    x64, which the Triton and Mosaic dots refuse to mix with float32)."""
    return jnp.where(mask, jnp.float32(1.0), jnp.float32(0.0))


def _sum_all(a):
    """Sum of a 2-D value as `[1, 1]`."""
    return jnp.sum(jnp.sum(a, axis=0, keepdims=True), axis=1, keepdims=True)


@dataclasses.dataclass(frozen=True)
class Masks:
    """Index grids of a `[C, C]` chunk: `r` row (t), `c` column (j)."""

    r: jax.Array
    c: jax.Array

    @classmethod
    def make(cls, C):
        return cls(jax.lax.broadcasted_iota(jnp.int32, (C, C), 0),
                   jax.lax.broadcasted_iota(jnp.int32, (C, C), 1))

    @property
    def incl(self):
        return self.r >= self.c

    @property
    def strict(self):
        return self.r > self.c

    def row(self, col):
        """`[C, 1]` → `[1, C]` (a transpose by masked reduction, legal on both backends)."""
        return jnp.sum(jnp.where(self.r == self.c, col, 0.0), axis=0, keepdims=True)

    def col(self, row):
        """`[1, C]` → `[C, 1]`."""
        return jnp.sum(jnp.where(self.r == self.c, row, 0.0), axis=1, keepdims=True)


@dataclasses.dataclass(frozen=True)
class Gates:
    """Decay factors of one chunk (Γ is the causal mask when there is no gate)."""

    Gam: jax.Array  # [C, C] Γ on and below the diagonal, 0 above
    gamma: jax.Array | None  # [C, 1] γ_t = exp(G_t), None without g
    dec: jax.Array | None  # [C, 1] exp(G_C − G_t)
    gC: jax.Array | None  # [1, 1] exp(G_C)
    reset: jax.Array | None = None  # [C, 1] bool, exp(g_t) == 0 (the step zeroes the state)


def _cumsum(m: Masks, col):
    """Inclusive cumulative sum of a `[C, 1]` column (a masked reduction)."""
    return jnp.sum(jnp.where(m.incl, m.row(col), 0.0), axis=1, keepdims=True)


def gates(m: Masks, g):
    """Γ, γ, d, γ_C from the per-step log decays `g` `[C, 1]` (or None); g may hold −inf."""
    if g is None:
        return Gates(_indicator(m.incl), None, None, None)
    reset = jnp.exp(g) == 0.0  # [C, 1]
    gf = jnp.where(reset, 0.0, g)  # finite: resets taken out of the log decays
    G = _cumsum(m, gf)  # [C, 1]
    GC = _sum_all(gf)  # [1, 1]
    n = _cumsum(m, _indicator(reset))  # resets in [0, t] (small integers, exact)
    nC = _sum_all(_indicator(reset))
    # Γ_tj: j ≤ t and no reset in (j, t], i.e. n_t == n_j.
    keep = jnp.where(m.incl, n - m.row(n), 1.0) == 0.0
    Gam = jnp.where(keep, jnp.exp(jnp.where(keep, G - m.row(G), 0.0)), 0.0)
    gamma = jnp.where(n == 0.0, jnp.exp(G), 0.0)  # 0 after a reset in [0, t]
    dec = jnp.where(n == nC, jnp.exp(GC - G), 0.0)  # 0 if a reset lies in (t, C−1]
    gC = jnp.where(nC == 0.0, jnp.exp(GC), 0.0)
    return Gates(Gam, gamma, dec, gC, reset)


def unit_lower_inverse(m: Masks, A):
    """`(I + A)⁻¹` of a strictly lower-triangular `[C, C]` A, by forward substitution.

    Right-looking: once row j of T is final, subtract `A[:, j] ⊗ T[j, :]` from the rows below.
    Row and column extraction are masked reductions (no dynamic indexing of values).
    """
    C = A.shape[0]

    def body(j, T):
        a_j = jnp.sum(jnp.where(m.c == j, A, 0.0), axis=1, keepdims=True)  # [C, 1] column j
        t_j = jnp.sum(jnp.where(m.r == j, T, 0.0), axis=0, keepdims=True)  # [1, C] row j
        return T - a_j * t_j

    # int32 bounds: the loop index stays int32 under x64 (Mosaic cannot narrow an int64 one).
    return jax.lax.fori_loop(jnp.int32(0), jnp.int32(C), body, _indicator(m.r == m.c))


def _wy(m: Masks, q, k, b, g, lam, authors=False):
    """The WY pieces that do not involve V: `(x, gates, M, Tm, βγ, W)`, M = X Kᵀ (K Xᵀ when
    `authors`)."""
    x = k if lam is None else k + lam * q
    gt = gates(m, g)
    XK = dot_nt(k, x) if authors else dot_nt(x, k)
    Tm = unit_lower_inverse(m, jnp.where(m.strict, b * XK * gt.Gam, 0.0))
    bg = b if gt.gamma is None else b * gt.gamma
    return x, gt, XK, Tm, bg, dot(Tm, bg * x)


def intra(m: Masks, q, k, v, b, g, lam, authors=False):
    """Chunk-local pieces: `(x, gates, Tm, W, Ũ)`; all inputs float32."""
    x, gt, _, Tm, _, W = _wy(m, q, k, b, g, lam, authors)
    return x, gt, Tm, W, dot(Tm, b * v)


def chunk_out(m: Masks, gt: Gates, q, k, W, Ut, S, scale):
    """One chunk of the state recurrence: `(O [C, V], S' [Dk, V])`."""
    P = jnp.where(m.incl, dot_nt(q, k) * gt.Gam, 0.0)
    U = Ut - dot(W, S)
    QS = dot(q, S)
    if gt.gamma is not None:
        QS = gt.gamma * QS
    O = scale * (QS + dot(P, U))
    if gt.gamma is None:
        S = S + dot_tn(k, U)
    else:
        S = gt.gC * S + dot_tn(gt.dec * k, U)
    return O, S


def chunk_state_bwd(m: Masks, gt: Gates, q, k, W, dO, dS, scale):
    """Back through one chunk of the state recurrence: grad of the chunk's start state."""
    P = jnp.where(m.incl, dot_nt(q, k) * gt.Gam, 0.0)
    Kd = k if gt.dec is None else gt.dec * k
    Qd = q if gt.gamma is None else gt.gamma * q
    dU = scale * dot_tn(P, dO) + dot(Kd, dS)
    dS_prev = scale * dot_tn(Qd, dO) - dot_tn(W, dU)
    return dS_prev + (dS if gt.gC is None else gt.gC * dS)


def _dv_tile_sums(Tm, W, P, Kd, b, *, n_tiles, load_tile, store_dv, scale, decay):
    """The Dv-tile loop of the chunk backwards (`chunk_bwd`, `chunk_bwd_gk`): with
    `U = Tm diag(β) V − W S`, `dU = scale Pᵀ dO + Kd dS`, writes `dv = diag(β) Tmᵀ dU` tile by
    tile (`store_dv`) and returns the Dv sums `(Σ dO Sᵀ, Σ dO Uᵀ, Σ U dSᵀ, −Σ dU Sᵀ,
    Σ dU (diag(β) V)ᵀ, Σ_v V ⊙ Tmᵀ dU, Σ S ⊙ dS)`; the last is summed over everything `[1, 1]`
    for `decay="scalar"`, per key row `[Dk, 1]` for "channel", None for None."""
    C, Dk = W.shape
    dOS = jnp.zeros((C, Dk), jnp.float32)  # Σ_v dO Sᵀ
    dOU = jnp.zeros((C, C), jnp.float32)  # Σ_v dO Uᵀ
    dKd = jnp.zeros((C, Dk), jnp.float32)  # Σ_v U dSᵀ
    dW = jnp.zeros((C, Dk), jnp.float32)  # −Σ_v dU Sᵀ
    dTmV = jnp.zeros((C, C), jnp.float32)  # Σ_v dU (diag(β) V)ᵀ
    dbV = jnp.zeros((C, 1), jnp.float32)
    SdS = {None: None, "scalar": jnp.zeros((1, 1), jnp.float32),
           "channel": jnp.zeros((Dk, 1), jnp.float32)}[decay]  # Σ_v S ⊙ dS
    for j in range(n_tiles):
        v, S, dS, dO = load_tile(j)
        bv = b * v
        U = dot(Tm, bv) - dot(W, S)  # U = Ũ − W S
        dU = scale * dot_tn(P, dO) + dot(Kd, dS)
        dOS = dOS + dot_nt(dO, S)
        dOU = dOU + dot_nt(dO, U)
        dKd = dKd + dot_nt(U, dS)
        dW = dW - dot_nt(dU, S)
        dTmV = dTmV + dot_nt(dU, bv)
        TdU = dot_tn(Tm, dU)
        store_dv(j, b * TdU)
        dbV = dbV + jnp.sum(v * TdU, axis=1, keepdims=True)
        if decay == "scalar":
            SdS = SdS + _sum_all(S * dS)
        elif decay == "channel":
            SdS = SdS + jnp.sum(S * dS, axis=1, keepdims=True)
    return dOS, dOU, dKd, dW, dTmV, dbV, SdS


def chunk_bwd(m: Masks, q, k, b, g, lam, *, n_tiles, load_tile, store_dv, scale,
              authors=False):
    """Gradients of one chunk given its start state S, end-state grad dS and output grad dO.

    Everything that involves Dv is done tile by tile (bounded register/VMEM use):
    `load_tile(j)` returns tile j of `(v [C, bv], S [Dk, bv], dS [Dk, bv], dO [C, bv])` in
    float32 and `store_dv(j, dv)` writes tile j of dv; the Dv sums accumulate over tiles.

    Returns `(dq, dk, db, dg, dlam)` (dg/dlam None when g/lam are None), float32.
    """
    x, gt, XK, Tm, bg, W = _wy(m, q, k, b, g, lam, authors)
    QK = dot_nt(q, k)
    P = jnp.where(m.incl, QK * gt.Gam, 0.0)
    Kd = k if gt.dec is None else gt.dec * k
    C = q.shape[0]
    dOS, dOU, dKd, dW, dTmV, dbV, SdS = _dv_tile_sums(
        Tm, W, P, Kd, b, n_tiles=n_tiles, load_tile=load_tile, store_dv=store_dv, scale=scale,
        decay=None if g is None else "scalar")

    # O = scale (diag(γ) Q S + P U)
    dq = scale * (dOS if gt.gamma is None else gt.gamma * dOS)
    dP = scale * jnp.where(m.incl, dOU, 0.0)
    # S' = γ_C S + (diag(d) K)ᵀ U
    dk = dKd if gt.dec is None else gt.dec * dKd
    # P = QKᵀ ⊙ Γ
    dQK = dP * gt.Gam
    dq = dq + dot(dQK, k)
    dk = dk + dot_tn(dQK, q)
    # W = Tm diag(βγ) X, Ũ = Tm diag(β) V
    dTm = dot_nt(dW, bg * x) + dTmV
    TdW = dot_tn(Tm, dW)
    dx = bg * TdW
    xTdW = jnp.sum(x * TdW, axis=1, keepdims=True)
    db = (xTdW if gt.gamma is None else gt.gamma * xTdW) + dbV
    # Tm = (I + A)⁻¹: dA = −Tmᵀ dTm Tmᵀ (strict lower part)
    dA = jnp.where(m.strict, -dot_nt(dot_tn(Tm, dTm), Tm), 0.0)
    # A = diag(β) (X Kᵀ ⊙ Γ) (`authors`: diag(β) (K Xᵀ ⊙ Γ); XK holds that product)
    db = db + jnp.sum(dA * XK * gt.Gam, axis=1, keepdims=True)
    dM = b * dA
    dXK = dM * gt.Gam
    if authors:
        dk = dk + dot(dXK, x)
        dx = dx + dot_tn(dXK, k)
    else:
        dx = dx + dot(dXK, k)
        dk = dk + dot_tn(dXK, x)
    # x = k + λ q
    dk = dk + dx
    dlam = None
    if lam is not None:
        dq = dq + lam * dx
        dlam = jnp.sum(dx * q, axis=1, keepdims=True)
    dg = None
    if g is not None:
        dGam = dP * QK + dM * XK  # both already masked to j ≤ t
        E = dGam * gt.Gam
        dG = jnp.sum(E, axis=1, keepdims=True) - m.col(jnp.sum(E, axis=0, keepdims=True))
        dgamma = scale * jnp.sum(q * dOS, axis=1, keepdims=True) + b * xTdW
        ddec = jnp.sum(k * dKd, axis=1, keepdims=True) * gt.dec
        dGC = _sum_all(ddec) + gt.gC * SdS  # [1, 1]
        last = jax.lax.broadcasted_iota(jnp.int32, (C, 1), 0) == C - 1
        dG = dG + dgamma * gt.gamma - ddec + jnp.where(last, dGC, 0.0)
        # G = cumsum(g): dg_t = Σ_{s ≥ t} dG_s; 0 at a reset (d exp(g)/dg = exp(g) = 0 there)
        dg = jnp.sum(jnp.where(m.c >= m.r, m.row(dG), 0.0), axis=1, keepdims=True)
        dg = jnp.where(gt.reset, 0.0, dg)
    return dq, dk, db, dg, dlam


# Per-channel decay (`gk`): the chunk math on the launcher's log-space factors (module
# docstring). M and P arrive as formed; the masks are applied here again (`where`), so their
# gradients vanish above the diagonal.


def chunk_out_gk(m: Masks, P, Qg, Kd, gC, W, Ut, S, scale):
    """One chunk of the state recurrence with per-channel decay: `(O [C, V], S' [Dk, V])`;
    `gC` is γ_C as a column `[Dk, 1]`."""
    P = jnp.where(m.incl, P, 0.0)
    U = Ut - dot(W, S)
    O = scale * (dot(Qg, S) + dot(P, U))
    return O, gC * S + dot_tn(Kd, U)


def chunk_state_bwd_gk(m: Masks, P, Qg, Kd, gC, W, dO, dS, scale):
    """Back through `chunk_out_gk`: the gradient of the chunk's start state."""
    P = jnp.where(m.incl, P, 0.0)
    dU = scale * dot_tn(P, dO) + dot(Kd, dS)
    return scale * dot_tn(Qg, dO) - dot_tn(W, dU) + gC * dS


def chunk_bwd_gk(m: Masks, Xg, b, M, P, Kd, *, n_tiles, load_tile, store_dv, scale):
    """Gradients of one chunk with per-channel decay w.r.t. its factors, given its start state
    S, end-state grad dS and output grad dO (Dv tile by tile, as `chunk_bwd`).

    Returns `(dXγ, dβ, dM, dP, dQγ, dKd, dγ_C)`, float32 (dM strictly lower, dP lower
    triangular, dγ_C a column `[Dk, 1]`); dv goes through `store_dv`.
    """
    Tm = unit_lower_inverse(m, jnp.where(m.strict, b * M, 0.0))
    bX = b * Xg
    W = dot(Tm, bX)
    P = jnp.where(m.incl, P, 0.0)
    dQg, dOU, dKd, dW, dTmV, dbV, dgC = _dv_tile_sums(
        Tm, W, P, Kd, b, n_tiles=n_tiles, load_tile=load_tile, store_dv=store_dv, scale=scale,
        decay="channel")
    # O = scale (Qγ S + P U)
    dQg = scale * dQg
    dP = scale * jnp.where(m.incl, dOU, 0.0)
    # W = Tm diag(β) Xγ, Ũ = Tm diag(β) V
    dTm = dot_nt(dW, bX) + dTmV
    TdW = dot_tn(Tm, dW)
    dXg = b * TdW
    db = jnp.sum(Xg * TdW, axis=1, keepdims=True) + dbV
    # Tm = (I + A)⁻¹: dA = −Tmᵀ dTm Tmᵀ (strict lower part); A = diag(β) M
    dA = jnp.where(m.strict, -dot_nt(dot_tn(Tm, dTm), Tm), 0.0)
    db = db + jnp.sum(dA * M, axis=1, keepdims=True)
    return dXg, db, b * dA, dP, dQg, dKd, dgC


# Kernel bodies of the chunk-parallel passes (grid `(B·H, N)`, one chunk per program).
# Refs: q, k, v, β, [g], [λ] (optional refs present only when used).


def load_f32(ref, idx=...):
    """`ref[idx]` as float32."""
    return ref[idx].astype(jnp.float32)


def intra_fwd_kernel(*refs, has_g, has_lam, authors=False):
    q_ref, k_ref, v_ref, b_ref, *rest = refs
    g_ref = rest.pop(0) if has_g else None
    l_ref = rest.pop(0) if has_lam else None
    w_ref, u_ref = rest
    C = q_ref.shape[0]
    m = Masks.make(C)
    g = None if g_ref is None else load_f32(g_ref)
    lam = None if l_ref is None else load_f32(l_ref)
    q, k, v, b = map(load_f32, (q_ref, k_ref, v_ref, b_ref))
    _, _, _, W, Ut = intra(m, q, k, v, b, g, lam, authors)
    w_ref[...] = W
    u_ref[...] = Ut


def intra_bwd_kernel(*refs, has_g, has_lam, scale, block_v, authors=False):
    q_ref, k_ref, v_ref, b_ref, *rest = refs
    g_ref = rest.pop(0) if has_g else None
    l_ref = rest.pop(0) if has_lam else None
    h_ref, dh_ref, do_ref, dq_ref, dk_ref, dv_ref, db_ref, *rest = rest
    dg_ref = rest.pop(0) if has_g else None
    dl_ref = rest.pop(0) if has_lam else None
    m = Masks.make(q_ref.shape[0])
    g = None if g_ref is None else load_f32(g_ref)
    lam = None if l_ref is None else load_f32(l_ref)
    q, k, b = map(load_f32, (q_ref, k_ref, b_ref))
    tile = lambda j: (slice(None), slice(j * block_v, (j + 1) * block_v))

    def load_tile(j):
        return tuple(load_f32(r, tile(j)) for r in (v_ref, h_ref, dh_ref, do_ref))

    def store_dv(j, dv):
        dv_ref[tile(j)] = dv

    dq, dk, db, dg, dl = chunk_bwd(m, q, k, b, g, lam, n_tiles=v_ref.shape[-1] // block_v,
                                   load_tile=load_tile, store_dv=store_dv, scale=scale,
                                   authors=authors)
    dq_ref[...] = dq
    dk_ref[...] = dk
    db_ref[...] = db
    if dg_ref is not None:
        dg_ref[...] = dg
    if dl_ref is not None:
        dl_ref[...] = dl


def intra_fwd_gk_kernel(xg_ref, v_ref, b_ref, m_ref, w_ref, u_ref):
    """`W = Tm diag(β) Xγ`, `Ũ = Tm diag(β) V` from the launcher's factors (per-channel decay)."""
    m = Masks.make(xg_ref.shape[0])
    b = load_f32(b_ref)
    Tm = unit_lower_inverse(m, jnp.where(m.strict, b * m_ref[...], 0.0))
    w_ref[...] = dot(Tm, b * xg_ref[...])
    u_ref[...] = dot(Tm, b * load_f32(v_ref))


def intra_bwd_gk_kernel(xg_ref, v_ref, b_ref, m_ref, p_ref, kd_ref, h_ref, dh_ref, do_ref,
                        dxg_ref, dv_ref, db_ref, dm_ref, dp_ref, dqg_ref, dkd_ref, dgc_ref, *,
                        scale, block_v):
    m = Masks.make(xg_ref.shape[0])
    tile = lambda j: (slice(None), slice(j * block_v, (j + 1) * block_v))

    def load_tile(j):
        return tuple(load_f32(r, tile(j)) for r in (v_ref, h_ref, dh_ref, do_ref))

    def store_dv(j, dv):
        dv_ref[tile(j)] = dv

    outs = chunk_bwd_gk(m, xg_ref[...], load_f32(b_ref), m_ref[...], p_ref[...], kd_ref[...],
                        n_tiles=v_ref.shape[-1] // block_v, load_tile=load_tile,
                        store_dv=store_dv, scale=scale)
    for ref, val in zip((dxg_ref, db_ref, dm_ref, dp_ref, dqg_ref, dkd_ref, dgc_ref), outs,
                        strict=True):
        ref[...] = val


# State kernels (grid `(B·H, Dv tiles, N)`, chunk axis innermost and sequential): the
# `[Dk, block_v]` float32 state lives in the VMEM scratch `s_ref` across the chunk steps. Refs
# arrive in the launchers' order: the chunk's factors (`q, k, W, Ũ | dO, [g]`, or with `gk`
# `Qγ, Kd, W, Ũ | dO, P, γ_C`), then with `restarts` the restart flag (a `(1, 1)` float32 block,
# 1.0 or 0.0) and `h0s` (forward) or `dpre` (backward) of the chunk.


def _take(refs, n):
    return [refs.pop(0) for _ in range(n)]


def _restart(rs_ref, shape):
    """The chunk's restart flag as a bool array of `shape` (broadcast as float, then compared)."""
    return jnp.broadcast_to(rs_ref[...], shape) != 0.0


def state_fwd_kernel(*refs, has_g, scale, store_states, has_gk=False, restarts=False):
    """`store_states`: None, "pre" (each chunk's start state before its restart, the
    contract's `pre`) or "post" (the state the chunk runs from, for the backward)."""
    refs = list(refs)
    if has_gk:
        qg_ref, kd_ref, w_ref, u_ref, p_ref, gc_ref = _take(refs, 6)
    else:
        q_ref, k_ref, w_ref, u_ref = _take(refs, 4)
        g_ref = refs.pop(0) if has_g else None
    rs_ref, h0s_ref = _take(refs, 2) if restarts else (None, None)
    h0_ref, o_ref, hT_ref = _take(refs, 3)
    st_ref = refs.pop(0) if store_states else None
    (s_ref,) = refs
    n, N = pl.program_id(2), pl.num_programs(2)

    @pl.when(n == 0)
    def _():
        s_ref[...] = h0_ref[...]

    S = s_ref[...]
    if store_states == "pre":
        st_ref[...] = S
    if restarts:
        S = jnp.where(_restart(rs_ref, S.shape), h0s_ref[...], S)
    if store_states and store_states != "pre":
        st_ref[...] = S
    m = Masks.make(w_ref.shape[0])
    if has_gk:
        O, S = chunk_out_gk(m, p_ref[...], qg_ref[...], kd_ref[...], gc_ref[...], w_ref[...],
                            u_ref[...], S, scale)
    else:
        gt = gates(m, None if g_ref is None else load_f32(g_ref))
        O, S = chunk_out(m, gt, load_f32(q_ref), load_f32(k_ref), w_ref[...], u_ref[...],
                         S, scale)
    o_ref[...] = O
    s_ref[...] = S

    @pl.when(n == N - 1)
    def _():
        hT_ref[...] = S


def state_bwd_kernel(*refs, has_g, scale, has_gk=False, restarts=False):
    """Chunks in reverse. With `restarts`, the start-state gradient dS of a restarting chunk is
    `dh0s` (and nothing flows on); the gradient carried into the previous chunk's end is
    `(0 if rs else dS) + dpre`."""
    refs = list(refs)
    if has_gk:
        qg_ref, kd_ref, w_ref, do_ref, p_ref, gc_ref = _take(refs, 6)
    else:
        q_ref, k_ref, w_ref, do_ref = _take(refs, 4)
        g_ref = refs.pop(0) if has_g else None
    rs_ref, dpre_ref = _take(refs, 2) if restarts else (None, None)
    dhT_ref, dh0_ref, dhs_ref = _take(refs, 3)
    dh0s_ref = refs.pop(0) if restarts else None
    (s_ref,) = refs
    i, N = pl.program_id(2), pl.num_programs(2)

    @pl.when(i == 0)
    def _():
        s_ref[...] = dhT_ref[...]

    dS = s_ref[...]
    dhs_ref[...] = dS
    m = Masks.make(w_ref.shape[0])
    if has_gk:
        dS = chunk_state_bwd_gk(m, p_ref[...], qg_ref[...], kd_ref[...], gc_ref[...],
                                w_ref[...], load_f32(do_ref), dS, scale)
    else:
        gt = gates(m, None if g_ref is None else load_f32(g_ref))
        dS = chunk_state_bwd(m, gt, load_f32(q_ref), load_f32(k_ref), w_ref[...],
                             load_f32(do_ref), dS, scale)
    if restarts:
        r = _restart(rs_ref, dS.shape)
        dh0s_ref[...] = jnp.where(r, dS, 0.0)
        dS = jnp.where(r, 0.0, dS) + dpre_ref[...]
    s_ref[...] = dS

    @pl.when(i == N - 1)
    def _():
        dh0_ref[...] = dS
