"""The deadlines of a connection's requests that share one timeout (services/connection.py,
RequestDeadlines): one timer for all of them, oldest first (issue 17)."""

from __future__ import annotations

from services.connection import DEADLINE_SLACK_S, RequestDeadlines


def test_requests_fall_due_in_the_order_they_were_sent() -> None:
    deadlines = RequestDeadlines(2.0)
    assert deadlines.next_due() is None and deadlines.expire(100.0) == []
    deadlines.add(1, 10.0, "pubs")
    deadlines.add(2, 10.5, "pubs")
    deadlines.add(3, 11.0, "sub")
    assert deadlines.next_due() == 12.0 and len(deadlines) == 3
    assert deadlines.expire(11.9) == []
    assert deadlines.expire(12.0) == [(1, "pubs")]
    assert deadlines.next_due() == 12.5
    assert deadlines.expire(20.0) == [(2, "pubs"), (3, "sub")]
    assert deadlines.next_due() is None and len(deadlines) == 0


def test_an_answered_request_never_falls_due() -> None:
    deadlines = RequestDeadlines(1.0)
    for request_id in range(1, 6):
        deadlines.add(request_id, float(request_id), "pub")
    deadlines.discard(1)
    deadlines.discard(3)
    deadlines.discard(99)  # unknown (already expired, say): nothing happens
    assert deadlines.next_due() == 3.0
    assert deadlines.expire(100.0) == [(2, "pub"), (4, "pub"), (5, "pub")]


def test_a_timer_that_fires_a_little_early_still_times_out_what_is_due() -> None:
    deadlines = RequestDeadlines(1.0)
    deadlines.add(1, 0.0, "pub")
    assert deadlines.expire(1.0 - DEADLINE_SLACK_S / 2) == [(1, "pub")]
    deadlines.add(2, 0.0, "pub")
    assert deadlines.expire(1.0 - 2 * DEADLINE_SLACK_S) == []
