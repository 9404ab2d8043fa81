"""Post-copy recovery: what a lost link costs against an unbroken post-copy of the same region.

Run with::

    .venv/bin/python -m pytest benchmarks/bench_recovery.py --benchmark-only -s

Each round migrates the same region twice over loopback, in this order: an
unbroken post-copy (the baseline), then one whose link a proxy cuts halfway
through the push and whose source recovers at once. It prints the time from
the cut to the completed recovery, the time of the whole broken migration
against the unbroken one, the part of the recovery that is not resending
(the time to resend the owed bytes at the unbroken migration's rate taken
off), and the page bytes resent against those the destination lacked. The
target: a recovery resends at most the pages that were in flight, and adds
under 50 ms plus the resend time. The source runs in this process (the
destination receives without userfaultfd here).
"""

from __future__ import annotations

import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

import migcore

sys.path.insert(0, str(Path(__file__).parent.parent / "tests"))
from _proxy import CutProxy  # noqa: E402 - the tests' cutting proxy

MIB = 1 << 20
NBYTES = 64 * MIB
ROUNDS = 5


def region() -> migcore.Region:
    r = migcore.Region.allocate(NBYTES)
    r.array()[:] = np.random.default_rng(0).integers(0, 256, NBYTES, dtype=np.uint8)
    return r


def unbroken(src: migcore.Region) -> float:
    with migcore.listen("tcp://127.0.0.1:0", timeout=30) as listener:
        got: dict[str, migcore.Received] = {}
        t = threading.Thread(target=lambda: got.setdefault("r", listener.receive()))
        t.start()
        t0 = time.perf_counter()
        migcore.migrate(src, listener.address, mode="postcopy", timeout=30)
        t.join()
        got["r"].wait(30)
        return time.perf_counter() - t0


def broken(src: migcore.Region) -> dict[str, float]:
    with migcore.listen("tcp://127.0.0.1:0", timeout=30) as listener:
        got: dict[str, migcore.Received] = {}
        t = threading.Thread(target=lambda: got.setdefault("r", listener.receive()))
        t.start()
        proxy = CutProxy(listener.address, NBYTES // 2)
        t0 = time.perf_counter()
        try:
            migcore.migrate(src, proxy.address, mode="postcopy", timeout=30)
            raise AssertionError("the proxy did not cut")
        except migcore.PeerLostError as exc:
            err = exc
        cut = time.perf_counter()
        t.join()
        received = got["r"]
        while received.stats.status != "postcopy-paused":
            time.sleep(0.0005)
        owed = received.missing_pages
        stats = migcore.recover(src, listener.address, err.migration_id, timeout=30)
        received.wait(30)
        done = time.perf_counter()
        assert bytes(received.region.view) == bytes(src.view)
        proxy.join()
    return {"cut_to_done": done - cut, "total": done - t0, "resent": stats.normal_bytes, "owed": owed * src.page_size}


def test_recovery_against_an_unbroken_postcopy(benchmark: Any) -> None:
    src = region()
    plain: list[float] = []
    runs: list[dict[str, float]] = []

    def one_round() -> None:
        plain.append(unbroken(src))
        runs.append(broken(src))

    benchmark.pedantic(one_round, rounds=ROUNDS, iterations=1)
    base = statistics.median(plain)
    cut_to_done = statistics.median(r["cut_to_done"] for r in runs)
    total = statistics.median(r["total"] for r in runs)
    resent = statistics.median(r["resent"] for r in runs)
    owed = statistics.median(r["owed"] for r in runs)
    # what resending the owed bytes alone costs, at the unbroken migration's rate
    resend_time = base * owed / NBYTES
    figures = {
        "unbroken_ms": base * 1e3, "broken_total_ms": total * 1e3, "total_ratio": total / base,
        "cut_to_recovered_ms": cut_to_done * 1e3, "resend_time_ms": resend_time * 1e3,
        "overhead_ms": (cut_to_done - resend_time) * 1e3, "resent_MiB": resent / MIB, "owed_at_cut_MiB": owed / MIB,
        "resent_over_owed": resent / owed if owed else 0.0,
    }
    benchmark.extra_info.update(figures)
    line = ", ".join(f"{k}={v:.3f}" for k, v in figures.items())
    print(f"\n[bench_recovery] {line}")  # noqa: T201 - a benchmark's output is its figures
    assert resent <= owed  # a recovery resends only what the destination lacked
