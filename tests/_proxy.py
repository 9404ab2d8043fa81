"""A loopback TCP proxy that forwards both ways, cuts the link after N source-to-destination bytes, or alters them."""

from __future__ import annotations

import select
import socket
import threading


class CutProxy:
    """Accepts one connection, forwards it to ``target`` and cuts both sides after ``cut_after`` bytes."""

    def __init__(self, target: str, cut_after: int | None, *, alter: tuple[bytes, bytes] | None = None) -> None:
        host, port = target.removeprefix("tcp://").rsplit(":", 1)
        self.target = (host, int(port))
        self.cut_after = cut_after
        #: (marker, replacement) of the same length, replaced in the source's bytes wherever it appears
        self.alter = alter
        self.altered = 0
        self.forwarded = 0
        self.cut = threading.Event()
        self.server = socket.create_server(("127.0.0.1", 0))
        self.address = f"tcp://127.0.0.1:{self.server.getsockname()[1]}"
        self._socks: list[socket.socket] = []
        self._lock = threading.Lock()
        self._closed = False
        self._threads: list[threading.Thread] = []
        t = threading.Thread(target=self._accept, daemon=True)
        t.start()
        self._threads.append(t)

    def _accept(self) -> None:
        try:
            client, _ = self.server.accept()
        except OSError:
            return
        try:
            upstream = socket.create_connection(self.target)
        except OSError:
            client.close()
            return
        with self._lock:
            self._socks += [client, upstream]
            if self._closed:
                self._shut()
                return
        for src, dst, counted in ((client, upstream, True), (upstream, client, False)):
            t = threading.Thread(target=self._pump, args=(src, dst, counted), daemon=True)
            t.start()
            self._threads.append(t)

    def _pump(self, src: socket.socket, dst: socket.socket, counted: bool) -> None:
        held = b""  # the tail that may hold the start of a marker split across two reads
        try:
            while True:
                if held and not select.select([src], [], [], 0.05)[0]:
                    dst.sendall(held)  # nothing more is coming now: a held tail was no marker after all
                    held = b""
                data = src.recv(65536)
                if not data:
                    if held:
                        dst.sendall(held)
                    dst.shutdown(socket.SHUT_WR)
                    return
                if counted and self.alter is not None:
                    marker, replacement = self.alter
                    data = held + data
                    self.altered += data.count(marker)
                    data = data.replace(marker, replacement)
                    # hold back only a tail that could start the marker (the rest must flow: the peer waits)
                    keep = next((k for k in range(min(len(marker) - 1, len(data)), 0, -1)
                                 if marker.startswith(data[-k:])), 0)
                    data, held = data[: len(data) - keep], data[len(data) - keep :]
                if counted and self.cut_after is not None:
                    room = self.cut_after - self.forwarded
                    if len(data) >= room:
                        dst.sendall(data[:room])
                        self.forwarded += room
                        self.close()
                        return
                    self.forwarded += len(data)
                dst.sendall(data)
        except OSError:
            self.close()

    def _shut(self) -> None:
        for s in self._socks:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self.cut.set()
            self._shut()
        self.server.close()

    def join(self) -> None:
        self.close()
        for t in self._threads:
            if t is not threading.current_thread():
                t.join(10)
