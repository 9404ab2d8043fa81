"""A live writer that dirties a region at a chosen rate and pattern while it migrates.

Used by the tests, the ``migcore demo`` command and the benchmark suite to
play the part of the running program::

    region = migcore.Region.allocate(64 << 20)
    workload.fill(region, random_fraction=0.5, seed=0)
    with workload.Workload(region, dirty_rate=20 << 20, pattern="hotset") as w:
        stats = migcore.migrate(region, address, pause=w.pause, throttle=w.throttle)

The writer runs on a background thread and writes in vectorized batches (one
NumPy fancy-indexing assignment per batch, never a Python loop over pages),
paced so that the pages it dirties per second times the page size matches
``dirty_rate``. Each dirtied page gets ``write_bytes`` new bytes at its start
(8 by default: one 64-bit word), so the page's hash changes; with
``flipflop=True`` those bytes are XOR-ed with a fixed mask instead, so every
page alternates between exactly two contents (the A-B-A pattern that defeats
delta detection done against what the source *meant* to send).

The sequence of pages chosen depends only on ``seed``, ``pattern``,
``hotset_fraction``, ``pages`` and ``batch_pages``, never on timing: batch *k* of two
workloads built alike touches the same pages. :meth:`Workload.step` writes
one batch on the caller's thread, for tests and benchmarks that want to
drive the writes themselves.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Literal

import numpy as np
from numpy.typing import ArrayLike, NDArray

from migcore._region import Region
from migcore.bench._pages import FLIP_MASK, as_region, fill, touch

__all__ = ["FLIP_MASK", "PATTERNS", "Workload", "WorkloadStats", "fill", "touch"]

logger = logging.getLogger(__name__)

Pattern = Literal["uniform", "hotset", "sequential"]
PATTERNS: tuple[str, ...] = ("uniform", "hotset", "sequential")

#: The writer aims at one batch per this many seconds (fewer, bigger batches at high rates).
BATCH_INTERVAL = 0.01
#: Upper bound on pages per batch, so pause() never waits long for a batch in flight.
MAX_BATCH_PAGES = 8192
#: If the writer falls this far behind its schedule it forgets the debt instead of bursting.
MAX_LAG = 0.1


@dataclass(frozen=True)
class WorkloadStats:
    """What a :class:`Workload` has done so far."""

    #: Page writes (a page written twice counts twice).
    pages_written: int
    #: Distinct pages written at least once.
    distinct_pages: int
    batches: int
    #: Seconds spent running (started, not paused, not stopped).
    active_time: float
    #: Bytes dirtied per second of active time (``pages_written * page_size / active_time``).
    achieved_rate: float
    #: The rate the writer aims at now, after throttling (``inf`` when unbounded).
    target_rate: float
    #: The current throttle level in percent (0 = full speed).
    throttle_level: int
    #: The highest throttle level applied so far.
    max_throttle_level: int


def _check_options(
    region: Region, dirty_rate: float | None, pattern: str, hotset_fraction: float, write_bytes: int
) -> float:
    """Raise on a bad option; return ``dirty_rate`` as a float (``inf`` for None)."""
    if pattern not in PATTERNS:
        raise ValueError(f"unknown pattern {pattern!r}; choose one of {list(PATTERNS)}")
    rate = math.inf if dirty_rate is None else float(dirty_rate)
    if math.isnan(rate) or rate < 0:
        raise ValueError(f"dirty_rate must be >= 0 bytes per second (or None for unbounded), got {rate}")
    if not 0.0 < hotset_fraction <= 1.0:
        raise ValueError(f"hotset_fraction must be in (0, 1], got {hotset_fraction}")
    ps = region.page_size
    if write_bytes < 8 or write_bytes > ps or write_bytes % 8:
        raise ValueError(f"write_bytes must be a multiple of 8 from 8 to the page size {ps}, got {write_bytes}")
    return rate


def _shadow_region(region: Region, shadow: Any) -> Region:
    """``shadow`` as a Region laid out like ``region`` (the same size and pages)."""
    out = as_region(shadow, region.page_size)
    if out.nbytes != region.nbytes:
        raise ValueError(f"the shadow holds {out.nbytes} bytes, the region {region.nbytes}")
    return out


class Workload:
    """A background writer that dirties ``region`` at ``dirty_rate`` bytes per second.

    :param region: a :class:`migcore.Region`, or any buffer ``Region()``
        accepts (wrapped with ``page_size``).
    :param dirty_rate: bytes of pages dirtied per second (pages per second times
        the page size); ``0`` keeps the writer idle, ``None`` or ``math.inf``
        writes as fast as it can.
    :param pattern: ``"uniform"`` (any page, uniformly at random),
        ``"hotset"`` (only a fixed random set of ``hotset_fraction`` of the
        pages, see :attr:`hot_pages`) or ``"sequential"`` (pages in order,
        wrapping around at the end); each draws from ``pages`` when given.
    :param seed: seeds the choice of pages (and of the hot set).
    :param mark: report every write with ``Region.mark_pages`` after it lands,
        for the ``"writes"`` tracker.
    :param flipflop: toggle each written page between two contents (A-B-A).
    :param write_bytes: bytes written at the start of each dirtied page.
    :param batch_pages: pages per batch; by default about 10 ms worth at
        ``dirty_rate``.
    :param pages: the pages to draw from instead of the pattern's own
        (``"sequential"`` with ``batch_pages=len(pages)`` rewrites all of them
        in every batch: a dirty set that never shrinks).
    :param shadow: a writable buffer the size of the region, holding a copy
        of it; every write lands there too, so it stays a copy (what a test
        compares the region with after a cancelled migration).

    :meth:`pause` is the ``pause`` callable for ``migcore.migrate()`` and
    :meth:`throttle` its ``throttle`` callback.
    """

    def __init__(
        self,
        region: Region | Any,
        *,
        dirty_rate: float | None = None,
        pattern: Pattern | str = "uniform",
        hotset_fraction: float = 0.1,
        seed: int = 0,
        mark: bool = True,
        flipflop: bool = False,
        write_bytes: int = 8,
        batch_pages: int | None = None,
        page_size: int = 4096,
        pages: ArrayLike | None = None,
        shadow: Any = None,
    ) -> None:
        self.region = as_region(region, page_size)
        dirty_rate = _check_options(self.region, dirty_rate, pattern, hotset_fraction, write_bytes)
        ps = self.region.page_size
        self.pattern: str = pattern
        self.dirty_rate = dirty_rate
        self.seed = seed
        self.mark = mark
        self.flipflop = flipflop
        self.write_bytes = write_bytes
        self._rng = np.random.default_rng(seed)
        #: The pages the pattern draws from (sorted): ``pages`` if given, else the ``"hotset"``
        #: pattern's random hot set, else every page.
        self.hot_pages: NDArray[np.intp] = self._pool(pages, hotset_fraction)
        self._shadow = None if shadow is None else _shadow_region(self.region, shadow)
        if batch_pages is None:
            pages_per_s = dirty_rate / ps
            batch_pages = MAX_BATCH_PAGES if math.isinf(pages_per_s) else round(pages_per_s * BATCH_INTERVAL)
        pool = len(self.hot_pages)
        self.batch_pages = int(max(1, min(batch_pages, MAX_BATCH_PAGES, pool)))
        self._cursor = 0  # position in hot_pages of the sequential pattern's next page
        self._generation = 0
        self._touched = np.zeros(self.region.npages, dtype=np.bool_)
        self._pages_written = 0
        self._batches = 0
        self._level = 0
        self._max_level = 0
        self._throttle_base: float | None = None
        self._active_time = 0.0
        self._active_since: float | None = None
        # schedule: the writer may have written ``_sched_pages`` pages by ``_sched_t0 + pages / rate``
        self._sched_t0 = 0.0
        self._sched_pages = 0
        self._cond = threading.Condition()
        self._paused = False
        self._stopped = False
        self._writing = False
        self._thread: threading.Thread | None = None
        #: The exception that ended the writer thread, if any (re-raised by :meth:`stop`).
        self.error: BaseException | None = None

    # ---- choosing and writing pages -------------------------------------------------

    def _pool(self, pages: ArrayLike | None, hotset_fraction: float) -> NDArray[np.intp]:
        npages = self.region.npages
        if pages is not None:
            pool = np.unique(np.asarray(pages, dtype=np.intp))
            if pool.size == 0 or pool[0] < 0 or pool[-1] >= npages:
                raise ValueError(f"pages must be a non-empty set of indices below the region's {npages} pages")
            return pool
        if self.pattern == "hotset":
            nhot = max(1, math.ceil(hotset_fraction * npages))
            return np.sort(self._rng.choice(npages, size=nhot, replace=False)).astype(np.intp)
        return np.arange(npages, dtype=np.intp)

    def _choose(self) -> NDArray[np.intp]:
        """The sorted, unique pages of the next batch (depends only on the seed and past batches)."""
        n = self.batch_pages
        pool = self.hot_pages
        if self.pattern == "sequential":
            pages = pool[(self._cursor + np.arange(n, dtype=np.intp)) % len(pool)]
            self._cursor = (self._cursor + n) % len(pool)
            return np.unique(pages)
        picks = self._rng.integers(0, len(pool), size=n)
        return np.unique(pool[picks])

    def step(self) -> NDArray[np.intp]:
        """Write one batch now, on the caller's thread; return the pages written.

        For driving the writes by hand: do not call it while the background
        thread runs (after :meth:`start`, before :meth:`stop`).
        """
        pages = self._choose()
        self._generation += 1
        touch(
            self.region,
            pages,
            generation=self._generation + (self.seed << 32),
            write_bytes=self.write_bytes,
            flipflop=self.flipflop,
            mark=self.mark,
        )
        if self._shadow is not None:  # the same bytes: generation writes repeat, XOR toggles alike
            touch(
                self._shadow,
                pages,
                generation=self._generation + (self.seed << 32),
                write_bytes=self.write_bytes,
                flipflop=self.flipflop,
                mark=False,
            )
        self._touched[pages] = True
        self._pages_written += len(pages)
        self._batches += 1
        return pages

    # ---- rate control -------------------------------------------------------------------

    @property
    def target_rate(self) -> float:
        """Bytes per second the writer aims at now: ``dirty_rate`` scaled by ``(100 - level)%``."""
        rate = self.dirty_rate
        if self._level and self._throttle_base is not None:
            rate = self._throttle_base
        return rate * (100 - self._level) / 100

    def throttle(self, level: int | float) -> None:
        """Slow the writer to ``(100 - level)%`` of ``dirty_rate`` (0 = full speed, clamped to 0..99).

        The ``throttle`` callback of ``migcore.migrate(on_stall="throttle")``,
        like QEMU's auto-converge CPU throttle.
        """
        level = int(min(99, max(0, level)))
        with self._cond:
            if level and self._throttle_base is None and math.isinf(self.dirty_rate):
                # throttling "as fast as possible" slows down from the rate achieved so far
                self._throttle_base = self._achieved_rate() or None
            if level != self._level:
                logger.debug("workload throttled to %d%%", level)
            self._level = level
            self._max_level = max(self._max_level, level)
            self._reset_schedule()
            self._cond.notify_all()

    def _reset_schedule(self) -> None:
        self._sched_t0 = time.monotonic()
        self._sched_pages = 0

    def _achieved_rate(self) -> float:
        active = self._active_time
        if self._active_since is not None:
            active += time.monotonic() - self._active_since
        return self._pages_written * self.region.page_size / active if active > 0 else 0.0

    def _delay(self) -> float:
        """Seconds to wait before the next batch is due (0 = now, inf = never)."""
        rate = self.target_rate
        if rate <= 0:
            return math.inf
        if math.isinf(rate):
            return 0.0
        due = self._sched_t0 + self._sched_pages * self.region.page_size / rate
        now = time.monotonic()
        if now - due > MAX_LAG:  # fell behind (slow machine, GIL): forget the debt, no burst
            self._sched_t0 = now - self._sched_pages * self.region.page_size / rate
            return 0.0
        return max(0.0, due - now)

    # ---- thread control ----------------------------------------------------------------

    def start(self) -> Workload:
        """Start writing on a background thread; returns ``self``."""
        with self._cond:
            if self._thread is not None:
                raise RuntimeError("this Workload was already started")
            self._reset_schedule()
            if not self._paused:
                self._active_since = time.monotonic()
            self._thread = threading.Thread(target=self._run, name="migcore-workload", daemon=True)
            self._thread.start()
        return self

    def _run(self) -> None:
        try:
            while True:
                with self._cond:
                    while True:
                        if self._stopped:
                            return
                        if self._paused:
                            self._cond.wait()
                            continue
                        delay = self._delay()
                        if delay > 0:
                            self._cond.wait(None if math.isinf(delay) else delay)
                            continue
                        break
                    self._writing = True
                written = 0
                try:
                    written = len(self.step())
                finally:
                    with self._cond:
                        self._writing = False
                        self._sched_pages += written
                        self._cond.notify_all()
                if math.isinf(self.dirty_rate):
                    time.sleep(0)  # let other threads (the migration) have the GIL between batches
        except BaseException as exc:  # noqa: BLE001 - reported by stop()
            logger.exception("workload writer failed")
            self.error = exc
            with self._cond:
                self._stopped = True
                self._cond.notify_all()

    def pause(self) -> None:
        """Stop writing; returns only once no write is in flight. Idempotent.

        This is the ``pause`` callable for ``migcore.migrate()``.
        """
        with self._cond:
            self._paused = True
            while self._writing:
                self._cond.wait()
            if self._active_since is not None:
                self._active_time += time.monotonic() - self._active_since
                self._active_since = None

    def resume(self) -> None:
        """Start writing again after :meth:`pause` (the schedule restarts: no catch-up burst)."""
        with self._cond:
            if not self._paused:
                return
            self._paused = False
            self._reset_schedule()
            if self._thread is not None and not self._stopped:
                self._active_since = time.monotonic()
            self._cond.notify_all()

    @property
    def paused(self) -> bool:
        return self._paused

    def stop(self, timeout: float | None = None) -> None:
        """Stop the writer and wait for its thread; re-raises the error that ended it, if any."""
        with self._cond:
            self._stopped = True
            if self._active_since is not None:
                self._active_time += time.monotonic() - self._active_since
                self._active_since = None
            self._cond.notify_all()
            thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)
        if self.error is not None:
            raise RuntimeError("the workload writer failed") from self.error

    @property
    def stats(self) -> WorkloadStats:
        """A snapshot of what the writer has done."""
        with self._cond:
            active = self._active_time
            if self._active_since is not None:
                active += time.monotonic() - self._active_since
            return WorkloadStats(
                pages_written=self._pages_written,
                distinct_pages=int(np.count_nonzero(self._touched)),
                batches=self._batches,
                active_time=active,
                achieved_rate=self._pages_written * self.region.page_size / active if active > 0 else 0.0,
                target_rate=self.target_rate,
                throttle_level=self._level,
                max_throttle_level=self._max_level,
            )

    def __enter__(self) -> Workload:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        rate = "unbounded" if math.isinf(self.dirty_rate) else f"{self.dirty_rate:.0f} B/s"
        return f"<migcore.bench.workload.Workload {self.pattern} {rate} on {self.region!r}>"
