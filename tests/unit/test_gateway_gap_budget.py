"""Unit tests for gateway.gap_budget: a gap gets bounded time and reads, with backoff."""

from __future__ import annotations

from gateway.gap_budget import HISTORY_RETRY_INITIAL_S, HISTORY_RETRY_MAX_S, GapBudget


def test_failures_back_off_and_stop_at_the_attempt_limit() -> None:
    budget = GapBudget(started_s=0.0, budget_s=1000.0, max_attempts=6)
    delays = [budget.after_failure(0.0) for _ in range(6)]
    assert delays[:5] == [HISTORY_RETRY_INITIAL_S * 2**n for n in range(4)] + [HISTORY_RETRY_MAX_S]
    assert delays[5] is None  # the sixth failure spends the budget


def test_the_deadline_ends_the_budget_before_the_attempts_do() -> None:
    budget = GapBudget(started_s=100.0, budget_s=10.0, max_attempts=1000)
    now = 100.0
    reads = 0
    while (delay := budget.after_failure(now)) is not None:
        now += delay + 1.0  # each read takes a second to fail
        reads += 1
        assert reads < 100
    assert now < budget.deadline_s and not budget.expired(now)
    assert budget.expired(110.0)


def test_a_budget_is_measured_from_when_the_gap_opened() -> None:
    budget = GapBudget(started_s=0.0, budget_s=5.0)
    assert budget.after_failure(4.9) is None  # the retry would start past the deadline
