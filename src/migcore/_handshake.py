"""The destination's pre-migration checks: one pure decision over the source's HELLO and this side's limits.

Every destination (a socket listener, the shared-storage reader) refuses the
same things for the same reasons, before it allocates anything; the answer is
a ``(field, reason)`` pair the socket side sends back in REFUSE and the file
side raises as a :class:`CompatibilityError`.
"""

from __future__ import annotations

from dataclasses import dataclass

from migcore import _codecs
from migcore import _protocol as P
from migcore._region import check_page_size


@dataclass(frozen=True)
class DestinationOptions:
    """What a listener accepts; checked against every source's HELLO."""

    max_bytes: int | None = None
    compat: str | None = None
    page_size: int | None = None
    max_state_bytes: int = P.DEFAULT_MAX_STATE
    max_payload: int = P.DEFAULT_MAX_PAYLOAD
    check_memory: bool = True
    #: Shared secret the source must prove it holds (None: no token exchange).
    token: bytes | None = None


def mem_available() -> int | None:
    """``MemAvailable`` from ``/proc/meminfo`` in bytes, or None where there is no such file."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def check_hello(hello: P.Hello, o: DestinationOptions, *, extra_streams: bool) -> tuple[str, str] | None:
    """The first check ``hello`` fails, as ``(field, reason)``; None when all pass.

    ``extra_streams`` says whether this destination can accept the extra
    connections of ``streams > 1``.
    """
    if hello.version != P.PROTOCOL_VERSION:
        return "version", f"protocol version {hello.version} differs from this side's {P.PROTOCOL_VERSION}"
    try:
        check_page_size(hello.page_size)
    except ValueError as exc:
        return "page_size", str(exc)
    if hello.page_size > o.max_payload:
        return "page_size", f"a page of {hello.page_size} bytes does not fit in one frame (max_payload={o.max_payload})"
    if o.page_size is not None and hello.page_size != o.page_size:
        return "page_size", f"page size {hello.page_size} differs from this side's {o.page_size}"
    if o.compat != hello.compat:
        return "compat", f"compat string {hello.compat!r} differs from this side's {o.compat!r}"
    if hello.features & ~P.SUPPORTED_FEATURES:
        return "features", f"unsupported feature bits {hello.features & ~P.SUPPORTED_FEATURES:#x}"
    if hello.mode in ("postcopy", "hybrid") and not hello.features & P.FEATURE_POSTCOPY:
        return "features", f"mode {hello.mode} needs the post-copy feature"
    if bool(hello.features & P.FEATURE_COMPRESS) != (hello.codec is not None):
        return "codec", "the compression feature and the codec disagree"
    if hello.codec is not None and not _codecs.available(hello.codec):
        return "codec", f"this side cannot decompress {hello.codec} (install its package)"
    if bool(hello.features & P.FEATURE_STREAMS) != (hello.streams > 1):
        return "streams", "the streams feature and the stream count disagree"
    if hello.streams > 1 and not extra_streams:
        return "streams", "this destination cannot accept extra connections"
    if o.max_bytes is not None and hello.nbytes > o.max_bytes:
        return "nbytes", f"region of {hello.nbytes} bytes exceeds this side's max_bytes={o.max_bytes}"
    if o.check_memory:
        avail = mem_available()
        if avail is not None and hello.nbytes > avail:
            return "memory", f"region of {hello.nbytes} bytes exceeds the {avail} bytes of available memory"
    if hello.state_size != P.UNKNOWN_SIZE and hello.state_size > o.max_state_bytes:
        return "state_size", f"state of {hello.state_size} bytes exceeds this side's limit of {o.max_state_bytes}"
    return None
