"""``migcore demo``: a whole live migration in one process, drawn round by round and checked byte for byte.

A destination listens on loopback in a thread; the source region is filled
and kept dirty by a :class:`migcore.bench.workload.Workload` while it
migrates; the result is compared with the paused source.
"""

from __future__ import annotations

import argparse
import os
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from rich.console import Console

import migcore
from migcore.bench import workload as _workload
from migcore.cli.common import add_migrate_options, check_migration, migrate_options, tls_context, token
from migcore.cli.display import RoundProgress, print_json, progress_callback, stats_record, stats_table
from migcore.cli.errors import CommandError, Exit, as_command_error, name_flags
from migcore.cli.units import format_rate, format_size, parse_duration, parse_rate, parse_size


def add_parser(sub: Any, common: argparse.ArgumentParser) -> None:
    """The ``demo`` subcommand and its options."""
    demo = sub.add_parser(
        "demo", parents=[common], help="migrate a live in-process workload over loopback and verify it"
    )
    demo.add_argument("--size", type=parse_size, default=64 << 20, help="region size (default: 64MiB)")
    demo.add_argument(
        "--dirty-rate", type=parse_rate, default=20 << 20, help="bytes dirtied per second, e.g. 20MiB/s, 0, inf"
    )
    demo.add_argument(
        "--pattern", choices=_workload.PATTERNS, default="uniform", help="which pages the workload writes"
    )
    demo.add_argument("--hotset-fraction", type=float, default=0.1, help="share of pages in the hot set (default: 0.1)")
    demo.add_argument(
        "--random-fraction", type=float, default=0.5, help="share of pages filled with random data; the rest are zero"
    )
    demo.add_argument("--seed", type=int, default=0, help="seed for the data and the workload (default: 0)")
    demo.add_argument(
        "--warmup", type=parse_duration, default=0.2, metavar="SECONDS", help="workload runs alone this long first"
    )
    add_migrate_options(demo, default_tracker="auto")
    demo.set_defaults(func=run)


def check_args(args: argparse.Namespace) -> None:
    """Refuse demo values that parse but make no sense, or a region this machine cannot hold twice."""
    if args.size <= 0:
        raise CommandError(Exit.USAGE, "--size must be more than 0 bytes")
    if not 0 <= args.random_fraction <= 1:
        raise CommandError(Exit.USAGE, "--random-fraction must be a fraction in [0, 1]")
    if not 0 < args.hotset_fraction <= 1:
        raise CommandError(Exit.USAGE, "--hotset-fraction must be a fraction in (0, 1]")
    available = _memory_available()
    if available is not None and 2 * args.size > available:
        raise CommandError(
            Exit.USAGE,
            f"--size {format_size(args.size)}: the demo holds the region twice (source and destination) and this "
            f"machine has {format_size(available)} of memory available",
        )


def _memory_available() -> int | None:
    """Bytes of memory free for a new mapping (Linux: available pages; elsewhere physical), None if unknown."""
    for name in ("SC_AVPHYS_PAGES", "SC_PHYS_PAGES"):
        try:
            return os.sysconf(name) * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError):
            continue
    return None


def first_difference(a: memoryview, b: memoryview, chunk: int = 16 << 20) -> int | None:
    """The offset of the first byte where ``a`` and ``b`` differ (or where one ends), else ``None``."""
    if a.nbytes != b.nbytes:
        return min(a.nbytes, b.nbytes)
    x = np.frombuffer(a, dtype=np.uint8)
    y = np.frombuffer(b, dtype=np.uint8)
    for lo in range(0, a.nbytes, chunk):
        xs, ys = x[lo : lo + chunk], y[lo : lo + chunk]
        if not np.array_equal(xs, ys):
            return lo + int(np.flatnonzero(xs != ys)[0])
    return None


@dataclass
class _Outcome:
    """What both ends of the in-process migration ended with."""

    bar: RoundProgress
    stats: Any = None
    error: BaseException | None = None
    received: list[Any] = field(default_factory=list)
    receive_error: list[BaseException] = field(default_factory=list)


def run(args: argparse.Namespace, console: Console) -> int:
    size, ps = args.size, args.page_size
    opts = migrate_options(args)  # reads --token-file and the --tls-* files: errors name them
    check_migration("tcp://127.0.0.1:0", opts)
    try:
        region = migcore.Region.allocate(size, ps)
    except (MemoryError, OSError) as exc:
        raise CommandError(Exit.USAGE, f"--size {format_size(size)}: cannot allocate the region ({exc})") from None
    console.print(
        f"[bold]migcore demo[/]: {format_size(size)} region ({region.npages} pages of {ps} B), "
        f"{args.random_fraction:.0%} random pages, workload {args.pattern} at {format_rate(args.dirty_rate)}, "
        f"mode {args.mode}, tracker {args.tracker}"
    )
    _workload.fill(region, random_fraction=args.random_fraction, seed=args.seed)
    work = _workload.Workload(
        region, dirty_rate=args.dirty_rate, pattern=args.pattern, hotset_fraction=args.hotset_fraction, seed=args.seed
    )
    outcome = _migrate(args, console, region, work, opts)
    return _report(args, console, region, work.stats, outcome)


def _migrate(
    args: argparse.Namespace, console: Console, region: migcore.Region, work: _workload.Workload, opts: dict[str, Any]
) -> _Outcome:
    """Migrate ``region`` to a destination thread on loopback while ``work`` keeps writing it."""
    outcome = _Outcome(RoundProgress(console, enabled=not args.no_progress))
    with migcore.listen(
        "tcp://127.0.0.1:0", compat=args.compat, token=token(args), tls=tls_context(args, server=True)
    ) as listener:

        def destination() -> None:
            try:
                outcome.received.append(listener.receive(timeout=args.timeout))
            except BaseException as exc:  # noqa: BLE001 - reported below
                outcome.receive_error.append(exc)

        dest = threading.Thread(target=destination, name="migcore-demo-destination", daemon=True)
        dest.start()
        opts.update(pause=work.pause, resume=work.resume, throttle=work.throttle)
        progress = progress_callback(outcome.bar, json_lines=args.progress_json)
        with work, outcome.bar:
            # let the workload run alone for a moment so the first round has something to chase
            time.sleep(args.warmup)
            try:
                outcome.stats = migcore.migrate(region, listener.address, progress=progress, **opts)
            except migcore.MigrationError as exc:
                outcome.error = exc
            work.pause()  # migrate() paused it on success; make sure of it on failure too
        if outcome.error is None:
            dest.join(args.timeout)
    dest.join(5)  # after a failure the closed listener ends a receive() still waiting for a source
    return outcome


def _report(
    args: argparse.Namespace,
    console: Console,
    region: migcore.Region,
    wstats: _workload.WorkloadStats,
    outcome: _Outcome,
) -> int:
    """Compare both regions and print the table (or the JSON object); a failure is a :class:`CommandError`."""
    if outcome.error is not None:
        raise as_command_error(outcome.error)
    if outcome.receive_error or not outcome.received:
        err = outcome.receive_error[0] if outcome.receive_error else TimeoutError("the destination did not finish")
        raise CommandError(Exit.FAILED, f"destination failed: {name_flags(str(err), bare=False)}")
    dst = outcome.received[0]
    try:
        dst.wait(timeout=args.timeout)  # post-copy: until every page arrived
    except migcore.MigrationError as exc:
        raise CommandError(Exit.FAILED, f"post-copy failed after the switchover: {exc}") from exc
    diff = first_difference(region.view, dst.region.view)
    identical = diff is None
    if args.json:
        print_json(stats_record(
            outcome.stats, identical=identical, first_difference=diff,
            workload={"pattern": args.pattern, "achieved_rate": wstats.achieved_rate,
                      "pages_written": wstats.pages_written, "max_throttle_level": wstats.max_throttle_level},
        ))  # fmt: skip
    else:
        _print_table(args, console, wstats, outcome, diff)
    if not identical:
        raise CommandError(Exit.FAILED, f"the destination region differs from the paused source at byte {diff}")
    return int(Exit.OK)


def _print_table(
    args: argparse.Namespace, console: Console, wstats: _workload.WorkloadStats, outcome: _Outcome, diff: int | None
) -> None:
    verdict = "[green bold]identical[/]" if diff is None else f"[red bold]DIFFERENT[/] (first at byte {diff})"
    throttled = f", throttled up to {wstats.max_throttle_level}%" if wstats.max_throttle_level else ""
    achieved = format_rate(wstats.achieved_rate)
    extra = [
        ("workload", f"{args.pattern}, achieved {achieved}, {wstats.pages_written} page writes{throttled}"),
        ("verified", verdict),
    ]
    bar = outcome.bar
    table = stats_table(
        "migration", outcome.stats, extra, expected_downtime=bar.expected_downtime, downtime_limit=args.downtime_limit
    )
    console.print(table)
    if diff is None:
        console.print("destination region is byte-for-byte [green bold]identical[/] to the paused source")
