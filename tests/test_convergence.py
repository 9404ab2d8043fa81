"""The convergence policy, fed round figures: no socket, no region, no clock."""

from __future__ import annotations

import pytest

from migcore._convergence import (
    MIN_BANDWIDTH_SAMPLE,
    STALL_ROUNDS,
    THROTTLE_INCREMENT,
    THROTTLE_INITIAL,
    THROTTLE_MAX,
    Action,
    Convergence,
)


def policy(on_stall: str = "finish", *, limit: float = 0.3, max_rounds: int = 30, **kw: object) -> Convergence:
    p = Convergence(downtime_limit=limit, max_rounds=max_rounds, on_stall=on_stall, **kw)  # type: ignore[arg-type]
    p.start(1000)
    return p


def test_expected_downtime_under_the_limit_pauses() -> None:
    p = policy()
    p.observe(100 << 20, 1.0)
    expected = p.expected_downtime(10 << 20)
    assert expected == pytest.approx(0.1)
    assert p.after_round(1, 2560, expected).action is Action.FINISH


def test_a_shrinking_dirty_set_keeps_going_and_a_stuck_one_stalls() -> None:
    p = policy()
    for rnd, dirty in enumerate((900, 800, 700), start=1):  # shrinking: never stalled
        assert p.after_round(rnd, dirty, 10.0).action is Action.CONTINUE
    steps = [p.after_round(4 + i, 700, 10.0).action for i in range(STALL_ROUNDS)]
    assert steps == [Action.CONTINUE] * (STALL_ROUNDS - 1) + [Action.FINISH]


@pytest.mark.parametrize(("on_stall", "action"), [("finish", Action.FINISH), ("postcopy", Action.POSTCOPY), ("cancel", Action.CANCEL)])
def test_each_stall_policy_answers_its_action(on_stall: str, action: Action) -> None:
    p = policy(on_stall)
    steps = [p.after_round(i + 1, 1000, 10.0) for i in range(STALL_ROUNDS)]
    assert [s.action for s in steps[:-1]] == [Action.CONTINUE] * (STALL_ROUNDS - 1)
    assert steps[-1].action is action
    assert "did not converge" in steps[-1].reason


def test_max_rounds_ends_even_a_shrinking_migration() -> None:
    p = policy(max_rounds=3)
    assert p.after_round(1, 900, 10.0).action is Action.CONTINUE
    assert p.after_round(2, 800, 10.0).action is Action.CONTINUE
    assert p.after_round(3, 700, 10.0).action is Action.FINISH


def test_throttle_rises_in_steps_up_to_its_maximum_then_finishes_at_max_rounds() -> None:
    p = policy("throttle", can_throttle=True, max_rounds=1000)
    levels = []
    rnd = 0
    while len(levels) < 12:
        rnd += 1
        step = p.after_round(rnd, 1000, 10.0)
        if step.action is Action.THROTTLE:
            levels.append(step.level)
    expected = [min(THROTTLE_MAX, THROTTLE_INITIAL + i * THROTTLE_INCREMENT) for i in range(12)]
    assert levels == expected
    assert p.throttle_level == THROTTLE_MAX
    assert p.after_round(1000, 1000, 10.0).action is Action.FINISH  # no more rounds to slow down for


def test_throttle_without_a_callback_finishes() -> None:
    p = policy("throttle", can_throttle=False)
    steps = [p.after_round(i + 1, 1000, 10.0).action for i in range(STALL_ROUNDS)]
    assert steps[-1] is Action.FINISH


def test_a_small_round_does_not_replace_a_trustworthy_bandwidth_figure() -> None:
    p = policy()
    assert p.observe(MIN_BANDWIDTH_SAMPLE * 4, 1.0) == MIN_BANDWIDTH_SAMPLE * 4
    assert p.observe(10, 1.0) == MIN_BANDWIDTH_SAMPLE * 4  # too small to measure anything
    assert p.observe(MIN_BANDWIDTH_SAMPLE * 8, 2.0) == MIN_BANDWIDTH_SAMPLE * 4


def test_the_first_round_always_gives_a_figure_and_the_limit_caps_it() -> None:
    p = policy(bandwidth_cap=1e6)
    assert p.observe(10, 1.0) == 10.0  # the only figure there is
    assert p.observe(100 << 20, 0.5) == 1e6  # the next rounds cannot move faster than the limit
    assert p.expected_downtime(2_000_000) == pytest.approx(2.0)
