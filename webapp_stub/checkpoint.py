"""WAL checkpoints on a background thread, off the event loop.

SQLite in WAL mode appends every commit to ``webapp.db-wal``; a *checkpoint*
copies those pages back into ``webapp.db`` and fsyncs both files. By default
SQLite runs one automatically inside the ``COMMIT`` that takes the WAL past
1,000 pages: that one ``chat.postMessage`` then waits for the copy and two
fsyncs in the event loop's thread (5-20 ms here, against 0.3 ms for an
ordinary post), and so does every request queued behind it.

:class:`WalCheckpointer` takes that work over. :meth:`take_over` turns the
automatic checkpoint off on the writer's connection (and caps the size the WAL
file keeps after it restarts); a daemon thread with its own connection to the
same file runs ``PRAGMA wal_checkpoint(PASSIVE)`` when the WAL file grows past
:data:`WAL_CHECKPOINT_BYTES`, and at least every
:data:`WAL_CHECKPOINT_INTERVAL_S`. A passive checkpoint never waits for the
writer and the writer never waits for it: the event loop keeps committing to
the WAL while the thread copies and fsyncs (the sqlite3 module releases the
GIL while SQLite works). Durability is unchanged: with ``synchronous=NORMAL``
a commit is durable across a process crash once it is in the WAL,
checkpointed or not.

One fsync stays with the writer: after a complete checkpoint, the next commit
starts the WAL over from its beginning and SQLite syncs the new WAL header
before writing frames behind it (crash safety; not configurable short of
``synchronous=OFF``). So checkpoints are driven by size rather than by a
short timer: the fewer times the WAL starts over, the fewer of those stalls;
see :data:`WAL_CHECKPOINT_BYTES`. A WAL that starts over keeps its file (up to
the backstop, :data:`WAL_BACKSTOP_FACTOR`), so that its frames overwrite blocks
already allocated; past the bound, the file's length then says nothing of what
the WAL holds, and checkpoints come at most every :data:`WAL_CHECKPOINT_MIN_GAP_S`.

Contract: :meth:`start` once, :meth:`close` once (idempotent); after
:meth:`close` returns the thread has stopped and its connection is closed.
A failed checkpoint is logged and retried later; it never raises into the
writer. :meth:`poll` is the thread's one step, callable synchronously (tests
call it without starting the thread).
"""

from __future__ import annotations

import logging
import math
import os
import sqlite3
import threading
import time
from collections.abc import Callable

log = logging.getLogger("rtm.webapp.checkpoint")

# Checkpoint as soon as the WAL file is larger than this. Every complete
# checkpoint costs the writer one fsync (of the restarted WAL's header) on its
# next commit, so this sets how often that happens: a chat.postMessage writes
# about 10 KiB of WAL over 100 channels (since messages and events are appended: schema.py), so
# 16 MiB is one such stall per ~1,700 posts.
# (SQLite's own bound, 1,000 pages or 4 MiB, meant a two-fsync checkpoint in
# one commit and the header fsync in the next, every ~180 posts then.) A longer WAL
# costs little: page lookups in it are hashed, and crash recovery reads it
# once.
WAL_CHECKPOINT_BYTES = 16 * 1024 * 1024
# And at least this often when the WAL is below that size (with nothing to
# copy, a checkpoint is a few microseconds of locking): a quiet webapp's
# writes still reach the database file within a minute.
WAL_CHECKPOINT_INTERVAL_S = 60.0
# How often the thread looks at the WAL file's size (one stat() call). Writes
# between two looks overshoot the bound: ~2 MiB at 1,000 posts/s.
WAL_CHECKPOINT_POLL_S = 0.1
# The writer's own checkpoint (SQLite's wal_autocheckpoint) stays on at this many times
# WAL_CHECKPOINT_BYTES, as a backstop for a load the thread cannot keep up with. That is also
# the size the WAL file is cut back to when the writer restarts it (PRAGMA journal_size_limit), so
# a burst leaves no larger file behind. Not WAL_CHECKPOINT_BYTES: the thread's checkpoint catches
# the writer only now and then, so under load the WAL grows well past it before it restarts (16 to
# 29-52 MiB at 2,000 posts/s), and every frame written past the size it was cut back to went to a
# newly allocated block, which the kernel zeroes first: 3 % of the webapp's CPU (docs/publish-path.md,
# round 9).
WAL_BACKSTOP_FACTOR = 4
# While the WAL file is past the bound, checkpoint at most this often. The file keeps its length
# when the WAL starts over (up to the backstop, above), so past the bound its length no longer says
# how much the WAL holds; each checkpoint's own report does (next_checkpoint_gap_s): while the
# checkpoints do not catch the writer, one every this long (6 MiB at 2,000 posts/s). Not read from the
# wal-index in the -shm file: opening and closing any descriptor of a file that SQLite locks drops
# the whole process's POSIX locks on it (https://www.sqlite.org/howtocorrupt.html, 2.2); a first
# version did, and another process's connection re-initialized the -shm under the writer's map,
# which killed the webapp with SIGBUS in a system test.
WAL_CHECKPOINT_MIN_GAP_S = 0.5
# A WAL frame's header (before its page), and a frame's size at SQLite's default page size.
WAL_FRAME_HEADER_BYTES = 24
WAL_FRAME_BYTES_DEFAULT = WAL_FRAME_HEADER_BYTES + 4096
# close() waits this long for a checkpoint in progress before giving up on the thread.
WAL_CHECKPOINT_JOIN_TIMEOUT_S = 10.0


def next_checkpoint_gap_s(
    last: tuple[int, int, int] | None, since_s: float, bound_frames: int, min_gap_s: float, max_gap_s: float
) -> float:
    """Past the bound, how long after a checkpoint the next one is due, from what it reported
    (``last``: busy, WAL frames, frames copied; None if it failed) ``since_s`` after the one before.

    One that did not catch the writer (busy, or frames left to copy): ``min_gap_s``, the WAL keeps
    growing. One that did: the writer starts the WAL over at its next commit, so the frames it saw
    were written in about ``since_s``, and the next is due when as many again reach the bound
    (``bound_frames``), within ``[min_gap_s, max_gap_s]``. Each start over costs the writer an
    fsync in its commit (the module's docstring); after a burst has left the file past the bound,
    a light load must not start the WAL over every ``min_gap_s`` (review11)."""
    if last is None or not math.isfinite(since_s):
        return min_gap_s
    busy, frames, copied = last
    if busy or copied < frames:
        return min_gap_s
    if frames <= 0:
        return max_gap_s
    return min(max(since_s * bound_frames / frames, min_gap_s), max_gap_s)


class WalCheckpointer:
    """Checkpoints the WAL of the SQLite file at ``path`` from its own connection and thread."""

    def __init__(
        self,
        path: str,
        *,
        interval_s: float = WAL_CHECKPOINT_INTERVAL_S,
        poll_s: float = WAL_CHECKPOINT_POLL_S,
        wal_bytes: int = WAL_CHECKPOINT_BYTES,
        min_gap_s: float = WAL_CHECKPOINT_MIN_GAP_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.path = path
        self.wal_path = path + "-wal"
        self.interval_s = interval_s
        self.poll_s = poll_s
        self.wal_bytes = wal_bytes
        self.min_gap_s = min_gap_s
        self.clock = clock
        self.checkpoints = 0  # checkpoints run (successful or not)
        self.failures = 0
        self.last: tuple[int, int, int] | None = None  # (busy, WAL frames, frames checkpointed) of the last one
        self._next_at = clock() + interval_s
        self._last_at = -math.inf  # when the last checkpoint ran
        self._past_bound_at = -math.inf  # when the next is due while the file is past the bound
        self._frame_bytes = (
            WAL_FRAME_BYTES_DEFAULT  # a WAL frame: its header and a page (the page size read on connect)
        )
        self._conn: sqlite3.Connection | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @staticmethod
    def take_over(conn: sqlite3.Connection, wal_bytes: int = WAL_CHECKPOINT_BYTES) -> None:
        """Stop ``conn`` (the writer) from checkpointing in its own commits, but for a backstop.

        The WAL starts over only when a write begins while every frame has been
        copied back. Under sustained writes (measured: ~1,100 commits/s) the
        thread's checkpoint never catches the writer, and the file grew without
        bound (285 MiB in 10 s). So the writer keeps SQLite's own checkpoint at
        :data:`WAL_BACKSTOP_FACTOR` times the thread's bound: it never runs while
        the thread keeps up, and it caps the WAL when the thread cannot.
        """
        page_size = int(conn.execute("PRAGMA page_size").fetchone()[0])
        backstop_bytes = WAL_BACKSTOP_FACTOR * int(wal_bytes)
        conn.execute(f"PRAGMA wal_autocheckpoint={max(1, backstop_bytes // page_size)}")
        conn.execute(f"PRAGMA journal_size_limit={backstop_bytes}")

    # -- the thread -------------------------------------------------------------------
    def start(self) -> None:
        if self._thread is not None:
            raise RuntimeError("checkpointer already started")
        self._thread = threading.Thread(
            target=self._run, name=f"rtm-wal-checkpoint:{os.path.basename(self.path)}", daemon=True
        )
        self._thread.start()

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def _run(self) -> None:
        try:
            while not self._stop.wait(self.poll_s):
                self.poll()
        finally:
            self._close_conn()

    def close(self, timeout_s: float = WAL_CHECKPOINT_JOIN_TIMEOUT_S) -> None:
        """Stop the thread (waiting for a checkpoint in progress) and close its connection."""
        self._stop.set()
        thread, self._thread = self._thread, None
        if thread is not None:
            thread.join(timeout_s)
            if thread.is_alive():
                log.warning("WAL checkpoint thread still busy after %.1fs; leaving it to finish", timeout_s)
                return
        self._close_conn()

    # -- one step ------------------------------------------------------------------------
    def wal_size(self) -> int:
        try:
            return os.path.getsize(self.wal_path)
        except FileNotFoundError:
            return 0

    def due(self, now: float, wal_size: int) -> bool:
        """Whether to checkpoint now: the WAL file is past the bound and the time
        :func:`next_checkpoint_gap_s` gave after the last checkpoint is up, or the interval is up.

        The file stays past the bound once it has grown past it (the writer restarts the WAL
        over its old frames, not on a shorter file), so past it the checkpoints follow what the
        last one saw: at least :data:`WAL_CHECKPOINT_MIN_GAP_S` apart while the writer outruns
        them, further apart as the load falls.
        """
        return (wal_size > self.wal_bytes and now >= self._past_bound_at) or now >= self._next_at

    def poll(self) -> bool:
        """Checkpoint if :meth:`due`; returns whether it did."""
        size = self.wal_size()
        if not self.due(self.clock(), size):
            return False
        self.checkpoint()
        return True

    def checkpoint(self) -> tuple[int, int, int] | None:
        """One ``PRAGMA wal_checkpoint(PASSIVE)``: (busy, WAL frames, frames copied), None if it failed."""
        self.checkpoints += 1
        now = self.clock()
        since_s, self._last_at = now - self._last_at, now
        self._next_at = now + self.interval_s
        self._past_bound_at = now + self.min_gap_s
        try:
            if self._conn is None:
                # Used by one thread at a time: the checkpoint thread, or a test calling poll().
                self._conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
                self._frame_bytes = WAL_FRAME_HEADER_BYTES + int(self._conn.execute("PRAGMA page_size").fetchone()[0])
            row = self._conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()[0]  # fetchall: no statement left open
        except sqlite3.Error as exc:
            self.failures += 1
            log.warning("WAL checkpoint of %s failed (retried when next due): %s", self.path, exc)
            return None
        self.last = (int(row[0]), int(row[1]), int(row[2]))
        bound_frames = max(1, self.wal_bytes // self._frame_bytes)
        self._past_bound_at = now + next_checkpoint_gap_s(
            self.last, since_s, bound_frames, self.min_gap_s, self.interval_s
        )
        return self.last

    def _close_conn(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()
