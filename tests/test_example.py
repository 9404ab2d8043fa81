"""The embedding example (examples/kvstore_server.py) migrates while serving and carries on."""

from __future__ import annotations

import importlib.util
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
