"""Public delta-rule ops: argument validation and `impl` dispatch (DESIGN §2, §3).

Axis letters: B batch, T time, H heads, Dk key/query head dim, Dv value head dim.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable

import jax
import jax.numpy as jnp

from moejax.kernels import gpu_compile
from moejax.kernels.delta_rule import pallas_gpu, pallas_tpu, triton_chunk
from moejax.kernels.delta_rule.chunk import delta_rule_chunk
from moejax.kernels.delta_rule.reference import (
    compute_dtype,
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


def _pallas_kernel(q, k, v, beta, g, lam, initial_state, *, scale, chunk_size, platform):
    """One backend's Pallas kernel (custom VJP): "cuda"/"rocm" → the Hopper-built Triton chunk
    kernels (`triton_chunk.py`), "tpu" → the Mosaic kernel, "cpu" → the Triton kernels in
    interpret mode."""
    if initial_state is None:
        B, _, H, Dk = q.shape
        initial_state = jnp.zeros((B, H, Dk, v.shape[-1]), jnp.float32)
    tpu = platform == "tpu"
    opts = pallas_gpu.DeltaRuleOptions(scale=scale, chunk_size=chunk_size,
                                       interpret=platform == "cpu",
                                       backend="tpu" if tpu else "gpu")
    kernel = pallas_tpu.delta_rule_tpu if tpu else triton_chunk.delta_rule_triton
    return kernel(q, k, v, beta, g, lam, initial_state, opts)


def _dispatch(*args, scale, chunk_size, cpu):
    """`jax.lax.platform_dependent` over the kernels: the branch is chosen when lowering, so
    `jax.export(..., platforms=["cuda"])` on a CPU-only machine yields the real GPU kernel."""
    branch = lambda platform: functools.partial(_pallas_kernel, scale=scale,
                                                chunk_size=chunk_size, platform=platform)
    return jax.lax.platform_dependent(*args, cuda=branch("cuda"), rocm=branch("rocm"),
                                      tpu=branch("tpu"), default=cpu)


# What the GPU kernels' sm_90a compile check covers (tests/gpu_compile): input dtypes and the
# largest head dims (the 256/512 of the biggest GPU preset).
GPU_KERNEL_DTYPES = tuple(jnp.dtype(d) for d in gpu_compile.COVERED_DTYPES)
GPU_KERNEL_MAX_DK, GPU_KERNEL_MAX_DV = gpu_compile.DELTA_RULE_MAX_HEAD_DIMS


def _gpu_uncovered(q, v) -> str | None:
    """Why the GPU kernels' compile check does not cover these inputs, or None."""
    if q.dtype not in GPU_KERNEL_DTYPES:
        return (f"dtype {q.dtype} (covered: {', '.join(map(str, GPU_KERNEL_DTYPES))})")
    if q.shape[-1] > GPU_KERNEL_MAX_DK or v.shape[-1] > GPU_KERNEL_MAX_DV:
        return (f"head dims Dk={q.shape[-1]}, Dv={v.shape[-1]} (covered: Dk <= "
                f"{GPU_KERNEL_MAX_DK}, Dv <= {GPU_KERNEL_MAX_DV})")
    return None


def _delta_rule_pallas(*args, scale, chunk_size):
    """cuda → GPU kernel, tpu → TPU kernel, cpu → GPU kernel in interpret mode."""
    q, v = args[0], args[2]
    too_wide = q.shape[-1] > GPU_KERNEL_MAX_DK or v.shape[-1] > GPU_KERNEL_MAX_DV
    if too_wide and jax.default_backend() == "gpu":
        raise ValueError(f"impl='pallas': the GPU kernels take q/k head dims Dk <= "
                         f"{GPU_KERNEL_MAX_DK} and v head dims Dv <= {GPU_KERNEL_MAX_DV}, got "
                         f"q {tuple(q.shape)}, v {tuple(v.shape)}; use impl='auto' or 'chunk'")
    cpu = functools.partial(_pallas_kernel, scale=scale, chunk_size=chunk_size, platform="cpu")
    return _dispatch(*args, scale=scale, chunk_size=chunk_size, cpu=cpu)


def _delta_rule_auto(*args, scale, chunk_size):
    """Pallas on cuda/tpu, the jnp chunk path elsewhere (chosen at lowering time). On CUDA the
    kernel only for inputs the compile check covers; others take the chunk path, with a warning
    (once per message) when running on a GPU."""
    cpu = functools.partial(delta_rule_chunk, scale=scale, chunk_size=chunk_size)
    why = _gpu_uncovered(args[0], args[2])
    if why is None:
        return _dispatch(*args, scale=scale, chunk_size=chunk_size, cpu=cpu)
    if jax.default_backend() == "gpu":
        warnings.warn(f"delta_rule(impl='auto'): {why} is not covered by the GPU kernels' "
                      "compile check; using the jnp chunk path", stacklevel=4)
    tpu = functools.partial(_pallas_kernel, scale=scale, chunk_size=chunk_size, platform="tpu")
    return jax.lax.platform_dependent(*args, tpu=tpu, default=cpu)


# name -> implementation with the signature of `delta_rule_reference` plus `chunk_size`.
_IMPLS: dict[str, Callable] = {
    "reference": lambda *a, scale, chunk_size: delta_rule_reference(*a, scale=scale),
    "chunk": delta_rule_chunk,
    "pallas": _delta_rule_pallas,
    "auto": _delta_rule_auto,
}
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
                   return_final_state) -> None:
    """Checks kinds, ranks, shapes, dtypes and static options; raises `ValueError` (or its
    subclass `ArgumentTypeError`, also a `TypeError`, for a value of the wrong kind: None, a
    list, a str where an array belongs) naming the argument."""
    _check_arrays((("q", q), ("k", k), ("v", v), ("beta", beta)),
                  (("g", g), ("lam", lam), ("initial_state", initial_state)))
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
    if initial_state is not None and _shape(initial_state) != (B, H, Dk, Dv):
        raise ValueError(
            f"initial_state must be [B, H, Dk, Dv] = [{B}, {H}, {Dk}, {Dv}], "
            f"got shape {_shape(initial_state)}"
        )
    for name, a in (("q", q), ("k", k), ("v", v), ("beta", beta), ("g", g), ("lam", lam),
                    ("initial_state", initial_state)):
        if a is not None:
            _check_float(name, a)
    check_int("chunk_size", chunk_size, lo=1)
    _check_scale(scale)
    check_choice("impl", impl, IMPL_NAMES)
    check_bool("return_final_state", return_final_state)


@functools.partial(
    jax.jit, static_argnames=("scale", "chunk_size", "impl", "return_final_state")
)
def _delta_rule(q, k, v, beta, g, lam, initial_state, *, scale, chunk_size, impl,
                return_final_state):
    fn = _IMPLS[impl]
    o, S = fn(q, k, v, beta, g, lam, initial_state, scale=scale, chunk_size=chunk_size)
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
) -> tuple[Array, Array | None]:
    r"""Delta-rule linear attention: DeltaNet, Gated DeltaNet, Q-Delta and gated Q-Delta.

    Per batch and head, with state `S` `[Dk, Dv]` (DESIGN §3):
    `x_t = k_t + lam_t q_t`, `S_t = exp(g_t)(I − beta_t k_t x_tᵀ) S_{t−1} + beta_t k_t v_tᵀ`,
    `o_t = scale · S_tᵀ q_t`. `g=None` is DeltaNet, `g` alone Gated DeltaNet, `lam` alone Q-Delta,
    both gated Q-Delta.

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
        multiple of it). Results do not depend on it.
      impl: "chunk" (jnp chunkwise), "reference" (token-by-token scan, the oracle), "pallas"
        (the Pallas kernels, chosen when lowering: Triton on cuda, Mosaic on tpu, the Triton
        kernel in interpret mode on cpu) or "auto" (pallas on cuda/tpu, chunk elsewhere).
        "pallas" runs chunks of `min(max(16, next_pow2(chunk_size)), 128)` steps.
      return_final_state: return the final state (else None), a bool.

    Returns:
      `(o, S)`: `o` `[B, T, H, Dv]` in q's dtype; `S` `[B, H, Dk, Dv]` float32 or None.
      Computation is float32 for half and single inputs. float64 inputs (x64 mode) are
      computed in float64 by "reference" and "chunk" (S float64 then); "pallas" rounds them to
      float32 (S float32), so "auto" does too on cuda/tpu.

    Raises:
      ValueError: a shape, dtype or option is wrong; the message names the argument.
        `ArgumentTypeError` (a `ValueError` and a `TypeError`) when a value is of the wrong
        kind: None, a list or a str where an array belongs, a float chunk_size, a str scale.

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
                   return_final_state=return_final_state)
    scale = float(q.shape[-1] ** -0.5 if scale is None else scale)
    return _delta_rule(q, k, v, beta, g, lam, initial_state, scale=scale,
                       chunk_size=int(chunk_size), impl=impl,
                       return_final_state=bool(return_final_state))


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

    Returns:
      `(o_t [B, H, Dv] in q_t's dtype, S_t [B, H, Dk, Dv] float32)` (float64 for float64
      inputs). Non-finite inputs propagate as IEEE arithmetic does; `g_t = −inf` resets S.

    Raises:
      ValueError naming the argument (`ArgumentTypeError`, also a `TypeError`, for a value
      of the wrong kind, such as None or a list where an array belongs).
    """
    _check_arrays((("S", S), ("q_t", q_t), ("k_t", k_t), ("v_t", v_t), ("beta_t", beta_t)),
                  (("g_t", g_t), ("lam_t", lam_t)))
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
    for name, a in (("S", S), ("q_t", q_t), ("k_t", k_t), ("v_t", v_t), ("beta_t", beta_t),
                    ("g_t", g_t), ("lam_t", lam_t)):
        if a is not None:
            _check_float(name, a)
    scale = float(Dk**-0.5 if scale is None else scale)
    up = lambda a: None if a is None else a.astype(compute_dtype(a.dtype))
    o_t, S = recurrent_step(*map(up, (S, q_t, k_t, v_t, beta_t, g_t, lam_t)), scale=scale)
    return o_t.astype(q_t.dtype), S
