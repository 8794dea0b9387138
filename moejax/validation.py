"""The one set of argument checks every config and public function uses.

Each check raises with a message that names the argument and says what was expected:

  check_int(name, value, lo=, hi=)      an integer (Python or NumPy, never bool) in [lo, hi]
  check_number(name, value)             a real, finite number (int or float, Python or NumPy)
  check_range(name, value, lo, hi, ...) a number in an interval (bounds open or closed)
  check_choice(name, value, valid)      one of a fixed set of values
  check_bool(name, value)               a bool (Python or NumPy): not 0/1, not "False", not None
  check_array(name, value)              an array (jax or NumPy), not None, a list or a str
  check_axis_name(name, value)          a mapped axis name: None, a str or a tuple of str
  as_float_array(name, value)           array-like numbers as a float64 NumPy array

A value of the wrong *kind* (a string where a number belongs, a list where an array belongs)
raises `ArgumentTypeError`, which is both a `TypeError` and a `ValueError`, so callers may catch
either; a value of the right kind outside its range raises `ValueError`.
"""

from __future__ import annotations

import math
from collections.abc import Collection
from typing import Any

import numpy as np


class ArgumentTypeError(TypeError, ValueError):
    """An argument of the wrong kind (catchable as `TypeError` or `ValueError`)."""


def _is_int(value: Any) -> bool:
    return isinstance(value, int | np.integer) and not isinstance(value, bool | np.bool_)


def check_int(name: str, value: Any, *, lo: int | None = None, hi: int | None = None) -> None:
    """Raises unless `value` is an int (Python or NumPy, not bool) in [lo, hi]."""
    if not _is_int(value):
        raise ArgumentTypeError(f"{name} must be an int, got {value!r} ({type(value).__name__})")
    if lo is not None and value < lo:
        raise ValueError(f"{name} must be >= {lo}, got {value}")
    if hi is not None and value > hi:
        raise ValueError(f"{name} must be <= {hi}, got {value}")


def check_number(name: str, value: Any, *, finite: bool = True) -> None:
    """Raises unless `value` is a real number (int or float, Python or NumPy, not bool), finite
    unless `finite=False`."""
    if isinstance(value, bool | np.bool_) or not isinstance(
        value, int | float | np.integer | np.floating
    ):
        raise ArgumentTypeError(
            f"{name} must be a number, got {value!r} ({type(value).__name__})"
        )
    if finite and not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")


def check_range(name: str, value: Any, lo: float, hi: float, *, lo_open: bool = True,
                hi_open: bool = False) -> None:
    """Raises unless `value` is a number in the interval (lo, hi] (each bound open or closed)."""
    check_number(name, value, finite=False)
    ok_lo = value > lo if lo_open else value >= lo
    ok_hi = value < hi if hi_open else value <= hi
    if not (ok_lo and ok_hi):
        interval = f"{'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}"
        raise ValueError(f"{name} must be in {interval}, got {value}")


def check_choice(name: str, value: Any, valid: Collection[Any]) -> None:
    """Raises unless `value` is one of `valid`."""
    try:
        ok = value in valid
    except TypeError:  # unhashable value against a set
        ok = False
    if not ok:
        raise ValueError(f"{name} must be one of {tuple(valid)}, got {value!r}")


def check_bool(name: str, value: Any) -> None:
    """Raises unless `value` is a bool (Python or NumPy): not 0/1, not a str such as "False"
    (which is truthy), not None."""
    if not isinstance(value, bool | np.bool_):
        raise ArgumentTypeError(f"{name} must be a bool, got {value!r} ({type(value).__name__})")


def check_array(name: str, value: Any) -> None:
    """Raises unless `value` is an array (has `shape` and `dtype`): not None, a list or a str."""
    if not (hasattr(value, "shape") and hasattr(value, "dtype")):
        raise ArgumentTypeError(
            f"{name} must be an array (jax.Array or numpy.ndarray), got "
            f"{type(value).__name__}" + (": wrap it in jnp.asarray(...)"
                                         if isinstance(value, list | tuple) else "")
        )


def check_axis_name(name: str, value: Any) -> None:
    """Raises unless `value` is None, a str or a non-empty tuple of str (mapped axis names)."""
    names = (value,) if isinstance(value, str) else value
    if names is not None and not (isinstance(names, tuple) and names
                                  and all(isinstance(a, str) for a in names)):
        raise ArgumentTypeError(f"{name} must be a str, a tuple of str or None, got {value!r}")


def as_float_array(name: str, value: Any) -> np.ndarray:
    """`value` (an array or nested sequence of numbers) as a float64 NumPy array; None, a str or
    ragged/non-numeric data raise `ArgumentTypeError` naming `name`."""
    if value is None or isinstance(value, str | bytes):
        raise ArgumentTypeError(f"{name} must be an array of numbers, got {value!r}")
    try:
        return np.asarray(value, np.float64)
    except (TypeError, ValueError) as e:
        raise ArgumentTypeError(f"{name} must be an array of numbers, got "
                                f"{type(value).__name__}: {e}") from e
