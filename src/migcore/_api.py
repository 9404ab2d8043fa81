"""The public entry points: ``migrate()`` on the source, ``listen()``/``Listener.receive()`` on the destination."""

from __future__ import annotations

import logging
import threading
import ssl
from collections.abc import Callable
from types import TracebackType
from typing import Any

from migcore import _protocol as P
from migcore._delta import DEFAULT_CACHE_BYTES
from migcore._destination import Destination, recover_reception
from migcore._intake import Intake
from migcore._received import PostcopyReceiver, Received
from migcore._handshake import DestinationOptions
from migcore._region import Region, RegionSource
from migcore._batch import BatchEncoder
from migcore._codecs import get_codec
from migcore._file_receive import receive_file
from migcore._socket_link import SocketLink
from migcore._source import LinkFactory, Source, SourceOptions
from migcore._source_link import SourceLink
from migcore._stats import MigrationStats
from migcore._stats import StatsRecorder
from migcore._trackers import resolve_tracker
from migcore._storage import FileLink
from migcore._transport import Connection, Server, connect, parse_address
from migcore.options import (
    Codec,
    ListenOptions,
    MigrationOptions,
    Mode,
    OnStall,
    TrackerChoice,
    check_timeout,
    document_refusals,
)

__all__ = ["Listener", "Received", "listen", "migrate", "recover"]

log = logging.getLogger("migcore")

def migrate(
    source: RegionSource,
    address: str,
    *,
    mode: Mode = "precopy",
    state: bytes | Callable[[], bytes] = b"",
    pause: Callable[[], object] | None = None,
    tracker: TrackerChoice = "auto",
    downtime_limit: float = 0.3,
    max_rounds: int = 30,
    timeout: float | None = None,
    compat: str | None = None,
    progress: Callable[[MigrationStats], object] | None = None,
    on_stall: OnStall | None = None,
    throttle: Callable[[int], object] | None = None,
    resume: Callable[[], object] | None = None,
    compress: Codec | None = None,
    delta: bool = False,
    delta_cache_bytes: int = DEFAULT_CACHE_BYTES,
    tls: ssl.SSLContext | None = None,
    token: str | bytes | None = None,
    bandwidth_limit: float | None = None,
    postcopy_bandwidth_limit: float | None = None,
    streams: int = 1,
    connect_timeout: float | None = None,
    insecure: bool = False,
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

    A ``tcp://`` destination off this host is refused without ``tls`` or
    ``token`` (nothing would prove who receives the memory) unless
    ``insecure=True``.

    ``connect_timeout`` (seconds) waits for a destination that does not
    listen yet: a refused connection is retried with backoff until then
    (default: fail at once). ``timeout`` still bounds each attempt.

    Addresses: ``tcp://HOST:PORT``, ``unix:///PATH``, or ``file:///PATH`` for
    shared storage (pages written at page index x page size into PATH, with
    manifests in ``PATH.manifest``; see :func:`listen`).

    Combinations that make no sense are refused with ``ValueError`` before
    any connection:

    <refused combinations>

    ``tracker`` finds the pages dirtied between pre-copy rounds: ``"hash"``
    (any buffer), ``"writes"`` (only what the program marks), ``"uffd"`` (the
    kernel sees every write; Linux >= 6.7 and a region from
    ``Region.allocate``), or ``"auto"``: uffd where possible, else hash.

    The keywords are those of :class:`migcore.options.MigrationOptions`, which
    checks them (the names of modes, trackers, codecs and stall policies are
    ``Literal`` types there, so a misspelt one fails a type checker too).

    Returns the final :class:`MigrationStats`.
    """
    options = MigrationOptions(
        mode=mode,
        state=state,
        pause=pause,
        tracker=tracker,
        downtime_limit=downtime_limit,
        max_rounds=max_rounds,
        timeout=timeout,
        compat=compat,
        progress=progress,
        on_stall=on_stall,
        throttle=throttle,
        resume=resume,
        compress=compress,
        delta=delta,
        delta_cache_bytes=delta_cache_bytes,
        tls=tls,
        token=token,
        bandwidth_limit=bandwidth_limit,
        postcopy_bandwidth_limit=postcopy_bandwidth_limit,
        streams=streams,
        connect_timeout=connect_timeout,
        insecure=insecure,
    )
    addr = options.validate(address)
    region = source if isinstance(source, Region) else Region(source)
    if mode in ("precopy", "hybrid"):  # the modes with rounds use a tracker; "uffd" unavailable raises here
        tracker_name = resolve_tracker(tracker, region)
    else:
        tracker_name = "hash" if tracker == "auto" else tracker
    opts = SourceOptions(
        mode=options.mode,
        tracker=tracker_name,
        downtime_limit=float(options.downtime_limit),
        max_rounds=options.max_rounds,
        timeout=options.timeout,
        compat=options.compat,
        on_stall=options.stall_policy,
        state=options.state,
        pause=options.pause,
        resume=options.resume,
        throttle=options.throttle,
        progress=options.progress,
        compress=options.compress,
        delta=options.delta,
        delta_cache_bytes=options.delta_cache_bytes,
        token=options.token_bytes,
        bandwidth_limit=options.bandwidth_limit,
        postcopy_bandwidth_limit=options.postcopy_bandwidth_limit,
        streams=options.streams,
    )
    if addr.scheme == "file":
        log.info("source: migrating %d bytes to shared storage %s (%s)", region.nbytes, addr.path, mode)
    else:
        log.info("source: migrating %d bytes to %s (%s, tracker %s)", region.nbytes, address, mode, tracker_name)
    link = _link_factory(address, opts, options.timeout, options.tls, options.connect_timeout)
    return Source(region, opts, link).run()


def recover(
    source: RegionSource,
    address: str,
    migration_id: str,
    *,
    timeout: float | None = None,
    compat: str | None = None,
    progress: Callable[[MigrationStats], object] | None = None,
    tls: ssl.SSLContext | None = None,
    token: str | bytes | None = None,
    postcopy_bandwidth_limit: float | None = None,
    connect_timeout: float | None = None,
    insecure: bool = False,
) -> MigrationStats:
    """Continue a post-copy migration whose link was lost after the switch.

    ``source`` is the buffer (or :class:`Region`) that :func:`migrate` was
    moving, untouched since its pause; ``migration_id`` is the
    :attr:`PeerLostError.migration_id` it raised. The destination's listener
    must still be open: it holds the reception paused and tells this side
    which pages it still lacks; they are sent again (demanded ones first),
    the whole table is checked end to end, and the destination's
    :meth:`Received.wait` returns. Connection options (``tls``, ``token``,
    ``compat``, ``timeout``) are those of :func:`migrate` and must match the
    destination's as they did then. A lost link raises :class:`PeerLostError`
    again and both sides stay paused: call :func:`recover` once more.
    Refused (typed, nothing changed) when the destination has no paused
    reception of that id or anything differs. ``connect_timeout`` waits for
    a destination that is being restarted, as in :func:`migrate`.
    """
    try:
        mid = bytes.fromhex(migration_id)
    except (TypeError, ValueError):
        raise ValueError(f"migration_id must be the 32 hex digits of a PeerLostError.migration_id, got {migration_id!r}") from None
    if len(mid) != 16:
        raise ValueError(f"migration_id must be 32 hex digits, got {len(migration_id)} characters")
    options = MigrationOptions(
        mode="postcopy", timeout=timeout, compat=compat, progress=progress, tls=tls, token=token,
        postcopy_bandwidth_limit=postcopy_bandwidth_limit, connect_timeout=connect_timeout, insecure=insecure,
    )
    options.validate(address)
    region = source if isinstance(source, Region) else Region(source)
    opts = SourceOptions(
        mode="postcopy",
        tracker="hash",
        downtime_limit=float(options.downtime_limit),
        max_rounds=options.max_rounds,
        timeout=options.timeout,
        compat=options.compat,
        on_stall=options.stall_policy,
        state=b"",
        pause=None,
        resume=None,
        throttle=None,
        progress=options.progress,
        token=options.token_bytes,
        postcopy_bandwidth_limit=options.postcopy_bandwidth_limit,
    )
    log.info("source: recovering migration %s to %s", migration_id, address)
    link = _link_factory(address, opts, options.timeout, options.tls, options.connect_timeout)
    return Source(region, opts, link, migration_id=mid).recover()


def _link_factory(
    address: str, opts: SourceOptions, timeout: float | None, tls: ssl.SSLContext | None, wait: float | None = None
) -> LinkFactory:
    """The link an address scheme calls for: shared storage for ``file://``, a connection otherwise.

    ``wait`` is ``connect_timeout``: only the first connection waits for the
    destination to listen; the extra streams join one that already does.
    """
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
            connect(address, timeout, tls, wait=wait),
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


migrate.__doc__ = document_refusals(migrate.__doc__)


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
        self._start(
            address,
            ListenOptions(
                max_bytes=max_bytes,
                compat=compat,
                timeout=timeout,
                page_size=page_size,
                max_state_bytes=max_state_bytes,
                max_payload=max_payload,
                tls=tls,
                token=token,
                insecure=insecure,
            ),
        )

    @classmethod
    def _open(cls, address: str, options: ListenOptions) -> Listener:
        """A listener on ``address`` with ``options`` already checked (what :func:`listen` calls)."""
        listener = cls.__new__(cls)
        listener._start(address, options)
        return listener

    def _start(self, address: str, options: ListenOptions) -> None:
        addr = options.validate(address)
        self._options = options
        self.timeout = options.timeout
        self._tls = options.tls
        self._opts = DestinationOptions(
            max_bytes=options.max_bytes,
            compat=options.compat,
            page_size=options.page_size,
            max_state_bytes=options.max_state_bytes,
            max_payload=options.max_payload,
            token=options.token_bytes,
        )
        self._path = addr.path if addr.scheme == "file" else None
        self._server = Server(address) if self._path is None else None
        self._intake = (
            Intake(self._server, self._tls, self._opts.token, self.timeout) if self._server is not None else None
        )
        #: post-copy receptions handed out that a recovering source may continue
        self._receptions: dict[bytes, PostcopyReceiver] = {}
        self._lock = threading.Lock()

    @property
    def address(self) -> str:
        """The bound address, usable by :func:`migrate` (the real port when 0 was asked)."""
        if self._server is None:
            return f"file://{self._path}"
        return self._server.address

    def _next(self, timeout: float | None) -> tuple[Connection, P.Header, bytes]:
        assert self._intake is not None
        return self._intake.next(timeout)

    def receive(self, timeout: float | None = None) -> Received:
        """Accept the next source and receive its migration; returns when the program may resume.

        ``timeout`` (default: the listener's) is the longest wait for a source
        to connect or for its next frame. Pre-copy and stop-and-copy return a
        complete, verified region; post-copy returns at the switch, with the
        remaining pages arriving in the background (see :class:`Received`).
        While the listener stays open it also accepts, in the background, a
        source that recovers one of its post-copy receptions after a lost
        link (:func:`migcore.recover`).
        """
        timeout = check_timeout("timeout", timeout) if timeout is not None else self.timeout
        if self._path is not None:
            return receive_file(self._path, self._opts, timeout)
        conn, header, body = self._next(timeout)
        received = Destination(conn, self._opts, (header, body), lambda: self._next(timeout)).run()
        if received._postcopy is not None:
            self._keep(received._postcopy)
        return received

    def _keep(self, receiver: PostcopyReceiver) -> None:
        """Remember a post-copy reception, and accept recovering sources from now on."""
        assert receiver.hello is not None and self._intake is not None
        with self._lock:
            for mid in [m for m, r in self._receptions.items() if r.done]:
                del self._receptions[mid]
            self._receptions[receiver.hello.migration_id] = receiver
        self._intake.route(P.Frame.RECOVER, self._recover)

    def _find(self, migration_id: bytes) -> PostcopyReceiver | None:
        with self._lock:
            receiver = self._receptions.get(migration_id)
        return None if receiver is None or receiver.done else receiver

    def _recover(self, conn: Connection, header: P.Header, body: bytes) -> None:
        recover_reception(conn, header, body, self._find, self._opts)

    def close(self) -> None:
        """Stop listening and release the address (a paused reception can then only be abandoned)."""
        if self._server is not None:
            self._server.close()
        if self._intake is not None:
            self._intake.close()

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
    max_payload: int = P.DEFAULT_MAX_PAYLOAD,
    tls: ssl.SSLContext | None = None,
    token: str | bytes | None = None,
    insecure: bool = False,
) -> Listener:
    """Bind ``address`` (``tcp://HOST:PORT``, port 0 picks one, ``unix:///PATH`` or ``file:///PATH``) and return a :class:`Listener`.

    ``max_bytes`` caps the region size a source may send, ``compat`` must
    equal the source's compat string, ``page_size`` (if given) must equal the
    source's, ``max_state_bytes`` caps the state blob, ``max_payload`` the
    body of one frame (4 KiB to 1 GiB), and ``timeout`` is the default longest
    wait for a source in :meth:`Listener.receive`. The options are those of
    :class:`migcore.options.ListenOptions`, checked there.

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
    return Listener._open(
        address,
        ListenOptions(
            max_bytes=max_bytes,
            compat=compat,
            timeout=timeout,
            page_size=page_size,
            max_state_bytes=max_state_bytes,
            max_payload=max_payload,
            tls=tls,
            token=token,
            insecure=insecure,
        ),
    )
