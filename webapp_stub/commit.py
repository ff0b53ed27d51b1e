"""Group commit: the writes of one event-loop turn share one transaction and one fsync.

With ``PRAGMA synchronous=FULL`` every SQLite ``COMMIT`` fsyncs the WAL, so
that a message answered ``ok`` survives a power loss. One fsync per post
would cap the webapp at the disk's fsync rate; instead, :class:`GroupCommit`
makes the first write of a loop turn open a transaction (the store's
:meth:`~webapp_stub.store.Store.begin_batch`), every other write of that turn
joins it as a savepoint, and a callback scheduled for the next turn (or
:data:`GROUP_COMMIT_WINDOW_S` later) commits them all at once. Under load the
commits are paced: after a commit of two or more writes, the next one waits until
the paced interval has passed since that commit began: :data:`MIN_COMMIT_INTERVAL_S`, growing
with the rate of writes up to :data:`~webapp_stub.commit_pacer.COMMIT_INTERVAL_CAP_S`
(:class:`~webapp_stub.commit_pacer.CommitPacer`).

Contract
--------
* A write is durable before its caller's reply: the API awaits
  :meth:`GroupCommit.durable` after a handler, which returns once the batch
  that was open is committed (at once when none is).
* Events are handed to the outbox only after their batch committed, in
  commit order (which is ``seq`` order per channel): a gateway or Admin
  Server never sees an event that a failed commit could take back.
* Seqs stay per-channel, gapless and in the same transaction as their event:
  a failed handler's savepoint is rolled back whole, seq allocation included.
* If the commit itself fails (disk full, I/O error), the whole batch is
  rolled back, its events are dropped before anyone saw them, and every
  caller waiting in :meth:`durable` gets :class:`CommitFailed` (answered
  ``internal_error``); nothing of it was acknowledged.
* While a request's handler runs synchronously, nothing else runs, so a batch
  never holds half a request.
* Events another connection committed *without* an fsync (the scheduler's,
  ``synchronous=NORMAL``: webapp_stub/scheduler.py) are handed to the outbox
  only once the WAL is on disk (:meth:`GroupCommit.publish_after_sync`): with
  the next group commit's fsync, which syncs the whole WAL file and so theirs
  too, or with an fsync of the WAL run on a thread for them, whichever comes
  first; and always before the events of any later commit, so each channel's
  events still reach the outbox in ``seq`` order. A fired scheduled message is
  never delivered before it would survive a power loss (a delivered-then-lost
  event's seq would be reused, and gateways would drop the reuse as a duplicate),
  nor named by a read: ``durable`` with no batch open waits for their fsync too (a
  bootstrap's seqs, a gateway's history fill).
* With ``fsync_thread`` (``--commit-fsync-thread``, off by default: :data:`COMMIT_FSYNC_THREAD`): the batch's
  COMMIT writes it to the WAL without an fsync (``synchronous=NORMAL`` on the writer's
  connection) and a dedicated thread fsyncs the WAL file, which is what FULL's COMMIT
  does inline. Everything above still holds, later: the batch's callers are answered and
  its events handed to the outbox only when an fsync that *started after* its COMMIT has
  ended, batches strictly in commit order (a queue with one fsync in flight; the next
  covers every commit made meanwhile), unsynced scheduler events in the same queue. A
  read (``durable`` with no batch open) waits for the last commit's fsync, so no reply
  names a seq that is not on disk. Meanwhile the event loop keeps parsing requests and
  opens the next batch. If the fsync fails, the callers waiting for it get
  :class:`CommitFailed` (nothing was acknowledged); the events stay queued and go out
  after a later fsync succeeds (``WAL_SYNC_RETRY_S``).

Why one module over 500 lines: one state machine over one transaction. When a batch opens, when
it commits (pacing), when its events and callers are released (inline, after the fsync thread, after
the scheduler's unsynced events) and when the loop may nap all read and write the same few fields,
and each of the contract's points above is kept by their order; split, they would have to share them.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Protocol

from prometheus_client import Counter, Histogram

from services import ops
from services.config import Parser
from services.metrics import ServiceMetrics
from webapp_stub.commit_pacer import (
    COMMIT_INTERVAL_CAP_S,
    COMMIT_PACING_BASE_RATE_PER_S,
    HANDOFF_BATCH_EVENTS,
    HANDOFF_INTERVAL_CAP_S,
    HANDOFF_PACING_BASE_RATE_PER_S,
    MAX_HANDOFF_INTERVAL_S,
    CommitPacer,
)
from webapp_stub.models import Event
from webapp_stub.wal_fsync import WalFsync

log = logging.getLogger("rtm.webapp.commit")

# How long a batch stays open after its first write. 0: until the next turn of
# the event loop, which already gathers every request that arrived together
# (and, while a commit's fsync blocks the loop, every request that arrived
# during it). A positive window trades latency for larger batches.
GROUP_COMMIT_WINDOW_S = 0.0
# The largest --group-commit-window-s accepted: every post may wait this long.
MAX_GROUP_COMMIT_WINDOW_S = 1.0
# The least time from one commit's start to the next's, under load (and the paced interval while
# the rate of writes is at most COMMIT_PACING_BASE_RATE_PER_S; above, it grows with the rate up to
# COMMIT_INTERVAL_CAP_S: webapp_stub/commit_pacer.py). A batch opened sooner than the paced
# interval after a commit that carried at least PACED_AFTER_BATCH_WRITES writes stays open until
# the interval has passed: while the load lasts, commits come at most this often and each carries more posts, and
# what a commit costs (the COMMIT and its fsync, the hand-off's `pubs` and the admin and channel
# servers' work per `pubs`, each a wake-up of another process) is shared by more posts. Reads that
# wait for durability (``durable()`` with a batch open) wait for the held batch too. A batch
# opened later, or after a commit of a lone write (light load), commits at the next turn as
# before: a post at light load waits for nothing. 0: every turn may commit.
MIN_COMMIT_INTERVAL_S = 0.005
# The interval holds a batch only after a commit with at least this many writes: the sign of load
# (at light load a loop turn holds one post).
PACED_AFTER_BATCH_WRITES = 2
# The largest --min-commit-interval-s, --commit-interval-cap-s and --handoff-interval-cap-s accepted:
# every post (or delivery) under load may wait this long.
MAX_COMMIT_INTERVAL_S = 1.0
# The largest --handoff-batch-events accepted: a pubs carries at most this many (ops.MAX_PUBS_EVENTS).
MAX_HANDOFF_BATCH_EVENTS = ops.MAX_PUBS_EVENTS
# The largest --commit-pacing-base-rate-per-s and --handoff-pacing-base-rate-per-s accepted.
MAX_COMMIT_PACING_BASE_RATE_PER_S = 1_000_000.0
# Under load, after a paced commit (one that carried PACED_AFTER_BATCH_WRITES or more), the event
# loop naps, reading nothing, until the next commit is due, at most this long. The posts that
# arrive meanwhile wait in the kernel's socket buffers, as their batch would have waited for the
# interval anyway, and are read in one wake-up of the process instead of one each: the wake-ups
# (and the cold caches each brings on a shared machine) were much of a post's CPU under load
# (docs/publish-path.md, round 7). It never holds a post past the commit it would have joined; it
# delays the webapp's other work (history reads, the hand-off's replies) by at most this long, and
# only under load. Off with the fsync thread, and at saturation (no time is left to nap). 0: off.
# 8 ms: under half of the paced interval's cap (commit_pacer.COMMIT_INTERVAL_CAP_S, 20 ms); round 8
# of docs/publish-path.md measured 4, 9 and 16 ms there.
COMMIT_NAP_S = 0.008
# The largest --commit-nap-s accepted: the longest the webapp's event loop may be unresponsive.
MAX_COMMIT_NAP_S = 0.05
# Loop turns the nap waits after its commit's own callbacks, so that the batch's callers are
# answered before it: a coroutine awaiting durable() resumes one turn after them (through
# asyncio.shield's callback; an aiohttp handler, an /internal/ read), and a reply written from
# that task's done-callback (WebApi._settle) one turn later again. The lean post front answers
# from the commit's own callbacks, with no turn needed.
NAP_AFTER_TURNS = 2
BATCH_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)


# After a failed fsync of the WAL for unsynced events, wait this long before trying again.
WAL_SYNC_RETRY_S = 0.5
# The default of ``rtm webapp --commit-fsync-thread``: the WAL's fsync of a group commit runs on
# a dedicated thread instead of inside the COMMIT on the event loop (see the module's contract).
COMMIT_FSYNC_THREAD = False
COMMIT_BUCKETS_S = (0.0001, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.5)


def add_commit_flags(parser: Parser) -> None:
    """The webapp's flags of its group commit."""
    parser.add(
        "--group-commit-window-s",
        GROUP_COMMIT_WINDOW_S,
        "how long a write batch stays open (0: one loop turn)",
        at_least=0.0,
        at_most=MAX_GROUP_COMMIT_WINDOW_S,  # inf (or NaN) would hold the first batch, and every post, for good
    )
    parser.add(
        "--min-commit-interval-s",
        MIN_COMMIT_INTERVAL_S,
        "least time between two group commits' starts under load (fewer, larger commits; 0: off)",
        at_least=0.0,
        at_most=MAX_COMMIT_INTERVAL_S,
    )
    parser.add(
        "--commit-interval-cap-s",
        COMMIT_INTERVAL_CAP_S,
        "the longest paced commit interval, reached as the rate of writes grows (commit_pacer.py)",
        at_least=0.0,
        at_most=MAX_COMMIT_INTERVAL_S,
    )
    parser.add(
        "--commit-pacing-base-rate-per-s",
        COMMIT_PACING_BASE_RATE_PER_S,
        "writes per second above which the paced commit interval grows past its minimum",
        above=0.0,
        at_most=MAX_COMMIT_PACING_BASE_RATE_PER_S,
    )
    parser.add(
        "--handoff-interval-cap-s",
        HANDOFF_INTERVAL_CAP_S,
        "under load the hand-off sends at most once per interval, growing with the rate of writes to this "
        "(0: off; the rate is measured only while commits are paced, --min-commit-interval-s above 0)",
        at_least=0.0,
        at_most=MAX_HANDOFF_INTERVAL_S,
    )
    parser.add(
        "--handoff-batch-events",
        HANDOFF_BATCH_EVENTS,
        "a paced hand-off sends at once when this many events wait",
        at_least=1,
        at_most=MAX_HANDOFF_BATCH_EVENTS,
    )
    parser.add(
        "--handoff-pacing-base-rate-per-s",
        HANDOFF_PACING_BASE_RATE_PER_S,
        "writes per second above which the hand-off is paced (commit_pacer.py)",
        above=0.0,
        at_most=MAX_COMMIT_PACING_BASE_RATE_PER_S,
    )
    parser.add(
        "--commit-nap-s",
        COMMIT_NAP_S,
        "under load, the loop sleeps after a paced commit until the next is due, at most this long (0: off)",
        at_least=0.0,
        at_most=MAX_COMMIT_NAP_S,
    )
    parser.add("--commit-fsync-thread", COMMIT_FSYNC_THREAD, "FULL's WAL fsync on a thread, off the loop (commit.py)")


def pacing_options(args: Any) -> dict[str, Any]:
    """:class:`GroupCommit`'s pacing, from the flags :func:`add_commit_flags` added."""
    return {
        "min_interval_s": args.min_commit_interval_s,
        "interval_cap_s": args.commit_interval_cap_s,
        "pacing_base_rate_per_s": args.commit_pacing_base_rate_per_s,
        "nap_s": args.commit_nap_s,
    }


class CommitFailed(Exception):
    """The batch holding this request's writes could not be committed (or its fsync failed);
    nothing of it was acknowledged."""


class BatchStore(Protocol):
    batch_opener: Any

    @property
    def in_batch(self) -> bool: ...

    def begin_batch(self) -> None: ...

    def commit_batch(self) -> None: ...

    def set_synchronous(self, mode: str) -> str: ...


class EventSink(Protocol):
    def publish(self, events: list[Event]) -> None: ...


class _Unsynced:
    """Events committed to the WAL without an fsync, and the future of the callers waiting
    for them (None: nobody waits yet)."""

    __slots__ = ("serial", "events", "done")

    def __init__(self, serial: int, events: list[Event], done: asyncio.Future[None] | None) -> None:
        self.serial = serial
        self.events = events
        self.done = done


class GroupCommit:
    """Opens a batch on the first write of a turn and commits it on the next (under load, no
    sooner than the paced interval after the last commit began: :attr:`pacer`; at once when
    every client that could add to it waits in it: :meth:`fill`).

    With ``fsync_thread`` (and a ``wal_path``) the COMMIT runs with ``synchronous=NORMAL``
    (the batch reaches the WAL, no fsync) and the WAL's fsync runs on a dedicated thread:
    the batch's callers (:meth:`durable`) and its events wait for that fsync, while the
    event loop goes on parsing and handling requests. One fsync is in flight at a time; the
    next one covers every commit made while it ran."""

    # Its metrics, when a ServiceMetrics is given (_register_metrics).
    _m_batch: Histogram | None = None
    _m_commit: Histogram | None = None
    _m_sync: Histogram | None = None
    _m_failed: Counter | None = None
    _m_nap: Counter | None = None
    _m_filled: Counter | None = None

    def __init__(
        self,
        store: BatchStore,
        sink: EventSink,
        metrics: ServiceMetrics | None = None,
        *,
        window_s: float = GROUP_COMMIT_WINDOW_S,
        min_interval_s: float = MIN_COMMIT_INTERVAL_S,
        interval_cap_s: float = COMMIT_INTERVAL_CAP_S,
        pacing_base_rate_per_s: float = COMMIT_PACING_BASE_RATE_PER_S,
        nap_s: float = COMMIT_NAP_S,
        sleep: Callable[[float], None] = time.sleep,
        wal_path: str | None = None,
        sync_wal: Callable[[str], None] | None = None,
        fsync_thread: bool = False,
    ) -> None:
        self.store = store
        self.sink = sink
        self.window_s = window_s
        self.min_interval_s = min_interval_s
        self.pacer = CommitPacer(min_interval_s, interval_cap_s, pacing_base_rate_per_s)
        self._sleep = sleep
        self.naps = 0
        self._last_commit_at = -float("inf")  # time.monotonic() at the last commit's start
        self._last_commit_writes = 0  # writes that the last commit carried
        self.wal_path = wal_path
        self._wal_fsync: WalFsync | None = None  # ours, closed with us; not a sync_wal we were given
        if sync_wal is None:
            sync_wal = self._wal_fsync = WalFsync()
        self._sync_wal: Callable[[str], None] = sync_wal
        self.fsync_thread = fsync_thread and wal_path is not None
        self.nap_s = (
            nap_s if min_interval_s > 0 and not self.fsync_thread else 0.0
        )  # the thread's completions come on the loop
        self._unsynced: deque[_Unsynced] = deque()  # committed, not yet known to be on disk, in order
        self._serial = 0
        self._syncing = False  # an fsync runs on the thread
        self._retry: asyncio.TimerHandle | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._closed = False
        self._done: asyncio.Future[None] | None = None
        self._timer: asyncio.TimerHandle | None = None  # the open batch's commit, when held (window, pacing)
        self._full = False  # the open batch was filled (fill()): it commits at once, and no nap follows
        self.fills = 0
        self._events: list[Event] = []
        self._writes = 0
        self.batches = 0
        self.syncs = 0
        if metrics is not None:
            self._register_metrics(metrics)
        self._previous_synchronous: str | None = None
        if self.fsync_thread:
            # The thread's fsync of the WAL is what FULL's COMMIT would do inline.
            self._previous_synchronous = store.set_synchronous("NORMAL")
        store.batch_opener = self._open

    def _register_metrics(self, metrics: ServiceMetrics) -> None:
        self._m_batch = metrics.histogram(
            "rtm_webapp_commit_batch_writes",
            "Writes that committed events, grouped into one commit",
            BATCH_SIZE_BUCKETS,
        )
        self._m_commit = metrics.histogram(
            "rtm_webapp_commit_seconds",
            "Time of one group COMMIT (its fsync included, unless it runs on the fsync thread)",
            COMMIT_BUCKETS_S,
        )
        self._m_sync = metrics.histogram(
            "rtm_webapp_commit_fsync_seconds",
            "Time of one fsync of the WAL on the fsync thread (it covers every commit before it)",
            COMMIT_BUCKETS_S,
        )
        self._m_failed = metrics.counter(
            "rtm_webapp_commit_failed_total", "Group commits (or their WAL fsyncs) that failed"
        )
        metrics.gauge(
            "rtm_webapp_commit_interval_seconds",
            "The paced commit interval now: --min-commit-interval-s, growing with the rate of writes (commit_pacer.py)",
        ).set_function(lambda: self.pacer.interval_s)
        metrics.gauge(
            "rtm_webapp_commit_writes_per_second", "The rate of writes the commit pacing follows (a moving mean)"
        ).set_function(lambda: self.pacer.rate_per_s)
        self._m_filled = metrics.counter(
            "rtm_webapp_commit_filled_total",
            "Held batches committed early: every lean-front connection waited in it (GroupCommit.fill)",
        )
        self._m_nap = metrics.counter(
            "rtm_webapp_commit_nap_seconds_total", "Time the event loop napped after paced commits (--commit-nap-s)"
        )

    def _open(self) -> None:
        """Store.transaction() found no batch open: open one and schedule its commit."""
        self.store.begin_batch()
        loop = asyncio.get_running_loop()
        self._done = loop.create_future()
        delay = self.window_s
        if self.min_interval_s > 0 and self._last_commit_writes >= PACED_AFTER_BATCH_WRITES:
            delay = max(delay, self._last_commit_at + self.pacer.interval_s - time.monotonic())
        if delay > 0:
            self._timer = loop.call_later(delay, self.commit)
        else:
            loop.call_soon(self.commit)
        self._writes = 0

    def fill(self) -> None:
        """Every client that could add to the open batch waits for it (each of the lean front's
        connections holds a request in it, HttpFront.request_waits): holding it longer gathers
        nothing and only delays them, so it commits at the next turn, and the loop does not nap after
        it (such clients send again as soon as they are answered). Clients that keep a fixed number of
        requests in flight would otherwise get at most that many posts per interval: pacing would cap
        their rate instead of sharing commits (docs/publish-path.md, round 8)."""
        if self._done is None or self._full:
            return
        self._full = True
        if self._timer is not None:
            self.fills += 1
            if self._m_filled is not None:
                self._m_filled.inc()
            self._timer.cancel()
            self._timer = None
            asyncio.get_running_loop().call_soon(self.commit)

    def publish(self, events: list[Event]) -> None:
        """Events committed by the open batch go out with it; without a batch, at once
        (after an fsync of the WAL when the fsync thread is on: that commit did not sync)."""
        if self._done is None:
            if self.fsync_thread:
                self.publish_after_sync(events)
                return
            self._hand_over(events)  # that COMMIT (synchronous=FULL) synced the WAL
            return
        self._events.extend(events)
        self._writes += 1

    def publish_after_sync(self, events: list[Event]) -> None:
        """Events that another connection committed without an fsync: to the sink once the
        WAL is on disk, before any later commit's events (see the module's contract)."""
        if not events:
            return
        if self.wal_path is None:  # nothing to sync (an in-memory or test store)
            self._release_unsynced()
            self.sink.publish(events)
            return
        self._enqueue(events, None)
        self._kick()

    @property
    def unsynced(self) -> int:
        """Events committed without an fsync that wait for one (the scheduler counts them as
        backlog: it fires no more while they and the outbox exceed its bound). With the fsync
        thread, the live commits' events waiting for their fsync are counted too."""
        return sum(len(entry.events) for entry in self._unsynced)

    def oldest_t0(self) -> float | None:
        """The oldest ``t0`` of the events not yet handed to the sink (the open batch's, and those
        waiting for an fsync); None if none. The hand-off mark stays below it (webapp_stub/handoff.py,
        ``write_mark``): these events are not in the outbox yet, and some are committed already."""
        oldest: float | None = None
        for events in (self._events, *(entry.events for entry in self._unsynced)):
            for event in events:
                if oldest is None or event.t0 < oldest:
                    oldest = event.t0
        return oldest

    @property
    def syncing(self) -> bool:
        """An fsync of the WAL is running on the thread (or waits to be retried)."""
        return self._syncing or self._retry is not None

    def _enqueue(self, events: list[Event], done: asyncio.Future[None] | None) -> None:
        self._serial += 1
        self._unsynced.append(_Unsynced(self._serial, events, done))

    def _release_unsynced(self, upto: int | None = None) -> None:
        """Hand the unsynced events (those up to serial ``upto``; all if None) to the sink, in
        order, and answer whoever waits for them."""
        while self._unsynced and (upto is None or self._unsynced[0].serial <= upto):
            entry = self._unsynced.popleft()
            try:
                if entry.events:
                    self.sink.publish(entry.events)
            finally:  # on disk whatever the sink did (as in commit()): nobody waits for ever
                if entry.done is not None and not entry.done.done():
                    entry.done.set_result(None)

    def _hand_over(self, events: list[Event]) -> None:
        """After a COMMIT whose fsync synced the whole WAL: every event committed unsynced before
        it is on disk now and goes first (they hold the earlier seqs of their channels), then
        ``events``. If the sink raises on the earlier ones, ``events`` wait behind what is left
        (in order, below the hand-off mark) for the next release, instead of being dropped."""
        try:
            self._release_unsynced()
        except BaseException:
            self._enqueue(events, None)
            self._kick()
            raise
        if events:
            self.sink.publish(events)

    def _kick(self) -> None:
        """Start an fsync of the WAL for what waits for one, unless one runs (or waits for its
        retry): its completion starts the next."""
        if self._closed or self._syncing or self._retry is not None or not self._unsynced:
            return
        assert self.wal_path is not None
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="rtm-wal-fsync")
        upto = self._serial  # the fsync covers everything committed before it starts
        self._syncing = True
        started = time.perf_counter()
        future = asyncio.get_running_loop().run_in_executor(self._executor, self._sync_wal, self.wal_path)
        future.add_done_callback(lambda f: self._synced(f, upto, started))

    def _synced(self, future: asyncio.Future[None], upto: int, started: float) -> None:
        self._syncing = False
        if self._closed:
            return
        exc = None if future.cancelled() else future.exception()
        if future.cancelled() or exc is not None:
            log.error("fsync of %s failed (%s): its commits wait for a retry", self.wal_path, exc)
            if self._m_failed is not None:
                self._m_failed.inc()
            # Not known to be on disk: nobody waiting for it is answered ok. The events stay
            # queued and go out (in order) after a later fsync succeeds.
            for entry in self._unsynced:
                if entry.serial > upto:
                    break
                if entry.done is not None and not entry.done.done():
                    entry.done.set_exception(CommitFailed(f"fsync of the WAL failed: {exc}"))
                    entry.done.exception()  # retrieved: callers that already left must not log it
                entry.done = None
            self._retry = asyncio.get_running_loop().call_later(WAL_SYNC_RETRY_S, self._retry_sync)
            return
        self.syncs += 1
        if self._m_sync is not None:
            self._m_sync.observe(time.perf_counter() - started)
        try:
            self._release_unsynced(upto)
        finally:  # a sink that raised must not stop what is queued behind (its callers wait)
            self._kick()

    def _retry_sync(self) -> None:
        self._retry = None
        self._kick()

    def pending(self) -> asyncio.Future[None] | None:
        """The future that completes once everything written so far is committed (and, with
        the fsync thread, on disk), with :class:`CommitFailed` if that failed; None if nothing
        waits. For callers that wait by callback (the lean post front) instead of :meth:`durable`."""
        done = self._done
        # Without a batch open, a read waits for the events committed before it that are not on
        # disk yet: the fsync thread's commits, and the scheduler's (without the fsync thread too),
        # so that no reply names a seq a power loss could take back and a later post reuse.
        if done is None and self._unsynced:
            last = self._unsynced[-1]
            if last.done is None:
                last.done = asyncio.get_running_loop().create_future()
            done = last.done
        return done

    async def durable(self) -> None:
        """Return once everything written so far is committed (and, with the fsync thread, on
        disk). Raises :class:`CommitFailed`."""
        done = self.pending()
        if done is not None:
            await asyncio.shield(done)

    def commit(self) -> None:
        """Commit the open batch now, then hand its events to the sink (idempotent). With the
        fsync thread the events and the callers wait for the fsync that follows."""
        done, events = self._done, self._events
        if done is None:
            return
        self._done, self._events = None, []
        full, self._full = self._full, False
        if self._timer is not None:  # committed before its time (close(), fill())
            self._timer.cancel()
            self._timer = None
        if self.min_interval_s > 0:
            self._last_commit_at = time.monotonic()  # no loop needed: close() may commit without one
            self._last_commit_writes = self._writes
            self.pacer.committed(self._last_commit_at, self._writes)
        started = time.perf_counter()
        try:
            self.store.commit_batch()
        except sqlite3.Error as exc:
            log.error("group commit failed, %d events rolled back: %s", len(events), exc)
            if self._m_failed is not None:
                self._m_failed.inc()
            done.set_exception(CommitFailed(str(exc)))
            done.exception()  # retrieved: callers that already left must not log it as unhandled
            return
        self.batches += 1
        if self._m_batch is not None and self._m_commit is not None:
            self._m_batch.observe(max(1, self._writes))
            self._m_commit.observe(time.perf_counter() - started)
        if self.fsync_thread:
            # In the WAL, not yet on disk: after the events committed before it (which hold
            # the earlier seqs of their channels), once an fsync that started after it ends.
            self._enqueue(events, done)
            self._kick()
            return
        try:
            self._hand_over(events)
        finally:
            # Committed and on disk whatever the sink did: a sink that raised must not leave
            # this batch's callers waiting for ever (the error goes on to the loop's handler).
            done.set_result(None)
        if self.nap_s > 0 and self._last_commit_writes >= PACED_AFTER_BATCH_WRITES and not full and not self._closed:
            # After the callbacks scheduled so far and NAP_AFTER_TURNS more turns: the replies (also
            # those of callers that await durable()) and the hand-off's writes go out first.
            loop = asyncio.get_running_loop()
            loop.call_soon(self._nap_after, loop, NAP_AFTER_TURNS)

    def _nap_after(self, loop: asyncio.AbstractEventLoop, turns: int) -> None:
        """:meth:`_nap` after ``turns`` more turns of the loop (:data:`NAP_AFTER_TURNS`)."""
        if turns > 0:
            loop.call_soon(self._nap_after, loop, turns - 1)
            return
        self._nap()

    def _nap(self) -> None:
        """Sleep, reading nothing, until the next commit is due, at most ``nap_s`` (:data:`COMMIT_NAP_S`)."""
        nap_s = min(self._last_commit_at + self.pacer.interval_s - time.monotonic(), self.nap_s)
        if nap_s <= 0 or self._closed:
            return
        self._sleep(nap_s)
        self.naps += 1
        if self._m_nap is not None:
            self._m_nap.inc(nap_s)

    def close(self) -> None:
        """Commit whatever is open (at shutdown), sync and hand over what waits for a sync,
        and stop grouping."""
        self._closed = True  # no more fsyncs on the thread: the last one runs here
        self.commit()
        if self._retry is not None:
            self._retry.cancel()
            self._retry = None
        if self._unsynced and self.wal_path is not None:
            try:
                self._sync_wal(self.wal_path)
            except OSError as exc:  # the restart's replay of committed events delivers them
                log.error("fsync of %s at close failed: %s", self.wal_path, exc)
                for entry in self._unsynced:
                    if entry.done is not None and not entry.done.done():
                        entry.done.set_exception(CommitFailed(f"fsync of the WAL failed: {exc}"))
                        entry.done.exception()
            else:
                self._release_unsynced()
        if self._executor is not None:
            self._executor.shutdown(wait=False)
        if self._wal_fsync is not None and not self._syncing:
            self._wal_fsync.close()
        if self._previous_synchronous is not None:
            self.store.set_synchronous(self._previous_synchronous)
            self._previous_synchronous = None
        self.store.batch_opener = None
