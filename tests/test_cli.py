"""The ``migcore`` command line: size/rate parsing, ``demo``, and ``send`` + ``receive`` over loopback."""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import math
import os
import re
import signal
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from rich.console import Console

from migcore import MigrationStats, cli
from migcore.cli import display, units
from migcore.cli import send as cli_send
from migcore.cli.demo import first_difference

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
    assert units.parse_size(text) == expected


@pytest.mark.parametrize("text", ["", "MiB", "-1", "1.5", "0.1KiB", "12 parsecs", "1e6", "0x10"])
def test_parse_size_rejects(text: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError):
        units.parse_size(text)


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
    assert units.parse_rate(text) == expected


@pytest.mark.parametrize("text", ["fast", "-1MiB/s", "/s"])
def test_parse_rate_rejects(text: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError):
        units.parse_rate(text)


@pytest.mark.parametrize(
    ("text", "expected"), [("0.3", 0.3), ("0.3s", 0.3), ("300ms", 0.3), ("2", 2.0), ("1m", 60.0), (".5", 0.5)]
)
def test_parse_duration(text: str, expected: float) -> None:
    assert units.parse_duration(text) == pytest.approx(expected)


@pytest.mark.parametrize("text", ["", "soon", "-1", "3h"])
def test_parse_duration_rejects(text: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError):
        units.parse_duration(text)


def test_format_size() -> None:
    assert units.format_size(512) == "512 B"
    assert units.format_size(64 << 20) == "64.0 MiB"
    assert units.format_rate(math.inf) == "unbounded"
    assert units.format_rate(20 << 20) == "20.0 MiB/s"


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
    assert first_difference(memoryview(a), memoryview(b), chunk=4096) is None
    b[70_001] = 1
    assert first_difference(memoryview(a), memoryview(b), chunk=4096) == 70_001
    assert first_difference(memoryview(a), memoryview(b[:10])) == 10


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


# ---- progress bars ---------------------------------------------------------------------------


def bars(snapshots: list[MigrationStats]) -> list[tuple[str, float, float | None]]:
    console = Console(file=io.StringIO())
    progress = display.RoundProgress(console, enabled=False)
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
    assert proc.returncode == 3 and "--out" in proc.stderr and "does not exist" in proc.stderr
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
# ---- failures an operator can act on ----------------------------------------------------------

KEYWORD_FORMS = re.compile(r"\b(tls|token|insecure|streams|mode|compress|max_bytes|on_stall|delta)=")


def assert_one_line(proc: subprocess.CompletedProcess[str], status: int, *named: str) -> str:
    """The command failed with ``status`` and exactly one line on stderr naming each of ``named``."""
    assert proc.returncode == status, proc.stdout + proc.stderr
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr
    (line,) = lines
    assert line.startswith(("migcore ", "migcore:")), line
    assert "Traceback" not in proc.stderr
    for what in named:
        assert what in line, line
    assert not KEYWORD_FORMS.search(line), line  # flags, not the library's keyword arguments
    return line


@pytest.fixture
def busy_port() -> Iterator[int]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield s.getsockname()[1]


@pytest.fixture
def stopped_writer() -> Iterator[int]:
    """A process to name in --pause-signal, so send prints no warning about its absence."""
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        yield proc.pid
    finally:
        proc.kill()
        proc.wait()


def test_a_port_in_use_is_named(busy_port: int) -> None:
    proc = run_cli("receive", f"tcp://127.0.0.1:{busy_port}", "--timeout", "5", timeout=30)
    assert_one_line(proc, 4, f"ADDRESS tcp://127.0.0.1:{busy_port}", "already in use")


def test_a_missing_token_file_is_named(tmp_path: Path) -> None:
    region = tmp_path / "r.bin"
    region.write_bytes(b"x" * 4096)
    missing = tmp_path / "no-token"
    for args in (["send", str(region), "tcp://127.0.0.1:9"], ["receive", "tcp://127.0.0.1:0"]):
        proc = run_cli(*args, "--token-file", str(missing), timeout=30)
        assert_one_line(proc, 3, f"--token-file {missing}", "no such file")
    empty = tmp_path / "empty-token"
    empty.write_bytes(b"\n")
    assert_one_line(run_cli("receive", "tcp://127.0.0.1:0", "--token-file", str(empty)), 3, "--token-file", "empty")


@pytest.mark.parametrize(
    ("command", "flag"),
    [("send", "--tls-ca"), ("send", "--tls-cert"), ("receive", "--tls-ca"), ("receive", "--tls-cert"),
     ("receive", "--tls-key")],
)  # fmt: skip
def test_a_missing_or_broken_tls_file_is_named(tmp_path: Path, command: str, flag: str) -> None:
    region = tmp_path / "r.bin"
    region.write_bytes(b"x" * 4096)
    where = [str(region), "tcp://127.0.0.1:9"] if command == "send" else ["tcp://127.0.0.1:0"]
    pem = tmp_path / "x.pem"
    proc = run_cli(command, *where, flag, str(pem), timeout=30)
    assert_one_line(proc, 3, f"{flag} {pem}", "no such file")
    pem.write_text("not a certificate\n")
    others = [] if flag == "--tls-cert" else ["--tls-cert", str(pem)]
    proc = run_cli(command, *where, flag, str(pem), *others, timeout=30)
    assert_one_line(proc, 3, "PEM")


@pytest.mark.parametrize("address", ["http://127.0.0.1:7000", "tcp://127.0.0.1", "127.0.0.1:7000", "tcp://h:99999"])
def test_an_address_that_is_not_migcore_s_is_named(tmp_path: Path, address: str) -> None:
    region = tmp_path / "r.bin"
    region.write_bytes(b"x" * 4096)
    assert_one_line(run_cli("send", str(region), address), 2, f"ADDRESS {address}")
    assert_one_line(run_cli("receive", address), 2, f"ADDRESS {address}")


@pytest.mark.parametrize(
    ("flags", "named"),
    [
        (["--streams", "2", "--mode", "postcopy"], ["--streams", "--mode"]),
        (["--delta", "--mode", "stopcopy"], ["--delta", "--mode"]),
        (["--postcopy-bandwidth-limit", "1MiB/s"], ["--postcopy-bandwidth-limit"]),
        (["--streams", "abc"], ["--streams", "invalid int"]),
        (["--streams", "100"], ["--streams"]),
        (["--max-rounds", "0"], ["--max-rounds"]),
        (["--page-size", "3000"], ["--page-size"]),
        (["--downtime-limit", "soon"], ["--downtime-limit"]),
        (["--bandwidth-limit", "fast"], ["--bandwidth-limit"]),
        (["--token", "a", "--token-file", "b"], ["--token", "--token-file"]),
        (["--tracker", "writes"], ["--tracker writes"]),
        (["--mode", "precpy"], ["--mode", "precpy"]),
    ],
)
def test_a_refused_flag_is_named(tmp_path: Path, flags: list[str], named: list[str]) -> None:
    region = tmp_path / "r.bin"
    region.write_bytes(b"x" * 4096)
    assert_one_line(run_cli("send", str(region), "tcp://127.0.0.1:9", *flags), 2, *named)


def test_a_file_address_refuses_what_it_cannot_carry_by_flag(tmp_path: Path) -> None:
    region = tmp_path / "r.bin"
    region.write_bytes(b"x" * 4096)
    proc = run_cli("send", str(region), f"file://{tmp_path}/image", "--compress", "lz4", "--streams", "2")
    assert_one_line(proc, 2, "file://", "--compress", "--streams")


@pytest.mark.parametrize(
    ("flags", "named"),
    [(["--size", "lots"], ["--size", "not a size"]), (["--size", "1T"], ["--size", "memory"]),
     (["--random-fraction", "2"], ["--random-fraction"])],
)  # fmt: skip
def test_demo_refuses_bad_numbers_and_a_region_too_large_for_memory(flags: list[str], named: list[str]) -> None:
    assert_one_line(run_cli("demo", *flags), 2, *named)


def test_receive_refuses_a_public_address_without_authentication_by_flag() -> None:
    proc = run_cli("receive", "tcp://0.0.0.0:0", "--timeout", "1")
    assert_one_line(proc, 2, "--insecure", "--token", "--tls-cert")


def test_receive_refuses_a_region_larger_than_it_can_hold(
    tmp_path: Path, stopped_writer: int
) -> None:
    recv = subprocess.Popen(
        [sys.executable, "-m", "migcore", "receive", "tcp://127.0.0.1:0", "--max-bytes", "64KiB", "--timeout", "2"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV,
    )  # fmt: skip
    try:
        assert recv.stdout is not None
        address = recv.stdout.readline().split()[-1]
        region = tmp_path / "big.bin"
        region.write_bytes(os.urandom(1 << 20))
        proc = run_cli("send", str(region), address, "--pause-signal", str(stopped_writer), "--timeout", "10")
        line = assert_one_line(proc, 1, "migration failed", "--max-bytes")
        assert "migration failed" not in proc.stdout
        assert not cli_send.process_stopped(stopped_writer), line  # refused at the handshake: never paused
    finally:
        recv.kill()
        recv.communicate()


@pytest.mark.parametrize("kind", ["missing", "folder", "empty", "unreadable"])
def test_an_unusable_path_is_named(tmp_path: Path, kind: str) -> None:
    path = tmp_path / kind
    if kind == "folder":
        path.mkdir()
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "unreadable":
        if os.geteuid() == 0:
            pytest.skip("root reads every file: a mode-000 file is readable")
        path.write_bytes(b"x" * 4096)
        path.chmod(0)
    assert_one_line(run_cli("send", str(path), "tcp://127.0.0.1:9"), 3, f"PATH {path}")


def test_a_failed_migration_is_one_line_on_stderr_with_its_traceback_under_v(
    tmp_path: Path, busy_port: int, stopped_writer: int
) -> None:
    region = tmp_path / "r.bin"
    region.write_bytes(b"x" * 4096)
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        dead = s.getsockname()[1]
    args = ["send", str(region), f"tcp://127.0.0.1:{dead}", "--pause-signal", str(stopped_writer), "--timeout", "5"]
    proc = run_cli(*args, "--no-progress")
    assert_one_line(proc, 1, "migration failed", f"127.0.0.1:{dead}")
    assert "migration failed" not in proc.stdout
    verbose = run_cli(*args, "-v")
    assert verbose.returncode == 1
    assert "Traceback" in verbose.stderr and verbose.stderr.rstrip().splitlines()[-1].startswith("migcore send:")


def test_logs_are_whole_lines_when_stderr_is_not_a_terminal(tmp_path: Path) -> None:
    region = tmp_path / ("a-long-name-" * 12 + ".bin")
    region.write_bytes(b"x" * 4096)
    proc = run_cli("send", str(region), "tcp://127.0.0.1:9", "--timeout", "1")
    warning = [line for line in proc.stderr.splitlines() if "--pause-signal" in line]
    assert len(warning) == 1 and str(region) in warning[0], proc.stderr  # not wrapped at 80 columns


BLOCK = textwrap.dedent(
    """
    import importlib.abc, sys

    class Missing(importlib.abc.MetaPathFinder):
        '''Pretend the packages named in argv[1] are not installed.'''

        def find_spec(self, name, path=None, target=None):
            if name.partition(".")[0] in sys.argv[1].split(","):
                raise ModuleNotFoundError(f"No module named {name!r}", name=name)
            return None

    sys.meta_path.insert(0, Missing())
    from migcore.cli import main
    sys.exit(main(sys.argv[2:]))
    """
)


@pytest.mark.parametrize(
    ("missing", "args", "extra"),
    [
        ("rich", ["demo"], "migcore[cli]"),
        ("zstandard", ["demo", "--size", "1MiB", "--compress", "zstd", "--no-progress"], "migcore[zstd]"),
        ("lz4", ["demo", "--size", "1MiB", "--compress", "lz4", "--no-progress"], "migcore[lz4]"),
        ("matplotlib", ["bench", "--quick", "--out", "{tmp}"], "migcore[bench]"),
    ],
)
def test_a_missing_extra_is_named(tmp_path: Path, missing: str, args: list[str], extra: str) -> None:
    argv = [a.format(tmp=tmp_path) for a in args]
    proc = subprocess.run(
        [sys.executable, "-c", BLOCK, missing, *argv], capture_output=True, text=True, timeout=120, env=ENV
    )
    line = assert_one_line(proc, 5, extra, repr(missing))
    assert "--compress" in line or missing in ("rich", "matplotlib")
    assert not (tmp_path / "results.json").exists()


def test_help_documents_every_exit_status_and_the_readme_too() -> None:
    from migcore.cli.errors import EXIT_MEANINGS

    proc = run_cli("--help")
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    table = readme.split("## Command line", 1)[1].split("\n## ", 1)[0]
    rows = dict(re.findall(r"^\| (\d+) \| (.+) \|$", table, re.M))
    assert rows == {str(int(status)): meaning for status, meaning in EXIT_MEANINGS.items()}
    said = " ".join(proc.stdout.split())
    for status, meaning in EXIT_MEANINGS.items():
        assert f"{int(status)} {' '.join(meaning.split())}" in said, proc.stdout


def test_each_extra_brings_the_module_migcore_asks_for() -> None:
    """migcore._extras.EXTRAS (module -> extra) agrees with the installed metadata's optional dependencies."""
    from importlib.metadata import requires

    from packaging.requirements import Requirement

    from migcore._extras import EXTRAS

    by_extra: dict[str, set[str]] = {}
    core: set[str] = set()
    for text in requires("migcore") or []:
        req = Requirement(text)
        extras = [e for e in EXTRAS.values() if req.marker is not None and req.marker.evaluate({"extra": e})]
        for extra in extras or [""]:
            (by_extra.setdefault(extra, set()) if extra else core).add(req.name.lower())
    for module, extra in EXTRAS.items():  # each of these packages is imported under its own name
        assert module in by_extra.get(extra, set()), (module, extra)
        assert module not in core, f"{module} is a core dependency: an embedding program should not need it"
    assert core >= {"numpy", "xxhash"}


CORE_ONLY = textwrap.dedent(
    """
    import importlib.abc, os, sys, threading

    class Missing(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.partition(".")[0] in ("rich", "zstandard", "lz4", "matplotlib"):
                raise ModuleNotFoundError(f"No module named {name!r}", name=name)
            return None

    sys.meta_path.insert(0, Missing())
    import migcore

    data = bytearray(os.urandom(1 << 20))
    got = []
    with migcore.listen("tcp://127.0.0.1:0") as listener:
        t = threading.Thread(target=lambda: got.append(listener.receive(timeout=30)))
        t.start()
        stats = migcore.migrate(data, listener.address, timeout=30)
        t.join(30)
    got[0].wait(timeout=30)
    assert bytes(got[0].region.view) == bytes(data) and stats.status == "completed"
    try:
        migcore.migrate(data, "tcp://127.0.0.1:9", compress="zstd", timeout=5)
    except ValueError as exc:
        print(exc)
    """
)


def test_the_library_migrates_without_any_extra() -> None:
    proc = subprocess.run([sys.executable, "-c", CORE_ONLY], capture_output=True, text=True, timeout=120, env=ENV)
    assert proc.returncode == 0, proc.stderr
    assert "pip install 'migcore[zstd]'" in proc.stdout


# ---- machine-readable results ---------------------------------------------------------------------


def json_lines(text: str) -> list[dict[str, object]]:
    """Every line of ``text`` is one JSON object (nothing else is on stdout under --json)."""
    return [json.loads(line) for line in text.splitlines()]


def test_send_and_receive_print_their_stats_as_json(
    tmp_path: Path, writer: tuple[subprocess.Popen[str], Path]
) -> None:
    wproc, path = writer
    recv = subprocess.Popen(
        [sys.executable, "-m", "migcore", "receive", "tcp://127.0.0.1:0", "--out", str(tmp_path / "out.bin"),
         "--timeout", "60", "--json"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV,
    )  # fmt: skip
    try:
        assert recv.stderr is not None
        line = recv.stderr.readline()  # under --json the address goes to stderr: stdout is JSON only
        assert line.startswith("listening on tcp://"), line
        send = run_cli(
            "send", str(path), line.split()[-1], "--pause-signal", str(wproc.pid), "--timeout", "60",
            "--compress", "zstd", "--json", "--progress-json",
        )  # fmt: skip
        assert send.returncode == 0, send.stdout + send.stderr
        out, err = recv.communicate(timeout=60)
    finally:
        if recv.poll() is None:
            recv.kill()
            recv.communicate()
    assert recv.returncode == 0, out + err
    assert (tmp_path / "out.bin").read_bytes() == path.read_bytes()
    lines = json_lines(send.stdout)
    *progress, sent = lines
    assert progress and all(p["event"] == "progress" for p in progress)
    moved = [int(str(p["transferred_bytes"])) for p in progress]
    assert moved == sorted(moved)  # snapshots in order, one per line
    assert sent["event"] == "result" and sent["status"] == "completed" and sent["verified"] is True
    assert sent["total_bytes"] == path.stat().st_size and sent["compress"] == "zstd"
    fields = {f.name for f in dataclasses.fields(MigrationStats)}
    assert fields <= set(sent) and fields <= set(progress[0])
    assert isinstance(sent["downtime"], float) and 0 < sent["downtime"] < sent["total_time"]  # seconds
    (received,) = json_lines(out)
    assert received["event"] == "result" and received["status"] == "completed"
    assert received["total_bytes"] == path.stat().st_size and received["out"] == str(tmp_path / "out.bin")


def test_demo_prints_one_json_object_and_a_failure_is_json_too() -> None:
    proc = run_cli("demo", "--size", "2MiB", "--dirty-rate", "1MiB/s", "--warmup", "0.05", "--json", "--mode", "postcopy")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (result,) = json_lines(proc.stdout)
    assert result["identical"] is True and result["first_difference"] is None and result["mode"] == "postcopy"
    assert result["total_bytes"] == 2 << 20 and result["status"] == "completed"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = s.getsockname()[1]
    failed = run_cli("send", "/dev/null", f"tcp://127.0.0.1:{dead}", "--json")
    (answer,) = json_lines(failed.stdout)
    assert answer == {"event": "result", "status": "failed", "error": answer["error"], "exit_status": 3}
    assert "PATH /dev/null" in str(answer["error"])


def test_readme_documents_every_json_field() -> None:
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    section = readme.split("### Machine-readable output", 1)[1].split("\n## ", 1)[0]
    documented = set(re.findall(r"^\| `(\w+)` \|", section, re.M))
    assert {f.name for f in dataclasses.fields(MigrationStats)} | {"event"} <= documented


def test_every_refusal_names_its_flags_not_keywords(tmp_path: Path) -> None:
    """Each row of migcore.options.REFUSALS, met from the command line's side, names the flag of its option."""
    from migcore.cli.common import check_migration
    from migcore.cli.errors import FLAGS, CommandError
    from migcore.options import REFUSALS

    addresses = {None: "tcp://127.0.0.1:9", "file": f"file://{tmp_path}/image", "unix": f"unix://{tmp_path}/sock"}
    for refusal in REFUSALS:
        option = re.search(r"``(\w+)", refusal.option)
        assert option and option.group(1) in FLAGS, f"no flag for {refusal.option} in cli.errors.FLAGS"
        with pytest.raises(CommandError) as caught:
            check_migration(addresses[refusal.scheme], dict(refusal.example()))
        assert caught.value.status == 2
        assert FLAGS[option.group(1)] in caught.value.message, caught.value.message
        assert not KEYWORD_FORMS.search(caught.value.message), caught.value.message


def test_peer_messages_keep_their_words_and_name_keyword_values_as_flags() -> None:
    from migcore.cli.errors import name_flags

    assert name_flags("corrupt delta batch; the streams disagree", bare=False) == (
        "corrupt delta batch; the streams disagree"
    )
    assert name_flags("region of 9 bytes exceeds this side's max_bytes=4096", bare=False) == (
        "region of 9 bytes exceeds this side's --max-bytes 4096"
    )
    assert name_flags("without tls= or token=; pass insecure=True (CLI --insecure)") == (
        "without --tls-cert/--tls-key/--tls-ca or --token/--token-file; pass --insecure"
    )
    assert name_flags("on_stall='postcopy' and a_mode_x, mode.py") == "--on-stall postcopy and a_mode_x, mode.py"
