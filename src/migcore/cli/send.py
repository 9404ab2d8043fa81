"""``migcore send``: migrate a file or ``/dev/shm`` segment that another process keeps writing.

The hash tracker sees writes from any process; ``--pause-signal PID`` stops
the writer (SIGSTOP) at the pause and lets it carry on (SIGCONT) if the
migration fails before the switchover.
"""

from __future__ import annotations

import argparse
import contextlib
import mmap
import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from rich.console import Console

import migcore
from migcore.cli.common import add_migrate_options, check_migration, migrate_options
from migcore.cli.display import RoundProgress, logger, print_json, progress_callback, stats_record, stats_table
from migcore.cli.errors import CommandError, Exit, file_error, name_flags
from migcore.cli.units import format_size, parse_duration


def add_parser(sub: Any, common: argparse.ArgumentParser) -> None:
    """The ``send`` subcommand and its options."""
    send = sub.add_parser(
        "send", parents=[common], help="migrate a file or /dev/shm segment that another process writes"
    )
    send.add_argument("path", metavar="PATH", help="a regular file or a POSIX shared-memory segment (/dev/shm/NAME)")
    send.add_argument("address", metavar="ADDRESS", help="the destination, e.g. tcp://HOST:PORT")
    send.add_argument(
        "--pause-signal",
        type=int,
        default=None,
        metavar="PID",
        help="SIGSTOP this process (the writer) at the pause; SIGCONT it if the migration fails before the switchover",
    )
    send.add_argument(
        "--after",
        choices=("stop", "cont", "term"),
        default="stop",
        help="what to do with --pause-signal's process after success: leave it stopped (default), "
        "SIGCONT it, or SIGTERM it",
    )
    send.add_argument(
        "--state-file", default=None, metavar="F", help="send this file's bytes (read after the pause) as the state"
    )
    send.add_argument(
        "--recover", default=None, metavar="ID",
        help="continue post-copy migration ID after a lost link (the destination's listener holds it paused)",
    )
    send.add_argument(
        "--wait", type=parse_duration, default=None, metavar="SECONDS",
        help="retry the connection (with backoff) until the destination listens, up to SECONDS",
    )
    send.add_argument(
        "--insecure", action="store_true",
        help="allow a destination off this host without --token or --tls-*: nothing proves who receives the memory",
    )
    add_migrate_options(send, default_tracker="hash")
    send.set_defaults(func=run)


def process_stopped(pid: int) -> bool:
    """Whether ``pid`` is stopped (or gone): nothing runs there that could write."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True  # gone (or no procfs): nothing runs there
    state = stat.rsplit(")", 1)[1].split()[0]
    return state in ("T", "t", "Z", "X")


def _stop_process(pid: int, timeout: float = 5.0) -> None:
    """SIGSTOP ``pid`` and return once it is really stopped (no write in flight)."""
    try:
        os.kill(pid, signal.SIGSTOP)
    except ProcessLookupError:
        logger.warning("process %d is gone: nothing writes the region any more", pid)
        return
    deadline = time.monotonic() + timeout
    while not process_stopped(pid):
        if time.monotonic() > deadline:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
            raise migcore.MigrationError(f"process {pid} did not stop within {timeout:g} s after SIGSTOP")
        time.sleep(0.001)


@contextlib.contextmanager
def _mapped(path: Path) -> Iterator[mmap.mmap]:
    """``path`` mapped shared and writable; a file that cannot be is a one-line error naming PATH."""
    try:
        fd = os.open(path, os.O_RDWR)
    except OSError as exc:
        raise file_error(f"PATH {path}", exc) from None
    try:
        size = os.fstat(fd).st_size
        if size == 0:
            raise CommandError(Exit.FILE, f"PATH {path} is empty: nothing to migrate")
        try:
            mapping = mmap.mmap(fd, size, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ | mmap.PROT_WRITE)
        except OSError as exc:
            raise file_error(f"PATH {path} cannot be mapped", exc) from None
    finally:
        os.close(fd)
    try:
        yield mapping
    finally:
        with contextlib.suppress(BufferError):
            mapping.close()


def _check_path(path: Path) -> None:
    """PATH must be a regular file or a shared-memory segment: anything else is named before a byte moves."""
    if not path.exists():
        raise CommandError(Exit.FILE, f"PATH {path}: no such file")
    if path.is_dir():
        raise CommandError(Exit.FILE, f"PATH {path} is a folder, not a file or /dev/shm segment")
    if not path.is_file():
        raise CommandError(Exit.FILE, f"PATH {path} is not a regular file or /dev/shm segment")
    if path.stat().st_size == 0:
        raise CommandError(Exit.FILE, f"PATH {path} is empty: nothing to migrate")


class _Writer:
    """The other process that writes the region: paused, resumed and read through migrate()'s callbacks."""

    def __init__(self, pid: int | None, state_file: Path | None) -> None:
        self.pid = pid
        self.state_file = state_file
        self.paused = threading.Event()
        self.resumed = threading.Event()

    def pause(self) -> None:
        if self.pid is not None:
            _stop_process(self.pid)
            logger.info("stopped process %d", self.pid)
        self.paused.set()

    def state(self) -> bytes:
        if self.state_file is None:
            return b""
        try:
            return self.state_file.read_bytes()
        except OSError as exc:  # a MigrationError makes migrate() resume the writer and fail cleanly
            raise migcore.MigrationError(f"cannot read the state file: {exc}") from exc

    def cont(self, why: str) -> None:
        if self.pid is not None and self.paused.is_set():
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGCONT)
            self.resumed.set()
            logger.info("resumed process %d (%s)", self.pid, why)


def run(args: argparse.Namespace, console: Console) -> int:
    path = Path(args.path)
    if args.tracker == "writes":
        raise CommandError(
            Exit.USAGE, "--tracker writes cannot see another process's writes; use --tracker hash (the default)"
        )
    opts = migrate_options(args)  # reads --token-file and the --tls-* files: errors name them
    opts["tracker"] = "hash" if args.tracker == "auto" else args.tracker
    opts["connect_timeout"] = args.wait
    opts["insecure"] = args.insecure
    check_migration(args.address, opts)
    _check_path(path)
    if args.pause_signal is None:
        logger.warning(
            "no --pause-signal PID: the final pass is consistent only if nothing writes %s while it runs", path
        )
    writer = _Writer(args.pause_signal, Path(args.state_file) if args.state_file else None)
    if writer.state_file is not None and not writer.state_file.is_file():
        raise CommandError(Exit.FILE, f"--state-file {writer.state_file}: no such file")
    stats, bar = _migrate(args, console, path, writer, opts)
    if args.json:
        print_json(stats_record(stats, path=str(path), address=args.address))
    else:
        console.print(stats_table(
            f"sent {path}", stats, expected_downtime=bar.expected_downtime, downtime_limit=args.downtime_limit
        ))
    _after(args.after, writer, console)
    return int(Exit.OK)


def _migrate(
    args: argparse.Namespace, console: Console, path: Path, writer: _Writer, opts: dict[str, Any]
) -> tuple[migcore.MigrationStats, RoundProgress]:
    """Map ``path`` and migrate it; the stats and the bars. A failure is a :class:`CommandError`."""
    opts.update(
        pause=writer.pause, state=writer.state, resume=lambda: writer.cont("migration failed before the switchover")
    )
    with _mapped(path) as mapping:
        region = migcore.Region(mapping, args.page_size)
        verb = f"recovering migration {args.recover}:" if args.recover else "sending"
        console.print(f"{verb} {path} ({format_size(region.nbytes)}) to {args.address}, mode {args.mode}")
        try:
            with RoundProgress(console, enabled=not args.no_progress) as bar:
                progress = progress_callback(bar, json_lines=args.progress_json)
                if args.recover:
                    keep = (
                        "timeout", "compat", "tls", "token", "postcopy_bandwidth_limit", "connect_timeout", "insecure",
                    )
                    link = {k: opts[k] for k in keep if k in opts}
                    stats = migcore.recover(region, args.address, args.recover, progress=progress, **link)
                else:
                    stats = migcore.migrate(region, args.address, progress=progress, **opts)
        except migcore.MigrationError as exc:
            raise CommandError(Exit.FAILED, _failure(exc, path, writer)) from exc
        except BaseException:
            writer.cont("interrupted")
            raise
        finally:
            del region
    return stats, bar


def _failure(exc: migcore.MigrationError, path: Path, writer: _Writer) -> str:
    """The one line that says what failed and what to do next (continue it, the writer's state)."""
    line = f"migration failed: {name_flags(str(exc), bare=False)}"
    if isinstance(exc, migcore.PeerLostError) and exc.migration_id:
        # the buffer is untouched: the same command with --recover continues it
        line += (
            f"; migration id {exc.migration_id}: continue it with "
            f"migcore send {path} ADDRESS --recover {exc.migration_id} (same --token/--tls options)"
        )
    if writer.pid is not None and writer.paused.is_set() and not writer.resumed.is_set():
        line += (
            f"; process {writer.pid} stays stopped: the failure came after the switchover (or with the outcome "
            "in doubt) and the destination may hold the newest state"
        )
    return line


def _after(after: str, writer: _Writer, console: Console) -> None:
    """What ``--after`` says to do with the writer once the migration succeeded."""
    pid = writer.pid
    if pid is None:
        return
    if after == "cont":
        writer.cont("--after cont")
    elif after == "term":
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
            os.kill(pid, signal.SIGCONT)
        logger.info("terminated process %d", pid)
    else:
        console.print(f"process {pid} stays stopped (its memory now lives at the destination)")
