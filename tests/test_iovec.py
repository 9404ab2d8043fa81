"""runs_nbytes, send_runs and recv_runs over real sockets and pipes, against plain slicing.

Every stream is checked against an oracle built with nothing but slices of the
source bytes; the reference implementation is only compared with, never trusted.
The threaded tests also prove the GIL is released: a blocking send into a full
socket only finishes because a Python thread keeps draining the other end.
"""

from __future__ import annotations

import errno
import mmap
import os
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from numpy.typing import NDArray

from migcore import _reference

U64 = NDArray[np.uint64]
HYPOTHESIS = settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
IOV_MAX = os.sysconf("SC_IOV_MAX")

pytestmark = pytest.mark.timeout(60)


# --- oracles and helpers ---


def as_runs(rows: Sequence[tuple[int, int]]) -> U64:
    return np.array(rows, dtype=np.uint64).reshape(-1, 2)


def random_bytes(n: int, seed: int = 0) -> bytes:
    return np.random.default_rng(seed).integers(0, 256, n, dtype=np.uint8).tobytes()


def expected_stream(data: bytes, page_size: int, rows: Sequence[tuple[int, int]], header: bytes = b"") -> bytes:
    """Header, then each run's bytes; slicing clips the partial last page by itself."""
    return header + b"".join(data[f * page_size : (f + c) * page_size] for f, c in rows)


def expected_region(
    nbytes: int,
    page_size: int,
    rows: Sequence[tuple[int, int]],
    payload: bytes,
    lo: int = 0,
    hi: int | None = None,
) -> bytearray:
    """A zeroed region after stream bytes ``[lo, hi)`` of ``payload`` were stored run by run, in order."""
    hi = len(payload) if hi is None else hi
    region = bytearray(nbytes)
    pos = 0
    for first, count in rows:
        start = first * page_size
        size = max(0, min((first + count) * page_size, nbytes) - start)
        a, b = max(pos, lo), min(pos + size, hi)
        if a < b:
            region[start + a - pos : start + b - pos] = payload[a:b]
        pos += size
    return region


@dataclass
class Channel:
    """One byte stream: ``wfd`` writes what ``rfd`` reads."""

    wfd: int
    rfd: int
    end_writes: Callable[[], None]  # end of file for the reader
    closers: list[Callable[[], None]] = field(default_factory=list)
    writer_closed: bool = False

    def close_writer(self) -> None:
        if not self.writer_closed:
            self.writer_closed = True
            self.end_writes()

    def close(self) -> None:
        for close in self.closers:
            close()


def socket_channel(a: socket.socket, b: socket.socket) -> Channel:
    return Channel(a.fileno(), b.fileno(), lambda: a.shutdown(socket.SHUT_WR), [a.close, b.close])


def tcp_pair(sndbuf: int | None = None) -> tuple[socket.socket, socket.socket]:
    """A loopback TCP connection (client, server side); SO_SNDBUF is set before connecting."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        client = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if sndbuf is not None:
            client.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, sndbuf)
        client.connect(listener.getsockname())
        server, _ = listener.accept()
    return client, server


def make_channel(kind: str) -> Channel:
    if kind == "socketpair":
        return socket_channel(*socket.socketpair())
    if kind == "tcp":
        return socket_channel(*tcp_pair())
    r, w = os.pipe()
    return Channel(w, r, lambda: os.close(w), [lambda: os.close(r)])


@pytest.fixture(params=["socketpair", "tcp", "pipe"])
def channel(request: pytest.FixtureRequest) -> Iterator[Channel]:
    ch = make_channel(request.param)
    yield ch
    ch.close_writer()
    ch.close()


def read_all(fd: int) -> bytes:
    """Everything until end of file."""
    chunks = []
    while chunk := os.read(fd, 1 << 20):
        chunks.append(chunk)
    return b"".join(chunks)


class Drain(threading.Thread):
    """Reads one end until end of file in a Python thread, optionally slowly."""

    def __init__(self, fd: int, chunk: int = 1 << 20, pause: float = 0.0) -> None:
        super().__init__(daemon=True)
        self.fd, self.chunk, self.pause = fd, chunk, pause
        self.data = bytearray()

    def run(self) -> None:
        while True:
            if self.pause:
                select.select([self.fd], [], [], 10)
                time.sleep(self.pause)
            chunk = os.read(self.fd, self.chunk)
            if not chunk:
                return
            self.data += chunk


def send_through(ch: Channel, call: Callable[[int], int]) -> tuple[int, bytes]:
    """Run ``call(wfd)`` while a thread drains the channel; returns its result and what arrived."""
    drain = Drain(ch.rfd)
    drain.start()
    try:
        result = call(ch.wfd)
    finally:
        ch.close_writer()
        drain.join(30)
    assert not drain.is_alive()
    return result, bytes(drain.data)


def feed(ch: Channel, payload: bytes, close: bool = True) -> threading.Thread:
    """Write ``payload`` from a thread (then end the stream), so a blocking reader can take it."""

    def run() -> None:
        view = memoryview(payload)
        while view:
            view = view[os.write(ch.wfd, view[: 1 << 20]) :]
        if close:
            ch.close_writer()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


# --- runs_nbytes ---


@pytest.mark.parametrize(
    ("rows", "page_size", "nbytes", "expected"),
    [
        ([], 4096, 0, 0),
        ([], 4096, 10000, 0),
        ([(0, 0)], 4096, 0, 0),
        ([(0, 1)], 4096, 4096, 4096),
        ([(0, 3)], 4096, 10000, 10000),  # partial last page counts its real bytes
        ([(2, 1)], 4096, 10000, 10000 - 8192),
        ([(0, 1), (2, 1)], 4096, 8193, 4097),
        ([(0, 2), (0, 2)], 100, 150, 300),  # overlapping runs count twice: it is what is sent
        ([(3, 0)], 100, 250, 0),  # an empty run at the very end
        ([(1, 1)], 1, 2, 1),
    ],
)
def test_runs_nbytes(
    impl: ModuleType, rows: list[tuple[int, int]], page_size: int, nbytes: int, expected: int
) -> None:
    assert impl.runs_nbytes(as_runs(rows), page_size, nbytes) == expected
    assert len(expected_stream(bytes(nbytes), page_size, rows)) == expected


@pytest.mark.parametrize(
    ("runs", "page_size", "nbytes", "error"),
    [
        (as_runs([(0, 4)]), 4096, 10000, ValueError),  # past the last page
        (as_runs([(3, 1)]), 4096, 10000, ValueError),
        (as_runs([(2**64 - 1, 2)]), 4096, 10000, ValueError),  # first + count wraps in 64 bits
        (as_runs([(1, 2**64 - 1)]), 4096, 10000, ValueError),
        (as_runs([(0, 1)]), 0, 10000, ValueError),
        (as_runs([(0, 1)]), -1, 10000, ValueError),
        (as_runs([]), 4096, -1, ValueError),
        (np.zeros((1, 2), np.int64), 4096, 10000, TypeError),
        (np.zeros((1, 3), np.uint64), 4096, 10000, ValueError),
        (np.zeros(2, np.uint64), 4096, 10000, ValueError),
        (np.zeros((2, 4), np.uint64)[:, ::2], 4096, 10000, ValueError),
        ([[0, 1]], 4096, 10000, TypeError),
    ],
)
def test_runs_nbytes_rejects(
    impl: ModuleType, runs: Any, page_size: int, nbytes: int, error: type[Exception]
) -> None:
    with pytest.raises(error):
        impl.runs_nbytes(runs, page_size, nbytes)


# --- send_runs ---

SEND_CASES: dict[str, tuple[int, int, list[tuple[int, int]], bytes]] = {
    # name: (nbytes, page_size, runs, header)
    "no runs, no header": (4096 * 4, 4096, [], b""),
    "header only": (4096 * 4, 4096, [], b"HEADER"),
    "empty header": (4096 * 4, 4096, [(1, 2)], b""),
    "one page": (4096, 4096, [(0, 1)], b"h"),
    "partial last page": (4096 * 3 + 123, 4096, [(0, 1), (3, 1)], b"hdr"),
    "partial last page only": (4096 * 3 + 123, 4096, [(3, 1)], b""),
    "whole region": (4096 * 3 + 123, 4096, [(0, 4)], b"hdr"),
    "adjacent runs": (4096 * 8, 4096, [(0, 1), (1, 2), (3, 1), (5, 3)], b"adj"),
    "overlapping and repeated": (4096 * 8, 4096, [(2, 3), (0, 4), (2, 3), (7, 1)], b""),
    "out of order": (4096 * 8, 4096, [(6, 2), (0, 1), (3, 1)], b"xy"),
    "empty runs": (4096 * 8, 4096, [(0, 0), (3, 0), (8, 0), (4, 1)], b"z"),
    "tiny pages": (1000, 1, [(i, 1) for i in range(0, 1000, 3)], b"t"),
    "big": (4096 * 512, 4096, [(i, 2) for i in range(0, 512, 3)], b"big" * 1000),
}


@pytest.mark.parametrize("case", list(SEND_CASES), ids=list(SEND_CASES))
def test_send_runs_matches_slicing(impl: ModuleType, channel: Channel, case: str) -> None:
    nbytes, page_size, rows, header = SEND_CASES[case]
    data = random_bytes(nbytes)
    expected = expected_stream(data, page_size, rows, header)
    sent, received = send_through(
        channel, lambda fd: impl.send_runs(fd, data, page_size, as_runs(rows), header)
    )
    assert sent == len(expected)
    assert received == expected


def test_send_runs_more_runs_than_iov_max(impl: ModuleType, channel: Channel) -> None:
    """5000 separate runs need several scatter-gather calls of at most IOV_MAX iovecs."""
    page_size = 512
    rows = [(i, 1) for i in range(0, 10000, 2)]
    assert len(rows) > IOV_MAX
    data = random_bytes(10000 * page_size + 7)
    expected = expected_stream(data, page_size, rows, b"head")
    sent, received = send_through(
        channel, lambda fd: impl.send_runs(fd, data, page_size, as_runs(rows), b"head")
    )
    assert (sent, received) == (len(expected), expected)


def test_send_runs_every_offset_near_the_boundaries(impl: ModuleType) -> None:
    """Resuming inside the header, at its end, inside a run, between runs, at the very end."""
    page_size = 16
    data = random_bytes(page_size * 6 + 5)
    rows = [(0, 1), (2, 2), (6, 1)]
    header = b"0123456789"
    expected = expected_stream(data, page_size, rows, header)
    for offset in range(len(expected) + 1):
        a, b = socket.socketpair()
        with a, b:
            sent = impl.send_runs(a.fileno(), data, page_size, as_runs(rows), header, offset)
            a.shutdown(socket.SHUT_WR)
            assert sent == len(expected) - offset
            assert read_all(b.fileno()) == expected[offset:]


def test_send_runs_resumes_after_short_writes(impl: ModuleType) -> None:
    """A non-blocking socket with a tiny send buffer and a slow reader: many short sends, exact stream."""
    page_size = 4096
    data = random_bytes(page_size * 64 + 100)
    rows = [(i, 1 + i % 3) for i in range(0, 64, 4)] + [(64, 1)]
    header = b"H" * 777
    expected = expected_stream(data, page_size, rows, header)
    client, server = tcp_pair(sndbuf=4096)
    with client, server:
        client.setblocking(False)
        drain = Drain(server.fileno(), chunk=3000, pause=0.0005)
        drain.start()
        sent = calls = blocked = 0
        while sent < len(expected):
            try:
                n = impl.send_runs(client.fileno(), data, page_size, as_runs(rows), header, sent)
            except BlockingIOError:
                blocked += 1
                select.select([], [client], [], 10)
                continue
            assert 0 < n <= len(expected) - sent
            sent += n
            calls += 1
        client.shutdown(socket.SHUT_WR)
        drain.join(30)
    assert calls > 1, "the send buffer was meant to force short writes"
    assert bytes(drain.data) == expected


def test_send_runs_short_write_on_a_full_pipe(impl: ModuleType) -> None:
    """A non-blocking pipe takes part of the stream, then refuses with EAGAIN and nothing sent."""
    data = random_bytes(4096 * 64)
    rows = [(0, 64)]
    r, w = os.pipe()
    try:
        os.set_blocking(w, False)
        first = impl.send_runs(w, data, 4096, as_runs(rows))
        assert 0 < first < len(data)
        with pytest.raises(BlockingIOError):
            impl.send_runs(w, data, 4096, as_runs(rows), b"", first)
        got = b""
        while len(got) < first:
            got += os.read(r, first - len(got))
        assert got == data[:first]
    finally:
        os.close(r)
        os.close(w)


@pytest.mark.parametrize(
    "bad",
    [
        {"runs": as_runs([(4, 2)])},
        {"runs": as_runs([(5, 1)])},
        {"runs": as_runs([(0, 1), (2**64 - 1, 1)])},
        {"runs": np.zeros((1, 2), np.uint32)},
        {"runs": np.zeros((1, 2), np.uint64).T},
        {"page_size": 0},
        {"offset": -1},
        {"offset": 3 + 4096 * 2 + 1},
        {"buf": np.zeros((64, 320), np.uint8)[:, ::2]},
        {"header": memoryview(b"abcdef")[::2]},
        {"buf": "not a buffer"},
    ],
    ids=lambda bad: next(iter(bad)),
)
def test_send_runs_rejects_before_sending(impl: ModuleType, bad: dict[str, Any]) -> None:
    """Bad arguments raise ValueError/TypeError and not a single byte leaves."""
    args: dict[str, Any] = {
        "buf": bytes(4096 * 5),
        "page_size": 4096,
        "runs": as_runs([(0, 1), (4, 1)]),
        "header": b"hdr",
        "offset": 0,
    }
    args.update(bad)
    a, b = socket.socketpair()
    with a, b:
        with pytest.raises((ValueError, TypeError)):
            impl.send_runs(a.fileno(), **args)
        b.setblocking(False)
        with pytest.raises(BlockingIOError):
            b.recv(1)


@pytest.mark.parametrize("kind", ["socketpair", "tcp"])
def test_send_runs_to_a_closed_peer_raises_epipe(impl: ModuleType, kind: str) -> None:
    data = random_bytes(4096 * 256)
    runs = as_runs([(0, 256)])
    a, b = socket.socketpair() if kind == "socketpair" else tcp_pair()
    with a:
        b.close()
        # TCP learns of the close from the peer's reset: the first send may still go out.
        with pytest.raises(OSError) as info:
            for _ in range(100):
                impl.send_runs(a.fileno(), data, 4096, runs)
                time.sleep(0.01)
    assert info.value.errno in (errno.EPIPE, errno.ECONNRESET)


def test_send_runs_to_a_closed_pipe_raises_epipe(impl: ModuleType) -> None:
    r, w = os.pipe()
    os.close(r)
    try:
        with pytest.raises(BrokenPipeError):
            impl.send_runs(w, bytes(4096), 4096, as_runs([(0, 1)]), b"h")
    finally:
        os.close(w)


def test_send_runs_to_a_closed_socket_does_not_raise_sigpipe() -> None:
    """With SIGPIPE at its default (deadly) action, as in an embedding program, EPIPE still comes back.

    Only the compiled path is checked: the reference writes with ``os.writev``,
    which cannot ask the kernel to hold SIGPIPE back (Python ignores it anyway).
    """
    pytest.importorskip("migcore._fastpath")
    script = """
import signal, socket, sys
import numpy as np
from migcore import _fastpath
signal.signal(signal.SIGPIPE, signal.SIG_DFL)
a, b = socket.socketpair()
b.close()
try:
    _fastpath.send_runs(a.fileno(), bytes(8192), 4096, np.array([[0, 2]], np.uint64))
except BrokenPipeError:
    sys.exit(7)
"""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
    done = subprocess.run([sys.executable, "-c", script], env=env, timeout=60, capture_output=True)
    assert done.returncode == 7, done.stderr.decode()


def test_send_runs_bad_descriptor(impl: ModuleType) -> None:
    r, w = os.pipe()
    os.close(r)
    os.close(w)
    with pytest.raises(OSError) as info:
        impl.send_runs(w, bytes(4096), 4096, as_runs([(0, 1)]))
    assert info.value.errno == errno.EBADF


def test_send_runs_interrupted_by_a_signal() -> None:
    """A signal while blocked with nothing sent gives InterruptedError, not an endless retry.

    Compiled path only: the reference's ``os.writev`` retries on EINTR (PEP 475).
    """
    fastpath = pytest.importorskip("migcore._fastpath")
    a, b = socket.socketpair()
    previous = signal.signal(signal.SIGALRM, lambda *_: None)
    with a, b:
        a.setblocking(False)
        try:
            while True:
                a.send(bytes(65536))
        except BlockingIOError:
            pass
        a.setblocking(True)
        signal.setitimer(signal.ITIMER_REAL, 0.05)
        try:
            with pytest.raises(InterruptedError):
                fastpath.send_runs(a.fileno(), bytes(1 << 20), 4096, as_runs([(0, 256)]))
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, previous)


# --- inputs of every kind ---


def send_buffers(data: bytes, tmp_path: Path) -> Iterator[tuple[str, Any]]:
    """The same bytes as every kind of buffer send_runs must accept, read-only ones included."""
    yield "bytes", data
    yield "bytearray", bytearray(data)
    yield "memoryview", memoryview(data)
    yield "readonly numpy", np.frombuffer(data, np.uint8)
    as_u32 = np.frombuffer(data, np.uint32).reshape(-1, 4).copy()
    yield "2-D uint32", as_u32
    frozen = as_u32.copy()
    frozen.flags.writeable = False
    yield "read-only 2-D uint32", frozen
    padded = b"\xee" * 100 + data + b"\xee" * 50
    yield "sliced memoryview", memoryview(bytearray(padded))[100:-50]
    yield "sliced numpy", np.frombuffer(padded, np.uint8)[100:-50]
    anon = mmap.mmap(-1, len(data))
    anon[:] = data
    yield "mmap", anon
    path = tmp_path / "region"
    path.write_bytes(data)
    with path.open("rb") as f:
        yield "read-only mmap", mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)


def test_send_runs_accepts_every_buffer_kind(impl: ModuleType, tmp_path: Path) -> None:
    page_size = 256
    data = random_bytes(page_size * 16)
    rows = [(0, 2), (5, 1), (15, 1)]
    header = np.arange(3, dtype=np.uint64)  # a header in another format counts in bytes
    expected = expected_stream(data, page_size, rows, header.tobytes())
    for name, buf in send_buffers(data, tmp_path):
        a, b = socket.socketpair()
        with a, b:
            sent = impl.send_runs(a.fileno(), buf, page_size, as_runs(rows), header)
            a.shutdown(socket.SHUT_WR)
            assert (sent, read_all(b.fileno())) == (len(expected), expected), name
        if isinstance(buf, mmap.mmap):
            buf.close()


def test_recv_runs_into_numpy_and_mmap(impl: ModuleType) -> None:
    page_size = 512
    nbytes = page_size * 10
    rows = [(1, 2), (9, 1)]
    payload = random_bytes(page_size * 3, seed=3)
    expected = expected_region(nbytes, page_size, rows, payload)
    targets: list[Any] = [np.zeros(nbytes // 8, np.uint64), mmap.mmap(-1, nbytes)]
    for target in targets:
        a, b = socket.socketpair()
        with a, b:
            a.sendall(payload)
            assert impl.recv_runs(b.fileno(), target, page_size, as_runs(rows)) == len(payload)
        assert bytes(memoryview(target).cast("B")) == expected
    targets[1].close()


def frozen_zeros(n: int) -> NDArray[np.uint8]:
    arr = np.zeros(n, np.uint8)
    arr.flags.writeable = False
    return arr


@pytest.mark.parametrize(
    "target",
    [bytes(4096), memoryview(bytearray(4096)).toreadonly(), frozen_zeros(4096)],
    ids=["bytes", "readonly memoryview", "readonly numpy"],
)
def test_recv_runs_rejects_read_only_buffers(impl: ModuleType, target: Any) -> None:
    a, b = socket.socketpair()
    with a, b:
        a.sendall(b"x" * 4096)
        with pytest.raises(TypeError):
            impl.recv_runs(b.fileno(), target, 4096, as_runs([(0, 1)]))
        assert b.recv(8192) == b"x" * 4096, "nothing was consumed"


# --- recv_runs ---

RECV_CASES: dict[str, tuple[int, int, list[tuple[int, int]]]] = {
    "no runs": (4096 * 4, 4096, []),
    "one page": (4096, 4096, [(0, 1)]),
    "partial last page": (4096 * 3 + 321, 4096, [(1, 1), (3, 1)]),
    "adjacent runs": (4096 * 8, 4096, [(0, 1), (1, 1), (2, 3), (6, 2)]),
    "overlapping": (4096 * 8, 4096, [(1, 3), (2, 1), (0, 2)]),
    "sparse": (4096 * 64, 4096, [(i, 1) for i in range(1, 64, 5)]),
    "tiny pages": (999, 1, [(i, 2) for i in range(0, 990, 7)]),
}


@pytest.mark.parametrize("case", list(RECV_CASES), ids=list(RECV_CASES))
def test_recv_runs_writes_only_the_runs(impl: ModuleType, channel: Channel, case: str) -> None:
    nbytes, page_size, rows = RECV_CASES[case]
    total = impl.runs_nbytes(as_runs(rows), page_size, nbytes)
    payload = random_bytes(total, seed=1)
    region = bytearray(nbytes)
    writer = feed(channel, payload)
    assert impl.recv_runs(channel.rfd, region, page_size, as_runs(rows)) == total
    writer.join(10)
    assert region == expected_region(nbytes, page_size, rows, payload)
    assert read_all(channel.rfd) == b"", "nothing past the runs was consumed"


def test_recv_runs_more_runs_than_iov_max(impl: ModuleType, channel: Channel) -> None:
    page_size = 512
    nbytes = 10000 * page_size + 100
    rows = [(i, 1) for i in range(1, 10001, 2)]
    total = impl.runs_nbytes(as_runs(rows), page_size, nbytes)
    payload = random_bytes(total, seed=2)
    region = bytearray(nbytes)
    writer = feed(channel, payload)
    assert impl.recv_runs(channel.rfd, region, page_size, as_runs(rows)) == total
    writer.join(10)
    assert region == expected_region(nbytes, page_size, rows, payload)


def test_recv_runs_end_of_file_mid_stream(impl: ModuleType, channel: Channel) -> None:
    """The peer closes after part of the data: a short count, then 0 — never an error."""
    page_size = 4096
    nbytes = page_size * 8
    rows = [(0, 2), (4, 2), (7, 1)]
    total = impl.runs_nbytes(as_runs(rows), page_size, nbytes)
    payload = random_bytes(total, seed=4)
    part = page_size * 2 + 1000
    region = bytearray(nbytes)
    feed(channel, payload[:part]).join(10)
    assert impl.recv_runs(channel.rfd, region, page_size, as_runs(rows)) == part
    assert impl.recv_runs(channel.rfd, region, page_size, as_runs(rows), part) == 0
    full = expected_region(nbytes, page_size, rows, payload)
    assert region[:part] == full[:part]
    assert region[page_size * 4 + 1000 :] == bytes(nbytes - page_size * 4 - 1000)


def test_recv_runs_resumes_with_offset(impl: ModuleType) -> None:
    """A non-blocking reader and a sender that trickles: many short receives, exact region."""
    page_size = 1024
    nbytes = page_size * 200 + 17
    rows = [(i, 1 + i % 4) for i in range(0, 196, 6)] + [(200, 1)]
    total = impl.runs_nbytes(as_runs(rows), page_size, nbytes)
    payload = random_bytes(total, seed=5)
    client, server = tcp_pair()
    with client, server:
        server.setblocking(False)

        def trickle() -> None:
            for i in range(0, total, 5000):
                client.sendall(payload[i : i + 5000])
                time.sleep(0.0005)

        sender = threading.Thread(target=trickle, daemon=True)
        sender.start()
        region = bytearray(nbytes)
        got = calls = 0
        while got < total:
            try:
                n = impl.recv_runs(server.fileno(), region, page_size, as_runs(rows), got)
            except BlockingIOError:
                select.select([server], [], [], 10)
                continue
            assert 0 < n <= total - got
            got += n
            calls += 1
        sender.join(10)
    assert calls > 1
    assert region == expected_region(nbytes, page_size, rows, payload)


def test_recv_runs_at_the_end_receives_nothing(impl: ModuleType) -> None:
    a, b = socket.socketpair()
    with a, b:
        a.sendall(b"untouched")
        region = bytearray(4096)
        assert impl.recv_runs(b.fileno(), region, 4096, as_runs([(0, 1)]), 4096) == 0
        assert impl.recv_runs(b.fileno(), region, 4096, as_runs([])) == 0
        assert region == bytes(4096) and b.recv(100) == b"untouched"


@pytest.mark.parametrize(
    "bad",
    [
        {"runs": as_runs([(4, 2)])},
        {"runs": as_runs([(2**63, 2**63)])},
        {"runs": np.zeros((1, 2), np.float64)},
        {"page_size": -4096},
        {"offset": -1},
        {"offset": 4096 * 2 + 1},
        {"buf": np.zeros((80, 512), np.uint8)[:, ::2]},
    ],
    ids=lambda bad: next(iter(bad)),
)
def test_recv_runs_rejects_before_receiving(impl: ModuleType, bad: dict[str, Any]) -> None:
    args: dict[str, Any] = {
        "buf": bytearray(4096 * 5),
        "page_size": 4096,
        "runs": as_runs([(0, 1), (4, 1)]),
        "offset": 0,
    }
    args.update(bad)
    a, b = socket.socketpair()
    with a, b:
        a.sendall(b"x" * 100)
        with pytest.raises((ValueError, TypeError)):
            impl.recv_runs(b.fileno(), **args)
        assert b.recv(1000) == b"x" * 100


def test_recv_runs_connection_reset(impl: ModuleType) -> None:
    """A reset before any byte arrived is an error carrying its errno, not an end of file."""
    client, server = tcp_pair()
    with server:
        client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        client.close()  # linger 0: the peer gets a RST
        time.sleep(0.05)
        with pytest.raises(ConnectionResetError):
            impl.recv_runs(server.fileno(), bytearray(4096), 4096, as_runs([(0, 1)]))


# --- random run lists against the reference and the oracle ---

region_and_runs = st.integers(1, 64).flatmap(
    lambda page_size: st.integers(0, 40 * page_size).flatmap(
        lambda nbytes: st.tuples(
            st.just(page_size),
            st.just(nbytes),
            st.lists(
                st.integers(0, -(-nbytes // page_size)).flatmap(
                    lambda first: st.tuples(
                        st.just(first), st.integers(0, -(-nbytes // page_size) - first)
                    )
                ),
                max_size=30,
            ),
        )
    )
)


@HYPOTHESIS
@given(spec=region_and_runs, header=st.binary(max_size=50), cut=st.floats(0, 1), sort=st.booleans())
def test_send_runs_random(
    impl: ModuleType, spec: tuple[int, int, list[tuple[int, int]]], header: bytes, cut: float, sort: bool
) -> None:
    page_size, nbytes, rows = spec
    if sort:
        rows = sorted(rows)
    data = random_bytes(nbytes, seed=nbytes)
    runs = as_runs(rows)
    expected = expected_stream(data, page_size, rows, header)
    offset = int(cut * len(expected))
    assert impl.runs_nbytes(runs, page_size, nbytes) == len(expected) - len(header)
    streams = []
    for module in (impl, _reference):
        a, b = socket.socketpair()
        with a, b:
            sent = module.send_runs(a.fileno(), data, page_size, runs, header, offset)
            a.shutdown(socket.SHUT_WR)
            streams.append((sent, read_all(b.fileno())))
    assert streams[0] == streams[1] == (len(expected) - offset, expected[offset:])


@HYPOTHESIS
@given(spec=region_and_runs, cut=st.floats(0, 1), short=st.floats(0, 1))
def test_recv_runs_random(
    impl: ModuleType, spec: tuple[int, int, list[tuple[int, int]]], cut: float, short: float
) -> None:
    """Receive from ``offset``, with the sender possibly stopping early; both implementations agree."""
    page_size, nbytes, rows = spec
    runs = as_runs(rows)
    total = _reference.runs_nbytes(runs, page_size, nbytes)
    payload = random_bytes(total, seed=total)
    offset = int(cut * total)
    arrives = offset + int(short * (total - offset))
    regions = []
    for module in (impl, _reference):
        region = bytearray(nbytes)
        a, b = socket.socketpair()
        with a, b:
            a.sendall(payload[offset:arrives])
            a.shutdown(socket.SHUT_WR)
            assert module.recv_runs(b.fileno(), region, page_size, runs, offset) == arrives - offset
        regions.append(region)
    assert regions[0] == regions[1] == expected_region(nbytes, page_size, rows, payload, offset, arrives)
