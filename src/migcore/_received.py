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
import time
from abc import ABC, abstractmethod

import numpy as np

from migcore import _kernels
from migcore import _postcopy_wire as PW
from migcore import _protocol as P
from migcore._errors import CompatibilityError, MigrationError, MigrationTimeout, ProtocolError, VerificationError
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

    States: ``active`` (a link delivers pages; ``recovering`` while a new
    link is told what is still owed), ``paused`` (the link was lost;
    owed pages stay missing, a thread that needs one waits), ``completed``
    (every page arrived and the digest matched), ``failed`` (the digest did
    not match, or the program called :meth:`abandon`). Only a recovered link
    (:meth:`resume`) leaves ``paused``; the library never gives pages up on
    its own. The owed bitmap has a bit per page still to come; the condition
    guards it, the count, the state and the link.
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
        self.state = "active"
        #: the terminal failure (``failed``); the cause of the last pause is in the stats' ``error``
        self.failure: BaseException | None = None
        self.next_conn: Connection | None = None
        #: increases with every recovered link (a DEMAND sent on a lost link is sent again)
        self.generation = 0
        self.paused_at = 0.0
        self.lost = 0
        self.send_lock = threading.Lock()
        self.thread: threading.Thread | None = None
        #: The HELLO of the migration (a recovering source must match it).
        self.hello: P.Hello | None = None

    @property
    def done(self) -> bool:
        return self.state in ("completed", "failed")

    @property
    def remaining(self) -> int:
        """Owed pages not arrived yet (after :meth:`abandon`: the pages lost)."""
        with self.cond:
            return self.count

    def missing_in(self, first: int, stop: int) -> int:
        with self.cond:
            return count_bits_in(self.owed, first, stop)

    @abstractmethod
    def receive_all(self) -> P.Header:
        """Receive owed pages on ``self.conn`` until the source's END; return END's header."""

    @abstractmethod
    def ensure(self, first: int, stop: int, timeout: float | None) -> None:
        """Block until pages ``[first, stop)`` are present, asking the source for them first."""

    @abstractmethod
    def give_up(self) -> int:
        """Fill the owed pages with zeros and release every waiting thread; return how many were filled."""

    def start(self, name: str) -> None:
        self.thread = threading.Thread(target=self.run, name=name, daemon=True)
        self.thread.start()

    # -- the background thread ---------------------------------------------------

    def run(self) -> None:
        """Receive, verify (rule 2), confirm; pause on a lost link and go on when it is recovered."""
        while True:
            try:
                if self.generation:
                    accept = P.Accept(P.UNKNOWN_SIZE, self.store.max_payload, P.MAX_RUNS, P.SUPPORTED_FEATURES)
                    self.conn.send_all(PW.encode_recovered(accept, self.owed_snapshot()), "sending RECOVERED")
                    with self.cond:  # only now may DEMAND frames go on the new link
                        if self.state == "recovering":
                            self.state = "active"
                        self.cond.notify_all()
                end = self.receive_all()
                self.store.verify(end_digest(end, self.digest, self.conn, recovered=self.generation > 0))
                with self.send_lock:
                    self.conn.send_all(P.encode_header(P.Frame.DONE), "sending DONE")
            except VerificationError as exc:  # every page arrived, and they are not the source's
                self.tell_peer(exc)
                self.finish("failed", exc)
                return
            except BaseException as exc:  # noqa: BLE001 - a lost or broken link: wait for a recovered one
                if not self.pause(exc):
                    return
                continue
            self.conn.close()
            self.finish("completed", None)
            return

    def owed_snapshot(self) -> U64:
        with self.cond:
            return self.owed.copy()

    def tell_peer(self, exc: BaseException) -> None:
        frame = None if self.conn.closed else error_frame_for(exc)
        with self.send_lock:
            if frame is not None:
                self.conn.abort_soon(frame)
            else:
                self.conn.close()

    def pause(self, exc: BaseException) -> bool:
        """Enter ``paused`` and wait for a recovered link (True) or the program's :meth:`abandon` (False)."""
        self.tell_peer(exc)
        with self.cond:
            if self.state == "failed":  # abandoned while the link was still up
                return False
            self.state = "paused"
            self.paused_at = time.monotonic()
            self.stats.update(status="postcopy-paused", error=str(exc))
            log.warning(
                "destination: post-copy link lost, paused with %d pages owed (migration %s): %r",
                self.remaining, self.stats.migration_id, exc,
            )
            self.cond.notify_all()
            self.cond.wait_for(lambda: self.next_conn is not None or self.state == "failed")
            if self.state == "failed":
                return False
            assert self.next_conn is not None
            self.conn, self.next_conn = self.next_conn, None
            self.generation += 1
            self.state = "recovering"
            self.stats.add(recoveries=1, paused_time=time.monotonic() - self.paused_at)
            self.stats.update(status="postcopy-active", error="")
            self.cond.notify_all()
        log.info("destination: post-copy link recovered (migration %s)", self.stats.migration_id)
        return True

    def finish(self, state: str, exc: BaseException | None) -> None:
        if exc is None:
            self.stats.completed()
            log.info("destination: post-copy migration %s complete and verified", self.stats.migration_id)
        else:
            self.stats.finish("failed", str(exc))
            log.warning("destination: post-copy failed: %r", exc)
        with self.cond:
            self.state = state
            self.failure = exc
            self.cond.notify_all()

    # -- what the program and the listener call --------------------------------------

    def interrupt(self, timeout: float | None) -> None:
        """Make a receiving receiver pause now (its link is about to be replaced or given up)."""
        running = ("active", "recovering")
        with self.cond:
            if self.state not in running:
                return
            conn = self.conn
        conn.interrupt()
        with self.cond:
            if not self.cond.wait_for(lambda: self.state not in running, timeout):
                raise MigrationTimeout("the post-copy receiver did not stop on its old link")

    def resume(self, conn: Connection, timeout: float | None = 5.0) -> None:
        """Continue on ``conn``, a recovering source's authenticated connection (after its RECOVER)."""
        self.interrupt(timeout)
        with self.cond:
            if self.state != "paused":
                raise CompatibilityError(f"migration {self.stats.migration_id} is {self.state}, not paused", field="migration_id")
            if self.next_conn is not None:
                raise CompatibilityError("another source is already recovering this migration", field="migration_id")
            self.next_conn = conn
            self.cond.notify_all()

    def abandon(self) -> int:
        """The program gives up the pages still owed: they read as zeros from now on; returns how many."""
        with self.cond:
            if self.done:
                return self.lost
        self.interrupt(None)
        with self.cond:
            if self.done:
                return self.lost
            self.lost = self.give_up()
            self.state = "failed"
            self.failure = MigrationError(
                f"post-copy abandoned by the program: {self.lost} pages the source never delivered read as zeros"
            )
            self.stats.finish("failed", str(self.failure))
            self.cond.notify_all()
        self.conn.close()
        log.warning("destination: post-copy abandoned, %d pages lost", self.lost)
        return self.lost

    def raise_error(self) -> None:
        err = self.failure
        if err is None:
            return
        if isinstance(err, MigrationError):
            raise type(err)(str(err)) from err
        raise MigrationError(f"post-copy failed: {err!r}") from err

    def wait(self, timeout: float | None) -> None:
        with self.cond:
            if not self.cond.wait_for(lambda: self.done, timeout):
                raise MigrationTimeout(f"{self.remaining} pages still owed after {timeout:g} s ({self.state})")
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

    def demands(self, first: int, stop: int) -> list[bytes]:
        """DEMAND frames for the owed pages of ``[first, stop)`` (under the condition)."""
        runs = np.empty((P.MAX_RUNS, 2), dtype=np.uint64)
        frames = []
        cursor = first
        while cursor < stop:
            n = runs_in(self.owed, cursor, stop, runs)
            if n == 0:
                break
            frames.append(P.encode_runs_header(P.Frame.DEMAND, runs[:n], 0))
            cursor = int(runs[n - 1, 0] + runs[n - 1, 1])
        return frames

    def ensure(self, first: int, stop: int, timeout: float | None) -> None:
        deadline = None if timeout is None else time.monotonic() + timeout
        asked = -1  # the link generation the demands went out on
        while True:
            with self.cond:
                if count_bits_in(self.owed, first, stop) == 0:
                    return  # present pages stay usable even after a failure
                if self.done:
                    self.raise_error()
                frames: list[bytes] = []
                if self.state == "active" and asked != self.generation:
                    frames, asked, conn = self.demands(first, stop), self.generation, self.conn
            if frames:
                try:
                    with self.send_lock:
                        for frame in frames:
                            conn.send_all(frame, "sending DEMAND")
                    self.stats.add(postcopy_requests=len(frames))
                except MigrationError:
                    pass  # the background thread sees the broken link too and pauses
            with self.cond:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    raise MigrationTimeout(f"pages {first}..{stop - 1} did not arrive within {timeout:g} s ({self.state})")
                self.cond.wait_for(
                    lambda: self.done or count_bits_in(self.owed, first, stop) == 0
                    or (self.state == "active" and asked != self.generation),
                    left,
                )

    def give_up(self) -> int:
        region, ps = self.region, self.region.page_size
        runs = np.empty((P.MAX_RUNS, 2), dtype=np.uint64)
        cursor = 0
        while cursor < region.npages:
            n = runs_in(self.owed, cursor, region.npages, runs)
            if n == 0:
                break
            for a, k in runs[:n].tolist():
                start, stop = a * ps, min((a + k) * ps, region.nbytes)
                region.view[start:stop] = bytes(stop - start)
            cursor = int(runs[n - 1, 0] + runs[n - 1, 1])
        return self.count


class TransparentPostcopy(PostcopyReceiver):
    """Owed pages fault in on first touch: the no-GIL userfaultfd loop of ``_uffd_postcopy`` receives them."""

    transparent = True

    def __init__(self, store: PageStore, owed: U64, conn: Connection, digest: bytes, uffd: UffdPostcopy) -> None:
        super().__init__(store, owed, conn, digest)
        self.uffd = uffd

    @property
    def remaining(self) -> int:
        if self.lost:
            return self.lost
        return self.uffd.remaining

    def receive_all(self) -> P.Header:
        # the whole post-copy, in a loop that never takes the GIL; a lost link leaves the region registered
        end = self.uffd.serve(self.conn, self.store.table, self.store.max_payload, self.stats)
        self.uffd.close()
        return end

    def ensure(self, first: int, stop: int, timeout: float | None) -> None:
        # a prefetch: ask for the whole range at once, then wait for the loop to install it
        self.uffd.request(first, stop)
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self.uffd.wait_present(first, stop, 0.05):
            with self.cond:
                if self.done:
                    self.raise_error()
            if deadline is not None and time.monotonic() >= deadline:
                raise MigrationTimeout(f"pages {first}..{stop - 1} did not arrive within {timeout:g} s ({self.state})")

    def give_up(self) -> int:
        return self.uffd.abandon()

    def start(self, name: str) -> None:
        super().start(name)
        assert self.thread is not None
        # the region must not reach the program before the loop runs without the GIL
        self.uffd.wait_ready(self.thread.is_alive)


def start_postcopy(
    store: PageStore, owed: U64, conn: Connection, digest: bytes, *, transparent: bool = True
) -> PostcopyReceiver:
    """Take over the connection after the POSTCOPY frame: confirm the switch, then receive in the background.

    ``transparent=False`` keeps userfaultfd out (the source runs in this
    process: a thread faulting with the GIL would stop the source's push).
    """
    # with userfaultfd, any touch of an owed page fetches it: the program needs no ensure()
    uffd = UffdPostcopy.attach(store.region, owed, conn, written=store.written) if transparent else None
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
    ``Region.allocate``, pages of at least 4 KiB, no TLS, the source in
    another process) the region is usable at once: touching an owed page
    blocks only that thread until the page arrives, and :meth:`ensure` is
    merely a prefetch.

    If the link breaks after the switch the reception enters
    ``"postcopy-paused"``: what arrived stays, the owed pages stay missing (a
    thread touching one stays blocked, :meth:`ensure` and :meth:`wait` keep
    waiting or raise :class:`MigrationTimeout` on their own timeout) until
    the source reconnects with :func:`migcore.recover` to the same listener,
    or the program calls :meth:`abandon`. No byte the source did not send is
    ever visible before that. (A thread that holds the GIL and touches an
    owed page stalls every Python thread of this process until the page
    arrives — during an outage, until the program is unblocked by nothing
    but a recovery, which then cannot run in this process: read owed pages
    from code that releases the GIL, or :meth:`ensure` them first.)
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

    def abandon(self) -> int:
        """Give up the pages the source still owes: they read as zeros from now on; returns how many.

        The only way to end a post-copy reception that lost its source for
        good (the library never decides it): every thread blocked on an owed
        page wakes, status becomes ``"failed"``, :attr:`missing_pages` keeps
        the count of pages lost, and :meth:`wait`/:meth:`ensure` raise
        :class:`MigrationError`. Returns 0 when nothing was owed.
        """
        return 0 if self._postcopy is None else self._postcopy.abandon()

    def __repr__(self) -> str:
        return f"<migcore.Received {self.region.nbytes} bytes, {len(self.state)} state bytes, {self.missing_pages} pages owed>"
