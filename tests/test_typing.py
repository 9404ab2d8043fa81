"""Types that catch mistakes: a user script that misuses migrate() fails ``mypy --strict``; a correct one passes.

Modes, trackers, codecs and stall policies are ``Literal`` names (tests/test_options.py checks each);
here the source: any buffer (``collections.abc.Buffer``) or a ``Region`` passes, anything else does not.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # mypy on a cold cache takes a while

GOOD = """\
import mmap
from multiprocessing import shared_memory

import numpy as np

import migcore

address = "tcp://127.0.0.1:9"
migcore.migrate(bytearray(4096), address, mode="precopy")
migcore.migrate(np.zeros(4096, dtype=np.uint8), address, mode="hybrid", tracker="hash", compress="zstd")
migcore.migrate(mmap.mmap(-1, 4096), address, on_stall="postcopy")
migcore.migrate(memoryview(bytearray(8192))[4096:], address)
migcore.migrate(np.zeros((64, 64), dtype=np.float64), address)
shared = shared_memory.SharedMemory(create=True, size=4096).buf
assert shared is not None
migcore.migrate(shared, address)
migcore.migrate(migcore.Region.allocate(4096), address, mode="postcopy")
stats: migcore.MigrationStats = migcore.recover(bytearray(4096), address, "00" * 16)
"""

BAD = """\
import migcore

migcore.migrate(12345, "tcp://127.0.0.1:9", mode="precpy")
migcore.migrate("a str is not a buffer", "tcp://127.0.0.1:9")
migcore.migrate([0] * 4096, "tcp://127.0.0.1:9")
migcore.recover(None, "tcp://127.0.0.1:9", "00" * 16)
"""


def mypy(path: Path, cache: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "mypy", "--strict", "--cache-dir", str(cache), "--no-error-summary", str(path)],
        capture_output=True, text=True, timeout=300, cwd=path.parent,
    )  # fmt: skip


def test_mypy_strict_accepts_buffers_and_rejects_what_is_not_one(tmp_path: Path) -> None:
    pytest.importorskip("mypy")
    cache = tmp_path / "cache"
    (tmp_path / "good.py").write_text(GOOD)
    (tmp_path / "bad.py").write_text(BAD)
    good = mypy(tmp_path / "good.py", cache)
    assert good.returncode == 0, good.stdout + good.stderr
    bad = mypy(tmp_path / "bad.py", cache)
    assert bad.returncode == 1, bad.stdout + bad.stderr
    errors = re.findall(r"^bad\.py:(\d+): error: (.*)\[arg-type\]$", bad.stdout, re.M)
    lines = [int(line) for line, _ in errors]
    assert sorted(set(lines)) == [3, 4, 5, 6], bad.stdout
    on_line_3 = " ".join(message for line, message in errors if line == "3")
    assert "12345" in bad.stdout or '"int"' in on_line_3, bad.stdout  # the source ...
    assert "precpy" in on_line_3, bad.stdout  # ... and the misspelt mode, both caught
