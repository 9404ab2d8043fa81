"""The destination's state machine: handshake checks, rounds, the commit, and the post-copy service.

Before the switchover the destination keeps nothing it cannot vouch for: a
refused handshake allocates nothing, and any failure releases the region it
was filling. It hashes every page it stores, acknowledges those hashes at the
end of each round (the source's delta baseline, DESIGN.md rule 1), and
commits only when its whole hash table matches the source's (rule 2). After a
post-copy switchover it keeps everything it holds, whatever happens.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

from migcore import _codecs, _kernels
from migcore import _protocol as P
from migcore._errors import (
    CompatibilityError,
    MigrationCancelled,
    MigrationError,
    MigrationTimeout,
    ProtocolError,
    VerificationError,
)
from migcore._region import Region, U64, count_bits_in, new_bitmap, runs_in
from migcore._handshake import DestinationOptions, check_hello
from migcore._peer_errors import error_frame_for, error_from_peer
from migcore._security import authenticate_destination
from migcore._stats import MigrationStats, StatsRecorder
from migcore._streams import StreamReceivers, accept_streams
from migcore._trackers import runs_to_pages, zero_page_hashes
from migcore._transport import Connection
from migcore._uffd_postcopy import UffdPostcopy

log = logging.getLogger("migcore")

#: Receive buffer of the page connection after a post-copy switch (the kernel doubles it): a demanded
#: page queues behind at most this much background data on the destination's side.
POSTCOPY_RCVBUF = 512 << 10



def _allocate_region(nbytes: int, page_size: int) -> Region:
    """Where a destination region comes from (a seam the tests replace to put guards around it)."""
    return Region.allocate(nbytes, page_size)


def _discard_region(region: Region) -> None:
    """Release a region received before a failed switchover (rule 3: the destination discards)."""
    mapping = region._mapping
    try:
        region.view.release()
        if mapping is not None:
            mapping.close()
    except BufferError:  # someone still holds a view of it: let the garbage collector free it
        pass


class Destination:
    """One incoming migration on one connection, from HELLO to commit (or to post-copy)."""

    def __init__(
        self, conn: Connection, opts: DestinationOptions, accept_stream: Callable[[], Connection] | None = None
    ) -> None:
        self.conn = conn
        self.opts = opts
        #: Accepts one more connection on the listener (TLS included), for the source's extra streams.
        self.accept_stream = accept_stream
        self.streams: StreamReceivers | None = None
        self.codec: _codecs.Codec | None = None
        self.region: Region | None = None
        self.table: U64 | None = None
        self.owed: U64 | None = None
        self.hello: P.Hello | None = None
        self.stats = StatsRecorder(mode="", tracker="", migration_id="", page_size=0, total_bytes=0)
        #: Whether any frame has written into the region yet (post-copy's register step needs it).
        self.region_written = False
        self._zero_scratch: NDArray[np.uint64] | None = None

    # -- frames ------------------------------------------------------------

    def read_header(self, what: str) -> P.Header:
        raw = self.conn.recv_exact(P.HEADER_SIZE, what)
        return P.decode_header(raw)

    def read_body(self, header: P.Header, limit: int, what: str, *, exact: int | None = None) -> bytearray:
        n = P.check_length(header, limit, exact=exact)
        return self.conn.recv_exact(n, what)

    # -- the handshake -------------------------------------------------------

    def handshake(self) -> P.Hello:
        # authentication comes first (inside TLS when there is TLS); it returns HELLO's header when tokenless
        first = authenticate_destination(self.conn, self.opts.token)
        header = first if first is not None else self.read_header("waiting for HELLO")
        P.expect(header, (P.Frame.HELLO,), "the handshake")
        hello = P.decode_hello(bytes(self.read_body(header, P.MAX_CONTROL_BODY, "reading HELLO")))
        refusal = self.check(hello)
        if refusal is not None:
            field, reason = refusal
            self.conn.abort_soon(P.encode_refuse(field, reason))
            raise CompatibilityError(f"refused the source's migration ({field}): {reason}", field=field)
        return hello

    def accept(self, hello: P.Hello) -> None:
        """ACCEPT, once the region and the tables are ready: the source may pause right after it."""
        self.conn.send_all(
            P.encode_accept(
                P.Accept(
                    max_state=self.opts.max_state_bytes,
                    max_payload=self.opts.max_payload,
                    max_runs=P.MAX_RUNS,
                    features=P.SUPPORTED_FEATURES,
                )
            ),
            "sending ACCEPT",
        )
        if hello.codec is not None:
            self.codec = _codecs.get_codec(hello.codec)
        if hello.streams > 1:
            assert self.accept_stream is not None
            self.streams = accept_streams(
                self.accept_stream,
                hello,
                self.opts.token,
                receive=lambda header, after, conn: self.receive_pages(header, after, conn=conn),
                wake=self.conn.close,
            )

    def check(self, hello: P.Hello) -> tuple[str, str] | None:
        """The first pre-migration check that fails, as ``(field, reason)``; None when all pass."""
        return check_hello(hello, self.opts, extra_streams=self.accept_stream is not None)

    # -- the whole pre-switchover run -------------------------------------

    def run(self) -> Received:
        """Serve one migration until the commit (or the post-copy switch); discard on any failure."""
        try:
            hello = self.handshake()
            self.hello = hello
            mid = hello.migration_id.hex()
            self.stats = StatsRecorder(
                mode=hello.mode, tracker=hello.tracker, migration_id=mid, page_size=hello.page_size, total_bytes=hello.nbytes
            )
            self.stats.status = "active"
            self.region = _allocate_region(hello.nbytes, hello.page_size)
            if self.region.nbytes != hello.nbytes or self.region.page_size != hello.page_size:
                raise MigrationError("allocated region does not match the HELLO")
            self.table = zero_page_hashes(self.region)
            # the owed bitmap of a post-copy switch, allocated and touched now rather than in the pause
            self.owed = P.all_owed(self.region.npages) if hello.features & P.FEATURE_POSTCOPY else None
            # only now: a source that pauses at once (stop-and-copy, post-copy) must not wait on these
            self.accept(hello)
            if self.streams is not None:
                self.streams.start()  # only now: their pages need the region
            self.stats.setup_time = time.monotonic() - self.stats.started
            log.debug("destination: accepted migration %s of %d bytes (%s)", mid, hello.nbytes, hello.mode)
            return self.receive_precopy(hello)
        except BaseException as exc:
            # a stream thread's failure is the real cause of the main connection closing under us
            err = self.streams.cause(exc) if self.streams is not None else exc
            self.streams = None
            self.fail(err)
            if err is exc:
                raise
            raise err from exc

    def fail(self, exc: BaseException) -> None:
        """Rule 3 before the switchover: tell the source why (if we can), drop what arrived."""
        status = "cancelled" if isinstance(exc, MigrationCancelled) else "failed"
        self.stats.finish(status, str(exc))
        frame = None if self.conn.closed else error_frame_for(exc)
        if frame is not None:
            self.conn.abort_soon(frame)
        else:
            self.conn.close()
        if self.region is not None:
            _discard_region(self.region)
            self.region = None
        log.info("destination: migration failed before the switchover, discarded: %s", exc)

    def receive_pages(
        self,
        header: P.Header,
        after: int,
        *,
        check_owed: Callable[[NDArray[np.uint64]], None] | None = None,
        conn: Connection | None = None,
    ) -> NDArray[np.uint64]:
        """Validate a PAGES frame fully, then receive its payload straight into the region (or decode it).

        ``check_owed`` is given after a post-copy switch: it raises unless
        every page of the frame is still owed. ``conn`` is the extra stream
        the frame came on (default: the main connection).
        """
        postcopy = check_owed is not None
        assert self.region is not None and self.table is not None
        region = self.region
        conn = self.conn if conn is None else conn
        hello = self.hello
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
        if header.flags & P.FLAG_DELTA and not (hello is not None and hello.features & P.FEATURE_DELTA):
            raise ProtocolError("delta-encoded PAGES in a migration that did not ask for delta encoding")
        if not 0 < header.count <= P.MAX_RUNS:
            raise ProtocolError(f"PAGES frame with {header.count} runs (allowed 1..{P.MAX_RUNS})")
        if header.length > self.opts.max_payload:
            raise ProtocolError(f"PAGES payload of {header.length} bytes exceeds the agreed {self.opts.max_payload}")
        runs = P.decode_runs(conn.recv_exact(header.count * P.RUN_SIZE, "reading a runs table"), header.count)
        pages = P.validate_runs(runs, region.npages, after=after)
        payload = P.runs_payload(runs, region.page_size, region.nbytes)
        if zero:
            if check_owed is not None:
                check_owed(runs)
            self.receive_zero(runs, pages)
            return runs
        if payload != header.length and not encoded:
            raise ProtocolError(
                f"PAGES header announces {header.length} payload bytes but its {pages} pages hold {payload}"
            )
        if check_owed is not None:
            check_owed(runs)
        self.region_written = True
        if encoded:
            self.receive_encoded(header, runs, pages, payload, conn)
        else:
            conn.recv_pages(region.view, region.page_size, runs, payload, "receiving pages")
        _kernels.hash_runs(region.view, region.page_size, runs, self.table)
        self.stats.add_pages(
            pages, payload, P.HEADER_SIZE + len(runs) * P.RUN_SIZE + header.length, postcopy=postcopy
        )
        return runs

    def receive_zero(self, runs: NDArray[np.uint64], pages: int) -> None:
        """A zero notice (validated and owed): its pages read as zeros, and their hashes are the zero hash.

        A fresh region already holds zeros there (a read maps the shared zero
        page, nothing is allocated); a page that does not is cleared.
        """
        assert self.region is not None and self.table is not None
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
        with self.stats.lock:
            self.stats.zero_pages += pages
        self.stats.add_wire(P.HEADER_SIZE + len(runs) * P.RUN_SIZE)

    def receive_encoded(self, header: P.Header, runs: NDArray[np.uint64], pages: int, payload: int, conn: Connection) -> None:
        """A compressed and/or delta-encoded batch: bounded by what its runs table implies, then decoded."""
        assert self.region is not None
        region = self.region
        delta = bool(header.flags & P.FLAG_DELTA)
        bound = payload + 4 * pages if delta else payload  # the decoded size can be no more than this
        # a compressed batch is sent only when it is smaller than what it decodes to
        if header.length > min(self.opts.max_payload, bound):
            raise ProtocolError(f"encoded PAGES payload of {header.length} bytes is too large for {pages} pages")
        body: bytes | bytearray = conn.recv_exact(header.length, "receiving encoded pages")
        if header.flags & P.FLAG_COMPRESSED:
            assert self.codec is not None
            body = _codecs.unpack(self.codec, body, bound, exact=not delta)
            with self.stats.lock:
                self.stats.compress_before += len(body)
                self.stats.compress_after += header.length
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

    def receive_precopy(self, hello: P.Hello) -> Received:
        assert self.region is not None and self.table is not None
        region, table = self.region, self.table
        rnd = 0
        round_runs: list[NDArray[np.uint64]] = []
        cursor = 0
        state: bytes | None = None
        state_limit = self.opts.max_state_bytes
        if hello.state_size != P.UNKNOWN_SIZE:
            state_limit = min(state_limit, hello.state_size)
        before_state = (P.Frame.PAGES, P.Frame.ROUND_END, P.Frame.STATE, P.Frame.CANCEL, P.Frame.ERROR)
        after_state = (P.Frame.COMPLETE, P.Frame.POSTCOPY, P.Frame.CANCEL, P.Frame.ERROR)
        while True:
            header = self.read_header("waiting for the next frame")
            P.expect(header, before_state if state is None else after_state, "pre-copy" if state is None else "the switchover")
            if header.type is P.Frame.PAGES:
                runs = self.receive_pages(header, cursor)
                round_runs.append(runs)
                cursor = int(runs[-1, 0] + runs[-1, 1])
            elif header.type is P.Frame.ROUND_END:
                if header.length != 0 or header.count != rnd:
                    raise ProtocolError(f"ROUND_END for round {header.count} (length {header.length}) in round {rnd}")
                if self.streams is not None:
                    round_runs += self.streams.wait_round(rnd)
                done = np.concatenate(round_runs) if round_runs else np.empty((0, 2), dtype=np.uint64)
                if self.streams is not None and len(done):
                    # acknowledged in page order; the streams' parts of a round must not overlap
                    done = done[np.argsort(done[:, 0], kind="stable")]
                    P.validate_runs(done, region.npages)
                hashes = np.ascontiguousarray(table[runs_to_pages(done)], dtype="<u8")
                self.conn.send_all(
                    P.encode_header(P.Frame.ACK, count=rnd, length=hashes.nbytes) + hashes.tobytes(), "sending ACK"
                )
                with self.stats.lock:
                    self.stats.rounds = rnd + 1
                    self.stats.pages_per_round.append(len(hashes))
                rnd += 1
                round_runs = []
                cursor = 0
            elif header.type is P.Frame.STATE:
                if header.count != 0:
                    raise ProtocolError("STATE frame with a non-zero count")
                if header.length > state_limit:
                    raise ProtocolError(f"state blob of {header.length} bytes is larger than the agreed {state_limit}")
                state = bytes(self.conn.recv_exact(header.length, "receiving the state"))
                self.stats.state_bytes = len(state)
            elif header.type is P.Frame.COMPLETE:
                digest = bytes(self.read_body(header, P.DIGEST_SIZE, "reading COMPLETE", exact=P.DIGEST_SIZE))
                assert state is not None
                self.join_streams(rnd)
                self.verify(digest)
                self.conn.send_all(P.encode_header(P.Frame.DONE), "sending DONE")
                self.conn.close()
                self.stats.verified = True
                self.stats.remaining_bytes = 0
                self.stats.finish("completed")
                log.info("destination: migration %s committed", self.stats.migration_id)
                received = Received(region, state, self.stats, hello.mode)
                return received
            elif header.type is P.Frame.POSTCOPY:
                if not hello.features & P.FEATURE_POSTCOPY:
                    raise ProtocolError(f"POSTCOPY switchover in a {hello.mode} migration that did not ask for post-copy")
                words = (region.npages + 63) // 64
                if header.count not in (0, words):  # 0: no bitmap, every page is owed
                    raise ProtocolError(f"POSTCOPY bitmap of {header.count} words, expected {words} (or none)")
                size = P.DIGEST_SIZE + 8 * header.count
                body = self.read_body(header, size, "reading POSTCOPY", exact=size)
                digest, owed = P.decode_postcopy(body, region.npages, out=self.owed)
                assert state is not None
                self.join_streams(rnd)
                received = Received(region, state, self.stats, hello.mode)
                received._start_postcopy(self, owed, digest)
                return received
            elif header.type is P.Frame.CANCEL:
                reason = P.decode_cancel(bytes(self.read_body(header, P.MAX_CONTROL_BODY, "reading CANCEL")))
                raise MigrationCancelled(f"the source cancelled the migration: {reason}")
            else:  # ERROR
                code, message = P.decode_error(bytes(self.read_body(header, P.MAX_CONTROL_BODY, "reading ERROR")))
                raise error_from_peer(code, message, "the source")

    def join_streams(self, rnd: int) -> None:
        """Before the commit or the switch: every stream delivered the final pass (round ``rnd``) and ended."""
        if self.streams is None:
            return
        self.streams.wait_round(rnd)
        self.streams.wait_end()
        self.streams.close()
        self.streams = None

    def end_digest(self, header: P.Header, digest: bytes) -> bytes:
        """The digest a post-copy ends on: the POSTCOPY frame's or, when that was all zeros, END's body.

        A source that sent nothing before the switch hashes each owed page as
        it sends it, so its digest is known only at END.
        """
        if header.count or header.length not in (0, P.DIGEST_SIZE):
            raise ProtocolError("END frame with a body")
        if header.length == 0:
            if digest == bytes(P.DIGEST_SIZE):
                raise ProtocolError("post-copy END without the digest that POSTCOPY deferred to it")
            return digest
        body = bytes(self.read_body(header, P.DIGEST_SIZE, "reading END", exact=P.DIGEST_SIZE))
        if digest != bytes(P.DIGEST_SIZE):
            raise ProtocolError("END carries a digest although POSTCOPY had one")
        return body

    def verify(self, digest: bytes) -> None:
        """Rule 2: every page this side stored hashes to what the source holds at the pause."""
        assert self.table is not None
        if P.table_digest(self.table) != digest:
            raise VerificationError(
                "the destination's page hashes disagree with the source's at the pause: nothing committed"
            )


class Received:
    """A migrated region and state on the destination; the program may resume with them.

    After a pre-copy or stop-and-copy migration everything is present and
    verified. After a post-copy switchover the pages still owed arrive in the
    background: call :meth:`ensure` before touching a range (it asks the
    source for those pages first) and :meth:`wait` to block until all arrived
    and the region is verified. On Linux with userfaultfd (a region from
    ``Region.allocate``, pages of at least 4 KiB) the region is usable at once:
    touching an owed page blocks only that thread until the page arrives, and
    :meth:`ensure` is merely a prefetch; after a failure, pages still owed
    read as zeros. (A thread that holds the GIL and touches an owed page
    stalls every Python thread of this process until the page arrives, so a
    source running in the same process must be fed through :meth:`ensure`.) If the link breaks after the switch, what
    arrived stays in :attr:`region` and :meth:`wait`/:meth:`ensure` raise
    :class:`PeerLostError`.
    """

    def __init__(self, region: Region, state: bytes, stats: StatsRecorder, mode: str) -> None:
        self.region = region
        self.state = state
        self.mode = mode
        self._stats = stats
        self._cond = threading.Condition()
        self._missing: U64 | None = None
        self._missing_count = 0
        self._done = True
        self._error: BaseException | None = None
        self._thread: threading.Thread | None = None
        self._dest: Destination | None = None
        self._send_lock = threading.Lock()
        self._uffd: UffdPostcopy | None = None

    @property
    def stats(self) -> MigrationStats:
        """The destination's view of the migration (a fresh snapshot on every access)."""
        return self._stats.snapshot()

    @property
    def migration_id(self) -> str:
        return self._stats.migration_id

    @property
    def missing_pages(self) -> int:
        """Pages still owed by the source (post-copy); 0 once everything arrived."""
        if self._uffd is not None:
            return self._uffd.remaining
        with self._cond:
            return self._missing_count

    @property
    def transparent(self) -> bool:
        """True when owed pages arrive on first touch (userfaultfd); False when the program calls :meth:`ensure`."""
        return self._uffd is not None

    def _pages_of(self, offset: int, length: int) -> tuple[int, int]:
        """The pages ``[first, stop)`` holding bytes ``[offset, offset + length)``; ValueError outside the region."""
        if offset < 0 or length < 0 or offset + length > self.region.nbytes:
            raise ValueError(f"byte range [{offset}, {offset + length}) outside the region's {self.region.nbytes} bytes")
        ps = self.region.page_size
        return offset // ps, (offset + length - 1) // ps + 1 if length else offset // ps

    def missing_in(self, offset: int, length: int) -> int:
        """How many pages of bytes ``[offset, offset + length)`` are still owed by the source (0: all present)."""
        first, stop = self._pages_of(offset, length)
        if first == stop or self._missing is None:
            return 0
        with self._cond:
            return count_bits_in(self._missing, first, stop)

    def _start_postcopy(self, dest: Destination, owed: U64, digest: bytes) -> None:
        """Take over the connection after the POSTCOPY frame: confirm, then receive in the background."""
        self._dest = dest
        self._missing = owed
        self._missing_count = int(_kernels.count_bits(owed))
        self._done = False
        # with userfaultfd, any touch of an owed page fetches it: the program needs no ensure()
        self._uffd = UffdPostcopy.attach(self.region, owed, dest.conn, written=dest.region_written)
        # demand latency: a small receive window keeps few background pages queued ahead of a demanded one
        dest.conn.bound_queue(recv=POSTCOPY_RCVBUF)
        dest.conn.send_all(P.encode_header(P.Frame.SWITCHED), "sending SWITCHED")
        with self._stats.lock:
            self._stats.status = "postcopy-active"
            self._stats.remaining_bytes = self._missing_count * self.region.page_size
        log.info("destination: post-copy switch, %d pages owed", self._missing_count)
        self._thread = threading.Thread(
            target=self._serve, args=(digest,), name=f"migcore-postcopy-{self.migration_id[:8]}", daemon=True
        )
        self._thread.start()
        if self._uffd is not None:
            self._uffd.wait_ready(self._thread.is_alive)

    def _check_owed(self, runs: NDArray[np.uint64]) -> None:
        assert self._missing is not None
        with self._cond:
            for first, count in runs.tolist():
                if count_bits_in(self._missing, first, first + count) != count:
                    raise ProtocolError(f"post-copy pages {first}..{first + count - 1} were not owed (or arrived twice)")

    def _serve(self, digest: bytes) -> None:
        """Background thread: receive owed pages until END, then verify and confirm."""
        dest = self._dest
        assert dest is not None and self._missing is not None and dest.table is not None
        try:
            if self._uffd is not None:
                try:
                    # the whole post-copy, in a loop that never takes the GIL
                    end = self._uffd.serve(dest.conn, dest.table, dest.opts.max_payload, self._stats)
                finally:
                    self._uffd.close()
                dest.verify(dest.end_digest(end, digest))  # POSTCOPY's digest, or END's when the source deferred it
                with self._send_lock:
                    dest.conn.send_all(P.encode_header(P.Frame.DONE), "sending DONE")
            while self._uffd is None:  # the Python receiver, when userfaultfd is not in use
                header = dest.read_header("waiting for post-copy pages")
                P.expect(header, (P.Frame.PAGES, P.Frame.END, P.Frame.ERROR), "post-copy")
                if header.type is P.Frame.PAGES:
                    runs = dest.receive_pages(header, 0, check_owed=self._check_owed)
                    with self._cond:
                        for first, count in runs.tolist():
                            _kernels.clear_bits(self._missing, first, first + count)
                        self._missing_count -= int(runs[:, 1].sum())
                        self._stats.remaining_bytes = self._missing_count * self.region.page_size
                        self._cond.notify_all()
                elif header.type is P.Frame.END:
                    if self._missing_count:
                        raise ProtocolError(f"the source ended post-copy with {self._missing_count} pages still owed")
                    dest.verify(dest.end_digest(header, digest))  # POSTCOPY's digest, or END's when deferred
                    with self._send_lock:
                        dest.conn.send_all(P.encode_header(P.Frame.DONE), "sending DONE")
                    break
                else:
                    code, message = P.decode_error(bytes(dest.read_body(header, P.MAX_CONTROL_BODY, "reading ERROR")))
                    raise error_from_peer(code, message, "the source")
        except BaseException as exc:  # noqa: BLE001 - stored and re-raised by wait()/ensure()
            frame = None if dest.conn.closed else error_frame_for(exc)
            with self._send_lock:
                if frame is not None:
                    dest.conn.abort_soon(frame)
                else:
                    dest.conn.close()
            self._stats.finish("failed", str(exc))
            log.warning("destination: post-copy failed after the switch, keeping what arrived: %r", exc)
            with self._cond:
                self._error = exc
                self._done = True
                self._cond.notify_all()
            return
        dest.conn.close()
        self._stats.verified = True
        self._stats.finish("completed")
        log.info("destination: post-copy migration %s complete and verified", self.migration_id)
        with self._cond:
            self._done = True
            self._cond.notify_all()

    def _raise_error(self) -> None:
        err = self._error
        if err is None:
            return
        if isinstance(err, MigrationError):
            raise type(err)(str(err)) from err
        raise MigrationError(f"post-copy failed: {err!r}") from err

    def wait(self, timeout: float | None = None) -> None:
        """Block until every page is present and verified (post-copy); return at once otherwise."""
        with self._cond:
            if not self._cond.wait_for(lambda: self._done, timeout):
                raise MigrationTimeout(f"{self._missing_count} pages still owed after {timeout:g} s")
            self._raise_error()
        if self._thread is not None:
            self._thread.join()

    def ensure(self, offset: int, length: int, timeout: float | None = None) -> None:
        """Block until bytes ``[offset, offset + length)`` are present, asking the source for them first."""
        first, stop = self._pages_of(offset, length)
        if first == stop or self._missing is None:
            return
        missing = self._missing
        if self._uffd is not None:
            # a prefetch: ask for the whole range at once, then wait by touching it
            self._uffd.ensure(first, stop)
            if count_bits_in(missing, first, stop):  # the link broke: the loop unregistered the region
                with self._cond:
                    self._cond.wait_for(lambda: self._done)
                    self._raise_error()
            return
        runs = np.empty((P.MAX_RUNS, 2), dtype=np.uint64)
        with self._cond:
            if count_bits_in(missing, first, stop) == 0:
                return  # present pages stay usable even after a failure
            if self._error is not None:
                self._raise_error()
            frames = []
            cursor = first
            while cursor < stop:
                n = runs_in(missing, cursor, stop, runs)
                if n == 0:
                    break
                frames.append(P.encode_runs_header(P.Frame.DEMAND, runs[:n], 0))
                cursor = int(runs[n - 1, 0] + runs[n - 1, 1])
                if n < len(runs):
                    break
        dest = self._dest
        assert dest is not None
        try:
            with self._send_lock:
                for frame in frames:
                    dest.conn.send_all(frame, "sending DEMAND")
        except MigrationError:
            pass  # the background thread sees the broken link too and records the error
        with self._stats.lock:
            self._stats.postcopy_requests += len(frames)
        with self._cond:
            ok = self._cond.wait_for(lambda: self._error is not None or count_bits_in(missing, first, stop) == 0, timeout)
            if self._error is not None and count_bits_in(missing, first, stop):
                self._raise_error()
            if not ok:
                raise MigrationTimeout(f"pages {first}..{stop - 1} did not arrive within {timeout:g} s")

    def __repr__(self) -> str:
        return f"<migcore.Received {self.region.nbytes} bytes, {len(self.state)} state bytes, {self.missing_pages} pages owed>"
