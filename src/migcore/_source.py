"""The source's state machine: handshake, pre-copy rounds, convergence, switchover, post-copy service.

The rounds compare each page's current hash with the hash the destination
acknowledged storing (DESIGN.md rule 1), so a page that changed and changed
back while it was being sent is still resent. The pause ends with a pass that
finds the last dirty pages and the full hash table at once; the destination
commits only when its table matches (rule 2). Until the destination confirms
the switchover, any failure leaves the source buffer untouched and calls the
user's ``resume`` if ``pause`` had been called (rule 3).
"""

from __future__ import annotations

import collections
import logging
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

from migcore import _codecs, _kernels, _residency
from migcore import _protocol as P
from migcore._bandwidth import TokenBucket
from migcore._delta import DEFAULT_CACHE_BYTES, DeltaCache
from migcore._peer_errors import error_from_peer
from migcore._convergence import Action, Convergence
from migcore._errors import (
    MigrationCancelled,
    MigrationError,
    MigrationTimeout,
    PeerLostError,
    ProtocolError,
)
from migcore._region import Region, U64, count_bits_in, new_bitmap, runs_in
from migcore._security import authenticate_source
from migcore._stats import MigrationStats, StatsRecorder
from migcore._trackers import HashTracker, Tracker, hash_delta_parallel, zero_pages_parallel, make_tracker, runs_to_pages, zero_page_hashes
from migcore._streams import StreamSenders, open_streams
from migcore._transport import Connection

log = logging.getLogger("migcore")


#: Largest page payload the source puts in one PAGES frame (pre-copy, stop-and-copy).
BATCH_BYTES = 8 << 20
#: Smaller batches after a post-copy switch, so a demand waits behind less background data.
POSTCOPY_BATCH_BYTES = 256 << 10
#: Pure post-copy: the background push takes its batches from a window of this many batch sizes of
#: owed pages, cut at one batch of non-zero pages (the zero pages in it go as zero notices).
ZERO_WINDOW = 16
#: Send buffer of the page connection after a post-copy switch: background pages queued in the
#: kernel cannot be overtaken by a demanded one, so keep only a few batches in flight.
POSTCOPY_SNDBUF = 2 * POSTCOPY_BATCH_BYTES
#: Most runs the source puts in one frame.
BATCH_RUNS = 256
#: Seconds between progress reports inside a long round.
PROGRESS_INTERVAL = 0.1



def pages_to_runs(pages: NDArray[np.intp]) -> U64:
    """Runs ``(first, count)`` of an ascending array of distinct page indices."""
    breaks = np.flatnonzero(np.diff(pages) != 1) + 1
    starts = np.concatenate(([0], breaks))
    ends = np.concatenate((breaks, [len(pages)]))
    return np.stack((pages[starts], ends - starts), axis=1).astype(np.uint64)


@dataclass(frozen=True)
class SourceOptions:
    mode: str
    tracker: str
    downtime_limit: float
    max_rounds: int
    timeout: float | None
    compat: str | None
    on_stall: str
    state: bytes | Callable[[], bytes]
    pause: Callable[[], object] | None
    resume: Callable[[], object] | None
    throttle: Callable[[int], object] | None
    progress: Callable[[MigrationStats], object] | None
    threads: int = 2
    compress: str | None = None
    delta: bool = False
    delta_cache_bytes: int = DEFAULT_CACHE_BYTES
    token: bytes | None = None
    bandwidth_limit: float | None = None
    postcopy_bandwidth_limit: float | None = None
    streams: int = 1
    #: Opens one more connection to the destination (TLS included), for the extra streams.
    connect: Callable[[], Connection] | None = None


class Source:
    """One outgoing migration of ``region`` over ``conn``."""

    def __init__(self, region: Region, conn: Connection, opts: SourceOptions) -> None:
        self.region = region
        self.conn = conn
        self.opts = opts
        self.mid = uuid.uuid4().bytes
        self.stats = StatsRecorder(
            mode=opts.mode,
            tracker=opts.tracker,
            migration_id=self.mid.hex(),
            page_size=region.page_size,
            total_bytes=region.nbytes,
        )
        self.accept: P.Accept | None = None
        self.paused_at: float | None = None
        self.switched = False
        self.in_doubt = False
        self.policy = Convergence(
            downtime_limit=opts.downtime_limit,
            max_rounds=opts.max_rounds,
            on_stall=opts.on_stall,
            can_throttle=opts.throttle is not None,
            bandwidth_cap=opts.bandwidth_limit,
        )
        self.last_progress = 0.0
        self.batch_runs = np.empty((BATCH_RUNS, 2), dtype=np.uint64)
        # the post-copy owed bitmap, kept for the error report if the link breaks
        self.owed: U64 | None = None
        self.codec = _codecs.get_codec(opts.compress) if opts.compress else None
        self.delta = (
            DeltaCache(region.npages, region.page_size, region.nbytes, opts.delta_cache_bytes) if opts.delta else None
        )
        self.bucket = TokenBucket(opts.bandwidth_limit) if opts.bandwidth_limit else None
        self.postcopy_bucket = TokenBucket(opts.postcopy_bandwidth_limit) if opts.postcopy_bandwidth_limit else None
        self.senders: StreamSenders | None = None
        self.rounds_sent = 0
        #: pure post-copy: the background zero scan has reached this page
        self.scanned = 0
        #: pure post-copy: the pages with memory behind them at the pause (None: read every page)
        self.resident: U64 | None = None
        self.stats.streams = opts.streams
        self.stats.compress = opts.compress or ""

    # -- helpers -----------------------------------------------------------

    def report(self, force: bool = False) -> None:
        """Call the user's progress callback (at most every PROGRESS_INTERVAL unless forced)."""
        if self.opts.progress is None:
            return
        now = time.monotonic()
        if not force and now - self.last_progress < PROGRESS_INTERVAL:
            return
        self.last_progress = now
        self.opts.progress(self.stats.snapshot())

    def read_header(self, what: str) -> P.Header:
        return P.decode_header(self.conn.recv_exact(P.HEADER_SIZE, what))

    def read_body(self, header: P.Header, limit: int, what: str, *, exact: int | None = None) -> bytes:
        return bytes(self.conn.recv_exact(P.check_length(header, limit, exact=exact), what))

    def peer_error(self, header: P.Header) -> MigrationError:
        code, message = P.decode_error(self.read_body(header, P.MAX_CONTROL_BODY, "reading ERROR"))
        return error_from_peer(code, message, "the destination")

    def expect_reply(self, allowed: tuple[P.Frame, ...], what: str) -> P.Header:
        """Read the destination's next frame; turn ERROR into the matching exception."""
        header = self.read_header(what)
        if header.type is P.Frame.ERROR:
            raise self.peer_error(header)
        P.expect(header, allowed, what)
        return header

    def send_frame(self, data: bytes, what: str) -> None:
        self.conn.send_all(data, what)
        self.stats.add_wire(len(data))

    # -- the handshake -------------------------------------------------------

    def handshake(self, state_size: int) -> None:
        region = self.region
        if self.opts.token is not None:
            authenticate_source(self.conn, self.opts.token)  # before anything else, inside TLS if any
        features = P.FEATURE_POSTCOPY if self.opts.mode in ("postcopy", "hybrid") or self.opts.on_stall == "postcopy" else 0
        if self.delta is not None:
            features |= P.FEATURE_DELTA
        if self.codec is not None:
            features |= P.FEATURE_COMPRESS
        if self.opts.streams > 1:
            features |= P.FEATURE_STREAMS
        hello = P.Hello(
            version=P.PROTOCOL_VERSION,
            page_size=region.page_size,
            nbytes=region.nbytes,
            mode=self.opts.mode,
            tracker=self.opts.tracker,
            features=features,
            compat=self.opts.compat,
            migration_id=self.mid,
            state_size=state_size,
            streams=self.opts.streams,
            codec=self.opts.compress,
        )
        self.send_frame(P.encode_hello(hello), "sending HELLO")
        header = self.read_header("waiting for ACCEPT")
        if header.type is P.Frame.REFUSE:
            raise P.decode_refuse(self.read_body(header, P.MAX_CONTROL_BODY, "reading REFUSE"))
        if header.type is P.Frame.ERROR:
            raise self.peer_error(header)
        P.expect(header, (P.Frame.ACCEPT,), "the handshake")
        self.accept = P.decode_accept(self.read_body(header, P.MAX_CONTROL_BODY, "reading ACCEPT"))
        if self.accept.features & features != features:
            raise ProtocolError("the destination accepted without the features this migration needs")
        if self.opts.streams > 1:
            assert self.opts.connect is not None
            self.senders = open_streams(self, self.opts.connect, self.opts.streams)

    def batch_cap(self, postcopy: bool = False) -> int:
        """Largest page payload per PAGES frame: room for an encoded batch's overhead, the bucket's size."""
        assert self.accept is not None
        ps = self.region.page_size
        cap = min(POSTCOPY_BATCH_BYTES if postcopy else BATCH_BYTES, self.accept.max_payload)
        if self.codec is not None or self.delta is not None:
            cap = cap // 2  # a delta batch adds 4 bytes a page, a compressed one its size prefix
        bucket = self.postcopy_bucket if postcopy else self.bucket
        if bucket is not None:
            cap = min(cap, bucket.max_batch(ps))
        return max(ps, cap)

    # -- sending pages -------------------------------------------------------

    def send_bitmap(self, dirty: U64, *, phase: str, hash_into: U64 | None = None) -> tuple[list[U64], int]:
        """Send every page set in ``dirty`` in bounded PAGES frames; return the runs sent and their bytes."""
        assert self.accept is not None
        region = self.region
        ps = region.page_size
        cap = self.batch_cap()
        max_run = max(1, cap // ps)
        nruns_cap = min(BATCH_RUNS, self.accept.max_runs)
        out = self.batch_runs[:nruns_cap]
        cursor = 0
        sent: list[U64] = []
        payload_total = 0
        while cursor < region.npages:
            nruns, resume = _kernels.dirty_runs(dirty, region.npages, out, cursor, max_run)
            if nruns == 0:
                break
            runs = out[:nruns]
            sizes = np.cumsum(runs[:, 1].astype(np.int64)) * ps
            keep = int(np.searchsorted(sizes, cap, side="right"))  # runs fitting in one frame
            if keep < nruns:
                runs = runs[:keep]
                resume = int(runs[-1, 0] + runs[-1, 1])  # the next run starts at or after this page
            runs = runs.copy()
            if hash_into is not None:  # the final hash of a frozen page, taken as it goes out
                _kernels.hash_runs(region.view, ps, runs, hash_into)
            if self.senders is not None:
                self.senders.submit(runs, phase)
            else:
                self.send_runs(runs, phase=phase)
            sent.append(runs)
            payload_total += P.runs_payload(runs, ps, region.nbytes)
            cursor = resume
        return sent, payload_total

    def send_runs(
        self,
        runs: U64,
        *,
        phase: str,
        flags: int = 0,
        conn: Connection | None = None,
        bucket: TokenBucket | None | bool = True,
    ) -> int:
        """One PAGES frame, straight from the region (or encoded); returns its payload bytes.

        ``conn`` is an extra stream's connection (its thread never calls the
        progress callback); ``bucket=True`` means the pre-copy bandwidth limit.
        """
        region = self.region
        main = conn is None
        conn = self.conn if conn is None else conn
        limit = self.bucket if bucket is True else bucket or None
        payload = P.runs_payload(runs, region.page_size, region.nbytes)
        what = f"sending pages ({phase})"
        # post-copy pages go raw: demand latency first, and the userfaultfd receiver writes them straight in
        if (self.codec is None and self.delta is None) or flags & P.FLAG_POSTCOPY:
            header = P.encode_runs_header(P.Frame.PAGES, runs, payload, flags=flags)
            wire = len(header) + payload
            self.hold_back(limit, wire)
            conn.send_pages(
                region.view, region.page_size, runs, header, wire, what, between=self.report if main else None
            )
        else:
            body, flags = self.encode_batch(runs, payload, flags)
            header = P.encode_runs_header(P.Frame.PAGES, runs, len(body), flags=flags)
            wire = len(header) + len(body)
            self.hold_back(limit, wire)
            conn.send_all(header, what)
            conn.send_all(body, what)
        pages = int(runs[:, 1].sum())
        self.stats.add_pages(pages, payload, wire, postcopy=bool(flags & P.FLAG_POSTCOPY))
        with self.stats.lock:
            self.stats.remaining_bytes = max(0, self.stats.remaining_bytes - payload)
        if main:
            self.report()
        return payload

    def hold_back(self, bucket: TokenBucket | None, nbytes: int) -> None:
        if bucket is not None:
            waited = bucket.take(nbytes)
            if waited:
                with self.stats.lock:
                    self.stats.bandwidth_wait += waited

    def encode_batch(self, runs: U64, payload: int, flags: int) -> tuple[memoryview, int]:
        """The batch delta-encoded and/or compressed, with its PAGES flags; raw when encoding does not pay."""
        region = self.region
        body: memoryview
        if self.delta is not None:
            npg = int(runs[:, 1].sum())
            out = bytearray(4 * npg + payload)
            size, hits = self.delta.encode(region.view, runs, out)
            if hits:
                body = memoryview(out)[:size]
                flags |= P.FLAG_DELTA
            else:  # no page had a base: the table would be pure overhead, the pages follow it raw
                body = memoryview(out)[4 * npg : size]
            with self.stats.lock:
                self.stats.delta_hits = self.delta.hits
                self.stats.delta_misses = self.delta.misses
                self.stats.delta_overflow = self.delta.overflow
                self.stats.delta_bytes_saved += payload - body.nbytes
        else:
            ps = region.page_size
            body = memoryview(
                b"".join(region.view[a * ps : min((a + n) * ps, region.nbytes)] for a, n in runs.tolist())
            )
        if self.codec is not None:
            before = body.nbytes
            packed = _codecs.pack(self.codec, body)
            if packed is not None:
                body = memoryview(packed)
                flags |= P.FLAG_COMPRESSED
            with self.stats.lock:
                self.stats.compress_before += before
                self.stats.compress_after += body.nbytes
        return body, flags

    # -- the pause -------------------------------------------------------------

    def do_pause(self) -> None:
        if self.opts.pause is not None:
            self.opts.pause()
        self.paused_at = time.monotonic()
        log.debug("source: paused after %.3f s", self.paused_at - self.stats.started)

    def get_state(self) -> bytes:
        state = self.opts.state() if callable(self.opts.state) else self.opts.state
        data = bytes(memoryview(state).cast("B"))
        assert self.accept is not None
        if len(data) > self.accept.max_state:
            raise MigrationError(
                f"state blob of {len(data)} bytes exceeds the destination's limit of {self.accept.max_state}"
            )
        return data

    def final_pass(self, baseline: U64) -> tuple[U64, U64, int]:
        """During the pause: dirty pages vs the acknowledged baseline, and the full current hash table."""
        table = baseline.copy()
        dirty = new_bitmap(self.region.npages)
        count = hash_delta_parallel(self.region, table, dirty, self.opts.threads, update=True)
        with self.stats.lock:
            self.stats.rounds += 1
            self.stats.pages_per_round.append(count)
            self.stats.remaining_bytes = count * self.region.page_size
        return dirty, table, count

    def nonzero_pass(self) -> tuple[U64, U64, int]:
        """During the pause, with nothing sent yet: the non-zero pages (what a fresh destination lacks).

        No hashing here: a zero scan reads one cache line of a non-zero page.
        The returned table holds zero-page hashes; the pages are hashed into it
        just before they are sent (the region is frozen from the pause on), so
        the pause does not grow with a full-region hash pass.
        """
        region = self.region
        zeros = new_bitmap(region.npages)
        nzero = zero_pages_parallel(region, zeros, self.opts.threads)
        dirty = np.invert(zeros)
        tail = region.npages & 63
        if tail:
            dirty[-1] &= np.uint64((1 << tail) - 1)
        count = region.npages - nzero
        with self.stats.lock:
            self.stats.rounds += 1
            self.stats.pages_per_round.append(count)
            self.stats.remaining_bytes = count * region.page_size
        return dirty, zero_page_hashes(region), count

    def all_pages(self) -> tuple[U64, int]:
        """Just before the pause of a pure post-copy: every page is owed, nothing is read.

        The zero pages among them are found batch by batch during the push
        and announced with zero notices; the hash table (zero-page hashes,
        built after the switch) takes each pushed page's hash as it goes out,
        and END carries its digest.
        """
        region = self.region
        owed = new_bitmap(region.npages)
        _kernels.set_bits(owed, 0, region.npages)
        with self.stats.lock:
            self.stats.rounds += 1
            self.stats.pages_per_round.append(region.npages)
            self.stats.remaining_bytes = region.nbytes
        return owed, region.npages

    def split_zero(self, runs: U64, zeros: U64, *, scan: bool = True) -> tuple[U64, U64]:
        """``runs`` split into the runs of non-zero pages and the runs of all-zero pages.

        ``zeros`` holds a bit per page (1: all zero); with ``scan`` the pages
        of ``runs`` are scanned into it first, otherwise they already were
        (the region is frozen after the pause, so a scan stays true).
        """
        region = self.region
        empty = np.empty((0, 2), dtype=np.uint64)
        if scan:
            for first, n in runs.tolist():
                _kernels.zero_pages(region.view, region.page_size, zeros, first, first + n, resident=self.resident)
        pages = runs_to_pages(runs)
        is_zero = ((zeros[pages >> 6] >> (pages & 63).astype(np.uint64)) & np.uint64(1)).astype(bool)
        nzero = int(is_zero.sum())
        if nzero == 0:
            return runs, empty
        if nzero == len(pages):
            return empty, runs
        return pages_to_runs(pages[~is_zero]), pages_to_runs(pages[is_zero])

    def cut_window(self, runs: U64, cursor: int, zeros: U64, cap: int) -> tuple[U64, int, bool]:
        """The leading part of a window of owed ``runs`` holding at most ``cap`` bytes of non-zero pages.

        Scans the window's pages past ``self.scanned`` into ``zeros`` (each
        page once: the background cursor only moves forward). Returns the runs
        to send, the cursor after them and whether any of their pages is zero.
        """
        region = self.region
        ps = region.page_size
        for first, n in runs.tolist():
            lo, hi = max(first, self.scanned), first + n
            if lo < hi:
                _kernels.zero_pages(region.view, ps, zeros, lo, hi, resident=self.resident)
            self.scanned = max(self.scanned, hi)
        cap_pages = max(1, cap // ps)
        rows = runs.tolist()
        if not any(count_bits_in(zeros, first, first + n) for first, n in rows):  # no zero page: cut at cap
            taken: list[tuple[int, int]] = []
            total = 0
            for first, n in rows:
                k = min(n, cap_pages - total)
                taken.append((first, k))
                total += k
                if total == cap_pages:
                    break
            if total == int(runs[:, 1].sum()):
                return runs, cursor, False
            last_first, last_n = taken[-1]
            return np.array(taken, dtype=np.uint64).reshape(-1, 2), last_first + last_n, False
        pages = runs_to_pages(runs)
        is_zero = ((zeros[pages >> 6] >> (pages & 63).astype(np.uint64)) & np.uint64(1)).astype(bool)
        data = np.cumsum(~is_zero)
        cut = max(1, int(np.searchsorted(data, cap_pages, side="right")))
        if cut >= len(pages):
            return runs, cursor, True
        return pages_to_runs(pages[:cut]), int(pages[cut - 1]) + 1, True

    # -- the whole run -------------------------------------------------------

    def run(self) -> MigrationStats:
        try:
            declared = P.UNKNOWN_SIZE if callable(self.opts.state) else len(memoryview(self.opts.state).cast("B"))
            self.handshake(declared)
            self.stats.setup_time = time.monotonic() - self.stats.started
            self.stats.status = "active"
            self.report(force=True)
            mode = self.opts.mode
            tracker: Tracker | None = None
            if mode in ("stopcopy", "postcopy"):
                baseline = zero_page_hashes(self.region)
                self.switch(baseline, postcopy=(mode == "postcopy"), first=True)
            else:
                tracker = make_tracker(self.opts.tracker, self.region)
                try:
                    baseline, postcopy = self.precopy(tracker)
                    self.switch(baseline, postcopy=postcopy, first=False)
                finally:
                    tracker.close()
        except BaseException as exc:
            # a stream thread's failure is the real cause of the main connection closing under us
            err = self.senders.cause(exc) if self.senders is not None else exc
            self.fail(err)
            if err is exc:
                raise
            raise err from exc
        finally:
            if self.senders is not None:
                self.senders.close()
            if self.policy.throttle_level and self.opts.throttle is not None:
                self.policy.throttle_level = 0
                self.stats.update(throttle_percentage=0)
                self.opts.throttle(0)
        return self.stats.snapshot()

    def fail(self, exc: BaseException) -> None:
        """Clean up after a failure: rule 3 before the switchover, keep what is owed after it."""
        cancelled = isinstance(exc, MigrationCancelled)
        self.stats.finish("cancelled" if cancelled else "failed", str(exc))
        if not self.conn.closed:
            if self.switched or isinstance(exc, (PeerLostError, MigrationTimeout)):
                self.conn.close()
            elif cancelled:
                self.conn.abort_soon(P.encode_cancel(str(exc)))
            elif isinstance(exc, ProtocolError):
                self.conn.abort_soon(P.encode_error(P.ErrorCode.PROTOCOL, str(exc)))
            else:
                self.conn.abort_soon(P.encode_error(P.ErrorCode.INTERNAL, f"source failed: {exc}"))
        if self.switched:
            log.warning("source: post-copy failed after the switch; the destination holds the newest state: %s", exc)
            return
        if self.in_doubt:
            log.warning("source: link lost while the destination was committing; not resuming: %s", exc)
            return
        if self.paused_at is not None and self.opts.resume is not None:
            log.info("source: migration failed before the switchover, resuming the program: %s", exc)
            self.opts.resume()
        else:
            log.info("source: migration failed before the switchover: %s", exc)

    # -- pre-copy --------------------------------------------------------------

    def precopy(self, tracker: Tracker) -> tuple[U64, bool]:
        """Rounds while the program runs; returns the acknowledged baseline and whether to post-copy.

        After each round the convergence policy (``_convergence``) decides:
        another round, pause, switch to post-copy, throttle or cancel.
        """
        region = self.region
        baseline = tracker.baseline if isinstance(tracker, HashTracker) else zero_page_hashes(region)
        tracker.start()
        dirty = new_bitmap(region.npages)
        # round 0: everything that differs from a zero destination, whatever the tracker
        t0 = time.monotonic()
        count = hash_delta_parallel(region, baseline, dirty, self.opts.threads)
        self.stats.update(zero_pages=region.npages - count)
        self.policy.start(count)
        rnd = 0
        while True:
            self.stats.update(remaining_bytes=count * region.page_size)
            with self.stats.lock:
                self.stats.pages_per_round.append(count)
            self.report(force=True)
            npg = self.one_round(rnd, dirty, tracker, baseline)
            rnd += 1
            self.stats.update(rounds=rnd)
            count = tracker.collect(dirty)
            round_time = max(time.monotonic() - t0, 1e-6)
            t0 = time.monotonic()
            expected = self.policy.expected_downtime(count * region.page_size)
            self.stats.update(
                expected_downtime=expected, remaining_bytes=count * region.page_size, dirty_pages_rate=count / round_time
            )
            self.report(force=True)
            log.debug("source: round %d sent %d pages, %d dirty, expected downtime %.4f s", rnd - 1, npg, count, expected)
            step = self.policy.after_round(rnd, count, expected)
            if step.action is Action.CONTINUE:
                continue
            if step.reason.startswith("pre-copy did not converge"):
                log.info("source: pre-copy stalled after %d rounds (%d pages dirty): %s", rnd, count, self.opts.on_stall)
            if step.action is Action.CANCEL:
                raise MigrationCancelled(f"{step.reason}; source untouched")
            if step.action is Action.THROTTLE:
                assert self.opts.throttle is not None
                self.stats.update(throttle_percentage=step.level)
                self.opts.throttle(step.level)
                continue
            return baseline, step.action is Action.POSTCOPY

    def one_round(self, rnd: int, dirty: U64, tracker: Tracker, baseline: U64) -> int:
        """Send round ``rnd`` (the pages set in ``dirty``) and take in what the destination stored."""
        started = time.monotonic()
        sent, payload = self.send_bitmap(dirty, phase=f"round {rnd}")
        runs = np.concatenate(sent) if sent else np.empty((0, 2), dtype=np.uint64)
        if self.senders is not None:
            self.senders.end_round(rnd)
            # the destination acknowledges a round's pages in page order, whichever stream carried them
            runs = runs[np.argsort(runs[:, 0], kind="stable")]
        self.rounds_sent = rnd + 1
        npg = int(runs[:, 1].sum()) if len(runs) else 0
        hashes = self.end_round(rnd, runs, npg)
        if len(runs):
            # rule 1: the next round compares with what the destination stored, not what was sent
            if isinstance(tracker, HashTracker):
                tracker.acknowledge(runs, hashes)
            else:
                baseline[runs_to_pages(runs)] = hashes
            if self.delta is not None:
                self.delta.acknowledge(runs, hashes)
        self.policy.observe(payload, time.monotonic() - started)
        return npg

    def end_round(self, rnd: int, runs: U64, npg: int) -> U64:
        """End round ``rnd`` and return the hashes the destination stored for its ``npg`` pages (in run order)."""
        self.send_frame(P.encode_header(P.Frame.ROUND_END, count=rnd), "sending ROUND_END")
        header = self.expect_reply((P.Frame.ACK,), f"waiting for the ACK of round {rnd}")
        if header.count != rnd:
            raise ProtocolError(f"ACK for round {header.count} while waiting for round {rnd}")
        body = self.read_body(header, 8 * npg, "reading ACK", exact=8 * npg)
        return np.frombuffer(body, dtype="<u8").astype(np.uint64)

    # -- the switchover --------------------------------------------------------

    def switch(self, baseline: U64, *, postcopy: bool, first: bool) -> None:
        """Pause, send what is left (or the owed list) and the state, and wait for the destination's commit."""
        # nothing sent yet (stop-and-copy, pure post-copy): hash each page as it goes, not all at the pause
        lazy = table = None
        deferred = first and postcopy
        if deferred:
            # pure post-copy: owe every page, find the zero ones lazily as the push reaches them; the
            # owed list is known before the pause and goes as "every page" (no bitmap), so nothing in
            # the pause grows with the region
            dirty, count = self.all_pages()
        self.do_pause()
        if first and not deferred:
            dirty, lazy, count = self.nonzero_pass()
            self.stats.zero_pages = self.region.npages - count
        elif not first:
            dirty, table, count = self.final_pass(baseline)
        if not postcopy:
            self.send_bitmap(dirty, phase="stop-and-copy", hash_into=lazy)
        if deferred:  # a digest of zeros: "the digest comes with END", once every owed page was hashed
            digest = bytes(P.DIGEST_SIZE)
        elif lazy is None:
            assert table is not None
            digest = P.table_digest(table)
        else:
            digest = P.table_digest(lazy)
        if self.senders is not None:
            # every stream marks the end of the final pass (empty in post-copy), then closes its part
            self.senders.end_round(self.rounds_sent)
            self.senders.finish()
        state = self.get_state()
        self.stats.state_bytes = len(state)
        self.send_frame(P.encode_header(P.Frame.STATE, length=len(state)) + state, "sending the state")
        if not postcopy:
            self.send_frame(P.encode_header(P.Frame.COMPLETE, length=len(digest)) + digest, "sending COMPLETE")
            self.await_switch(P.Frame.DONE, "waiting for the destination to commit")
            self.finish_ok()
            return
        self.send_frame(P.encode_postcopy(digest, None if deferred else dirty), "sending POSTCOPY")
        self.await_switch(P.Frame.SWITCHED, "waiting for the destination to switch to post-copy")
        self.stats.downtime = time.monotonic() - (self.paused_at or time.monotonic())
        if deferred:  # after the switch, not in the pause: the table of a zero region, hashed into as pages go
            lazy = zero_page_hashes(self.region)
            # the region stays frozen from now on: pages without memory behind them are zero unread
            self.resident = _residency.resident_pages(self.region)
        # zero notices only where nothing was sent before the switch; hybrid keeps its final pass (the
        # owed pages are the dirty ones, and a page that became zero is sent as a page like any other)
        self.postcopy_service(dirty, count, hash_into=lazy, zero_notices=deferred)
        self.finish_ok()

    def await_switch(self, frame: P.Frame, what: str) -> None:
        """Wait for the destination's confirmation; a lost link now leaves the outcome in doubt."""
        self.in_doubt = True
        try:
            self.expect_reply((frame,), what)
        except PeerLostError as exc:
            raise PeerLostError(
                f"{exc}; the destination may or may not have switched over, so the source did not resume",
                in_doubt=True,
                migration_id=self.mid.hex(),
            ) from exc
        except MigrationTimeout as exc:
            raise MigrationTimeout(
                f"{exc}; the destination may or may not have switched over, so the source did not resume"
            ) from exc
        except MigrationError:
            self.in_doubt = False  # the destination answered: it refused, nothing switched
            raise
        self.in_doubt = False
        self.switched = True

    def finish_ok(self) -> None:
        with self.stats.lock:
            if not self.stats.downtime:
                self.stats.downtime = time.monotonic() - (self.paused_at or time.monotonic())
            self.stats.remaining_bytes = 0
            self.stats.expected_downtime = 0.0
            self.stats.verified = True
        self.stats.finish("completed")
        self.conn.close()
        self.report(force=True)
        log.info("source: migration %s completed", self.mid.hex())

    # -- post-copy ---------------------------------------------------------------

    def postcopy_service(
        self, owed: U64, count: int, hash_into: U64 | None = None, *, zero_notices: bool = False
    ) -> None:
        """Push every owed page exactly once; demanded runs jump the queue.

        With ``zero_notices`` (pure post-copy: every page owed), the all-zero
        pages of each batch go as a zero notice (PAGES with FLAG_ZERO, no
        payload) instead of their bytes.
        """
        region = self.region
        ps = region.page_size
        npages = region.npages
        self.owed = owed
        last = npages - 1
        owed_bytes = count * ps - ((npages * ps - region.nbytes) if int(owed[last >> 6]) >> (last & 63) & 1 else 0)
        with self.stats.lock:
            self.stats.status = "postcopy-active"
            self.stats.remaining_bytes = count * ps
        self.report(force=True)
        # demand latency: bound what the kernel holds ahead of a demanded page (the destination bounds its side)
        self.conn.bound_queue(send=POSTCOPY_SNDBUF)
        demands: collections.deque[tuple[int, int]] = collections.deque()
        done = threading.Event()
        errors: list[BaseException] = []

        def reader() -> None:
            try:
                while True:
                    header = self.read_header("waiting for post-copy demands")
                    if header.type is P.Frame.ERROR:
                        raise self.peer_error(header)
                    P.expect(header, (P.Frame.DEMAND, P.Frame.DONE), "post-copy")
                    if header.type is P.Frame.DONE:
                        done.set()
                        return
                    if not 0 < header.count <= P.MAX_RUNS:
                        raise ProtocolError(f"DEMAND with {header.count} runs")
                    table = self.read_body(header, P.MAX_RUNS * P.RUN_SIZE, "reading DEMAND", exact=header.count * P.RUN_SIZE)
                    runs = P.decode_runs(table, header.count)
                    P.validate_runs(runs, npages)
                    with self.stats.lock:
                        self.stats.postcopy_requests += 1
                    demands.extend((int(a), int(a + n)) for a, n in runs)
            except BaseException as exc:  # noqa: BLE001 - handed to the sender loop
                errors.append(exc)
                done.set()

        thread = threading.Thread(target=reader, name="migcore-postcopy-demands", daemon=True)
        thread.start()
        try:
            remaining = count
            cursor = 0
            cap = self.batch_cap(postcopy=True)
            out = np.empty((BATCH_RUNS, 2), dtype=np.uint64)
            zeros = new_bitmap(npages) if zero_notices else None
            # background pages are taken from a window of owed pages (wider with zero notices: a zero page
            # adds no payload); ``scanned``: the background zero scan reached this page
            window = cap * ZERO_WINDOW if zero_notices else cap
            self.scanned = 0
            while remaining:
                if errors:
                    raise errors[0]
                runs = self.next_demanded(demands, owed, out, cap)
                demanded = runs is not None
                has_zero = demanded  # a demanded batch is scanned below
                if runs is None:
                    nruns, resume = _kernels.dirty_runs(owed, npages, out, cursor, max(1, window // ps))
                    if nruns == 0:
                        raise AssertionError("owed pages vanished from the owed bitmap")
                    runs = out[:nruns]
                    sizes = np.cumsum(runs[:, 1].astype(np.int64)) * ps
                    keep = max(1, int(np.searchsorted(sizes, window, side="right")))
                    runs = runs[:keep].copy()
                    cursor = int(runs[-1, 0] + runs[-1, 1]) if keep < nruns else resume
                    if zeros is not None:  # the window's zero pages cost no payload: cut it at ``cap`` of data
                        runs, cursor, has_zero = self.cut_window(runs, cursor, zeros, cap)
                # exactly once: a page leaves the owed bitmap before its bytes go out
                for first, n in runs.tolist():
                    _kernels.clear_bits(owed, first, first + n)
                remaining -= int(runs[:, 1].sum())
                if zeros is not None and has_zero:
                    runs, zero_runs = self.split_zero(runs, zeros, scan=demanded)
                    if len(zero_runs):
                        self.send_zero_notice(zero_runs)
                    if not len(runs):
                        continue
                # demand pages are never held back; the background push obeys postcopy_bandwidth_limit
                bucket = None if demanded else self.postcopy_bucket
                if hash_into is not None:  # the final hash of a frozen page, taken as it goes out
                    _kernels.hash_runs(self.region.view, ps, runs, hash_into)
                self.send_runs(runs, phase="post-copy", flags=P.FLAG_POSTCOPY, bucket=bucket)
            if hash_into is None:
                self.send_frame(P.encode_header(P.Frame.END), "sending END")
            else:  # every owed page was hashed on its way out: END carries the digest of the pause
                digest = P.table_digest(hash_into)
                self.send_frame(P.encode_header(P.Frame.END, length=len(digest)) + digest, "sending END")
            if not done.wait(self.opts.timeout):
                raise MigrationTimeout(f"the destination did not confirm post-copy within {self.opts.timeout:g} s")
            if errors:
                raise errors[0]
        except PeerLostError as exc:
            # the destination confirms post-copy pages only all at once (DONE): every page owed at
            # the switch is still owed from the source's point of view; some never left at all
            unsent = int(_kernels.count_bits(owed))
            raise PeerLostError(
                f"{exc}; after the post-copy switch the destination has not confirmed {count} owed pages "
                f"({unsent} never sent); migration {self.mid.hex()} can be resumed from the source's buffer",
                owed_pages=count,
                owed_bytes=owed_bytes,
                migration_id=self.mid.hex(),
            ) from exc
        finally:
            self.conn.close()
            thread.join()

    def send_zero_notice(self, runs: U64) -> None:
        """PAGES frames with FLAG_ZERO: these owed pages are all zero (their hashes are already the zero hash)."""
        assert self.accept is not None
        pages = int(runs[:, 1].sum())
        step = max(1, min(BATCH_RUNS, self.accept.max_runs))
        for i in range(0, len(runs), step):
            part = runs[i : i + step]
            header = P.encode_runs_header(P.Frame.PAGES, part, 0, flags=P.FLAG_POSTCOPY | P.FLAG_ZERO)
            self.send_frame(header, "sending a zero notice (post-copy)")
        payload = P.runs_payload(runs, self.region.page_size, self.region.nbytes)
        with self.stats.lock:
            self.stats.zero_pages += pages
            self.stats.remaining_bytes = max(0, self.stats.remaining_bytes - payload)

    def next_demanded(self, demands: collections.deque[tuple[int, int]], owed: U64, out: U64, cap: int) -> U64 | None:
        """The next batch of still-owed pages inside the oldest demanded range, or None."""
        ps = self.region.page_size
        while demands:
            first, stop = demands[0]
            k = runs_in(owed, first, stop, out, max(1, cap // ps))
            if k == 0:
                demands.popleft()
                continue
            runs = out[:k]
            sizes = np.cumsum(runs[:, 1].astype(np.int64)) * ps
            keep = max(1, int(np.searchsorted(sizes, cap, side="right")))
            runs = runs[:keep].copy()
            end = int(runs[-1, 0] + runs[-1, 1])
            if keep < k or k == len(out):
                demands[0] = (end, stop)
            else:
                demands.popleft()
            return runs
        return None
