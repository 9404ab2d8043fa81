"""Dirty-page trackers: each one answers "which pages changed since I last asked?" as a bitmap.

- ``HashTracker`` hashes every page and compares with a baseline of hashes
  that the caller keeps equal to what the destination acknowledged storing
  (DESIGN.md rule 1), so a page that changed and changed back is still resent
  if the destination holds something else. Works for any buffer, even one
  written by another process.
- ``WritesTracker`` reads the marks the program made with
  ``Region.mark_dirty``/``Region.write``; it costs nothing per round but sees
  only the writes the program reports.
- ``UffdTracker`` asks the kernel (userfaultfd write-protect, Linux >= 6.7):
  every write is seen, at a cost that follows the written pages only.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable
from abc import ABC, abstractmethod

import numpy as np
import xxhash
from numpy.typing import NDArray

from migcore import _kernels, _names, _residency, _userfault
from migcore._errors import MigrationError
from migcore._region import Region, U64, new_bitmap

log = logging.getLogger("migcore")


#: Regions smaller than this are hashed on one thread; larger ones on ``threads``.
PARALLEL_MIN_BYTES = 32 << 20


def zero_page_hashes(region: Region) -> U64:
    """The hash table of an all-zero region of the same shape (what a fresh destination holds)."""
    table = np.full(region.npages, xxhash.xxh3_64_intdigest(bytes(region.page_size)), dtype=np.uint64)
    tail = region.nbytes - (region.npages - 1) * region.page_size
    if tail != region.page_size:
        table[-1] = xxhash.xxh3_64_intdigest(bytes(tail))
    return table


def runs_to_pages(runs: U64) -> NDArray[np.intp]:
    """The page indices covered by ``runs`` (shape ``(n, 2)``), in order, without a Python loop."""
    if len(runs) == 0:
        return np.empty(0, dtype=np.intp)
    starts = runs[:, 0].astype(np.intp)
    counts = runs[:, 1].astype(np.intp)
    total = int(counts.sum())
    ends = np.cumsum(counts)
    # each page index = its run's start + its position inside the run
    return np.repeat(starts - (ends - counts), counts) + np.arange(total, dtype=np.intp)


def over_threads(region: Region, threads: int, kernel: Callable[[int, int], int]) -> int:
    """Run ``kernel(lo, hi)`` over the region's pages split over ``threads`` threads; sum the results.

    The fast path releases the GIL, so the threads really run at once. Splits
    fall on multiples of 64 pages so no two threads share a bitmap word;
    small regions run on the calling thread alone.
    """
    npages = region.npages
    if threads <= 1 or region.nbytes < PARALLEL_MIN_BYTES:
        return int(kernel(0, npages))
    step = -(-npages // threads)
    step = -(-step // 64) * 64
    bounds = [(lo, min(lo + step, npages)) for lo in range(0, npages, step)]
    counts = [0] * len(bounds)

    def work(i: int) -> None:
        counts[i] = int(kernel(*bounds[i]))

    workers = [threading.Thread(target=work, args=(i,)) for i in range(1, len(bounds))]
    for t in workers:
        t.start()
    try:
        work(0)
    finally:
        for t in workers:
            t.join()
    return sum(counts)


def hash_delta_parallel(
    region: Region, baseline: U64, dirty: U64, threads: int, update: bool = False
) -> int:
    """``hash_delta`` over the whole region on up to ``threads`` threads; returns the dirty count.

    Pages the kernel has no memory behind are hashed as zero pages without
    being read (:mod:`migcore._residency`).
    """
    resident = _residency.resident_pages(region)
    return over_threads(
        region,
        threads,
        lambda lo, hi: _kernels.hash_delta(
            region.view, region.page_size, baseline, dirty, lo, hi, update, resident=resident
        ),
    )


def zero_pages_parallel(region: Region, zeros: U64, threads: int) -> int:
    """``zero_pages`` over the whole region on up to ``threads`` threads; returns the zero-page count.

    Pages the kernel has no memory behind count as zero without being read.
    """
    resident = _residency.resident_pages(region)
    return over_threads(
        region,
        threads,
        lambda lo, hi: _kernels.zero_pages(region.view, region.page_size, zeros, lo, hi, resident=resident),
    )


class Tracker(ABC):
    """Finds the pages dirtied since the last collection."""

    name: str = ""

    def __init__(self, region: Region) -> None:
        self.region = region

    def start(self) -> None:
        """Begin tracking: writes from now on are seen by the next :meth:`collect`."""

    @abstractmethod
    def collect(self, out: U64) -> int:
        """Write the dirty bitmap into ``out`` (``bitmap_words(npages)`` words); return the count."""

    def close(self) -> None:
        """Stop tracking and release what tracking holds."""


class HashTracker(Tracker):
    """Dirty = the page's hash differs from ``baseline`` (the hashes the destination acknowledged)."""

    name = "hash"

    def __init__(self, region: Region, threads: int = 2) -> None:
        super().__init__(region)
        self.threads = threads
        #: Per-page hashes the destination is known to hold; starts as an all-zero region.
        self.baseline: U64 = zero_page_hashes(region)

    def acknowledge(self, runs: U64, hashes: U64) -> None:
        """Record the hashes the destination reported for the pages of ``runs`` (in run order)."""
        self.baseline[runs_to_pages(runs)] = hashes

    def collect(self, out: U64) -> int:
        return hash_delta_parallel(self.region, self.baseline, out, self.threads)


class WritesTracker(Tracker):
    """Dirty = the program marked the page with ``Region.mark_dirty`` or ``Region.write``."""

    name = "writes"

    def start(self) -> None:
        self.region.take_written(new_bitmap(self.region.npages))

    def collect(self, out: U64) -> int:
        return self.region.take_written(out)


class UffdTracker(Tracker):
    """Dirty = the kernel saw a write (userfaultfd async write-protect + ``PAGEMAP_SCAN``, Linux >= 6.7).

    Sees every write to the region, whoever makes it (Python, NumPy, a C
    library, any thread), and costs per round in proportion to the written
    pages, not to the region. The region must be private anonymous memory
    (``Region.allocate``) with pages of at least the system page size.
    """

    name = "uffd"

    def __init__(self, region: Region) -> None:
        super().__init__(region)
        reason = _userfault.tracker_reason(region)
        if reason is not None:
            raise ValueError(
                f"tracker='uffd' cannot track this region: {reason}; "
                "use tracker='hash' (or 'auto'), or a region from migcore.Region.allocate"
            )
        self._uffd = _userfault.module()
        self._fd = -1
        self._pagemap = -1
        self._addr, self._length = _userfault.span(region)

    def start(self) -> None:
        """Register the region in async write-protect mode and protect every page."""
        uffd = self._uffd
        self._fd, _ = uffd.open_uffd(uffd.FEATURE_WP_ASYNC | uffd.FEATURE_WP_UNPOPULATED)
        try:
            self._pagemap = os.open("/proc/self/pagemap", os.O_RDONLY | os.O_CLOEXEC)
            uffd.register(self._fd, self._addr, self._length, uffd.REGISTER_MODE_WP)
            uffd.write_protect(self._fd, self._addr, self._length, True)
        except OSError as exc:
            self.close()
            raise MigrationError(f"tracker='uffd' could not register the region: {exc}") from exc

    def collect(self, out: U64) -> int:
        """The pages written since the last call; they are write-protected again in the same ioctl."""
        if self._fd < 0:
            raise RuntimeError("UffdTracker.collect() before start()")
        return int(self._uffd.scan_written(self._pagemap, self._addr, self.region.nbytes, self.region.page_size, out))

    def close(self) -> None:
        if self._fd >= 0:
            try:
                self._uffd.unregister(self._fd, self._addr, self._length)
            except OSError as exc:  # closing the descriptor unregisters too
                log.debug("uffd tracker: unregister failed: %s", exc)
            self._uffd.close_fd(self._fd)
            self._fd = -1
        if self._pagemap >= 0:
            os.close(self._pagemap)
            self._pagemap = -1


#: The tracker classes by name; the keys are exactly ``_names.TRACKERS`` (a test checks it).
TRACKERS: dict[_names.Tracker, type[Tracker]] = {"hash": HashTracker, "writes": WritesTracker, "uffd": UffdTracker}


def resolve_tracker(name: str, region: Region) -> str:
    """The tracker ``name`` stands for: ``"auto"`` is uffd when kernel and region allow it, else hash."""
    if name == "auto":
        reason = _userfault.tracker_reason(region)
        if reason is None:
            return "uffd"
        log.debug("tracker auto: not using uffd (%s); using hash", reason)
        return "hash"
    if name == "uffd":
        reason = _userfault.tracker_reason(region)
        if reason is not None:
            raise ValueError(
                f"tracker='uffd' cannot track this region: {reason}; "
                "use tracker='hash' (or 'auto'), or a region from migcore.Region.allocate"
            )
    return name


def make_tracker(name: str, region: Region) -> Tracker:
    """The tracker called ``name``; ``"auto"`` picks the best one the region and platform allow."""
    if name == "auto":
        name = resolve_tracker(name, region)
    try:
        cls = TRACKERS[name]  # type: ignore[index]  # any str may arrive; an unknown one is the KeyError
    except KeyError:
        raise ValueError(f"unknown tracker {name!r}; choose one of {list(_names.TRACKER_CHOICES)}") from None
    return cls(region)
