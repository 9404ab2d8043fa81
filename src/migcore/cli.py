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

This is the only module that prints or configures logging.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import math
import mmap
import os
import re
import signal
import ssl
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, TaskID, TextColumn, TimeElapsedColumn
from rich.table import Table

import migcore
from migcore.bench import workload as _workload
from migcore._trackers import TRACKERS as _TRACKER_KINDS

logger = logging.getLogger("migcore.cli")

MODES = ("precopy", "stopcopy", "postcopy", "hybrid")
TRACKERS = ("auto", *_TRACKER_KINDS)
ON_STALL = ("finish", "throttle", "postcopy", "cancel")

# ---------------------------------------------------------------------------------------
# human-friendly sizes, rates and durations
# ---------------------------------------------------------------------------------------

_UNITS = {
    "": 1,
    "b": 1,
    "k": 1 << 10,
    "kib": 1 << 10,
    "kb": 10**3,
    "m": 1 << 20,
    "mib": 1 << 20,
    "mb": 10**6,
    "g": 1 << 30,
    "gib": 1 << 30,
    "gb": 10**9,
    "t": 1 << 40,
    "tib": 1 << 40,
    "tb": 10**12,
}
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*([a-z]*)\s*$", re.IGNORECASE)


def parse_size(text: str) -> int:
    """Bytes in ``text``: ``"4096"``, ``"64MiB"``, ``"1G"``, ``"1.5GiB"``, ``"10MB"``, ``"0"``.

    ``K``/``M``/``G``/``T`` and ``KiB``/``MiB``/... are powers of 1024 (as in
    ``dd`` and QEMU); ``KB``/``MB``/... are powers of 1000. Case does not matter.
    """
    m = _SIZE_RE.match(text)
    if m is None or m.group(2).lower() not in _UNITS:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (try 4096, 64MiB, 1G, 10MB)")
    value = float(m.group(1)) * _UNITS[m.group(2).lower()]
    if value != int(value):
        raise argparse.ArgumentTypeError(f"not a whole number of bytes: {text!r}")
    return int(value)


def parse_rate(text: str) -> float:
    """Bytes per second in ``text``: ``"20MiB/s"``, ``"1G"``, ``"0"``; ``"inf"``/``"max"`` = unbounded."""
    t = text.strip().lower()
    if t in ("inf", "max", "unlimited", "unbounded"):
        return math.inf
    for suffix in ("/s", "ps"):
        if t.endswith(suffix):
            t = t[: -len(suffix)]
            break
    try:
        return float(parse_size(t))
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"not a rate: {text!r} (try 20MiB/s, 1G, 0, inf)") from None


def parse_duration(text: str) -> float:
    """Seconds in ``text``: ``"0.3"``, ``"0.3s"``, ``"300ms"``, ``"2m"``."""
    m = re.match(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*(ms|s|m|min)?\s*$", text, re.IGNORECASE)
    if m is None:
        raise argparse.ArgumentTypeError(f"not a duration: {text!r} (try 0.3, 300ms, 2s)")
    unit = (m.group(2) or "s").lower()
    return float(m.group(1)) * {"ms": 1e-3, "s": 1.0, "m": 60.0, "min": 60.0}[unit]


def format_size(n: float) -> str:
    """``67108864`` -> ``"64.0 MiB"``."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")  # pragma: no cover


def format_rate(n: float) -> str:
    return "unbounded" if math.isinf(n) else f"{format_size(n)}/s"


def format_seconds(s: float | None) -> str:
    if s is None:
        return "-"
    return f"{s * 1000:.1f} ms" if s < 1 else f"{s:.2f} s"


# ---------------------------------------------------------------------------------------
# progress and tables
# ---------------------------------------------------------------------------------------


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
            counts = tuple(stats.pages_per_round)
            ps = int(stats.page_size) or 4096
            self._postcopy |= status == "postcopy-active"
            if status == "active" and stats.expected_downtime:
                self.expected_downtime = float(stats.expected_downtime)
            paused = status in ("postcopy-active", "completed")
            for k, pages in enumerate(counts):
                total = pages * ps
                last = k == len(counts) - 1
                if last and paused:
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
                self.progress.update(
                    self._tasks[k], description=label, completed=done, total=total, note=", ".join(notes)
                )


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

    total = get("total_bytes") or 0
    sent = get("transferred_bytes") or 0
    rows: list[tuple[str, str]] = [*head]
    for name in ("mode", "tracker", "status"):
        if get(name):
            rows.append((name, str(get(name))))
    rows += [
        ("total time", format_seconds(get("total_time"))),
        ("setup time", format_seconds(get("setup_time"))),
        (
            "downtime",
            format_seconds(get("downtime"))
            + ("" if downtime_limit is None else f" (limit {format_seconds(downtime_limit)})"),
        ),
        ("expected downtime", format_seconds(get("expected_downtime") or expected_downtime)),
        ("rounds", str(get("rounds"))),
        ("region size", format_size(total)),
        ("bytes transferred", f"{format_size(sent)} ({sent / total:.2f}x region)" if total else format_size(sent)),
        ("zero pages skipped", str(get("zero_pages"))),
        ("pages sent", str(get("normal_pages"))),
        ("throughput", f"{get('mbps') or 0:.0f} Mbit/s"),
        ("dirty-page rate", f"{get('dirty_pages_rate') or 0:.0f} pages/s"),
        ("post-copy requests", str(get("postcopy_requests"))),
    ]
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
    for name, value in [*rows, *extra]:
        table.add_row(name, value)
    return table


# ---------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------


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


def _migrate_options(args: argparse.Namespace) -> dict[str, Any]:
    """The keyword options of ``migcore.migrate()`` set on the command line."""
    opts: dict[str, Any] = {
        "mode": args.mode,
        "tracker": args.tracker,
        "downtime_limit": args.downtime_limit,
        "max_rounds": args.max_rounds,
        "timeout": args.timeout,
        "compat": args.compat,
    }
    if args.on_stall is not None:
        opts["on_stall"] = args.on_stall
    # transfer modes (issue 4): only what was asked, so the defaults stay the library's
    if args.compress is not None:
        opts["compress"] = args.compress
    if args.delta:
        opts["delta"] = True
        opts["delta_cache_bytes"] = args.delta_cache_size
    if args.streams != 1:
        opts["streams"] = args.streams
    if args.bandwidth_limit is not None and not math.isinf(args.bandwidth_limit):
        opts["bandwidth_limit"] = args.bandwidth_limit
    if args.postcopy_bandwidth_limit is not None and not math.isinf(args.postcopy_bandwidth_limit):
        opts["postcopy_bandwidth_limit"] = args.postcopy_bandwidth_limit
    token = _token(args)
    if token is not None:
        opts["token"] = token
    tls = _tls_context(args, server=False)
    if tls is not None:
        opts["tls"] = tls
    return opts


def _token(args: argparse.Namespace) -> bytes | None:
    """The shared token from --token or --token-file (its first line; a file keeps it out of ``ps``)."""
    if getattr(args, "token_file", None):
        lines = Path(args.token_file).read_bytes().splitlines()
        return lines[0] if lines else b""
    token = getattr(args, "token", None)
    return token.encode() if token else None


def _tls_context(args: argparse.Namespace, *, server: bool) -> ssl.SSLContext | None:
    """A TLS 1.3 context from --tls-cert/--tls-key/--tls-ca, or None when none of them was given.

    Source: verifies the destination against --tls-ca (or the system's CAs)
    and presents --tls-cert if given. Destination: presents --tls-cert and,
    with --tls-ca, requires a client certificate signed by it (mutual auth).
    """
    cert, key, ca = (getattr(args, name, None) for name in ("tls_cert", "tls_key", "tls_ca"))
    if not (cert or key or ca):
        return None
    if server:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        if not cert:
            raise SystemExit("migcore receive: --tls-ca or --tls-key needs --tls-cert (the destination's certificate)")
        ctx.load_cert_chain(cert, key)
        if ca:
            ctx.verify_mode = ssl.CERT_REQUIRED
            ctx.load_verify_locations(ca)
    else:
        ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=ca)
        if cert:
            ctx.load_cert_chain(cert, key)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    return ctx


# ---------------------------------------------------------------------------------------
# demo
# ---------------------------------------------------------------------------------------


def cmd_demo(args: argparse.Namespace, console: Console) -> int:
    size, ps = args.size, args.page_size
    region = migcore.Region.allocate(size, ps)
    console.print(
        f"[bold]migcore demo[/]: {format_size(size)} region ({region.npages} pages of {ps} B), "
        f"{args.random_fraction:.0%} random pages, workload {args.pattern} at {format_rate(args.dirty_rate)}, "
        f"mode {args.mode}, tracker {args.tracker}"
    )
    _workload.fill(region, random_fraction=args.random_fraction, seed=args.seed)
    work = _workload.Workload(
        region, dirty_rate=args.dirty_rate, pattern=args.pattern, hotset_fraction=args.hotset_fraction, seed=args.seed
    )
    received: list[Any] = []
    receive_error: list[BaseException] = []

    token, tls = _token(args), _tls_context(args, server=True)
    with migcore.listen("tcp://127.0.0.1:0", compat=args.compat, token=token, tls=tls) as listener:

        def destination() -> None:
            try:
                received.append(listener.receive(timeout=args.timeout))
            except BaseException as exc:  # noqa: BLE001 - reported below
                receive_error.append(exc)

        dest = threading.Thread(target=destination, name="migcore-demo-destination", daemon=True)
        dest.start()
        opts = _migrate_options(args)
        opts.update(pause=work.pause, resume=work.resume, throttle=work.throttle)
        error: BaseException | None = None
        stats: Any = None
        with work, RoundProgress(console, enabled=not args.no_progress) as bar:
            # let the workload run alone for a moment so the first round has something to chase
            time.sleep(args.warmup)
            try:
                stats = migcore.migrate(region, listener.address, progress=bar, **opts)
            except migcore.MigrationError as exc:
                error = exc
            work.pause()  # migrate() paused it on success; make sure of it on failure too
        if error is None:
            dest.join(args.timeout)
    dest.join(5)  # after a failure the closed listener ends a receive() still waiting for a source

    wstats = work.stats
    if error is not None:
        logger.error("migration failed: %s", error)
        console.print(f"[red bold]migration failed:[/] {error}")
        return 1
    if receive_error or not received:
        err = receive_error[0] if receive_error else TimeoutError("the destination did not finish")
        console.print(f"[red bold]destination failed:[/] {err}")
        return 1
    dst = received[0]
    try:
        dst.wait(timeout=args.timeout)  # post-copy: until every page arrived
    except migcore.MigrationError as exc:
        console.print(f"[red bold]post-copy failed after the switchover:[/] {exc}")
        return 1
    diff = first_difference(region.view, dst.region.view)
    identical = diff is None
    verdict = "[green bold]identical[/]" if identical else f"[red bold]DIFFERENT[/] (first at byte {diff})"
    throttled = f", throttled up to {wstats.max_throttle_level}%" if wstats.max_throttle_level else ""
    achieved = format_rate(wstats.achieved_rate)
    extra = [
        ("workload", f"{args.pattern}, achieved {achieved}, {wstats.pages_written} page writes{throttled}"),
        ("verified", verdict),
    ]
    table = stats_table(
        "migration", stats, extra, expected_downtime=bar.expected_downtime, downtime_limit=args.downtime_limit
    )
    console.print(table)
    if identical:
        console.print("destination region is byte-for-byte [green bold]identical[/] to the paused source")
    else:
        console.print(f"destination region DIFFERS from the paused source at byte {diff}")
    return 0 if identical else 1


# ---------------------------------------------------------------------------------------
# send
# ---------------------------------------------------------------------------------------


def _process_stopped(pid: int) -> bool:
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
    while not _process_stopped(pid):
        if time.monotonic() > deadline:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
            raise migcore.MigrationError(f"process {pid} did not stop within {timeout:g} s after SIGSTOP")
        time.sleep(0.001)


@contextlib.contextmanager
def _mapped(path: Path) -> Iterator[mmap.mmap]:
    fd = os.open(path, os.O_RDWR)
    try:
        size = os.fstat(fd).st_size
        if size == 0:
            raise SystemExit(f"migcore send: {path} is empty; nothing to migrate")
        mapping = mmap.mmap(fd, size, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ | mmap.PROT_WRITE)
    finally:
        os.close(fd)
    try:
        yield mapping
    finally:
        with contextlib.suppress(BufferError):
            mapping.close()


def cmd_send(args: argparse.Namespace, console: Console) -> int:
    path = Path(args.path)
    if not path.exists():
        console.print(f"[red]migcore send: {path} does not exist[/]")
        return 2
    if args.tracker == "writes":
        console.print("[red]migcore send: the writes tracker cannot see another process's writes; use hash[/]")
        return 2
    pid = args.pause_signal
    if pid is None:
        logger.warning(
            "no --pause-signal PID: the final pass is consistent only if nothing writes %s while it runs", path
        )
    state_file = Path(args.state_file) if args.state_file else None
    paused = threading.Event()

    def pause() -> None:
        if pid is not None:
            _stop_process(pid)
            logger.info("stopped process %d", pid)
        paused.set()

    def state() -> bytes:
        if state_file is None:
            return b""
        try:
            return state_file.read_bytes()
        except OSError as exc:  # a MigrationError makes migrate() resume the writer and fail cleanly
            raise migcore.MigrationError(f"cannot read the state file: {exc}") from exc

    resumed = threading.Event()

    def cont(why: str) -> None:
        if pid is not None and paused.is_set():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
            resumed.set()
            logger.info("resumed process %d (%s)", pid, why)

    opts = _migrate_options(args)
    opts["tracker"] = "hash" if args.tracker == "auto" else args.tracker
    opts.update(pause=pause, state=state, resume=lambda: cont("migration failed before the switchover"))
    with _mapped(path) as mapping:
        region = migcore.Region(mapping, args.page_size)
        console.print(f"sending {path} ({format_size(region.nbytes)}) to {args.address}, mode {args.mode}")
        try:
            with RoundProgress(console, enabled=not args.no_progress) as bar:
                stats = migcore.migrate(region, args.address, progress=bar, **opts)
        except migcore.MigrationError as exc:
            console.print(f"[red bold]migration failed:[/] {exc}")
            if pid is not None and paused.is_set() and not resumed.is_set():
                logger.error(
                    "the migration failed after the switchover (or with the outcome in doubt): "
                    "process %d stays stopped; the destination may hold the newest state",
                    pid,
                )
            return 1
        except BaseException:
            cont("interrupted")
            raise
        finally:
            del region
    table = stats_table(
        f"sent {path}", stats, expected_downtime=bar.expected_downtime, downtime_limit=args.downtime_limit
    )
    console.print(table)
    if pid is not None:
        if args.after == "cont":
            cont("--after cont")
        elif args.after == "term":
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
                os.kill(pid, signal.SIGCONT)
            logger.info("terminated process %d", pid)
        else:
            console.print(f"process {pid} stays stopped (its memory now lives at the destination)")
    return 0


# ---------------------------------------------------------------------------------------
# receive
# ---------------------------------------------------------------------------------------


def cmd_bench(args: argparse.Namespace, console: Console) -> int:
    """Run the benchmark suite (see :mod:`migcore.bench`); exit 1 if a run was not verified identical."""
    from migcore.bench import BenchConfig, run_bench

    try:
        rates = tuple(_bench_rate(r) for r in args.rates or ())
    except ValueError as exc:
        console.print(f"[red]--rates: {exc}[/]")
        return 2
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
    return 0 if all(r["verified"] for r in results["runs"]) else 1


def _bench_rate(text: str) -> Any:
    """A ``--rates`` value: ``0.25`` (fraction of the bare-socket bandwidth), ``0.25x``, or an absolute ``200MiB/s``."""
    from migcore.bench import Rate

    t = text.strip().lower()
    if t.endswith("/s"):
        return Rate(absolute=float(parse_size(t[:-2])))
    value = float(t.rstrip("x"))
    if value < 0:
        raise ValueError(f"dirty rate must be >= 0, got {text!r}")
    return Rate(fraction=value)


def cmd_receive(args: argparse.Namespace, console: Console) -> int:
    limits: dict[str, Any] = {} if args.max_state_bytes is None else {"max_state_bytes": args.max_state_bytes}
    limits.update(token=_token(args), tls=_tls_context(args, server=True), insecure=args.insecure)
    try:
        listener = migcore.listen(args.address, max_bytes=args.max_bytes, compat=args.compat, **limits)
    except ValueError as exc:
        console.print(f"[red]migcore receive: {exc}[/]")
        return 2
    with listener:
        # the bound address goes to stdout first, so a script that passed port 0 can read it
        print(f"listening on {listener.address}", flush=True)
        while True:
            try:
                received = listener.receive(timeout=args.timeout)
                break
            except migcore.MigrationError as exc:
                if _is_idle_timeout(exc):
                    console.print(f"[red]no migration arrived within {args.timeout} s[/]")
                    return 1
                logger.warning(
                    "a migration failed (%s: %s); still listening on %s", type(exc).__name__, exc, listener.address
                )
        complete = True
        try:
            received.wait(timeout=args.timeout)  # post-copy: until every page arrived and verified
        except migcore.MigrationError as exc:
            complete = False
            console.print(f"[red bold]post-copy failed after the switchover:[/] {exc}")
    region = received.region
    state: bytes = bytes(received.state)
    if args.out:
        out = Path(args.out) if complete else Path(f"{args.out}.partial")
        tmp = out.with_name(out.name + ".tmp")
        with tmp.open("wb") as f:
            f.write(region.view)
        tmp.replace(out)
        Path(f"{out}.state").write_bytes(state)
        where = f"wrote {format_size(region.nbytes)} to {out} and {len(state)} B of state to {out}.state"
        if not complete:
            where += f" ({received.missing_pages} pages never arrived: the image is INCOMPLETE)"
    else:
        import xxhash

        digest = xxhash.xxh3_64_hexdigest(region.view)
        where = f"received {format_size(region.nbytes)} (xxh3-64 {digest}), {len(state)} B of state"
    console.print(stats_table("received", received.stats))
    console.print(where)
    return 0 if complete else 1


def _is_idle_timeout(exc: BaseException) -> bool:
    """Whether ``receive()`` gave up because no source connected (rather than a failed migration)."""
    return isinstance(exc, TimeoutError) and "no source connected" in str(exc)


# ---------------------------------------------------------------------------------------
# argument parsing
# ---------------------------------------------------------------------------------------


def _add_migrate_options(p: argparse.ArgumentParser, *, default_tracker: str) -> None:
    p.add_argument("--mode", choices=MODES, default="precopy", help="migration mode (default: %(default)s)")
    p.add_argument("--page-size", type=parse_size, default=4096, help="page size, a power of two (default: 4096)")
    p.add_argument(
        "--downtime-limit",
        type=parse_duration,
        default=0.3,
        metavar="SECONDS",
        help="switch over when the expected pause is under this (default: 0.3; also 300ms)",
    )
    p.add_argument("--max-rounds", type=int, default=30, help="pre-copy rounds before giving up on convergence")
    p.add_argument("--on-stall", choices=ON_STALL, default=None, help="what to do when pre-copy stops converging")
    p.add_argument("--tracker", choices=TRACKERS, default=default_tracker, help="dirty-page tracker")
    p.add_argument("--compat", default=None, metavar="S", help="application compatibility string; both ends must agree")
    p.add_argument("--timeout", type=parse_duration, default=60.0, metavar="SECONDS", help="longest wait for the peer")
    p.add_argument("--no-progress", action="store_true", help="do not draw progress bars")
    p.add_argument("--compress", choices=("zstd", "lz4"), default=None, help="compress page batches with this codec")
    p.add_argument("--delta", action="store_true", help="send pages sent again as XBZRLE deltas")
    p.add_argument(
        "--delta-cache-size", type=parse_size, default=64 << 20, metavar="SIZE",
        help="page cache of --delta (default: 64MiB)",
    )
    p.add_argument("--streams", type=int, default=1, help="parallel page connections (default: 1, the main one)")
    p.add_argument(
        "--bandwidth-limit", type=parse_rate, default=None, metavar="RATE", help="cap page traffic, e.g. 100MiB/s"
    )
    p.add_argument(
        "--postcopy-bandwidth-limit", type=parse_rate, default=None, metavar="RATE",
        help="cap the background push after a post-copy switch (demand pages are never held back)",
    )
    _add_auth_options(p)


def _add_auth_options(p: argparse.ArgumentParser) -> None:
    """--token/--token-file and --tls-cert/--tls-key/--tls-ca, shared by send, receive and demo."""
    p.add_argument("--token", default=None, metavar="SECRET", help="shared secret both ends must hold (HMAC-proven)")
    p.add_argument("--token-file", default=None, metavar="F", help="read the shared secret from F's first line")
    p.add_argument("--tls-cert", default=None, metavar="PEM", help="this side's certificate (TLS 1.3)")
    p.add_argument("--tls-key", default=None, metavar="PEM", help="the private key of --tls-cert")
    p.add_argument(
        "--tls-ca", default=None, metavar="PEM",
        help="CA that signs the peer: the source checks the destination with it; the destination then requires "
        "client certificates (mutual auth)",
    )


def build_parser() -> argparse.ArgumentParser:
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
    _add_migrate_options(demo, default_tracker="auto")
    demo.set_defaults(func=cmd_demo)

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
    _add_migrate_options(send, default_tracker="hash")
    send.set_defaults(func=cmd_send)

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
    _add_auth_options(recv)
    recv.set_defaults(func=cmd_receive)

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
    bench.set_defaults(func=cmd_bench)
    return parser


def _check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Reject option values that parse but make no sense, with argparse's usage message."""
    from migcore._region import check_page_size

    if hasattr(args, "page_size"):
        try:
            check_page_size(args.page_size)
        except ValueError as exc:
            parser.error(f"--page-size: {exc}")
    if args.command == "demo":
        if args.size <= 0:
            parser.error("--size must be more than 0 bytes")
        if not 0 <= args.random_fraction <= 1:
            parser.error("--random-fraction must be a fraction in [0, 1]")
        if not 0 < args.hotset_fraction <= 1:
            parser.error("--hotset-fraction must be a fraction in (0, 1]")
    if getattr(args, "max_rounds", 1) < 1:
        parser.error("--max-rounds must be at least 1")
    if getattr(args, "token", None) and getattr(args, "token_file", None):
        parser.error("give --token or --token-file, not both")
    if not 1 <= getattr(args, "streams", 1) <= 64:
        parser.error("--streams must be from 1 to 64")


def _configure_logging(verbose: int, console: Console) -> None:
    from rich.logging import RichHandler

    level = logging.WARNING if verbose <= 0 else logging.INFO if verbose == 1 else logging.DEBUG
    handler = RichHandler(console=console, show_path=verbose > 1, rich_tracebacks=verbose > 1)
    root = logging.getLogger("migcore")
    root.handlers[:] = [handler]
    root.setLevel(level)
    root.propagate = False


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``migcore`` command line; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    _check_args(parser, args)
    console = Console()
    _configure_logging(args.verbose, Console(stderr=True))
    try:
        result: int = args.func(args, console)
    except KeyboardInterrupt:
        console.print("[red]interrupted[/]")
        return 130
    return result


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
