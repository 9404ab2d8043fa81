# Landing pages: a received PAGES runs table is validated, then its pages are
# hashed into the table and installed (UFFDIO_COPY, or UFFDIO_ZEROPAGE for a
# zero notice) and their waiting threads woken.

from libc.errno cimport EAGAIN, EINTR, errno
from libc.stdint cimport int64_t, uint8_t, uint64_t
from libc.string cimport memset


cdef int _check_runs(_Serve *s, uint64_t count, uint64_t length, bint zero) noexcept nogil:
    """Validate a PAGES runs table before any page byte is read: in range, ascending, owed, consistent."""
    cdef const uint64_t *rows = s.runs
    cdef uint64_t i, p, first, n, prev_end = 0, pages = 0, payload
    for i in range(count):
        first = rows[2 * i]
        n = rows[2 * i + 1]
        if n == 0 or n > s.npages or first > s.npages - n or (i and first < prev_end):
            s.info[_INFO_DETAIL] = 4
            return _SERVE_PROTOCOL
        for p in range(first, first + n):
            if not _bit(s.owed, p):
                s.info[_INFO_DETAIL] = 5
                return _SERVE_PROTOCOL
        prev_end = first + n
        pages += n
    payload = pages * s.page_size
    if prev_end == s.npages:
        payload -= s.npages * s.page_size - s.nbytes
    if zero:  # a zero notice carries no payload (checked with its header)
        return 0
    if payload != length:
        s.info[_INFO_DETAIL] = 6
        return _SERVE_PROTOCOL
    return 0


cdef int _wake(_Serve *s, uint64_t start, uint64_t length) noexcept nogil:
    """UFFDIO_WAKE the threads blocked on ``[start, start + length)``."""
    cdef mig_uffdio_range rng
    rng.start = start
    rng.len = length
    while mig_ioctl(s.uffd, MIG_UFFDIO_WAKE, &rng) < 0:
        if errno == EINTR:
            continue
        s.info[_INFO_ERRNO] = errno
        s.where = 8
        return _SERVE_OS
    return 0


cdef int _present(_Serve *s, uint64_t first, uint64_t n, uint64_t span) noexcept nogil:
    """Pages ``[first, first + n)`` were installed without waking: clear their owed bits, then wake.

    In that order, so whoever wakes sees them no longer owed (a thread woken
    before the bits cleared took them for missing after a lost link).
    """
    cdef uint64_t p
    for p in range(first, first + n):
        s.owed[p >> 6] &= ~((<uint64_t>1) << (p & 63))
    return _wake(s, s.addr + first * s.page_size, span)


cdef int _fill(_Serve *s, uint64_t dst, const uint8_t *src, uint64_t span) noexcept nogil:
    """Install ``span`` bytes at ``dst``: UFFDIO_COPY from ``src``, or UFFDIO_ZEROPAGE when ``src`` is NULL.

    DONTWAKE (the caller wakes once the owed bits are clear); a partial
    install is resumed where the kernel stopped, EAGAIN and EINTR retried.
    """
    cdef mig_uffdio_copy cp
    cdef mig_uffdio_zeropage zp
    cdef uint64_t done = 0
    cdef int64_t moved
    cdef int rc
    while done < span:
        if src == NULL:
            zp.range.start = dst + done
            zp.range.len = span - done
            zp.mode = MIG_UFFDIO_ZEROPAGE_MODE_DONTWAKE
            zp.zeropage = 0
            rc = mig_ioctl(s.uffd, MIG_UFFDIO_ZEROPAGE, &zp)
            moved = zp.zeropage
        else:
            cp.dst = dst + done
            cp.src = <uint64_t>(src + done)
            cp.len = span - done
            cp.mode = MIG_UFFDIO_COPY_MODE_DONTWAKE
            cp.copy = 0
            rc = mig_ioctl(s.uffd, MIG_UFFDIO_COPY, &cp)
            moved = cp.copy
        if moved > 0:
            done += <uint64_t>moved
        if rc < 0:
            if errno == EAGAIN or errno == EINTR:
                continue
            s.info[_INFO_ERRNO] = errno
            s.where = 6 if src == NULL else 5
            return _SERVE_OS
    return 0


cdef int _install_zero(_Serve *s, uint64_t count) noexcept nogil:
    """Install every page of a validated zero notice with UFFDIO_ZEROPAGE, then mark it present."""
    cdef const uint64_t *rows = s.runs
    cdef uint64_t i, p, first, n, span
    cdef uint64_t ps = s.page_size
    cdef int rc
    for i in range(count):
        first = rows[2 * i]
        n = rows[2 * i + 1]
        for p in range(first, first + n):
            s.table[p] = s.zero_hash if (p + 1) * ps <= s.nbytes else s.tail_hash
        span = n * ps
        if first * ps + span > s.limit:
            span = s.limit - first * ps
        rc = _fill(s, s.addr + first * ps, NULL, span)
        if rc == 0:
            rc = _present(s, first, n, span)
        if rc:
            return rc
        s.info[_INFO_REMAINING] -= n
        s.info[_INFO_ZERO] += n
    return 0


cdef int _install(_Serve *s, uint64_t count, uint64_t length) noexcept nogil:
    """Hash and install every page of a received PAGES frame with UFFDIO_COPY, then mark it present."""
    cdef const uint64_t *rows = s.runs
    cdef uint64_t i, p, first, n, off = 0, nb, span
    cdef uint64_t ps = s.page_size
    cdef int rc
    # zero padding after a partial last page, up to the next system page
    memset(s.payload + length, 0, ps)
    for i in range(count):
        first = rows[2 * i]
        n = rows[2 * i + 1]
        for p in range(first, first + n):
            nb = ps if (p + 1) * ps <= s.nbytes else s.nbytes - p * ps
            s.table[p] = XXH3_64bits(s.payload + off + (p - first) * ps, nb)
        span = n * ps
        if first * ps + span > s.limit:
            span = s.limit - first * ps
        rc = _fill(s, s.addr + first * ps, s.payload + off, span)
        if rc == 0:
            rc = _present(s, first, n, span)
        if rc:
            return rc
        s.info[_INFO_REMAINING] -= n
        s.info[_INFO_PAGES] += n
        off += n * ps
    s.info[_INFO_PAYLOAD] += length
    return 0
