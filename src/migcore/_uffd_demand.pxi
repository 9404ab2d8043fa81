# Asking for pages: the faults read from the userfaultfd and the ranges the
# program asks for become DEMAND frames sent on the socket.

from libc.errno cimport EAGAIN, ECONNRESET, EEXIST, EINTR, EPIPE, errno
from libc.stdint cimport uint8_t, uint64_t
from libc.stdlib cimport qsort

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


cdef uint64_t _merge_runs(uint64_t *runs, uint64_t n) noexcept nogil:
    """Sort ``n`` (first, count) runs and merge adjacent ones, in place; returns how many remain."""
    qsort(runs, n, 16, mig_cmp_run)
    cdef uint64_t i, m = 0
    for i in range(n):
        if m and runs[2 * (m - 1)] + runs[2 * (m - 1) + 1] == runs[2 * i]:
            runs[2 * (m - 1) + 1] += runs[2 * i + 1]
        else:
            runs[2 * m] = runs[2 * i]
            runs[2 * m + 1] = runs[2 * i + 1]
            m += 1
    return m


cdef int _flush_demands(_Serve *s, double timeout) noexcept nogil:
    """Send the pending runs as one DEMAND frame (sorted, merged)."""
    if s.npending == 0:
        return 0
    cdef uint64_t n = _merge_runs(s.pending, s.npending)
    s.npending = 0
    s.info[_INFO_DEMANDS] += 1
    return _send_all(s, s.frame, _put_demand(&s.layout, s.frame, s.pending, n), timeout)


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
