"""Every connection a listener accepts: TLS, authentication and its first frame, then to whom it goes.

A listener hands connections to the program's :meth:`Listener.receive` calls
(HELLO) and to the migration they serve (STREAM, its extra connections). Once
a post-copy reception may need recovering, connections that open with
RECOVER must reach it although nobody calls ``receive()``: from then on a
background thread accepts every connection, runs its TLS and authentication
on a thread of its own, and either hands it to the RECOVER handler or queues
it for the next ``receive()`` (failures to authenticate are queued too, so
``receive()`` raises them as it would have without the thread).
"""

from __future__ import annotations

import logging
import queue
import ssl
import threading
from collections.abc import Callable

from migcore import _protocol as P
from migcore._errors import MigrationTimeout, PeerLostError
from migcore._security import authenticate_destination
from migcore._transport import Connection, Server, secure_server

log = logging.getLogger("migcore")

#: A connection past its authentication, with the header of its first frame.
Opened = tuple[Connection, P.Header]
#: Seconds a background-accepted connection has for TLS, authentication and its first frame.
OPEN_TIMEOUT = 10.0
#: Connections (or their failures) queued ahead of ``receive()`` calls.
QUEUE_DEPTH = 32


class Intake:
    """Opens the connections of one :class:`Server`: inline for the caller, or from a background thread."""

    def __init__(self, server: Server, tls: ssl.SSLContext | None, token: bytes | None) -> None:
        self.server = server
        self.tls = tls
        self.token = token
        self.handlers: dict[P.Frame, Callable[[Connection, P.Header], None]] = {}
        self.queue: queue.Queue[Opened | BaseException] = queue.Queue(QUEUE_DEPTH)
        self.thread: threading.Thread | None = None
        self.lock = threading.Lock()
        self.closed = False

    def open(self, conn: Connection, timeout: float | None) -> Opened:
        """TLS (when configured), authentication, and the first frame's header of an accepted connection."""
        try:
            if self.tls is not None:
                conn = secure_server(conn, self.tls, timeout)
            header = authenticate_destination(conn, self.token)
            if header is None:
                header = P.decode_header(conn.recv_exact(P.HEADER_SIZE, "waiting for the source's first frame"))
        except BaseException:
            conn.close()
            raise
        return conn, header

    def next(self, timeout: float | None) -> Opened:
        """The next connection for the program (HELLO) or its migration (STREAM)."""
        if self.thread is None:
            return self.open(self.server.accept(timeout), timeout)
        try:
            item = self.queue.get(timeout=timeout)
        except queue.Empty:
            raise MigrationTimeout(f"no source connected within {timeout:g} s") from None
        if isinstance(item, BaseException):
            raise item
        return item

    def route(self, frame: P.Frame, handler: Callable[[Connection, P.Header], None]) -> None:
        """From now on, connections opening with ``frame`` go to ``handler`` (on their own thread)."""
        with self.lock:
            self.handlers[frame] = handler
            if self.thread is None and not self.closed:
                self.thread = threading.Thread(target=self._accept_all, name="migcore-listener", daemon=True)
                self.thread.start()

    def _accept_all(self) -> None:
        while not self.closed:
            try:
                conn = self.server.accept(0.5)
            except MigrationTimeout:
                continue
            except PeerLostError:  # the listener closed
                return
            except OSError as exc:
                log.warning("destination: accept failed: %s", exc)
                continue
            threading.Thread(target=self._dispatch, args=(conn,), name="migcore-intake", daemon=True).start()

    def _dispatch(self, conn: Connection) -> None:
        try:
            opened = self.open(conn, OPEN_TIMEOUT)
        except BaseException as exc:  # noqa: BLE001 - the program's next receive() raises it
            self._queue(exc)
            return
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
            self.queue.put_nowait(item)
        except queue.Full:
            if not isinstance(item, BaseException):
                item[0].close()
            log.warning("destination: dropped a connection nobody received (queue full)")

    def close(self) -> None:
        self.closed = True
        if self.thread is not None:
            self.thread.join()
        while True:
            try:
                item = self.queue.get_nowait()
            except queue.Empty:
                return
            if not isinstance(item, BaseException):
                item[0].close()
