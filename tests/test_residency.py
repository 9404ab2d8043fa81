"""Residency: which pages have memory behind them, so the others are zero without being read.

Every answer is checked against what the test did to the memory (written,
discarded, only read, never touched), and against the two ways of asking
the kernel (PAGEMAP_SCAN and /proc/self/pagemap entries).
"""

from __future__ import annotations

import mmap
import os
import tempfile
from collections.abc import Iterator

import numpy as np
import pytest

from migcore import _kernels, _residency, _userfault
from migcore._region import Region, new_bitmap
from migcore._trackers import hash_delta_parallel, zero_page_hashes, zero_pages_parallel
from migcore.bench.workload import fill

PS = mmap.PAGESIZE
pytestmark = pytest.mark.skipif(
    not _userfault.available() or not os.path.exists("/proc/self/pagemap"),
    reason="needs Linux /proc/self/pagemap and migcore._uffd",
)


def bits(bitmap: np.ndarray, n: int) -> np.ndarray:
    return np.unpackbits(bitmap.view(np.uint8), bitorder="little")[:n].astype(bool)


def scan_works() -> bool:
    return _residency._method() in ("scan", "scan+pfnzero")


@pytest.fixture
def region() -> Iterator[Region]:
    r = Region.allocate(2048 * PS, PS)  # 8 MiB: above MIN_BYTES
    yield r


def test_untouched_written_discarded_and_read_pages(region: Region) -> None:
    arr = region.array().reshape(-1, PS)
    arr[[0, 5, 63, 64, 65, 2047]] = 1
    arr[[100, 101]] = 0  # written zeros: memory behind them, so they count
    region._mapping.madvise(mmap.MADV_DONTNEED, 5 * PS, PS)  # given back: zero again
    _ = int(arr[200:300].sum())  # only read: the shared zero page
    resident = _residency.resident_pages(region)
    assert resident is not None
    got = np.flatnonzero(bits(resident, region.npages)).tolist()
    expected = [0, 63, 64, 65, 100, 101, 2047]
    if _residency._method() == "scan+pfnzero":
        assert got == expected  # PAGE_IS_PFNZERO: pages that were only read do not count
    else:
        assert set(expected) <= set(got) and set(got) <= set(expected) | set(range(200, 300))
    assert (_residency.from_pagemap(region)[: len(resident)] | resident == _residency.from_pagemap(region)).all()


def test_pagemap_fallback_agrees_with_the_scan(region: Region) -> None:
    rng = np.random.default_rng(4)
    arr = region.array().reshape(-1, PS)
    arr[rng.choice(region.npages, 300, replace=False)] = 3
    fallback = _residency.from_pagemap(region)
    assert int(_kernels.count_bits(fallback)) == 300
    if scan_works():
        resident = _residency.resident_pages(region)
        assert resident is not None and (resident == fallback).all()


@pytest.mark.parametrize("page_size", [1024, PS, 4 * PS, 16 * PS])
@pytest.mark.parametrize("offset", [0, 16, PS - 8])
def test_region_pages_that_are_not_system_pages(page_size: int, offset: int) -> None:
    """A region page counts when any system page under it does, whatever the alignment and page size."""
    m = mmap.mmap(-1, 4096 * PS, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    whole = memoryview(m)
    try:
        nbytes = 3000 * PS + 123
        region = Region(whole[offset : offset + nbytes], page_size)
        raw = region.array()
        touched = [0, 17 * PS + 5, 1000 * PS, nbytes - 1]
        for b in touched:
            raw[b] = 1
        if offset:  # the bytes before the region share its first system page
            whole[0] = 1
        expected = np.zeros(region.npages, bool)
        for b in touched:
            expected[b // page_size] = True
        # every region page that shares a system page with a touched byte may count too
        sys_touched = {(offset + b) // PS for b in touched} | ({0} if offset else set())
        allowed = expected.copy()
        for i in range(region.npages):
            lo, hi = (offset + i * page_size) // PS, (offset + min((i + 1) * page_size, nbytes) - 1) // PS
            allowed[i] = any(s in sys_touched for s in range(lo, hi + 1))
        answers = [_residency.resident_pages(region), _residency.from_pagemap(region)]
        assert answers[0] is not None
        for resident in answers:
            assert resident is not None
            got = bits(resident, region.npages)
            assert (got == allowed).all()
            assert (got | ~expected).all()
        del raw
        region.view.release()
        del region
    finally:
        whole.release()
        m.close()


def test_file_backed_and_shared_memory_are_always_read() -> None:
    with tempfile.TemporaryFile() as f:
        f.truncate(2048 * PS)
        for flags in (mmap.MAP_SHARED, mmap.MAP_PRIVATE):
            m = mmap.mmap(f.fileno(), 2048 * PS, flags=flags)
            region = Region(m, PS)
            reason = _residency.region_reason(region)
            found = _residency.resident_pages(region)
            region.view.release()
            del region
            m.close()
            assert found is None
            assert reason is not None and ("file-backed" in reason or "shared" in reason)
    shared = mmap.mmap(-1, 2048 * PS, flags=mmap.MAP_SHARED | mmap.MAP_ANONYMOUS)
    region = Region(shared, PS)
    found = _residency.resident_pages(region)
    region.view.release()
    del region
    shared.close()
    assert found is None


def test_heap_memory_of_a_numpy_array_is_private_anonymous() -> None:
    arr = np.zeros(3 * 2048 * PS + 17, np.uint8)  # malloc'd: not page-aligned
    arr[5 * PS] = 1
    region = Region(arr, PS)
    resident = _residency.resident_pages(region)
    assert resident is not None
    assert bits(resident, region.npages)[5]


def test_a_region_registered_for_postcopy_is_always_read(region: Region) -> None:
    addr, length = _userfault.system_span(region)
    key = _userfault.claim_missing(addr + PS, PS)
    try:
        assert _residency.resident_pages(region) is None
        assert "post-copy" in (_residency.region_reason(region) or "")
    finally:
        _userfault.release_missing(key)
    assert _residency.resident_pages(region) is not None


def test_off_switch_and_small_regions(region: Region, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MIGCORE_RESIDENCY", "0")
    assert _residency.resident_pages(region) is None
    monkeypatch.delenv("MIGCORE_RESIDENCY")
    assert _residency.resident_pages(region) is not None
    assert _residency.resident_pages(Region.allocate(PS * 4, PS)) is None


@pytest.mark.parametrize("write_zeros", [False, True])
def test_whole_region_kernels_give_the_same_answers_with_and_without(
    write_zeros: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The zero scan and the hash pass agree with reading every page, on a sparse 64 MiB region."""
    region = Region.allocate(64 << 20, PS)
    fill(region, random_fraction=0.1, seed=2, write_zeros=write_zeros)
    resident = _residency.resident_pages(region)
    assert resident is not None
    count = int(_kernels.count_bits(resident))
    assert count == region.npages if write_zeros else count < region.npages // 5
    answers = []
    for on in ("1", "0"):
        monkeypatch.setenv("MIGCORE_RESIDENCY", on)
        zeros = new_bitmap(region.npages)
        nzero = zero_pages_parallel(region, zeros, 2)
        table = zero_page_hashes(region)
        dirty = new_bitmap(region.npages)
        ndirty = hash_delta_parallel(region, table, dirty, 2, update=True)
        answers.append((nzero, zeros, ndirty, dirty, table))
    a, b = answers
    assert a[0] == b[0] and a[2] == b[2] == region.npages - a[0]
    assert all((x == y).all() for x, y in zip(a[1:], b[1:]) if isinstance(x, np.ndarray))


@pytest.mark.parametrize(
    ("mode", "tracker"),
    [("stopcopy", "auto"), ("precopy", "hash"), ("precopy", "auto"), ("postcopy", "auto"), ("hybrid", "hash")],
)
def test_sparse_region_migrates_exactly_while_untouched_pages_get_written(mode: str, tracker: str) -> None:
    """A live writer turns pages with no memory behind them into written ones while the rounds run."""
    from _modes import migrate_live

    region = Region.allocate((16 << 20) + 1000, PS)  # partial last page
    fill(region, random_fraction=0.05, seed=7)
    arr = region.array().reshape(-1)
    arr[100 * PS : 102 * PS] = 0  # written zeros: memory behind them
    resident = _residency.resident_pages(region)
    assert resident is not None and int(_kernels.count_bits(resident)) < region.npages // 4
    kw = {"max_rounds": 4, "on_stall": "postcopy"} if mode == "hybrid" else {}
    stats, received = migrate_live(
        region=region, mode=mode, tracker=tracker, writer_kw={"random_pages": 3, "flip_pages": 4}, **kw
    )
    snapshot = bytes(received.region.view)  # equal to the paused source (checked by migrate_live)
    nonzero = sum(1 for i in range(region.npages) if any(snapshot[i * PS : (i + 1) * PS]))
    if mode == "stopcopy":
        assert stats.normal_pages == nonzero and stats.zero_pages == region.npages - nonzero


def test_a_page_map_that_reports_nothing_is_not_trusted(monkeypatch: pytest.MonkeyPatch, region: Region) -> None:
    """An emulated pagemap answering "nothing resident" would turn data into zeros: the probe refuses it."""
    empty = lambda r, *a: np.zeros(-(-r.npages // 64), np.uint64)  # noqa: E731
    monkeypatch.setattr(_residency, "_scan", empty)
    monkeypatch.setattr(_residency, "from_pagemap", lambda r: empty(r))
    _residency._method.cache_clear()
    try:
        assert _residency._method() is None
        region.array()[:PS] = 1
        assert _residency.resident_pages(region) is None
    finally:
        monkeypatch.undo()
        _residency._method.cache_clear()
    assert _residency._method() is not None  # the real page map passes the probe
