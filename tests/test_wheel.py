"""Packaging: the sdist carries the sources, the wheel carries only what runs, and installs without a compiler."""

from __future__ import annotations

import os
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def dists(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Build the sdist, then the wheel from that sdist (so a file missing from the sdist breaks the wheel)."""
    out = tmp_path_factory.mktemp("dist")
    subprocess.run(
        [sys.executable, "-m", "build", "--no-isolation", "--outdir", str(out), str(ROOT)],
        check=True,
        capture_output=True,
    )
    (sdist,) = out.glob("migcore-*.tar.gz")
    (wheel,) = out.glob("migcore-*.whl")
    return {"sdist": sdist, "wheel": wheel}


def test_sdist_carries_sources_stub_and_tests(dists: dict[str, Path]) -> None:
    with tarfile.open(dists["sdist"]) as tar:
        names = {n.split("/", 1)[1] for n in tar.getnames() if "/" in n}
    for needed in (
        "src/migcore/_fastpath.pyx",
        "src/migcore/_fastpath.pyi",
        "src/migcore/_hashing.pxi",
        "src/migcore/_bitmaps.pxi",
        "src/migcore/_iovec.pxi",
        "src/migcore/_uffd.pyx",
        "src/migcore/_uffd_kernel.pxi",
        "src/migcore/_uffd_posix.pxi",
        "src/migcore/_uffd_calls.pxi",
        "src/migcore/_uffd_wire.pxi",
        "src/migcore/_uffd_state.pxi",
        "src/migcore/_uffd_demand.pxi",
        "src/migcore/_uffd_install.pxi",
        "src/migcore/_uffd_loop.pxi",
        "src/migcore/_uffd.pyi",
        "src/migcore/py.typed",
        "tests/conftest.py",
        "setup.py",
        "pyproject.toml",
        "README.md",
    ):
        assert needed in names, needed
    assert not any(n.endswith((".so", ".c")) for n in names)


def test_wheel_carries_compiled_module_stub_and_marker_only(dists: dict[str, Path]) -> None:
    with zipfile.ZipFile(dists["wheel"]) as whl:
        names = whl.namelist()
    assert any(n.startswith("migcore/_fastpath") and n.endswith(".so") for n in names)
    if sys.platform.startswith("linux"):  # the userfaultfd extension is built on Linux only
        assert any(n.startswith("migcore/_uffd") and n.endswith(".so") for n in names)
        assert "migcore/_uffd.pyi" in names
    for needed in ("migcore/_fastpath.pyi", "migcore/py.typed", "migcore/__init__.py", "migcore/_reference.py"):
        assert needed in names, needed
    assert not [n for n in names if n.endswith((".pyx", ".pxi", ".c"))]


def test_wheel_installs_and_hashes_without_compiler_or_headers(dists: dict[str, Path], tmp_path: Path) -> None:
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    py = venv / "bin" / "python"
    # No compiler and no xxHash header may be needed: make any attempt to compile fail.
    env = {**os.environ, "CC": "/bin/false", "CXX": "/bin/false", "XXHASH_INCLUDE_DIR": "/nonexistent"}
    env.pop("PYTHONPATH", None)
    subprocess.run(
        [str(py), "-m", "pip", "install", "--quiet", "--only-binary=:all:", str(dists["wheel"])],
        check=True,
        env=env,
        cwd=tmp_path,
    )
    check = (
        "import os, numpy as np, xxhash, migcore, migcore._fastpath as fp\n"
        "assert 'site-packages' in fp.__file__, fp.__file__\n"
        "page = os.urandom(4096) + bytes(100)\n"
        "out = np.zeros(2, dtype=np.uint64)\n"
        "fp.hash_pages(page, 4096, out)\n"
        "assert int(out[0]) == xxhash.xxh3_64_intdigest(page[:4096])\n"
        "assert int(out[1]) == xxhash.xxh3_64_intdigest(bytes(100))\n"
        "print('ok')\n"
    )
    result = subprocess.run(
        [str(py), "-I", "-c", check],
        env={**env, "MIGCORE_REQUIRE_FASTPATH": "1"},
        cwd=tmp_path,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"
