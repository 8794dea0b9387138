"""Tests for moejax.validation: the one set of argument checks (accept and refuse rules).

The rules every check shares: NumPy scalars count as the Python kind they stand for (np.int64 is
an int, np.float32 a number, np.bool_ a bool), and a bool is never an int or a number. A value of
the wrong kind raises `ArgumentTypeError` (a `TypeError` and a `ValueError`), one of the right
kind out of range a plain `ValueError`; every message names the argument.
"""

import math

import jax.numpy as jnp
import numpy as np
import pytest

from moejax import validation as v
from moejax.validation import ArgumentTypeError

INTS = [0, 3, -2, np.int64(3), np.int32(-2), np.uint8(7)]
BOOLS = [True, False, np.bool_(True), np.bool_(False)]
NOT_NUMBERS = ["3", None, [1], (1,), np.array([1]), 1j]


def _kind_error(check, *args, **kwargs):
    with pytest.raises(ArgumentTypeError, match="arg") as e:
        check("arg", *args, **kwargs)
    assert isinstance(e.value, TypeError) and isinstance(e.value, ValueError)
    return str(e.value)


def _range_error(check, *args, **kwargs):
    with pytest.raises(ValueError, match="arg") as e:
        check("arg", *args, **kwargs)
    assert not isinstance(e.value, TypeError), "out of range is a ValueError, not a kind error"
    return str(e.value)


@pytest.mark.parametrize("value", INTS)
def test_check_int_accepts_python_and_numpy_ints(value):
    v.check_int("arg", value)
    v.check_int("arg", value, lo=value, hi=value)  # bounds are inclusive


@pytest.mark.parametrize("value", BOOLS + [3.0, np.float64(3.0), *NOT_NUMBERS])
def test_check_int_refuses_bools_floats_and_others(value):
    msg = _kind_error(v.check_int, value)
    assert "must be an int" in msg and type(value).__name__ in msg


def test_check_int_bounds():
    assert _range_error(v.check_int, 0, lo=1) == "arg must be >= 1, got 0"
    assert _range_error(v.check_int, np.int64(5), hi=4) == "arg must be <= 4, got 5"
    v.check_int("arg", 10**30, lo=1)  # no hi: any size


@pytest.mark.parametrize("value", INTS + [0.5, -1e300, np.float32(0.5), np.float64(2.0)])
def test_check_number_accepts_real_numbers(value):
    v.check_number("arg", value)


@pytest.mark.parametrize("value", BOOLS + NOT_NUMBERS)
def test_check_number_refuses_bools_and_others(value):
    assert "must be a number" in _kind_error(v.check_number, value)


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf, np.float32(np.nan)])
def test_check_number_finite_unless_told(value):
    assert "must be finite" in _range_error(v.check_number, value)
    v.check_number("arg", value, finite=False)


def test_check_range_bounds():
    v.check_range("arg", 1.0, 0.0, 1.0)  # (lo, hi] by default
    v.check_range("arg", np.int64(1), 0, 1)
    v.check_range("arg", 0.0, 0.0, 1.0, lo_open=False)
    v.check_range("arg", 5.0, 0.0, math.inf, hi_open=True)
    assert "(0.0, 1.0]" in _range_error(v.check_range, 0.0, 0.0, 1.0)
    assert "[0.0, 1.0)" in _range_error(v.check_range, 1.0, 0.0, 1.0, lo_open=False,
                                        hi_open=True)
    assert "got 1.5" in _range_error(v.check_range, 1.5, 0.0, 1.0)
    assert "got nan" in _range_error(v.check_range, math.nan, 0.0, 1.0)  # NaN is in no interval
    _range_error(v.check_range, math.inf, 0.0, math.inf, hi_open=True)


@pytest.mark.parametrize("value", BOOLS + ["0.5", None, [0.5]])
def test_check_range_refuses_non_numbers(value):
    _kind_error(v.check_range, value, 0.0, 1.0)


def test_check_choice():
    v.check_choice("arg", "b", ("a", "b"))
    v.check_choice("arg", 2, {1, 2})
    msg = _range_error(v.check_choice, "c", ("a", "b"))
    assert msg == "arg must be one of ('a', 'b'), got 'c'"
    _range_error(v.check_choice, ["a"], {"a", "b"})  # unhashable against a set: refused, no crash
    _range_error(v.check_choice, None, ("a",))


@pytest.mark.parametrize("value", BOOLS)
def test_check_bool_accepts_bools(value):
    v.check_bool("arg", value)


@pytest.mark.parametrize("value", [0, 1, np.int64(1), "False", "True", None, 1.0,
                                   np.array([True])])
def test_check_bool_refuses_others(value):
    assert "must be a bool" in _kind_error(v.check_bool, value)


@pytest.mark.parametrize("value", [np.zeros(3), jnp.zeros((2, 2)), np.float32(1.0),
                                   np.zeros((), bool)])
def test_check_array_accepts_arrays(value):
    v.check_array("arg", value)


def test_check_array_refuses_others():
    assert "jnp.asarray" in _kind_error(v.check_array, [1.0, 2.0])  # a hint for sequences
    assert "jnp.asarray" in _kind_error(v.check_array, (1.0,))
    for value in (None, "abc", 1.0, 3):
        assert "jnp.asarray" not in _kind_error(v.check_array, value)


@pytest.mark.parametrize("value", [None, "data", ("data",), ("data", "model")])
def test_check_axis_name_accepts(value):
    v.check_axis_name("arg", value)


@pytest.mark.parametrize("value", [3, (), ["data"], ("data", 1), (None,), True])
def test_check_axis_name_refuses(value):
    assert "must be a str, a tuple of str or None" in _kind_error(v.check_axis_name, value)


def test_as_float_array():
    got = v.as_float_array("arg", [[1, 2], [3, 4]])
    assert got.dtype == np.float64 and got.shape == (2, 2)
    np.testing.assert_array_equal(v.as_float_array("arg", np.int64(3)), 3.0)
    np.testing.assert_array_equal(v.as_float_array("arg", jnp.ones(2, jnp.bfloat16)), [1.0, 1.0])
    for bad in (None, "1.0", b"1", [[1, 2], [3]], ["a"]):
        _kind_error(v.as_float_array, bad)
