"""The live writer used by the demo, the tests and the benchmarks: patterns, pause, marks, bounds."""

from __future__ import annotations

import math
import time
from collections.abc import Callable

import numpy as np
import pytest

from migcore import Region
from migcore.bench.workload import FLIP_MASK, Workload, fill, touch

PS = 4096


def changed_pages(before: np.ndarray, region: Region) -> np.ndarray:
    """Indices of the pages whose bytes differ from ``before`` (an earlier copy of the region)."""
    diff = before != region.array()
    pad = (-diff.size) % region.page_size
    diff = np.concatenate([diff, np.zeros(pad, dtype=bool)])
    return np.flatnonzero(diff.reshape(-1, region.page_size).any(axis=1))


def marked_pages(region: Region) -> np.ndarray:
    bitmap = np.zeros((region.npages + 63) // 64, dtype=np.uint64)
    region.take_written(bitmap)
    bits = np.unpackbits(bitmap.view(np.uint8), bitorder="little")[: region.npages]
    return np.flatnonzero(bits)


def wait_until(cond: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.002)


def random_region(npages: int, tail: int = 0, seed: int = 1) -> Region:
    data = np.random.default_rng(seed).integers(0, 256, npages * PS + tail, dtype=np.uint8)
    return Region(data, PS)


# ---- patterns ------------------------------------------------------------------------------


def test_hotset_writes_only_hot_pages() -> None:
    region = Region(bytearray(200 * PS), PS)
    w = Workload(region, pattern="hotset", hotset_fraction=0.1, seed=3, batch_pages=8)
    assert len(w.hot_pages) == 20
    for _ in range(50):
        w.step()
    written = changed_pages(np.zeros(region.nbytes, np.uint8), region)
    assert len(written) > 0
    assert set(written) <= set(w.hot_pages.tolist())
    assert w.stats.distinct_pages == len(written)


def test_sequential_wraps_in_order() -> None:
    region = Region(bytearray(20 * PS), PS)
    w = Workload(region, pattern="sequential", batch_pages=7)
    assert w.step().tolist() == list(range(0, 7))
    assert w.step().tolist() == list(range(7, 14))
    assert w.step().tolist() == [0, *range(14, 20)]  # 14..19 then wraps to 0, sorted
    assert w.step().tolist() == list(range(1, 8))


def test_uniform_covers_the_region() -> None:
    region = Region(bytearray(64 * PS), PS)
    w = Workload(region, pattern="uniform", batch_pages=16, seed=5)
    for _ in range(40):
        w.step()
    assert len(changed_pages(np.zeros(region.nbytes, np.uint8), region)) == 64


def test_seed_determines_the_pages() -> None:
    def sequence(seed: int, pattern: str) -> list[list[int]]:
        w = Workload(Region(bytearray(300 * PS), PS), pattern=pattern, seed=seed, batch_pages=10)
        return [w.step().tolist() for _ in range(20)]

    for pattern in ("uniform", "hotset"):
        assert sequence(7, pattern) == sequence(7, pattern)
        assert sequence(7, pattern) != sequence(8, pattern)


def test_same_seed_same_bytes() -> None:
    a, b = Region(bytearray(50 * PS + 100), PS), Region(bytearray(50 * PS + 100), PS)
    for region in (a, b):
        w = Workload(region, seed=11, batch_pages=9, write_bytes=64)
        for _ in range(30):
            w.step()
    assert bytes(a.view) == bytes(b.view)


# ---- marks and bounds ------------------------------------------------------------------------


@pytest.mark.parametrize("pattern", ["uniform", "hotset", "sequential"])
@pytest.mark.parametrize("flipflop", [False, True])
def test_marks_match_the_pages_changed(pattern: str, flipflop: bool) -> None:
    region = random_region(100, tail=1000)
    marked_pages(region)  # clear
    w = Workload(region, pattern=pattern, seed=2, batch_pages=13, flipflop=flipflop)
    before = region.array().copy()
    w.step()
    w.step()
    marked = marked_pages(region)
    changed = changed_pages(before, region)
    # flip-flop may toggle a page back within the two steps: changed is then a strict subset
    assert set(changed) <= set(marked)
    if not flipflop:
        assert changed.tolist() == marked.tolist()


def test_mark_false_reports_nothing() -> None:
    region = random_region(10)
    marked_pages(region)
    w = Workload(region, mark=False, batch_pages=5)
    w.step()
    assert marked_pages(region).size == 0


@pytest.mark.parametrize("tail", [1, 3, 8, 13, 4095])
@pytest.mark.parametrize("flipflop", [False, True])
def test_partial_last_page_never_written_past_the_end(tail: int, flipflop: bool) -> None:
    npages = 4
    backing = np.zeros(npages * PS + tail + 4096, dtype=np.uint8)
    backing[npages * PS + tail :] = 0x5A  # guard bytes after the region
    region = Region(backing[: npages * PS + tail], PS)
    w = Workload(region, pattern="sequential", batch_pages=region.npages, flipflop=flipflop, write_bytes=PS)
    w.step()
    assert (backing[npages * PS + tail :] == 0x5A).all()
    assert backing[npages * PS : npages * PS + tail].any(), "the partial last page was not written"
    assert set(changed_pages(np.zeros(region.nbytes, np.uint8), region)) == set(range(region.npages))


def test_flipflop_alternates_between_two_contents() -> None:
    region = random_region(8, tail=5)
    original = bytes(region.view)
    pages = np.arange(region.npages)
    touch(region, pages, flipflop=True)
    once = bytes(region.view)
    assert once != original
    assert changed_pages(np.frombuffer(original, np.uint8), region).tolist() == pages.tolist()
    touch(region, pages, flipflop=True)
    assert bytes(region.view) == original  # A -> B -> A
    touch(region, pages, flipflop=True)
    assert bytes(region.view) == once
    assert region.array()[:8].view(np.uint64)[0] == np.frombuffer(original[:8], np.uint64)[0] ^ FLIP_MASK


def test_generations_change_pages_every_time() -> None:
    region = Region(bytearray(4 * PS), PS)
    seen = set()
    for gen in range(1, 6):
        touch(region, np.arange(4), generation=gen, write_bytes=16)
        seen.add(bytes(region.view))
    assert len(seen) == 5


def test_write_bytes_controls_how_much_changes() -> None:
    region = Region(bytearray(4 * PS), PS)
    touch(region, np.array([1]), write_bytes=256)
    nz = np.flatnonzero(region.array())
    assert nz.min() >= PS and nz.max() < PS + 256


def test_works_on_a_plain_buffer() -> None:
    buf = bytearray(10 * PS)
    w = Workload(buf, batch_pages=3, page_size=PS)
    w.step()
    assert any(buf)


# ---- the background thread ------------------------------------------------------------------


def test_pause_stops_writes_and_resume_restarts_them() -> None:
    region = Region(bytearray(256 * PS), PS)
    with Workload(region, dirty_rate=None, seed=1) as w:
        wait_until(lambda: w.stats.pages_written > 0)
        w.pause()
        assert w.paused
        snap = bytes(region.view)
        count = w.stats.pages_written
        time.sleep(0.05)
        assert bytes(region.view) == snap
        assert w.stats.pages_written == count
        w.pause()  # idempotent
        w.resume()
        wait_until(lambda: w.stats.pages_written > count)
        wait_until(lambda: bytes(region.view) != snap)
    # stopped: nothing more is written
    snap = bytes(region.view)
    time.sleep(0.02)
    assert bytes(region.view) == snap


def test_pause_waits_for_the_batch_in_flight() -> None:
    # big batches of whole-page writes make it likely that pause() lands mid-batch
    region = Region(bytearray(4096 * PS), PS)
    with Workload(region, dirty_rate=None, write_bytes=PS, batch_pages=4096) as w:
        for _ in range(20):
            wait_until(lambda: w.stats.batches > 0)
            w.pause()
            snap = region.array().copy()
            time.sleep(0.005)
            assert np.array_equal(snap, region.array())
            w.resume()


def test_marks_cover_every_write_of_the_thread() -> None:
    region = random_region(128)
    marked_pages(region)
    before = region.array().copy()
    with Workload(region, dirty_rate=None, seed=4) as w:
        wait_until(lambda: w.stats.batches >= 5)
        w.pause()
        changed = changed_pages(before, region)
        assert set(changed) <= set(marked_pages(region))


def test_idle_rate_writes_nothing() -> None:
    region = Region(bytearray(16 * PS), PS)
    with Workload(region, dirty_rate=0) as w:
        time.sleep(0.05)
        assert w.stats.pages_written == 0
    assert not any(region.view)


def test_rate_is_an_upper_bound() -> None:
    region = Region(bytearray(1000 * PS), PS)
    rate = 200 * PS  # 200 pages per second
    w = Workload(region, dirty_rate=rate, seed=1)
    assert w.batch_pages == 2
    start = time.monotonic()
    with w:
        wait_until(lambda: w.stats.pages_written > 0)
        time.sleep(0.2)
    elapsed = time.monotonic() - start
    # loose sanity only: never faster than 3x the rate, plus one batch
    assert 0 < w.stats.pages_written <= 200 * elapsed * 3 + w.batch_pages


def test_throttle_scales_the_target_rate() -> None:
    region = Region(bytearray(100 * PS), PS)
    w = Workload(region, dirty_rate=1000 * PS)
    assert w.target_rate == 1000 * PS
    w.throttle(30)
    assert w.target_rate == pytest.approx(700 * PS)
    assert w.stats.throttle_level == 30
    w.throttle(150)
    assert w.stats.throttle_level == 99
    w.throttle(0)
    assert w.target_rate == 1000 * PS


def test_throttle_of_an_unbounded_writer_slows_it() -> None:
    region = Region(bytearray(256 * PS), PS)
    with Workload(region, dirty_rate=math.inf) as w:
        wait_until(lambda: w.stats.pages_written > 1000)
        w.throttle(50)
        assert math.isfinite(w.target_rate) and w.target_rate > 0
        w.throttle(99)
        before = w.stats.pages_written
        time.sleep(0.05)
        assert w.stats.pages_written >= before  # still running, just slower


def test_start_twice_is_an_error() -> None:
    w = Workload(Region(bytearray(PS), PS), dirty_rate=0)
    with w:
        with pytest.raises(RuntimeError):
            w.start()


def test_writer_errors_surface_in_stop() -> None:
    region = Region(bytearray(8 * PS), PS)
    w = Workload(region, dirty_rate=None)

    def broken() -> np.ndarray:
        raise OSError("boom")

    w._choose = broken  # type: ignore[method-assign]
    w.start()
    wait_until(lambda: w.error is not None)
    with pytest.raises(RuntimeError, match="writer failed"):
        w.stop()


@pytest.mark.parametrize(
    "kwargs",
    [
        {"dirty_rate": -1},
        {"dirty_rate": math.nan},
        {"pattern": "random"},
        {"hotset_fraction": 0},
        {"hotset_fraction": 1.5},
        {"write_bytes": 12},
        {"write_bytes": 2 * PS},
    ],
)
def test_bad_options(kwargs: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        Workload(Region(bytearray(4 * PS), PS), **kwargs)  # type: ignore[arg-type]


# ---- fill -----------------------------------------------------------------------------------


def test_fill_makes_the_requested_share_random() -> None:
    region = Region(bytearray(100 * PS + 10), PS)
    region.array()[:] = 7
    pages = fill(region, random_fraction=0.3, seed=9)
    assert len(pages) == 30
    nonzero = changed_pages(np.zeros(region.nbytes, np.uint8), region)
    assert nonzero.tolist() == pages.tolist()
    other = Region(bytearray(100 * PS + 10), PS)
    fill(other, random_fraction=0.3, seed=9)
    assert bytes(other.view) == bytes(region.view)
    fill(other, random_fraction=0.3, seed=10)
    assert bytes(other.view) != bytes(region.view)


@pytest.mark.parametrize("fraction", [0.0, 1.0])
def test_fill_extremes(fraction: float) -> None:
    region = Region(bytearray(10 * PS + 3), PS)
    fill(region, random_fraction=fraction, seed=1)
    nonzero = changed_pages(np.zeros(region.nbytes, np.uint8), region)
    assert len(nonzero) == round(fraction * region.npages)


@pytest.mark.parametrize("write_zeros", [False, True])
def test_fill_of_an_allocated_region_zeroes_what_was_there(write_zeros: bool) -> None:
    """Old bytes go either way; only whether the zero pages hold memory differs (checked in test_residency)."""
    region = Region.allocate(64 * PS + 100, PS)
    region.array()[:] = 9
    pages = fill(region, random_fraction=0.25, seed=3, write_zeros=write_zeros)
    nonzero = changed_pages(np.zeros(region.nbytes, np.uint8), region)
    assert nonzero.tolist() == pages.tolist()
    reference = Region(bytearray(64 * PS + 100), PS)
    fill(reference, random_fraction=0.25, seed=3)
    assert bytes(reference.view) == bytes(region.view)


def test_pages_pool_rewritten_whole_every_batch() -> None:
    region = Region(bytearray(32 * PS), PS)
    pool = np.array([3, 9, 17, 30])
    w = Workload(region, pattern="sequential", pages=pool, batch_pages=len(pool), mark=False)
    for _ in range(3):
        assert w.step().tolist() == pool.tolist()
    assert w.hot_pages.tolist() == pool.tolist()
    with pytest.raises(ValueError, match="pages must be"):
        Workload(region, pages=[32])


@pytest.mark.parametrize("flipflop", [False, True])
def test_shadow_stays_a_copy_of_the_region(flipflop: bool) -> None:
    region = Region(bytearray(16 * PS + 100), PS)  # partial last page
    fill(region, random_fraction=0.5, seed=1)
    shadow = region.array().copy()
    w = Workload(region, batch_pages=5, flipflop=flipflop, write_bytes=64, shadow=shadow, mark=False)
    for _ in range(20):
        w.step()
    assert np.array_equal(region.array(), shadow)
    with pytest.raises(ValueError, match="shadow"):
        Workload(region, shadow=bytearray(PS))
