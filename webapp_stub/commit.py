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
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import time
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
    ) -> None:
        self.store = store
        self.sink = sink
        self.window_s = window_s
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
            self.sink.publish(events)
            return
        self._events.extend(events)
        self._writes += 1

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
        if self._m_batch is not None and self._m_commit is not None:
            self._m_batch.observe(max(1, self._writes))
            self._m_commit.observe(time.perf_counter() - started)
        if events:
            self.sink.publish(events)
        done.set_result(None)

    def close(self) -> None:
        """Commit whatever is open (at shutdown) and stop grouping."""
        self.commit()
        self.store.batch_opener = None
