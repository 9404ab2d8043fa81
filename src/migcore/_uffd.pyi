"""Type stub of ``migcore._uffd``: userfaultfd and PAGEMAP_SCAN (Linux), used by ``_userfault`` and its callers.

Addresses are plain ints (``address_of`` a buffer the caller keeps alive);
lengths are bytes, rounded up to whole system pages by the caller where the
kernel needs it. System calls raise ``OSError`` carrying the real errno.
"""

import sys

import numpy as np
from numpy.typing import NDArray

from migcore._protocol import LoopLayout

if sys.version_info >= (3, 12):
    from collections.abc import Buffer
else:
    from typing_extensions import Buffer

_U64 = NDArray[np.uint64]

SYSTEM_PAGE: int
REGISTER_MODE_MISSING: int
REGISTER_MODE_WP: int
FEATURE_WP_UNPOPULATED: int
FEATURE_WP_ASYNC: int

SERVE_EOF: int
SERVE_TIMEOUT: int
SERVE_PROTOCOL: int
SERVE_OS: int
SERVE_STOPPED: int

INFO_REMAINING: int
INFO_DEMANDS: int
INFO_PAGES: int
INFO_PAYLOAD: int
INFO_WIRE: int
INFO_ERRNO: int
INFO_HEADER: int
INFO_DETAIL: int
INFO_WHERE: int
INFO_READY: int
INFO_ZERO: int
INFO_SIZE: int

PROTOCOL_DETAILS: dict[int, str]
OS_WHERE: dict[int, str]

def address_of(buf: Buffer) -> int:
    """The address of a buffer's first byte."""

def open_uffd(features: int, user_mode_only: bool = False) -> tuple[int, int]:
    """A non-blocking userfaultfd after UFFDIO_API(``features``): ``(fd, features_available)``."""

def close_fd(fd: int) -> None:
    """close(2), ignoring errors."""

def register(fd: int, addr: int, length: int, mode: int) -> int:
    """UFFDIO_REGISTER; returns the ioctls allowed on the range."""

def unregister(fd: int, addr: int, length: int) -> None:
    """UFFDIO_UNREGISTER (wakes threads blocked on the range)."""

def fill_owed(fd: int, addr: int, nbytes: int, page_size: int, owed: _U64) -> int:
    """Zero pages where ``owed`` is set, wake every blocked thread, unregister; returns the pages filled."""

def write_protect(fd: int, addr: int, length: int, protect: bool = True) -> None:
    """UFFDIO_WRITEPROTECT the range (or lift it)."""

def scan_written(pagemap_fd: int, addr: int, length: int, page_size: int, out: _U64) -> int:
    """PAGEMAP_SCAN the written pages into bitmap ``out`` and re-protect them atomically; returns the count."""

def scan_resident(
    pagemap_fd: int, addr: int, length: int, page_size: int, out: _U64, skip_zero_pfn: bool = True
) -> int:
    """PAGEMAP_SCAN the pages with memory behind them (present or swapped, not the zero page) into ``out``; returns the count."""

def discard_pages(addr: int, nbytes: int, page_size: int, bitmap: _U64) -> None:
    """madvise(MADV_DONTNEED) the pages set in ``bitmap``."""

def touch(addr: int, length: int, step: int) -> None:
    """Read a byte every ``step`` bytes, without the GIL (faults the pages in)."""

def serve_postcopy(
    layout: LoopLayout,
    uffd: int,
    sock: int,
    wake_fd: int,
    addr: int,
    nbytes: int,
    page_size: int,
    owed: _U64,
    table: _U64,
    info: _U64,
    max_runs: int,
    max_payload: int,
    timeout: float,
) -> int:
    """The post-copy fault-service loop (no GIL); 0 at a non-PAGES frame, else a negative ``SERVE_*`` code.

    ``layout`` is ``_protocol.LOOP_LAYOUT``: the frame numbers and flags it reads and writes.
    """

# The loop's own frame code, for tests against ``_protocol``.
def encode_header(ftype: int, flags: int, count: int, length: int) -> bytes:
    """The 16 header bytes the loop writes for these fields."""

def decode_header(data: Buffer) -> tuple[int, int, int, int, int]:
    """``(type, flags, reserved, count, length)`` as the loop reads a header."""

def classify_header(layout: LoopLayout, data: Buffer) -> int:
    """0 not PAGES (the loop stops), 1 post-copy pages, 2 a zero notice, or minus a ``PROTOCOL_DETAILS`` key."""

def encode_demand(layout: LoopLayout, runs: _U64) -> bytes:
    """The DEMAND frame the loop sends for an ``(n, 2)`` array of sorted, merged runs."""

def decode_runs(table: Buffer, out: _U64) -> int:
    """Read a runs table into ``out`` as (first, count) pairs; returns the run count."""
