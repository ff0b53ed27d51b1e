"""The admin server's per-slot slow-path lane (admin_server/slow_lane.py, ``SlowLane``): who may
write when, so that no publish of a slot overtakes an earlier one (docs/publish-path.md,
"Ordering on the slow path")."""

from __future__ import annotations

import asyncio

from admin_server.slow_lane import SlowLane


def test_a_new_publish_writes_only_behind_earlier_ones_on_the_wire() -> None:
    lane = SlowLane()
    a, b, c = lane.join(), lane.join(), lane.join()
    assert lane.may_write(a) and not lane.may_write(b) and not lane.may_write(c)
    lane.written(a)
    assert lane.may_write(b) and not lane.may_write(c)  # pipelined behind a, not past b
    lane.written(b)
    assert lane.may_write(c)


def test_after_a_refusal_nothing_behind_it_is_written_until_it_is_on_the_wire_again() -> None:
    lane = SlowLane()
    a, b = lane.join(), lane.join()
    lane.written(a)
    lane.written(b)
    lane.refused(a)  # a failed: b (on the wire behind it) will be refused too
    lane.refused(b)
    late = lane.join()  # the window the component test hits: a newcomer as a failover ends
    assert lane.is_head(a) and lane.may_write(a)
    assert not lane.may_write(b)  # a retry waits until every earlier one is answered
    assert not lane.may_write(late)
    lane.written(a)
    assert not lane.may_write(b) and not lane.may_write(late)  # one retry in flight at a time
    lane.leave(a)  # a acknowledged
    assert lane.is_head(b) and lane.may_write(b) and not lane.may_write(late)
    lane.written(b)
    assert lane.may_write(late)


async def test_waiters_are_woken_when_their_turn_may_have_come() -> None:
    lane = SlowLane()
    a, b, c = lane.join(), lane.join(), lane.join()
    waiting_b = asyncio.ensure_future(lane.wait(b))
    waiting_c = asyncio.ensure_future(lane.wait(c))
    await asyncio.sleep(0)  # wait-ok: lets both start waiting
    lane.written(a)  # b is the first not on the wire: woken; c is not
    await asyncio.wait_for(waiting_b, 1.0)
    assert not waiting_c.done()
    lane.refused(a)
    lane.leave(a)  # b becomes the head
    lane.written(b)
    await asyncio.wait_for(waiting_c, 1.0)
    lane.leave(b)
    lane.leave(c)
    assert not lane


def test_when_a_retry_gets_through_the_failed_ones_behind_it_follow_pipelined_in_order() -> None:
    lane = SlowLane()
    turns = [lane.join() for _ in range(4)]
    for turn in turns:
        lane.written(turn)
    for turn in turns:
        lane.refused(turn)  # the slot failed over under all of them
    head, *rest = turns
    assert [lane.may_write(t) for t in turns] == [True, False, False, False]
    lane.written(head)
    lane.answered(head)  # the retry got through: the owner is back
    lane.leave(head)
    for i, turn in enumerate(rest):  # each may write as soon as the ones before it are on the wire
        assert [lane.may_write(t) for t in rest] == [j == i for j in range(len(rest))]
        lane.written(turn)
    assert lane.frontier is None and len(lane) == 3


def test_a_publish_that_gives_up_lets_the_next_one_go() -> None:
    lane = SlowLane()
    a, b = lane.join(), lane.join()
    lane.refused(a)
    lane.leave(a)  # a gave up (its route budget is spent)
    assert lane.is_head(b) and lane.may_write(b)
    lane.leave(b)
    assert len(lane) == 0 and lane.head is None and lane.tail is None and lane.frontier is None


def test_a_given_up_publish_abandons_the_later_ones_of_its_channel_not_on_the_wire() -> None:
    lane = SlowLane()
    first, other, later, on_wire = lane.join("C1"), lane.join("C2"), lane.join("C1"), lane.join("C1")
    on_wire.on_wire = True
    assert lane.abandon_later(first) == 1
    assert later.abandoned and not other.abandoned and not on_wire.abandoned and not first.abandoned
    assert lane.abandon_later(first) == 0  # once
