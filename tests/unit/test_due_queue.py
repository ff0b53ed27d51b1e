"""webapp_stub.due_queue: the fair order over the whole due set, the bounded rate, the
yield-to-live rule. Plain objects in, plain objects out: no clock, no SQLite."""

from __future__ import annotations

import math

import pytest

from tests.support import FakeClock
from webapp_stub.due_queue import LIVE_POLL_S, OUTBOX_POLL_S, DueItem, DueQueue, FairQueue, LiveFirst, fair_order

T0 = 1_700_000_000.0


def item(iid: str, team: str = "T1", lane: str = "C1", due_at: float = T0, kind: str = "test") -> DueItem:
    return DueItem(iid, kind, team, lane, due_at)


# -- fair order ----------------------------------------------------------------------------------


def test_same_second_round_robins_across_teams_then_lanes() -> None:
    # team T1 has a busy channel (4 items) and a quiet one; T2 has one item
    items = [item(f"a{i}", "T1", "C-busy", T0 + i * 0.01) for i in range(4)]
    items += [item("q", "T1", "C-quiet", T0 + 0.5), item("t2", "T2", "C-other", T0 + 0.9)]
    order = [i.id for i in fair_order(items)]
    # T1 and T2 alternate; within T1 its lanes alternate; each lane keeps its own due order
    assert order == ["a0", "t2", "q", "a1", "a2", "a3"]


def test_earlier_seconds_fire_first() -> None:
    late = [item(f"x{i}", "T1", f"C{i}", T0 + 1) for i in range(3)]
    early = item("early", "T9", "C9", T0 + 0.99)
    assert [i.id for i in fair_order([*late, early])][0] == "early"


def test_fair_order_keeps_every_item_once() -> None:
    items = [item(f"i{n}", f"T{n % 3}", f"C{n % 7}", T0 + (n % 5) * 0.3) for n in range(200)]
    ordered = fair_order(items)
    assert sorted(i.id for i in ordered) == sorted(i.id for i in items)
    # due seconds never go backwards
    seconds = [math.floor(i.due_at) for i in ordered]
    assert seconds == sorted(seconds)


# -- the bounded rate --------------------------------------------------------------------------------


def test_queue_hands_out_at_most_a_batch_then_the_rate() -> None:
    clock = FakeClock(T0)
    queue = DueQueue(rate_per_s=100.0, batch_max=10)
    assert queue.add(item(f"i{n}", lane=f"C{n}") for n in range(100)) == 100
    assert len(queue.take(clock())) == 10  # the burst is one batch
    assert queue.take(clock()) == []  # bucket empty
    assert queue.wait_s(clock()) == pytest.approx(0.01)
    clock.advance(0.05)
    assert len(queue.take(clock())) == 5  # 100/s for 50 ms
    clock.advance(10.0)
    assert len(queue.take(clock())) == 10  # never more than a batch, however long it waited
    taken = 25
    for _ in range(100):
        if not len(queue):
            break
        clock.advance(0.1)
        taken += len(queue.take(clock()))
    assert taken == 100 and queue.wait_s(clock()) == math.inf


def test_queue_ignores_ids_it_already_holds() -> None:
    queue = DueQueue(rate_per_s=10.0, batch_max=5)
    assert queue.add([item("a"), item("b")]) == 2
    assert queue.add([item("a"), item("c")]) == 1
    assert len(queue) == 3 and "a" in queue


def test_queue_refuses_a_rate_or_batch_of_zero() -> None:
    with pytest.raises(ValueError):
        DueQueue(rate_per_s=0.0, batch_max=1)
    with pytest.raises(ValueError):
        DueQueue(rate_per_s=1.0, batch_max=0)


def test_kinds_interleave_whatever_their_ids() -> None:
    # the bench's shape: scheduled messages (Q… ids sort first) and reminders due in one second
    messages = [item(f"Q{n:03d}", lane=f"C{n % 4}", kind="message") for n in range(8)]
    reminders = [item(f"Rm{n:03d}", lane=f"U{n % 4}", kind="reminder") for n in range(8)]
    order = fair_order([*reminders, *messages])
    assert [i.kind for i in order] == ["message", "reminder"] * 8
    # and each kind goes round its lanes: no lane fires twice before every lane fired once
    assert [i.lane for i in order if i.kind == "message"][:4] == ["C0", "C1", "C2", "C3"]
    assert [i.lane for i in order if i.kind == "reminder"][:4] == ["U0", "U1", "U2", "U3"]


def test_fairness_spans_the_whole_due_set_not_one_read() -> None:
    # 1,000 items of a busy channel, then one of a quiet one, added in two reads (as refill does)
    queue = FairQueue()
    queue.add(item(f"busy{n:04d}", lane="C-busy") for n in range(1000))
    queue.add([item("quiet", lane="C-quiet")])
    first = [queue.pop().id for _ in range(3)]
    assert first == ["busy0000", "quiet", "busy0001"]


def test_fair_queue_pops_teams_kinds_and_lanes_in_turn() -> None:
    queue = FairQueue()
    queue.add(
        [
            item("t1-m-a1", "T1", "Ca", kind="message"),
            item("t1-m-a2", "T1", "Ca", kind="message"),
            item("t1-m-b1", "T1", "Cb", kind="message"),
            item("t1-r-u1", "T1", "U1", kind="reminder"),
            item("t2-m-c1", "T2", "Cc", kind="message"),
        ]
    )
    assert queue.add([item("t1-m-a1", "T1", "Ca", kind="message")]) == 0  # already queued
    order = [queue.pop().id for _ in range(len(queue))]
    # T1, T2, T1, T1 (T2 is done); within T1: message, reminder, message; messages: Ca, Cb, Ca
    assert order == ["t1-m-a1", "t2-m-c1", "t1-r-u1", "t1-m-b1", "t1-m-a2"]
    with pytest.raises(IndexError):
        queue.pop()


def test_a_later_second_waits_for_the_earlier_one_even_if_added_first() -> None:
    queue = FairQueue()
    queue.add([item("later", due_at=T0 + 5)])
    queue.add([item("sooner", due_at=T0 + 1)])
    assert [queue.pop().id, queue.pop().id] == ["sooner", "later"]


# -- live traffic first ----------------------------------------------------------------------------


def test_live_first_holds_for_an_open_live_write_then_for_the_outbox() -> None:
    rule = LiveFirst(max_outbox_backlog=64)
    assert rule.hold(live_writing=False, outbox_backlog=64) is None
    assert rule.hold(live_writing=True, outbox_backlog=0) == ("live_write", LIVE_POLL_S)
    assert rule.hold(live_writing=False, outbox_backlog=65) == ("outbox", OUTBOX_POLL_S)
    assert rule.hold(live_writing=True, outbox_backlog=65) == ("live_write", LIVE_POLL_S)
    with pytest.raises(ValueError):
        LiveFirst(max_outbox_backlog=-1)


def test_live_first_rests_after_a_batch_to_keep_its_duty_cycle() -> None:
    assert LiveFirst(duty_cycle=0.5).rest_s(0.004) == pytest.approx(0.004)  # half the time
    assert LiveFirst(duty_cycle=0.25).rest_s(0.002) == pytest.approx(0.006)
    assert LiveFirst(duty_cycle=1.0).rest_s(0.002) == 0.0
    for bad in (0.0, 1.5):
        with pytest.raises(ValueError):
            LiveFirst(duty_cycle=bad)
