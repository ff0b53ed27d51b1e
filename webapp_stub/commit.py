"""Group commit: the writes of one event-loop turn share one transaction and one fsync.

With ``PRAGMA synchronous=FULL`` every SQLite ``COMMIT`` fsyncs the WAL, so
that a message answered ``ok`` survives a power loss. One fsync per post
would cap the webapp at the disk's fsync rate; instead, :class:`GroupCommit`
makes the first write of a loop turn open a transaction (the store's
:meth:`~webapp_stub.store.Store.begin_batch`), every other write of that turn
joins it as a savepoint, and a callback scheduled for the next turn (or
:data:`GROUP_COMMIT_WINDOW_S` later) commits them all at once.

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
  event's seq would be reused, and gateways would drop the reuse as a duplicate).
"""

from __future__ import annotations

import asyncio
import logging
import os
import sqlite3
import time
from collections.abc import Callable
from typing import Any, Protocol

from services.metrics import ServiceMetrics
from webapp_stub.models import Event

log = logging.getLogger("rtm.webapp.commit")

# How long a batch stays open after its first write. 0: until the next turn of
# the event loop, which already gathers every request that arrived together
# (and, while a commit's fsync blocks the loop, every request that arrived
# during it). A positive window trades latency for larger batches.
GROUP_COMMIT_WINDOW_S = 0.0
BATCH_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)


# After a failed fsync of the WAL for unsynced events, wait this long before trying again.
WAL_SYNC_RETRY_S = 0.5


def fsync_file(path: str) -> None:
    """fsync ``path`` (the WAL: every frame written to it so far reaches the disk)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def wal_path_of(db_path: str) -> str | None:
    """The WAL file of the SQLite database at ``db_path`` (None for an in-memory one)."""
    if not db_path or db_path == ":memory:" or db_path.startswith("file:"):
        return None
    return db_path + "-wal"


class CommitFailed(Exception):
    """The batch holding this request's writes could not be committed; nothing of it was kept."""


class BatchStore(Protocol):
    batch_opener: Any

    @property
    def in_batch(self) -> bool: ...

    def begin_batch(self) -> None: ...

    def commit_batch(self) -> None: ...


class EventSink(Protocol):
    def publish(self, events: list[Event]) -> None: ...


class GroupCommit:
    """Opens a batch on the first write of a turn and commits it on the next."""

    def __init__(
        self,
        store: BatchStore,
        sink: EventSink,
        metrics: ServiceMetrics | None = None,
        *,
        window_s: float = GROUP_COMMIT_WINDOW_S,
        wal_path: str | None = None,
        sync_wal: Callable[[str], None] = fsync_file,
    ) -> None:
        self.store = store
        self.sink = sink
        self.window_s = window_s
        self.wal_path = wal_path
        self._sync_wal = sync_wal
        self._unsynced: list[tuple[int, list[Event]]] = []  # (serial, events) committed unsynced
        self._serial = 0
        self._sync_task: asyncio.Task[None] | None = None
        self._done: asyncio.Future[None] | None = None
        self._events: list[Event] = []
        self._writes = 0
        self.batches = 0
        self._m_batch = self._m_commit = self._m_failed = None
        if metrics is not None:
            self._m_batch = metrics.histogram(
                "rtm_webapp_commit_batch_writes",
                "Writes that committed events, grouped into one commit",
                BATCH_SIZE_BUCKETS,
            )
            self._m_commit = metrics.histogram(
                "rtm_webapp_commit_seconds",
                "Time of one group COMMIT (its fsync included)",
                (0.0001, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.5),
            )
            self._m_failed = metrics.counter("rtm_webapp_commit_failed_total", "Group commits that failed")
        store.batch_opener = self._open

    def _open(self) -> None:
        """Store.transaction() found no batch open: open one and schedule its commit."""
        self.store.begin_batch()
        loop = asyncio.get_running_loop()
        self._done = loop.create_future()
        if self.window_s > 0:
            loop.call_later(self.window_s, self.commit)
        else:
            loop.call_soon(self.commit)
        self._writes = 0

    def publish(self, events: list[Event]) -> None:
        """Events committed by the open batch go out with it; without a batch, at once."""
        if self._done is None:
            self._release_unsynced()  # that COMMIT (synchronous=FULL) synced the WAL: earlier ones first
            self.sink.publish(events)
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
        self._serial += 1
        self._unsynced.append((self._serial, events))
        if self._sync_task is None:
            self._sync_task = asyncio.get_running_loop().create_task(self._sync_unsynced())

    @property
    def unsynced(self) -> int:
        """Events committed without an fsync that wait for one (the scheduler counts them as
        backlog: it fires no more while they and the outbox exceed its bound)."""
        return sum(len(events) for _, events in self._unsynced)

    def _release_unsynced(self, upto: int | None = None) -> None:
        """Hand the unsynced events (those up to serial ``upto``; all if None) to the sink, in order."""
        while self._unsynced and (upto is None or self._unsynced[0][0] <= upto):
            self.sink.publish(self._unsynced.pop(0)[1])

    async def _sync_unsynced(self) -> None:
        try:
            while self._unsynced and self.wal_path is not None:
                upto = self._serial  # the fsync covers everything committed before it starts
                try:
                    await asyncio.to_thread(self._sync_wal, self.wal_path)
                except OSError as exc:
                    log.error("fsync of %s failed (%s): unsynced events wait for the next commit", self.wal_path, exc)
                    await asyncio.sleep(WAL_SYNC_RETRY_S)
                    continue
                self._release_unsynced(upto)
        finally:
            self._sync_task = None

    async def durable(self) -> None:
        """Return once everything written so far is committed. Raises :class:`CommitFailed`."""
        done = self._done
        if done is not None:
            await asyncio.shield(done)

    def commit(self) -> None:
        """Commit the open batch now, then hand its events to the sink (idempotent)."""
        done, events = self._done, self._events
        if done is None:
            return
        self._done, self._events = None, []
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
        # This COMMIT's fsync synced the whole WAL, so every event committed unsynced before
        # it is on disk now: they go first (they hold the earlier seqs of their channels).
        self._release_unsynced()
        if self._m_batch is not None and self._m_commit is not None:
            self._m_batch.observe(max(1, self._writes))
            self._m_commit.observe(time.perf_counter() - started)
        if events:
            self.sink.publish(events)
        done.set_result(None)

    def close(self) -> None:
        """Commit whatever is open (at shutdown), sync and hand over what waits for a sync,
        and stop grouping."""
        self.commit()
        if self._unsynced and self.wal_path is not None:
            try:
                self._sync_wal(self.wal_path)
            except OSError as exc:  # the restart's replay of committed events delivers them
                log.error("fsync of %s at close failed: %s", self.wal_path, exc)
            else:
                self._release_unsynced()
        if self._sync_task is not None:
            self._sync_task.cancel()
        self.store.batch_opener = None
