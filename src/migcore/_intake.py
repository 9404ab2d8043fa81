"""Every connection a listener accepts: TLS, authentication and its first frame, then to whom it goes.

A listener hands connections to the program's :meth:`Listener.receive` calls
(HELLO), to the migration they serve (STREAM, its extra connections) and to
a paused post-copy reception (RECOVER, although nobody calls ``receive()``).
A background thread accepts every connection and runs its TLS, its
authentication and the read of its first frame on a thread of its own, under
a deadline per read (``OPEN_TIMEOUT``) and one for the whole opening
(``OPEN_DEADLINE``, so a peer that drips a byte at a time is cut off too):
an idle, slow or garbage connection
holds only its own thread, never the next source. An opened connection goes
to the handler of its first frame, or to the queue the next ``receive()``
takes from (failures are queued too, so ``receive()`` raises them).
"""

from __future__ import annotations

import logging
import queue
import socket
import ssl
import threading
import time
from collections.abc import Callable

from migcore import _protocol as P
from migcore._errors import MigrationTimeout, PeerLostError
from migcore._security import authenticate_destination
from migcore._transport import Connection, Server, secure_server

log = logging.getLogger("migcore")

#: A connection past its authentication, with the header and the body of its first frame.
Opened = tuple[Connection, P.Header, bytes]
#: Seconds a connection may stay silent during its TLS, its authentication and its first frame.
OPEN_TIMEOUT = 10.0
#: Seconds the whole opening may take, however the peer spreads its bytes (one a second would pass
#: any per-read bound); an honest opening takes a few round trips.
OPEN_DEADLINE = 20.0
#: Connections (or their failures) queued ahead of ``receive()`` calls.
QUEUE_DEPTH = 32
#: Connections being opened at once (a bound on the threads idle peers can hold).
MAX_OPENING = 256
#: The first frames a connection may start with; their bodies are read here.
FIRST_FRAMES = (P.Frame.HELLO, P.Frame.STREAM, P.Frame.RECOVER)


class Intake:
    """Opens the connections of one :class:`Server`: inline for the caller, or from a background thread."""

    def __init__(self, server: Server, tls: ssl.SSLContext | None, token: bytes | None, timeout: float | None) -> None:
        self.server = server
        self.tls = tls
        self.token = token
        #: the listener's default wait for a peer, once a connection is open
        self.timeout = timeout
        self.handlers: dict[P.Frame, Callable[[Connection, P.Header, bytes], None]] = {}
        #: opened connections and failed openings, with the time each one came
        self.queue: queue.Queue[tuple[float, Opened | BaseException]] = queue.Queue(QUEUE_DEPTH)
        self.opening = threading.BoundedSemaphore(MAX_OPENING)
        self.closed = False
        self.thread = threading.Thread(target=self._accept_all, name="migcore-listener", daemon=True)
        self.thread.start()

    def open(self, conn: Connection) -> Opened:
        """TLS (when configured), authentication, and the first frame of an accepted connection.

        Each read waits at most ``OPEN_TIMEOUT``; past ``OPEN_DEADLINE`` in
        all, a timer shuts the socket down under whatever read is waiting
        (the socket itself, so it works under TLS too) and the opening fails
        with :class:`MigrationTimeout`.
        """
        conn.timeout = OPEN_TIMEOUT if self.timeout is None else min(self.timeout, OPEN_TIMEOUT)
        expired = threading.Event()
        raw = conn.sock

        def expire() -> None:
            expired.set()
            try:
                raw.shutdown(socket.SHUT_RDWR)
            except OSError:  # already closed
                pass

        timer = threading.Timer(OPEN_DEADLINE, expire)
        timer.daemon = True
        timer.start()
        try:
            if self.tls is not None:
                conn = secure_server(conn, self.tls, conn.timeout)
            header = authenticate_destination(conn, self.token)
            if header is None:
                header = P.decode_header(conn.recv_exact(P.HEADER_SIZE, "waiting for the source's first frame"))
            body = b""
            if header.type in FIRST_FRAMES:
                body = bytes(conn.recv_exact(P.check_length(header, P.MAX_CONTROL_BODY), f"reading {header.type.name}"))
        except BaseException as exc:
            timer.cancel()
            conn.close()
            if expired.is_set():
                raise MigrationTimeout(f"a connection took over {OPEN_DEADLINE:g} s to open; dropped") from exc
            raise
        timer.cancel()
        if expired.is_set():  # it fired as the last byte came: the socket is shut down
            conn.close()
            raise MigrationTimeout(f"a connection took over {OPEN_DEADLINE:g} s to open; dropped")
        conn.timeout = self.timeout
        return conn, header, body

    def next(self, timeout: float | None) -> Opened:
        """The next connection for the program (HELLO) or its migration (STREAM), waiting ``timeout``.

        A connection that failed to open raises here, from the call that was
        waiting when it failed; a failure nobody was waiting for is dropped.
        """
        started = time.monotonic()
        deadline = None if timeout is None else started + timeout
        while True:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            try:
                when, item = self.queue.get(timeout=left)
            except queue.Empty:
                raise MigrationTimeout(f"no source connected within {timeout:g} s") from None
            if isinstance(item, BaseException):
                if when < started:
                    log.debug("destination: dropped a failed connection nobody waited for: %r", item)
                    continue
                raise item
            item[0].timeout = timeout
            return item

    def route(self, frame: P.Frame, handler: Callable[[Connection, P.Header, bytes], None]) -> None:
        """From now on, connections opening with ``frame`` go to ``handler`` (on their own thread)."""
        self.handlers[frame] = handler

    def _accept_all(self) -> None:
        while not self.closed:
            if not self.opening.acquire(timeout=0.5):
                continue
            try:
                conn = self.server.accept(0.5)
            except MigrationTimeout:
                self.opening.release()
                continue
            except PeerLostError:  # the listener closed
                self.opening.release()
                return
            except OSError as exc:
                self.opening.release()
                log.warning("destination: accept failed: %s", exc)
                continue
            threading.Thread(target=self._dispatch, args=(conn,), name="migcore-intake", daemon=True).start()

    def _dispatch(self, conn: Connection) -> None:
        try:
            opened = self.open(conn)
        except BaseException as exc:  # noqa: BLE001 - the program's next receive() raises it
            self._queue(exc)
            return
        finally:
            self.opening.release()
        handler = self.handlers.get(opened[1].type)
        if handler is None:
            self._queue(opened)
            return
        try:
            handler(*opened)
        except BaseException as exc:  # noqa: BLE001 - the peer was told (or sees the close); this side logs it
            opened[0].close()
            log.warning("destination: %s connection refused: %s", opened[1].type.name, exc)

    def _queue(self, item: Opened | BaseException) -> None:
        try:
            self.queue.put_nowait((time.monotonic(), item))
        except queue.Full:
            if not isinstance(item, BaseException):
                item[0].close()
            log.warning("destination: dropped a connection nobody received (queue full)")

    def close(self) -> None:
        """Stop accepting (the thread ends at its next look at the closed server) and drop what is queued."""
        self.closed = True
        while True:
            try:
                _, item = self.queue.get_nowait()
            except queue.Empty:
                return
            if not isinstance(item, BaseException):
                item[0].close()
