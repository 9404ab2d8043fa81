"""The memory that moves: a writable, C-contiguous buffer seen as a sequence of pages."""

from __future__ import annotations

import mmap
import sys
import threading
from typing import Any, TypeAlias, cast

import numpy as np
from numpy.typing import NDArray

from migcore import _kernels

if sys.version_info >= (3, 12):
    from collections.abc import Buffer
else:
    from typing_extensions import Buffer

#: Hash tables, bitmaps and runs tables: the arrays every module passes around.
U64 = NDArray[np.uint64]

MIN_PAGE_SIZE = 512
MAX_PAGE_SIZE = 1 << 30


def check_page_size(page_size: int) -> int:
    """Return ``page_size`` if it is a power of two from 512 B to 1 GiB, else raise."""
    if isinstance(page_size, bool) or not isinstance(page_size, int):
        raise TypeError(f"page_size must be an int, not {type(page_size).__name__}")
    if not MIN_PAGE_SIZE <= page_size <= MAX_PAGE_SIZE or page_size & (page_size - 1):
        raise ValueError(
            f"page_size must be a power of two from {MIN_PAGE_SIZE} to {MAX_PAGE_SIZE}, got {page_size}"
        )
    return page_size


def bitmap_words(nbits: int) -> int:
    """How many uint64 words hold ``nbits`` bits."""
    return (nbits + 63) // 64


def new_bitmap(nbits: int) -> NDArray[np.uint64]:
    """A zeroed bitmap of ``nbits`` bits in the fast path's layout."""
    return np.zeros(bitmap_words(nbits), dtype=np.uint64)


def count_bits_in(bitmap: NDArray[np.uint64], start: int, stop: int) -> int:
    """Set bits in ``[start, stop)``, touching only the words of that range."""
    if stop <= start:
        return 0
    w0 = start >> 6
    bits = np.unpackbits(bitmap[w0 : bitmap_words(stop)].view(np.uint8), bitorder="little")
    return int(bits[start - (w0 << 6) : stop - (w0 << 6)].sum())


def runs_in(bitmap: NDArray[np.uint64], start: int, stop: int, out: NDArray[np.uint64], max_run: int = 0) -> int:
    """Write the runs of set bits inside ``[start, stop)`` into ``out``; return how many (at most ``len(out)``).

    Runs are at most ``max_run`` pages long (0: no cap), as with ``dirty_runs``.
    """
    if stop <= start:
        return 0
    w0 = start >> 6
    base = w0 << 6
    nruns, _ = _kernels.dirty_runs(bitmap[w0 : bitmap_words(stop)], stop - base, out, start - base, max_run)
    if nruns:
        out[:nruns, 0] += np.uint64(base)
    return int(nruns)


def fit_runs(runs: NDArray[np.uint64], cap: int, page_size: int) -> int:
    """How many leading runs of ``runs`` hold at most ``cap`` bytes of pages (at least one).

    The one place a batch is cut to size: the pre-copy batches, the
    post-copy window and a demanded range all ask it.
    """
    sizes = np.cumsum(runs[:, 1].astype(np.int64)) * page_size
    return max(1, int(np.searchsorted(sizes, cap, side="right")))


def pages_to_runs(pages: NDArray[np.intp]) -> NDArray[np.uint64]:
    """Runs ``(first, count)`` of an ascending array of distinct page indices."""
    breaks = np.flatnonzero(np.diff(pages) != 1) + 1
    starts = np.concatenate(([0], breaks))
    ends = np.concatenate((breaks, [len(pages)]))
    return np.stack((pages[starts], ends - starts), axis=1).astype(np.uint64)


def bits_at(bitmap: NDArray[np.uint64], pages: NDArray[np.intp]) -> NDArray[np.bool_]:
    """Whether each of ``pages`` is set in ``bitmap``."""
    bits: NDArray[np.bool_] = ((bitmap[pages >> 6] >> (pages & 63).astype(np.uint64)) & np.uint64(1)).astype(bool)
    return bits


class Region:
    """A writable, C-contiguous buffer that migcore moves page by page.

    Wraps a ``bytearray``, NumPy array, ``mmap``, ``SharedMemory.buf`` or any
    other writable buffer without copying it. The last page may be partial.
    A program that knows what it writes can report it with :meth:`mark_dirty`
    or write through :meth:`write`, which makes the ``"writes"`` tracker the
    cheapest way to find dirty pages.
    """

    __slots__ = ("_obj", "_view", "_page_size", "_npages", "_written", "_lock", "_mapping")

    def __init__(self, buffer: RegionSource, page_size: int = 4096) -> None:
        check_page_size(page_size)
        if isinstance(buffer, Region):
            buffer = buffer.obj
        try:
            view = memoryview(cast("Buffer", buffer))  # an ndarray is one at run time on every version
        except TypeError:
            raise TypeError(
                f"a Region needs a writable buffer (bytearray, numpy array, mmap, ...), "
                f"not {type(buffer).__name__}"
            ) from None
        if view.readonly:
            raise TypeError(f"a Region needs a writable buffer; this {type(buffer).__name__} is read-only")
        if not view.c_contiguous:
            raise ValueError("a Region needs a C-contiguous buffer; pass a contiguous copy or slice")
        if view.nbytes == 0:
            raise ValueError("a Region cannot be empty")
        if view.ndim != 1 or view.format != "B":
            view = view.cast("B")
        self._obj: Any = buffer
        self._view = view
        self._page_size = page_size
        self._npages = -(-view.nbytes // page_size)
        self._written = new_bitmap(self._npages)
        self._lock = threading.Lock()
        self._mapping: mmap.mmap | None = None

    @classmethod
    def allocate(cls, nbytes: int, page_size: int = 4096) -> Region:
        """A zero-filled, page-aligned private anonymous mapping of ``nbytes`` bytes."""
        if isinstance(nbytes, bool) or not isinstance(nbytes, int):
            raise TypeError(f"nbytes must be an int, not {type(nbytes).__name__}")
        if nbytes <= 0:
            raise ValueError(f"nbytes must be positive, got {nbytes}")
        check_page_size(page_size)
        mapping = mmap.mmap(
            -1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS, prot=mmap.PROT_READ | mmap.PROT_WRITE
        )
        region = cls(mapping, page_size)
        region._mapping = mapping
        return region

    @property
    def view(self) -> memoryview:
        """A writable 1-D ``memoryview`` of the region's bytes."""
        return self._view

    @property
    def obj(self) -> Any:
        """The buffer object this region wraps."""
        return self._obj

    @property
    def nbytes(self) -> int:
        return self._view.nbytes

    @property
    def page_size(self) -> int:
        return self._page_size

    @property
    def npages(self) -> int:
        """Number of pages, counting a partial last page."""
        return self._npages

    def array(self) -> NDArray[np.uint8]:
        """The region as a writable NumPy ``uint8`` array (no copy)."""
        return np.frombuffer(self._view, dtype=np.uint8)

    def _check_span(self, offset: int, length: int) -> None:
        if offset < 0 or length < 0 or offset + length > self.nbytes:
            raise ValueError(f"byte range [{offset}, {offset + length}) outside the region's {self.nbytes} bytes")

    def mark_dirty(self, offset: int, length: int) -> None:
        """Record that bytes ``[offset, offset + length)`` were written (for the ``"writes"`` tracker)."""
        self._check_span(offset, length)
        if length == 0:
            return
        first = offset // self._page_size
        stop = (offset + length - 1) // self._page_size + 1
        with self._lock:
            _kernels.set_bits(self._written, first, stop)

    def mark_pages(self, pages: Any) -> None:
        """Record that the pages with these indices were written (vectorized ``mark_dirty``)."""
        idx = np.asarray(pages, dtype=np.int64).ravel()
        if idx.size == 0:
            return
        if idx.min() < 0 or idx.max() >= self._npages:
            raise ValueError(f"page index outside the region's {self._npages} pages")
        words = idx >> 6
        bits = np.left_shift(np.uint64(1), (idx & 63).astype(np.uint64))
        with self._lock:
            np.bitwise_or.at(self._written, words, bits)

    def write(self, offset: int, data: Any) -> None:
        """Copy ``data`` into the region at ``offset`` and mark those pages dirty."""
        src = memoryview(data).cast("B")
        self._check_span(offset, src.nbytes)
        self._view[offset : offset + src.nbytes] = src
        self.mark_dirty(offset, src.nbytes)

    def take_written(self, out: NDArray[np.uint64]) -> int:
        """Move the pages marked written since the last call into ``out``; return their count.

        The marks are cleared before the caller reads the pages, so a write
        that lands while they are being sent is marked again and resent.
        """
        with self._lock:
            out[:] = self._written
            self._written[:] = 0
        return int(_kernels.count_bits(out))

    def __len__(self) -> int:
        return self.nbytes

    def __repr__(self) -> str:
        return f"<migcore.Region {self.nbytes} bytes, {self._npages} pages of {self._page_size}>"


#: What ``migrate()`` and ``recover()`` move: any buffer, or a :class:`Region` over one. NumPy arrays are named
#: too: their stubs declare ``__buffer__`` (what makes a ``Buffer``) only from Python 3.12 on.
RegionSource: TypeAlias = "Buffer | NDArray[Any] | Region"
