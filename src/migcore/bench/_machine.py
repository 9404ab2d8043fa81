"""The machine and software a result was measured on, recorded with every result file."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import xxhash

import migcore
from migcore import _kernels


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _memory() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 0


def _git_commit() -> str:
    """The commit of the source tree migcore was imported from ('' outside a git checkout)."""
    here = Path(migcore.__file__).resolve().parent
    try:
        out = subprocess.run(
            ["git", "-C", str(here), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, check=False
        )
        dirty = subprocess.run(
            ["git", "-C", str(here), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True, text=True, timeout=5, check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return ""
    commit = out.stdout.strip()
    return f"{commit}{'+dirty' if commit and dirty.stdout.strip() else ''}"


def describe() -> dict[str, Any]:
    """CPU model, cores, memory, kernel, Python/NumPy/xxhash/migcore versions and git commit."""
    load = os.getloadavg() if hasattr(os, "getloadavg") else (0.0, 0.0, 0.0)
    return {
        "cpu_model": _cpu_model(),
        "cpus": os.cpu_count(),
        "memory_bytes": _memory(),
        "system": platform.system(),
        "kernel": platform.release(),
        "machine": platform.machine(),
        "python": sys.version.split()[0],
        "python_implementation": platform.python_implementation(),
        "numpy": np.__version__,
        "xxhash": xxhash.VERSION,
        "migcore": migcore.__version__,
        "kernels": _kernels.IMPLEMENTATION,
        "git_commit": _git_commit(),
        "load_average": [round(x, 2) for x in load],
    }


def one_line(machine: dict[str, Any]) -> str:
    """A short description for tables and the README."""
    mem = machine.get("memory_bytes", 0) / (1 << 30)
    return (
        f"{machine.get('cpu_model')}, {machine.get('cpus')} CPUs, {mem:.0f} GiB RAM, "
        f"{machine.get('system')} {machine.get('kernel')}, Python {machine.get('python')}, "
        f"NumPy {machine.get('numpy')}, migcore {machine.get('migcore')}"
    )
