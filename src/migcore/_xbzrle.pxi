# Delta encoding of pages (QEMU's XBZRLE idea): xbzrle_encode, xbzrle_decode,
# delta_encode_runs, delta_decode_runs.
#
# A page's delta is the XOR of its new content with the copy the destination
# holds, run-length coded as pairs ``zrun nzrun bytes[nzrun]``: ``zrun`` bytes
# unchanged, then ``nzrun`` (>= 1) bytes to XOR in. Both lengths are ULEB128
# (at most 5 bytes); a trailing zero run may be left out. The decoder checks a
# whole delta before it writes a byte, and refuses one that would reach past
# the page.
#
# A batch (``delta_encode_runs``) is a table of ``u32`` little-endian lengths,
# one per page of the runs, then the pages' encodings in run order. Length
# ``L`` is a delta of ``L`` bytes; ``0x80000000 | n`` is the page sent raw
# (``n`` = the page's real size).

from libc.stdint cimport int64_t, uint8_t
from libc.string cimport memcpy

cdef enum:
    _RAW_BIT = 0x80000000
    _ULEB_MAX = 5


cdef inline Py_ssize_t _uleb_put(unsigned char *out, Py_ssize_t pos, Py_ssize_t limit,
                                 uint64_t value) noexcept nogil:
    """Append ``value`` as ULEB128; -1 when it does not fit before ``limit``."""
    while True:
        if pos >= limit:
            return -1
        if value < 0x80:
            out[pos] = <unsigned char>value
            return pos + 1
        out[pos] = <unsigned char>((value & 0x7F) | 0x80)
        value >>= 7
        pos += 1


cdef inline Py_ssize_t _uleb_get(const unsigned char *src, Py_ssize_t pos, Py_ssize_t end,
                                 uint64_t *value) noexcept nogil:
    """Read a ULEB128 at ``pos``; -1 when truncated or longer than 5 bytes."""
    cdef uint64_t v = 0
    cdef int shift = 0, k
    for k in range(_ULEB_MAX):
        if pos >= end:
            return -1
        v |= (<uint64_t>(src[pos] & 0x7F)) << shift
        shift += 7
        if not src[pos] & 0x80:
            value[0] = v
            return pos + 1
        pos += 1
    return -1


cdef Py_ssize_t _xbzrle_encode(const unsigned char *old, const unsigned char *new,
                               Py_ssize_t n, unsigned char *out, Py_ssize_t limit) noexcept nogil:
    """Encode ``new`` against ``old`` (``n`` bytes each) into at most ``limit`` bytes; -1 if larger."""
    cdef Py_ssize_t i = 0, pos = 0, start, k
    cdef uint64_t a, b
    while i < n:
        start = i
        # the unchanged stretch, a word at a time where possible
        while i + 8 <= n:
            memcpy(&a, old + i, 8)
            memcpy(&b, new + i, 8)
            if a != b:
                break
            i += 8
        while i < n and old[i] == new[i]:
            i += 1
        if i == n:
            break  # a trailing zero run is left out
        pos = _uleb_put(out, pos, limit, <uint64_t>(i - start))
        if pos < 0:
            return -1
        start = i
        while i < n and old[i] != new[i]:
            i += 1
        pos = _uleb_put(out, pos, limit, <uint64_t>(i - start))
        if pos < 0 or pos + (i - start) > limit:
            return -1
        for k in range(start, i):
            out[pos] = old[k] ^ new[k]
            pos += 1
    return pos


cdef int _xbzrle_check(const unsigned char *src, Py_ssize_t dlen, Py_ssize_t n) noexcept nogil:
    """0 if the delta is well formed for a page of ``n`` bytes; 1 truncated, 2 past the page, 3 empty run."""
    cdef Py_ssize_t i = 0
    cdef uint64_t pos = 0, zrun, nzrun
    while i < dlen:
        i = _uleb_get(src, i, dlen, &zrun)
        if i < 0:
            return 1
        if zrun > <uint64_t>n - pos:
            return 2
        pos += zrun
        if i == dlen:
            return 0
        i = _uleb_get(src, i, dlen, &nzrun)
        if i < 0:
            return 1
        if nzrun == 0:
            return 3
        if nzrun > <uint64_t>n - pos:
            return 2
        if nzrun > <uint64_t>(dlen - i):
            return 1
        i += nzrun
        pos += nzrun
    return 0


cdef void _xbzrle_apply(const unsigned char *src, Py_ssize_t dlen, unsigned char *page) noexcept nogil:
    """XOR a delta already checked by ``_xbzrle_check`` into ``page``."""
    cdef Py_ssize_t i = 0, k
    cdef uint64_t pos = 0, zrun = 0, nzrun = 0
    while i < dlen:
        i = _uleb_get(src, i, dlen, &zrun)
        pos += zrun
        if i == dlen:
            return
        i = _uleb_get(src, i, dlen, &nzrun)
        for k in range(<Py_ssize_t>nzrun):
            page[pos + k] ^= src[i + k]
        i += nzrun
        pos += nzrun


cdef str _delta_error(int code):
    if code == 1:
        return "delta is truncated (a length or its bytes run past the end of the delta)"
    if code == 2:
        return "delta would write past the end of the page"
    return "delta has a non-zero run of length 0"


def xbzrle_encode(old, new, out):
    """Encode ``new`` against ``old`` (same size) into ``out``; the encoded size, or -1 if it does not fit."""
    cdef const unsigned char[::1] a = _byte_view(old)
    cdef const unsigned char[::1] b = _byte_view(new)
    cdef unsigned char[::1] o = _writable_byte_view(out)
    if a.shape[0] != b.shape[0]:
        raise ValueError(f"old and new differ in size ({a.shape[0]} and {b.shape[0]} bytes)")
    cdef Py_ssize_t r
    with nogil:
        r = _xbzrle_encode(&a[0] if a.shape[0] else NULL, &b[0] if b.shape[0] else NULL, a.shape[0],
                           &o[0] if o.shape[0] else NULL, o.shape[0])
    return r


def xbzrle_decode(delta, page):
    """XOR ``delta`` into the writable ``page``; ``ValueError`` (and nothing written) if it is malformed."""
    cdef const unsigned char[::1] d = _byte_view(delta)
    cdef unsigned char[::1] p = _writable_byte_view(page)
    cdef int code
    cdef const unsigned char *dp = &d[0] if d.shape[0] else NULL
    with nogil:
        code = _xbzrle_check(dp, d.shape[0], p.shape[0])
        if code == 0 and d.shape[0]:
            _xbzrle_apply(dp, d.shape[0], &p[0])
    if code:
        raise ValueError(_delta_error(code))


cdef const unsigned char[::1] _byte_view(object obj):
    cdef memoryview view = memoryview(obj)
    if not view.c_contiguous:
        raise ValueError("buffer must be C-contiguous")
    return view.cast("B") if view.ndim != 1 or view.format != "B" else view


cdef unsigned char[::1] _writable_byte_view(object obj):
    cdef memoryview view = memoryview(obj)
    if not view.c_contiguous:
        raise ValueError("buffer must be C-contiguous")
    if view.readonly:
        raise TypeError("output buffer must be writable")
    return view.cast("B") if view.ndim != 1 or view.format != "B" else view


cdef inline void _put_u32(unsigned char *p, uint64_t v) noexcept nogil:
    p[0] = v & 0xFF
    p[1] = (v >> 8) & 0xFF
    p[2] = (v >> 16) & 0xFF
    p[3] = (v >> 24) & 0xFF


cdef inline uint64_t _get_u32(const unsigned char *p) noexcept nogil:
    return p[0] | (<uint64_t>p[1] << 8) | (<uint64_t>p[2] << 16) | (<uint64_t>p[3] << 24)


def delta_encode_runs(buf, page_size, runs, cache, slots, bases, out):
    """Encode the pages of ``runs`` as one delta batch into ``out``; returns ``(bytes written, overflow)``.

    ``slots[k]`` is the row of the 2-D ``uint8`` ``cache`` kept for the
    ``k``-th page of the runs (-1: none); where ``bases[k]`` is non-zero that
    row holds the destination's copy, and the page goes as a delta when it is
    smaller than the page (otherwise raw: one more ``overflow``). Every page
    is read once, and the bytes sent become the row's new content. ``out``
    needs ``4 * pages + runs_nbytes`` bytes.
    """
    cdef Py_buffer data
    cdef Py_ssize_t size = _stream_page_size(page_size)
    cdef const int64_t[::1] sl = slots
    cdef const uint8_t[::1] ba = bases
    cdef uint8_t[:, ::1] cc = cache
    cdef unsigned char[::1] o = _writable_byte_view(out)
    cdef const uint64_t[:, ::1] rows
    cdef Py_ssize_t npg = 0, i, j, k = 0, pos, plen, enc, overflow = 0, nslots = cc.shape[0]
    cdef uint64_t total, first, nbytes
    cdef unsigned char *scratch
    cdef const unsigned char *base
    if cc.shape[1] < size and nslots:
        raise ValueError(f"cache rows of {cc.shape[1]} bytes are shorter than a page")
    _stream_buffer(buf, &data, False, "buffer")
    try:
        nbytes = data.len
        rows = _stream_runs(runs, (nbytes + size - 1) // size)
        for i in range(rows.shape[0]):
            npg += rows[i, 1]
        total = _payload_bytes(rows, size, nbytes)
        if sl.shape[0] != npg or ba.shape[0] != npg:
            raise ValueError(f"slots and bases need one item per page of the runs ({npg})")
        for i in range(npg):
            if sl[i] < -1 or sl[i] >= nslots or (ba[i] and sl[i] < 0):
                raise ValueError(f"slot {sl[i]} of page {i} is outside the cache's {nslots} rows")
        if <uint64_t>o.shape[0] < 4 * <uint64_t>npg + total:
            raise ValueError(f"out needs {4 * npg + total} bytes, has {o.shape[0]}")
        scratch = <unsigned char *>malloc(size)
        if scratch == NULL:
            raise MemoryError()
        base = <const unsigned char *>data.buf
        with nogil:
            pos = 4 * npg
            for i in range(rows.shape[0]):
                first = rows[i, 0]
                for j in range(<Py_ssize_t>rows[i, 1]):
                    plen = <Py_ssize_t>_clipped_run_bytes(first + j, 1, size, nbytes)
                    memcpy(scratch, base + (first + j) * size, plen)
                    enc = -1
                    if ba[k]:
                        enc = _xbzrle_encode(&cc[sl[k], 0], scratch, plen, &o[pos], plen - 1)
                        if enc < 0:
                            overflow += 1
                    if enc >= 0:
                        _put_u32(&o[4 * k], enc)
                        pos += enc
                    else:
                        memcpy(&o[pos], scratch, plen)
                        _put_u32(&o[4 * k], _RAW_BIT | plen)
                        pos += plen
                    if sl[k] >= 0:
                        memcpy(&cc[sl[k], 0], scratch, plen)
                    k += 1
        free(scratch)
        return pos, overflow
    finally:
        PyBuffer_Release(&data)


def delta_decode_runs(buf, page_size, runs, payload):
    """Apply a delta batch (see ``delta_encode_runs``) to the pages of ``runs`` in the writable ``buf``.

    The whole batch is checked first: a malformed table, a raw page of the
    wrong size, a delta reaching past its page or bytes left over raise
    ``ValueError`` before any byte of ``buf`` changes.
    """
    cdef Py_buffer data
    cdef Py_ssize_t size = _stream_page_size(page_size)
    cdef const unsigned char[::1] p = _byte_view(payload)
    cdef const uint64_t[:, ::1] rows
    cdef Py_ssize_t npg = 0, i, j, k, pos, plen, n = p.shape[0]
    cdef uint64_t length, first, nbytes
    cdef int code = 0, apply
    cdef unsigned char *base
    cdef const unsigned char *src = &p[0] if n else NULL
    _stream_buffer(buf, &data, True, "buffer")
    try:
        nbytes = data.len
        rows = _stream_runs(runs, (nbytes + size - 1) // size)
        for i in range(rows.shape[0]):
            npg += rows[i, 1]
        if n < 4 * npg:
            raise ValueError(f"delta batch of {n} bytes is shorter than its table of {npg} pages")
        base = <unsigned char *>data.buf
        with nogil:
            for apply in range(2):  # check everything, then write
                k = 0
                pos = 4 * npg
                for i in range(rows.shape[0]):
                    first = rows[i, 0]
                    for j in range(<Py_ssize_t>rows[i, 1]):
                        plen = <Py_ssize_t>_clipped_run_bytes(first + j, 1, size, nbytes)
                        length = _get_u32(src + 4 * k)
                        if length & _RAW_BIT:
                            length &= ~(<uint64_t>_RAW_BIT)
                            if length != <uint64_t>plen:
                                code = 4
                            elif length > <uint64_t>(n - pos):
                                code = 1
                            elif apply:
                                memcpy(base + (first + j) * size, src + pos, plen)
                        elif length > <uint64_t>(n - pos):
                            code = 1
                        elif apply:
                            _xbzrle_apply(src + pos, length, base + (first + j) * size)
                        else:
                            code = _xbzrle_check(src + pos, length, plen)
                        if code:
                            break
                        pos += length
                        k += 1
                    if code:
                        break
                if code:
                    break
                if pos != n:
                    code = 5
                    break
        if code == 4:
            raise ValueError("a raw page in the delta batch has the wrong size")
        if code == 5:
            raise ValueError(f"delta batch has {n - pos} bytes left over after its pages")
        if code:
            raise ValueError(_delta_error(code))
    finally:
        PyBuffer_Release(&data)
