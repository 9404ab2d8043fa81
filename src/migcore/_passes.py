"""What the source reads during (or just before) the pause: the last dirty pages, or what to owe.

Three passes, one per way a switchover starts: after pre-copy rounds
(``final_pass``: the pages that differ from what the destination
acknowledged, and the whole table at once), with nothing sent yet
(``nonzero_pass``: only a zero scan; pages are hashed as they go out), and
pure post-copy (``all_pages``: every page owed, nothing read, so the pause
does not grow with the region). Each counts as one dirty-page
synchronisation in the statistics.
"""

from __future__ import annotations

import numpy as np

from migcore import _kernels
from migcore import _protocol as P
from migcore._region import Region, U64, new_bitmap
from migcore._stats import StatsRecorder
from migcore._trackers import hash_delta_parallel, zero_page_hashes, zero_pages_parallel


def final_pass(region: Region, stats: StatsRecorder, baseline: U64, threads: int) -> tuple[U64, U64, int]:
    """During the pause: dirty pages vs the acknowledged baseline, and the full current hash table."""
    table = baseline.copy()
    dirty = new_bitmap(region.npages)
    count = hash_delta_parallel(region, table, dirty, threads, update=True)
    stats.synced(count, count * region.page_size)
    return dirty, table, count


def nonzero_pass(region: Region, stats: StatsRecorder, threads: int) -> tuple[U64, U64, int]:
    """During the pause, with nothing sent yet: the non-zero pages (what a fresh destination lacks).

    No hashing here: a zero scan reads one cache line of a non-zero page.
    The returned table holds zero-page hashes; the pages are hashed into it
    just before they are sent (the region is frozen from the pause on), so
    the pause does not grow with a full-region hash pass.
    """
    zeros = new_bitmap(region.npages)
    nzero = zero_pages_parallel(region, zeros, threads)
    dirty = np.invert(zeros)
    tail = region.npages & 63
    if tail:
        dirty[-1] &= np.uint64((1 << tail) - 1)
    count = region.npages - nzero
    stats.synced(count, count * region.page_size)
    return dirty, zero_page_hashes(region), count


def all_pages(region: Region, stats: StatsRecorder) -> tuple[U64, int]:
    """Just before the pause of a pure post-copy: every page is owed, nothing is read.

    The zero pages among them are found batch by batch during the push
    and announced with zero notices; the hash table (zero-page hashes,
    built after the switch) takes each pushed page's hash as it goes out,
    and END carries its digest.
    """
    owed = new_bitmap(region.npages)
    _kernels.set_bits(owed, 0, region.npages)
    stats.synced(region.npages, region.nbytes)
    return owed, region.npages


def frozen_digest(region: Region) -> bytes:
    """The digest of every page's hash as the region is now (frozen since the pause: what a recovery ends on)."""
    table = np.empty(region.npages, dtype=np.uint64)
    _kernels.hash_runs(region.view, region.page_size, np.array([[0, region.npages]], dtype=np.uint64), table)
    return P.table_digest(table)
