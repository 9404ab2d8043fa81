# The loop itself: one poll over the userfaultfd, the socket and the wake pipe,
# run entirely without the GIL, and ``serve_postcopy``, which validates its
# arguments, allocates its buffers and runs it.

from libc.errno cimport EAGAIN, EBADF, ECONNRESET, EINTR, errno
from libc.stdint cimport uint8_t, uint64_t
from libc.stdlib cimport calloc, free, malloc
from libc.string cimport memset


cdef int _serve_loop(_Serve *s, double timeout) noexcept nogil:
    cdef pollfd fds[3]
    cdef int nfds, rc, i
    cdef uint64_t want, got = 0, count = 0, length = 0
    cdef int section = 0   # 0 header, 1 runs table, 2 payload
    cdef bint zero = False
    cdef uint8_t *dst = s.header
    cdef _Header h
    cdef ssize_t k
    cdef double last = mig_now()
    cdef uint64_t req[64]
    want = _WIRE_HEADER
    while True:
        fds[0].fd = s.uffd
        fds[0].events = POLLIN
        fds[1].fd = s.sock
        fds[1].events = POLLIN
        fds[2].fd = s.wake
        fds[2].events = POLLIN
        nfds = 3 if s.wake >= 0 else 2
        for i in range(nfds):
            fds[i].revents = 0
        rc = poll(fds, nfds, 200)
        if rc < 0:
            if errno == EINTR:
                continue
            s.info[_INFO_ERRNO] = errno
            s.where = 1
            return _SERVE_OS
        if fds[1].revents & POLLNVAL:
            s.info[_INFO_ERRNO] = EBADF
            s.where = 2
            return _SERVE_EOF
        if nfds == 3 and fds[2].revents:
            k = posix_read(s.wake, &req[0], sizeof(req))
            if k == 0:
                return _SERVE_STOPPED
            if k < 0 and errno != EAGAIN and errno != EINTR:
                s.info[_INFO_ERRNO] = errno
                s.where = 7
                return _SERVE_OS
            if k < 0:
                k = 0
            for i in range(<int>(k // 16)):
                if req[2 * i] == <uint64_t>-1:
                    return _SERVE_STOPPED
                rc = _demand(s, req[2 * i], req[2 * i + 1], timeout)
                if rc:
                    return rc
        if fds[0].revents:
            rc = _serve_faults(s, timeout)
            if rc:
                return rc
        rc = _flush_demands(s, timeout)
        if rc:
            return rc
        if not fds[1].revents:
            if timeout > 0 and mig_now() - last > timeout:
                return _SERVE_TIMEOUT
            continue
        k = recv(s.sock, dst + got, want - got, 0)
        if k == 0:
            s.where = 2
            return _SERVE_EOF
        if k < 0:
            if errno == EAGAIN or errno == EINTR:
                continue
            s.info[_INFO_ERRNO] = errno
            s.where = 2
            return _SERVE_EOF if errno == ECONNRESET else _SERVE_OS
        last = mig_now()
        got += k
        s.info[_INFO_WIRE] += k
        if got < want:
            continue
        got = 0
        if section == 0:
            _get_header(s.header, &h)
            rc = _pages_header(&s.layout, &h)
            if rc == 0:
                # two little-endian words, so the caller gets the bytes back on any host
                s.info[_INFO_HEADER] = _get_le(s.header, 8)
                s.info[_INFO_HEADER + 1] = _get_le(s.header + 8, 8)
                return 0
            if rc < 0:
                s.info[_INFO_DETAIL] = -rc
                return _SERVE_PROTOCOL
            zero = rc == 2
            count = h.count
            length = h.length
            if count == 0 or count > s.max_runs:
                s.info[_INFO_DETAIL] = 2
                return _SERVE_PROTOCOL
            if length > s.max_payload:
                s.info[_INFO_DETAIL] = 3
                return _SERVE_PROTOCOL
            section = 1
            dst = s.runs_wire
            want = count * _WIRE_RUN
        elif section == 1:
            _get_runs(s.runs_wire, s.runs, count)
            rc = _check_runs(s, count, length, zero)
            if rc:
                return rc
            if zero:
                rc = _install_zero(s, count)
                if rc:
                    return rc
                section = 0
                dst = s.header
                want = _WIRE_HEADER
                continue
            section = 2
            dst = s.payload
            want = length
        else:
            rc = _install(s, count, length)
            if rc:
                return rc
            section = 0
            dst = s.header
            want = _WIRE_HEADER


def serve_postcopy(
    object layout,
    int uffd,
    int sock,
    int wake_fd,
    uint64_t addr,
    uint64_t nbytes,
    uint64_t page_size,
    uint64_t[::1] owed,
    uint64_t[::1] table,
    uint64_t[::1] info,
    uint64_t max_runs,
    uint64_t max_payload,
    double timeout,
) -> int:
    """Serve post-copy page faults and install arriving pages until a frame other than PAGES, without the GIL.

    Polls the userfaultfd (faults on owed pages become DEMAND frames, the
    others get the zero page), ``wake_fd`` (16-byte ``(first, stop)`` page
    ranges to ask for; ``first = 2**64 - 1`` or end of file stops the loop)
    and the socket (PAGES frames are validated against the region and the
    ``owed`` bitmap before their payload is read, then hashed into ``table``
    and installed with UFFDIO_COPY; ``owed`` bits clear as pages land). Once
    no page is owed it unregisters ``[addr, addr + nbytes)`` (rounded up to
    the system page) and wakes the range before it takes the GIL again; while
    pages are owed the registration stays, so no thread reads a page that did
    not come (call it again with a new socket, or ``fill_owed``). Returns 0 when it stopped at
    another frame (its header in ``info[_INFO_HEADER:_INFO_HEADER + 2]``) or a
    negative ``SERVE_*`` code; ``info`` also counts pages, bytes and demands.
    ``layout`` is ``migcore._protocol.LOOP_LAYOUT``: the frame numbers and
    flags the loop reads and writes (``ValueError`` if its sizes are not the
    ones the loop implements).
    """
    cdef _Layout w
    _layout_from(layout, &w)
    if page_size < _SYSTEM_PAGE or page_size % _SYSTEM_PAGE:
        raise ValueError(f"page_size must be a multiple of {_SYSTEM_PAGE}")
    cdef uint64_t npages = (nbytes + page_size - 1) // page_size
    if <uint64_t>owed.shape[0] * 64 < npages or <uint64_t>table.shape[0] < npages or info.shape[0] < _INFO_SIZE:
        raise ValueError("owed, table or info too short")
    if max_runs == 0 or max_runs > 1 << 20:
        raise ValueError("max_runs out of range")
    cdef _Serve s
    memset(&s, 0, sizeof(s))
    s.layout = w
    s.uffd = uffd
    s.sock = sock
    s.wake = wake_fd
    s.addr = addr
    s.nbytes = nbytes
    s.page_size = page_size
    s.npages = npages
    s.limit = _round_up(nbytes, _SYSTEM_PAGE)
    s.owed = &owed[0]
    s.table = &table[0]
    s.info = &info[0]
    s.max_runs = max_runs
    s.max_payload = max_payload
    cdef int rc
    cdef mig_uffdio_range rng
    with nogil:
        s.demanded = <uint64_t *>calloc((npages + 63) // 64, 8)
        s.pending = <uint64_t *>malloc(max_runs * 16)
        s.frame = <uint8_t *>malloc(_WIRE_HEADER + max_runs * _WIRE_RUN)
        s.runs_wire = <uint8_t *>malloc(max_runs * _WIRE_RUN)
        s.runs = <uint64_t *>malloc(max_runs * 16)
        s.payload = <uint8_t *>malloc(max_payload + page_size)
        if s.payload:  # the hashes of a zero page and of the zero partial last page, for zero notices
            memset(s.payload, 0, page_size)
            s.zero_hash = XXH3_64bits(s.payload, page_size)
            s.tail_hash = XXH3_64bits(s.payload, nbytes - (npages - 1) * page_size)
        if not (s.demanded and s.pending and s.frame and s.runs_wire and s.runs and s.payload):
            s.where = 9
            rc = _SERVE_OS
        else:
            (<volatile uint64_t *>&s.info[_INFO_READY])[0] = 1
            rc = _serve_loop(&s, timeout)
        if s.info[_INFO_REMAINING] == 0:
            # every owed page is installed: the region becomes ordinary memory, here, before the GIL is
            # taken again, and every thread still blocked on it (a late fault on a page never sent) wakes
            rng.start = addr
            rng.len = s.limit
            mig_ioctl(uffd, MIG_UFFDIO_UNREGISTER, &rng)
            mig_ioctl(uffd, MIG_UFFDIO_WAKE, &rng)
        # while pages are owed the registration stays, whatever stopped the loop: a thread touching an
        # owed page stays blocked until it comes through a recovered link, or the program gives it up
        # (fill_owed)
        free(s.demanded)
        free(s.pending)
        free(s.frame)
        free(s.runs_wire)
        free(s.runs)
        free(s.payload)
    info[_INFO_WHERE] = s.where
    return rc
