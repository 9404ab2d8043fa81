"""The exceptions migcore raises on purpose: one base class, a few precise subclasses.

Plain argument mistakes stay ``ValueError``/``TypeError``; everything that
goes wrong between the two ends of a migration derives from
:class:`MigrationError`, so a program can catch one name.
"""

from __future__ import annotations


class MigrationError(Exception):
    """Base class of every error a migration raises on purpose."""


class ProtocolError(MigrationError):
    """The peer sent a malformed, out-of-range, oversized or out-of-order frame (or is not migcore)."""


class CompatibilityError(MigrationError):
    """The handshake refused the migration; ``field`` names what differs (``"compat"``, ``"page_size"``, ...)."""

    def __init__(self, message: str, *, field: str = "") -> None:
        super().__init__(message)
        self.field = field


class AuthenticationError(MigrationError):
    """The peer could not prove who it is (TLS or shared token; reserved for the security issue)."""


class PeerLostError(MigrationError):
    """The peer closed, reset or stopped answering the connection.

    After a post-copy switchover the source still owes pages: ``owed_pages``
    and ``owed_bytes`` say how many were not sent, and ``migration_id``
    identifies the migration so that it can be resumed. ``in_doubt`` is true
    when the link broke after the source asked the destination to commit but
    before the answer came back: the destination may or may not have resumed,
    so the source did not resume either.
    """

    def __init__(
        self,
        message: str,
        *,
        owed_pages: int = 0,
        owed_bytes: int = 0,
        migration_id: str = "",
        in_doubt: bool = False,
    ) -> None:
        super().__init__(message)
        self.owed_pages = owed_pages
        self.owed_bytes = owed_bytes
        self.migration_id = migration_id
        self.in_doubt = in_doubt


class MigrationTimeout(MigrationError, TimeoutError):
    """The peer did not connect or send the next frame within ``timeout`` seconds."""


class VerificationError(MigrationError):
    """The destination's final page hashes disagree with the source's: nothing was committed."""


class MigrationCancelled(MigrationError):
    """The migration stopped on purpose (``on_stall="cancel"`` or the source cancelled)."""
