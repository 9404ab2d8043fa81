"""Rules 3 and 4: forged bytes over real sockets, silent and vanishing peers, links cut at several points."""

from __future__ import annotations

import re

import socket
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

import migcore
from migcore import _postcopy_wire as PW
from migcore import _protocol as P

from _live import GuardedAllocations, Receiver, random_region
from _proxy import CutProxy

MIB = 1 << 20
NBYTES = 16 * 4096 + 100  # 17 pages, the last one partial
TIMEOUT = 1.5


class Forged:
    """A hand-driven 'source' that speaks (or breaks) the protocol byte by byte."""

    def __init__(self, address: str) -> None:
        port = int(address.rsplit(":", 1)[1])
        self.sock = socket.create_connection(("127.0.0.1", port))

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def hello(self, *, nbytes: int = NBYTES, mode: str = "precopy", state_size: int = P.UNKNOWN_SIZE) -> P.Accept:
        h = P.Hello(P.PROTOCOL_VERSION, 4096, nbytes, mode, "hash", P.FEATURE_POSTCOPY, None, b"\x01" * 16, state_size)
        self.sent_hello = h
        self.send(P.encode_hello(h))
        header, body = self.read_frame()
        assert header is not None and header.type is P.Frame.ACCEPT
        return P.decode_accept(body)

    def binding(self, state: bytes) -> bytes:
        """The binding digest an honest source sends for its HELLO and ``state``."""
        return P.binding_digest(self.sent_hello, state)

    def read_frame(self) -> tuple[P.Header | None, bytes]:
        """The next frame from the destination, or (None, b"") at end of stream."""
        self.sock.settimeout(TIMEOUT * 2)
        try:
            raw = self._read(P.HEADER_SIZE)
            if raw is None:
                return None, b""
            header = P.decode_header(raw)
            body = self._read(header.length) if header.type is not P.Frame.PAGES else b""
            return header, body or b""
        except (ConnectionError, TimeoutError):
            return None, b""

    def _read(self, n: int) -> bytes | None:
        buf = b""
        while len(buf) < n:
            chunk = self.sock.recv(n - len(buf))
            if not chunk:
                return None
            buf += chunk
        return buf

    def close(self) -> None:
        self.sock.close()


def pages_frame(rows: list[tuple[int, int]], payload: bytes, *, length: int | None = None, flags: int = 0) -> bytes:
    runs = np.array(rows, dtype=np.uint64).reshape(-1, 2)
    return P.encode_runs_header(P.Frame.PAGES, runs, len(payload) if length is None else length, flags=flags) + payload


def good_migration(listener: migcore.Listener) -> None:
    """The listener still serves a well-behaved source after a bad one."""
    region = random_region(300_000, seed=99)
    rx = Receiver(listener)
    migcore.migrate(region, listener.address, mode="precopy", state=b"next", timeout=10)
    rx.join()
    assert rx.error is None and rx.received is not None
    assert bytes(rx.received.region.view) == bytes(region.view) and rx.received.state == b"next"


def serve_forged(
    monkeypatch: pytest.MonkeyPatch, script: Callable[[Forged], Any], expected: type[BaseException]
) -> tuple[BaseException, GuardedAllocations, Any]:
    """Run ``script`` against a real listener; return the destination's error and what the script returned."""
    allocs = GuardedAllocations().install(monkeypatch)
    with migcore.listen("tcp://127.0.0.1:0", timeout=TIMEOUT) as listener:
        rx = Receiver(listener, timeout=TIMEOUT)
        forged = Forged(listener.address)
        try:
            started = time.monotonic()
            out = script(forged)
            rx.join(TIMEOUT * 3)
            assert time.monotonic() - started < TIMEOUT * 3
        finally:
            forged.close()
        assert isinstance(rx.error, expected), repr(rx.error)
        assert allocs.guards_intact()
        good_migration(listener)
    return rx.error, allocs, out


def expect_error_frame(forged: Forged, code: P.ErrorCode) -> str:
    header, body = forged.read_frame()
    assert header is not None and header.type is P.Frame.ERROR, header
    got, message = P.decode_error(body)
    assert got is code
    return message


# -- bad input before any allocation ------------------------------------------------------


def test_wrong_magic(monkeypatch: pytest.MonkeyPatch) -> None:
    def script(f: Forged) -> None:
        raw = bytearray(P.encode_hello(P.Hello(1, 4096, NBYTES, "precopy", "hash", 0, None, b"\0" * 16)))
        raw[P.HEADER_SIZE : P.HEADER_SIZE + 4] = b"QEMU"
        f.send(bytes(raw))
        expect_error_frame(f, P.ErrorCode.PROTOCOL)

    err, allocs, _ = serve_forged(monkeypatch, script, migcore.ProtocolError)
    assert "magic" in str(err) and allocs.sizes == [300_000]  # only the good migration allocated


def test_wrong_version_is_refused_by_name(monkeypatch: pytest.MonkeyPatch) -> None:
    def script(f: Forged) -> None:
        raw = bytearray(P.encode_hello(P.Hello(1, 4096, NBYTES, "precopy", "hash", 0, None, b"\0" * 16)))
        raw[P.HEADER_SIZE + 4 : P.HEADER_SIZE + 6] = (7).to_bytes(2, "little")
        f.send(bytes(raw))
        header, body = f.read_frame()
        assert header is not None and header.type is P.Frame.REFUSE
        assert P.decode_refuse(body).field == "version"

    err, allocs, _ = serve_forged(monkeypatch, script, migcore.CompatibilityError)
    assert "version 7" in str(err) and allocs.sizes == [300_000]


def test_garbage_from_a_non_migcore_client(monkeypatch: pytest.MonkeyPatch) -> None:
    def script(f: Forged) -> None:
        f.send(b"GET / HTTP/1.1\r\nHost: example\r\n\r\n")

    err, allocs, _ = serve_forged(monkeypatch, script, migcore.ProtocolError)
    assert "unknown frame type" in str(err) and allocs.sizes == [300_000]


def test_oversized_hello(monkeypatch: pytest.MonkeyPatch) -> None:
    def script(f: Forged) -> None:
        f.send(P.encode_header(P.Frame.HELLO, length=1 << 40))

    err, _, _ = serve_forged(monkeypatch, script, migcore.ProtocolError)
    assert "exceeds the limit" in str(err)


def test_silent_peer_times_out(monkeypatch: pytest.MonkeyPatch) -> None:
    def script(f: Forged) -> None:
        time.sleep(TIMEOUT + 0.5)

    err, allocs, _ = serve_forged(monkeypatch, script, migcore.MigrationTimeout)
    assert isinstance(err, TimeoutError) and allocs.sizes == [300_000]


# -- bad frames after the handshake: the region was allocated, then discarded -------------


@pytest.mark.parametrize(
    ("frame", "pattern"),
    [
        (pages_frame([(17, 1)], b""), "outside the region"),
        (pages_frame([(16, 2)], b""), "outside the region"),
        (pages_frame([((1 << 64) - 1, 2)], b""), "outside the region"),
        (pages_frame([(1, (1 << 64) - 1)], b""), "outside the region"),
        (pages_frame([(2, 1), (1, 1)], b""), "ascending"),
        (pages_frame([(0, 0)], b""), "count of 0"),
        (pages_frame([(1, 2)], b"", length=4096), "announces 4096 payload bytes but its 2 pages hold 8192"),
        (pages_frame([(16, 1)], b"", length=4096), "announces 4096 payload bytes but its 1 pages hold 100"),
        (pages_frame([(0, 1)], b"", length=1 << 40), "exceeds the agreed"),
        (P.encode_header(P.Frame.PAGES, count=0, length=0), "0 runs"),
        (P.encode_header(P.Frame.PAGES, count=1 << 31, length=0), "runs"),
        (pages_frame([(0, 1)], b"\1" * 4096, flags=P.FLAG_POSTCOPY), "flags"),
        (P.encode_header(P.Frame.ROUND_END, count=5), "ROUND_END for round 5"),
        (P.encode_header(P.Frame.COMPLETE, length=16) + b"\0" * 16, "unexpected COMPLETE"),
        (P.encode_header(P.Frame.ACK, count=0, length=0), "unexpected ACK"),
        (P.encode_header(P.Frame.HELLO, length=0), "unexpected HELLO"),
        (bytes([77]) + bytes(15), "unknown frame type 77"),
        (P.encode_header(P.Frame.STATE, length=P.DEFAULT_MAX_STATE + 1), "larger than the agreed"),
    ],
    ids=lambda v: v if isinstance(v, str) else "",
)
def test_bad_frames_are_rejected(monkeypatch: pytest.MonkeyPatch, frame: bytes, pattern: str) -> None:
    def script(f: Forged) -> str:
        f.hello()
        f.send(pages_frame([(0, 1)], b"\x07" * 4096))  # a good frame first: the region has data
        f.send(frame)
        return expect_error_frame(f, P.ErrorCode.PROTOCOL)

    err, allocs, message = serve_forged(monkeypatch, script, migcore.ProtocolError)
    assert pattern in str(err) and pattern in message
    assert allocs.sizes == [NBYTES, 300_000]
    # the rejected region got only the bytes of the good frame
    region = np.frombuffer(allocs.buffers[0], dtype=np.uint8)[GuardedAllocations.GUARD : -GuardedAllocations.GUARD]
    assert np.count_nonzero(region) == 4096 and (region[:4096] == 7).all()


def test_state_larger_than_declared(monkeypatch: pytest.MonkeyPatch) -> None:
    def script(f: Forged) -> None:
        f.hello(state_size=10)
        f.send(P.encode_header(P.Frame.STATE, length=11) + b"x" * 11)
        expect_error_frame(f, P.ErrorCode.PROTOCOL)

    err, _, _ = serve_forged(monkeypatch, script, migcore.ProtocolError)
    assert "larger than the agreed 10" in str(err)


def test_state_larger_than_the_listeners_limit_is_refused() -> None:
    with migcore.listen("tcp://127.0.0.1:0", timeout=TIMEOUT, max_state_bytes=100) as listener:
        rx = Receiver(listener, timeout=TIMEOUT)
        resumed: list[bool] = []
        with pytest.raises(migcore.MigrationError, match="exceeds the destination's limit of 100"):
            migcore.migrate(bytearray(b"a" * 8192), listener.address, state=lambda: b"s" * 101,
                            resume=lambda: resumed.append(True), timeout=TIMEOUT)
        rx.join()
        assert resumed == [True]  # pause had returned: the program is told to carry on
        assert isinstance(rx.error, migcore.MigrationError)


def test_truncated_mid_page_then_close(monkeypatch: pytest.MonkeyPatch) -> None:
    def script(f: Forged) -> None:
        f.hello()
        f.send(pages_frame([(0, 3)], b"\x09" * 5000, length=3 * 4096))
        time.sleep(0.2)
        f.sock.shutdown(socket.SHUT_WR)

    err, allocs, _ = serve_forged(monkeypatch, script, migcore.PeerLostError)
    assert "5000 of 12288" in str(err)


def test_peer_vanishes_silently_mid_round(monkeypatch: pytest.MonkeyPatch) -> None:
    def script(f: Forged) -> None:
        f.hello()
        f.send(pages_frame([(0, 3)], b"\x09" * 5000, length=3 * 4096))
        time.sleep(TIMEOUT + 0.5)

    serve_forged(monkeypatch, script, migcore.MigrationTimeout)


def test_wrong_digest_is_a_verification_error(monkeypatch: pytest.MonkeyPatch) -> None:
    def script(f: Forged) -> None:
        f.hello()
        f.send(pages_frame([(0, 1)], b"\x05" * 4096))
        f.send(P.encode_header(P.Frame.STATE, length=2) + b"st")
        f.send(P.encode_complete(b"\xee" * 16, f.binding(b"st")))
        expect_error_frame(f, P.ErrorCode.VERIFICATION)

    err, _, _ = serve_forged(monkeypatch, script, migcore.VerificationError)
    assert "nothing committed" in str(err)


def test_source_cancel_is_reported(monkeypatch: pytest.MonkeyPatch) -> None:
    def script(f: Forged) -> None:
        f.hello()
        f.send(P.encode_cancel("operator said no"))

    err, _, _ = serve_forged(monkeypatch, script, migcore.MigrationCancelled)
    assert "operator said no" in str(err)


# -- post-copy: errors after the switch keep what arrived ----------------------------------


def postcopy_switch(f: Forged, owed_pages: list[int]) -> None:
    f.hello(mode="postcopy")
    owed = np.zeros(1, dtype=np.uint64)
    for p in owed_pages:
        owed[0] |= np.uint64(1 << p)
    f.send(P.encode_header(P.Frame.STATE, length=1) + b"s")
    f.send(PW.encode_postcopy(b"\0" * 16, owed, f.binding(b"s")))
    header, _ = f.read_frame()
    assert header is not None and header.type is P.Frame.SWITCHED


@pytest.mark.parametrize(
    ("frame", "pattern"),
    [
        (P.encode_header(P.Frame.POSTCOPY, count=0, length=40) + bytes(40), "POSTCOPY"),
        (P.encode_header(P.Frame.POSTCOPY, count=3, length=56) + bytes(56), "bitmap of 3 words"),
        (P.encode_header(P.Frame.POSTCOPY, count=1, length=32) + bytes(32), "POSTCOPY"),
        (P.encode_header(P.Frame.POSTCOPY, count=0, length=1 << 40), "POSTCOPY"),
    ],
    ids=["no-bitmap-but-bytes", "wrong-words", "bitmap-missing", "oversized"],
)
def test_malformed_postcopy_switch_is_rejected(monkeypatch: pytest.MonkeyPatch, frame: bytes, pattern: str) -> None:
    def script(f: Forged) -> str:
        f.hello(mode="postcopy")
        f.send(P.encode_header(P.Frame.STATE, length=1) + b"s")
        f.send(frame)
        return expect_error_frame(f, P.ErrorCode.PROTOCOL)

    err, _, message = serve_forged(monkeypatch, script, migcore.ProtocolError)
    assert pattern in str(err) and pattern in message


def test_postcopy_switch_without_a_bitmap_owes_every_page() -> None:
    with migcore.listen("tcp://127.0.0.1:0", timeout=TIMEOUT) as listener:
        rx = Receiver(listener, wait=False, timeout=TIMEOUT)
        f = Forged(listener.address)
        try:
            f.hello(mode="postcopy")
            f.send(P.encode_header(P.Frame.STATE, length=1) + b"s")
            f.send(PW.encode_postcopy(b"\0" * 16, None, f.binding(b"s")))
            header, _ = f.read_frame()
            assert header is not None and header.type is P.Frame.SWITCHED
            rx.join()
            assert rx.received is not None
            npages = rx.received.region.npages
            assert rx.received.missing_pages == npages
            assert rx.received.missing_in(0, rx.received.region.nbytes) == npages
        finally:
            f.close()


@pytest.mark.parametrize(
    ("after_switch", "pattern"),
    [
        (P.encode_complete(bytes(16), bytes(16)), "unexpected COMPLETE frame during post-copy"),
        (PW.encode_postcopy(b"\0" * 16, np.zeros(1, dtype=np.uint64)), "unexpected POSTCOPY"),
        (pages_frame([(5, 1)], b"\x03" * 4096, flags=P.FLAG_POSTCOPY), "not owed"),
        (pages_frame([(2, 1)], b"\x03" * 4096, flags=P.FLAG_POSTCOPY), "not owed"),  # a second copy
        (pages_frame([(3, 1)], b"\x03" * 4096), "flags"),
        (P.encode_header(P.Frame.END), "still owed"),
        (pages_frame([(5, 1)], b"", flags=P.FLAG_POSTCOPY | P.FLAG_ZERO), "not owed"),
        (pages_frame([(2, 1)], b"", flags=P.FLAG_POSTCOPY | P.FLAG_ZERO), "not owed"),  # already present
        (pages_frame([(3, 1)], bytes(4096), flags=P.FLAG_POSTCOPY | P.FLAG_ZERO), "zero notice with a"),
        (pages_frame([(3, 1)], b"", flags=P.FLAG_ZERO), "flags"),
        (pages_frame([(3, 1)], b"", flags=P.FLAG_POSTCOPY | P.FLAG_ZERO | P.FLAG_COMPRESSED), "flags"),
    ],
    ids=["second-complete", "second-postcopy", "page-not-owed", "page-twice", "precopy-flags", "early-end",
         "zero-not-owed", "zero-twice", "zero-with-payload", "zero-without-postcopy", "zero-compressed"],
)
def test_bad_frames_after_the_postcopy_switch(after_switch: bytes, pattern: str) -> None:
    with migcore.listen("tcp://127.0.0.1:0", timeout=TIMEOUT) as listener:
        rx = Receiver(listener, wait=False, timeout=TIMEOUT)
        f = Forged(listener.address)
        try:
            postcopy_switch(f, [2, 3])
            f.send(pages_frame([(2, 1)], b"\x04" * 4096, flags=P.FLAG_POSTCOPY))
            f.send(after_switch)
            rx.join()
            received = rx.received
            assert received is not None
            expect_error_frame(f, P.ErrorCode.PROTOCOL)
            # after the switch a bad frame pauses the reception: nothing is given up for the program
            with pytest.raises(migcore.MigrationTimeout):
                received.wait(0.3)
            stats = received.stats
            assert stats.status == "postcopy-paused" and re.search(pattern, stats.error), stats
        finally:
            f.close()
        # what arrived stays: page 2 landed before the bad frame; page 3 stays missing until abandon()
        region = received.region
        assert bytes(region.view[2 * 4096 : 3 * 4096]) == b"\x04" * 4096
        assert received.missing_pages == 1
        with pytest.raises(migcore.MigrationTimeout):
            received.ensure(3 * 4096, 10, timeout=0.2)
        received.ensure(2 * 4096, 4096)  # present pages need nothing from the source
        assert received.abandon() == 1
        assert received.missing_pages == 1 and received.stats.status == "failed"
        assert bytes(region.view[3 * 4096 : 4 * 4096]) == bytes(4096)  # the zeros the program chose
        with pytest.raises(migcore.MigrationError, match="abandoned"):
            received.wait(1)
        good_migration(listener)


# -- links cut by a proxy --------------------------------------------------------------------


def cut_run(mode: str, cut_after: int | None, *, region: migcore.Region | None = None,
            wait: bool = True) -> tuple[BaseException | None, Receiver, list[str], migcore.Region, bytes]:
    region = region if region is not None else random_region(4 * MIB + 500, seed=21, zero_fraction=0.1)
    before = bytes(region.view)
    calls: list[str] = []
    with migcore.listen("tcp://127.0.0.1:0", timeout=10) as listener:
        rx = Receiver(listener, wait=wait, timeout=10)
        proxy = CutProxy(listener.address, cut_after)
        err: BaseException | None = None
        try:
            migcore.migrate(region, proxy.address, mode=mode, state=b"st", timeout=10,
                            pause=lambda: calls.append("pause"), resume=lambda: calls.append("resume"))
        except migcore.MigrationError as exc:
            err = exc
        finally:
            proxy.join()
        rx.join()
        good_migration(listener)
    return err, rx, calls, region, before


@pytest.mark.parametrize(
    ("mode", "cut_after", "paused"),
    [
        ("precopy", 20, False),  # inside HELLO
        ("precopy", 100, False),  # after HELLO, before the first page
        ("precopy", 1 * MIB + 1234, False),  # round 0, mid-page
        ("stopcopy", 2 * MIB + 77, True),  # during the pause, mid-page (region far bigger than socket buffers)
        ("postcopy", 40, False),  # handshake of a post-copy migration
    ],
)
def test_cut_before_the_switchover(mode: str, cut_after: int, paused: bool) -> None:
    # the source may run ahead of the cut by the kernel's socket buffers (several MiB on loopback)
    region = random_region((32 if paused else 4) * MIB + 500, seed=21, zero_fraction=0.1)
    err, rx, calls, region, before = cut_run(mode, cut_after, region=region)
    assert isinstance(err, migcore.PeerLostError) and not err.in_doubt, repr(err)
    assert bytes(region.view) == before  # rule 3: the source is untouched
    assert calls == (["pause", "resume"] if paused else [])
    assert isinstance(rx.error, migcore.PeerLostError)  # the destination discarded


def test_cut_after_the_postcopy_switch_keeps_both_sides() -> None:
    region = random_region(4 * MIB, seed=22, zero_fraction=0.0)
    err, rx, calls, _, before = cut_run("postcopy", 2 * MIB + 333, region=region, wait=False)
    assert isinstance(err, migcore.PeerLostError), repr(err)
    assert err.owed_pages == region.npages and err.owed_bytes == region.nbytes and err.migration_id
    assert calls == ["pause"]  # never resumed after the switch
    assert rx.error is None and rx.received is not None
    with pytest.raises(migcore.MigrationTimeout):  # paused: it waits for a recovering source
        rx.received.wait(0.5)
    got = rx.received.region
    assert rx.received.state == b"st"
    assert 0 < rx.received.missing_pages < region.npages
    # the background push goes in page order: the first pages arrived and stay
    assert bytes(got.view[: 64 * 4096]) == before[: 64 * 4096]
    assert rx.received.stats.status == "postcopy-paused"
    assert bytes(region.view) == before  # the source keeps its buffer for a recovery
    lost = rx.received.missing_pages
    assert rx.received.abandon() == lost and rx.received.stats.status == "failed"


# -- hostile frames that once got through ---------------------------------------------------------


def test_a_compressed_batch_that_decodes_past_the_frame_limit_is_refused() -> None:
    """A small zstd frame whose runs claim more page bytes than one frame may carry (a decompression bomb)."""
    from migcore import _codecs

    with migcore.listen("tcp://127.0.0.1:0", timeout=TIMEOUT, max_payload=16384) as listener:
        rx = Receiver(listener, timeout=TIMEOUT)
        f = Forged(listener.address)
        try:
            hello = P.Hello(P.PROTOCOL_VERSION, 4096, NBYTES, "stopcopy", "hash", P.FEATURE_COMPRESS, None,
                            b"\x02" * 16, P.UNKNOWN_SIZE, 1, "zstd")
            f.send(P.encode_hello(hello))
            header, _ = f.read_frame()
            assert header is not None and header.type is P.Frame.ACCEPT
            packed = _codecs.pack(_codecs.get_codec("zstd"), memoryview(bytes(8 * 4096)))
            assert packed is not None and len(packed) < 16384
            f.send(pages_frame([(0, 8)], packed, flags=P.FLAG_COMPRESSED))
            rx.join()
            assert isinstance(rx.error, migcore.ProtocolError) and "exceeds the agreed 16384" in str(rx.error)
            expect_error_frame(f, P.ErrorCode.PROTOCOL)
        finally:
            f.close()
        good_migration(listener)


def test_a_page_larger_than_any_frame_is_refused_in_the_handshake() -> None:
    with migcore.listen("tcp://127.0.0.1:0", timeout=TIMEOUT, max_payload=64 << 10) as listener:
        rx = Receiver(listener, timeout=TIMEOUT)
        region = migcore.Region.allocate(1 << 20, page_size=128 << 10)
        with pytest.raises(migcore.CompatibilityError, match="page_size"):
            migcore.migrate(region, listener.address, mode="postcopy", timeout=TIMEOUT)
        rx.join()
        assert isinstance(rx.error, migcore.CompatibilityError)
        good_migration(listener)


def test_broken_receptions_free_their_tables_without_a_garbage_collection() -> None:
    """Four HELLOs for 256 MiB of 512-byte pages, then silence: each reception's 4 MiB of tables go at once."""
    import gc
    import threading
    import tracemalloc

    gc.collect()
    gc.disable()
    tracemalloc.start()
    try:
        with migcore.listen("tcp://127.0.0.1:0", timeout=TIMEOUT) as listener:
            base = tracemalloc.get_traced_memory()[0]
            for i in range(4):
                rx = Receiver(listener, timeout=TIMEOUT)
                f = Forged(listener.address)
                h = P.Hello(P.PROTOCOL_VERSION, 512, 256 << 20, "precopy", "hash", 0, None, bytes([i + 1]) * 16,
                            P.UNKNOWN_SIZE)
                f.send(P.encode_hello(h))
                header, _ = f.read_frame()
                assert header is not None and header.type is P.Frame.ACCEPT
                f.close()
                rx.join()
                assert isinstance(rx.error, migcore.PeerLostError)
                del rx
            held = tracemalloc.get_traced_memory()[0] - base
    finally:
        tracemalloc.stop()
        gc.enable()
    assert held < 2 << 20, f"{held} bytes still held after four broken receptions"
    assert threading.active_count() < 50


def test_idle_and_dripping_connections_do_not_hold_up_a_real_source() -> None:
    """Thirteen idle connections and one that drips a byte at a time, then a real source: it is served."""
    import threading

    with migcore.listen("tcp://127.0.0.1:0") as listener:  # the default: no timeout of its own
        port = int(listener.address.rsplit(":", 1)[1])
        idle = [socket.create_connection(("127.0.0.1", port)) for _ in range(13)]
        drip = socket.create_connection(("127.0.0.1", port))
        stop = threading.Event()

        def dripping() -> None:
            hello = P.encode_hello(P.Hello(P.PROTOCOL_VERSION, 4096, NBYTES, "precopy", "hash", 0, None,
                                           b"\x03" * 16, P.UNKNOWN_SIZE))
            for b in hello:
                if stop.wait(0.3):
                    return
                try:
                    drip.send(bytes([b]))
                except OSError:
                    return

        t = threading.Thread(target=dripping, daemon=True)
        t.start()
        try:
            region = random_region(1 << 20, seed=5)
            rx = Receiver(listener, timeout=20)
            migcore.migrate(region, listener.address, mode="stopcopy", timeout=10)
            rx.join()
            assert rx.error is None and rx.received is not None
            assert bytes(rx.received.region.view) == bytes(region.view)
        finally:
            stop.set()
            for s in (*idle, drip):
                s.close()
            t.join(5)


def test_a_peer_that_drips_its_opening_is_cut_off_by_the_total_deadline(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each byte comes well within the per-read bound, but the whole opening may not take longer than its deadline."""
    import threading

    from migcore import _intake

    monkeypatch.setattr(_intake, "OPEN_DEADLINE", 1.0)
    with migcore.listen("tcp://127.0.0.1:0") as listener:
        port = int(listener.address.rsplit(":", 1)[1])
        drip = socket.create_connection(("127.0.0.1", port))
        hello = P.encode_hello(P.Hello(P.PROTOCOL_VERSION, 4096, NBYTES, "precopy", "hash", 0, None,
                                       b"\x04" * 16, P.UNKNOWN_SIZE))
        left: list[int] = []

        def dripping() -> None:
            for i, b in enumerate(hello):
                time.sleep(0.1)  # far inside OPEN_TIMEOUT per byte; the HELLO would take seconds
                try:
                    drip.send(bytes([b]))
                except OSError:
                    left.append(len(hello) - i)
                    return
            left.append(0)

        t = threading.Thread(target=dripping, daemon=True)
        t.start()
        with pytest.raises(migcore.MigrationTimeout, match="to open; dropped"):
            listener.receive(timeout=30)
        t.join(30)
        assert left and left[0] > 0  # the listener hung up before the peer could finish its HELLO
        drip.close()
        region = random_region(1 << 20, seed=6)
        rx = Receiver(listener, timeout=20)
        migcore.migrate(region, listener.address, mode="stopcopy", timeout=10)
        rx.join()
        assert rx.error is None and rx.received is not None
        assert bytes(rx.received.region.view) == bytes(region.view)


@pytest.mark.parametrize("mode", ["precopy", "postcopy"])
def test_an_altered_state_is_never_committed(monkeypatch: pytest.MonkeyPatch, mode: str) -> None:
    """The binding digest covers the state: a STATE changed on the way fails before commit or switch."""

    def script(f: Forged) -> None:
        f.hello(mode=mode)
        if mode == "precopy":
            f.send(pages_frame([(0, 1)], b"\x05" * 4096))
        f.send(P.encode_header(P.Frame.STATE, length=2) + b"sT")  # the source sent "st"
        if mode == "precopy":  # the binding is checked first: the state is what fails, whatever the pages
            f.send(P.encode_complete(bytes(16), f.binding(b"st")))
        else:
            f.send(PW.encode_postcopy(bytes(16), None, f.binding(b"st")))
        expect_error_frame(f, P.ErrorCode.VERIFICATION)

    err, _, _ = serve_forged(monkeypatch, script, migcore.VerificationError)
    assert "state" in str(err) and "nothing committed" in str(err)


def test_an_altered_hello_field_is_never_committed(monkeypatch: pytest.MonkeyPatch) -> None:
    """What the destination acted on (here the region size) must be what the source described."""

    def script(f: Forged) -> None:
        f.hello(mode="postcopy", nbytes=NBYTES)
        honest = P.Hello(**{**f.sent_hello.__dict__, "nbytes": NBYTES + 4096})  # what the source really sent
        f.send(P.encode_header(P.Frame.STATE, length=1) + b"s")
        f.send(PW.encode_postcopy(bytes(16), None, P.binding_digest(honest, b"s")))
        expect_error_frame(f, P.ErrorCode.VERIFICATION)

    serve_forged(monkeypatch, script, migcore.VerificationError)
