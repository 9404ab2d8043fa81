"""Transparent post-copy: the destination reads owed pages before wait() and gets the source's bytes."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import migcore
from migcore import _destination, _userfault

from _live import Receiver, wait_status
from _proxy import CutProxy

MIB = 1 << 20
REASON = _userfault.postcopy_reason(migcore.Region.allocate(4096))
pytestmark = pytest.mark.skipif(REASON is not None, reason=f"userfaultfd post-copy unavailable: {REASON}")


def source_region(nbytes: int, *, seed: int = 0, page_size: int = 4096) -> migcore.Region:
    region = migcore.Region.allocate(nbytes, page_size)
    arr = region.array()
    arr[:] = np.random.default_rng(seed).integers(0, 256, nbytes, dtype=np.uint8)
    npages = region.npages
    for p in np.random.default_rng(seed + 1).choice(npages - 1, size=npages // 4, replace=False):
        arr[p * page_size : (p + 1) * page_size] = 0  # zero pages: never sent, installed as zero pages
    return region


# The source runs in another process, as it does in real use: a destination thread that touches an
# owed page while holding the GIL stalls every Python thread of its own process until the page lands.
SOURCE = """
import json, sys
sys.path.insert(0, sys.argv[2])
import migcore
from test_uffd_postcopy import source_region
a = json.loads(sys.argv[1])
region = source_region(a["nbytes"], seed=a["seed"], page_size=a["page_size"])
arr, ps = region.array(), region.page_size
hot = slice(10 * ps, 60 * ps)
extra = {}
if a.pop("dirty", False):  # rewrite pages 10..59 every round (no convergence), settle them at the pause
    paused = []
    def progress(stats):
        if not paused:
            arr[hot] = stats.rounds % 200 + 1
    def pause():
        paused.append(True)
        arr[hot] = 0xEE
    extra = {"progress": progress, "pause": pause}
try:
    stats = migcore.migrate(region, a["address"], timeout=20, state=b"st", **a["kw"], **extra)
    print(json.dumps({"status": stats.status, "verified": stats.verified}))
except migcore.PeerLostError as exc:
    if not a.get("recover"):
        print(json.dumps({"error": type(exc).__name__}))
        raise SystemExit(0)
    import time
    time.sleep(a.get("recover_delay", 0))  # the destination stays paused meanwhile
    stats = migcore.recover(region, a["recover"], exc.migration_id, timeout=20)
    print(json.dumps({"status": stats.status, "verified": stats.verified, "recovered": True}))
except migcore.MigrationError as exc:
    print(json.dumps({"error": type(exc).__name__}))
"""


def spawn_source(address: str, nbytes: int, seed: int, page_size: int = 4096, **kw: Any) -> subprocess.Popen[str]:
    dirty = kw.pop("dirty", False)
    recover, delay = kw.pop("recover", None), kw.pop("recover_delay", 0)
    args = {"address": address, "nbytes": nbytes, "seed": seed, "page_size": page_size, "kw": kw, "dirty": dirty,
            "recover": recover, "recover_delay": delay}
    return subprocess.Popen(
        [sys.executable, "-c", SOURCE, json.dumps(args), str(Path(__file__).parent)],
        stdout=subprocess.PIPE, text=True,
    )


def source_result(proc: subprocess.Popen[str]) -> dict[str, Any]:
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0
    result: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
    return result


def reads(received: migcore.Received, pages: list[int]) -> dict[str, Any]:
    """What a program does at once, without ensure(): plain indexing and a NumPy reduction."""
    assert received.transparent, "transparent post-copy was not used"
    arr = received.region.array()
    ps = received.region.page_size
    return {
        "missing_before": received.missing_pages,
        "bytes": [bytes(received.region.view[p * ps : p * ps + 64]) for p in pages],
        "index": [int(arr[p * ps + 17]) for p in pages],
        "sum": int(arr[: len(arr) // 3].sum(dtype=np.uint64)),
        "tail": bytes(received.region.view[-100:]),
    }


@pytest.mark.parametrize("page_size", [4096, 16384])
@pytest.mark.parametrize("mode", ["postcopy", "hybrid"])
def test_scattered_reads_before_wait_get_the_source_bytes(mode: str, page_size: int) -> None:
    region = source_region(8 * MIB + 1000, seed=3, page_size=page_size)  # ragged tail
    if mode == "hybrid":
        region.array()[10 * page_size : 60 * page_size] = 0xEE  # what the source's pause leaves there
    expected = bytes(region.view)
    arr = np.frombuffer(expected, dtype=np.uint8)
    pages = [0, 5, region.npages // 2, 77, region.npages - 1, 3, 12, region.npages // 3]
    kw: dict[str, Any] = {"on_stall": "postcopy", "max_rounds": 2, "dirty": True} if mode == "hybrid" else {}
    with migcore.listen("tcp://127.0.0.1:0", timeout=20) as listener:
        rx = Receiver(listener, then=lambda r: reads(r, pages))
        proc = spawn_source(listener.address, region.nbytes, 3, page_size, mode=mode, downtime_limit=0.0, **kw)
        rx.join(60)
        result = source_result(proc)
    assert rx.error is None, rx.error
    got = rx.result
    assert got["bytes"] == [expected[p * page_size : p * page_size + 64] for p in pages]
    assert got["index"] == [int(arr[p * page_size + 17]) for p in pages]
    assert got["sum"] == int(arr[: len(arr) // 3].sum(dtype=np.uint64))
    assert got["tail"] == expected[-100:]
    received = rx.received
    assert received is not None
    assert bytes(received.region.view) == expected
    assert received.missing_pages == 0 and received.stats.verified
    assert result == {"status": "completed", "verified": True}
    # unregistered after wait(): ordinary memory the program may write
    received.region.array()[:] = 7
    assert int(received.region.array()[-1]) == 7


def test_ensure_is_a_prefetch_and_threads_fault_concurrently() -> None:
    region = source_region(16 * MIB, seed=5)
    expected = np.frombuffer(bytes(region.view), dtype=np.uint8)

    def program(received: migcore.Received) -> list[int]:
        arr = received.region.array()
        received.ensure(4 * MIB, 1 * MIB)
        results = [0] * 4

        def worker(i: int) -> None:
            results[i] = int(arr[i * 4 * MIB : (i + 1) * 4 * MIB : 4096].sum(dtype=np.uint64))

        threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return results

    with migcore.listen("tcp://127.0.0.1:0", timeout=20) as listener:
        rx = Receiver(listener, then=program)
        proc = spawn_source(listener.address, region.nbytes, 5, mode="postcopy")
        rx.join(60)
        assert source_result(proc)["status"] == "completed"
    assert rx.error is None, rx.error
    assert rx.result == [int(expected[i * 4 * MIB : (i + 1) * 4 * MIB : 4096].sum(dtype=np.uint64)) for i in range(4)]
    assert rx.received is not None and rx.received.stats.postcopy_requests >= 1


def read_pages(received: migcore.Received, pages: list[int], out: list[bytes], started: threading.Event) -> None:
    """A destination thread reading owed pages as a program would, with the GIL released while it waits.

    (``np.add.reduce`` over a contiguous array runs its loop without the GIL;
    a read that holds the GIL while it faults would stall the destination's
    whole process until the page came, recovery included.)
    """
    ps = received.region.page_size
    arr = received.region.array()
    started.set()
    for p in pages:
        np.add.reduce(arr[p * ps : (p + 1) * ps].view(np.uint64))  # faults here until the page is present
        out.append(bytes(received.region.view[p * ps : (p + 1) * ps]))


def test_link_cut_after_switch_pauses_and_a_reader_gets_the_source_bytes_after_recovery() -> None:
    region = source_region(32 * MIB, seed=7)
    expected = bytes(region.view)
    ps = region.page_size
    with migcore.listen("tcp://127.0.0.1:0", timeout=20) as listener:
        proxy = CutProxy(listener.address, cut_after=4 * MIB)
        rx = Receiver(listener, wait=False, timeout=20)
        proc = spawn_source(proxy.address, region.nbytes, 7, mode="postcopy", recover=listener.address, recover_delay=1.0)
        rx.join(30)
        received = rx.received
        assert received is not None and received.transparent
        proxy.cut.wait(20)
        wait_status(received, "postcopy-paused")
        owed = [p for p in range(region.npages) if received.missing_in(p * ps, 1)]
        assert len(owed) == received.missing_pages > 0
        pages = [owed[0], owed[len(owed) // 2], owed[-1]]
        got: list[bytes] = []
        started = threading.Event()
        reader = threading.Thread(target=read_pages, args=(received, pages, got, started), daemon=True)
        reader.start()
        started.wait(5)
        time.sleep(0.3)
        assert got == [] and reader.is_alive()  # blocked on a page that has not come: no zeros
        with pytest.raises(migcore.MigrationTimeout):
            received.ensure(pages[1] * ps, ps, timeout=0.2)
        result = source_result(proc)
        assert result.get("recovered") and result["status"] == "completed", result
        received.wait(20)
        reader.join(10)
    assert got == [expected[p * ps : (p + 1) * ps] for p in pages]
    assert bytes(received.region.view) == expected
    stats = received.stats
    assert stats.status == "completed" and stats.verified and stats.recoveries == 1 and stats.paused_time > 0.5


def test_source_killed_during_postcopy_pauses_until_the_program_abandons() -> None:
    region = source_region(32 * MIB, seed=8)
    expected = bytes(region.view)
    ps = region.page_size
    with migcore.listen("tcp://127.0.0.1:0", timeout=20) as listener:
        rx = Receiver(listener, wait=False, timeout=20)
        proc = spawn_source(listener.address, region.nbytes, 8, mode="postcopy", postcopy_bandwidth_limit=8 * MIB)
        rx.join(30)
        received = rx.received
        assert received is not None and received.transparent
        time.sleep(0.3)
        proc.kill()  # SIGKILL: no goodbye on the wire
        proc.communicate(timeout=10)
        wait_status(received, "postcopy-paused")
        owed = [p for p in range(region.npages) if received.missing_in(p * ps, 1)]
        assert len(owed) == received.missing_pages > 0
        got: list[bytes] = []
        started = threading.Event()
        reader = threading.Thread(target=read_pages, args=(received, [owed[-1]], got, started), daemon=True)
        reader.start()
        started.wait(5)
        time.sleep(0.3)
        assert got == [] and reader.is_alive()
        with pytest.raises(migcore.MigrationTimeout):
            received.wait(0.2)
        lost = received.abandon()
        reader.join(5)
        assert not reader.is_alive() and got == [bytes(ps)]  # the zeros the program chose, only now
        assert lost == len(owed) == received.missing_pages
        assert received.stats.status == "failed"
        with pytest.raises(migcore.MigrationError, match="abandoned"):
            received.wait(1)
    view = received.region.view
    present = [p for p in range(region.npages) if p not in set(owed)]
    assert all(view[p * ps : (p + 1) * ps] == expected[p * ps : (p + 1) * ps] for p in present[:: max(1, len(present) // 200)])


def test_guarded_bytearray_regions_use_the_python_receiver(monkeypatch: pytest.MonkeyPatch) -> None:
    from _live import GuardedAllocations

    guards = GuardedAllocations().install(monkeypatch)
    region = source_region(2 * MIB, seed=9)
    with migcore.listen("tcp://127.0.0.1:0", timeout=20) as listener:
        rx = Receiver(listener, then=lambda r: r.transparent)
        proc = spawn_source(listener.address, region.nbytes, 9, mode="postcopy")
        rx.join(60)
        assert source_result(proc)["status"] == "completed"
    assert rx.error is None and rx.result is False
    assert rx.received is not None and bytes(rx.received.region.view) == bytes(region.view)
    assert guards.guards_intact()
    assert _destination._allocate_region is guards


def test_demanded_pages_overtake_a_slow_background_push() -> None:
    """Each demand is served on its own, long before the background push ends (issue 3: demands jump the queue).

    The push is held to 4 MB/s (about 1.5 s for this region). Every ensure()
    must come back with its page present, not wait for the push: when the
    loop woke the faulting thread before clearing the page's owed bit, the
    thread took the page for one lost with the link and waited for the
    whole post-copy to end.
    """

    region = source_region(8 * MIB, seed=11)
    expected = bytes(region.view)
    ps = region.page_size

    def program(received: migcore.Received) -> dict[str, Any]:
        assert received.transparent
        pages = [int(p) for p in np.random.default_rng(4).choice(region.npages, size=64, replace=False)]
        asked = still_owed = 0
        data = []
        for p in pages:
            if received.missing_in(p * ps, 1):
                asked += 1
                received.ensure(p * ps, ps, timeout=30)
                still_owed += received.missing_in(p * ps, 1)
            data.append(bytes(received.region.view[p * ps : (p + 1) * ps]))
        return {"pages": pages, "asked": asked, "still_owed": still_owed, "data": data,
                "missing_after": received.missing_pages}

    with migcore.listen("tcp://127.0.0.1:0", timeout=20) as listener:
        rx = Receiver(listener, then=program, wait=True, timeout=30)
        proc = spawn_source(listener.address, region.nbytes, 11, mode="postcopy", postcopy_bandwidth_limit=4e6)
        rx.join(60)
        assert source_result(proc) == {"status": "completed", "verified": True}
    assert rx.error is None, rx.error
    got = rx.result
    assert got["data"] == [expected[p * ps : (p + 1) * ps] for p in got["pages"]]
    assert got["asked"] > 32
    assert got["still_owed"] == 0  # present as soon as ensure() returned
    assert got["missing_after"] > 0  # and all of them before the push was over
    assert rx.received is not None and rx.received.stats.postcopy_requests >= got["asked"]
