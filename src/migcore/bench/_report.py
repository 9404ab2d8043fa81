"""Writing a bench run out: JSON and CSV of every run, the terminal summary, the README's performance snippet."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from migcore.bench._machine import one_line
from migcore.bench._targets import TargetResult

MIB = 1 << 20

#: The CSV columns of runs.csv, in order (lists and dicts are written as JSON).
RUN_COLUMNS = (
    "scenario", "rep", "size", "fill", "mode", "pattern", "rate_fraction", "target_rate", "dirty_rate",
    "dirty_fraction", "options", "status", "verified", "engine_verified", "error", "total_time", "downtime",
    "setup_time", "rounds", "transferred_bytes", "wire_ratio", "throughput", "paired_bare_throughput",
    "paired_ratio", "normal_pages", "zero_pages",
    "nonzero_pages", "npages", "postcopy_pages", "postcopy_requests", "faults", "fault_hits", "fault_p50",
    "fault_p99", "src_cpu", "src_migration_cpu", "workload_cpu", "dst_cpu", "src_peak_rss", "src_base_rss",
    "src_overhead_rss", "dst_peak_rss", "dst_base_rss", "dst_overhead_rss", "dst_complete_time",
    "bare_bandwidth", "pages_per_round", "tags", "seed", "started_at",
)
BASELINE_COLUMNS = (
    "baseline", "size", "time", "throughput", "src_cpu", "dst_cpu", "src_peak_rss", "src_base_rss",
    "dst_peak_rss", "dst_base_rss",
)


def _clean(value: Any) -> Any:
    """JSON-safe: NaN and infinities become None, tuples lists, recursively."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


def write_json(results: dict[str, Any], path: Path) -> None:
    path.write_text(json.dumps(_clean(results), indent=1, allow_nan=False) + "\n", encoding="utf-8")


def write_csv(rows: list[dict[str, Any]], columns: tuple[str, ...], path: Path, machine: dict[str, Any]) -> None:
    """One row per run; the machine description rides along in ``machine_*`` columns."""
    extra = {f"machine_{k}": json.dumps(v) if isinstance(v, (list, dict)) else v for k, v in machine.items()}
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=[*columns, *extra])
        writer.writeheader()
        for row in rows:
            out = {}
            for c in columns:
                v = row.get(c, "")
                out[c] = json.dumps(_clean(v)) if isinstance(v, (list, dict, tuple)) else _clean(v)
            writer.writerow({**out, **extra})


def _ms(x: float | None) -> str:
    return "-" if x is None or not math.isfinite(x) else f"{x * 1e3:.1f}"


def _s(x: float | None) -> str:
    return "-" if x is None or not math.isfinite(x) else f"{x:.3f}"


def summary_table(results: dict[str, Any]) -> Table:
    table = Table(title=f"migcore bench: {len(results['runs'])} runs", show_lines=False)
    for col, justify in (
        ("scenario", "left"), ("rate/bw", "right"), ("total s", "right"), ("down ms", "right"),
        ("setup ms", "right"), ("rounds", "right"), ("wire/size", "right"), ("GB/s", "right"),
        ("fault p50/p99 ms", "right"), ("cpu src/dst s", "right"), ("peak MiB src/dst", "right"), ("ok", "center"),
    ):
        table.add_column(col, justify=justify)  # type: ignore[arg-type]
    for r in results["runs"]:
        faults = f"{_ms(r['fault_p50'])}/{_ms(r['fault_p99'])}" if r.get("faults") else "-"
        table.add_row(
            r["scenario"] + (f" #{r['rep']}" if r.get("rep") else ""),
            f"{r['dirty_fraction']:.2f}" if r.get("dirty_rate") else "0",
            _s(r["total_time"]),
            _ms(r["downtime"]),
            _ms(r["setup_time"]),
            str(r["rounds"]),
            f"{r['wire_ratio']:.2f}" if math.isfinite(r["wire_ratio"]) else "-",
            f"{r['throughput'] / 1e9:.2f}" if math.isfinite(r["throughput"]) else "-",
            faults,
            f"{r['src_migration_cpu']:.2f}/{r['dst_cpu']:.2f}",
            f"{r['src_peak_rss'] / MIB:.0f}/{r['dst_peak_rss'] / MIB:.0f}",
            "[green]yes[/]" if r["verified"] else f"[red]NO[/] {r.get('error', '')[:40]}",
        )
    return table


def baseline_table(baselines: list[dict[str, Any]]) -> Table:
    table = Table(title="baselines (same run, random data)")
    for col in ("baseline", "size MiB", "time s", "GB/s", "cpu src/dst s", "peak MiB src/dst"):
        table.add_column(col, justify="left" if col == "baseline" else "right")
    for b in baselines:
        dst_cpu = b.get("dst_cpu")
        table.add_row(
            b["baseline"], str(b["size"] // MIB), f"{b['time']:.3f}", f"{b['throughput'] / 1e9:.2f}",
            f"{b['src_cpu']:.2f}/{dst_cpu:.2f}" if dst_cpu is not None else f"{b['src_cpu']:.2f}/-",
            f"{b['src_peak_rss'] / MIB:.0f}/{b['dst_peak_rss'] / MIB:.0f}" if "dst_peak_rss" in b else "-",
        )
    return table


def target_table(targets: list[TargetResult]) -> Table:
    table = Table(title="targets (loopback)")
    for col in ("target", "goal", "measured", "result"):
        table.add_column(col)
    colour = {"PASS": "green", "FAIL": "red", "n/a": "yellow", "info": "cyan"}
    for t in targets:
        table.add_row(t.name, t.goal, t.measured, f"[{colour[t.verdict]}]{t.verdict}[/]")
    return table


def print_summary(results: dict[str, Any], targets: list[TargetResult], console: Console) -> None:
    console.print(baseline_table(results["baselines"]))
    console.print(summary_table(results))
    console.print(target_table(targets))
    console.print(f"machine: {one_line(results['machine'])}")


def markdown(results: dict[str, Any], targets: list[TargetResult]) -> str:
    """The README's performance section, generated from this run."""
    m = results["machine"]
    cfg = results["config"]
    lines = [
        "## Performance",
        "",
        f"Measured with `{cfg['command']}` on {results['finished_at'][:10]} "
        f"(migcore {m.get('migcore')}, commit `{m.get('git_commit', '')[:12] or 'unknown'}`).",
        f"Machine: {one_line(m)}.",
        "Each run migrates a live region over loopback TCP to a listener in a separate process while a",
        "workload writes it; the destination's page hashes are compared with the source's at the pause.",
        "Baselines come from the same run, so the figures are ratios.",
        "",
        "| baseline | size | time | throughput |",
        "|---|---:|---:|---:|",
    ]
    for b in results["baselines"]:
        lines.append(f"| {b['baseline']} | {b['size'] // MIB} MiB | {b['time'] * 1e3:.1f} ms | {b['throughput'] / 1e9:.2f} GB/s |")
    lines += [
        "",
        "| scenario | dirty rate / bw | total | downtime | rounds | wire / region | verified |",
        "|---|---:|---:|---:|---:|---:|:-:|",
    ]
    shown: set[str] = set()
    for r in results["runs"]:
        if r["scenario"] in shown:
            continue
        shown.add(r["scenario"])
        lines.append(
            f"| {r['scenario']} | {r['dirty_fraction']:.2f} | {_s(r['total_time'])} s | {_ms(r['downtime'])} ms | "
            f"{r['rounds']} | {r['wire_ratio']:.2f} | {'yes' if r['verified'] else 'NO'} |"
        )
    lines += ["", "| target | goal | measured | result |", "|---|---|---|:-:|"]
    for t in targets:
        lines.append(f"| {t.name} | {t.goal} | {t.measured} | {t.verdict} |")
    lines += [
        "",
        "Plots: `downtime_vs_dirty_rate.png`, `total_time_vs_dirty_rate.png`, `bytes_vs_dirty_rate.png`,",
        "`postcopy_fault_latency.png` in the results folder. Reproduce with `make bench` (the default grid,",
        "a few minutes on 2 cores), `migcore bench --full` (adds 2 and 4 GiB regions) or",
        "`migcore bench --quick` (under a minute).",
        "",
    ]
    return "\n".join(lines)
