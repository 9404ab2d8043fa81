"""The source's side of post-copy: push every owed page exactly once, demanded ones first.

After the destination confirmed the switch, a reader thread takes the
destination's demands off the link while the push loop sends batches: the
oldest demanded range first, else the next background batch from a cursor
that only moves forward. A page leaves the owed bitmap before its bytes go
out, so no page is sent twice. In pure post-copy (nothing was sent before
the switch) the all-zero pages of each batch go as zero notices instead of
their bytes, and every page is hashed as it leaves, so END carries the digest
of the pause.
"""

from __future__ import annotations

import collections
import threading

import numpy as np

from migcore import _kernels
from migcore import _protocol as P
from migcore._errors import MigrationTimeout
from migcore._region import Region, U64, bits_at, count_bits_in, fit_runs, new_bitmap, pages_to_runs, runs_in
from migcore._source_link import SourceLink
from migcore._stats import StatsRecorder
from migcore._trackers import runs_to_pages

#: Pure post-copy: the background push takes its batches from a window of this many batch sizes of
#: owed pages, cut at one batch of non-zero pages (the zero pages in it go as zero notices).
ZERO_WINDOW = 16
#: Rows of the runs scratch table.
SCRATCH_RUNS = 256

_EMPTY = np.empty((0, 2), dtype=np.uint64)


class PostcopyPush:
    """One post-copy push of the ``owed`` pages of a frozen ``region`` over ``link``."""

    def __init__(
        self,
        region: Region,
        link: SourceLink,
        stats: StatsRecorder,
        owed: U64,
        *,
        hash_into: U64 | None,
        zero_notices: bool,
        resident: U64 | None,
        timeout: float | None,
        digest: bytes | None = None,
    ) -> None:
        self.region = region
        self.link = link
        self.stats = stats
        self.owed = owed
        self.hash_into = hash_into
        #: a bit per page scanned so far (1: all zero); None without zero notices
        self.zeros = new_bitmap(region.npages) if zero_notices else None
        #: the pages with memory behind them at the pause (None: read every page)
        self.resident = resident
        self.timeout = timeout
        #: what END carries when no table is hashed as pages go (a recovery knows it up front)
        self.digest = digest
        #: the background zero scan has reached this page
        self.scanned = 0
        self.demands: collections.deque[tuple[int, int]] = collections.deque()
        self.done = threading.Event()
        self.errors: list[BaseException] = []
        self.out = np.empty((SCRATCH_RUNS, 2), dtype=np.uint64)

    def read_demands(self) -> None:
        """Reader thread: queue the destination's demands until it confirms every page."""
        try:
            while True:
                runs = self.link.read_demand()
                if runs is None:
                    self.done.set()
                    return
                self.demands.extend((int(a), int(a + n)) for a, n in runs)
        except BaseException as exc:  # noqa: BLE001 - handed to the push loop
            self.errors.append(exc)
            self.done.set()

    def run(self, count: int) -> None:
        """Push the ``count`` owed pages, end post-copy, and wait for the destination's confirmation."""
        thread = threading.Thread(target=self.read_demands, name="migcore-postcopy-demands", daemon=True)
        thread.start()
        try:
            self.push(count)
            digest = self.digest if self.hash_into is None else P.table_digest(self.hash_into)
            self.link.end_postcopy(digest)
            if not self.done.wait(self.timeout):
                raise MigrationTimeout(f"the destination did not confirm post-copy within {self.timeout:g} s")
            if self.errors:
                raise self.errors[0]
        finally:
            self.link.close()
            thread.join()

    def push(self, count: int) -> None:
        region, ps = self.region, self.region.page_size
        cap = self.link.batch_cap(postcopy=True)
        # background pages come from a window of owed pages (wider with zero notices: a zero page adds no payload)
        window = cap * ZERO_WINDOW if self.zeros is not None else cap
        remaining = count
        cursor = 0
        while remaining:
            if self.errors:
                raise self.errors[0]
            runs = self.next_demanded(cap)
            demanded = runs is not None
            has_zero = demanded  # a demanded batch is scanned below
            if runs is None:
                runs, cursor = self.next_window(cursor, window)
                if self.zeros is not None:  # the window's zero pages cost no payload: cut it at ``cap`` of data
                    runs, cursor, has_zero = self.cut_window(runs, cursor, cap)
            # exactly once: a page leaves the owed bitmap before its bytes go out
            for first, n in runs.tolist():
                _kernels.clear_bits(self.owed, first, first + n)
            remaining -= int(runs[:, 1].sum())
            if self.zeros is not None and has_zero:
                runs, zero_runs = self.split_zero(runs, scan=demanded)
                if len(zero_runs):
                    self.link.send_zero_notice(zero_runs)
                if not len(runs):
                    continue
            if self.hash_into is not None:  # the final hash of a frozen page, taken as it goes out
                _kernels.hash_runs(region.view, ps, runs, self.hash_into)
            self.link.send_postcopy(runs, demanded=demanded)

    def next_window(self, cursor: int, window: int) -> tuple[U64, int]:
        """The next background batch of owed pages at or after ``cursor`` (at most ``window`` bytes)."""
        ps = self.region.page_size
        nruns, resume = _kernels.dirty_runs(self.owed, self.region.npages, self.out, cursor, max(1, window // ps))
        if nruns == 0:
            raise AssertionError("owed pages vanished from the owed bitmap")
        keep = fit_runs(self.out[:nruns], window, ps)
        runs = self.out[:keep].copy()
        return runs, int(runs[-1, 0] + runs[-1, 1]) if keep < nruns else resume

    def next_demanded(self, cap: int) -> U64 | None:
        """The next batch of still-owed pages inside the oldest demanded range, or None."""
        ps = self.region.page_size
        demands, out = self.demands, self.out
        while demands:
            first, stop = demands[0]
            k = runs_in(self.owed, first, stop, out, max(1, cap // ps))
            if k == 0:
                demands.popleft()
                continue
            keep = fit_runs(out[:k], cap, ps)
            runs = out[:keep].copy()
            end = int(runs[-1, 0] + runs[-1, 1])
            if keep < k or k == len(out):
                demands[0] = (end, stop)
            else:
                demands.popleft()
            return runs
        return None

    def scan(self, first: int, stop: int) -> None:
        assert self.zeros is not None
        _kernels.zero_pages(self.region.view, self.region.page_size, self.zeros, first, stop, resident=self.resident)

    def split_zero(self, runs: U64, *, scan: bool = True) -> tuple[U64, U64]:
        """``runs`` split into the runs of non-zero pages and the runs of all-zero pages.

        With ``scan`` the pages of ``runs`` are scanned first, otherwise they
        already were (the region is frozen after the pause, so a scan stays true).
        """
        assert self.zeros is not None
        if scan:
            for first, n in runs.tolist():
                self.scan(first, first + n)
        pages = runs_to_pages(runs)
        is_zero = bits_at(self.zeros, pages)
        nzero = int(is_zero.sum())
        if nzero == 0:
            return runs, _EMPTY
        if nzero == len(pages):
            return _EMPTY, runs
        return pages_to_runs(pages[~is_zero]), pages_to_runs(pages[is_zero])

    def cut_window(self, runs: U64, cursor: int, cap: int) -> tuple[U64, int, bool]:
        """The leading part of a window of owed ``runs`` holding at most ``cap`` bytes of non-zero pages.

        Scans the window's pages past ``scanned`` (each page once: the
        background cursor only moves forward). Returns the runs to send, the
        cursor after them and whether any of their pages is zero.
        """
        assert self.zeros is not None
        ps = self.region.page_size
        for first, n in runs.tolist():
            lo, hi = max(first, self.scanned), first + n
            if lo < hi:
                self.scan(lo, hi)
            self.scanned = max(self.scanned, hi)
        cap_pages = max(1, cap // ps)
        rows = runs.tolist()
        if not any(count_bits_in(self.zeros, first, first + n) for first, n in rows):  # no zero page: cut at cap
            sizes = np.cumsum(runs[:, 1].astype(np.int64))
            if int(sizes[-1]) <= cap_pages:
                return runs, cursor, False
            keep = int(np.searchsorted(sizes, cap_pages, side="left")) + 1  # the run that reaches the cap
            taken = runs[:keep].copy()
            taken[-1, 1] -= np.uint64(int(sizes[keep - 1]) - cap_pages)
            return taken, int(taken[-1, 0] + taken[-1, 1]), False
        pages = runs_to_pages(runs)
        data = np.cumsum(~bits_at(self.zeros, pages))
        cut = max(1, int(np.searchsorted(data, cap_pages, side="right")))
        if cut >= len(pages):
            return runs, cursor, True
        return pages_to_runs(pages[:cut]), int(pages[cut - 1]) + 1, True


def owed_bytes(region: Region, owed: U64, count: int) -> int:
    """Bytes of the ``count`` owed pages (the last page may be short)."""
    ps, npages = region.page_size, region.npages
    last = npages - 1
    short = (npages * ps - region.nbytes) if int(owed[last >> 6]) >> (last & 63) & 1 else 0
    return count * ps - short

