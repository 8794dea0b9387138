"""Fixtures of the gmm tests."""

from __future__ import annotations

import zlib

import numpy as np
import pytest


@pytest.fixture
def rng(request):
    """A generator seeded from the test's name (tokamax)."""
    return np.random.default_rng(zlib.crc32(request.node.name.encode()))
