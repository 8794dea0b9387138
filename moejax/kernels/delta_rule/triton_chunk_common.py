"""Options, layout, gate factors and in-kernel math of the Hopper delta-rule kernels.

Shared by the kernels of `triton_chunk.py` (DESIGN §3, "Chunkwise form"). Per chunk of C steps:

    G = cumsum(g),  γ = exp(G),  Γ_tj = exp(G_t − G_j) (j ≤ t),  d_t = exp(G_C − G_t)
    A  = strict_tril(diag(β) (X Kᵀ ⊙ Γ)),  Ai = (I + A)⁻¹,  x_t = k_t + λ_t q_t
    W  = Ai diag(βγ) X,  Ũ = Ai diag(β) V,  U = Ũ − W S
    O  = scale (diag(γ) Q S + (Q Kᵀ ⊙ Γ) U),  S' = γ_C S + (diag(d) K)ᵀ U

Full resets (`exp(g_s) = 0`, e.g. g = −inf) are handled as in `chunk.py`: `G` sums only the
other steps' g, and a running count `n` of resets masks (with `where`, before the exp) every
factor whose span contains one. The per-step factors (`G`, `n`, `γ`, `d`, `γ_C`) are formed
here in plain jnp (`gate_vectors`), the `[C, C]` Γ inside the kernels (`decay_matrix`).

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

Array = jax.Array
F32 = jnp.float32
BK = 64  # Dk tile of every kernel (the state is kept as ≤ 4 [64, BV] float32 blocks)
SUB = 16  # diagonal block of the triangular solve


def _i32(x: int):
    """An int32 constant: Python ints become int64 under `jax_enable_x64`, which Triton's and
    Mosaic's loop bounds and integer ops refuse."""
    return jnp.int32(x)
FP32_PRECISIONS = ("ieee", "tf32", "tf32x3")


def next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def pad_dim(d: int) -> int:
    """Head dims are padded to powers of two ≥ 16 (Triton tensors, dots need ≥ 16)."""
    return max(SUB, next_pow2(d))


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class TritonChunkOptions:
    """Static options of the Hopper chunk kernels (the custom VJP's one static argument).

    Attributes:
      scale: readout scale.
      chunk_size: requested chunk length; the kernels use `kernel_chunk(T)`, a power of two in
        [16, 64] (results do not depend on it).
      interpret: run the kernels in Pallas interpret mode (CPU).
      fp32_precision: dots of float32 data: "tf32", "tf32x3" (3×TF32, float32 accuracy on
        tensor cores) or "ieee" (FMA, no tensor cores); None follows
        `jax_default_matmul_precision` ("highest"/"float32" → "tf32x3", else "tf32").
        Interpret mode always computes float32 dots at HIGHEST.
      block_v: Dv tile of the kernels (None: the per-shape table of `launch`).
    """

    scale: float
    chunk_size: int = 64
    interpret: bool = False
    fp32_precision: str | None = None
    block_v: int | None = None

    def __post_init__(self):
        if self.fp32_precision is not None and self.fp32_precision not in FP32_PRECISIONS:
            raise ValueError(f"fp32_precision must be one of {FP32_PRECISIONS} or None, got "
                             f"{self.fp32_precision!r}")
        if self.block_v is not None and (self.block_v < SUB or self.block_v & (self.block_v - 1)):
            raise ValueError(f"block_v must be a power of two >= {SUB}, got {self.block_v}")

    def kernel_chunk(self, T: int) -> int:
        C = min(max(SUB, next_pow2(self.chunk_size)), 64)
        return min(C, max(SUB, next_pow2(T)))

    def resolved(self) -> TritonChunkOptions:
        """`fp32_precision` fixed from the jax config (read at trace time)."""
        if self.fp32_precision is not None:
            return self
        p = jax.config.jax_default_matmul_precision
        full = p is not None and str(p).lower() in ("highest", "float32", "f32_f32_f32")
        return dataclasses.replace(self, fp32_precision="tf32x3" if full else "tf32")


def as_options(opts) -> TritonChunkOptions:
    """`TritonChunkOptions` from itself or from `pallas_gpu.DeltaRuleOptions` (duck-typed)."""
    if isinstance(opts, TritonChunkOptions):
        return opts.resolved()
    return TritonChunkOptions(scale=float(opts.scale), chunk_size=int(opts.chunk_size),
                              interpret=bool(opts.interpret)).resolved()


@dataclasses.dataclass(frozen=True, slots=True)
class Cfg:
    """What a kernel body needs to know statically: dot dtype and float32 dot precision."""

    cd: str  # dot operand dtype: "bfloat16", "float16" or "float32"
    fp: str  # precision of float32 dots: "ieee", "tf32", "tf32x3"
    scale: float

    @classmethod
    def make(cls, dtype, opts: TritonChunkOptions) -> Cfg:
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
# Layout and gate factors (plain jnp, outside the kernels).


def to_chunks(a, C, D=None, dtype=None):
    """`[B, T, H, (D)]` → `[B·H, N, C, D]` (or `[B·H, N, C]` for `[B, T, H]`), zero-padded."""
    B, T, H = a.shape[:3]
    Tp = -(-T // C) * C
    if a.ndim == 3:
        a = jnp.pad(a, ((0, 0), (0, Tp - T), (0, 0)))
        a = a.transpose(0, 2, 1).reshape(B * H, Tp // C, C)
    else:
        D = a.shape[-1] if D is None else D
        a = jnp.pad(a, ((0, 0), (0, Tp - T), (0, 0), (0, D - a.shape[-1])))
        a = a.transpose(0, 2, 1, 3).reshape(B * H, Tp // C, C, D)
    return a if dtype is None else a.astype(dtype)


def from_chunks(a, B, T, H, D=None):
    """`[B·H, N, C, Dp]` → `[B, T, H, D]`, or `[B·H, N, C]` → `[B, T, H]`."""
    if a.ndim == 3:
        BH, N, C = a.shape
        return a.reshape(B, H, N * C).transpose(0, 2, 1)[:, :T]
    BH, N, C, Dp = a.shape
    return a.reshape(B, H, N * C, Dp).transpose(0, 2, 1, 3)[:, :T, :, :D]


@dataclasses.dataclass(frozen=True)
class GateVectors:
    """Per-step gate factors `[B·H, N, C]` float32 (module docstring)."""

    G: Array  # reset-free cumulative log decay
    n: Array  # resets in [0, t] (small integers as float32)
    gamma: Array  # γ_t = exp(G_t), 0 after a reset in [0, t]
    dec: Array  # exp(G_C − G_t), 0 if a reset lies in (t, C−1]
    gC: Array  # γ_C = exp(G_C) (0 after any reset), replicated over the C steps
    reset: Array  # bool, exp(g_t) == 0


def gate_vectors(g) -> GateVectors:
    """From the chunked log decays `[B·H, N, C]` (g may hold −inf: a full reset)."""
    reset = jnp.exp(g) == 0.0
    G = jnp.cumsum(jnp.where(reset, 0.0, g), axis=-1)
    n = jnp.cumsum(reset.astype(F32), axis=-1)
    nC, GC = n[..., -1:], G[..., -1:]
    gamma = jnp.where(n == 0.0, jnp.exp(G), 0.0)
    dec = jnp.where(n == nC, jnp.exp(jnp.where(n == nC, GC - G, 0.0)), 0.0)
    gC = jnp.broadcast_to(jnp.where(nC == 0.0, jnp.exp(GC), 0.0), g.shape)
    return GateVectors(G, n, gamma, dec, gC, reset)


def gate_grad(gv: GateVectors, dG):
    """`dg` `[B·H, N, C]` from the gradient w.r.t. the cumulative G: a reverse cumsum within the
    chunk (`G_t = Σ_{s≤t} g_s`), 0 at a reset (`d exp(g)/dg = exp(g) = 0` there)."""
    dg = jnp.flip(jnp.cumsum(jnp.flip(dG, -1), axis=-1), -1)
    return jnp.where(gv.reset, 0.0, dg)
