"""A small key-value server that live-migrates to another host with migcore, while serving.

The store keeps fixed-size records (key, value, version) in a NumPy structured
array: that array is the migcore region. Its bookkeeping (which slot holds
which key, the free slots, request counters) is small and goes in the state
blob, taken while the store is paused. Clients talk a line protocol over TCP::

    SET key value      ->  OK
    GET key            ->  VALUE value  |  NOTFOUND
    DEL key            ->  OK  |  NOTFOUND
    STATS              ->  STATS {"sets": ..., ...}
    MIGRATE tcp://DEST:PORT HOST:PORT [MODE]
                       ->  MOVED HOST:PORT  (the store now lives there)  |  ERROR ...

During the migration the server keeps answering; writes block only for the
pause (milliseconds). Once the store has moved, every request is answered
``MOVED HOST:PORT`` and the client (``KVClient``) follows it. On the
destination the store is rebuilt from ``received.region`` and
``received.state`` and carries on; after a post-copy switch it calls
``received.ensure()`` for a record's bytes before it touches them.

Run it on two hosts that share a secret (a file holding one line, say
``python -c "import secrets; print(secrets.token_hex(32))" > token``)::

    host-b$ python kvstore_server.py receive tcp://0.0.0.0:7100 --host 0.0.0.0 --port 7001 --token-file token
    host-a$ python kvstore_server.py serve --port 7000 --token-file token
    host-a$ printf 'SET hello world\\nMIGRATE tcp://host-b:7100 host-b:7001\\n' | nc localhost 7000

A destination reachable from other hosts refuses to listen without a token
(or TLS); ``--insecure`` accepts unauthenticated sources anyway.

or both ends in one process, with a client writing all along, and a check
that every acknowledged write is readable on the destination::

    python kvstore_server.py --self-test [--mode postcopy]
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import socket
import socketserver
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np

import migcore

logger = logging.getLogger("kvstore")

#: One record: 256 bytes, so 16 records per 4 KiB page.
RECORD = np.dtype([("key", "S32"), ("value", "S216"), ("version", "<u8")])
assert RECORD.itemsize == 256


class Moved(Exception):
    """The store migrated away; ``address`` is where it serves now."""

    def __init__(self, address: str) -> None:
        super().__init__(address)
        self.address = address


class KVStore:
    """Fixed-size records in a NumPy array (the migcore region) plus a key -> slot index."""

    def __init__(self, capacity: int = 16384, *, records: np.ndarray | None = None) -> None:
        self.records = np.zeros(capacity, dtype=RECORD) if records is None else records
        self.region = migcore.Region(self.records)
        self.index: dict[str, int] = {}
        self.free: list[int] = []
        self.next_slot = 0
        self.counters = {"sets": 0, "gets": 0, "deletes": 0, "migrations": 0}
        self.lock = threading.Lock()
        self.moved_to: str | None = None
        # post-copy: blocks until bytes [offset, offset + length) of the region are present
        self._ensure: Callable[[int, int], Any] | None = None

    @property
    def capacity(self) -> int:
        return len(self.records)

    # ---- requests (each under the lock, which pause() holds during the switch) ----------

    def _check(self) -> None:
        if self.moved_to is not None:
            raise Moved(self.moved_to)

    def _touch(self, slot: int) -> None:
        if self._ensure is not None:
            self._ensure(slot * RECORD.itemsize, RECORD.itemsize)

    def set(self, key: str, value: str) -> None:
        kb, vb = key.encode(), value.encode()
        if not 0 < len(kb) <= 32 or len(vb) > 216 or b"\0" in kb + vb:
            raise ValueError("keys are 1-32 bytes, values at most 216 bytes, no NUL")
        with self.lock:
            self._check()
            slot = self.index.get(key)
            if slot is None:
                if self.free:
                    slot = self.free.pop()
                elif self.next_slot < self.capacity:
                    slot, self.next_slot = self.next_slot, self.next_slot + 1
                else:
                    raise ValueError("store full")
                self.index[key] = slot
            self._touch(slot)
            version = int(self.records[slot]["version"]) + 1
            self.records[slot] = (kb, vb, version)
            # tell migcore which bytes changed (the cheap "writes" tracker), after writing
            self.region.mark_dirty(slot * RECORD.itemsize, RECORD.itemsize)
            self.counters["sets"] += 1

    def get(self, key: str) -> str | None:
        with self.lock:
            self._check()
            self.counters["gets"] += 1
            slot = self.index.get(key)
            if slot is None:
                return None
            self._touch(slot)
            return bytes(self.records[slot]["value"]).decode()

    def delete(self, key: str) -> bool:
        with self.lock:
            self._check()
            slot = self.index.pop(key, None)
            if slot is None:
                return False
            self._touch(slot)
            self.records[slot] = (b"", b"", 0)
            self.region.mark_dirty(slot * RECORD.itemsize, RECORD.itemsize)
            self.free.append(slot)
            self.counters["deletes"] += 1
            return True

    def stats(self) -> dict[str, int]:
        with self.lock:
            self._check()
            return {**self.counters, "keys": len(self.index), "capacity": self.capacity}

    # ---- migration ------------------------------------------------------------------------

    def state(self) -> bytes:
        """The bookkeeping, taken while paused: it goes in migcore's state blob."""
        return json.dumps(
            {
                "format": 1,
                "index": self.index,
                "free": self.free,
                "next_slot": self.next_slot,
                "counters": self.counters,
            }
        ).encode()

    def migrate(self, address: str, moved_to: str, **options: Any) -> migcore.MigrationStats:
        """Move the store to the migcore listener at ``address``; clients are sent to ``moved_to``.

        Keeps serving until the pause. If the migration fails before the
        switchover the store carries on here, as if nothing happened.
        """
        paused = False

        def pause() -> None:
            nonlocal paused
            self.lock.acquire()  # waits for the request in flight; later ones queue up
            paused = True

        def resume() -> None:  # migcore calls it if the migration fails before the switchover
            nonlocal paused
            paused = False
            self.lock.release()

        options.setdefault("tracker", "writes")
        try:
            stats = migcore.migrate(self.region, address, pause=pause, resume=resume, state=self.state, **options)
        except migcore.MigrationError:
            if paused:  # failed after the switchover (or in doubt): the newest state may live there
                self.moved_to = moved_to
                self.lock.release()
            raise
        self.moved_to = moved_to
        self.lock.release()
        logger.info("migrated to %s in %.3f s (downtime %.1f ms)", moved_to, stats.total_time, stats.downtime * 1e3)
        return stats

    @classmethod
    def from_received(cls, received: Any) -> KVStore:
        """Rebuild the store on the destination from a ``migcore`` ``Received``."""
        records = np.frombuffer(received.region.view, dtype=RECORD)
        store = cls(records=records)
        state = json.loads(bytes(received.state))
        if state.get("format") != 1:
            raise ValueError(f"unknown state format {state.get('format')!r}")
        store.index = {str(k): int(v) for k, v in state["index"].items()}
        store.free = [int(s) for s in state["free"]]
        store.next_slot = int(state["next_slot"])
        store.counters = {str(k): int(v) for k, v in state["counters"].items()}
        store.counters["migrations"] += 1
        store._ensure = received.ensure  # post-copy: pages may still be arriving
        return store


# ---- the line protocol ----------------------------------------------------------------------


class KVServer(socketserver.ThreadingTCPServer):
    """Serves a ``KVStore`` on ``(host, port)``; the store may be attached after binding."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(
        self, host: str = "127.0.0.1", port: int = 0, store: KVStore | None = None, token: bytes | None = None
    ) -> None:
        super().__init__((host, port), _Handler)
        self.store = store
        self.token = token  # proves this source to the destination of a MIGRATE
        self.ready = threading.Event()
        if store is not None:
            self.ready.set()
        self._thread: threading.Thread | None = None

    @property
    def address(self) -> str:
        host, port = self.server_address[:2]
        return f"{host!s}:{port}"

    def attach(self, store: KVStore) -> None:
        self.store = store
        self.ready.set()

    def start(self) -> KVServer:
        self._thread = threading.Thread(target=self.serve_forever, name="kvstore-server", daemon=True)
        self._thread.start()
        return self

    def close(self) -> None:
        self.shutdown()
        self.server_close()


class _Handler(socketserver.StreamRequestHandler):
    server: KVServer

    def handle(self) -> None:
        for raw in self.rfile:
            line = raw.decode(errors="replace").rstrip("\r\n")
            if not line:
                continue
            reply = self.answer(line)
            self.wfile.write(reply.encode() + b"\n")

    def answer(self, line: str) -> str:
        self.server.ready.wait()
        store = self.server.store
        assert store is not None
        cmd, _, rest = line.partition(" ")
        try:
            if cmd == "SET":
                key, _, value = rest.partition(" ")
                store.set(key, value)
                return "OK"
            if cmd == "GET":
                found = store.get(rest)
                return "NOTFOUND" if found is None else f"VALUE {found}"
            if cmd == "DEL":
                return "OK" if store.delete(rest) else "NOTFOUND"
            if cmd == "STATS":
                return "STATS " + json.dumps(store.stats())
            if cmd == "MIGRATE":
                address, moved_to, mode = (rest.split() + ["", ""])[:3]
                store.migrate(address, moved_to or address, mode=mode or "precopy", timeout=30, token=self.server.token)
                return f"MOVED {store.moved_to}"
            return f"ERROR unknown command {cmd!r}"
        except Moved as moved:
            return f"MOVED {moved.address}"
        except (ValueError, migcore.MigrationError) as exc:
            return f"ERROR {type(exc).__name__}: {exc}"


class KVClient:
    """A blocking client that follows ``MOVED`` replies to wherever the store went."""

    def __init__(self, address: str, timeout: float = 30.0) -> None:
        self.address = address
        self.timeout = timeout
        self.redirects = 0
        self._connect()

    def _connect(self) -> None:
        host, port = self.address.rsplit(":", 1)
        self.sock = socket.create_connection((host, int(port)), timeout=self.timeout)
        self.file = self.sock.makefile("rwb")

    def request(self, line: str) -> str:
        for _ in range(5):
            self.file.write(line.encode() + b"\n")
            self.file.flush()
            reply = self.file.readline().decode().rstrip("\n")
            if not reply:
                raise ConnectionError(f"{self.address} closed the connection")
            if not reply.startswith("MOVED ") or line.startswith("MIGRATE"):
                return reply
            self.close()
            self.address = reply.split(" ", 1)[1]
            self.redirects += 1
            self._connect()
        raise ConnectionError("too many redirects")

    def set(self, key: str, value: str) -> None:
        reply = self.request(f"SET {key} {value}")
        if reply != "OK":
            raise RuntimeError(reply)

    def get(self, key: str) -> str | None:
        reply = self.request(f"GET {key}")
        if reply == "NOTFOUND":
            return None
        if not reply.startswith("VALUE "):
            raise RuntimeError(reply)
        return reply[len("VALUE ") :]

    def close(self) -> None:
        self.file.close()
        self.sock.close()


# ---- running it ---------------------------------------------------------------------------------


def receive_and_serve(listener: Any, server: KVServer, timeout: float | None = None) -> KVStore:
    """Destination side: wait for one migration, rebuild the store and serve it with ``server``.

    A migration that fails before its switchover (a source with the wrong
    token, a refused handshake) left nothing here: wait for the next one.
    """
    while True:
        try:
            received = listener.receive(timeout=timeout)
            break
        except migcore.MigrationTimeout:
            raise
        except migcore.MigrationError as exc:
            logger.warning("a migration failed (%s: %s); still waiting on %s", type(exc).__name__, exc, listener.address)
    store = KVStore.from_received(received)
    server.attach(store)
    logger.info("store received: %d keys; serving on %s", len(store.index), server.address)

    def settle() -> None:  # post-copy: once every page is here, stop calling ensure()
        received.wait()
        store._ensure = None

    threading.Thread(target=settle, name="kvstore-settle", daemon=True).start()
    return store


def self_test(mode: str = "precopy", keys: int = 3000, capacity: int = 16384, tracker: str = "writes") -> int:
    """Two stores in one process; a client writes throughout the migration; check every write."""
    source = KVStore(capacity)
    src_server = KVServer(store=source).start()
    dst_server = KVServer().start()  # bound now, so the source can send clients to it
    acked: dict[str, str] = {}
    rng = random.Random(0)
    with migcore.listen("tcp://127.0.0.1:0") as listener:
        client = KVClient(src_server.address)
        for i in range(keys // 2):  # half the keys before the migration starts
            value = f"v{i}-{rng.getrandbits(32):08x}"
            client.set(f"key{i}", value)
            acked[f"key{i}"] = value
        stop = threading.Event()
        writer_error: list[BaseException] = []

        def writer() -> None:  # keeps writing through the migration, following MOVED
            try:
                i = 0
                while not stop.is_set():
                    key = f"key{i % keys}"
                    value = f"w{i}-{rng.getrandbits(32):08x}"
                    client.set(key, value)
                    acked[key] = value
                    i += 1
            except BaseException as exc:  # noqa: BLE001
                writer_error.append(exc)

        result: list[KVStore] = []
        dest = threading.Thread(target=lambda: result.append(receive_and_serve(listener, dst_server, 60)))
        dest.start()
        wthread = threading.Thread(target=writer)
        wthread.start()
        time.sleep(0.2)
        operator = KVClient(src_server.address)
        reply = operator.request(f"MIGRATE {listener.address} {dst_server.address} {mode}")
        operator.close()
        dest.join(60)
        # keep writing on the destination for a moment, then stop and check everything
        deadline = time.monotonic() + 10
        while client.redirects == 0 and time.monotonic() < deadline and wthread.is_alive():
            time.sleep(0.01)
        time.sleep(0.2)
        stop.set()
        wthread.join(60)
    print(f"migration: {reply}")
    if not reply.startswith("MOVED") or not result:
        print("self-test FAILED: the migration did not complete")
        return 1
    if writer_error:
        print(f"self-test FAILED: the client failed: {writer_error[0]!r}")
        return 1
    checker = KVClient(dst_server.address)
    wrong = [k for k, v in acked.items() if checker.get(k) != v]
    stats = json.loads(checker.request("STATS").split(" ", 1)[1])
    checker.close()
    client.close()
    src_server.close()
    dst_server.close()
    print(
        f"{len(acked)} keys checked on the destination, {len(wrong)} wrong; client redirected {client.redirects}x; "
        f"destination counters {stats}"
    )
    ok = not wrong and client.redirects >= 1 and stats["migrations"] == 1
    print("self-test passed" if ok else f"self-test FAILED: wrong keys {wrong[:5]}")
    return 0 if ok else 1


def _auth_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--token", default=None, metavar="SECRET", help="shared secret both ends hold")
    p.add_argument("--token-file", default=None, metavar="F", help="read the shared secret from F's first line")


def _token(args: argparse.Namespace) -> bytes | None:
    """The secret from --token or --token-file (a file keeps it out of ``ps``)."""
    if args.token_file:
        with open(args.token_file, "rb") as f:
            return f.readline().rstrip(b"\r\n") or None
    return args.token.encode() if args.token else None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--self-test", action="store_true", help="migrate between two in-process stores and check")
    parser.add_argument("--mode", default="precopy", choices=["precopy", "stopcopy", "postcopy", "hybrid"])
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command")
    serve = sub.add_parser("serve", help="serve a new, empty store")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=7000)
    serve.add_argument("--capacity", type=int, default=16384, help="records (256 bytes each)")
    _auth_options(serve)
    recv = sub.add_parser("receive", help="wait for a store to migrate here, then serve it")
    recv.add_argument("listen", help="migcore address to listen on, e.g. tcp://0.0.0.0:7100")
    recv.add_argument("--host", default="127.0.0.1")
    recv.add_argument("--port", type=int, default=7001)
    _auth_options(recv)
    recv.add_argument("--insecure", action="store_true", help="accept unauthenticated sources from other hosts")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(name)s: %(message)s")
    if args.self_test:
        return self_test(args.mode)
    if args.command not in ("serve", "receive"):
        parser.print_help()
        return 2
    if args.token and args.token_file:
        parser.error("give --token or --token-file, not both")
    try:
        token = _token(args)
        if args.command == "serve":
            server = KVServer(args.host, args.port, KVStore(args.capacity), token=token)
            print(f"serving an empty store on {server.address}", flush=True)
            server.serve_forever()
            return 0
        listener = migcore.listen(args.listen, token=token, insecure=args.insecure)
        server = KVServer(args.host, args.port).start()
    except (OSError, ValueError) as exc:  # a missing token file, a port in use, an unauthenticated public address
        print(f"kvstore_server {args.command}: {exc}", file=sys.stderr)
        return 2
    with listener:
        print(f"waiting for a store on {listener.address}; will serve it on {server.address}", flush=True)
        receive_and_serve(listener, server)
    assert server._thread is not None
    server._thread.join()
    return 0


if __name__ == "__main__":
    sys.exit(main())
