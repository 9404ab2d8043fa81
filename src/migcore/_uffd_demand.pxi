# Asking for pages: the faults read from the userfaultfd and the ranges the
# program asks for become DEMAND frames sent on the socket.

from libc.errno cimport EAGAIN, ECONNRESET, EEXIST, EINTR, EPIPE, errno
from libc.stdint cimport uint8_t, uint32_t, uint64_t
from libc.stdlib cimport qsort
from libc.string cimport memset

cdef enum:
    _MSG_BATCH = 64     # fault messages read from the userfaultfd at once


cdef int _send_all(_Serve *s, const uint8_t *data, uint64_t n, double timeout) noexcept nogil:
    """Send ``n`` bytes on the non-blocking socket; 0, or a SERVE_* error."""
    cdef uint64_t done = 0
    cdef ssize_t k
    cdef pollfd pfd
    cdef int rc
    while done < n:
        k = send(s.sock, data + done, n - done, MSG_NOSIGNAL)
        if k > 0:
            done += k
            continue
        if k < 0 and errno != EAGAIN and errno != EINTR:
            s.info[_INFO_ERRNO] = errno
            s.where = 3
            return _SERVE_EOF if errno == ECONNRESET or errno == EPIPE else _SERVE_OS
        pfd.fd = s.sock
        pfd.events = POLLOUT
        pfd.revents = 0
        rc = poll(&pfd, 1, <int>(timeout * 1000) if timeout > 0 else -1)
        if rc == 0:
            return _SERVE_TIMEOUT
    return 0


cdef int _flush_demands(_Serve *s, double timeout) noexcept nogil:
    """Send the pending runs as DEMAND frames (sorted, merged)."""
    if s.npending == 0:
        return 0
    qsort(s.pending, s.npending, 16, mig_cmp_run)
    cdef uint64_t i, n = 0
    cdef uint64_t *rows = <uint64_t *>(s.frame + _HEADER_SIZE)
    for i in range(s.npending):
        if n and rows[2 * (n - 1)] + rows[2 * (n - 1) + 1] == s.pending[2 * i]:
            rows[2 * (n - 1) + 1] += s.pending[2 * i + 1]
        else:
            rows[2 * n] = s.pending[2 * i]
            rows[2 * n + 1] = s.pending[2 * i + 1]
            n += 1
    s.npending = 0
    # header: type u8 | flags u8 | reserved u16 | count u32 | length u64 (little-endian, as on x86)
    memset(s.frame, 0, _HEADER_SIZE)
    s.frame[0] = _FRAME_DEMAND
    (<uint32_t *>(s.frame + 4))[0] = <uint32_t>n
    (<uint64_t *>(s.frame + 8))[0] = n * _RUN_SIZE
    s.info[_INFO_DEMANDS] += 1
    return _send_all(s, s.frame, _HEADER_SIZE + n * _RUN_SIZE, timeout)


cdef int _demand(_Serve *s, uint64_t first, uint64_t stop, double timeout) noexcept nogil:
    """Ask for the owed, not yet asked-for pages of ``[first, stop)``."""
    cdef uint64_t p = first, q
    cdef int rc
    if stop > s.npages:
        stop = s.npages
    while p < stop:
        if not _bit(s.owed, p) or _bit(s.demanded, p):
            p += 1
            continue
        q = p
        while q < stop and _bit(s.owed, q) and not _bit(s.demanded, q):
            q += 1
        _set_range(s.demanded, p, q)
        if s.npending == s.max_runs:
            rc = _flush_demands(s, timeout)
            if rc:
                return rc
        s.pending[2 * s.npending] = p
        s.pending[2 * s.npending + 1] = q - p
        s.npending += 1
        p = q
    return 0


cdef int _serve_faults(_Serve *s, double timeout) noexcept nogil:
    """Read every queued page fault: owed pages are asked for, the others get the zero page."""
    cdef mig_uffd_msg msgs[_MSG_BATCH]
    cdef ssize_t k
    cdef int i, rc
    cdef uint64_t fault, page
    cdef mig_uffdio_zeropage zp
    cdef mig_uffdio_range rng
    while True:
        k = posix_read(s.uffd, &msgs[0], sizeof(msgs))
        if k < 0:
            if errno == EAGAIN:
                return 0
            if errno == EINTR:
                continue
            s.info[_INFO_ERRNO] = errno
            s.where = 4
            return _SERVE_OS
        for i in range(k // sizeof(mig_uffd_msg)):
            if msgs[i].event != MIG_UFFD_EVENT_PAGEFAULT:
                continue
            fault = msgs[i].arg[1] & ~(<uint64_t>_SYSTEM_PAGE - 1)
            if fault < s.addr or fault >= s.addr + s.limit:
                continue
            page = (fault - s.addr) // s.page_size
            if _bit(s.owed, page):
                rc = _demand(s, page, page + 1, timeout)
                if rc:
                    return rc
                continue
            # never sent by the source: the page is zero
            zp.range.start = fault
            zp.range.len = _SYSTEM_PAGE
            zp.mode = 0
            zp.zeropage = 0
            while mig_ioctl(s.uffd, MIG_UFFDIO_ZEROPAGE, &zp) < 0:
                if errno == EAGAIN or errno == EINTR:
                    continue
                if errno == EEXIST:  # installed meanwhile: make sure the faulting thread wakes
                    rng.start = fault
                    rng.len = _SYSTEM_PAGE
                    if mig_ioctl(s.uffd, MIG_UFFDIO_WAKE, &rng) < 0:
                        s.info[_INFO_ERRNO] = errno
                        s.where = 8
                        return _SERVE_OS
                    break
                s.info[_INFO_ERRNO] = errno
                s.where = 6
                return _SERVE_OS
