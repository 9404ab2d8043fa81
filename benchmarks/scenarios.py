"""The scenario suite, run from this folder: ``python benchmarks/scenarios.py [--quick | --full] [...]``.

The suite itself is ``migcore.bench`` (so an installed wheel can run it as
``migcore bench``); this script is the same command with the same options,
next to the micro benchmarks. See ``migcore bench --help``.
"""

from __future__ import annotations

import sys

from migcore.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", *sys.argv[1:]]))
