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


# -- the ring barrier (docs/wire.md, "Publishes refused mid-stream") ------------------------------
def test_nothing_behind_a_barrier_is_written_until_it_is_released() -> None:
    lane = SlowLane()
    barrier = lane.hold()
    assert lane.hold() is barrier  # one at a time
    later = lane.join("C1")
    assert not lane.may_write(later) and lane.publishes == 1 and len(lane) == 2
    lane.release()
    assert lane.barrier is None and lane.may_write(later) and lane.is_head(later) and len(lane) == 1


def test_retries_join_ahead_of_the_barrier_in_the_order_they_come_and_go_first() -> None:
    """Fast-path publishes 5 and 6 were in flight when the slot was held; 7 arrived after. 5 and
    6, refused, join ahead of the barrier and are written before 7, pipelined."""
    lane = SlowLane()
    lane.hold()
    seven = lane.join("C1")
    five = lane.join_ahead_of_barrier("C1")
    assert lane.may_write(five) and not lane.may_write(seven)
    lane.written(five)
    six = lane.join_ahead_of_barrier("C1")  # behind five (on the wire), ahead of the barrier
    assert lane.may_write(six) and not lane.may_write(seven)
    lane.written(six)
    assert not lane.may_write(seven)  # still held: another fast-path publish may come back
    lane.release()
    assert lane.may_write(seven)
    order = []
    node = lane.head
    while node is not None:
        order.append(node)
        node = node.next
    assert order == [five, six, seven] and five.ticket < six.ticket < seven.ticket


def test_a_refused_retry_ahead_of_the_barrier_becomes_the_frontier_again() -> None:
    lane = SlowLane()
    earlier = lane.join("C1")
    lane.written(earlier)
    lane.hold()
    later = lane.join("C1")
    retry = lane.join_ahead_of_barrier("C1")
    lane.written(retry)
    lane.refused(earlier)  # failed over: the first of the lane retries first, then the others
    lane.refused(retry)
    assert lane.frontier is earlier and lane.may_write(earlier) and not lane.may_write(retry)
    lane.release()
    lane.written(earlier)
    lane.answered(earlier)
    lane.leave(earlier)
    assert lane.may_write(retry) and not lane.may_write(later)
    lane.written(retry)
    assert lane.may_write(later)


def test_a_lane_with_only_a_barrier_is_not_empty() -> None:
    lane = SlowLane()
    lane.hold()
    assert lane and lane.publishes == 0
    lane.release()
    assert not lane and lane.head is None and lane.tail is None and lane.frontier is None


async def test_releasing_a_barrier_cancels_its_expiry() -> None:
    lane = SlowLane()
    lane.hold()
    timer = lane.barrier_timer = asyncio.get_running_loop().call_later(3600.0, lambda: None)
    lane.release()
    assert timer.cancelled() and lane.barrier_timer is None
    lane.release()  # nothing held: nothing to do
