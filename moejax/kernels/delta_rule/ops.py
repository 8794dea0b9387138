"""Public delta-rule ops: argument validation, `impl` dispatch and the Pallas custom VJP.

Axis letters: B batch, T time, H heads, Dk key/query head dim, Dv value head dim.

`impl` (DESIGN §2, §3) resolves through `moejax.kernels.dispatch` when lowering: "reference" and
"chunk" are the same everywhere; "pallas" is the Triton kernels of `pallas_gpu.py` on cuda/rocm,
the Mosaic kernels of `pallas_tpu.py` on tpu and the Triton kernels in interpret mode elsewhere;
"auto" tries the GPU kernels then the jnp chunk path on cuda/rocm (the GPU backend refuses, with
`NotImplementedError`, inputs its sm_90a compile check does not cover; falling back warns on a
GPU host), the TPU kernels on tpu, and the chunk path elsewhere.

Both Pallas backends supply only `delta_rule_fwd` / `delta_rule_bwd` launchers; the one custom
VJP (`_delta_rule_pallas`, static options `pallas_common.DeltaRuleOptions` passed by name) lives
here (their contract: `pallas_common.KERNEL_CONTRACT`); `delta_rule_pallas` runs it under
`nonfinite.contain`, after folding a scalar g into gk when both are given and moving packed
sequences (`cu_seqlens`) onto the kernels' chunk boundaries as chunk restarts (`packing.py`).

`pairing="authors"` (DESIGN §3, "Authors' kernel, as a compatibility option"; `chunk.py`, "The
authors' pairing") reaches every impl: "chunk" and both Pallas backends build A as the released
Q-Delta kernel does (forward and backward kernels), at C = 64; "reference" runs the same
computation token by token (`reference.delta_rule_authors_scan`).
"""

from __future__ import annotations

import functools
from types import MappingProxyType

import jax
import jax.numpy as jnp

from moejax.kernels import dispatch
from moejax.kernels.delta_rule import nonfinite, packing, pallas_gpu, pallas_tpu
from moejax.kernels.delta_rule.chunk import (
    PAIRINGS,
    check_authors_options,
    check_pairing,
    delta_rule_chunk,
)
from moejax.kernels.delta_rule.pallas_common import DeltaRuleOptions
from moejax.kernels.delta_rule.reference import (
    compute_dtype,
    delta_rule_authors_scan,
    delta_rule_reference,
    recurrent_step,
)
from moejax.validation import (
    check_array,
    check_bool,
    check_choice,
    check_int,
    check_number,
)

Array = jax.Array

# DeltaRuleOptions.backend -> the backend module (`check_supported`, `delta_rule_fwd/_bwd`).
_BACKENDS = MappingProxyType({"gpu": pallas_gpu, "tpu": pallas_tpu})


# ------------------------------------------------------------------------------------------
# The custom VJP of the Pallas kernels (one for both backends).


@functools.partial(jax.custom_vjp, nondiff_argnames=("opts",))
def _delta_rule_pallas(q, k, v, beta, g, gk, lam, h0, rs, h0s, opts: DeltaRuleOptions):
    return _BACKENDS[opts.backend].delta_rule_fwd(q, k, v, beta, g, gk, lam, h0, rs, h0s, opts)


def _delta_rule_fwd_rule(q, k, v, beta, g, gk, lam, h0, rs, h0s, opts):
    # Residuals are the inputs: the backward recomputes W, Ũ and the chunk states.
    out = _BACKENDS[opts.backend].delta_rule_fwd(q, k, v, beta, g, gk, lam, h0, rs, h0s, opts)
    return out, (q, k, v, beta, g, gk, lam, h0, rs, h0s)


def _delta_rule_bwd_rule(opts, residuals, cotangents):
    do, dhT, dpre = cotangents
    grads = _BACKENDS[opts.backend].delta_rule_bwd(*residuals, do, dhT, dpre, opts)
    dq, dk, dv, db, dg, dgk, dl, dh0, dh0s = grads
    q, k, v, beta, g, gk, lam, h0, rs, h0s = residuals
    cast = lambda d, a: None if a is None else d.astype(a.dtype)
    return (cast(dq, q), cast(dk, k), cast(dv, v), cast(db, beta), cast(dg, g), cast(dgk, gk),
            cast(dl, lam), cast(dh0, h0), None, cast(dh0s, h0s))


_delta_rule_pallas.defvjp(_delta_rule_fwd_rule, _delta_rule_bwd_rule)


def _kernels(q, k, v, beta, g, lam, h0, *, opts, gk=None, cu_seqlens=None):
    """The custom VJP on finite inputs: g folded into gk when both are given (the kernels take
    one of them), packed sequences moved onto the kernels' chunk boundaries (`packing.py`)."""
    if gk is not None and g is not None:
        gk, g = gk + g[..., None], None
    if cu_seqlens is None:
        o, S, _ = _delta_rule_pallas(q, k, v, beta, g, gk, lam, h0, None, None, opts)
        return o, S
    C = _BACKENDS[opts.backend].kernel_chunk(opts, q.shape[1])
    lay = packing.layout(cu_seqlens, q.shape[1], C)
    q, k, v, beta, g, gk, lam = (packing.spread(a, lay, C) for a in (q, k, v, beta, g, gk, lam))
    rs = lay.restart[None].astype(jnp.int32)  # [1, NC]
    h0s = h0[lay.chunk_seq][None]  # [1, NC, H, Dk, Dv]
    o, S, pre = _delta_rule_pallas(q, k, v, beta, g, gk, lam, h0[:1], rs, h0s, opts)
    ends = jnp.concatenate([pre[0, 1:], S], axis=0)  # the state after each chunk
    return o[:, lay.pos], ends[lay.last]


def delta_rule_pallas(q, k, v, beta, g, lam, h0, opts: DeltaRuleOptions, *, gk=None,
                      cu_seqlens=None):
    """One backend's Pallas kernels with the custom VJP, for fixed static options.

    What `impl="pallas"` runs (tests and benchmarks call it to pin `block_v`,
    `fp32_precision` or interpret mode). Runs the custom VJP under `nonfinite.contain`, so the
    kernels (forward and backward) only see finite inputs (and g, gk = −inf, a reset); float64
    inputs are rounded to float32 first (the kernels compute in float32; Mosaic has no float64).
    Does not validate (see `delta_rule`) nor check coverage (`check_supported`).

    Args:
      q, k: `[B, T, H, Dk]`; v: `[B, T, H, Dv]`; beta: `[B, T, H]`; g, lam: `[B, T, H]` or None;
        h0: `[B, H, Dk, Dv]` initial state (zeros for none; `[N, H, Dk, Dv]` with cu_seqlens).
      opts: `DeltaRuleOptions`; `backend` picks the kernels, an unset `fp32_precision` follows
        `jax_default_matmul_precision`.
      gk: `[B, T, H, Dk]` per-channel log decays, or None.
      cu_seqlens: `[N + 1]` packed-sequence boundaries (B = 1), or None.

    Returns:
      `(o [B, T, H, Dv] float32, S [B, H, Dk, Dv] float32)` (S `[N, H, Dk, Dv]` with
      cu_seqlens).
    """
    narrow = lambda a: (a if a is None or jnp.dtype(a.dtype).itemsize <= 4
                        else a.astype(jnp.float32))
    q, k, v, beta, g, lam, h0, gk = map(narrow, (q, k, v, beta, g, lam, h0, gk))
    extra = {} if gk is None else {"gk": gk}
    if cu_seqlens is not None:
        extra["cu_seqlens"] = cu_seqlens
    return nonfinite.contain(_kernels, q, k, v, beta, g, lam, h0, opts=opts.resolved(),
                             **extra)


def _options(scale, chunk_size, pairing, backend, interpret) -> DeltaRuleOptions:
    return DeltaRuleOptions(scale=scale, chunk_size=chunk_size, backend=backend,
                            interpret=interpret, pairing=pairing)


def _pallas_kernel(q, k, v, beta, g, lam, initial_state, gk=None, cu_seqlens=None, *, scale,
                   chunk_size, pairing, backend, interpret):
    """`delta_rule_pallas` with the options of `impl="pallas"`: `(o float32, S float32)`."""
    if initial_state is None:
        _, _, H, Dk = q.shape
        rows = q.shape[0] if cu_seqlens is None else cu_seqlens.shape[0] - 1
        initial_state = jnp.zeros((rows, H, Dk, v.shape[-1]), jnp.float32)
    return delta_rule_pallas(q, k, v, beta, g, lam, initial_state,
                             _options(scale, chunk_size, pairing, backend, interpret), gk=gk,
                             cu_seqlens=cu_seqlens)


def _check_pallas(q, k, v, beta, g, lam, initial_state, gk=None, cu_seqlens=None, *, scale,
                  chunk_size, pairing, backend, interpret):
    """The backend's `check_supported`: `NotImplementedError` for inputs it does not cover."""
    _BACKENDS[backend].check_supported(q, v, _options(scale, chunk_size, pairing, backend,
                                                      interpret))


# ------------------------------------------------------------------------------------------
# `impl` dispatch.


def _pallas(description, **bound) -> dispatch.Implementation:
    return dispatch.Implementation(functools.partial(_pallas_kernel, **bound), description,
                                   check=functools.partial(_check_pallas, **bound))


def _reference(q, k, v, beta, g, lam, initial_state, gk=None, cu_seqlens=None, *, scale,
               chunk_size, pairing):
    """The token scans: the recurrence, or the released kernel's computation for
    `pairing="authors"` with a λ (`reference.delta_rule_authors_scan`; `_validate_args` has
    refused it with gk or cu_seqlens)."""
    if pairing == "authors" and lam is not None:
        return delta_rule_authors_scan(q, k, v, beta, g, lam, initial_state, scale=scale,
                                       chunk_size=chunk_size)
    return delta_rule_reference(q, k, v, beta, g, lam, initial_state, gk, cu_seqlens,
                                scale=scale)


_REFERENCE = dispatch.Implementation(_reference, "the lax.scan reference")
_CHUNK = dispatch.Implementation(delta_rule_chunk, "the jnp chunk path")
_GPU = _pallas("the GPU kernels", backend="gpu", interpret=False)
_GPU_INTERPRET = _pallas("the GPU kernels in interpret mode", backend="gpu", interpret=True)
_TPU = _pallas("the TPU kernels", backend="tpu", interpret=False)

# name -> platform -> implementations (signature of `delta_rule_reference` plus `chunk_size`
# and `pairing`).
_IMPLS: dispatch.Table = MappingProxyType({
    "reference": {"default": (_REFERENCE,)},
    "chunk": {"default": (_CHUNK,)},
    "pallas": {"cuda": (_GPU,), "rocm": (_GPU,), "tpu": (_TPU,), "default": (_GPU_INTERPRET,)},
    "auto": {"cuda": (_GPU, _CHUNK), "rocm": (_GPU, _CHUNK), "tpu": (_TPU,),
             "default": (_CHUNK,)},
})
IMPL_NAMES = ("auto", "reference", "chunk", "pallas")


def _shape(a):
    return tuple(a.shape)


def _check_float(name: str, a) -> None:
    if not jnp.issubdtype(a.dtype, jnp.floating):
        raise ValueError(f"{name} must be a floating-point array, got dtype {a.dtype}")


def _check_arrays(required, optional) -> None:
    """Each `(name, value)`: an array (optional ones may be None); else `ArgumentTypeError`."""
    for name, a in required:
        check_array(name, a)
    for name, a in optional:
        if a is not None:
            check_array(name, a)


def _check_scale(scale) -> None:
    if scale is not None:
        check_number("scale", scale)


def _validate_args(*, q, k, v, beta, g, lam, initial_state, scale, chunk_size, impl,
                   return_final_state, pairing="recurrence", gk=None, cu_seqlens=None) -> None:
    """Checks kinds, ranks, shapes, dtypes and static options; raises `ValueError` (or its
    subclass `ArgumentTypeError`, also a `TypeError`, for a value of the wrong kind: None, a
    list, a str where an array belongs) naming the argument."""
    _check_arrays((("q", q), ("k", k), ("v", v), ("beta", beta)),
                  (("g", g), ("lam", lam), ("initial_state", initial_state), ("gk", gk),
                   ("cu_seqlens", cu_seqlens)))
    for name, a in (("q", q), ("k", k), ("v", v)):
        if a.ndim != 4:
            raise ValueError(f"{name} must be [B, T, H, D] (4-D), got shape {_shape(a)}")
    if _shape(k) != _shape(q):
        raise ValueError(f"k must have the shape of q {_shape(q)} = [B, T, H, Dk], got {_shape(k)}")
    B, T, H, Dk = q.shape
    if _shape(v)[:3] != (B, T, H):
        raise ValueError(f"v must be [B, T, H, Dv] = [{B}, {T}, {H}, Dv], got {_shape(v)}")
    if T == 0:
        raise ValueError("q, k, v must have T >= 1 time steps, got T=0")
    Dv = v.shape[-1]
    for name, a in (("beta", beta), ("g", g), ("lam", lam)):
        if a is None:
            continue
        if _shape(a) != (B, T, H):
            raise ValueError(f"{name} must be [B, T, H] = [{B}, {T}, {H}], got shape {_shape(a)}")
    if gk is not None and _shape(gk) != (B, T, H, Dk):
        raise ValueError(f"gk must be [B, T, H, Dk] = [{B}, {T}, {H}, {Dk}] (a log decay per key "
                         f"channel), got shape {_shape(gk)}")
    rows, rows_name = B, "B"
    if cu_seqlens is not None:
        rows, rows_name = packing.check_cu_seqlens(cu_seqlens, B, T), "N"
    if initial_state is not None and _shape(initial_state) != (rows, H, Dk, Dv):
        raise ValueError(
            f"initial_state must be [{rows_name}, H, Dk, Dv] = [{rows}, {H}, {Dk}, {Dv}], "
            f"got shape {_shape(initial_state)}"
        )
    for name, a in (("q", q), ("k", k), ("v", v), ("beta", beta), ("g", g), ("lam", lam),
                    ("initial_state", initial_state), ("gk", gk)):
        if a is not None:
            _check_float(name, a)
    check_int("chunk_size", chunk_size, lo=1)
    check_choice("pairing", pairing, PAIRINGS)
    check_pairing(pairing, chunk_size)
    check_authors_options(pairing, lam, gk, cu_seqlens)
    _check_scale(scale)
    check_choice("impl", impl, IMPL_NAMES)
    check_bool("return_final_state", return_final_state)


@functools.partial(
    jax.jit, static_argnames=("scale", "chunk_size", "impl", "return_final_state", "pairing")
)
def _delta_rule(q, k, v, beta, g, lam, initial_state, gk, cu_seqlens, *, scale, chunk_size,
                impl, return_final_state, pairing):
    o, S = dispatch.dispatch("delta_rule", impl, _IMPLS, q, k, v, beta, g, lam, initial_state,
                             gk, cu_seqlens, scale=scale, chunk_size=chunk_size,
                             pairing=pairing)
    return o.astype(q.dtype), (S if return_final_state else None)


def delta_rule(
    q: Array,
    k: Array,
    v: Array,
    beta: Array,
    *,
    g: Array | None = None,
    lam: Array | None = None,
    initial_state: Array | None = None,
    scale: float | None = None,
    chunk_size: int = 64,
    impl: str = "auto",
    return_final_state: bool = True,
    pairing: str = "recurrence",
    gk: Array | None = None,
    cu_seqlens: Array | None = None,
) -> tuple[Array, Array | None]:
    r"""Delta-rule linear attention: DeltaNet, Gated DeltaNet, Q-Delta and gated Q-Delta.

    Per batch and head, with state `S` `[Dk, Dv]` (DESIGN §3):
    `x_t = k_t + lam_t q_t`, `S_t = exp(g_t)(I − beta_t k_t x_tᵀ) S_{t−1} + beta_t k_t v_tᵀ`,
    `o_t = scale · S_tᵀ q_t`. `g=None` is DeltaNet, `g` alone Gated DeltaNet, `lam` alone Q-Delta,
    both gated Q-Delta. `gk` replaces the scalar decay by one per key channel (Kimi Delta
    Attention: `exp(g_t)` becomes `diag(exp(gk_t))`, alone, or times `exp(g_t)` with both);
    with `lam` it is gated Q-Delta with a per-channel gate. `cu_seqlens` runs packed sequences.

    Non-finite inputs stay causal. If q, k, v, beta, g (NaN or +inf) or lam holds a
    non-finite value at step s of sequence b, head h, the outputs of (b, h) before s, all
    outputs and final states of other sequences and heads are those computed without it.
    "chunk", "pallas" and "auto" also keep the gradients with respect to those (finite) parts
    as they are without it, and return NaN for o of (b, h) at every step ≥ s (only at s when
    the bad value is in q and lam is None: q then only reads the state) and for its final
    state (`nonfinite.contain`). "reference" propagates IEEE arithmetic through the
    recurrence: its outputs, and its gradients for other sequences and heads, are just as
    contained, but its gradients at earlier steps of (b, h) can be NaN (its backward forms
    0 · NaN). A non-finite initial state makes that (b, h) NaN throughout.

    Args:
      q: queries `[B, T, H, Dk]` (float; typically L2-normalised per head).
      k: keys `[B, T, H, Dk]`.
      v: values `[B, T, H, Dv]`.
      beta: write strengths `[B, T, H]`, usually in (0, 1) (or (0, 2) with negative eigenvalues).
      g: log decays `[B, T, H]` (≤ 0 for a decay), or None. `g_t = −inf` (or any g_t whose
        exp underflows to 0) is a full reset, `S' = 0`; every impl gives the recurrence's
        (finite) result for it.
      lam: Q-Delta query mixing `[B, T, H]`, or None.
      initial_state: `[B, H, Dk, Dv]`, or None for zeros.
      scale: readout scale, a finite number; default `Dk ** -0.5`. `x_t` always uses the
        unscaled q.
      chunk_size: chunk length C of the chunkwise path (any positive int; T need not be a
        multiple of it). Results do not depend on it, except with `pairing="authors"`, which
        requires 64 (the default) and raises ValueError for any other value.
      impl: "chunk" (jnp chunkwise), "reference" (token-by-token scan, the oracle), "pallas"
        (the Pallas kernels, chosen when lowering: Triton on cuda/rocm, Mosaic on tpu, the
        Triton kernels in interpret mode on cpu) or "auto" (pallas on cuda/rocm/tpu, chunk
        elsewhere; on cuda/rocm only for inputs the GPU kernels' compile check covers —
        bfloat16/float32 (float64 counts as float32), Dk ≤ 256, Dv ≤ 512 — others take the
        chunk path, with a warning on a GPU host). "pallas" runs chunks of
        `max(16, next_pow2(chunk_size))` steps, at most 64 (GPU) or 128 (TPU).
      return_final_state: return the final state (else None), a bool.
      pairing: "recurrence" (default: the recurrence above, whatever the impl and C) or
        "authors": the released Q-Delta chunk kernel's computation (psmiz/Q-Delta), whose A
        pairs the row's k with the column's x (`A_tj = β_t k_t·x_j` instead of
        `β_t x_t·k_j`; `chunk.py`, "The authors' pairing"), so models trained with that code
        run as trained. It is not the recurrence: its output depends on the chunk length and on
        where chunks start, so it runs chunks of 64 steps from the call's first step (a call of
        ≤ 64 steps is one chunk; a one-step call, like `delta_rule_step`, is the recurrence).
        Every impl runs it ("reference" token by token, `reference.delta_rule_authors_scan`),
        gradients included. Without lam (x = k) both pairings are the same computation and
        give identical results. Not with gk or cu_seqlens.
      gk: per-key-channel log decays `[B, T, H, Dk]` (≤ 0 for a decay; −inf resets that row
        of the state), or None. Every impl takes it, exactly in log space: the chunk path by
        secondary chunking (`chunk.py`, "Per-channel decay"); the Pallas kernels with the
        chunk's decay factors and pair matrices formed in jnp beside them (`pallas_gpu.py`,
        `pallas_tpu.py`) and g, if also given, folded into gk.
      cu_seqlens: `[N + 1]` int boundaries of N sequences packed into one row (B = 1;
        `0 = cu[0] < cu[1] < … < cu[N] = T`, checked when not traced), or None. The state
        restarts at each sequence's start from row n of `initial_state` (then `[N, H, Dk, Dv]`;
        zeros when None) and S is each sequence's final state `[N, H, Dk, Dv]`: every sequence
        gets what it gets alone. Every impl takes it; "chunk" and "pallas" move each sequence
        onto a chunk boundary and restart the state there (`packing.py`).

    Returns:
      `(o, S)`: `o` `[B, T, H, Dv]` in q's dtype; `S` `[B, H, Dk, Dv]` float32 or None.
      Computation is float32 for half and single inputs. float64 inputs (x64 mode) are
      computed in float64 by "reference" and "chunk" (S float64 then); "pallas" rounds them to
      float32 (S float32), so "auto" does too on cuda/tpu.

    Raises:
      ValueError: a shape, dtype or option is wrong; the message names the argument.
        `ArgumentTypeError` (a `ValueError` and a `TypeError`) when a value is of the wrong
        kind: None, a list or a str where an array belongs, a float chunk_size, a str scale.
        A `pairing` other than "recurrence"/"authors", or "authors" with chunk_size ≠ 64.
        `dispatch.KernelUnavailableError` (a `ValueError` and a `NotImplementedError`) for
        impl="pallas" on a GPU host with inputs outside the GPU kernels' compile check.

    Example:
      >>> B, T, H, Dk, Dv = 1, 100, 2, 16, 32
      >>> ks = jax.random.split(jax.random.key(0), 4)
      >>> unit = lambda a: a / jnp.linalg.norm(a, axis=-1, keepdims=True)
      >>> q = unit(jax.random.normal(ks[0], (B, T, H, Dk)))
      >>> k = unit(jax.random.normal(ks[1], (B, T, H, Dk)))
      >>> v = jax.random.normal(ks[2], (B, T, H, Dv))
      >>> beta = jax.nn.sigmoid(jax.random.normal(ks[3], (B, T, H)))
      >>> o, S = delta_rule(q, k, v, beta, lam=0.5 * jnp.ones((B, T, H)))
      >>> o.shape, S.shape
      ((1, 100, 2, 32), (1, 2, 16, 32))
    """
    _validate_args(q=q, k=k, v=v, beta=beta, g=g, lam=lam, initial_state=initial_state,
                   scale=scale, chunk_size=chunk_size, impl=impl,
                   return_final_state=return_final_state, pairing=pairing, gk=gk,
                   cu_seqlens=cu_seqlens)
    scale = float(q.shape[-1] ** -0.5 if scale is None else scale)
    return _delta_rule(q, k, v, beta, g, lam, initial_state, gk, cu_seqlens, scale=scale,
                       chunk_size=int(chunk_size), impl=impl,
                       return_final_state=bool(return_final_state), pairing=pairing)


def delta_rule_step(
    S: Array,
    q_t: Array,
    k_t: Array,
    v_t: Array,
    beta_t: Array,
    *,
    g_t: Array | None = None,
    lam_t: Array | None = None,
    scale: float | None = None,
    gk_t: Array | None = None,
) -> tuple[Array, Array]:
    """One decoding step of `delta_rule` (Q-Delta's `lam_t` included).

    Args:
      S: state `[B, H, Dk, Dv]`.
      q_t, k_t: `[B, H, Dk]`.
      v_t: `[B, H, Dv]`.
      beta_t: `[B, H]`.
      g_t: `[B, H]` log decay, or None.
      lam_t: `[B, H]` Q-Delta mixing, or None.
      scale: default `Dk ** -0.5`.
      gk_t: `[B, H, Dk]` per-key-channel log decay, or None.

    Returns:
      `(o_t [B, H, Dv] in q_t's dtype, S_t [B, H, Dk, Dv] float32)` (float64 for float64
      inputs). Non-finite inputs propagate as IEEE arithmetic does; `g_t = −inf` resets S.

    Raises:
      ValueError naming the argument (`ArgumentTypeError`, also a `TypeError`, for a value
      of the wrong kind, such as None or a list where an array belongs).
    """
    _check_arrays((("S", S), ("q_t", q_t), ("k_t", k_t), ("v_t", v_t), ("beta_t", beta_t)),
                  (("g_t", g_t), ("lam_t", lam_t), ("gk_t", gk_t)))
    _check_scale(scale)
    for name, a in (("q_t", q_t), ("k_t", k_t), ("v_t", v_t)):
        if a.ndim != 3:
            raise ValueError(f"{name} must be [B, H, D] (3-D), got shape {_shape(a)}")
    if _shape(k_t) != _shape(q_t):
        raise ValueError(f"k_t must have the shape of q_t {_shape(q_t)}, got {_shape(k_t)}")
    B, H, Dk = q_t.shape
    if _shape(v_t)[:2] != (B, H):
        raise ValueError(f"v_t must be [B, H, Dv] = [{B}, {H}, Dv], got {_shape(v_t)}")
    Dv = v_t.shape[-1]
    if _shape(S) != (B, H, Dk, Dv):
        raise ValueError(f"S must be [B, H, Dk, Dv] = [{B}, {H}, {Dk}, {Dv}], got {_shape(S)}")
    for name, a in (("beta_t", beta_t), ("g_t", g_t), ("lam_t", lam_t)):
        if a is not None and _shape(a) != (B, H):
            raise ValueError(f"{name} must be [B, H] = [{B}, {H}], got shape {_shape(a)}")
    if gk_t is not None and _shape(gk_t) != (B, H, Dk):
        raise ValueError(f"gk_t must be [B, H, Dk] = [{B}, {H}, {Dk}], got shape {_shape(gk_t)}")
    for name, a in (("S", S), ("q_t", q_t), ("k_t", k_t), ("v_t", v_t), ("beta_t", beta_t),
                    ("g_t", g_t), ("lam_t", lam_t), ("gk_t", gk_t)):
        if a is not None:
            _check_float(name, a)
    scale = float(Dk**-0.5 if scale is None else scale)
    up = lambda a: None if a is None else a.astype(compute_dtype(a.dtype))
    o_t, S = recurrent_step(*map(up, (S, q_t, k_t, v_t, beta_t, g_t, lam_t, gk_t)),
                            scale=scale)
    return o_t.astype(q_t.dtype), S
