"""One bench run: baselines, the scenario grid, then the result files, plots, summary and targets."""

from __future__ import annotations

import logging
import shlex
import sys
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from rich.console import Console

from migcore.bench import _grid, _machine, _plots, _report, _runs, _targets
from migcore.bench._grid import Rate
from migcore.options import Mode

log = logging.getLogger("migcore.bench")

#: Scenarios behind a target run this many times (the best run counts, like the baselines).
TARGET_TAGS = ("stopcopy-random", "stopcopy-sparse", "stopcopy-sparse-written", "postcopy-scaling")
#: Target scenarios whose every run is paired with a bare send just before it (ratios taken seconds apart).
PAIRED_TAGS = ("stopcopy-random", "stopcopy-sparse", "stopcopy-sparse-written")


@dataclass(frozen=True)
class BenchConfig:
    """What to run and where to write it."""

    profile: str = "default"
    out: Path = Path("bench-results")
    sizes: tuple[int, ...] = ()
    modes: tuple[Mode, ...] = ()
    rates: tuple[Rate, ...] = ()
    seed: int = 0
    repeat: int = 3
    warmup: float = 0.2
    fault_samples: int = 200
    command: str = field(default_factory=lambda: shlex.join(["migcore", *sys.argv[1:]]))


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def run_bench(config: BenchConfig, console: Console | None = None) -> dict[str, Any]:
    """Run the grid of ``config``; write JSON, CSV, plots and Markdown into ``config.out``; return the results."""
    console = console or Console()
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    options = _grid.available_options()
    grid = _grid.build_grid(
        config.profile, sizes=config.sizes or None, modes=config.modes or None, rates=config.rates or None,
        options=options,
    )
    plan = [(s, rep) for s in grid for rep in range(config.repeat if set(s.tags) & set(TARGET_TAGS) else 1)]
    results: dict[str, Any] = {
        "machine": _machine.describe(),
        "config": {**asdict(config), "out": str(out), "rates": [r.label for r in config.rates], "options": options},
        "started_at": _now(),
        "baselines": [],
        "runs": [],
    }
    console.print(
        f"migcore bench ({config.profile}): {len(plan)} runs over {len(grid)} scenarios, "
        f"options found: {', '.join(options) or 'none'}; results in {out}/"
    )
    t0 = time.monotonic()
    with _runs.DestinationProcess() as dest:
        bandwidth: dict[int, float] = {}
        for size in sorted({s.size for s in grid}):
            with console.status(f"baselines at {size >> 20} MiB"):
                rows = _runs.run_baselines(dest, size, config.seed)
            results["baselines"] += rows
            bandwidth[size] = next(r["throughput"] for r in rows if r["baseline"] == "bare_sendall")
        for i, (scenario, rep) in enumerate(plan, 1):
            pair = not scenario.options and bool(set(scenario.tags) & set(PAIRED_TAGS))
            with console.status(f"[{i}/{len(plan)}] {scenario.name}"):
                row = _runs.run_scenario(
                    dest, scenario, bandwidth=bandwidth[scenario.size], seed=config.seed,
                    warmup=config.warmup, fault_samples=config.fault_samples, paired=pair,
                )
            row["rep"] = rep
            row["seed"] = config.seed
            results["runs"].append(row)
            console.print(
                f"[{i}/{len(plan)}] {scenario.name}: total {row['total_time']:.3f} s, downtime "
                f"{row['downtime'] * 1e3:.1f} ms, wire {row['wire_ratio']:.2f}x, "
                f"{'verified' if row['verified'] else '[red]NOT verified[/] ' + row['error']}",
                highlight=False,
            )
    results["finished_at"] = _now()
    results["elapsed"] = time.monotonic() - t0
    targets = _targets.check(results["runs"], results["baselines"])
    results["targets"] = [t.as_dict() for t in targets]
    _report.write_json(results, out / "results.json")
    _report.write_csv(results["runs"], _report.RUN_COLUMNS, out / "runs.csv", results["machine"])
    _report.write_csv(results["baselines"], _report.BASELINE_COLUMNS, out / "baselines.csv", results["machine"])
    plots = _plots.plot_all(results, out)
    (out / "README-performance.md").write_text(_report.markdown(results, targets), encoding="utf-8")
    # a wide table even when the output is a file (nohup, CI logs)
    wide = console if console.is_terminal else Console(width=200, force_terminal=False)
    _report.print_summary(results, targets, wide)
    console.print(
        f"wrote {out}/results.json, runs.csv, baselines.csv, README-performance.md and "
        f"{len(plots)} plots in {results['elapsed']:.0f} s"
    )
    return results
