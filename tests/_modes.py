"""Shared helper of the migration-mode tests: one migration over loopback with a live writer, compared byte for byte."""

from __future__ import annotations

from typing import Any

import migcore

from _live import Receiver, Writer, random_region

MIB = 1 << 20


def migrate_live(
    *,
    nbytes: int = 3 * MIB + 777,
    address: str = "tcp://127.0.0.1:0",
    listen_kw: dict[str, Any] | None = None,
    writer_kw: dict[str, Any] | None = None,
    region: migcore.Region | None = None,
    **kw: Any,
) -> tuple[migcore.MigrationStats, migcore.Received]:
    """Migrate a random region that a Writer keeps changing; assert the destination is the paused source, exactly."""
    region = region if region is not None else random_region(nbytes, seed=11)
    with migcore.listen(address, timeout=20, **(listen_kw or {})) as listener:
        rx = Receiver(listener)
        writer = Writer(region, seed=12, **(writer_kw or {})).start()
        kw.setdefault("progress", writer.on_progress)
        try:
            stats = migcore.migrate(region, listener.address, timeout=20, pause=writer.pause, state=b"st", **kw)
        finally:
            writer.stop()
        rx.join()
    assert rx.error is None, rx.error
    assert rx.received is not None and writer.snapshot is not None
    assert bytes(rx.received.region.view) == writer.snapshot
    assert rx.received.state == b"st"
    assert stats.verified and rx.received.stats.verified
    return stats, rx.received
