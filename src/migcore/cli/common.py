"""What the commands share: the migration and authentication options, TLS and tokens.

``send`` and ``demo`` take the same migration options (``add_migrate_options``)
and turn them into ``migcore.migrate()`` keywords (``migrate_options``);
``send``, ``receive`` and ``demo`` take the same token and TLS options.
The choices of ``--mode``, ``--tracker``, ``--on-stall`` and ``--compress``
are the names :mod:`migcore.options` defines, and the options are checked
with its dataclasses before anything is opened (``check_migration``,
``check_listen``), so a refused flag is a one-line error naming the flag.
"""

from __future__ import annotations

import argparse
import math
import ssl
from pathlib import Path
from collections.abc import Callable
from typing import Any, TypeVar

from migcore.cli.errors import CommandError, Exit, file_error, name_flags
from migcore.cli.units import parse_duration, parse_rate, parse_size
from migcore.options import CODECS, MODES, ON_STALL, TRACKER_CHOICES, ListenOptions, MigrationOptions

_T = TypeVar("_T")


def add_migrate_options(p: argparse.ArgumentParser, *, default_tracker: str) -> None:
    """The options of one migration (mode, convergence, tracker, transfer, auth), shared by send and demo."""
    p.add_argument("--mode", choices=MODES, default="precopy", help="migration mode (default: %(default)s)")
    p.add_argument("--page-size", type=parse_size, default=4096, help="page size, a power of two (default: 4096)")
    p.add_argument(
        "--downtime-limit",
        type=parse_duration,
        default=0.3,
        metavar="SECONDS",
        help="switch over when the expected pause is under this (default: 0.3; also 300ms)",
    )
    p.add_argument("--max-rounds", type=int, default=30, help="pre-copy rounds before giving up on convergence")
    p.add_argument("--on-stall", choices=ON_STALL, default=None, help="what to do when pre-copy stops converging")
    p.add_argument("--tracker", choices=TRACKER_CHOICES, default=default_tracker, help="dirty-page tracker")
    p.add_argument("--compat", default=None, metavar="S", help="application compatibility string; both ends must agree")
    p.add_argument("--timeout", type=parse_duration, default=60.0, metavar="SECONDS", help="longest wait for the peer")
    p.add_argument("--no-progress", action="store_true", help="do not draw progress bars")
    _add_transfer_options(p)
    add_auth_options(p)
    add_output_options(p)


def add_output_options(p: argparse.ArgumentParser) -> None:
    """--json and --progress-json, shared by send, receive and demo (what people read then goes to stderr)."""
    p.add_argument(
        "--json", action="store_true",
        help="print the final stats as one JSON object on stdout (a failure as {\"status\": \"failed\", ...})",
    )
    p.add_argument(
        "--progress-json", action="store_true", help="print every progress snapshot as one JSON object per line"
    )


def _add_transfer_options(p: argparse.ArgumentParser) -> None:
    """How pages travel: compression, deltas, parallel streams, bandwidth caps."""
    p.add_argument("--compress", choices=CODECS, default=None, help="compress page batches with this codec")
    p.add_argument("--delta", action="store_true", help="send pages sent again as XBZRLE deltas")
    p.add_argument(
        "--delta-cache-size", type=parse_size, default=64 << 20, metavar="SIZE",
        help="page cache of --delta (default: 64MiB)",
    )
    p.add_argument("--streams", type=int, default=1, help="parallel page connections (default: 1, the main one)")
    p.add_argument(
        "--bandwidth-limit", type=parse_rate, default=None, metavar="RATE", help="cap page traffic, e.g. 100MiB/s"
    )
    p.add_argument(
        "--postcopy-bandwidth-limit", type=parse_rate, default=None, metavar="RATE",
        help="cap the background push after a post-copy switch (demand pages are never held back)",
    )


def add_auth_options(p: argparse.ArgumentParser) -> None:
    """--token/--token-file and --tls-cert/--tls-key/--tls-ca, shared by send, receive and demo."""
    p.add_argument("--token", default=None, metavar="SECRET", help="shared secret both ends must hold (HMAC-proven)")
    p.add_argument("--token-file", default=None, metavar="F", help="read the shared secret from F's first line")
    p.add_argument("--tls-cert", default=None, metavar="PEM", help="this side's certificate (TLS 1.3)")
    p.add_argument("--tls-key", default=None, metavar="PEM", help="the private key of --tls-cert")
    p.add_argument(
        "--tls-ca", default=None, metavar="PEM",
        help="CA that signs the peer: the source checks the destination with it; the destination then requires "
        "client certificates (mutual auth)",
    )


def migrate_options(args: argparse.Namespace) -> dict[str, Any]:
    """The keyword options of ``migcore.migrate()`` set on the command line."""
    opts: dict[str, Any] = {
        "mode": args.mode,
        "tracker": args.tracker,
        "downtime_limit": args.downtime_limit,
        "max_rounds": args.max_rounds,
        "timeout": args.timeout,
        "compat": args.compat,
    }
    if args.on_stall is not None:
        opts["on_stall"] = args.on_stall
    # transfer modes: only what was asked, so the defaults stay the library's
    if args.compress is not None:
        opts["compress"] = args.compress
    if args.delta:
        opts["delta"] = True
        opts["delta_cache_bytes"] = args.delta_cache_size
    if args.streams != 1:
        opts["streams"] = args.streams
    if args.bandwidth_limit is not None and not math.isinf(args.bandwidth_limit):
        opts["bandwidth_limit"] = args.bandwidth_limit
    if args.postcopy_bandwidth_limit is not None and not math.isinf(args.postcopy_bandwidth_limit):
        opts["postcopy_bandwidth_limit"] = args.postcopy_bandwidth_limit
    secret = token(args)
    if secret is not None:
        opts["token"] = secret
    tls = tls_context(args, server=False)
    if tls is not None:
        opts["tls"] = tls
    return opts


def check_address(address: str) -> None:
    """Refuse an ADDRESS that is no migcore address (``http://...``, no port), naming it."""
    try:
        ListenOptions(insecure=True).validate(address)
    except ValueError as exc:
        raise CommandError(Exit.USAGE, f"ADDRESS {address}: {exc}") from None


def check_migration(address: str, options: dict[str, Any]) -> None:
    """Refuse what ``migrate(region, address, **options)`` would refuse, with the flags' names."""
    check_address(address)
    try:
        MigrationOptions(**options).validate(address)
    except (ValueError, TypeError) as exc:
        raise CommandError(Exit.USAGE, name_flags(str(exc))) from None


def check_listen(address: str, options: dict[str, Any]) -> None:
    """Refuse what ``listen(address, **options)`` would refuse, with the flags' names."""
    check_address(address)
    try:
        ListenOptions(**options).validate(address)
    except (ValueError, TypeError) as exc:
        raise CommandError(Exit.USAGE, name_flags(str(exc))) from None


def token(args: argparse.Namespace) -> bytes | None:
    """The shared token from --token or --token-file (its first line; a file keeps it out of ``ps``).

    Like ssh with a private key, a token file that other users may read is
    refused: the secret would not be one.
    """
    if getattr(args, "token_file", None):
        path = Path(args.token_file)
        try:
            mode = path.stat().st_mode
            lines = path.read_bytes().splitlines()
        except OSError as exc:
            raise file_error(f"--token-file {args.token_file}", exc) from None
        if mode & 0o077:
            raise CommandError(
                Exit.FILE,
                f"--token-file {path} is readable by other users (mode {mode & 0o777:04o}); run 'chmod 600 {path}'",
            )
        if not lines or not lines[0].strip():
            raise CommandError(Exit.FILE, f"--token-file {args.token_file}: the first line is empty")
        return lines[0]
    secret = getattr(args, "token", None)
    return secret.encode() if secret else None


def tls_context(args: argparse.Namespace, *, server: bool) -> ssl.SSLContext | None:
    """A TLS 1.3 context from --tls-cert/--tls-key/--tls-ca, or None when none of them was given.

    Source: verifies the destination against --tls-ca (or the system's CAs)
    and presents --tls-cert if given. Destination: presents --tls-cert and,
    with --tls-ca, requires a client certificate signed by it (mutual auth).
    """
    cert, key, ca = (getattr(args, name, None) for name in ("tls_cert", "tls_key", "tls_ca"))
    if not (cert or key or ca):
        return None
    for flag, path in (("--tls-cert", cert), ("--tls-key", key), ("--tls-ca", ca)):
        if path and not Path(path).is_file():
            reason = "no such file" if not Path(path).exists() else "not a regular file"
            raise CommandError(Exit.FILE, f"{flag} {path}: {reason}")
    if key and not cert:
        raise CommandError(Exit.USAGE, "--tls-key needs --tls-cert (the certificate of that key)")
    if server:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        if not cert:
            raise CommandError(Exit.USAGE, "--tls-ca needs --tls-cert on the destination (the certificate it shows)")
        _load(lambda: ctx.load_cert_chain(cert, key), f"--tls-cert {cert}" + (f" / --tls-key {key}" if key else ""))
        if ca:
            ctx.verify_mode = ssl.CERT_REQUIRED
            _load(lambda: ctx.load_verify_locations(ca), f"--tls-ca {ca}")
    else:
        ctx = _load(lambda: ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=ca), f"--tls-ca {ca}")
        if cert:
            _load(lambda: ctx.load_cert_chain(cert, key), f"--tls-cert {cert}" + (f" / --tls-key {key}" if key else ""))
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    return ctx


def _load(step: Callable[[], _T], what: str) -> _T:
    """Run one loading step of a TLS context; a file it cannot use is a one-line error naming the flag."""
    try:
        return step()
    except ssl.SSLError as exc:
        raise CommandError(Exit.FILE, f"{what}: not a usable PEM file ({exc.reason or exc})") from None
    except OSError as exc:
        raise file_error(what, exc) from None
