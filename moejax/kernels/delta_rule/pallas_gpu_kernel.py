"""Kernel bodies and in-kernel math of the Hopper (Triton) delta-rule kernels.

Private to `pallas_gpu.py`, which holds the launchers (DESIGN §3, "Chunkwise form"). Per chunk
of C steps:

    G = cumsum(g),  γ = exp(G),  Γ_tj = exp(G_t − G_j) (j ≤ t),  d_t = exp(G_C − G_t)
    A  = strict_tril(diag(β) (X Kᵀ ⊙ Γ)),  Ai = (I + A)⁻¹,  x_t = k_t + λ_t q_t
    W  = Ai diag(βγ) X,  Ũ = Ai diag(β) V,  U = Ũ − W S
    O  = scale (diag(γ) Q S + (Q Kᵀ ⊙ Γ) U),  S' = γ_C S + (diag(d) K)ᵀ U

`authors=True` (`pairing="authors"` with a λ, `chunk.py` "The authors' pairing"): A is
`strict_tril(diag(β)(K Xᵀ ⊙ Γ))`, the released Q-Delta kernel's pairing; only `solve_kernel`
and the A part of `wy_bwd_kernel` change.

Full resets (`exp(g_s) = 0`, e.g. g = −inf) are handled as in `chunk.py`: `G` sums only the
other steps' g, and a running count `n` of resets masks (with `where`, before the exp) every
factor whose span contains one. The per-step factors (`G`, `n`, `γ`, `d`, `γ_C`) arrive from
the launchers (`pallas_gpu.gate_vectors`), the `[C, C]` Γ is formed here (`decay_matrix`).

Dots (`mm`): for bf16/f16 inputs the operands are cast to that dtype and accumulated in float32
(tensor-core bf16 MMA); for float32 inputs they stay float32 and run as TF32, or as 3×TF32
(`tf32x3`, float32-level accuracy on tensor cores) when full precision is asked for; interpret
mode (CPU) computes float32 dots at HIGHEST precision.

Axis letters: B batch, T time, H heads, Dk/Dv head dims, N chunks, C chunk length.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from moejax.kernels.delta_rule.pallas_common import F32, MIN_BLOCK, DeltaRuleOptions

BK = 64  # Dk tile of every kernel (the state is kept as ≤ 4 [64, BV] float32 blocks)
SUB = MIN_BLOCK  # diagonal block of the triangular solve


def _i32(x: int):
    """An int32 constant: Python ints become int64 under `jax_enable_x64`, which Triton's loop
    bounds and integer ops refuse."""
    return jnp.int32(x)


@dataclasses.dataclass(frozen=True, slots=True)
class Cfg:
    """What a kernel body needs to know statically: dot dtype and float32 dot precision."""

    cd: str  # dot operand dtype: "bfloat16", "float16" or "float32"
    fp: str  # precision of float32 dots: "ieee", "tf32", "tf32x3"
    scale: float

    @classmethod
    def make(cls, dtype, opts: DeltaRuleOptions) -> Cfg:
        dt = jnp.dtype(dtype)
        cd = dt.name if dt in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)) else "float32"
        fp = "ieee" if opts.interpret else opts.fp32_precision
        if cd != "float32" and fp == "tf32x3":
            fp = "tf32"  # the solve's float32 dots: TF32 is far below bf16/f16 rounding
        return cls(cd, fp, float(opts.scale))

    @property
    def store(self):
        """dtype of stored intermediates that are only ever dot operands (W, Ai, states, U)."""
        return jnp.dtype(self.cd)


def mm(cfg: Cfg, a, b, *, ta=False, tb=False, f32=False):
    """`op(a) @ op(b)` accumulated in float32 (op = transpose when ta / tb).

    f32=True keeps float32 operands whatever the input dtype (the triangular solve and its
    gradient), at `cfg.fp` precision.
    """
    if f32 or cfg.cd == "float32":
        a, b = a.astype(F32), b.astype(F32)
        prec = {"ieee": jax.lax.Precision.HIGHEST,
                "tf32": (jax.lax.Precision.DEFAULT, jax.lax.Precision.DEFAULT),
                "tf32x3": jax.lax.DotAlgorithmPreset.TF32_TF32_F32_X3}[cfg.fp]
    else:
        a, b = a.astype(cfg.cd), b.astype(cfg.cd)
        prec = (jax.lax.Precision.DEFAULT, jax.lax.Precision.DEFAULT)
    dims = (((0 if ta else 1,), (1 if tb else 0,)), ((), ()))
    return jax.lax.dot_general(a, b, dims, precision=prec, preferred_element_type=F32)


def tile(i, n: int):
    """Tile i (a Python int or a traced loop index) of width n."""
    if isinstance(i, int):
        return pl.ds(i * n, n)
    return pl.ds(pl.multiple_of(i * n, n), n)


def loop(n: int, body, init):
    """`body(i, carry)` for i < n: inline for one tile, else a `fori_loop` (an scf.for, so the
    tiles of separate passes are not merged into one long-lived set of registers)."""
    if n == 1:
        return body(0, init)
    return jax.lax.fori_loop(_i32(0), _i32(n), body, init)


def iotas(C: int):
    """Row `[C, 1]` and column `[1, C]` indices of a `[C, C]` chunk (masks broadcast them where
    used, so no `[C, C]` integer grid stays live in registers)."""
    return (jax.lax.broadcasted_iota(jnp.int32, (C, 1), 0),
            jax.lax.broadcasted_iota(jnp.int32, (1, C), 1))


def decay_matrix(r, c, G, n):
    """Γ `[C, C]` from the reset-free log decays G and reset counts n `[C]`: `exp(G_t − G_j)`
    where j ≤ t and no reset lies in (j, t], else 0; the exp argument is masked first. Without
    gates (G None) the inclusive causal mask as 0/1."""
    if G is None:
        return jnp.where(r >= c, 1.0, 0.0)
    keep = (r >= c) & (n[:, None] == n[None, :])
    return jnp.where(keep, jnp.exp(jnp.where(keep, G[:, None] - G[None, :], 0.0)), 0.0)


def solve_unit_lower(cfg: Cfg, A, r, c):
    """`(I + A)⁻¹` of a strictly lower-triangular `[C, C]` A (C ∈ {16, 32, 64}), float32.

    The 16×16 diagonal blocks are inverted together by forward substitution in float32 (row i of
    every block at once: `T_i = −A_i − A_i T`, masked reductions, no dynamic indexing), then
    merged with matmuls as fla's solve_tril does, 16 → 32 → 64: for a block lower-triangular
    `[[M11, 0], [M21, M22]]` with X = diag(M11⁻¹, M22⁻¹), the inverse is `X − X M21 X`.
    """
    C = A.shape[0]
    rb, cb = jax.lax.div(r, _i32(SUB)), jax.lax.div(c, _i32(SUB))
    ri = jax.lax.rem(r, _i32(SUB))
    same = rb == cb
    Ad = jnp.where(same, A, 0.0)

    def row(i, T):
        a = jnp.sum(jnp.where(ri == i, Ad, 0.0), axis=0)  # [C]: a[k] = A[row_i(k), k]
        new = -(a + jnp.sum(a[:, None] * T, axis=0))  # [C] over columns j
        return jnp.where((ri == i) & same, new[None, :], T)

    T = jax.lax.fori_loop(_i32(1), _i32(min(SUB, C)), row, jnp.zeros_like(A))
    Ai = jnp.where(r == c, 1.0, T)
    width = SUB
    while width < C:  # merge blocks of `width` into blocks of 2·width
        rw, cw = jax.lax.div(r, _i32(2 * width)), jax.lax.div(c, _i32(2 * width))
        lower = (rw == cw) & (jax.lax.div(r, _i32(width)) > jax.lax.div(c, _i32(width)))
        M21 = jnp.where(lower, A, 0.0)
        Ai = Ai - mm(cfg, mm(cfg, Ai, M21, f32=True), Ai, f32=True)
        width *= 2
    return Ai


# ------------------------------------------------------------------------------------------
# Kernel bodies. Refs arrive in the launchers' order; optional refs only when the mode uses
# them (g: G, n, γ / d, γ_C; λ).


def _x_tile(q_ref, k_ref, lam, kb, bk):
    """Tile kb of `(q, k, x = k + λ q)` in float32."""
    q = q_ref[:, tile(kb, bk)].astype(F32)
    k = k_ref[:, tile(kb, bk)].astype(F32)
    return q, k, (k if lam is None else k + lam[:, None] * q)


def solve_kernel(*refs, cfg, has_g, has_lam, bk, authors=False):
    """Ai = (I + A)⁻¹ with A = strict(diag(β)(X Kᵀ ⊙ Γ)) (fla: scaled_dot_kkt + solve_tril);
    `authors`: A = strict(diag(β)(K Xᵀ ⊙ Γ)) (Q-Delta's chunk_scaled_dot_kxt)."""
    it = iter(refs)
    q_ref, k_ref, b_ref = next(it), next(it), next(it)
    G_ref, n_ref = (next(it), next(it)) if has_g else (None, None)
    l_ref = next(it) if has_lam else None
    ai_ref = next(it)
    C, Dkp = q_ref.shape
    r, c = iotas(C)
    lam = None if l_ref is None else l_ref[...]

    def xk(kb, XK):
        _, k, x = _x_tile(q_ref, k_ref, lam, kb, bk)
        return XK + (mm(cfg, k, x, tb=True) if authors else mm(cfg, x, k, tb=True))

    XK = loop(Dkp // bk, xk, jnp.zeros((C, C), F32))
    Gam = decay_matrix(r, c, G_ref[...] if has_g else None, n_ref[...] if has_g else None)
    A = jnp.where(r > c, b_ref[...][:, None] * XK * Gam, 0.0)
    ai_ref[...] = solve_unit_lower(cfg, A, r, c).astype(ai_ref.dtype)


def wy_fwd_kernel(*refs, cfg, has_g, has_lam, bk, bv):
    """W = Ai diag(βγ) X, Ũ = Ai diag(β) V (fla: recompute_w_u)."""
    it = iter(refs)
    q_ref, k_ref, v_ref, b_ref = (next(it) for _ in range(4))
    gam_ref = next(it) if has_g else None
    l_ref = next(it) if has_lam else None
    ai_ref, w_ref, u_ref = next(it), next(it), next(it)
    Dkp = q_ref.shape[1]
    b = b_ref[...]
    lam = None if l_ref is None else l_ref[...]
    Ai = ai_ref[...]
    bw = b * gam_ref[...] if has_g else b

    def w_tile(kb, carry):
        _, _, x = _x_tile(q_ref, k_ref, lam, kb, bk)
        w_ref[:, tile(kb, bk)] = mm(cfg, Ai, bw[:, None] * x).astype(w_ref.dtype)
        return carry

    def u_tile(vb, carry):
        v = v_ref[:, tile(vb, bv)].astype(F32)
        u_ref[:, tile(vb, bv)] = mm(cfg, Ai, b[:, None] * v)
        return carry

    loop(Dkp // bk, w_tile, 0)
    loop(v_ref.shape[1] // bv, u_tile, 0)


def state_fwd_kernel(*refs, cfg, has_g, bk, has_gk=False, restarts=False):
    """The sequential pass: per chunk n, `pre[n]` = the carried state, the state becomes
    `h0s[n]` where `rs[n]` (`restarts`), that start state is stored, `U = Ũ − W S` and
    `S' = γ_C S + (diag(d) K)ᵀ U`. `has_gk` (per-channel decay): k arrives as `K ⊙ d` and γ_C
    as one factor per key channel, `S' = diag(γ_C) S + (K ⊙ d)ᵀ U`."""
    it = iter(refs)
    k_ref, w_ref, u_ref = next(it), next(it), next(it)
    dec_ref, gc_ref = (next(it), next(it)) if has_g else (None, None)
    gck_ref = next(it) if has_gk else None
    h0_ref = next(it)
    rs_ref, h0s_ref = (next(it), next(it)) if restarts else (None, None)
    hs_ref, vn_ref, hT_ref = (next(it) for _ in range(3))
    pre_ref = next(it) if restarts else None
    N, _, Dkp = k_ref.shape
    nk = Dkp // bk

    def body(n, hk):
        if restarts:
            for i in range(nk):
                pre_ref[n, tile(i, bk), :] = hk[i]
            start = jnp.max(rs_ref[n]) > 0
            hk = [jnp.where(start, h0s_ref[n, tile(i, bk), :], hk[i]) for i in range(nk)]
        for i in range(nk):
            hs_ref[n, tile(i, bk), :] = hk[i].astype(hs_ref.dtype)
        vn = u_ref[n]
        for i in range(nk):
            vn = vn - mm(cfg, w_ref[n, :, tile(i, bk)], hk[i])
        vn_ref[n] = vn.astype(vn_ref.dtype)
        if has_g:
            vn = dec_ref[n][:, None] * vn
            gc = jnp.max(gc_ref[n])
            hk = [gc * h for h in hk]
        if has_gk:
            hk = [gck_ref[n, tile(i, bk)][:, None] * hk[i] for i in range(nk)]
        return [hk[i] + mm(cfg, k_ref[n, :, tile(i, bk)], vn, ta=True) for i in range(nk)]

    hk = [h0_ref[tile(i, bk), :] for i in range(nk)]
    hk = jax.lax.fori_loop(jnp.int32(0), jnp.int32(N), body, hk)
    for i in range(nk):
        hT_ref[tile(i, bk), :] = hk[i]


def out_kernel(*refs, cfg, has_g, bk):
    it = iter(refs)
    q_ref, k_ref, vn_ref, h_ref = (next(it) for _ in range(4))
    G_ref, n_ref, gam_ref = (next(it) for _ in range(3)) if has_g else (None,) * 3
    o_ref = next(it)
    C, Dkp = q_ref.shape
    r, c = iotas(C)
    QS = jnp.zeros(o_ref.shape, F32)
    QK = jnp.zeros((C, C), F32)
    for kb in range(Dkp // bk):
        q = q_ref[:, tile(kb, bk)]
        QS = QS + mm(cfg, q, h_ref[tile(kb, bk), :])
        QK = QK + mm(cfg, q, k_ref[:, tile(kb, bk)], tb=True)
    Gam = decay_matrix(r, c, G_ref[...] if has_g else None, n_ref[...] if has_g else None)
    P = jnp.where(r >= c, QK * Gam, 0.0)
    if has_g:
        QS = gam_ref[...][:, None] * QS
    o_ref[...] = cfg.scale * (QS + mm(cfg, P, vn_ref[...]))


def dv_local_kernel(*refs, cfg, has_g, bk, bv):
    it = iter(refs)
    q_ref, k_ref, do_ref = next(it), next(it), next(it)
    G_ref, n_ref = (next(it), next(it)) if has_g else (None, None)
    dv_ref = next(it)
    C, Dkp = q_ref.shape
    r, c = iotas(C)
    QK = jnp.zeros((C, C), F32)
    for kb in range(Dkp // bk):
        QK = QK + mm(cfg, q_ref[:, tile(kb, bk)], k_ref[:, tile(kb, bk)], tb=True)
    Gam = decay_matrix(r, c, G_ref[...] if has_g else None, n_ref[...] if has_g else None)
    P = jnp.where(r >= c, QK * Gam, 0.0)
    for vb in range(do_ref.shape[1] // bv):
        dv_ref[:, tile(vb, bv)] = cfg.scale * mm(cfg, P, do_ref[:, tile(vb, bv)], ta=True)


def state_bwd_kernel(*refs, cfg, has_g, bk, has_gk=False, restarts=False):
    """The sequential pass in reverse: per chunk n, `dS` (w.r.t. its end state) is stored,
    `dU = dU_local + diag(d) K dS` and the start-state gradient
    `dS_0 = γ_C dS + scale (diag(γ) Q)ᵀ dO − Wᵀ dU`. With `restarts`, `dh0s[n] = dS_0` where
    `rs[n]` (else 0) and the gradient carried to chunk n − 1's end is
    `(0 if rs[n] else dS_0) + dpre[n]`. `has_gk`: q arrives as `Q ⊙ γ`, k as `K ⊙ d`, γ_C per key
    channel."""
    it = iter(refs)
    q_ref, k_ref, w_ref, do_ref, dvl_ref = (next(it) for _ in range(5))
    gam_ref, dec_ref, gc_ref = (next(it) for _ in range(3)) if has_g else (None,) * 3
    gck_ref = next(it) if has_gk else None
    rs_ref, dpre_ref = (next(it), next(it)) if restarts else (None, None)
    dhT_ref, dhs_ref, dvn_ref, dh0_ref = (next(it) for _ in range(4))
    dh0s_ref = next(it) if restarts else None
    N, _, Dkp = k_ref.shape
    nk = Dkp // bk

    def body(j, dh):
        n = N - 1 - j
        for i in range(nk):
            dhs_ref[n, tile(i, bk), :] = dh[i].astype(dhs_ref.dtype)
        kdh = mm(cfg, k_ref[n, :, tile(0, bk)], dh[0])
        for i in range(1, nk):
            kdh = kdh + mm(cfg, k_ref[n, :, tile(i, bk)], dh[i])
        dv = dvl_ref[n] + (dec_ref[n][:, None] * kdh if has_g else kdh)
        dvn_ref[n] = dv.astype(dvn_ref.dtype)
        do = do_ref[n].astype(F32)
        if has_g:
            do = gam_ref[n][:, None] * do
            gc = jnp.max(gc_ref[n])
            dh = [gc * d for d in dh]
        if has_gk:
            dh = [gck_ref[n, tile(i, bk)][:, None] * dh[i] for i in range(nk)]
        dh = [dh[i] + cfg.scale * mm(cfg, q_ref[n, :, tile(i, bk)], do, ta=True)
              - mm(cfg, w_ref[n, :, tile(i, bk)], dv, ta=True) for i in range(nk)]
        if restarts:
            start = jnp.max(rs_ref[n]) > 0
            for i in range(nk):
                dh0s_ref[n, tile(i, bk), :] = jnp.where(start, dh[i], 0.0)
            dh = [jnp.where(start, 0.0, dh[i]) + dpre_ref[n, tile(i, bk), :] for i in range(nk)]
        return dh

    dh = [dhT_ref[tile(i, bk), :] for i in range(nk)]
    dh = jax.lax.fori_loop(jnp.int32(0), jnp.int32(N), body, dh)
    for i in range(nk):
        dh0_ref[tile(i, bk), :] = dh[i]


def dqkwg_kernel(*refs, cfg, has_g, bv):
    it = iter(refs)
    q_ref, k_ref, vn_ref, h_ref, dh_ref, do_ref, dvn_ref = (next(it) for _ in range(7))
    if has_g:
        G_ref, n_ref, gam_ref, dec_ref, gc_ref = (next(it) for _ in range(5))
    dq_ref, dk_ref, dw_ref = next(it), next(it), next(it)
    dG_ref = next(it) if has_g else None
    C, bk = q_ref.shape
    r, c = iotas(C)

    def acc(vb, carry):  # a fori_loop over Dv tiles: one tile's operands live at a time
        dOS, UdS, dUS, dOU, SdS = carry
        h = h_ref[:, tile(vb, bv)]
        dh = dh_ref[:, tile(vb, bv)]
        do = do_ref[:, tile(vb, bv)]
        vn = vn_ref[:, tile(vb, bv)]
        dOS = dOS + mm(cfg, do, h, tb=True)  # Σ_v dO Sᵀ
        dOU = dOU + mm(cfg, do, vn, tb=True)  # Σ_v dO Uᵀ
        UdS = UdS + mm(cfg, vn, dh, tb=True)  # Σ_v U dSᵀ
        dUS = dUS + mm(cfg, dvn_ref[:, tile(vb, bv)], h, tb=True)  # Σ_v dU Sᵀ
        if has_g:
            SdS = SdS + jnp.sum(h.astype(F32) * dh.astype(F32))
        return dOS, UdS, dUS, dOU, SdS

    z = jnp.zeros((C, bk), F32)
    dOS, UdS, dUS, dOU, SdS = loop(do_ref.shape[1] // bv, acc,
                                   (z, z, z, jnp.zeros((C, C), F32), jnp.zeros((), F32)))
    dw_ref[...] = (-dUS).astype(dw_ref.dtype)
    q, k = q_ref[...].astype(F32), k_ref[...].astype(F32)
    G = n = None
    if has_g:
        G, n, gam, dec = G_ref[...], n_ref[...], gam_ref[...], dec_ref[...]
        qdOS = cfg.scale * gam * jnp.sum(q * dOS, axis=1)
        ddec = dec * jnp.sum(k * UdS, axis=1)
    Gam = decay_matrix(r, c, G, n)
    dPG = jnp.where(r >= c, cfg.scale * dOU * Gam, 0.0)  # d(QKᵀ) of O's intra-chunk term
    dq_in = mm(cfg, dPG, k)
    dq_ref[...] = cfg.scale * (gam[:, None] * dOS if has_g else dOS) + dq_in
    dk_in = mm(cfg, dPG, q, ta=True)
    dk_ref[...] = (dec[:, None] * UdS if has_g else UdS) + dk_in
    if has_g:
        # dΓ ⊙ Γ of O's intra-chunk term is E = dPG ⊙ Q Kᵀ (this Dk tile); its row sums are
        # q · (dPG K) and its column sums k · (dPGᵀ Q), so no [C, C] Q Kᵀ is formed.
        last = jax.lax.broadcasted_iota(jnp.int32, (C,), 0) == C - 1
        dGC = jnp.sum(ddec) + jnp.max(gc_ref[...]) * SdS
        dG_ref[...] = (jnp.sum(q * dq_in, axis=1) - jnp.sum(k * dk_in, axis=1) + qdOS - ddec
                       + jnp.where(last, dGC, 0.0))


def _dv_pass(cfg: Cfg, Ai, b, v_ref, du_ref, dv_ref, bv):
    """The Dv-tile body of pass 1 of the WY backwards (`wy_bwd_kernel`, `wy_bwd_channel_kernel`):
    writes `dv = diag(β) Aiᵀ dŨ` tile by tile and accumulates `dAi += dŨ (βV)ᵀ` and the V part
    of dβ, `Σ_v V ⊙ Aiᵀ dŨ`."""
    def pass1_v(vb, carry):
        dAi, db = carry
        v = v_ref[:, tile(vb, bv)].astype(F32)
        du = du_ref[:, tile(vb, bv)]
        t = mm(cfg, Ai, du, ta=True)  # Aiᵀ dŨ
        dv_ref[:, tile(vb, bv)] = b[:, None] * t
        return dAi + mm(cfg, du, b[:, None] * v, tb=True), db + jnp.sum(v * t, axis=1)
    return pass1_v


def wy_bwd_kernel(*refs, cfg, has_g, has_lam, bk, bv, authors=False):
    it = iter(refs)
    q_ref, k_ref, v_ref, b_ref = (next(it) for _ in range(4))
    G_ref, n_ref, gam_ref = (next(it) for _ in range(3)) if has_g else (None,) * 3
    l_ref = next(it) if has_lam else None
    ai_ref, dw_ref, du_ref = next(it), next(it), next(it)
    dk_ref, dv_ref, db_ref = next(it), next(it), next(it)
    dq_ref = next(it) if has_lam else None
    dl_ref = next(it) if has_lam else None
    dG_ref = next(it) if has_g else None
    C, Dkp = q_ref.shape
    r, c = iotas(C)
    b = b_ref[...]
    lam = None if l_ref is None else l_ref[...]
    gam = gam_ref[...] if has_g else None
    bw = b * gam if has_g else b
    Ai = ai_ref[...]
    # Pass 1: dAi = dW (βγX)ᵀ + dŨ (βV)ᵀ; dv and the V part of dβ.
    def pass1_k(kb, dAi):
        _, _, x = _x_tile(q_ref, k_ref, lam, kb, bk)
        return dAi + mm(cfg, dw_ref[:, tile(kb, bk)], bw[:, None] * x, tb=True)

    pass1_v = _dv_pass(cfg, Ai, b, v_ref, du_ref, dv_ref, bv)
    dAi = loop(Dkp // bk, pass1_k, jnp.zeros((C, C), F32))
    dAi, db = loop(v_ref.shape[1] // bv, pass1_v, (dAi, jnp.zeros((C,), F32)))
    # Ai = (I + A)⁻¹: dA = −Aiᵀ dAi Aiᵀ (strict lower part); A = diag(β)(M ⊙ Γ) with
    # M = X Kᵀ (K Xᵀ when `authors`), so dM = diag(β) dA ⊙ Γ. D = dA ⊙ Γ is all that pass 2
    # keeps besides Ai.
    dA = -mm(cfg, mm(cfg, Ai, dAi, ta=True, f32=True), Ai, tb=True, f32=True)
    Gam = decay_matrix(r, c, G_ref[...] if has_g else None, n_ref[...] if has_g else None)
    D = jnp.where(r > c, dA * Gam, 0.0)

    # Pass 2 (per Dk tile): dx = βγ ⊙ Aiᵀ dW + dM K, dk = dMᵀ X + dx, dq = λ dx,
    # dλ = Σ dx ⊙ q; the A terms of dβ and dG, Σ over tiles of (D ⊙ M), by linearity.
    # `authors` (M = K Xᵀ): the roles of k and x in the A terms swap, dk = dM X + dx and
    # dx = βγ ⊙ Aiᵀ dW + dMᵀ K.
    def pass2(kb, carry):
        db, dG, dl = carry
        q, k, x = _x_tile(q_ref, k_ref, lam, kb, bk)
        t = mm(cfg, Ai, dw_ref[:, tile(kb, bk)], ta=True)  # Aiᵀ dW
        row, col = (k, x) if authors else (x, k)  # M = row · colᵀ
        DC = mm(cfg, D, col)
        dx = bw[:, None] * t
        xt = jnp.sum(x * t, axis=1)
        # D ⊙ M by its row sums row · (D col) (and E = diag(β) D ⊙ M, dΓ ⊙ Γ of A, by its
        # row sums β row · (D col) and column sums col · (dMᵀ row)): no [C, C] M is formed.
        DXr = jnp.sum(row * DC, axis=1)
        db = db + DXr + (gam * xt if has_g else xt)
        dcol = mm(cfg, D, b[:, None] * row, ta=True)  # dMᵀ row
        if has_g:
            dG = dG + bw * xt + b * DXr - jnp.sum(col * dcol, axis=1)
        if authors:  # d row = dk, d col = dx
            dx = dx + dcol
            dk_ref[:, tile(kb, bk)] = b[:, None] * DC + dx
        else:  # d row = dx, d col = dk
            dx = dx + b[:, None] * DC
            dk_ref[:, tile(kb, bk)] = dcol + dx
        if has_lam:
            dq_ref[:, tile(kb, bk)] = lam[:, None] * dx
            dl = dl + jnp.sum(dx * q, axis=1)
        return db, dG, dl

    zero = jnp.zeros((C,), F32)
    db, dG, dl = loop(Dkp // bk, pass2, (db, zero, zero))
    db_ref[...] = db
    if has_lam:
        dl_ref[...] = dl
    if has_g:
        dG_ref[...] = dG


# ------------------------------------------------------------------------------------------
# Per-channel decay (gk, KDA). The launcher (`pallas_gpu._channel_factors`) forms, exactly in log
# space, the decayed operands `Q ⊙ γ`, `K ⊙ d`, `X ⊙ γ` `[C, Dk]`, the per-channel `γ_C` `[Dk]`
# and the pair matrices `M_tj = Σ_d x_td k_jd exp(G_td − G_jd)`, `P_tj = Σ_d q_td k_jd
# exp(G_td − G_jd)` (j ≤ t) `[C, C]`; these bodies do the rest (the solve, W / Ũ, the state
# passes, O and every gradient that touches the state or V). Then
#
#     A = strict(diag(β) M),  Ai = (I + A)⁻¹,  W = Ai diag(β)(X ⊙ γ),  Ũ = Ai diag(β) V
#     U = Ũ − W S,  O = scale ((Q ⊙ γ) S + P U),  S' = diag(γ_C) S + (K ⊙ d)ᵀ U
#
# W, Ũ and S' are the scalar-gate kernels' with those operands (`wy_fwd_kernel` with X ⊙ γ for x
# and no g; `state_*_kernel(has_gk=True)`). The gradients w.r.t. the operands the launcher formed
# (`d(Q ⊙ γ)`, `d(K ⊙ d)`, `d(X ⊙ γ)`, `dγ_C`, `dM`, `dP`) go back through its jnp (autodiff of
# the masked log-space factors).


def solve_pair_kernel(m_ref, b_ref, ai_ref, *, cfg):
    """gk: `Ai = (I + A)⁻¹` with `A = strict(diag(β) M)`, M from the launcher."""
    C = m_ref.shape[0]
    r, c = iotas(C)
    A = jnp.where(r > c, b_ref[...][:, None] * m_ref[...], 0.0)
    ai_ref[...] = solve_unit_lower(cfg, A, r, c).astype(ai_ref.dtype)


def out_pair_kernel(qg_ref, p_ref, vn_ref, h_ref, o_ref, *, cfg, bk):
    """gk: `O = scale ((Q ⊙ γ) S + P U)`."""
    C, Dkp = qg_ref.shape
    r, c = iotas(C)
    QS = jnp.zeros(o_ref.shape, F32)
    for kb in range(Dkp // bk):
        QS = QS + mm(cfg, qg_ref[:, tile(kb, bk)], h_ref[tile(kb, bk), :])
    P = jnp.where(r >= c, p_ref[...], 0.0)
    o_ref[...] = cfg.scale * (QS + mm(cfg, P, vn_ref[...]))


def dv_local_pair_kernel(p_ref, do_ref, dv_ref, *, cfg, bv):
    """gk: `dU_local = scale Pᵀ dO`."""
    C = p_ref.shape[0]
    r, c = iotas(C)
    P = jnp.where(r >= c, p_ref[...], 0.0)
    for vb in range(do_ref.shape[1] // bv):
        dv_ref[:, tile(vb, bv)] = cfg.scale * mm(cfg, P, do_ref[:, tile(vb, bv)], ta=True)


def dqkwg_channel_kernel(vn_ref, h_ref, dh_ref, do_ref, dvn_ref, dqg_ref, dkd_ref, dw_ref,
                         dgc_ref, dp_ref, *, cfg, bv):
    """gk, one Dk tile of a chunk: from `O = scale ((Q ⊙ γ) S + P U)` and
    `S' = diag(γ_C) S + (K ⊙ d)ᵀ U` with end-state gradient dS' and the full dU:
    `d(Q ⊙ γ) = scale dO Sᵀ`, `d(K ⊙ d) = U dS'ᵀ`, `dW = −dU Sᵀ`, `dγ_C = Σ_v S ⊙ dS'` and
    `dP = scale tril(dO Uᵀ)` (the same in every Dk tile)."""
    C, Dvp = do_ref.shape
    bk = h_ref.shape[0]
    r, c = iotas(C)

    def acc(vb, carry):  # a fori_loop over Dv tiles: one tile's operands live at a time
        dOS, UdS, dUS, dOU, SdS = carry
        h = h_ref[:, tile(vb, bv)]
        dh = dh_ref[:, tile(vb, bv)]
        do = do_ref[:, tile(vb, bv)]
        vn = vn_ref[:, tile(vb, bv)]
        dOS = dOS + mm(cfg, do, h, tb=True)  # Σ_v dO Sᵀ
        dOU = dOU + mm(cfg, do, vn, tb=True)  # Σ_v dO Uᵀ
        UdS = UdS + mm(cfg, vn, dh, tb=True)  # Σ_v U dSᵀ
        dUS = dUS + mm(cfg, dvn_ref[:, tile(vb, bv)], h, tb=True)  # Σ_v dU Sᵀ
        SdS = SdS + jnp.sum(h.astype(F32) * dh.astype(F32), axis=1)
        return dOS, UdS, dUS, dOU, SdS

    z = jnp.zeros((C, bk), F32)
    dOS, UdS, dUS, dOU, SdS = loop(Dvp // bv, acc, (z, z, z, jnp.zeros((C, C), F32),
                                                    jnp.zeros((bk,), F32)))
    dw_ref[...] = (-dUS).astype(dw_ref.dtype)
    dqg_ref[...] = cfg.scale * dOS
    dkd_ref[...] = UdS
    dgc_ref[...] = SdS
    dp_ref[...] = jnp.where(r >= c, cfg.scale * dOU, 0.0)


def wy_bwd_channel_kernel(xg_ref, v_ref, b_ref, m_ref, ai_ref, dw_ref, du_ref, dxg_ref, dv_ref,
                          db_ref, dm_ref, *, cfg, bk, bv):
    """gk: back through `W = Ai diag(β)(X ⊙ γ)`, `Ũ = Ai diag(β) V`, `Ai = (I + A)⁻¹` and
    `A = strict(diag(β) M)`: `d(X ⊙ γ) = diag(β) Aiᵀ dW`, `dv = diag(β) Aiᵀ dŨ`,
    `dβ = Σ (X ⊙ γ) ⊙ Aiᵀ dW + Σ V ⊙ Aiᵀ dŨ + Σ_j dA ⊙ M`, `dM = diag(β) dA` with
    `dA = strict(−Aiᵀ dAi Aiᵀ)` and `dAi = dW (β (X ⊙ γ))ᵀ + dŨ (βV)ᵀ`."""
    C, Dkp = xg_ref.shape
    r, c = iotas(C)
    b = b_ref[...]
    Ai = ai_ref[...]

    def pass1_k(kb, dAi):
        xg = xg_ref[:, tile(kb, bk)].astype(F32)
        return dAi + mm(cfg, dw_ref[:, tile(kb, bk)], b[:, None] * xg, tb=True)

    pass1_v = _dv_pass(cfg, Ai, b, v_ref, du_ref, dv_ref, bv)
    dAi = loop(Dkp // bk, pass1_k, jnp.zeros((C, C), F32))
    dAi, db = loop(v_ref.shape[1] // bv, pass1_v, (dAi, jnp.zeros((C,), F32)))
    dA = -mm(cfg, mm(cfg, Ai, dAi, ta=True, f32=True), Ai, tb=True, f32=True)
    D = jnp.where(r > c, dA, 0.0)
    dm_ref[...] = b[:, None] * D
    db = db + jnp.sum(D * m_ref[...], axis=1)

    def pass2(kb, db):
        xg = xg_ref[:, tile(kb, bk)].astype(F32)
        t = mm(cfg, Ai, dw_ref[:, tile(kb, bk)], ta=True)  # Aiᵀ dW
        dxg_ref[:, tile(kb, bk)] = b[:, None] * t
        return db + jnp.sum(xg * t, axis=1)

    db_ref[...] = loop(Dkp // bk, pass2, db)
