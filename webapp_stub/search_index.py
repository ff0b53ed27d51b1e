"""The full-text index of ``messages`` for ``search.messages``, kept up to date by searches.

Posting never touches it: no trigger, no statement on the post path (docs/publish-path.md). A
search first brings it up to date (:func:`catch_up`, on the webapp's one writer connection, in
slices of a transaction each, so inside the group commit when one is open:
webapp_stub/search_reader.py), then reads it (on a read-only connection of its own, once that is
committed).

The tables (:data:`FTS_SCHEMA`, :data:`SEARCH_SCHEMA`, created by :func:`webapp_stub.schema.migrate`):

* ``search_fts``: an FTS5 table with external content (``content='messages'``,
  ``content_rowid='id'``): it holds the index only, keyed by the ``messages`` rowid; the text is
  read from ``messages`` when needed (``highlight``), never stored twice.
* ``search_mark``: one row, ``last_id``: every message row at or below it is indexed, none above.
* ``search_stale``: ``(id, text)`` of indexed rows edited or deleted since: ``text`` is what the
  index holds for that row, which FTS5 needs to take it out again (an external-content index
  forgets a row only when told its old text).

The invariant, for every rowid ``r`` (what each step keeps true):

1. ``r`` in ``search_stale``: the index holds exactly the text recorded there;
2. otherwise: the index holds the row's current text if ``r <= last_id`` and the row exists,
   and nothing for ``r`` else.

* :func:`note_change`, in ``chat.update`` / ``chat.delete`` before the row changes: records the
  row's text if it is indexed (``r <= last_id``) and not recorded already (the first text is the
  indexed one). One statement, in the edit's own transaction.
* :func:`note_deleted`, after a delete: ``last_id`` drops to the largest rowid left when rows above
  it were deleted. SQLite gives a new row ``max(rowid) + 1``, so it would otherwise reuse a deleted
  top rowid at or below the mark, and that message would never be indexed.
* :func:`catch_up`: first drains up to :data:`MAX_STALE_PER_SEARCH` records (old text out, the
  current text in for a row still there at or below the mark), then indexes up to
  :data:`MAX_INDEX_ROWS_PER_SEARCH` rows above the mark, skipping rows still recorded (rule 1:
  their drain puts the current text in), and moves the mark.

A search leaves out rows still recorded (their index entry is old): an edited or deleted message
is never found by its old text, and only a backlog beyond :data:`MAX_STALE_PER_SEARCH` edits
hides a message until the next search drains it. Rows above the mark (a backlog beyond
:data:`MAX_INDEX_ROWS_PER_SEARCH`) are not found yet: the answer then says so (``warning``).
"""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass

FTS_SCHEMA = "CREATE VIRTUAL TABLE IF NOT EXISTS search_fts USING fts5(text, content='messages', content_rowid='id');"
SEARCH_SCHEMA = """
CREATE TABLE IF NOT EXISTS search_mark (
    id INTEGER PRIMARY KEY CHECK (id = 0),
    last_id INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS search_stale (
    id INTEGER PRIMARY KEY,
    text TEXT NOT NULL
);
"""
# Rows indexed by one search at most. FTS5 indexes a message of a dozen words in about 4.5 µs on
# this project's 2-core VM (50,000 in 0.23 s: bench/search.py), so this bounds a catch-up to some
# 25 ms of work (in slices of about a millisecond on the event loop: search_reader.py) and a
# search's time; a larger backlog (a database that had no index, or a busy day without a search)
# is indexed by the next searches, this many each.
MAX_INDEX_ROWS_PER_SEARCH = 5_000
# Edited or deleted rows re-indexed by one search at most (each: one FTS5 delete and one insert).
MAX_STALE_PER_SEARCH = 2_000


@dataclass(frozen=True)
class CatchUp:
    """What one :func:`catch_up` did: rows indexed, records drained, and whether work is left."""

    indexed: int
    drained: int
    behind: bool


def create(conn: sqlite3.Connection) -> bool:
    """Create the tables. False if this SQLite has no FTS5: then only ``search_mark`` (left at 0, so
    edits record nothing) and ``search_stale`` exist, and ``search.messages`` is unavailable."""
    conn.executescript(SEARCH_SCHEMA)  # IF NOT EXISTS: no write (no lock) once they exist
    if conn.execute("SELECT 1 FROM search_mark").fetchone() is None:  # never a write lock when present:
        conn.execute("INSERT OR IGNORE INTO search_mark (id, last_id) VALUES (0, 0)")  # tools open it live
    try:
        conn.execute(FTS_SCHEMA)
    except sqlite3.OperationalError as exc:
        if "fts5" in str(exc):
            return False
        raise
    return True


def rebuild(conn: sqlite3.Connection) -> bool:
    """Make the index anew from ``messages``, on a database nobody else has open (each step commits
    by itself: :func:`create` runs a script): every table of it dropped, whatever it held, and
    created again, all messages indexed, nothing recorded. ``rtm
    restore`` does this to the database it puts in place, so a backup's index data (FTS5's own
    pages, which SQLite's integrity check does not read) is never used. False without FTS5."""
    for table in ("search_fts", "search_stale", "search_mark"):
        conn.execute(f"DROP TABLE IF EXISTS {table}")
    if not create(conn):
        return False
    conn.execute("INSERT INTO search_fts (search_fts) VALUES ('rebuild')")  # FTS5: index the content table
    conn.execute("UPDATE search_mark SET last_id = (SELECT coalesce(max(id), 0) FROM messages)")
    return True


def available(conn: sqlite3.Connection) -> bool:
    """The index exists (this SQLite has FTS5)."""
    return conn.execute("SELECT 1 FROM sqlite_master WHERE name = 'search_fts'").fetchone() is not None


def note_change(db: sqlite3.Connection, channel: str, ts_us: int) -> None:
    """Before the message at (``channel``, ``ts_us``) is edited or deleted: keep its indexed text."""
    db.execute(
        "INSERT OR IGNORE INTO search_stale (id, text) SELECT m.id, m.text FROM messages m, search_mark s "
        "WHERE m.channel = ? AND m.ts_us = ? AND m.id <= s.last_id",
        (channel, ts_us),
    )


def note_deleted(db: sqlite3.Connection) -> None:
    """After a delete: the mark no higher than the largest rowid left (see the module's docstring)."""
    db.execute(
        "UPDATE search_mark SET last_id = (SELECT coalesce(max(id), 0) FROM messages) "
        "WHERE last_id > (SELECT coalesce(max(id), 0) FROM messages)"
    )


def mark(conn: sqlite3.Connection) -> int:
    return int(conn.execute("SELECT last_id FROM search_mark").fetchone()[0])


def catch_up(db: sqlite3.Connection, max_rows: int | None = None, max_stale: int | None = None) -> CatchUp:
    """Drain recorded edits and index new rows (inside the caller's transaction), at most ``max_stale``
    and ``max_rows`` (default: :data:`MAX_STALE_PER_SEARCH`, :data:`MAX_INDEX_ROWS_PER_SEARCH`; 0: none
    of that kind). The invariant holds after every call, whatever its bounds: a search catches up in
    slices, one transaction each (webapp_stub/search_reader.py)."""
    max_rows = MAX_INDEX_ROWS_PER_SEARCH if max_rows is None else max_rows
    max_stale = MAX_STALE_PER_SEARCH if max_stale is None else max_stale
    last_id = mark(db)
    drained, stale_left = _drain(db, last_id, max_stale)
    if max_rows <= 0:
        return CatchUp(
            0,
            drained,
            stale_left or db.execute("SELECT 1 FROM messages WHERE id > ?", (last_id,)).fetchone() is not None,
        )
    row = db.execute(
        "SELECT id FROM messages WHERE id > ? ORDER BY id LIMIT 1 OFFSET ?", (last_id, max_rows - 1)
    ).fetchone()
    rows_left = row is not None and db.execute("SELECT 1 FROM messages WHERE id > ?", (row[0],)).fetchone() is not None
    upto = (
        int(row[0]) if row is not None else int(db.execute("SELECT coalesce(max(id), 0) FROM messages").fetchone()[0])
    )
    indexed = 0
    if upto > last_id:
        indexed = db.execute(
            "INSERT INTO search_fts (rowid, text) SELECT id, text FROM messages "
            "WHERE id > ? AND id <= ? AND id NOT IN (SELECT id FROM search_stale)",
            (last_id, upto),
        ).rowcount
        db.execute("UPDATE search_mark SET last_id = ?", (upto,))
    return CatchUp(indexed, drained, stale_left or rows_left)


def _drain(db: sqlite3.Connection, last_id: int, max_stale: int) -> tuple[int, bool]:
    """Re-index up to ``max_stale`` recorded rows: (how many, whether more are recorded)."""
    if max_stale <= 0:
        return 0, db.execute("SELECT 1 FROM search_stale LIMIT 1").fetchone() is not None
    row = db.execute("SELECT id FROM search_stale ORDER BY id LIMIT 1 OFFSET ?", (max_stale - 1,)).fetchone()
    upto = int(row[0]) if row is not None else None
    bound, params = ("WHERE id <= ?", (upto,)) if upto is not None else ("", ())
    drained = db.execute(
        f"INSERT INTO search_fts (search_fts, rowid, text) SELECT 'delete', id, text FROM search_stale {bound}", params
    ).rowcount
    if not drained:
        return 0, False
    db.execute(
        "INSERT INTO search_fts (rowid, text) SELECT m.id, m.text FROM search_stale s JOIN messages m ON m.id = s.id "
        f"WHERE m.id <= ? {'AND s.id <= ?' if upto is not None else ''}",
        (last_id, *params),
    )
    db.execute(f"DELETE FROM search_stale {bound}", params)
    more = upto is not None and db.execute("SELECT 1 FROM search_stale LIMIT 1").fetchone() is not None
    return drained, more
