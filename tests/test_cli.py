"""The ``migcore`` command line: size/rate parsing, ``demo``, and ``send`` + ``receive`` over loopback."""

from __future__ import annotations

import argparse
import io
import math
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from rich.console import Console

from migcore import MigrationStats, cli
from migcore.cli import send as cli_send

ENV = {**os.environ, "COLUMNS": "120", "PYTHONUNBUFFERED": "1"}


# ---- parsing --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("0", 0),
        ("4096", 4096),
        ("64MiB", 64 << 20),
        ("64mib", 64 << 20),
        ("64M", 64 << 20),
        ("1G", 1 << 30),
        ("1.5GiB", 3 << 29),
        ("10MB", 10_000_000),
        ("2 KiB", 2048),
        ("1k", 1024),
        ("7B", 7),
        ("1T", 1 << 40),
    ],
)
def test_parse_size(text: str, expected: int) -> None:
    assert cli.parse_size(text) == expected


@pytest.mark.parametrize("text", ["", "MiB", "-1", "1.5", "0.1KiB", "12 parsecs", "1e6", "0x10"])
def test_parse_size_rejects(text: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError):
        cli.parse_size(text)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("20MiB/s", 20 << 20),
        ("20MiB", 20 << 20),
        ("1G/s", 1 << 30),
        ("100MBps", 100e6),
        ("0", 0.0),
        ("0/s", 0.0),
        ("inf", math.inf),
        ("max", math.inf),
    ],
)
def test_parse_rate(text: str, expected: float) -> None:
    assert cli.parse_rate(text) == expected


@pytest.mark.parametrize("text", ["fast", "-1MiB/s", "/s"])
def test_parse_rate_rejects(text: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError):
        cli.parse_rate(text)


@pytest.mark.parametrize(
    ("text", "expected"), [("0.3", 0.3), ("0.3s", 0.3), ("300ms", 0.3), ("2", 2.0), ("1m", 60.0), (".5", 0.5)]
)
def test_parse_duration(text: str, expected: float) -> None:
    assert cli.parse_duration(text) == pytest.approx(expected)


@pytest.mark.parametrize("text", ["", "soon", "-1", "3h"])
def test_parse_duration_rejects(text: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError):
        cli.parse_duration(text)


def test_format_size() -> None:
    assert cli.format_size(512) == "512 B"
    assert cli.format_size(64 << 20) == "64.0 MiB"
    assert cli.format_rate(math.inf) == "unbounded"
    assert cli.format_rate(20 << 20) == "20.0 MiB/s"


def test_parser_defaults_and_errors(capsys: pytest.CaptureFixture[str]) -> None:
    parser = cli.build_parser()
    args = parser.parse_args(["demo", "--size", "4MiB", "--dirty-rate", "1MiB/s", "--downtime-limit", "50ms"])
    assert (args.size, args.dirty_rate, args.downtime_limit, args.mode) == (4 << 20, 1 << 20, 0.05, "precopy")
    args = parser.parse_args(["send", "/dev/shm/x", "tcp://h:1", "--pause-signal", "42", "--mode", "postcopy"])
    assert (args.path, args.address, args.pause_signal, args.tracker) == ("/dev/shm/x", "tcp://h:1", 42, "hash")
    args = parser.parse_args(["receive", "tcp://0.0.0.0:0", "--out", "f", "--max-bytes", "1G"])
    assert (args.out, args.max_bytes) == ("f", 1 << 30)
    with pytest.raises(SystemExit) as exc:
        cli.main(["demo", "--size", "lots"])
    assert exc.value.code == 2
    assert "not a size" in capsys.readouterr().err


def test_first_difference() -> None:
    a = bytearray(100_000)
    b = bytearray(100_000)
    assert cli.first_difference(memoryview(a), memoryview(b), chunk=4096) is None
    b[70_001] = 1
    assert cli.first_difference(memoryview(a), memoryview(b), chunk=4096) == 70_001
    assert cli.first_difference(memoryview(a), memoryview(b[:10])) == 10


# ---- demo -------------------------------------------------------------------------------------


def run_cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "migcore", *args], capture_output=True, text=True, timeout=timeout, env=ENV
    )


@pytest.mark.parametrize(
    "options",
    [
        ["--mode", "precopy", "--pattern", "hotset"],
        ["--mode", "postcopy", "--pattern", "uniform"],
        ["--mode", "hybrid", "--pattern", "sequential", "--tracker", "writes", "--page-size", "16KiB"],
    ],
)
def test_demo_verifies_identical(options: list[str]) -> None:
    proc = run_cli("demo", "--size", "4MiB", "--dirty-rate", "4MiB/s", "--warmup", "0.1", "--no-progress", *options)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "identical" in proc.stdout
    assert "DIFFER" not in proc.stdout


# ---- send + receive ------------------------------------------------------------------------------

WRITER = textwrap.dedent(
    """
    import mmap, sys, time
    from migcore import Region
    from migcore.bench.workload import Workload
    f = open(sys.argv[1], "r+b")
    m = mmap.mmap(f.fileno(), 0)
    w = Workload(Region(m), dirty_rate=2 << 20, mark=False, seed=3)
    w.start()
    print("writing", flush=True)
    while True:
        time.sleep(1)
    """
)


@pytest.fixture
def receiver(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[str], str]]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "migcore", "receive", "tcp://127.0.0.1:0", "--out", str(tmp_path / "out.bin"),
         "--compat", "test-1", "--timeout", "60", "--max-state-bytes", "1KiB"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV,
    )  # fmt: skip
    assert proc.stdout is not None
    line = proc.stdout.readline()
    assert line.startswith("listening on tcp://"), line + proc.stderr.read() if proc.stderr else line
    try:
        yield proc, line.split()[-1]
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate()


@pytest.fixture
def writer(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[str], Path]]:
    path = tmp_path / "memory.bin"
    path.write_bytes(os.urandom(1 << 20) + bytes(1 << 20) + os.urandom(1000))  # ragged last page
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(path)], stdout=subprocess.PIPE, text=True, env=ENV)
    assert proc.stdout is not None and proc.stdout.readline() == "writing\n"
    try:
        yield proc, path
    finally:
        proc.kill()
        proc.communicate()


def test_send_receive_a_file_another_process_writes(
    tmp_path: Path, receiver: tuple[subprocess.Popen[str], str], writer: tuple[subprocess.Popen[str], Path]
) -> None:
    recv, address = receiver
    wproc, path = writer
    (tmp_path / "state").write_bytes(b"registers and devices")
    time.sleep(0.1)
    send = run_cli(
        "send", str(path), address, "--mode", "precopy", "--pause-signal", str(wproc.pid),
        "--state-file", str(tmp_path / "state"), "--compat", "test-1", "--timeout", "60", "--no-progress",
    )  # fmt: skip
    assert send.returncode == 0, send.stdout + send.stderr
    out, err = recv.communicate(timeout=60)
    assert recv.returncode == 0, out + err
    # the writer stays stopped after a successful migration (--after stop): the file is final
    assert cli_send.process_stopped(wproc.pid)
    os.kill(wproc.pid, signal.SIGKILL)
    wproc.wait()
    assert (tmp_path / "out.bin").read_bytes() == path.read_bytes()
    assert (tmp_path / "out.bin.state").read_bytes() == b"registers and devices"


def test_receive_keeps_serving_after_a_refused_migration(
    tmp_path: Path, receiver: tuple[subprocess.Popen[str], str]
) -> None:
    recv, address = receiver
    path = tmp_path / "quiet.bin"
    path.write_bytes(os.urandom(300_000))
    refused = run_cli("send", str(path), address, "--compat", "other", "--timeout", "30", "--no-progress")
    assert refused.returncode == 1
    assert "compat" in (refused.stdout + refused.stderr).lower()
    ok = run_cli("send", str(path), address, "--compat", "test-1", "--timeout", "30", "--no-progress")
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "--pause-signal" in ok.stderr  # warned that nothing pauses the writer
    out, err = recv.communicate(timeout=60)
    assert recv.returncode == 0, out + err
    assert (tmp_path / "out.bin").read_bytes() == path.read_bytes()


def test_failure_after_the_pause_resumes_the_writer(
    tmp_path: Path, receiver: tuple[subprocess.Popen[str], str], writer: tuple[subprocess.Popen[str], Path]
) -> None:
    recv, address = receiver
    wproc, path = writer
    (tmp_path / "big-state").write_bytes(bytes(4096))  # over the receiver's --max-state-bytes 1KiB
    failed = run_cli(
        "send", str(path), address, "--pause-signal", str(wproc.pid), "--state-file", str(tmp_path / "big-state"),
        "--compat", "test-1", "--timeout", "60", "--no-progress", "-v",
    )  # fmt: skip
    assert failed.returncode == 1, failed.stdout + failed.stderr
    assert "resumed process" in failed.stderr
    assert not cli_send.process_stopped(wproc.pid)  # SIGCONT: the writer carries on at the source
    # the receiver discarded that attempt and still serves the next one
    (tmp_path / "state").write_bytes(b"small")
    ok = run_cli(
        "send", str(path), address, "--pause-signal", str(wproc.pid), "--state-file", str(tmp_path / "state"),
        "--compat", "test-1", "--timeout", "60", "--no-progress",
    )  # fmt: skip
    assert ok.returncode == 0, ok.stdout + ok.stderr
    out, err = recv.communicate(timeout=60)
    assert recv.returncode == 0, out + err
    assert (tmp_path / "out.bin").read_bytes() == path.read_bytes()


def test_send_refuses_a_missing_file(tmp_path: Path) -> None:
    proc = run_cli("send", str(tmp_path / "nope"), "tcp://127.0.0.1:9")
    assert proc.returncode == 2


# ---- progress bars ---------------------------------------------------------------------------


def bars(snapshots: list[MigrationStats]) -> list[tuple[str, float, float | None]]:
    console = Console(file=io.StringIO())
    progress = cli.RoundProgress(console, enabled=False)
    with progress:
        for snap in snapshots:
            progress(snap)
    return [(t.description, t.completed, t.total) for t in progress.progress.tasks]


def test_round_bars_follow_pages_per_round() -> None:
    s = MigrationStats
    ps = 4096
    snaps = [
        s(status="active", page_size=ps, remaining_bytes=100 * ps),  # setup: nothing counted yet
        s(status="active", page_size=ps, rounds=0, pages_per_round=(50,), remaining_bytes=20 * ps),
        s(status="active", page_size=ps, rounds=1, pages_per_round=(50,), remaining_bytes=9 * ps),  # between
        s(status="active", page_size=ps, rounds=1, pages_per_round=(50, 9), remaining_bytes=4 * ps),
        s(status="completed", page_size=ps, rounds=3, pages_per_round=(50, 9, 2), remaining_bytes=0),
    ]
    assert bars(snaps[:2]) == [("round 0", 30 * ps, 50 * ps)]
    assert bars(snaps[:4]) == [("round 0", 50 * ps, 50 * ps), ("round 1", 5 * ps, 9 * ps)]
    assert bars(snaps) == [
        ("round 0", 50 * ps, 50 * ps),
        ("round 1", 9 * ps, 9 * ps),
        ("final pass", 2 * ps, 2 * ps),
    ]


def test_postcopy_and_stopcopy_bars() -> None:
    s = MigrationStats
    ps = 4096
    post = [
        s(status="active", page_size=ps, remaining_bytes=100 * ps),
        s(status="postcopy-active", page_size=ps, rounds=1, pages_per_round=(40,), remaining_bytes=10 * ps),
    ]
    assert bars(post) == [("post-copy", 30 * ps, 40 * ps)]
    done = s(status="completed", page_size=ps, rounds=1, pages_per_round=(40,))
    assert bars([*post, done]) == [("post-copy", 40 * ps, 40 * ps)]
    assert bars([post[0], done]) == [("stop-and-copy", 40 * ps, 40 * ps)]


def test_receive_refuses_an_out_file_it_cannot_write(tmp_path: Path) -> None:
    proc = run_cli("receive", "tcp://127.0.0.1:0", "--out", str(tmp_path / "no" / "such" / "dir" / "x"), timeout=30)
    assert proc.returncode == 2 and "does not exist" in proc.stderr
    assert "listening" not in proc.stdout  # refused before anything could be accepted


def test_a_lost_postcopy_link_is_recovered_from_the_command_line(
    tmp_path: Path, writer: tuple[subprocess.Popen[str], Path]
) -> None:
    import sys as _sys

    _sys.path.insert(0, str(Path(__file__).parent))
    from _proxy import CutProxy

    wproc, path = writer
    recv = subprocess.Popen(
        [sys.executable, "-m", "migcore", "receive", "tcp://127.0.0.1:0", "--out", str(tmp_path / "out.bin"),
         "--timeout", "60"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV,
    )  # fmt: skip
    try:
        assert recv.stdout is not None
        address = recv.stdout.readline().split()[-1]
        proxy = CutProxy(address, 600_000)
        lost = run_cli(
            "send", str(path), proxy.address, "--mode", "postcopy", "--pause-signal", str(wproc.pid),
            "--timeout", "30", "--no-progress", "--postcopy-bandwidth-limit", "4MiB/s",
        )  # fmt: skip
        proxy.join()
        assert lost.returncode == 1, lost.stdout + lost.stderr
        said = " ".join(lost.stderr.split())  # the console wraps long lines
        mid = said.split("migration id ", 1)[1][:32]
        assert f"--recover {mid}" in said
        assert cli_send.process_stopped(wproc.pid)  # after the switch: the program lives at the destination
        assert recv.poll() is None  # the paused reception (and its listener) stay alive
        lines: list[str] = []
        while not any("post-copy paused" in line for line in lines):  # the receiver says so
            line = recv.stdout.readline()
            assert line, "the receiver ended instead of waiting for a recovery"
            lines.append(line)
        again = run_cli("send", str(path), address, "--recover", mid, "--timeout", "30", "--no-progress")
        assert again.returncode == 0, again.stdout + again.stderr
        out, err = recv.communicate(timeout=60)
        assert recv.returncode == 0, out + err
        assert "recoveries" in out
    finally:
        if recv.poll() is None:
            recv.kill()
            recv.communicate()
    assert (tmp_path / "out.bin").read_bytes() == path.read_bytes()


@pytest.mark.parametrize("bad", ["10zz/s", "abc", "-1"])
def test_bench_refuses_a_bad_rate_without_a_traceback(bad: str) -> None:
    proc = run_cli("bench", "--rates", bad, timeout=60)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "--rates" in proc.stdout + proc.stderr and "Traceback" not in proc.stderr


def test_send_waits_for_a_receiver_that_starts_later(tmp_path: Path) -> None:
    path = tmp_path / "quiet.bin"
    path.write_bytes(os.urandom(200_000))
    address = f"unix://{tmp_path / 'later.sock'}"
    send = subprocess.Popen(
        [sys.executable, "-m", "migcore", "send", str(path), address, "--wait", "60", "--timeout", "30",
         "--no-progress"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV,
    )  # fmt: skip
    time.sleep(1.0)  # the sender is retrying by now
    assert send.poll() is None
    recv = run_cli("receive", address, "--out", str(tmp_path / "out.bin"), "--timeout", "30")
    out, err = send.communicate(timeout=60)
    assert send.returncode == 0, out + err
    assert recv.returncode == 0, recv.stdout + recv.stderr
    assert (tmp_path / "out.bin").read_bytes() == path.read_bytes()
