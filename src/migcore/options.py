"""The options of a migration and of a listener, as data: one definition, one validation, one refusal table.

:func:`migcore.migrate` builds a :class:`MigrationOptions` from its keywords
and :func:`migcore.listen` / :class:`migcore.Listener` a :class:`ListenOptions`;
every check of a value happens in their ``__post_init__``, and every check
that depends on the address (its scheme, its host) in their ``validate``.
The option combinations :func:`migcore.migrate` refuses are one table,
:data:`REFUSALS`, which both the check and ``migrate()``'s docstring read.

The names of modes, trackers, codecs and stall policies are ``Literal``
types, so a misspelt one fails ``mypy --strict`` in the calling program, and
tuples for run-time use (choices on a command line, for instance)::

    from migcore.options import MODES, Mode
"""

from __future__ import annotations

import dataclasses
import math
import ssl
import textwrap
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

from migcore import _protocol as P
from migcore._bandwidth import check_rate
from migcore._delta import DEFAULT_CACHE_BYTES
from migcore._names import (
    CODECS,
    MODES,
    ON_STALL,
    TRACKER_CHOICES,
    TRACKERS,
    Codec,
    Mode,
    OnStall,
    Tracker,
    TrackerChoice,
)
from migcore._region import check_page_size
from migcore._security import check_tls, check_token, is_loopback
from migcore._stats import MigrationStats
from migcore._transport import Address, parse_address

__all__ = [
    "CODECS",
    "MODES",
    "ON_STALL",
    "REFUSALS",
    "SCHEMES",
    "TRACKERS",
    "TRACKER_CHOICES",
    "Codec",
    "ListenOptions",
    "MigrationOptions",
    "Mode",
    "OnStall",
    "Refusal",
    "Scheme",
    "Tracker",
    "TrackerChoice",
    "check_timeout",
    "render_refusals",
]

#: The address schemes: ``tcp://HOST:PORT``, ``unix:///PATH``, ``file:///PATH``.
Scheme = Literal["tcp", "unix", "file"]
SCHEMES: tuple[Scheme, ...] = ("tcp", "unix", "file")

#: Where :data:`REFUSALS` is written into a docstring (see :func:`render_refusals`).
REFUSALS_PLACEHOLDER = "<refused combinations>"


def check_timeout(name: str, value: float | None) -> float | None:
    """``value`` as a positive number of seconds (a float), or None (wait for ever)."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0 or math.isnan(value):
        raise ValueError(f"{name} must be a positive number of seconds or None, got {value!r}")
    return float(value)


def _set(obj: object, name: str, value: object) -> None:
    object.__setattr__(obj, name, value)  # a frozen dataclass normalising its own fields in __post_init__


def _values(options: MigrationOptions) -> dict[str, Any]:
    """The fields by name, to format messages with (not ``asdict``: it would deep-copy a TLS context)."""
    return {f.name: getattr(options, f.name) for f in dataclasses.fields(options)}


@dataclass(frozen=True)
class MigrationOptions:
    """Every keyword option of :func:`migcore.migrate`, checked; the same names, types and defaults.

    Constructing one checks each value (``TypeError`` for a wrong kind,
    ``ValueError`` for a wrong value) and every refused combination that
    does not depend on the address; :meth:`validate` checks the ones that
    do. After construction ``on_stall`` is never None (``"postcopy"`` for
    mode hybrid, else ``"finish"``), ``token`` is bytes or None and the
    numbers of seconds and bytes per second are floats.
    """

    mode: Mode = "precopy"
    state: bytes | Callable[[], bytes] = b""
    pause: Callable[[], object] | None = None
    tracker: TrackerChoice = "auto"
    downtime_limit: float = 0.3
    max_rounds: int = 30
    timeout: float | None = None
    compat: str | None = None
    progress: Callable[[MigrationStats], object] | None = None
    on_stall: OnStall | None = None
    throttle: Callable[[int], object] | None = None
    resume: Callable[[], object] | None = None
    compress: Codec | None = None
    delta: bool = False
    delta_cache_bytes: int = DEFAULT_CACHE_BYTES
    tls: ssl.SSLContext | None = None
    token: str | bytes | None = None
    bandwidth_limit: float | None = None
    postcopy_bandwidth_limit: float | None = None
    streams: int = 1
    connect_timeout: float | None = None
    insecure: bool = False

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        if self.tracker != "auto" and self.tracker not in TRACKERS:
            raise ValueError(f"tracker must be 'auto' or one of {sorted(TRACKERS)}, got {self.tracker!r}")
        if self.on_stall is None:
            _set(self, "on_stall", "postcopy" if self.mode == "hybrid" else "finish")
        if self.on_stall not in ON_STALL:
            raise ValueError(f"on_stall must be one of {ON_STALL}, got {self.on_stall!r}")
        if self.on_stall == "throttle" and self.throttle is None:
            raise ValueError('on_stall="throttle" needs a throttle(level) callback')
        limit = self.downtime_limit
        if isinstance(limit, bool) or not isinstance(limit, (int, float)) or not limit >= 0:
            raise ValueError(f"downtime_limit must be a number of seconds >= 0, got {limit!r}")
        _set(self, "downtime_limit", float(limit))
        if isinstance(self.max_rounds, bool) or not isinstance(self.max_rounds, int) or self.max_rounds < 1:
            raise ValueError(f"max_rounds must be an int >= 1, got {self.max_rounds!r}")
        _set(self, "timeout", check_timeout("timeout", self.timeout))
        _set(self, "connect_timeout", check_timeout("connect_timeout", self.connect_timeout))
        if not callable(self.state):
            try:
                memoryview(self.state)
            except TypeError:
                kind = type(self.state).__name__
                raise TypeError(f"state must be bytes-like or a zero-argument callable, not {kind}") from None
        for name in ("pause", "resume", "throttle", "progress"):
            fn = getattr(self, name)
            if fn is not None and not callable(fn):
                raise TypeError(f"{name} must be callable")
        if self.compat is not None and not isinstance(self.compat, str):
            raise TypeError("compat must be a str or None")
        _set(self, "token", check_token(self.token))
        check_tls(self.tls, server=False)
        if self.compress is not None and self.compress not in CODECS:
            raise ValueError(f"compress must be one of {CODECS} or None, got {self.compress!r}")
        if not isinstance(self.delta, bool):
            raise TypeError("delta must be True or False")
        cache = self.delta_cache_bytes
        if isinstance(cache, bool) or not isinstance(cache, int) or cache < 0:
            raise ValueError(f"delta_cache_bytes must be an int >= 0, got {cache!r}")
        streams = self.streams
        if isinstance(streams, bool) or not isinstance(streams, int) or not 1 <= streams <= P.MAX_STREAMS:
            raise ValueError(f"streams must be an int from 1 to {P.MAX_STREAMS}, got {streams!r}")
        _set(self, "bandwidth_limit", check_rate("bandwidth_limit", self.bandwidth_limit))
        _set(self, "postcopy_bandwidth_limit", check_rate("postcopy_bandwidth_limit", self.postcopy_bandwidth_limit))
        for refusal in REFUSALS:
            if refusal.scheme is None and refusal.when(self):
                raise ValueError(refusal.message.format_map(_values(self)))

    @property
    def stall_policy(self) -> OnStall:
        """``on_stall`` as resolved from the mode when it was left None."""
        assert self.on_stall is not None  # __post_init__ resolved it
        return self.on_stall

    @property
    def token_bytes(self) -> bytes | None:
        """``token`` as bytes (UTF-8 for a str), or None."""
        return self.token.encode() if isinstance(self.token, str) else self.token

    @property
    def can_postcopy(self) -> bool:
        """Whether this migration may switch to post-copy (its mode, or its stall policy)."""
        return self.mode in ("postcopy", "hybrid") or self.on_stall == "postcopy"

    def validate(self, address: str) -> Address:
        """Parse ``address`` and refuse the options its scheme cannot carry (:data:`REFUSALS`); return it parsed."""
        addr = parse_address(address)
        refused = [r for r in REFUSALS if r.scheme == addr.scheme and r.when(self)]
        if refused:
            values = _values(self)
            names = ", ".join(r.message.format_map(values) for r in refused)
            raise ValueError(SCHEME_REFUSED[addr.scheme].format(options=names))
        if unauthenticated(addr, self.tls, self.token, self.insecure):
            raise ValueError(UNAUTHENTICATED.format(verb="migrate to", host=addr.host, peers="destinations"))
        return addr


@dataclass(frozen=True)
class Refusal:
    """One option combination :func:`migcore.migrate` refuses with ``ValueError``, before any connection.

    ``option`` is refused when ``when(options)`` holds: on every address when
    ``scheme`` is None (``message`` is then the error, formatted with the
    options' fields), else on addresses of that scheme only (``message`` is
    then how the scheme's error, :data:`SCHEME_REFUSED`, names the option).
    ``option`` and ``refused_with`` are the two columns of the docstring
    table; ``example()`` returns ``migrate()`` keywords that meet the refusal.
    """

    option: str
    refused_with: str
    when: Callable[[MigrationOptions], bool]
    message: str
    scheme: Scheme | None = None
    example: Callable[[], Mapping[str, Any]] = dict


def _client_context() -> ssl.SSLContext:
    return ssl.create_default_context(ssl.Purpose.SERVER_AUTH)


#: The error of a scheme that cannot carry some options; ``{options}`` names them.
SCHEME_REFUSED: dict[str, str] = {
    "file": (
        "file:// shared storage does not support {options}: pages are written in place on a file system both hosts "
        "mount, with no live destination to negotiate with"
    ),
    "unix": "unix:// connections stay on this host and have no host name to check: {options} needs tcp://",
}

#: Every refused combination of migrate() options. The checks run in this order: first the rows without a
#: scheme (the first that holds is the error), then the rows of the address's scheme (all named in one error).
REFUSALS: tuple[Refusal, ...] = (
    Refusal(
        "``compress``", "``file://`` (pages live at fixed offsets)",
        lambda o: o.compress is not None, "compress", scheme="file", example=lambda: {"compress": "zstd"},
    ),
    Refusal(
        "``delta=True``", "``mode`` stopcopy or postcopy (no page is sent twice)",
        lambda o: o.delta and o.mode in ("stopcopy", "postcopy"),
        "delta=True needs pre-copy rounds (mode precopy or hybrid); mode {mode!r} sends no page twice",
        example=lambda: {"delta": True, "mode": "stopcopy"},
    ),
    Refusal(
        "``delta=True``", "``file://`` (no destination acknowledges what it holds)",
        lambda o: o.delta, "delta=True", scheme="file", example=lambda: {"delta": True},
    ),
    Refusal(
        "``streams > 1``", '``mode="postcopy"`` (post-copy pages use the main connection)',
        lambda o: o.streams > 1 and o.mode == "postcopy",
        "streams > 1 carry pre-copy pages; mode 'postcopy' sends its pages on the main connection",
        example=lambda: {"streams": 2, "mode": "postcopy"},
    ),
    Refusal(
        "``streams > 1``", "``file://`` (no connections to add)",
        lambda o: o.streams > 1, "streams > 1", scheme="file", example=lambda: {"streams": 2},
    ),
    Refusal(
        "``tls``", "``file://`` (no network to protect)",
        lambda o: o.tls is not None, "tls", scheme="file", example=lambda: {"tls": _client_context()},
    ),
    Refusal(
        "``tls``", "``unix://`` (no host name to check)",
        lambda o: o.tls is not None, "tls", scheme="unix", example=lambda: {"tls": _client_context()},
    ),
    Refusal(
        "``token``", "``file://`` (the file system's permissions decide who reads the file)",
        lambda o: o.token is not None, "token", scheme="file", example=lambda: {"token": "secret"},
    ),
    Refusal(
        "``postcopy_bandwidth_limit``", "a migration that can never switch to post-copy",
        lambda o: o.postcopy_bandwidth_limit is not None and not o.can_postcopy,
        "postcopy_bandwidth_limit has no effect: mode {mode!r} with on_stall={on_stall!r} never post-copies",
        example=lambda: {"mode": "precopy", "postcopy_bandwidth_limit": 1e6},
    ),
    Refusal(
        "``mode`` postcopy or hybrid", "``file://`` (no destination to ask for pages)",
        lambda o: o.mode in ("postcopy", "hybrid"), "mode={mode!r}", scheme="file",
        example=lambda: {"mode": "postcopy"},
    ),
    Refusal(
        '``on_stall="postcopy"``', "``file://`` (no destination to ask for pages)",
        lambda o: o.on_stall == "postcopy", "on_stall='postcopy'", scheme="file",
        example=lambda: {"on_stall": "postcopy"},
    ),
    Refusal(
        "``connect_timeout``", "``file://`` (the source creates the file; there is nothing to wait for)",
        lambda o: o.connect_timeout is not None, "connect_timeout", scheme="file",
        example=lambda: {"connect_timeout": 5.0},
    ),
)


def render_refusals(width: int = 45) -> str:
    """:data:`REFUSALS` as a reST table (one row per option, its refusals joined), as ``migrate()`` shows it."""
    grouped: dict[str, list[str]] = {}
    for refusal in REFUSALS:
        grouped.setdefault(refusal.option, []).append(refusal.refused_with)
    head = ("option", "refused with")
    rows = [
        (option, textwrap.wrap(", ".join(whens), width, break_on_hyphens=False)) for option, whens in grouped.items()
    ]
    left = max(len(head[0]), *(len(option) for option, _ in rows))
    right = max(len(head[1]), *(len(line) for _, lines in rows for line in lines))
    rule = f"{'=' * left}  {'=' * right}"
    out = [rule, f"{head[0]:<{left}}  {head[1]}", rule]
    for option, lines in rows:
        out += [f"{option if i == 0 else '':<{left}}  {line}".rstrip() for i, line in enumerate(lines)]
    return "\n".join([*out, rule])


def document_refusals(doc: str | None) -> str | None:
    """``doc`` with its :data:`REFUSALS_PLACEHOLDER` line replaced by :func:`render_refusals`, same indent."""
    if doc is None:  # python -OO
        return None
    for line in doc.splitlines():
        if line.strip() == REFUSALS_PLACEHOLDER:
            indent = line[: len(line) - len(line.lstrip())]
            return doc.replace(line, textwrap.indent(render_refusals(), indent))
    raise ValueError(f"docstring has no {REFUSALS_PLACEHOLDER} line")


#: The refusal of a connection that nothing authenticates, for migrate(), recover() and listen().
UNAUTHENTICATED = (
    "refusing to {verb} {host}, reachable from other hosts, without tls= (verifying the peer) or token=; "
    "pass insecure=True (CLI --insecure) to talk to unauthenticated {peers}"
)


def unauthenticated(addr: Address, tls: ssl.SSLContext | None, token: str | bytes | None, insecure: bool) -> bool:
    """Whether a tcp address off this host would carry pages with nothing proving who the peer is."""
    if not isinstance(insecure, bool):
        raise TypeError("insecure must be True or False")
    return addr.scheme == "tcp" and not is_loopback(addr.host) and tls is None and token is None and not insecure


@dataclass(frozen=True)
class ListenOptions:
    """Every keyword option of :func:`migcore.listen` and :class:`migcore.Listener`, checked.

    Constructing one checks each value; :meth:`validate` checks what depends
    on the address (the security a scheme or a host needs or cannot carry).
    After construction ``timeout`` is a float or None and ``token`` bytes or None.
    """

    max_bytes: int | None = None
    compat: str | None = None
    timeout: float | None = None
    page_size: int | None = None
    max_state_bytes: int = P.DEFAULT_MAX_STATE
    max_payload: int = P.DEFAULT_MAX_PAYLOAD
    tls: ssl.SSLContext | None = None
    token: str | bytes | None = None
    insecure: bool = False

    def __post_init__(self) -> None:
        max_bytes = self.max_bytes
        if max_bytes is not None and (isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or max_bytes <= 0):
            raise ValueError(f"max_bytes must be a positive int or None, got {max_bytes!r}")
        if self.compat is not None and not isinstance(self.compat, str):
            raise TypeError("compat must be a str or None")
        if self.page_size is not None:
            check_page_size(self.page_size)
        if not isinstance(self.max_state_bytes, int) or self.max_state_bytes < 0:
            raise ValueError("max_state_bytes must be an int >= 0")
        if not isinstance(self.max_payload, int) or not 4096 <= self.max_payload <= 1 << 30:
            raise ValueError("max_payload must be an int from 4096 to 1 GiB")
        _set(self, "timeout", check_timeout("timeout", self.timeout))
        _set(self, "token", check_token(self.token))
        check_tls(self.tls, server=True)

    @property
    def token_bytes(self) -> bytes | None:
        """``token`` as bytes (UTF-8 for a str), or None."""
        return self.token.encode() if isinstance(self.token, str) else self.token

    def validate(self, address: str) -> Address:
        """Parse ``address`` and refuse what its scheme or host cannot do without; return it parsed."""
        addr = parse_address(address)
        if addr.scheme == "file" and (self.tls is not None or self.token is not None):
            raise ValueError("file:// shared storage takes no tls or token: the file system's permissions decide")
        if addr.scheme == "unix" and self.tls is not None:
            raise ValueError("unix:// connections stay on this host: tls needs tcp://")
        # DESIGN.md rule 5: a destination reachable from another host authenticates its peer; a TLS context
        # that requires no client certificate authenticates nobody
        verifying = self.tls if self.tls is not None and self.tls.verify_mode == ssl.CERT_REQUIRED else None
        if unauthenticated(addr, verifying, self.token, self.insecure):
            raise ValueError(UNAUTHENTICATED.format(verb="listen on", host=addr.host, peers="sources"))
        return addr
