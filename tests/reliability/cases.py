"""The bad-input matrix's case type: one call that must be refused, and how.

Each area keeps its own table in `cases_<area>.py` (a module-level `CASES: list[Case]`);
`test_bad_input.py` collects every table and runs each case the same way.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any


@dataclasses.dataclass(frozen=True)
class Case:
    """A call that must raise `exc` with a message naming every string in `names`.

    Attributes:
      id: short test id, unique across all tables (e.g. "moe_apply-int-x").
      call: the call, with no arguments (build inputs inside it or in a closure).
      exc: the exception type (or tuple of types) expected; never a bare `Exception`.
      names: substrings the message must contain: the field/argument/file and, where it helps,
        what was expected (matched case-insensitively).
    """

    id: str
    call: Callable[[], Any]
    exc: type[BaseException] | tuple[type[BaseException], ...]
    names: tuple[str, ...]
