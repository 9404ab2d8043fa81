"""What a destination hands the program: :class:`Received`, and the post-copy receivers behind it.

After pre-copy or stop-and-copy everything is present and verified. After a
post-copy switch a :class:`PostcopyReceiver` runs on a background thread
until every owed page arrived and the end-to-end check passed: the
transparent one (userfaultfd, ``_uffd_postcopy``: a touch of an owed page
faults it in) or the plain one (the program asks with :meth:`Received.ensure`,
pages arrive through the same :class:`PageStore` checks as before the switch).
"""

from __future__ import annotations

import logging
import threading
from abc import ABC, abstractmethod

import numpy as np

from migcore import _kernels
from migcore import _protocol as P
from migcore._errors import MigrationError, MigrationTimeout, ProtocolError
from migcore._page_store import PageStore, end_digest
from migcore._peer_errors import error_frame_for, error_from_peer
from migcore._region import Region, U64, count_bits_in, runs_in
from migcore._stats import MigrationStats, StatsRecorder
from migcore._transport import Connection
from migcore._uffd_postcopy import UffdPostcopy

log = logging.getLogger("migcore")

#: Receive buffer of the page connection after a post-copy switch (the kernel doubles it): a demanded
#: page queues behind at most this much background data on the destination's side.
POSTCOPY_RCVBUF = 512 << 10


class PostcopyReceiver(ABC):
    """Receives the pages owed after a post-copy switch, then checks and confirms the whole region.

    The owed bitmap has a bit per page still to come; the condition guards
    it, the count and the outcome (``done``, ``error``).
    """

    transparent = False

    def __init__(self, store: PageStore, owed: U64, conn: Connection, digest: bytes) -> None:
        self.store = store
        self.region = store.region
        self.stats = store.stats
        self.owed = owed
        self.conn = conn
        self.digest = digest
        self.cond = threading.Condition()
        self.count = int(_kernels.count_bits(owed))
        self.done = False
        self.error: BaseException | None = None
        self.send_lock = threading.Lock()
        self.thread: threading.Thread | None = None

    @property
    def remaining(self) -> int:
        """Owed pages not arrived yet."""
        with self.cond:
            return self.count

    def missing_in(self, first: int, stop: int) -> int:
        with self.cond:
            return count_bits_in(self.owed, first, stop)

    @abstractmethod
    def receive_all(self) -> P.Header:
        """Receive owed pages until the source's END; return END's header."""

    @abstractmethod
    def ensure(self, first: int, stop: int, timeout: float | None) -> None:
        """Block until pages ``[first, stop)`` are present, asking the source for them first."""

    def start(self, name: str) -> None:
        self.thread = threading.Thread(target=self.run, name=name, daemon=True)
        self.thread.start()

    def run(self) -> None:
        """Background thread: receive, verify (rule 2), confirm; keep what arrived on any failure."""
        try:
            end = self.receive_all()
            self.store.verify(end_digest(end, self.digest, self.conn))  # POSTCOPY's digest, or END's when deferred
            with self.send_lock:
                self.conn.send_all(P.encode_header(P.Frame.DONE), "sending DONE")
        except BaseException as exc:  # noqa: BLE001 - stored and re-raised by wait()/ensure()
            frame = None if self.conn.closed else error_frame_for(exc)
            with self.send_lock:
                if frame is not None:
                    self.conn.abort_soon(frame)
                else:
                    self.conn.close()
            self.stats.finish("failed", str(exc))
            log.warning("destination: post-copy failed after the switch, keeping what arrived: %r", exc)
            with self.cond:
                self.error = exc
                self.done = True
                self.cond.notify_all()
            return
        self.conn.close()
        self.stats.completed()
        log.info("destination: post-copy migration %s complete and verified", self.stats.migration_id)
        with self.cond:
            self.done = True
            self.cond.notify_all()

    def raise_error(self) -> None:
        err = self.error
        if err is None:
            return
        if isinstance(err, MigrationError):
            raise type(err)(str(err)) from err
        raise MigrationError(f"post-copy failed: {err!r}") from err

    def wait(self, timeout: float | None) -> None:
        with self.cond:
            if not self.cond.wait_for(lambda: self.done, timeout):
                raise MigrationTimeout(f"{self.remaining} pages still owed after {timeout:g} s")
            self.raise_error()
        if self.thread is not None:
            self.thread.join()


class PlainPostcopy(PostcopyReceiver):
    """Owed pages arrive through :class:`PageStore`; the program asks for a range with DEMAND frames."""

    def check_owed(self, runs: U64) -> None:
        with self.cond:
            for first, count in runs.tolist():
                if count_bits_in(self.owed, first, first + count) != count:
                    raise ProtocolError(f"post-copy pages {first}..{first + count - 1} were not owed (or arrived twice)")

    def receive_all(self) -> P.Header:
        ps = self.region.page_size
        while True:
            header = P.decode_header(self.conn.recv_exact(P.HEADER_SIZE, "waiting for post-copy pages"))
            P.expect(header, (P.Frame.PAGES, P.Frame.END, P.Frame.ERROR), "post-copy")
            if header.type is P.Frame.END:
                if self.remaining:
                    raise ProtocolError(f"the source ended post-copy with {self.remaining} pages still owed")
                return header
            if header.type is P.Frame.ERROR:
                body = bytes(self.conn.recv_exact(P.check_length(header, P.MAX_CONTROL_BODY), "reading ERROR"))
                raise error_from_peer(*P.decode_error(body), "the source")
            runs = self.store.receive(header, 0, self.conn, check_owed=self.check_owed)
            with self.cond:
                for first, count in runs.tolist():
                    _kernels.clear_bits(self.owed, first, first + count)
                self.count -= int(runs[:, 1].sum())
                self.stats.update(remaining_bytes=self.count * ps)
                self.cond.notify_all()

    def ensure(self, first: int, stop: int, timeout: float | None) -> None:
        owed = self.owed
        runs = np.empty((P.MAX_RUNS, 2), dtype=np.uint64)
        with self.cond:
            if count_bits_in(owed, first, stop) == 0:
                return  # present pages stay usable even after a failure
            if self.error is not None:
                self.raise_error()
            frames = []
            cursor = first
            while cursor < stop:
                n = runs_in(owed, cursor, stop, runs)
                if n == 0:
                    break
                frames.append(P.encode_runs_header(P.Frame.DEMAND, runs[:n], 0))
                cursor = int(runs[n - 1, 0] + runs[n - 1, 1])
                if n < len(runs):
                    break
        try:
            with self.send_lock:
                for frame in frames:
                    self.conn.send_all(frame, "sending DEMAND")
        except MigrationError:
            pass  # the background thread sees the broken link too and records the error
        self.stats.add(postcopy_requests=len(frames))
        with self.cond:
            ok = self.cond.wait_for(lambda: self.error is not None or count_bits_in(owed, first, stop) == 0, timeout)
            if self.error is not None and count_bits_in(owed, first, stop):
                self.raise_error()
            if not ok:
                raise MigrationTimeout(f"pages {first}..{stop - 1} did not arrive within {timeout:g} s")


class TransparentPostcopy(PostcopyReceiver):
    """Owed pages fault in on first touch: the no-GIL userfaultfd loop of ``_uffd_postcopy`` receives them."""

    transparent = True

    def __init__(self, store: PageStore, owed: U64, conn: Connection, digest: bytes, uffd: UffdPostcopy) -> None:
        super().__init__(store, owed, conn, digest)
        self.uffd = uffd

    @property
    def remaining(self) -> int:
        return self.uffd.remaining

    def receive_all(self) -> P.Header:
        try:
            # the whole post-copy, in a loop that never takes the GIL
            return self.uffd.serve(self.conn, self.store.table, self.store.max_payload, self.stats)
        finally:
            self.uffd.close()

    def ensure(self, first: int, stop: int, timeout: float | None) -> None:
        # a prefetch: ask for the whole range at once, then wait by touching it
        self.uffd.ensure(first, stop)
        if count_bits_in(self.owed, first, stop):  # the link broke: the loop unregistered the region
            with self.cond:
                self.cond.wait_for(lambda: self.done)
                self.raise_error()

    def start(self, name: str) -> None:
        super().start(name)
        assert self.thread is not None
        # the region must not reach the program before the loop runs without the GIL
        self.uffd.wait_ready(self.thread.is_alive)


def start_postcopy(store: PageStore, owed: U64, conn: Connection, digest: bytes) -> PostcopyReceiver:
    """Take over the connection after the POSTCOPY frame: confirm the switch, then receive in the background."""
    # with userfaultfd, any touch of an owed page fetches it: the program needs no ensure()
    uffd = UffdPostcopy.attach(store.region, owed, conn, written=store.written)
    receiver: PostcopyReceiver = (
        PlainPostcopy(store, owed, conn, digest) if uffd is None else TransparentPostcopy(store, owed, conn, digest, uffd)
    )
    # demand latency: a small receive window keeps few background pages queued ahead of a demanded one
    conn.bound_queue(recv=POSTCOPY_RCVBUF)
    conn.send_all(P.encode_header(P.Frame.SWITCHED), "sending SWITCHED")
    store.stats.update(status="postcopy-active", remaining_bytes=receiver.count * store.region.page_size)
    log.info("destination: post-copy switch, %d pages owed", receiver.count)
    receiver.start(f"migcore-postcopy-{store.stats.migration_id[:8]}")
    return receiver


class Received:
    """A migrated region and state on the destination; the program may resume with them.

    After a pre-copy or stop-and-copy migration everything is present and
    verified. After a post-copy switchover the pages still owed arrive in the
    background: call :meth:`ensure` before touching a range (it asks the
    source for those pages first) and :meth:`wait` to block until all arrived
    and the region is verified. On Linux with userfaultfd (a region from
    ``Region.allocate``, pages of at least 4 KiB) the region is usable at once:
    touching an owed page blocks only that thread until the page arrives, and
    :meth:`ensure` is merely a prefetch; after a failure, pages still owed
    read as zeros. (A thread that holds the GIL and touches an owed page
    stalls every Python thread of this process until the page arrives, so a
    source running in the same process must be fed through :meth:`ensure`.) If the link breaks after the switch, what
    arrived stays in :attr:`region` and :meth:`wait`/:meth:`ensure` raise
    :class:`PeerLostError`.
    """

    def __init__(
        self, region: Region, state: bytes, stats: StatsRecorder, mode: str, postcopy: PostcopyReceiver | None = None
    ) -> None:
        self.region = region
        self.state = state
        self.mode = mode
        self._stats = stats
        self._postcopy = postcopy

    @property
    def stats(self) -> MigrationStats:
        """The destination's view of the migration (a fresh snapshot on every access)."""
        return self._stats.snapshot()

    @property
    def migration_id(self) -> str:
        return self._stats.migration_id

    @property
    def missing_pages(self) -> int:
        """Pages still owed by the source (post-copy); 0 once everything arrived."""
        return 0 if self._postcopy is None else self._postcopy.remaining

    @property
    def transparent(self) -> bool:
        """True when owed pages arrive on first touch (userfaultfd); False when the program calls :meth:`ensure`."""
        return self._postcopy is not None and self._postcopy.transparent

    def _pages_of(self, offset: int, length: int) -> tuple[int, int]:
        """The pages ``[first, stop)`` holding bytes ``[offset, offset + length)``; ValueError outside the region."""
        if offset < 0 or length < 0 or offset + length > self.region.nbytes:
            raise ValueError(f"byte range [{offset}, {offset + length}) outside the region's {self.region.nbytes} bytes")
        ps = self.region.page_size
        return offset // ps, (offset + length - 1) // ps + 1 if length else offset // ps

    def missing_in(self, offset: int, length: int) -> int:
        """How many pages of bytes ``[offset, offset + length)`` are still owed by the source (0: all present)."""
        first, stop = self._pages_of(offset, length)
        if first == stop or self._postcopy is None:
            return 0
        return self._postcopy.missing_in(first, stop)

    def wait(self, timeout: float | None = None) -> None:
        """Block until every page is present and verified (post-copy); return at once otherwise."""
        if self._postcopy is not None:
            self._postcopy.wait(timeout)

    def ensure(self, offset: int, length: int, timeout: float | None = None) -> None:
        """Block until bytes ``[offset, offset + length)`` are present, asking the source for them first."""
        first, stop = self._pages_of(offset, length)
        if first == stop or self._postcopy is None:
            return
        self._postcopy.ensure(first, stop, timeout)

    def __repr__(self) -> str:
        return f"<migcore.Received {self.region.nbytes} bytes, {len(self.state)} state bytes, {self.missing_pages} pages owed>"
