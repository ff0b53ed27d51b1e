"""The admin server's slow path for one ring slot: its publishes in arrival order, and whose
turn it is to write (sans-I/O but for the wait: plain state, unit-tested in
tests/unit/test_admin_slow_lane.py; used by :mod:`admin_server.app`).

A lane may also hold a *barrier* (docs/wire.md, "Publishes refused mid-stream"): a placeholder
turn that is never written, so nothing behind it is written either, while fast-path
publishes of the slot written before the lane existed are still unanswered. Those that must
be retried join the lane just ahead of the barrier (:meth:`SlowLane.join_ahead_of_barrier`),
in the order they are answered, so they keep their place ahead of every publish that
arrived after them; when the last is answered, the barrier leaves (:meth:`SlowLane.release`).
"""

from __future__ import annotations

import asyncio

# Arrival order: each joining turn's ticket is this much above the one before, so that the
# turns joined ahead of a barrier (retries of publishes that came before it) fit between
# the ticket of the turn before the barrier and the barrier's own, in order.
_TICKET_STRIDE = 1 << 32


class Turn:
    """One publish's place in a :class:`SlowLane` (a node of its list, in arrival order)."""

    __slots__ = ("ticket", "channel", "on_wire", "refused", "abandoned", "sent_to", "waiter", "prev", "next")

    def __init__(self, ticket: int, prev: Turn | None, channel: str = "") -> None:
        self.ticket = ticket  # arrival order in the lane
        self.channel = channel
        # an earlier publish of its channel was given up: it is answered unavailable too, unwritten,
        # so that the webapp resends both in order (admin_server/given_up.py)
        self.abandoned = False
        self.on_wire = False  # its latest attempt is written and not yet answered
        self.refused = False  # an attempt failed: it is written again only as the first of the lane
        self.sent_to = ""  # the channel server its latest attempt was written to
        self.waiter: asyncio.Future[None] | None = None
        self.prev = prev
        self.next: Turn | None = None


class SlowLane:
    """The slow-path publishes of one slot, in arrival order, and whose turn it is to write.

    The rule (docs/publish-path.md, "Ordering on the slow path"): a publish is written
    only when every earlier one of its slot is on the wire ahead of it (written on a
    connection, not yet answered) or answered; a publish that failed an attempt is
    written again only when it is the first of the lane, so a failing-over slot has
    one retry in flight. When a retry gets through, the owner is back: the others
    count as new again and follow it, pipelined, in order. No publish overtakes an
    earlier one, whatever order their tasks wake up in. Every step is O(1) but the
    end of a failover (O(publishes in the lane)) and the frontier's advance over
    publishes already on the wire."""

    __slots__ = ("head", "tail", "frontier", "size", "tickets", "barrier", "barrier_timer", "ahead_of_barrier")

    def __init__(self) -> None:
        self.head: Turn | None = None
        self.tail: Turn | None = None
        # The first turn not on the wire (every turn before it is on the wire)
        self.frontier: Turn | None = None
        self.size = 0  # turns, the barrier included
        self.tickets = 0
        self.barrier: Turn | None = None
        self.ahead_of_barrier = 0  # turns joined ahead of it
        self.barrier_timer: asyncio.TimerHandle | None = None  # its expiry (the caller arms it)

    def __len__(self) -> int:
        return self.size

    @property
    def publishes(self) -> int:
        """The publishes in the lane (its turns but the barrier)."""
        return self.size - (self.barrier is not None)

    def join(self, channel: str = "") -> Turn:
        turn = Turn(self.tickets, self.tail, channel)
        self.tickets += _TICKET_STRIDE
        self._link(turn, None)
        if self.frontier is None:
            self.frontier = turn
        return turn

    def _link(self, turn: Turn, before: Turn | None) -> None:
        """Put ``turn`` (its ``prev`` already set) in the list just before ``before``; at the end when None."""
        turn.next = before
        if turn.prev is None:
            self.head = turn
        else:
            turn.prev.next = turn
        if before is None:
            self.tail = turn
        else:
            before.prev = turn
        self.size += 1

    def hold(self) -> Turn:
        """Put a barrier at the end of the lane: no turn that joins after it is written until it
        is :meth:`release` d. Publishes that must go ahead of it join with
        :meth:`join_ahead_of_barrier`."""
        if self.barrier is None:
            self.barrier = self.join()
            self.ahead_of_barrier = 0
        return self.barrier

    def join_ahead_of_barrier(self, channel: str = "") -> Turn:
        """A turn just ahead of the barrier (behind the turns already there); at the end when
        there is none."""
        barrier = self.barrier
        if barrier is None:
            return self.join(channel)
        self.ahead_of_barrier += 1  # below _TICKET_STRIDE: --max-pubs-in-flight bounds the lane
        turn = Turn(barrier.ticket - _TICKET_STRIDE + self.ahead_of_barrier, barrier.prev, channel)
        self._link(turn, barrier)
        if self.frontier is barrier:  # every turn before it is on the wire: the new one is the first not
            self.frontier = turn
            self._wake()
        return turn

    def release(self) -> None:
        """Remove the barrier (and cancel its expiry): the turns behind it may be written in order."""
        barrier = self.barrier
        if barrier is None:
            return
        self.barrier = None
        if self.barrier_timer is not None:
            self.barrier_timer.cancel()
            self.barrier_timer = None
        self.leave(barrier)

    def is_head(self, turn: Turn) -> bool:
        return self.head is turn

    def may_write(self, turn: Turn) -> bool:
        if turn.refused:
            return self.head is turn
        return self.frontier is turn  # every earlier one is on the wire (or answered: gone)

    async def wait(self, turn: Turn) -> None:
        """Until something changed in the lane that may make it ``turn``'s turn."""
        turn.waiter = asyncio.get_running_loop().create_future()
        try:
            await turn.waiter
        finally:
            turn.waiter = None

    def written(self, turn: Turn) -> None:
        turn.on_wire = True
        if self.frontier is turn:
            self._advance(turn.next)
        self._wake()

    def refused(self, turn: Turn) -> None:
        turn.on_wire = False
        turn.refused = True
        if self.frontier is None or turn.ticket < self.frontier.ticket:
            self.frontier = turn

    def answered(self, turn: Turn) -> None:
        """``turn`` was acknowledged: if it was a retry, the slot's owner is back, and
        the publishes that failed behind it are written again, pipelined, in order."""
        if turn.refused:
            node = self.head
            while node is not None:
                node.refused = False
                node = node.next

    def abandon_later(self, turn: Turn) -> int:
        """``turn`` was given up: every later publish of its channel in the lane that is not on
        the wire is abandoned (and woken to answer so); returns how many."""
        count = 0
        node = turn.next
        while node is not None:
            if node.channel == turn.channel and not node.on_wire and not node.abandoned:
                node.abandoned = True
                count += 1
                if node.waiter is not None and not node.waiter.done():
                    node.waiter.set_result(None)
            node = node.next
        return count

    def leave(self, turn: Turn) -> None:
        if turn.prev is None:
            self.head = turn.next
        else:
            turn.prev.next = turn.next
        if turn.next is None:
            self.tail = turn.prev
        else:
            turn.next.prev = turn.prev
        self.size -= 1
        if self.frontier is turn:
            self._advance(turn.next)
        self._wake()

    def _advance(self, start: Turn | None) -> None:
        node = start
        while node is not None and node.on_wire:
            node = node.next
        self.frontier = node

    def _wake(self) -> None:
        """Wake those that may write now: the first turn, and the first not on the wire."""
        for turn in (self.head, self.frontier):
            if turn is not None and turn.waiter is not None and not turn.waiter.done():
                turn.waiter.set_result(None)
