"""The ``migcore`` parser and the one place a command's failure becomes a line on stderr and an exit status.

A command either returns :attr:`Exit.OK` or raises; :func:`main` turns what
it raised into a :class:`~migcore.cli.errors.CommandError` and prints
``migcore COMMAND: MESSAGE`` on stderr (with ``-v`` the traceback first).
With ``--json`` it also prints ``{"status": "failed", "error": ..., "exit_status": N}``
on stdout, so a tool reading stdout always gets one object.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import traceback
from collections.abc import Sequence
from typing import NoReturn

from rich.console import Console

import migcore
from migcore.cli import bench, demo, receive, send, token
from migcore.cli.display import configure_logging
from migcore.cli.errors import CommandError, Exit, as_command_error, epilog


class Parser(argparse.ArgumentParser):
    """argparse with a one-line error: ``migcore send: argument --streams: ... (see migcore send --help)``."""

    def error(self, message: str) -> NoReturn:
        self.exit(int(Exit.USAGE), f"{self.prog}: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    """The ``migcore`` parser: global options, then one subcommand per command module."""
    parser = Parser(
        prog="migcore",
        description="Live-migrate a running program's memory to another host with a millisecond pause.",
        epilog=epilog(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "-v", "--verbose", action="count", default=0, help="more diagnostics and tracebacks (-vv for debug)"
    )
    parser.add_argument("--version", action="version", version=f"migcore {migcore.__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    # -v also works after the command ("migcore send ... -v")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-v", "--verbose", action="count", default=argparse.SUPPRESS, help="more diagnostics")
    for command in (demo, send, receive, bench, token):
        command.add_parser(sub, common)
    return parser


def _check_args(args: argparse.Namespace) -> None:
    """Refuse option values that parse but make no sense."""
    if hasattr(args, "page_size"):
        try:
            # a one-byte region checks the page size exactly as every Region does
            migcore.Region(bytearray(1), args.page_size)
        except ValueError as exc:
            raise CommandError(Exit.USAGE, f"--page-size: {exc}") from None
    if args.command == "demo":
        demo.check_args(args)
    if getattr(args, "max_rounds", 1) < 1:
        raise CommandError(Exit.USAGE, "--max-rounds must be at least 1")
    if getattr(args, "token", None) and getattr(args, "token_file", None):
        raise CommandError(Exit.USAGE, "give --token or --token-file, not both")
    if not 1 <= getattr(args, "streams", 1) <= 64:
        raise CommandError(Exit.USAGE, "--streams must be from 1 to 64")


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``migcore`` command line; returns the exit status."""
    args = build_parser().parse_args(argv)
    machine = getattr(args, "json", False) or getattr(args, "progress_json", False)
    # with --json/--progress-json stdout carries JSON only: what people read goes to stderr
    console = Console(stderr=True) if machine else Console()
    configure_logging(args.verbose)
    _quiet_thread_tracebacks(args.verbose)
    try:
        _check_args(args)
        status: int = args.func(args, console)
        return status
    except BaseException as exc:  # noqa: BLE001 - every failure leaves as one line and a status
        if isinstance(exc, SystemExit):
            raise
        return _fail(args, exc)


def _fail(args: argparse.Namespace, exc: BaseException) -> int:
    """Print ``exc`` as one line on stderr (its traceback before it with -v); its exit status."""
    error = as_command_error(exc)
    if args.verbose:
        traceback.print_exception(exc, file=sys.stderr)
    sys.stdout.flush()
    print(f"migcore {args.command}: {error.message}", file=sys.stderr, flush=True)
    if getattr(args, "json", False):
        failed = {"event": "result", "status": "failed", "error": error.message, "exit_status": int(error.status)}
        print(json.dumps(failed), flush=True)
    return int(error.status)


def _quiet_thread_tracebacks(verbose: int) -> None:
    """An exception that ends a thread is one log line unless -v asked for its traceback."""
    if verbose:
        return

    def hook(hook_args: threading.ExceptHookArgs) -> None:
        if hook_args.exc_type is SystemExit:
            return
        name = hook_args.thread.name if hook_args.thread is not None else "a thread"
        print(f"migcore: {name} stopped: {hook_args.exc_type.__name__}: {hook_args.exc_value}", file=sys.stderr)

    threading.excepthook = hook
