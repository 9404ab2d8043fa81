"""Vectorized page writes: fill a region with a seeded mix of random and zero pages, touch chosen pages.

The writes of :class:`migcore.bench.workload.Workload` and the set-up of
every benchmark region: one NumPy assignment per batch of pages, never a
Python loop over them, and never past the end of a partial last page.
"""

from __future__ import annotations

import mmap
from typing import Any

import numpy as np
from numpy.typing import NDArray

from migcore._region import Region

#: XOR mask used by ``flipflop`` writes.
FLIP_MASK = np.uint64(0xA5A5_5A5A_F00F_0FF0)
_GOLDEN = np.uint64(0x9E37_79B9_7F4A_7C15)


def _u64(value: int) -> np.uint64:
    return np.uint64(value & 0xFFFF_FFFF_FFFF_FFFF)


def as_region(buffer: Any, page_size: int) -> Region:
    return buffer if isinstance(buffer, Region) else Region(buffer, page_size)


def _full_pages_u8(region: Region) -> NDArray[np.uint8]:
    """The region's whole pages as a writable ``(nfull, page_size)`` uint8 array (no copy)."""
    nfull = region.nbytes // region.page_size
    return region.array()[: nfull * region.page_size].reshape(nfull, region.page_size)


def fill(
    region: Region | Any,
    *,
    random_fraction: float = 0.5,
    seed: int = 0,
    page_size: int = 4096,
    chunk_pages: int = 4096,
    write_zeros: bool = False,
) -> NDArray[np.intp]:
    """Fill a ``random_fraction`` of the region's pages with random bytes; zero the rest.

    Which pages are random, and their bytes, depend only on ``seed``. Returns
    the sorted indices of the random pages. Works in chunks of
    ``chunk_pages`` so it never holds a second copy of the region.

    A region from ``Region.allocate`` is zeroed by giving its memory back
    (``MADV_DONTNEED``), so its zero pages hold no memory, as in a program
    whose large allocation is only partly used; ``write_zeros`` writes the
    zeros instead, so every page is backed by memory (the harder case for a
    zero scan).
    """
    if not 0.0 <= random_fraction <= 1.0:
        raise ValueError(f"random_fraction must be in [0, 1], got {random_fraction}")
    region = as_region(region, page_size)
    rng = np.random.default_rng(seed)
    nrandom = round(random_fraction * region.npages)
    pages = np.sort(rng.choice(region.npages, size=nrandom, replace=False)).astype(np.intp)
    arr = region.array()
    mapping = region._mapping
    if mapping is not None and not write_zeros:
        mapping.madvise(mmap.MADV_DONTNEED)  # private anonymous: reads as zeros, holds no memory
    else:
        arr[:] = 0
    ps = region.page_size
    nfull = region.nbytes // ps
    full = _full_pages_u8(region)
    whole = pages[pages < nfull]
    for lo in range(0, len(whole), chunk_pages):
        chunk = whole[lo : lo + chunk_pages]
        full[chunk] = np.frombuffer(rng.bytes(len(chunk) * ps), dtype=np.uint8).reshape(len(chunk), ps)
    if len(whole) < len(pages):  # the partial last page
        tail = arr[nfull * ps :]
        tail[:] = np.frombuffer(rng.bytes(len(tail)), dtype=np.uint8)
    return pages


def touch(
    region: Region,
    pages: NDArray[np.integer[Any]],
    *,
    generation: int = 1,
    write_bytes: int = 8,
    flipflop: bool = False,
    mark: bool = True,
) -> None:
    """Write ``write_bytes`` bytes at the start of each page in ``pages`` (unique indices).

    Without ``flipflop`` the bytes are derived from ``generation`` and the page
    index, so a later generation changes the page again; with it they are
    XOR-ed with a fixed mask, so each touch toggles the page between two
    contents. With ``mark`` the pages are reported to the region
    (``Region.mark_pages``) after they are written. One vectorized assignment
    for the whole pages, and at most one small one for a partial last page.
    """
    pages = np.asarray(pages, dtype=np.intp)
    if pages.size == 0:
        return
    ps = region.page_size
    if write_bytes < 8 or write_bytes > ps or write_bytes % 8:
        raise ValueError(f"write_bytes must be a multiple of 8 from 8 to the page size {ps}, got {write_bytes}")
    if pages.min() < 0 or pages.max() >= region.npages:
        raise ValueError(f"page index outside the region's {region.npages} pages")
    nfull = region.nbytes // ps
    words = write_bytes // 8
    arr = region.array()
    whole = pages[pages < nfull]
    if whole.size:
        # (nfull, ps // 8) uint64 view of the whole pages; unaligned buffers are fine for NumPy
        grid = arr[: nfull * ps].view(np.uint64).reshape(nfull, ps // 8)
        if flipflop:
            grid[whole, :words] ^= FLIP_MASK
        else:
            base = (whole.astype(np.uint64) + np.uint64(1)) * _GOLDEN ^ _u64(generation)
            if words == 1:
                grid[whole, 0] = base
            else:
                grid[whole, :words] = base[:, None] + np.arange(words, dtype=np.uint64) * _GOLDEN
    if whole.size < pages.size:  # the partial last page: never write past the end
        tail = arr[nfull * ps :]
        n = min(write_bytes, tail.size)
        if flipflop:
            mask = np.full(1 + n // 8, FLIP_MASK, dtype=np.uint64).view(np.uint8)[:n]
            tail[:n] ^= mask
        else:
            last = np.array([region.npages], dtype=np.uint64) * _GOLDEN ^ _u64(generation)
            vals = last + np.arange(1 + n // 8, dtype=np.uint64) * _GOLDEN
            tail[:n] = vals.view(np.uint8)[:n]
    if mark:
        region.mark_pages(pages)
