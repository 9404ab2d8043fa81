# cython: language_level=3
"""Linux userfaultfd and PAGEMAP_SCAN: write tracking and transparent post-copy.

A thin layer over the kernel: opening a userfaultfd, registering ranges,
write-protecting, scanning the written pages into a dirty bitmap, and the
post-copy fault-service loop, which runs entirely without the GIL (the thread
that faulted may hold it). There is no pure-Python equivalent: where this is
unavailable, migcore uses its hash tracker and the Python post-copy receiver.

The parts below: the kernel ABI and C library declarations, the system calls,
the frames the loop reads and writes, and the fault-service loop (its state,
asking for pages, landing them, the loop).
"""

include "_uffd_kernel.pxi"
include "_uffd_posix.pxi"
include "_uffd_calls.pxi"
include "_uffd_wire.pxi"
include "_uffd_state.pxi"
include "_uffd_demand.pxi"
include "_uffd_install.pxi"
include "_uffd_loop.pxi"
