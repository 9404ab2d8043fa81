"""The migrations whose source runs in this process right now.

A destination in the same process must not let a thread fault on an owed
page while it holds the GIL: the source's post-copy push needs the GIL to
send that page. The destination asks :func:`is_source` at the switch and
receives without userfaultfd when the answer is yes.
"""

from __future__ import annotations

import threading

_lock = threading.Lock()
_sources: set[bytes] = set()


def add_source(migration_id: bytes) -> None:
    with _lock:
        _sources.add(migration_id)


def remove_source(migration_id: bytes) -> None:
    with _lock:
        _sources.discard(migration_id)


def is_source(migration_id: bytes) -> bool:
    with _lock:
        return migration_id in _sources
