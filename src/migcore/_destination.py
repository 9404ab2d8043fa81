"""The destination's state machine: handshake checks, rounds, the commit, and the post-copy switch.

Before the switchover the destination keeps nothing it cannot vouch for: a
refused handshake allocates nothing, and any failure releases the region it
was filling. It hashes every page it stores (``_page_store``), acknowledges
those hashes at the end of each round (the source's delta baseline,
DESIGN.md rule 1), and commits only when its whole hash table matches the
source's (rule 2). At a post-copy switch it hands the connection to a
post-copy receiver (``_received``) and keeps everything it holds, whatever
happens after.
"""

from __future__ import annotations

import logging
import traceback
from collections.abc import Callable

import numpy as np

from migcore import _codecs
from migcore import _postcopy_wire as PW
from migcore import _protocol as P
from migcore._errors import CompatibilityError, MigrationCancelled, MigrationError, ProtocolError, VerificationError
from migcore._handshake import DestinationOptions, check_hello
from migcore._page_store import PageStore
from migcore._peer_errors import error_frame_for, error_from_peer
from migcore._received import PostcopyReceiver, Received, start_postcopy
from migcore._region import Region, U64
from migcore import _local
from migcore._stats import StatsRecorder
from migcore._streams import StreamReceivers, accept_streams
from migcore._trackers import runs_to_pages, zero_page_hashes
from migcore._transport import Connection

log = logging.getLogger("migcore")

__all__ = ["Destination", "DestinationOptions", "Received"]


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
        self,
        conn: Connection,
        opts: DestinationOptions,
        first: tuple[P.Header, bytes],
        accept_stream: Callable[[], tuple[Connection, P.Header, bytes]] | None = None,
    ) -> None:
        self.conn = conn
        self.opts = opts
        #: The first frame (header and body), read after the authentication (``_intake``).
        self.first = first
        #: Accepts one more connection on the listener (TLS and authentication included), for the extra streams.
        self.accept_stream = accept_stream
        self.streams: StreamReceivers | None = None
        self.region: Region | None = None
        self.store: PageStore | None = None
        self.owed: U64 | None = None
        self.stats = StatsRecorder(mode="", tracker="", migration_id="", page_size=0, total_bytes=0)

    # -- frames ------------------------------------------------------------

    def read_header(self, what: str) -> P.Header:
        return P.decode_header(self.conn.recv_exact(P.HEADER_SIZE, what))

    def read_body(self, header: P.Header, limit: int, what: str, *, exact: int | None = None) -> bytes:
        return bytes(self.conn.recv_exact(P.check_length(header, limit, exact=exact), what))

    # -- the handshake -------------------------------------------------------

    def handshake(self) -> P.Hello:
        header, body = self.first
        if header.type is P.Frame.RECOVER:
            raise refuse(self.conn, "migration_id", f"no post-copy migration {P.decode_hello(body).migration_id.hex()} waits here")
        P.expect(header, (P.Frame.HELLO,), "the handshake")
        hello = P.decode_hello(body)
        refusal = check_hello(hello, self.opts, extra_streams=self.accept_stream is not None)
        if refusal is not None:
            raise refuse(self.conn, *refusal)
        return hello

    def prepare(self, hello: P.Hello) -> PageStore:
        """The region, its hash table and the page store, before ACCEPT (the source may pause right after it)."""
        self.stats = StatsRecorder(
            mode=hello.mode,
            tracker=hello.tracker,
            migration_id=hello.migration_id.hex(),
            page_size=hello.page_size,
            total_bytes=hello.nbytes,
        )
        # both ends tell the same story: what the source asked for is what this side counts under
        self.stats.update(status="active", streams=hello.streams, compress=hello.codec or "")
        self.region = _allocate_region(hello.nbytes, hello.page_size)
        if self.region.nbytes != hello.nbytes or self.region.page_size != hello.page_size:
            raise MigrationError("allocated region does not match the HELLO")
        # the owed bitmap of a post-copy switch, allocated and touched now rather than in the pause
        self.owed = PW.all_owed(self.region.npages) if hello.features & P.FEATURE_POSTCOPY else None
        return PageStore(
            self.region,
            zero_page_hashes(self.region),
            self.stats,
            codec=_codecs.get_codec(hello.codec) if hello.codec is not None else None,
            delta=bool(hello.features & P.FEATURE_DELTA),
            max_payload=self.opts.max_payload,
        )

    def accept(self, hello: P.Hello, store: PageStore) -> None:
        """ACCEPT, then the source's extra streams (their pages go to the same store)."""
        accept = P.Accept(
            max_state=self.opts.max_state_bytes,
            max_payload=self.opts.max_payload,
            max_runs=P.MAX_RUNS,
            features=P.SUPPORTED_FEATURES,
        )
        self.conn.send_all(P.encode_accept(accept), "sending ACCEPT")
        if hello.streams > 1:
            assert self.accept_stream is not None
            self.streams = accept_streams(self.accept_stream, hello, receive=store.receive, wake=self.conn.close)

    # -- the whole pre-switchover run -------------------------------------

    def run(self) -> Received:
        """Serve one migration until the commit (or the post-copy switch); discard on any failure."""
        try:
            hello = self.handshake()
            self.store = self.prepare(hello)
            # only now: a source that pauses at once (stop-and-copy, post-copy) must not wait on the region
            self.accept(hello, self.store)
            if self.streams is not None:
                self.streams.start()  # only now: their pages need the region
            self.stats.activate()
            log.debug("destination: accepted migration %s of %d bytes (%s)", self.stats.migration_id, hello.nbytes, hello.mode)
            return self.receive(hello, self.store)
        except BaseException as exc:
            # a stream thread's failure is the real cause of the main connection closing under us
            err = self.streams.cause(exc) if self.streams is not None else exc
            self.streams = None
            self.fail(err)
            # the exception's traceback holds the frames that hold the tables: free them now, not at a
            # garbage collection (a broken reception must not keep its per-page tables alive)
            self.store = self.owed = None
            traceback.clear_frames(exc.__traceback__)
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

    def receive(self, hello: P.Hello, store: PageStore) -> Received:
        """Rounds of pages, the state, then the commit or the post-copy switch."""
        rnd = 0
        round_runs: list[U64] = []
        cursor = 0
        state: bytes | None = None
        before_state = (P.Frame.PAGES, P.Frame.ROUND_END, P.Frame.STATE, P.Frame.CANCEL, P.Frame.ERROR)
        after_state = (P.Frame.COMPLETE, P.Frame.POSTCOPY, P.Frame.CANCEL, P.Frame.ERROR)
        while True:
            header = self.read_header("waiting for the next frame")
            P.expect(header, before_state if state is None else after_state, "pre-copy" if state is None else "the switchover")
            if header.type is P.Frame.PAGES:
                runs = store.receive(header, cursor, self.conn)
                round_runs.append(runs)
                cursor = int(runs[-1, 0] + runs[-1, 1])
            elif header.type is P.Frame.ROUND_END:
                self.acknowledge(header, rnd, round_runs, store)
                rnd += 1
                round_runs = []
                cursor = 0
            elif header.type is P.Frame.STATE:
                state = self.receive_state(header, hello)
            elif header.type is P.Frame.COMPLETE:
                assert state is not None
                return self.commit(header, rnd, state, hello, store, round_runs)
            elif header.type is P.Frame.POSTCOPY:
                assert state is not None
                return self.switch(header, rnd, state, hello, store)
            elif header.type is P.Frame.CANCEL:
                reason = P.decode_cancel(self.read_body(header, P.MAX_CONTROL_BODY, "reading CANCEL"))
                raise MigrationCancelled(f"the source cancelled the migration: {reason}")
            else:  # ERROR
                code, message = P.decode_error(self.read_body(header, P.MAX_CONTROL_BODY, "reading ERROR"))
                raise error_from_peer(code, message, "the source")

    def acknowledge(self, header: P.Header, rnd: int, round_runs: list[U64], store: PageStore) -> None:
        """ROUND_END ``rnd``: ACK the hashes of every page stored in the round, on any stream (rule 1)."""
        if header.length != 0 or header.count != rnd:
            raise ProtocolError(f"ROUND_END for round {header.count} (length {header.length}) in round {rnd}")
        if self.streams is not None:
            round_runs = round_runs + self.streams.wait_round(rnd)
        done = np.concatenate(round_runs) if round_runs else np.empty((0, 2), dtype=np.uint64)
        if self.streams is not None and len(done):
            # acknowledged in page order; the streams' parts of a round must not overlap
            done = done[np.argsort(done[:, 0], kind="stable")]
            P.validate_runs(done, store.region.npages)
        hashes = np.ascontiguousarray(store.table[runs_to_pages(done)], dtype="<u8")
        self.conn.send_all(
            P.encode_header(P.Frame.ACK, count=rnd, length=hashes.nbytes) + hashes.tobytes(), "sending ACK"
        )
        self.stats.synced(len(hashes), self.stats.remaining_bytes)

    def receive_state(self, header: P.Header, hello: P.Hello) -> bytes:
        limit = self.opts.max_state_bytes
        if hello.state_size != P.UNKNOWN_SIZE:
            limit = min(limit, hello.state_size)
        if header.count != 0:
            raise ProtocolError("STATE frame with a non-zero count")
        if header.length > limit:
            raise ProtocolError(f"state blob of {header.length} bytes is larger than the agreed {limit}")
        state = bytes(self.conn.recv_exact(header.length, "receiving the state"))
        self.stats.update(state_bytes=len(state))
        return state

    def commit(
        self, header: P.Header, rnd: int, state: bytes, hello: P.Hello, store: PageStore, final: list[U64]
    ) -> Received:
        """COMPLETE: every page arrived; commit only if the whole table matches the source's (rule 2)."""
        body = self.read_body(header, P.COMPLETE_SIZE, "reading COMPLETE", exact=P.COMPLETE_SIZE)
        final = final + self.join_streams(rnd)
        check_binding(body[P.DIGEST_SIZE :], hello, state)
        store.verify(body[: P.DIGEST_SIZE])
        # the pass of the pause is a round to the source too (its last dirty-page synchronisation)
        self.stats.synced(sum(int(runs[:, 1].sum()) for runs in final), 0)
        self.conn.send_all(P.encode_header(P.Frame.DONE), "sending DONE")
        self.conn.close()
        self.stats.completed()
        log.info("destination: migration %s committed", self.stats.migration_id)
        return Received(store.region, state, self.stats, hello.mode)

    def switch(self, header: P.Header, rnd: int, state: bytes, hello: P.Hello, store: PageStore) -> Received:
        """POSTCOPY: the program resumes here now; the owed pages follow (``_received``)."""
        if not hello.features & P.FEATURE_POSTCOPY:
            raise ProtocolError(f"POSTCOPY switchover in a {hello.mode} migration that did not ask for post-copy")
        npages = store.region.npages
        words = (npages + 63) // 64
        if header.count not in (0, words):  # 0: no bitmap, every page is owed
            raise ProtocolError(f"POSTCOPY bitmap of {header.count} words, expected {words} (or none)")
        size = 2 * P.DIGEST_SIZE + 8 * header.count
        body = self.read_body(header, size, "reading POSTCOPY", exact=size)
        digest, binding, owed = PW.decode_postcopy(body, npages, out=self.owed)
        self.join_streams(rnd)
        check_binding(binding, hello, state)  # before the switch: the program must not start on a changed state
        # a source in this process would stall behind a thread that faults holding the GIL: no userfaultfd then
        receiver = start_postcopy(store, owed, self.conn, digest, transparent=not _local.is_source(hello.migration_id))
        receiver.hello = hello
        self.stats.synced(receiver.count, receiver.count * store.region.page_size)  # the owed pages: the last round
        return Received(store.region, state, self.stats, hello.mode, postcopy=receiver)

    def join_streams(self, rnd: int) -> list[U64]:
        """Before the commit or the switch: every stream delivered the final pass (round ``rnd``) and ended.

        Returns the runs the streams stored in that pass.
        """
        if self.streams is None:
            return []
        runs = self.streams.wait_round(rnd)
        self.streams.wait_end()
        self.streams.close()
        self.streams = None
        return runs


def check_binding(binding: bytes, hello: P.Hello, state: bytes) -> None:
    """Rule 2 for what is not pages: the HELLO this side acted on and the state it holds are the source's."""
    if binding != P.binding_digest(hello, state):
        raise VerificationError(
            "the state or the migration's description (sizes, mode, compat, id) differ from the source's: "
            "nothing committed"
        )


def refuse(conn: Connection, field: str, reason: str) -> CompatibilityError:
    """REFUSE ``field`` to the peer (then close), and the error this side raises."""
    conn.abort_soon(P.encode_refuse(field, reason))
    return CompatibilityError(f"refused the source's migration ({field}): {reason}", field=field)


def recover_reception(
    conn: Connection,
    header: P.Header,
    body: bytes,
    find: Callable[[bytes], PostcopyReceiver | None],
    opts: DestinationOptions,
) -> None:
    """A recovering source's RECOVER (already authenticated): hand its connection to the paused reception.

    It must name a reception of this listener that is still waiting for its
    pages, with the same compat string, page size and region size; anything
    else is refused and changes nothing.
    """
    try:
        if header.count:
            raise ProtocolError(f"RECOVER frame with count {header.count}")
        hello = P.decode_hello(body)
    except MigrationError as exc:
        frame = error_frame_for(exc)
        if frame is not None:
            conn.abort_soon(frame)
        else:
            conn.close()
        raise
    mid = hello.migration_id.hex()
    receiver = find(hello.migration_id)
    original = None if receiver is None else receiver.hello
    if receiver is None or original is None:
        raise refuse(conn, "migration_id", f"no post-copy migration {mid} waits to recover here")
    for field, got, want in (
        ("version", hello.version, original.version),
        ("compat", hello.compat, original.compat),
        ("compat", hello.compat, opts.compat),
        ("page_size", hello.page_size, original.page_size),
        ("nbytes", hello.nbytes, original.nbytes),
    ):
        if got != want:
            raise refuse(conn, field, f"the recovering source's {field} {got!r} differs from migration {mid}'s {want!r}")
    try:
        receiver.resume(conn)
    except CompatibilityError as exc:
        raise refuse(conn, exc.field or "migration_id", str(exc)) from exc
    log.info("destination: source reconnected to recover migration %s", mid)
