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
    "delta_decode_runs",
    "delta_encode_runs",
    "dirty_runs",
    "hash_delta",
    "hash_pages",
    "hash_runs",
    "or_bits",
    "recv_runs",
    "runs_nbytes",
    "send_runs",
    "set_bits",
    "xbzrle_decode",
    "xbzrle_encode",
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


def _bit(bitmap: _U64, i: int) -> bool:
    return bool((int(bitmap[i >> 6]) >> (i & 63)) & 1)


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
    resident: _U64 | None = None,
) -> int:
    view = _bytes_view(buf)
    _check_page_size(page_size)
    npages = _npages(len(view), page_size)
    _check_u64(baseline, "baseline", writable=update)
    if baseline.ndim != 1 or baseline.shape[0] < npages:
        raise ValueError(f"baseline needs at least {npages} items")
    _check_bitmap(dirty, npages, "dirty", writable=True)
    if resident is not None:
        _check_bitmap(resident, npages, "resident")
    start, stop = _page_range(npages, start, stop)
    current = np.empty(stop - start, dtype=np.uint64)
    for i in range(start, stop):
        page: Any = _page(view, page_size, i)
        if resident is not None and not _bit(resident, i):
            page = bytes(len(page))  # known to be zero: not read
        current[i - start] = xxhash.xxh3_64_intdigest(page)
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


def zero_pages(
    buf: Any, page_size: int, out: _U64, start: int = 0, stop: int = -1, resident: _U64 | None = None
) -> int:
    view = _bytes_view(buf)
    _check_page_size(page_size)
    npages = _npages(len(view), page_size)
    _check_bitmap(out, npages, "out", writable=True)
    if resident is not None:
        _check_bitmap(resident, npages, "resident")
    start, stop = _page_range(npages, start, stop)
    data = np.frombuffer(view, dtype=np.uint8)
    flags = np.array(
        [
            (resident is not None and not _bit(resident, i)) or not data[i * page_size : (i + 1) * page_size].any()
            for i in range(start, stop)
        ],
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


# -- delta encoding (XBZRLE) ---------------------------------------------------
#
# A page's delta is the XOR of its new content with the destination's copy, as
# pairs ``zrun nzrun bytes[nzrun]`` (ULEB128 lengths of at most 5 bytes, nzrun
# >= 1, a trailing zero run left out). A batch is a u32 little-endian length
# per page (``0x80000000 | n``: the page raw) followed by the encodings.

_RAW_BIT = 0x80000000


def _uleb(value: int) -> bytes:
    out = bytearray()
    while True:
        if value < 0x80:
            out.append(value)
            return bytes(out)
        out.append((value & 0x7F) | 0x80)
        value >>= 7


def _read_uleb(data: memoryview, i: int) -> tuple[int, int]:
    value = 0
    for k in range(5):
        if i >= len(data):
            raise ValueError("delta is truncated (a length or its bytes run past the end of the delta)")
        byte = data[i]
        value |= (byte & 0x7F) << (7 * k)
        i += 1
        if not byte & 0x80:
            return value, i
    raise ValueError("delta is truncated (a length or its bytes run past the end of the delta)")


def _xbzrle_bytes(old: memoryview, new: memoryview) -> bytes:
    xor = np.frombuffer(old, np.uint8) ^ np.frombuffer(new, np.uint8)
    nonzero = np.flatnonzero(np.diff(np.concatenate(([0], (xor != 0).view(np.int8), [0]))))
    out = bytearray()
    pos = 0
    for start, stop in zip(nonzero[::2].tolist(), nonzero[1::2].tolist()):
        out += _uleb(start - pos) + _uleb(stop - start) + xor[start:stop].tobytes()
        pos = stop
    return bytes(out)


def _xbzrle_parse(delta: memoryview, n: int) -> list[tuple[int, int, int]]:
    """The (page offset, delta offset, length) of each non-zero run; ValueError if malformed."""
    out = []
    i = pos = 0
    while i < len(delta):
        zrun, i = _read_uleb(delta, i)
        if zrun > n - pos:
            raise ValueError("delta would write past the end of the page")
        pos += zrun
        if i == len(delta):
            break
        nzrun, i = _read_uleb(delta, i)
        if nzrun == 0:
            raise ValueError("delta has a non-zero run of length 0")
        if nzrun > n - pos:
            raise ValueError("delta would write past the end of the page")
        if nzrun > len(delta) - i:
            raise ValueError("delta is truncated (a length or its bytes run past the end of the delta)")
        out.append((pos, i, nzrun))
        i += nzrun
        pos += nzrun
    return out


def _xbzrle_apply(delta: memoryview, page: memoryview, parts: list[tuple[int, int, int]]) -> None:
    arr = np.frombuffer(page, np.uint8)
    src = np.frombuffer(delta, np.uint8)
    for pos, i, n in parts:
        arr[pos : pos + n] ^= src[i : i + n]


def xbzrle_encode(old: Any, new: Any, out: Any) -> int:
    a, b, o = _bytes_view(old), _bytes_view(new), _bytes_view(out, writable=True)
    if len(a) != len(b):
        raise ValueError(f"old and new differ in size ({len(a)} and {len(b)} bytes)")
    enc = _xbzrle_bytes(a, b)
    if len(enc) > len(o):
        return -1
    o[: len(enc)] = enc
    return len(enc)


def xbzrle_decode(delta: Any, page: Any) -> None:
    d, p = _bytes_view(delta), _bytes_view(page, writable=True)
    _xbzrle_apply(d, p, _xbzrle_parse(d, len(p)))


def _run_pages(runs: _U64, page_size: int, nbytes: int) -> list[tuple[int, int]]:
    """(offset, real size) of every page of ``runs``, in order."""
    return [
        (p * page_size, min(page_size, nbytes - p * page_size))
        for first, count in runs.tolist()
        for p in range(first, first + count)
    ]


def delta_encode_runs(
    buf: Any, page_size: int, runs: _U64, cache: Any, slots: Any, bases: Any, out: Any
) -> tuple[int, int]:
    view = _bytes_view(buf)
    _check_page_size(page_size)
    _check_runs(runs, _npages(len(view), page_size))
    o = _bytes_view(out, writable=True)
    pages = _run_pages(runs, page_size, len(view))
    slots = np.asarray(slots)
    bases = np.asarray(bases)
    if not isinstance(cache, np.ndarray) or cache.dtype != np.uint8 or cache.ndim != 2:
        raise TypeError("cache must be a 2-D numpy uint8 array")
    nslots = cache.shape[0]
    if nslots and cache.shape[1] < page_size:
        raise ValueError(f"cache rows of {cache.shape[1]} bytes are shorter than a page")
    if len(slots) != len(pages) or len(bases) != len(pages):
        raise ValueError(f"slots and bases need one item per page of the runs ({len(pages)})")
    for i, (s, b) in enumerate(zip(slots.tolist(), bases.tolist())):
        if s < -1 or s >= nslots or (b and s < 0):
            raise ValueError(f"slot {s} of page {i} is outside the cache's {nslots} rows")
    total = sum(n for _, n in pages)
    if len(o) < 4 * len(pages) + total:
        raise ValueError(f"out needs {4 * len(pages) + total} bytes, has {len(o)}")
    pos = 4 * len(pages)
    overflow = 0
    for k, (off, n) in enumerate(pages):
        new = bytes(view[off : off + n])  # read once: the bytes sent are the bytes cached
        slot = int(slots[k])
        enc = None
        if bases[k]:
            enc = _xbzrle_bytes(memoryview(cache[slot, :n].tobytes()), memoryview(new))
            if len(enc) > n - 1:
                enc = None
                overflow += 1
        if enc is not None:
            o[4 * k : 4 * k + 4] = len(enc).to_bytes(4, "little")
            o[pos : pos + len(enc)] = enc
            pos += len(enc)
        else:
            o[4 * k : 4 * k + 4] = (_RAW_BIT | n).to_bytes(4, "little")
            o[pos : pos + n] = new
            pos += n
        if slot >= 0:
            cache[slot, :n] = np.frombuffer(new, np.uint8)
    return pos, overflow


def delta_decode_runs(buf: Any, page_size: int, runs: _U64, payload: Any) -> None:
    view = _bytes_view(buf, writable=True)
    _check_page_size(page_size)
    _check_runs(runs, _npages(len(view), page_size))
    p = _bytes_view(payload)
    pages = _run_pages(runs, page_size, len(view))
    if len(p) < 4 * len(pages):
        raise ValueError(f"delta batch of {len(p)} bytes is shorter than its table of {len(pages)} pages")
    plan: list[tuple[int, int, int, list[tuple[int, int, int]] | None]] = []
    pos = 4 * len(pages)
    for k, (off, n) in enumerate(pages):  # check everything before writing a byte
        length = int.from_bytes(p[4 * k : 4 * k + 4], "little")
        if length & _RAW_BIT:
            length &= ~_RAW_BIT
            if length != n:
                raise ValueError("a raw page in the delta batch has the wrong size")
            if length > len(p) - pos:
                raise ValueError("delta is truncated (a length or its bytes run past the end of the delta)")
            plan.append((off, n, pos, None))
        else:
            if length > len(p) - pos:
                raise ValueError("delta is truncated (a length or its bytes run past the end of the delta)")
            plan.append((off, n, pos, _xbzrle_parse(p[pos : pos + length], n)))
        pos += length
    if pos != len(p):
        raise ValueError(f"delta batch has {len(p) - pos} bytes left over after its pages")
    for off, n, at, parts in plan:
        if parts is None:
            view[off : off + n] = p[at : at + n]
        else:
            _xbzrle_apply(p[at:], view[off : off + n], parts)
