"""Test helpers: a live writer thread, a background receiver, and guarded destination regions."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np

import migcore
from migcore import _destination
from migcore.bench.workload import Workload


class Writer:
    """Keeps writing a region until ``pause()``: random pages, plus pages flipping between two contents.

    The flipping pages go A, B, A, B... so a page can be hashed as A, sent as
    B and be A again by the next round (the ABA case of DESIGN.md rule 1).
    ``hot`` pages are all rewritten on every pass (a constant dirty set that
    never shrinks, to force a pre-copy stall). Writes are reported with
    ``Region.mark_pages`` so the "writes" tracker sees them too.

    The writes are those of :class:`migcore.bench.workload.Workload` (one per
    kind of page, stepped together once per pass); this class adds the test's
    side: the pass loop and its delay, the throttle levels asked for, and the
    snapshot of what the destination must hold, taken at the pause.
    """

    def __init__(
        self,
        region: migcore.Region,
        *,
        seed: int = 0,
        random_pages: int = 4,
        flip_pages: int = 6,
        hot: int = 0,
        delay: float = 0.0005,
        shadow: np.ndarray | None = None,
    ) -> None:
        self.region = region
        npages = region.npages
        full = max(1, npages - 1)  # flipping and hot pages stay off a partial last page
        flip = np.random.default_rng(seed).choice(full, size=min(flip_pages, full), replace=False)
        common: dict[str, Any] = {"seed": seed, "shadow": shadow}
        parts = [
            Workload(region, batch_pages=random_pages, write_bytes=64, **common) if random_pages else None,
            Workload(region, pattern="sequential", pages=flip, batch_pages=len(flip), flipflop=True,
                     write_bytes=region.page_size, **common) if len(flip) else None,
        ]
        nhot = min(hot, npages - 1)
        self.hot = (
            Workload(region, pattern="sequential", pages=np.arange(nhot), batch_pages=nhot, **common) if nhot > 0 else None
        )
        self._parts = [w for w in (*parts, self.hot) if w is not None]
        self.delay = delay
        self.passes = 0
        self.throttle_levels: list[int] = []
        self.snapshot: bytes | None = None
        self.paused = False
        self._lock = threading.Lock()  # one step at a time: the thread and on_progress share the hot pages
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> Writer:
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            with self._lock:
                self.passes += 1
                for part in self._parts:
                    part.step()
            level = self.throttle_levels[-1] if self.throttle_levels else 0
            time.sleep(self.delay * (1 + level / 10))

    def on_progress(self, stats: migcore.MigrationStats) -> None:
        """A ``progress`` callback that rewrites the hot pages: every round finds them dirty again."""
        if not self.paused and self.hot is not None:
            with self._lock:
                self.passes += 1
                self.hot.step()

    def pause(self) -> None:
        """The ``pause`` callback: stop writing, then remember the bytes the destination must hold."""
        self.stop()
        self.paused = True
        self.snapshot = bytes(self.region.view)

    def throttle(self, level: int) -> None:
        self.throttle_levels.append(level)

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()


class Receiver:
    """Runs ``listener.receive()`` (and optionally ``wait()``) on a thread and keeps the outcome."""

    def __init__(self, listener: migcore.Listener, *, wait: bool = True, timeout: float = 20.0,
                 then: Callable[[migcore.Received], Any] | None = None) -> None:
        self.listener = listener
        self.wait = wait
        self.timeout = timeout
        self.then = then
        self.received: migcore.Received | None = None
        self.error: BaseException | None = None
        self.result: Any = None
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            self.received = self.listener.receive(timeout=self.timeout)
            if self.then is not None:
                self.result = self.then(self.received)
            if self.wait:
                self.received.wait(self.timeout)
        except BaseException as exc:  # noqa: BLE001 - inspected by the test
            self.error = exc

    def join(self, timeout: float = 30.0) -> Receiver:
        self._thread.join(timeout)
        assert not self._thread.is_alive(), "receiver thread hung"
        return self


def wait_status(received: migcore.Received, status: str, seconds: float = 10.0) -> None:
    """Until the reception reports ``status`` (a post-copy receiver changes it on its own thread)."""
    deadline = time.monotonic() + seconds
    while received.stats.status != status and time.monotonic() < deadline:
        time.sleep(0.005)
    assert received.stats.status == status, received.stats


class GuardedAllocations:
    """Replaces the destination's allocator: each region sits between guard bytes, and every call is logged."""

    GUARD = 4096
    FILL = 0xA5

    def __init__(self) -> None:
        self.buffers: list[bytearray] = []
        self.sizes: list[int] = []

    def __call__(self, nbytes: int, page_size: int) -> migcore.Region:
        buf = bytearray([self.FILL]) * self.GUARD + bytearray(nbytes) + bytearray([self.FILL]) * self.GUARD
        self.buffers.append(buf)
        self.sizes.append(nbytes)
        return migcore.Region(memoryview(buf)[self.GUARD : self.GUARD + nbytes], page_size)

    def guards_intact(self) -> bool:
        g = bytes([self.FILL]) * self.GUARD
        return all(b[: self.GUARD] == g and b[-self.GUARD :] == g for b in self.buffers)

    def install(self, monkeypatch: Any) -> GuardedAllocations:
        monkeypatch.setattr(_destination, "_allocate_region", self)
        return self


def random_region(nbytes: int, *, seed: int = 0, page_size: int = 4096, zero_fraction: float = 0.25) -> migcore.Region:
    """A bytearray region of random pages, some of them zero."""
    rng = np.random.default_rng(seed)
    buf = bytearray(nbytes)
    arr = np.frombuffer(buf, dtype=np.uint8)
    arr[:] = rng.integers(0, 256, nbytes, dtype=np.uint8)
    npages = -(-nbytes // page_size)
    for p in rng.choice(npages, size=int(npages * zero_fraction), replace=False):
        arr[p * page_size : (p + 1) * page_size] = 0
    return migcore.Region(buf, page_size)
