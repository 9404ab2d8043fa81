"""The destination side of the benchmark suite, run in its own process.

The bench process starts :func:`serve` with ``multiprocessing`` (spawn) and
drives it over a pipe, one command at a time:

- ``{"op": "migrate"}``: receive one migration on the listener, measure
  post-copy demand-fault latency right after ``receive()`` returns (the
  first read of random pages, or :meth:`Received.ensure` where pages do not
  fault in by themselves), wait for every page, and answer with the
  per-page hash table of the received region, the CPU time and the peak RSS
  of this process, and the destination's statistics;
- ``{"op": "bare"}`` / ``{"op": "naive"}``: receive ``nbytes`` over a plain
  socket (the transport ceiling, and the naive ``bytes()`` + ``sendall``);
- ``{"op": "quit"}``.

Run it by hand with ``python -m migcore.bench.destination`` to check that it
starts (it then serves one command read from stdin as JSON).
"""

from __future__ import annotations

import dataclasses
import gc
import json
import logging
import mmap
import socket
import struct
import sys
import time
from multiprocessing.connection import Connection
from typing import Any

import numpy as np
import xxhash

import migcore
from migcore import _kernels
from migcore.bench import _resources

log = logging.getLogger("migcore.bench")

#: Longest wait for the bench process to connect, per command.
ACCEPT_TIMEOUT = 120.0
#: Bytes per recv_into call of the plain-socket baselines.
CHUNK = 8 << 20


def _recv_exact_into(sock: socket.socket, view: memoryview) -> None:
    got = 0
    while got < view.nbytes:
        k = sock.recv_into(view[got:], min(CHUNK, view.nbytes - got))
        if k == 0:
            raise ConnectionError(f"peer closed after {got} of {view.nbytes} bytes")
        got += k


def _measure_faults(received: migcore.Received, samples: int, seed: int) -> tuple[list[float], int]:
    """Time the first access of random single pages right after the post-copy switch.

    With transparent post-copy (userfaultfd) the access is a plain read of
    the page, which faults and waits for it; otherwise it is
    :meth:`Received.ensure`, what such a program calls before reading.
    Returns the latencies (seconds) of the pages that were still missing when
    asked (true demand faults) and how many asked pages were already present.
    """
    region = received.region
    ps = region.page_size
    rng = np.random.default_rng(seed)
    pages = rng.integers(0, region.npages, size=samples)
    view = region.view
    latencies: list[float] = []
    hits = 0
    for page in pages.tolist():
        offset = page * ps
        was_missing = received.missing_in(offset, 1) > 0
        t0 = time.perf_counter()
        if received.transparent:
            view[offset]  # the first touch: a page fault that the post-copy loop serves
        else:
            received.ensure(offset, min(ps, region.nbytes - offset), timeout=ACCEPT_TIMEOUT)
        dt = time.perf_counter() - t0
        if was_missing:
            latencies.append(dt)
        else:
            hits += 1
    return latencies, hits


class _Server:
    """The listener and the plain socket, bound once; one command at a time."""

    def __init__(self) -> None:
        self.listener = migcore.listen("tcp://127.0.0.1:0", timeout=ACCEPT_TIMEOUT)
        self.plain = socket.create_server(("127.0.0.1", 0))
        self.plain.settimeout(ACCEPT_TIMEOUT)

    def addresses(self) -> dict[str, Any]:
        host, port = self.plain.getsockname()[:2]
        return {"listener": self.listener.address, "plain": [host, port]}

    def migrate(self, cmd: dict[str, Any]) -> dict[str, Any]:
        _resources.reset_peak()
        base_rss = _resources.rss()
        cpu0 = _resources.cpu_time()
        t0 = time.monotonic()
        received = self.listener.receive(timeout=cmd.get("timeout", ACCEPT_TIMEOUT))
        switch = time.monotonic() - t0
        faults: list[float] = []
        hits = 0
        if cmd.get("faults", 0) and received.mode in ("postcopy", "hybrid") and received.missing_pages:
            faults, hits = _measure_faults(received, int(cmd["faults"]), int(cmd.get("seed", 0)))
        received.wait(timeout=cmd.get("timeout", ACCEPT_TIMEOUT))
        complete = time.monotonic() - t0
        cpu = _resources.cpu_time() - cpu0
        peak = _resources.peak_rss()
        region = received.region
        hashes = np.empty(region.npages, dtype=np.uint64)
        _kernels.hash_pages(region.view, region.page_size, hashes)
        result = {
            "ok": True,
            "hashes": hashes,
            "state_hash": xxhash.xxh3_64_intdigest(received.state),
            "cpu": cpu,
            "peak_rss": peak,
            "base_rss": base_rss,
            "switch_time": switch,
            "complete_time": complete,
            "faults": faults,
            "fault_hits": hits,
            "stats": dataclasses.asdict(received.stats),
        }
        del received, region
        gc.collect()
        return result

    def plain_receive(self, nbytes: int, *, naive: bool) -> dict[str, Any]:
        """Receive ``nbytes`` over a plain socket: into a fresh mapping, or (naive) into a bytearray."""
        _resources.reset_peak()
        base_rss = _resources.rss()
        cpu0 = _resources.cpu_time()
        conn, _ = self.plain.accept()
        with conn:
            conn.settimeout(ACCEPT_TIMEOUT)
            if naive:
                head = bytearray(8)
                _recv_exact_into(conn, memoryview(head))
                (n,) = struct.unpack("<Q", head)
                data = bytearray(n)
                _recv_exact_into(conn, memoryview(data))
                conn.sendall(b"k")
                del data
            else:
                buf = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
                view = memoryview(buf)
                _recv_exact_into(conn, view)
                conn.sendall(b"k")
                view.release()
                buf.close()
        return {"ok": True, "cpu": _resources.cpu_time() - cpu0, "peak_rss": _resources.peak_rss(), "base_rss": base_rss}

    def handle(self, cmd: dict[str, Any]) -> dict[str, Any]:
        op = cmd.get("op")
        try:
            if op == "migrate":
                return self.migrate(cmd)
            if op in ("bare", "naive"):
                return self.plain_receive(int(cmd["nbytes"]), naive=op == "naive")
            return {"ok": False, "error": f"unknown command {op!r}"}
        except Exception as exc:  # noqa: BLE001 - reported to the bench process
            log.info("bench destination: %s failed: %r", op, exc)
            gc.collect()
            return {"ok": False, "error": f"{type(exc).__name__}: {exc}"}

    def close(self) -> None:
        self.listener.close()
        self.plain.close()


def serve(pipe: Connection) -> None:
    """The process body: bind, report the addresses, then answer commands until ``quit``."""
    server = _Server()
    try:
        pipe.send(server.addresses())
        while True:
            cmd: dict[str, Any] = pipe.recv()
            if cmd.get("op") == "quit":
                break
            pipe.send(server.handle(cmd))
    except (EOFError, BrokenPipeError):
        pass  # the bench process went away
    finally:
        server.close()


def main() -> int:
    """Bind, print the addresses as JSON, serve one command read from stdin as JSON."""
    server = _Server()
    try:
        print(json.dumps(server.addresses()), flush=True)
        line = sys.stdin.readline()
        if line.strip():
            result = server.handle(json.loads(line))
            result.pop("hashes", None)
            print(json.dumps(result, default=str), flush=True)
    finally:
        server.close()
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
