"""The scheduler: due items (scheduled messages, reminders) fire once, on time, fairly,
and never in front of live traffic.

Every item that must happen at a time lives in SQLite, in ``due_items`` (its
id, kind, team, lane, due time, state), beside its kind's own row
(``scheduled_messages``, ``reminders``). The kinds register a *firer* here
(:func:`register_kind`); the scheduler decides when and in what order.

Guarantees
----------
* **Exactly once.** An item fires in one transaction that claims it
  (``state`` pending -> fired, which only one claim can do) and persists what it
  posts (the message, with its channel's next ``seq``: in bulk for the whole batch,
  :mod:`webapp_stub.due_posts`, row for row what :meth:`Store.post_message` writes for
  ``chat.postMessage``; or one by one through that very method). A webapp killed before
  that commit fires it again on restart (nothing of it was written); killed
  after, it does not (it is no longer pending) and the hand-off's restart
  replay (:mod:`webapp_stub.handoff`) delivers the committed message.
* **Late, not lost.** An item due while the webapp was down fires when it
  starts again, and is counted with ``late="true"`` in
  ``rtm_scheduler_fired_total``; ``rtm_scheduler_late_seconds`` observes every
  item's delay from its due time to its commit.
* **Fair, over the whole due set.** Items due in the same second fire
  round-robin across teams; within a team's turn, across the kinds (scheduled
  messages, reminders); within a kind's turn, across lanes (the conversation a
  scheduled message posts in, the user a reminder is for), each lane in due
  order (:class:`~webapp_stub.due_queue.FairQueue`). The whole due set (up to :data:`MAX_QUEUED`) is
  read, a chunk per event-loop turn, before the first batch fires, so one
  team's, kind's or channel's thousand items cannot hold another's one behind them.
* **Live traffic first.** The scheduler writes through a SQLite connection of
  its own whose commits do not fsync (:func:`open_scheduler_store`,
  ``synchronous=NORMAL``; the next live commit's fsync makes them durable), so
  the event loop never waits for a disk flush on a due item's behalf. It fires
  a batch only when no live write is open on the webapp's connection and the
  hand-off's outbox (with fired events awaiting their fsync) holds at most ``max_outbox_backlog`` events, then rests so
  that it takes at most ``duty_cycle`` of the event loop thread's CPU (:class:`~webapp_stub.due_queue.LiveFirst`);
  at most ``batch_max`` items per transaction and ``rate_per_s`` per second
  (:class:`~webapp_stub.due_queue.DueQueue`). A live request waits for at most one batch (about
  ``batch_max`` × 0.1 ms of CPU here).

The ordering, the rate and the yield rule are the sans-I/O classes of
:mod:`webapp_stub.due_queue`; this module holds the table, the firing transaction and
:class:`Scheduler`, the thin asyncio loop that reads due rows, fires batches and publishes.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from services.config import Parser
from services.metrics import ServiceMetrics
from webapp_stub.checkpoint import WalCheckpointer
from webapp_stub.database import MAX_EVENT_BYTES, EventClock
from webapp_stub.due_posts import DuePost, chunks, post_due_messages, postable
from webapp_stub.due_queue import (
    DEFAULT_BATCH_MAX,
    DEFAULT_DUTY_CYCLE,
    DEFAULT_OUTBOX_BACKLOG_MAX,
    DEFAULT_RATE_PER_S,
    DueItem,
    DueQueue,
    LiveFirst,
)
from webapp_stub.read_cache import ReadCache
from webapp_stub.store import ApiError, Event, Store

log = logging.getLogger("rtm.webapp.scheduler")

# The most due items held in memory (in fair order); more wait in SQLite until these have fired.
# ~300 bytes each: 100,000 are ~30 MiB. Read in chunks of READ_CHUNK rows, one per event-loop turn
# (500 rows take ~1-2 ms: a 20,000-row read at once held the loop 0.5 s).
MAX_QUEUED = 100_000
READ_CHUNK = 500
# The longest the scheduler sleeps without looking at the table (items written by another process,
# such as a bulk load, are seen within this); items scheduled through the API wake it at once.
MAX_IDLE_WAIT_S = 1.0
# After an unexpected error in a turn, wait this long before trying again.
ERROR_BACKOFF_S = 1.0
# The scheduler's connection does not fsync its commits (see open_scheduler_store).
SCHEDULER_SYNCHRONOUS = "NORMAL"
LATE_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 3600.0)

STATE_PENDING = "pending"
STATE_FIRED = "fired"
STATE_FAILED = "failed"


# A kind's firer runs inside the scheduler's transaction, after the claim: it persists what the
# item posts and returns the committed events. It raises ApiError when the item cannot fire any
# more (its channel archived, its author no longer a member): the item is then marked failed.
Firer = Callable[[Store, str, float], list[Event]]
# A kind's preparer (optional) reads a whole batch of its items in a few statements and says what
# each posts (webapp_stub/due_posts.py, the bulk path), or None for one its firer must fire alone.
Preparer = Callable[[Store, list[DueItem]], list[DuePost | None]]


def add_scheduler_flags(parser: Parser) -> None:
    """The webapp's flags of the scheduler (their defaults: webapp_stub/due_queue.py)."""
    say = "due items (scheduled messages, reminders) fired per second at most: live posts never wait behind a spike"
    parser.add("--scheduler-rate-per-s", DEFAULT_RATE_PER_S, say)
    parser.add("--scheduler-batch-max", DEFAULT_BATCH_MAX, "due items fired per transaction (one event-loop turn)")
    say = "the most of the event loop's CPU time the scheduler may take (it rests after each batch)"
    parser.add("--scheduler-duty-cycle", DEFAULT_DUTY_CYCLE, say)
    say = "the scheduler fires only while the hand-off's outbox holds at most this many events (live first)"
    parser.add("--scheduler-outbox-backlog-max", DEFAULT_OUTBOX_BACKLOG_MAX, say)


def scheduler_options(args: Any) -> dict[str, Any]:
    """:class:`Scheduler`'s limits, from the flags :func:`add_scheduler_flags` added."""
    return {
        "rate_per_s": getattr(args, "scheduler_rate_per_s", DEFAULT_RATE_PER_S),
        "batch_max": getattr(args, "scheduler_batch_max", DEFAULT_BATCH_MAX),
        "max_outbox_backlog": getattr(args, "scheduler_outbox_backlog_max", DEFAULT_OUTBOX_BACKLOG_MAX),
        "duty_cycle": getattr(args, "scheduler_duty_cycle", DEFAULT_DUTY_CYCLE),
    }


class FirerRegistry:
    """Kind name -> firer (and preparer). :data:`FIRERS` is the one the kinds register on when
    imported (as the Web API's ``@method`` registry); tests may build their own."""

    def __init__(self) -> None:
        self._firers: dict[str, Firer] = {}
        self._preparers: dict[str, Preparer] = {}

    def register(self, kind: str, firer: Firer) -> None:
        self._firers[kind] = firer

    def register_preparer(self, kind: str, preparer: Preparer) -> None:
        self._preparers[kind] = preparer

    def get(self, kind: str) -> Firer | None:
        return self._firers.get(kind)

    def preparer(self, kind: str) -> Preparer | None:
        return self._preparers.get(kind)


FIRERS = FirerRegistry()


def register_kind(kind: str) -> Callable[[Firer], Firer]:
    """Decorator: ``@register_kind("reminder")`` on a kind's firer."""

    def register(firer: Firer) -> Firer:
        FIRERS.register(kind, firer)
        return firer

    return register


def register_preparer(kind: str) -> Callable[[Preparer], Preparer]:
    """Decorator: ``@register_preparer("reminder")`` on a kind's preparer (the bulk path)."""

    def register(preparer: Preparer) -> Preparer:
        FIRERS.register_preparer(kind, preparer)
        return preparer

    return register


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


DUE_ROWS_SQL = (
    "SELECT id, kind, team, lane, due_at FROM due_items WHERE state = ? AND due_at <= ? "
    "AND (due_at, id) > (?, ?) ORDER BY due_at, id LIMIT ?"
)


def due_rows(store: Store, now: float, limit: int, after: tuple[float, str] | None = None) -> list[DueItem]:
    """Pending items due at or before ``now``, in (due time, id) order after ``after``, at most ``limit``.

    The row value ``(due_at, id) > (?, ?)`` is a range on the ``(state, due_at)`` index, whose
    entries end with the primary key ``id`` (a WITHOUT ROWID table): a read that resumes within
    one second of 20,000 due items costs microseconds. (Spelled ``due_at > ? OR (due_at = ? AND
    id > ?)`` it scanned and sorted the whole second, 40 ms a read: bench/spike.py, first run.)"""
    due_at, item_id = (-math.inf, "") if after is None else after
    rows = store.conn.execute(DUE_ROWS_SQL, (STATE_PENDING, now, due_at, item_id, limit)).fetchall()
    return [DueItem(*row) for row in rows]


def next_due_at(store: Store) -> float | None:
    row = store.conn.execute("SELECT min(due_at) FROM due_items WHERE state = ?", (STATE_PENDING,)).fetchone()
    return None if row is None or row[0] is None else float(row[0])


@dataclass
class Fired:
    """What one batch did: the committed events, and each item's outcome."""

    events: list[Event]
    outcomes: list[tuple[DueItem, str]]  # "posted", "failed:<code>" or "gone" (deleted, or fired already)


# ``+state``: not the (state, due_at) index, which would scan every pending item; the primary key.
CLAIM_SQL = "UPDATE due_items SET state = ?, fired_at = ? WHERE id IN ({marks}) AND +state = ? RETURNING id"
FAIL_SQL = "UPDATE due_items SET state = ?, error = ? WHERE id = ?"


def claim(store: Store, items: list[DueItem], now: float) -> set[str]:
    """Claim ``items`` (pending -> fired) in one statement per chunk; returns the ids claimed
    (an item deleted, completed or fired already is not)."""
    claimed: set[str] = set()
    for part in chunks([item.id for item in items]):
        marks = ",".join("?" * len(part))
        rows = store.conn.execute(CLAIM_SQL.format(marks=marks), (STATE_FIRED, now, *part, STATE_PENDING))
        claimed.update(row[0] for row in rows)
    return claimed


def fire_batch(store: Store, firers: FirerRegistry, items: list[DueItem], now: float) -> Fired:
    """Fire ``items`` in one transaction: all claimed at once (pending -> fired); those whose kind
    has a preparer and that it can post without a doubt are posted together
    (:func:`~webapp_stub.due_posts.post_due_messages`: a few statements for the whole batch);
    the others fire one by one through their kind's firer, each in a savepoint of its own, so
    one that fails (ApiError) is marked failed and the rest go on. Events come back in commit
    order (each channel's in seq order): the one-by-one items' first, then the bulk posts' in
    the order of ``items``. If the transaction fails as a whole (its COMMIT included), nothing
    of it was written, the connection is left out of any transaction, and the error is raised."""
    events: list[Event] = []
    outcome: dict[str, str] = {}
    try:
        with store.transaction() as db:
            claimed = claim(store, items, now)
            mine = [item for item in items if item.id in claimed]
            bulk: list[DuePost] = []
            alone: list[DueItem] = []
            by_kind: dict[str, list[DueItem]] = {}
            for item in mine:
                by_kind.setdefault(item.kind, []).append(item)
            prepared: dict[str, DuePost] = {}
            for kind, kind_items in by_kind.items():
                preparer = firers.preparer(kind)
                if preparer is None:
                    continue
                for item, post in zip(kind_items, preparer(store, kind_items), strict=True):
                    if post is not None:
                        prepared[item.id] = post
            verdicts = postable(store, list(prepared.values()))
            for post, ok in zip(list(prepared.values()), verdicts, strict=True):
                if not ok:
                    del prepared[post.item_id]
            for item in mine:
                post = prepared.get(item.id)
                if post is not None:
                    bulk.append(post)
                else:
                    alone.append(item)
            for item in alone:
                try:
                    with store.transaction():
                        firer = firers.get(item.kind)
                        if firer is None:
                            raise ApiError("unknown_kind")
                        events += firer(store, item.id, now)
                except ApiError as exc:
                    db.execute(FAIL_SQL, (STATE_FAILED, exc.code, item.id))
                    outcome[item.id] = f"failed:{exc.code}"
                    continue
                outcome[item.id] = "posted"
            posted = post_due_messages(store, bulk)
            events += posted
            for post in bulk:
                outcome[post.item_id] = "posted"
    except BaseException:
        if store.conn.in_transaction:  # a failed COMMIT may leave it open
            store.conn.execute("ROLLBACK")
            store.transaction_ended()
        raise
    return Fired(events, [(item, outcome.get(item.id, "gone")) for item in items])


def open_scheduler_store(
    path: str, *, max_event_bytes: int = MAX_EVENT_BYTES, event_clock: EventClock | None = None
) -> Store:
    """The scheduler's own connection to the webapp's database file ``path``.

    ``synchronous=NORMAL``: its commits are written to the WAL but not fsynced, so a batch
    holds SQLite's write lock (which live posts wait for) only while it runs, not for an
    fsync. A process crash (SIGKILL) loses nothing of them; the next live commit's fsync,
    or the next checkpoint, makes them durable across a power loss (the WAL is synced as a
    whole). WAL checkpoints stay with the webapp's checkpoint thread. ``event_clock`` is the
    webapp's connection's, so the hand-off mark holds the scheduler's events' stamps too.
    """
    store = Store(path, synchronous=SCHEDULER_SYNCHRONOUS, max_event_bytes=max_event_bytes, event_clock=event_clock)
    WalCheckpointer.take_over(store.conn)
    # Its read caches (token, channel, membership: webapp_stub/read_cache.py) see the webapp
    # connection's commits by SQLite's data_version, by default at most every 0.1 s. A due item is
    # checked when it fires (its author still a member, its channel not archived): look every time.
    for cache in vars(store).values():
        if isinstance(cache, ReadCache):
            cache.foreign_check_s = 0.0
    return store


# -- the asyncio loop ----------------------------------------------------------------------------------


class Publisher(Protocol):
    def __call__(self, events: list[Event]) -> None: ...


class Scheduler:
    """Fires due items: reads them from SQLite into a :class:`DueQueue` (a chunk per loop turn,
    the whole due set before the first batch), fires batches at the queue's rate when
    :class:`LiveFirst` allows, and publishes each batch's events once committed.

    ``store`` is the scheduler's own connection (:func:`open_scheduler_store`); ``publish`` the
    function ``chat.postMessage``'s events go through too (the hand-off). Everything runs on
    the event loop: a batch is never half-way when a live request's handler runs, a live
    write transaction is never open when a batch begins (``live_writing``), and a batch's
    events are published in the step that commits them, so the outbox gets every channel's
    events in commit (``seq``) order. :meth:`wake` tells it that an item was scheduled.
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
        cpu_clock: Callable[[], float] = time.thread_time,
        outbox_backlog: Callable[[], int] = lambda: 0,
        max_outbox_backlog: int = DEFAULT_OUTBOX_BACKLOG_MAX,
        live_writing: Callable[[], bool] = lambda: False,
        duty_cycle: float = DEFAULT_DUTY_CYCLE,
        owns_store: bool = False,
    ) -> None:
        self.store = store
        self.owns_store = owns_store
        self.publish = publish
        self.outbox_backlog = outbox_backlog
        self.live_writing = live_writing
        self.live_first = LiveFirst(max_outbox_backlog, duty_cycle)
        self.firers = firers if firers is not None else FIRERS
        self.queue = DueQueue(rate_per_s, batch_max)
        self.clock = clock
        self.cpu_clock = cpu_clock  # the event loop thread's CPU time: what a batch costs the loop
        self.started_at = clock()  # items due before this were due while the webapp was down
        self._after: tuple[float, str] | None = None  # the last (due_at, id) read; None: read from the start
        self._more = False  # the last read filled its chunk: read on before firing
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
            "rtm_scheduler_yields_total",
            "Turns the scheduler waited for live traffic: an open live write, or the hand-off's outbox",
            ["reason"],
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
        if self.owns_store:
            self.store.close()

    def wake(self) -> None:
        """An item was scheduled or changed: look at the table again now.

        Its row is read when it falls due, by the read that resumes after the last row read:
        items scheduled through the API are due in the future. One due earlier than the rows
        already read (a reminder at a unix time within the current second) is read when the
        queue has emptied: late by at most the backlog, never lost. (Reading from the start on
        every wake would, under a stream of API calls, keep the scheduler reading and never firing.)"""
        self._wake.set()

    def refill(self, now: float) -> int:
        """Read the next chunk (at most :data:`READ_CHUNK` rows) of items due by ``now`` that are
        not read yet; returns how many were queued. Reads from the start again when the queue
        is empty (ids already queued are skipped)."""
        if not len(self.queue) and not self._more:
            self._after = None
        limit = min(READ_CHUNK, MAX_QUEUED - len(self.queue))
        if limit <= 0:
            self._more = False
            return 0
        rows = due_rows(self.store, now, limit, self._after)
        if rows:
            self._after = (rows[-1].due_at, rows[-1].id)
        self._more = len(rows) == limit
        return self.queue.add(rows)

    def step(self) -> float:
        """One turn: read newly due items, or fire a batch if live traffic and the rate allow.
        Returns how long to wait before the next turn (seconds)."""
        now = self.clock()
        self.refill(now)
        if self._more:
            return 0.0  # the whole due set is read (and ordered) before the first batch fires
        if not len(self.queue):
            upcoming = next_due_at(self.store)
            if upcoming is None:
                return MAX_IDLE_WAIT_S
            return min(MAX_IDLE_WAIT_S, max(0.0, upcoming - now))
        hold = self.live_first.hold(live_writing=self.live_writing(), outbox_backlog=self.outbox_backlog())
        if hold is not None:
            self.yields.labels(hold[0]).inc()
            return hold[1]
        batch = self.queue.take(now)
        if batch:
            # The duty cycle counts the CPU the batch took, not its wall time: on a busy machine
            # a batch's wall time is mostly other processes' turns, during which the loop could
            # not have served a live request either (resting for it halved the spike's rate).
            started = self.cpu_clock()
            self.fire(batch, now)
            rest_s = self.live_first.rest_s(self.cpu_clock() - started)
            return max(rest_s, self.queue.wait_s(self.clock())) if len(self.queue) else rest_s
        return self.queue.wait_s(now)

    def fire(self, batch: list[DueItem], now: float) -> None:
        fired = fire_batch(self.store, self.firers, batch, now)
        self.batches.inc()
        if fired.events:
            self.publish(fired.events)  # committed: to the outbox in this same step
        counts: dict[tuple[str, str, str], int] = {}
        for item, outcome in fired.outcomes:
            kind_outcome, _, code = outcome.partition(":")
            if kind_outcome == "failed":
                self._metrics.error("scheduled_" + code)
                log.warning("due %s %s failed: %s", item.kind, item.id, outcome)
            key = (item.kind, kind_outcome, "true" if item.due_at < self.started_at else "false")
            counts[key] = counts.get(key, 0) + 1
            if kind_outcome == "posted":
                self.late.labels(item.kind).observe(max(0.0, now - item.due_at))
        for labels, count in counts.items():
            self.fired.labels(*labels).inc(count)

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
