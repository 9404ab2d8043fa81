# Scatter-gather I/O of page runs: runs_nbytes, send_runs, recv_runs.
#
# The bytes of a list of runs go straight between the caller's buffer and a
# file descriptor through iovecs that point into the buffer: no copy in Python,
# one ``with nogil:`` around the whole syscall loop.

from cpython.exc cimport PyErr_SetFromErrno
from cpython.buffer cimport (
    PyBUF_STRIDES,
    PyBuffer_IsContiguous,
    PyBuffer_Release,
    PyObject_GetBuffer,
)
from libc.errno cimport EINTR, ENOTSOCK, errno
from libc.stdint cimport uint64_t
from libc.stdlib cimport free, malloc
from libc.string cimport memset
from posix.uio cimport iovec, readv, writev
from posix.unistd cimport _SC_IOV_MAX, sysconf

import numpy as np

cdef extern from *:
    """
    #include <limits.h>
    #include <sys/socket.h>
    /* Where there is no MSG_NOSIGNAL (macOS), SIGPIPE is left to the caller's disposition. */
    #ifndef MSG_NOSIGNAL
    #define MSG_NOSIGNAL 0
    #endif
    """
    # Declared under its own name so the other textual includes may declare theirs.
    const Py_ssize_t _SSIZE_LIMIT "PY_SSIZE_T_MAX"


cdef extern from "<sys/socket.h>" nogil:
    cdef struct msghdr:
        void *msg_name
        size_t msg_namelen
        iovec *msg_iov
        size_t msg_iovlen
        void *msg_control
        size_t msg_controllen
        int msg_flags

    ssize_t sendmsg(int fd, const msghdr *msg, int flags)
    ssize_t recvmsg(int fd, msghdr *msg, int flags)
    const int MSG_NOSIGNAL
    const int MSG_WAITALL


cdef enum:
    # Up to this many iovecs live on the stack; more go on the heap.
    _STACK_IOVECS = 32
    # POSIX/Linux IOV_MAX, the fallback where sysconf does not say.
    _DEFAULT_IOV_MAX = 1024


cdef int _stream_buffer(object obj, Py_buffer *view, bint writable, str name) except -1:
    """Acquire ``obj`` as raw bytes; any format and shape, but C-contiguous (and writable if asked)."""
    PyObject_GetBuffer(obj, view, PyBUF_STRIDES)
    if not PyBuffer_IsContiguous(view, b'C'):
        PyBuffer_Release(view)
        raise ValueError(f"{name} must be C-contiguous")
    if writable and view.readonly:
        PyBuffer_Release(view)
        raise TypeError(f"{name} must be writable")
    return 0


cdef const uint64_t[:, ::1] _stream_runs(object runs, uint64_t npages):
    """Check that ``runs`` is an (n, 2) uint64 array whose runs all lie in the region's pages."""
    if not isinstance(runs, np.ndarray) or runs.dtype != np.uint64:
        raise TypeError("runs must be a numpy uint64 array")
    if not runs.flags.c_contiguous:
        raise ValueError("runs must be C-contiguous")
    if runs.ndim != 2 or runs.shape[1] != 2:
        raise ValueError("runs must have shape (n, 2)")
    cdef const uint64_t[:, ::1] rows = runs
    cdef Py_ssize_t i
    for i in range(rows.shape[0]):
        # Written so that first + count cannot wrap around.
        if rows[i, 1] > npages or rows[i, 0] > npages - rows[i, 1]:
            raise ValueError(
                f"run ({rows[i, 0]}, {rows[i, 1]}) outside the region's {npages} pages"
            )
    return rows


cdef inline uint64_t _clipped_run_bytes(uint64_t first, uint64_t count, uint64_t page_size,
                                uint64_t nbytes) noexcept nogil:
    """Bytes of one run once clipped at the end of the region (the last page may be partial)."""
    cdef uint64_t start = first * page_size
    if count == 0 or start >= nbytes:
        return 0
    # count <= npages - first, so the product cannot overflow past nbytes + page_size.
    return min(count * page_size, nbytes - start)


cdef uint64_t _payload_bytes(const uint64_t[:, ::1] rows, uint64_t page_size, uint64_t nbytes) except? 0:
    """Sum of the clipped runs; raises instead of wrapping around when overlapping runs overflow."""
    cdef uint64_t total = 0, piece
    cdef Py_ssize_t i
    for i in range(rows.shape[0]):
        piece = _clipped_run_bytes(rows[i, 0], rows[i, 1], page_size, nbytes)
        if piece > <uint64_t>_SSIZE_LIMIT - total:
            raise OverflowError("runs add up to more bytes than one transfer can count")
        total += piece
    return total


cdef Py_ssize_t _fill_iovecs(iovec *iov, char *head, size_t head_len, char *base,
                             const uint64_t[:, ::1] rows, uint64_t page_size,
                             uint64_t nbytes, uint64_t offset) noexcept nogil:
    """Lay out header + clipped runs as iovecs, joining pieces that touch, then drop ``offset`` bytes.

    Returns the number of iovecs; none of them is empty.
    """
    cdef Py_ssize_t n = 0, i, skip = 0
    cdef uint64_t first, length
    cdef char *start
    if head_len:
        iov[0].iov_base = head
        iov[0].iov_len = head_len
        n = 1
    for i in range(rows.shape[0]):
        first = rows[i, 0]
        length = _clipped_run_bytes(first, rows[i, 1], page_size, nbytes)
        if length == 0:
            continue
        start = base + first * page_size
        # Pieces adjacent in memory are one piece of the stream: fewer iovecs, same bytes.
        if n and <char *>iov[n - 1].iov_base + iov[n - 1].iov_len == start:
            iov[n - 1].iov_len += length
        else:
            iov[n].iov_base = start
            iov[n].iov_len = length
            n += 1
    while skip < n and offset >= iov[skip].iov_len:
        offset -= iov[skip].iov_len
        skip += 1
    if skip < n and offset:
        iov[skip].iov_base = <char *>iov[skip].iov_base + offset
        iov[skip].iov_len -= offset
    if skip:
        for i in range(skip, n):
            iov[i - skip] = iov[i]
    return n - skip


cdef Py_ssize_t _move_iovecs(int fd, iovec *iov, Py_ssize_t niov, bint sending,
                             int *error) noexcept nogil:
    """Send or receive ``iov`` until done, end of file, or the first error; returns the bytes moved.

    Each call covers at most IOV_MAX iovecs; a partial transfer moves the start
    forward inside the current iovec. The first failing call's errno goes into
    ``error`` (``sendmsg``/``recvmsg`` for sockets, ``writev``/``readv`` once
    the descriptor turns out not to be one).
    """
    cdef long iov_max = sysconf(_SC_IOV_MAX)
    cdef Py_ssize_t done = 0, i = 0, count
    cdef ssize_t n
    cdef size_t window, left
    cdef bint is_socket = True
    cdef msghdr msg
    if iov_max <= 0:
        iov_max = _DEFAULT_IOV_MAX
    memset(&msg, 0, sizeof(msg))
    error[0] = 0
    while i < niov:
        # At most IOV_MAX iovecs and at most SSIZE_MAX bytes per call (EINVAL otherwise).
        count = 1
        window = iov[i].iov_len
        while (count < iov_max and i + count < niov
               and iov[i + count].iov_len <= <size_t>_SSIZE_LIMIT - window):
            window += iov[i + count].iov_len
            count += 1
        if is_socket:
            msg.msg_iov = iov + i
            msg.msg_iovlen = count
            if sending:
                n = sendmsg(fd, &msg, MSG_NOSIGNAL)
            else:
                # WAITALL fills the whole window in one call on a blocking socket
                # (fewer calls); a non-blocking one still returns what is there.
                n = recvmsg(fd, &msg, MSG_WAITALL)
            if n < 0 and errno == ENOTSOCK:
                is_socket = False
                continue
        elif sending:
            n = writev(fd, iov + i, <int>count)
        else:
            n = readv(fd, iov + i, <int>count)
        if n < 0:
            error[0] = errno
            break
        if n == 0:
            break  # end of file on receive; a send that takes nothing would never finish
        done += n
        left = <size_t>n
        while i < niov and left >= iov[i].iov_len:
            left -= iov[i].iov_len
            i += 1
        if left:
            iov[i].iov_base = <char *>iov[i].iov_base + left
            iov[i].iov_len -= left
    return done


cdef object _move_runs(int fd, Py_buffer *data, size_t page_size, object runs,
                      char *head, size_t head_len, object offset, bint sending):
    """Shared body of send_runs/recv_runs once the buffers are held: validate, lay out, move."""
    cdef uint64_t nbytes = <uint64_t>data.len
    cdef uint64_t npages = (nbytes + page_size - 1) // page_size
    cdef const uint64_t[:, ::1] rows = _stream_runs(runs, npages)
    cdef uint64_t total = _payload_bytes(rows, page_size, nbytes)
    if head_len > <uint64_t>_SSIZE_LIMIT - total:
        raise OverflowError("header and runs add up to more bytes than one transfer can count")
    total += head_len
    if not 0 <= offset <= total:
        raise ValueError(f"offset {offset} outside 0..{total}")
    cdef uint64_t skip = offset
    cdef Py_ssize_t bound = rows.shape[0] + 1
    cdef iovec small[_STACK_IOVECS]
    cdef iovec *iov = small
    cdef Py_ssize_t niov, done = 0
    cdef int error = 0
    if bound > _STACK_IOVECS:
        iov = <iovec *>malloc(bound * sizeof(iovec))
        if iov == NULL:
            raise MemoryError()
    try:
        with nogil:
            niov = _fill_iovecs(iov, head, head_len, <char *>data.buf, rows,
                                page_size, nbytes, skip)
            done = _move_iovecs(fd, iov, niov, sending, &error)
    finally:
        if iov != small:
            free(iov)
    if done == 0 and error:
        # The subclass follows errno (BlockingIOError, InterruptedError, ...), and on
        # EINTR a signal handler that raises (KeyboardInterrupt) takes precedence.
        errno = error
        PyErr_SetFromErrno(OSError)
    return done


cdef Py_ssize_t _stream_page_size(object page_size) except 0:
    """A positive page size that fits Py_ssize_t, so page arithmetic stays inside 64 bits."""
    if page_size <= 0:
        raise ValueError(f"page_size must be positive, got {page_size}")
    return page_size


def runs_nbytes(runs, page_size, nbytes):
    """Payload bytes of ``runs`` in a region of ``nbytes`` bytes, so a receiver knows what to expect."""
    cdef uint64_t size = _stream_page_size(page_size)
    if nbytes < 0:
        raise ValueError(f"nbytes must be >= 0, got {nbytes}")
    cdef Py_ssize_t total = nbytes  # no buffer is larger
    cdef const uint64_t[:, ::1] rows = _stream_runs(runs, (total + size - 1) // size)
    return _payload_bytes(rows, size, total)


def send_runs(int fd, buf, page_size, runs, header=b"", offset=0):
    """Send ``header`` then the runs of ``buf`` with scatter-gather I/O, so no byte is copied in Python.

    Returns the bytes sent by this call (resume with ``offset + returned``);
    raises ``OSError`` only when nothing at all could be sent.
    """
    cdef Py_buffer data
    cdef Py_buffer head
    cdef Py_ssize_t size
    _stream_buffer(buf, &data, False, "buffer")
    try:
        size = _stream_page_size(page_size)
        _stream_buffer(header, &head, False, "header")
        try:
            return _move_runs(fd, &data, size, runs, <char *>head.buf, <size_t>head.len,
                             offset, True)
        finally:
            PyBuffer_Release(&head)
    finally:
        PyBuffer_Release(&data)


def recv_runs(int fd, buf, page_size, runs, offset=0):
    """Receive the runs of ``buf`` straight into it, so the destination never holds a second copy.

    Returns the bytes received by this call, short at end of file or when the
    descriptor would block; raises ``OSError`` only when nothing at all was
    received for another reason than end of file.
    """
    cdef Py_buffer data
    _stream_buffer(buf, &data, True, "buffer")
    try:
        return _move_runs(fd, &data, _stream_page_size(page_size), runs, NULL, 0, offset, False)
    finally:
        PyBuffer_Release(&data)
