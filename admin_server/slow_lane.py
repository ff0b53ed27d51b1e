"""The admin server's slow path for one ring slot: its publishes in arrival order, and whose
turn it is to write (sans-I/O but for the wait: plain state, unit-tested in
tests/unit/test_admin_slow_lane.py; used by :mod:`admin_server.app`)."""

from __future__ import annotations

import asyncio


class Turn:
    """One publish's place in a :class:`SlowLane` (a node of its list, in arrival order)."""

    __slots__ = ("ticket", "channel", "on_wire", "refused", "abandoned", "waiter", "prev", "next")

    def __init__(self, ticket: int, prev: Turn | None, channel: str = "") -> None:
        self.ticket = ticket  # arrival order in the lane
        self.channel = channel
        # an earlier publish of its channel was given up: it is answered unavailable too, unwritten,
        # so that the webapp resends both in order (admin_server/given_up.py)
        self.abandoned = False
        self.on_wire = False  # its latest attempt is written and not yet answered
        self.refused = False  # an attempt failed: it is written again only as the first of the lane
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

    __slots__ = ("head", "tail", "frontier", "size", "tickets")

    def __init__(self) -> None:
        self.head: Turn | None = None
        self.tail: Turn | None = None
        self.frontier: Turn | None = None  # the first turn not on the wire
        self.size = 0
        self.tickets = 0

    def __len__(self) -> int:
        return self.size

    def join(self, channel: str = "") -> Turn:
        turn = Turn(self.tickets, self.tail, channel)
        self.tickets += 1
        if self.tail is None:
            self.head = turn
        else:
            self.tail.next = turn
        self.tail = turn
        self.size += 1
        if self.frontier is None:
            self.frontier = turn
        return turn

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
