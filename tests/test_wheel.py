"""Packaging: the sdist carries the sources; ``make wheel``'s repaired wheel carries only what runs, and installs
from a local wheelhouse without an index or a compiler, then migrates."""

from __future__ import annotations

import os
import subprocess
import sys
import tarfile
import json
import shutil
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def dists(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """``make repaired-wheel``: the sdist, the wheel built from it (a file missing from the sdist breaks it), repaired."""
    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    out = tmp_path_factory.mktemp("dist")
    bindir = Path(sys.executable).parent
    proc = subprocess.run(
        ["make", "-C", str(ROOT), "repaired-wheel", f"WHEEL_DIR={out}", f"BIN={bindir}", f"PY={sys.executable}"],
        capture_output=True, text=True,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
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
        "LICENSE",
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


def test_wheel_is_manylinux_stripped_and_has_no_runpath(dists: dict[str, Path], tmp_path: Path) -> None:
    if not sys.platform.startswith("linux"):
        pytest.skip("manylinux wheels are built on Linux")
    from elftools.elf.dynamic import DynamicSection
    from elftools.elf.elffile import ELFFile

    assert "manylinux_" in dists["wheel"].name.split("-")[-1], dists["wheel"].name  # the platform tag
    with zipfile.ZipFile(dists["wheel"]) as whl:
        whl.extractall(tmp_path)
        assert any(n.endswith("licenses/LICENSE") for n in whl.namelist())
        metadata = next(n for n in whl.namelist() if n.endswith(".dist-info/METADATA"))
        meta = whl.read(metadata).decode()
    for so in (tmp_path / "migcore").glob("*.so"):
        with so.open("rb") as f:
            elf = ELFFile(f)
            assert elf.get_section_by_name(".symtab") is None, f"{so.name} is not stripped"
            tags = [t.entry.d_tag for s in elf.iter_sections() if isinstance(s, DynamicSection) for t in s.iter_tags()]
            assert "DT_RUNPATH" not in tags and "DT_RPATH" not in tags, f"{so.name} keeps the build machine's RUNPATH"
    import migcore

    assert f"Version: {migcore.__version__}\n" in meta  # the one version number
    assert "License-Expression: MIT" in meta and "Project-URL: Source," in meta
    assert "Programming Language :: Python :: 3.12" in meta
    core = [line for line in meta.splitlines() if line.startswith("Requires-Dist:") and "extra ==" not in line]
    assert not [line for line in core if any(x in line for x in ("rich", "zstandard", "lz4", "matplotlib"))], core


def test_wheel_installs_from_a_wheelhouse_without_index_or_compiler_and_migrates(
    dists: dict[str, Path], tmp_path: Path
) -> None:
    # the dependencies as wheels beside migcore's: then the install below needs no index and builds nothing
    house = tmp_path / "wheelhouse"
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "--quiet", "--only-binary=:all:", "--dest", str(house),
         f"{dists['wheel']}[cli,zstd]"],
        check=True,
    )  # fmt: skip
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    py, bindir = venv / "bin" / "python", venv / "bin"
    # No compiler and no xxHash header may be needed: any attempt to compile fails.
    env = {**os.environ, "CC": "/bin/false", "CXX": "/bin/false", "XXHASH_INCLUDE_DIR": "/nonexistent"}
    env.pop("PYTHONPATH", None)
    install = [str(py), "-m", "pip", "install", "--quiet", "--no-index", "--only-binary=:all:", "--find-links", str(house)]

    # the core alone: no terminal library, and the command line says which extra it needs
    subprocess.run([*install, "migcore"], check=True, env=env, cwd=tmp_path)
    proc = subprocess.run(
        [str(py), "-I", "-c", "import importlib.util as u; print(u.find_spec('rich') is None)"],
        capture_output=True, text=True, env=env, cwd=tmp_path,
    )  # fmt: skip
    assert proc.stdout.strip() == "True", proc.stdout + proc.stderr
    bare = subprocess.run([str(bindir / "migcore"), "demo"], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert bare.returncode == 5 and "migcore[cli]" in bare.stderr, bare.stderr

    # with the extras: a whole live migration over loopback, checked byte for byte, on the compiled fast path
    subprocess.run([*install, "migcore[cli,zstd]"], check=True, env=env, cwd=tmp_path)
    where = subprocess.run(
        [str(py), "-I", "-c", "import migcore._fastpath as f, migcore._uffd as u; print(f.__file__, u.__file__)"],
        capture_output=True, text=True, env=env, cwd=tmp_path,
    )  # fmt: skip
    assert where.returncode == 0 and where.stdout.count(str(venv)) == 2, where.stdout + where.stderr
    demo = subprocess.run(
        [str(bindir / "migcore"), "demo", "--size", "4MiB", "--dirty-rate", "2MiB/s", "--warmup", "0.1",
         "--compress", "zstd", "--no-progress", "--json"],
        capture_output=True, text=True, env={**env, "MIGCORE_REQUIRE_FASTPATH": "1"}, cwd=tmp_path, timeout=120,
    )  # fmt: skip
    assert demo.returncode == 0, demo.stdout + demo.stderr
    result = json.loads(demo.stdout)
    assert result["status"] == "completed" and result["identical"] is True and result["compress"] == "zstd"


def test_cibuildwheel_configuration_is_valid_and_complete() -> None:
    tomllib = pytest.importorskip("tomllib")
    cibuildwheel = shutil.which("cibuildwheel", path=str(Path(sys.executable).parent))
    if cibuildwheel is None:
        pytest.skip("cibuildwheel is not installed (the dev dependency group has it)")
    wanted = {"linux": ("manylinux_x86_64", "manylinux_aarch64"), "macos": ("macosx_x86_64", "macosx_arm64")}
    for platform, archs in wanted.items():
        # cibuildwheel refuses a configuration with an unknown or malformed option
        proc = subprocess.run(
            [cibuildwheel, "--print-build-identifiers", "--platform", platform, str(ROOT)],
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert proc.returncode == 0, proc.stderr
        identifiers = set(proc.stdout.split())
        for python in ("cp310", "cp311", "cp312", "cp313"):
            for arch in archs:
                assert f"{python}-{arch}" in identifiers, proc.stdout
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["cibuildwheel"]
    assert config["test-command"].startswith("migcore demo")  # every wheel runs a verified migration
    for platform in wanted:
        assert "xxhash" in config[platform]["before-all"]  # the header the fast path compiles against
