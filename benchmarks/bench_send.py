"""send_runs/recv_runs over loopback TCP against a bare sendall/recv_into of the same bytes.

Run with::

    .venv/bin/python -m pytest benchmarks/bench_send.py --benchmark-only -o python_files='bench_*.py'

256 MiB move as 4 KiB-page runs (every other page of a 512 MiB region); the
baseline moves 256 MiB from/into one contiguous buffer over the same
connection, so both sides share socket options, peer and machine. The peer is
a separate process (it drains or feeds as fast as it can), and each round runs
the baselines, then ours (``compare`` in ``conftest.py``), so the ratios
(baseline time / ours; target >= 0.8 against sendall/recv_into) are printed in
the summary at the end of the run.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator
from types import ModuleType
from typing import Any

import numpy as np
import pytest
from numpy.typing import NDArray

MIB = 1 << 20
PAGE = 4096
PAYLOAD = 256 * MIB
ROUNDS = 7
IOV_MAX = os.sysconf("SC_IOV_MAX")

# Reads until end of file as fast as Python can: recv_into one reusable buffer.
DRAIN = """
import socket, sys
sock = socket.create_connection(("127.0.0.1", int(sys.argv[1])))
view = memoryview(bytearray(4 << 20))
total = 0
while n := sock.recv_into(view):
    total += n
print(total)
"""

# Sends one contiguous 256 MiB buffer with sendall, again and again, until the reader hangs up.
FEED = """
import socket, sys
import numpy as np
sock = socket.create_connection(("127.0.0.1", int(sys.argv[1])))
data = np.random.default_rng(2).integers(0, 256, 256 << 20, dtype=np.uint8)
try:
    while True:
        sock.sendall(data)
except OSError:
    pass
"""


def every_other_page(npages: int) -> NDArray[np.uint64]:
    """One-page runs on the even pages: nothing to coalesce, one iovec per page."""
    firsts = np.arange(0, npages, 2, dtype=np.uint64)
    return np.stack([firsts, np.ones_like(firsts)], axis=1)


def filled(nbytes: int, seed: int) -> NDArray[np.uint8]:
    """Random bytes, every page backed by real memory before anything is timed."""
    return np.random.default_rng(seed).integers(0, 256, nbytes, dtype=np.uint8)


def connect_peer(script: str) -> tuple[socket.socket, subprocess.Popen[bytes]]:
    """Start ``script`` in another process and accept its loopback connection."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        port = listener.getsockname()[1]
        peer = subprocess.Popen(
            [sys.executable, "-c", script, str(port)], stdout=subprocess.PIPE
        )
        listener.settimeout(60)
        sock, _ = listener.accept()
    return sock, peer


@pytest.fixture(scope="module")
def region() -> NDArray[np.uint8]:
    return filled(2 * PAYLOAD, seed=0)


@pytest.fixture(scope="module")
def runs() -> NDArray[np.uint64]:
    runs = every_other_page(2 * PAYLOAD // PAGE)
    assert len(runs) * PAGE == PAYLOAD
    return runs


@pytest.fixture
def drained() -> Iterator[tuple[socket.socket, list[int]]]:
    """A connection whose peer process drains everything; it must count what the list says was sent."""
    sock, peer = connect_peer(DRAIN)
    sent: list[int] = []
    yield sock, sent
    sock.close()
    out, _ = peer.communicate(timeout=120)
    assert int(out) == sum(sent), "the peer did not receive exactly what was sent"


@pytest.fixture
def fed() -> Iterator[socket.socket]:
    """A connection whose peer process sends 256 MiB blocks without end."""
    sock, peer = connect_peer(FEED)
    yield sock
    sock.close()
    peer.communicate(timeout=120)


def sendmsg_pages(sock: socket.socket, buf: NDArray[np.uint8], runs: NDArray[np.uint64]) -> int:
    """What Python alone can do: a memoryview per run, socket.sendmsg on IOV_MAX of them at a time."""
    view = buf.data
    pieces = [view[f * PAGE : (f + c) * PAGE] for f, c in runs.tolist()]
    sent = 0
    for i in range(0, len(pieces), IOV_MAX):
        batch = pieces[i : i + IOV_MAX]
        n = sock.sendmsg(batch)
        sent += n
        want = sum(len(p) for p in batch)
        if n < want:  # a short send (signal): finish this batch the slow way
            sock.sendall(b"".join(bytes(p) for p in batch)[n:])
            sent += want - n
    return sent


def recvmsg_pages(sock: socket.socket, buf: NDArray[np.uint8], runs: NDArray[np.uint64]) -> int:
    """The mirror in plain Python: recvmsg_into IOV_MAX page views at a time, resuming short reads."""
    view = buf.data
    pieces = [view[f * PAGE : (f + c) * PAGE] for f, c in runs.tolist()]
    got = 0
    for i in range(0, len(pieces), IOV_MAX):
        batch = pieces[i : i + IOV_MAX]
        while batch:
            n = sock.recvmsg_into(batch)[0]
            if n == 0:
                raise EOFError
            got += n
            while batch and n >= len(batch[0]):
                n -= len(batch[0])
                batch = batch[1:]
            if n:
                batch[0] = batch[0][n:]
    return got


def recv_exactly(sock: socket.socket, view: memoryview) -> int:
    got = 0
    while got < len(view):
        n = sock.recv_into(view[got:])
        if n == 0:
            raise EOFError
        got += n
    return got


def test_send_runs(
    benchmark: Any,
    compare: Callable[..., object],
    fastpath: ModuleType,
    region: NDArray[np.uint8],
    runs: NDArray[np.uint64],
    drained: tuple[socket.socket, list[int]],
) -> None:
    """256 MiB as 65536 one-page runs vs one sendall of 256 MiB, same connection and peer."""
    sock, sent = drained
    contiguous = filled(PAYLOAD, seed=1)
    fd = sock.fileno()
    benchmark.group = "send 256 MiB over loopback TCP"
    benchmark.extra_info["target vs sendall"] = 0.8

    def ours() -> None:
        sent.append(fastpath.send_runs(fd, region, PAGE, runs))
        assert sent[-1] == PAYLOAD

    def sendall() -> None:
        sock.sendall(contiguous.data)
        sent.append(PAYLOAD)

    def sendall_4mib() -> None:
        # The kernel moves one huge send more slowly than 4 MiB ones (the size of
        # one IOV_MAX batch of pages): this is the contiguous ceiling to compare with.
        view = contiguous.data
        for i in range(0, PAYLOAD, 4 * MIB):
            sock.sendall(view[i : i + 4 * MIB])
        sent.append(PAYLOAD)

    def sendmsg() -> None:
        sent.append(sendmsg_pages(sock, region, runs))

    compare(
        benchmark,
        "send_runs",
        ours,
        {"sendall": sendall, "sendall_4MiB": sendall_4mib, "sendmsg_pages": sendmsg},
        rounds=ROUNDS,
        nbytes=PAYLOAD,
    )


def test_recv_runs(
    benchmark: Any,
    compare: Callable[..., object],
    fastpath: ModuleType,
    region: NDArray[np.uint8],
    runs: NDArray[np.uint64],
    fed: socket.socket,
) -> None:
    """256 MiB into 65536 one-page runs vs recv_into a contiguous 256 MiB buffer, same feeder."""
    sock = fed
    contiguous = filled(PAYLOAD, seed=1).data
    target = region.copy()
    fd = sock.fileno()
    benchmark.group = "receive 256 MiB over loopback TCP"
    benchmark.extra_info["target vs recv_into"] = 0.8

    def ours() -> None:
        assert fastpath.recv_runs(fd, target, PAGE, runs) == PAYLOAD

    def recv_into() -> None:
        recv_exactly(sock, contiguous)

    def recvmsg() -> None:
        assert recvmsg_pages(sock, target, runs) == PAYLOAD

    compare(
        benchmark,
        "recv_runs",
        ours,
        {"recv_into": recv_into, "recvmsg_pages": recvmsg},
        rounds=ROUNDS,
        nbytes=PAYLOAD,
    )
