# cython: language_level=3
"""migcore's compiled kernels: pure functions over buffers, the GIL released per batch.

No policy, no module state, no I/O policy: each part below is a small set of
``cdef ... noexcept nogil`` kernels and the ``def`` functions that validate
arguments with the GIL held and then run one ``with nogil:`` block.
The names and meanings match ``migcore._reference`` (see ``_fastpath.pyi``).
"""

include "_hashing.pxi"
include "_bitmaps.pxi"
include "_iovec.pxi"
include "_xbzrle.pxi"
