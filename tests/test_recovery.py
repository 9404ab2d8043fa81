"""Post-copy recovery: a link lost after the switch pauses both ends; ``migcore.recover`` finishes the job.

Every test goes over real sockets (a cutting proxy between the ends), ends
with a byte-for-byte comparison against the source at its pause, and checks
that nothing read zeros in between. The source runs in this process, so the
destination receives without userfaultfd here; the transparent receiver is
covered with a source in another process in ``tests/test_uffd_postcopy.py``.
"""

from __future__ import annotations

import socket
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import migcore
from migcore import _postcopy_wire as PW
from migcore import _protocol as P
from migcore import _recoverable

from _certs import make_pki
from _live import Receiver, Writer, random_region, wait_status
from _proxy import CutProxy

MIB = 1 << 20
TIMEOUT = 10.0


def cut_postcopy(
    listener: migcore.Listener, region: migcore.Region, cut_after: int, **kw: Any
) -> tuple[migcore.PeerLostError, migcore.Received]:
    """A post-copy migration through a proxy that cuts after ``cut_after`` bytes from the source."""
    rx = Receiver(listener, wait=False, timeout=TIMEOUT)
    proxy = CutProxy(listener.address, cut_after)
    try:
        with pytest.raises(migcore.PeerLostError) as info:
            migcore.migrate(region, proxy.address, mode="postcopy", state=b"st", timeout=TIMEOUT, **kw)
    finally:
        proxy.join()
    rx.join()
    assert rx.error is None and rx.received is not None, rx.error
    wait_status(rx.received, "postcopy-paused")
    return info.value, rx.received


# Cut points as a share of the page bytes the push sends: early (the first batches), the middle, late
# (the last batches), and at odd offsets that fall inside frames (headers, run tables, payloads).
CUTS = [0.002, 0.01, 0.03, 0.06, 0.0625, 0.1, 0.125, 0.17, 0.25, 0.2501, 0.36, 0.5, 0.5003, 0.61, 0.75,
        0.77, 0.85, 0.93, 0.97, 0.995]


@pytest.mark.parametrize("share", CUTS)
def test_a_cut_anywhere_in_the_push_is_recovered_byte_for_byte(share: float) -> None:
    region = random_region(4 * MIB + 300, seed=int(share * 1000), zero_fraction=0.2)
    before = bytes(region.view)
    nonzero = sum(1 for p in range(region.npages) if any(before[p * 4096 : (p + 1) * 4096]))
    cut_after = 2048 + int(share * nonzero * 4096)
    with migcore.listen("tcp://127.0.0.1:0", timeout=TIMEOUT) as listener:
        err, received = cut_postcopy(listener, region, cut_after)
        assert err.migration_id == received.migration_id and err.owed_pages == region.npages
        missing = received.missing_pages
        assert 0 < missing <= region.npages
        # the owed pages of a plain reception read as never written (zeros) only because nothing was sent
        # there; ensure() refuses to hand them out while paused
        owed = next(p for p in range(region.npages) if received.missing_in(p * region.page_size, 1))
        with pytest.raises(migcore.MigrationTimeout):
            received.ensure(owed * region.page_size, 1, timeout=0.05)
        stats = migcore.recover(region, listener.address, err.migration_id, timeout=TIMEOUT)
        received.wait(TIMEOUT)
    assert stats.status == "completed" and stats.verified and stats.recoveries == 1
    assert bytes(received.region.view) == before
    assert received.state == b"st"
    rs = received.stats
    assert rs.status == "completed" and rs.verified and rs.recoveries == 1 and rs.paused_time > 0
    # a recovery resends only what the destination lacked (plus the frames around it)
    assert stats.normal_pages + stats.zero_pages == missing


def test_a_program_reading_during_the_outage_gets_the_source_bytes_after_recovery() -> None:
    region = random_region(4 * MIB, seed=3, zero_fraction=0.0)
    before = bytes(region.view)
    ps = region.page_size
    with migcore.listen("tcp://127.0.0.1:0", timeout=TIMEOUT) as listener:
        err, received = cut_postcopy(listener, region, 1 * MIB)
        owed = [p for p in range(region.npages) if received.missing_in(p * ps, 1)]
        pages = [owed[0], owed[len(owed) // 3], owed[-1]]
        got: dict[int, bytes] = {}

        def program() -> None:
            arr = received.region.array()
            for p in pages:
                received.ensure(p * ps, ps)  # blocks through the outage: never hands out a missing page
                got[p] = bytes(arr[p * ps : (p + 1) * ps])  # plain indexing, NumPy

        reader = threading.Thread(target=program, daemon=True)
        reader.start()
        time.sleep(0.3)
        assert got == {} and reader.is_alive()
        migcore.recover(region, listener.address, err.migration_id, timeout=TIMEOUT)
        reader.join(TIMEOUT)
        received.wait(TIMEOUT)
    assert got == {p: before[p * ps : (p + 1) * ps] for p in pages}
    assert bytes(received.region.view) == before


def test_a_link_lost_during_recovery_pauses_again_and_the_next_recovery_finishes() -> None:
    region = random_region(4 * MIB, seed=4, zero_fraction=0.1)
    before = bytes(region.view)
    with migcore.listen("tcp://127.0.0.1:0", timeout=TIMEOUT) as listener:
        err, received = cut_postcopy(listener, region, 600_000)
        for cut in (100, 800_000):  # inside RECOVER's handshake, then in the middle of the resend
            proxy = CutProxy(listener.address, cut)
            try:
                with pytest.raises(migcore.PeerLostError) as again:
                    migcore.recover(region, proxy.address, err.migration_id, timeout=TIMEOUT)
            finally:
                proxy.join()
            assert again.value.migration_id == err.migration_id
            wait_status(received, "postcopy-paused")
        migcore.recover(region, listener.address, err.migration_id, timeout=TIMEOUT)
        received.wait(TIMEOUT)
    assert bytes(received.region.view) == before
    assert received.stats.recoveries >= 2


def test_hybrid_with_a_live_writer_recovers_after_its_switch() -> None:
    region = random_region(8 * MIB, seed=5, zero_fraction=0.1)
    writer = Writer(region, seed=5, hot=64).start()
    with migcore.listen("tcp://127.0.0.1:0", timeout=TIMEOUT) as listener:
        proxy = CutProxy(listener.address, None)

        def cut_soon(received: migcore.Received) -> None:
            time.sleep(0.1)  # the background push runs at 128 KiB/s: still going
            proxy.close()

        rx = Receiver(listener, wait=False, timeout=TIMEOUT, then=cut_soon)
        with pytest.raises(migcore.PeerLostError) as info:
            migcore.migrate(region, proxy.address, mode="hybrid", pause=writer.pause, progress=writer.on_progress,
                            max_rounds=4, downtime_limit=0.0, timeout=TIMEOUT, postcopy_bandwidth_limit=128 << 10,
                            compress="zstd")
        proxy.join()
        rx.join()
        received = rx.received
        assert received is not None
        wait_status(received, "postcopy-paused")
        migcore.recover(region, listener.address, info.value.migration_id, timeout=TIMEOUT)
        received.wait(TIMEOUT)
    assert writer.snapshot is not None and bytes(received.region.view) == writer.snapshot


def test_recovery_with_token_and_tls(tmp_path: Path) -> None:
    pki = make_pki(tmp_path)
    region = random_region(2 * MIB, seed=6)
    before = bytes(region.view)
    with migcore.listen("tcp://127.0.0.1:0", timeout=TIMEOUT, tls=pki.server_context(), token="t0ken") as listener:
        host, port = listener.address.removeprefix("tcp://").rsplit(":", 1)
        rx = Receiver(listener, wait=False, timeout=TIMEOUT)
        proxy = CutProxy(listener.address, 700_000)
        with pytest.raises(migcore.PeerLostError) as info:
            # the proxy's address names 127.0.0.1, which the server certificate holds
            migcore.migrate(region, proxy.address, mode="postcopy", timeout=TIMEOUT, tls=pki.client_context(), token="t0ken")
        proxy.join()
        rx.join()
        received = rx.received
        assert received is not None
        wait_status(received, "postcopy-paused")
        with pytest.raises(migcore.AuthenticationError):
            migcore.recover(region, listener.address, info.value.migration_id, timeout=TIMEOUT,
                            tls=pki.client_context(), token="wrong")
        assert received.stats.status == "postcopy-paused"
        migcore.recover(region, listener.address, info.value.migration_id, timeout=TIMEOUT,
                        tls=pki.client_context(), token="t0ken")
        received.wait(TIMEOUT)
    assert bytes(received.region.view) == before


def test_recovery_refusals_change_nothing() -> None:
    region = random_region(2 * MIB, seed=7)
    before = bytes(region.view)
    with migcore.listen("tcp://127.0.0.1:0", timeout=TIMEOUT, compat="v1") as listener:
        err, received = cut_postcopy(listener, region, 500_000, compat="v1")
        missing = received.missing_pages
        with pytest.raises(migcore.CompatibilityError, match="migration_id"):
            migcore.recover(region, listener.address, "00" * 16, timeout=TIMEOUT, compat="v1")
        with pytest.raises(migcore.CompatibilityError, match="compat"):
            migcore.recover(region, listener.address, err.migration_id, timeout=TIMEOUT, compat="v2")
        other = migcore.Region(bytearray(region.nbytes + 4096))
        with pytest.raises(migcore.MigrationError, match="changed"):  # this process knows what it paused
            migcore.recover(other, listener.address, err.migration_id, timeout=TIMEOUT, compat="v1")
        known = _recoverable.PAUSED.pop(bytes.fromhex(err.migration_id))
        try:  # as from another process: the destination refuses the size
            with pytest.raises(migcore.CompatibilityError, match="nbytes"):
                migcore.recover(other, listener.address, err.migration_id, timeout=TIMEOUT, compat="v1")
        finally:
            _recoverable.PAUSED[bytes.fromhex(err.migration_id)] = known
        with pytest.raises(ValueError, match="hex"):
            migcore.recover(region, listener.address, "not-an-id", timeout=TIMEOUT)
        assert received.stats.status == "postcopy-paused" and received.missing_pages == missing
        # the buffer must still be what it was at the pause
        region.view[0:1] = bytes([region.view[0] ^ 0xFF])
        with pytest.raises(migcore.MigrationError, match="changed"):
            migcore.recover(region, listener.address, err.migration_id, timeout=TIMEOUT, compat="v1")
        region.view[0:1] = bytes([region.view[0] ^ 0xFF])
        migcore.recover(region, listener.address, err.migration_id, timeout=TIMEOUT, compat="v1")
        received.wait(TIMEOUT)
        assert bytes(received.region.view) == before
        # a migration that completed has nothing left to recover
        with pytest.raises(migcore.CompatibilityError, match="migration_id"):
            migcore.recover(region, listener.address, err.migration_id, timeout=TIMEOUT, compat="v1")
        # and the listener still serves ordinary migrations
        rx = Receiver(listener, timeout=TIMEOUT)
        migcore.migrate(random_region(1 * MIB, seed=8), listener.address, mode="stopcopy", compat="v1")
        rx.join()
        assert rx.error is None


class ForgedDestination:
    """Accepts one recovering source and answers its RECOVER with ``reply``."""

    def __init__(self, reply: bytes) -> None:
        self.server = socket.create_server(("127.0.0.1", 0))
        self.address = f"tcp://127.0.0.1:{self.server.getsockname()[1]}"
        self.reply = reply
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def run(self) -> None:
        conn, _ = self.server.accept()
        with conn:
            header = P.decode_header(conn.recv(P.HEADER_SIZE, socket.MSG_WAITALL))
            conn.recv(header.length, socket.MSG_WAITALL)
            conn.sendall(self.reply)
            time.sleep(0.5)
        self.server.close()


@pytest.mark.parametrize(
    ("bitmap", "pattern"),
    [
        (np.zeros(3, dtype=np.uint64), "RECOVERED"),  # wrong length
        (np.array([0, 0, 0, 1 << 40], dtype=np.uint64), "past the end"),  # a page outside the region
    ],
)
def test_a_forged_received_bitmap_is_a_protocol_error(bitmap: np.ndarray, pattern: str) -> None:
    region = random_region(4 * 64 * 4096 - 30 * 4096, seed=9)  # 226 pages: 4 words, the last one partial
    before = bytes(region.view)
    accept = P.Accept(P.UNKNOWN_SIZE, P.DEFAULT_MAX_PAYLOAD, P.MAX_RUNS, P.SUPPORTED_FEATURES)
    fake = ForgedDestination(PW.encode_recovered(accept, bitmap))
    with pytest.raises(migcore.ProtocolError, match=pattern):
        migcore.recover(region, fake.address, "ab" * 16, timeout=TIMEOUT)
    fake.thread.join(5)
    assert bytes(region.view) == before


def test_downtime_over_the_limit_is_flagged() -> None:
    region = random_region(8 * MIB, seed=10, zero_fraction=0.0)
    with migcore.listen("tcp://127.0.0.1:0", timeout=TIMEOUT) as listener:
        rx = Receiver(listener, timeout=TIMEOUT)
        slow = migcore.migrate(region, listener.address, mode="stopcopy", downtime_limit=0.0)
        rx.join()
        rx = Receiver(listener, timeout=TIMEOUT)
        fast = migcore.migrate(region, listener.address, mode="postcopy", downtime_limit=30.0)
        rx.join()
    assert slow.downtime > 0 and slow.downtime_limit_exceeded
    assert not fast.downtime_limit_exceeded


def test_a_source_in_the_same_process_never_stalls_the_destination() -> None:
    """Both ends in one process: no userfaultfd (a fault holding the GIL would stop the push); ensure() is fast."""
    region = random_region(16 * MIB, seed=11, zero_fraction=0.0)
    before = bytes(region.view)
    ps = region.page_size
    times: list[float] = []
    got: dict[int, bytes] = {}

    def program(received: migcore.Received) -> bool:
        pages = [int(p) for p in np.random.default_rng(12).choice(region.npages, 32, replace=False)]
        arr = received.region.array()
        for p in pages:
            t0 = time.monotonic()
            received.ensure(p * ps, ps, timeout=5.0)  # a stalled push would time out here
            got[p] = bytes(arr[p * ps : (p + 1) * ps])
            times.append(time.monotonic() - t0)
        return received.transparent

    with migcore.listen("tcp://127.0.0.1:0", timeout=TIMEOUT) as listener:
        rx = Receiver(listener, timeout=TIMEOUT, then=program)
        migcore.migrate(region, listener.address, mode="postcopy", timeout=TIMEOUT, postcopy_bandwidth_limit=32 * MIB)
        rx.join()
    assert rx.error is None and rx.result is False
    assert got == {p: before[p * ps : (p + 1) * ps] for p in got}
    assert len(times) == 32
    assert rx.received is not None and bytes(rx.received.region.view) == before
