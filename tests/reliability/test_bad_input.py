"""The bad-input matrix: every public entry point refuses malformed input with a `ValueError` /
`TypeError` (or the documented subclass) whose message names the field and what was expected,
never a deep `AttributeError`/`KeyError`/XLA trace or a silent wrong answer."""

from __future__ import annotations

import importlib
import pkgutil

import pytest

from tests import reliability
from tests.reliability.cases import Case


def _all_cases() -> list[Case]:
    cases = []
    for info in pkgutil.iter_modules(reliability.__path__):
        if info.name.startswith("cases_"):
            cases.extend(importlib.import_module(f"tests.reliability.{info.name}").CASES)
    ids = [c.id for c in cases]
    dup = sorted({i for i in ids if ids.count(i) > 1})
    assert not dup, f"duplicate case ids: {dup}"
    return cases


CASES = _all_cases()


def test_matrix_is_wide():
    assert len(CASES) >= 60, f"the bad-input matrix has {len(CASES)} cases, the floor is 60"


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_refused(case: Case):
    assert case.exc is not Exception and case.exc is not BaseException
    with pytest.raises(case.exc) as info:
        case.call()
    message = str(info.value).lower()
    missing = [n for n in case.names if n.lower() not in message]
    assert not missing, f"message does not name {missing}: {info.value}"
