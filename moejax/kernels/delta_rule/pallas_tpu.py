"""Pallas (Mosaic) delta-rule kernels for TPU, forward and backward, with a custom VJP.

Same four passes as `pallas_gpu.py` (chunk math in `pallas_kernel.py`), laid out for TPU:

- Head dims are zero-padded to multiples of 128 (the lane width), T to N·C (β = 0, g = 0 on the
  padding, which is exact). Every block's last two dims are `(C, D)`, `(C, 1)` or `(Dk, block_v)`:
  multiples of (8, 128) or full, as Mosaic requires.
- The chunk-parallel passes (`intra_fwd`, `intra_bwd`) reuse the GPU launchers with TPU compiler
  params (both grid axes "parallel").
- The state passes run on grid `(B·H, Dv/block_v, N)` with the chunk axis innermost and
  "arbitrary": the `[Dk, block_v]` float32 state lives in a VMEM scratch buffer across the
  sequential chunk steps, and Pallas pipelines one chunk of q/k/W/Ũ at a time through VMEM
  (so VMEM use does not grow with T). The backward state pass walks the chunks in reverse through
  its index maps.

Axis letters: B batch, T time, H heads, Dk/Dv head dims, N chunks, C chunk length.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from moejax.kernels.delta_rule import pallas_gpu
from moejax.kernels.delta_rule import pallas_kernel as pk
from moejax.kernels.delta_rule.pallas_gpu import SQUEEZED, DeltaRuleOptions, Prepared

_PARALLEL = getattr(pltpu, "PARALLEL", "parallel")
_ARBITRARY = getattr(pltpu, "ARBITRARY", "arbitrary")
_CompilerParams = getattr(pltpu, "CompilerParams", None) or pltpu.TPUCompilerParams


def compiler_params(ndim: int, opts: DeltaRuleOptions, sequential_last: bool = False):
    """`(compiler_params, interpret)` for a grid of `ndim` axes."""
    sem = [_PARALLEL] * ndim
    if sequential_last:
        sem[-1] = _ARBITRARY
    interpret = pltpu.InterpretParams() if opts.interpret else False
    return _CompilerParams(dimension_semantics=tuple(sem)), interpret


def _state_fwd_kernel(*refs, has_g, scale, store_states):
    q_ref, k_ref, w_ref, u_ref, *rest = refs
    g_ref = rest.pop(0) if has_g else None
    h0_ref, o_ref, hT_ref, *rest = rest
    st_ref = rest.pop(0) if store_states else None
    (s_ref,) = rest
    n, N = pl.program_id(2), pl.num_programs(2)

    @pl.when(n == 0)
    def _():
        s_ref[...] = h0_ref[...]

    S = s_ref[...]
    if st_ref is not None:
        st_ref[...] = S
    m = pk.Masks.make(q_ref.shape[0])
    gt = pk.gates(m, None if g_ref is None else pk.load_f32(g_ref))
    O, S = pk.chunk_out(m, gt, pk.load_f32(q_ref), pk.load_f32(k_ref), w_ref[...], u_ref[...],
                        S, scale)
    o_ref[...] = O
    s_ref[...] = S

    @pl.when(n == N - 1)
    def _():
        hT_ref[...] = S


def _state_bwd_kernel(*refs, has_g, scale):
    q_ref, k_ref, w_ref, do_ref, *rest = refs
    g_ref = rest.pop(0) if has_g else None
    dhT_ref, dh0_ref, dhs_ref, s_ref = rest
    i, N = pl.program_id(2), pl.num_programs(2)

    @pl.when(i == 0)
    def _():
        s_ref[...] = dhT_ref[...]

    dS = s_ref[...]
    dhs_ref[...] = dS
    m = pk.Masks.make(q_ref.shape[0])
    gt = pk.gates(m, None if g_ref is None else pk.load_f32(g_ref))
    dS = pk.chunk_state_bwd(m, gt, pk.load_f32(q_ref), pk.load_f32(k_ref), w_ref[...],
                            pk.load_f32(do_ref), dS, scale)
    s_ref[...] = dS

    @pl.when(i == N - 1)
    def _():
        dh0_ref[...] = dS


def _specs(p: Prepared, bv, reverse=False):
    """Block specs over grid `(B·H, Dv tiles, N)`; chunk n is `N−1−n` when `reverse`."""
    N = p.q.shape[1]
    at = (lambda n: N - 1 - n) if reverse else (lambda n: n)
    C, Dkp = p.q.shape[2:]
    full = lambda D: pl.BlockSpec((SQUEEZED, SQUEEZED, C, D), lambda i, j, n: (i, at(n), 0, 0))
    tile = pl.BlockSpec((SQUEEZED, SQUEEZED, C, bv), lambda i, j, n: (i, at(n), 0, j))
    state = pl.BlockSpec((SQUEEZED, Dkp, bv), lambda i, j, n: (i, 0, j))
    chunk_state = pl.BlockSpec((SQUEEZED, SQUEEZED, Dkp, bv), lambda i, j, n: (i, at(n), 0, j))
    return full, tile, state, chunk_state


def state_fwd(p: Prepared, W, Ut, opts: DeltaRuleOptions, *, store_states: bool):
    """TPU twin of `pallas_gpu.state_fwd` (same outputs)."""
    BH, N, C, Dkp = p.q.shape
    Dvp = p.v.shape[-1]
    bv = opts.default_block_v(Dvp)
    full, tile, state, chunk_state = _specs(p, bv)
    ins = [p.q, p.k, W, Ut] + ([p.g] if p.g is not None else []) + [p.h0]
    in_specs = [full(Dkp), full(Dkp), full(Dkp), tile] + ([full(1)] if p.g is not None else [])
    in_specs.append(state)
    out_shape = [jax.ShapeDtypeStruct((BH, N, C, Dvp), jnp.float32),
                 jax.ShapeDtypeStruct((BH, Dkp, Dvp), jnp.float32)]
    out_specs = [tile, state]
    if store_states:
        out_shape.append(jax.ShapeDtypeStruct((BH, N, Dkp, Dvp), jnp.float32))
        out_specs.append(chunk_state)
    params, interpret = compiler_params(3, opts, sequential_last=True)
    kernel = functools.partial(_state_fwd_kernel, has_g=p.g is not None, scale=opts.scale,
                               store_states=store_states)
    flops = BH * N * (2 * C * C * Dkp + 2 * C * Dvp * (3 * Dkp + C))
    outs = pl.pallas_call(
        kernel, grid=(BH, Dvp // bv, N), in_specs=in_specs, out_specs=out_specs,
        out_shape=out_shape, scratch_shapes=[pltpu.VMEM((Dkp, bv), jnp.float32)],
        compiler_params=params, interpret=interpret, name="delta_rule_state_fwd",
        cost_estimate=pl.CostEstimate(
            flops=int(flops), transcendentals=0,
            bytes_accessed=int(pallas_gpu._nbytes(*ins) + 4 * BH * N * C * Dvp)),
    )(*ins)
    return outs[0], outs[1], (outs[2] if store_states else None)


def state_bwd(p: Prepared, W, dO, dhT, opts: DeltaRuleOptions):
    """TPU twin of `pallas_gpu.state_bwd`."""
    BH, N, C, Dkp = p.q.shape
    Dvp = p.v.shape[-1]
    bv = opts.default_block_v(Dvp)
    full, tile, state, chunk_state = _specs(p, bv, reverse=True)
    ins = [p.q, p.k, W, dO] + ([p.g] if p.g is not None else []) + [dhT]
    in_specs = [full(Dkp), full(Dkp), full(Dkp), tile] + ([full(1)] if p.g is not None else [])
    in_specs.append(state)
    out_shape = (jax.ShapeDtypeStruct((BH, Dkp, Dvp), jnp.float32),
                 jax.ShapeDtypeStruct((BH, N, Dkp, Dvp), jnp.float32))
    params, interpret = compiler_params(3, opts, sequential_last=True)
    kernel = functools.partial(_state_bwd_kernel, has_g=p.g is not None, scale=opts.scale)
    flops = BH * N * (2 * C * C * Dkp + 2 * C * Dvp * (3 * Dkp + C))
    return pl.pallas_call(
        kernel, grid=(BH, Dvp // bv, N), in_specs=in_specs, out_specs=(state, chunk_state),
        out_shape=out_shape, scratch_shapes=[pltpu.VMEM((Dkp, bv), jnp.float32)],
        compiler_params=params, interpret=interpret, name="delta_rule_state_bwd",
        cost_estimate=pl.CostEstimate(
            flops=int(flops), transcendentals=0,
            bytes_accessed=int(pallas_gpu._nbytes(*ins) + 4 * BH * N * Dkp * Dvp)),
    )(*ins)


delta_rule_tpu = pallas_gpu.make_custom_vjp(pallas_gpu.intra_fwd, state_fwd, state_bwd,
                                            pallas_gpu.intra_bwd)
delta_rule_tpu.__doc__ = """TPU (Mosaic) delta rule with custom VJP; `opts.backend` must be "tpu".

Args and returns as `pallas_gpu.delta_rule_gpu`.
"""
