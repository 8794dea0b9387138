"""`experiments.stats`: Student-t intervals, paired verdicts, plateau detection."""

import math

import numpy as np
import pytest

from experiments import stats


def test_interval_matches_hand_computed_t_interval():
    # mean 2, unbiased std 1, n = 4: half = t_{0.975, 3} * 1 / 2 = 3.18245 / 2.
    d = stats.interval([1.0, 2.0, 2.0, 3.0 + 0.0])
    assert d["n"] == 4 and d["mean"] == pytest.approx(2.0)
    assert d["std"] == pytest.approx(np.std([1, 2, 2, 3], ddof=1))
    assert d["half"] == pytest.approx(3.182446 * d["std"] / 2, rel=1e-5)
    assert d["lo"] < 2.0 < d["hi"]
    one = stats.interval([0.7])
    assert one["half"] == math.inf and stats.fmt(one) == "0.700 ± n/a"
    assert stats.fmt(d, 2) == f"2.00 ± {d['half']:.2f}"


def test_compare_verdicts_and_signs():
    better = stats.compare([0.9, 0.8, 0.85, 0.95, 0.9], [0.5, 0.55, 0.5, 0.6, 0.52])
    assert better["verdict"] == "reproduced" and better["signs"] == ["+"] * 5
    assert better["diff_mean"] == pytest.approx(np.mean([0.4, 0.25, 0.35, 0.35, 0.38]))
    worse = stats.compare([0.5, 0.55, 0.5, 0.6, 0.52], [0.9, 0.8, 0.85, 0.95, 0.9])
    assert worse["verdict"] == "opposite" and worse["signs"] == ["-"] * 5
    assert stats.compare([0.5, 0.55], [0.9, 0.8], direction="less")["verdict"] != "opposite"
    mixed = stats.compare([1.0, 0.0, 1.0, 0.0, 0.5], [0.0, 1.0, 0.0, 1.0, 0.5])
    assert mixed["verdict"] == "not separated" and mixed["signs"] == ["+", "-", "+", "-", "0"]
    assert stats.compare([1.0], [0.0])["verdict"] == "not separated"  # one seed: no interval
    assert stats.fmt(better, signed=True).startswith("+0.346 ± ")


def test_plateau_detects_still_improving_and_flat_curves():
    steps = np.arange(0, 1000, 50)
    falling = 5.0 * np.exp(-steps / 2000)          # still dropping fast at the end
    flat = 1.0 + 4.0 * np.exp(-steps / 60)         # converged long before the end
    assert not stats.plateau(steps, falling)["plateaued"]
    p = stats.plateau(steps, flat)
    assert p["plateaued"] and p["last_change"] < 0.01 and p["from_step"] >= 800 - 50
    acc = 1 - np.exp(-steps / 60)
    assert stats.plateau(steps, acc, mode="max")["plateaued"]
    assert not stats.plateau(steps, 1 - np.exp(-steps / 2000), mode="max")["plateaued"]
    assert not stats.plateau([0, 1, 2], [3.0, 2.0, 1.0])["plateaued"]  # too short to tell


@pytest.mark.parametrize("call, match", [
    (lambda: stats.interval([]), "at least one"),
    (lambda: stats.interval([1.0, math.nan]), "values must be finite"),
    (lambda: stats.interval([1.0], confidence=1.0), "confidence"),
    (lambda: stats.compare([1.0, 2.0], [1.0]), "one number per seed"),
    (lambda: stats.compare([1.0], [1.0], direction="up"), "direction"),
    (lambda: stats.plateau([0, 2, 1, 3], [1, 1, 1, 1]), "strictly increasing"),
    (lambda: stats.plateau([0, 1], [1.0]), "one value per step"),
    (lambda: stats.plateau([0, 1], [1, 1], mode="mean"), "mode"),
    (lambda: stats.plateau([0, 1], [1, 1], window=1.0), "window"),
])
def test_bad_input_names_the_argument(call, match):
    with pytest.raises(ValueError, match=match):
        call()
