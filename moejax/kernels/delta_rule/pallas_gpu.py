"""Delta-rule chunk kernels for Hopper GPUs (Pallas → Triton): the forward and backward launchers.

The design of flash-linear-attention's chunk kernels, for the four modes of DESIGN §3 (DeltaNet,
Gated DeltaNet, Q-Delta, gated Q-Delta; `x_t = k_t + λ_t q_t` on the prediction side: `A` pairs
the row's x with the column's k; `pairing="authors"` the row's k with the column's x, as the
released Q-Delta kernel does, which changes only kernels 1 (A) and 7 (its gradient)). Layout
`[B·H, N, C, D]` (N chunks of C steps; head dims padded to powers of two ≥ 16; T padded with
β = 0, g = 0, which leaves the state untouched, so padding is exact). Every kernel tiles Dk by
64 (`BK`) and Dv by `bv`, so none holds more than four `[64, bv]` float32 blocks of state,
whatever Dk ≤ 256 and Dv.

Forward (`delta_rule_fwd`; the kernel bodies live in `pallas_gpu_kernel.py`):
1. `solve_kernel` then `wy_fwd_kernel`, grid `(N, B·H)`: per chunk,
   `A = strict(diag(β)(X Kᵀ ⊙ Γ))` over Dk tiles, `Ai = (I + A)⁻¹` blockwise (16×16
   substitution, matmul merges; `solve_unit_lower`), then `W = Ai diag(βγ) X` and
   `Ũ = Ai diag(β) V` tile by tile (fla: chunk_scaled_dot_kkt + solve_tril, recompute_w_u).
2. `state_fwd_kernel`, grid `(Dv/bv, B·H)`: the only sequential kernel; a loop over chunks
   carrying the `[Dk, bv]` state as ≤ 4 float32 `[64, bv]` blocks; stores every chunk's start
   state and `U = Ũ − W S` (fla: chunk_delta_h), and the final state.
3. `out_kernel`, grid `(Dv/bv, N, B·H)`: `O = scale (diag(γ) Q S + (Q Kᵀ ⊙ Γ) U)`,
   chunk-parallel (fla: chunk_fwd_o).

Backward (`delta_rule_bwd`; W/Ũ/Ai and the states are recomputed by 1 and 2):
4. `dv_local_kernel`, grid `(N, B·H)`: `dU_local = scale (Q Kᵀ ⊙ Γ)ᵀ dO`.
5. `state_bwd_kernel`, grid `(Dv/bv, B·H)`, chunks in reverse: carries `dS`, stores every chunk's
   end-state gradient and the full `dU = dU_local + diag(d) K dS`; returns `d initial_state`
   (fla: bwd_dhu).
6. `dqkwg_kernel`, grid `(Dk/64, N, B·H)`: dq, dk from O and S', `dW = −dU Sᵀ`, and the
   gate-gradient terms of O and S' (fla: chunk_bwd_dqkwg).
7. `wy_bwd_kernel`, grid `(N, B·H)`: back through `W`, `Ũ`, `Ai = (I + A)⁻¹` and `A`: dq (via λ),
   dk, dv, dβ, dλ and the gate terms of W and A (fla: prepare_wy_repr_bwd).
The gate gradient is finished in jnp: a reverse cumsum within each chunk, 0 at resets.

Chunk restarts (`rs`/`h0s`, packed sequences; `pallas_common.KERNEL_CONTRACT`): only the two
sequential kernels change. `state_fwd` records `pre[n]`, the carried state, then starts chunk n
from `h0s[n]` where `rs[n]`; `state_bwd` splits the start-state gradient of a restarting chunk
off into `dh0s[n]` and carries `(0 if rs[n] else dS_0) + dpre[n]` to chunk n − 1. The gate
gradients need nothing new (they read the stored start states and end-state gradients).

Per-channel decay (`gk [B, T, H, Dk]`, Kimi Delta Attention; never with g, `ops.py` folds g into
it). The launcher forms, in plain jnp and exactly in log space (`_channel_factors`: resets
counted per channel, every exp argument masked before the exp, the `[C, C]` pair matrices
`M_tj = Σ_d x_td k_jd exp(G_td − G_jd)` and `P_tj = Σ_d q_td k_jd exp(G_td − G_jd)` by the
chunk path's secondary chunking, so no factor exceeds 1 for gk ≤ 0), the decayed operands
`Q ⊙ γ`, `K ⊙ d`, `X ⊙ γ`, the per-channel `γ_C`, and M, P. The kernels do all the rest:
`solve_pair_kernel` (A = strict(diag(β) M)), `wy_fwd_kernel` on `X ⊙ γ`, the state kernels with
`diag(γ_C)` (`has_gk`), `out_pair_kernel`, and in the backward `dv_local_pair_kernel`,
`dqkwg_channel_kernel`, `wy_bwd_channel_kernel`, which return the gradients w.r.t. those
operands; `jax.vjp` of `_channel_factors` takes them to dq, dk, dλ and dgk.

All masks are `where`s (a masked entry is 0 whatever the product held) and decays are formed
in log space with the argument masked before the exp, so g = −inf (a full reset) is exact.
`ops.py` wraps the two launchers in the custom VJP and runs it under `nonfinite.contain`, so the
kernels see only finite values (and −inf g). `check_supported` raises `NotImplementedError` for
inputs outside the sm_90a compile check (`moejax.kernels.gpu_compile`), so `impl="auto"` can
fall back.

Axis letters: B batch, T time, H heads, Dk/Dv head dims, N chunks, C chunk length.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from moejax.kernels.delta_rule import chunk as chunk_path
from moejax.kernels.delta_rule import pallas_gpu_kernel as pk
from moejax.kernels.delta_rule.pallas_common import (
    F32,
    GPU_KERNEL_DTYPES,
    GPU_KERNEL_MAX_DK,
    GPU_KERNEL_MAX_DV,
    MIN_BLOCK,
    SQUEEZED,
    DeltaRuleOptions,
    clamp_chunk,
    from_chunks,
    nbytes,
    next_pow2,
    pad_state,
    pallas_call,
    to_chunks,
    unpad_state,
)

try:  # jax ≥ 0.7 spells it CompilerParams; older releases TritonCompilerParams.
    from jax.experimental.pallas import triton as _plgpu

    _TritonParams = getattr(_plgpu, "CompilerParams", None) or _plgpu.TritonCompilerParams
except (ImportError, AttributeError):  # pragma: no cover - the Triton plugin is optional
    _TritonParams = None

Array = jax.Array
BK = pk.BK
SQ = SQUEEZED

__all__ = ["check_supported", "delta_rule_bwd", "delta_rule_fwd", "kernel_chunk", "pad_dim"]


def pad_dim(d: int) -> int:
    """Head dims are padded to powers of two ≥ 16 (Triton tensors, dots need ≥ 16)."""
    return max(MIN_BLOCK, next_pow2(d))


def kernel_chunk(opts: DeltaRuleOptions, T: int) -> int:
    """Steps per chunk: a power of two in [16, 64] (results do not depend on it)."""
    return clamp_chunk(opts, T, largest=64)


def check_supported(q, v, opts: DeltaRuleOptions) -> None:
    """Raises `NotImplementedError` when the compiled kernels (not interpret mode) would run
    inputs the sm_90a compile check does not cover: an input dtype other than bfloat16/float32
    (float64 counts as the float32 it is rounded to) or head dims past `Dk <= 256`,
    `Dv <= 512`."""
    if opts.interpret:
        return
    dtype = jnp.dtype(q.dtype)
    if dtype == jnp.float64:
        dtype = jnp.dtype(jnp.float32)
    if dtype not in GPU_KERNEL_DTYPES:
        raise NotImplementedError(
            f"dtype {q.dtype} (covered: {', '.join(map(str, GPU_KERNEL_DTYPES))}) is not "
            "covered by the GPU kernels' compile check")
    if q.shape[-1] > GPU_KERNEL_MAX_DK or v.shape[-1] > GPU_KERNEL_MAX_DV:
        raise NotImplementedError(
            f"head dims Dk={q.shape[-1]}, Dv={v.shape[-1]} (covered: Dk <= {GPU_KERNEL_MAX_DK}, "
            f"Dv <= {GPU_KERNEL_MAX_DV}) is not covered by the GPU kernels' compile check")


# ------------------------------------------------------------------------------------------
# Launch table: (num_warps, num_stages, bv) per kernel, padded head dims and dot dtype.


def _launch(name: str, Dkp: int, Dvp: int, cfg: pk.Cfg, opts: DeltaRuleOptions, *,
            restarts: bool = False):
    """Triton launch options and Dv tile of one kernel (chosen for zero spills on sm_90a).
    `restarts`: the state kernels' restart variant (it holds the restart states' tiles too)."""
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
    if restarts and not wide and Dkp > 128:  # bf16/f16, four Dk tiles: halve the state tiles
        bv = min(bv, 16)
    if opts.block_v is not None:
        bv = opts.block_v
    return warps, stages, min(bv, Dvp)


def _call(kernel, *, opts, warps, stages, **kw):
    params = None
    if _TritonParams is not None and not opts.interpret:
        params = _TritonParams(num_warps=warps, num_stages=stages)
    return pallas_call(kernel, compiler_params=params, interpret=opts.interpret, **kw)


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
# Gate factors (plain jnp, outside the kernels).


@dataclasses.dataclass(frozen=True)
class _GateVectors:
    """Per-step gate factors `[B·H, N, C]` float32 (the math of `pallas_gpu_kernel.py`)."""

    G: Array  # reset-free cumulative log decay
    n: Array  # resets in [0, t] (small integers as float32)
    gamma: Array  # γ_t = exp(G_t), 0 after a reset in [0, t]
    dec: Array  # exp(G_C − G_t), 0 if a reset lies in (t, C−1]
    gC: Array  # γ_C = exp(G_C) (0 after any reset), replicated over the C steps
    reset: Array  # bool, exp(g_t) == 0


def _gate_vectors(g) -> _GateVectors:
    """From the chunked log decays `[B·H, N, C]` (g may hold −inf: a full reset)."""
    reset = jnp.exp(g) == 0.0
    G = jnp.cumsum(jnp.where(reset, 0.0, g), axis=-1)
    n = jnp.cumsum(reset.astype(F32), axis=-1)
    nC, GC = n[..., -1:], G[..., -1:]
    gamma = jnp.where(n == 0.0, jnp.exp(G), 0.0)
    dec = jnp.where(n == nC, jnp.exp(jnp.where(n == nC, GC - G, 0.0)), 0.0)
    gC = jnp.broadcast_to(jnp.where(nC == 0.0, jnp.exp(GC), 0.0), g.shape)
    return _GateVectors(G, n, gamma, dec, gC, reset)


def _gate_grad(gv: _GateVectors, dG):
    """`dg` `[B·H, N, C]` from the gradient w.r.t. the cumulative G: a reverse cumsum within the
    chunk (`G_t = Σ_{s≤t} g_s`), 0 at a reset (`d exp(g)/dg = exp(g) = 0` there)."""
    dg = jnp.flip(jnp.cumsum(jnp.flip(dG, -1), axis=-1), -1)
    return jnp.where(gv.reset, 0.0, dg)


def _channel_factors(q, k, lam, gk):
    """Per-channel decay (gk): what the kernels take, from chunked float32 q, k, gk
    `[B·H, N, C, Dkp]` and λ `[B·H, N, C]` or None, exactly in log space (`chunk.py`,
    "Per-channel decay": resets counted per channel, every exp argument masked before the exp,
    the pair factors by secondary chunking so that no factor exceeds 1 for gk ≤ 0).

    Returns `(Q ⊙ γ, K ⊙ d, X ⊙ γ [B·H, N, C, Dkp], γ_C [B·H, N, Dkp], M, P [B·H, N, C, C])`
    with `γ_t = exp(G_t)` (0 after a reset of the channel in [0, t]), `d_t = exp(G_C − G_t)`
    (0 if one lies in (t, C−1]), `M_tj = Σ_d x_td k_jd exp(G_td − G_jd)` and
    `P_tj = Σ_d q_td k_jd exp(G_td − G_jd)` for j ≤ t (0 above the diagonal and where a reset
    of channel d lies in (j, t]). Plain jnp, differentiated by jax in the backward."""
    x = k if lam is None else k + lam[..., None] * q
    G, n = chunk_path._channel_gates(gk)
    gamma = chunk_path._masked_exp(n == 0, G)
    dec = chunk_path._masked_exp(n == n[..., -1:, :], G[..., -1:, :] - G)
    M, P = chunk_path._channel_pairs((x, q), k, G, n)
    return q * gamma, k * dec, x * gamma, gamma[..., -1, :], M, P


@dataclasses.dataclass(frozen=True)
class _ChannelGates:
    """The per-channel-decay operands of the kernels (`_channel_factors`); Qg, Kd, Xg in the
    dot dtype (they are only dot operands but for Xg's term of dβ)."""

    Qg: Array  # Q ⊙ γ
    Kd: Array  # K ⊙ d
    Xg: Array  # X ⊙ γ
    gC: Array  # γ_C per key channel [B·H, N, Dkp]
    M: Array  # A's pairs (before diag(β) and the strict mask) [B·H, N, C, C]
    P: Array  # O's pairs [B·H, N, C, C]

    @classmethod
    def make(cls, cfg, factors):
        Qg, Kd, Xg, gC, M, P = factors
        return cls(Qg.astype(cfg.store), Kd.astype(cfg.store), Xg.astype(cfg.store), gC, M, P)


def _restart_layout(rs, states, H, Dkp, Dvp, N):
    """`(rs [B·H, N, 16] int32 (replicated: Triton loads it as a vector), states
    [B·H, N, Dkp, Dvp] float32)` from `rs [B, N]` and `[B, N, H, Dk, Dv]` (h0s or dpre)."""
    B = rs.shape[0]
    if rs.shape[1] != N:
        raise ValueError(f"rs must be [B, N] with N = {N} chunks, got {rs.shape}")
    r = jnp.broadcast_to(rs.astype(jnp.int32)[:, None, :, None], (B, H, N, MIN_BLOCK))
    return r.reshape(B * H, N, MIN_BLOCK), _states_in(states, Dkp, Dvp)


def _states_in(states, Dkp, Dvp):
    """`[B, N, H, Dk, Dv]` → `[B·H, N, Dkp, Dvp]` float32, zero-padded."""
    B, N, H, Dk, Dv = states.shape
    a = jnp.pad(states.astype(F32), ((0, 0),) * 3 + ((0, Dkp - Dk), (0, Dvp - Dv)))
    return a.transpose(0, 2, 1, 3, 4).reshape(B * H, N, Dkp, Dvp)


def _states_out(a, B, H, Dk, Dv):
    """`[B·H, N, Dkp, Dvp]` → `[B, N, H, Dk, Dv]`."""
    a = a.reshape(B, H, *a.shape[1:]).transpose(0, 2, 1, 3, 4)
    return a[..., :Dk, :Dv]


# ------------------------------------------------------------------------------------------
# Launchers. Inputs in kernel layout: q, k `[B·H, N, C, Dkp]`, v `[B·H, N, C, Dvp]` (input
# dtype), β, λ `[B·H, N, C]` float32, gates a `_GateVectors` or None.


def _gate_ins(gv: _GateVectors | None, *names):
    return [] if gv is None else [getattr(gv, n) for n in names]


def _specs(arrs, **kw):
    return [_chunk(a, **kw) for a in arrs]


def _solve(cfg, opts, q, k, b, gv, lam):
    """`Ai = (I + A)⁻¹` `[B·H, N, C, C]` (float32 for float32 inputs, else the dot dtype)."""
    BH, N, C, Dkp = q.shape
    warps, stages, _ = _launch("solve", Dkp, C, cfg, opts)
    ins = [q, k, b, *_gate_ins(gv, "G", "n")] + ([lam] if lam is not None else [])
    out_shape = jax.ShapeDtypeStruct((BH, N, C, C), cfg.store)
    at = lambda n, i: (i, n, 0, 0)
    kernel = functools.partial(pk.solve_kernel, cfg=cfg, has_g=gv is not None,
                               has_lam=lam is not None, bk=min(BK, Dkp),
                               authors=opts.uses_authors_pairing(lam))
    return _call(kernel, grid=(N, BH), in_specs=_specs(ins, at=at),
                 out_specs=_chunk(out_shape, at=at), out_shape=out_shape, opts=opts,
                 name="delta_rule_solve", warps=warps, stages=stages,
                 flops=BH * N * 2 * C * C * (Dkp + 2 * C),
                 transcendentals=BH * N * C * C if gv is not None else 0,
                 nbytes=nbytes(*ins) + BH * N * C * C * cfg.store.itemsize)(*ins)


def _wy_fwd(cfg, opts, q, k, v, b, gv, lam, Ai):
    """`(W [B·H, N, C, Dkp] (dot dtype), Ũ [B·H, N, C, Dvp] float32)`."""
    BH, N, C, Dkp = q.shape
    Dvp = v.shape[-1]
    warps, stages, bv = _launch("wy_fwd", Dkp, Dvp, cfg, opts)
    ins = ([q, k, v, b, *_gate_ins(gv, "gamma")] + ([lam] if lam is not None else []) + [Ai])
    out_shape = [jax.ShapeDtypeStruct((BH, N, C, Dkp), cfg.store),
                 jax.ShapeDtypeStruct((BH, N, C, Dvp), F32)]
    at = lambda n, i: (i, n, 0, 0)
    kernel = functools.partial(pk.wy_fwd_kernel, cfg=cfg, has_g=gv is not None,
                               has_lam=lam is not None, bk=min(BK, Dkp), bv=bv)
    return _call(kernel, grid=(N, BH), in_specs=_specs(ins, at=at),
                 out_specs=_specs(out_shape, at=at), out_shape=out_shape, opts=opts,
                 name="delta_rule_intra_fwd", warps=warps, stages=stages,
                 flops=BH * N * 2 * C * C * (Dkp + Dvp),
                 nbytes=nbytes(*ins) + BH * N * C * (Dkp * cfg.store.itemsize + 4 * Dvp))(*ins)


def _state_fwd(cfg, opts, k, W, Ut, gv, h0, cg=None, rst=None):
    """`(chunk start states [B·H, N, Dkp, Dvp], U [B·H, N, C, Dvp], S_T [B·H, Dkp, Dvp] f32,
    pre [B·H, N, Dkp, Dvp] f32 | None)`. `cg`: a `_ChannelGates` (k is then `K ⊙ d`); `rst`:
    `(rs [B·H, N, 16] int32, h0s [B·H, N, Dkp, Dvp] f32)` or None."""
    BH, N, C, Dkp = k.shape
    Dvp = Ut.shape[-1]
    warps, stages, bv = _launch("state_fwd", Dkp, Dvp, cfg, opts, restarts=rst is not None)
    state_spec = pl.BlockSpec((SQ, Dkp, bv), lambda j, i: (i, 0, j))
    states_spec = pl.BlockSpec((SQ, N, Dkp, bv), lambda j, i: (i, 0, 0, j))
    gins = _gate_ins(gv, "dec", "gC") + ([] if cg is None else [cg.gC])
    ins = [k, W, Ut, *gins, h0] + ([] if rst is None else list(rst))
    in_specs = [_seq(k), _seq(W), _seq(Ut, bv), *(_seq(a) for a in gins), state_spec]
    if rst is not None:
        in_specs += [_seq(rst[0]), states_spec]
    out_shape = [jax.ShapeDtypeStruct((BH, N, Dkp, Dvp), cfg.store),
                 jax.ShapeDtypeStruct((BH, N, C, Dvp), cfg.store),
                 jax.ShapeDtypeStruct((BH, Dkp, Dvp), F32)]
    out_specs = [states_spec, _seq(out_shape[1], bv), state_spec]
    if rst is not None:
        out_shape.append(jax.ShapeDtypeStruct((BH, N, Dkp, Dvp), F32))
        out_specs.append(states_spec)
    kernel = functools.partial(pk.state_fwd_kernel, cfg=cfg, has_g=gv is not None,
                               bk=min(BK, Dkp), has_gk=cg is not None, restarts=rst is not None)
    outs = _call(kernel, grid=(Dvp // bv, BH), in_specs=in_specs, out_specs=out_specs,
                 out_shape=out_shape, opts=opts, name="delta_rule_state_fwd", warps=warps,
                 stages=stages, flops=BH * N * 4 * C * Dkp * Dvp,
                 nbytes=nbytes(*ins) + BH * N * (Dkp + C) * Dvp * cfg.store.itemsize)(*ins)
    return (*outs[:3], outs[3] if rst is not None else None)


def _out_fwd(cfg, opts, q, k, vn, hs, gv):
    """`O [B·H, N, C, Dvp]` float32."""
    BH, N, C, Dkp = q.shape
    Dvp = vn.shape[-1]
    warps, stages, bv = _launch("out", Dkp, Dvp, cfg, opts)
    ins = [q, k, vn, hs, *_gate_ins(gv, "G", "n", "gamma")]
    at = lambda j, n, i: (i, n, 0, j)
    full = lambda j, n, i: (i, n, 0, 0)
    in_specs = [_chunk(q, at=full), _chunk(k, at=full), _chunk(vn, bv, at=at),
                pl.BlockSpec((SQ, SQ, Dkp, bv), at),
                *(_chunk(a, at=at) for a in _gate_ins(gv, "G", "n", "gamma"))]
    out_shape = jax.ShapeDtypeStruct((BH, N, C, Dvp), F32)
    kernel = functools.partial(pk.out_kernel, cfg=cfg, has_g=gv is not None, bk=min(BK, Dkp))
    return _call(kernel, grid=(Dvp // bv, N, BH), in_specs=in_specs,
                 out_specs=_chunk(out_shape, bv, at=at), out_shape=out_shape, opts=opts,
                 name="delta_rule_out", warps=warps, stages=stages,
                 flops=BH * N * 2 * C * Dvp * (Dkp + C) + BH * N * 2 * C * C * Dkp * Dvp // bv,
                 nbytes=nbytes(*ins) + 4 * BH * N * C * Dvp)(*ins)


def _dv_local(cfg, opts, q, k, dO, gv):
    """`scale (Q Kᵀ ⊙ Γ)ᵀ dO` `[B·H, N, C, Dvp]` float32."""
    BH, N, C, Dkp = q.shape
    Dvp = dO.shape[-1]
    warps, stages, bv = _launch("dv_local", Dkp, Dvp, cfg, opts)
    ins = [q, k, dO, *_gate_ins(gv, "G", "n")]
    at = lambda n, i: (i, n, 0, 0)
    out_shape = jax.ShapeDtypeStruct((BH, N, C, Dvp), F32)
    kernel = functools.partial(pk.dv_local_kernel, cfg=cfg, has_g=gv is not None, bk=min(BK, Dkp),
                               bv=bv)
    return _call(kernel, grid=(N, BH), in_specs=_specs(ins, at=at),
                 out_specs=_chunk(out_shape, at=at), out_shape=out_shape, opts=opts,
                 name="delta_rule_dv_local", warps=warps, stages=stages,
                 flops=BH * N * 2 * C * C * (Dkp + Dvp), nbytes=nbytes(*ins) + 4 * dO.size)(*ins)


def _state_bwd(cfg, opts, q, k, W, dO, dvl, gv, dhT, cg=None, rst=None):
    """`(end-state grads [B·H, N, Dkp, Dvp], dU [B·H, N, C, Dvp], d S_0 [B·H, Dkp, Dvp] f32,
    dh0s [B·H, N, Dkp, Dvp] f32 | None)`. `cg`: q, k are then `Q ⊙ γ`, `K ⊙ d`; `rst`:
    `(rs [B·H, N, 16] int32, dpre [B·H, N, Dkp, Dvp] f32)` or None."""
    BH, N, C, Dkp = q.shape
    Dvp = dO.shape[-1]
    warps, stages, bv = _launch("state_bwd", Dkp, Dvp, cfg, opts, restarts=rst is not None)
    gins = _gate_ins(gv, "gamma", "dec", "gC") + ([] if cg is None else [cg.gC])
    ins = [q, k, W, dO, dvl, *gins] + ([] if rst is None else list(rst)) + [dhT]
    state_spec = pl.BlockSpec((SQ, Dkp, bv), lambda j, i: (i, 0, j))
    states_spec = pl.BlockSpec((SQ, N, Dkp, bv), lambda j, i: (i, 0, 0, j))
    in_specs = [_seq(q), _seq(k), _seq(W), _seq(dO, bv), _seq(dvl, bv),
                *(_seq(a) for a in gins)]
    if rst is not None:
        in_specs += [_seq(rst[0]), states_spec]
    in_specs.append(state_spec)
    out_shape = [jax.ShapeDtypeStruct((BH, N, Dkp, Dvp), cfg.store),
                 jax.ShapeDtypeStruct((BH, N, C, Dvp), cfg.store),
                 jax.ShapeDtypeStruct((BH, Dkp, Dvp), F32)]
    out_specs = [states_spec, _seq(out_shape[1], bv), state_spec]
    if rst is not None:
        out_shape.append(jax.ShapeDtypeStruct((BH, N, Dkp, Dvp), F32))
        out_specs.append(states_spec)
    kernel = functools.partial(pk.state_bwd_kernel, cfg=cfg, has_g=gv is not None,
                               bk=min(BK, Dkp), has_gk=cg is not None, restarts=rst is not None)
    outs = _call(kernel, grid=(Dvp // bv, BH), in_specs=in_specs, out_specs=out_specs,
                 out_shape=out_shape, opts=opts, name="delta_rule_state_bwd", warps=warps,
                 stages=stages, flops=BH * N * 6 * C * Dkp * Dvp,
                 nbytes=nbytes(*ins) + BH * N * (Dkp + C) * Dvp * cfg.store.itemsize)(*ins)
    return (*outs[:3], outs[3] if rst is not None else None)


def _dqkwg(cfg, opts, q, k, vn, hs, dhs, dO, dvn, gv):
    """`(dq, dk [B·H, N, C, Dkp] f32, dW [B·H, N, C, Dkp], dG [B·H, N, Dkp/64, C] f32 | None)`."""
    BH, N, C, Dkp = q.shape
    Dvp = dO.shape[-1]
    # 3×TF32: Dk tiles of 32 (the epilogue's [C, bk] operands are split hi/lo in registers)
    bk = min(BK // 2 if cfg.cd == "float32" and cfg.fp == "tf32x3" else BK, Dkp)
    warps, stages, bv = _launch("dqkwg", Dkp, Dvp, cfg, opts)
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
    kernel = functools.partial(pk.dqkwg_kernel, cfg=cfg, has_g=gv is not None, bv=bv)
    outs = _call(kernel, grid=(Dkp // bk, N, BH), in_specs=in_specs, out_specs=out_specs,
                 out_shape=out_shape, opts=opts, name="delta_rule_dqkwg", warps=warps,
                 stages=stages, flops=BH * N * 2 * C * (4 * Dkp * Dvp + 3 * C * Dkp),
                 nbytes=nbytes(*ins) + 12 * BH * N * C * Dkp)(*ins)
    return outs[0], outs[1], outs[2], (outs[3] if gv is not None else None)


def _wy_bwd(cfg, opts, q, k, v, b, gv, lam, Ai, dW, dU):
    """`(dk, dv, dβ, dq | None, dλ | None, dG | None)` of the WY step, float32."""
    BH, N, C, Dkp = q.shape
    Dvp = v.shape[-1]
    warps, stages, bv = _launch("wy_bwd", Dkp, Dvp, cfg, opts)
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
    kernel = functools.partial(pk.wy_bwd_kernel, cfg=cfg, has_g=has_g, has_lam=has_lam, bk=bk,
                               bv=bv, authors=opts.uses_authors_pairing(lam))
    outs = _call(kernel, grid=(N, BH), in_specs=_specs(ins, at=at),
                 out_specs=_specs(out_shape, at=at), out_shape=out_shape, opts=opts,
                 name="delta_rule_intra_bwd", warps=warps, stages=stages,
                 flops=BH * N * 2 * C * C * (4 * Dkp + 3 * Dvp + 2 * C),
                 transcendentals=BH * N * C * C if has_g else 0,
                 nbytes=nbytes(*ins) + 4 * BH * N * C * (2 * Dkp + Dvp))(*ins)
    dk, dv, db, *rest = outs
    dq = rest.pop(0) if has_lam else None
    dl = rest.pop(0) if has_lam else None
    dG = rest.pop(0) if has_g else None
    return dk, dv, db, dq, dl, dG




# Per-channel decay (gk) launchers: the pair matrices come from `_channel_factors`.


def _solve_pair(cfg, opts, M, b):
    """gk: `Ai = (I + strict(diag(β) M))⁻¹` `[B·H, N, C, C]`."""
    BH, N, C, _ = M.shape
    warps, stages, _ = _launch("solve", C, C, cfg, opts)
    ins = [M, b]
    out_shape = jax.ShapeDtypeStruct((BH, N, C, C), cfg.store)
    at = lambda n, i: (i, n, 0, 0)
    kernel = functools.partial(pk.solve_pair_kernel, cfg=cfg)
    return _call(kernel, grid=(N, BH), in_specs=_specs(ins, at=at),
                 out_specs=_chunk(out_shape, at=at), out_shape=out_shape, opts=opts,
                 name="delta_rule_solve", warps=warps, stages=stages,
                 flops=BH * N * 4 * C * C * C,
                 nbytes=nbytes(*ins) + BH * N * C * C * cfg.store.itemsize)(*ins)


def _out_pair(cfg, opts, Qg, P, vn, hs):
    """gk: `O = scale ((Q ⊙ γ) S + P U)` `[B·H, N, C, Dvp]` float32."""
    BH, N, C, Dkp = Qg.shape
    Dvp = vn.shape[-1]
    warps, stages, bv = _launch("out", Dkp, Dvp, cfg, opts)
    ins = [Qg, P, vn, hs]
    at = lambda j, n, i: (i, n, 0, j)
    full = lambda j, n, i: (i, n, 0, 0)
    in_specs = [_chunk(Qg, at=full), _chunk(P, at=full), _chunk(vn, bv, at=at),
                pl.BlockSpec((SQ, SQ, Dkp, bv), at)]
    out_shape = jax.ShapeDtypeStruct((BH, N, C, Dvp), F32)
    kernel = functools.partial(pk.out_pair_kernel, cfg=cfg, bk=min(BK, Dkp))
    return _call(kernel, grid=(Dvp // bv, N, BH), in_specs=in_specs,
                 out_specs=_chunk(out_shape, bv, at=at), out_shape=out_shape, opts=opts,
                 name="delta_rule_out", warps=warps, stages=stages,
                 flops=BH * N * 2 * C * Dvp * (Dkp + C),
                 nbytes=nbytes(*ins) + 4 * BH * N * C * Dvp)(*ins)


def _dv_local_pair(cfg, opts, P, dO):
    """gk: `scale Pᵀ dO` `[B·H, N, C, Dvp]` float32."""
    BH, N, C, _ = P.shape
    Dvp = dO.shape[-1]
    warps, stages, bv = _launch("dv_local", C, Dvp, cfg, opts)
    ins = [P, dO]
    at = lambda n, i: (i, n, 0, 0)
    out_shape = jax.ShapeDtypeStruct((BH, N, C, Dvp), F32)
    kernel = functools.partial(pk.dv_local_pair_kernel, cfg=cfg, bv=bv)
    return _call(kernel, grid=(N, BH), in_specs=_specs(ins, at=at),
                 out_specs=_chunk(out_shape, at=at), out_shape=out_shape, opts=opts,
                 name="delta_rule_dv_local", warps=warps, stages=stages,
                 flops=BH * N * 2 * C * C * Dvp, nbytes=nbytes(*ins) + 4 * dO.size)(*ins)


def _dqkwg_channel(cfg, opts, vn, hs, dhs, dO, dvn):
    """gk: `(d(Q ⊙ γ), d(K ⊙ d) [B·H, N, C, Dkp] f32, dW [B·H, N, C, Dkp], dγ_C
    [B·H, N, Dkp] f32, dP [B·H, N, C, C] f32)`."""
    BH, N, Dkp, Dvp = hs.shape
    C = dO.shape[2]
    bk = min(BK // 2 if cfg.cd == "float32" and cfg.fp == "tf32x3" else BK, Dkp)
    warps, stages, bv = _launch("dqkwg", Dkp, Dvp, cfg, opts)
    ins = [vn, hs, dhs, dO, dvn]
    kt = lambda kb, n, i: (i, n, 0, kb)
    full = lambda kb, n, i: (i, n, 0, 0)
    st = lambda kb, n, i: (i, n, kb, 0)
    in_specs = [_chunk(vn, at=full), pl.BlockSpec((SQ, SQ, bk, Dvp), st),
                pl.BlockSpec((SQ, SQ, bk, Dvp), st), _chunk(dO, at=full), _chunk(dvn, at=full)]
    nkb = Dkp // bk
    out_shape = [jax.ShapeDtypeStruct((BH, N, C, Dkp), F32),
                 jax.ShapeDtypeStruct((BH, N, C, Dkp), F32),
                 jax.ShapeDtypeStruct((BH, N, C, Dkp), cfg.store),
                 jax.ShapeDtypeStruct((BH, N, Dkp), F32),
                 jax.ShapeDtypeStruct((BH, N, nkb, C, C), F32)]
    out_specs = [_chunk(a, bk, at=kt) for a in out_shape[:3]]
    out_specs += [pl.BlockSpec((SQ, SQ, bk), lambda kb, n, i: (i, n, kb)),
                  pl.BlockSpec((SQ, SQ, SQ, C, C), lambda kb, n, i: (i, n, kb, 0, 0))]
    kernel = functools.partial(pk.dqkwg_channel_kernel, cfg=cfg, bv=bv)
    dQg, dKd, dW, dgC, dP = _call(
        kernel, grid=(nkb, N, BH), in_specs=in_specs, out_specs=out_specs, out_shape=out_shape,
        opts=opts, name="delta_rule_dqkwg", warps=warps, stages=stages,
        flops=BH * N * 2 * C * (3 * Dkp * Dvp + C * Dvp * nkb),
        nbytes=nbytes(*ins) + 12 * BH * N * C * Dkp)(*ins)
    return dQg, dKd, dW, dgC, dP[:, :, 0]


def _wy_bwd_channel(cfg, opts, Xg, v, b, M, Ai, dW, dU):
    """gk: `(d(X ⊙ γ) [B·H, N, C, Dkp], dv, dβ, dM [B·H, N, C, C])` of the WY step, float32."""
    BH, N, C, Dkp = Xg.shape
    Dvp = v.shape[-1]
    warps, stages, bv = _launch("wy_bwd", Dkp, Dvp, cfg, opts)
    ins = [Xg, v, b, M, Ai, dW, dU]
    f32 = lambda a: jax.ShapeDtypeStruct(a.shape, F32)
    out_shape = [f32(Xg), f32(v), f32(b), f32(M)]
    at = lambda n, i: (i, n, 0, 0)
    bk = min(BK // 2 if cfg.cd == "float32" else BK, Dkp)
    kernel = functools.partial(pk.wy_bwd_channel_kernel, cfg=cfg, bk=bk, bv=bv)
    return _call(kernel, grid=(N, BH), in_specs=_specs(ins, at=at),
                 out_specs=_specs(out_shape, at=at), out_shape=out_shape, opts=opts,
                 name="delta_rule_intra_bwd", warps=warps, stages=stages,
                 flops=BH * N * 2 * C * C * (2 * Dkp + 3 * Dvp + 2 * C),
                 nbytes=nbytes(*ins) + 4 * BH * N * C * (Dkp + Dvp + C))(*ins)


# ------------------------------------------------------------------------------------------
# Forward and backward launchers (the custom VJP in `ops.py` calls these two).


def _prepare(q, k, v, beta, g, lam, h0, C):
    Dkp, Dvp = pad_dim(q.shape[-1]), pad_dim(v.shape[-1])
    vec = lambda a: None if a is None else to_chunks(a.astype(F32), C)
    gv = None if g is None else _gate_vectors(vec(g))
    return (to_chunks(q, C, Dkp), to_chunks(k, C, Dkp), to_chunks(v, C, Dvp), vec(beta), gv,
            vec(lam), pad_state(h0, Dkp, Dvp))


def delta_rule_fwd(q, k, v, beta, g, gk, lam, h0, rs, h0s, opts: DeltaRuleOptions):
    """The forward pass: `(o [B, T, H, Dv] float32, S_T [B, H, Dk, Dv] float32, pre)`
    (`pallas_common.KERNEL_CONTRACT`).

    Args:
      q, k: `[B, T, H, Dk]`; v: `[B, T, H, Dv]`; beta: `[B, T, H]`; g, lam: `[B, T, H]` or
        None; gk: `[B, T, H, Dk]` or None (not with g); h0: `[B, H, Dk, Dv]` initial state;
        rs `[B, N]` int32 and h0s `[B, N, H, Dk, Dv]`: chunk restarts, or None. Finite (g, gk
        may hold −inf), at most 32-bit.
      opts: `DeltaRuleOptions` with `fp32_precision` resolved (`opts.resolved()`).
    """
    _check_gates(g, gk, rs, h0s)
    B, T, H, Dk = q.shape
    Dv = v.shape[-1]
    cfg = pk.Cfg.make(q.dtype, opts)
    C = kernel_chunk(opts, T)
    qc, kc, vc, b, gv, lc, h = _prepare(q, k, v, beta, g, lam, h0, C)
    Dkp, Dvp = h.shape[1:]
    rst = None if rs is None else _restart_layout(rs, h0s, H, Dkp, Dvp, qc.shape[1])
    if gk is None:
        Ai = _solve(cfg, opts, qc, kc, b, gv, lc)
        W, Ut = _wy_fwd(cfg, opts, qc, kc, vc, b, gv, lc, Ai)
        hs, vn, hT, pre = _state_fwd(cfg, opts, kc, W, Ut, gv, h, rst=rst)
        O = _out_fwd(cfg, opts, qc, kc, vn, hs, gv)
    else:
        cg = _ChannelGates.make(cfg, _channel_factors(
            qc.astype(F32), kc.astype(F32), lc, to_chunks(gk.astype(F32), C, Dkp)))
        Ai = _solve_pair(cfg, opts, cg.M, b)
        W, Ut = _wy_fwd(cfg, opts, cg.Xg, cg.Xg, vc, b, None, None, Ai)
        hs, vn, hT, pre = _state_fwd(cfg, opts, cg.Kd, W, Ut, None, h, cg, rst)
        O = _out_pair(cfg, opts, cg.Qg, cg.P, vn, hs)
    pre = None if pre is None else _states_out(pre, B, H, Dk, Dv)
    return from_chunks(O, B, T, H, Dv), unpad_state(hT, B, H, Dk, Dv), pre


def _check_gates(g, gk, rs, h0s):
    if g is not None and gk is not None:
        raise ValueError("g and gk are never both given (ops.py folds g into gk)")
    if (rs is None) != (h0s is None):
        raise ValueError("rs and h0s are given together or not at all")


def delta_rule_bwd(q, k, v, beta, g, gk, lam, h0, rs, h0s, do, dhT, dpre,
                   opts: DeltaRuleOptions):
    """The backward pass from the inputs and the cotangents `do [B, T, H, Dv]`,
    `dhT [B, H, Dk, Dv]` and `dpre [B, N, H, Dk, Dv]` (with rs): `(dq, dk, dv, dβ, dg, dgk, dλ,
    dh0, dh0s)` in float32 (None for each input that is None). W, Ũ, Ai and the chunk states
    are recomputed (forward passes 1 and 2); with gk, the gradients w.r.t. the factors of
    `_channel_factors` go back through its jnp (`jax.vjp`)."""
    _check_gates(g, gk, rs, h0s)
    B, T, H, Dk = q.shape
    Dv = v.shape[-1]
    cfg = pk.Cfg.make(q.dtype, opts)
    C = kernel_chunk(opts, T)
    qc, kc, vc, b, gv, lc, h = _prepare(q, k, v, beta, g, lam, h0, C)
    Dkp, Dvp = h.shape[1:]
    N = qc.shape[1]
    rst = rst_b = None
    if rs is not None:
        rst = _restart_layout(rs, h0s, H, Dkp, Dvp, N)
        dpre = jnp.zeros(h0s.shape, F32) if dpre is None else dpre
        rst_b = (rst[0], _states_in(dpre, Dkp, Dvp))
    dO = to_chunks(do.astype(F32), C, Dvp, dtype=cfg.store)
    dhT = pad_state(dhT, Dkp, Dvp)
    vec = lambda a: None if a is None else from_chunks(a, B, T, H)
    if gk is None:
        Ai = _solve(cfg, opts, qc, kc, b, gv, lc)
        W, Ut = _wy_fwd(cfg, opts, qc, kc, vc, b, gv, lc, Ai)
        hs, vn, _, _ = _state_fwd(cfg, opts, kc, W, Ut, gv, h, rst=rst)
        dvl = _dv_local(cfg, opts, qc, kc, dO, gv)
        dhs, dU, dh0, dh0s = _state_bwd(cfg, opts, qc, kc, W, dO, dvl, gv, dhT, rst=rst_b)
        dq, dk, dW, dG1 = _dqkwg(cfg, opts, qc, kc, vn, hs, dhs, dO, dU, gv)
        dk2, dv, db, dq2, dl, dG2 = _wy_bwd(cfg, opts, qc, kc, vc, b, gv, lc, Ai, dW, dU)
        dk = dk + dk2
        if dq2 is not None:
            dq = dq + dq2
        dg = None if gv is None else _gate_grad(gv, jnp.sum(dG1, axis=2) + dG2)
        dgk = None
    else:
        factors, back = jax.vjp(_channel_factors, qc.astype(F32), kc.astype(F32), lc,
                                to_chunks(gk.astype(F32), C, Dkp))
        cg = _ChannelGates.make(cfg, factors)
        Ai = _solve_pair(cfg, opts, cg.M, b)
        W, Ut = _wy_fwd(cfg, opts, cg.Xg, cg.Xg, vc, b, None, None, Ai)
        hs, vn, _, _ = _state_fwd(cfg, opts, cg.Kd, W, Ut, None, h, cg, rst)
        dvl = _dv_local_pair(cfg, opts, cg.P, dO)
        dhs, dU, dh0, dh0s = _state_bwd(cfg, opts, cg.Qg, cg.Kd, W, dO, dvl, None, dhT, cg,
                                        rst_b)
        dQg, dKd, dW, dgC, dP = _dqkwg_channel(cfg, opts, vn, hs, dhs, dO, dU)
        dXg, dv, db, dM = _wy_bwd_channel(cfg, opts, cg.Xg, vc, b, cg.M, Ai, dW, dU)
        dq, dk, dl, dgk = back((dQg, dKd, dXg, dgC, dM, dP))
        dl = None if lam is None else dl
        dg = None
        dgk = from_chunks(dgk, B, T, H, Dk)
    return (from_chunks(dq, B, T, H, Dk), from_chunks(dk, B, T, H, Dk),
            from_chunks(dv, B, T, H, Dv), vec(db), vec(dg), dgk, vec(dl),
            unpad_state(dh0, B, H, Dk, Dv),
            None if dh0s is None else _states_out(dh0s, B, H, Dk, Dv))
