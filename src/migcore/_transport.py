"""Byte streams between the two ends: addresses, connect/listen/accept, exact reads, timeouts.

Sockets are non-blocking; every wait goes through ``poll`` with the
connection's timeout (the longest wait for the peer to make progress), so a
silent peer becomes a :class:`MigrationTimeout` and a closed or reset one a
:class:`PeerLostError`. Frame headers are read with ``recv_into`` of exactly
their size, never more, because the page payload that follows is read by the
fast path's ``recv_runs`` straight into the destination region.
"""

from __future__ import annotations

import errno
import os
import select
import socket
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

from migcore import _kernels
from migcore._errors import AuthenticationError, MigrationTimeout, PeerLostError


@dataclass(frozen=True)
class Address:
    scheme: str  # "tcp" | "unix" | "file"
    host: str = ""
    port: int = 0
    path: str = ""

    def __str__(self) -> str:
        if self.scheme in ("unix", "file"):
            return f"{self.scheme}://{self.path}"
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"tcp://{host}:{self.port}"


def parse_address(address: str) -> Address:
    """``tcp://HOST:PORT`` (``[v6]:PORT`` too), ``unix:///absolute/path`` or ``file:///absolute/path``."""
    if not isinstance(address, str):
        raise TypeError(f"address must be a str like 'tcp://127.0.0.1:0', not {type(address).__name__}")
    scheme, sep, rest = address.partition("://")
    if not sep:
        raise ValueError(f"address {address!r} has no scheme; use tcp://HOST:PORT or unix:///PATH")
    if scheme == "unix":
        if not rest:
            raise ValueError(f"address {address!r} has no socket path")
        return Address("unix", path=rest)
    if scheme == "file":
        if not rest.startswith("/"):
            raise ValueError(f"address {address!r} needs an absolute path: file:///PATH")
        return Address("file", path=rest)
    if scheme != "tcp":
        raise ValueError(f"unsupported transport {scheme!r} in {address!r}; use tcp://, unix:// or file://")
    host, colon, port = rest.rpartition(":")
    if not colon or not port.isdigit():
        raise ValueError(f"address {address!r} needs a port: tcp://HOST:PORT")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if not host:
        raise ValueError(f"address {address!r} needs a host")
    if not 0 <= int(port) <= 65535:
        raise ValueError(f"port {port} out of range")
    return Address("tcp", host=host, port=int(port))


def _lost(what: str, exc: BaseException | None = None) -> PeerLostError:
    detail = f": {exc}" if exc is not None else ""
    return PeerLostError(f"peer lost while {what}{detail}")


class Connection:
    """One non-blocking stream socket with exact reads, full writes and a per-wait timeout.

    A connection may be used by two threads at once, one reading and one
    writing (the post-copy service does), never two readers or two writers.
    """

    def __init__(self, sock: socket.socket, timeout: float | None) -> None:
        sock.setblocking(False)
        self.sock = sock
        self.fd = sock.fileno()
        self.timeout = timeout
        self.received = 0
        self.sent = 0
        self._closed = False
        self._close_lock = threading.Lock()

    # -- waiting -----------------------------------------------------------

    def _wait(self, events: int, what: str) -> None:
        """Block until the socket is ready for ``events`` or the timeout passes."""
        if self._closed:
            raise _lost(what, OSError(errno.EBADF, "connection closed"))
        poller = select.poll()
        poller.register(self.fd, events | select.POLLERR | select.POLLHUP)
        deadline = None if self.timeout is None else time.monotonic() + self.timeout
        while True:
            wait = 1.0 if deadline is None else max(0.0, min(1.0, deadline - time.monotonic()))
            ready = poller.poll(wait * 1000)
            if ready:
                return
            if self._closed:
                raise _lost(what, OSError(errno.EBADF, "connection closed"))
            if deadline is not None and time.monotonic() >= deadline:
                raise MigrationTimeout(f"peer sent nothing for {self.timeout:g} s while {what}")

    # -- reading -----------------------------------------------------------

    def _io(self, call: Callable[[], int], events: int, what: str) -> int:
        """One socket call, waiting for ``events`` while it would block; an OS error is a lost peer."""
        while True:
            try:
                return call()
            except (BlockingIOError, InterruptedError):
                self._wait(events, what)
            except OSError as exc:
                raise _lost(what, exc) from exc

    def recv_into_exact(self, buf: memoryview, what: str) -> None:
        """Fill ``buf`` exactly (a header, runs table, state...); EOF before the end is a lost peer."""
        got = 0
        n = buf.nbytes
        while got < n:
            k = self._io(lambda: self.sock.recv_into(buf[got:], n - got), select.POLLIN, what)
            if k == 0:
                raise _lost(what, OSError(f"connection closed after {got} of {n} bytes"))
            got += k
            self.received += k

    def recv_exact(self, n: int, what: str) -> bytearray:
        buf = bytearray(n)
        self.recv_into_exact(memoryview(buf), what)
        return buf

    def recv_pages(self, view: memoryview, page_size: int, runs: NDArray[np.uint64], total: int, what: str) -> None:
        """Receive ``total`` payload bytes of validated ``runs`` straight into ``view``."""
        done = 0
        while done < total:
            k = self._io(lambda: _kernels.recv_runs(self.fd, view, page_size, runs, done), select.POLLIN, what)
            if k == 0:  # recv_runs reads end of file as a short count of 0
                raise _lost(what, OSError(f"connection closed after {done} of {total} page bytes"))
            done += k
            self.received += k

    # -- writing -----------------------------------------------------------

    def _send_loop(self, total: int, call: Callable[[int], int], what: str, between: Callable[[], None] | None) -> None:
        """Call ``call(done)`` until ``total`` bytes went out, waiting while the socket is full."""
        done = 0
        while done < total:
            k = self._io(lambda: call(done), select.POLLOUT, what)
            done += k
            self.sent += k
            if between is not None:
                between()
            if k == 0:  # nothing moved and no error: wait rather than spin
                self._wait(select.POLLOUT, what)

    def send_all(self, data: bytes | bytearray | memoryview, what: str) -> None:
        view = memoryview(data).cast("B")
        self._send_loop(view.nbytes, lambda done: self.sock.send(view[done:]), what, None)

    def send_pages(
        self,
        view: memoryview,
        page_size: int,
        runs: NDArray[np.uint64],
        header: bytes,
        total: int,
        what: str,
        between: Callable[[], None] | None = None,
    ) -> None:
        """Send ``header`` then the pages of ``runs`` straight from ``view`` (``total`` bytes in all)."""
        self._send_loop(
            total, lambda done: _kernels.send_runs(self.fd, view, page_size, runs, header, done), what, between
        )

    def bound_queue(self, *, send: int = 0, recv: int = 0) -> None:
        """Best effort: cap the kernel's send and/or receive buffer of this connection (0 leaves one alone).

        Post-copy uses this so the background push never queues more than a
        few batches ahead of a demanded page: bytes already in the socket
        buffers cannot be overtaken.
        """
        for opt, size in ((socket.SO_SNDBUF, send), (socket.SO_RCVBUF, recv)):
            if size > 0:
                try:
                    self.sock.setsockopt(socket.SOL_SOCKET, opt, size)
                except (OSError, ValueError):
                    pass

    # -- closing -----------------------------------------------------------

    def close(self) -> None:
        """Close once; a thread blocked in a wait on this connection wakes with a lost-peer error."""
        with self._close_lock:
            if self._closed:
                return
            self._closed = True
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()

    def interrupt(self) -> None:
        """Wake whoever waits on this connection (from another thread) without closing its descriptor.

        A thread polling the raw descriptor (the no-GIL post-copy loop) sees
        the end of the stream; the descriptor number is not reused before
        that thread's owner calls :meth:`close`.
        """
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def abort_soon(self, data: bytes, seconds: float = 0.5) -> None:
        """Best effort: send a last frame (ERROR/CANCEL) within ``seconds``, then close."""
        saved = self.timeout
        self.timeout = seconds
        try:
            self.send_all(data, "sending a last error frame")
        except (PeerLostError, MigrationTimeout, OSError):
            pass
        finally:
            self.timeout = saved
            self.close()

    @property
    def closed(self) -> bool:
        return self._closed


#: Largest slice of the region handed to one ``SSLSocket.send`` (the ssl module encrypts in user space).
TLS_CHUNK = 1 << 20


class TLSConnection(Connection):
    """A :class:`Connection` over an ``ssl.SSLSocket``: the same framing, but no zero-copy page path.

    The ssl module encrypts in user space, so ``sendmsg``/``recvmsg`` on the
    descriptor cannot be used; pages go through the socket as memoryview
    slices of the region (large chunks, no copy in Python beyond what ssl
    does). A TLS failure before any byte arrived (a refused certificate
    surfaces there in TLS 1.3) is an :class:`AuthenticationError`.
    """

    def _io(self, call: Callable[[], int], events: int, what: str) -> int:
        while True:
            try:
                return call()
            except ssl.SSLWantReadError:
                self._wait(select.POLLIN, what)
            except ssl.SSLWantWriteError:
                self._wait(select.POLLOUT, what)
            except (BlockingIOError, InterruptedError):
                self._wait(events, what)
            except ssl.SSLZeroReturnError as exc:
                raise _lost(what, exc) from exc
            except ssl.SSLError as exc:
                # in TLS 1.3 the server checks the client certificate after the client's handshake ended:
                # an alert or a TLS-level EOF before the peer said anything is the refusal
                if self.received == 0:
                    raise AuthenticationError(f"TLS refused while {what}: {exc}") from exc
                raise _lost(what, exc) from exc
            except ConnectionResetError as exc:
                if self.received == 0:  # the same refusal, when the alert was lost to a reset
                    raise AuthenticationError(f"TLS connection reset while {what}: refused after the handshake") from exc
                raise _lost(what, exc) from exc
            except OSError as exc:
                raise _lost(what, exc) from exc

    def recv_pages(self, view: memoryview, page_size: int, runs: NDArray[np.uint64], total: int, what: str) -> None:
        for first, count in runs.tolist():
            start = first * page_size
            self.recv_into_exact(view[start : min(start + count * page_size, view.nbytes)], what)

    def send_all(self, data: bytes | bytearray | memoryview, what: str) -> None:
        view = memoryview(data).cast("B")
        self._send_loop(view.nbytes, lambda done: self.sock.send(view[done : done + TLS_CHUNK]), what, None)

    def send_pages(
        self,
        view: memoryview,
        page_size: int,
        runs: NDArray[np.uint64],
        header: bytes,
        total: int,
        what: str,
        between: Callable[[], None] | None = None,
    ) -> None:
        self.send_all(header, what)
        for first, count in runs.tolist():
            start = first * page_size
            self.send_all(view[start : min(start + count * page_size, view.nbytes)], what)
            if between is not None:
                between()


def _tls_handshake(
    sock: socket.socket, ctx: ssl.SSLContext, timeout: float | None, *, server_hostname: str | None = None
) -> TLSConnection:
    """Wrap ``sock`` (blocking, within ``timeout``) and insist on TLS 1.3."""
    server_side = server_hostname is None
    sock.setblocking(True)
    sock.settimeout(timeout)
    who = "source" if server_side else "destination"
    try:
        tls = ctx.wrap_socket(sock, server_side=server_side, server_hostname=server_hostname, do_handshake_on_connect=False)
    except BaseException:
        sock.close()
        raise
    try:
        tls.do_handshake()
    except TimeoutError as exc:
        tls.close()
        raise MigrationTimeout(f"TLS handshake with the {who} took longer than {timeout:g} s") from exc
    except (ssl.SSLZeroReturnError, ssl.SSLEOFError, ConnectionError) as exc:
        tls.close()
        raise AuthenticationError(f"the {who} closed the connection during the TLS handshake: {exc}") from exc
    except ssl.SSLError as exc:
        tls.close()
        raise AuthenticationError(f"TLS handshake with the {who} failed: {exc}") from exc
    except OSError as exc:
        tls.close()
        raise PeerLostError(f"TLS handshake with the {who} failed: {exc}") from exc
    if tls.version() != "TLSv1.3":
        tls.close()
        raise AuthenticationError(f"the {who} negotiated {tls.version()}; migcore requires TLS 1.3")
    return TLSConnection(tls, timeout)


def secure_server(conn: Connection, ctx: ssl.SSLContext, timeout: float | None) -> TLSConnection:
    """Run the server side of TLS on an accepted connection."""
    return _tls_handshake(conn.sock, ctx, timeout)


def connect(
    address: str, timeout: float | None, tls: ssl.SSLContext | None = None, *, wait: float | None = None
) -> Connection:
    """Open a connection to a listening destination (TLS first when ``tls`` is given).

    ``wait`` (seconds) retries a refused connection, or a unix socket that
    does not exist yet, with a backoff of 50 ms doubling to 1 s, until the
    destination listens or ``wait`` has passed; ``PeerLostError`` then.
    """
    addr = parse_address(address)
    if addr.scheme == "file":
        raise ValueError("file:// addresses are shared storage, not connections")
    deadline = None if wait is None else time.monotonic() + wait
    delay = 0.05
    while True:
        try:
            sock = _open_socket(addr, timeout)
            break
        except TimeoutError as exc:
            raise MigrationTimeout(f"could not connect to {addr} within {timeout:g} s") from exc
        except (ConnectionRefusedError, FileNotFoundError) as exc:
            left = None if deadline is None else deadline - time.monotonic()
            if left is None or left <= 0:
                waited = f" (waited {wait:g} s for it to listen)" if wait else ""
                raise PeerLostError(f"could not connect to {addr}: {exc}{waited}") from exc
            time.sleep(min(delay, left))
            delay = min(delay * 2, 1.0)
        except OSError as exc:
            raise PeerLostError(f"could not connect to {addr}: {exc}") from exc
    if tls is not None:
        return _tls_handshake(sock, tls, timeout, server_hostname=addr.host)
    return Connection(sock, timeout)


def _open_socket(addr: Address, timeout: float | None) -> socket.socket:
    if addr.scheme == "unix":
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(timeout)
            sock.connect(addr.path)
        except BaseException:
            sock.close()
            raise
        return sock
    sock = socket.create_connection((addr.host, addr.port), timeout=timeout)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


class Server:
    """A bound, listening socket that hands out :class:`Connection` objects."""

    def __init__(self, address: str, backlog: int = 8) -> None:
        addr = parse_address(address)
        if addr.scheme == "file":
            raise ValueError("file:// addresses are shared storage, not sockets")
        self._unlink: str | None = None
        if addr.scheme == "unix":
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.bind(addr.path)
            except BaseException:
                sock.close()
                raise
            self._unlink = addr.path
            bound = addr
        else:
            family = socket.AF_INET6 if ":" in addr.host else socket.AF_INET
            sock = socket.socket(family, socket.SOCK_STREAM)
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                sock.bind((addr.host, addr.port))
            except BaseException:
                sock.close()
                raise
            bound = Address("tcp", host=addr.host, port=sock.getsockname()[1])
        sock.listen(backlog)
        sock.setblocking(False)
        self.sock = sock
        self.address = str(bound)
        self._closed = False

    def accept(self, timeout: float | None) -> Connection:
        poller = select.poll()
        poller.register(self.sock.fileno(), select.POLLIN)
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            if self._closed:
                raise PeerLostError("listener closed")
            try:
                conn, _ = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                wait = 1.0 if deadline is None else max(0.0, min(1.0, deadline - time.monotonic()))
                if deadline is not None and wait <= 0:
                    raise MigrationTimeout(f"no source connected within {timeout:g} s") from None
                poller.poll(wait * 1000)
                continue
            if conn.family in (socket.AF_INET, socket.AF_INET6):
                conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            return Connection(conn, timeout)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self.sock.close()
        if self._unlink is not None:
            try:
                os.unlink(self._unlink)
            except OSError:
                pass
