"""A token bucket that caps the page traffic of a migration (QEMU's ``max-bandwidth``).

The bucket holds at most ``burst`` bytes and refills at ``rate`` bytes per
second. ``take(n)`` spends ``n`` bytes at once and, when that leaves the
bucket in debt, sleeps until the debt is repaid, so over any interval the
bytes taken never exceed ``burst + rate * elapsed``. The sender keeps each
batch no larger than ``burst`` (``max_batch``), which is what "a batch bigger
than the bucket is split" means in practice. The clock and the sleep are
injectable so that the accounting can be tested without waiting.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable

#: Seconds of traffic the bucket may hold: the largest burst above the rate.
BURST_SECONDS = 0.02
#: The bucket never holds less than this (one large batch of small pages).
MIN_BURST = 64 << 10


def check_rate(name: str, value: float | None) -> float | None:
    """``value`` as a positive finite number of bytes per second, or None (no limit)."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < math.inf:
        raise ValueError(f"{name} must be a positive number of bytes per second or None, got {value!r}")
    return float(value)


class TokenBucket:
    """Thread-safe byte budget refilled at ``rate`` bytes/s, holding at most ``burst`` bytes."""

    def __init__(
        self,
        rate: float,
        burst: int | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], object] = time.sleep,
    ) -> None:
        if not 0 < rate < math.inf:
            raise ValueError(f"rate must be a positive finite number of bytes per second, got {rate!r}")
        self.rate = float(rate)
        self.burst = int(burst if burst is not None else max(MIN_BURST, rate * BURST_SECONDS))
        if self.burst <= 0:
            raise ValueError("burst must be positive")
        self._clock = clock
        self._sleep = sleep
        self._lock = threading.Lock()
        self._tokens = float(self.burst)
        self._stamp = clock()
        #: Bytes taken so far (for tests and stats).
        self.taken = 0
        #: Seconds spent sleeping so far.
        self.slept = 0.0

    def max_batch(self, page_size: int) -> int:
        """The largest batch a sender should build: the bucket's size, at least one page."""
        return max(page_size, self.burst)

    def take(self, n: int) -> float:
        """Spend ``n`` bytes; sleep while the bucket is in debt. Returns the seconds slept."""
        with self._lock:
            now = self._clock()
            self._tokens = min(float(self.burst), self._tokens + (now - self._stamp) * self.rate)
            self._stamp = now
            self._tokens -= n
            self.taken += n
            wait = -self._tokens / self.rate if self._tokens < 0 else 0.0
            if wait > 0:
                # the debt is repaid by the time the sleep ends: account for it now, so a
                # concurrent taker queues behind this one instead of double-counting the refill
                self._tokens = 0.0
                self._stamp = now + wait
                self.slept += wait
        if wait > 0:
            self._sleep(wait)
        return wait

    def effective_rate(self, measured: float) -> float:
        """The rate the convergence estimate should use: the measured one, capped by the limit."""
        return min(measured, self.rate) if measured > 0 else self.rate
