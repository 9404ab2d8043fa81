"""Type stub of the compiled fast path; `migcore._reference` has the same names and meanings.

Conventions shared by every function:

- A *buffer* is any C-contiguous bytes-like object; a region of ``nbytes``
  bytes has ``npages = ceil(nbytes / page_size)`` pages, the last one possibly
  partial (it is hashed, tested and sent over its real bytes only).
- A *bitmap* is a C-contiguous ``uint64`` array; bit ``i`` is bit ``i % 64`` of
  word ``i // 64`` (least significant first). Bits past the last page are zero.
- *runs* is a C-contiguous ``uint64`` array of shape ``(n, 2)``, each row
  ``(first_page, page_count)``.
- ``stop=-1`` means "up to the last page". Callers that split one call over
  threads split at multiples of 64 pages so no two threads share a word.
- Invalid arguments (sizes, bounds, dtypes, read-only outputs) raise
  ``ValueError``/``TypeError`` before any work is done; system calls raise
  ``OSError`` carrying the real errno.
"""

import sys

import numpy as np
from numpy.typing import NDArray

if sys.version_info >= (3, 12):
    from collections.abc import Buffer
else:
    from typing_extensions import Buffer

_U64 = NDArray[np.uint64]

def hash_pages(buf: Buffer, page_size: int, out: _U64, start: int = 0, stop: int = -1) -> None:
    """``out[i] = XXH3_64(page i)`` for ``start <= i < stop``; ``out`` holds at least ``npages`` items."""

def hash_runs(buf: Buffer, page_size: int, runs: _U64, out: _U64) -> None:
    """``out[i] = XXH3_64(page i)`` for every page ``i`` covered by ``runs``."""

def hash_delta(
    buf: Buffer,
    page_size: int,
    baseline: _U64,
    dirty: _U64,
    start: int = 0,
    stop: int = -1,
    update: bool = False,
    resident: _U64 | None = None,
) -> int:
    """Hash pages ``[start, stop)`` and compare with ``baseline`` in one pass.

    Sets bit ``i`` of ``dirty`` where the hash differs from ``baseline[i]`` and
    clears it where it is equal (bits outside the range are left alone). With
    ``update``, ``baseline[i]`` becomes the new hash. Returns the number of
    dirty pages in the range.

    A page whose bit is clear in the bitmap ``resident`` is known to hold
    zeros (the kernel has no memory behind it): it is not read and its hash
    is that of a zero page of its length. None: every page is read.
    """

def compare_hashes(current: _U64, baseline: _U64, dirty: _U64) -> int:
    """Bit ``i`` of ``dirty`` = ``current[i] != baseline[i]`` for every ``i``; returns the count."""

def zero_pages(
    buf: Buffer, page_size: int, out: _U64, start: int = 0, stop: int = -1, resident: _U64 | None = None
) -> int:
    """Bit ``i`` of ``out`` = page ``i`` is all zero bytes, for ``[start, stop)``; returns their count.

    A page whose bit is clear in ``resident`` counts as zero without being read (see ``hash_delta``).
    """

def dirty_runs(
    bitmap: _U64, nbits: int, out: _U64, start: int = 0, max_run: int = 0
) -> tuple[int, int]:
    """Write the runs of set bits found from bit ``start`` into the rows of ``out``.

    A run is at most ``max_run`` bits long (0: no cap; a longer stretch becomes
    several runs). Stops when ``out`` is full. Returns ``(nruns, resume)``:
    ``resume`` is the bit to pass as ``start`` to continue, ``nbits`` when the
    whole bitmap was scanned. Cost follows the non-zero words, not ``nbits``.
    """

def set_bits(bitmap: _U64, start: int, stop: int) -> None:
    """Set bits ``[start, stop)``."""

def clear_bits(bitmap: _U64, start: int, stop: int) -> None:
    """Clear bits ``[start, stop)``."""

def count_bits(bitmap: _U64) -> int:
    """Number of set bits in the whole bitmap."""

def and_bits(a: _U64, b: _U64, out: _U64) -> int:
    """``out = a & b`` word by word (``out`` may be ``a`` or ``b``); returns the set bits of ``out``."""

def or_bits(a: _U64, b: _U64, out: _U64) -> int:
    """``out = a | b`` word by word (``out`` may be ``a`` or ``b``); returns the set bits of ``out``."""

def andnot_bits(a: _U64, b: _U64, out: _U64) -> int:
    """``out = a & ~b`` word by word (``out`` may be ``a`` or ``b``); returns the set bits of ``out``."""

def runs_nbytes(runs: _U64, page_size: int, nbytes: int) -> int:
    """Payload bytes of ``runs`` in a region of ``nbytes`` bytes (the partial last page counts its real size)."""

def send_runs(
    fd: int, buf: Buffer, page_size: int, runs: _U64, header: Buffer = b"", offset: int = 0
) -> int:
    """Send ``header`` then the bytes of ``runs`` straight from ``buf``, skipping the first ``offset``.

    Scatter-gather (``sendmsg``/``writev``) from iovecs that point into ``buf``,
    chunked at ``IOV_MAX``, with the GIL released. Keeps sending until all is
    sent, the descriptor would block, or a signal interrupts; returns the bytes
    sent by this call so the caller can resume with ``offset + returned``.
    Raises ``OSError`` (``BlockingIOError``, ``InterruptedError``, ...) only
    when nothing at all could be sent.
    """

def recv_runs(fd: int, buf: Buffer, page_size: int, runs: _U64, offset: int = 0) -> int:
    """Receive the bytes of ``runs`` straight into the writable ``buf``, skipping the first ``offset``.

    Scatter-gather (``recvmsg``/``readv``), GIL released, the mirror of
    ``send_runs``. Returns the bytes received by this call; it is short when the
    descriptor would block, a signal interrupts or the peer closed (end of file
    reads as a short count, possibly 0). Raises ``OSError`` only when nothing
    at all could be received for another reason than end of file.
    """

def xbzrle_encode(old: Buffer, new: Buffer, out: Buffer) -> int:
    """Encode ``new`` as its XOR against ``old`` (same size), run-length coded (XBZRLE), into ``out``.

    The format is pairs ``zrun nzrun bytes[nzrun]``: ``zrun`` unchanged bytes,
    then ``nzrun >= 1`` bytes to XOR in, both lengths ULEB128 (at most 5 bytes);
    a trailing zero run is left out. Returns the encoded size, or -1 when it
    does not fit in ``out`` (pass ``len(out) < len(new)`` to get only deltas
    smaller than the page).
    """

def xbzrle_decode(delta: Buffer, page: Buffer) -> None:
    """XOR ``delta`` into the writable ``page``; ``ValueError`` before any write if it is malformed or reaches past the page."""

def delta_encode_runs(
    buf: Buffer, page_size: int, runs: _U64, cache: NDArray[np.uint8], slots: NDArray[np.int64],
    bases: NDArray[np.uint8], out: Buffer
) -> tuple[int, int]:
    """Encode the pages of ``runs`` as one delta batch into ``out``; returns ``(bytes written, overflow)``.

    The batch is a ``u32`` little-endian length per page (``0x80000000 | n``:
    the page's ``n`` bytes raw) followed by the encodings in run order.
    ``slots[k]`` is the row of ``cache`` kept for the ``k``-th page (-1: none);
    where ``bases[k]`` is set, that row holds the destination's copy and the
    page goes as a delta when one is smaller than the page (else raw, counted
    in ``overflow``). Each page is read once and the bytes sent become its
    row's content. ``out`` needs ``4 * pages + runs_nbytes(runs)`` bytes.
    """

def delta_decode_runs(buf: Buffer, page_size: int, runs: _U64, payload: Buffer) -> None:
    """Apply a ``delta_encode_runs`` batch to the pages of ``runs`` in the writable ``buf``.

    The whole batch is checked first; a malformed table, a raw page of the
    wrong size, a delta reaching past its page or bytes left over raise
    ``ValueError`` before any byte of ``buf`` changes.
    """

def _xxh3_variant(buf: Buffer, variant: str) -> int | None:
    """XXH3_64 of ``buf`` with one named compiled loop ("plain", "avx2", "avx512"); None where unavailable. For tests."""
