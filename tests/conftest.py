"""Fixtures shared by the tests: every kernel test runs against the compiled and the plain implementation."""

from __future__ import annotations

import os
from types import ModuleType

import pytest

from migcore import _reference

try:
    from migcore import _fastpath
except ImportError:  # pragma: no cover - only without a build
    _fastpath = None  # type: ignore[assignment]


@pytest.fixture(params=["fastpath", "reference"])
def impl(request: pytest.FixtureRequest) -> ModuleType:
    """The kernel module under test; a missing build fails when MIGCORE_REQUIRE_FASTPATH=1."""
    if request.param == "reference":
        return _reference
    if _fastpath is None:
        if os.environ.get("MIGCORE_REQUIRE_FASTPATH") == "1":
            pytest.fail("migcore._fastpath is not built (MIGCORE_REQUIRE_FASTPATH=1)")
        pytest.skip("migcore._fastpath is not built")
    return _fastpath
