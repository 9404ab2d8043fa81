"""Plain implementation of the fast path: the specification, the test oracle and the fallback.

Same names, signatures and meanings as ``migcore._fastpath`` (see its
``.pyi``), written for clarity with NumPy, the ``xxhash`` package and
``os.writev``/``os.readv``. It is slow on purpose only where clarity wins.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import xxhash
from numpy.typing import NDArray

__all__ = [
    "and_bits",
    "andnot_bits",
    "clear_bits",
    "compare_hashes",
    "count_bits",
    "dirty_runs",
    "hash_delta",
    "hash_pages",
    "hash_runs",
    "or_bits",
    "recv_runs",
    "runs_nbytes",
    "send_runs",
    "set_bits",
    "zero_pages",
]

_U64 = NDArray[np.uint64]
IOV_MAX = os.sysconf("SC_IOV_MAX") if hasattr(os, "sysconf") else 1024


def _bytes_view(buf: Any, writable: bool = False) -> memoryview:
    view = memoryview(buf)
    if not view.c_contiguous:
        raise ValueError("buffer must be C-contiguous")
    if writable and view.readonly:
        raise TypeError("buffer must be writable")
    return view.cast("B") if view.format != "B" or view.ndim != 1 else view


def _check_page_size(page_size: int) -> None:
    if page_size <= 0:
        raise ValueError(f"page_size must be positive, got {page_size}")


def _npages(nbytes: int, page_size: int) -> int:
    return -(-nbytes // page_size)


def _check_u64(arr: Any, name: str, writable: bool = False) -> None:
    if not isinstance(arr, np.ndarray) or arr.dtype != np.uint64:
        raise TypeError(f"{name} must be a numpy uint64 array")
    if not arr.flags.c_contiguous:
        raise ValueError(f"{name} must be C-contiguous")
    if writable and not arr.flags.writeable:
        raise ValueError(f"{name} must be writable")


def _page_range(npages: int, start: int, stop: int) -> tuple[int, int]:
    if stop == -1:
        stop = npages
    if not 0 <= start <= stop <= npages:
        raise ValueError(f"page range [{start}, {stop}) outside 0..{npages}")
    return start, stop


def _check_bitmap(bitmap: Any, nbits: int, name: str, writable: bool = False) -> None:
    _check_u64(bitmap, name, writable)
    if bitmap.ndim != 1 or bitmap.shape[0] * 64 < nbits:
        raise ValueError(f"{name} needs at least {-(-nbits // 64)} words for {nbits} bits")


def _check_runs(runs: Any, npages: int | None = None) -> _U64:
    _check_u64(runs, "runs")
    if runs.ndim != 2 or runs.shape[1] != 2:
        raise ValueError("runs must have shape (n, 2)")
    if npages is not None:
        for first, count in runs.tolist():
            if first + count > npages:
                raise ValueError(f"run ({first}, {count}) outside the region's {npages} pages")
    return runs  # type: ignore[no-any-return]


def _page(view: memoryview, page_size: int, i: int) -> memoryview:
    return view[i * page_size : (i + 1) * page_size]


def hash_pages(buf: Any, page_size: int, out: _U64, start: int = 0, stop: int = -1) -> None:
    view = _bytes_view(buf)
    _check_page_size(page_size)
    npages = _npages(len(view), page_size)
    _check_u64(out, "out", writable=True)
    if out.ndim != 1 or out.shape[0] < npages:
        raise ValueError(f"out needs at least {npages} items")
    start, stop = _page_range(npages, start, stop)
    for i in range(start, stop):
        out[i] = xxhash.xxh3_64_intdigest(_page(view, page_size, i))


def hash_runs(buf: Any, page_size: int, runs: _U64, out: _U64) -> None:
    view = _bytes_view(buf)
    _check_page_size(page_size)
    npages = _npages(len(view), page_size)
    _check_runs(runs, npages)
    _check_u64(out, "out", writable=True)
    if out.ndim != 1 or out.shape[0] < npages:
        raise ValueError(f"out needs at least {npages} items")
    for first, count in runs.tolist():
        for i in range(first, first + count):
            out[i] = xxhash.xxh3_64_intdigest(_page(view, page_size, i))


def _write_bits(bitmap: _U64, start: int, flags: NDArray[np.bool_]) -> None:
    """Store ``flags`` as bits ``start..start+len(flags)`` of ``bitmap``.

    Only the words holding those bits are rewritten, so threads working on
    64-bit-aligned ranges of one bitmap never undo each other's writes.
    """
    stop = start + len(flags)
    if stop == start:
        return
    words = bitmap[start // 64 : -(-stop // 64)]
    bits = np.unpackbits(words.view(np.uint8), bitorder="little")
    offset = start // 64 * 64
    bits[start - offset : stop - offset] = flags
    words[:] = np.packbits(bits, bitorder="little").view(np.uint64)


def hash_delta(
    buf: Any,
    page_size: int,
    baseline: _U64,
    dirty: _U64,
    start: int = 0,
    stop: int = -1,
    update: bool = False,
) -> int:
    view = _bytes_view(buf)
    _check_page_size(page_size)
    npages = _npages(len(view), page_size)
    _check_u64(baseline, "baseline", writable=update)
    if baseline.ndim != 1 or baseline.shape[0] < npages:
        raise ValueError(f"baseline needs at least {npages} items")
    _check_bitmap(dirty, npages, "dirty", writable=True)
    start, stop = _page_range(npages, start, stop)
    current = np.empty(stop - start, dtype=np.uint64)
    for i in range(start, stop):
        current[i - start] = xxhash.xxh3_64_intdigest(_page(view, page_size, i))
    flags = current != baseline[start:stop]
    _write_bits(dirty, start, flags)
    if update:
        baseline[start:stop] = current
    return int(flags.sum())


def compare_hashes(current: _U64, baseline: _U64, dirty: _U64) -> int:
    _check_u64(current, "current")
    _check_u64(baseline, "baseline")
    if current.ndim != 1 or baseline.ndim != 1 or baseline.shape[0] < current.shape[0]:
        raise ValueError("current and baseline must be 1-D, baseline at least as long")
    n = current.shape[0]
    _check_bitmap(dirty, n, "dirty", writable=True)
    flags = current != baseline[:n]
    _write_bits(dirty, 0, flags)
    return int(flags.sum())


def zero_pages(buf: Any, page_size: int, out: _U64, start: int = 0, stop: int = -1) -> int:
    view = _bytes_view(buf)
    _check_page_size(page_size)
    npages = _npages(len(view), page_size)
    _check_bitmap(out, npages, "out", writable=True)
    start, stop = _page_range(npages, start, stop)
    data = np.frombuffer(view, dtype=np.uint8)
    flags = np.array(
        [not data[i * page_size : (i + 1) * page_size].any() for i in range(start, stop)],
        dtype=bool,
    )
    _write_bits(out, start, flags)
    return int(flags.sum())


def dirty_runs(
    bitmap: _U64, nbits: int, out: _U64, start: int = 0, max_run: int = 0
) -> tuple[int, int]:
    _check_bitmap(bitmap, nbits, "bitmap")
    _check_u64(out, "out", writable=True)
    if out.ndim != 2 or out.shape[1] != 2:
        raise ValueError("out must have shape (n, 2)")
    if not 0 <= start <= nbits:
        raise ValueError(f"start {start} outside 0..{nbits}")
    if max_run < 0:
        raise ValueError("max_run must be >= 0")
    bits = np.unpackbits(bitmap.view(np.uint8), bitorder="little")[:nbits].astype(bool)
    nruns = 0
    i = start
    while i < nbits:
        if not bits[i]:
            i += 1
            continue
        if nruns == out.shape[0]:
            return nruns, i
        j = i
        while j < nbits and bits[j] and (max_run == 0 or j - i < max_run):
            j += 1
        out[nruns] = (i, j - i)
        nruns += 1
        i = j
    return nruns, nbits


def _bit_range(bitmap: _U64, start: int, stop: int) -> None:
    _check_u64(bitmap, "bitmap", writable=True)
    if bitmap.ndim != 1 or not 0 <= start <= stop <= bitmap.shape[0] * 64:
        raise ValueError(f"bit range [{start}, {stop}) outside the bitmap")


def set_bits(bitmap: _U64, start: int, stop: int) -> None:
    _bit_range(bitmap, start, stop)
    _write_bits(bitmap, start, np.ones(stop - start, dtype=bool))


def clear_bits(bitmap: _U64, start: int, stop: int) -> None:
    _bit_range(bitmap, start, stop)
    _write_bits(bitmap, start, np.zeros(stop - start, dtype=bool))


def count_bits(bitmap: _U64) -> int:
    _check_u64(bitmap, "bitmap")
    return int(np.unpackbits(bitmap.reshape(-1).view(np.uint8)).sum())


def _binary(a: _U64, b: _U64, out: _U64) -> None:
    _check_u64(a, "a")
    _check_u64(b, "b")
    _check_u64(out, "out", writable=True)
    if not a.shape == b.shape == out.shape or a.ndim != 1:
        raise ValueError("a, b and out must be 1-D and the same length")


def and_bits(a: _U64, b: _U64, out: _U64) -> int:
    _binary(a, b, out)
    np.bitwise_and(a, b, out=out)
    return count_bits(out)


def or_bits(a: _U64, b: _U64, out: _U64) -> int:
    _binary(a, b, out)
    np.bitwise_or(a, b, out=out)
    return count_bits(out)


def andnot_bits(a: _U64, b: _U64, out: _U64) -> int:
    _binary(a, b, out)
    np.bitwise_and(a, np.invert(b), out=out)
    return count_bits(out)


def runs_nbytes(runs: _U64, page_size: int, nbytes: int) -> int:
    _check_page_size(page_size)
    if nbytes < 0:
        raise ValueError(f"nbytes must be >= 0, got {nbytes}")
    _check_runs(runs, _npages(nbytes, page_size))
    total = 0
    for first, count in runs.tolist():
        total += max(0, min((first + count) * page_size, nbytes) - first * page_size)
    return total


def _segments(view: memoryview, page_size: int, runs: _U64, head: memoryview) -> list[memoryview]:
    """The byte ranges to move, in order: header first, then each run clipped at the end."""
    segments = [head] if len(head) else []
    for first, count in runs.tolist():
        piece = view[first * page_size : (first + count) * page_size]
        if len(piece):
            segments.append(piece)
    return segments


def _skip(segments: list[memoryview], offset: int) -> list[memoryview]:
    out = []
    for seg in segments:
        if offset >= len(seg):
            offset -= len(seg)
            continue
        out.append(seg[offset:])
        offset = 0
    if offset:
        raise ValueError("offset past the end of the data")
    return out


def _move(fd: int, segments: list[memoryview], call: Any) -> int:
    """Call writev/readv until done, short, or blocked; raise only if nothing moved."""
    done = 0
    while segments:
        try:
            n = call(fd, segments[:IOV_MAX])
        except OSError:
            # Bytes already moved must be reported; the error returns on the next call.
            if done:
                return done
            raise
        if n == 0:
            return done
        done += n
        segments = _skip(segments, n)
    return done


def send_runs(
    fd: int, buf: Any, page_size: int, runs: _U64, header: Any = b"", offset: int = 0
) -> int:
    view = _bytes_view(buf)
    _check_page_size(page_size)
    _check_runs(runs, _npages(len(view), page_size))
    head = _bytes_view(header)
    total = len(head) + runs_nbytes(runs, page_size, len(view))
    if not 0 <= offset <= total:
        raise ValueError(f"offset {offset} outside 0..{total}")
    segments = _skip(_segments(view, page_size, runs, head), offset)
    return _move(fd, segments, os.writev)


def recv_runs(fd: int, buf: Any, page_size: int, runs: _U64, offset: int = 0) -> int:
    view = _bytes_view(buf, writable=True)
    _check_page_size(page_size)
    _check_runs(runs, _npages(len(view), page_size))
    total = runs_nbytes(runs, page_size, len(view))
    if not 0 <= offset <= total:
        raise ValueError(f"offset {offset} outside 0..{total}")
    segments = _skip(_segments(view, page_size, runs, memoryview(b"")), offset)
    return _move(fd, segments, os.readv)
