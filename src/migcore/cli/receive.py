"""``migcore receive``: wait for one migration and write the region (and its state) out.

A failed migration before the switchover leaves the listener waiting for
the next source; after it, what arrived is kept as ``FILE.partial``.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from rich.console import Console

import migcore
from migcore.cli.common import add_auth_options, tls_context, token
from migcore.cli.display import logger, stats_table
from migcore.cli.units import format_size, parse_duration, parse_size


def add_parser(sub: Any, common: argparse.ArgumentParser) -> None:
    """The ``receive`` subcommand and its options."""
    recv = sub.add_parser("receive", parents=[common], help="wait for one migration and write it out")
    recv.add_argument("address", metavar="ADDRESS", help="where to listen, e.g. tcp://0.0.0.0:7000 (port 0 picks one)")
    recv.add_argument("--out", default=None, metavar="FILE", help="write the region here and the state to FILE.state")
    recv.add_argument("--max-bytes", type=parse_size, default=None, help="refuse regions larger than this")
    recv.add_argument("--max-state-bytes", type=parse_size, default=None, help="refuse state blobs larger than this")
    recv.add_argument(
        "--compat", default=None, metavar="S", help="application compatibility string; both ends must agree"
    )
    recv.add_argument(
        "--timeout", type=parse_duration, default=None, metavar="SECONDS", help="longest wait for a source"
    )
    recv.add_argument(
        "--insecure", action="store_true",
        help="accept unauthenticated sources on a non-loopback address (no --token or --tls-*)",
    )
    add_auth_options(recv)
    recv.set_defaults(func=run)


def run(args: argparse.Namespace, console: Console) -> int:
    limits: dict[str, Any] = {} if args.max_state_bytes is None else {"max_state_bytes": args.max_state_bytes}
    limits.update(token=token(args), tls=tls_context(args, server=True), insecure=args.insecure)
    try:
        listener = migcore.listen(args.address, max_bytes=args.max_bytes, compat=args.compat, **limits)
    except ValueError as exc:
        console.print(f"[red]migcore receive: {exc}[/]")
        return 2
    with listener:
        # the bound address goes to stdout first, so a script that passed port 0 can read it
        print(f"listening on {listener.address}", flush=True)
        received = _receive_one(args, console, listener)
        if received is None:
            return 1
        complete = True
        try:
            received.wait(timeout=args.timeout)  # post-copy: until every page arrived and verified
        except migcore.MigrationError as exc:
            complete = False
            console.print(f"[red bold]post-copy failed after the switchover:[/] {exc}")
    where = _write_out(args.out, received, complete)
    console.print(stats_table("received", received.stats))
    console.print(where)
    return 0 if complete else 1


def _receive_one(args: argparse.Namespace, console: Console, listener: migcore.Listener) -> migcore.Received | None:
    """The first migration that gets through the switchover, or None when none came in time."""
    while True:
        try:
            return listener.receive(timeout=args.timeout)
        except migcore.MigrationError as exc:
            if _is_idle_timeout(exc):
                console.print(f"[red]no migration arrived within {args.timeout} s[/]")
                return None
            logger.warning(
                "a migration failed (%s: %s); still listening on %s", type(exc).__name__, exc, listener.address
            )


def _write_out(out_name: str | None, received: migcore.Received, complete: bool) -> str:
    """Write the region and state to ``out_name`` (``.partial`` when incomplete); the line that says so.

    Without ``out_name`` nothing is written and the line gives the region's digest.
    """
    region = received.region
    state: bytes = bytes(received.state)
    if not out_name:
        import xxhash

        digest = xxhash.xxh3_64_hexdigest(region.view)
        return f"received {format_size(region.nbytes)} (xxh3-64 {digest}), {len(state)} B of state"
    out = Path(out_name) if complete else Path(f"{out_name}.partial")
    tmp = out.with_name(out.name + ".tmp")
    with tmp.open("wb") as f:
        f.write(region.view)
    tmp.replace(out)
    Path(f"{out}.state").write_bytes(state)
    where = f"wrote {format_size(region.nbytes)} to {out} and {len(state)} B of state to {out}.state"
    if not complete:
        where += f" ({received.missing_pages} pages never arrived: the image is INCOMPLETE)"
    return where


def _is_idle_timeout(exc: BaseException) -> bool:
    """Whether ``receive()`` gave up because no source connected (rather than a failed migration)."""
    return isinstance(exc, TimeoutError) and "no source connected" in str(exc)
