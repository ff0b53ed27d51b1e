"""How ``search.messages`` runs without holding the webapp's event loop.

A search has two parts. Its catch-up writes (the index, webapp_stub/search_index.py) and so runs
where every write runs: on the event loop, on the webapp's one writer connection, inside the
group commit. Its read (webapp_stub/search.py, ``find``: the ``MATCH``, the joins, the count, the
highlight, the ``in:`` / ``from:`` lookups) is the longer part, 10-20 ms for a common word, and
runs here on a thread with a read-only SQLite connection of its own:

* **The catch-up in slices** (:func:`catch_up`): at most :data:`CATCH_UP_SLICE_ROWS` new rows and
  :data:`CATCH_UP_SLICE_STALE` edited ones per transaction (about a millisecond each), the loop served between
  two slices (a pause of :data:`CATCH_UP_PAUSE_S`), up to the per-search bounds of search_index.py. Each
  slice is one ``search_index.catch_up`` call in its own transaction (a savepoint of the open batch),
  so the index's invariant holds after each. One catch-up at a time (:attr:`SearchReader.catch_up_lock`):
  a second search waits for the first's and then does its own, which finds what the first left,
  so no row is indexed twice and each search sees what was posted before it (within the bounds).
* **Committed before the read.** The reader sees committed data only, and the slices sit in the
  group commit's open batch until it commits. The search waits for that (``WebApi.durable()``, as
  every reply waits for it anyway) rather than committing its catch-up apart: outside the batch it
  would need a transaction of its own on the one writer connection, which means committing (and
  fsyncing) the open batch early, taking it from the commit pacing. The wait is the batch's
  (the next loop turn at light load, the paced interval under load), spent serving others.
* **The read on a thread** (:meth:`SearchReader.read`): one dedicated thread and one read-only
  connection (``mode=ro``, ``query_only``), both made at the first search and closed with the
  store (:meth:`SearchReader.close`, from ``Database.close``). In WAL mode a reader never blocks
  the writer nor waits for it, and Python's sqlite3 lets go of the GIL while SQLite steps, so the
  loop keeps answering posts meanwhile. Each read is one read transaction: the index, its mark,
  ``search_stale`` and the memberships of ``_READABLE`` are read from one committed snapshot (a
  read transaction also keeps a checkpoint from copying past it, for the tens of ms it lasts).
* **A bound** (:data:`MAX_SEARCHES_IN_FLIGHT`): searches past their admission at once (catching up,
  waiting for the batch or the thread, reading); past it, ``ratelimited`` (HTTP 429, ``Retry-After:``
  :data:`SEARCH_BUSY_RETRY_AFTER_S`), counted like every error and in :attr:`SearchReader.refused`.
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

from webapp_stub import search_index
from webapp_stub.errors import ApiError

if TYPE_CHECKING:
    from webapp_stub.store import Store

T = TypeVar("T")

# Searches admitted at once (catching up, waiting for their batch, queued for or on the thread).
# The thread reads one at a time, 10-20 ms for a common word: four queued is some 80 ms for the
# last, and the shared rate limit (webapp_stub/ratelimit.py, 5 a second) keeps the queue short
# anyway; past it a search is refused at once rather than queued behind the others.
MAX_SEARCHES_IN_FLIGHT = 4
# What a search refused for that bound is told to wait: the searches ahead are done well within it.
SEARCH_BUSY_RETRY_AFTER_S = 1
# New rows indexed per slice of a catch-up. Over a 50,000-message backlog on the project's 2-core VM
# (bench/search.py, tests on the other core), a slice of 250 took a median 0.8 ms, p90 1.4 ms (its
# batch's commit 0.4 ms); of 500, 1.5 and 5.6 ms (commit 0.6, p90 2.3 ms); a few of either took
# 15-20 ms on the loaded machine. The per-search bound (search_index.MAX_INDEX_ROWS_PER_SEARCH) is
# twenty slices.
CATCH_UP_SLICE_ROWS = 250
# Edited or deleted rows re-indexed per slice (each an FTS5 delete and an insert: twice a new row).
CATCH_UP_SLICE_STALE = 100
# The pause between two slices: the loop polls for I/O and runs what it woke (posts, replies, the
# hand-off) before the next slice. Twenty slices make a first search some 20 ms longer.
CATCH_UP_PAUSE_S = 0.001
# The longest a search's read may take on the thread. A query is bounded in its terms and tokens
# (search_query.py) and in the matches it keeps (search.MAX_CANDIDATES), but it walks a word's
# matches until it has enough that its caller may read: a common word of which the caller may read
# few (another team's, others' private channels) is walked whole. Past this, the read is stopped
# (SQLite's progress handler, every READ_PROGRESS_STEPS of its steps) and the search is answered
# ``search_timeout``; a narrower query (``in:``, ``from:``, more words) is the way on.
MAX_SEARCH_READ_S = 2.0
READ_PROGRESS_STEPS = 10_000  # SQLite virtual-machine steps between two looks at the clock (~0.1-1 ms)
THREAD_NAME = "rtm-search"  # the reader thread's name (a ThreadPoolExecutor's prefix)
_BUSY_TIMEOUT_MS = 5000  # a WAL reader waits only while SQLite recovers a WAL after a crash


def _connect_readonly(path: str) -> sqlite3.Connection:
    """A read-only connection to the database file ``path`` (never writes, never checkpoints)."""
    uri = Path(path).resolve().as_uri() + "?mode=ro"
    conn = sqlite3.connect(uri, uri=True, isolation_level=None, cached_statements=64)
    conn.execute("PRAGMA query_only=1")
    conn.execute(f"PRAGMA busy_timeout={_BUSY_TIMEOUT_MS}")
    return conn


class SearchReader:
    """The reader thread and its connection to the database file ``path`` (both lazily made),
    the catch-up lock and the admission bound of one store's searches.

    Contract: :meth:`admitted` around a search, :meth:`read` from the event loop's thread;
    :meth:`close` once, from any thread, idempotent: afterwards the thread has ended, its
    connection is closed, and :meth:`read` raises ``service_unavailable``."""

    def __init__(
        self,
        path: str,
        *,
        max_in_flight: int = MAX_SEARCHES_IN_FLIGHT,
        max_read_s: float = MAX_SEARCH_READ_S,
        progress_steps: int = READ_PROGRESS_STEPS,
    ) -> None:
        self.path = path
        self.max_in_flight = max_in_flight
        self.max_read_s = max_read_s
        self.progress_steps = progress_steps
        self.in_flight = 0
        self.refused = 0
        self.catch_up_lock = asyncio.Lock()
        self._executor: ThreadPoolExecutor | None = None
        self._conn: sqlite3.Connection | None = None  # made and used on the thread only
        self._closed = False
        self._lock = threading.Lock()  # the executor's creation against close()

    @contextlib.contextmanager
    def admitted(self) -> Iterator[None]:
        """One search, within :data:`MAX_SEARCHES_IN_FLIGHT`. Raises ``ratelimited`` (429) past it."""
        if self.in_flight >= self.max_in_flight:
            self.refused += 1
            raise ApiError("ratelimited", status=429, headers={"Retry-After": str(SEARCH_BUSY_RETRY_AFTER_S)})
        self.in_flight += 1
        try:
            yield
        finally:
            self.in_flight -= 1

    async def read(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """``fn(conn)`` on the reader thread, inside one read transaction of its connection.
        Raises what ``fn`` raises; ``service_unavailable`` once closed."""
        with self._lock:
            if self._closed:
                raise ApiError("service_unavailable")
            if self._executor is None:
                self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=THREAD_NAME)
            executor = self._executor
        return await asyncio.get_running_loop().run_in_executor(executor, self._run, fn)

    def _run(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """On the thread: one read transaction around ``fn``."""
        if self._closed:  # queued behind the close: nothing more is read
            raise ApiError("service_unavailable")
        if self._conn is None:
            self._conn = _connect_readonly(self.path)
        conn = self._conn
        conn.execute("BEGIN")
        deadline = time.monotonic() + self.max_read_s
        conn.set_progress_handler(lambda: time.monotonic() > deadline, self.progress_steps)
        try:
            return fn(conn)
        except sqlite3.OperationalError as exc:
            if str(exc) == "interrupted" and time.monotonic() > deadline and not self._closed:
                raise ApiError("search_timeout") from None  # stopped by the handler: past MAX_SEARCH_READ_S
            raise
        finally:
            conn.set_progress_handler(None, 0)
            conn.execute("ROLLBACK")  # a read transaction: nothing to commit

    @property
    def open(self) -> bool:
        """The thread or its connection exists (a search ran, and :meth:`close` has not ended them)."""
        return self._executor is not None or self._conn is not None

    def close(self) -> None:
        """Interrupt a read in progress, close the connection on its thread and end the thread."""
        with self._lock:
            self._closed = True
            executor, self._executor = self._executor, None
        if executor is None:
            return
        conn = self._conn
        if conn is not None:
            conn.interrupt()  # a long read ends at its next step (sqlite3.OperationalError: interrupted)
        executor.submit(self._close_connection)
        executor.shutdown(wait=True)

    def _close_connection(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None


async def catch_up(store: Store, lock: asyncio.Lock) -> search_index.CatchUp:
    """Bring the index up to date as far as one search may (search_index's per-search bounds), in
    slices of :data:`CATCH_UP_SLICE_ROWS` / :data:`CATCH_UP_SLICE_STALE`, each in a transaction of
    ``store`` (a savepoint of the open batch), the loop served between two; one catch-up at a time
    under ``lock``. What it did in all; ``behind``: work is left for the next search."""
    async with lock:
        rows_left, stale_left = search_index.MAX_INDEX_ROWS_PER_SEARCH, search_index.MAX_STALE_PER_SEARCH
        indexed = drained = 0
        while True:
            rows, stale = min(CATCH_UP_SLICE_ROWS, rows_left), min(CATCH_UP_SLICE_STALE, stale_left)
            with store.transaction() as db:
                step = search_index.catch_up(db, max_rows=rows, max_stale=stale)
            indexed, drained = indexed + step.indexed, drained + step.drained
            rows_left, stale_left = rows_left - rows, stale_left - stale
            # done: nothing left, or no budget left for what is (a slice that drained less than it
            # could left no edit recorded: then only new rows are left, and only the row budget counts)
            if not step.behind or (rows_left <= 0 and (stale_left <= 0 or step.drained < stale)):
                return search_index.CatchUp(indexed, drained, step.behind)
            # a pause, not sleep(0): a task resumed by sleep(0) runs again in the next turn, right
            # behind the slice's own batch commit and before the tasks that turn's I/O wakes (a
            # request's handler), so the commit and the next slice would hold the loop as one
            await asyncio.sleep(CATCH_UP_PAUSE_S)
