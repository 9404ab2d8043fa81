"""Smoke test of the benchmark suite: ``migcore bench --quick`` writes complete, verified results.

No timing is asserted: the numbers depend on the machine; the targets are
printed as facts, not checked here.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("matplotlib")


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, subprocess.CompletedProcess[str]]:
    out = tmp_path_factory.mktemp("bench")
    env = {**os.environ, "COLUMNS": "200"}
    proc = subprocess.run(
        [sys.executable, "-m", "migcore", "bench", "--quick", "--out", str(out)],
        capture_output=True, text=True, timeout=240, env=env, check=False,
    )
    return out, proc


def test_quick_bench_exits_cleanly(quick_run: tuple[Path, subprocess.CompletedProcess[str]]) -> None:
    out, proc = quick_run
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "targets" in proc.stdout
    for verdict in ("PASS", "FAIL", "n/a"):
        if verdict in proc.stdout:
            break
    else:
        pytest.fail("no target verdict printed")


def test_quick_bench_writes_every_file(quick_run: tuple[Path, subprocess.CompletedProcess[str]]) -> None:
    out, _ = quick_run
    for name in (
        "results.json", "runs.csv", "baselines.csv", "README-performance.md",
        "downtime_vs_dirty_rate.png", "total_time_vs_dirty_rate.png", "bytes_vs_dirty_rate.png",
        "postcopy_fault_latency.png",
    ):
        path = out / name
        assert path.is_file() and path.stat().st_size > 0, name
    assert (out / "downtime_vs_dirty_rate.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_quick_bench_rows_are_verified_and_described(
    quick_run: tuple[Path, subprocess.CompletedProcess[str]],
) -> None:
    out, _ = quick_run
    results = json.loads((out / "results.json").read_text())
    runs = results["runs"]
    assert runs, "no scenario ran"
    assert {r["mode"] for r in runs} >= {"stopcopy", "precopy", "postcopy", "hybrid"}
    assert all(r["verified"] is True for r in runs), [(r["scenario"], r["error"]) for r in runs if not r["verified"]]
    with (out / "runs.csv").open(newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == len(runs)  # one row per run
    assert all(row["verified"] == "True" for row in rows)
    machine = results["machine"]
    for key in ("cpu_model", "cpus", "memory_bytes", "kernel", "python", "numpy", "migcore", "git_commit"):
        assert key in machine
    assert "machine_cpu_model" in rows[0]
    assert results["config"]["seed"] == 0 and results["started_at"] and results["finished_at"]
    names = {b["baseline"] for b in results["baselines"]}
    assert names == {"bare_sendall", "xxh3_pass", "naive_bytes_sendall"}
    assert {t["verdict"] for t in results["targets"]} <= {"PASS", "FAIL", "n/a", "info"}
    post = [r for r in runs if r["mode"] == "postcopy"]
    assert post and all(r["postcopy_pages"] == r["nonzero_pages"] for r in post)
    snippet = (out / "README-performance.md").read_text()
    assert "migcore bench --quick" in snippet and "| target |" in snippet
    # the stop-and-copy target runs carry a bare send taken just before each of them
    paired = [r for r in runs if r["mode"] == "stopcopy" and not r["options"]]
    assert paired and all(r["paired_bare_throughput"] > 0 and r["paired_ratio"] > 0 for r in paired)
    for r in paired:
        assert abs(r["paired_ratio"] - r["throughput"] / r["paired_bare_throughput"]) < 1e-9


def _row(fill: str, throughput: float, paired: float | None = None) -> dict[str, object]:
    row: dict[str, object] = {
        "status": "completed", "options": {}, "mode": "stopcopy", "fill": fill, "target_rate": 0.0,
        "size": 256 << 20, "throughput": throughput,
    }
    if paired is not None:
        row["paired_ratio"] = paired
    return row


def test_stopcopy_target_prefers_the_paired_baseline() -> None:
    from migcore.bench import _targets

    bare = [{"baseline": "bare_sendall", "size": 256 << 20, "throughput": 2.0}]
    runs = [_row("sparse", 9.0, paired=5.5), _row("sparse", 10.0, paired=4.0)]
    result = _targets._stopcopy(runs, bare, "sparse", 5.0)
    assert result.passed is True and result.measured.startswith("5.50x") and "5.00x against the best bare" in result.measured
    unpaired = _targets._stopcopy([_row("random", 1.5)], bare, "random", 0.8)
    assert unpaired.passed is False and unpaired.measured.startswith("0.75x")
    assert _targets._stopcopy([], bare, "random", 0.8).passed is None
