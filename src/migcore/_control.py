"""The link between a :class:`migcore.Migration` handle and the engine running its migration.

:func:`migcore.start` runs :func:`migcore.migrate` on a thread of its own;
the engine on that thread finds the handle's :class:`Control` here (a
thread-local, so ``migrate()``'s keyword list stays the one definition of
its options), publishes its statistics to it and looks at its cancel flag at
every progress point before the pause.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

from migcore._stats import MigrationStats, StatsRecorder


class Control:
    """A cancel request one way, the live statistics the other."""

    def __init__(self) -> None:
        self.cancel_requested = threading.Event()
        self._paused = False
        self._recorder: StatsRecorder | None = None
        self._lock = threading.Lock()

    def request_cancel(self) -> bool:
        """Ask for a cancel; False once the program was paused (the switchover is then never undone)."""
        with self._lock:
            if self._paused:
                return False
            self.cancel_requested.set()
            return True

    def enter_pause(self) -> bool:
        """The engine is about to pause the program: False if a cancel came first (then it must not)."""
        with self._lock:
            if self.cancel_requested.is_set():
                return False
            self._paused = True
            return True

    def attach(self, recorder: StatsRecorder) -> None:
        """The engine's recorder (the newest one: a migration has one)."""
        with self._lock:
            self._recorder = recorder

    def snapshot(self) -> MigrationStats | None:
        """The statistics so far, or None before the engine started."""
        with self._lock:
            recorder = self._recorder
        return None if recorder is None else recorder.snapshot()


_CURRENT = threading.local()


def current() -> Control | None:
    """The control of the migration running on this thread, if a handle started it."""
    control: Control | None = getattr(_CURRENT, "control", None)
    return control


@contextmanager
def running(control: Control) -> Iterator[None]:
    """Make ``control`` this thread's for the duration of one migration."""
    _CURRENT.control = control
    try:
        yield
    finally:
        _CURRENT.control = None
