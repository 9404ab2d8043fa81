"""Parallel page streams: exact with a live writer, per-round sync, stream failures, refusals."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest

import migcore
from migcore import _protocol as P
from migcore import _streams

from _modes import MIB, migrate_live


@pytest.mark.parametrize("streams", [2, 4])
@pytest.mark.parametrize("mode", ["precopy", "stopcopy", "hybrid"])
def test_streams_are_exact_with_a_live_writer(streams: int, mode: str) -> None:
    seen: set[str] = set()
    real = _streams.StreamSenders.submit

    def spy(self: _streams.StreamSenders, runs: np.ndarray, phase: str) -> None:
        seen.add(threading.current_thread().name)
        real(self, runs, phase)

    mp = pytest.MonkeyPatch()
    mp.setattr(_streams.StreamSenders, "submit", spy)
    try:
        stats, got = migrate_live(streams=streams, mode=mode, nbytes=6 * MIB + 10)
    finally:
        mp.undo()
    assert stats.streams == streams
    assert seen  # batches really went through the stream senders
    assert got.stats.normal_pages >= stats.normal_pages - 1


def test_streams_over_unix_sockets(tmp_path: Path) -> None:
    migrate_live(streams=3, address=f"unix://{tmp_path}/sock")


def test_a_stream_that_dies_fails_the_migration_and_leaves_the_source_running() -> None:
    region = migcore.Region(bytearray(np.random.default_rng(0).bytes(4 * MIB)))
    before = bytes(region.view)
    real = _streams.StreamSenders._run
    resumed: list[bool] = []

    def dying(self: _streams.StreamSenders, i: int) -> None:
        if i == 1:
            self.conns[i].close()
            self.errors.append(migcore.PeerLostError("stream 1 cut by the test"))
            self.wake()
            return
        real(self, i)

    mp = pytest.MonkeyPatch()
    mp.setattr(_streams.StreamSenders, "_run", dying)
    try:
        with migcore.listen("tcp://127.0.0.1:0", timeout=5) as listener:
            from _live import Receiver

            rx = Receiver(listener, timeout=5)
            with pytest.raises(migcore.PeerLostError, match="stream 1 cut"):
                migcore.migrate(region, listener.address, timeout=5, streams=2, resume=lambda: resumed.append(True))
            rx.join()
    finally:
        mp.undo()
    assert isinstance(rx.error, migcore.MigrationError)
    assert bytes(region.view) == before


def test_streams_refused_where_they_make_no_sense() -> None:
    with pytest.raises(ValueError, match="streams > 1"):
        migcore.migrate(bytearray(4096), "tcp://127.0.0.1:9", mode="postcopy", streams=2)
    with pytest.raises(ValueError, match="file:// shared storage does not support streams"):
        migcore.migrate(bytearray(4096), "file:///tmp/never", streams=2)
    for bad in (0, 65, 1.5, True):
        with pytest.raises(ValueError, match="streams must be"):
            migcore.migrate(bytearray(4096), "tcp://127.0.0.1:9", streams=bad)  # type: ignore[arg-type]


def test_a_stream_that_ends_before_its_round_marker_fails_in_time() -> None:
    """Stream 1 sends END at once: the destination must not wait for its round marker forever."""
    region = migcore.Region(bytearray(np.random.default_rng(1).bytes(4 * MIB)))
    real = _streams.StreamSenders._run

    def early_end(self: _streams.StreamSenders, i: int) -> None:
        if i == 1:
            self.conns[i].send_all(P.encode_header(P.Frame.END), "ending a stream early")
            self.stop.wait(10)
            return
        real(self, i)

    mp = pytest.MonkeyPatch()
    mp.setattr(_streams.StreamSenders, "_run", early_end)
    try:
        with migcore.listen("tcp://127.0.0.1:0", timeout=5) as listener:
            from _live import Receiver

            rx = Receiver(listener, timeout=2)
            with pytest.raises(migcore.MigrationError):
                migcore.migrate(region, listener.address, timeout=5, streams=2)
            rx.join(10)
    finally:
        mp.undo()
    assert isinstance(rx.error, migcore.ProtocolError) and "ended before" in str(rx.error), repr(rx.error)
