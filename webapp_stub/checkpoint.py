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
GIL while SQLite works). Durability is unchanged: a commit is durable once
it is in the WAL (its ``COMMIT`` syncs it, ``synchronous=FULL``), checkpointed
or not, and a passive checkpoint only copies what is already durable.

One fsync stays with the writer: after a complete checkpoint, the next commit
starts the WAL over from its beginning and SQLite syncs the new WAL header
before writing frames behind it (crash safety; not configurable short of
``synchronous=OFF``). So checkpoints are driven by size rather than by a
short timer: the fewer times the WAL starts over, the fewer of those stalls;
see :data:`WAL_CHECKPOINT_BYTES`. A WAL that starts over keeps its file (up to
the backstop, :data:`WAL_BACKSTOP_FACTOR`), so that its frames overwrite blocks
already allocated; past the bound, the file's length then says nothing of what
the WAL holds. There each checkpoint's report (the WAL's frames) and the WAL's
header (whether it started over: :meth:`WalCheckpointer.wal_generation`) give the
frames the writer added since the checkpoint before, and the next is due when as
many as the bound will have been added again (:func:`next_checkpoint_gap_s`): at
least :data:`WAL_CHECKPOINT_MIN_GAP_S` apart, at most the interval. The WAL starts
over only when the writer begins a transaction while every frame is copied back; a
checkpoint takes 10-150 ms and some commit nearly always lands during it, so alone
it hardly ever let the writer start over (round 11 of docs/publish-path.md: not once
in 39 checkpoints at 100 posts/s; the writer's backstop did, in a commit on the event
loop). So after one that copied all it saw, the thread runs follow-ups
(:func:`next_follow_up`): each copies only the frames committed meanwhile, a
millisecond's work that fits between two commits, and the writer's next transaction
then starts the WAL over (round 12: 41 of 43 series at 100 posts/s). Under load they cannot
catch the writer idle (under a millisecond between batches at 800-900 posts/s), so a
series that missed it makes the next checkpoints run none (:func:`follow_up_skips`),
and the checkpoints close in on the backstop so that it has little left to copy in
its commit.

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
from typing import NamedTuple

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
# how much the WAL holds; each checkpoint's own report does (next_checkpoint_gap_s): one every this
# long while the writer adds as many frames as the bound in less (about 16 MiB a second), or a
# reader holds back the copy, or the WAL is about to reach the backstop. Not read from the
# wal-index in the -shm file: opening and closing any descriptor of a file that SQLite locks drops
# the whole process's POSIX locks on it (https://www.sqlite.org/howtocorrupt.html, 2.2); a first
# version did, and another process's connection re-initialized the -shm under the writer's map,
# which killed the webapp with SIGBUS in a system test.
WAL_CHECKPOINT_MIN_GAP_S = 0.5
# Past the bound, the next checkpoint comes at most this many times later than the last one did
# after the one before. The frames a checkpoint saw measure the writer's rate only over the gap
# before it: after a burst, one that fell in a lull of half a second saw a handful of frames and put
# the next a whole interval off, and at 100 posts/s the WAL then grew unchecked to 51-56 MiB
# (3.2-3.5 times the bound) in that minute (docs/publish-path.md, round 11). Doubling, the gap reaches a
# light load's (16 s at 100 posts/s) in 5 checkpoints and the interval in 7; one that had nothing to
# copy costs microseconds and no fsync.
WAL_CHECKPOINT_GAP_GROWTH_FACTOR = 2.0
# After a checkpoint that copied every frame it saw, the thread runs follow-up checkpoints (each
# copies only the frames of the commits made meanwhile) until the WAL starts over, or this many, or
# for this long, or until the writer has been missed WAL_FOLLOW_UP_MAX_MISSES times, whichever comes
# first (next_follow_up). SQLite starts the WAL over only when the writer begins a transaction while
# every frame has been copied back; the group commit begins its next within milliseconds while a
# checkpoint of a gap's frames takes 10-150 ms, so without them only the writer's backstop started
# it over, inside a commit on the event loop (docs/publish-path.md, rounds 11 and 12). A follow-up
# copies about one commit's frames, so it can fall between two.
WAL_FOLLOW_UP_MAX_COUNT = 20
WAL_FOLLOW_UP_BUDGET_S = 0.25
# A follow-up *missed* the writer when the one before it found every frame copied and nothing new,
# yet the writer's next commit appended to the WAL instead of starting it over: its transaction had
# begun before. Under load the group commit keeps a batch open most of the time (87 % of it at
# 800-900 posts/s, the writer idle 0.8 ms between batches at the median: round 12), so follow-ups
# keep missing and the series stops after this many, leaving the WAL to the cadence and the backstop.
WAL_FOLLOW_UP_MAX_MISSES = 3
# After a series that never caught the writer idle (follow_up_outcome), the next checkpoints run
# none: 1, 3, 7, then this many at most (follow_up_skips), until one series catches it. Under load
# every series fails, and its copying follow-ups (a sync of the WAL and of the database file each)
# were some 400 a minute at 800-900 posts/s for none of the restarts (round 12).
WAL_FOLLOW_UP_MAX_SKIPPED_CHECKPOINTS = 8
# A follow-up that found nothing new to copy (every frame copied, no commit since) waits this long for
# the writer's next transaction, which starts the WAL over, before the next looks (one pread and a
# checkpoint with nothing to copy: microseconds); one that copied new frames is followed at once.
WAL_FOLLOW_UP_IDLE_PAUSE_S = 0.002
# A WAL frame's header (before its page), and SQLite's default page size.
WAL_FRAME_HEADER_BYTES = 24
WAL_PAGE_BYTES_DEFAULT = 4096
# In the WAL file's header, the checkpoint sequence number and salt-1 (https://www.sqlite.org/fileformat.html,
# 4.1): both change each time the writer starts the WAL over, which PRAGMA wal_checkpoint does not say.
WAL_HEADER_GENERATION_OFFSET_BYTES = 12
WAL_HEADER_GENERATION_BYTES = 8
# close() waits this long for a checkpoint in progress before giving up on the thread.
WAL_CHECKPOINT_JOIN_TIMEOUT_S = 10.0


def frames_added(previous: int | None, frames: int, restarted: bool) -> int | None:
    """How many frames the writer added to the WAL since the checkpoint before, which saw
    ``previous`` frames (None: there was none, or it failed), now that one sees ``frames``.

    The WAL starts over only when the writer begins a write while every frame has been copied, so at
    a steady load it may not (round 11: not once in 39 checkpoints at 100 posts/s, before the
    follow-ups of round 12; at saturation still), and ``frames`` counts every frame since it last did. ``restarted`` (its header changed) or fewer
    frames than before: all of them are new."""
    if previous is None:
        return None
    if restarted or frames < previous:
        return frames
    return frames - previous


def next_checkpoint_gap_s(
    last: tuple[int, int, int] | None,
    added_frames: int | None,
    since_s: float,
    frames: tuple[int, int],
    min_gap_s: float,
    max_gap_s: float,
    growth: float = WAL_CHECKPOINT_GAP_GROWTH_FACTOR,
) -> float:
    """Past the bound, how long after a checkpoint the next one is due, from what it reported
    (``last``: busy, WAL frames, frames copied; None if it failed), the frames written since the
    one before (:func:`frames_added`; None if unknown), ``since_s`` after it. ``frames`` is the
    thread's bound and the writer's backstop, in frames.

    One that did not catch the writer (busy, or frames left to copy: a reader holds an older
    snapshot): ``min_gap_s``. Else the writer's rate says when as many frames as the bound will have
    been added again; and, since the WAL may not start over (:func:`frames_added`: the follow-ups
    may not catch the writer idle), before it reaches the backstop, where the writer would
    checkpoint in its own commit: half the time to it, so the checkpoints close in on it and leave
    the writer little to copy. Within ``[min_gap_s,
    max_gap_s]`` and at most ``growth`` times ``since_s``: a short gap's few frames do not foretell a
    long one (:data:`WAL_CHECKPOINT_GAP_GROWTH_FACTOR`). Each start over costs the writer an fsync,
    each checkpoint that copies a sync of the WAL (and of the database file if no commit came during
    its copy): a light load must not have one every ``min_gap_s`` (round 11)."""
    if last is None or added_frames is None or not math.isfinite(since_s):
        return min_gap_s
    busy, wal_frames, copied = last
    if busy or copied < wal_frames:
        return min_gap_s
    bound_frames, backstop_frames = frames
    cap_s = min(max_gap_s, growth * since_s)
    if added_frames > 0:
        to_fill = min(bound_frames, (backstop_frames - wal_frames) / 2)
        cap_s = min(cap_s, since_s * to_fill / added_frames)
    return max(cap_s, min_gap_s)


class FollowUps(NamedTuple):
    """A series of follow-up checkpoints (:func:`next_follow_up`): the WAL's header when it began
    (:meth:`WalCheckpointer.wal_generation`), when, how many follow-ups ran, how many missed the
    writer (:data:`WAL_FOLLOW_UP_MAX_MISSES`), the WAL frames the last checkpoint of the series saw
    (-1: none yet), and whether it found every frame copied and nothing new since the one before."""

    generation: bytes
    began_at: float
    runs: int = 0
    misses: int = 0
    frames: int = -1
    waiting: bool = False


def next_follow_up(
    series: FollowUps,
    report: tuple[int, int, int] | None,
    now: float,
    budget: tuple[int, int, float] = (WAL_FOLLOW_UP_MAX_COUNT, WAL_FOLLOW_UP_MAX_MISSES, WAL_FOLLOW_UP_BUDGET_S),
    idle_pause_s: float = WAL_FOLLOW_UP_IDLE_PAUSE_S,
) -> tuple[FollowUps, float] | None:
    """After a checkpoint of ``series`` (the first or a follow-up; ``series.runs`` follow-ups ran)
    reported ``report`` (busy, WAL frames, frames copied; None if it failed), at ``now``: the series
    as it goes on and how long until its next follow-up, or None when it ends.

    It ends if the checkpoint failed or was busy (the writer's backstop checkpoints), the WAL is
    empty or holds fewer frames than before (it started over, the series' aim; so does a changed
    header, which :meth:`WalCheckpointer.follow_up` reads before each), or the ``budget`` is spent:
    so many follow-ups, so many misses, so long. Else the next comes at once if the checkpoint copied
    every frame and some were new (a commit landed meanwhile: the sooner the next, the fewer frames
    it copies, and the likelier it ends before the writer's next transaction begins); or after
    ``idle_pause_s`` if there was nothing new (every frame is copied back: the writer's next
    transaction starts the WAL over), or a reader held back the copy (it is soon done). A follow-up
    is a passive checkpoint like any other: it never waits for the writer, nor the writer for it."""
    if report is None:
        return None
    busy, frames, copied = report
    if busy or frames <= 0 or frames < series.frames:
        return None
    new = frames > series.frames
    misses = series.misses + (1 if series.waiting and new else 0)
    max_count, max_misses, max_s = budget
    if series.runs >= max_count or misses >= max_misses or not now - series.began_at < max_s:
        return None
    done = copied >= frames
    after = series._replace(misses=misses, frames=frames, waiting=done and not new)
    return after, (0.0 if done and new else idle_pause_s)


def follow_up_outcome(series: FollowUps, report: tuple[int, int, int] | None) -> bool | None:
    """Whether the series that ``report`` ended (:func:`next_follow_up` gave None) caught the
    writer idle: True if the WAL started over or was left with every frame copied and nothing new
    (the writer's next transaction starts it over); False if the writer was still committing, or it
    ended on misses; None if its last checkpoint failed or was busy (says nothing of the writer)."""
    if report is None or report[0]:
        return None
    frames, copied = report[1], report[2]
    if frames < series.frames or frames <= 0:
        return True
    return frames == series.frames and copied >= frames  # (a miss brings new frames)


def follow_up_skips(failed_in_a_row: int, cap: int = WAL_FOLLOW_UP_MAX_SKIPPED_CHECKPOINTS) -> int:
    """How many checkpoints run no follow-ups after ``failed_in_a_row`` series that never caught
    the writer idle (:func:`follow_up_outcome`): 0, 1, 3, 7, ... up to ``cap``."""
    return min((1 << min(failed_in_a_row, cap.bit_length() + 1)) - 1, cap)


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
        self.checkpoints = 0  # checkpoints run (successful or not), follow-ups not counted
        self.follow_ups = 0  # follow-up checkpoints run (next_follow_up)
        self.restarts = 0  # series of follow-ups that saw the WAL start over
        self.failed_series = 0  # series of follow-ups that never caught the writer idle
        self._failed_in_a_row = 0
        self._skip_series = 0  # checkpoints left to run without follow-ups (follow_up_skips)
        self.failures = 0
        self.last: tuple[int, int, int] | None = None  # (busy, WAL frames, frames checkpointed) of the last one
        # The follow-ups after the last checkpoint, and when the next is due (None: no series).
        self._series: FollowUps | None = None
        self._follow_up_at: float | None = None
        self._next_at = clock() + interval_s
        self._last_at = -math.inf  # when the last checkpoint ran
        self._past_bound_at = -math.inf  # when the next is due while the file is past the bound
        self._page_bytes = WAL_PAGE_BYTES_DEFAULT  # the page size (read on connect)
        # The last checkpoint's WAL frames and the WAL's header then (wal_generation), None if it failed.
        self._seen: tuple[int, bytes | None] | None = None
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
            while not self._stop.wait(self.wait_s()):
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

    def wait_s(self) -> float:
        """How long the thread waits before its next :meth:`poll`: the poll interval, or less when a
        follow-up is due sooner."""
        if self._follow_up_at is None:
            return self.poll_s
        return min(self.poll_s, max(0.0, self._follow_up_at - self.clock()))

    def poll(self) -> bool:
        """Run a follow-up checkpoint if one is due (:meth:`follow_up`), else checkpoint if
        :meth:`due`; returns whether it ran a checkpoint."""
        if self._follow_up_at is not None and self.clock() >= self._follow_up_at and self.follow_up():
            return True
        size = self.wal_size()
        if not self.due(self.clock(), size):
            return False
        self.checkpoint()
        return True

    def wal_generation(self) -> bytes | None:
        """The WAL header's checkpoint sequence number and salt-1, which change whenever the writer
        starts the WAL over; None if there is no WAL file. Safe to open and close, unlike the -shm
        file (:data:`WAL_CHECKPOINT_MIN_GAP_S`): SQLite takes its POSIX locks on the database file
        and the -shm file, never on the -wal file."""
        try:
            fd = os.open(self.wal_path, os.O_RDONLY)
        except OSError:
            return None
        try:
            head = os.pread(fd, WAL_HEADER_GENERATION_BYTES, WAL_HEADER_GENERATION_OFFSET_BYTES)
        finally:
            os.close(fd)
        return head if len(head) == WAL_HEADER_GENERATION_BYTES else None

    def checkpoint(self) -> tuple[int, int, int] | None:
        """One ``PRAGMA wal_checkpoint(PASSIVE)``: (busy, WAL frames, frames copied), None if it failed."""
        self.checkpoints += 1
        now = self.clock()
        since_s, self._last_at = now - self._last_at, now
        self._next_at = now + self.interval_s
        self._past_bound_at = now + self.min_gap_s
        generation = self.wal_generation()  # before: frames the checkpoint sees are of this one or later
        self._series, self._follow_up_at = None, None
        report = self._passive()
        if report is None:
            self._seen = None
            return None
        self._past_bound_at = now + self._next_gap_s(report, generation, since_s)
        if self._skip_series > 0:
            self._skip_series -= 1
        elif generation is not None:
            self._next_follow_up(FollowUps(generation, self.clock()), report)
        return report

    def follow_up(self) -> bool:
        """One follow-up of the last checkpoint (:func:`next_follow_up`): unless the WAL started over
        since it, or the follow-ups' time is up (a poll long after it, in a test), a ``PRAGMA
        wal_checkpoint(PASSIVE)`` that leaves the checkpoints' cadence as it was. Returns whether it
        ran one. Like every checkpoint here, it never waits for the writer."""
        series, self._series, self._follow_up_at = self._series, None, None
        if series is None or not self.clock() - series.began_at < WAL_FOLLOW_UP_BUDGET_S:
            return False
        if self.wal_generation() != series.generation:
            self.restarts += 1
            self._failed_in_a_row = 0
            return False
        self.follow_ups += 1
        report = self._passive()
        if report is not None and 0 <= report[1] < series.frames:
            self.restarts += 1  # it started over between the header's read and the checkpoint
        self._next_follow_up(series._replace(runs=series.runs + 1), report)
        return True

    def _next_follow_up(self, series: FollowUps, report: tuple[int, int, int] | None) -> None:
        """Schedule the next follow-up of ``series`` after its checkpoint's ``report``, or end it."""
        now = self.clock()
        step = next_follow_up(series, report, now)
        if step is None:
            caught = follow_up_outcome(series, report)
            if caught is not None:
                self._failed_in_a_row = 0 if caught else self._failed_in_a_row + 1
                self.failed_series += 0 if caught else 1
                self._skip_series = follow_up_skips(self._failed_in_a_row)
            return
        self._series, delay_s = step
        self._follow_up_at = now + delay_s

    def _passive(self) -> tuple[int, int, int] | None:
        """``PRAGMA wal_checkpoint(PASSIVE)`` on the thread's connection, None if it failed."""
        try:
            if self._conn is None:
                # Used by one thread at a time: the checkpoint thread, or a test calling poll().
                self._conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
                self._page_bytes = int(self._conn.execute("PRAGMA page_size").fetchone()[0])
            row = self._conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()[0]  # fetchall: no statement left open
        except sqlite3.Error as exc:
            self.failures += 1
            log.warning("WAL checkpoint of %s failed (retried when next due): %s", self.path, exc)
            return None
        self.last = (int(row[0]), int(row[1]), int(row[2]))
        return self.last

    def _next_gap_s(self, last: tuple[int, int, int], generation: bytes | None, since_s: float) -> float:
        """:func:`next_checkpoint_gap_s` after ``last``, seen in the WAL of header ``generation``."""
        seen, self._seen = self._seen, ((last[1], generation) if last[1] >= 0 else None)  # busy: -1, unknown
        added = None
        if seen is not None:
            restarted = generation is None or generation != seen[1]
            added = frames_added(seen[0], last[1], restarted)
        bound_frames = max(1, self.wal_bytes // (WAL_FRAME_HEADER_BYTES + self._page_bytes))
        backstop_frames = WAL_BACKSTOP_FACTOR * self.wal_bytes // self._page_bytes  # take_over's wal_autocheckpoint
        return next_checkpoint_gap_s(
            last, added, since_s, (bound_frames, backstop_frames), self.min_gap_s, self.interval_s
        )

    def _close_conn(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()
