"""Seed statistics shared by the experiment scripts: intervals, paired comparisons, plateaus.

A claim is tested per cell over seeds. `compare(a, b, direction=...)` pairs the two models'
numbers seed by seed (same seed = same data and batch order), takes the Student-t interval of the
mean difference and calls the claim

- "reproduced" when the interval excludes 0 in the claimed direction,
- "opposite" when it excludes 0 the other way,
- "not separated" otherwise (including fewer than 2 seeds, where no interval exists).

`plateau(steps, values)` says whether a training curve has stopped moving: its best value over
the last `window` fraction of the run improved on the best before it by less than `rtol`
(relative). The scripts use it to report that the baseline has converged.

    d = stats.compare(acc["gated_qdelta"], acc["gated_deltanet"], direction="greater")
    print(stats.fmt(d), d["signs"], d["verdict"])    # "+0.012 ± 0.020" ['+', '-', ...] ...
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from scipy import stats as _scipy_stats

DIRECTIONS = ("greater", "less")
VERDICTS = ("reproduced", "opposite", "not separated")


def _values(name: str, values: Sequence[float]) -> np.ndarray:
    a = np.asarray(values, dtype=np.float64)
    if a.ndim != 1:
        raise ValueError(f"{name} must be a 1-D sequence of numbers, got shape {a.shape}")
    if not np.all(np.isfinite(a)):
        raise ValueError(f"{name} must be finite, got {a.tolist()}")
    return a


def _check_confidence(confidence: float) -> None:
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")


def interval(values: Sequence[float], confidence: float = 0.95) -> dict:
    """Mean and two-sided Student-t interval of `values` (one number per seed).

    Returns:
      `{"n", "mean", "half", "lo", "hi", "std"}`; `half` is the half-width (`inf` for n < 2,
      so nothing is ever "separated" on one seed); `std` the unbiased standard deviation (0
      for n < 2).

    Raises:
      ValueError: `values` empty, not 1-D or not finite; `confidence` outside (0, 1).
    """
    _check_confidence(confidence)
    a = _values("values", values)
    if a.size == 0:
        raise ValueError("values must hold at least one number, got none")
    n, mean = int(a.size), float(a.mean())
    if n < 2:
        return {"n": n, "mean": mean, "half": math.inf, "lo": -math.inf, "hi": math.inf,
                "std": 0.0}
    std = float(a.std(ddof=1))
    half = float(_scipy_stats.t.ppf(0.5 + confidence / 2, n - 1) * std / math.sqrt(n))
    return {"n": n, "mean": mean, "half": half, "lo": mean - half, "hi": mean + half, "std": std}


def compare(a: Sequence[float], b: Sequence[float], *, direction: str = "greater",
            confidence: float = 0.95) -> dict:
    """Paired test of the claim "`a` is `direction` than `b`" over seeds (`a[i]`, `b[i]` share
    seed i).

    Returns:
      `interval(a − b)` plus `"diff_mean"` (= mean), `"signs"` (per seed "+", "-" or "0" of
      a − b), `"direction"` and `"verdict"` (one of `VERDICTS`).

    Raises:
      ValueError: `a` and `b` of different lengths or empty; `direction` not in `DIRECTIONS`.
    """
    if direction not in DIRECTIONS:
        raise ValueError(f"direction must be one of {DIRECTIONS}, got {direction!r}")
    a_, b_ = _values("a", a), _values("b", b)
    if a_.shape != b_.shape:
        raise ValueError(f"a and b must pair one number per seed, got {a_.size} and {b_.size}")
    diff = a_ - b_
    out = interval(diff, confidence)
    lo, hi = out["lo"], out["hi"]
    if (lo > 0 and direction == "greater") or (hi < 0 and direction == "less"):
        verdict = "reproduced"
    elif lo > 0 or hi < 0:
        verdict = "opposite"
    else:
        verdict = "not separated"
    signs = ["+" if d > 0 else "-" if d < 0 else "0" for d in diff]
    return {**out, "diff_mean": out["mean"], "signs": signs, "direction": direction,
            "verdict": verdict}


def plateau(steps: Sequence[float], values: Sequence[float], *, mode: str = "min",
            window: float = 0.2, rtol: float = 0.01) -> dict:
    """Whether a curve (e.g. eval loss or accuracy against step) has converged.

    The last `window` fraction of the steps is compared with what came before: with
    `mode="min"` (a loss) the change is `(best_before − best_last) / |best_before|`, with
    `mode="max"` (an accuracy) `(best_last − best_before) / |best_before|`; the curve has
    plateaued when that improvement is below `rtol`. A curve still improving fast at its end
    is reported as not plateaued, which is what "train until the baseline has plateaued" checks.

    Returns:
      `{"plateaued", "last_change", "best", "best_before", "from_step"}`; `plateaued` is False
      when fewer than 2 points fall before or inside the window.

    Raises:
      ValueError: lengths differ, steps not increasing, `mode` not "min"/"max", `window`
        outside (0, 1) or `rtol` negative.
    """
    if mode not in ("min", "max"):
        raise ValueError(f"mode must be 'min' or 'max', got {mode!r}")
    if not 0.0 < window < 1.0:
        raise ValueError(f"window must be in (0, 1), got {window}")
    if rtol < 0:
        raise ValueError(f"rtol must be >= 0, got {rtol}")
    s, v = _values("steps", steps), _values("values", values)
    if s.shape != v.shape:
        raise ValueError(f"steps and values must have one value per step, got {s.size} and "
                         f"{v.size}")
    if s.size and np.any(np.diff(s) <= 0):
        raise ValueError("steps must be strictly increasing")
    out = {"plateaued": False, "last_change": math.nan, "best": math.nan,
           "best_before": math.nan, "from_step": math.nan}
    if s.size < 4:
        return out
    start = s[0] + (1.0 - window) * (s[-1] - s[0])
    inside = s >= start
    if inside.sum() < 2 or (~inside).sum() < 2:
        return out
    pick = np.min if mode == "min" else np.max
    before, last = float(pick(v[~inside])), float(pick(v[inside]))
    gain = (before - last) if mode == "min" else (last - before)
    change = gain / max(abs(before), 1e-12)
    return {"plateaued": bool(change < rtol), "last_change": float(change), "best": last,
            "best_before": before, "from_step": float(s[inside][0])}


def fmt(d: dict, digits: int = 3, *, signed: bool = False) -> str:
    """`"mean ± half"` of an `interval` / `compare` result (`± n/a` on one seed); `signed`
    writes a "+" before positive means (for differences)."""
    sign = "+" if signed else ""
    mean = f"{d['mean']:{sign}.{digits}f}"
    if not math.isfinite(d["half"]):
        return f"{mean} ± n/a"
    return f"{mean} ± {d['half']:.{digits}f}"
