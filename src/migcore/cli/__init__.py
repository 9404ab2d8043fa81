"""The ``migcore`` command line: ``send``, ``receive``, ``demo`` and ``bench``.

- ``migcore receive tcp://HOST:PORT [--out FILE]`` waits for one migration
  and writes the region to FILE (and the state blob to FILE.state).
- ``migcore send PATH tcp://HOST:PORT`` migrates a regular file or a POSIX
  shared-memory segment (``/dev/shm/NAME``) that another process keeps
  writing, with the hash tracker (it sees writes from any process).
- ``migcore demo`` runs a whole migration in one process: a destination on
  loopback, a source region with a live workload dirtying it, a progress bar
  per round and a final table, and a byte-for-byte check of the result.
- ``migcore bench [--quick|--full] [--out DIR]`` runs the benchmark suite
  (:mod:`migcore.bench`): a grid of live migrations to a destination process,
  with baselines, a summary table, targets, CSV/JSON, plots and a Markdown
  snippet.

One module per command (``demo``, ``send``, ``receive``, ``bench``), each
adding its subcommand and running it; ``common`` holds the options they
share, ``display`` the bars, tables and logging, ``units`` sizes, rates and
durations. This package is the only part of migcore that prints or
configures logging; it uses migcore's public API and :mod:`migcore.bench`.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from rich.console import Console

import migcore
from migcore.cli import bench, demo, receive, send, token
from migcore.cli.demo import first_difference
from migcore.cli.display import RoundProgress, configure_logging, stats_table
from migcore.cli.units import format_rate, format_seconds, format_size, parse_duration, parse_rate, parse_size

__all__ = [
    "RoundProgress",
    "build_parser",
    "first_difference",
    "format_rate",
    "format_seconds",
    "format_size",
    "main",
    "parse_duration",
    "parse_rate",
    "parse_size",
    "stats_table",
]


def build_parser() -> argparse.ArgumentParser:
    """The ``migcore`` parser: global options, then one subcommand per command module."""
    parser = argparse.ArgumentParser(
        prog="migcore",
        description="Live-migrate a running program's memory to another host with a millisecond pause.",
    )
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more diagnostics (-vv for debug)")
    parser.add_argument("--version", action="version", version=f"migcore {migcore.__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    # -v also works after the command ("migcore send ... -v")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-v", "--verbose", action="count", default=argparse.SUPPRESS, help="more diagnostics")
    for command in (demo, send, receive, bench, token):
        command.add_parser(sub, common)
    return parser


def _check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Reject option values that parse but make no sense, with argparse's usage message."""
    if hasattr(args, "page_size"):
        try:
            # a one-byte region checks the page size exactly as every Region does
            migcore.Region(bytearray(1), args.page_size)
        except ValueError as exc:
            parser.error(f"--page-size: {exc}")
    if args.command == "demo":
        demo.check_args(parser, args)
    if getattr(args, "max_rounds", 1) < 1:
        parser.error("--max-rounds must be at least 1")
    if getattr(args, "token", None) and getattr(args, "token_file", None):
        parser.error("give --token or --token-file, not both")
    if not 1 <= getattr(args, "streams", 1) <= 64:
        parser.error("--streams must be from 1 to 64")


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``migcore`` command line; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    _check_args(parser, args)
    console = Console()
    configure_logging(args.verbose, Console(stderr=True))
    try:
        result: int = args.func(args, console)
    except KeyboardInterrupt:
        console.print("[red]interrupted[/]")
        return 130
    return result
