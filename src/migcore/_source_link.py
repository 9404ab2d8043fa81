"""The source engine's view of where its migration goes: the interface every source link implements.

The engine (``_source.Source``) decides which pages to send, when to pause,
and whether the outcome is in doubt; a link decides how those pages and
decisions travel: a connection to a listening destination (``_socket_link``,
with its extra streams, encoding and bandwidth limits), or a file on shared
storage with manifests beside it (``_storage``). A link counts what it puts
on the wire in the migration's statistics; it never pauses or resumes the
program and never decides about rule 3.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

from migcore import _protocol as P
from migcore._errors import MigrationError
from migcore._region import U64


class SourceLink(ABC):
    """One migration's way to its destination, driven by the source engine in this order.

    ``open`` once; per pre-copy round ``send`` batches then ``end_round``;
    at the pause ``send`` the final pass, ``end_pages``, ``send_state``, then
    either ``commit`` + ``confirm_commit`` or ``switch`` + ``confirm_switch``
    and the post-copy calls; ``close`` at the end, ``fail`` after a failure.
    """

    @abstractmethod
    def open(self, hello: P.Hello) -> P.Accept:
        """Authenticate, announce the migration and return what the destination accepts."""

    @abstractmethod
    def batch_cap(self, *, postcopy: bool = False) -> int:
        """Largest page payload of one batch (at least one page)."""

    @abstractmethod
    def send(self, runs: U64, phase: str) -> None:
        """One batch of pages of a pre-copy round or of the final pass, read from the region now."""

    @abstractmethod
    def end_round(self, rnd: int, runs: U64, npg: int) -> U64:
        """End round ``rnd`` (``runs`` in page order, ``npg`` pages) and return the hashes the destination stored."""

    def stored(self, runs: U64, hashes: U64) -> None:
        """The destination holds these pages with these hashes (a base for delta encoding)."""

    @abstractmethod
    def end_pages(self, rnd: int, runs: U64) -> None:
        """The final pass (round ``rnd``, ``runs`` as sent) is complete: every page is on its way."""

    @abstractmethod
    def send_state(self, state: bytes) -> None:
        """The program's state blob, taken during the pause."""

    @abstractmethod
    def commit(self, digest: bytes) -> None:
        """Ask the destination to commit if its hash table has this digest (stop-and-copy, pre-copy)."""

    @abstractmethod
    def confirm_commit(self) -> None:
        """Wait until the destination committed; a lost link here leaves the outcome in doubt."""

    def switch(self, digest: bytes, owed: U64 | None) -> None:
        """Ask the destination to resume now with ``owed`` pages still to come (None: every page)."""
        raise MigrationError(f"{type(self).__name__} cannot switch to post-copy")

    def confirm_switch(self) -> None:
        """Wait until the destination resumed the program in post-copy."""
        raise MigrationError(f"{type(self).__name__} cannot switch to post-copy")

    def recover(self, hello: P.Hello) -> U64:
        """Reconnect to a paused post-copy reception of ``hello``'s migration; return the pages it still lacks."""
        raise MigrationError(f"{type(self).__name__} cannot recover a post-copy migration")

    def begin_postcopy(self) -> None:
        """The switch is confirmed: the owed pages follow, demands come back."""
        raise MigrationError(f"{type(self).__name__} cannot switch to post-copy")

    def read_demand(self) -> U64 | None:
        """The next runs the destination asks for, or None once it confirmed every page (post-copy)."""
        raise MigrationError(f"{type(self).__name__} cannot switch to post-copy")

    def send_postcopy(self, runs: U64, *, demanded: bool) -> None:
        """One batch of owed pages; ``demanded`` ones are never held back by a bandwidth limit."""
        raise MigrationError(f"{type(self).__name__} cannot switch to post-copy")

    def send_zero_notice(self, runs: U64) -> None:
        """These owed pages are all zero: the destination fills them without their bytes."""
        raise MigrationError(f"{type(self).__name__} cannot switch to post-copy")

    def end_postcopy(self, digest: bytes | None) -> None:
        """Every owed page was sent; ``digest`` is the pause's table when it was deferred to now."""
        raise MigrationError(f"{type(self).__name__} cannot switch to post-copy")

    @abstractmethod
    def fail(self, exc: BaseException, *, switched: bool) -> None:
        """Tell the destination (if it can still hear) that this migration failed with ``exc``, then close."""

    @abstractmethod
    def close(self) -> None:
        """Release everything the link holds; safe to call more than once."""

    def cause(self, exc: BaseException) -> BaseException:
        """The failure to report for ``exc``: a helper thread's, when it is why the main path broke."""
        return exc
