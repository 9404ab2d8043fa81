"""Hashing and zero-page detection over 1 GiB, against xxhash and NumPy doing the same work."""

from __future__ import annotations

import os
import sys
import threading
import time
from collections.abc import Callable
from types import ModuleType
from typing import Any

import numpy as np
import pytest
import xxhash
from numpy.typing import NDArray

U64 = NDArray[np.uint64]
GIB = 1 << 30
PAGE = 4096
ROUNDS = 7


def run_pedantic(benchmark: Any, fn: Any, rounds: int = ROUNDS) -> None:
    benchmark.pedantic(fn, rounds=rounds, iterations=1, warmup_rounds=1)


def whole_and_loop(buf: U64) -> dict[str, Callable[[], object]]:
    """The baselines: one xxh3_64 call over the buffer, and a Python loop of one call per page."""
    view = memoryview(buf).cast("B")
    digest = xxhash.xxh3_64_intdigest
    return {
        "xxh3_whole": lambda: digest(buf),
        "xxh3_loop": lambda: [digest(view[i : i + PAGE]) for i in range(0, len(view), PAGE)],
    }


def test_hash_delta(
    benchmark: Any, compare: Any, fastpath: ModuleType, random_gib: U64
) -> None:
    """Hash, compare with the baseline and write the dirty bitmap: one call, one thread."""
    npages = GIB // PAGE
    baseline = np.zeros(npages, np.uint64)
    dirty = np.zeros(npages // 64, np.uint64)
    benchmark.group = "hash 1 GiB in 4 KiB pages"
    ours = lambda: fastpath.hash_delta(random_gib, PAGE, baseline, dirty)  # noqa: E731
    compare(benchmark, "hash_delta", ours, whole_and_loop(random_gib), nbytes=GIB)
    assert fastpath.count_bits(dirty) == npages


def test_hash_delta_2threads(
    benchmark: Any, compare: Any, fastpath: ModuleType, random_gib: U64
) -> None:
    """The same work split at a 64-page boundary over two Python threads (the GIL is released)."""
    npages = GIB // PAGE
    baseline = np.zeros(npages, np.uint64)
    dirty = np.zeros(npages // 64, np.uint64)
    half = npages // 2

    def split() -> None:
        other = threading.Thread(
            target=fastpath.hash_delta, args=(random_gib, PAGE, baseline, dirty, half, npages)
        )
        other.start()
        fastpath.hash_delta(random_gib, PAGE, baseline, dirty, 0, half)
        other.join()

    benchmark.group = "hash 1 GiB in 4 KiB pages"
    compare(benchmark, "hash_delta_2threads", split, whole_and_loop(random_gib), nbytes=GIB)
    assert fastpath.count_bits(dirty) == npages


def test_xxh3_whole(benchmark: Any, random_gib: U64) -> None:
    """Baseline alone: one xxh3_64 call over the whole buffer (what "full speed" means)."""
    benchmark.group = "hash 1 GiB in 4 KiB pages"
    run_pedantic(benchmark, whole_and_loop(random_gib)["xxh3_whole"])
    benchmark.extra_info["GiB/s"] = round(1 / benchmark.stats.stats.median, 2)


def test_xxh3_loop(benchmark: Any, random_gib: U64) -> None:
    """Baseline alone: the obvious Python loop, one xxh3_64 call per 4 KiB page."""
    benchmark.group = "hash 1 GiB in 4 KiB pages"
    run_pedantic(benchmark, whole_and_loop(random_gib)["xxh3_loop"], rounds=5)
    benchmark.extra_info["GiB/s"] = round(1 / benchmark.stats.stats.median, 2)


def test_hash_pages(benchmark: Any, fastpath: ModuleType, random_gib: U64) -> None:
    out = np.zeros(GIB // PAGE, np.uint64)
    benchmark.group = "hash 1 GiB in 4 KiB pages"
    run_pedantic(benchmark, lambda: fastpath.hash_pages(random_gib, PAGE, out), rounds=5)
    benchmark.extra_info["GiB/s"] = round(1 / benchmark.stats.stats.median, 2)
    assert int(out[0]) == xxhash.xxh3_64_intdigest(memoryview(random_gib).cast("B")[:PAGE])


def numpy_any(buf: U64) -> Callable[[], object]:
    """Baseline: NumPy testing the whole buffer for a non-zero word."""
    return lambda: np.frombuffer(buf, np.uint64).any()


def test_zero_pages(benchmark: Any, compare: Any, fastpath: ModuleType, zero_gib: U64) -> None:
    """All zero: the worst case, every byte must be read."""
    out = np.zeros(GIB // PAGE // 64, np.uint64)
    benchmark.group = "zero pages, 1 GiB all zero"
    ours = lambda: fastpath.zero_pages(zero_gib, PAGE, out)  # noqa: E731
    compare(benchmark, "zero_pages", ours, {"numpy_any": numpy_any(zero_gib)}, nbytes=GIB)
    assert fastpath.count_bits(out) == GIB // PAGE


def test_numpy_any(benchmark: Any, zero_gib: U64) -> None:
    benchmark.group = "zero pages, 1 GiB all zero"
    run_pedantic(benchmark, numpy_any(zero_gib))
    benchmark.extra_info["GiB/s"] = round(1 / benchmark.stats.stats.median, 2)


@pytest.mark.parametrize("page_size", [512, 4096, 65536])
def test_hash_delta_page_sizes(
    benchmark: Any, fastpath: ModuleType, random_gib: U64, page_size: int
) -> None:
    """Per-page cost at other page sizes, over the first 256 MiB."""
    nbytes = GIB // 4
    buf = random_gib[: nbytes // 8]
    npages = nbytes // page_size
    baseline = np.zeros(npages, np.uint64)
    dirty = np.zeros(-(-npages // 64), np.uint64)
    benchmark.group = "hash_delta 256 MiB by page size"
    run_pedantic(benchmark, lambda: fastpath.hash_delta(buf, page_size, baseline, dirty), rounds=5)
    benchmark.extra_info["GiB/s"] = round(nbytes / GIB / benchmark.stats.stats.median, 2)


def test_gil_released(benchmark: Any, fastpath: ModuleType, random_gib: U64) -> None:
    """A Python thread keeps counting while hash_delta runs (its relative pace is in extra_info)."""
    npages = GIB // PAGE
    baseline = np.zeros(npages, np.uint64)
    dirty = np.zeros(npages // 64, np.uint64)
    counter = [0]
    stop = threading.Event()

    def count() -> None:
        while not stop.is_set():
            counter[0] += 1

    old_interval = sys.getswitchinterval()
    sys.setswitchinterval(0.0005)
    thread = threading.Thread(target=count)
    thread.start()
    try:
        t0, c0 = time.perf_counter(), counter[0]
        time.sleep(0.05)
        alone = (counter[0] - c0) / (time.perf_counter() - t0)
        t0, c0 = time.perf_counter(), counter[0]
        benchmark.group = "GIL released while hashing 1 GiB"
        run_pedantic(benchmark, lambda: fastpath.hash_delta(random_gib, PAGE, baseline, dirty), 3)
        during = (counter[0] - c0) / (time.perf_counter() - t0)
    finally:
        stop.set()
        thread.join()
        sys.setswitchinterval(old_interval)
    benchmark.extra_info["python thread pace while hashing"] = round(during / alone, 2)
    assert during > 0.2 * alone


def test_zero_scan_of_a_sparse_region(benchmark: Any, compare: Any) -> None:
    """1 GiB, 10% of pages written, the rest never touched: the engine's zero scan asks the kernel first.

    Baseline: the same scan reading every page (``MIGCORE_RESIDENCY=0``).
    The residency query is inside the timed call, as in the engine. After the
    baseline's first round the untouched pages map the kernel's shared zero
    page, which stays in cache, so this understates the gain of a first scan
    (where each untouched page would also cost a page fault).
    """
    from migcore import _residency
    from migcore._region import Region, new_bitmap
    from migcore._trackers import zero_pages_parallel
    from migcore.bench.workload import fill

    region = Region.allocate(GIB, PAGE)
    fill(region, random_fraction=0.1, seed=0)
    if _residency.resident_pages(region) is None:
        pytest.skip("the kernel does not say which pages hold memory here")
    zeros = new_bitmap(region.npages)

    def scan(on: str) -> Callable[[], object]:
        def run() -> object:
            os.environ["MIGCORE_RESIDENCY"] = on
            try:
                return zero_pages_parallel(region, zeros, 2)
            finally:
                os.environ.pop("MIGCORE_RESIDENCY", None)
        return run

    benchmark.group = "zero scan, 1 GiB, 90% never touched"
    compare(benchmark, "zero_scan_resident", scan("1"), {"zero_scan_all": scan("0")}, nbytes=GIB)
    assert zero_pages_parallel(region, zeros, 2) == region.npages - round(0.1 * region.npages)
