# The userfaultfd(2) and PAGEMAP_SCAN ABI: structures, ioctl numbers, mode and feature bits.
#
# Declared here, not taken from <linux/userfaultfd.h>/<linux/fs.h>, because
# build hosts (Debian 12) ship headers older than the kernels that have these
# features; each one names the kernel release that introduced it. Support is
# detected at run time.

from libc.stdint cimport int64_t, uint8_t, uint64_t

cdef extern from *:
    """
    #include <stdint.h>
    #include <sys/ioctl.h>
    #include <sys/syscall.h>
    #include <unistd.h>
    #include <linux/ioctl.h>

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

    int mig_userfaultfd(int flags) nogil
    int mig_ioctl(int fd, unsigned long req, void *arg) nogil
