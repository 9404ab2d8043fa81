"""The userfaultfd write tracker: sees every write (any thread, NumPy, C), falls back or refuses clearly."""

from __future__ import annotations

import ctypes
import mmap
import threading
from types import ModuleType

import numpy as np
import pytest

import migcore
from migcore import _protocol as P
from migcore import _trackers, _userfault
from migcore._region import new_bitmap
from migcore._trackers import HashTracker, UffdTracker, make_tracker, resolve_tracker

from _live import Receiver, Writer

MIB = 1 << 20
REASON = _userfault.tracker_reason(migcore.Region.allocate(4096))
needs_uffd = pytest.mark.skipif(REASON is not None, reason=f"uffd tracking unavailable: {REASON}")


def bits(bitmap: np.ndarray, n: int) -> np.ndarray:
    """Independent oracle: the set bit indices of a bitmap."""
    return np.flatnonzero(np.unpackbits(bitmap.view(np.uint8), bitorder="little")[:n])


def changed_pages(before: np.ndarray, after: np.ndarray, page_size: int) -> np.ndarray:
    """The snapshot-diff oracle: pages whose bytes differ."""
    n = -(-len(before) // page_size)
    pad = n * page_size - len(before)
    a = np.concatenate([before, np.zeros(pad, np.uint8)]).reshape(n, page_size)
    b = np.concatenate([after, np.zeros(pad, np.uint8)]).reshape(n, page_size)
    return np.flatnonzero((a != b).any(axis=1))


@needs_uffd
@pytest.mark.parametrize("page_size", [4096, 16384])
def test_numpy_writes_from_another_thread_are_never_missed(page_size: int) -> None:
    region = migcore.Region.allocate(8 * MIB + 3000, page_size)  # ragged tail
    arr = region.array()
    tracker = UffdTracker(region)
    tracker.start()
    try:
        out = new_bitmap(region.npages)
        stop = threading.Event()

        def writer() -> None:
            r = np.random.default_rng(2)
            while not stop.is_set():
                offs = r.integers(0, region.nbytes - 8, 50)
                arr[offs] = r.integers(1, 256, 50, dtype=np.uint8)  # NumPy fancy-index writes
                arr[int(offs[0]) : int(offs[0]) + 8] += 1

        t = threading.Thread(target=writer)
        t.start()
        try:
            total = 0
            for _ in range(40):
                tracker.collect(out)  # clear
                first = arr.copy()
                second = arr.copy()
                count = tracker.collect(out)
                # any page that differs between the copies was written after the clear and
                # before this collection: it must be in it
                diff = changed_pages(first, second, page_size)
                got = bits(out, region.npages)
                assert count == len(got)
                missed = np.setdiff1d(diff, got)
                assert missed.size == 0, f"uffd missed pages {missed[:10]}"
                total += len(diff)
            assert total > 0  # the writer really raced the copies
        finally:
            stop.set()
            t.join()
    finally:
        tracker.close()


@needs_uffd
def test_exact_pages_and_writes_from_c() -> None:
    region = migcore.Region.allocate(4 * MIB)
    arr = region.array()
    tracker = make_tracker("uffd", region)
    assert isinstance(tracker, UffdTracker)
    tracker.start()
    try:
        out = new_bitmap(region.npages)
        assert tracker.collect(out) == 0
        base = _userfault.module().address_of(region.view)
        ctypes.memset(base + 7 * 4096 + 100, 0x5A, 3 * 4096)  # pages 7..10 written by C
        np.copyto(arr[500 * 4096 : 501 * 4096], 3)  # NumPy's C loop
        arr[-1] = 1  # the last page
        assert tracker.collect(out) == 6
        assert list(bits(out, region.npages)) == [7, 8, 9, 10, 500, region.npages - 1]
        assert tracker.collect(out) == 0  # re-protected atomically by the scan
        arr[7 * 4096 : 7 * 4096 + 1] = 0x5A  # a write of the same value still counts
        assert tracker.collect(out) == 1
    finally:
        tracker.close()
    # unregistered: plain memory again, and a new tracker may register it
    arr[:] = 9
    again = UffdTracker(region)
    again.start()
    again.close()


@needs_uffd
def test_reads_are_not_writes() -> None:
    region = migcore.Region.allocate(2 * MIB)
    tracker = UffdTracker(region)
    tracker.start()
    try:
        out = new_bitmap(region.npages)
        assert int(region.array().sum()) == 0  # reading never-touched pages maps the zero page
        assert tracker.collect(out) == 0
    finally:
        tracker.close()


def test_bytearray_falls_back_with_auto_and_is_refused_with_uffd() -> None:
    # a bytearray off a page boundary (the allocator may hand out an aligned one, which uffd could watch)
    buf = bytearray(65 * 4096)
    shift = 8 if _userfault.module().address_of(buf) % 4096 == 0 else 0
    region = migcore.Region(memoryview(buf)[shift : shift + 64 * 4096])
    assert resolve_tracker("auto", region) == "hash"
    assert isinstance(make_tracker("auto", region), HashTracker)
    with pytest.raises(ValueError, match="uffd") as info:
        make_tracker("uffd", region)
    assert "bytearray" in str(info.value) or "page" in str(info.value) or "userfaultfd" in str(info.value)
    with pytest.raises(ValueError, match="tracker='uffd'"):
        migcore.migrate(region, "tcp://127.0.0.1:9", tracker="uffd")


def test_small_pages_and_shared_memory_are_refused() -> None:
    small = migcore.Region.allocate(64 * 1024, page_size=1024)
    assert _userfault.region_reason(small) is not None
    assert "page size" in str(_userfault.region_reason(small))
    shared = mmap.mmap(-1, 16 * 4096, flags=mmap.MAP_SHARED | mmap.MAP_ANONYMOUS)
    reason = _userfault.region_reason(migcore.Region(shared))
    assert reason is not None and "shared" in reason
    assert resolve_tracker("auto", migcore.Region(shared)) == "hash"


def test_unsupported_kernel_falls_back_to_hash(monkeypatch: pytest.MonkeyPatch) -> None:
    region = migcore.Region.allocate(16 * 4096)
    monkeypatch.setattr(_userfault, "_probe", lambda: (0, "userfaultfd is not available: simulated"))
    assert resolve_tracker("auto", region) == "hash"
    with pytest.raises(ValueError, match="simulated"):
        make_tracker("uffd", region)
    monkeypatch.setattr(_userfault, "_probe", lambda: (1 << 13, None))  # WP_UNPOPULATED but no WP_ASYNC
    assert "WP_ASYNC" in str(_userfault.kernel_reason(write_tracking=True))
    assert resolve_tracker("auto", region) == "hash"


@needs_uffd
def test_auto_picks_uffd_on_allocated_regions() -> None:
    assert resolve_tracker("auto", migcore.Region.allocate(4096 * 8)) == "uffd"
    assert _trackers.TRACKERS["uffd"] is UffdTracker


@needs_uffd
@pytest.mark.parametrize("mode", ["precopy", "hybrid"])
def test_precopy_with_uffd_and_a_live_writer_is_byte_identical(mode: str) -> None:
    region = migcore.Region.allocate(4 * MIB + 1000)
    region.array()[:] = np.random.default_rng(3).integers(0, 256, region.nbytes, dtype=np.uint8)
    region.array()[100 * 4096 : 300 * 4096] = 0  # zero pages are still not sent
    writer = Writer(region, seed=4).start()
    with migcore.listen("tcp://127.0.0.1:0", timeout=20) as listener:
        rx = Receiver(listener)
        try:
            stats = migcore.migrate(region, listener.address, mode=mode, tracker="uffd", pause=writer.pause,
                                    state=b"s", timeout=20)
        finally:
            writer.stop()
        rx.join()
    assert rx.error is None, rx.error
    assert rx.received is not None and writer.snapshot is not None
    assert bytes(rx.received.region.view) == writer.snapshot
    assert stats.tracker == "uffd" and stats.verified and stats.rounds >= 2
    assert stats.zero_pages >= 150  # the writer may touch a few
    # the tracker let go of the region: it is ordinary memory again
    region.array()[:4096] = 1
    assert resolve_tracker("auto", region) == "uffd"


# -- the wire the no-GIL loop speaks: its C code held against _protocol ---------------------------

needs_module = pytest.mark.skipif(not _userfault.available(), reason="migcore._uffd is not built")
HEADER_EDGES = [  # (flags, count, length)
    (0, 0, 0),
    (P.FLAG_POSTCOPY, 1, 4096),
    (P.FLAG_POSTCOPY | P.FLAG_ZERO, 0xFFFFFFFF, 0),
    (0xFF, 0x01020304, 0x0102030405060708),
    (0x80, 0xFFFFFFFF, (1 << 64) - 1),
    (P.PAGES_FLAGS, 1 << 31, 1 << 63),
]


def loop_module() -> ModuleType:
    return _userfault.module()


def test_the_loop_layout_is_the_protocol_constants() -> None:
    """The one definition the C loop is handed: the protocol's own header, runs, frame numbers and flags."""
    layout = P.LOOP_LAYOUT
    assert layout.header_size == P.HEADER_SIZE == P.HEADER.size
    assert layout.run_size == P.RUN_SIZE
    assert (layout.pages, layout.demand) == (P.Frame.PAGES, P.Frame.DEMAND)
    assert (layout.postcopy, layout.zero) == (P.FLAG_POSTCOPY, P.FLAG_ZERO)


@needs_module
@pytest.mark.parametrize("ftype", list(P.Frame), ids=lambda f: f.name)
@pytest.mark.parametrize(("flags", "count", "length"), HEADER_EDGES)
def test_c_headers_are_the_protocol_s_bytes_for_every_frame_type(
    ftype: P.Frame, flags: int, count: int, length: int
) -> None:
    uffd = loop_module()
    wire = P.encode_header(ftype, flags=flags, count=count, length=length)
    assert uffd.encode_header(ftype, flags, count, length) == wire
    assert uffd.decode_header(wire) == (ftype, flags, 0, count, length)


@needs_module
def test_c_reads_every_header_field_where_the_protocol_puts_it() -> None:
    """Distinct bytes everywhere (the reserved field too): the C reader agrees with ``struct`` on all 16."""
    data = bytes(range(0x11, 0x11 + P.HEADER_SIZE))
    assert loop_module().decode_header(data) == P.HEADER.unpack(data)
    with pytest.raises(ValueError):
        loop_module().decode_header(data[:-1])


@needs_module
@pytest.mark.parametrize(
    "runs",
    [[], [(0, 1)], [(3, 2), (10, 1), (4096, 100)], [(1 << 40, 7), ((1 << 63) + 5, (1 << 64) - 1)]],
    ids=["none", "one", "several", "large"],
)
def test_c_demand_frames_and_runs_tables_are_the_protocol_s(runs: list[tuple[int, int]]) -> None:
    uffd = loop_module()
    table = np.array(runs, dtype=np.uint64).reshape(-1, 2)
    assert uffd.encode_demand(P.LOOP_LAYOUT, table) == P.encode_runs_header(P.Frame.DEMAND, table, 0)
    # the runs table of a PAGES frame, read back the way the loop reads it
    pages = P.encode_runs_header(P.Frame.PAGES, table, 0, flags=P.FLAG_POSTCOPY)[P.HEADER_SIZE :]
    out = np.zeros(2 * len(runs), dtype=np.uint64)
    assert uffd.decode_runs(pages, out) == len(runs)
    assert (out.reshape(-1, 2) == P.decode_runs(pages, len(runs))).all()


@needs_module
@pytest.mark.parametrize("ftype", list(P.Frame), ids=lambda f: f.name)
def test_the_c_loop_stops_at_every_frame_but_pages(ftype: P.Frame) -> None:
    classify = loop_module().classify_header
    header = P.encode_header(ftype, flags=P.FLAG_POSTCOPY, count=1, length=4096)
    assert classify(P.LOOP_LAYOUT, header) == (1 if ftype is P.Frame.PAGES else 0)


@needs_module
def test_the_c_loop_reads_pages_flags_as_the_protocol_defines_them() -> None:
    uffd = loop_module()

    def classify(flags: int, length: int = 0) -> int:
        header = P.encode_header(P.Frame.PAGES, flags=flags, count=1, length=length)
        return int(uffd.classify_header(P.LOOP_LAYOUT, header))

    assert classify(P.FLAG_POSTCOPY, 4096) == 1
    assert classify(P.FLAG_POSTCOPY | P.FLAG_ZERO) == 2
    for flags in (0, P.FLAG_ZERO, P.FLAG_POSTCOPY | P.FLAG_COMPRESSED, P.FLAG_POSTCOPY | P.FLAG_DELTA):
        assert classify(flags, 4096) == -1, flags
    assert classify(P.FLAG_POSTCOPY | P.FLAG_ZERO, 4096) == -7  # a zero notice with a payload
    reserved = bytearray(P.encode_header(P.Frame.PAGES, flags=P.FLAG_POSTCOPY, count=1, length=4096))
    reserved[3] = 1
    assert uffd.classify_header(P.LOOP_LAYOUT, bytes(reserved)) == -1
    assert {1, 7} <= set(uffd.PROTOCOL_DETAILS)


@needs_module
def test_a_frame_number_changed_in_the_layout_is_followed_by_the_c_side() -> None:
    """Change PAGES, DEMAND and FLAG_ZERO in the one definition: the C encoder and reader follow it."""
    uffd = loop_module()
    moved = P.LOOP_LAYOUT._replace(pages=40, demand=41, zero=16)
    runs = np.array([[5, 2], [9, 1]], dtype=np.uint64)
    frame = uffd.encode_demand(moved, runs)
    assert frame[0] == 41
    assert frame[1:] == P.encode_runs_header(P.Frame.DEMAND, runs, 0)[1:]
    assert uffd.decode_header(frame[: P.HEADER_SIZE]) == (41, 0, 0, 2, 2 * P.RUN_SIZE)

    def header(ftype: int, flags: int) -> bytes:
        return bytes([ftype]) + P.encode_header(P.Frame.PAGES, flags=flags, count=1)[1:]

    assert uffd.classify_header(moved, header(40, P.FLAG_POSTCOPY)) == 1
    assert uffd.classify_header(moved, header(40, P.FLAG_POSTCOPY | 16)) == 2
    assert uffd.classify_header(moved, header(40, P.FLAG_POSTCOPY | P.FLAG_ZERO)) == -1
    assert uffd.classify_header(moved, header(int(P.Frame.PAGES), P.FLAG_POSTCOPY)) == 0  # no longer PAGES


@needs_module
@pytest.mark.parametrize(
    "change",
    [{"header_size": 24}, {"run_size": 8}, {"pages": 256}, {"demand": -1}, {"postcopy": 0}, {"zero": P.FLAG_POSTCOPY}],
    ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()),
)
def test_the_c_side_refuses_a_layout_it_does_not_implement(change: dict[str, int]) -> None:
    uffd = loop_module()
    layout = P.LOOP_LAYOUT._replace(**change)
    with pytest.raises(ValueError, match="layout"):
        uffd.encode_demand(layout, np.zeros((1, 2), dtype=np.uint64))
    with pytest.raises(ValueError, match="layout"):
        uffd.classify_header(layout, P.encode_header(P.Frame.PAGES))
    owed, table, info = np.zeros(1, np.uint64), np.zeros(1, np.uint64), np.zeros(uffd.INFO_SIZE, np.uint64)
    with pytest.raises(ValueError, match="layout"):  # refused before any system call
        uffd.serve_postcopy(layout, -1, -1, -1, 0, 4096, 4096, owed, table, info, 1, 4096, 0.0)
