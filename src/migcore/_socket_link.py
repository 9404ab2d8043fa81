"""The source's link to a listening destination: frames on one connection, page batches on extra streams.

It speaks the wire protocol of ``_protocol`` (HELLO/ACCEPT, PAGES, ROUND_END
and ACK, STATE, COMPLETE/DONE, POSTCOPY/SWITCHED, DEMAND, END), sends raw
pages straight from the region with the GIL released, encodes batches when
the migration agreed on a codec or deltas (``_batch``), holds traffic to the
bandwidth limits, and hands batches to the extra streams when there are any.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import numpy as np

from migcore import _postcopy_wire as PW
from migcore import _protocol as P
from migcore._bandwidth import TokenBucket
from migcore._batch import BatchEncoder
from migcore._errors import MigrationCancelled, MigrationError, MigrationTimeout, PeerLostError, ProtocolError
from migcore._peer_errors import error_from_peer
from migcore._region import Region, U64
from migcore._security import authenticate_source
from migcore._source_link import SourceLink
from migcore._stats import StatsRecorder
from migcore._streams import StreamSenders, open_streams
from migcore._transport import Connection

log = logging.getLogger("migcore")

#: Largest page payload the source puts in one PAGES frame (pre-copy, stop-and-copy).
BATCH_BYTES = 8 << 20
#: Smaller batches after a post-copy switch, so a demand waits behind less background data.
POSTCOPY_BATCH_BYTES = 256 << 10
#: Send buffer of the page connection after a post-copy switch: background pages queued in the
#: kernel cannot be overtaken by a demanded one, so keep only a few batches in flight.
POSTCOPY_SNDBUF = 2 * POSTCOPY_BATCH_BYTES
#: Most runs the source puts in one frame.
BATCH_RUNS = 256


class SocketLink(SourceLink):
    """One migration over ``conn``, plus ``streams`` extra connections from ``connect`` when ``streams > 1``."""

    def __init__(
        self,
        region: Region,
        conn: Connection,
        stats: StatsRecorder,
        *,
        encoder: BatchEncoder | None = None,
        token: bytes | None = None,
        streams: int = 1,
        connect: Callable[[], Connection] | None = None,
        bandwidth_limit: float | None = None,
        postcopy_bandwidth_limit: float | None = None,
        progress: Callable[[], None] | None = None,
    ) -> None:
        self.region = region
        self.conn = conn
        self.stats = stats
        self.encoder = encoder
        self.token = token
        self.streams = streams
        self.connect = connect
        self.bucket = TokenBucket(bandwidth_limit) if bandwidth_limit else None
        self.postcopy_bucket = TokenBucket(postcopy_bandwidth_limit) if postcopy_bandwidth_limit else None
        self.progress = progress
        self.accept: P.Accept | None = None
        self.hello: P.Hello | None = None
        #: the binding digest (HELLO and state) that COMPLETE or POSTCOPY carries
        self.binding = bytes(P.DIGEST_SIZE)
        self.senders: StreamSenders | None = None

    # -- frames --------------------------------------------------------------

    def read_header(self, what: str) -> P.Header:
        return P.decode_header(self.conn.recv_exact(P.HEADER_SIZE, what))

    def read_body(self, header: P.Header, limit: int, what: str, *, exact: int | None = None) -> bytes:
        return bytes(self.conn.recv_exact(P.check_length(header, limit, exact=exact), what))

    def peer_error(self, header: P.Header) -> MigrationError:
        code, message = P.decode_error(self.read_body(header, P.MAX_CONTROL_BODY, "reading ERROR"))
        return error_from_peer(code, message, "the destination")

    def expect_reply(self, allowed: tuple[P.Frame, ...], what: str) -> P.Header:
        """Read the destination's next frame; turn ERROR into the matching exception."""
        header = self.read_header(what)
        if header.type is P.Frame.ERROR:
            raise self.peer_error(header)
        P.expect(header, allowed, what)
        return header

    def send_frame(self, data: bytes, what: str) -> None:
        self.conn.send_all(data, what)
        self.stats.add_wire(len(data))

    # -- the handshake ---------------------------------------------------------

    def ask(self, frame: bytes, answer: P.Frame, what: str) -> P.Header:
        """Authenticate (before anything else, inside TLS if any), send the opening ``frame``, read the answer.

        REFUSE and ERROR become the matching exceptions; any other frame than
        ``answer`` is a protocol error.
        """
        if self.token is not None:
            authenticate_source(self.conn, self.token)
        self.send_frame(frame, f"sending {what}")
        header = self.read_header(f"waiting for {answer.name}")
        if header.type is P.Frame.REFUSE:
            raise P.decode_refuse(self.read_body(header, P.MAX_CONTROL_BODY, "reading REFUSE"))
        if header.type is P.Frame.ERROR:
            raise self.peer_error(header)
        P.expect(header, (answer,), f"the answer to {what}")
        return header

    def open(self, hello: P.Hello) -> P.Accept:
        self.hello = hello
        header = self.ask(P.encode_hello(hello), P.Frame.ACCEPT, "HELLO")
        accept = P.decode_accept(self.read_body(header, P.MAX_CONTROL_BODY, "reading ACCEPT"))
        if accept.features & hello.features != hello.features:
            raise ProtocolError("the destination accepted without the features this migration needs")
        self.accept = accept
        if self.streams > 1:
            assert self.connect is not None
            self.senders = open_streams(
                self.connect,
                self.streams,
                token=self.token,
                migration_id=hello.migration_id,
                send=lambda runs, phase, conn: self._send_batch(runs, phase, conn=conn),
                wake=self.conn.close,
            )
        return accept

    def recover(self, hello: P.Hello) -> U64:
        header = self.ask(PW.encode_recover(hello), P.Frame.RECOVERED, "RECOVER")
        words = (self.region.npages + 63) // 64
        body = self.read_body(header, P.ACCEPT_SIZE + 8 * words, "reading RECOVERED")
        self.accept, owed = PW.decode_recovered(header, body, self.region.npages)
        return owed

    def batch_cap(self, *, postcopy: bool = False) -> int:
        """Room for an encoded batch's overhead, the agreed payload and the bucket's size."""
        assert self.accept is not None
        ps = self.region.page_size
        cap = min(POSTCOPY_BATCH_BYTES if postcopy else BATCH_BYTES, self.accept.max_payload)
        if self.encoder is not None:
            cap = cap // 2  # a delta batch adds 4 bytes a page, a compressed one its size prefix
        bucket = self.postcopy_bucket if postcopy else self.bucket
        if bucket is not None:
            cap = min(cap, bucket.max_batch(ps))
        return max(ps, cap)

    @property
    def max_runs(self) -> int:
        assert self.accept is not None
        return max(1, min(BATCH_RUNS, self.accept.max_runs))

    # -- pages -------------------------------------------------------------------

    def send(self, runs: U64, phase: str) -> None:
        if self.senders is not None:
            self.senders.submit(runs, phase)
        else:
            self._send_batch(runs, phase)

    def _send_batch(
        self, runs: U64, phase: str, *, flags: int = 0, conn: Connection | None = None, bucket: TokenBucket | None | bool = True
    ) -> None:
        """One PAGES frame, straight from the region (or encoded).

        ``conn`` is an extra stream's connection (its thread never calls the
        progress callback); ``bucket=True`` means the pre-copy bandwidth limit.
        """
        region = self.region
        main = conn is None
        conn = self.conn if conn is None else conn
        limit = self.bucket if bucket is True else bucket or None
        payload = P.runs_payload(runs, region.page_size, region.nbytes)
        what = f"sending pages ({phase})"
        between = self.progress if main else None
        if self.encoder is None or flags & P.FLAG_POSTCOPY:
            header = P.encode_runs_header(P.Frame.PAGES, runs, payload, flags=flags)
            wire = len(header) + payload
            self._hold_back(limit, wire)
            conn.send_pages(region.view, region.page_size, runs, header, wire, what, between=between)
        else:
            body, flags = self.encoder.encode(runs, payload, flags)
            header = P.encode_runs_header(P.Frame.PAGES, runs, len(body), flags=flags)
            wire = len(header) + len(body)
            self._hold_back(limit, wire)
            conn.send_all(header, what)
            conn.send_all(body, what)
        self.stats.add_pages(int(runs[:, 1].sum()), payload, wire, postcopy=bool(flags & P.FLAG_POSTCOPY), settle=True)
        if between is not None:
            between()

    def _hold_back(self, bucket: TokenBucket | None, nbytes: int) -> None:
        if bucket is not None:
            waited = bucket.take(nbytes)
            if waited:
                self.stats.add(bandwidth_wait=waited)

    def end_round(self, rnd: int, runs: U64, npg: int) -> U64:
        if self.senders is not None:
            self.senders.end_round(rnd)
        self.send_frame(P.encode_header(P.Frame.ROUND_END, count=rnd), "sending ROUND_END")
        header = self.expect_reply((P.Frame.ACK,), f"waiting for the ACK of round {rnd}")
        if header.count != rnd:
            raise ProtocolError(f"ACK for round {header.count} while waiting for round {rnd}")
        body = self.read_body(header, 8 * npg, "reading ACK", exact=8 * npg)
        return np.frombuffer(body, dtype="<u8").astype(np.uint64)

    def stored(self, runs: U64, hashes: U64) -> None:
        if self.encoder is not None:
            self.encoder.stored(runs, hashes)

    # -- the switchover ------------------------------------------------------------

    def end_pages(self, rnd: int, runs: U64) -> None:
        if self.senders is not None:
            # every stream marks the end of the final pass (empty in post-copy), then closes its part
            self.senders.end_round(rnd)
            self.senders.finish()

    def send_state(self, state: bytes) -> None:
        assert self.hello is not None
        self.binding = P.binding_digest(self.hello, state)
        self.send_frame(P.encode_header(P.Frame.STATE, length=len(state)) + state, "sending the state")

    def commit(self, digest: bytes) -> None:
        self.send_frame(P.encode_complete(digest, self.binding), "sending COMPLETE")

    def confirm_commit(self) -> None:
        self.expect_reply((P.Frame.DONE,), "waiting for the destination to commit")

    def switch(self, digest: bytes, owed: U64 | None) -> None:
        self.send_frame(PW.encode_postcopy(digest, owed, self.binding), "sending POSTCOPY")

    def confirm_switch(self) -> None:
        self.expect_reply((P.Frame.SWITCHED,), "waiting for the destination to switch to post-copy")

    # -- post-copy -------------------------------------------------------------------

    def begin_postcopy(self) -> None:
        # demand latency: bound what the kernel holds ahead of a demanded page (the destination bounds its side)
        self.conn.bound_queue(send=POSTCOPY_SNDBUF)

    def read_demand(self) -> U64 | None:
        header = self.read_header("waiting for post-copy demands")
        if header.type is P.Frame.ERROR:
            raise self.peer_error(header)
        P.expect(header, (P.Frame.DEMAND, P.Frame.DONE), "post-copy")
        if header.type is P.Frame.DONE:
            return None
        if not 0 < header.count <= P.MAX_RUNS:
            raise ProtocolError(f"DEMAND with {header.count} runs")
        table = self.read_body(header, P.MAX_RUNS * P.RUN_SIZE, "reading DEMAND", exact=header.count * P.RUN_SIZE)
        runs = P.decode_runs(table, header.count)
        P.validate_runs(runs, self.region.npages)
        self.stats.add(postcopy_requests=1)
        return runs

    def send_postcopy(self, runs: U64, *, demanded: bool) -> None:
        # post-copy pages go raw: demand latency first, and the userfaultfd receiver writes them straight in;
        # demand pages are never held back, the background push obeys postcopy_bandwidth_limit
        self._send_batch(runs, "post-copy", flags=P.FLAG_POSTCOPY, bucket=None if demanded else self.postcopy_bucket)

    def send_zero_notice(self, runs: U64) -> None:
        step = self.max_runs
        for i in range(0, len(runs), step):
            part = runs[i : i + step]
            header = P.encode_runs_header(P.Frame.PAGES, part, 0, flags=P.FLAG_POSTCOPY | P.FLAG_ZERO)
            self.send_frame(header, "sending a zero notice (post-copy)")
        payload = P.runs_payload(runs, self.region.page_size, self.region.nbytes)
        self.stats.add_zero_pages(int(runs[:, 1].sum()), payload, settle=True)

    def end_postcopy(self, digest: bytes | None) -> None:
        body = b"" if digest is None else digest
        self.send_frame(P.encode_header(P.Frame.END, length=len(body)) + body, "sending END")

    # -- the end -----------------------------------------------------------------------

    def fail(self, exc: BaseException, *, switched: bool) -> None:
        if self.conn.closed:
            return
        if switched or isinstance(exc, (PeerLostError, MigrationTimeout)):
            self.conn.close()
        elif isinstance(exc, MigrationCancelled):
            self.conn.abort_soon(P.encode_cancel(str(exc)))
        elif isinstance(exc, ProtocolError):
            self.conn.abort_soon(P.encode_error(P.ErrorCode.PROTOCOL, str(exc)))
        else:
            self.conn.abort_soon(P.encode_error(P.ErrorCode.INTERNAL, f"source failed: {exc}"))

    def close(self) -> None:
        if self.senders is not None:
            self.senders.close()
        self.conn.close()

    def cause(self, exc: BaseException) -> BaseException:
        # a stream thread's failure is the real cause of the main connection closing under us
        return self.senders.cause(exc) if self.senders is not None else exc
