# The C library and xxHash calls the system calls and the fault-service loop use.

from libc.stdint cimport uint8_t, uint64_t

cdef extern from *:
    """
    #include <errno.h>
    #include <fcntl.h>
    #include <poll.h>
    #include <stdint.h>
    #include <string.h>
    #include <sys/mman.h>
    #include <sys/socket.h>
    #include <time.h>
    #include <unistd.h>

    #define XXH_INLINE_ALL
    #include <xxhash.h>

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
