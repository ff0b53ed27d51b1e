"""The paced commit interval, and the hand-off's, follow the rate of writes (webapp_stub/commit_pacer.py):
no clock, no loop."""

from __future__ import annotations

import pytest

from webapp_stub.commit_pacer import (
    COMMIT_INTERVAL_CAP_S,
    COMMIT_PACING_BASE_RATE_PER_S,
    HANDOFF_INTERVAL_CAP_S,
    HANDOFF_PACING_BASE_RATE_PER_S,
    CommitPacer,
    handoff_interval_s,
)


def steady(pacer: CommitPacer, rate_per_s: float, commits: int = 60) -> float:
    """Commits that each carry what ``rate_per_s`` brings in one interval, back to back; the time after."""
    at = 0.0
    for _ in range(commits):
        interval_s = pacer.interval_s
        pacer.committed(at, round(rate_per_s * interval_s))
        at += interval_s
    return at


def test_the_defaults() -> None:
    assert (COMMIT_PACING_BASE_RATE_PER_S, COMMIT_INTERVAL_CAP_S) == (500.0, 0.02)


def test_before_any_load_the_interval_is_the_minimum() -> None:
    pacer = CommitPacer(0.005)
    assert pacer.interval_s == 0.005
    pacer.committed(10.0, 40)  # the first commit: no gap to measure a rate over
    assert pacer.rate_per_s == 0.0 and pacer.interval_s == 0.005


@pytest.mark.parametrize(
    ("rate_per_s", "interval_s"),
    [(100, 0.005), (500, 0.005), (1_000, 0.010), (1_500, 0.015), (2_000, 0.020), (3_000, 0.020), (20_000, 0.020)],
)
def test_the_interval_grows_with_the_rate_above_the_base_up_to_the_cap(rate_per_s: int, interval_s: float) -> None:
    pacer = CommitPacer(0.005)
    steady(pacer, rate_per_s)
    assert pacer.interval_s == pytest.approx(interval_s, rel=0.03)


def test_the_interval_falls_back_when_the_load_does() -> None:
    pacer = CommitPacer(0.005)
    at = steady(pacer, 2_000)
    assert pacer.interval_s == pytest.approx(0.02, rel=0.03)
    for n in range(30):  # then 200 writes per second: one every 5 ms
        pacer.committed(at + 0.005 * (n + 1), 1)
    assert pacer.interval_s == 0.005


def test_lone_writes_in_consecutive_turns_never_look_like_load() -> None:
    """At light load a commit of one write may follow another within a millisecond: the gap is
    taken as at least the minimum interval, so such commits count at most 1/min_interval_s."""
    pacer = CommitPacer(0.005)
    for n in range(200):
        pacer.committed(n * 0.0001, 1)
    assert pacer.rate_per_s <= 200.0 + 1e-9 and pacer.interval_s == 0.005


def test_pacing_off_and_a_cap_below_the_minimum() -> None:
    off = CommitPacer(0.0)
    steady(off, 5_000)
    assert off.interval_s == 0.0 and off.rate_per_s == 0.0
    capped = CommitPacer(0.01, max_interval_s=0.002)  # the cap never shortens the minimum
    steady(capped, 5_000)
    assert capped.interval_s == 0.01


def test_the_base_rate_and_the_cap_are_the_callers() -> None:
    pacer = CommitPacer(0.004, max_interval_s=0.1, base_rate_per_s=100.0)
    steady(pacer, 1_000)
    assert pacer.interval_s == pytest.approx(0.04, rel=0.03)


def test_after_a_pause_the_load_of_before_is_forgotten() -> None:
    """A burst at 2,000 writes per second (20 ms), then a second of silence: the next commit's
    rate is its own, and the next paced batch waits the minimum, not the burst's 20 ms."""
    pacer = CommitPacer(0.005)
    at = steady(pacer, 2_000)
    assert pacer.interval_s == pytest.approx(0.02, rel=0.03)
    pacer.committed(at + 1.0, 2)
    assert pacer.rate_per_s < 3.0 and pacer.interval_s == 0.005


def test_at_a_steady_rate_a_commit_weighs_no_more_than_the_time_it_covers() -> None:
    """A commit 10 ms after the one before weighs RATE_WEIGHT, a fifth (the time alone would give
    it 1 - e^-0.1, a tenth): one commit twice as full moves the interval a fifth of the way."""
    pacer = CommitPacer(0.005)
    at = steady(pacer, 1_000)  # 10 ms
    pacer.committed(at, 20)  # 2,000 writes per second over this 10 ms
    assert 0.011 < pacer.interval_s < 0.013


@pytest.mark.parametrize(
    ("rate_per_s", "interval_s"),
    [(0, 0.0), (500, 0.0), (1_000, 0.0), (1_250, 0.0075), (1_500, 0.015), (2_000, 0.03), (3_000, 0.03), (1e6, 0.03)],
)
def test_the_handoff_is_paced_only_above_its_base_rate_up_to_its_cap(rate_per_s: float, interval_s: float) -> None:
    assert (HANDOFF_PACING_BASE_RATE_PER_S, HANDOFF_INTERVAL_CAP_S) == (1000.0, 0.03)
    got = handoff_interval_s(rate_per_s, HANDOFF_PACING_BASE_RATE_PER_S, HANDOFF_INTERVAL_CAP_S)
    assert got == pytest.approx(interval_s)


def test_the_handoff_pacing_is_off_with_a_cap_of_zero_and_its_base_is_the_callers() -> None:
    assert handoff_interval_s(5_000, 1_000, 0.0) == 0.0
    assert handoff_interval_s(3_000, 2_000, 0.04) == pytest.approx(0.02)
