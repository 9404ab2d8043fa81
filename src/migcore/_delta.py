"""The source's delta-encoding cache (QEMU's ``xbzrle-cache-size``): bounded, LRU, trusted only once acknowledged.

The cache keeps, for up to ``cache_bytes // page_size`` pages, the exact
bytes last sent (the fast path copies each page once, encodes it and stores
those bytes). A row becomes a *base* for the next delta only when the
destination's ACK hash for that page equals the row's hash (DESIGN.md rule
1: the delta is taken against what the destination stored, not what the
source meant to send); a mismatch drops the row. Slots are recycled least
recently used first, with whole-batch NumPy operations (no loop per page).
"""

from __future__ import annotations

import threading

import numpy as np
import xxhash
from numpy.typing import NDArray

from migcore import _kernels
from migcore._region import U64
from migcore._trackers import runs_to_pages


#: Default cache size (QEMU's default xbzrle-cache-size is 64 MiB too).
DEFAULT_CACHE_BYTES = 64 << 20


class DeltaCache:
    """Page copies the destination is known to hold, by page index, shared by the sending threads."""

    def __init__(self, npages: int, page_size: int, nbytes: int, cache_bytes: int = DEFAULT_CACHE_BYTES) -> None:
        self.page_size = page_size
        self.nbytes = nbytes
        nslots = max(0, min(npages, cache_bytes // page_size))
        self.rows = np.zeros((nslots, page_size), dtype=np.uint8)  # calloc: untouched rows cost no memory
        self.page_slot = np.full(npages, -1, dtype=np.int64)
        self.slot_page = np.full(nslots, -1, dtype=np.int64)
        self.slot_age = np.zeros(nslots, dtype=np.int64)
        self.confirmed = np.zeros(nslots, dtype=bool)
        self.tick = 0
        self.lock = threading.Lock()
        self.hits = 0
        self.misses = 0
        self.overflow = 0
        self.evictions = 0

    def _assign(self, pages: NDArray[np.intp]) -> NDArray[np.int64]:
        """Slots for ``pages``: their own where cached, else the least recently used ones (or -1)."""
        self.tick += 1
        slots = self.page_slot[pages].copy()
        have = slots >= 0
        self.slot_age[slots[have]] = self.tick
        need = np.flatnonzero(~have)
        if len(need) and len(self.slot_age):
            free = np.flatnonzero(self.slot_age < self.tick)  # not used by this batch
            k = min(len(need), len(free))
            if k:
                if k < len(free):
                    free = free[np.argpartition(self.slot_age[free], k - 1)[:k]]
                old = self.slot_page[free]
                evicted = old[old >= 0]
                self.evictions += len(evicted)
                self.page_slot[evicted] = -1
                take = need[:k]
                slots[take] = free
                self.page_slot[pages[take]] = free
                self.slot_page[free] = pages[take]
                self.slot_age[free] = self.tick
                self.confirmed[free] = False
        return slots

    def encode(self, view: memoryview, runs: U64, out: bytearray) -> tuple[int, int]:
        """Encode the pages of ``runs`` into ``out`` (see ``delta_encode_runs``); returns ``(size, hits)``."""
        pages = runs_to_pages(runs)
        with self.lock:
            slots = self._assign(pages)
            bases = np.zeros(len(pages), dtype=np.uint8)
            cached = slots >= 0
            bases[cached] = self.confirmed[slots[cached]]
            # what is sent now is the row's content from here on, trusted only after its ACK
            self.confirmed[slots[cached]] = False
            size, overflow = _kernels.delta_encode_runs(view, self.page_size, runs, self.rows, slots, bases, out)
            hits = int(bases.sum())
            self.hits += hits
            self.misses += len(pages) - hits
            self.overflow += overflow
        return size, hits

    def acknowledge(self, runs: U64, hashes: U64) -> None:
        """The destination stored pages with ``hashes``: rows that match become bases, the others are dropped."""
        pages = runs_to_pages(runs)
        if not len(pages) or not len(self.rows):
            return
        with self.lock:
            slots = self.page_slot[pages]
            cached = slots >= 0
            if not cached.any():
                return
            pages, slots, acked = pages[cached], slots[cached], hashes[cached]
            got = np.empty(len(self.rows), dtype=np.uint64)
            order = np.sort(slots).astype(np.uint64)
            table = np.stack([order, np.ones_like(order)], axis=1)
            _kernels.hash_runs(self.rows.data, self.page_size, table, got)
            mine = got[slots]
            last = -(-self.nbytes // self.page_size) - 1
            tail = self.nbytes - last * self.page_size
            partial = pages == last
            if tail != self.page_size and partial.any():
                row = self.rows[int(slots[partial][0]), :tail]
                mine[partial] = xxhash.xxh3_64_intdigest(row.tobytes())
            ok = mine == acked
            self.confirmed[slots[ok]] = True
            bad = slots[~ok]
            self.page_slot[pages[~ok]] = -1
            self.slot_page[bad] = -1
            self.slot_age[bad] = 0
            self.confirmed[bad] = False
