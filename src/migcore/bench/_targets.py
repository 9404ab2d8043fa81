"""The performance targets of the suite, checked on one run's results (facts to show, not asserts)."""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from typing import Any

MIB = 1 << 20
DOWNTIME_LIMIT = 0.3


@dataclass(frozen=True)
class TargetResult:
    """One target: what it asks, what was measured, and PASS / FAIL / n/a (not measured in this grid)."""

    name: str
    goal: str
    measured: str
    passed: bool | None
    #: a figure shown beside the targets, not one of them
    info: bool = False

    @property
    def verdict(self) -> str:
        if self.info:
            return "info"
        return "n/a" if self.passed is None else "PASS" if self.passed else "FAIL"

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "verdict": self.verdict}


def _ok(rows: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    return [r for r in rows if r.get("status") == "completed" and not r.get("options")]


def _bare(baselines: list[dict[str, Any]], size: int) -> float | None:
    for b in baselines:
        if b["baseline"] == "bare_sendall" and b["size"] == size:
            return float(b["throughput"])
    return None


FILL_NAMES = {
    "random": "random data",
    "sparse": "90% zero pages",
    "sparse-written": "90% zero pages, written (for comparison)",
}


def _main_size(runs: list[dict[str, Any]]) -> int | None:
    """The region size most runs use (256 MiB by default): the size the targets are stated for."""
    sizes = [int(r["size"]) for r in runs]
    return max(set(sizes), key=sizes.count) if sizes else None


def _stopcopy(
    runs: list[dict[str, Any]], baselines: list[dict[str, Any]], fill: str, goal: float, *, info: bool = False
) -> TargetResult:
    """Best run at the main size: against the bare send taken just before it when the run was paired,
    else against the suite's best bare send of that size."""
    name = f"stop-and-copy, {FILL_NAMES[fill]}"
    text = f">= {goal:g}x bare-socket throughput"
    cands = [r for r in _ok(runs) if r["mode"] == "stopcopy" and r["fill"] == fill and not r["target_rate"]]
    if not cands:
        return TargetResult(name, text, "not measured", None, info)
    sizes = {r["size"] for r in cands}
    size = 256 * MIB if 256 * MIB in sizes else (_main_size(cands) or 256 * MIB)
    at = [r for r in cands if r["size"] == size]
    bare = _bare(baselines, size)
    overall = max(r["throughput"] for r in at) / bare if bare else None
    paired = [r["paired_ratio"] for r in at if math.isfinite(r.get("paired_ratio", math.nan))]
    if paired:
        ratio = max(paired)
        detail = f"{ratio:.2f}x at {size // MIB} MiB (best of {len(paired)} runs, each against a bare send just before it"
        detail += f"; {overall:.2f}x against the best bare send of the run)" if overall else ")"
    elif overall is not None:
        ratio = overall
        detail = f"{ratio:.2f}x at {size // MIB} MiB (best run against the best bare send)"
    else:
        return TargetResult(name, text, "no bare-socket baseline", None, info)
    return TargetResult(name, text, detail, ratio >= goal, info)


def _precopy(runs: list[dict[str, Any]], *, larger: bool = False) -> TargetResult:
    """At the main size (the target); with ``larger``, the same figures for larger regions (shown, not a target)."""
    goal = f"downtime < {DOWNTIME_LIMIT:g} s and wire <= 1.4x region when dirty rate < 0.5x bandwidth"
    main = _main_size(_ok(runs))
    name = "pre-copy under half the bandwidth" + (", larger regions (for comparison)" if larger else "")
    cands = [
        r for r in _ok(runs)
        if r["mode"] == "precopy" and r["target_rate"] > 0 and r["dirty_rate"] < 0.5 * r["bare_bandwidth"]
        and (r["size"] > (main or 0) if larger else r["size"] == main)
    ]
    if not cands:
        return TargetResult(name, goal, "not measured", None, larger)
    worst_down = max(r["downtime"] for r in cands)
    worst_wire = max(r["wire_ratio"] for r in cands)
    passed = worst_down < DOWNTIME_LIMIT and worst_wire <= 1.4
    sizes = "/".join(str(s // MIB) for s in sorted({r["size"] for r in cands}))
    return TargetResult(
        name,
        goal,
        f"{len(cands)} runs at {sizes} MiB: worst downtime {worst_down * 1e3:.1f} ms, worst wire {worst_wire:.2f}x",
        passed,
        larger,
    )


def _postcopy_scaling(runs: list[dict[str, Any]]) -> TargetResult:
    goal = "downtime ratio < 2 between the largest and smallest region"
    cands = [r for r in _ok(runs) if r["mode"] == "postcopy" and r["fill"] == "random" and not r["target_rate"]]
    by_size: dict[int, float] = {}
    for r in cands:
        by_size[r["size"]] = min(by_size.get(r["size"], math.inf), r["downtime"])
    if len(by_size) < 2:
        return TargetResult("post-copy downtime vs region size", goal, "needs two sizes", None)
    sizes = sorted(by_size)
    ratio = by_size[sizes[-1]] / max(by_size[sizes[0]], 1e-9)
    detail = ", ".join(f"{s // MIB} MiB {by_size[s] * 1e3:.1f} ms" for s in sizes)
    return TargetResult("post-copy downtime vs region size", goal, f"{ratio:.2f}x ({detail})", ratio < 2)


def _postcopy_once(runs: list[dict[str, Any]]) -> TargetResult:
    goal = "post-copy pages sent == non-zero pages, each once"
    cands = [r for r in _ok(runs) if r["mode"] == "postcopy"]
    if not cands:
        return TargetResult("post-copy sends every page once", goal, "not measured", None)
    bad = [r for r in cands if not (r["postcopy_pages"] == r["normal_pages"] == r["nonzero_pages"])]
    detail = f"{len(cands) - len(bad)}/{len(cands)} runs exact"
    if bad:
        r = bad[0]
        detail += f" (e.g. {r['scenario']}: sent {r['postcopy_pages']}, non-zero {r['nonzero_pages']})"
    return TargetResult("post-copy sends every page once", goal, detail, not bad)


def _memory(runs: list[dict[str, Any]]) -> TargetResult:
    goal = "peak RSS of each side <= region + 10% + 64 MiB (runs without options)"
    cands = _ok(runs)  # options such as delta keep a cache by design
    if not cands:
        return TargetResult("memory", goal, "not measured", None)
    worst: tuple[float, str] = (0.0, "")
    passed = True
    for r in cands:
        limit = r["size"] * 1.1 + 64 * MIB
        for side in ("src", "dst"):
            peak = r[f"{side}_peak_rss"]
            if peak > limit:
                passed = False
            share = peak / limit
            if share > worst[0]:
                worst = (share, f"{side} {peak / MIB:.0f} MiB for a {r['size'] // MIB} MiB region ({r['scenario']})")
    return TargetResult("memory", goal, f"worst {worst[0]:.0%} of the limit: {worst[1]}", passed)


def _verified(runs: list[dict[str, Any]]) -> TargetResult:
    bad = [r for r in runs if not r.get("verified")]
    return TargetResult(
        "verified identical",
        "every run's destination page hashes and state equal the source's at the pause",
        f"{len(runs) - len(bad)}/{len(runs)} runs" + (f"; first failure {bad[0]['scenario']}: {bad[0]['error']}" if bad else ""),
        not bad if runs else None,
    )


def check(runs: list[dict[str, Any]], baselines: list[dict[str, Any]]) -> list[TargetResult]:
    """Every target, in the order of the issue."""
    return [
        _stopcopy(runs, baselines, "random", 0.8),
        _stopcopy(runs, baselines, "sparse", 5.0),
        _stopcopy(runs, baselines, "sparse-written", 5.0, info=True),
        _precopy(runs),
        _precopy(runs, larger=True),
        _postcopy_scaling(runs),
        _postcopy_once(runs),
        _memory(runs),
        _verified(runs),
    ]
