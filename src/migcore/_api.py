"""The public entry points: ``migrate()`` on the source, ``listen()``/``Listener.receive()`` on the destination."""

from __future__ import annotations

import logging
import math
import ssl
from collections.abc import Callable
from types import TracebackType
from typing import Any

from migcore import _protocol as P
from migcore._bandwidth import check_rate
from migcore._delta import DEFAULT_CACHE_BYTES
from migcore._destination import Destination
from migcore._received import Received
from migcore._handshake import DestinationOptions
from migcore._names import CODECS, MODES, ON_STALL
from migcore._region import Region
from migcore._batch import BatchEncoder
from migcore._codecs import get_codec
from migcore._file_receive import receive_file
from migcore._socket_link import SocketLink
from migcore._source import LinkFactory, Source, SourceOptions
from migcore._source_link import SourceLink
from migcore._stats import MigrationStats
from migcore._stats import StatsRecorder
from migcore._trackers import TRACKERS, resolve_tracker
from migcore._security import check_tls, check_token, is_loopback
from migcore._storage import FileLink
from migcore._transport import Connection, Server, connect, parse_address, secure_server

__all__ = ["Listener", "Received", "listen", "migrate"]

log = logging.getLogger("migcore")

def _check_timeout(name: str, value: float | None) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0 or math.isnan(value):
        raise ValueError(f"{name} must be a positive number of seconds or None, got {value!r}")
    return float(value)


def migrate(
    source: Any,
    address: str,
    *,
    mode: str = "precopy",
    state: bytes | Callable[[], bytes] = b"",
    pause: Callable[[], object] | None = None,
    tracker: str = "auto",
    downtime_limit: float = 0.3,
    max_rounds: int = 30,
    timeout: float | None = None,
    compat: str | None = None,
    progress: Callable[[MigrationStats], object] | None = None,
    on_stall: str | None = None,
    throttle: Callable[[int], object] | None = None,
    resume: Callable[[], object] | None = None,
    compress: str | None = None,
    delta: bool = False,
    delta_cache_bytes: int = DEFAULT_CACHE_BYTES,
    tls: ssl.SSLContext | None = None,
    token: str | bytes | None = None,
    bandwidth_limit: float | None = None,
    postcopy_bandwidth_limit: float | None = None,
    streams: int = 1,
) -> MigrationStats:
    """Move ``source`` (a :class:`Region` or any writable buffer) and a state blob to a listening destination.

    The program may keep writing ``source`` until ``pause()`` returns; from
    then on it must not write it. ``state`` is bytes, or a zero-argument
    callable called after ``pause()``.

    Modes: ``"stopcopy"`` pauses at once and sends every non-zero page;
    ``"precopy"`` sends rounds while the program runs and pauses when the
    expected downtime is under ``downtime_limit``; ``"postcopy"`` pauses at
    once, sends the state and the list of owed pages, and pushes the pages
    after the destination resumed; ``"hybrid"`` is pre-copy that switches to
    post-copy when it stops converging.

    When pre-copy stalls (the dirty set did not shrink for 3 rounds, or
    ``max_rounds`` rounds passed) ``on_stall`` decides: ``"finish"`` (the
    default for precopy) pauses anyway, ``"postcopy"`` (the default for
    hybrid) switches to post-copy, ``"throttle"`` calls ``throttle(level)``
    with rising percentages (20, 30, ... 99) so the program slows its writes,
    then ``throttle(0)`` when the migration ends, and ``"cancel"`` raises
    :class:`MigrationCancelled` before ``pause()`` was ever called.

    Failures before the switchover leave ``source`` untouched; if ``pause()``
    had already returned, ``resume()`` is called so the program carries on
    (rule 3). After the switchover the source never resumes: the newest state
    lives on the destination; a post-copy link failure raises
    :class:`PeerLostError` carrying the pages still owed. ``timeout`` is the
    longest wait for the peer to connect or make progress.

    Transfer options (the destination learns them from the handshake):

    - ``compress="zstd"|"lz4"``: page batches are compressed; a batch that
      does not shrink goes raw. Post-copy pages always go raw (latency).
    - ``delta=True``: a page sent again goes as an XBZRLE delta against the
      copy the destination acknowledged holding, kept in an LRU cache of
      ``delta_cache_bytes`` (default 64 MiB).
    - ``tls=ssl.SSLContext``: TLS 1.3; the context must verify the server
      (``CERT_REQUIRED`` + ``check_hostname``), whose name is checked against
      the address's host; load a client certificate for mutual auth.
    - ``token="..."``: proven by an HMAC challenge-response before anything
      else (inside TLS if both); the destination must hold the same token.
    - ``bandwidth_limit`` (bytes/s): a token bucket over all page traffic; the
      expected downtime uses min(measured, limit). ``postcopy_bandwidth_limit``
      caps the background push after a post-copy switch (demand pages are
      never held back; default: unlimited).
    - ``streams=N`` (N > 1): pages travel on N extra connections, each sent
      from its own thread; control and state stay on the main one.

    Addresses: ``tcp://HOST:PORT``, ``unix:///PATH``, or ``file:///PATH`` for
    shared storage (pages written at page index x page size into PATH, with
    manifests in ``PATH.manifest``; see :func:`listen`).

    Combinations that make no sense are refused with ``ValueError`` before
    any connection:

    ============================  =============================================
    option                        refused with
    ============================  =============================================
    ``delta=True``                ``mode`` stopcopy or postcopy (no page is sent
                                  twice), ``file://``
    ``compress``                  ``file://`` (pages live at fixed offsets)
    ``streams > 1``               ``mode="postcopy"`` (post-copy pages use the
                                  main connection), ``file://``
    ``tls``                       ``file://`` and ``unix://`` (no network to
                                  protect; no host name to check)
    ``token``                     ``file://`` (the file system's permissions
                                  decide who reads the file)
    ``postcopy_bandwidth_limit``  a migration that can never switch to
                                  post-copy
    ``mode`` postcopy/hybrid,     ``file://`` (no destination to ask for
    ``on_stall="postcopy"``       pages)
    ============================  =============================================

    ``tracker`` finds the pages dirtied between pre-copy rounds: ``"hash"``
    (any buffer), ``"writes"`` (only what the program marks), ``"uffd"`` (the
    kernel sees every write; Linux >= 6.7 and a region from
    ``Region.allocate``), or ``"auto"``: uffd where possible, else hash.

    Returns the final :class:`MigrationStats`.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if tracker != "auto" and tracker not in TRACKERS:
        raise ValueError(f"tracker must be 'auto' or one of {sorted(TRACKERS)}, got {tracker!r}")
    if on_stall is None:
        on_stall = "postcopy" if mode == "hybrid" else "finish"
    if on_stall not in ON_STALL:
        raise ValueError(f"on_stall must be one of {ON_STALL}, got {on_stall!r}")
    if on_stall == "throttle" and throttle is None:
        raise ValueError('on_stall="throttle" needs a throttle(level) callback')
    if isinstance(downtime_limit, bool) or not isinstance(downtime_limit, (int, float)) or not downtime_limit >= 0:
        raise ValueError(f"downtime_limit must be a number of seconds >= 0, got {downtime_limit!r}")
    if isinstance(max_rounds, bool) or not isinstance(max_rounds, int) or max_rounds < 1:
        raise ValueError(f"max_rounds must be an int >= 1, got {max_rounds!r}")
    timeout = _check_timeout("timeout", timeout)
    if not callable(state):
        try:
            memoryview(state)
        except TypeError:
            raise TypeError(f"state must be bytes-like or a zero-argument callable, not {type(state).__name__}") from None
    for name, fn in (("pause", pause), ("resume", resume), ("throttle", throttle), ("progress", progress)):
        if fn is not None and not callable(fn):
            raise TypeError(f"{name} must be callable")
    if compat is not None and not isinstance(compat, str):
        raise TypeError("compat must be a str or None")
    addr = parse_address(address)
    token_bytes = check_token(token)
    tls = check_tls(tls, server=False)
    _check_modes(
        addr.scheme, mode, on_stall, compress=compress, delta=delta, delta_cache_bytes=delta_cache_bytes, tls=tls,
        token=token_bytes, postcopy_bandwidth_limit=postcopy_bandwidth_limit, streams=streams,
    )
    bandwidth_limit = check_rate("bandwidth_limit", bandwidth_limit)
    postcopy_bandwidth_limit = check_rate("postcopy_bandwidth_limit", postcopy_bandwidth_limit)
    region = source if isinstance(source, Region) else Region(source)
    if mode in ("precopy", "hybrid"):  # the modes with rounds use a tracker; "uffd" unavailable raises here
        tracker_name = resolve_tracker(tracker, region)
    else:
        tracker_name = "hash" if tracker == "auto" else tracker
    opts = SourceOptions(
        mode=mode,
        tracker=tracker_name,
        downtime_limit=float(downtime_limit),
        max_rounds=max_rounds,
        timeout=timeout,
        compat=compat,
        on_stall=on_stall,
        state=state,
        pause=pause,
        resume=resume,
        throttle=throttle,
        progress=progress,
        compress=compress,
        delta=delta,
        delta_cache_bytes=delta_cache_bytes,
        token=token_bytes,
        bandwidth_limit=bandwidth_limit,
        postcopy_bandwidth_limit=postcopy_bandwidth_limit,
        streams=streams,
    )
    if addr.scheme == "file":
        log.info("source: migrating %d bytes to shared storage %s (%s)", region.nbytes, addr.path, mode)
    else:
        log.info("source: migrating %d bytes to %s (%s, tracker %s)", region.nbytes, address, mode, tracker_name)
    return Source(region, opts, _link_factory(address, opts, timeout, tls)).run()


def _link_factory(address: str, opts: SourceOptions, timeout: float | None, tls: ssl.SSLContext | None) -> LinkFactory:
    """The link an address scheme calls for: shared storage for ``file://``, a connection otherwise."""
    addr = parse_address(address)

    def open_link(region: Region, stats: StatsRecorder, progress: Callable[[], None]) -> SourceLink:
        if addr.scheme == "file":
            return FileLink(region, addr.path, stats, bandwidth_limit=opts.bandwidth_limit, progress=progress)
        encoder = None
        if opts.compress is not None or opts.delta:
            encoder = BatchEncoder(
                region,
                stats,
                codec=get_codec(opts.compress) if opts.compress else None,
                delta_cache_bytes=opts.delta_cache_bytes if opts.delta else None,
            )
        return SocketLink(
            region,
            connect(address, timeout, tls),
            stats,
            encoder=encoder,
            token=opts.token,
            streams=opts.streams,
            connect=lambda: connect(address, timeout, tls),
            bandwidth_limit=opts.bandwidth_limit,
            postcopy_bandwidth_limit=opts.postcopy_bandwidth_limit,
            progress=progress,
        )

    return open_link


def _check_modes(
    scheme: str,
    mode: str,
    on_stall: str,
    *,
    compress: str | None,
    delta: bool,
    delta_cache_bytes: int,
    tls: ssl.SSLContext | None,
    token: bytes | None,
    postcopy_bandwidth_limit: float | None,
    streams: int,
) -> None:
    """The capability check (QEMU's): refuse option combinations that make no sense, naming the conflict."""
    if compress is not None and compress not in CODECS:
        raise ValueError(f"compress must be one of {CODECS} or None, got {compress!r}")
    if not isinstance(delta, bool):
        raise TypeError("delta must be True or False")
    if isinstance(delta_cache_bytes, bool) or not isinstance(delta_cache_bytes, int) or delta_cache_bytes < 0:
        raise ValueError(f"delta_cache_bytes must be an int >= 0, got {delta_cache_bytes!r}")
    if isinstance(streams, bool) or not isinstance(streams, int) or not 1 <= streams <= P.MAX_STREAMS:
        raise ValueError(f"streams must be an int from 1 to {P.MAX_STREAMS}, got {streams!r}")
    if delta and mode in ("stopcopy", "postcopy"):
        raise ValueError(f"delta=True needs pre-copy rounds (mode precopy or hybrid); mode {mode!r} sends no page twice")
    if streams > 1 and mode == "postcopy":
        raise ValueError("streams > 1 carry pre-copy pages; mode 'postcopy' sends its pages on the main connection")
    can_postcopy = mode in ("postcopy", "hybrid") or on_stall == "postcopy"
    if postcopy_bandwidth_limit is not None and not can_postcopy:
        raise ValueError(f"postcopy_bandwidth_limit has no effect: mode {mode!r} with on_stall={on_stall!r} never post-copies")
    if scheme == "file":
        conflicts = [
            name
            for name, bad in (
                ("compress", compress is not None),
                ("delta=True", delta),
                ("streams > 1", streams > 1),
                ("tls", tls is not None),
                ("token", token is not None),
                (f"mode={mode!r}", mode in ("postcopy", "hybrid")),
                ("on_stall='postcopy'", on_stall == "postcopy"),
            )
            if bad
        ]
        if conflicts:
            raise ValueError(
                f"file:// shared storage does not support {', '.join(conflicts)}: pages are written in place on a "
                "file system both hosts mount, with no live destination to negotiate with"
            )
    if scheme == "unix" and tls is not None:
        raise ValueError("unix:// connections stay on this host and have no host name to check: tls needs tcp://")


class Listener:
    """A bound destination address that receives migrations, one per :meth:`receive` call.

    A failed or refused migration raises from that :meth:`receive` call only;
    the next call serves the next connection.
    """

    def __init__(
        self,
        address: str,
        *,
        max_bytes: int | None = None,
        compat: str | None = None,
        timeout: float | None = None,
        page_size: int | None = None,
        max_state_bytes: int = P.DEFAULT_MAX_STATE,
        max_payload: int = P.DEFAULT_MAX_PAYLOAD,
        tls: ssl.SSLContext | None = None,
        token: str | bytes | None = None,
        insecure: bool = False,
    ) -> None:
        if max_bytes is not None and (isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or max_bytes <= 0):
            raise ValueError(f"max_bytes must be a positive int or None, got {max_bytes!r}")
        if compat is not None and not isinstance(compat, str):
            raise TypeError("compat must be a str or None")
        if not isinstance(max_state_bytes, int) or max_state_bytes < 0:
            raise ValueError("max_state_bytes must be an int >= 0")
        if not isinstance(max_payload, int) or not 4096 <= max_payload <= 1 << 30:
            raise ValueError("max_payload must be an int from 4096 to 1 GiB")
        self.timeout = _check_timeout("timeout", timeout)
        token_bytes = check_token(token)
        self._tls = check_tls(tls, server=True)
        addr = parse_address(address)
        if addr.scheme == "file" and (tls is not None or token is not None):
            raise ValueError("file:// shared storage takes no tls or token: the file system's permissions decide")
        if addr.scheme == "unix" and tls is not None:
            raise ValueError("unix:// connections stay on this host: tls needs tcp://")
        if addr.scheme == "tcp" and not is_loopback(addr.host) and tls is None and token is None and not insecure:
            # DESIGN.md rule 5: a destination reachable from another host authenticates its peer
            raise ValueError(
                f"refusing to listen on {addr.host}, reachable from other hosts, without tls= or token=; "
                "pass insecure=True (CLI --insecure) to accept unauthenticated sources"
            )
        self._opts = DestinationOptions(
            max_bytes=max_bytes,
            compat=compat,
            page_size=page_size,
            max_state_bytes=max_state_bytes,
            max_payload=max_payload,
            token=token_bytes,
        )
        self._path = addr.path if addr.scheme == "file" else None
        self._server = Server(address) if self._path is None else None

    @property
    def address(self) -> str:
        """The bound address, usable by :func:`migrate` (the real port when 0 was asked)."""
        if self._server is None:
            return f"file://{self._path}"
        return self._server.address

    def _accept(self, timeout: float | None) -> Connection:
        assert self._server is not None
        conn = self._server.accept(timeout)
        if self._tls is not None:
            conn = secure_server(conn, self._tls, timeout)
        return conn

    def receive(self, timeout: float | None = None) -> Received:
        """Accept the next source and receive its migration; returns when the program may resume.

        ``timeout`` (default: the listener's) is the longest wait for a source
        to connect or for its next frame. Pre-copy and stop-and-copy return a
        complete, verified region; post-copy returns at the switch, with the
        remaining pages arriving in the background (see :class:`Received`).
        """
        timeout = _check_timeout("timeout", timeout) if timeout is not None else self.timeout
        if self._path is not None:
            return receive_file(self._path, self._opts, timeout)
        conn = self._accept(timeout)
        return Destination(conn, self._opts, lambda: self._accept(timeout)).run()

    def close(self) -> None:
        """Stop listening and release the address."""
        if self._server is not None:
            self._server.close()

    def __enter__(self) -> Listener:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<migcore.Listener {self.address}>"


def listen(
    address: str,
    *,
    max_bytes: int | None = None,
    compat: str | None = None,
    timeout: float | None = None,
    page_size: int | None = None,
    max_state_bytes: int = P.DEFAULT_MAX_STATE,
    tls: ssl.SSLContext | None = None,
    token: str | bytes | None = None,
    insecure: bool = False,
) -> Listener:
    """Bind ``address`` (``tcp://HOST:PORT``, port 0 picks one, ``unix:///PATH`` or ``file:///PATH``) and return a :class:`Listener`.

    ``max_bytes`` caps the region size a source may send, ``compat`` must
    equal the source's compat string, ``page_size`` (if given) must equal the
    source's, ``max_state_bytes`` caps the state blob, and ``timeout`` is the
    default longest wait for a source in :meth:`Listener.receive`.

    ``tls`` (a server ``ssl.SSLContext``; set ``verify_mode=CERT_REQUIRED``
    and load a CA for mutual authentication) and ``token`` (a shared secret,
    proven by HMAC challenge-response before anything else) authenticate the
    source. A tcp address that is not loopback is refused without one of them
    unless ``insecure=True``.

    ``file:///PATH`` reads a shared-storage migration: :meth:`Listener.receive`
    waits for the source's manifest, loads pages as the rounds are written
    (during pre-copy already), verifies every page against the manifests and
    the final digest, and returns the same :class:`Received`. A truncated or
    tampered file raises :class:`ProtocolError` or :class:`VerificationError`.
    """
    return Listener(
        address,
        max_bytes=max_bytes,
        compat=compat,
        timeout=timeout,
        page_size=page_size,
        max_state_bytes=max_state_bytes,
        tls=tls,
        token=token,
        insecure=insecure,
    )
