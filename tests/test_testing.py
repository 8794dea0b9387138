"""The suite's tolerance helpers: relative RMSE and `assert_close` (pass, fail, and messages)."""

from __future__ import annotations

import numpy as np
import pytest

from moejax import testing


def test_rel_rmse_values():
    ref = np.array([3.0, 4.0])  # rms = sqrt(12.5)
    assert testing.rel_rmse(ref, ref) == 0.0
    np.testing.assert_allclose(testing.rel_rmse(ref, ref + 1.0), 1.0 / np.sqrt(12.5))
    np.testing.assert_allclose(testing.rel_rmse(ref, -ref), 2.0)
    assert testing.rel_rmse(np.zeros(3), np.full(3, 0.5)) == 0.5  # zero reference: plain RMSE
    assert testing.rel_rmse(np.zeros(0), np.zeros(0)) == 0.0
    np.testing.assert_allclose(testing.rel_rmse(np.float32([1e3]), np.float32([1e3 + 1])), 1e-3)


def test_assert_close_passes_within_ratio_or_atol():
    rng = np.random.default_rng(0)
    ref = rng.normal(size=(4, 5))
    testing.assert_close("noise", ref, ref * (1 + 1e-6), ratio=testing.RATIO_F32)
    testing.assert_close("tiny", np.zeros(3), np.full(3, 1e-7), ratio=0.0)  # under atol
    testing.assert_close("empty", np.zeros((0, 2)), np.zeros((0, 2)), ratio=0.0)


def test_assert_close_fails_with_the_name_and_the_numbers():
    ref = np.ones(10)
    with pytest.raises(AssertionError, match=r"bad: relative RMSE 1\.000e-02 > 1\.0e-03 "
                                             r"\(max abs diff 1\.000e-02\)"):
        testing.assert_close("bad", ref, ref * 1.01, ratio=1e-3)
    with pytest.raises(AssertionError, match=r"s: shape \(2,\) != reference shape \(3,\)"):
        testing.assert_close("s", np.ones(3), np.ones(2), ratio=1.0)
    with pytest.raises(AssertionError, match="nan: non-finite"):
        testing.assert_close("nan", ref, np.where(np.arange(10) == 3, np.nan, 1.0), ratio=1.0)
    with pytest.raises(AssertionError, match="non-finite"):
        testing.assert_close("inf", ref, np.full(10, np.inf), ratio=np.inf)
