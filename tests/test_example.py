"""The embedding example (examples/kvstore_server.py) migrates while serving and carries on; its README's
two-host commands work (over loopback, with a token)."""

from __future__ import annotations

import importlib.util
import re
import shlex
import socket
import subprocess
import sys
import threading
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

import migcore

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "kvstore_server.py"


@pytest.fixture(scope="module")
def kv() -> ModuleType:
    spec = importlib.util.spec_from_file_location("kvstore_server", EXAMPLE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["kvstore_server"] = module  # dataclasses/pickle look modules up by name
    spec.loader.exec_module(module)
    return module


def migrate_store(kv: ModuleType, source: Any, mode: str, **options: object) -> tuple[Any, migcore.MigrationStats]:
    """Migrate ``source`` to an in-process destination; return (destination store, stats)."""
    with migcore.listen("tcp://127.0.0.1:0") as listener:
        received: list[migcore.Received] = []
        dest = threading.Thread(target=lambda: received.append(listener.receive(timeout=60)))
        dest.start()
        stats = source.migrate(listener.address, "127.0.0.1:1", mode=mode, timeout=60, **options)
        dest.join(60)
        assert received, "the destination did not receive the store"
        store = kv.KVStore.from_received(received[0])
        received[0].wait(timeout=60)
    return store, stats


@pytest.mark.parametrize("mode", ["precopy", "postcopy"])
def test_store_moves_with_every_key(kv: ModuleType, mode: str) -> None:
    source = kv.KVStore(capacity=4096)
    expected = {f"k{i}": f"value-{i}" * (1 + i % 7) for i in range(2000)}
    for key, value in expected.items():
        source.set(key, value)
    for i in range(0, 2000, 10):
        source.delete(f"k{i}")
        del expected[f"k{i}"]
    dest, stats = migrate_store(kv, source, mode)
    assert stats.status == "completed"
    for key, value in expected.items():
        assert dest.get(key) == value
    assert dest.get("k0") is None
    # the bookkeeping came through the state blob: counters and free slots carry on
    assert dest.counters["sets"] == 2000 and dest.counters["deletes"] == 200 and dest.counters["migrations"] == 1
    dest.set("new", "after the move")  # reuses a freed slot
    assert dest.get("new") == "after the move" and dest.next_slot == 2000
    # the source now sends clients to the destination
    with pytest.raises(kv.Moved):
        source.get("k1")


def test_failed_migration_leaves_the_source_serving(kv: ModuleType) -> None:
    source = kv.KVStore(capacity=1024)
    source.set("a", "1")
    with migcore.listen("tcp://127.0.0.1:0", compat="kv-2") as listener:
        errors: list[BaseException] = []

        def destination() -> None:
            try:
                listener.receive(timeout=10)
            except migcore.MigrationError as exc:
                errors.append(exc)

        dest = threading.Thread(target=destination)
        dest.start()
        with pytest.raises(migcore.MigrationError):
            source.migrate(listener.address, "127.0.0.1:1", compat="kv-1", timeout=10)
        dest.join(30)
    assert source.moved_to is None
    source.set("b", "2")  # not paused, not moved
    assert (source.get("a"), source.get("b")) == ("1", "2")


@pytest.mark.parametrize("mode", ["precopy", "postcopy"])
def test_self_test_writes_through_the_migration(kv: ModuleType, mode: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert kv.main(["--self-test", "--mode", mode]) == 0
    out = capsys.readouterr().out
    assert "self-test passed" in out and ", 0 wrong" in out


def test_runs_as_a_program() -> None:
    proc = subprocess.run(
        [sys.executable, str(EXAMPLE), "--self-test"], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "self-test passed" in proc.stdout


# ---- the README's two-host commands, over loopback ------------------------------------------------


def readme_commands() -> list[tuple[str, str]]:
    """The (host, command) lines of examples/README.md's two-host block."""
    text = (EXAMPLE.parent / "README.md").read_text()
    block = text.split("Or on two hosts", 1)[1].split("```sh", 1)[1].split("```", 1)[0]
    return [(host, command) for host, _, command in (line.partition("$ ") for line in block.strip().splitlines())]


def on_loopback(command: str) -> list[str]:
    """A README command as this test runs it: this Python, the example's path, loopback, ports the OS picks."""
    command = command.replace("tcp://0.0.0.0:7100", "tcp://127.0.0.1:0").replace("--host 0.0.0.0", "--host 127.0.0.1")
    command = re.sub(r"--port \d+", "--port 0", command)
    argv = shlex.split(command)
    assert argv[:2] == ["python", "examples/kvstore_server.py"], command
    return [sys.executable, str(EXAMPLE), *argv[2:]]


def start(argv: list[str], cwd: Path) -> tuple[subprocess.Popen[str], str]:
    proc = subprocess.Popen(argv, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    return proc, proc.stdout.readline()


def talk(address: str, text: str) -> list[str]:
    """Send the request lines of ``text`` to the store at HOST:PORT; its replies, one per request."""
    host, port = address.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=60) as sock, sock.makefile("rwb") as f:
        replies = []
        for line in text.splitlines():
            f.write(line.encode() + b"\n")
            f.flush()
            replies.append(f.readline().decode().rstrip("\n"))
    return replies


def test_the_two_host_commands_of_the_readme_with_a_token(tmp_path: Path) -> None:
    (_, make_token), (_, receive), (_, serve), (_, client) = readme_commands()
    assert "--token-file token" in receive and "--token-file token" in serve
    # the secret, made as the README says
    subprocess.run(make_token.replace("python", shlex.quote(sys.executable), 1), shell=True, check=True, cwd=tmp_path)
    assert len((tmp_path / "token").read_text().strip()) == 64
    procs: list[subprocess.Popen[str]] = []
    try:
        dest, said = start(on_loopback(receive), tmp_path)
        procs.append(dest)
        found = re.match(r"waiting for a store on (tcp://\S+); will serve it on (\S+)$", said.strip())
        assert found, said
        migcore_address, dest_address = found.groups()
        source, said = start(on_loopback(serve), tmp_path)
        procs.append(source)
        source_address = said.split()[-1]

        # a source without the secret is refused, and nothing moves: the store keeps serving where it is
        (tmp_path / "wrong").write_text("not-the-secret\n")
        stranger, said = start(on_loopback(serve.replace("--token-file token", "--token-file wrong")), tmp_path)
        procs.append(stranger)
        refused = talk(said.split()[-1], f"SET a b\nMIGRATE {migcore_address} {dest_address}\nGET a")
        assert refused[0] == "OK" and refused[1].startswith("ERROR"), refused
        assert refused[2] == "VALUE b"

        # the README's client line: printf '...' | nc localhost 7000
        sent = re.search(r"printf '([^']*)'", client)
        assert sent and "| nc localhost 7000" in client
        lines = sent.group(1).replace("\\n", "\n").replace("host-b:7100", migcore_address.removeprefix("tcp://"))
        lines = lines.replace("host-b:7001", dest_address)
        assert talk(source_address, lines) == ["OK", f"MOVED {dest_address}"]
        assert talk(dest_address, "GET hello") == ["VALUE world"]  # the store now serves on the other "host"
        assert talk(source_address, "GET hello") == [f"MOVED {dest_address}"]
    finally:
        for proc in procs:
            proc.kill()
            proc.communicate()


def test_a_destination_reachable_from_other_hosts_refuses_to_start_without_a_secret(tmp_path: Path) -> None:
    _, (_, receive), _, _ = readme_commands()
    argv = shlex.split(receive.replace(" --token-file token", ""))  # 0.0.0.0, as the README has it: refused unbound
    proc = subprocess.run([sys.executable, str(EXAMPLE), *argv[2:]], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert "insecure" in proc.stderr
    missing = subprocess.run(
        [sys.executable, str(EXAMPLE), "receive", "tcp://127.0.0.1:0", "--port", "0", "--token-file", "nope"],
        capture_output=True, text=True, timeout=60, cwd=tmp_path,
    )  # fmt: skip
    assert missing.returncode == 2 and "nope" in missing.stderr and "Traceback" not in missing.stderr
