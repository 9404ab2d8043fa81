"""Which pages of a region have memory behind them: the rest are zero without being read.

A page of private anonymous memory that was never written (or was given
back with ``MADV_DONTNEED``) has no page frame: it reads as zeros, and the
kernel knows it. Asking the kernel (one ``PAGEMAP_SCAN``, Linux 6.7, or a
read of ``/proc/self/pagemap`` before that) costs a page-table walk instead
of reading every byte, so a sparse region's zero scan and hash pass read
only the pages that hold memory, as CRIU does when it dumps a process.

The answer is a bitmap of *resident* pages (present in RAM, swapped out,
or anything else the kernel cannot rule out); the fast path's
``resident=`` argument then skips the others. It is only ever given where
a non-present page is certainly zero:

- the region's memory must be private anonymous (``Region.allocate``, the
  heap, an anonymous ``MAP_PRIVATE`` mapping): a non-present page of a file
  or of shared memory may hold data the kernel has not mapped here;
- it must not be registered with a userfaultfd in missing-page mode (a
  destination still receiving post-copy pages): there a non-present page is
  owed, not zero. migcore's own registrations are recorded in
  :mod:`migcore._userfault`;
- the caller must tolerate a page becoming resident after the query: every
  use reads the region either while it is paused, or in a pre-copy round
  whose later rounds (and final pass, paused) see the page again.

Before it is trusted, each way of asking is checked once on a probe mapping
(a written page must count, an untouched one must not). Set
``MIGCORE_RESIDENCY=0`` in the environment to read every page anyway.
"""

from __future__ import annotations

import functools
import logging
import os
import sys

import numpy as np

from migcore import _userfault
from migcore._region import Region, U64, bitmap_words

log = logging.getLogger("migcore")


#: Below this size the query is not worth its system calls: every page is read.
MIN_BYTES = 4 << 20

#: /proc/self/pagemap entry bits (Documentation/admin-guide/mm/pagemap.rst).
_PM_PRESENT = np.uint64(1 << 63)
_PM_SWAPPED = np.uint64(1 << 62)


def enabled() -> bool:
    """False when the user turned the shortcut off (``MIGCORE_RESIDENCY=0``)."""
    return os.environ.get("MIGCORE_RESIDENCY", "1").strip().lower() not in ("0", "no", "false", "off")


def region_reason(region: Region) -> str | None:
    """Why a non-present page of ``region`` might not be zero (so every page must be read); None if it is."""
    if not sys.platform.startswith("linux"):
        return f"pagemap is Linux-only (this is {sys.platform})"
    if not _userfault.available():
        return "migcore._uffd is not built"
    addr, length = _userfault.system_span(region)
    if _userfault.missing_registered(addr, length):
        return "it is registered for post-copy (its non-present pages are owed, not zero)"
    if region._mapping is not None:
        return None  # Region.allocate: private anonymous by construction
    return _userfault.anonymous_private(addr, addr + length)


@functools.lru_cache(maxsize=1)
def _method() -> str | None:
    """How to ask this kernel: ``"scan+pfnzero"``, ``"scan"``, ``"pagemap"``, or None (it cannot say).

    Each way is tried on a probe mapping of three system pages (written,
    untouched, only read) and trusted only if it reports the written page and
    not the untouched one: an emulated or restricted pagemap that answered
    "nothing is resident" would otherwise make real data look like zeros.
    """
    sp = _userfault.SYSTEM_PAGE
    probe = Region.allocate(3 * sp, sp)
    try:
        probe.view[0] = 1
        _ = probe.view[2 * sp]  # only read: the shared zero page

        def answers(bitmap: U64 | None) -> bool:
            if bitmap is None:
                return False
            got = int(bitmap[0]) & 0b111
            return got & 0b011 == 0b001  # the written page counts, the untouched one does not

        addr = _userfault.module().address_of(probe.view)
        for name, skip in (("scan+pfnzero", True), ("scan", False)):
            try:
                if answers(_scan(probe, addr, skip)):
                    return name
            except OSError:
                continue
        try:
            if answers(from_pagemap(probe)):
                return "pagemap"
        except OSError as exc:
            log.debug("residency: /proc/self/pagemap unreadable: %s", exc)
        log.debug("residency: the kernel's page map fails the probe; every page will be read")
        return None
    finally:
        probe.view.release()
        if probe._mapping is not None:
            probe._mapping.close()


def _scan(region: Region, addr: int, skip_zero_pfn: bool) -> U64:
    uffd = _userfault.module()
    out = np.zeros(bitmap_words(region.npages), np.uint64)
    fd = os.open("/proc/self/pagemap", os.O_RDONLY | os.O_CLOEXEC)
    try:
        uffd.scan_resident(fd, addr, region.nbytes, region.page_size, out, skip_zero_pfn)
    finally:
        os.close(fd)
    return out


def from_pagemap(region: Region) -> U64:
    """The resident bitmap from ``/proc/self/pagemap`` entries (any Linux; the zero page counts as resident)."""
    uffd = _userfault.module()
    sp = _userfault.SYSTEM_PAGE
    addr = uffd.address_of(region.view)
    out = np.zeros(bitmap_words(region.npages), np.uint64)
    if region.nbytes == 0:
        return out
    first_sys = addr // sp
    last_sys = (addr + region.nbytes - 1) // sp
    count = last_sys - first_sys + 1
    fd = os.open("/proc/self/pagemap", os.O_RDONLY | os.O_CLOEXEC)
    try:
        raw = b""
        offset = first_sys * 8
        while len(raw) < count * 8:  # pagemap reads may come back short
            chunk = os.pread(fd, count * 8 - len(raw), offset + len(raw))
            if not chunk:
                raise OSError(f"/proc/self/pagemap ended after {len(raw) // 8} of {count} entries")
            raw += chunk
    finally:
        os.close(fd)
    entries = np.frombuffer(raw, dtype="<u8")
    held = (entries & (_PM_PRESENT | _PM_SWAPPED)) != 0
    # region page i covers system pages [lo_i, hi_i]; it is resident if any of them is
    ps = region.page_size
    starts = addr + np.arange(region.npages, dtype=np.uint64) * np.uint64(ps)
    ends = np.minimum(starts + np.uint64(ps), np.uint64(addr + region.nbytes)) - np.uint64(1)
    lo = (starts // np.uint64(sp) - np.uint64(first_sys)).astype(np.intp)
    hi = (ends // np.uint64(sp) - np.uint64(first_sys)).astype(np.intp)
    cumulative = np.concatenate(([0], np.cumsum(held, dtype=np.int64)))
    flags = cumulative[hi + 1] - cumulative[lo] > 0
    padded = np.zeros(len(out) * 64, dtype=bool)
    padded[: region.npages] = flags
    out[:] = np.packbits(padded, bitorder="little").view(np.uint64)
    return out


def resident_pages(region: Region) -> U64 | None:
    """Bitmap of the pages that may hold non-zero bytes, or None: read every page.

    None when the shortcut is off, the region is small, its memory is not
    private anonymous, or the kernel cannot say.
    """
    if region.nbytes < MIN_BYTES or not enabled():
        return None
    reason = region_reason(region)
    if reason is not None:
        log.debug("residency: reading every page of the region: %s", reason)
        return None
    addr = _userfault.module().address_of(region.view)
    try:
        method = _method()
        if method is None:
            return None
        if method == "pagemap":
            return from_pagemap(region)
        return _scan(region, addr, method == "scan+pfnzero")
    except OSError as exc:
        log.debug("residency: pagemap unavailable, reading every page: %s", exc)
        return None
