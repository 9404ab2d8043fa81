# What the post-copy fault-service loop reports (its results, the slots of its
# ``info`` array, the meaning of its error details) and the state it carries.

from libc.stdint cimport uint8_t, uint64_t

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


cdef struct _Serve:
    int uffd
    int sock
    int wake
    _Layout layout          # frame numbers and flags, from _protocol.LOOP_LAYOUT
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
    uint8_t *runs_wire      # runs table of the PAGES frame being received, as sent
    uint64_t *runs          # ... read into (first, count) pairs
    uint8_t *payload        # its payload (+ one page of zero padding)
    uint8_t header[_WIRE_HEADER]
    int where
    uint64_t zero_hash      # XXH3 of an all-zero page
    uint64_t tail_hash      # ... of the all-zero partial last page

