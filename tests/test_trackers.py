"""Trackers: the hash tracker compares with an acknowledged baseline; the writes tracker reads marks."""

from __future__ import annotations

import numpy as np
import pytest
import xxhash

from migcore import Region
from migcore._region import new_bitmap
from migcore._trackers import (
    HashTracker,
    WritesTracker,
    hash_delta_parallel,
    make_tracker,
    runs_to_pages,
    zero_page_hashes,
)


def bits_of(bitmap: np.ndarray, n: int) -> list[int]:
    return np.flatnonzero(np.unpackbits(bitmap.view(np.uint8), bitorder="little")[:n]).tolist()


def page_hashes(region: Region) -> np.ndarray:
    ps = region.page_size
    return np.array(
        [xxhash.xxh3_64_intdigest(region.view[i * ps : (i + 1) * ps]) for i in range(region.npages)],
        dtype=np.uint64,
    )


def test_zero_page_hashes_match_a_zero_region_including_partial_tail() -> None:
    region = Region(bytearray(5 * 1024 + 300), page_size=1024)
    assert np.array_equal(zero_page_hashes(region), page_hashes(region))


def test_runs_to_pages() -> None:
    runs = np.array([[3, 2], [10, 1], [20, 4]], dtype=np.uint64)
    assert runs_to_pages(runs).tolist() == [3, 4, 10, 20, 21, 22, 23]
    assert runs_to_pages(np.empty((0, 2), dtype=np.uint64)).tolist() == []


def test_hash_tracker_finds_non_zero_pages_first() -> None:
    region = Region(bytearray(64 * 512), page_size=512)
    region.view[512 * 7] = 1
    region.view[512 * 63 + 511] = 2
    tracker = make_tracker("hash", region)
    out = new_bitmap(region.npages)
    assert tracker.collect(out) == 2 and bits_of(out, 64) == [7, 63]


def test_hash_tracker_compares_with_acknowledged_hashes_not_its_own() -> None:
    """Rule 1: a page that changed and changed back is still dirty if the destination holds other bytes."""
    region = Region(bytearray(8 * 512), page_size=512)
    tracker = HashTracker(region)
    region.view[0:3] = b"abc"
    out = new_bitmap(region.npages)
    assert bits_of(out, 8) == [] and tracker.collect(out) == 1
    # the destination stored (and acknowledged) a newer content of page 0 ...
    stored = bytearray(512)
    stored[0:3] = b"xyz"
    runs = np.array([[0, 1]], dtype=np.uint64)
    tracker.acknowledge(runs, np.array([xxhash.xxh3_64_intdigest(bytes(stored))], dtype=np.uint64))
    # ... then the source page went back to "abc": it differs from what the destination holds
    assert tracker.collect(out) == 1 and bits_of(out, 8) == [0]
    # once the destination acknowledges the current bytes, the page is clean
    tracker.acknowledge(runs, np.array([xxhash.xxh3_64_intdigest(region.view[:512])], dtype=np.uint64))
    assert tracker.collect(out) == 0


def test_parallel_hash_delta_equals_single_thread() -> None:
    rng = np.random.default_rng(1)
    data = bytearray(rng.bytes(40 << 20) + b"tail")
    region = Region(data, page_size=4096)
    base = zero_page_hashes(region)
    base[::3] = 0  # entries no page hashes to
    one, two = new_bitmap(region.npages), new_bitmap(region.npages)
    b1, b2 = base.copy(), base.copy()
    n1 = hash_delta_parallel(region, b1, one, threads=1, update=True)
    n2 = hash_delta_parallel(region, b2, two, threads=2, update=True)
    assert n1 == n2 == region.npages
    assert np.array_equal(one, two) and np.array_equal(b1, b2)
    assert int(b1[-1]) == xxhash.xxh3_64_intdigest(b"tail")


def test_writes_tracker_sees_marks_after_start_only() -> None:
    region = Region(bytearray(16 * 512), page_size=512)
    region.write(0, b"before start")
    tracker = make_tracker("writes", region)
    assert isinstance(tracker, WritesTracker)
    tracker.start()
    region.write(512 * 5, b"x")
    region.mark_dirty(512 * 15, 1)
    out = new_bitmap(region.npages)
    assert tracker.collect(out) == 2 and bits_of(out, 16) == [5, 15]
    assert tracker.collect(out) == 0


def test_unknown_tracker() -> None:
    with pytest.raises(ValueError, match="unknown tracker"):
        make_tracker("psychic", Region(bytearray(512), page_size=512))
