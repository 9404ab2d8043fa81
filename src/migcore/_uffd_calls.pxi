# The system calls: open a userfaultfd, register, write-protect, scan pages with
# PAGEMAP_SCAN, discard and touch pages. Each ``def`` validates with the GIL
# held and makes its call (or its scan loop) in one ``with nogil:`` block.

from cpython.buffer cimport PyBUF_SIMPLE, PyBuffer_Release, PyObject_GetBuffer
from libc.errno cimport EAGAIN, EEXIST, EINTR, errno
from libc.stdint cimport uint8_t, uint64_t
from libc.string cimport memset

cdef enum:
    _SYSTEM_PAGE = 4096
    _SCAN_VEC = 512     # page regions one PAGEMAP_SCAN call returns

SYSTEM_PAGE = _SYSTEM_PAGE

#: Mode bits of :func:`register`.
REGISTER_MODE_MISSING = MIG_UFFDIO_REGISTER_MODE_MISSING
REGISTER_MODE_WP = MIG_UFFDIO_REGISTER_MODE_WP
#: Feature bits of :func:`open_uffd`.
FEATURE_WP_UNPOPULATED = MIG_UFFD_FEATURE_WP_UNPOPULATED
FEATURE_WP_ASYNC = MIG_UFFD_FEATURE_WP_ASYNC


# page bitmaps (bit i of word i // 64), shared with the fault-service loop
cdef inline uint64_t _round_up(uint64_t n, uint64_t to) noexcept nogil:
    return (n + to - 1) // to * to


cdef inline bint _bit(const uint64_t *bitmap, uint64_t i) noexcept nogil:
    return (bitmap[i >> 6] >> (i & 63)) & 1


cdef inline void _set_range(uint64_t *bitmap, uint64_t start, uint64_t stop) noexcept nogil:
    cdef uint64_t i = start
    while i < stop and (i & 63):
        bitmap[i >> 6] |= (<uint64_t>1) << (i & 63)
        i += 1
    while i + 64 <= stop:
        bitmap[i >> 6] = ~(<uint64_t>0)
        i += 64
    while i < stop:
        bitmap[i >> 6] |= (<uint64_t>1) << (i & 63)
        i += 1


def address_of(buf: object) -> int:
    """The address of a buffer's first byte (the caller keeps the buffer alive)."""
    cdef Py_buffer view
    PyObject_GetBuffer(buf, &view, PyBUF_SIMPLE)
    cdef uint64_t addr = <uint64_t>view.buf
    PyBuffer_Release(&view)
    return addr


def open_uffd(uint64_t features, bint user_mode_only=False) -> tuple:
    """A non-blocking userfaultfd with the API handshake done for ``features``: ``(fd, features_available)``.

    Tries userfaultfd(2), then ``/dev/userfaultfd``. ``features=0`` probes:
    the kernel then reports every feature it has. Raises ``OSError``.
    """
    cdef int flags = O_CLOEXEC | O_NONBLOCK | (MIG_UFFD_USER_MODE_ONLY if user_mode_only else 0)
    cdef int fd = mig_userfaultfd(flags)
    cdef int dev, err
    if fd < 0:
        err = errno
        dev = posix_open(b"/dev/userfaultfd", O_RDWR | O_CLOEXEC)
        if dev < 0:
            raise OSError(err, f"userfaultfd() failed: {_strerror(err)}")
        fd = mig_ioctl(dev, MIG_USERFAULTFD_IOC_NEW, <void *><Py_ssize_t>flags)
        err = errno
        posix_close(dev)
        if fd < 0:
            raise OSError(err, f"/dev/userfaultfd: {_strerror(err)}")
    cdef mig_uffdio_api api
    api.api = MIG_UFFD_API
    api.features = features
    api.ioctls = 0
    if mig_ioctl(fd, MIG_UFFDIO_API, &api) < 0:
        err = errno
        posix_close(fd)
        raise OSError(err, f"UFFDIO_API with features {features:#x}: {_strerror(err)}")
    return fd, api.features


def close_fd(int fd) -> None:
    """close(2), ignoring errors."""
    posix_close(fd)


def register(int fd, uint64_t addr, uint64_t length, uint64_t mode) -> int:
    """UFFDIO_REGISTER ``[addr, addr + length)`` in ``mode``; returns the ioctls allowed on it."""
    cdef mig_uffdio_register reg
    reg.range.start = addr
    reg.range.len = length
    reg.mode = mode
    reg.ioctls = 0
    if mig_ioctl(fd, MIG_UFFDIO_REGISTER, &reg) < 0:
        raise OSError(errno, f"UFFDIO_REGISTER: {_strerror(errno)}")
    return reg.ioctls


def unregister(int fd, uint64_t addr, uint64_t length) -> None:
    """UFFDIO_UNREGISTER ``[addr, addr + length)`` (wakes any thread blocked on it)."""
    cdef mig_uffdio_range rng
    rng.start = addr
    rng.len = length
    if mig_ioctl(fd, MIG_UFFDIO_UNREGISTER, &rng) < 0:
        raise OSError(errno, f"UFFDIO_UNREGISTER: {_strerror(errno)}")


cdef int _zero_span(int fd, uint64_t start, uint64_t length, mig_uffdio_zeropage *zp) noexcept nogil:
    """UFFDIO_ZEROPAGE one span (waking its threads); 0 or the errno."""
    zp.range.start = start
    zp.range.len = length
    zp.mode = 0
    zp.zeropage = 0
    while mig_ioctl(fd, MIG_UFFDIO_ZEROPAGE, zp) < 0:
        if errno == EINTR:
            continue
        return errno
    return 0


def fill_owed(int fd, uint64_t addr, uint64_t nbytes, uint64_t page_size, uint64_t[::1] owed) -> int:
    """Give up the pages still set in ``owed``: install zero pages there, wake their threads, unregister.

    The program's explicit decision after a lost post-copy link (never the
    library's): every thread blocked on the region wakes, the owed ones read
    zeros. Returns how many pages were filled; the bits stay set.
    """
    cdef uint64_t npages = (nbytes + page_size - 1) // page_size
    if <uint64_t>owed.shape[0] * 64 < npages:
        raise ValueError("owed too short")
    cdef uint64_t limit = _round_up(nbytes, _SYSTEM_PAGE)
    cdef uint64_t p = 0, q, start, stop, filled = 0
    cdef mig_uffdio_zeropage zp
    cdef mig_uffdio_range rng
    cdef int err = 0
    cdef const uint64_t *bits = &owed[0]
    with nogil:
        while p < npages:
            if not _bit(bits, p):
                p += 1
                continue
            q = p
            while q < npages and _bit(bits, q):
                q += 1
            start = addr + p * page_size
            stop = addr + min(q * page_size, limit)
            err = _zero_span(fd, start, stop - start, &zp)
            if err == EEXIST:  # some of its pages are there already: fill the others one system page at a time
                err = 0
                while start < stop and not err:
                    err = _zero_span(fd, start, _SYSTEM_PAGE, &zp)
                    if err == EEXIST:
                        err = 0
                    start += _SYSTEM_PAGE
            if err:
                break
            filled += q - p
            p = q
        rng.start = addr
        rng.len = limit
        mig_ioctl(fd, MIG_UFFDIO_UNREGISTER, &rng)
        mig_ioctl(fd, MIG_UFFDIO_WAKE, &rng)
    if err:
        raise OSError(err, f"UFFDIO_ZEROPAGE: {_strerror(err)}")
    return filled


def write_protect(int fd, uint64_t addr, uint64_t length, bint protect=True) -> None:
    """UFFDIO_WRITEPROTECT ``[addr, addr + length)`` (or lift the protection)."""
    cdef mig_uffdio_writeprotect wp
    wp.range.start = addr
    wp.range.len = length
    wp.mode = MIG_UFFDIO_WRITEPROTECT_MODE_WP if protect else 0
    cdef int rc
    with nogil:
        rc = mig_ioctl(fd, MIG_UFFDIO_WRITEPROTECT, &wp)
    if rc < 0:
        raise OSError(errno, f"UFFDIO_WRITEPROTECT: {_strerror(errno)}")


cdef int _pagemap_scan(int pagemap_fd, uint64_t addr, uint64_t length, uint64_t page_size, uint64_t *out,
                       uint64_t nwords, uint64_t flags, uint64_t inverted, uint64_t mask, uint64_t anyof,
                       uint64_t *count) noexcept nogil:
    """PAGEMAP_SCAN the system pages over ``[addr, addr + length)``; set the bits of the matching ``page_size`` pages.

    ``addr`` need not be page-aligned: the scan covers the system pages the
    range touches, and a page of ``out`` is set when any matching system page
    overlaps it. Returns 0, or the errno of a failed call.
    """
    cdef mig_page_region vec[_SCAN_VEC]
    cdef mig_pm_scan_arg arg
    cdef uint64_t stop_addr = addr + length
    cdef uint64_t npages = (length + page_size - 1) // page_size
    cdef uint64_t lo, hi, first, stop, i
    cdef long n
    cdef int k
    memset(out, 0, nwords * 8)
    count[0] = 0
    if length == 0:
        return 0
    memset(&arg, 0, sizeof(arg))
    arg.size = sizeof(arg)
    arg.flags = flags
    arg.start = addr - addr % _SYSTEM_PAGE
    arg.end = _round_up(stop_addr, _SYSTEM_PAGE)
    arg.vec = <uint64_t>&vec[0]
    arg.vec_len = _SCAN_VEC
    arg.category_inverted = inverted
    arg.category_mask = mask
    arg.category_anyof_mask = anyof
    arg.return_mask = mask | anyof
    while arg.start < arg.end:
        n = mig_ioctl(pagemap_fd, MIG_PAGEMAP_SCAN, &arg)
        if n < 0:
            if errno == EINTR or errno == EAGAIN:
                continue
            return errno
        for k in range(n):
            lo = vec[k].start if vec[k].start > addr else addr
            hi = vec[k].end if vec[k].end < stop_addr else stop_addr
            if lo >= hi:
                continue
            first = (lo - addr) // page_size
            stop = (hi - addr + page_size - 1) // page_size
            if stop > npages:
                stop = npages
            if first < stop:
                _set_range(out, first, stop)
        if arg.walk_end <= arg.start:
            break
        arg.start = arg.walk_end
    for i in range(nwords):
        count[0] += __builtin_popcountll(out[i])
    return 0


def scan_written(int pagemap_fd, uint64_t addr, uint64_t length, uint64_t page_size, uint64_t[::1] out) -> int:
    """PAGEMAP_SCAN the written pages of ``[addr, addr + length)`` and write-protect them again, atomically.

    ``out`` becomes the bitmap of written pages of ``page_size`` bytes
    (a page is written if any system page inside it was); returns their count.
    """
    cdef uint64_t npages = (length + page_size - 1) // page_size
    if <uint64_t>out.shape[0] * 64 < npages:
        raise ValueError(f"out holds {out.shape[0] * 64} bits, need {npages}")
    if npages == 0:
        return 0
    cdef uint64_t count = 0
    cdef int err
    with nogil:
        err = _pagemap_scan(pagemap_fd, addr, length, page_size, &out[0], out.shape[0],
                            MIG_PM_SCAN_WP_MATCHING | MIG_PM_SCAN_CHECK_WPASYNC, 0,
                            MIG_PAGE_IS_WRITTEN, 0, &count)
    if err:
        raise OSError(err, f"PAGEMAP_SCAN: {_strerror(err)}")
    return count


def scan_resident(int pagemap_fd, uint64_t addr, uint64_t length, uint64_t page_size, uint64_t[::1] out,
                  bint skip_zero_pfn=True) -> int:
    """PAGEMAP_SCAN the pages of ``[addr, addr + length)`` that have memory behind them: present or swapped.

    ``out`` becomes that bitmap of ``page_size``-byte pages (a page counts if
    any system page overlapping it does); returns their count. With
    ``skip_zero_pfn``, a page mapped to the shared zero page does not count
    (PAGE_IS_PFNZERO). Nothing is write-protected or changed.
    """
    cdef uint64_t npages = (length + page_size - 1) // page_size
    if <uint64_t>out.shape[0] * 64 < npages:
        raise ValueError(f"out holds {out.shape[0] * 64} bits, need {npages}")
    if npages == 0:
        return 0
    cdef uint64_t zero_pfn = MIG_PAGE_IS_PFNZERO if skip_zero_pfn else 0
    cdef uint64_t count = 0
    cdef int err
    with nogil:
        err = _pagemap_scan(pagemap_fd, addr, length, page_size, &out[0], out.shape[0], 0, zero_pfn, zero_pfn,
                            MIG_PAGE_IS_PRESENT | MIG_PAGE_IS_SWAPPED, &count)
    if err:
        raise OSError(err, f"PAGEMAP_SCAN: {_strerror(err)}")
    return count


def discard_pages(uint64_t addr, uint64_t nbytes, uint64_t page_size, const uint64_t[::1] bitmap) -> None:
    """``madvise(MADV_DONTNEED)`` every page set in ``bitmap`` so the next access to it is a missing-page fault.

    A private anonymous mapping may hold zero pages the program never wrote
    (a transparent huge page fills its neighbours), which would hide a
    missing page from userfaultfd.
    """
    cdef uint64_t npages = (nbytes + page_size - 1) // page_size
    if <uint64_t>bitmap.shape[0] * 64 < npages:
        raise ValueError("bitmap too short")
    cdef uint64_t limit = _round_up(nbytes, _SYSTEM_PAGE)
    cdef uint64_t p = 0, q, lo, hi
    cdef int err = 0
    with nogil:
        while p < npages:
            if bitmap[p >> 6] == 0 and (p & 63) == 0:
                p += 64
                continue
            if not _bit(&bitmap[0], p):
                p += 1
                continue
            q = p
            while q < npages and _bit(&bitmap[0], q):
                q += 1
            lo = p * page_size
            hi = q * page_size
            if hi > limit:
                hi = limit
            if madvise(<void *>(addr + lo), hi - lo, MADV_DONTNEED) < 0:
                err = errno
                break
            p = q
    if err:
        raise OSError(err, f"madvise(MADV_DONTNEED): {_strerror(err)}")


def touch(uint64_t addr, uint64_t length, uint64_t step) -> None:
    """Read one byte every ``step`` bytes of ``[addr, addr + length)`` without the GIL (faults pages in)."""
    with nogil:
        mig_touch(<const uint8_t *>addr, length, step)


cdef str _strerror(int err):
    import os
    return os.strerror(err)

