"""Parallel page streams (QEMU's multifd): extra connections that carry the page batches.

With ``streams=N`` (N > 1) the source opens N connections besides the main
one; each authenticates like the main one, then announces itself with
``STREAM i`` + the migration id and waits for the destination's echo. Page
batches go round-robin to one sending thread per stream (the fast path sends
with the GIL released); the main connection keeps the control frames and the
state. Each stream ends its part of every round (and of the final pass) with
its own ``ROUND_END n``; the destination's main thread answers the main
``ROUND_END n`` only once every stream's marker for ``n`` has arrived, so the
ACK still covers all the pages of the round. A round's runs are partitioned
among the streams, so no two of them write the same page in one round (the
destination checks it), and the result is exact whatever order they land in.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable

from migcore import _protocol as P
from migcore._peer_errors import error_from_peer
from migcore._errors import MigrationTimeout, PeerLostError, ProtocolError
from migcore._region import U64
from migcore._security import authenticate_source
from migcore._transport import Connection

log = logging.getLogger("migcore")


#: Sends one batch of runs on the given connection (the source engine's send, with its encoding and stats).
SendOn = Callable[[U64, str, Connection], object]
#: Validates and stores one PAGES frame that arrived on the given connection after page ``after``.
ReceiveOn = Callable[[P.Header, int, Connection], U64]

_END = "end"
#: Batches queued per stream ahead of its thread.
QUEUE_DEPTH = 2


def _reply(conn: Connection, what: str) -> tuple[P.Header, bytes]:
    header = P.decode_header(conn.recv_exact(P.HEADER_SIZE, what))
    return header, bytes(conn.recv_exact(P.check_length(header, P.MAX_CONTROL_BODY), what))


def open_streams(
    connect: Callable[[], Connection],
    n: int,
    *,
    token: bytes | None,
    migration_id: bytes,
    send: SendOn,
    wake: Callable[[], None],
) -> StreamSenders:
    """Open, authenticate and announce ``n`` extra connections, then start their sending threads.

    ``send`` puts one batch on a stream's connection; ``wake`` unblocks the
    main thread (it closes the main connection) when a stream fails.
    """
    conns: list[Connection] = []
    try:
        for i in range(n):
            conn = connect()
            conns.append(conn)
            if token is not None:
                authenticate_source(conn, token)
            conn.send_all(P.encode_stream(i, migration_id), "sending STREAM")
            header, body = _reply(conn, f"waiting for the echo of stream {i}")
            if header.type is P.Frame.ERROR:
                code, message = P.decode_error(body)
                raise error_from_peer(code, message, "the destination")
            if header.type is not P.Frame.STREAM or header.count != i or body != migration_id:
                raise ProtocolError(f"the destination answered stream {i} with {header.name} {header.count}")
    except BaseException:
        for conn in conns:
            conn.close()
        raise
    log.debug("source: %d page streams open", n)
    return StreamSenders(conns, send, wake)


class StreamSenders:
    """One thread per extra connection, each sending the batches queued for it."""

    def __init__(self, conns: list[Connection], send: SendOn, wake: Callable[[], None]) -> None:
        self.send = send
        self.wake = wake
        self.conns = conns
        self.queues: list[queue.Queue[tuple[U64, str] | int | str]] = [queue.Queue(QUEUE_DEPTH) for _ in conns]
        self.errors: list[BaseException] = []
        self.stop = threading.Event()
        self.turn = 0
        self.closed = False
        self.threads = [
            threading.Thread(target=self._run, args=(i,), name=f"migcore-stream-{i}", daemon=True)
            for i in range(len(conns))
        ]
        for t in self.threads:
            t.start()

    def _run(self, i: int) -> None:
        conn, q = self.conns[i], self.queues[i]
        try:
            while not self.stop.is_set():
                try:
                    item = q.get(timeout=0.1)
                except queue.Empty:
                    continue
                if isinstance(item, tuple):
                    runs, phase = item
                    self.send(runs, phase, conn)
                elif isinstance(item, int):
                    conn.send_all(P.encode_header(P.Frame.ROUND_END, count=item), "sending a stream's ROUND_END")
                else:
                    conn.send_all(P.encode_header(P.Frame.END), "ending a stream")
                    return
        except BaseException as exc:  # noqa: BLE001 - handed to the main thread
            if not self.stop.is_set():
                self.errors.append(exc)
                log.debug("source: stream %d failed: %r", i, exc)
                self.wake()  # the main thread may be waiting on its own connection

    def _put(self, i: int, item: tuple[U64, str] | int | str) -> None:
        while True:
            if self.errors:
                raise self.errors[0]
            if not self.threads[i].is_alive():
                raise PeerLostError(f"page stream {i} stopped")
            try:
                self.queues[i].put(item, timeout=0.1)
                return
            except queue.Full:
                continue

    def submit(self, runs: U64, phase: str) -> None:
        i = self.turn
        self.turn = (i + 1) % len(self.conns)
        self._put(i, (runs, phase))

    def end_round(self, rnd: int) -> None:
        for i in range(len(self.conns)):
            self._put(i, rnd)

    def finish(self) -> None:
        """End every stream and wait until each has sent everything queued."""
        for i in range(len(self.conns)):
            self._put(i, _END)
        for t in self.threads:
            t.join()
        if self.errors:
            raise self.errors[0]
        for conn in self.conns:
            conn.close()

    def close(self) -> None:
        """Stop the threads and close the streams."""
        if not self.closed:
            self.closed = True
            self.stop.set()
            for conn in self.conns:
                conn.close()
            for t in self.threads:
                t.join()

    def cause(self, exc: BaseException) -> BaseException:
        """The failure to report: a stream's, when it is why the main connection broke."""
        self.close()
        if self.errors and isinstance(exc, (PeerLostError, MigrationTimeout)):
            return self.errors[0]
        return exc


def accept_streams(
    accept: Callable[[], tuple[Connection, P.Header, bytes]],
    hello: P.Hello,
    *,
    receive: ReceiveOn,
    wake: Callable[[], None],
) -> StreamReceivers:
    """Accept and check the source's ``hello.streams`` extra connections.

    ``accept`` returns an authenticated connection and its first frame;
    ``receive`` stores one PAGES frame from a stream; ``wake`` unblocks the
    main thread (it closes the main connection) when a stream fails.
    """
    n = hello.streams
    conns: dict[int, Connection] = {}
    try:
        while len(conns) < n:
            conn, header, mid = accept()
            try:
                if header.type is not P.Frame.STREAM or len(mid) != len(hello.migration_id):
                    raise ProtocolError(f"expected STREAM on an extra connection, got {header.name}")
                if mid != hello.migration_id:
                    raise ProtocolError("an extra connection belongs to another migration")
                if not 0 <= header.count < n or header.count in conns:
                    raise ProtocolError(f"stream index {header.count} is out of range or repeated")
                conn.send_all(P.encode_stream(header.count, mid), "echoing STREAM")
            except ProtocolError as exc:
                conn.abort_soon(P.encode_error(P.ErrorCode.PROTOCOL, str(exc)))
                raise
            except BaseException:
                conn.close()
                raise
            conns[header.count] = conn
    except BaseException:
        for conn in conns.values():
            conn.close()
        raise
    return StreamReceivers([conns[i] for i in range(n)], receive, wake)


class StreamReceivers:
    """One thread per extra connection, each receiving its batches straight into the region."""

    def __init__(self, conns: list[Connection], receive: ReceiveOn, wake: Callable[[], None]) -> None:
        self.receive = receive
        self.wake = wake
        self.conns = conns
        self.cond = threading.Condition()
        self.marks = [0] * len(conns)
        self.ended = [False] * len(conns)
        self.rounds: dict[int, list[U64]] = {}
        self.error: BaseException | None = None
        self.threads = [
            threading.Thread(target=self._run, args=(i,), name=f"migcore-stream-rx-{i}", daemon=True)
            for i in range(len(conns))
        ]

    def start(self) -> None:
        """Start receiving; called once the region exists."""
        for t in self.threads:
            t.start()

    def _run(self, i: int) -> None:
        conn = self.conns[i]
        cursor = 0
        rnd = 0
        try:
            while True:
                header = P.decode_header(conn.recv_exact(P.HEADER_SIZE, f"waiting on page stream {i}"))
                P.expect(header, (P.Frame.PAGES, P.Frame.ROUND_END, P.Frame.END, P.Frame.ERROR), f"page stream {i}")
                if header.type is P.Frame.PAGES:
                    runs = self.receive(header, cursor, conn)
                    cursor = int(runs[-1, 0] + runs[-1, 1])
                    with self.cond:
                        self.rounds.setdefault(rnd, []).append(runs)
                elif header.type is P.Frame.ROUND_END:
                    if header.count != rnd or header.length:
                        raise ProtocolError(f"stream {i} ended round {header.count} while in round {rnd}")
                    rnd += 1
                    cursor = 0
                    with self.cond:
                        self.marks[i] = rnd
                        self.cond.notify_all()
                elif header.type is P.Frame.END:
                    if header.length or header.count:
                        raise ProtocolError("END frame with a body")
                    with self.cond:
                        self.ended[i] = True
                        self.cond.notify_all()
                    return
                else:
                    body = bytes(conn.recv_exact(P.check_length(header, P.MAX_CONTROL_BODY), "reading ERROR"))
                    code, message = P.decode_error(body)
                    raise error_from_peer(code, message, "the source")
        except BaseException as exc:  # noqa: BLE001 - handed to the main thread
            with self.cond:
                if self.error is None:
                    self.error = exc
                self.cond.notify_all()
            self.wake()  # the main thread may be waiting on its own connection

    def _wait(self, ready: Callable[[], bool], what: str) -> None:
        """Until ``ready()``, a stream's failure, or the connections' timeout (no wait here is unbounded)."""
        timeout = self.conns[0].timeout if self.conns else None
        with self.cond:
            done = self.cond.wait_for(lambda: self.error is not None or ready(), timeout)
            if self.error is not None:
                raise self.error
            if not done:
                raise MigrationTimeout(f"the page streams sent nothing for {timeout:g} s while {what}")

    def wait_round(self, rnd: int) -> list[U64]:
        """Block until every stream ended round ``rnd``; return the runs they stored in it."""

        def ready() -> bool:
            for i, mark in enumerate(self.marks):
                if mark <= rnd and self.ended[i]:
                    raise ProtocolError(f"page stream {i} ended before its marker of round {rnd}")
            return all(m > rnd for m in self.marks)

        self._wait(ready, f"waiting for the end of round {rnd}")
        with self.cond:
            return self.rounds.pop(rnd, [])

    def wait_end(self) -> None:
        self._wait(lambda: all(self.ended), "waiting for the streams to end")

    def close(self) -> None:
        """Close the streams and join their threads."""
        for conn in self.conns:
            conn.close()
        for t in self.threads:
            if t.ident is not None:
                t.join()

    def cause(self, exc: BaseException) -> BaseException:
        """The failure to report: a stream's, when it is why the main connection broke."""
        self.close()
        if self.error is not None and isinstance(exc, (PeerLostError, MigrationTimeout)):
            return self.error
        return exc

