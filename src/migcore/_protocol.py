"""The wire format: versioned binary frames, encoded, decoded and validated without any I/O.

Every frame starts with a fixed 16-byte little-endian header::

    type u8 | flags u8 | reserved u16 (0) | count u32 | length u64

``count`` is a small integer whose meaning depends on the type (runs in a
PAGES or DEMAND frame, the round number of ROUND_END/ACK, the bitmap words of
POSTCOPY, 0 when every page is owed); ``length`` is the number of bytes that follow the header, except
for PAGES, where ``count`` rows of runs (16 bytes each) come first and
``length`` counts only the page payload after them. Every length is checked
against a limit before anything is allocated or read, and a runs table is
checked against the region before a single page byte lands.

Frames, in order (S = source, D = destination)::

  [ S AUTH 1    nonce_s      D AUTH 2   nonce_d + HMAC(token, "destination" nonces)
    S AUTH 3    HMAC(token, "source" nonces) ]      only when both ends hold a token
    S HELLO     magic, version, page size, region size, mode, tracker, features,
                streams, codec, compat string, migration id, declared state size
    D ACCEPT    limits (max state bytes, max frame payload, max runs) | REFUSE field + reason
  [ extra connections (streams > 1): [AUTH...] S STREAM i (migration id)  D STREAM i ]
    S PAGES*    runs table + page bytes, sent straight from the source buffer
                (or, flagged, a compressed and/or delta-encoded batch; on the
                extra connections when streams > 1, each ending its part of a
                round with ROUND_END n)
    S ROUND_END n          D ACK n   hashes of the pages stored in round n, in run order
    ... more rounds ...
    S PAGES*    the last dirty pages (during the pause)
    S STATE     the state blob
    S COMPLETE  digest of the source's final hash table + binding digest
                (HELLO and state)                          D DONE   (or ERROR)
  or
    S POSTCOPY  digest + binding digest + bitmap of the pages still owed   D SWITCHED
                (no bitmap, count 0: every page is owed, as in pure post-copy)
    S PAGES*    owed pages (background)   D DEMAND* runs wanted now
    S END                                 D DONE   (or ERROR)

Either side may send ERROR (code + message) and close; the source may send
CANCEL before the switchover.

After a lost link in post-copy, the source reconnects (TLS and AUTH as
above) and continues the same migration::

    S RECOVER   a HELLO body with the same migration id, compat string, page
                size and region size
    D RECOVERED limits (as in ACCEPT) + bitmap of the pages still owed
                (count = words)  | REFUSE field + reason
    S PAGES*    owed pages (background)   D DEMAND* runs wanted now
    S END       digest of the source's whole table at the pause    D DONE

Any number of times: a link lost during a recovery leaves both ends paused
again.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import xxhash
from numpy.typing import NDArray

from migcore._errors import CompatibilityError, ProtocolError
from migcore._names import CODECS, MODES, TRACKERS, Codec, Mode, Tracker

MAGIC = b"MIGC"
#: 2: token authentication, streams and codec in HELLO, compressed and delta PAGES.
#: 3: post-copy zero notices (PAGES with FLAG_ZERO).
#: 4: POSTCOPY without a bitmap (count 0) when every page is owed.
#: 5: COMPLETE and POSTCOPY carry the binding digest of the HELLO and the state.
PROTOCOL_VERSION = 5

HEADER = struct.Struct("<BBHIQ")
HEADER_SIZE = HEADER.size  # 16
RUN_SIZE = 16

#: Longest HELLO/ACCEPT/REFUSE/ERROR/CANCEL body.
MAX_CONTROL_BODY = 64 << 10
#: Largest page payload in one PAGES frame that a destination accepts by default.
DEFAULT_MAX_PAYLOAD = 16 << 20
#: Most runs in one PAGES or DEMAND frame.
MAX_RUNS = 4096
#: Largest state blob a destination accepts by default.
DEFAULT_MAX_STATE = 64 << 20
#: ``state_size`` in HELLO when the source does not know it yet (a callable state).
UNKNOWN_SIZE = (1 << 64) - 1
DIGEST_SIZE = 16
#: COMPLETE's body: the table digest, then the binding digest.
COMPLETE_SIZE = 2 * DIGEST_SIZE

#: Feature bits a HELLO may ask for.
FEATURE_POSTCOPY = 1
#: PAGES may be delta-encoded against the destination's copy (XBZRLE).
FEATURE_DELTA = 2
#: PAGES may be compressed with the HELLO's codec.
FEATURE_COMPRESS = 4
#: Pages travel on ``streams`` extra connections.
FEATURE_STREAMS = 8
SUPPORTED_FEATURES = FEATURE_POSTCOPY | FEATURE_DELTA | FEATURE_COMPRESS | FEATURE_STREAMS

#: PAGES flag: a post-copy page (must be owed by the destination).
FLAG_POSTCOPY = 1
#: PAGES flag: the payload is ``u64 decoded size`` + the batch compressed with the agreed codec.
FLAG_COMPRESSED = 2
#: PAGES flag: the (decoded) payload is a delta batch (see ``delta_encode_runs``).
FLAG_DELTA = 4
#: PAGES flag (post-copy only, with FLAG_POSTCOPY): a zero notice. The runs table lists owed pages
#: that are all zero; no payload follows (length 0). The destination marks them present as zero pages.
FLAG_ZERO = 8
#: Every PAGES flag.
PAGES_FLAGS = FLAG_POSTCOPY | FLAG_COMPRESSED | FLAG_DELTA | FLAG_ZERO

#: Compression codecs by their number in HELLO (0: none).
CODECS_ON_WIRE: tuple[Codec | None, ...] = (None, *CODECS)
#: Most page connections one migration may open.
MAX_STREAMS = 64
#: Size of the nonces and MACs of the AUTH exchange.
AUTH_SIZE = 32


class Frame(enum.IntEnum):
    HELLO = 1
    ACCEPT = 2
    REFUSE = 3
    PAGES = 4
    ROUND_END = 5
    ACK = 6
    STATE = 7
    COMPLETE = 8
    DONE = 9
    POSTCOPY = 10
    SWITCHED = 11
    DEMAND = 12
    END = 13
    ERROR = 14
    CANCEL = 15
    AUTH = 16
    STREAM = 17
    RECOVER = 18
    RECOVERED = 19


class LoopLayout(NamedTuple):
    """The wire facts the no-GIL post-copy loop (``migcore._uffd.serve_postcopy``) needs.

    Handed to the loop when it starts, so the C side reads PAGES and builds
    DEMAND frames with these values instead of copies of them.
    """

    header_size: int
    run_size: int
    pages: int
    demand: int
    postcopy: int
    zero: int


LOOP_LAYOUT = LoopLayout(HEADER_SIZE, RUN_SIZE, Frame.PAGES, Frame.DEMAND, FLAG_POSTCOPY, FLAG_ZERO)


class ErrorCode(enum.IntEnum):
    """Why a side sent ERROR, so the peer raises the matching exception type."""

    INTERNAL = 0
    PROTOCOL = 1
    VERIFICATION = 2
    COMPATIBILITY = 3
    TIMEOUT = 4
    AUTHENTICATION = 5


#: Modes and trackers by their number in HELLO.
MODES_ON_WIRE: tuple[Mode, ...] = MODES
TRACKERS_ON_WIRE: tuple[Tracker, ...] = TRACKERS


@dataclass(frozen=True)
class Header:
    type: Frame
    flags: int
    count: int
    length: int

    @property
    def name(self) -> str:
        return self.type.name


def encode_header(ftype: Frame, *, flags: int = 0, count: int = 0, length: int = 0) -> bytes:
    return HEADER.pack(int(ftype), flags, 0, count, length)


def decode_header(data: bytes | bytearray | memoryview) -> Header:
    """Parse a header; an unknown type or a non-zero reserved field is a :class:`ProtocolError`."""
    if len(data) != HEADER_SIZE:
        raise ProtocolError(f"frame header must be {HEADER_SIZE} bytes, got {len(data)}")
    ftype, flags, reserved, count, length = HEADER.unpack(data)
    try:
        frame = Frame(ftype)
    except ValueError:
        raise ProtocolError(f"unknown frame type {ftype} (not a migcore peer, or a newer protocol)") from None
    if reserved != 0:
        raise ProtocolError(f"{frame.name} frame has a non-zero reserved field ({reserved})")
    return Header(frame, flags, count, length)


def expect(header: Header, allowed: tuple[Frame, ...], phase: str) -> None:
    """Reject a frame type that is not allowed in the current phase."""
    if header.type not in allowed:
        names = ", ".join(f.name for f in allowed)
        raise ProtocolError(f"unexpected {header.name} frame during {phase} (expected {names})")


def check_length(header: Header, limit: int, *, exact: int | None = None) -> int:
    """Return the body length after checking it against ``limit`` (or an exact size)."""
    if exact is not None and header.length != exact:
        raise ProtocolError(f"{header.name} frame body is {header.length} bytes, expected {exact}")
    if header.length > limit:
        raise ProtocolError(f"{header.name} frame body of {header.length} bytes exceeds the limit of {limit}")
    return header.length


# -- handshake -------------------------------------------------------------

_HELLO = struct.Struct("<4sHHIQQ16sBBIHBBH")
_HELLO_COMPAT = 1  # flags bit: a compat string is present (None and "" differ)


@dataclass(frozen=True)
class Hello:
    version: int
    page_size: int
    nbytes: int
    mode: str
    tracker: str
    features: int
    compat: str | None
    migration_id: bytes
    state_size: int = UNKNOWN_SIZE
    streams: int = 1
    codec: str | None = None

    @property
    def npages(self) -> int:
        return -(-self.nbytes // self.page_size)


def encode_hello(hello: Hello, *, magic: bytes = MAGIC) -> bytes:
    compat = b"" if hello.compat is None else hello.compat.encode()
    if len(compat) > 4096:
        raise ValueError("compat string longer than 4096 bytes")
    body = _HELLO.pack(
        magic,
        hello.version,
        _HELLO_COMPAT if hello.compat is not None else 0,
        hello.page_size,
        hello.nbytes,
        hello.state_size,
        hello.migration_id,
        MODES_ON_WIRE.index(hello.mode),
        TRACKERS_ON_WIRE.index(hello.tracker),
        hello.features,
        hello.streams,
        CODECS_ON_WIRE.index(hello.codec),
        0,
        len(compat),
    ) + compat
    return encode_header(Frame.HELLO, length=len(body)) + body


def decode_hello(body: bytes) -> Hello:
    """Parse a HELLO body; a wrong magic or malformed body is a :class:`ProtocolError`.

    The version is returned as sent: the destination refuses a different one
    with a REFUSE that names it (a :class:`CompatibilityError` on both sides).
    """
    if len(body) < 6 or bytes(body[:4]) != MAGIC:
        raise ProtocolError(f"wrong magic {bytes(body[:4])!r} (expected {MAGIC!r}): not a migcore peer")
    (version,) = struct.unpack_from("<H", body, 4)
    if version != PROTOCOL_VERSION:
        # the rest of the layout may differ: check nothing else
        return Hello(version, 0, 0, "stopcopy", "hash", 0, None, b"")
    if len(body) < _HELLO.size:
        raise ProtocolError(f"HELLO body of {len(body)} bytes is shorter than {_HELLO.size}")
    fields = _HELLO.unpack_from(body)
    _, _, flags, page_size, nbytes, state_size, mid, mode, tracker, features, streams, codec, reserved, clen = fields
    if len(body) != _HELLO.size + clen:
        raise ProtocolError(f"HELLO compat string length {clen} disagrees with the body size {len(body)}")
    if mode >= len(MODES_ON_WIRE):
        raise ProtocolError(f"HELLO names unknown mode {mode}")
    if tracker >= len(TRACKERS_ON_WIRE):
        raise ProtocolError(f"HELLO names unknown tracker {tracker}")
    if nbytes == 0:
        raise ProtocolError("HELLO announces an empty region")
    if codec >= len(CODECS_ON_WIRE) or reserved:
        raise ProtocolError(f"HELLO names unknown codec {codec}")
    if not 1 <= streams <= MAX_STREAMS:
        raise ProtocolError(f"HELLO asks for {streams} streams (allowed 1..{MAX_STREAMS})")
    try:
        compat = body[_HELLO.size :].decode() if flags & _HELLO_COMPAT else None
    except UnicodeDecodeError:
        raise ProtocolError("HELLO compat string is not UTF-8") from None
    return Hello(
        version, page_size, nbytes, MODES_ON_WIRE[mode], TRACKERS_ON_WIRE[tracker], features, compat, bytes(mid),
        state_size, streams, CODECS_ON_WIRE[codec],
    )


_ACCEPT = struct.Struct("<QQII")
#: Bytes of an ACCEPT body (RECOVERED starts with one).
ACCEPT_SIZE = _ACCEPT.size


@dataclass(frozen=True)
class Accept:
    max_state: int
    max_payload: int
    max_runs: int
    features: int


def encode_accept(acc: Accept) -> bytes:
    body = _ACCEPT.pack(acc.max_state, acc.max_payload, acc.max_runs, acc.features)
    return encode_header(Frame.ACCEPT, length=len(body)) + body


def decode_accept(body: bytes) -> Accept:
    if len(body) != _ACCEPT.size:
        raise ProtocolError(f"ACCEPT body is {len(body)} bytes, expected {_ACCEPT.size}")
    acc = Accept(*_ACCEPT.unpack(body))
    if acc.max_payload < 4096 or acc.max_runs < 1:
        raise ProtocolError(f"ACCEPT limits are unusable: {acc}")
    return acc


def _encode_text_frame(ftype: Frame, code: int, text: str) -> bytes:
    raw = text.encode("utf-8", "replace")[: MAX_CONTROL_BODY - 2]
    body = struct.pack("<H", code) + raw
    return encode_header(ftype, length=len(body)) + body


def _decode_text_frame(body: bytes) -> tuple[int, str]:
    if len(body) < 2:
        raise ProtocolError("ERROR/REFUSE body shorter than its code")
    (code,) = struct.unpack_from("<H", body)
    return code, body[2:].decode("utf-8", "replace")


def encode_refuse(field: str, reason: str) -> bytes:
    """REFUSE carries the differing field (index into REFUSE_FIELDS) and a human-readable reason."""
    return _encode_text_frame(Frame.REFUSE, REFUSE_FIELDS.index(field), reason)


def decode_refuse(body: bytes) -> CompatibilityError:
    code, reason = _decode_text_frame(body)
    field = REFUSE_FIELDS[code] if code < len(REFUSE_FIELDS) else "unknown"
    return CompatibilityError(f"destination refused the migration ({field}): {reason}", field=field)


REFUSE_FIELDS = (
    "version", "page_size", "nbytes", "memory", "compat", "features", "mode", "state_size", "tracker", "codec", "streams",
    "migration_id",
)


def encode_error(code: ErrorCode, message: str) -> bytes:
    return _encode_text_frame(Frame.ERROR, int(code), message)


def decode_error(body: bytes) -> tuple[ErrorCode, str]:
    code, message = _decode_text_frame(body)
    try:
        return ErrorCode(code), message
    except ValueError:
        return ErrorCode.INTERNAL, message


def encode_cancel(reason: str) -> bytes:
    return _encode_text_frame(Frame.CANCEL, 0, reason)


def decode_cancel(body: bytes) -> str:
    return _decode_text_frame(body)[1]


# -- authentication and extra streams --------------------------------------


def encode_auth(step: int, body: bytes) -> bytes:
    """AUTH step 1 (source nonce), 2 (destination nonce + MAC) or 3 (source MAC)."""
    return encode_header(Frame.AUTH, count=step, length=len(body)) + body


def encode_stream(index: int, migration_id: bytes) -> bytes:
    """STREAM ``index``: an extra page connection of the migration ``migration_id`` (and its echo)."""
    return encode_header(Frame.STREAM, count=index, length=len(migration_id)) + migration_id


# -- runs ------------------------------------------------------------------


def encode_runs_header(ftype: Frame, runs: NDArray[np.uint64], payload: int, *, flags: int = 0) -> bytes:
    """Header plus runs table of a PAGES (payload follows) or DEMAND (payload 0) frame."""
    table = np.ascontiguousarray(runs, dtype="<u8").tobytes()
    length = payload if ftype is Frame.PAGES else len(table)
    return encode_header(ftype, flags=flags, count=len(runs), length=length) + table


def decode_runs(table: bytes | bytearray | memoryview, count: int) -> NDArray[np.uint64]:
    """The runs table as an ``(n, 2)`` native uint64 array (a copy the caller owns)."""
    if len(table) != count * RUN_SIZE:
        raise ProtocolError(f"runs table is {len(table)} bytes, expected {count * RUN_SIZE}")
    return np.frombuffer(table, dtype="<u8").astype(np.uint64).reshape(count, 2)


def validate_runs(runs: NDArray[np.uint64], npages: int, *, after: int = 0) -> int:
    """Check a received runs table and return the pages it covers.

    Every run must have a non-zero count, lie inside the ``npages`` pages of
    the region (without overflowing 64 bits), start at or after ``after`` and
    come in ascending, non-overlapping order.
    """
    if runs.ndim != 2 or runs.shape[1] != 2:
        raise ProtocolError("runs table must have two columns")
    if len(runs) == 0:
        raise ProtocolError("empty runs table")
    first = runs[:, 0]
    count = runs[:, 1]
    if (count == 0).any():
        raise ProtocolError("a run has a page count of 0")
    n = np.uint64(npages)
    # count <= npages first, so npages - count cannot wrap
    if (count > n).any() or (first > n - np.minimum(count, n)).any():
        bad = int(np.flatnonzero((count > n) | (first > n - np.minimum(count, n)))[0])
        raise ProtocolError(
            f"run (first_page={int(first[bad])}, count={int(count[bad])}) lies outside the region's {npages} pages"
        )
    ends = first + count
    if int(first[0]) < after:
        raise ProtocolError(f"run starting at page {int(first[0])} goes back before page {after} in this round")
    if len(runs) > 1 and (first[1:] < ends[:-1]).any():
        raise ProtocolError("runs are not in ascending, non-overlapping order")
    return int(count.sum())


def runs_payload(runs: NDArray[np.uint64], page_size: int, nbytes: int) -> int:
    """Payload bytes of validated ``runs``; the partial last page counts its real size."""
    first = runs[:, 0].astype(np.int64)
    count = runs[:, 1].astype(np.int64)
    total = int(count.sum()) * page_size
    npages = -(-nbytes // page_size)
    if len(runs) and int(first[-1] + count[-1]) == npages:
        total -= npages * page_size - nbytes
    return total


# -- post-copy switchover --------------------------------------------------


def binding_digest(hello: Hello, state: bytes) -> bytes:
    """128-bit digest of everything but the pages the program will see: the HELLO (sizes, mode, compat, id) and the state.

    COMPLETE and POSTCOPY carry it beside the table digest, so the commit
    (or the switch) covers every byte that reaches the program, not only
    the pages. Both ends compute it from the canonical encoding of the HELLO.
    """
    return xxhash.xxh3_128_digest(encode_hello(hello) + state)


def encode_complete(digest: bytes, binding: bytes) -> bytes:
    return encode_header(Frame.COMPLETE, length=COMPLETE_SIZE) + digest + binding


def table_digest(table: NDArray[np.uint64]) -> bytes:
    """128-bit digest of a per-page hash table: equal digests mean byte-identical regions."""
    return xxhash.xxh3_128_digest(np.ascontiguousarray(table, dtype="<u8").tobytes())
