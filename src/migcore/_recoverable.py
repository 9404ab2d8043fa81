"""Post-copy migrations of this process that lost their link after the switch, waiting to be recovered.

Each is remembered by its id with the digest of the source's whole table at
the pause, so that a recovery can tell the buffer it is given is still the
one that was paused (resending from a changed buffer would hand the
destination bytes the program never had).
"""

from __future__ import annotations

import threading

from migcore._errors import MigrationError

#: migration id -> digest of the frozen table
PAUSED: dict[bytes, bytes] = {}
_LOCK = threading.Lock()


def remember(mid: bytes, digest: bytes) -> None:
    with _LOCK:
        PAUSED[mid] = digest


def check_unchanged(mid: bytes, digest: bytes) -> None:
    """Refuse a recovery from a buffer that differs from the one paused (when this process paused it)."""
    with _LOCK:
        known = PAUSED.get(mid)
    if known is not None and known != digest:
        raise MigrationError(
            f"the buffer changed since migration {mid.hex()} paused: recovering would hand the "
            "destination bytes the program never had at its pause"
        )


def forget(mid: bytes) -> None:
    with _LOCK:
        PAUSED.pop(mid, None)
