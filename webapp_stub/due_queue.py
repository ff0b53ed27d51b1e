"""The order in which due items fire, and when the scheduler must yield: sans I/O.

:class:`FairQueue` holds the whole due set in firing order: by due second; within a
second, round-robin over teams, within a team's turn over its kinds (scheduled messages,
reminders), within a kind's turn over its lanes (a conversation, a user), each lane in
the order its items arrived. :class:`DueQueue` releases it at a bounded rate (a token
bucket); :class:`LiveFirst` is the rule that makes the scheduler wait for live traffic.
No clock, no SQLite, no asyncio: :mod:`webapp_stub.scheduler` drives them.
"""

from __future__ import annotations

import heapq
import math
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Generic, TypeVar

# The scheduler's own rate, items per second: 20,000 items due at once fire in 8 s, inside the
# issue's 10 s with room for the fleet's latency. Firing in bulk costs the webapp ~0.1 ms of CPU per
# item (webapp_stub/due_posts.py) and the whole fleet ~0.3 ms per item (docs/spike.md): at this
# rate a spike takes ~0.75 of a core of two, and the fleet keeps the rest for live traffic. A
# higher rate drains faster only where the cores are there to carry it.
DEFAULT_RATE_PER_S = 2500.0
# Items per transaction, fired in one event-loop turn: a live request that arrives meanwhile waits
# for it (~0.1 ms of CPU per item here: ~6 ms). A transaction has a fixed cost (~1 ms: its claim,
# reads and COMMIT writing the pages it dirtied to the WAL) that larger batches spread thinner:
# 16 items cost ~160 µs each, 64 ~95 µs, 128 ~75 µs.
DEFAULT_BATCH_MAX = 64
# Priority to live traffic in the hand-off: the scheduler fires only while the outbox to the Admin
# Servers holds at most this many unacknowledged events, so a live post's event queues behind at
# most this many due items' (plus one batch) on its way through the fleet, whatever the fleet's speed.
DEFAULT_OUTBOX_BACKLOG_MAX = 64
# The most of the event loop's CPU the scheduler may take while it has a backlog: after a batch
# that took t seconds of the loop thread's CPU it rests t * (1 - duty) / duty, so live requests,
# the hand-off's replies and the deliveries it publishes always get the rest of the loop. (CPU, not
# wall time: on a shared machine a batch's wall time is mostly other processes' turns.)
DEFAULT_DUTY_CYCLE = 0.5

# While a live write is open on the webapp's connection (a group-commit batch), look again after this.
LIVE_POLL_S = 0.001
# While the outbox holds more than the backlog bound, look again after this.
OUTBOX_POLL_S = 0.002
TOKEN_EPSILON = 1e-3  # float slack: unix times carry ~2e-7 s of rounding; 50 ms at 100/s is 5 items, not 4.99998


@dataclass(frozen=True)
class DueItem:
    """One item to fire: ``lane`` is the unit of fairness (a conversation, or a user)."""

    id: str
    kind: str
    team: str
    lane: str
    due_at: float


M = TypeVar("M")


class Rotation(Generic[M]):
    """Members by key, served in turn: :meth:`front` is the member whose turn it is;
    :meth:`rotate` sends it to the back (or drops it, once it has nothing left)."""

    __slots__ = ("members", "turn")

    def __init__(self) -> None:
        self.members: dict[str, M] = {}
        self.turn: deque[str] = deque()

    def __bool__(self) -> bool:
        return bool(self.turn)

    def get(self, key: str, make: Callable[[], M]) -> M:
        """The member ``key``; a new one joins at the back of the turn."""
        member = self.members.get(key)
        if member is None:
            member = self.members[key] = make()
            self.turn.append(key)
        return member

    def front(self) -> M:
        return self.members[self.turn[0]]

    def rotate(self, keep: bool) -> None:
        key = self.turn.popleft()
        if keep:
            self.turn.append(key)
        else:
            del self.members[key]


Lane = deque[DueItem]
Kinds = Rotation[Rotation[Lane]]  # a team's kinds, each a rotation of lanes
Second = Rotation[Kinds]  # one due second's teams


class FairQueue:
    """The whole due set in firing order, built incrementally (each :meth:`add` and :meth:`pop`
    costs O(1) per item, so a 20,000-item spike is never sorted as a whole).

    Order: by due second; within a second, round-robin over teams, within a team's turn over
    its kinds, within a kind's turn over its lanes, each lane in the order its items were added
    (callers add in due order). A team, kind or lane joins the rotation at the back when its
    first item arrives. Items already queued (by id) are ignored.
    """

    def __init__(self) -> None:
        self._seconds: dict[int, Second] = {}
        self._heap: list[int] = []
        self._ids: set[str] = set()

    def __len__(self) -> int:
        return len(self._ids)

    def __contains__(self, item_id: object) -> bool:
        return item_id in self._ids

    def add(self, items: Iterable[DueItem]) -> int:
        """Queue the items not queued yet; returns how many."""
        added = 0
        for item in items:
            if item.id in self._ids:
                continue
            self._ids.add(item.id)
            added += 1
            key = math.floor(item.due_at)
            second = self._seconds.get(key)
            if second is None:
                second = self._seconds[key] = Rotation()
                heapq.heappush(self._heap, key)
            kinds = second.get(item.team, Rotation)
            lanes = kinds.get(item.kind, Rotation)
            lanes.get(item.lane, deque).append(item)
        return added

    def pop(self) -> DueItem:
        """The next item to fire. Raises IndexError when empty."""
        if not self._heap:
            raise IndexError("pop from an empty FairQueue")
        key = self._heap[0]
        second = self._seconds[key]
        kinds = second.front()
        lanes = kinds.front()
        lane = lanes.front()
        item = lane.popleft()
        lanes.rotate(bool(lane))
        kinds.rotate(bool(lanes))
        second.rotate(bool(kinds))
        if not second:
            del self._seconds[key]
            heapq.heappop(self._heap)
        self._ids.discard(item.id)
        return item


def fair_order(items: Iterable[DueItem]) -> list[DueItem]:
    """``items`` in :class:`FairQueue` order (added in due order, then id)."""
    queue = FairQueue()
    queue.add(sorted(items, key=lambda i: (i.due_at, i.id)))
    return [queue.pop() for _ in range(len(queue))]


class DueQueue:
    """Due items waiting to fire, in :class:`FairQueue` order, released at a bounded rate.

    A token bucket of ``batch_max`` tokens refilled at ``rate_per_s``: :meth:`take`
    hands out at most ``batch_max`` items, and over any interval at most
    ``batch_max + rate_per_s * seconds``. Sans I/O: the caller passes ``now``.
    """

    def __init__(self, rate_per_s: float = DEFAULT_RATE_PER_S, batch_max: int = DEFAULT_BATCH_MAX) -> None:
        if rate_per_s <= 0 or batch_max < 1:
            raise ValueError("the scheduler needs a positive rate and batch")
        self.rate_per_s = float(rate_per_s)
        self.batch_max = int(batch_max)
        self._queue = FairQueue()
        self._tokens = float(batch_max)
        self._at: float | None = None

    def __len__(self) -> int:
        return len(self._queue)

    def __contains__(self, item_id: object) -> bool:
        return item_id in self._queue

    def add(self, items: Iterable[DueItem]) -> int:
        """Queue the items not queued yet (add them in due order); returns how many."""
        return self._queue.add(items)

    def _refill(self, now: float) -> None:
        if self._at is not None and now > self._at:
            self._tokens = min(float(self.batch_max), self._tokens + (now - self._at) * self.rate_per_s)
        self._at = now if self._at is None else max(self._at, now)

    def take(self, now: float) -> list[DueItem]:
        """The next items to fire now: as many as the bucket allows, at most ``batch_max``."""
        self._refill(now)
        count = min(int(self._tokens + TOKEN_EPSILON), self.batch_max, len(self._queue))
        self._tokens -= count
        return [self._queue.pop() for _ in range(count)]

    def wait_s(self, now: float) -> float:
        """Seconds until :meth:`take` can hand out an item (inf when the queue is empty)."""
        if not len(self._queue):
            return math.inf
        self._refill(now)
        return 0.0 if self._tokens + TOKEN_EPSILON >= 1.0 else (1.0 - self._tokens) / self.rate_per_s


class LiveFirst:
    """The yield-to-live rule: may the scheduler fire a batch now?

    Not while a live write is open on the webapp's connection (a group-commit batch: a
    ``chat.postMessage`` is being written and will commit on the next loop turn; firing now would
    make it wait for SQLite's write lock), and not while the hand-off's outbox holds more than
    ``max_outbox_backlog`` events (a live event would queue behind due items on its way to the
    Admin Servers). :meth:`hold` answers why not, and for how long to wait before asking again;
    :meth:`rest_s` how long to leave the process to the event loop after a batch.
    """

    def __init__(
        self, max_outbox_backlog: int = DEFAULT_OUTBOX_BACKLOG_MAX, duty_cycle: float = DEFAULT_DUTY_CYCLE
    ) -> None:
        if max_outbox_backlog < 0:
            raise ValueError("max_outbox_backlog must not be negative")
        if not 0 < duty_cycle <= 1:
            raise ValueError("duty_cycle must be in (0, 1]")
        self.max_outbox_backlog = max_outbox_backlog
        self.duty_cycle = duty_cycle

    def rest_s(self, busy_s: float) -> float:
        """How long to rest after a batch that took ``busy_s`` (of the loop thread's CPU): its share of the time
        stays at most ``duty_cycle``, the rest is the event loop's."""
        return max(0.0, busy_s) * (1.0 - self.duty_cycle) / self.duty_cycle

    def hold(self, *, live_writing: bool, outbox_backlog: int) -> tuple[str, float] | None:
        """None: fire. Else (reason, seconds to wait): ``live_write`` or ``outbox``."""
        if live_writing:
            return "live_write", LIVE_POLL_S
        if outbox_backlog > self.max_outbox_backlog:
            return "outbox", OUTBOX_POLL_S
        return None
