"""Delta-rule chunk kernels for Hopper GPUs (Pallas → Triton), forward and backward, custom VJP.

The design of flash-linear-attention's chunk kernels, for the four modes of DESIGN §3 (DeltaNet,
Gated DeltaNet, Q-Delta, gated Q-Delta; `x_t = k_t + λ_t q_t` on the prediction side: `A` pairs
the row's x with the column's k). Layout `[B·H, N, C, D]` (N chunks of C steps; head dims padded
to powers of two ≥ 16; T padded with β = 0, g = 0, which leaves the state untouched, so padding
is exact). Every kernel tiles Dk by 64 (`BK`) and Dv by `bv`, so none holds more than four
`[64, bv]` float32 blocks of state, whatever Dk ≤ 256 and Dv.

Forward (`forward`):
1. `_wy_fwd_kernel`, grid `(N, B·H)`: per chunk, `A = strict(diag(β)(X Kᵀ ⊙ Γ))` over Dk tiles,
   `Ai = (I + A)⁻¹` blockwise (16×16 substitution, matmul merges; `solve_unit_lower`),
   `W = Ai diag(βγ) X` and `Ũ = Ai diag(β) V` tile by tile (fla: chunk_scaled_dot_kkt +
   solve_tril + recompute_w_u, fused).
2. `_state_fwd_kernel`, grid `(Dv/bv, B·H)`: the only sequential kernel; a loop over chunks
   carrying the `[Dk, bv]` state as ≤ 4 float32 `[64, bv]` blocks; stores every chunk's start
   state and `U = Ũ − W S` (fla: chunk_delta_h), and the final state.
3. `_out_kernel`, grid `(Dv/bv, N, B·H)`: `O = scale (diag(γ) Q S + (Q Kᵀ ⊙ Γ) U)`,
   chunk-parallel (fla: chunk_fwd_o).

Backward (`backward`; residuals are the inputs, W/Ũ/Ai and the states are recomputed by 1 and 2):
4. `_dv_local_kernel`, grid `(N, B·H)`: `dU_local = scale (Q Kᵀ ⊙ Γ)ᵀ dO`.
5. `_state_bwd_kernel`, grid `(Dv/bv, B·H)`, chunks in reverse: carries `dS`, stores every chunk's
   end-state gradient and the full `dU = dU_local + diag(d) K dS`; returns `d initial_state`
   (fla: bwd_dhu).
6. `_dqkwg_kernel`, grid `(Dk/64, N, B·H)`: dq, dk from O and S', `dW = −dU Sᵀ`, and the
   gate-gradient terms of O and S' (fla: chunk_bwd_dqkwg).
7. `_wy_bwd_kernel`, grid `(N, B·H)`: back through `W`, `Ũ`, `Ai = (I + A)⁻¹` and `A`: dq (via λ),
   dk, dv, dβ, dλ and the gate terms of W and A (fla: prepare_wy_repr_bwd).
The gate gradient is finished in jnp: a reverse cumsum within each chunk, 0 at resets.

All masks are `where`s (a masked entry is 0 whatever the product held) and decays are formed
in log space with the argument masked before the exp, so g = −inf (a full reset) is exact. The
entry point runs under `nonfinite.contain`, so the kernels see only finite values (and −inf g).

Axis letters: B batch, T time, H heads, Dk/Dv head dims, N chunks, C chunk length.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from moejax.kernels.delta_rule import nonfinite
from moejax.kernels.delta_rule.triton_chunk_common import (
    BK,
    F32,
    Cfg,
    GateVectors,
    TritonChunkOptions,
    as_options,
    decay_matrix,
    from_chunks,
    gate_grad,
    gate_vectors,
    iotas,
    loop,
    mm,
    pad_dim,
    solve_unit_lower,
    tile,
    to_chunks,
)

try:  # jax ≥ 0.7 spells it CompilerParams; older releases TritonCompilerParams.
    from jax.experimental.pallas import triton as _plgpu

    _TritonParams = getattr(_plgpu, "CompilerParams", None) or _plgpu.TritonCompilerParams
except (ImportError, AttributeError):  # pragma: no cover - the Triton plugin is optional
    _TritonParams = None

Array = jax.Array
SQ = getattr(pl, "squeezed", None)

__all__ = ["TritonChunkOptions", "delta_rule_triton", "forward", "backward"]


# ------------------------------------------------------------------------------------------
# Launch table: (num_warps, num_stages, bv) per kernel, padded head dims and dot dtype.


def launch(name: str, Dkp: int, Dvp: int, cfg: Cfg, opts: TritonChunkOptions):
    """Triton launch options and Dv tile of one kernel (chosen for zero spills on sm_90a)."""
    wide = cfg.cd == "float32"
    x3 = wide and cfg.fp == "tf32x3"  # 3 dots per dot (hi/lo operand splits in registers)
    warps, stages, bv = 4, 2, 64
    if name in ("state_fwd", "state_bwd"):
        bv = 32 if Dkp > (128 if name == "state_fwd" else 64) or wide else 64
        stages = 1 if Dkp > 128 and (wide or name == "state_bwd") else 2
        if wide and (Dkp > 64 or x3 and name == "state_bwd"):  # f32 blocks: 8 warps
            warps = 8
            if name == "state_bwd":
                stages = 1
            if name == "state_bwd" and x3 or name == "state_fwd" and (Dkp > 128 or x3):
                bv, stages = 16, 1
    elif name == "dqkwg":
        warps = 8
        if wide:
            bv, stages = 32, (1 if x3 else 2)
    elif name == "wy_bwd":
        warps = 8
        if wide:
            bv = 16 if x3 else 32
    elif name in ("solve", "wy_fwd"):
        warps = 4 if cfg.fp == "tf32x3" else 8
    if opts.block_v is not None:
        bv = opts.block_v
    return warps, stages, min(bv, Dvp)


def _call(kernel, *, grid, in_specs, out_specs, out_shape, opts, name, warps, stages, flops,
          nbytes, transcendentals=0):
    params = None
    if _TritonParams is not None and not opts.interpret:
        params = _TritonParams(num_warps=warps, num_stages=stages)
    return pl.pallas_call(
        kernel, grid=grid, in_specs=in_specs, out_specs=out_specs, out_shape=out_shape,
        interpret=opts.interpret, compiler_params=params, name=name,
        cost_estimate=pl.CostEstimate(flops=int(flops), transcendentals=int(transcendentals),
                                      bytes_accessed=int(nbytes)))


def _nbytes(*arrays):
    return sum(a.size * jnp.dtype(a.dtype).itemsize for a in arrays if a is not None)


# BlockSpecs. "chunk": one chunk `[C, D]` (or `[C]`) of `[B·H, N, C, (D)]`; "seq": a whole
# sequence (the sequential kernels); `at` maps the grid indices to (bh, n, d-block).


def _chunk(a, width=None, at=lambda *g: g):
    if a.ndim == 3:
        return pl.BlockSpec((SQ, SQ, a.shape[2]), lambda *g: (*at(*g)[:2], 0))
    w = a.shape[3] if width is None else width
    return pl.BlockSpec((SQ, SQ, a.shape[2], w), lambda *g: at(*g))


def _seq(a, width=None):
    """Grid `(Dv tiles, B·H)`; width tiles the last dim by the first grid index."""
    if a.ndim == 3:
        return pl.BlockSpec((SQ, *a.shape[1:]), lambda j, i: (i, 0, 0))
    if width is None:
        return pl.BlockSpec((SQ, *a.shape[1:]), lambda j, i: (i, 0, 0, 0))
    return pl.BlockSpec((SQ, *a.shape[1:3], width), lambda j, i: (i, 0, 0, j))


# ------------------------------------------------------------------------------------------
# Kernel bodies. Refs arrive in the launchers' order; optional refs only when the mode uses
# them (g: G, n, γ / d, γ_C; λ).


def _x_tile(q_ref, k_ref, lam, kb, bk):
    """Tile kb of `(q, k, x = k + λ q)` in float32."""
    q = q_ref[:, tile(kb, bk)].astype(F32)
    k = k_ref[:, tile(kb, bk)].astype(F32)
    return q, k, (k if lam is None else k + lam[:, None] * q)


def _solve_kernel(*refs, cfg, has_g, has_lam, bk):
    """Ai = (I + A)⁻¹ with A = strict(diag(β)(X Kᵀ ⊙ Γ)) (fla: scaled_dot_kkt + solve_tril)."""
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
        return XK + mm(cfg, x, k, tb=True)

    XK = loop(Dkp // bk, xk, jnp.zeros((C, C), F32))
    Gam = decay_matrix(r, c, G_ref[...] if has_g else None, n_ref[...] if has_g else None)
    A = jnp.where(r > c, b_ref[...][:, None] * XK * Gam, 0.0)
    ai_ref[...] = solve_unit_lower(cfg, A, r, c).astype(ai_ref.dtype)


def _wy_fwd_kernel(*refs, cfg, has_g, has_lam, bk, bv):
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


def _state_fwd_kernel(*refs, cfg, has_g, bk):
    it = iter(refs)
    k_ref, w_ref, u_ref = next(it), next(it), next(it)
    dec_ref, gc_ref = (next(it), next(it)) if has_g else (None, None)
    h0_ref, hs_ref, vn_ref, hT_ref = (next(it) for _ in range(4))
    N, _, Dkp = k_ref.shape
    nk = Dkp // bk

    def body(n, hk):
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
        return [hk[i] + mm(cfg, k_ref[n, :, tile(i, bk)], vn, ta=True) for i in range(nk)]

    hk = [h0_ref[tile(i, bk), :] for i in range(nk)]
    hk = jax.lax.fori_loop(jnp.int32(0), jnp.int32(N), body, hk)
    for i in range(nk):
        hT_ref[tile(i, bk), :] = hk[i]


def _out_kernel(*refs, cfg, has_g, bk):
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


def _dv_local_kernel(*refs, cfg, has_g, bk, bv):
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


def _state_bwd_kernel(*refs, cfg, has_g, bk):
    it = iter(refs)
    q_ref, k_ref, w_ref, do_ref, dvl_ref = (next(it) for _ in range(5))
    gam_ref, dec_ref, gc_ref = (next(it) for _ in range(3)) if has_g else (None,) * 3
    dhT_ref, dhs_ref, dvn_ref, dh0_ref = (next(it) for _ in range(4))
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
        return [dh[i] + cfg.scale * mm(cfg, q_ref[n, :, tile(i, bk)], do, ta=True)
                - mm(cfg, w_ref[n, :, tile(i, bk)], dv, ta=True) for i in range(nk)]

    dh = [dhT_ref[tile(i, bk), :] for i in range(nk)]
    dh = jax.lax.fori_loop(jnp.int32(0), jnp.int32(N), body, dh)
    for i in range(nk):
        dh0_ref[tile(i, bk), :] = dh[i]


def _dqkwg_kernel(*refs, cfg, has_g, bv):
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


def _wy_bwd_kernel(*refs, cfg, has_g, has_lam, bk, bv):
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

    def pass1_v(vb, carry):
        dAi, db = carry
        v = v_ref[:, tile(vb, bv)].astype(F32)
        du = du_ref[:, tile(vb, bv)]
        t = mm(cfg, Ai, du, ta=True)  # Aiᵀ dŨ
        dv_ref[:, tile(vb, bv)] = b[:, None] * t
        return dAi + mm(cfg, du, b[:, None] * v, tb=True), db + jnp.sum(v * t, axis=1)

    dAi = loop(Dkp // bk, pass1_k, jnp.zeros((C, C), F32))
    dAi, db = loop(v_ref.shape[1] // bv, pass1_v, (dAi, jnp.zeros((C,), F32)))
    # Ai = (I + A)⁻¹: dA = −Aiᵀ dAi Aiᵀ (strict lower part); A = diag(β)(X Kᵀ ⊙ Γ), so
    # d(X Kᵀ) = diag(β) dA ⊙ Γ. D = dA ⊙ Γ is all that pass 2 keeps besides Ai.
    dA = -mm(cfg, mm(cfg, Ai, dAi, ta=True, f32=True), Ai, tb=True, f32=True)
    Gam = decay_matrix(r, c, G_ref[...] if has_g else None, n_ref[...] if has_g else None)
    D = jnp.where(r > c, dA * Gam, 0.0)

    # Pass 2 (per Dk tile): dx = βγ ⊙ Aiᵀ dW + dXK K, dk = dXKᵀ X + dx, dq = λ dx,
    # dλ = Σ dx ⊙ q; the A terms of dβ and dG, Σ over tiles of (D ⊙ X Kᵀ), by linearity.
    def pass2(kb, carry):
        db, dG, dl = carry
        q, k, x = _x_tile(q_ref, k_ref, lam, kb, bk)
        t = mm(cfg, Ai, dw_ref[:, tile(kb, bk)], ta=True)  # Aiᵀ dW
        DK = mm(cfg, D, k)
        dx = bw[:, None] * t + b[:, None] * DK  # dXK K = diag(β) D K
        xt = jnp.sum(x * t, axis=1)
        # D ⊙ X Kᵀ by its row sums x · (D K) (and E = diag(β) D ⊙ X Kᵀ, dΓ ⊙ Γ of A, by its
        # row sums β x · (D K) and column sums k · (dXKᵀ X)): no [C, C] X Kᵀ is formed.
        DXr = jnp.sum(x * DK, axis=1)
        db = db + DXr + (gam * xt if has_g else xt)
        dkx = mm(cfg, D, b[:, None] * x, ta=True)  # dXKᵀ X
        if has_g:
            dG = dG + bw * xt + b * DXr - jnp.sum(k * dkx, axis=1)
        dk_ref[:, tile(kb, bk)] = dkx + dx
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
# Launchers. Inputs in kernel layout: q, k `[B·H, N, C, Dkp]`, v `[B·H, N, C, Dvp]` (input
# dtype), β, λ `[B·H, N, C]` float32, gates a `GateVectors` or None.


def _gate_ins(gv: GateVectors | None, *names):
    return [] if gv is None else [getattr(gv, n) for n in names]


def _specs(arrs, **kw):
    return [_chunk(a, **kw) for a in arrs]


def solve(cfg, opts, q, k, b, gv, lam):
    """`Ai = (I + A)⁻¹` `[B·H, N, C, C]` (float32 for float32 inputs, else the dot dtype)."""
    BH, N, C, Dkp = q.shape
    warps, stages, _ = launch("solve", Dkp, C, cfg, opts)
    ins = [q, k, b, *_gate_ins(gv, "G", "n")] + ([lam] if lam is not None else [])
    out_shape = jax.ShapeDtypeStruct((BH, N, C, C), cfg.store)
    at = lambda n, i: (i, n, 0, 0)
    kernel = functools.partial(_solve_kernel, cfg=cfg, has_g=gv is not None,
                               has_lam=lam is not None, bk=min(BK, Dkp))
    return _call(kernel, grid=(N, BH), in_specs=_specs(ins, at=at),
                 out_specs=_chunk(out_shape, at=at), out_shape=out_shape, opts=opts,
                 name="delta_rule_solve", warps=warps, stages=stages,
                 flops=BH * N * 2 * C * C * (Dkp + 2 * C),
                 transcendentals=BH * N * C * C if gv is not None else 0,
                 nbytes=_nbytes(*ins) + BH * N * C * C * cfg.store.itemsize)(*ins)


def wy_fwd(cfg, opts, q, k, v, b, gv, lam, Ai):
    """`(W [B·H, N, C, Dkp] (dot dtype), Ũ [B·H, N, C, Dvp] float32)`."""
    BH, N, C, Dkp = q.shape
    Dvp = v.shape[-1]
    warps, stages, bv = launch("wy_fwd", Dkp, Dvp, cfg, opts)
    ins = ([q, k, v, b, *_gate_ins(gv, "gamma")] + ([lam] if lam is not None else []) + [Ai])
    out_shape = [jax.ShapeDtypeStruct((BH, N, C, Dkp), cfg.store),
                 jax.ShapeDtypeStruct((BH, N, C, Dvp), F32)]
    at = lambda n, i: (i, n, 0, 0)
    kernel = functools.partial(_wy_fwd_kernel, cfg=cfg, has_g=gv is not None,
                               has_lam=lam is not None, bk=min(BK, Dkp), bv=bv)
    return _call(kernel, grid=(N, BH), in_specs=_specs(ins, at=at),
                 out_specs=_specs(out_shape, at=at), out_shape=out_shape, opts=opts,
                 name="delta_rule_intra_fwd", warps=warps, stages=stages,
                 flops=BH * N * 2 * C * C * (Dkp + Dvp),
                 nbytes=_nbytes(*ins) + BH * N * C * (Dkp * cfg.store.itemsize + 4 * Dvp))(*ins)


def state_fwd(cfg, opts, k, W, Ut, gv, h0):
    """`(chunk start states [B·H, N, Dkp, Dvp], U [B·H, N, C, Dvp], S_T [B·H, Dkp, Dvp] f32)`."""
    BH, N, C, Dkp = k.shape
    Dvp = Ut.shape[-1]
    warps, stages, bv = launch("state_fwd", Dkp, Dvp, cfg, opts)
    ins = [k, W, Ut, *_gate_ins(gv, "dec", "gC"), h0]
    in_specs = [_seq(k), _seq(W), _seq(Ut, bv), *(_seq(a) for a in _gate_ins(gv, "dec", "gC")),
                pl.BlockSpec((SQ, Dkp, bv), lambda j, i: (i, 0, j))]
    out_shape = [jax.ShapeDtypeStruct((BH, N, Dkp, Dvp), cfg.store),
                 jax.ShapeDtypeStruct((BH, N, C, Dvp), cfg.store),
                 jax.ShapeDtypeStruct((BH, Dkp, Dvp), F32)]
    out_specs = [pl.BlockSpec((SQ, N, Dkp, bv), lambda j, i: (i, 0, 0, j)),
                 _seq(out_shape[1], bv), in_specs[-1]]
    kernel = functools.partial(_state_fwd_kernel, cfg=cfg, has_g=gv is not None,
                               bk=min(BK, Dkp))
    return _call(kernel, grid=(Dvp // bv, BH), in_specs=in_specs, out_specs=out_specs,
                 out_shape=out_shape, opts=opts, name="delta_rule_state_fwd", warps=warps,
                 stages=stages, flops=BH * N * 4 * C * Dkp * Dvp,
                 nbytes=_nbytes(*ins) + BH * N * (Dkp + C) * Dvp * cfg.store.itemsize)(*ins)


def out_fwd(cfg, opts, q, k, vn, hs, gv):
    """`O [B·H, N, C, Dvp]` float32."""
    BH, N, C, Dkp = q.shape
    Dvp = vn.shape[-1]
    warps, stages, bv = launch("out", Dkp, Dvp, cfg, opts)
    ins = [q, k, vn, hs, *_gate_ins(gv, "G", "n", "gamma")]
    at = lambda j, n, i: (i, n, 0, j)
    full = lambda j, n, i: (i, n, 0, 0)
    in_specs = [_chunk(q, at=full), _chunk(k, at=full), _chunk(vn, bv, at=at),
                pl.BlockSpec((SQ, SQ, Dkp, bv), at),
                *(_chunk(a, at=at) for a in _gate_ins(gv, "G", "n", "gamma"))]
    out_shape = jax.ShapeDtypeStruct((BH, N, C, Dvp), F32)
    kernel = functools.partial(_out_kernel, cfg=cfg, has_g=gv is not None, bk=min(BK, Dkp))
    return _call(kernel, grid=(Dvp // bv, N, BH), in_specs=in_specs,
                 out_specs=_chunk(out_shape, bv, at=at), out_shape=out_shape, opts=opts,
                 name="delta_rule_out", warps=warps, stages=stages,
                 flops=BH * N * 2 * C * Dvp * (Dkp + C) + BH * N * 2 * C * C * Dkp * Dvp // bv,
                 nbytes=_nbytes(*ins) + 4 * BH * N * C * Dvp)(*ins)


def dv_local(cfg, opts, q, k, dO, gv):
    """`scale (Q Kᵀ ⊙ Γ)ᵀ dO` `[B·H, N, C, Dvp]` float32."""
    BH, N, C, Dkp = q.shape
    Dvp = dO.shape[-1]
    warps, stages, bv = launch("dv_local", Dkp, Dvp, cfg, opts)
    ins = [q, k, dO, *_gate_ins(gv, "G", "n")]
    at = lambda n, i: (i, n, 0, 0)
    out_shape = jax.ShapeDtypeStruct((BH, N, C, Dvp), F32)
    kernel = functools.partial(_dv_local_kernel, cfg=cfg, has_g=gv is not None, bk=min(BK, Dkp),
                               bv=bv)
    return _call(kernel, grid=(N, BH), in_specs=_specs(ins, at=at),
                 out_specs=_chunk(out_shape, at=at), out_shape=out_shape, opts=opts,
                 name="delta_rule_dv_local", warps=warps, stages=stages,
                 flops=BH * N * 2 * C * C * (Dkp + Dvp), nbytes=_nbytes(*ins) + 4 * dO.size)(*ins)


def state_bwd(cfg, opts, q, k, W, dO, dvl, gv, dhT):
    """`(end-state grads [B·H, N, Dkp, Dvp], dU [B·H, N, C, Dvp], d S_0 [B·H, Dkp, Dvp] f32)`."""
    BH, N, C, Dkp = q.shape
    Dvp = dO.shape[-1]
    warps, stages, bv = launch("state_bwd", Dkp, Dvp, cfg, opts)
    gins = _gate_ins(gv, "gamma", "dec", "gC")
    ins = [q, k, W, dO, dvl, *gins, dhT]
    state_spec = pl.BlockSpec((SQ, Dkp, bv), lambda j, i: (i, 0, j))
    in_specs = [_seq(q), _seq(k), _seq(W), _seq(dO, bv), _seq(dvl, bv),
                *(_seq(a) for a in gins), state_spec]
    out_shape = [jax.ShapeDtypeStruct((BH, N, Dkp, Dvp), cfg.store),
                 jax.ShapeDtypeStruct((BH, N, C, Dvp), cfg.store),
                 jax.ShapeDtypeStruct((BH, Dkp, Dvp), F32)]
    out_specs = [pl.BlockSpec((SQ, N, Dkp, bv), lambda j, i: (i, 0, 0, j)),
                 _seq(out_shape[1], bv), state_spec]
    kernel = functools.partial(_state_bwd_kernel, cfg=cfg, has_g=gv is not None,
                               bk=min(BK, Dkp))
    return _call(kernel, grid=(Dvp // bv, BH), in_specs=in_specs, out_specs=out_specs,
                 out_shape=out_shape, opts=opts, name="delta_rule_state_bwd", warps=warps,
                 stages=stages, flops=BH * N * 6 * C * Dkp * Dvp,
                 nbytes=_nbytes(*ins) + BH * N * (Dkp + C) * Dvp * cfg.store.itemsize)(*ins)


def dqkwg(cfg, opts, q, k, vn, hs, dhs, dO, dvn, gv):
    """`(dq, dk [B·H, N, C, Dkp] f32, dW [B·H, N, C, Dkp], dG [B·H, N, Dkp/64, C] f32 | None)`."""
    BH, N, C, Dkp = q.shape
    Dvp = dO.shape[-1]
    # 3×TF32: Dk tiles of 32 (the epilogue's [C, bk] operands are split hi/lo in registers)
    bk = min(BK // 2 if cfg.cd == "float32" and cfg.fp == "tf32x3" else BK, Dkp)
    warps, stages, bv = launch("dqkwg", Dkp, Dvp, cfg, opts)
    gins = _gate_ins(gv, "G", "n", "gamma", "dec", "gC")
    ins = [q, k, vn, hs, dhs, dO, dvn, *gins]
    kt = lambda kb, n, i: (i, n, 0, kb)
    full = lambda kb, n, i: (i, n, 0, 0)
    st = lambda kb, n, i: (i, n, kb, 0)
    in_specs = [_chunk(q, bk, at=kt), _chunk(k, bk, at=kt), _chunk(vn, at=full),
                pl.BlockSpec((SQ, SQ, bk, Dvp), st), pl.BlockSpec((SQ, SQ, bk, Dvp), st),
                _chunk(dO, at=full), _chunk(dvn, at=full), *(_chunk(a, at=full) for a in gins)]
    out_shape = [jax.ShapeDtypeStruct((BH, N, C, Dkp), F32),
                 jax.ShapeDtypeStruct((BH, N, C, Dkp), F32),
                 jax.ShapeDtypeStruct((BH, N, C, Dkp), cfg.store)]
    out_specs = [_chunk(a, bk, at=kt) for a in out_shape]
    if gv is not None:
        out_shape.append(jax.ShapeDtypeStruct((BH, N, Dkp // bk, C), F32))
        out_specs.append(pl.BlockSpec((SQ, SQ, SQ, C), lambda kb, n, i: (i, n, kb, 0)))
    kernel = functools.partial(_dqkwg_kernel, cfg=cfg, has_g=gv is not None, bv=bv)
    outs = _call(kernel, grid=(Dkp // bk, N, BH), in_specs=in_specs, out_specs=out_specs,
                 out_shape=out_shape, opts=opts, name="delta_rule_dqkwg", warps=warps,
                 stages=stages, flops=BH * N * 2 * C * (4 * Dkp * Dvp + 3 * C * Dkp),
                 nbytes=_nbytes(*ins) + 12 * BH * N * C * Dkp)(*ins)
    return outs[0], outs[1], outs[2], (outs[3] if gv is not None else None)


def wy_bwd(cfg, opts, q, k, v, b, gv, lam, Ai, dW, dU):
    """`(dk, dv, dβ, dq | None, dλ | None, dG | None)` of the WY step, float32."""
    BH, N, C, Dkp = q.shape
    Dvp = v.shape[-1]
    warps, stages, bv = launch("wy_bwd", Dkp, Dvp, cfg, opts)
    has_g, has_lam = gv is not None, lam is not None
    ins = ([q, k, v, b, *_gate_ins(gv, "G", "n", "gamma")] + ([lam] if has_lam else [])
           + [Ai, dW, dU])
    f32 = lambda a: jax.ShapeDtypeStruct(a.shape, F32)
    out_shape = [f32(k), f32(v), f32(b)]
    if has_lam:
        out_shape += [f32(q), f32(b)]
    if has_g:
        out_shape.append(f32(b))
    at = lambda n, i: (i, n, 0, 0)
    # float32: Dk tiles of 32 (pass 2 is then a loop even at Dk = 64, and its operands halve)
    bk = min(BK // 2 if cfg.cd == "float32" else BK, Dkp)
    kernel = functools.partial(_wy_bwd_kernel, cfg=cfg, has_g=has_g, has_lam=has_lam, bk=bk,
                               bv=bv)
    outs = _call(kernel, grid=(N, BH), in_specs=_specs(ins, at=at),
                 out_specs=_specs(out_shape, at=at), out_shape=out_shape, opts=opts,
                 name="delta_rule_intra_bwd", warps=warps, stages=stages,
                 flops=BH * N * 2 * C * C * (4 * Dkp + 3 * Dvp + 2 * C),
                 transcendentals=BH * N * C * C if has_g else 0,
                 nbytes=_nbytes(*ins) + 4 * BH * N * C * (2 * Dkp + Dvp))(*ins)
    dk, dv, db, *rest = outs
    dq = rest.pop(0) if has_lam else None
    dl = rest.pop(0) if has_lam else None
    dG = rest.pop(0) if has_g else None
    return dk, dv, db, dq, dl, dG


# ------------------------------------------------------------------------------------------
# Forward / backward on the kernel layout and the custom VJP.


def _prepare(q, k, v, beta, g, lam, h0, C):
    B, T, H, Dk = q.shape
    Dv = v.shape[-1]
    Dkp, Dvp = pad_dim(Dk), pad_dim(Dv)
    vec = lambda a: None if a is None else to_chunks(a.astype(F32), C)
    h = jnp.pad(h0.astype(F32), ((0, 0), (0, 0), (0, Dkp - Dk), (0, Dvp - Dv)))
    gv = None if g is None else gate_vectors(vec(g))
    return (to_chunks(q, C, Dkp), to_chunks(k, C, Dkp), to_chunks(v, C, Dvp), vec(beta), gv,
            vec(lam), h.reshape(B * H, Dkp, Dvp))


def forward(q, k, v, beta, g, lam, h0, opts: TritonChunkOptions):
    """`(o [B, T, H, Dv] float32, S_T [B, H, Dk, Dv] float32)` (no custom VJP)."""
    B, T, H, Dk = q.shape
    Dv = v.shape[-1]
    cfg = Cfg.make(q.dtype, opts)
    qc, kc, vc, b, gv, lc, h = _prepare(q, k, v, beta, g, lam, h0, opts.kernel_chunk(T))
    Ai = solve(cfg, opts, qc, kc, b, gv, lc)
    W, Ut = wy_fwd(cfg, opts, qc, kc, vc, b, gv, lc, Ai)
    hs, vn, hT = state_fwd(cfg, opts, kc, W, Ut, gv, h)
    O = out_fwd(cfg, opts, qc, kc, vn, hs, gv)
    Dkp, Dvp = h.shape[1:]
    return from_chunks(O, B, T, H, Dv), hT.reshape(B, H, Dkp, Dvp)[..., :Dk, :Dv]


def backward(q, k, v, beta, g, lam, h0, do, dhT, opts: TritonChunkOptions):
    """Gradients `(dq, dk, dv, dβ, dg, dλ, dh0)` in float32 (dg/dλ None when g/λ are)."""
    B, T, H, Dk = q.shape
    Dv = v.shape[-1]
    cfg = Cfg.make(q.dtype, opts)
    C = opts.kernel_chunk(T)
    qc, kc, vc, b, gv, lc, h = _prepare(q, k, v, beta, g, lam, h0, C)
    Dkp, Dvp = h.shape[1:]
    Ai = solve(cfg, opts, qc, kc, b, gv, lc)
    W, Ut = wy_fwd(cfg, opts, qc, kc, vc, b, gv, lc, Ai)
    hs, vn, _ = state_fwd(cfg, opts, kc, W, Ut, gv, h)
    dO = to_chunks(do.astype(F32), C, Dvp, dtype=cfg.store)
    dhT = jnp.pad(dhT.astype(F32), ((0, 0), (0, 0), (0, Dkp - Dk), (0, Dvp - Dv)))
    dvl = dv_local(cfg, opts, qc, kc, dO, gv)
    dhs, dU, dh0 = state_bwd(cfg, opts, qc, kc, W, dO, dvl, gv, dhT.reshape(B * H, Dkp, Dvp))
    dq, dk, dW, dG1 = dqkwg(cfg, opts, qc, kc, vn, hs, dhs, dO, dU, gv)
    dk2, dv, db, dq2, dl, dG2 = wy_bwd(cfg, opts, qc, kc, vc, b, gv, lc, Ai, dW, dU)
    dk = dk + dk2
    if dq2 is not None:
        dq = dq + dq2
    dg = None if gv is None else gate_grad(gv, jnp.sum(dG1, axis=2) + dG2)
    vec = lambda a: None if a is None else from_chunks(a, B, T, H)
    return (from_chunks(dq, B, T, H, Dk), from_chunks(dk, B, T, H, Dk),
            from_chunks(dv, B, T, H, Dv), vec(db), vec(dg), vec(dl),
            dh0.reshape(B, H, Dkp, Dvp)[..., :Dk, :Dv])


@functools.partial(jax.custom_vjp, nondiff_argnums=(7,))
def _delta_rule(q, k, v, beta, g, lam, h0, opts):
    return forward(q, k, v, beta, g, lam, h0, opts)


def _delta_rule_fwd(q, k, v, beta, g, lam, h0, opts):
    return forward(q, k, v, beta, g, lam, h0, opts), (q, k, v, beta, g, lam, h0)


def _delta_rule_bwd(opts, res, cts):
    q, k, v, beta, g, lam, h0 = res
    grads = backward(*res, *cts, opts)
    cast = lambda d, a: None if a is None else d.astype(a.dtype)
    return tuple(cast(d, a) for d, a in zip(grads, (q, k, v, beta, g, lam, h0), strict=True))


_delta_rule.defvjp(_delta_rule_fwd, _delta_rule_bwd)


def delta_rule_triton(q, k, v, beta, g, lam, h0, opts):
    """Hopper (Triton) chunk delta rule with custom VJP; `pallas_gpu.delta_rule_gpu`'s contract.

    Non-finite inputs are contained as in `nonfinite.contain` (outputs before a bad step, other
    sequences and heads, and their gradients are unaffected); g = −inf is a full reset. float64
    inputs are rounded to float32.

    Args:
      q, k: `[B, T, H, Dk]`; v: `[B, T, H, Dv]`; beta: `[B, T, H]`; g, lam: `[B, T, H]` or None;
      h0: `[B, H, Dk, Dv]` initial state (zeros for none).
      opts: `TritonChunkOptions`, or a `pallas_gpu.DeltaRuleOptions` (its scale, chunk_size
        and interpret are used). float32 dot precision follows `jax_default_matmul_precision`
        unless `TritonChunkOptions.fp32_precision` is set.

    Returns:
      `(o [B, T, H, Dv] float32, S [B, H, Dk, Dv] float32)`.
    """
    opts = as_options(opts)
    narrow = lambda a: (a if a is None or jnp.dtype(a.dtype).itemsize <= 4
                        else a.astype(jnp.float32))
    return nonfinite.contain(_delta_rule, *map(narrow, (q, k, v, beta, g, lam, h0)), opts)
