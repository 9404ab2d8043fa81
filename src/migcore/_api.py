"""The public entry points: ``migrate()`` on the source, ``listen()``/``Listener.receive()`` on the destination."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from types import TracebackType
from typing import Any

from migcore import _protocol as P
from migcore._destination import Destination, DestinationOptions, Received
from migcore._region import Region
from migcore._source import ON_STALL, Source, SourceOptions
from migcore._stats import MigrationStats
from migcore._trackers import TRACKERS
from migcore._transport import Server, connect

__all__ = ["Listener", "Received", "listen", "migrate"]

log = logging.getLogger("migcore")

MODES = ("stopcopy", "precopy", "postcopy", "hybrid")


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
    region = source if isinstance(source, Region) else Region(source)
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
    )
    conn = connect(address, timeout)
    log.info("source: migrating %d bytes to %s (%s, tracker %s)", region.nbytes, address, mode, tracker_name)
    return Source(region, conn, opts).run()


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
        self._opts = DestinationOptions(
            max_bytes=max_bytes,
            compat=compat,
            page_size=page_size,
            max_state_bytes=max_state_bytes,
            max_payload=max_payload,
        )
        self._server = Server(address)

    @property
    def address(self) -> str:
        """The bound address, usable by :func:`migrate` (the real port when 0 was asked)."""
        return self._server.address

    def receive(self, timeout: float | None = None) -> Received:
        """Accept the next source and receive its migration; returns when the program may resume.

        ``timeout`` (default: the listener's) is the longest wait for a source
        to connect or for its next frame. Pre-copy and stop-and-copy return a
        complete, verified region; post-copy returns at the switch, with the
        remaining pages arriving in the background (see :class:`Received`).
        """
        timeout = _check_timeout("timeout", timeout) if timeout is not None else self.timeout
        conn = self._server.accept(timeout)
        return Destination(conn, self._opts).run()

    def close(self) -> None:
        """Stop listening and release the address."""
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
) -> Listener:
    """Bind ``address`` (``tcp://HOST:PORT``, port 0 picks one, or ``unix:///PATH``) and return a :class:`Listener`.

    ``max_bytes`` caps the region size a source may send, ``compat`` must
    equal the source's compat string, ``page_size`` (if given) must equal the
    source's, ``max_state_bytes`` caps the state blob, and ``timeout`` is the
    default longest wait for a source in :meth:`Listener.receive`.
    """
    return Listener(
        address,
        max_bytes=max_bytes,
        compat=compat,
        timeout=timeout,
        page_size=page_size,
        max_state_bytes=max_state_bytes,
    )
