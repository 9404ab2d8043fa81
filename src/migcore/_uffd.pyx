# cython: language_level=3
"""Linux userfaultfd and PAGEMAP_SCAN: write tracking and transparent post-copy.

A thin layer over the kernel: opening a userfaultfd, registering ranges,
write-protecting, scanning the written pages into a dirty bitmap, and the
post-copy fault-service loop, which runs entirely without the GIL (the thread
that faulted may hold it). There is no pure-Python equivalent: where this is
unavailable, migcore uses its hash tracker and the Python post-copy receiver.

The constants and structures are declared here, not taken from
``<linux/userfaultfd.h>``/``<linux/fs.h>``, because build hosts (Debian 12)
ship headers older than the kernels that have these features; each one names
the kernel release that introduced it. Support is detected at run time.
"""

from cpython.buffer cimport PyBUF_SIMPLE, PyBUF_WRITABLE, PyBuffer_Release, PyObject_GetBuffer
from libc.errno cimport EAGAIN, EBADF, ECONNRESET, EEXIST, EINTR, EPIPE, errno
from libc.stdint cimport int64_t, uint8_t, uint32_t, uint64_t
from libc.stdlib cimport calloc, free, malloc, qsort
from libc.string cimport memcpy, memset

cdef extern from *:
    """
    #include <errno.h>
    #include <fcntl.h>
    #include <poll.h>
    #include <stdint.h>
    #include <string.h>
    #include <sys/ioctl.h>
    #include <sys/mman.h>
    #include <sys/socket.h>
    #include <sys/syscall.h>
    #include <time.h>
    #include <unistd.h>
    #include <linux/ioctl.h>

    #define XXH_INLINE_ALL
    #include <xxhash.h>

    /* userfaultfd(2) itself: Linux 4.3 (x86_64 syscall 323). */
    #ifndef SYS_userfaultfd
    #define SYS_userfaultfd 323
    #endif
    /* Flag of userfaultfd(2): handle faults from user mode only (Linux 5.11). */
    #define MIG_UFFD_USER_MODE_ONLY 1
    /* /dev/userfaultfd and its USERFAULTFD_IOC_NEW ioctl (Linux 6.1). */
    #define MIG_USERFAULTFD_IOC_NEW _IO(0xAA, 0x00)

    /* The UFFDIO_* API and its structures (Linux 4.3 unless noted). */
    #define MIG_UFFD_API ((uint64_t)0xAA)
    struct mig_uffdio_api { uint64_t api; uint64_t features; uint64_t ioctls; };
    struct mig_uffdio_range { uint64_t start; uint64_t len; };
    struct mig_uffdio_register { struct mig_uffdio_range range; uint64_t mode; uint64_t ioctls; };
    struct mig_uffdio_copy { uint64_t dst; uint64_t src; uint64_t len; uint64_t mode; int64_t copy; };
    struct mig_uffdio_zeropage { struct mig_uffdio_range range; uint64_t mode; int64_t zeropage; };
    /* struct uffdio_writeprotect: Linux 5.7. */
    struct mig_uffdio_writeprotect { struct mig_uffdio_range range; uint64_t mode; };
    /* struct uffd_msg is packed, 32 bytes; for a page fault arg[0] = flags, arg[1] = address. */
    struct __attribute__((packed)) mig_uffd_msg {
        uint8_t event; uint8_t reserved1; uint16_t reserved2; uint32_t reserved3; uint64_t arg[3];
    };
    #define MIG_UFFDIO_API _IOWR(0xAA, 0x3F, struct mig_uffdio_api)
    #define MIG_UFFDIO_REGISTER _IOWR(0xAA, 0x00, struct mig_uffdio_register)
    #define MIG_UFFDIO_UNREGISTER _IOR(0xAA, 0x01, struct mig_uffdio_range)
    #define MIG_UFFDIO_WAKE _IOR(0xAA, 0x02, struct mig_uffdio_range)
    #define MIG_UFFDIO_COPY _IOWR(0xAA, 0x03, struct mig_uffdio_copy)
    #define MIG_UFFDIO_ZEROPAGE _IOWR(0xAA, 0x04, struct mig_uffdio_zeropage)
    /* UFFDIO_WRITEPROTECT: Linux 5.7. */
    #define MIG_UFFDIO_WRITEPROTECT _IOWR(0xAA, 0x06, struct mig_uffdio_writeprotect)
    #define MIG_UFFDIO_REGISTER_MODE_MISSING ((uint64_t)1 << 0)    /* Linux 4.3 */
    #define MIG_UFFDIO_COPY_MODE_DONTWAKE ((uint64_t)1 << 0)       /* Linux 4.3 */
    #define MIG_UFFDIO_ZEROPAGE_MODE_DONTWAKE ((uint64_t)1 << 0)   /* Linux 4.3 */
    #define MIG_UFFDIO_REGISTER_MODE_WP ((uint64_t)1 << 1)         /* Linux 5.7 */
    #define MIG_UFFDIO_WRITEPROTECT_MODE_WP ((uint64_t)1 << 0)     /* Linux 5.7 */
    #define MIG_UFFD_EVENT_PAGEFAULT 0x12                          /* Linux 4.3 */
    #define MIG_UFFD_FEATURE_WP_UNPOPULATED ((uint64_t)1 << 13)    /* Linux 6.4 */
    #define MIG_UFFD_FEATURE_WP_ASYNC ((uint64_t)1 << 15)          /* Linux 6.7 */

    /* PAGEMAP_SCAN on /proc/PID/pagemap and its structures: Linux 6.7. */
    struct mig_page_region { uint64_t start; uint64_t end; uint64_t categories; };
    struct mig_pm_scan_arg {
        uint64_t size; uint64_t flags; uint64_t start; uint64_t end; uint64_t walk_end;
        uint64_t vec; uint64_t vec_len; uint64_t max_pages; uint64_t category_inverted;
        uint64_t category_mask; uint64_t category_anyof_mask; uint64_t return_mask;
    };
    #define MIG_PAGEMAP_SCAN _IOWR('f', 16, struct mig_pm_scan_arg)
    #define MIG_PAGE_IS_WRITTEN ((uint64_t)1 << 1)                /* Linux 6.7 */
    #define MIG_PAGE_IS_PRESENT ((uint64_t)1 << 3)                /* Linux 6.7 */
    #define MIG_PAGE_IS_SWAPPED ((uint64_t)1 << 4)                /* Linux 6.7 */
    #define MIG_PAGE_IS_PFNZERO ((uint64_t)1 << 5)                /* Linux 6.7 */
    #define MIG_PM_SCAN_WP_MATCHING ((uint64_t)1 << 0)            /* Linux 6.7 */
    #define MIG_PM_SCAN_CHECK_WPASYNC ((uint64_t)1 << 1)          /* Linux 6.7 */

    static int mig_userfaultfd(int flags) { return (int)syscall(SYS_userfaultfd, flags); }
    static int mig_ioctl(int fd, unsigned long req, void *arg) { return ioctl(fd, req, arg); }
    static double mig_now(void) {
        struct timespec ts; clock_gettime(CLOCK_MONOTONIC, &ts);
        return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
    }
    static int mig_cmp_run(const void *a, const void *b) {
        uint64_t x = ((const uint64_t *)a)[0], y = ((const uint64_t *)b)[0];
        return x < y ? -1 : x > y;
    }
    /* Reading one byte of each page makes the kernel fault it in (and wait for its arrival). */
    static void mig_touch(const volatile uint8_t *p, size_t len, size_t step) {
        uint8_t sink = 0;
        for (size_t off = 0; off < len; off += step) sink ^= p[off];
        (void)sink;
    }
    """
    struct mig_uffdio_api:
        uint64_t api
        uint64_t features
        uint64_t ioctls
    struct mig_uffdio_range:
        uint64_t start
        uint64_t len
    struct mig_uffdio_register:
        mig_uffdio_range range
        uint64_t mode
        uint64_t ioctls
    struct mig_uffdio_copy:
        uint64_t dst
        uint64_t src
        uint64_t len
        uint64_t mode
        int64_t copy
    struct mig_uffdio_zeropage:
        mig_uffdio_range range
        uint64_t mode
        int64_t zeropage
    struct mig_uffdio_writeprotect:
        mig_uffdio_range range
        uint64_t mode
    struct mig_uffd_msg:
        uint8_t event
        uint64_t arg[3]
    struct mig_page_region:
        uint64_t start
        uint64_t end
        uint64_t categories
    struct mig_pm_scan_arg:
        uint64_t size
        uint64_t flags
        uint64_t start
        uint64_t end
        uint64_t walk_end
        uint64_t vec
        uint64_t vec_len
        uint64_t max_pages
        uint64_t category_inverted
        uint64_t category_mask
        uint64_t category_anyof_mask
        uint64_t return_mask

    const int MIG_UFFD_USER_MODE_ONLY
    const unsigned long MIG_USERFAULTFD_IOC_NEW
    const uint64_t MIG_UFFD_API
    const unsigned long MIG_UFFDIO_API
    const unsigned long MIG_UFFDIO_REGISTER
    const unsigned long MIG_UFFDIO_UNREGISTER
    const unsigned long MIG_UFFDIO_WAKE
    const uint64_t MIG_UFFDIO_COPY_MODE_DONTWAKE
    const uint64_t MIG_UFFDIO_ZEROPAGE_MODE_DONTWAKE
    const unsigned long MIG_UFFDIO_COPY
    const unsigned long MIG_UFFDIO_ZEROPAGE
    const unsigned long MIG_UFFDIO_WRITEPROTECT
    const uint64_t MIG_UFFDIO_REGISTER_MODE_MISSING
    const uint64_t MIG_UFFDIO_REGISTER_MODE_WP
    const uint64_t MIG_UFFDIO_WRITEPROTECT_MODE_WP
    const int MIG_UFFD_EVENT_PAGEFAULT
    const uint64_t MIG_UFFD_FEATURE_WP_UNPOPULATED
    const uint64_t MIG_UFFD_FEATURE_WP_ASYNC
    const unsigned long MIG_PAGEMAP_SCAN
    const uint64_t MIG_PAGE_IS_WRITTEN
    const uint64_t MIG_PAGE_IS_PRESENT
    const uint64_t MIG_PAGE_IS_SWAPPED
    const uint64_t MIG_PAGE_IS_PFNZERO
    const uint64_t MIG_PM_SCAN_WP_MATCHING
    const uint64_t MIG_PM_SCAN_CHECK_WPASYNC
    const int O_CLOEXEC
    const int O_NONBLOCK
    const int O_RDWR
    const int MADV_DONTNEED
    const short POLLIN
    const short POLLOUT
    const short POLLERR
    const short POLLHUP
    const short POLLNVAL
    const int MSG_NOSIGNAL

    struct pollfd:
        int fd
        short events
        short revents

    int mig_userfaultfd(int flags) nogil
    int mig_ioctl(int fd, unsigned long req, void *arg) nogil
    double mig_now() nogil
    int mig_cmp_run(const void *a, const void *b) noexcept nogil
    void mig_touch(const uint8_t *p, size_t length, size_t step) nogil
    int posix_open "open"(const char *path, int flags) nogil
    int posix_close "close"(int fd) nogil
    ssize_t posix_read "read"(int fd, void *buf, size_t n) nogil
    int __builtin_popcountll(unsigned long long) nogil
    ssize_t recv "recv"(int fd, void *buf, size_t n, int flags) nogil
    ssize_t send "send"(int fd, const void *buf, size_t n, int flags) nogil
    int poll "poll"(pollfd *fds, unsigned long nfds, int timeout) nogil
    int madvise "madvise"(void *addr, size_t length, int advice) nogil
    uint64_t XXH3_64bits(const void *data, size_t length) nogil

cdef enum:
    _SERVE_EOF = -1
    _SERVE_TIMEOUT = -2
    _SERVE_PROTOCOL = -3
    _SERVE_OS = -4
    _SERVE_STOPPED = -5
    _INFO_REMAINING = 0
    _INFO_DEMANDS = 1
    _INFO_PAGES = 2
    _INFO_PAYLOAD = 3
    _INFO_WIRE = 4
    _INFO_ERRNO = 5
    _INFO_HEADER = 6
    _INFO_DETAIL = 8
    _INFO_WHERE = 9
    _INFO_READY = 10
    _INFO_ZERO = 11
    _INFO_SIZE = 12
    _SYSTEM_PAGE = 4096

SYSTEM_PAGE = _SYSTEM_PAGE

#: Mode bits of :func:`register`.
REGISTER_MODE_MISSING = MIG_UFFDIO_REGISTER_MODE_MISSING
REGISTER_MODE_WP = MIG_UFFDIO_REGISTER_MODE_WP
#: Feature bits of :func:`open_uffd`.
FEATURE_WP_UNPOPULATED = MIG_UFFD_FEATURE_WP_UNPOPULATED
FEATURE_WP_ASYNC = MIG_UFFD_FEATURE_WP_ASYNC

#: Results of :func:`serve_postcopy`: 0 stopped at a frame that is not PAGES (its header is in info).
SERVE_EOF = _SERVE_EOF
SERVE_TIMEOUT = _SERVE_TIMEOUT
SERVE_PROTOCOL = _SERVE_PROTOCOL
SERVE_OS = _SERVE_OS
SERVE_STOPPED = _SERVE_STOPPED

#: Slots of the ``info`` array of :func:`serve_postcopy`.
INFO_REMAINING = _INFO_REMAINING
INFO_DEMANDS = _INFO_DEMANDS
INFO_PAGES = _INFO_PAGES
INFO_PAYLOAD = _INFO_PAYLOAD
INFO_WIRE = _INFO_WIRE
INFO_ERRNO = _INFO_ERRNO
INFO_HEADER = _INFO_HEADER  # two words: the 16-byte header of the frame that stopped the loop
INFO_DETAIL = _INFO_DETAIL
INFO_WHERE = _INFO_WHERE
INFO_READY = _INFO_READY  # set to 1 once the loop runs without the GIL
INFO_ZERO = _INFO_ZERO  # pages installed from zero notices
INFO_SIZE = _INFO_SIZE

# protocol constants the loop needs: they must match _protocol (HEADER, RUN_SIZE, Frame.PAGES/DEMAND, FLAG_POSTCOPY,
# FLAG_ZERO)
cdef enum:
    _HEADER_SIZE = 16
    _RUN_SIZE = 16
    _FRAME_PAGES = 4
    _FRAME_DEMAND = 12
    _FLAG_POSTCOPY = 1
    _FLAG_ZERO = 8
    _SCAN_VEC = 512
    _MSG_BATCH = 64

#: Details of _SERVE_PROTOCOL, in ``info[_INFO_DETAIL]``.
PROTOCOL_DETAILS = {
    1: "PAGES frame with wrong flags or a non-zero reserved field",
    2: "PAGES frame with a bad run count",
    3: "PAGES payload larger than the agreed limit",
    4: "a run lies outside the region or out of order",
    5: "a post-copy page was not owed (or arrived twice)",
    6: "PAGES header length disagrees with its runs",
    7: "zero notice with a payload",
}
#: Where _SERVE_OS happened, in ``info[_INFO_WHERE]``.
OS_WHERE = {1: "poll", 2: "recv", 3: "send", 4: "reading faults", 5: "UFFDIO_COPY", 6: "UFFDIO_ZEROPAGE",
            7: "reading requests", 8: "UFFDIO_WAKE", 9: "allocating buffers"}


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


# -- the post-copy fault-service loop -----------------------------------------------------------

cdef struct _Serve:
    int uffd
    int sock
    int wake
    uint64_t addr
    uint64_t nbytes
    uint64_t page_size
    uint64_t npages
    uint64_t limit          # registered length: nbytes rounded up to the system page
    uint64_t *owed
    uint64_t *table
    uint64_t *info
    uint64_t *demanded      # pages already asked for
    uint64_t *pending       # runs (first, count) to ask for, up to max_runs
    uint64_t npending
    uint64_t max_runs
    uint64_t max_payload
    uint8_t *frame          # DEMAND frame being built
    uint8_t *runs           # runs table of the PAGES frame being received
    uint8_t *payload        # its payload (+ one page of zero padding)
    uint8_t header[16]
    int where
    uint64_t zero_hash      # XXH3 of an all-zero page
    uint64_t tail_hash      # ... of the all-zero partial last page


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


cdef int _check_runs(_Serve *s, uint64_t count, uint64_t length, bint zero) noexcept nogil:
    """Validate a PAGES runs table before any page byte is read: in range, ascending, owed, consistent."""
    cdef const uint64_t *rows = <const uint64_t *>s.runs
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
    cdef const uint64_t *rows = <const uint64_t *>s.runs
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
    cdef const uint64_t *rows = <const uint64_t *>s.runs
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


cdef int _serve_loop(_Serve *s, double timeout) noexcept nogil:
    cdef pollfd fds[3]
    cdef int nfds, rc, i
    cdef uint64_t want, got = 0, count = 0, length = 0
    cdef int section = 0   # 0 header, 1 runs table, 2 payload
    cdef bint zero = False
    cdef uint8_t *dst = s.header
    cdef ssize_t k
    cdef double last = mig_now()
    cdef uint64_t req[64]
    want = _HEADER_SIZE
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
            if s.header[0] != _FRAME_PAGES:
                memcpy(&s.info[_INFO_HEADER], s.header, _HEADER_SIZE)
                return 0
            count = (<uint32_t *>(s.header + 4))[0]
            length = (<uint64_t *>(s.header + 8))[0]
            if (s.header[1] != _FLAG_POSTCOPY and s.header[1] != _FLAG_POSTCOPY | _FLAG_ZERO) or s.header[2] or s.header[3]:
                s.info[_INFO_DETAIL] = 1
                return _SERVE_PROTOCOL
            zero = s.header[1] == _FLAG_POSTCOPY | _FLAG_ZERO
            if zero and length:
                s.info[_INFO_DETAIL] = 7
                return _SERVE_PROTOCOL
            if count == 0 or count > s.max_runs:
                s.info[_INFO_DETAIL] = 2
                return _SERVE_PROTOCOL
            if length > s.max_payload:
                s.info[_INFO_DETAIL] = 3
                return _SERVE_PROTOCOL
            section = 1
            dst = s.runs
            want = count * _RUN_SIZE
        elif section == 1:
            rc = _check_runs(s, count, length, zero)
            if rc:
                return rc
            if zero:
                rc = _install_zero(s, count)
                if rc:
                    return rc
                section = 0
                dst = s.header
                want = _HEADER_SIZE
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
            want = _HEADER_SIZE


def serve_postcopy(
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
    and installed with UFFDIO_COPY; ``owed`` bits clear as pages land). Always
    unregisters ``[addr, addr + nbytes)`` (rounded up to the system page)
    before returning, so no thread stays blocked. Returns 0 when it stopped at
    another frame (its header in ``info[_INFO_HEADER:_INFO_HEADER + 2]``) or a
    negative ``SERVE_*`` code; ``info`` also counts pages, bytes and demands.
    """
    if page_size < _SYSTEM_PAGE or page_size % _SYSTEM_PAGE:
        raise ValueError(f"page_size must be a multiple of {_SYSTEM_PAGE}")
    cdef uint64_t npages = (nbytes + page_size - 1) // page_size
    if <uint64_t>owed.shape[0] * 64 < npages or <uint64_t>table.shape[0] < npages or info.shape[0] < _INFO_SIZE:
        raise ValueError("owed, table or info too short")
    if max_runs == 0 or max_runs > 1 << 20:
        raise ValueError("max_runs out of range")
    cdef _Serve s
    memset(&s, 0, sizeof(s))
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
        s.frame = <uint8_t *>malloc(_HEADER_SIZE + max_runs * _RUN_SIZE)
        s.runs = <uint8_t *>malloc(max_runs * _RUN_SIZE)
        s.payload = <uint8_t *>malloc(max_payload + page_size)
        if s.payload:  # the hashes of a zero page and of the zero partial last page, for zero notices
            memset(s.payload, 0, page_size)
            s.zero_hash = XXH3_64bits(s.payload, page_size)
            s.tail_hash = XXH3_64bits(s.payload, nbytes - (npages - 1) * page_size)
        if not (s.demanded and s.pending and s.frame and s.runs and s.payload):
            s.where = 9
            rc = _SERVE_OS
        else:
            (<volatile uint64_t *>&s.info[_INFO_READY])[0] = 1
            rc = _serve_loop(&s, timeout)
        # never leave a thread blocked on a page that will not come: the region becomes ordinary memory
        rng.start = addr
        rng.len = s.limit
        mig_ioctl(uffd, MIG_UFFDIO_UNREGISTER, &rng)
        free(s.demanded)
        free(s.pending)
        free(s.frame)
        free(s.runs)
        free(s.payload)
    info[_INFO_WHERE] = s.where
    return rc
