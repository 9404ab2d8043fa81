"""The post-copy frames: the switch (POSTCOPY and its owed bitmap) and a recovery (RECOVER, RECOVERED).

Encoded, decoded and validated without I/O, like the rest of the wire
format in ``_protocol`` (which holds the frame numbers and the header); an
owed bitmap is one bit per page in uint64 words, little-endian on the wire,
and no bit past the last page may be set.
"""

from __future__ import annotations

import numpy as np
from numpy.typing import NDArray

from migcore._errors import ProtocolError
from migcore._protocol import (
    ACCEPT_SIZE,
    DIGEST_SIZE,
    HEADER_SIZE,
    Accept,
    Frame,
    Header,
    Hello,
    decode_accept,
    encode_accept,
    encode_header,
    encode_hello,
)


def encode_postcopy(digest: bytes, owed: NDArray[np.uint64] | None, binding: bytes = bytes(DIGEST_SIZE)) -> bytes:
    """POSTCOPY: the table digest, the binding digest (HELLO and state), then the owed bitmap or none.

    Without the bitmap (``owed=None``) every page is owed, and the frame's
    size, and the work of the pause on both ends, do not grow with the region.
    """
    if owed is None:
        return encode_header(Frame.POSTCOPY, count=0, length=2 * DIGEST_SIZE) + digest + binding
    body = digest + binding + np.ascontiguousarray(owed, dtype="<u8").tobytes()
    return encode_header(Frame.POSTCOPY, count=len(owed), length=len(body)) + body


def all_owed(npages: int, out: NDArray[np.uint64] | None = None) -> NDArray[np.uint64]:
    """The owed bitmap of a POSTCOPY frame without one: every page, no bit past the last (into ``out``)."""
    owed = np.empty((npages + 63) // 64, dtype=np.uint64) if out is None else out
    owed[:] = np.uint64(0xFFFF_FFFF_FFFF_FFFF)
    if npages % 64:
        owed[-1] = np.uint64((1 << (npages % 64)) - 1)
    return owed


def decode_postcopy(
    body: bytes | bytearray, npages: int, out: NDArray[np.uint64] | None = None
) -> tuple[bytes, bytes, NDArray[np.uint64]]:
    """Table digest, binding digest and owed bitmap of a POSTCOPY frame; bits past the last page must be clear.

    A body holding only the digest owes every page. ``out`` (``(npages + 63)
    // 64`` words) receives the bitmap, so a receiver can allocate and touch
    it before the pause; it is returned as the bitmap.
    """
    words = (npages + 63) // 64
    if out is None:
        out = np.empty(words, dtype=np.uint64)
    elif out.shape != (words,) or out.dtype != np.uint64:
        raise ValueError(f"out must be {words} uint64 words")
    head = 2 * DIGEST_SIZE
    digest, binding = bytes(body[:DIGEST_SIZE]), bytes(body[DIGEST_SIZE:head])
    if len(body) == head:
        return digest, binding, all_owed(npages, out)
    if len(body) != head + 8 * words:
        raise ProtocolError(f"POSTCOPY body is {len(body)} bytes, expected {head + 8 * words}")
    owed = np.frombuffer(body, dtype="<u8", offset=head)
    tail = npages % 64
    if tail and int(owed[-1]) >> tail:
        raise ProtocolError("POSTCOPY owes pages past the end of the region")
    out[:] = owed
    return digest, binding, out


def encode_recover(hello: Hello) -> bytes:
    """RECOVER: the HELLO body of the migration to continue (its id, compat string, page and region size)."""
    body = encode_hello(hello)[HEADER_SIZE:]
    return encode_header(Frame.RECOVER, length=len(body)) + body


def encode_recovered(accept: Accept, owed: NDArray[np.uint64]) -> bytes:
    """RECOVERED: this side's limits (an ACCEPT body), then its bitmap of the pages it still lacks."""
    body = encode_accept(accept)[HEADER_SIZE:] + np.ascontiguousarray(owed, dtype="<u8").tobytes()
    return encode_header(Frame.RECOVERED, count=len(owed), length=len(body)) + body


def decode_recovered(header: Header, body: bytes | bytearray, npages: int) -> tuple[Accept, NDArray[np.uint64]]:
    """The limits and owed bitmap of a RECOVERED frame: exactly one bit per page, none past the last."""
    words = (npages + 63) // 64
    if header.count != words or len(body) != ACCEPT_SIZE + 8 * words:
        raise ProtocolError(f"RECOVERED of {header.count} words ({len(body)} bytes), expected {words} words")
    accept = decode_accept(bytes(body[: ACCEPT_SIZE]))
    owed = np.frombuffer(body, dtype="<u8", offset=ACCEPT_SIZE).astype(np.uint64)
    tail = npages % 64
    if tail and int(owed[-1]) >> tail:
        raise ProtocolError("RECOVERED owes pages past the end of the region")
    return accept, owed
