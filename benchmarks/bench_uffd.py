"""userfaultfd: dirty-set collection vs a hash round, the cost of tracking to a writer, post-copy fault latency.

Run with::

    .venv/bin/python -m pytest benchmarks/bench_uffd.py --benchmark-only -o python_files='bench_*.py' -s

- ``uffd_collect`` vs ``hash_round``: the dirty set of a 1 GiB region with 1%
  of its pages written since the last collection (target: 20x cheaper).
- ``numpy_tracked`` vs ``untracked``: a NumPy pass writing every page of a
  256 MiB region, with the region write-protected by the tracker (every
  first write to a page takes an in-kernel fault) and without.
- post-copy demand-fault latency on loopback, p50/p99, with the background
  push running and with it throttled to 3.2 MB/s (``postcopy_bandwidth_limit``); the
  source runs in another process, as in real use.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

import migcore
from migcore import _userfault
from migcore._region import new_bitmap
from migcore._trackers import HashTracker, UffdTracker

GIB = 1 << 30
MIB = 1 << 20
PAGE = 4096

REASON = _userfault.tracker_reason(migcore.Region.allocate(PAGE))
pytestmark = pytest.mark.skipif(REASON is not None, reason=f"uffd unavailable: {REASON}")


def filled(nbytes: int) -> migcore.Region:
    region = migcore.Region.allocate(nbytes)
    region.array().view(np.uint64)[:] = np.random.default_rng(0).integers(0, 2**63, nbytes // 8, dtype=np.uint64)
    return region


def test_collect_1pct_dirty_of_1gib(benchmark: Any, compare: Callable[..., object]) -> None:
    region = filled(GIB)
    arr = region.array()
    hashes = HashTracker(region, threads=2)
    hashes.collect(new_bitmap(region.npages))
    hashes.baseline[:] = 0
    from migcore import _kernels

    _kernels.hash_pages(region.view, PAGE, hashes.baseline)  # the destination holds everything
    tracker = UffdTracker(region)
    tracker.start()
    out_hash = new_bitmap(region.npages)
    out_uffd = new_bitmap(region.npages)
    rng = np.random.default_rng(1)
    npages = region.npages
    counts: list[int] = []

    def write_1pct() -> None:
        pages = rng.choice(npages, npages // 100, replace=False)
        arr[pages * PAGE + 8] += 1

    def hash_round() -> None:
        hashes.collect(out_hash)

    def uffd_collect() -> None:
        counts.append(tracker.collect(out_uffd))

    try:
        benchmark.group = "dirty set of 1 GiB, 1% written"
        compare(benchmark, "uffd_collect", uffd_collect, {"write_1pct": write_1pct, "hash_round": hash_round},
                rounds=5, targets={"hash_round": 20.0})
    finally:
        tracker.close()
    assert all(c >= npages // 100 for c in counts[1:])
    benchmark.extra_info["pages per collect"] = counts[-1]


def test_numpy_writer_slowdown_while_tracked(benchmark: Any, compare: Callable[..., object]) -> None:
    tracked = filled(256 * MIB)
    plain = filled(256 * MIB)
    a = tracked.array().view(np.uint64)
    b = plain.array().view(np.uint64)
    tracker = UffdTracker(tracked)
    tracker.start()
    out = new_bitmap(tracked.npages)

    def untracked() -> None:
        np.add(b, 1, out=b)

    def rearm() -> None:  # re-protect every page, as a pre-copy round does
        tracker.collect(out)

    def numpy_tracked() -> None:
        np.add(a, 1, out=a)

    try:
        benchmark.group = "NumPy pass over 256 MiB"
        compare(benchmark, "numpy_tracked", numpy_tracked, {"untracked": untracked, "rearm_collect": rearm},
                rounds=5, nbytes=256 * MIB)
    finally:
        tracker.close()


SOURCE = """
import json, sys
import numpy as np
import migcore
a = json.loads(sys.argv[1])
region = migcore.Region.allocate(a["nbytes"])
region.array().view(np.uint64)[:] = np.random.default_rng(0).integers(0, 2**63, a["nbytes"] // 8, dtype=np.uint64)
stats = migcore.migrate(region, a["address"], mode="postcopy", timeout=60, **a["kw"])
print(json.dumps({"status": stats.status, "requests": stats.postcopy_requests}))
"""


def fault_latencies(push: bool, samples: int = 400) -> np.ndarray:
    """Seconds each first touch of a random owed page took on the destination."""
    nbytes = 256 * MIB
    # "no push": the background push throttled to ~1% of loopback (its token bucket sleeps 20 ms per
    # 64 KiB batch, and a demand may wait behind one such sleep); the engine has no push-off switch
    kw: dict[str, Any] = {} if push else {"postcopy_bandwidth_limit": 3.2 * MIB}
    uffd = _userfault.module()
    with migcore.listen("tcp://127.0.0.1:0", timeout=60) as listener:
        proc = subprocess.Popen([sys.executable, "-c", SOURCE, json.dumps({"address": listener.address,
                                                                           "nbytes": nbytes, "kw": kw})],
                                stdout=subprocess.PIPE, text=True)
        received = listener.receive()
        assert received.transparent
        addr = uffd.address_of(received.region.view)
        npages = received.region.npages
        pages = np.random.default_rng(2).choice(npages, samples * 4, replace=False)
        times = []
        for p in pages.tolist():
            if len(times) == samples:
                break
            if not received.missing_in(p * PAGE, 1):
                continue  # already pushed: not a demand fault
            t0 = time.perf_counter()
            uffd.touch(addr + p * PAGE, 1, PAGE)  # the GIL is released while the thread waits
            times.append(time.perf_counter() - t0)
        if push:
            received.wait(120)
            proc.communicate(timeout=120)
        else:  # the held-back push would take hours: cut it short, the region stays usable
            proc.kill()
            proc.communicate(timeout=30)
            with pytest.raises(migcore.MigrationError):
                received.wait(30)
    return np.array(times)


@pytest.mark.parametrize("push", [True, False], ids=["with-push", "no-push"])
def test_postcopy_demand_fault_latency(benchmark: Any, push: bool) -> None:
    benchmark.group = "post-copy demand-fault latency (loopback)"
    result: dict[str, np.ndarray] = {}
    benchmark.pedantic(lambda: result.setdefault("t", fault_latencies(push)), rounds=1, iterations=1)
    t = result["t"]
    p50, p99 = np.percentile(t, [50, 99]) * 1e6
    benchmark.extra_info.update({"faults": len(t), "p50_us": round(float(p50), 1), "p99_us": round(float(p99), 1)})
    print(f"\npost-copy demand faults {'with' if push else 'without'} background push: "
          f"{len(t)} faults, p50 {p50:.0f} us, p99 {p99:.0f} us")
