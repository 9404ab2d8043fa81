"""End-to-end migrations over loopback: every mode and tracker with a live writer, convergence, handshake refusals."""

from __future__ import annotations

import socket
import threading
from typing import Any

import numpy as np
import pytest
import xxhash

import migcore
from migcore import _protocol as P
from migcore._trackers import runs_to_pages

from _live import GuardedAllocations, Receiver, Writer, random_region

MIB = 1 << 20
MODES = ["stopcopy", "precopy", "postcopy", "hybrid"]


def run_migration(region: migcore.Region, *, writer: Writer | None = None, listen_kw: dict[str, Any] | None = None,
                  **kw: Any) -> tuple[migcore.MigrationStats, Receiver]:
    with migcore.listen("tcp://127.0.0.1:0", timeout=20, **(listen_kw or {})) as listener:
        rx = Receiver(listener)
        try:
            if writer is not None:
                kw.setdefault("pause", writer.pause)
            stats = migcore.migrate(region, listener.address, timeout=20, **kw)
        finally:
            if writer is not None:
                writer.stop()
        rx.join()
    return stats, rx


def check_identical(rx: Receiver, expected: bytes, state: bytes) -> None:
    assert rx.error is None, rx.error
    assert rx.received is not None
    got = rx.received.region
    assert got.nbytes == len(expected)
    assert bytes(got.view) == expected
    assert rx.received.state == state
    assert rx.received.stats.verified


@pytest.mark.parametrize("tracker", ["hash", "writes"])
@pytest.mark.parametrize("mode", MODES)
def test_every_mode_with_a_live_writer(mode: str, tracker: str) -> None:
    region = random_region(4 * MIB + 1000, seed=1)  # partial last page
    writer = Writer(region, seed=2).start()
    seen: list[migcore.MigrationStats] = []
    stats, rx = run_migration(
        region, writer=writer, mode=mode, tracker=tracker, state=lambda: b"state-after-pause", progress=seen.append
    )
    assert writer.paused and writer.snapshot is not None
    check_identical(rx, writer.snapshot, b"state-after-pause")
    assert stats.status == "completed" and stats.verified
    assert stats.mode == mode and stats.tracker == tracker
    assert stats.rounds >= 1
    assert stats.transferred_bytes >= stats.normal_bytes > 0
    assert stats.downtime > 0
    assert stats.remaining_bytes == 0
    assert stats.total_bytes == region.nbytes
    assert stats.total_time >= stats.downtime
    assert stats.normal_pages >= region.npages - stats.zero_pages - 1
    assert seen and seen[-1].status == "completed"
    if mode in ("precopy", "hybrid"):
        assert stats.rounds >= 2 and len(stats.pages_per_round) == stats.rounds


def test_numpy_source_with_state_bytes() -> None:
    rng = np.random.default_rng(5)
    arr = rng.standard_normal((300, 1000)).astype(np.float64)  # 2.4 MB, not page aligned
    expected = arr.tobytes()
    stats, rx = run_migration(migcore.Region(arr), mode="precopy", state=b"\x00\x01bookkeeping")
    check_identical(rx, expected, b"\x00\x01bookkeeping")
    assert rx.received is not None
    back = np.frombuffer(rx.received.region.view, dtype=np.float64).reshape(300, 1000)
    assert np.array_equal(back, arr)
    assert stats.rounds >= 2


def test_bytearray_source_unwrapped_and_unix_socket(tmp_path: Any) -> None:
    buf = bytearray(b"migcore!" * 70000)  # 560000 bytes, ragged tail
    path = tmp_path / "dst.sock"
    with migcore.listen(f"unix://{path}", timeout=20) as listener:
        assert listener.address == f"unix://{path}"
        rx = Receiver(listener)
        stats = migcore.migrate(buf, listener.address, mode="stopcopy", timeout=20)
        rx.join()
    check_identical(rx, bytes(buf), b"")
    assert stats.status == "completed"
    assert not path.exists()


@pytest.mark.parametrize("mode", MODES)
def test_all_zero_region_sends_no_pages(mode: str) -> None:
    region = migcore.Region(bytearray(8 * MIB + 123))
    stats, rx = run_migration(region, mode=mode, state=b"z")
    check_identical(rx, bytes(region.nbytes), b"z")
    assert stats.normal_pages == 0 and stats.normal_bytes == 0
    assert stats.zero_pages == region.npages
    assert stats.transferred_bytes < 4096 + 1024  # handshake, a few headers and bitmaps, the state


def test_a_few_nonzero_pages_send_only_those() -> None:
    region = migcore.Region(bytearray(4 * MIB))
    arr = region.array()
    for p in (0, 7, 500, 1023):
        arr[p * 4096 + 3] = p % 251 + 1
    stats, rx = run_migration(region, mode="precopy")
    check_identical(rx, bytes(region.view), b"")
    assert stats.normal_pages == 4
    assert stats.zero_pages == region.npages - 4


def test_progress_is_reported_per_round_and_stats_are_sane() -> None:
    region = random_region(3 * MIB, seed=9)
    seen: list[migcore.MigrationStats] = []
    stats, rx = run_migration(region, mode="precopy", progress=seen.append)
    check_identical(rx, bytes(region.view), b"")
    statuses = [s.status for s in seen]
    assert statuses[0] == "active" and statuses[-1] == "completed"
    assert len(seen) >= stats.rounds
    assert all(isinstance(s, migcore.MigrationStats) for s in seen)
    assert stats.mbps > 0 and stats.setup_time > 0
    assert stats.migration_id and rx.received is not None and rx.received.migration_id == stats.migration_id
    with pytest.raises(AttributeError):
        stats.status = "x"  # type: ignore[misc]


def test_postcopy_ensure_fetches_pages_on_demand() -> None:
    region = random_region(6 * MIB, seed=4, zero_fraction=0.0)
    expected = bytes(region.view)
    ps = region.page_size
    checks: list[bool] = []

    def touch(received: migcore.Received) -> None:
        # ask for pages far from where the background push starts, in a few places
        for off in (region.nbytes - 3 * ps - 17, region.nbytes // 2 + 5, 3 * MIB + 1, 100):
            received.ensure(off, 2 * ps)
            checks.append(bytes(received.region.view[off : off + 2 * ps]) == expected[off : off + 2 * ps])

    with migcore.listen("tcp://127.0.0.1:0", timeout=20) as listener:
        rx = Receiver(listener, then=touch)
        stats = migcore.migrate(region, listener.address, mode="postcopy", state=b"s", timeout=20)
        rx.join()
    check_identical(rx, expected, b"s")
    assert checks == [True] * 4
    assert rx.received is not None and rx.received.missing_pages == 0
    assert stats.postcopy_pages == stats.normal_pages == region.npages
    assert stats.normal_pages == region.npages  # every owed page exactly once


# -- rule 1: the delta is taken against what the destination acknowledged ---------------


def fake_destination(server: socket.socket, lie_about: int, sent_log: list[list[int]]) -> None:
    """A scripted destination that acks round 0 with a wrong hash for page ``lie_about``.

    It records, per PAGES frame, the pages it was sent. A correct source must
    resend that page later: its baseline is what the destination says it
    stored, not what the source meant to send.
    """
    conn, _ = server.accept()
    with conn:
        f = conn.makefile("rb")

        def read(n: int) -> bytes:
            data = f.read(n)
            assert len(data) == n
            return data

        h = P.decode_header(read(P.HEADER_SIZE))
        hello = P.decode_hello(read(h.length))
        conn.sendall(P.encode_accept(P.Accept(1 << 20, 1 << 20, 256, P.SUPPORTED_FEATURES)))
        rnd_runs: list[np.ndarray] = []
        payload: dict[int, bytes] = {}
        while True:
            h = P.decode_header(read(P.HEADER_SIZE))
            if h.type is P.Frame.PAGES:
                runs = P.decode_runs(read(h.count * 16), h.count)
                data = read(h.length)
                pages = runs_to_pages(runs).tolist()
                sent_log.append(pages)
                for i, p in enumerate(pages):
                    payload[p] = data[i * hello.page_size : (i + 1) * hello.page_size]
                rnd_runs.append(runs)
            elif h.type is P.Frame.ROUND_END:
                pages = runs_to_pages(np.concatenate(rnd_runs)).tolist() if rnd_runs else []
                hashes = [xxhash.xxh3_64_intdigest(payload[p]) for p in pages]
                if h.count == 0:
                    hashes[pages.index(lie_about)] = xxhash.xxh3_64_intdigest(b"something else")
                body = np.array(hashes, dtype="<u8").tobytes()
                conn.sendall(P.encode_header(P.Frame.ACK, count=h.count, length=len(body)) + body)
                rnd_runs = []
            elif h.type is P.Frame.STATE:
                read(h.length)
            elif h.type is P.Frame.COMPLETE:
                read(h.length)
                conn.sendall(P.encode_header(P.Frame.DONE))
                return


@pytest.mark.parametrize("tracker", ["hash", "writes"])
def test_source_compares_with_the_destinations_ack_not_with_what_it_sent(tracker: str) -> None:
    region = random_region(1 * MIB, seed=3, zero_fraction=0.0)  # static: nothing changes on the source
    server = socket.create_server(("127.0.0.1", 0))
    sent: list[list[int]] = []
    t = threading.Thread(target=fake_destination, args=(server, 42, sent), daemon=True)
    t.start()
    try:
        stats = migcore.migrate(region, f"tcp://127.0.0.1:{server.getsockname()[1]}", mode="precopy",
                                tracker=tracker, timeout=10)
    finally:
        t.join(10)
        server.close()
    assert stats.status == "completed"
    first_round = sorted(p for frame in sent[:1] for p in frame)
    later = [p for frame in sent[1:] for p in frame]
    assert 42 in sum(sent, [])
    # page 42 went out in round 0 and again afterwards, and nothing else was resent
    assert later == [42], (first_round[:5], later)


def test_flipping_pages_end_identical_under_precopy() -> None:
    """Pages flipping A/B/A while they are sent: the destination ends with the content at the pause."""
    region = random_region(2 * MIB, seed=8)
    writer = Writer(region, seed=8, random_pages=0, flip_pages=64, delay=0.0).start()
    stats, rx = run_migration(region, writer=writer, mode="precopy", downtime_limit=0.0, max_rounds=6)
    assert writer.snapshot is not None
    check_identical(rx, writer.snapshot, b"")
    assert stats.rounds >= 2


# -- convergence -----------------------------------------------------------------------


def stalling_writer(region: migcore.Region, **kw: Any) -> Writer:
    """Rewrites the same 300 pages from every progress report: the dirty set never shrinks.

    Driving the writes from the source's own progress callback (called at
    the start of every round and after every dirty sync) and tracking them
    with the "writes" tracker makes the stall deterministic on a busy machine.
    """
    return Writer(region, seed=11, random_pages=0, flip_pages=0, hot=300, **kw)


def test_stall_finish_pauses_anyway() -> None:
    region = random_region(4 * MIB, seed=12)
    writer = stalling_writer(region)
    stats, rx = run_migration(region, writer=writer, mode="precopy", downtime_limit=0.0, max_rounds=20, tracker="writes",
                              on_stall="finish", progress=writer.on_progress)
    assert writer.snapshot is not None
    check_identical(rx, writer.snapshot, b"")
    assert 2 <= stats.rounds <= 21


@pytest.mark.parametrize(("mode", "on_stall"), [("hybrid", None), ("precopy", "postcopy")])
def test_stall_postcopy_switches_to_postcopy(mode: str, on_stall: str | None) -> None:
    region = random_region(4 * MIB, seed=13)
    writer = stalling_writer(region)
    stats, rx = run_migration(region, writer=writer, mode=mode, downtime_limit=0.0, max_rounds=8, tracker="writes",
                              on_stall=on_stall, progress=writer.on_progress)
    assert writer.snapshot is not None
    check_identical(rx, writer.snapshot, b"")
    assert stats.postcopy_pages > 0  # the hot pages dirtied after the last round went post-copy


def test_stall_throttle_raises_levels_then_resets() -> None:
    region = random_region(4 * MIB, seed=14)
    writer = stalling_writer(region)
    stats, rx = run_migration(region, writer=writer, mode="precopy", downtime_limit=0.0, max_rounds=12, tracker="writes",
                              on_stall="throttle", throttle=writer.throttle,
                              progress=writer.on_progress)
    assert writer.snapshot is not None
    check_identical(rx, writer.snapshot, b"")
    levels = writer.throttle_levels
    assert levels[0] == 20 and levels[-1] == 0, levels
    assert levels[:-1] == sorted(levels[:-1]) and len(set(levels[:-1])) == len(levels) - 1
    assert stats.throttle_percentage == 0


def test_stall_cancel_leaves_the_source_untouched() -> None:
    region = random_region(4 * MIB, seed=15)
    shadow = region.array().copy()
    writer = stalling_writer(region, shadow=shadow)
    paused: list[bool] = []
    with migcore.listen("tcp://127.0.0.1:0", timeout=20) as listener:
        rx = Receiver(listener)
        try:
            with pytest.raises(migcore.MigrationCancelled):
                migcore.migrate(region, listener.address, mode="precopy", downtime_limit=0.0, max_rounds=30, tracker="writes",
                                on_stall="cancel", pause=lambda: paused.append(True),
                                resume=lambda: paused.append(False), timeout=20,
                                progress=writer.on_progress)
        finally:
            writer.stop()
        rx.join()
    assert paused == []
    assert np.array_equal(region.array(), shadow)
    assert isinstance(rx.error, migcore.MigrationCancelled)


# -- handshake refusals ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("listen_kw", "migrate_kw", "field"),
    [
        ({"compat": "app-2.0"}, {"compat": "app-1.0"}, "compat"),
        ({"compat": "app-2.0"}, {}, "compat"),
        ({"page_size": 8192}, {}, "page_size"),
        ({"max_bytes": 1 * MIB}, {}, "nbytes"),
        ({"max_state_bytes": 10}, {"state": b"x" * 11}, "state_size"),
    ],
)
def test_refused_handshake_raises_on_both_sides(
    monkeypatch: pytest.MonkeyPatch, listen_kw: dict[str, Any], migrate_kw: dict[str, Any], field: str
) -> None:
    allocs = GuardedAllocations().install(monkeypatch)
    region = random_region(2 * MIB, seed=16)
    before = bytes(region.view)
    with migcore.listen("tcp://127.0.0.1:0", timeout=20, **listen_kw) as listener:
        rx = Receiver(listener)
        with pytest.raises(migcore.CompatibilityError) as info:
            migcore.migrate(region, listener.address, mode="precopy", timeout=20, **migrate_kw)
        rx.join()
        assert info.value.field == field and field.split("_")[0] in str(info.value)
        assert isinstance(rx.error, migcore.CompatibilityError) and rx.error.field == field
        assert allocs.sizes == []  # refused before anything was allocated
        assert bytes(region.view) == before
        # the listener serves the next (compatible) source
        rx = Receiver(listener)
        ok_kw = {k: v for k, v in migrate_kw.items() if k != "state"}
        ok_kw["compat"] = listen_kw.get("compat")
        small = migcore.Region(bytearray(b"ok" * 300000), listen_kw.get("page_size", 4096))
        migcore.migrate(small, listener.address, timeout=20, **ok_kw)
        rx.join()
        check_identical(rx, bytes(small.view), b"")


def test_refused_protocol_version_names_it(monkeypatch: pytest.MonkeyPatch) -> None:
    allocs = GuardedAllocations().install(monkeypatch)
    with migcore.listen("tcp://127.0.0.1:0", timeout=20) as listener:
        rx = Receiver(listener)
        hello = P.Hello(P.PROTOCOL_VERSION, 4096, 4096, "precopy", "hash", 0, None, b"\0" * 16)
        frame = bytearray(P.encode_hello(hello))
        frame[P.HEADER_SIZE + 4 : P.HEADER_SIZE + 6] = (99).to_bytes(2, "little")
        port = int(listener.address.rsplit(":", 1)[1])
        with socket.create_connection(("127.0.0.1", port)) as s:
            s.sendall(frame)
            f = s.makefile("rb")
            h = P.decode_header(f.read(P.HEADER_SIZE))
            assert h.type is P.Frame.REFUSE
            err = P.decode_refuse(f.read(h.length))
            f.close()
        rx.join()
    assert err.field == "version" and "99" in str(err)
    assert isinstance(rx.error, migcore.CompatibilityError) and rx.error.field == "version"
    assert allocs.sizes == []


def test_argument_mistakes_are_value_and_type_errors() -> None:
    buf = bytearray(4096)
    with pytest.raises(ValueError, match="mode"):
        migcore.migrate(buf, "tcp://127.0.0.1:1", mode="teleport")
    with pytest.raises(ValueError, match="tracker"):
        migcore.migrate(buf, "tcp://127.0.0.1:1", tracker="nope")
    with pytest.raises(ValueError, match="on_stall"):
        migcore.migrate(buf, "tcp://127.0.0.1:1", on_stall="panic")
    with pytest.raises(ValueError, match="throttle"):
        migcore.migrate(buf, "tcp://127.0.0.1:1", on_stall="throttle")
    with pytest.raises(TypeError):
        migcore.migrate(buf, "tcp://127.0.0.1:1", state=12)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="scheme"):
        migcore.migrate(buf, "127.0.0.1:1")
    with pytest.raises(ValueError, match="timeout"):
        migcore.listen("tcp://127.0.0.1:0", timeout=-1)


def test_connect_to_nobody_is_a_peer_lost_error() -> None:
    s = socket.create_server(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    with pytest.raises(migcore.PeerLostError, match="could not connect"):
        migcore.migrate(bytearray(4096), f"tcp://127.0.0.1:{port}", timeout=5)


def test_public_api_names() -> None:
    assert set(migcore.__all__) >= {
        "migrate", "listen", "Listener", "Received", "Region", "MigrationStats", "MigrationError",
        "ProtocolError", "CompatibilityError", "AuthenticationError", "PeerLostError",
    }
    assert issubclass(migcore.MigrationTimeout, TimeoutError)
    for name in migcore.__all__:
        obj = getattr(migcore, name)
        if isinstance(obj, type) and issubclass(obj, Exception):
            assert issubclass(obj, migcore.MigrationError)
    assert migcore.__version__


def test_stats_recorder_holds_every_field_of_the_snapshot() -> None:
    """The recorder and the frozen snapshot share one field list: a field added to one only fails here."""
    import dataclasses

    from migcore._stats import MigrationStats, StatsRecorder

    rec = StatsRecorder(mode="precopy", tracker="hash", migration_id="ab", page_size=4096, total_bytes=8192)
    for f in dataclasses.fields(MigrationStats):
        if f.name not in ("total_time", "mbps"):  # computed at the snapshot
            assert hasattr(rec, f.name), f.name
    rec.rounds = 3
    rec.pages_per_round.extend([2, 1, 0])
    rec.add_pages(2, 8192, 8300)
    snap = rec.snapshot()
    assert snap.rounds == 3 and snap.pages_per_round == (2, 1, 0) and snap.transferred_bytes == 8300
    assert snap.total_bytes == 8192 and snap.remaining_bytes == 8192 and snap.mode == "precopy"
    assert snap.total_time > 0 and snap.mbps == pytest.approx(8300 * 8 / 1e6 / snap.total_time)
