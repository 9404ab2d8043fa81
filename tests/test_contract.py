"""The fast path and the reference are one contract: same names, same stub, every compiled hash loop exact."""

from __future__ import annotations

import ast
import os
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
import xxhash

from migcore import _kernels, _reference

fastpath: ModuleType | None
try:
    from migcore import _fastpath as fastpath
except ImportError:  # pragma: no cover - only without a build
    fastpath = None

STUB = Path(_reference.__file__).with_name("_fastpath.pyi")


def public(module: ModuleType) -> set[str]:
    return {n for n in dir(module) if not n.startswith("_") and callable(getattr(module, n)) and n != "np"}


def stub_functions() -> set[str]:
    tree = ast.parse(STUB.read_text())
    return {n.name for n in tree.body if isinstance(n, ast.FunctionDef) and not n.name.startswith("_")}


def test_reference_exports_exactly_the_stubbed_kernels() -> None:
    assert set(_reference.__all__) == stub_functions()


def test_fastpath_exports_the_same_kernels_as_the_reference() -> None:
    if fastpath is None:
        if os.environ.get("MIGCORE_REQUIRE_FASTPATH") == "1":
            pytest.fail("migcore._fastpath is not built (MIGCORE_REQUIRE_FASTPATH=1)")
        pytest.skip("migcore._fastpath is not built")
    assert public(fastpath) == stub_functions()


def test_kernels_module_uses_the_build_when_required() -> None:
    if os.environ.get("MIGCORE_REQUIRE_FASTPATH") == "1":
        assert _kernels.COMPILED and _kernels.IMPLEMENTATION == "migcore._fastpath"
    for name in stub_functions():
        assert callable(getattr(_kernels, name))


LENGTHS = [0, 1, 3, 16, 17, 128, 129, 240, 241, 255, 256, 1023, 1024, 1025, 4095, 4096, 4097, 65536, 1 << 20]


@pytest.mark.parametrize("variant", ["plain", "avx2", "avx512"])
def test_every_compiled_xxh3_loop_matches_xxhash(variant: str) -> None:
    """Each loop the build holds is checked, not only the one this CPU picks at run time."""
    if fastpath is None:
        pytest.skip("migcore._fastpath is not built")
    if fastpath._xxh3_variant(b"probe", variant) is None:
        pytest.skip(f"this CPU or build has no {variant} loop")
    rng = np.random.default_rng(7)
    block = rng.bytes((1 << 20) + 64)
    for n in LENGTHS:
        for shift in (0, 1, 7, 63):  # misaligned starts
            data = memoryview(block)[shift : shift + n]
            assert fastpath._xxh3_variant(data, variant) == xxhash.xxh3_64_intdigest(data), (n, shift)
