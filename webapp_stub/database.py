"""The webapp's SQLite connection: opening, transactions, group-commit batches, seqs.

The base every part of :class:`webapp_stub.store.Store` builds on. Every
persisted event gets its channel's next ``seq`` (and, for messages, a ``ts``
strictly above the channel's last) in the transaction that writes it:
:meth:`Database._next_seq` and :meth:`Database._append_event` must run inside one.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import time
from collections.abc import Callable
from types import TracebackType
from typing import Any, Protocol

from webapp_stub import schema
from webapp_stub.checkpoint import WalCheckpointer
from webapp_stub.codecs import dumps
from webapp_stub.errors import ApiError
from webapp_stub.models import Event
from webapp_stub.read_cache import ReadCache

DB_FILE = "webapp.db"
# The whole client-visible JSON of one event (for an edit: the message and its
# previous_message) as stored and carried through the fleet. Well under the 4 MiB
# wire frame (services.wire.DEFAULT_MAX_FRAME_BYTES), leaving room for the msgpack
# envelope; a larger event is refused where it enters with Slack's ``msg_too_long``.
# Configurable with ``rtm webapp --max-event-bytes`` (RTM_MAX_EVENT_BYTES).
MAX_EVENT_BYTES = 1024 * 1024
# SQLite's durability: FULL fsyncs the WAL at every commit, so a message answered
# ``ok`` survives a power loss (NORMAL only survives a process crash). Commits are
# grouped (webapp_stub.commit) so concurrent posts share one fsync.
SQLITE_SYNCHRONOUS = "FULL"
SYNCHRONOUS_MODES = ("OFF", "NORMAL", "FULL", "EXTRA")
DEFAULT_CACHE_PAGES = -2000  # SQLite's default page cache (negative: KiB)
# The page size of a database file created here (SQLite's default is 4,096). A post writes into
# the tail of its channel's entries in two indexes (messages by ts, events by seq), so a commit of
# posts to many channels writes about two whole pages per post to the WAL, and the checkpoint
# copies them again. With 1 KiB pages the webapp wrote 2.1 x fewer bytes to disk per post in the
# fleet (13.4 -> 6.3 KiB at 2,000 posts/s to 100 channels), for the same CPU within the noise
# (docs/publish-path.md, round 10). SQLite fixes the size when the file is created: an existing
# database keeps its own.
SQLITE_PAGE_SIZE_BYTES = 1024
# Channels whose last seq _next_seq remembers (a hint, checked by the row); beyond, it starts over.
MAX_CACHED_SEQS = 100_000


def _connect(path: str, synchronous: str) -> sqlite3.Connection:
    """The store's one connection to ``path``, set up. ``isolation_level=None``: the store issues
    BEGIN/COMMIT itself. Used only from the event loop's thread, so ``check_same_thread`` is moot."""
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False, cached_statements=256)
    conn.execute(f"PRAGMA page_size={SQLITE_PAGE_SIZE_BYTES}")  # before WAL: for a new file only
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute(f"PRAGMA synchronous={synchronous}")  # FULL: an ok'd commit survives a power loss
    conn.execute("PRAGMA foreign_keys=OFF")
    conn.execute("PRAGMA busy_timeout=5000")
    return conn


def _database_file(path: str | os.PathLike[str], create: bool) -> str:
    """The file ``path`` names (``<path>/webapp.db`` for a directory, or a name without ``.db``).
    With ``create``, it and its directory are made if missing; else FileNotFoundError if missing."""
    path = os.fspath(path)
    if os.path.isdir(path) or not path.endswith(".db"):
        directory, path = path, os.path.join(path, DB_FILE)
    else:
        directory = os.path.dirname(os.path.abspath(path))
    if not create:
        if not os.path.isfile(path):
            raise FileNotFoundError(path)
        return path
    os.makedirs(directory, exist_ok=True)
    # The database holds every user's token: create it 0600 before SQLite opens it (SQLite
    # gives its -wal and -shm files the database file's mode).
    with contextlib.suppress(FileExistsError):
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    return path


class Closable(Protocol):
    """What a connection's helper with a thread of its own offers the store: :meth:`close`, which
    ends that thread and its connection (the search reader: webapp_stub/search_reader.py)."""

    def close(self) -> None: ...


class EventClock:
    """The time that stamps events (their ``created_at``): the wall clock, but never below a time
    already given out or held (:meth:`hold_at_least`).

    The hand-off's restart replay (webapp_stub/handoff.py, ``replay_from_mark``) requeues every
    event created at or after its mark. A wall clock stepped back by more than the mark's margin
    would stamp new events below a mark already written, and a crash before their hand-off would
    leave them out of the replay: committed, answered ``ok``, and never sent to a gateway. So a
    mark holds this clock at its time, and the events after it are stamped at least that. One is
    shared by every connection that writes events (the webapp's and the scheduler's)."""

    __slots__ = ("_source", "_floor")

    def __init__(self, source: Callable[[], float] = time.time) -> None:
        self._source = source
        self._floor = float("-inf")

    def __call__(self) -> float:
        now = self._source()
        if now < self._floor:
            return self._floor
        self._floor = now
        return now

    def hold_at_least(self, floor: float) -> None:
        """Never give out less than ``floor`` from now on."""
        if floor > self._floor:
            self._floor = floor


class Database:
    """The connection to ``<data_dir>/webapp.db`` (or ``path`` if it names a file), its
    transactions and group-commit batches, and each channel's seq and ts allocation."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        clock: Callable[[], float] = time.time,
        event_clock: EventClock | None = None,
        background_checkpoints: bool = False,
        synchronous: str = SQLITE_SYNCHRONOUS,
        max_event_bytes: int = MAX_EVENT_BYTES,
        migrate: bool = True,
    ) -> None:
        """Open (creating if needed) and migrate the database.

        With ``migrate=False`` (a tool beside a running webapp, ``rtm users``) the database must
        exist and have the schema this version makes: nothing is created or altered, and
        :class:`~webapp_stub.schema.SchemaMismatch` is raised (FileNotFoundError when there is no
        file) instead of migrating a file that a webapp of another version may have open.

        With ``background_checkpoints`` (the webapp process), WAL checkpoints
        run on a thread of their own (:mod:`webapp_stub.checkpoint`) instead of
        inside whichever commit fills the WAL; :meth:`close` stops that thread.
        Without it (tools, the seed, tests), SQLite checkpoints on commit as usual.
        ``synchronous`` is SQLite's ``PRAGMA synchronous`` (FULL: durable across a
        power loss); ``max_event_bytes`` bounds the UTF-8 JSON of every event
        written (``msg_too_long`` beyond it). ``event_clock`` stamps events (:class:`EventClock`).
        Raises ValueError for an unknown ``synchronous`` mode.
        """
        synchronous = synchronous.upper()
        if synchronous not in SYNCHRONOUS_MODES:
            raise ValueError(f"synchronous must be one of {', '.join(SYNCHRONOUS_MODES)}, not {synchronous!r}")
        self.max_event_bytes = max_event_bytes
        # Group commit (webapp_stub.commit): while a batch is open, every
        # transaction() is a savepoint inside it; ``batch_opener``, when set, is
        # called by the first write that finds no batch open.
        self.batch_opener: Callable[[], None] | None = None
        self._in_batch = False
        self._seqs: dict[str, tuple[int, int]] = {}  # channel -> (last_seq, last_ts_us) written: _next_seq's hint
        self._read_caches: list[ReadCache] = []  # told when a transaction ends (read_cache())
        self.path = path = _database_file(path, create=migrate)
        self.clock = clock
        self.event_clock = EventClock(clock) if event_clock is None else event_clock
        self.conn = _connect(path, synchronous)
        try:
            if migrate:
                schema.migrate(self.conn)
            else:
                schema.check(self.conn, path)
        except BaseException:
            self.conn.close()
            raise
        newest = self.conn.execute("SELECT max(created_at) FROM events").fetchone()[0]  # a restart goes on from it
        self.event_clock.hold_at_least(float("-inf") if newest is None else float(newest))
        self.checkpointer: WalCheckpointer | None = None
        # search.messages' reads: a thread and a read-only connection of their own, made by the
        # first search (webapp_stub/search_reader.py), closed by close()
        self.search_reader: Closable | None = None
        if background_checkpoints:
            WalCheckpointer.take_over(self.conn)
            self.checkpointer = WalCheckpointer(path)
            self.checkpointer.start()

    def close(self) -> None:
        """Stop the search reader's thread and the checkpoint thread, if any (each closes its own
        connection), then close the connection.

        Closing the last connection to the file checkpoints the WAL into the
        database and removes it (SQLite's own behaviour on close).
        """
        if self.search_reader is not None:
            self.search_reader.close()  # kept: a search after this is refused, not given a new thread
        if self.checkpointer is not None:
            self.checkpointer.close()
            self.checkpointer = None
        self.conn.close()

    def transaction(self) -> Transaction:
        """``with store.transaction() as db:`` ``BEGIN IMMEDIATE`` … ``COMMIT``; rolled back on
        any exception.

        Inside an open batch (:meth:`begin_batch`) or another transaction it is a
        savepoint instead: an exception undoes only this transaction's writes, and
        they become durable with the batch's :meth:`commit_batch` (or the outer
        commit). The scheduler fires a due item's ``post_message`` inside the
        transaction that marks it fired (webapp_stub/scheduler.py).
        """
        return Transaction(self)

    def set_synchronous(self, mode: str) -> str:
        """Set ``PRAGMA synchronous`` on this connection; return the mode it had. Group commit
        with its fsync thread (webapp_stub.commit) sets NORMAL and fsyncs the WAL itself."""
        mode = mode.upper()
        if mode not in SYNCHRONOUS_MODES:
            raise ValueError(f"synchronous must be one of {', '.join(SYNCHRONOUS_MODES)}, not {mode!r}")
        previous = SYNCHRONOUS_MODES[int(self.conn.execute("PRAGMA synchronous").fetchone()[0])]
        self.conn.execute(f"PRAGMA synchronous={mode}")
        return previous

    # -- group commit ------------------------------------------------------------------
    @property
    def in_batch(self) -> bool:
        return self._in_batch

    def begin_batch(self) -> None:
        """Open one transaction that the following :meth:`transaction` calls join."""
        if self._in_batch:
            raise RuntimeError("a batch is already open")
        self.conn.execute("BEGIN IMMEDIATE")
        self._in_batch = True

    def commit_batch(self) -> None:
        """Commit the open batch: one COMMIT (with synchronous=FULL, one fsync) for all of it.

        Raises sqlite3.Error if the commit fails; the batch is then rolled back
        and closed, and nothing in it was written.
        """
        if not self._in_batch:
            return
        try:
            self.conn.execute("COMMIT")
        except sqlite3.Error:
            if self.conn.in_transaction:
                self.conn.execute("ROLLBACK")
            raise
        finally:
            self._in_batch = False
            self.transaction_ended()

    def read_cache(self, name: str, tables: tuple[str, ...]) -> ReadCache:
        """A :class:`ReadCache` of answers about ``tables`` on this connection, told when each
        of its transactions ends."""
        cache = ReadCache(self.conn, name, tables, self.clock)
        self._read_caches.append(cache)
        return cache

    def transaction_ended(self) -> None:
        """Tell the read caches that the connection's transaction committed or rolled back."""
        for cache in self._read_caches:
            cache.transaction_ended()

    # -- events (must run inside a transaction) --------------------------------------
    def _next_seq(self, channel: str, with_ts: bool = False) -> tuple[int, int]:
        """Allocate ``channel``'s next seq (and, if asked, its next ts in µs).

        One statement: usually an ``UPDATE`` from the values this connection last wrote
        (:attr:`_seqs`), on the condition that the row still holds them, so the cache is only
        a hint: a row moved by anyone else (another connection, a rolled-back savepoint or
        batch) fails the condition and the allocation is read from the row (``UPDATE ...
        RETURNING``, SQLite 3.35+). Either way the row is written in the caller's
        transaction, so seqs stay gapless and roll back with it."""
        now_us = int(self.clock() * 1_000_000) if with_ts else 0
        known = self._seqs.get(channel)
        if known is not None:
            last_seq, last_ts_us = known
            seq, ts_us = last_seq + 1, (max(now_us, last_ts_us + 1) if with_ts else last_ts_us)
            if (
                self.conn.execute(
                    "UPDATE channel_seq SET last_seq = ?, last_ts_us = ? "
                    "WHERE channel = ? AND last_seq = ? AND last_ts_us = ?",
                    (seq, ts_us, channel, last_seq, last_ts_us),
                ).rowcount
                == 1
            ):
                self._seqs[channel] = (seq, ts_us)
                return seq, ts_us
        row = self.conn.execute(
            "UPDATE channel_seq SET last_seq = last_seq + 1, last_ts_us = "
            "CASE WHEN ? THEN max(?, last_ts_us + 1) ELSE last_ts_us END "
            "WHERE channel = ? RETURNING last_seq, last_ts_us",
            (int(with_ts), now_us, channel),
        ).fetchone()
        if row is not None:
            seq, ts_us = int(row[0]), int(row[1])
        else:
            self.conn.execute(
                "INSERT INTO channel_seq (channel, last_seq, last_ts_us) VALUES (?, ?, ?)", (channel, 1, now_us)
            )
            seq, ts_us = 1, now_us
        if len(self._seqs) >= MAX_CACHED_SEQS:
            self._seqs.clear()
        self._seqs[channel] = (seq, ts_us)
        return seq, ts_us

    def _append_event(
        self,
        channel: str,
        payload: dict[str, Any],
        ctl: dict[str, Any] | None = None,
        seq: int | None = None,
        text: str | None = None,
    ) -> Event:
        """Store one event of ``channel`` (its next seq unless given). ``text``, when given,
        is ``payload`` already encoded (exactly ``dumps(payload)``): it is not encoded again."""
        if seq is None:
            seq, _ = self._next_seq(channel)
        if text is None:
            text = dumps(payload)
        # A str holds at most 4 UTF-8 bytes per character: encode only when it may be too long.
        if len(text) * 4 > self.max_event_bytes and len(text.encode()) > self.max_event_bytes:
            raise ApiError("msg_too_long")
        now = self.event_clock()
        self.conn.execute(
            "INSERT INTO events (channel, seq, json, ctl, created_at) VALUES (?, ?, ?, ?, ?)",
            (channel, seq, text, None if ctl is None else dumps(ctl), now),
        )
        return Event(channel, seq, text, ctl, now)

    def last_seq(self, channel: str) -> int:
        row = self.conn.execute("SELECT last_seq FROM channel_seq WHERE channel = ?", (channel,)).fetchone()
        return int(row[0]) if row else 0


class Transaction:
    """:meth:`Database.transaction`'s context manager: a plain class (each post enters one, and a
    generator-based ``@contextmanager`` cost about 3 µs of it; round 4 of docs/publish-path.md)."""

    __slots__ = ("db", "nested")

    def __init__(self, db: Database) -> None:
        self.db = db
        self.nested = False

    def __enter__(self) -> sqlite3.Connection:
        db = self.db
        conn = db.conn
        if db._in_batch and not conn.in_transaction:
            # SQLite rolled the batch back by itself (it may, after SQLITE_FULL or SQLITE_IOERR): a
            # savepoint now would be a transaction of its own, committed at its release while the
            # batch's COMMIT fails and drops its events. Fail this write; the batch fails whole.
            raise sqlite3.OperationalError("the group commit's transaction was rolled back by SQLite")
        if not (db._in_batch or conn.in_transaction) and db.batch_opener is not None:
            db.batch_opener()
        self.nested = db._in_batch or conn.in_transaction
        conn.execute("SAVEPOINT tx" if self.nested else "BEGIN IMMEDIATE")
        return conn

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        conn = self.db.conn
        if not self.nested:
            try:
                conn.execute("COMMIT" if kind is None else "ROLLBACK")
            except sqlite3.Error:
                if conn.in_transaction:  # a failed COMMIT leaves it open: later writes would join it, uncommitted
                    conn.execute("ROLLBACK")
                raise
            finally:
                self.db.transaction_ended()
            return
        if kind is not None:
            conn.execute("ROLLBACK TO tx")
        conn.execute("RELEASE tx")
