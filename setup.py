"""Declares the compiled fast path; everything else lives in pyproject.toml."""

import os
import sys
import sysconfig
from pathlib import Path

from setuptools import Extension, setup

HEADER = "xxhash.h"
INSTALL_HINT = (
    "migcore needs the xxHash C header ({header}) to build its fast path.\n"
    "Install it with your system's package manager:\n"
    "  Debian/Ubuntu:  apt-get install libxxhash-dev\n"
    "  Fedora/RHEL:    dnf install xxhash-devel\n"
    "  Alpine:         apk add xxhash-dev\n"
    "  macOS:          brew install xxhash\n"
    "or point XXHASH_INCLUDE_DIR at the folder that holds {header}."
)


def xxhash_include_dirs() -> list[str]:
    """Find the folder holding xxhash.h, or stop the build with a message naming the package."""
    candidates = []
    if os.environ.get("XXHASH_INCLUDE_DIR"):
        candidates.append(os.environ["XXHASH_INCLUDE_DIR"])
    for var in ("CPATH", "C_INCLUDE_PATH"):
        candidates += [p for p in os.environ.get(var, "").split(os.pathsep) if p]
    candidates += [
        sysconfig.get_config_var("INCLUDEDIR") or "",
        "/usr/include",
        "/usr/local/include",
        "/opt/homebrew/include",
        "/opt/local/include",
    ]
    for folder in candidates:
        if folder and (Path(folder) / HEADER).is_file():
            return [] if folder == "/usr/include" else [folder]  # the compiler searches it anyway
    sys.exit(INSTALL_HINT.format(header=HEADER))


def extensions() -> list[Extension]:
    from Cython.Build import cythonize

    include_dirs = xxhash_include_dirs()
    ext = Extension(
        "migcore._fastpath",
        sources=["src/migcore/_fastpath.pyx"],
        include_dirs=include_dirs,
        extra_compile_args=["-O3", "-fno-strict-aliasing"],
        define_macros=[("NPY_NO_DEPRECATED_API", "NPY_1_7_API_VERSION")],
    )
    exts = [ext]
    if sys.platform.startswith("linux"):
        # userfaultfd write tracking and post-copy; it hashes post-copy pages with XXH3 as they land
        exts.append(
            Extension(
                "migcore._uffd",
                sources=["src/migcore/_uffd.pyx"],
                include_dirs=include_dirs,
                extra_compile_args=["-O2", "-fno-strict-aliasing"],
            )
        )
    return cythonize(
        exts,
        language_level=3,
        compiler_directives={
            "boundscheck": False,
            "wraparound": False,
            "cdivision": True,
            "initializedcheck": False,
            "embedsignature": True,
            "freethreading_compatible": True,
        },
    )


# Metadata-only commands (egg_info, sdist) need no compiler or header.
_NEEDS_BUILD = not any(arg in sys.argv for arg in ("egg_info", "sdist", "dist_info", "--version"))
setup(ext_modules=extensions() if _NEEDS_BUILD else [])
