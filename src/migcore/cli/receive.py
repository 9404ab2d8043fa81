"""``migcore receive``: wait for one migration and write the region (and its state) out.

A failed migration before the switchover leaves the listener waiting for
the next source. After a post-copy switch a lost link pauses the reception:
the command keeps it (and its listener) alive for ``migcore send ...
--recover ID`` and says so; only ``--abandon-after`` or Ctrl-C give the
missing pages up, and then what arrived is kept as ``FILE.partial``.
``--out FILE`` is checked before anything is accepted (its folder exists and
is writable, and a region must fit in its free space), and is written
atomically: a temporary file beside it, fsync, rename.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from rich.console import Console

import migcore
from migcore.cli.common import add_auth_options, add_output_options, check_listen, tls_context, token
from migcore.cli.display import JsonProgress, logger, print_json, stats_record, stats_table
from migcore.cli.errors import CommandError, Exit, address_error, file_error
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
        "--abandon-after", type=parse_duration, default=None, metavar="SECONDS",
        help="give up a post-copy reception paused this long (its missing pages are written as zeros, to FILE.partial)",
    )
    recv.add_argument(
        "--insecure", action="store_true",
        help="accept unauthenticated sources on a non-loopback address (no --token or --tls-*)",
    )
    add_auth_options(recv)
    add_output_options(recv)
    recv.set_defaults(func=run)


def run(args: argparse.Namespace, console: Console) -> int:
    max_bytes = args.max_bytes
    if args.out:
        room = _room_for(Path(args.out))
        if isinstance(room, str):
            raise CommandError(Exit.FILE, room)
        # a region that cannot be written out is refused at the handshake, before a page moves
        max_bytes = room if max_bytes is None else min(max_bytes, room)
    options: dict[str, Any] = {"max_bytes": max_bytes, "compat": args.compat}
    if args.max_state_bytes is not None:
        options["max_state_bytes"] = args.max_state_bytes
    options.update(token=token(args), tls=tls_context(args, server=True), insecure=args.insecure)
    check_listen(args.address, options)
    try:
        listener = migcore.listen(args.address, **options)
    except OSError as exc:
        raise address_error(args.address, exc) from None
    with listener:
        # the bound address comes first (on stdout, or stderr under --json), so a script that passed port 0 can read it
        listening = f"listening on {listener.address}"
        print(listening, file=sys.stderr if args.json or args.progress_json else sys.stdout, flush=True)
        received = _receive_one(args, listener)
        progress = JsonProgress() if args.progress_json else None
        complete, why = _wait(args, console, received, progress)
    try:
        where = _write_out(args.out, received, complete)
    except OSError as exc:
        raise file_error(f"--out {args.out}: could not write the received region", exc) from None
    if not complete:
        raise CommandError(Exit.FAILED, f"{why}; {where}")
    if args.json:
        print_json(stats_record(received.stats, out=args.out, state_bytes=len(received.state)))
    else:
        console.print(stats_table("received", received.stats))
        console.print(where)
    return int(Exit.OK)


def _room_for(out: Path) -> int | str:
    """The largest region ``out`` can take (its folder's free space, minus room for the state), or why none."""
    folder = out.parent if str(out.parent) else Path(".")
    if not folder.is_dir():
        return f"--out {out}: the folder {folder} does not exist"
    if not os.access(folder, os.W_OK | os.X_OK):
        return f"--out {out}: the folder {folder} is not writable"
    if out.is_dir():
        return f"--out {out} is a folder"
    free = shutil.disk_usage(folder).free
    room = free - (64 << 20)  # the state file and the file system's own needs
    if room <= 0:
        return f"--out {out}: only {format_size(free)} free in {folder}"
    return room


def _wait(
    args: argparse.Namespace, console: Console, received: migcore.Received, progress: JsonProgress | None
) -> tuple[bool, str]:
    """Until every post-copy page arrived (True), or the program gave the missing ones up (False, and why).

    A paused reception waits for its source to recover; it is given up only
    after ``--abandon-after`` seconds paused, or on Ctrl-C. ``progress`` gets
    a snapshot every half second while pages are still owed.
    """
    paused_since: float | None = None
    try:
        while True:
            try:
                received.wait(timeout=0.5)
                return True, ""
            except migcore.MigrationTimeout:
                if progress is not None:
                    progress(received.stats)
            except migcore.MigrationError as exc:
                return False, f"post-copy failed after the switchover: {exc}"
            if received.stats.status != "postcopy-paused":
                paused_since = None
                continue
            if paused_since is None:
                paused_since = time.monotonic()
                console.print(
                    f"[yellow]post-copy paused: the link to the source was lost with {received.missing_pages} pages "
                    f"owed; waiting for it to recover (migcore send PATH ADDRESS --recover {received.migration_id})[/]"
                )
            if args.abandon_after is not None and time.monotonic() - paused_since >= args.abandon_after:
                lost = received.abandon()
                return False, f"gave up after {args.abandon_after:g} s paused (--abandon-after): {lost} pages lost"
    except KeyboardInterrupt:
        lost = received.abandon()
        return False, f"interrupted: {lost} pages never arrived"


def _receive_one(args: argparse.Namespace, listener: migcore.Listener) -> migcore.Received:
    """The first migration that gets through the switchover; none in time is a :class:`CommandError`."""
    while True:
        try:
            return listener.receive(timeout=args.timeout)
        except migcore.MigrationError as exc:
            if _is_idle_timeout(exc):
                raise CommandError(Exit.FAILED, f"no migration arrived within {args.timeout:g} s (--timeout)") from None
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
    _write_atomically(Path(f"{out}.state"), state)
    _write_atomically(out, region.view)
    where = f"wrote {format_size(region.nbytes)} to {out} and {len(state)} B of state to {out}.state"
    if not complete:
        where += f" ({received.missing_pages} pages never arrived: the image is INCOMPLETE)"
    return where


def _write_atomically(path: Path, data: bytes | memoryview) -> None:
    """A temporary file in the same folder, fsync, rename, fsync of the folder: all of ``data`` or nothing."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent if str(path.parent) else ".")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    dirfd = os.open(path.parent if str(path.parent) else ".", os.O_RDONLY)
    try:
        os.fsync(dirfd)
    finally:
        os.close(dirfd)


def _is_idle_timeout(exc: BaseException) -> bool:
    """Whether ``receive()`` gave up because no source connected (rather than a failed migration)."""
    return isinstance(exc, TimeoutError) and "no source connected" in str(exc)
