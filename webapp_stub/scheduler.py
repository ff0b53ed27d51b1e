"""The scheduler: due items (scheduled messages, reminders) fire once, on time, fairly.

Every item that must happen at a time lives in SQLite, in ``due_items`` (its
id, kind, team, lane, due time, state), beside its kind's own row
(``scheduled_messages``, ``reminders``). The kinds register a *firer* here
(:func:`register_kind`); the scheduler decides when and in what order.

Guarantees
----------
* **Exactly once.** An item fires in one transaction that claims it
  (``state`` pending -> fired, which only one claim can do) and persists what it
  posts (the message, with its channel's next ``seq``, through the same
  :meth:`Store.post_message` as ``chat.postMessage``). A webapp killed before
  that commit fires it again on restart (nothing of it was written); killed
  after, it does not (it is no longer pending) and the hand-off's restart
  replay (:mod:`webapp_stub.handoff`) delivers the committed message.
* **Late, not lost.** An item due while the webapp was down fires when it
  starts again, and is counted with ``late="true"`` in
  ``rtm_scheduler_fired_total``; ``rtm_scheduler_late_seconds`` observes every
  item's delay from its due time to its commit.
* **Fair.** Items due in the same second fire round-robin across teams and,
  within a team, across lanes (the conversation a scheduled message posts in,
  the user a reminder is for): one team's or channel's thousand items cannot
  hold another's one behind them (:func:`fair_order`).
* **Live traffic first.** The scheduler has its own bounded rate
  (:data:`DEFAULT_RATE_PER_S` items per second, a token bucket), fires at
  most :data:`DEFAULT_BATCH_MAX` items per event-loop turn (one transaction),
  and fires a batch only while the hand-off's outbox holds at most
  one batch of unacknowledged events. Between turns it yields the
  loop, so a live ``chat.postMessage`` waits for at most one batch's
  transaction, and queues in the outbox behind at most about two batches of
  due items. A spike of N items takes N / rate seconds to drain, or longer
  when the fleet downstream is slower than that rate.

The ordering and the rate are the sans-I/O :class:`DueQueue`; :class:`Scheduler`
is the thin asyncio loop that reads due rows, fires batches and publishes.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Protocol

from services.metrics import ServiceMetrics
from webapp_stub.store import ApiError, Event, Store

log = logging.getLogger("rtm.webapp.scheduler")

# The scheduler's own rate, items per second (an upper bound: the outbox backlog below usually
# binds first), and its batch: the most it fires in one event-loop turn (one transaction). A batch
# of 10 holds the event loop for ~1-3 ms here, so a live post arriving meanwhile waits that long;
# bench/spike.py measured batches of 50 costing live posts' p99 about 100 ms on a loaded machine.
DEFAULT_RATE_PER_S = 2500.0
DEFAULT_BATCH_MAX = 10
# How many due rows one read brings into memory (and orders fairly); more wait in SQLite for the
# next read, when these have fired. The read and the sort run on the event loop: 20,000 rows at
# once held it ~0.5 s (bench/spike.py); 500 take a few ms. Fairness holds within each read (rows
# due in the same second come in id order, which is random across channels and teams).
MAX_QUEUED = 500
# The longest the loop sleeps without looking at the table (items written by another process,
# such as a bulk load, are seen within this); items scheduled through the API wake it at once.
MAX_IDLE_WAIT_S = 1.0
# Priority to live traffic: the scheduler adds a batch to the hand-off's outbox only while the
# outbox holds at most one batch (batch_max) of unacknowledged events, so a live post never queues
# behind more than about two batches of due items, whatever the fleet's speed; it looks again after
# OUTBOX_POLL_S.
OUTBOX_POLL_S = 0.002
# After an unexpected error in a batch, wait this long before trying again.
ERROR_BACKOFF_S = 1.0
TOKEN_EPSILON = 1e-3  # float slack: unix times carry ~2e-7 s of rounding; 50 ms at 100/s is 5 items, not 4.99998
LATE_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 3600.0)

STATE_PENDING = "pending"
STATE_FIRED = "fired"
STATE_FAILED = "failed"


@dataclass(frozen=True)
class DueItem:
    """One item to fire: ``lane`` is the unit of fairness (a conversation, or a user)."""

    id: str
    kind: str
    team: str
    lane: str
    due_at: float


# A kind's firer runs inside the scheduler's transaction, after the claim: it persists what the
# item posts and returns the committed events. It raises ApiError when the item cannot fire any
# more (its channel archived, its author no longer a member): the item is then marked failed.
Firer = Callable[[Store, str, float], list[Event]]


class FirerRegistry:
    """Kind name -> firer. :data:`FIRERS` is the one the kinds register on when imported
    (as the Web API's ``@method`` registry); tests may build their own."""

    def __init__(self) -> None:
        self._firers: dict[str, Firer] = {}

    def register(self, kind: str, firer: Firer) -> None:
        self._firers[kind] = firer

    def get(self, kind: str) -> Firer | None:
        return self._firers.get(kind)


FIRERS = FirerRegistry()


def register_kind(kind: str) -> Callable[[Firer], Firer]:
    """Decorator: ``@register_kind("reminder")`` on a kind's firer."""

    def register(firer: Firer) -> Firer:
        FIRERS.register(kind, firer)
        return firer

    return register


# -- the sans-I/O core ---------------------------------------------------------------------------


def fair_order(items: Iterable[DueItem]) -> list[DueItem]:
    """Items in firing order: by due second; within a second, round-robin over teams (in id
    order) and, within each team's turn, round-robin over its lanes (in order of their first
    item), each lane's items in due order."""
    by_second: dict[int, list[DueItem]] = {}
    for item in items:
        by_second.setdefault(math.floor(item.due_at), []).append(item)
    ordered: list[DueItem] = []
    for second in sorted(by_second):
        teams: dict[str, dict[str, deque[DueItem]]] = {}
        for item in sorted(by_second[second], key=lambda i: (i.due_at, i.id)):
            teams.setdefault(item.team, {}).setdefault(item.lane, deque()).append(item)
        lanes_of = {team: deque(lanes.values()) for team, lanes in teams.items()}
        turn = deque(sorted(lanes_of))
        while turn:
            team = turn.popleft()
            lanes = lanes_of[team]
            lane = lanes.popleft()
            ordered.append(lane.popleft())
            if lane:
                lanes.append(lane)
            if lanes:
                turn.append(team)
    return ordered


class DueQueue:
    """Due items waiting to fire, in :func:`fair_order`, released at a bounded rate.

    A token bucket of ``batch_max`` tokens refilled at ``rate_per_s``: :meth:`take`
    hands out at most ``batch_max`` items, and over any interval at most
    ``batch_max + rate_per_s * seconds``. Sans I/O: the caller passes ``now``.
    """

    def __init__(self, rate_per_s: float = DEFAULT_RATE_PER_S, batch_max: int = DEFAULT_BATCH_MAX) -> None:
        if rate_per_s <= 0 or batch_max < 1:
            raise ValueError("the scheduler needs a positive rate and batch")
        self.rate_per_s = float(rate_per_s)
        self.batch_max = int(batch_max)
        self._queue: deque[DueItem] = deque()
        self._ids: set[str] = set()
        self._tokens = float(batch_max)
        self._at: float | None = None

    def __len__(self) -> int:
        return len(self._queue)

    def __contains__(self, item_id: object) -> bool:
        return item_id in self._ids

    def add(self, items: Iterable[DueItem]) -> int:
        """Queue the items not queued yet (the queue is re-ordered fairly); returns how many."""
        new = [item for item in items if item.id not in self._ids]
        if not new:
            return 0
        self._ids.update(item.id for item in new)
        self._queue = deque(fair_order([*self._queue, *new]))
        return len(new)

    def _refill(self, now: float) -> None:
        if self._at is not None and now > self._at:
            self._tokens = min(float(self.batch_max), self._tokens + (now - self._at) * self.rate_per_s)
        self._at = now if self._at is None else max(self._at, now)

    def take(self, now: float) -> list[DueItem]:
        """The next items to fire now: as many as the bucket allows, at most ``batch_max``."""
        self._refill(now)
        count = min(int(self._tokens + TOKEN_EPSILON), self.batch_max, len(self._queue))
        taken = [self._queue.popleft() for _ in range(count)]
        self._tokens -= count
        self._ids.difference_update(item.id for item in taken)
        return taken

    def wait_s(self, now: float) -> float:
        """Seconds until :meth:`take` can hand out an item (inf when the queue is empty)."""
        if not self._queue:
            return math.inf
        self._refill(now)
        return 0.0 if self._tokens + TOKEN_EPSILON >= 1.0 else (1.0 - self._tokens) / self.rate_per_s


# -- the table -------------------------------------------------------------------------------------


def add_due(store: Store, item: DueItem) -> None:
    """Record a due item (call inside the transaction that writes its kind's row)."""
    store.conn.execute(
        "INSERT INTO due_items (id, kind, team, lane, due_at, state) VALUES (?, ?, ?, ?, ?, ?)",
        (item.id, item.kind, item.team, item.lane, item.due_at, STATE_PENDING),
    )


def cancel_due(store: Store, item_id: str) -> bool:
    """Forget a pending item (inside the caller's transaction); False if it is not pending."""
    gone = store.conn.execute("DELETE FROM due_items WHERE id = ? AND state = ?", (item_id, STATE_PENDING)).rowcount
    return bool(gone)


def due_rows(store: Store, now: float, limit: int) -> list[DueItem]:
    """Pending items due at or before ``now``, earliest first, at most ``limit``."""
    rows = store.conn.execute(
        "SELECT id, kind, team, lane, due_at FROM due_items WHERE state = ? AND due_at <= ? ORDER BY due_at LIMIT ?",
        (STATE_PENDING, now, limit),
    ).fetchall()
    return [DueItem(*row) for row in rows]


def next_due_at(store: Store) -> float | None:
    row = store.conn.execute("SELECT min(due_at) FROM due_items WHERE state = ?", (STATE_PENDING,)).fetchone()
    return None if row is None or row[0] is None else float(row[0])


@dataclass
class Fired:
    """What one batch did: the committed events, and each item's outcome."""

    events: list[Event]
    outcomes: list[tuple[DueItem, str]]  # "posted", "failed:<code>" or "gone" (deleted, or fired already)


def fire_batch(store: Store, firers: FirerRegistry, items: list[DueItem], now: float) -> Fired:
    """Fire ``items`` in one transaction: each is claimed (pending -> fired) and posted in a
    savepoint of its own, so one that fails (ApiError) is marked failed and the rest go on."""
    events: list[Event] = []
    outcomes: list[tuple[DueItem, str]] = []
    with store.transaction() as db:
        for item in items:
            try:
                with store.transaction():
                    claimed = db.execute(
                        "UPDATE due_items SET state = ?, fired_at = ? WHERE id = ? AND state = ?",
                        (STATE_FIRED, now, item.id, STATE_PENDING),
                    ).rowcount
                    if not claimed:
                        outcomes.append((item, "gone"))
                        continue
                    firer = firers.get(item.kind)
                    if firer is None:
                        raise ApiError("unknown_kind")
                    posted = firer(store, item.id, now)
            except ApiError as exc:
                db.execute(
                    "UPDATE due_items SET state = ?, fired_at = ?, error = ? WHERE id = ? AND state = ?",
                    (STATE_FAILED, now, exc.code, item.id, STATE_PENDING),
                )
                outcomes.append((item, f"failed:{exc.code}"))
                continue
            events += posted
            outcomes.append((item, "posted"))
    return Fired(events, outcomes)


# -- the asyncio loop --------------------------------------------------------------------------------


class Publisher(Protocol):
    def __call__(self, events: list[Event]) -> None: ...


class Scheduler:
    """Fires due items: reads them from SQLite into a :class:`DueQueue`, fires batches at the
    queue's rate, publishes each batch's events through the hand-off once committed.

    ``publish`` is the same function ``chat.postMessage`` hands its events to
    (:meth:`webapp_stub.api.WebApi.publish`). :meth:`wake` tells the loop that an item was
    scheduled (it may be due before the loop's next look).
    """

    def __init__(
        self,
        store: Store,
        publish: Publisher,
        metrics: ServiceMetrics,
        *,
        firers: FirerRegistry | None = None,
        rate_per_s: float = DEFAULT_RATE_PER_S,
        batch_max: int = DEFAULT_BATCH_MAX,
        clock: Callable[[], float] = time.time,
        outbox_backlog: Callable[[], int] = lambda: 0,
        max_outbox_backlog: int | None = None,
    ) -> None:
        self.store = store
        self.outbox_backlog = outbox_backlog
        self.max_outbox_backlog = batch_max if max_outbox_backlog is None else max_outbox_backlog
        self.publish = publish
        self.firers = firers if firers is not None else FIRERS
        self.queue = DueQueue(rate_per_s, batch_max)
        self.clock = clock
        self.started_at = clock()  # items due before this were due while the webapp was down
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.fired = metrics.counter(
            "rtm_scheduler_fired_total",
            "Due items fired, by kind, outcome (posted, failed, gone) and late (due while the webapp was down)",
            ["kind", "outcome", "late"],
        )
        self.late = metrics.histogram(
            "rtm_scheduler_late_seconds", "Delay from an item's due time to its commit", LATE_BUCKETS_S, ["kind"]
        )
        self.batches = metrics.counter("rtm_scheduler_batches_total", "Batches (transactions) the scheduler fired")
        self.yields = metrics.counter(
            "rtm_scheduler_outbox_waits_total", "Turns the scheduler waited for the hand-off's outbox to drain"
        )
        metrics.gauge("rtm_scheduler_queued", "Due items read and waiting for their turn").set_function(
            lambda: len(self.queue)
        )
        metrics.gauge("rtm_scheduler_rate_per_s", "The scheduler's rate limit, items per second").set(rate_per_s)
        self._metrics = metrics

    def start(self) -> None:
        self._task = asyncio.create_task(self.run_loop(), name="scheduler-loop")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None

    def wake(self) -> None:
        """An item was scheduled or changed: look at the table again now."""
        self._wake.set()

    def step(self) -> float:
        """One turn: refill the queue if it is empty, fire what the rate allows. Returns how long
        to wait before the next turn (seconds)."""
        now = self.clock()
        if not len(self.queue):
            self.queue.add(due_rows(self.store, now, MAX_QUEUED))
        if len(self.queue) and self.outbox_backlog() > self.max_outbox_backlog:
            self.yields.inc()
            return OUTBOX_POLL_S  # live events first: let the outbox drain
        batch = self.queue.take(now)
        if batch:
            self.fire(batch, now)
            return max(0.0, self.queue.wait_s(self.clock())) if len(self.queue) else 0.0
        if len(self.queue):
            return self.queue.wait_s(now)
        upcoming = next_due_at(self.store)
        if upcoming is None:
            return MAX_IDLE_WAIT_S
        return min(MAX_IDLE_WAIT_S, max(0.0, upcoming - now))

    def fire(self, batch: list[DueItem], now: float) -> None:
        fired = fire_batch(self.store, self.firers, batch, now)
        self.batches.inc()
        if fired.events:
            self.publish(fired.events)
        for item, outcome in fired.outcomes:
            kind_outcome = outcome.partition(":")[0]
            if kind_outcome == "failed":
                self._metrics.error("scheduled_" + outcome.partition(":")[2])
                log.warning("due %s %s failed: %s", item.kind, item.id, outcome)
            late = "true" if item.due_at < self.started_at else "false"
            self.fired.labels(item.kind, kind_outcome, late).inc()
            if kind_outcome == "posted":
                self.late.labels(item.kind).observe(max(0.0, now - item.due_at))

    async def run_loop(self) -> None:
        """Forever: a turn, then sleep until the next is due or :meth:`wake` is called."""
        while True:
            self._wake.clear()
            try:
                wait_s = self.step()
            except Exception:
                log.exception("scheduler turn failed")
                wait_s = ERROR_BACKOFF_S
            if wait_s <= 0:
                await asyncio.sleep(0)  # yield: live requests go between two batches
                continue
            try:
                await asyncio.wait_for(self._wake.wait(), timeout=wait_s)
            except TimeoutError:
                pass


def info(scheduler: Scheduler | None) -> dict[str, Any]:
    """The scheduler's part of the webapp's /healthz."""
    if scheduler is None:
        return {}
    return {"scheduler_queued": len(scheduler.queue), "scheduler_rate_per_s": scheduler.queue.rate_per_s}
