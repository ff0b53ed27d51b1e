"""The ordered outbox: committed events from the webapp to an Admin Server.

After a transaction commits, its events are appended here (in commit order,
which is ``seq`` order per channel) and the HTTP reply goes out without
waiting for them. They are pipelined over one
:class:`services.connection.PeerLink` to an Admin Server, at most
:data:`MAX_IN_FLIGHT` beyond the oldest unacknowledged event, as ``pubs``
requests (many events in one frame, a result per event: docs/wire.md,
"Batched publishes"); each event is settled on its own result exactly as if
it had been its own ``pub``. When the link
is up and healthy, :meth:`Handoff.publish` writes them at once, so a pub
leaves before the HTTP reply is built and written (measured: that reply
work is about 0.6 ms of the webapp's time per post on the development
machine, which every delivery used to wait for); otherwise a send loop sends
them when the link allows. Under load the sends are paced (``interval_s``, from
:func:`webapp_stub.commit_pacer.handoff_interval_s`): a send waits until the interval has
passed since the last one, and then carries everything published meanwhile, so one ``pubs``
holds several commits' events and the admin server's cost per ``pubs`` is shared by more.

Why one module: the contract below (never drops, never reorders, no head-of-line
poison) is kept jointly by the sans-I/O window (:class:`Outbox`), the link that sends
it (:class:`Sender`) and the driver that settles each result (:class:`Handoff`); a
reader checking a promise should find all three under the promise, not in three files.

Contract
--------
* Never drops, never reorders within a channel: the queue only shrinks from
  its head, and only past acknowledged events.
* On a transient failure (``ConnectionLost``, ``RequestTimeout``, no Admin
  Server, an ``err`` reply whose code is in :data:`TRANSIENT_CODES` such as
  ``unavailable`` or ``not_owner``) the window rewinds: everything from the
  oldest unacknowledged event is resent, in order, on the next healthy Admin
  Server, after a backoff, for as long as it takes. Resending an event that
  was already applied is harmless: channel servers dedup by ``seq``. Replies
  that arrive late for an earlier attempt still count as acknowledgements.
* No head-of-line poison: an ``err`` reply with any other code (``bad_request``,
  a validation error, ``internal``) refuses *that event*. After
  :data:`MAX_REFUSALS` identical refusals in a row the event is parked in the
  store's dead-letter table with its reason (``rtm_deadletter_total{reason}``,
  logged) and the queue moves on past it. An event whose JSON is larger than
  ``max_event_bytes`` (so that its frame could break the 4 MiB wire limit) is
  parked at once with reason ``too_large``, never sent. Per-channel order is
  kept for everything else; the parked event's seq is a gap that gateways
  fill from the webapp's history (``/internal/history``), so clients still
  get it. ``rtm deadletter redrive`` sends a parked event again (it goes to
  the tail of the queue; a channel server that has applied later seqs of its
  channel acknowledges it as a duplicate).
* The Admin Server must forward pubs in the order it receives them (it does:
  it writes each to the owner's connection before reading the next).
* Without a reachable Admin Server the queue waits; the messages are durable
  in SQLite already and their HTTP callers got ``ok``.
* Across restarts and crashes: the store keeps a hand-off mark (refreshed
  every :data:`MARK_INTERVAL_S`) below which everything was acknowledged (and
  below every event the group commit still holds back from this queue: its open
  batch's, and those committed but waiting for an fsync); a starting webapp
  requeues every event from the mark on.
* The queue never drops an entry (each is a durable event), so it is bounded
  where events are made: while it holds :data:`MAX_QUEUE_EVENTS` or more,
  :attr:`Handoff.saturated` is true and the Web API refuses new writes with
  Slack's ``ratelimited`` (HTTP 429, ``Retry-After``) before persisting
  anything. Restart replay and redrives may go past the bound.

The window logic (:class:`Outbox`) is sans-I/O; :class:`Handoff` drives it with
a :class:`Sender` (the real one is :class:`AdminServerLink`).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import math
import random
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol

from prometheus_client import Counter

from services import ops
from services.connection import PeerConnection, PeerLink, backoff_delays
from services.discovery import Instance
from services.errors import ConnectionLost, ErrorCode, FrameTooLarge, PeerError, RtmError, error_from_reply
from services.identity import ADMIN_SERVER, WEBAPP
from services.metrics import LATENCY_BUCKETS_S, ServiceMetrics
from services.tls import WireTrust
from webapp_stub.commit_pacer import HANDOFF_BATCH_EVENTS, MAX_HANDOFF_INTERVAL_S
from webapp_stub.database import MAX_EVENT_BYTES, EventClock
from webapp_stub.models import Event
from webapp_stub.tally import TallyCounter, TallyHistogram

log = logging.getLogger("rtm.webapp.handoff")

# Pipelining window: enough to keep a LAN round trip busy at tens of
# thousands of events per second, small enough that a rewind resends little.
MAX_IN_FLIGHT = 256
# One pub may legitimately wait for the Admin Server's whole route budget
# (admin_server.app.ROUTE_BUDGET_S = 10 s, while a channel server is being
# replaced) before it answers ``unavailable``; only beyond that is the AS hung.
REQUEST_TIMEOUT_S = 15.0
# How long the send loop waits for a connection before checking again.
CONNECT_WAIT_S = 1.0
RETRY_INITIAL_DELAY_S = 0.05
RETRY_MAX_DELAY_S = 2.0
DEFAULT_FLUSH_TIMEOUT_S = 5.0
# Identical refusals of one event in a row before it is parked as a dead letter.
# More than one, so that a refusal caused by a peer's passing state (a channel
# server mid-restart answering oddly) gets a retry, after the usual backoff;
# few, so that a poison event holds its queue up for well under a second.
MAX_REFUSALS = 3
# Beyond this many queued events, writes are refused with ratelimited (HTTP 429).
# At ~1 KiB of memory per queued event that is ~50 MiB; at the hand-off's pace
# (tens of thousands of events per second) it drains in about a second once an
# Admin Server is back. Configurable with rtm webapp --max-outbox-events.
MAX_QUEUE_EVENTS = 50_000
# Error codes that say something about the fleet's state or this link, not about
# the event: the event waits and is retried in order, however long it takes.
TRANSIENT_CODES = frozenset(
    {
        ErrorCode.NOT_OWNER,
        ErrorCode.NO_OWNER,
        ErrorCode.UNAVAILABLE,
        ErrorCode.UNKNOWN_OP,  # a peer of another version: every pub would get it
        "forbidden",  # this webapp's credentials or role, not the event
        "overloaded",
        "busy",
        "ratelimited",
        "shutting_down",
    }
)
# Refusal reasons used as metric labels; any other code is counted as "other"
# (a peer must not be able to mint label values) and stored verbatim.
REFUSAL_LABELS = frozenset({"too_large", "bad_request", "internal", "unencodable"})


def refusal_of(exc: BaseException) -> str | None:
    """The reason ``exc`` refuses its event for good, or None if it is transient.

    An ``err`` reply refuses unless its code is in :data:`TRANSIENT_CODES`; a
    frame over the wire limit is ``too_large``; an event msgpack cannot encode
    is ``unencodable``. Connection loss, timeouts and a full send buffer are
    transient.
    """
    if isinstance(exc, PeerError):
        return None if exc.code in TRANSIENT_CODES else (exc.code or ErrorCode.INTERNAL)[:100]
    if isinstance(exc, FrameTooLarge):
        return "too_large"
    if isinstance(exc, (TypeError, ValueError, OverflowError)):  # raised by the encoder, before any byte left
        return "unencodable"
    return None


# Restart replay: the outbox lives in memory, so the store keeps a mark, at
# most MARK_INTERVAL_S old, below which every event was acknowledged. A
# restarted webapp republishes everything from the mark on (resends are
# harmless: receivers dedup by seq), so a crash loses no hand-off.
HANDOFF_MARK = "handoff"
MARK_INTERVAL_S = 1.0
MARK_MARGIN_S = 1.0  # clock slack: events stamped this much before the mark are replayed too


class DeadLetterStore(Protocol):
    """Where parked events go (:class:`webapp_stub.store.Store`)."""

    def park_event(self, event: Event, reason: str, detail: str, refusals: int) -> None: ...

    def resolve_dead_letter(self, channel: str, seq: int) -> None: ...


class MarkStore(Protocol):
    event_clock: EventClock

    def get_mark(self, name: str) -> float | None: ...

    def set_mark(self, name: str, value: float) -> None: ...

    def events_since(self, created_at: float) -> list[Event]: ...


def replay_from_mark(store: MarkStore, handoff: Handoff, now: float) -> int:
    """Queue every event at or after the stored mark (none on a first start); then mark ``now``."""
    mark = store.get_mark(HANDOFF_MARK)
    events = store.events_since(mark) if mark is not None else []
    handoff.publish(events)
    write_mark(store, handoff, now)
    if events:
        log.info("replaying %d events committed since the last hand-off mark", len(events))
    return len(events)


def write_mark(store: MarkStore, handoff: Handoff, now: float, held_t0: float | None = None) -> None:
    """Record that everything before the oldest queued event (or ``now``) was acknowledged; and
    from here on stamp events at ``now`` or later, so none falls below the mark if the wall clock
    steps back (webapp_stub/database.py, :class:`EventClock`).

    ``held_t0``: the oldest ``t0`` of the events committed but not yet queued here (a group
    commit's events waiting for their batch's commit or their fsync: webapp_stub/commit.py,
    :meth:`~webapp_stub.commit.GroupCommit.oldest_t0`); the mark stays below them too, or a
    crash before they reach the outbox would leave them out of the restart's replay."""
    store.event_clock.hold_at_least(now)
    oldest = handoff.outbox.oldest_t0()
    for t0 in (oldest, held_t0):
        if t0 is not None:
            now = min(now, t0)
    store.set_mark(HANDOFF_MARK, now - MARK_MARGIN_S)


def pub_item(event: Event) -> dict[str, Any]:
    """The fields of one event as a ``pub`` carries them, and as one entry of a ``pubs``."""
    item: dict[str, Any] = {
        "ch": event.channel,
        "seq": event.seq,
        "json": event.json.encode(),
        "t0": event.t0,
        "eid": event.eid,
    }
    if event.ctl is not None:
        item["ctl"] = event.ctl
    return item


def pub_message(event: Event) -> dict[str, Any]:
    """The ``pub`` request for one event (``id`` is added by the connection)."""
    return {"op": "pub", **pub_item(event)}


@dataclass(eq=False)
class Entry:
    """One queued event and its delivery state."""

    event: Event
    acked: bool = False
    attempts: int = 0
    redrive: bool = False  # an operator's redrive of a dead letter
    refusal: str | None = None  # the code of the last refusal in a row of identical ones
    refusals: int = 0
    _item: dict[str, Any] | None = field(default=None, repr=False)

    def refused(self, reason: str) -> int:
        """Count one refusal; returns how many identical ones in a row."""
        if reason != self.refusal:
            self.refusal, self.refusals = reason, 0
        self.refusals += 1
        return self.refusals

    @property
    def item(self) -> dict[str, Any]:
        """The event's fields as a ``pubs`` entry (built once, kept for resends)."""
        if self._item is None:
            self._item = pub_item(self.event)
        return self._item

    @property
    def message(self) -> dict[str, Any]:
        """The event as a single ``pub`` request."""
        return {"op": "pub", **self.item}


class Outbox:
    """The sans-I/O ordered window.

    Entries ``[0, sent)`` of the queue were sent in the current ``epoch`` and
    are either in flight or acknowledged; :meth:`take` sends more while
    ``sent < max_in_flight``; :meth:`ack` pops acknowledged entries off the
    head; :meth:`fail` rewinds ``sent`` to 0 so the next :meth:`take` resends
    from the oldest unacknowledged entry, in order.
    """

    def __init__(self, max_in_flight: int = MAX_IN_FLIGHT) -> None:
        if max_in_flight < 1:
            raise ValueError("max_in_flight must be at least 1")
        self.max_in_flight = max_in_flight
        self._entries: deque[Entry] = deque()
        self._sent = 0
        self.epoch = 0

    def __len__(self) -> int:
        return len(self._entries)

    def append(self, event: Event, redrive: bool = False) -> Entry:
        entry = Entry(event, redrive=redrive)
        self._entries.append(entry)
        return entry

    @property
    def sendable(self) -> bool:
        """Whether :meth:`take` would return anything (or skip acked entries)."""
        return self._sent < min(len(self._entries), self.max_in_flight)

    @property
    def unsent(self) -> int:
        """Entries not sent in this epoch (beyond the window or not yet taken)."""
        return len(self._entries) - self._sent

    @property
    def in_flight(self) -> int:
        return sum(1 for i in range(self._sent) if not self._entries[i].acked)

    def take(self) -> list[Entry]:
        """The next entries to send in this epoch, in queue order."""
        out: list[Entry] = []
        limit = min(len(self._entries), self.max_in_flight)
        while self._sent < limit:
            entry = self._entries[self._sent]
            self._sent += 1
            if not entry.acked:  # acknowledged by a late reply to an earlier attempt
                entry.attempts += 1
                out.append(entry)
        return out

    def ack(self, entry: Entry) -> bool:
        """Mark ``entry`` done, delivered or parked (from any epoch); True if it was not yet."""
        if entry.acked:
            return False
        entry.acked = True
        entries = self._entries
        while entries and entries[0].acked:
            entries.popleft()
            if self._sent:
                self._sent -= 1
        return True

    def fail(self, epoch: int) -> bool:
        """A request sent in ``epoch`` failed: rewind (once per epoch). True if it rewound."""
        if epoch != self.epoch:
            return False
        self.epoch += 1
        self._sent = 0
        return True

    def oldest_t0(self) -> float | None:
        """``t0`` of the oldest unacknowledged event (the head), None when empty."""
        return self._entries[0].event.t0 if self._entries else None

    def pending(self) -> list[Event]:
        """Every event not yet acknowledged, in order (for tests and shutdown logs)."""
        return [e.event for e in self._entries if not e.acked]


class Sender(Protocol):
    """Where pubs go. :class:`AdminServerLink` is the real one."""

    async def ready(self, timeout_s: float) -> bool:
        """Wait up to ``timeout_s`` for a usable connection."""

    @property
    def connected(self) -> bool:
        """Whether :meth:`send` would write at once."""

    def send(self, message: dict[str, Any], timeout_s: float) -> Awaitable[Any]:
        """Send one request: written at once when :attr:`connected`. The awaitable
        completes at its ``ok`` and raises an RtmError otherwise."""

    def failed(self, error: BaseException) -> None:
        """A request failed: move on to the next healthy Admin Server."""

    async def close(self) -> None: ...


class AdminServerLink:
    """One PeerLink to one Admin Server at a time, chosen round-robin from the healthy set."""

    def __init__(self, trust: WireTrust, name: str = f"{WEBAPP}->{ADMIN_SERVER}") -> None:
        self.name = name
        self.instances: list[Instance] = []
        self._index = random.randrange(1 << 16)
        self.current: tuple[str, int] | None = None
        self.link = PeerLink(
            ADMIN_SERVER,
            self._address,
            lambda: PeerConnection(name=name, coalesce_writes=True),  # a commit's pubs leave in one write
            on_connected=self._still_wanted,
            trust=trust,
            expect=ADMIN_SERVER,
        )
        self.link.start()

    def set_instances(self, instances: Iterable[Instance]) -> None:
        """The Discovery watch callback: the healthy Admin Servers."""
        self.instances = sorted(instances, key=lambda inst: inst.id)
        addresses = {(inst.address, inst.port) for inst in self.instances}
        log.info("admin servers: %s", sorted(f"{a}:{p}" for a, p in addresses) or "none")
        if self.current is not None and self.current not in addresses:
            self._drop(ConnectionLost(f"admin server {self.current} left the healthy set"))

    def _address(self) -> tuple[str, int] | None:
        if not self.instances:
            self.current = None
            return None
        inst = self.instances[self._index % len(self.instances)]
        self.current = (inst.address, inst.port)
        return self.current

    async def _still_wanted(self, conn: PeerConnection) -> None:
        """Refuse a connection that finished after its Admin Server left the healthy set."""
        if self.current not in {(inst.address, inst.port) for inst in self.instances}:
            raise ConnectionLost(f"admin server {self.current} left the healthy set while connecting")

    def _drop(self, reason: BaseException) -> None:
        conn = self.link.conn
        if conn is not None and conn.is_open:
            conn.abort(reason)

    async def ready(self, timeout_s: float) -> bool:
        if self.link.connected:
            return True
        try:
            conn = await self.link.wait_connected(timeout_s)
        except ConnectionLost:
            return False
        if conn.is_open:
            return True
        # A connection we just aborted, which the link has not noticed yet:
        # let it see the close (and clear its ready flag) before we ask again.
        await asyncio.wait([conn.closed], timeout=timeout_s)
        return False

    @property
    def connected(self) -> bool:
        conn = self.link.conn
        return self.link.connected and conn is not None and conn.is_open

    def send(self, message: dict[str, Any], timeout_s: float) -> Awaitable[Any]:
        conn = self.link.conn
        if self.link.connected and conn is not None and conn.is_open:
            return conn.begin_request(message, timeout_s)  # on the wire when this returns
        return asyncio.ensure_future(self.link.request(message, timeout_s))  # waits for a connection

    def failed(self, error: BaseException) -> None:
        self._index += 1
        self._drop(error)

    async def close(self) -> None:
        await self.link.close()


class Handoff:
    """Drives an :class:`Outbox` over a :class:`Sender`."""

    def __init__(
        self,
        sender: Sender,
        metrics: ServiceMetrics | None = None,
        *,
        max_in_flight: int = MAX_IN_FLIGHT,
        request_timeout_s: float = REQUEST_TIMEOUT_S,
        retry_initial_s: float = RETRY_INITIAL_DELAY_S,
        retry_max_s: float = RETRY_MAX_DELAY_S,
        clock: Callable[[], float] = time.time,
        dead_letters: DeadLetterStore | None = None,
        max_refusals: int = MAX_REFUSALS,
        max_event_bytes: int = MAX_EVENT_BYTES,
        max_queue_events: int = MAX_QUEUE_EVENTS,
        batching: bool = True,
        interval_s: Callable[[], float] | None = None,
        batch_events: int = HANDOFF_BATCH_EVENTS,
    ) -> None:
        if max_refusals < 1:
            raise ValueError("max_refusals must be at least 1")
        self.sender = sender
        self.outbox = Outbox(max_in_flight)
        self.dead_letters = dead_letters
        self.max_refusals = max_refusals
        self.max_event_bytes = max_event_bytes
        self.max_queue_events = max_queue_events
        self.parked = 0
        # Whether to send ``pubs`` batches; cleared for good if the Admin Server answers
        # ``unknown_op`` to one (a peer of an older version): then one ``pub`` per event.
        self.batching = batching
        self.request_timeout_s = request_timeout_s
        self.clock = clock
        # The least time from one send to the next, now: under load the events of several commits
        # go in one ``pubs`` (commit_pacer.handoff_interval_s); 0 (the default): each at once.
        self.interval_s: Callable[[], float] = interval_s or (lambda: 0.0)
        self.batch_events = batch_events  # a held send goes at once when this many events wait
        self._last_sent_at = -math.inf  # time.monotonic() of the last send
        self._interval_failed = False  # logged once
        self._retry_delays = (retry_initial_s, retry_max_s)
        self._delays = backoff_delays(*self._retry_delays)
        self._retry_pending = False
        self._failing = False
        self._wake = asyncio.Event()
        self._drained = asyncio.Event()
        self._drained.set()
        self._task: asyncio.Task[None] | None = None
        self._requests: set[asyncio.Future[Any]] = set()
        # (channel, seq) -> futures of callers waiting for that event to leave the queue (see settled)
        self._waiters: dict[tuple[str, int], list[asyncio.Future[None]]] = {}
        self.delivered = 0
        self.retries = 0
        self._m_published: Counter | None = None
        self._m_delivered: TallyCounter | None = None
        self._m_retries: Counter | None = None
        self._m_parked: Counter | None = None
        self._m_refusals: Counter | None = None
        self._m_redriven: Counter | None = None
        self._m_latency: TallyHistogram | None = None
        if metrics is not None:
            self._register_metrics(metrics)

    def _register_metrics(self, metrics: ServiceMetrics) -> None:
        """The hand-off's counters, its latency histogram and its queue gauges."""
        self._m_parked = metrics.counter(
            "rtm_deadletter_total", "Events parked in the dead-letter table, by reason", ["reason"]
        )
        self._m_refusals = metrics.counter(
            "rtm_webapp_handoff_refusals_total", "Refusals of an event by the fleet (before parking)", ["reason"]
        )
        self._m_redriven = metrics.counter(
            "rtm_deadletter_redriven_total", "Dead letters an operator sent again, by outcome", ["outcome"]
        )
        self._m_published = metrics.counter("rtm_webapp_handoff_events_total", "Events queued for an Admin Server")
        # per event: plain ints, exported on scrape (webapp_stub/tally.py)
        self._m_delivered = TallyCounter(
            metrics.registry, "rtm_webapp_handoff_delivered_total", "Events an Admin Server acknowledged"
        )
        self._m_retries = metrics.counter(
            "rtm_webapp_handoff_retries_total", "Rewinds: resends from the oldest unacknowledged event"
        )
        self._m_latency = TallyHistogram(
            metrics.registry, "rtm_webapp_handoff_seconds", "From commit to the Admin Server's ok", LATENCY_BUCKETS_S
        )
        metrics.gauge("rtm_webapp_handoff_queue_depth", "Events not yet acknowledged by an Admin Server").set_function(
            lambda: len(self.outbox)
        )
        metrics.gauge("rtm_webapp_handoff_in_flight", "Pubs awaiting a reply").set_function(
            lambda: self.outbox.in_flight
        )
        metrics.gauge(
            "rtm_webapp_handoff_interval_seconds", "The least time between two sends now (paced under load)"
        ).set_function(self.interval_s)

    # -- producer side ------------------------------------------------------------
    def publish(self, events: Iterable[Event]) -> None:
        """Queue committed events (in commit order). Never blocks, never fails."""
        count = 0
        for event in events:
            self.outbox.append(event)
            count += 1
        if count:
            if self._m_published is not None:
                self._m_published.inc(count)
            self._drained.clear()
            if self._task is not None and not self._failing and self.sender.connected and not self._held():
                self._send_window()  # now, before the caller writes its HTTP reply
            if self.outbox.sendable:
                self._wake.set()

    def settled(self, event: Event, timeout_s: float) -> asyncio.Future[bool]:
        """Wait, at most ``timeout_s``, until ``event`` (published, or to be published when its batch
        commits) has left the queue: acknowledged by an Admin Server (whose channel server has written
        it to every subscribed gateway before it answers), or parked. The task it returns gives True
        if it did in time.

        The wait is registered at once, when this is called, not when the task first runs: the
        caller may first wait for the event's commit (``auth.revoke``), and the event may leave the
        queue before the caller awaits the task. Cancelling the task drops the wait.

        For the rare reply that must not overtake its event's fan-out (``auth.revoke``: a post made
        after its reply must not reach the revoked connections first); posts never wait here. A
        waiter is dropped when its task ends (done, given up or cancelled, even before it ran), so
        they are bounded by the callers waiting."""
        key = (event.channel, event.seq)
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.setdefault(key, []).append(waiter)
        task = asyncio.ensure_future(self._settling(waiter, timeout_s))
        task.add_done_callback(lambda _: self._drop_waiter(key, waiter))
        return task

    @staticmethod
    async def _settling(waiter: asyncio.Future[None], timeout_s: float) -> bool:
        try:
            await asyncio.wait_for(waiter, timeout_s)
        except TimeoutError:
            return False
        return True

    def _drop_waiter(self, key: tuple[str, int], waiter: asyncio.Future[None]) -> None:
        waiting = self._waiters.get(key)
        if waiting is not None and waiter in waiting:
            waiting.remove(waiter)
            if not waiting:
                del self._waiters[key]

    def _release_waiters(self, event: Event) -> None:
        if not self._waiters:
            return
        for waiter in self._waiters.pop((event.channel, event.seq), ()):
            if not waiter.done():
                waiter.set_result(None)

    def redrive(self, events: Iterable[Event]) -> None:
        """Queue dead letters an operator asked to send again (at the tail)."""
        count = 0
        for event in events:
            self.outbox.append(event, redrive=True)
            count += 1
            log.info("redriving dead letter %s", event.eid, extra={"eid": event.eid, "channel": event.channel})
        if count:
            self._drained.clear()
            self._wake.set()

    @property
    def saturated(self) -> bool:
        """True while the queue holds ``max_queue_events`` or more: refuse new writes."""
        return len(self.outbox) >= self.max_queue_events

    def __len__(self) -> int:
        return len(self.outbox)

    # -- lifecycle ---------------------------------------------------------------------
    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._send_loop(), name="handoff-send-loop")

    async def flush(self, timeout_s: float = DEFAULT_FLUSH_TIMEOUT_S) -> bool:
        """Wait until every queued event is acknowledged; False if ``timeout_s`` passed first."""
        try:
            await asyncio.wait_for(self._drained.wait(), timeout_s)
        except TimeoutError:
            return False
        return True

    async def close(self) -> None:
        """Stop sending (unacknowledged events stay durable in SQLite) and close the sender."""
        tasks = [t for t in (self._task, *self._requests) if t is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._task = None
        if self.outbox:
            log.warning(
                "stopping with %d events not handed off (first %s)", len(self.outbox), self.outbox.pending()[0].eid
            )
        await self.sender.close()

    # -- the loop ----------------------------------------------------------------------
    async def _send_loop(self) -> None:
        while True:
            if self._retry_pending:
                self._retry_pending = False
                await asyncio.sleep(next(self._delays))
                continue
            if not self.outbox.sendable:
                self._wake.clear()
                await self._wake.wait()
                continue
            if self._held():  # paced: what is published meanwhile goes in the same pubs
                await asyncio.sleep(self._held_s())
                continue
            try:
                if not await self.sender.ready(CONNECT_WAIT_S):
                    continue
                self._send_window()
            except Exception:  # never let the one task that resends die: log it, back off, go on
                log.exception("hand-off: sending failed unexpectedly; retrying after a backoff")
                self._retry_pending = True

    def _held_s(self) -> float:
        """How much longer the next send waits (the hand-off's pacing); 0 or less: none. An interval
        that is not a number from 0 to MAX_HANDOFF_INTERVAL_S, or that fails, holds nothing past
        that bound: the pacing must never stop the one task that sends (review11)."""
        try:
            interval_s = float(self.interval_s())
        except Exception:
            if not self._interval_failed:
                self._interval_failed = True
                log.exception("hand-off: its interval failed; sending without pacing")
            interval_s = 0.0
        if not interval_s > 0.0:  # also NaN
            return -1.0
        return self._last_sent_at + min(interval_s, MAX_HANDOFF_INTERVAL_S) - time.monotonic()

    def _held(self) -> bool:
        """Whether the next send waits: its interval is not up, and fewer than ``batch_events`` wait."""
        return self.outbox.unsent < self.batch_events and self._held_s() > 0

    def _send_window(self) -> None:
        """Send what the window allows, in queue order, as ``pubs`` batches of at most
        ``ops.MAX_PUBS_EVENTS`` events and ``ops.MAX_PUBS_JSON_BYTES`` of JSON (one
        request, one reply, one result per event); each reply is handled by a callback
        on its future (no task per request). An event too large for a batch, and every
        event while the Admin Server does not know ``pubs``, goes as its own ``pub``."""
        epoch = self.outbox.epoch
        batch: list[Entry] = []
        batch_bytes = 0
        entries = self.outbox.take()
        if entries:
            self._last_sent_at = time.monotonic()
        for entry in entries:
            size = len(entry.item["json"])
            if size > self.max_event_bytes:  # never put it on the wire: it could break the frame limit
                self._park(entry, "too_large", f"event of {size} bytes exceeds the limit of {self.max_event_bytes}")
                continue
            if not self.batching or size > ops.MAX_PUBS_JSON_BYTES:
                if batch:
                    self._send_batch(batch, epoch)
                    batch, batch_bytes = [], 0
                self._send(entry.message, functools.partial(self._on_reply, entry, epoch))
                continue
            if len(batch) >= ops.MAX_PUBS_EVENTS or batch_bytes + size > ops.MAX_PUBS_JSON_BYTES:
                self._send_batch(batch, epoch)
                batch, batch_bytes = [], 0
            batch.append(entry)
            batch_bytes += size
        if batch:
            self._send_batch(batch, epoch)

    def _send_batch(self, entries: list[Entry], epoch: int) -> None:
        message = {"op": "pubs", "evs": [entry.item for entry in entries]}
        try:
            self._send(message, functools.partial(self._on_batch_reply, entries, epoch), raise_refusal=True)
        except Exception:  # the encoder refused the frame, before any byte left: find the event it was
            for entry in entries:  # each alone, so that only that one is refused (issue 13)
                self._send(entry.message, functools.partial(self._on_reply, entry, epoch))

    def _send(
        self, message: dict[str, Any], on_reply: Callable[[asyncio.Future[Any]], None], raise_refusal: bool = False
    ) -> None:
        reply: asyncio.Future[Any]
        try:
            reply = asyncio.ensure_future(self.sender.send(message, self.request_timeout_s))
        except Exception as exc:  # the link broke as we wrote: the same remedy as a failed reply
            if raise_refusal and refusal_of(exc) is not None:
                raise
            reply = asyncio.get_running_loop().create_future()
            reply.set_exception(exc)
        self._requests.add(reply)
        reply.add_done_callback(on_reply)

    def _on_reply(self, entry: Entry, epoch: int, reply: asyncio.Future[Any]) -> None:
        self._requests.discard(reply)
        if reply.cancelled():
            return  # closing
        self._settle(entry, epoch, reply.exception())

    def _on_batch_reply(self, entries: list[Entry], epoch: int, reply: asyncio.Future[Any]) -> None:
        """One reply for a ``pubs``: each event settled on its own result, in order, exactly
        as if it had been its own ``pub`` (a refusal counts against that event alone)."""
        self._requests.discard(reply)
        if reply.cancelled():
            return  # closing
        exc = reply.exception()
        if exc is not None:
            if isinstance(exc, PeerError) and exc.code == ErrorCode.UNKNOWN_OP and self.batching:
                log.warning("the admin server does not know pubs (an older version?): sending one pub per event")
                self.batching = False
            for entry in entries:
                self._settle(entry, epoch, exc)
            return
        answer = reply.result()
        results = answer.get("res")
        if type(results) is not list or len(results) != len(entries):
            broken = ConnectionLost(f"pubs answered without a result per event ({len(entries)} sent)")
            for entry in entries:
                self._settle(entry, epoch, broken)
            return
        details: dict[int, str] = {}
        for pair in answer.get("det") or ():
            if type(pair) is list and len(pair) == 2 and type(pair[0]) is int:
                details[pair[0]] = str(pair[1])
        for index, (entry, result) in enumerate(zip(entries, results, strict=True)):
            if result == ops.PUB_OK or result == ops.PUB_DUPLICATE:
                self._settle(entry, epoch, None)
            else:
                code = str(result)
                self._settle(entry, epoch, error_from_reply({"code": code, "detail": details.get(index, "")}))

    def _settle(self, entry: Entry, epoch: int, exc: BaseException | None) -> None:
        """The outcome of one event's hand-off: ``exc`` None is its ``ok``."""
        if exc is not None:  # RtmError from the peer or the link; anything else is a bug, same remedy
            reason = refusal_of(exc)
            if reason is None and not isinstance(exc, RtmError):
                log.error("unexpected error handing off %s", entry.event.eid, exc_info=exc)
            if reason is not None and not entry.acked:
                if self._m_refusals is not None:
                    self._m_refusals.labels(self._label(reason)).inc()
                if entry.refused(reason) >= self.max_refusals:
                    self._park(entry, reason, str(exc))
                    return
            self._on_failure(entry, epoch, exc)
            return
        if self.outbox.ack(entry):
            self._release_waiters(entry.event)
            self.delivered += 1
            if self._m_delivered is not None and self._m_latency is not None:
                self._m_delivered.inc()
                self._m_latency.observe(max(0.0, self.clock() - entry.event.t0))
            if entry.redrive:
                self._redriven(entry, "delivered")
            if self._failing:
                self._failing = False
                log.info("hand-off recovered (%d queued)", len(self.outbox))
                self._delays = backoff_delays(*self._retry_delays)
            self._settled()

    def _settled(self) -> None:
        """An entry left the queue's head region: wake the loop, and flush() if empty."""
        if not self.outbox:
            self._drained.set()
        self._wake.set()

    @staticmethod
    def _label(reason: str) -> str:
        return reason if reason in REFUSAL_LABELS else "other"

    def _park(self, entry: Entry, reason: str, detail: str) -> None:
        """Take ``entry`` out of the queue into the dead-letter table; the queue moves on."""
        if not self.outbox.ack(entry):
            return  # a late reply acknowledged it meanwhile
        event = entry.event
        self._release_waiters(event)
        self.parked += 1
        refusals = max(1, entry.refusals)
        log.error(
            "parked %s as a dead letter after %d refusal(s): %s (%s); the queue moves on",
            event.eid,
            refusals,
            reason,
            detail,
            extra={"eid": event.eid, "channel": event.channel},
        )
        if self._m_parked is not None:
            self._m_parked.labels(self._label(reason)).inc()
        if entry.redrive:
            self._redriven(entry, "parked_again")
        if self.dead_letters is not None:
            try:
                self.dead_letters.park_event(event, reason, detail, refusals)
            except Exception:  # the event stays in the events table: gateways still fill it from history
                log.exception("could not record dead letter %s", event.eid)
        self._settled()

    def _redriven(self, entry: Entry, outcome: str) -> None:
        if self._m_redriven is not None:
            self._m_redriven.labels(outcome).inc()
        if outcome == "delivered" and self.dead_letters is not None:
            try:
                self.dead_letters.resolve_dead_letter(entry.event.channel, entry.event.seq)
            except Exception:
                log.exception("could not mark dead letter %s delivered", entry.event.eid)
        log.info("redrive of %s: %s", entry.event.eid, outcome)

    def _on_failure(self, entry: Entry, epoch: int, exc: BaseException) -> None:
        if not self.outbox.fail(epoch):
            return  # this attempt was already rewound
        self.retries += 1
        if self._m_retries is not None:
            self._m_retries.inc()
        if not self._failing:
            self._failing = True
            log.warning(
                "hand-off of %s failed (%s); resending from the oldest unacknowledged event", entry.event.eid, exc
            )
        else:
            log.debug("hand-off of %s failed again: %s", entry.event.eid, exc)
        self.sender.failed(exc)
        self._retry_pending = True
        self._wake.set()
