"""Shared fixtures for the micro-benchmarks, and the speed ratios printed at the end of a run.

Run them with::

    .venv/bin/python -m pytest benchmarks --benchmark-only

(or name one file, e.g. ``benchmarks/bench_hashing.py``). The files are named
``bench_*.py`` so the test run (``testpaths = ["tests"]``) never picks them up;
the hook below collects them when pytest is pointed at this folder.

A ratio is measured inside one benchmark: each round runs the baselines and
then our kernel, so both sides see the same machine state. The ratio is
``baseline time / our time`` from the min and from the median of the rounds;
the verdict uses the min, the timing least disturbed by other load (the
median shows the spread on a busy machine).
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pytest
from numpy.typing import NDArray

GIB = 1 << 30

# (ours, baseline) -> target; the labels say what is compared.
TARGETS: dict[tuple[str, str], tuple[str, float]] = {
    ("hash_delta", "xxh3_whole"): ("hash_delta 1 GiB, 4 KiB pages vs one xxh3_64 over it", 0.8),
    ("hash_delta_2threads", "xxh3_whole"): ("hash_delta 1 GiB on 2 threads vs one xxh3_64", 1.5),
    ("hash_delta", "xxh3_loop"): ("hash_delta 1 GiB vs Python loop of xxh3_64 per page", 1.5),
    ("hash_delta_2threads", "xxh3_loop"): ("hash_delta on 2 threads vs that Python loop", 1.5),
    ("zero_pages", "numpy_any"): ("zero_pages 1 GiB all zero vs numpy .any()", 1.0),
    ("zero_scan_resident", "zero_scan_all"): ("zero scan 1 GiB, 90% untouched: ask the kernel vs read all", 2.0),
    ("dirty_runs", "numpy_runs"): ("dirty_runs 2^28 bits, 0.1% set vs unpackbits+nonzero", 10.0),
    ("send_runs", "sendall"): ("send_runs vs sendall", 0.8),
    ("recv_runs", "recv_into"): ("recv_runs vs recv_into", 0.8),
    ("streams=4", "streams=1"): ("stop-and-copy 64 MiB, 4 page streams vs 1", 1.0),
    ("streams=4", "streams=2"): ("stop-and-copy 64 MiB, 4 page streams vs 2", 0.9),
    ("tls", "plain_tcp"): ("stop-and-copy 64 MiB over TLS 1.3 vs plain TCP", 0.3),
    ("uffd_collect", "hash_round"): ("uffd collect 1 GiB, 1% written vs a hash round", 20.0),
}

_RATIOS: dict[tuple[str, str], tuple[float, float]] = {}


def pytest_collect_file(parent: pytest.Collector, file_path: Path) -> pytest.Module | None:
    """Collect ``bench_*.py`` here (pytest already collects files named on the command line)."""
    if (
        file_path.suffix == ".py"
        and file_path.name.startswith("bench_")
        and not parent.session.isinitpath(file_path)
    ):
        return pytest.Module.from_parent(parent, path=file_path)
    return None


def _compare(
    benchmark: Any,
    key: str,
    ours: Callable[[], object],
    baselines: dict[str, Callable[[], object]],
    rounds: int = 7,
    nbytes: int | None = None,
    targets: dict[str, float] | None = None,
) -> object:
    """Benchmark ``ours``; before each of its rounds run and time every baseline once.

    ``targets`` maps a baseline's name to the ratio to reach, for pairs not in ``TARGETS``.
    """
    times: dict[str, list[float]] = {name: [] for name in baselines}

    def run_baselines() -> None:
        for name, baseline in baselines.items():
            t0 = time.perf_counter()
            baseline()
            times[name].append(time.perf_counter() - t0)

    result = benchmark.pedantic(ours, setup=run_baselines, rounds=rounds, warmup_rounds=1)
    stats = getattr(benchmark, "stats", None)
    if not stats:  # --benchmark-disable: everything ran once, untimed
        return result
    mine = stats.stats.data
    if nbytes is not None:
        benchmark.extra_info["GiB/s"] = round(nbytes / GIB / statistics.median(mine), 2)
    for name, theirs in times.items():
        theirs = theirs[-rounds:]  # the warm-up round is not counted
        by_min = min(theirs) / min(mine)
        by_median = statistics.median(theirs) / statistics.median(mine)
        _RATIOS[(key, name)] = (by_min, by_median)
        if targets and name in targets:
            TARGETS.setdefault((key, name), (f"{key} vs {name}", targets[name]))
        benchmark.extra_info[f"x vs {name}"] = round(by_median, 2)
    return result


@pytest.fixture(scope="session")
def compare() -> Callable[..., object]:
    """``compare(benchmark, key, ours, {name: baseline}, rounds=7, nbytes=None, targets=None)``."""
    return _compare


@pytest.hookimpl(trylast=True)
def pytest_terminal_summary(terminalreporter: Any) -> None:
    if not _RATIOS:
        return
    terminalreporter.section("migcore speed ratios: baseline time / ours, interleaved rounds")
    terminalreporter.write_line(f"{'':<60} {'by min':>7} {'by median':>10} {'target':>7}")
    for pair, (by_min, by_median) in _RATIOS.items():
        if pair in TARGETS:
            label, target = TARGETS[pair]
            goal = f"{target:6.2f}x  {'ok' if by_min >= target else 'MISSED'}"
        else:
            label, goal = " vs ".join(pair), "      -"
        terminalreporter.write_line(f"{label:<60} {by_min:6.2f}x {by_median:9.2f}x {goal}")
    if hasattr(os, "getloadavg"):  # two-thread ratios need an idle second core
        load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
        terminalreporter.write_line(f"load average: {load} on {os.cpu_count()} CPUs")


@pytest.fixture(scope="session")
def fastpath() -> ModuleType:
    """The compiled kernels; benchmarking the plain reference instead would say nothing."""
    try:
        from migcore import _fastpath
    except ImportError as exc:  # pragma: no cover - only without a build
        if os.environ.get("MIGCORE_REQUIRE_FASTPATH") == "1":
            pytest.fail(f"migcore._fastpath is not built: {exc}")
        pytest.skip("migcore._fastpath is not built")
    return _fastpath


@pytest.fixture(scope="session")
def random_gib() -> NDArray[np.uint64]:
    """1 GiB of random bytes, every page really backed by memory."""
    return np.random.default_rng(0).integers(0, 2**64, GIB // 8, dtype=np.uint64)


@pytest.fixture(scope="session")
def zero_gib() -> NDArray[np.uint64]:
    """1 GiB of zeros, written once so reads hit real memory, not the kernel's shared zero page."""
    buf = np.empty(GIB // 8, np.uint64)
    buf.fill(0)
    return buf
