"""The source's state machine: handshake, pre-copy rounds, convergence, switchover, post-copy.

The rounds compare each page's current hash with the hash the destination
acknowledged storing (DESIGN.md rule 1), so a page that changed and changed
back while it was being sent is still resent. The pause ends with a pass that
finds the last dirty pages and the full hash table at once; the destination
commits only when its table matches (rule 2). Until the destination confirms
the switchover, any failure leaves the source buffer untouched and calls the
user's ``resume`` if ``pause`` had been called (rule 3).

Where the pages go is the link's business (``_source_link.SourceLink``: a
connection, or shared storage); what to send and when is decided here, with
the convergence policy (``_convergence``) after each round and the post-copy
push (``_postcopy_push``) after a switch.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from migcore import _control, _kernels, _local, _passes, _recoverable, _residency
from migcore import _protocol as P
from migcore._convergence import Action, Convergence
from migcore._delta import DEFAULT_CACHE_BYTES
from migcore._errors import MigrationCancelled, MigrationError, MigrationTimeout, PeerLostError
from migcore._postcopy_push import PostcopyPush, owed_bytes
from migcore._region import Region, U64, fit_runs, new_bitmap
from migcore._source_link import SourceLink
from migcore._stats import MigrationStats, StatsRecorder
from migcore._trackers import (
    HashTracker,
    Tracker,
    hash_delta_parallel,
    make_tracker,
    runs_to_pages,
    zero_page_hashes,
)

log = logging.getLogger("migcore")

#: Seconds between progress reports inside a long round.
PROGRESS_INTERVAL = 0.1
#: Rows of the runs table one batch is cut from.
BATCH_RUNS = 256


#: Builds the migration's link once the engine has its statistics and its progress callback.
LinkFactory = Callable[[Region, StatsRecorder, Callable[[], None]], SourceLink]


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

    @property
    def features(self) -> int:
        """The HELLO feature bits these options need."""
        features = P.FEATURE_POSTCOPY if self.mode in ("postcopy", "hybrid") or self.on_stall == "postcopy" else 0
        if self.delta:
            features |= P.FEATURE_DELTA
        if self.compress is not None:
            features |= P.FEATURE_COMPRESS
        if self.streams > 1:
            features |= P.FEATURE_STREAMS
        return features


class Source:
    """One outgoing migration of ``region``, over the link ``open_link`` builds."""

    def __init__(
        self, region: Region, opts: SourceOptions, open_link: LinkFactory, *, migration_id: bytes | None = None
    ) -> None:
        self.region = region
        self.opts = opts
        self.open_link = open_link
        self.link: SourceLink | None = None
        self.mid = uuid.uuid4().bytes if migration_id is None else migration_id
        self.stats = StatsRecorder(
            mode=opts.mode,
            tracker=opts.tracker,
            migration_id=self.mid.hex(),
            page_size=region.page_size,
            total_bytes=region.nbytes,
        )
        self.stats.update(streams=opts.streams, compress=opts.compress or "")
        self.control = _control.current()
        if self.control is not None:
            self.control.attach(self.stats)
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
        self.rounds_sent = 0

    def report(self, force: bool = False) -> None:
        """Call the user's progress callback (at most every PROGRESS_INTERVAL unless forced).

        Also where a cancel request from a :class:`migcore.Migration` handle
        takes effect, as long as the program was not paused yet.
        """
        self.check_cancel()
        if self.opts.progress is None:
            return
        now = time.monotonic()
        if not force and now - self.last_progress < PROGRESS_INTERVAL:
            return
        self.last_progress = now
        self.opts.progress(self.stats.snapshot())

    # -- the whole run -------------------------------------------------------

    def run(self) -> MigrationStats:
        _local.add_source(self.mid)
        try:
            self.link = self.open_link(self.region, self.stats, self.report)
            self.handshake()
            self.stats.activate()
            self.report(force=True)
            mode = self.opts.mode
            if mode in ("stopcopy", "postcopy"):
                self.switch(zero_page_hashes(self.region), postcopy=(mode == "postcopy"), first=True)
            else:
                tracker = make_tracker(self.opts.tracker, self.region)
                try:
                    baseline, postcopy = self.precopy(tracker)
                    self.switch(baseline, postcopy=postcopy, first=False)
                finally:
                    tracker.close()
        except BaseException as exc:
            err = self.link.cause(exc) if self.link is not None else exc
            self.fail(err)
            if err is exc:
                raise
            raise err from exc
        finally:
            _local.remove_source(self.mid)
            if self.link is not None:
                self.link.close()
            if self.policy.throttle_level and self.opts.throttle is not None:
                self.policy.throttle_level = 0
                self.stats.update(throttle_percentage=0)
                self.opts.throttle(0)
        return self.stats.snapshot()

    def handshake(self) -> None:
        assert self.link is not None
        self.accept = self.link.open(self.hello())

    def hello(self) -> P.Hello:
        opts, region = self.opts, self.region
        declared = P.UNKNOWN_SIZE if callable(opts.state) else len(memoryview(opts.state).cast("B"))
        return P.Hello(
            version=P.PROTOCOL_VERSION,
            page_size=region.page_size,
            nbytes=region.nbytes,
            mode=opts.mode,
            tracker=opts.tracker,
            features=opts.features,
            compat=opts.compat,
            migration_id=self.mid,
            state_size=declared,
            streams=opts.streams,
            codec=opts.compress,
        )

    def fail(self, exc: BaseException) -> None:
        """Clean up after a failure: rule 3 before the switchover, keep what is owed after it."""
        cancelled = isinstance(exc, MigrationCancelled)
        self.stats.finish("cancelled" if cancelled else "failed", str(exc))
        if self.link is not None:
            self.link.fail(exc, switched=self.switched)
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

    # -- sending pages -------------------------------------------------------

    def send_bitmap(self, dirty: U64, *, phase: str, hash_into: U64 | None = None) -> U64:
        """Send every page set in ``dirty`` in bounded batches; return the runs sent (in send order)."""
        assert self.accept is not None and self.link is not None
        region = self.region
        ps = region.page_size
        cap = self.link.batch_cap()
        out = self.batch_runs[: max(1, min(BATCH_RUNS, self.accept.max_runs))]
        cursor = 0
        sent: list[U64] = []
        while cursor < region.npages:
            nruns, resume = _kernels.dirty_runs(dirty, region.npages, out, cursor, max(1, cap // ps))
            if nruns == 0:
                break
            keep = fit_runs(out[:nruns], cap, ps)  # runs fitting in one batch
            runs = out[:keep].copy()
            if keep < nruns:
                resume = int(runs[-1, 0] + runs[-1, 1])  # the next run starts at or after this page
            if hash_into is not None:  # the final hash of a frozen page, taken as it goes out
                _kernels.hash_runs(region.view, ps, runs, hash_into)
            self.link.send(runs, phase)
            sent.append(runs)
            cursor = resume
        return np.concatenate(sent) if sent else np.empty((0, 2), dtype=np.uint64)

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
            self.stats.round_planned(count, count * region.page_size)
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
        assert self.link is not None
        started = time.monotonic()
        runs = self.send_bitmap(dirty, phase=f"round {rnd}")
        payload = P.runs_payload(runs, self.region.page_size, self.region.nbytes) if len(runs) else 0
        # the destination acknowledges a round's pages in page order, whichever stream carried them
        runs = runs[np.argsort(runs[:, 0], kind="stable")]
        self.rounds_sent = rnd + 1
        npg = int(runs[:, 1].sum()) if len(runs) else 0
        hashes = self.link.end_round(rnd, runs, npg)
        if len(runs):
            # rule 1: the next round compares with what the destination stored, not what was sent
            if isinstance(tracker, HashTracker):
                tracker.acknowledge(runs, hashes)
            else:
                baseline[runs_to_pages(runs)] = hashes
            self.link.stored(runs, hashes)
        self.policy.observe(payload, time.monotonic() - started)
        return npg

    # -- the pause -------------------------------------------------------------

    def check_cancel(self) -> None:
        """Raise :class:`MigrationCancelled` if the handle asked to cancel and the program still runs."""
        if self.control is not None and self.control.cancel_requested.is_set() and self.paused_at is None:
            raise MigrationCancelled("the migration was cancelled before the pause; the source is untouched")

    def do_pause(self) -> None:
        if self.control is not None and not self.control.enter_pause():
            self.check_cancel()
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

    # -- the switchover --------------------------------------------------------

    def switch(self, baseline: U64, *, postcopy: bool, first: bool) -> None:
        """Pause, send what is left (or the owed list) and the state, and wait for the destination's commit."""
        assert self.link is not None
        # nothing sent yet (stop-and-copy, pure post-copy): hash each page as it goes, not all at the pause
        lazy = table = None
        deferred = first and postcopy
        if deferred:
            # pure post-copy: owe every page, find the zero ones lazily as the push reaches them; the
            # owed list is known before the pause and goes as "every page" (no bitmap), so nothing in
            # the pause grows with the region
            dirty, count = _passes.all_pages(self.region, self.stats)
        self.do_pause()
        if first and not deferred:
            dirty, lazy, count = _passes.nonzero_pass(self.region, self.stats, self.opts.threads)
            self.stats.update(zero_pages=self.region.npages - count)
        elif not first:
            dirty, table, count = _passes.final_pass(self.region, self.stats, baseline, self.opts.threads)
        runs = np.empty((0, 2), dtype=np.uint64) if postcopy else self.send_bitmap(
            dirty, phase="stop-and-copy", hash_into=lazy
        )
        if deferred:  # a digest of zeros: "the digest comes with END", once every owed page was hashed
            digest = bytes(P.DIGEST_SIZE)
        else:
            final = lazy if lazy is not None else table
            assert final is not None
            digest = P.table_digest(final)
        self.link.end_pages(self.rounds_sent, runs)
        state = self.get_state()
        self.stats.update(state_bytes=len(state))
        self.link.send_state(state)
        if not postcopy:
            self.link.commit(digest)
            self.await_confirmation(self.link.confirm_commit)
            self.finish_ok()
            return
        self.link.switch(digest, None if deferred else dirty)
        self.await_confirmation(self.link.confirm_switch)
        self.stats.update(downtime=time.monotonic() - (self.paused_at or time.monotonic()))
        resident = None
        if deferred:  # after the switch, not in the pause: the table of a zero region, hashed into as pages go
            lazy = zero_page_hashes(self.region)
            # the region stays frozen from now on: pages without memory behind them are zero unread
            resident = _residency.resident_pages(self.region)
        # zero notices only where nothing was sent before the switch; hybrid keeps its final pass (the
        # owed pages are the dirty ones, and a page that became zero is sent as a page like any other)
        self.postcopy(dirty, count, hash_into=lazy, zero_notices=deferred, resident=resident)
        self.finish_ok()

    def await_confirmation(self, confirm: Callable[[], None]) -> None:
        """Wait for the destination's confirmation; a lost link now leaves the outcome in doubt."""
        self.in_doubt = True
        try:
            confirm()
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
        assert self.link is not None
        self.stats.completed(time.monotonic() - (self.paused_at or time.monotonic()))
        downtime = self.stats.snapshot().downtime
        if self.paused_at is not None and downtime > self.opts.downtime_limit:
            self.stats.update(downtime_limit_exceeded=True)
            log.warning(
                "source: migration %s paused the program %.1f ms, over its downtime_limit of %.1f ms",
                self.mid.hex(), downtime * 1e3, self.opts.downtime_limit * 1e3,
            )
        self.link.close()
        self.report(force=True)
        log.info("source: migration %s completed", self.mid.hex())

    # -- post-copy ---------------------------------------------------------------

    def postcopy(
        self,
        owed: U64,
        count: int,
        *,
        hash_into: U64 | None,
        zero_notices: bool,
        resident: U64 | None,
        digest: bytes | None = None,
    ) -> None:
        """Push every owed page exactly once (``_postcopy_push``); report what is still owed if the link breaks."""
        assert self.link is not None
        nbytes = owed_bytes(self.region, owed, count)
        self.stats.update(status="postcopy-active", remaining_bytes=count * self.region.page_size)
        self.report(force=True)
        self.link.begin_postcopy()
        push = PostcopyPush(
            self.region,
            self.link,
            self.stats,
            owed,
            hash_into=hash_into,
            zero_notices=zero_notices,
            resident=resident,
            timeout=self.opts.timeout,
            digest=digest,
        )
        try:
            push.run(count)
        except (PeerLostError, MigrationTimeout) as exc:
            _recoverable.remember(self.mid, _passes.frozen_digest(self.region))
            if isinstance(exc, MigrationTimeout):
                raise
            # the destination confirms post-copy pages only all at once (DONE): every page owed at
            # the switch is still owed from the source's point of view; some never left at all
            unsent = int(_kernels.count_bits(owed))
            raise PeerLostError(
                f"{exc}; after the post-copy switch the destination has not confirmed {count} owed pages "
                f"({unsent} never sent); migcore.recover(buffer, address, {self.mid.hex()!r}) continues it",
                owed_pages=count,
                owed_bytes=nbytes,
                migration_id=self.mid.hex(),
            ) from exc

    # -- recovery ----------------------------------------------------------------

    def recover(self) -> MigrationStats:
        """Continue a post-copy migration whose link was lost: resend what the destination still lacks."""
        _local.add_source(self.mid)
        try:
            digest = _passes.frozen_digest(self.region)
            _recoverable.check_unchanged(self.mid, digest)
            self.switched = True  # the program lives on the destination: a failure never resumes it here
            self.link = self.open_link(self.region, self.stats, self.report)
            owed = self.link.recover(self.hello())
            self.accept = P.Accept(P.UNKNOWN_SIZE, P.DEFAULT_MAX_PAYLOAD, P.MAX_RUNS, 0)
            count = int(_kernels.count_bits(owed))
            self.stats.activate()
            self.stats.update(recoveries=1)
            log.info("source: recovering migration %s, %d pages still owed", self.mid.hex(), count)
            # zero pages go as zero notices; every resent page is read from the frozen buffer
            self.postcopy(owed, count, hash_into=None, zero_notices=True, resident=None, digest=digest)
            self.stats.completed()
            self.link.close()
            self.report(force=True)
            _recoverable.forget(self.mid)
            log.info("source: migration %s recovered and completed", self.mid.hex())
        except BaseException as exc:
            self.fail(self.link.cause(exc) if self.link is not None else exc)
            raise
        finally:
            _local.remove_source(self.mid)
            if self.link is not None:
                self.link.close()
        return self.stats.snapshot()
