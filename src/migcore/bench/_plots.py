"""PNG plots of a bench run (matplotlib, Agg backend): the classic live-migration curves."""

from __future__ import annotations

import logging
from collections import defaultdict
from pathlib import Path
from typing import Any

log = logging.getLogger("migcore.bench")

MIB = 1 << 20
MODE_ORDER = ("stopcopy", "precopy", "postcopy", "hybrid")


def _sweep(runs: list[dict[str, Any]]) -> tuple[int, dict[str, list[dict[str, Any]]]]:
    """The uniform-pattern, random-fill runs at the most common size, by mode (best repetition kept)."""
    pool = [r for r in runs if r["pattern"] == "uniform" and r["fill"] == "random" and not r["options"]]
    pool = [r for r in pool if r.get("status") == "completed"]
    if not pool:
        return 0, {}
    sizes = [r["size"] for r in pool if "sweep" in r.get("tags", [])] or [r["size"] for r in pool]
    size = max(set(sizes), key=sizes.count)
    best: dict[tuple[str, float], dict[str, Any]] = {}
    for r in pool:
        if r["size"] != size:
            continue
        key = (r["mode"], r["rate_fraction"] or 0.0)
        if key not in best or r["total_time"] < best[key]["total_time"]:
            best[key] = r
    by_mode: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for (mode, _), r in sorted(best.items(), key=lambda kv: kv[0][1]):
        by_mode[mode].append(r)
    return size, dict(by_mode)


def plot_all(results: dict[str, Any], out: Path) -> list[Path]:
    """Write every plot into ``out``; returns the files written (none without matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # pragma: no cover - matplotlib is in the bench dependency group
        log.warning("matplotlib is not installed: no plots (pip install matplotlib)")
        return []
    runs: list[dict[str, Any]] = results["runs"]
    written: list[Path] = []
    size, by_mode = _sweep(runs)
    title = f"{size // MIB} MiB region, uniform writes, loopback" if size else ""
    series = (
        ("downtime", "downtime (s)", "downtime_vs_dirty_rate.png", True),
        ("total_time", "total migration time (s)", "total_time_vs_dirty_rate.png", True),
        ("wire_ratio", "bytes on the wire / region size", "bytes_vs_dirty_rate.png", False),
    )
    for field, ylabel, name, logy in series:
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for mode in MODE_ORDER:
            pts = by_mode.get(mode, [])
            if not pts:
                continue
            xs = [p["dirty_fraction"] for p in pts]
            ys = [p[field] for p in pts]
            ax.plot(xs, ys, marker="o", label=mode)
        if field == "downtime":
            ax.axhline(0.3, color="grey", linestyle="--", linewidth=0.8, label="downtime_limit")
        ax.set_xlabel("achieved dirty rate / bare-socket bandwidth")
        ax.set_ylabel(ylabel)
        if logy:
            ax.set_yscale("log")
        ax.set_title(title)
        ax.grid(True, alpha=0.3)
        ax.legend()
        fig.tight_layout()
        path = out / name
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    lat = [
        (r["size"], [x * 1e3 for x in r["fault_latencies"]])
        for r in runs
        if r["mode"] in ("postcopy", "hybrid") and r.get("fault_latencies")
    ]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    by_size: dict[int, list[float]] = defaultdict(list)
    for s, xs in lat:
        by_size[s].extend(xs)
    for s in sorted(by_size):
        ax.hist(by_size[s], bins=40, alpha=0.6, label=f"{s // MIB} MiB ({len(by_size[s])} faults)")
    if not by_size:
        ax.text(0.5, 0.5, "no demand faults measured", ha="center", va="center", transform=ax.transAxes)
    else:
        ax.legend()
    ax.set_xlabel("demand-fault latency: Received.ensure() of one missing page (ms)")
    ax.set_ylabel("faults")
    ax.set_title("post-copy demand faults right after the switch")
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    path = out / "postcopy_fault_latency.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    written.append(path)
    return written
