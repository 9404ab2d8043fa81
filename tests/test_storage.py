"""Shared-storage migration (file://): exact with a live writer, reading during pre-copy, truncated and tampered files."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import numpy as np
import pytest

import migcore
from migcore import _storage

from _live import Receiver, Writer, random_region
from _modes import MIB, migrate_live


@pytest.mark.parametrize("mode", ["precopy", "stopcopy"])
@pytest.mark.parametrize("tracker", ["hash", "writes"])
def test_shared_storage_with_a_live_writer(tmp_path: Path, mode: str, tracker: str) -> None:
    stats, got = migrate_live(address=f"file://{tmp_path}/image", mode=mode, tracker=tracker, nbytes=3 * MIB + 5)
    assert stats.rounds >= 1 and got.stats.rounds == stats.rounds
    image = (tmp_path / "image").read_bytes()
    assert image == bytes(got.region.view)  # pages sit at page index x page size: the file is the image


def test_destination_reads_during_precopy(tmp_path: Path) -> None:
    """The reader loads round 0 before the source pauses (the writer keeps the rounds going)."""
    path = tmp_path / "image"
    region = random_region(4 * MIB, seed=5)
    loaded_before_pause = threading.Event()
    paused = threading.Event()
    real = _storage.read_runs

    def spy(*args: object) -> None:
        if not paused.is_set():
            loaded_before_pause.set()
        real(*args)  # type: ignore[arg-type]

    mp = pytest.MonkeyPatch()
    mp.setattr(_storage, "read_runs", spy)
    try:
        with migcore.listen(f"file://{path}", timeout=20) as listener:
            rx = Receiver(listener)
            writer = Writer(region, seed=6).start()

            def pause() -> None:
                loaded_before_pause.wait(10)
                writer.pause()
                paused.set()

            migcore.migrate(region, listener.address, pause=pause, state=b"s", timeout=20, downtime_limit=0.0, max_rounds=3)
            writer.stop()
            rx.join()
    finally:
        mp.undo()
    assert rx.error is None, rx.error
    assert loaded_before_pause.is_set()
    assert rx.received is not None and bytes(rx.received.region.view) == writer.snapshot


def write_image(path: Path, nbytes: int = 2 * MIB) -> bytes:
    region = random_region(nbytes, seed=8)
    migcore.migrate(region, f"file://{path}", mode="stopcopy", state=b"state")
    return bytes(region.view)


def test_a_finished_image_can_be_loaded_later(tmp_path: Path) -> None:
    expected = write_image(tmp_path / "img")
    with migcore.listen(f"file://{tmp_path}/img", timeout=5) as listener:
        got = listener.receive()
    assert bytes(got.region.view) == expected and got.state == b"state" and got.stats.verified


def test_tampered_page_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "img"
    expected = write_image(path)
    offset = 4096 * 7 + 100
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(bytes([expected[offset] ^ 0xFF]))
    with migcore.listen(f"file://{path}", timeout=5) as listener:
        with pytest.raises(migcore.VerificationError, match="page 7"):
            listener.receive()


def test_truncated_data_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "img"
    write_image(path)
    os.truncate(path, 1 * MIB + 10)
    with migcore.listen(f"file://{path}", timeout=5) as listener:
        with pytest.raises(migcore.ProtocolError, match="truncated"):
            listener.receive()


def test_tampered_manifest_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "img"
    write_image(path)
    manifest = Path(_storage.manifest_path(str(path)))
    raw = bytearray(manifest.read_bytes())
    raw[len(raw) // 2] ^= 0x01
    manifest.write_bytes(bytes(raw))
    with migcore.listen(f"file://{path}", timeout=5) as listener:
        with pytest.raises(migcore.ProtocolError, match="checksum|damaged"):
            listener.receive()


def test_truncated_manifest_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "img"
    write_image(path)
    manifest = Path(_storage.manifest_path(str(path)))
    os.truncate(manifest, manifest.stat().st_size - 7)
    with migcore.listen(f"file://{path}", timeout=0.3) as listener:
        with pytest.raises(migcore.ProtocolError, match="ends inside a record"):
            listener.receive()


def test_a_cancelled_source_is_seen_by_the_reader(tmp_path: Path) -> None:
    path = tmp_path / "img"
    region = random_region(1 * MIB, seed=9)
    rng = np.random.default_rng(10)
    # the writes tracker sees every progress-time write as dirty: pre-copy never converges
    with pytest.raises(migcore.MigrationCancelled):
        migcore.migrate(region, f"file://{path}", mode="precopy", tracker="writes", on_stall="cancel", max_rounds=2,
                        downtime_limit=0.0, progress=lambda s: region.write(0, rng.bytes(64 * 1024)))
    with migcore.listen(f"file://{path}", timeout=5) as listener:
        with pytest.raises(migcore.MigrationCancelled, match="gave up"):
            listener.receive()


def test_limits_of_the_reader_apply(tmp_path: Path) -> None:
    path = tmp_path / "img"
    write_image(path)
    with migcore.listen(f"file://{path}", timeout=5, max_bytes=4096) as listener:
        with pytest.raises(migcore.CompatibilityError, match="max_bytes"):
            listener.receive()


def test_shared_storage_refuses_what_it_cannot_do(tmp_path: Path) -> None:
    for kw in ({"mode": "postcopy"}, {"mode": "hybrid"}, {"on_stall": "postcopy"}, {"token": "t"}, {"delta": True}):
        with pytest.raises(ValueError, match="file:// shared storage does not support"):
            migcore.migrate(bytearray(4096), f"file://{tmp_path}/x", **kw)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="no tls or token"):
        migcore.listen(f"file://{tmp_path}/x", token="t")
    with pytest.raises(ValueError, match="absolute path"):
        migcore.listen("file://relative/x")


def test_bandwidth_limit_applies_to_shared_storage(tmp_path: Path) -> None:
    stats, _ = migrate_live(address=f"file://{tmp_path}/image", bandwidth_limit=16 * MIB, nbytes=2 * MIB)
    assert stats.bandwidth_wait > 0


def test_a_fifo_in_place_of_the_files_is_refused_without_blocking(tmp_path: Path) -> None:
    """A FIFO would block open() past any timeout: both ends refuse it at once, with a typed error."""
    image = tmp_path / "image"
    os.mkfifo(image)
    with pytest.raises(migcore.ProtocolError, match="not a regular file"):
        migcore.migrate(random_region(64 * 1024, seed=1), f"file://{image}", mode="stopcopy", timeout=2)
    other = tmp_path / "other"
    os.mkfifo(str(other) + ".manifest")
    with migcore.listen(f"file://{other}", timeout=2) as listener:
        with pytest.raises(migcore.ProtocolError, match="not a regular file"):
            listener.receive()  # before: open() waited for a writer that never comes
