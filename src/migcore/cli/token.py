"""``migcore token``: print a fresh random token for ``--token`` / ``--token-file``.

256 bits from the operating system's generator, URL-safe base64 (43
characters), so it survives shells, files and environment variables.
"""

from __future__ import annotations

import argparse
import os
import secrets
from pathlib import Path

from rich.console import Console

from migcore.cli.errors import file_error

#: Random bytes in a token: far beyond any guessing, online or offline.
TOKEN_BYTES = 32


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser], common: argparse.ArgumentParser) -> None:
    """The ``token`` subcommand and its options."""
    token = sub.add_parser("token", parents=[common], help="print a fresh random token for --token / --token-file")
    token.add_argument(
        "--out", default=None, metavar="FILE",
        help="write it to FILE (created with mode 600, never overwritten) instead of printing it",
    )
    token.set_defaults(func=run)


def run(args: argparse.Namespace, console: Console) -> int:
    value = secrets.token_urlsafe(TOKEN_BYTES)
    if args.out is None:
        print(value)
        return 0
    path = Path(args.out)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except OSError as exc:
        raise file_error(f"--out {path}", exc) from None
    with os.fdopen(fd, "w") as f:
        f.write(value + "\n")
    return 0
