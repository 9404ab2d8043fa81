"""How the command line fails: one line on stderr that names the flag or file at fault, and a documented exit code.

Every failure reaches ``main`` as a :class:`CommandError` (an :class:`Exit`
status and a message), which prints it as ``migcore COMMAND: MESSAGE``;
``-v`` prints the traceback before that line, and nothing else prints one.
The library's messages name ``migrate()``/``listen()`` keywords: :data:`FLAGS`
is the one table from a keyword to the flag that sets it, and
:func:`name_flags` rewrites a message with it (a new flag for a library
option is one row there).
"""

from __future__ import annotations

import enum
import errno
import re
import textwrap

from migcore import MigrationError
from migcore._extras import MissingExtraError


class Exit(enum.IntEnum):
    """The exit statuses of ``migcore``; :data:`EXIT_MEANINGS` says what each one means."""

    OK = 0
    FAILED = 1
    USAGE = 2
    FILE = 3
    ADDRESS = 4
    MISSING_EXTRA = 5
    INTERNAL = 70
    INTERRUPTED = 130


#: What each exit status means, as ``migcore --help`` and the README show it.
EXIT_MEANINGS: dict[Exit, str] = {
    Exit.OK: "success (demo, receive: the region arrived whole and verified)",
    Exit.FAILED: "the migration failed, was refused by the peer, or (demo) the result differs; the source was "
    "resumed unless the line says otherwise",
    Exit.USAGE: "a flag's value, a combination of flags or the ADDRESS is refused (nothing was sent)",
    Exit.FILE: "a file named on the command line (PATH, --out, --token-file, --tls-*, --state-file) cannot be used",
    Exit.ADDRESS: "the ADDRESS cannot be listened on (port already in use, not this host's address, no permission)",
    Exit.MISSING_EXTRA: "an optional package is missing; the line names the extra to install",
    Exit.INTERNAL: "a bug in migcore: run again with -v for the traceback and report it",
    Exit.INTERRUPTED: "interrupted (Ctrl-C)",
}

#: The flag that sets each library keyword (``migrate()``, ``listen()``), to name flags in the library's messages.
FLAGS: dict[str, str] = {
    "mode": "--mode",
    "tracker": "--tracker",
    "downtime_limit": "--downtime-limit",
    "max_rounds": "--max-rounds",
    "timeout": "--timeout",
    "compat": "--compat",
    "on_stall": "--on-stall",
    "compress": "--compress",
    "delta": "--delta",
    "delta_cache_bytes": "--delta-cache-size",
    "streams": "--streams",
    "bandwidth_limit": "--bandwidth-limit",
    "postcopy_bandwidth_limit": "--postcopy-bandwidth-limit",
    "tls": "--tls-cert/--tls-key/--tls-ca",
    "token": "--token/--token-file",
    "insecure": "--insecure",
    "connect_timeout": "--wait",
    "max_bytes": "--max-bytes",
    "max_state_bytes": "--max-state-bytes",
    "page_size": "--page-size",
}

# a keyword, optionally with "=value" ("delta=True", "on_stall='postcopy'", "tls="), not part of a longer name
_KEYWORD = re.compile(
    r"(?<![\w./-])(" + "|".join(sorted(map(re.escape, FLAGS), key=len, reverse=True)) + r")"
    r"(=('[^']*'|\"[^\"]*\"|True|[\w.]+)?)?(?![\w-]|\.\w)"
)
_CLI_ASIDE = re.compile(r"\s*\(CLI [^)]*\)")


def name_flags(message: str, *, bare: bool = True) -> str:
    """``message`` with each library keyword replaced by its flag (``streams > 1`` -> ``--streams > 1``).

    ``bare=False`` replaces only the ``keyword=value`` forms: a message that
    is not about options (a peer's, a protocol error) keeps its plain words.
    """

    def flag(match: re.Match[str]) -> str:
        name, assigned, value = match.group(1), match.group(2), match.group(3)
        if assigned is None and not bare:
            return match.group(0)
        if value is None or value == "True":
            return FLAGS[name]
        return f"{FLAGS[name]} {value.strip(chr(39) + chr(34))}"

    return _KEYWORD.sub(flag, _CLI_ASIDE.sub("", message))


class CommandError(Exception):
    """A failure of a command: the exit status and the one line that says what is at fault."""

    def __init__(self, status: Exit, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = " ".join(message.split())  # one line, whatever the library said


def file_error(what: str, exc: OSError) -> CommandError:
    """A file that cannot be used: ``what`` names it (``--token-file F``, ``PATH F``), ``exc`` says why."""
    reason = exc.strerror or str(exc)
    return CommandError(Exit.FILE, f"{what}: {reason[:1].lower()}{reason[1:]}")


def address_error(address: str, exc: OSError) -> CommandError:
    """An address that cannot be listened on."""
    reasons = {
        errno.EADDRINUSE: "port already in use (another process listens there)",
        errno.EADDRNOTAVAIL: "not an address of this host",
        errno.EACCES: "permission denied (ports below 1024 need privileges)",
    }
    reason = reasons.get(exc.errno or 0) or exc.strerror or str(exc)
    return CommandError(Exit.ADDRESS, f"ADDRESS {address}: {reason}")


def as_command_error(exc: BaseException) -> CommandError:
    """The :class:`CommandError` an exception that reached ``main`` stands for."""
    if isinstance(exc, CommandError):
        return exc
    if isinstance(exc, MissingExtraError):
        return CommandError(Exit.MISSING_EXTRA, name_flags(str(exc)))
    if isinstance(exc, MigrationError):  # the peer's message names keywords too ("max_bytes=4096")
        return CommandError(Exit.FAILED, f"migration failed: {name_flags(str(exc), bare=False)}")
    if isinstance(exc, KeyboardInterrupt):
        return CommandError(Exit.INTERRUPTED, "interrupted")
    return CommandError(Exit.INTERNAL, f"internal error: {type(exc).__name__}: {exc} (run with -v for the traceback)")


def epilog() -> str:
    """The exit statuses, for ``migcore --help``."""
    lines = [
        textwrap.fill(
            meaning, 79, initial_indent=f"  {int(code):>3}  ", subsequent_indent=" " * 7, break_on_hyphens=False
        )
        for code, meaning in EXIT_MEANINGS.items()
    ]
    return "exit status:\n" + "\n".join(lines)
