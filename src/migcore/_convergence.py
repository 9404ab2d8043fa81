"""Pre-copy's convergence policy: when to pause, when it stalled, and what to do then.

Pure arithmetic over round figures (pages still dirty, bytes moved, seconds
taken): no socket, no clock, no region. The source engine feeds it each
round and does what it answers, so the policy is tested by feeding it
numbers (``tests/test_convergence.py``) and a new stall policy is one branch
in :meth:`Convergence.after_round`.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass


#: Rounds without the dirty set shrinking before the migration counts as stalled.
STALL_ROUNDS = 3
#: Rounds that moved less than this give no trustworthy bandwidth figure.
MIN_BANDWIDTH_SAMPLE = 256 << 10
#: Throttle levels (percent) of ``on_stall="throttle"``: QEMU's auto-converge steps.
THROTTLE_INITIAL = 20
THROTTLE_INCREMENT = 10
THROTTLE_MAX = 99


class Action(enum.Enum):
    """What the source does after a round."""

    CONTINUE = "continue"  # another round
    FINISH = "finish"  # pause and send what is left
    POSTCOPY = "postcopy"  # pause and switch to post-copy
    THROTTLE = "throttle"  # slow the program down (``Step.level``), then another round
    CANCEL = "cancel"  # give up before the pause


@dataclass(frozen=True)
class Step:
    action: Action
    #: The throttle percentage to apply (THROTTLE only).
    level: int = 0
    #: Why, for the log and the cancel message.
    reason: str = ""


@dataclass
class Convergence:
    """The state of one pre-copy's convergence decisions.

    ``bandwidth_cap`` (bytes/s, the bandwidth limit) caps the measured rate
    in the downtime estimate: the next rounds cannot move faster than it.
    """

    downtime_limit: float
    max_rounds: int
    on_stall: str  # one of the on_stall names (finish, postcopy, throttle, cancel)
    can_throttle: bool = False
    bandwidth_cap: float | None = None
    #: The last trustworthy bandwidth estimate (bytes/s); 0 before the first round.
    bandwidth: float = 0.0
    #: The throttle percentage in force (0: none).
    throttle_level: int = 0
    _best: int = -1
    _stalled: int = 0

    def start(self, dirty_pages: int) -> None:
        """Round 0 is about to send ``dirty_pages``: the figure later rounds must beat."""
        self._best = dirty_pages
        self._stalled = 0

    def observe(self, payload: int, seconds: float) -> float:
        """A round moved ``payload`` bytes in ``seconds``; returns the bandwidth estimate to use."""
        if payload >= MIN_BANDWIDTH_SAMPLE or self.bandwidth == 0.0:
            self.bandwidth = max(payload / max(seconds, 1e-6), 1.0)
        if self.bandwidth_cap is not None:
            self.bandwidth = min(self.bandwidth, self.bandwidth_cap) if self.bandwidth > 0 else self.bandwidth_cap
        return self.bandwidth

    def expected_downtime(self, remaining_bytes: int) -> float:
        """Seconds a pause now would take to send ``remaining_bytes`` at the estimated bandwidth."""
        return remaining_bytes / self.bandwidth if self.bandwidth > 0 else float("inf")

    def after_round(self, rounds: int, dirty_pages: int, expected: float) -> Step:
        """The decision after ``rounds`` rounds, with ``dirty_pages`` dirty and ``expected`` downtime."""
        if expected <= self.downtime_limit:
            return Step(Action.FINISH, reason="expected downtime under the limit")
        if self._best < 0 or dirty_pages < self._best:
            self._best = dirty_pages
            self._stalled = 0
        else:
            self._stalled += 1
        if self._stalled < STALL_ROUNDS and rounds < self.max_rounds:
            return Step(Action.CONTINUE)
        why = f"pre-copy did not converge after {rounds} rounds ({dirty_pages} pages still dirty)"
        if self.on_stall == "cancel":
            return Step(Action.CANCEL, reason=why)
        if self.on_stall == "postcopy":
            return Step(Action.POSTCOPY, reason=why)
        if self.on_stall == "throttle" and rounds < self.max_rounds and self.can_throttle:
            level = THROTTLE_INITIAL if not self.throttle_level else self.throttle_level + THROTTLE_INCREMENT
            self.throttle_level = min(THROTTLE_MAX, level)
            self._stalled = 0
            self._best = dirty_pages
            return Step(Action.THROTTLE, level=self.throttle_level, reason=why)
        return Step(Action.FINISH, reason=why)
