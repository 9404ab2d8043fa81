"""A migration running in the background: :func:`start` returns a :class:`Migration` handle.

``migrate()`` blocks its caller; an operator's tool, a service or a test
wants to start one, watch its statistics, cancel it and wait for it from
other threads. :func:`start` takes exactly ``migrate()``'s arguments (its
signature is derived from ``migrate``'s, so the two cannot drift apart) and
runs it on a thread of its own.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable
from typing import Any, Concatenate, ParamSpec

from migcore import _control
from migcore._api import migrate
from migcore._errors import MigrationTimeout
from migcore._stats import MigrationStats
from migcore.options import MigrationOptions

_P = ParamSpec("_P")


class Migration:
    """A handle on one migration started by :func:`start`.

    ``stats`` reads the live statistics (``None`` until the engine has
    started), ``cancel()`` asks it to stop, ``result(timeout)`` waits for the
    final statistics or raises what :func:`migrate` raised.
    """

    def __init__(self, run: Callable[[], MigrationStats]) -> None:
        self._control = _control.Control()
        self._done = threading.Event()
        self._result: MigrationStats | None = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(run,), name="migcore-migration", daemon=True)
        self._thread.start()

    def _run(self, run: Callable[[], MigrationStats]) -> None:
        try:
            with _control.running(self._control):
                self._result = run()
        except BaseException as exc:  # handed to whoever calls result()
            self._error = exc
        finally:
            self._done.set()

    @property
    def stats(self) -> MigrationStats | None:
        """The statistics so far (the final ones once it ended); None before it started."""
        if self._done.is_set() and self._result is not None:
            return self._result
        return self._control.snapshot()

    def done(self) -> bool:
        """True once the migration ended, whichever way."""
        return self._done.is_set()

    def cancel(self) -> bool:
        """Ask the migration to stop; True if it will end cancelled, False if it is past that point.

        Before the pause a cancel takes effect at the next progress point (a
        batch, a round): the source stays untouched, the destination discards
        what it received, and :meth:`result` raises
        :class:`MigrationCancelled`. Once the program was paused the
        switchover is moments away and the migration finishes as it would
        have: False (DESIGN.md rule 3 is never bent by a cancel).
        """
        if self._done.is_set():
            return False
        return self._control.request_cancel()

    def result(self, timeout: float | None = None) -> MigrationStats:
        """Wait for the end and return the final statistics, or raise what the migration raised.

        Raises :class:`MigrationTimeout` if it is still running after
        ``timeout`` seconds (the migration itself goes on).
        """
        if not self._done.wait(timeout):
            raise MigrationTimeout(f"the migration is still running after {timeout:g} s")
        if self._error is not None:
            raise self._error
        assert self._result is not None
        return self._result

    def __repr__(self) -> str:
        stats = self.stats
        return f"<migcore.Migration {stats.status if stats is not None else 'starting'}>"


def _in_background(
    run: Callable[Concatenate[Any, str, _P], MigrationStats],
) -> Callable[Concatenate[Any, str, _P], Migration]:
    @functools.wraps(run)
    def start(source: Any, address: str, /, *args: _P.args, **kwargs: _P.kwargs) -> Migration:
        keywords: dict[str, Any] = dict(kwargs)  # migrate() takes nothing positional after the address
        MigrationOptions(**keywords).validate(address)  # a refused option raises here, not later
        return Migration(lambda: run(source, address, *args, **kwargs))

    return start


start = _in_background(migrate)
start.__name__ = start.__qualname__ = "start"
start.__doc__ = """Start :func:`migrate` with the same arguments on a thread of its own and return its :class:`Migration`.

Options are checked at once (``ValueError``/``TypeError`` from this call,
as from ``migrate()``); every later failure raises from
:meth:`Migration.result`.
"""
