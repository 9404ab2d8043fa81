"""``migcore bench``: run the benchmark suite (:mod:`migcore.bench`) from the command line.

What a person typed (sizes, rates) is parsed here; the suite gets numbers
and :class:`migcore.bench.Rate` objects, so it never depends on the CLI.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.console import Console

from migcore._extras import require
from migcore.cli.errors import CommandError, Exit
from migcore.cli.units import parse_size
from migcore.options import MODES

if TYPE_CHECKING:
    from migcore.bench import Rate


def add_parser(sub: Any, common: argparse.ArgumentParser) -> None:
    """The ``bench`` subcommand and its options."""
    bench = sub.add_parser(
        "bench", parents=[common], help="run the benchmark suite: live migrations over loopback, tables and plots"
    )
    grid = bench.add_mutually_exclusive_group()
    grid.add_argument("--quick", action="store_true", help="a small grid in under a minute (a smoke test)")
    grid.add_argument("--full", action="store_true", help="the default grid plus 2 and 4 GiB regions")
    bench.add_argument("--out", default="bench-results", metavar="DIR", help="results folder (default: %(default)s)")
    bench.add_argument("--sizes", nargs="+", type=parse_size, default=None, metavar="SIZE", help="region sizes of the sweep")
    bench.add_argument("--modes", nargs="+", choices=MODES, default=None, metavar="MODE", help="modes to run")
    bench.add_argument(
        "--rates", nargs="+", default=None, metavar="RATE",
        help="dirty rates of the sweep: fractions of the bare-socket bandwidth (0 0.25 1 2) or absolute (200MiB/s)",
    )
    bench.add_argument("--seed", type=int, default=0, help="seed for the data and the workloads (default: 0)")
    bench.add_argument("--repeat", type=int, default=None, help="runs of each target scenario (best kept; default 3, --quick 2)")
    bench.set_defaults(func=run)


def bench_rate(text: str) -> Rate:
    """A ``--rates`` value: ``0.25`` (fraction of the bare-socket bandwidth), ``0.25x``, or an absolute ``200MiB/s``."""
    from migcore.bench import Rate  # the suite loads on first use: not on every command

    t = text.strip().lower()
    if t.endswith("/s"):
        try:
            return Rate(absolute=float(parse_size(t[:-2])))
        except argparse.ArgumentTypeError as exc:  # a ValueError to the caller, like every other bad rate
            raise ValueError(str(exc)) from None
    try:
        value = float(t.rstrip("x"))
    except ValueError:
        raise ValueError(f"not a dirty rate: {text!r} (try 0.25, 0.5x or 200MiB/s)") from None
    if value < 0:
        raise ValueError(f"dirty rate must be >= 0, got {text!r}")
    return Rate(fraction=value)


def run(args: argparse.Namespace, console: Console) -> int:
    """Run the benchmark suite; exit 1 if a run was not verified identical."""
    try:
        rates = tuple(bench_rate(r) for r in args.rates or ())
    except ValueError as exc:
        raise CommandError(Exit.USAGE, f"--rates: {exc}") from None
    require("matplotlib", "migcore bench (its plots)")
    from migcore.bench import BenchConfig, run_bench

    profile = "quick" if args.quick else "full" if args.full else "default"
    repeat = args.repeat if args.repeat is not None else (2 if args.quick else 3)
    config = BenchConfig(
        profile=profile,
        out=Path(args.out),
        sizes=tuple(args.sizes or ()),
        modes=tuple(args.modes or ()),
        rates=rates,
        seed=args.seed,
        repeat=max(1, repeat),
        warmup=0.1 if args.quick else 0.2,
        fault_samples=100 if args.quick else 200,
    )
    results = run_bench(config, console)
    wrong = [r for r in results["runs"] if not r["verified"]]
    if wrong:
        raise CommandError(Exit.FAILED, f"{len(wrong)} of {len(results['runs'])} runs were not verified identical")
    return int(Exit.OK)
