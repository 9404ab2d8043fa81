"""migcore.start(): a migration in the background with live stats, cancel and result; connect_timeout."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

import migcore
from tests._live import Receiver, Writer, random_region


def _wait_until(predicate, seconds: float = 20.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + seconds
    while not predicate():
        assert time.monotonic() < deadline, "condition never held"
        time.sleep(0.005)


def test_a_started_migration_reports_live_stats_and_ends_byte_for_byte() -> None:
    region = random_region(8 << 20, seed=3)
    writer = Writer(region, seed=3).start()
    seen: list[str] = []
    with migcore.listen("tcp://127.0.0.1:0") as listener:
        receiver = Receiver(listener)
        # a slow link so the handle can be watched while pages move
        handle = migcore.start(region, listener.address, pause=writer.pause, bandwidth_limit=40e6, timeout=20)
        _wait_until(lambda: handle.stats is not None and handle.stats.status != "setup" or handle.done())
        live = handle.stats
        assert live is not None
        seen.append(live.status)
        stats = handle.result(30)
        receiver.join()
    assert receiver.error is None, receiver.error
    assert handle.done() and not handle.cancel()  # nothing left to cancel
    assert stats.status == "completed" and handle.stats is stats
    assert seen[0] in ("active", "completed")
    assert live.transferred_bytes <= stats.transferred_bytes
    assert receiver.received is not None
    assert bytes(receiver.received.region.view) == writer.snapshot


def test_cancel_before_the_pause_leaves_the_source_untouched_and_the_destination_discards() -> None:
    region = random_region(32 << 20, seed=5)
    before = bytes(region.view)
    calls: list[str] = []
    with migcore.listen("tcp://127.0.0.1:0") as listener:
        receiver = Receiver(listener)
        handle = migcore.start(
            region, listener.address, mode="precopy", bandwidth_limit=20e6, timeout=20,
            pause=lambda: calls.append("pause"), resume=lambda: calls.append("resume"),
        )
        _wait_until(lambda: handle.stats is not None and handle.stats.transferred_bytes > 1 << 20)
        assert handle.cancel()
        with pytest.raises(migcore.MigrationCancelled):
            handle.result(30)
        receiver.join()
        assert isinstance(receiver.error, migcore.MigrationCancelled)
        assert handle.stats is not None and handle.stats.status == "cancelled"
        assert calls == []  # never paused, so nothing to resume
        assert bytes(region.view) == before
        # the listener serves the next migration as if nothing happened
        receiver = Receiver(listener)
        migcore.migrate(region, listener.address, mode="stopcopy", timeout=20)
        receiver.join()
    assert receiver.error is None and receiver.received is not None
    assert bytes(receiver.received.region.view) == before


def test_cancel_once_paused_is_refused_and_the_migration_finishes() -> None:
    region = random_region(4 << 20, seed=7)
    release = threading.Event()
    handle_box: list[migcore.Migration] = []
    answers: list[bool] = []

    def pause() -> None:  # the program is paused: a cancel now must not bend rule 3
        _wait_until(lambda: bool(handle_box))
        answers.append(handle_box[0].cancel())
        release.set()

    with migcore.listen("tcp://127.0.0.1:0") as listener:
        receiver = Receiver(listener)
        handle = migcore.start(region, listener.address, mode="stopcopy", pause=pause, timeout=20)
        handle_box.append(handle)
        stats = handle.result(30)
        receiver.join()
    assert release.is_set()
    assert stats.status == "completed"
    assert receiver.received is not None and bytes(receiver.received.region.view) == bytes(region.view)
    assert answers == [False]  # asked while paused: refused, and the migration went on


def test_result_times_out_while_running_and_start_checks_options_at_once() -> None:
    with pytest.raises(ValueError, match="streams > 1"):
        migcore.start(bytearray(4096), "tcp://127.0.0.1:9", mode="postcopy", streams=2)
    with pytest.raises(ValueError, match="mode must be one of"):
        migcore.start(bytearray(4096), "tcp://127.0.0.1:9", mode="precpy")  # type: ignore[arg-type]
    region = random_region(16 << 20, seed=9)
    with migcore.listen("tcp://127.0.0.1:0") as listener:
        receiver = Receiver(listener)
        handle = migcore.start(region, listener.address, mode="stopcopy", bandwidth_limit=20e6, timeout=20)
        with pytest.raises(migcore.MigrationTimeout, match="still running"):
            handle.result(0.05)
        assert not handle.done()
        handle.result(60)  # the timeout above changed nothing
        receiver.join()
    assert receiver.received is not None and bytes(receiver.received.region.view) == bytes(region.view)


def test_a_failure_raises_from_result() -> None:
    handle = migcore.start(bytearray(8192), "unix:///nonexistent/migcore.sock", mode="stopcopy")
    with pytest.raises(migcore.PeerLostError, match="could not connect"):
        handle.result(20)
    assert handle.done()


@pytest.mark.parametrize("scheme", ["tcp", "unix"])
def test_connect_timeout_waits_for_a_destination_that_is_not_listening_yet(scheme: str, tmp_path: Path) -> None:
    import socket

    if scheme == "tcp":  # a port nobody listens on yet (bound and released)
        probe = socket.socket()
        probe.bind(("127.0.0.1", 0))
        address = f"tcp://127.0.0.1:{probe.getsockname()[1]}"
        probe.close()
    else:
        address = f"unix://{tmp_path / 'later.sock'}"
    region = random_region(1 << 20, seed=11)
    with pytest.raises(migcore.PeerLostError, match="could not connect"):
        migcore.migrate(region, address, mode="stopcopy")  # no waiting by default
    with pytest.raises(migcore.PeerLostError, match=r"waited 0.3 s"):
        migcore.migrate(region, address, mode="stopcopy", connect_timeout=0.3)
    out: dict[str, migcore.Received] = {}

    def late_destination() -> None:
        time.sleep(0.4)
        with migcore.listen(address) as listener:
            out["received"] = listener.receive(timeout=20)

    thread = threading.Thread(target=late_destination, daemon=True)
    thread.start()
    stats = migcore.migrate(region, address, mode="stopcopy", connect_timeout=20)
    thread.join(20)
    assert stats.status == "completed"
    assert bytes(out["received"].region.view) == bytes(region.view)


def test_connect_timeout_is_refused_for_shared_storage(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="connect_timeout"):
        migcore.migrate(bytearray(4096), f"file://{tmp_path / 'img'}", mode="stopcopy", connect_timeout=1)
    assert not (tmp_path / "img").exists()


@pytest.mark.parametrize(
    "mode,options",
    [("stopcopy", {}), ("precopy", {"compress": "zstd"}), ("precopy", {"streams": 2}), ("postcopy", {}),
     ("hybrid", {"delta": True})],
)
def test_both_ends_tell_the_same_story(mode: str, options: dict[str, object]) -> None:
    region = random_region(4 << 20, seed=13)
    writer = Writer(region, seed=13).start()
    with migcore.listen("tcp://127.0.0.1:0") as listener:
        receiver = Receiver(listener)
        sent = migcore.migrate(region, listener.address, mode=mode, pause=writer.pause, state=b"s" * 99,
                               timeout=20, **options)  # type: ignore[arg-type]
        receiver.join()
    assert receiver.error is None and receiver.received is not None
    got = receiver.received.stats
    shared = ("mode", "tracker", "migration_id", "page_size", "total_bytes", "rounds", "pages_per_round",
              "state_bytes", "compress", "streams", "status", "verified")
    assert {f: getattr(got, f) for f in shared} == {f: getattr(sent, f) for f in shared}
    assert got.rounds >= 1 and got.status == "completed"
    assert bytes(receiver.received.region.view) == writer.snapshot
