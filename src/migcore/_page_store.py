"""Where a destination's pages land: every PAGES frame is validated fully, then written and hashed.

One store per incoming migration, shared by the main connection, the extra
streams and the plain post-copy receiver: nothing reaches the region before
its frame's flags, run table and sizes were checked against what the
handshake agreed, and every stored page is hashed into the table that the
commit compares with the source's (DESIGN.md rule 2).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from migcore import _codecs, _kernels
from migcore import _protocol as P
from migcore._errors import ProtocolError, VerificationError
from migcore._region import Region, U64, new_bitmap
from migcore._stats import StatsRecorder
from migcore._transport import Connection

#: Raises unless every page of the runs is still owed (post-copy).
CheckOwed = Callable[[U64], None]


class PageStore:
    """The region being filled, its hash table, and what the handshake allowed on the wire."""

    def __init__(
        self,
        region: Region,
        table: U64,
        stats: StatsRecorder,
        *,
        codec: _codecs.Codec | None,
        delta: bool,
        max_payload: int,
    ) -> None:
        self.region = region
        self.table = table
        self.stats = stats
        self.codec = codec
        self.delta = delta
        self.max_payload = max_payload
        #: Whether any frame has written into the region yet (post-copy's register step needs it).
        self.written = False
        self._zero_scratch: U64 | None = None

    def receive(self, header: P.Header, after: int, conn: Connection, *, check_owed: CheckOwed | None = None) -> U64:
        """Validate a PAGES frame fully, then receive its payload straight into the region (or decode it).

        ``after``: the frame's runs must start at or after this page (runs of
        one round ascend). ``check_owed`` is given after a post-copy switch.
        """
        postcopy = check_owed is not None
        region = self.region
        encoded = header.flags & (P.FLAG_COMPRESSED | P.FLAG_DELTA)
        zero = bool(header.flags & P.FLAG_ZERO)
        if header.flags & ~P.PAGES_FLAGS or header.flags & P.FLAG_POSTCOPY != (P.FLAG_POSTCOPY if postcopy else 0):
            raise ProtocolError(f"PAGES frame flags {header.flags:#x} are wrong for this phase")
        if zero and (encoded or not postcopy):
            raise ProtocolError(f"PAGES frame flags {header.flags:#x}: a zero notice is a plain post-copy frame")
        if zero and header.length:
            raise ProtocolError(f"zero notice with a {header.length}-byte payload (it has none)")
        if header.flags & P.FLAG_COMPRESSED and self.codec is None:
            raise ProtocolError("compressed PAGES in a migration that agreed on no codec")
        if header.flags & P.FLAG_DELTA and not self.delta:
            raise ProtocolError("delta-encoded PAGES in a migration that did not ask for delta encoding")
        if not 0 < header.count <= P.MAX_RUNS:
            raise ProtocolError(f"PAGES frame with {header.count} runs (allowed 1..{P.MAX_RUNS})")
        if header.length > self.max_payload:
            raise ProtocolError(f"PAGES payload of {header.length} bytes exceeds the agreed {self.max_payload}")
        runs = P.decode_runs(conn.recv_exact(header.count * P.RUN_SIZE, "reading a runs table"), header.count)
        pages = P.validate_runs(runs, region.npages, after=after)
        payload = P.runs_payload(runs, region.page_size, region.nbytes)
        if zero:
            if check_owed is not None:
                check_owed(runs)
            self._receive_zero(runs, pages)
            return runs
        if payload > self.max_payload:  # what a batch decodes to is bounded by the frame limit, not the region
            raise ProtocolError(f"PAGES frame of {payload} page bytes exceeds the agreed {self.max_payload}")
        if payload != header.length and not encoded:
            raise ProtocolError(
                f"PAGES header announces {header.length} payload bytes but its {pages} pages hold {payload}"
            )
        if check_owed is not None:
            check_owed(runs)
        self.written = True
        if encoded:
            self._receive_encoded(header, runs, pages, payload, conn)
        else:
            conn.recv_pages(region.view, region.page_size, runs, payload, "receiving pages")
        _kernels.hash_runs(region.view, region.page_size, runs, self.table)
        self.stats.add_pages(
            pages, payload, P.HEADER_SIZE + len(runs) * P.RUN_SIZE + header.length, postcopy=postcopy
        )
        return runs

    def _receive_zero(self, runs: U64, pages: int) -> None:
        """A zero notice (validated and owed): its pages read as zeros, and their hashes are the zero hash.

        A fresh region already holds zeros there (a read maps the shared zero
        page, nothing is allocated); a page that does not is cleared.
        """
        region = self.region
        ps = region.page_size
        scratch = new_bitmap(region.npages) if self._zero_scratch is None else self._zero_scratch
        self._zero_scratch = scratch
        for first, count in runs.tolist():
            if _kernels.zero_pages(region.view, ps, scratch, first, first + count) != count:
                start = first * ps
                stop = min((first + count) * ps, region.nbytes)
                region.view[start:stop] = bytes(stop - start)
        _kernels.hash_runs(region.view, ps, runs, self.table)
        self.stats.add_zero_pages(pages)
        self.stats.add_wire(P.HEADER_SIZE + len(runs) * P.RUN_SIZE)

    def _receive_encoded(self, header: P.Header, runs: U64, pages: int, payload: int, conn: Connection) -> None:
        """A compressed and/or delta-encoded batch: bounded by what its runs table implies, then decoded."""
        region = self.region
        delta = bool(header.flags & P.FLAG_DELTA)
        bound = payload + 4 * pages if delta else payload  # the decoded size can be no more than this
        # a compressed batch is sent only when it is smaller than what it decodes to
        if header.length > min(self.max_payload, bound):
            raise ProtocolError(f"encoded PAGES payload of {header.length} bytes is too large for {pages} pages")
        body: bytes | bytearray = conn.recv_exact(header.length, "receiving encoded pages")
        if header.flags & P.FLAG_COMPRESSED:
            assert self.codec is not None
            body = _codecs.unpack(self.codec, body, bound, exact=not delta)
            self.stats.add(compress_before=len(body), compress_after=header.length)
        elif not delta and len(body) != payload:
            raise ProtocolError(f"PAGES payload of {len(body)} bytes for {payload} bytes of pages")
        if delta:
            try:
                _kernels.delta_decode_runs(region.view, region.page_size, runs, body)
            except ValueError as exc:
                raise ProtocolError(f"bad delta batch: {exc}") from None
            return
        ps = region.page_size
        view = memoryview(body)
        pos = 0
        for first, count in runs.tolist():
            start = first * ps
            n = min(count * ps, region.nbytes - start)
            region.view[start : start + n] = view[pos : pos + n]
            pos += n

    def verify(self, digest: bytes) -> None:
        """Rule 2: every page this side stored hashes to what the source holds at the pause."""
        if P.table_digest(self.table) != digest:
            raise VerificationError(
                "the destination's page hashes disagree with the source's at the pause: nothing committed"
            )


def end_digest(header: P.Header, digest: bytes, conn: Connection, *, recovered: bool = False) -> bytes:
    """The digest a post-copy ends on: the POSTCOPY frame's or, when that was all zeros, END's body.

    A source that sent nothing before the switch hashes each owed page as
    it sends it, so its digest is known only at END. After a recovery END
    always carries the digest (the recovering source knows nothing of the
    first link); it must then equal POSTCOPY's when that had one.
    """
    deferred = digest == bytes(P.DIGEST_SIZE)
    if header.count or header.length not in (0, P.DIGEST_SIZE) or (recovered and not header.length):
        raise ProtocolError("END frame with a body" if not recovered else "a recovered post-copy END without its digest")
    if header.length == 0:
        if deferred:
            raise ProtocolError("post-copy END without the digest that POSTCOPY deferred to it")
        return digest
    body = bytes(conn.recv_exact(P.check_length(header, P.DIGEST_SIZE, exact=P.DIGEST_SIZE), "reading END"))
    if not deferred and not recovered:
        raise ProtocolError("END carries a digest although POSTCOPY had one")
    if not deferred and body != digest:
        raise VerificationError("the recovered source's digest differs from the one it switched over with")
    return body
