"""Tolerance helpers shared by the test-suite (relative RMSE, as flash-linear-attention does)."""

from __future__ import annotations

import functools

import jax
import numpy as np

# Relative-RMSE ratios by situation (see STYLE.md §6.12).
RATIO_F32 = 1e-5  # fp32 with full-precision dots
RATIO_F32_TF32 = 2e-3  # fp32 with TF32 dots on GPU
RATIO_BF16_OUT = 5e-3  # bf16 outputs / states
RATIO_BF16_GRAD = 1e-2  # bf16 q/k/v grads
RATIO_BF16_GATE_GRAD = 2e-2  # bf16 beta/g/lam grads


def rel_rmse(ref, got) -> float:
    """`rms(ref - got) / rms(ref)` in float64."""
    ref = np.asarray(ref, np.float64)
    got = np.asarray(got, np.float64)
    denom = np.sqrt(np.mean(ref**2)) if ref.size else 0.0
    err = np.sqrt(np.mean((ref - got) ** 2)) if ref.size else 0.0
    return float(err / denom) if denom > 0 else float(err)


def assert_close(name: str, ref, got, *, ratio: float, atol: float = 1e-6) -> None:
    """Fails unless `got` matches `ref`: max-abs-diff ≤ atol, or relative RMSE ≤ ratio.

    Args:
      name: what is compared, printed in the failure message.
      ref: oracle array.
      got: array under test, same shape.
      ratio: bound on `rms(ref - got) / rms(ref)`.
      atol: absolute floor; below it the arrays count as equal whatever the ratio.
    """
    ref_np = np.asarray(ref, np.float64)
    got_np = np.asarray(got, np.float64)
    if ref_np.shape != got_np.shape:
        raise AssertionError(f"{name}: shape {got_np.shape} != reference shape {ref_np.shape}")
    if not np.all(np.isfinite(got_np)):
        raise AssertionError(f"{name}: non-finite values in result")
    max_abs = float(np.max(np.abs(ref_np - got_np))) if ref_np.size else 0.0
    if max_abs <= atol:
        return
    r = rel_rmse(ref_np, got_np)
    if not r <= ratio:
        raise AssertionError(
            f"{name}: relative RMSE {r:.3e} > {ratio:.1e} (max abs diff {max_abs:.3e})"
        )


@functools.cache
def _jitted_lm_init():
    from moejax.models import lm

    return jax.jit(lm.init, static_argnums=1)


def init_lm(key, cfg):
    """`moejax.models.lm.init(key, cfg)` as one compiled call per config (the eager init runs
    hundreds of small ops, each compiled on first use: seconds per test on a CPU)."""
    return _jitted_lm_init()(key, cfg)
