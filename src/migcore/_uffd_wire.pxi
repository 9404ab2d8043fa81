# The frames the fault-service loop reads and writes: a header (type u8 |
# flags u8 | reserved u16 | count u32 | length u64) and runs tables of
# (first page, page count) u64 pairs, all little-endian whatever the host's
# byte order, so they are built and read byte by byte, never cast.
#
# Which numbers mean PAGES, DEMAND and the post-copy flags is not written
# here: ``migcore._protocol.LOOP_LAYOUT`` hands them over when the loop starts,
# checked with the GIL held. The small ``def`` functions at the end run these
# exact code paths, so tests can hold them against ``_protocol``.

from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t

cdef enum:
    # the sizes this code implements; a layout that says otherwise is refused
    _WIRE_HEADER = 16
    _WIRE_RUN = 16

cdef struct _Layout:
    uint8_t pages       # frame type of PAGES
    uint8_t demand      # frame type of DEMAND
    uint8_t postcopy    # PAGES flag of every post-copy frame
    uint8_t zero        # PAGES flag (with postcopy) of a zero notice

cdef struct _Header:
    uint8_t type
    uint8_t flags
    uint16_t reserved
    uint32_t count
    uint64_t length


cdef int _layout_from(object layout, _Layout *out) except -1:
    """Check a ``_protocol.LoopLayout`` against what this code implements; copy its numbers into ``out``."""
    if layout.header_size != _WIRE_HEADER or layout.run_size != _WIRE_RUN:
        raise ValueError(f"layout has {layout.header_size}-byte headers and {layout.run_size}-byte runs; "
                         f"the loop implements {_WIRE_HEADER} and {_WIRE_RUN}")
    cdef dict values = {name: int(getattr(layout, name)) for name in ("pages", "demand", "postcopy", "zero")}
    for name, value in values.items():
        if not 0 <= value <= 0xFF:
            raise ValueError(f"layout {name}={value} does not fit the header's byte")
    if not values["postcopy"] or not values["zero"] or values["postcopy"] & values["zero"]:
        raise ValueError("layout postcopy and zero flags must be non-zero and share no bit")
    out.pages = values["pages"]
    out.demand = values["demand"]
    out.postcopy = values["postcopy"]
    out.zero = values["zero"]
    return 0


cdef inline void _put_le(uint8_t *p, uint64_t value, int nbytes) noexcept nogil:
    cdef int i
    for i in range(nbytes):
        p[i] = <uint8_t>(value >> (8 * i))


cdef inline uint64_t _get_le(const uint8_t *p, int nbytes) noexcept nogil:
    cdef uint64_t value = 0
    cdef int i
    for i in range(nbytes):
        value |= (<uint64_t>p[i]) << (8 * i)
    return value


cdef void _put_header(uint8_t *h, uint8_t ftype, uint8_t flags, uint32_t count, uint64_t length) noexcept nogil:
    h[0] = ftype
    h[1] = flags
    _put_le(h + 2, 0, 2)
    _put_le(h + 4, count, 4)
    _put_le(h + 8, length, 8)


cdef void _get_header(const uint8_t *h, _Header *out) noexcept nogil:
    out.type = h[0]
    out.flags = h[1]
    out.reserved = <uint16_t>_get_le(h + 2, 2)
    out.count = <uint32_t>_get_le(h + 4, 4)
    out.length = _get_le(h + 8, 8)


cdef void _put_runs(uint8_t *table, const uint64_t *runs, uint64_t n) noexcept nogil:
    """Write ``n`` native (first, count) pairs as a runs table."""
    cdef uint64_t i
    for i in range(2 * n):
        _put_le(table + 8 * i, runs[i], 8)


cdef void _get_runs(const uint8_t *table, uint64_t *runs, uint64_t n) noexcept nogil:
    """Read a runs table of ``n`` runs into native (first, count) pairs."""
    cdef uint64_t i
    for i in range(2 * n):
        runs[i] = _get_le(table + 8 * i, 8)


cdef uint64_t _put_demand(const _Layout *w, uint8_t *frame, const uint64_t *runs, uint64_t n) noexcept nogil:
    """A DEMAND frame asking for ``n`` runs, header then runs table, into ``frame``; returns its size."""
    _put_header(frame, w.demand, 0, <uint32_t>n, n * _WIRE_RUN)
    _put_runs(frame + _WIRE_HEADER, runs, n)
    return _WIRE_HEADER + n * _WIRE_RUN


cdef int _pages_header(const _Layout *w, const _Header *h) noexcept nogil:
    """What the loop does with a received header.

    0: not PAGES, the loop stops there; 1: post-copy pages follow; 2: a zero
    notice (runs, no payload); negative: minus a ``PROTOCOL_DETAILS`` key.
    Run count and payload limits are the loop's to check.
    """
    if h.type != w.pages:
        return 0
    if h.reserved or (h.flags != w.postcopy and h.flags != (w.postcopy | w.zero)):
        return -1
    if h.flags == w.postcopy:
        return 1
    return -7 if h.length else 2


# -- the same code paths, callable from Python (tests compare them with _protocol) --------------

def encode_header(uint8_t ftype, uint8_t flags, uint32_t count, uint64_t length) -> bytes:
    """The header bytes the loop writes for these fields."""
    cdef uint8_t h[_WIRE_HEADER]
    _put_header(h, ftype, flags, count, length)
    return (<char *>h)[:_WIRE_HEADER]


def decode_header(const uint8_t[::1] data) -> tuple:
    """``(type, flags, reserved, count, length)`` as the loop reads a header."""
    if data.shape[0] != _WIRE_HEADER:
        raise ValueError(f"a header is {_WIRE_HEADER} bytes, got {data.shape[0]}")
    cdef _Header h
    _get_header(&data[0], &h)
    return h.type, h.flags, h.reserved, h.count, h.length


def classify_header(layout: object, const uint8_t[::1] data) -> int:
    """What the loop does with a received header under ``layout`` (see ``_pages_header``)."""
    cdef _Layout w
    _layout_from(layout, &w)
    if data.shape[0] != _WIRE_HEADER:
        raise ValueError(f"a header is {_WIRE_HEADER} bytes, got {data.shape[0]}")
    cdef _Header h
    _get_header(&data[0], &h)
    return _pages_header(&w, &h)


def encode_demand(layout: object, const uint64_t[:, ::1] runs) -> bytes:
    """The DEMAND frame the loop sends for ``runs`` (an ``(n, 2)`` array, already sorted and merged)."""
    cdef _Layout w
    _layout_from(layout, &w)
    if runs.shape[1] != 2 or <uint64_t>runs.shape[0] > 0xFFFFFFFF:
        raise ValueError("runs must be an (n, 2) array with n < 2**32")
    cdef uint64_t n = runs.shape[0]
    frame = bytearray(_WIRE_HEADER + n * _WIRE_RUN)
    cdef uint8_t[::1] out = frame
    _put_demand(&w, &out[0], &runs[0, 0] if n else NULL, n)
    return bytes(frame)


def decode_runs(const uint8_t[::1] table, uint64_t[::1] out) -> int:
    """Read a runs table into ``out`` as (first, count) pairs, as the loop does; returns the run count."""
    if table.shape[0] % _WIRE_RUN or out.shape[0] * 8 < table.shape[0]:
        raise ValueError("table must be whole runs and out must hold them")
    cdef uint64_t n = table.shape[0] // _WIRE_RUN
    if n:
        _get_runs(&table[0], &out[0], n)
    return n
