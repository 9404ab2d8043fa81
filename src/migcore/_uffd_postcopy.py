"""Transparent post-copy on the destination: owed pages fault in on first touch, whoever touches them.

At the post-copy switch the destination region (private anonymous memory)
is registered with userfaultfd in missing-page mode after every owed page is
dropped (so each one faults). ``migcore._uffd.serve_postcopy`` then runs on
the receive thread without the GIL: a fault on an owed page becomes a DEMAND
frame, a fault on a page the source never sent (a zero page) gets the zero
page, and every arriving page is hashed and installed with ``UFFDIO_COPY``
from a receive buffer, exactly once (the pages of a zero notice with
``UFFDIO_ZEROPAGE``, after the same checks). A faulting thread is woken only
once its pages are marked present. When the link breaks the registration
stays: a thread touching an owed page stays blocked until the page arrives
through a recovered link (the loop runs again on the new socket), or until
the program gives the missing pages up (:meth:`UffdPostcopy.abandon`, which
fills them with zeros and wakes everyone). No owed page ever reads as a byte
the source did not send.
"""

from __future__ import annotations

import logging
import os
import struct
import time
from collections.abc import Callable

import numpy as np

from migcore import _kernels
from migcore import _protocol as P
from migcore import _userfault
from migcore._peer_errors import error_from_peer
from migcore._errors import MigrationError, MigrationTimeout, PeerLostError, ProtocolError
from migcore._region import Region, U64, count_bits_in
from migcore._stats import StatsRecorder
from migcore._transport import Connection

log = logging.getLogger("migcore")


_REQUEST = struct.Struct("<QQ")


class UffdPostcopy:
    """The userfaultfd registration of one destination region during post-copy."""

    def __init__(self, region: Region, owed: U64) -> None:
        self.region = region
        self.owed = owed
        self.uffd = _userfault.module()
        self.addr, self.length = _userfault.span(region)
        self.info = np.zeros(self.uffd.INFO_SIZE, dtype=np.uint64)
        self.info[self.uffd.INFO_REMAINING] = int(_kernels.count_bits(owed))
        self.fd = -1
        self.wake_r = self.wake_w = -1
        self.claim = 0  # the record that this range's non-present pages are owed, not zero

    @classmethod
    def attach(cls, region: Region, owed: U64, conn: Connection, *, written: bool = True) -> UffdPostcopy | None:
        """Register ``region`` for transparent post-copy; None (with the reason logged) where it cannot.

        ``written`` says whether anything was stored in the region before the
        switch; a region never written has no page mapped, so there is nothing
        to discard (pure post-copy keeps its pause independent of the size).
        """
        # the loop reads plain frames from the socket itself: not through TLS
        reason = None if type(conn) is Connection else "the connection is encrypted"
        reason = reason or _userfault.postcopy_reason(region)
        if reason is not None:
            log.debug("destination: post-copy without userfaultfd: %s", reason)
            return None
        self = cls(region, owed)
        try:
            self.fd, _ = self.uffd.open_uffd(0)
            self.wake_r, self.wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
            if written:
                # owed pages may hold zeros a huge page put there: make each of them a missing page
                self.uffd.discard_pages(self.addr, region.nbytes, region.page_size, owed)
            self.claim = _userfault.claim_missing(self.addr, self.length)
            self.uffd.register(self.fd, self.addr, self.length, self.uffd.REGISTER_MODE_MISSING)
        except OSError as exc:
            log.warning("destination: userfaultfd post-copy unavailable, falling back to ensure(): %s", exc)
            self.close()
            return None
        log.debug("destination: region registered for transparent post-copy")
        return self

    @property
    def remaining(self) -> int:
        """Owed pages not installed yet."""
        return int(self.info[self.uffd.INFO_REMAINING])

    def wait_ready(self, thread_alive: Callable[[], bool]) -> None:
        """Block until the service loop runs without the GIL (or its thread ended).

        The region must not reach the program before: a thread holding the GIL
        that touches an owed page would block the loop's thread at its start.
        """
        flag = self.info[self.uffd.INFO_READY : self.uffd.INFO_READY + 1]
        delay = 0.0001
        while not flag[0] and thread_alive():
            time.sleep(delay)
            delay = min(delay * 2, 0.005)

    def serve(self, conn: Connection, table: U64, max_payload: int, stats: StatsRecorder) -> P.Header:
        """Run the fault-service loop until END and return END's header; raise on any failure.

        Every owed page has arrived, been hashed into ``table`` and installed
        when it returns; the caller checks the digest and confirms.
        """
        uffd = self.uffd
        region = self.region
        try:
            rc = uffd.serve_postcopy(
                P.LOOP_LAYOUT,
                self.fd,
                conn.fd,
                self.wake_r,
                self.addr,
                region.nbytes,
                region.page_size,
                self.owed,
                table,
                self.info,
                P.MAX_RUNS,
                max_payload,
                conn.timeout or 0.0,
            )
        finally:
            self.account(conn, stats)
        if rc != 0:
            raise self.error(rc)
        header = P.decode_header(self.info[uffd.INFO_HEADER : uffd.INFO_HEADER + 2].astype("<u8").tobytes())
        P.expect(header, (P.Frame.END, P.Frame.ERROR), "post-copy")
        if header.type is P.Frame.ERROR:
            body = bytes(conn.recv_exact(P.check_length(header, P.MAX_CONTROL_BODY), "reading ERROR"))
            raise error_from_peer(*P.decode_error(body), "the source")
        if self.remaining:
            raise ProtocolError(f"the source ended post-copy with {self.remaining} pages still owed")
        return header

    def account(self, conn: Connection, stats: StatsRecorder) -> None:
        """Move the loop's counters into the destination's statistics."""
        uffd, info = self.uffd, self.info
        pages, payload, wire = (int(info[i]) for i in (uffd.INFO_PAGES, uffd.INFO_PAYLOAD, uffd.INFO_WIRE))
        conn.received += wire
        stats.add_pages(pages, payload, wire, postcopy=True)
        stats.add(postcopy_requests=int(info[uffd.INFO_DEMANDS]), zero_pages=int(info[uffd.INFO_ZERO]))
        stats.update(remaining_bytes=self.remaining * self.region.page_size)
        # the loop adds to these: a later run (after a recovery) counts from zero again
        for i in (uffd.INFO_PAGES, uffd.INFO_PAYLOAD, uffd.INFO_WIRE, uffd.INFO_DEMANDS, uffd.INFO_ZERO):
            info[i] = 0

    def error(self, rc: int) -> MigrationError:
        """The exception for a negative result of ``serve_postcopy``."""
        uffd, info = self.uffd, self.info
        err = int(info[uffd.INFO_ERRNO])
        where = uffd.OS_WHERE.get(int(info[uffd.INFO_WHERE]), "post-copy")
        detail = f": {os.strerror(err)}" if err else ""
        if rc == uffd.SERVE_EOF:
            return PeerLostError(f"peer lost while receiving post-copy pages ({where}{detail})")
        if rc == uffd.SERVE_TIMEOUT:
            return MigrationTimeout("the source sent nothing for the connection's timeout during post-copy")
        if rc == uffd.SERVE_PROTOCOL:
            return ProtocolError(uffd.PROTOCOL_DETAILS.get(int(info[uffd.INFO_DETAIL]), "bad post-copy frame"))
        if rc == uffd.SERVE_STOPPED:
            return MigrationError("post-copy fault service stopped")
        return MigrationError(f"post-copy fault service failed in {where}{detail}")

    def request(self, first: int, stop: int) -> None:
        """Ask the loop for the owed pages of ``[first, stop)`` at once (queued while the link is down)."""
        try:
            os.write(self.wake_w, _REQUEST.pack(first, stop))
        except OSError:  # the pipe is full: the pages come with the background push
            pass

    def wait_present(self, first: int, stop: int, timeout: float | None) -> bool:
        """Wait until no page of ``[first, stop)`` is owed, without touching them; False on timeout.

        The loop clears the owed bits without the GIL, so this looks at them
        with a short sleep that grows to a millisecond.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        delay = 0.00005
        while count_bits_in(self.owed, first, stop):
            if deadline is not None and time.monotonic() >= deadline:
                return False
            time.sleep(delay)
            delay = min(delay * 2, 0.001)
        return True

    def abandon(self) -> int:
        """The program gives the owed pages up: zeros there, every blocked thread woken; returns the pages lost."""
        lost = 0
        if self.fd >= 0:
            lost = self.uffd.fill_owed(self.fd, self.addr, self.region.nbytes, self.region.page_size, self.owed)
        self.close()
        return lost

    def close(self) -> None:
        """Release the descriptors (closing the userfaultfd also drops any registration left)."""
        if self.fd >= 0:
            try:
                self.uffd.unregister(self.fd, self.addr, self.length)
            except OSError:
                pass
            self.uffd.close_fd(self.fd)
            self.fd = -1
        if self.claim:
            _userfault.release_missing(self.claim)
            self.claim = 0
        for fd in (self.wake_r, self.wake_w):
            if fd >= 0:
                os.close(fd)
        self.wake_r = self.wake_w = -1
