"""The bandwidth limit: token-bucket accounting with a fake clock, and limited migrations (no timing asserts)."""

from __future__ import annotations

import threading

import pytest

import migcore
from migcore._bandwidth import TokenBucket

from _modes import MIB, migrate_live


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0
        self.lock = threading.Lock()

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        assert seconds > 0
        with self.lock:
            self.now += seconds


def test_bucket_never_lets_more_than_burst_plus_rate_times_time() -> None:
    clock = FakeClock()
    bucket = TokenBucket(1_000_000, burst=100_000, clock=clock, sleep=clock.sleep)
    taken = 0
    for size in [50_000, 100_000, 300_000, 1, 99_999, 250_000] * 20:
        bucket.take(size)
        taken += size
        # after take() returns, the bytes taken so far fit in what the bucket allowed by now
        assert taken <= bucket.burst + bucket.rate * clock.now + 1e-6
    # and it did not hold back more than needed: the debt is paid exactly
    assert taken == pytest.approx(bucket.burst + bucket.rate * clock.now, rel=1e-9)


def test_bucket_refills_while_idle_but_not_beyond_the_burst() -> None:
    clock = FakeClock()
    bucket = TokenBucket(1000, burst=500, clock=clock, sleep=clock.sleep)
    assert bucket.take(500) == 0
    clock.now += 100.0  # a long pause does not build credit beyond the burst
    assert bucket.take(500) == 0
    assert bucket.take(1000) == pytest.approx(1.0)


def test_a_batch_bigger_than_the_bucket_is_split() -> None:
    bucket = TokenBucket(10 << 20)
    assert bucket.max_batch(4096) == bucket.burst < 8 << 20
    assert TokenBucket(1).max_batch(65536) == 65536  # never less than a page


def test_concurrent_takers_share_the_rate() -> None:
    clock = FakeClock()
    bucket = TokenBucket(1_000_000, burst=10_000, clock=clock, sleep=clock.sleep)
    threads = [threading.Thread(target=lambda: [bucket.take(10_000) for _ in range(50)]) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert bucket.taken == 2_000_000
    assert bucket.taken <= bucket.burst + bucket.rate * clock.now + 1e-6


def test_convergence_uses_the_limited_rate() -> None:
    bucket = TokenBucket(1000)
    assert bucket.effective_rate(1e9) == 1000
    assert bucket.effective_rate(10) == 10
    assert bucket.effective_rate(0) == 1000


def test_limited_migration_is_exact_and_accounts_its_waits() -> None:
    # 4 MiB at 16 MiB/s: the limiter must hold traffic back; no wall-clock assertion
    stats, _ = migrate_live(bandwidth_limit=16 * MIB, nbytes=4 * MIB, mode="precopy", downtime_limit=1.0)
    assert stats.bandwidth_wait > 0


def test_postcopy_limit_holds_back_only_the_background_push() -> None:
    stats, got = migrate_live(mode="postcopy", postcopy_bandwidth_limit=8 * MIB, nbytes=2 * MIB)
    assert stats.bandwidth_wait > 0 and got.stats.verified


@pytest.mark.parametrize("bad", [0, -1, float("inf"), float("nan"), "fast", True])
def test_limits_are_checked(bad: object) -> None:
    with pytest.raises(ValueError, match="bandwidth_limit"):
        migcore.migrate(bytearray(4096), "tcp://127.0.0.1:9", bandwidth_limit=bad)  # type: ignore[arg-type]


def test_postcopy_limit_refused_without_postcopy() -> None:
    with pytest.raises(ValueError, match="never post-copies"):
        migcore.migrate(bytearray(4096), "tcp://127.0.0.1:9", mode="precopy", postcopy_bandwidth_limit=1e6)
