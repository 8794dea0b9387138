"""What the Pallas delta-rule backends share: static options, layout and launch helpers.

Backend-neutral (no backend import): `pallas_gpu.py` (Triton) and `pallas_tpu.py` (Mosaic)
import this file, never each other; `ops.py` builds the `DeltaRuleOptions` and holds the
custom VJP.

The kernels run on a `[B·H, N, C, D]` layout: N chunks of C steps, head dims zero-padded (each
backend picks its padding), T zero-padded to N·C with β = 0 and g = 0, which leaves the state
untouched, so padding is exact.

Axis letters: B batch, T time, H heads, Dk/Dv head dims, N chunks, C chunk length.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from moejax.kernels import gpu_compile
from moejax.kernels.delta_rule.chunk import check_pairing

Array = jax.Array
F32 = jnp.float32
BACKENDS = ("gpu", "tpu")
FP32_PRECISIONS = ("ieee", "tf32", "tf32x3")
MIN_BLOCK = 16  # the smallest chunk length and Dv tile (Triton dots need ≥ 16)
# A squeezed block dim: `pl.squeezed` on current jax, `None` on releases before it existed.
SQUEEZED = getattr(pl, "squeezed", None)

# What the GPU kernels' sm_90a compile check covers (tests/gpu_compile): input dtypes and the
# largest head dims (the 256/512 of the biggest GPU preset).
GPU_KERNEL_DTYPES = tuple(jnp.dtype(d) for d in gpu_compile.COVERED_DTYPES)
GPU_KERNEL_MAX_DK, GPU_KERNEL_MAX_DV = gpu_compile.DELTA_RULE_MAX_HEAD_DIMS


# What both backends' `delta_rule_fwd` / `delta_rule_bwd` take and return (`ops.py` holds the
# one custom VJP around them and does the rest: folding g into gk, moving packed sequences onto
# chunk boundaries, `nonfinite.contain`).
KERNEL_CONTRACT = """
delta_rule_fwd(q, k, v, beta, g, gk, lam, h0, rs, h0s, opts) -> (o, S_T, pre)
delta_rule_bwd(q, k, v, beta, g, gk, lam, h0, rs, h0s, do, dhT, dpre, opts)
    -> (dq, dk, dv, dbeta, dg, dgk, dlam, dh0, dh0s)

q, k [B, T, H, Dk]; v [B, T, H, Dv]; beta [B, T, H]; lam [B, T, H] or None; at most 32-bit,
finite (g and gk may hold -inf: a reset of the state, of one key channel's row for gk).
g [B, T, H] (one log decay per step) and gk [B, T, H, Dk] (one per key channel, Kimi Delta
Attention: S' = diag(exp(gk_t)) S) are each None or given, never both (ops.py adds g to gk).
h0 [B, H, Dk, Dv] float32, the initial state.
rs None, or [B, N] int32 with N = ceil(T / C), C = kernel_chunk(opts, T): chunk n of row b
    starts with state h0s[b, n] (1) or carries the state on (0); h0s [B, N, H, Dk, Dv] float32
    (None with rs None). Chunk 0 restarts or starts from h0 as any other.
o [B, T, H, Dv] float32; S_T [B, H, Dk, Dv] float32, the state after the last step;
pre [B, N, H, Dk, Dv] float32, the state at the start of each chunk *before* its restart
    (pre[:, 0] = h0; pre[:, n] the state after chunk n - 1), or None with rs None.
The backward takes the cotangents do, dhT (and dpre, None with rs None) and returns float32
gradients, None for each input that is None (dh0s None with rs None).
"""


def next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class DeltaRuleOptions:
    """Static options of the Pallas delta-rule kernels: the custom VJP's one static argument.

    Hashable, so it is passed by name as the custom VJP's non-differentiable argument.

    Attributes:
      scale: readout scale.
      chunk_size: requested chunk length; each backend runs `kernel_chunk(opts, T)` steps per
        chunk, a power of two in [16, 64] (GPU) or [16, 128] (TPU). Results do not depend on it
        (with the default pairing; `pairing="authors"` fixes it at 64).
      backend: "gpu" (`pallas_gpu.py`, Triton) or "tpu" (`pallas_tpu.py`, Mosaic).
      interpret: run the kernels in Pallas interpret mode (CPU): GPU semantics
        (`interpret=True`) or `pltpu.InterpretParams()`, following `backend`.
      block_v: Dv tile, a power of two ≥ 16 (None: the backend's default for the shape).
      fp32_precision: GPU dots of float32 data: "tf32", "tf32x3" (3×TF32, float32 accuracy on
        tensor cores) or "ieee" (FMA, no tensor cores); None follows
        `jax_default_matmul_precision` (see `resolved`). Interpret mode always computes float32
        dots at HIGHEST; the TPU kernels always do.
      pairing: "recurrence" (default) or "authors": A pairs the row's k with the column's x,
        as the released Q-Delta chunk kernel does (`chunk.py`, "The authors' pairing"); then
        `chunk_size` must be 64 (`chunk.AUTHORS_CHUNK`), the only C the released kernel runs, and
        results depend on it. Without λ (x = k) the two pairings are the same computation;
        `uses_authors_pairing` says which one the kernels run.
    """

    scale: float
    chunk_size: int = 64
    backend: str = "gpu"
    interpret: bool = False
    block_v: int | None = None
    fp32_precision: str | None = None
    pairing: str = "recurrence"

    def __post_init__(self):
        check_pairing(self.pairing, self.chunk_size)
        if self.backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {self.backend!r}")
        if self.fp32_precision is not None and self.fp32_precision not in FP32_PRECISIONS:
            raise ValueError(f"fp32_precision must be one of {FP32_PRECISIONS} or None, got "
                             f"{self.fp32_precision!r}")
        bv = self.block_v
        if bv is not None and (bv < MIN_BLOCK or bv & (bv - 1)):
            raise ValueError(f"block_v must be a power of two >= {MIN_BLOCK}, got {bv}")

    def uses_authors_pairing(self, lam) -> bool:
        """Whether the kernels build A with the authors' pairing: `pairing="authors"` and a λ
        (without λ, x = k and both pairings are the same matrix)."""
        return self.pairing == "authors" and lam is not None

    def resolved(self) -> DeltaRuleOptions:
        """`fp32_precision` fixed from the jax config (read at trace time):
        "highest"/"float32" → "tf32x3", anything else → "tf32"."""
        if self.fp32_precision is not None:
            return self
        p = jax.config.jax_default_matmul_precision
        full = p is not None and str(p).lower() in ("highest", "float32", "f32_f32_f32")
        return dataclasses.replace(self, fp32_precision="tf32x3" if full else "tf32")


def clamp_chunk(opts: DeltaRuleOptions, T: int, *, largest: int) -> int:
    """Chunk length: `chunk_size` rounded up to a power of two in [16, largest], no longer
    than T needs."""
    C = min(max(MIN_BLOCK, next_pow2(opts.chunk_size)), largest)
    return min(C, max(MIN_BLOCK, next_pow2(T)))


# ------------------------------------------------------------------------------------------
# Layout (plain jnp, outside the kernels).


def to_chunks(a, C, D=None, dtype=None):
    """`[B, T, H, (D)]` → `[B·H, N, C, D]` (or `[B·H, N, C]` for `[B, T, H]`), zero-padded in
    T (and in D up to `D`)."""
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


def pad_state(S, Dkp, Dvp):
    """`[B, H, Dk, Dv]` → `[B·H, Dkp, Dvp]` float32, zero-padded."""
    B, H, Dk, Dv = S.shape
    S = jnp.pad(S.astype(F32), ((0, 0), (0, 0), (0, Dkp - Dk), (0, Dvp - Dv)))
    return S.reshape(B * H, Dkp, Dvp)


def unpad_state(S, B, H, Dk, Dv):
    """`[B·H, Dkp, Dvp]` → `[B, H, Dk, Dv]`."""
    return S.reshape(B, H, *S.shape[1:])[..., :Dk, :Dv]


# ------------------------------------------------------------------------------------------
# Launch.


def nbytes(*arrays) -> int:
    """Bytes of the arrays (None entries count 0), for cost estimates."""
    return sum(a.size * jnp.dtype(a.dtype).itemsize for a in arrays if a is not None)


def pallas_call(kernel, *, grid, in_specs, out_specs, out_shape, compiler_params, interpret,
                name, flops, nbytes, transcendentals=0, **kw):
    """`pl.pallas_call` with a `pl.CostEstimate`; the backend supplies its compiler params and
    interpret flavour."""
    return pl.pallas_call(
        kernel, grid=grid, in_specs=in_specs, out_specs=out_specs, out_shape=out_shape,
        interpret=interpret, compiler_params=compiler_params, name=name,
        cost_estimate=pl.CostEstimate(flops=int(flops), transcendentals=int(transcendentals),
                                      bytes_accessed=int(nbytes)), **kw)
