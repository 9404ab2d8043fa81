"""Dirty bitmap to runs and the word-wise operations on a 2^28-bit bitmap (1 TiB of 4 KiB pages)."""

from __future__ import annotations

from collections.abc import Callable
from types import ModuleType
from typing import Any

import numpy as np
import pytest
from numpy.typing import NDArray

U64 = NDArray[np.uint64]
NBITS = 1 << 28
ROUNDS = 7


@pytest.fixture(scope="module")
def sparse_bitmap() -> U64:
    """0.1% of the bits set at random positions."""
    rng = np.random.default_rng(0)
    bitmap = np.zeros(NBITS // 64, np.uint64)
    positions = rng.choice(NBITS, NBITS // 1000, replace=False)
    masks = np.left_shift(np.uint64(1), (positions % 64).astype(np.uint64))
    np.bitwise_or.at(bitmap, positions // 64, masks)
    return bitmap


def numpy_runs(bitmap: U64) -> Callable[[], object]:
    """Baseline: the usual NumPy idiom, every set bit's index (runs would still need grouping)."""
    return lambda: np.flatnonzero(np.unpackbits(bitmap.view(np.uint8), bitorder="little"))


def test_dirty_runs(
    benchmark: Any, compare: Any, fastpath: ModuleType, sparse_bitmap: U64
) -> None:
    out = np.zeros((NBITS // 1000 + 1, 2), np.uint64)
    benchmark.group = "dirty bitmap to runs, 2^28 bits, 0.1% set"
    ours = lambda: fastpath.dirty_runs(sparse_bitmap, NBITS, out)  # noqa: E731
    baselines = {"numpy_runs": numpy_runs(sparse_bitmap)}
    nruns, resume = compare(benchmark, "dirty_runs", ours, baselines)
    assert resume == NBITS
    assert int(out[:nruns, 1].sum()) == fastpath.count_bits(sparse_bitmap)


def test_numpy_runs(benchmark: Any, sparse_bitmap: U64) -> None:
    benchmark.group = "dirty bitmap to runs, 2^28 bits, 0.1% set"
    benchmark.pedantic(numpy_runs(sparse_bitmap), rounds=ROUNDS, warmup_rounds=1)


def test_count_bits(benchmark: Any, fastpath: ModuleType, sparse_bitmap: U64) -> None:
    benchmark.group = "bitmap word operations, 2^28 bits"
    benchmark.pedantic(lambda: fastpath.count_bits(sparse_bitmap), rounds=ROUNDS, warmup_rounds=1)


def test_or_bits(benchmark: Any, fastpath: ModuleType, sparse_bitmap: U64) -> None:
    other = np.roll(sparse_bitmap, 1)
    out = np.empty_like(sparse_bitmap)
    benchmark.group = "bitmap word operations, 2^28 bits"
    benchmark.pedantic(
        lambda: fastpath.or_bits(sparse_bitmap, other, out), rounds=ROUNDS, warmup_rounds=1
    )


def test_set_bits(benchmark: Any, fastpath: ModuleType) -> None:
    bitmap = np.zeros(NBITS // 64, np.uint64)
    benchmark.group = "bitmap word operations, 2^28 bits"
    benchmark.pedantic(
        lambda: fastpath.set_bits(bitmap, 3, NBITS - 3), rounds=ROUNDS, warmup_rounds=1
    )
