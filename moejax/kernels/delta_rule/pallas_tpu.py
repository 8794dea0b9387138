"""Pallas (Mosaic) delta-rule kernels for TPU: the forward and backward launchers.

Four passes over the `[B·H, N, C, D]` layout of `pallas_common.py` (kernel bodies and chunk
math in `pallas_tpu_kernel.py`):

1. `intra_fwd_kernel`, grid `(B·H, N)`, both axes "parallel": per chunk, `Tm = (I + A)⁻¹` by
   forward substitution, `W = Tm diag(βγ) X` and `Ũ = Tm diag(β) V`.
2. `state_fwd_kernel`, grid `(B·H, Dv/block_v, N)` with the chunk axis innermost and
   "arbitrary": the `[Dk, block_v]` float32 state lives in a VMEM scratch buffer across the
   sequential chunk steps, and Pallas pipelines one chunk of q/k/W/Ũ at a time through VMEM (so
   VMEM use does not grow with T); writes O, the final state and (for the backward) every
   chunk's start state.
3. `state_bwd_kernel`, same grid, chunks in reverse through its index maps: carries `dS`,
   writes every chunk's end-state gradient and `d initial_state`.
4. `intra_bwd_kernel`, grid `(B·H, N)`: with the chunk's start state and end-state gradient,
   recomputes `Tm, W, Ũ, U` and returns dq, dk, dv, dβ, dg, dλ.

`pairing="authors"` (A pairs the row's k with the column's x, as the released Q-Delta kernel
does) changes only passes 1 and 4 (A and its gradient); its chunk length is 64.

Per-channel decay `gk` (Kimi Delta Attention, `chunk.py` "Per-channel decay"):
the launcher forms each chunk's decay factors in plain jnp, exactly in log space
(`_channel_factors`: γ, d, γ_C per channel and the pair matrices M, P by `chunk.py`'s secondary
chunking, masked before every exp, so nothing overflows and −inf channel resets are exact), and
passes them into `intra_fwd_gk_kernel` / `intra_bwd_gk_kernel` and the state kernels; all
Dk × Dv state work stays in the kernels. The backward takes the factors' gradients (pass 4)
back to q, k, λ and gk through the VJP of `_channel_factors` (within each chunk, per channel:
dgk the reverse cumsum of the gradient of the cumulative log decay, 0 at a reset). The
factors cost HBM traffic the scalar-decay modes do not have: M and P `[C, C]` per chunk, Xγ,
Qγ, Kd `[C, Dk]`, and the binary split's per-level row and column factors (log2 C tensors the
size of k) inside the jnp, kept by its VJP for the backward.

Chunk restarts `rs`/`h0s` (packed sequences, `ops.py` / `packing.py`): only
the state kernels change. The forward records each chunk's carried state (`pre`), then starts
the chunk from `h0s[n]` where `rs[n]`; the backward gives `dh0s[n]` = the chunk's start-state
gradient where `rs[n]` (0 elsewhere) and carries `(0 if rs[n] else dS) + dpre[n]` into the
previous chunk.

Head dims are zero-padded to multiples of 128 (the lane width), T to N·C (β = 0, g = 0 on the
padding, which is exact). Every block's last two dims are `(C, D)`, `(C, 1)` or
`(Dk, block_v)` (with gk also `(C, C)` and `(Dk, 1)`; restart flags `(1, 1)`): multiples of
(8, 128) or full, as Mosaic requires. The backward keeps only the inputs as residuals and
re-runs (1) and (2) for W and the chunk states (as flash-linear-attention does), then runs (3)
and (4). `ops.py` wraps `delta_rule_fwd` / `delta_rule_bwd` in the custom VJP and runs it
under `nonfinite.contain`; g = −inf (a full reset) is exact.

Axis letters: B batch, T time, H heads, Dk/Dv head dims, N chunks, C chunk length.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from moejax.kernels.delta_rule import pallas_tpu_kernel as pk
from moejax.kernels.delta_rule.chunk import _channel_gates, _channel_pairs, _masked_exp
from moejax.kernels.delta_rule.pallas_common import (
    F32,
    SQUEEZED,
    DeltaRuleOptions,
    clamp_chunk,
    from_chunks,
    nbytes,
    pad_state,
    pallas_call,
    to_chunks,
    unpad_state,
)

Array = jax.Array
LANES = 128
_PARALLEL = getattr(pltpu, "PARALLEL", "parallel")
_ARBITRARY = getattr(pltpu, "ARBITRARY", "arbitrary")
_CompilerParams = getattr(pltpu, "CompilerParams", None) or pltpu.TPUCompilerParams

__all__ = ["check_supported", "delta_rule_bwd", "delta_rule_fwd", "kernel_chunk", "pad_dim"]


def pad_dim(d: int) -> int:
    """Head dims are padded to multiples of 128, the lane width."""
    return -(-d // LANES) * LANES


def kernel_chunk(opts: DeltaRuleOptions, T: int) -> int:
    """Steps per chunk: a power of two in [16, 128] (results do not depend on it)."""
    return clamp_chunk(opts, T, largest=128)


def check_supported(q, v, opts: DeltaRuleOptions) -> None:
    """The Mosaic kernels take every input `delta_rule` accepts (float64 is rounded to float32
    first, any head dim is padded to lanes): never raises."""
    del q, v, opts


def _block_v(opts: DeltaRuleOptions, Dvp: int) -> int:
    bv = min(LANES if opts.block_v is None else opts.block_v, Dvp)
    if Dvp % bv:
        raise ValueError(f"padded Dv={Dvp} must be a multiple of block_v={bv}")
    return bv


def _compiler_params(ndim: int, opts: DeltaRuleOptions, sequential_last: bool = False):
    """`(compiler_params, interpret)` for a grid of `ndim` axes."""
    sem = [_PARALLEL] * ndim
    if sequential_last:
        sem[-1] = _ARBITRARY
    interpret = pltpu.InterpretParams() if opts.interpret else False
    return _CompilerParams(dimension_semantics=tuple(sem)), interpret


def _call(kernel, *, grid, opts, cost, **kw):
    """`pallas_call` over an all-"parallel" grid (the chunk-parallel passes)."""
    params, interpret = _compiler_params(len(grid), opts)
    return pallas_call(kernel, grid=grid, compiler_params=params, interpret=interpret,
                       flops=cost["flops"], transcendentals=cost["transcendentals"],
                       nbytes=cost["bytes_accessed"], **kw)


# ------------------------------------------------------------------------------------------
# Layout.


@dataclasses.dataclass(frozen=True)
class _Prepared:
    """Inputs in kernel layout (vectors as `[B·H, N, C, 1]`); `g`/`lam` None when absent."""

    q: Array
    k: Array
    v: Array
    b: Array
    g: Array | None
    lam: Array | None
    h0: Array  # [B·H, Dkp, Dvp] float32


def _prepare(q, k, v, beta, g, lam, h0, C):
    Dkp, Dvp = pad_dim(q.shape[-1]), pad_dim(v.shape[-1])
    vec = lambda a: None if a is None else to_chunks(a[..., None], C, dtype=F32)
    return _Prepared(to_chunks(q, C, Dkp), to_chunks(k, C, Dkp), to_chunks(v, C, Dvp),
                     vec(beta), vec(g), vec(lam), pad_state(h0, Dkp, Dvp))


def _chunk_spec(a):
    """Block = one chunk `[C, D]` of `[B·H, N, C, D]`, grid `(B·H, N)`."""
    return pl.BlockSpec((SQUEEZED, SQUEEZED, *a.shape[2:]), lambda i, n: (i, n, 0, 0))


class _Channel(NamedTuple):
    """Per-channel decay factors of every chunk (`_channel_factors`), float32, Dk padded."""

    Xg: Array  # [B·H, N, C, Dkp] X ⊙ γ
    M: Array  # [B·H, N, C, C] M_tj = Σ_d x_td k_jd exp(G_td − G_jd), j ≤ t
    P: Array  # [B·H, N, C, C] P_tj = Σ_d q_td k_jd exp(G_td − G_jd), j ≤ t
    Qg: Array  # [B·H, N, C, Dkp] Q ⊙ γ
    Kd: Array  # [B·H, N, C, Dkp] K ⊙ d, d_t = exp(G_C − G_t)
    gC: Array  # [B·H, N, Dkp, 1] γ_C = exp(G_C), a column


def _channel_factors(q, k, lam, gk, Dkp):
    """The per-channel decay factors of every chunk, exactly in log space (`chunk.py`,
    "Per-channel decay"): `G` the within-chunk cumsum of gk per channel with −inf resets taken
    out and counted (`_channel_gates`), every exp masked with `where` before it is taken, the
    pair matrices by secondary chunking (`_channel_pairs`), so each factor is ≤ 1 for gk ≤ 0.

    Args:
      q, k: `[B·H, N, C, Dk]` float32 (Dk unpadded); lam: `[B·H, N, C, 1]` or None;
        gk: `[B·H, N, C, Dk]` float32, may hold −inf.
      Dkp: the padded key dim of the kernels.

    Returns:
      `_Channel`; differentiable (the backward takes the factors' gradients through its VJP).
    """
    x = k if lam is None else k + lam * q
    G, n = _channel_gates(gk)
    gamma = _masked_exp(n == 0, G)  # 0 after a reset in [0, t]
    dec = _masked_exp(n == n[..., -1:, :], G[..., -1:, :] - G)  # 0 if a reset lies in (t, C)
    M, P = _channel_pairs((x, q), k, G, n)
    pad = lambda a: jnp.pad(a, ((0, 0),) * 3 + ((0, Dkp - a.shape[-1]),))
    return _Channel(pad(gamma * x), M, P, pad(gamma * q), pad(dec * k),
                    jnp.swapaxes(pad(gamma[..., -1:, :]), -1, -2))


def _factor_inputs(q, k, p: _Prepared, gk, C):
    """`(q, k, λ, gk)` of `_channel_factors` in chunk layout (float32, Dk unpadded)."""
    return (to_chunks(q, C, dtype=F32), to_chunks(k, C, dtype=F32), p.lam,
            to_chunks(gk, C, dtype=F32))


def _chunk_states(a, Dkp, Dvp):
    """`[B, N, H, Dk, Dv]` → `[B·H, N, Dkp, Dvp]` float32, zero-padded."""
    B, N, H, Dk, Dv = a.shape
    a = jnp.pad(a.astype(F32), ((0, 0),) * 3 + ((0, Dkp - Dk), (0, Dvp - Dv)))
    return a.transpose(0, 2, 1, 3, 4).reshape(B * H, N, Dkp, Dvp)


def _unchunk_states(a, B, H, Dk, Dv):
    """`[B·H, N, Dkp, Dvp]` → `[B, N, H, Dk, Dv]`."""
    return a.reshape(B, H, *a.shape[1:]).transpose(0, 2, 1, 3, 4)[..., :Dk, :Dv]


def _restart_flags(rs, H):
    """`rs [B, N]` int → `[B·H, N, 1, 1]` float32 (1.0 where the chunk restarts): one `(1, 1)`
    block per chunk, broadcast in the kernel."""
    B, N = rs.shape
    r = jnp.where(rs != 0, 1.0, 0.0).astype(F32)
    return jnp.broadcast_to(r[:, None], (B, H, N)).reshape(B * H, N, 1, 1)


# ------------------------------------------------------------------------------------------
# Launchers of the four passes.


def _intra_fwd(p: _Prepared, opts: DeltaRuleOptions):
    """`W [B·H, N, C, Dkp]`, `Ũ [B·H, N, C, Dvp]` in float32."""
    BH, N, C, Dkp = p.q.shape
    Dvp = p.v.shape[-1]
    ins = [a for a in (p.q, p.k, p.v, p.b, p.g, p.lam) if a is not None]
    out_shape = (jax.ShapeDtypeStruct((BH, N, C, Dkp), jnp.float32),
                 jax.ShapeDtypeStruct((BH, N, C, Dvp), jnp.float32))
    flops = BH * N * (2 * C * C * Dkp + C**3 + 2 * C * C * (Dkp + Dvp))
    kernel = functools.partial(pk.intra_fwd_kernel, has_g=p.g is not None,
                               has_lam=p.lam is not None,
                               authors=opts.uses_authors_pairing(p.lam))
    return _call(kernel, grid=(BH, N), in_specs=[_chunk_spec(a) for a in ins],
                 out_specs=[_chunk_spec(s) for s in out_shape], out_shape=out_shape, opts=opts,
                 cost=dict(flops=flops, transcendentals=BH * N * C * C if p.g is not None else 0,
                           bytes_accessed=nbytes(*ins) + 4 * BH * N * C * (Dkp + Dvp)),
                 name="delta_rule_intra_fwd")(*ins)




def _intra_bwd(p: _Prepared, states, dhs, dO, opts: DeltaRuleOptions):
    """Per-chunk gradients in kernel layout: `(dq, dk, dv, dβ, dg | None, dλ | None)`."""
    BH, N, C, Dkp = p.q.shape
    Dvp = p.v.shape[-1]
    has_g, has_lam = p.g is not None, p.lam is not None
    ins = [a for a in (p.q, p.k, p.v, p.b, p.g, p.lam) if a is not None] + [states, dhs, dO]
    in_specs = [_chunk_spec(a) for a in ins]
    f32 = lambda shape: jax.ShapeDtypeStruct(shape, jnp.float32)
    out_shape = [f32(p.q.shape), f32(p.k.shape), f32(p.v.shape), f32(p.b.shape)]
    out_shape += [f32(p.b.shape)] * (int(has_g) + int(has_lam))
    flops = BH * N * (C**3 + 2 * C * Dkp * Dvp * 4 + 2 * C * C * (8 * Dkp + 4 * Dvp) + 6 * C**3)
    kernel = functools.partial(pk.intra_bwd_kernel, has_g=has_g, has_lam=has_lam, scale=opts.scale,
                               block_v=_block_v(opts, Dvp),
                               authors=opts.uses_authors_pairing(p.lam))
    outs = _call(kernel, grid=(BH, N), in_specs=in_specs,
                 out_specs=[_chunk_spec(s) for s in out_shape], out_shape=out_shape, opts=opts,
                 cost=dict(flops=flops, transcendentals=BH * N * C * C if has_g else 0,
                           bytes_accessed=nbytes(*ins) + 4 * BH * N * C * (2 * Dkp + Dvp)),
                 name="delta_rule_intra_bwd")(*ins)
    dq, dk, dv, db, *rest = outs
    dg = rest.pop(0) if has_g else None
    dl = rest.pop(0) if has_lam else None
    return dq, dk, dv, db, dg, dl




def _intra_fwd_gk(p: _Prepared, fac: _Channel, opts: DeltaRuleOptions):
    """Pass 1 with per-channel decay: `W = Tm diag(β) Xγ`, `Ũ = Tm diag(β) V` in float32."""
    BH, N, C, Dkp = p.q.shape
    Dvp = p.v.shape[-1]
    ins = [fac.Xg, p.v, p.b, fac.M]
    out_shape = (jax.ShapeDtypeStruct((BH, N, C, Dkp), jnp.float32),
                 jax.ShapeDtypeStruct((BH, N, C, Dvp), jnp.float32))
    flops = BH * N * (C**3 + 2 * C * C * (Dkp + Dvp))
    return _call(pk.intra_fwd_gk_kernel, grid=(BH, N), in_specs=[_chunk_spec(a) for a in ins],
                 out_specs=[_chunk_spec(s) for s in out_shape], out_shape=out_shape, opts=opts,
                 cost=dict(flops=flops, transcendentals=0,
                           bytes_accessed=nbytes(*ins) + 4 * BH * N * C * (Dkp + Dvp)),
                 name="delta_rule_intra_fwd_gk")(*ins)


def _intra_bwd_gk(p: _Prepared, fac: _Channel, states, dhs, dO, opts: DeltaRuleOptions):
    """Pass 4 with per-channel decay: `(dXγ, dv, dβ, dM, dP, dQγ, dKd, dγ_C)` in kernel
    layout, float32."""
    BH, N, C, Dkp = p.q.shape
    Dvp = p.v.shape[-1]
    ins = [fac.Xg, p.v, p.b, fac.M, fac.P, fac.Kd, states, dhs, dO]
    f32 = lambda a: jax.ShapeDtypeStruct(a.shape, jnp.float32)
    out_shape = [f32(fac.Xg), f32(p.v), f32(p.b), f32(fac.M), f32(fac.P), f32(fac.Qg),
                 f32(fac.Kd), f32(fac.gC)]
    flops = BH * N * (C**3 + 2 * C * Dkp * Dvp * 4 + 2 * C * C * (4 * Dkp + 4 * Dvp) + 6 * C**3)
    kernel = functools.partial(pk.intra_bwd_gk_kernel, scale=opts.scale,
                               block_v=_block_v(opts, Dvp))
    return _call(kernel, grid=(BH, N), in_specs=[_chunk_spec(a) for a in ins],
                 out_specs=[_chunk_spec(s) for s in out_shape], out_shape=out_shape, opts=opts,
                 cost=dict(flops=flops, transcendentals=0,
                           bytes_accessed=nbytes(*ins) + nbytes(*out_shape)),
                 name="delta_rule_intra_bwd_gk")(*ins)


def _specs(p: _Prepared, bv, reverse=False):
    """Block specs over grid `(B·H, Dv tiles, N)`; chunk n is `N−1−n` when `reverse`."""
    N = p.q.shape[1]
    at = (lambda n: N - 1 - n) if reverse else (lambda n: n)
    C, Dkp = p.q.shape[2:]
    full = lambda D: pl.BlockSpec((SQUEEZED, SQUEEZED, C, D), lambda i, j, n: (i, at(n), 0, 0))
    tile = pl.BlockSpec((SQUEEZED, SQUEEZED, C, bv), lambda i, j, n: (i, at(n), 0, j))
    state = pl.BlockSpec((SQUEEZED, Dkp, bv), lambda i, j, n: (i, 0, j))
    chunk_state = pl.BlockSpec((SQUEEZED, SQUEEZED, Dkp, bv), lambda i, j, n: (i, at(n), 0, j))
    return full, tile, state, chunk_state


def _chunk_ins(p: _Prepared, fac: _Channel | None, W, dO_or_Ut, bv, reverse):
    """The state kernels' per-chunk inputs and their specs (`pallas_tpu_kernel` order):
    `q, k, W, Ũ | dO, [g]`, or with per-channel decay `Qγ, Kd, W, Ũ | dO, P, γ_C`."""
    N, C, Dkp = p.q.shape[1:]
    full, tile, _, _ = _specs(p, bv, reverse)
    if fac is None:
        ins = [p.q, p.k, W, dO_or_Ut] + ([p.g] if p.g is not None else [])
        specs = [full(Dkp), full(Dkp), full(Dkp), tile] + ([full(1)] if p.g is not None else [])
        return ins, specs
    at = (lambda n: N - 1 - n) if reverse else (lambda n: n)
    column = pl.BlockSpec((SQUEEZED, SQUEEZED, Dkp, 1), lambda i, j, n: (i, at(n), 0, 0))
    return ([fac.Qg, fac.Kd, W, dO_or_Ut, fac.P, fac.gC],
            [full(Dkp), full(Dkp), full(Dkp), tile, full(C), column])


def _restart_ins(p: _Prepared, restarts, bv, reverse):
    """`[flags [B·H, N, 1, 1], h0s | dpre [B·H, N, Dkp, Dvp]]` and their specs, or `[]`."""
    if restarts is None:
        return [], []
    N = p.q.shape[1]
    at = (lambda n: N - 1 - n) if reverse else (lambda n: n)
    _, _, _, chunk_state = _specs(p, bv, reverse)
    flag = pl.BlockSpec((SQUEEZED, SQUEEZED, 1, 1), lambda i, j, n: (i, at(n), 0, 0))
    return list(restarts), [flag, chunk_state]


def _state_fwd(p: _Prepared, W, Ut, opts: DeltaRuleOptions, *, store_states, fac=None,
               restarts=None):
    """`(O [B·H, N, C, Dvp], S_T [B·H, Dkp, Dvp], chunk states [B·H, N, Dkp, Dvp] | None)`.

    `store_states`: None, "pre" (each chunk's carried state before its restart) or "post" (the
    state the chunk runs from); the same without `restarts = (flags, h0s)`."""
    BH, N, C, Dkp = p.q.shape
    Dvp = p.v.shape[-1]
    bv = _block_v(opts, Dvp)
    _, tile, state, chunk_state = _specs(p, bv)
    ins, in_specs = _chunk_ins(p, fac, W, Ut, bv, reverse=False)
    r_ins, r_specs = _restart_ins(p, restarts, bv, reverse=False)
    ins += r_ins + [p.h0]
    in_specs += r_specs + [state]
    out_shape = [jax.ShapeDtypeStruct((BH, N, C, Dvp), jnp.float32),
                 jax.ShapeDtypeStruct((BH, Dkp, Dvp), jnp.float32)]
    out_specs = [tile, state]
    if store_states:
        out_shape.append(jax.ShapeDtypeStruct((BH, N, Dkp, Dvp), jnp.float32))
        out_specs.append(chunk_state)
    params, interpret = _compiler_params(3, opts, sequential_last=True)
    kernel = functools.partial(pk.state_fwd_kernel, has_g=p.g is not None, scale=opts.scale,
                               store_states=store_states, has_gk=fac is not None,
                               restarts=restarts is not None)
    flops = BH * N * (2 * C * C * Dkp + 2 * C * Dvp * (3 * Dkp + C))
    outs = pl.pallas_call(
        kernel, grid=(BH, Dvp // bv, N), in_specs=in_specs, out_specs=out_specs,
        out_shape=out_shape, scratch_shapes=[pltpu.VMEM((Dkp, bv), jnp.float32)],
        compiler_params=params, interpret=interpret, name="delta_rule_state_fwd",
        cost_estimate=pl.CostEstimate(
            flops=int(flops), transcendentals=0,
            bytes_accessed=int(nbytes(*ins) + 4 * BH * N * C * Dvp)),
    )(*ins)
    return outs[0], outs[1], (outs[2] if store_states else None)


def _state_bwd(p: _Prepared, W, dO, dhT, opts: DeltaRuleOptions, *, fac=None, restarts=None):
    """`(d S_0 [B·H, Dkp, Dvp], end-state grads of every chunk [B·H, N, Dkp, Dvp],
    dh0s [B·H, N, Dkp, Dvp] | None)`; `restarts = (flags, dpre)` or None."""
    BH, N, C, Dkp = p.q.shape
    Dvp = p.v.shape[-1]
    bv = _block_v(opts, Dvp)
    _, _, state, chunk_state = _specs(p, bv, reverse=True)
    ins, in_specs = _chunk_ins(p, fac, W, dO, bv, reverse=True)
    r_ins, r_specs = _restart_ins(p, restarts, bv, reverse=True)
    ins += r_ins + [dhT]
    in_specs += r_specs + [state]
    chunk_shape = jax.ShapeDtypeStruct((BH, N, Dkp, Dvp), jnp.float32)
    out_shape = [jax.ShapeDtypeStruct((BH, Dkp, Dvp), jnp.float32), chunk_shape]
    out_specs = [state, chunk_state]
    if restarts is not None:
        out_shape.append(chunk_shape)
        out_specs.append(chunk_state)
    params, interpret = _compiler_params(3, opts, sequential_last=True)
    kernel = functools.partial(pk.state_bwd_kernel, has_g=p.g is not None, scale=opts.scale,
                               has_gk=fac is not None, restarts=restarts is not None)
    flops = BH * N * (2 * C * C * Dkp + 2 * C * Dvp * (3 * Dkp + C))
    outs = pl.pallas_call(
        kernel, grid=(BH, Dvp // bv, N), in_specs=in_specs, out_specs=out_specs,
        out_shape=out_shape, scratch_shapes=[pltpu.VMEM((Dkp, bv), jnp.float32)],
        compiler_params=params, interpret=interpret, name="delta_rule_state_bwd",
        cost_estimate=pl.CostEstimate(
            flops=int(flops), transcendentals=0,
            bytes_accessed=int(nbytes(*ins) + 4 * BH * N * Dkp * Dvp * len(out_shape))),
    )(*ins)
    return outs[0], outs[1], (outs[2] if restarts is not None else None)


# ------------------------------------------------------------------------------------------
# Forward and backward launchers (the custom VJP in `ops.py` calls these two).


def delta_rule_fwd(q, k, v, beta, g, gk, lam, h0, rs, h0s, opts: DeltaRuleOptions):
    """The forward pass: `(o [B, T, H, Dv] float32, S_T [B, H, Dk, Dv] float32, pre)`
    (`pallas_common.KERNEL_CONTRACT`).

    Args:
      q, k: `[B, T, H, Dk]`; v: `[B, T, H, Dv]`; beta: `[B, T, H]`; g, lam: `[B, T, H]` or
        None; gk: `[B, T, H, Dk]` or None (never with g); h0: `[B, H, Dk, Dv]` initial state.
        Finite (g, gk may hold −inf), at most 32-bit.
      rs, h0s: chunk restarts `[B, N]` int32 and their states `[B, N, H, Dk, Dv]`, or None.
      opts: `DeltaRuleOptions` with `backend="tpu"`.
    """
    B, T, H, Dk = q.shape
    Dv = v.shape[-1]
    C = kernel_chunk(opts, T)
    p = _prepare(q, k, v, beta, g, lam, h0, C)
    Dkp, Dvp = p.h0.shape[1:]
    fac = None if gk is None else _channel_factors(*_factor_inputs(q, k, p, gk, C), Dkp)
    restarts = None if rs is None else (_restart_flags(rs, H), _chunk_states(h0s, Dkp, Dvp))
    W, Ut = _intra_fwd(p, opts) if fac is None else _intra_fwd_gk(p, fac, opts)
    O, hT, pre = _state_fwd(p, W, Ut, opts, store_states=None if rs is None else "pre",
                            fac=fac, restarts=restarts)
    pre = None if rs is None else _unchunk_states(pre, B, H, Dk, Dv)
    return from_chunks(O, B, T, H, Dv), unpad_state(hT, B, H, Dk, Dv), pre


def delta_rule_bwd(q, k, v, beta, g, gk, lam, h0, rs, h0s, do, dhT, dpre,
                   opts: DeltaRuleOptions):
    """The backward pass from the inputs and the cotangents `do [B, T, H, Dv]`,
    `dhT [B, H, Dk, Dv]` (and `dpre [B, N, H, Dk, Dv]` with restarts):
    `(dq, dk, dv, dβ, dg, dgk, dλ, dh0, dh0s)` in float32 (None for inputs that are None).
    W, Ũ and the chunk states are recomputed (passes 1 and 2)."""
    B, T, H, Dk = q.shape
    Dv = v.shape[-1]
    C = kernel_chunk(opts, T)
    p = _prepare(q, k, v, beta, g, lam, h0, C)
    Dkp, Dvp = p.h0.shape[1:]
    fac = fac_vjp = None
    if gk is not None:
        fac, fac_vjp = jax.vjp(functools.partial(_channel_factors, Dkp=Dkp),
                               *_factor_inputs(q, k, p, gk, C))
    fwd_restarts = bwd_restarts = None
    if rs is not None:
        flags = _restart_flags(rs, H)
        fwd_restarts = (flags, _chunk_states(h0s, Dkp, Dvp))
        dpre = jnp.zeros(h0s.shape, F32) if dpre is None else dpre
        bwd_restarts = (flags, _chunk_states(dpre, Dkp, Dvp))
    W, Ut = _intra_fwd(p, opts) if fac is None else _intra_fwd_gk(p, fac, opts)
    _, _, states = _state_fwd(p, W, Ut, opts, store_states="post", fac=fac,
                              restarts=fwd_restarts)
    dO = to_chunks(do.astype(F32), C, Dvp)
    dh0, dhs, dh0s = _state_bwd(p, W, dO, pad_state(dhT, Dkp, Dvp), opts, fac=fac,
                                restarts=bwd_restarts)
    vec = lambda a: None if a is None else from_chunks(a[..., 0], B, T, H)
    dgk = None
    if fac is None:
        dq, dk, dv, db, dg, dl = _intra_bwd(p, states, dhs, dO, opts)
    else:
        dXg, dv, db, dM, dP, dQg, dKd, dgC = _intra_bwd_gk(p, fac, states, dhs, dO, opts)
        dq, dk, dl, dgk = fac_vjp(_Channel(dXg, dM, dP, dQg, dKd, dgC))
        dg, dgk = None, from_chunks(dgk, B, T, H)
    dh0s = None if rs is None else _unchunk_states(dh0s, B, H, Dk, Dv)
    return (from_chunks(dq, B, T, H, Dk), from_chunks(dk, B, T, H, Dk),
            from_chunks(dv, B, T, H, Dv), vec(db), vec(dg), dgk, vec(dl),
            unpad_state(dh0, B, H, Dk, Dv), dh0s)
