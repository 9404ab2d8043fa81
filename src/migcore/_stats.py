"""Migration statistics, named after QEMU's ``query-migrate`` so operators recognise them."""

from __future__ import annotations

import dataclasses
import threading
import time
from dataclasses import dataclass
from typing import Any

STATUSES = ("setup", "active", "postcopy-active", "postcopy-paused", "completed", "failed", "cancelled")


@dataclass(frozen=True)
class MigrationStats:
    """A snapshot of one migration, as seen by the side that reports it.

    Times are in seconds, sizes in bytes. ``rounds`` counts dirty-page
    synchronisations, the final one during the pause included (QEMU's
    ``dirty-sync-count``). ``downtime`` runs from ``pause()`` returning to the
    destination confirming it holds what it needs to resume.

    Compression (``compress=``): ``compress_before`` page bytes went into the
    codec and ``compress_after`` came out (batches that did not shrink count
    as raw on both sides). Delta encoding (``delta=True``, QEMU's XBZRLE
    counters): ``delta_hits`` pages had a cached copy of what the destination
    holds, ``delta_misses`` did not, ``delta_overflow`` hits were sent raw
    because their delta was not smaller than the page, and
    ``delta_bytes_saved`` is page bytes minus delta bytes sent.
    ``bandwidth_wait`` is the time the bandwidth limit held traffic back.

    Post-copy recovery: ``recoveries`` counts the links recovered after a
    loss, ``paused_time`` the seconds spent in ``"postcopy-paused"``.
    ``downtime_limit_exceeded`` is set when the pause lasted longer than the
    ``downtime_limit`` the migration was asked to keep.
    """

    status: str = "setup"
    mode: str = ""
    tracker: str = ""
    migration_id: str = ""
    page_size: int = 0
    total_time: float = 0.0
    setup_time: float = 0.0
    downtime: float = 0.0
    expected_downtime: float = 0.0
    rounds: int = 0
    transferred_bytes: int = 0
    remaining_bytes: int = 0
    total_bytes: int = 0
    zero_pages: int = 0
    normal_pages: int = 0
    normal_bytes: int = 0
    dirty_pages_rate: float = 0.0
    mbps: float = 0.0
    postcopy_requests: int = 0
    postcopy_pages: int = 0
    pages_per_round: tuple[int, ...] = ()
    state_bytes: int = 0
    throttle_percentage: int = 0
    verified: bool = False
    error: str = ""
    streams: int = 1
    compress: str = ""
    compress_before: int = 0
    compress_after: int = 0
    delta_hits: int = 0
    delta_misses: int = 0
    delta_overflow: int = 0
    delta_bytes_saved: int = 0
    bandwidth_wait: float = 0.0
    recoveries: int = 0
    paused_time: float = 0.0
    downtime_limit_exceeded: bool = False


class StatsRecorder:
    """The mutable counters behind :class:`MigrationStats`; ``snapshot()`` freezes them.

    Shared by the engine's threads (post-copy sender and demand reader), so
    updates that touch several fields go through ``lock``.
    """

    def __init__(self, *, mode: str, tracker: str, migration_id: str, page_size: int, total_bytes: int) -> None:
        self.lock = threading.Lock()
        self.started = time.monotonic()
        self.ended: float | None = None
        self.status = "setup"
        self.mode = mode
        self.tracker = tracker
        self.migration_id = migration_id
        self.page_size = page_size
        self.total_bytes = total_bytes
        self.setup_time = 0.0
        self.downtime = 0.0
        self.expected_downtime = 0.0
        self.rounds = 0
        self.transferred_bytes = 0
        self.remaining_bytes = total_bytes
        self.zero_pages = 0
        self.normal_pages = 0
        self.normal_bytes = 0
        self.dirty_pages_rate = 0.0
        self.postcopy_requests = 0
        self.postcopy_pages = 0
        self.pages_per_round: list[int] = []
        self.state_bytes = 0
        self.throttle_percentage = 0
        self.verified = False
        self.error = ""
        self.streams = 1
        self.compress = ""
        self.compress_before = 0
        self.compress_after = 0
        self.delta_hits = 0
        self.delta_misses = 0
        self.delta_overflow = 0
        self.delta_bytes_saved = 0
        self.bandwidth_wait = 0.0
        self.recoveries = 0
        self.paused_time = 0.0
        self.downtime_limit_exceeded = False

    # -- events: every change goes through one of these, under the lock ------

    def update(self, **fields: Any) -> None:
        """Set fields of :class:`MigrationStats` by name (several at once, atomically)."""
        with self.lock:
            for name, value in fields.items():
                self._check(name)
                setattr(self, name, value)

    def add(self, **counters: float) -> None:
        """Add to counters of :class:`MigrationStats` by name (several at once, atomically)."""
        with self.lock:
            for name, value in counters.items():
                self._check(name)
                setattr(self, name, getattr(self, name) + value)

    @staticmethod
    def _check(name: str) -> None:
        if name not in _NAMES or name in _DERIVED:
            raise AttributeError(f"MigrationStats has no settable field {name!r}")

    def activate(self) -> None:
        """The handshake is done: pages may move now."""
        with self.lock:
            self.status = "active"
            self.setup_time = time.monotonic() - self.started

    def round_planned(self, dirty_pages: int, remaining_bytes: int) -> None:
        """A pre-copy round is about to send ``dirty_pages`` pages."""
        with self.lock:
            self.pages_per_round.append(dirty_pages)
            self.remaining_bytes = remaining_bytes

    def synced(self, dirty_pages: int, remaining_bytes: int) -> None:
        """One more dirty-page synchronisation (QEMU's dirty-sync-count) found ``dirty_pages``."""
        with self.lock:
            self.rounds += 1
            self.pages_per_round.append(dirty_pages)
            self.remaining_bytes = remaining_bytes

    def add_pages(self, pages: int, payload: int, wire: int, *, postcopy: bool = False, settle: bool = False) -> None:
        """Count one PAGES frame: ``payload`` page bytes, ``wire`` bytes in all.

        ``settle``: the sender's view, the payload no longer counts as remaining.
        """
        with self.lock:
            self.normal_pages += pages
            self.normal_bytes += payload
            self.transferred_bytes += wire
            if postcopy:
                self.postcopy_pages += pages
            if settle:
                self.remaining_bytes = max(0, self.remaining_bytes - payload)

    def add_zero_pages(self, pages: int, payload: int = 0, *, settle: bool = False) -> None:
        """Count pages known to be zero (never sent, or sent as a zero notice)."""
        with self.lock:
            self.zero_pages += pages
            if settle:
                self.remaining_bytes = max(0, self.remaining_bytes - payload)

    def add_wire(self, nbytes: int) -> None:
        with self.lock:
            self.transferred_bytes += nbytes

    def completed(self, downtime: float | None = None) -> None:
        """Everything arrived and was verified end to end."""
        with self.lock:
            if downtime is not None and not self.downtime:
                self.downtime = downtime
            self.remaining_bytes = 0
            self.expected_downtime = 0.0
            self.verified = True
        self.finish("completed")

    def finish(self, status: str, error: str = "") -> None:
        with self.lock:
            self.status = status
            self.error = error
            if self.ended is None:
                self.ended = time.monotonic()

    def snapshot(self) -> MigrationStats:
        """Freeze the counters: every field of :class:`MigrationStats` is read from this recorder by name."""
        with self.lock:
            now = self.ended if self.ended is not None else time.monotonic()
            total = max(now - self.started, 1e-9)
            derived: dict[str, Any] = {
                "total_time": total,
                "mbps": self.transferred_bytes * 8 / 1e6 / total,
                "pages_per_round": tuple(self.pages_per_round),
            }
            values: dict[str, Any] = {f.name: derived[f.name] if f.name in derived else getattr(self, f.name) for f in _FIELDS}
            return MigrationStats(**values)


_FIELDS = dataclasses.fields(MigrationStats)
_NAMES = frozenset(f.name for f in _FIELDS)
#: Fields computed by :meth:`StatsRecorder.snapshot`, never set.
_DERIVED = frozenset({"total_time", "mbps"})
