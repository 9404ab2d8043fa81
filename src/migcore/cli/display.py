"""What the commands show: a progress bar per migration round, the final stats table, JSON, and log output.

The command line is the only part of migcore that prints or configures
logging; everything it prints goes through here or a rich ``Console``.
``--json`` and ``--progress-json`` print :func:`stats_record` objects, one
per line of stdout.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import sys
import threading
from collections.abc import Callable, Sequence
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, TaskID, TextColumn, TimeElapsedColumn
from rich.table import Table

from migcore.cli.units import format_seconds, format_size

#: The one logger of the command line (every command logs under this name).
logger = logging.getLogger("migcore.cli")


class RoundProgress:
    """Draws one progress bar per migration round from ``migrate(progress=...)`` snapshots.

    Round *k*'s bar runs to ``pages_per_round[k]`` pages; the round in flight
    has sent all but ``remaining_bytes`` of them. The pass made during the
    pause is labelled "final pass" (or "stop-and-copy", or "post-copy" when
    its pages are pushed after the switch). Called from the migration's
    thread; rich's ``Progress`` is thread-safe.
    """

    def __init__(self, console: Console, enabled: bool = True) -> None:
        self.progress = Progress(
            TextColumn("[bold]{task.description:<14}"),
            BarColumn(),
            DownloadColumn(binary_units=True),
            TextColumn("{task.fields[note]}"),
            TimeElapsedColumn(),
            console=console,
            disable=not enabled,
            transient=False,
        )
        self._lock = threading.Lock()
        self._tasks: list[TaskID] = []
        self._postcopy = False
        #: The last non-zero expected downtime reported while pre-copy ran (the engine zeroes it at the end).
        self.expected_downtime = 0.0
        #: The last snapshot seen.
        self.last: Any = None

    def __enter__(self) -> RoundProgress:
        self.progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.progress.stop()

    def __call__(self, stats: Any) -> None:
        with self._lock:
            self.last = stats
            status = str(stats.status)
            self._postcopy |= status == "postcopy-active"
            if status == "active" and stats.expected_downtime:
                self.expected_downtime = float(stats.expected_downtime)
            counts = tuple(stats.pages_per_round)
            for k, pages in enumerate(counts):
                self._draw_round(stats, k, pages, last=k == len(counts) - 1)

    def _draw_round(self, stats: Any, k: int, pages: int, *, last: bool) -> None:
        """Add or update round ``k``'s bar (``last``: the newest round of the snapshot)."""
        status = str(stats.status)
        total = pages * (int(stats.page_size) or 4096)
        if last and status in ("postcopy-active", "completed"):
            label = "post-copy" if self._postcopy else "stop-and-copy" if k == 0 else "final pass"
        else:
            label = f"round {k}"
        # in flight: pre-copy round k while rounds == k (between rounds, every listed one is done),
        # or the post-copy push until it completes
        running = last and (status == "postcopy-active" or (status == "active" and k == int(stats.rounds)))
        done = max(0, total - int(stats.remaining_bytes)) if running else total
        notes = []
        if running and status == "active" and stats.expected_downtime:
            notes.append(f"expected downtime {format_seconds(float(stats.expected_downtime))}")
        if running and stats.throttle_percentage:
            notes.append(f"throttle {stats.throttle_percentage}%")
        if k == len(self._tasks):
            self._tasks.append(self.progress.add_task(label, total=total, note=""))
        self.progress.update(self._tasks[k], description=label, completed=done, total=total, note=", ".join(notes))


def stats_table(
    title: str,
    stats: Any,
    extra: Sequence[tuple[str, str]] = (),
    head: Sequence[tuple[str, str]] = (),
    expected_downtime: float = 0.0,
    downtime_limit: float | None = None,
) -> Table:
    """A two-column table of a ``MigrationStats``, after the ``head`` rows and before the ``extra`` ones."""
    table = Table(title=title, show_header=False, title_justify="left")
    table.add_column("what", style="bold")
    table.add_column("value", justify="right")

    def get(name: str) -> Any:
        return getattr(stats, name, None)

    rows = [*head, *_main_rows(get, expected_downtime, downtime_limit), *_optional_rows(get), *extra]
    for name, value in rows:
        table.add_row(name, value)
    return table


def _main_rows(
    get: Callable[[str], Any], expected_downtime: float, downtime_limit: float | None
) -> list[tuple[str, str]]:
    """The rows every table has (mode, tracker and status only when the stats name them)."""
    total = get("total_bytes") or 0
    sent = get("transferred_bytes") or 0
    rows = [(name, str(get(name))) for name in ("mode", "tracker", "status") if get(name)]
    limit = "" if downtime_limit is None else f" (limit {format_seconds(downtime_limit)})"
    if get("downtime_limit_exceeded"):
        limit += " [bold red]OVER THE LIMIT[/]" if limit else " [bold red](over its downtime limit)[/]"
    return rows + [
        ("total time", format_seconds(get("total_time"))),
        ("setup time", format_seconds(get("setup_time"))),
        ("downtime", format_seconds(get("downtime")) + limit),
        ("expected downtime", format_seconds(get("expected_downtime") or expected_downtime)),
        ("rounds", str(get("rounds"))),
        ("region size", format_size(total)),
        ("bytes transferred", f"{format_size(sent)} ({sent / total:.2f}x region)" if total else format_size(sent)),
        ("zero pages skipped", str(get("zero_pages"))),
        ("pages sent", str(get("normal_pages"))),
        ("throughput", f"{get('mbps') or 0:.0f} Mbit/s"),
        ("dirty-page rate", f"{get('dirty_pages_rate') or 0:.0f} pages/s"),
        ("post-copy requests", str(get("postcopy_requests"))),
        *([("recoveries", f"{get('recoveries')} (paused {format_seconds(get('paused_time') or 0)})")]
          if get("recoveries") else []),
    ]


def _optional_rows(get: Callable[[str], Any]) -> list[tuple[str, str]]:
    """Rows for what only some migrations use: throttling, streams, compression, deltas, a bandwidth cap."""
    rows: list[tuple[str, str]] = []
    if get("throttle_percentage"):
        rows.append(("throttle", f"{get('throttle_percentage')}%"))
    if (get("streams") or 1) > 1:
        rows.append(("streams", str(get("streams"))))
    if get("compress_before"):
        before, after = get("compress_before"), get("compress_after")
        rows.append((f"compressed ({get('compress') or 'codec'})", f"{format_size(before)} -> {format_size(after)}"))
    if get("delta_hits") or get("delta_misses"):
        rows.append((
            "delta (XBZRLE)",
            f"{get('delta_hits')} hits, {get('delta_misses')} misses, {get('delta_overflow')} overflow, "
            f"{format_size(get('delta_bytes_saved'))} saved",
        ))
    if get("bandwidth_wait"):
        rows.append(("held back by the bandwidth limit", format_seconds(get("bandwidth_wait"))))
    return rows


def stats_record(stats: Any, event: str = "result", **extra: Any) -> dict[str, Any]:
    """A ``MigrationStats`` as one JSON-ready object: ``event``, then its fields (QEMU ``query-migrate`` names in
    snake case, seconds, bytes), then ``extra``; a number that is not finite becomes null."""
    record: dict[str, Any] = {"event": event}
    record.update((f.name, getattr(stats, f.name)) for f in dataclasses.fields(stats))
    record.update(extra)
    return record


def _finite(value: Any) -> Any:
    """``value`` with every float that is not finite replaced by None (JSON has no infinity)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def print_json(record: dict[str, Any]) -> None:
    """One JSON object on one line of stdout, flushed (a tool may be reading it as it comes)."""
    sys.stdout.write(json.dumps(_finite(record), allow_nan=False) + "\n")
    sys.stdout.flush()


class JsonProgress:
    """``--progress-json``: every progress snapshot as one ``{"event": "progress", ...}`` line, then ``then``."""

    def __init__(self, then: Callable[[Any], object] | None = None) -> None:
        self.then = then
        self._lock = threading.Lock()  # lines from several engine threads never interleave

    def __call__(self, stats: Any) -> None:
        with self._lock:
            print_json(stats_record(stats, "progress"))
        if self.then is not None:
            self.then(stats)


def progress_callback(bar: RoundProgress, *, json_lines: bool) -> Callable[[Any], object]:
    """What ``migrate(progress=...)`` gets: the bars, and the JSON lines with ``--progress-json``."""
    return JsonProgress(bar) if json_lines else bar


class _OneLine(logging.Formatter):
    """``migcore: LEVEL: message`` on one line; a record's traceback only with -v."""

    def __init__(self, verbose: int) -> None:
        super().__init__("migcore: %(levelname)s: %(message)s")
        self.verbose = verbose

    def format(self, record: logging.LogRecord) -> str:
        if not self.verbose and (record.exc_info or record.exc_text):
            record = logging.makeLogRecord({**record.__dict__, "exc_info": None, "exc_text": None})
        text = super().format(record)
        return text if self.verbose else " ".join(text.split())


def configure_logging(verbose: int) -> None:
    """Send migcore's log records to stderr: warnings by default, ``-v`` info, ``-vv`` debug.

    On a terminal through rich; otherwise plain, one unwrapped line per
    record, so a log file or a pipe gets whole lines. Tracebacks only with -v.
    """
    level = logging.WARNING if verbose <= 0 else logging.INFO if verbose == 1 else logging.DEBUG
    handler: logging.Handler
    if sys.stderr.isatty():
        from rich.logging import RichHandler

        handler = RichHandler(console=Console(stderr=True), show_path=verbose > 1, rich_tracebacks=verbose > 0)
        if not verbose:
            handler.addFilter(_drop_traceback)
    else:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(_OneLine(verbose))
    root = logging.getLogger("migcore")
    root.handlers[:] = [handler]
    root.setLevel(level)
    root.propagate = False


def _drop_traceback(record: logging.LogRecord) -> bool:
    record.exc_info = None
    record.exc_text = None
    return True
