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


def _compiled() -> ModuleType:
    """The compiled module; a missing build fails when MIGCORE_REQUIRE_FASTPATH=1, else skips."""
    if _fastpath is None:
        if os.environ.get("MIGCORE_REQUIRE_FASTPATH") == "1":
            pytest.fail("migcore._fastpath is not built (MIGCORE_REQUIRE_FASTPATH=1)")
        pytest.skip("migcore._fastpath is not built")
    return _fastpath


@pytest.fixture(params=["fastpath", "reference"])
def impl(request: pytest.FixtureRequest) -> ModuleType:
    """The kernel module under test: every kernel test runs against both."""
    return _reference if request.param == "reference" else _compiled()


@pytest.fixture
def fastpath() -> ModuleType:
    """The compiled module alone, for sizes the reference would take minutes over or promises only it makes."""
    return _compiled()
