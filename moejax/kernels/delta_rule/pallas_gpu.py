"""Pallas (Triton lowering) delta-rule kernels for GPU, forward and backward, with a custom VJP.

The op runs as pallas_calls over a `[B·H, N, C, D]` layout (N chunks of C steps, head dims
zero-padded to powers of two ≥ 16, T zero-padded to N·C with β = 0 and g = 0, which leaves the
state untouched, so padding is exact):

1. `pallas_kernel.intra_fwd_kernel`, grid `(B·H, N)`: per chunk, `Tm = (I + A)⁻¹` by forward
   substitution, `W = Tm diag(βγ) X` and `Ũ = Tm diag(β) V` (chunk-parallel).
2. `_state_fwd_kernel`, grid `(B·H, Dv/block_v)`: a loop over the N chunks carrying the
   `[Dk, block_v]` float32 state in registers; writes O, the final state and (for the backward)
   every chunk's start state. State columns are independent, so Dv is split across programs.
3. `_state_bwd_kernel`, same grid, chunks in reverse: carries `dS`, writes every chunk's
   end-state gradient and `d initial_state`.
4. `pallas_kernel.intra_bwd_kernel`, grid `(B·H, N)`: with the chunk's start state and
   end-state gradient, recomputes `Tm, W, Ũ, U` and returns dq, dk, dv, dβ, dg, dλ
   (chunk-parallel).

The forward rule keeps only the inputs as residuals; the backward re-runs (1) and (2) for W and
the chunk states (as flash-linear-attention does), then runs (3) and (4).
The chunk math lives in `pallas_kernel.py`, shared with the TPU kernels. Both run under
`nonfinite.contain` (NaN/inf at a step never reaches earlier steps' outputs or gradients) and
handle g = −inf (a full reset) exactly.

Axis letters: B batch, T time, H heads, Dk/Dv head dims, N chunks, C chunk length.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from moejax.kernels.delta_rule import nonfinite
from moejax.kernels.delta_rule import pallas_kernel as pk

try:  # jax ≥ 0.7 spells it CompilerParams; older releases TritonCompilerParams.
    from jax.experimental.pallas import triton as _plgpu

    _TritonParams = getattr(_plgpu, "CompilerParams", None) or _plgpu.TritonCompilerParams
except (ImportError, AttributeError):  # pragma: no cover - the Triton plugin is optional
    _TritonParams = None

Array = jax.Array
# A squeezed block dim: `pl.squeezed` on current jax, `None` on releases before it existed.
SQUEEZED = getattr(pl, "squeezed", None)


def _next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class DeltaRuleOptions:
    """Static options of the Pallas delta-rule kernels (the custom VJP's one static argument).

    Attributes:
      scale: readout scale.
      chunk_size: requested chunk length; the kernel uses `kernel_chunk(T)` (a power of two in
        [16, 128], results do not depend on it).
      block_v: Dv tile of the state kernels (None: min(padded Dv, 64 on GPU, 128 on TPU)).
      interpret: run the kernels in Pallas interpret mode (CPU).
      num_warps: Triton warps per program (GPU only).
      backend: "gpu" (Triton; head dims padded to powers of two ≥ 16) or "tpu" (Mosaic; head
        dims padded to multiples of 128, the lane width). Interpret mode follows it: GPU
        semantics (`interpret=True`) or `pltpu.InterpretParams()`.
    """

    scale: float
    chunk_size: int = 64
    block_v: int | None = None
    interpret: bool = False
    num_warps: int = 4
    backend: str = "gpu"

    def __post_init__(self):
        if self.backend not in ("gpu", "tpu"):
            raise ValueError(f"backend must be 'gpu' or 'tpu', got {self.backend!r}")

    def pad_dim(self, d: int) -> int:
        """Padded head dim: Triton needs powers of two (≥ 16 for dots); TPU lanes are 128."""
        if self.backend == "tpu":
            return -(-d // 128) * 128
        return max(16, _next_pow2(d))

    def default_block_v(self, Dvp: int) -> int:
        bv = (128 if self.backend == "tpu" else 64) if self.block_v is None else self.block_v
        bv = min(bv, Dvp)
        if Dvp % bv:
            raise ValueError(f"padded Dv={Dvp} must be a multiple of block_v={bv}")
        return bv

    def kernel_chunk(self, T: int) -> int:
        C = min(max(16, _next_pow2(self.chunk_size)), 128)
        return min(C, max(16, _next_pow2(T)))


# ------------------------------------------------------------------------------------------
# Layout helpers (shared with pallas_tpu.py).


def to_chunks(a, C, D=None, dtype=None):
    """`[B, T, H, (D)]` → `[B·H, N, C, D or 1]`, zero-padded in T (and D)."""
    B, T, H = a.shape[:3]
    if a.ndim == 3:
        a = a[..., None]
    D = a.shape[-1] if D is None else D
    Tp = -(-T // C) * C
    a = jnp.pad(a, ((0, 0), (0, Tp - T), (0, 0), (0, D - a.shape[-1])))
    a = a.transpose(0, 2, 1, 3).reshape(B * H, Tp // C, C, D)
    return a if dtype is None else a.astype(dtype)


def from_chunks(a, B, T, H, D=None):
    """`[B·H, N, C, Dp]` → `[B, T, H, D]` (or `[B, T, H]` when D is None)."""
    BH, N, C, Dp = a.shape
    a = a.reshape(B, H, N * C, Dp).transpose(0, 2, 1, 3)[:, :T]
    return a[..., 0] if D is None else a[..., :D]


@dataclasses.dataclass(frozen=True)
class Prepared:
    """Inputs in kernel layout; `g`/`lam` None when absent."""

    q: Array
    k: Array
    v: Array
    b: Array
    g: Array | None
    lam: Array | None
    h0: Array  # [B·H, Dkp, Dvp] float32


def prepare(q, k, v, beta, g, lam, h0, C, Dkp, Dvp):
    B, T, H, Dk = q.shape
    Dv = v.shape[-1]
    f32 = jnp.float32
    vec = lambda a: None if a is None else to_chunks(a, C, dtype=f32)
    h = jnp.pad(h0.astype(f32), ((0, 0), (0, 0), (0, Dkp - Dk), (0, Dvp - Dv)))
    return Prepared(to_chunks(q, C, Dkp), to_chunks(k, C, Dkp), to_chunks(v, C, Dvp), vec(beta),
                    vec(g), vec(lam), h.reshape(B * H, Dkp, Dvp))


# ------------------------------------------------------------------------------------------
# State kernels (grid `(B·H, Dv tiles)`, a loop over the chunks inside). Refs arrive in the
# order of the launchers' `ins`; the g ref is present only when the mode uses it (static
# specialisation of the four modes).


def _state_fwd_kernel(*refs, has_g, scale, store_states):
    q_ref, k_ref, w_ref, u_ref, *rest = refs
    g_ref = rest.pop(0) if has_g else None
    h0_ref, o_ref, hT_ref, *states = rest
    N, C = q_ref.shape[:2]
    m = pk.Masks.make(C)

    def body(n, S):
        if store_states:
            states[0][n] = S
        gt = pk.gates(m, None if g_ref is None else pk.load_f32(g_ref, n))
        q, k = pk.load_f32(q_ref, n), pk.load_f32(k_ref, n)
        O, S = pk.chunk_out(m, gt, q, k, w_ref[n], u_ref[n], S, scale)
        o_ref[n] = O
        return S

    hT_ref[...] = jax.lax.fori_loop(0, N, body, h0_ref[...])


def _state_bwd_kernel(*refs, has_g, scale):
    q_ref, k_ref, w_ref, do_ref, *rest = refs
    g_ref = rest.pop(0) if has_g else None
    dhT_ref, dh0_ref, dhs_ref = rest
    N, C = q_ref.shape[:2]
    m = pk.Masks.make(C)

    def body(i, dS):
        n = N - 1 - i
        dhs_ref[n] = dS
        gt = pk.gates(m, None if g_ref is None else pk.load_f32(g_ref, n))
        return pk.chunk_state_bwd(m, gt, pk.load_f32(q_ref, n), pk.load_f32(k_ref, n), w_ref[n],
                                  pk.load_f32(do_ref, n), dS, scale)

    dh0_ref[...] = jax.lax.fori_loop(0, N, body, dhT_ref[...])


# ------------------------------------------------------------------------------------------
# Launchers.


def _call(kernel, *, grid, in_specs, out_specs, out_shape, opts, cost, name, num_warps=None,
          **kw):
    """`pl.pallas_call` with the backend's compiler params and interpret flavour."""
    if opts.backend == "tpu":
        from moejax.kernels.delta_rule import pallas_tpu  # the TPU module imports this one

        params, interpret = pallas_tpu.compiler_params(len(grid), opts)
    else:
        params, interpret = None, opts.interpret
        if _TritonParams is not None and not opts.interpret:
            params = _TritonParams(num_warps=num_warps or opts.num_warps, num_stages=2)
    return pl.pallas_call(
        kernel, grid=grid, in_specs=in_specs, out_specs=out_specs, out_shape=out_shape,
        interpret=interpret, compiler_params=params, name=name,
        cost_estimate=pl.CostEstimate(**{k: int(v) for k, v in cost.items()}), **kw,
    )


def _nbytes(*arrays):
    return sum(a.size * a.dtype.itemsize for a in arrays if a is not None)


def _chunk_spec(a):
    """Block = one chunk `[C, D]` of `[B·H, N, C, D]`, grid `(B·H, N)`."""
    return pl.BlockSpec((SQUEEZED, SQUEEZED, *a.shape[2:]), lambda i, n: (i, n, 0, 0))


def _seq_spec(a, bv=None):
    """Block = a whole sequence `[N, C, D]` (or a Dv tile of it), grid `(B·H, Dv tiles)`."""
    if bv is None:
        return pl.BlockSpec((SQUEEZED, *a.shape[1:]), lambda i, j: (i, 0, 0, 0))
    return pl.BlockSpec((SQUEEZED, *a.shape[1:3], bv), lambda i, j: (i, 0, 0, j))


def intra_fwd(p: Prepared, opts: DeltaRuleOptions):
    """`W [B·H, N, C, Dkp]`, `Ũ [B·H, N, C, Dvp]` in float32."""
    BH, N, C, Dkp = p.q.shape
    Dvp = p.v.shape[-1]
    ins = [a for a in (p.q, p.k, p.v, p.b, p.g, p.lam) if a is not None]
    out_shape = (jax.ShapeDtypeStruct((BH, N, C, Dkp), jnp.float32),
                 jax.ShapeDtypeStruct((BH, N, C, Dvp), jnp.float32))
    flops = BH * N * (2 * C * C * Dkp + C**3 + 2 * C * C * (Dkp + Dvp))
    kernel = functools.partial(pk.intra_fwd_kernel, has_g=p.g is not None,
                               has_lam=p.lam is not None)
    return _call(kernel, grid=(BH, N), in_specs=[_chunk_spec(a) for a in ins],
                 out_specs=[_chunk_spec(s) for s in out_shape], out_shape=out_shape, opts=opts,
                 cost=dict(flops=flops, transcendentals=BH * N * C * C if p.g is not None else 0,
                           bytes_accessed=_nbytes(*ins) + 4 * BH * N * C * (Dkp + Dvp)),
                 name="delta_rule_intra_fwd")(*ins)


def state_fwd(p: Prepared, W, Ut, opts: DeltaRuleOptions, *, store_states: bool):
    """`(O [B·H, N, C, Dvp], S_T [B·H, Dkp, Dvp], chunk start states [B·H, N, Dkp, Dvp] | None)`."""
    BH, N, C, Dkp = p.q.shape
    Dvp = p.v.shape[-1]
    bv = opts.default_block_v(Dvp)
    ins = [p.q, p.k, W, Ut] + ([p.g] if p.g is not None else []) + [p.h0]
    in_specs = [_seq_spec(p.q), _seq_spec(p.k), _seq_spec(W), _seq_spec(Ut, bv)]
    if p.g is not None:
        in_specs.append(_seq_spec(p.g))
    in_specs.append(pl.BlockSpec((SQUEEZED, Dkp, bv), lambda i, j: (i, 0, j)))
    out_shape = [jax.ShapeDtypeStruct((BH, N, C, Dvp), jnp.float32),
                 jax.ShapeDtypeStruct((BH, Dkp, Dvp), jnp.float32)]
    out_specs = [_seq_spec(out_shape[0], bv), in_specs[-1]]
    if store_states:
        out_shape.append(jax.ShapeDtypeStruct((BH, N, Dkp, Dvp), jnp.float32))
        out_specs.append(pl.BlockSpec((SQUEEZED, N, Dkp, bv), lambda i, j: (i, 0, 0, j)))
    flops = BH * N * (2 * C * C * Dkp + 2 * C * Dvp * (3 * Dkp + C))
    kernel = functools.partial(_state_fwd_kernel, has_g=p.g is not None, scale=opts.scale,
                               store_states=store_states)
    outs = _call(kernel, grid=(BH, Dvp // bv), in_specs=in_specs, out_specs=out_specs,
                 out_shape=out_shape, opts=opts,
                 cost=dict(flops=flops, transcendentals=0,
                           bytes_accessed=_nbytes(*ins) + 4 * BH * N * C * Dvp),
                 name="delta_rule_state_fwd")(*ins)
    return outs[0], outs[1], (outs[2] if store_states else None)


def state_bwd(p: Prepared, W, dO, dhT, opts: DeltaRuleOptions):
    """`(d S_0 [B·H, Dkp, Dvp], end-state grads of every chunk [B·H, N, Dkp, Dvp])`."""
    BH, N, C, Dkp = p.q.shape
    Dvp = p.v.shape[-1]
    bv = opts.default_block_v(Dvp)
    ins = [p.q, p.k, W, dO] + ([p.g] if p.g is not None else []) + [dhT]
    in_specs = [_seq_spec(p.q), _seq_spec(p.k), _seq_spec(W), _seq_spec(dO, bv)]
    if p.g is not None:
        in_specs.append(_seq_spec(p.g))
    state_spec = pl.BlockSpec((SQUEEZED, Dkp, bv), lambda i, j: (i, 0, j))
    in_specs.append(state_spec)
    out_shape = (jax.ShapeDtypeStruct((BH, Dkp, Dvp), jnp.float32),
                 jax.ShapeDtypeStruct((BH, N, Dkp, Dvp), jnp.float32))
    out_specs = (state_spec, pl.BlockSpec((SQUEEZED, N, Dkp, bv), lambda i, j: (i, 0, 0, j)))
    flops = BH * N * (2 * C * C * Dkp + 2 * C * Dvp * (3 * Dkp + C))
    kernel = functools.partial(_state_bwd_kernel, has_g=p.g is not None, scale=opts.scale)
    return _call(kernel, grid=(BH, Dvp // bv), in_specs=in_specs, out_specs=out_specs,
                 out_shape=out_shape, opts=opts,
                 cost=dict(flops=flops, transcendentals=0,
                           bytes_accessed=_nbytes(*ins) + 4 * BH * N * Dkp * Dvp),
                 name="delta_rule_state_bwd")(*ins)


def intra_bwd(p: Prepared, states, dhs, dO, opts: DeltaRuleOptions):
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
                               block_v=opts.default_block_v(Dvp))
    outs = _call(kernel, grid=(BH, N), in_specs=in_specs,
                 out_specs=[_chunk_spec(s) for s in out_shape], out_shape=out_shape, opts=opts,
                 cost=dict(flops=flops, transcendentals=BH * N * C * C if has_g else 0,
                           bytes_accessed=_nbytes(*ins) + 4 * BH * N * C * (2 * Dkp + Dvp)),
                 name="delta_rule_intra_bwd", num_warps=2 * opts.num_warps)(*ins)
    dq, dk, dv, db, *rest = outs
    dg = rest.pop(0) if has_g else None
    dl = rest.pop(0) if has_lam else None
    return dq, dk, dv, db, dg, dl


# ------------------------------------------------------------------------------------------
# Forward / backward launchers and the custom VJP.


def make_custom_vjp(intra_fwd_fn, state_fwd_fn, state_bwd_fn, intra_bwd_fn):
    """Builds `f(q, k, v, beta, g, lam, h0, opts) -> (o f32, S_T f32)` with a custom VJP from
    the four launchers of a backend (the GPU and TPU kernels share this glue).

    f runs the custom-VJP function under `nonfinite.contain`, so the kernels (forward and
    backward) only ever see finite inputs (and g = −inf, a reset), and float64 inputs are
    rounded to float32 first (the kernels compute in float32; Mosaic has no float64).
    """

    def shapes(q, v, opts):
        B, T, H, Dk = q.shape
        Dv = v.shape[-1]
        return B, T, H, Dk, Dv, opts.kernel_chunk(T), opts.pad_dim(Dk), opts.pad_dim(Dv)

    def fwd(q, k, v, beta, g, lam, h0, opts):
        B, T, H, Dk, Dv, C, Dkp, Dvp = shapes(q, v, opts)
        p = prepare(q, k, v, beta, g, lam, h0, C, Dkp, Dvp)
        W, Ut = intra_fwd_fn(p, opts)
        O, hT, _ = state_fwd_fn(p, W, Ut, opts, store_states=False)
        return from_chunks(O, B, T, H, Dv), hT.reshape(B, H, Dkp, Dvp)[..., :Dk, :Dv]

    @functools.partial(jax.custom_vjp, nondiff_argnums=(7,))
    def f(q, k, v, beta, g, lam, h0, opts):
        return fwd(q, k, v, beta, g, lam, h0, opts)

    def f_fwd(q, k, v, beta, g, lam, h0, opts):
        return fwd(q, k, v, beta, g, lam, h0, opts), (q, k, v, beta, g, lam, h0)

    def f_bwd(opts, res, cts):
        q, k, v, beta, g, lam, h0 = res
        do, dhT = cts
        B, T, H, Dk, Dv, C, Dkp, Dvp = shapes(q, v, opts)
        p = prepare(q, k, v, beta, g, lam, h0, C, Dkp, Dvp)
        W, Ut = intra_fwd_fn(p, opts)
        _, _, states = state_fwd_fn(p, W, Ut, opts, store_states=True)
        dO = to_chunks(do.astype(jnp.float32), C, Dvp)
        dhT = jnp.pad(dhT.astype(jnp.float32), ((0, 0), (0, 0), (0, Dkp - Dk), (0, Dvp - Dv)))
        dh0, dhs = state_bwd_fn(p, W, dO, dhT.reshape(B * H, Dkp, Dvp), opts)
        dq, dk, dv, db, dg, dl = intra_bwd_fn(p, states, dhs, dO, opts)
        cast = lambda d, a: None if a is None else d.astype(a.dtype)
        return (cast(from_chunks(dq, B, T, H, Dk), q), cast(from_chunks(dk, B, T, H, Dk), k),
                cast(from_chunks(dv, B, T, H, Dv), v), cast(from_chunks(db, B, T, H), beta),
                None if g is None else cast(from_chunks(dg, B, T, H), g),
                None if lam is None else cast(from_chunks(dl, B, T, H), lam),
                cast(dh0.reshape(B, H, Dkp, Dvp)[..., :Dk, :Dv], h0))

    f.defvjp(f_fwd, f_bwd)

    def contained(q, k, v, beta, g, lam, h0, opts):
        narrow = lambda a: (a if a is None or jnp.dtype(a.dtype).itemsize <= 4
                            else a.astype(jnp.float32))
        return nonfinite.contain(f, *map(narrow, (q, k, v, beta, g, lam, h0)), opts)

    return contained


delta_rule_gpu = make_custom_vjp(intra_fwd, state_fwd, state_bwd, intra_bwd)
delta_rule_gpu.__doc__ = """GPU (Triton) delta rule with custom VJP.

Non-finite inputs are contained as in `nonfinite.contain` (outputs before a bad step, other
sequences and heads, and their gradients are unaffected); g = −inf is a full reset.

Args:
  q, k: `[B, T, H, Dk]`; v: `[B, T, H, Dv]`; beta: `[B, T, H]`; g, lam: `[B, T, H]` or None;
  h0: `[B, H, Dk, Dv]` initial state (zeros for none); opts: `DeltaRuleOptions`.

Returns:
  `(o [B, T, H, Dv] float32, S [B, H, Dk, Dv] float32)`.
"""
