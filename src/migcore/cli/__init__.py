"""The ``migcore`` command line: ``send``, ``receive``, ``demo`` and ``bench``.

- ``migcore receive tcp://HOST:PORT [--out FILE]`` waits for one migration
  and writes the region to FILE (and the state blob to FILE.state).
- ``migcore send PATH tcp://HOST:PORT`` migrates a regular file or a POSIX
  shared-memory segment (``/dev/shm/NAME``) that another process keeps
  writing, with the hash tracker (it sees writes from any process).
- ``migcore demo`` runs a whole migration in one process: a destination on
  loopback, a source region with a live workload dirtying it, a progress bar
  per round and a final table, and a byte-for-byte check of the result.
- ``migcore bench [--quick|--full] [--out DIR]`` runs the benchmark suite
  (:mod:`migcore.bench`).

The terminal output needs the ``cli`` extra (``rich``); this module imports
nothing that needs it, so a missing extra is one line that says so, not a
traceback. ``app`` builds the parser and runs a command, one module per
command (``demo``, ``send``, ``receive``, ``bench``) adds its subcommand and
runs it; ``common`` holds the options they share, ``errors`` the exit
statuses and the flag table, ``display`` the bars, tables, JSON and logging,
``units`` sizes, rates and durations. This package is the only part of
migcore that prints or configures logging.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from migcore._extras import MissingExtraError, require

__all__ = ["build_parser", "main"]


def _load_app() -> None:
    require("rich", "the migcore command line")


def build_parser() -> argparse.ArgumentParser:
    """The ``migcore`` parser (see :func:`migcore.cli.app.build_parser`)."""
    _load_app()
    from migcore.cli import app

    return app.build_parser()


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``migcore`` command line; returns the exit status (the table is in ``migcore --help``)."""
    try:
        _load_app()
    except MissingExtraError as exc:
        from migcore.cli.errors import Exit

        print(f"migcore: {exc}", file=sys.stderr)
        return int(Exit.MISSING_EXTRA)
    from migcore.cli import app

    return app.main(argv)
