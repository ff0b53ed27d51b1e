"""The webapp's durable state: one SQLite file, synchronous and plain.

This is the sans-I/O core of the webapp: no asyncio, no sockets. The aiohttp
layer (:mod:`webapp_stub.api`) calls it directly; every call is one short
transaction on one connection, which SQLite in WAL mode serves in tens of
microseconds. In the webapp process, WAL checkpoints (the one slow, fsyncing
part) run on a thread of their own: see :mod:`webapp_stub.checkpoint`.

Guarantees
----------
* Every persisted event gets its channel's next ``seq`` in the same
  transaction that writes it: per channel, gapless, starting at 1. Channels are
  abstract (DESIGN.md): a conversation ``C…``, a user ``U…`` (events for all of
  that user's connections) or a team ``T…`` (team-wide events) each have their
  own sequence in ``channel_seq``.
* ``ts`` strings (``"1700000000.000100"``) are unique and strictly increasing
  per channel: if the clock has not moved (or went back), the microseconds are
  bumped past the channel's last ``ts``.
* The ``json`` of an event is the exact client-visible JSON string, encoded once
  here; it travels as bytes through the fleet and is never re-encoded.
* Mutating methods return the committed :class:`Event` list in commit order;
  the caller hands them to the outbox (:mod:`webapp_stub.handoff`) right after.
* Conversations are channels (``C…``), direct messages (``D…``, kind ``im``)
  and group DMs (``G…``, kind ``mpim``); DMs are private to their members.
  Membership changes emit an event on the member's user channel whose ``ctl``
  (``{"join": C, "since": seq}`` / ``{"leave": C}``) makes gateways move that
  user's connections at once.
* Edits, deletions and reactions are events on the message's channel with
  their own ``seq`` and ``event_ts``; ephemeral messages are events on the
  target user's channel and never enter history.

Errors a client can cause raise :class:`ApiError` with the Slack error code.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import json
import os
import re
import secrets
import sqlite3
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Any

from webapp_stub.checkpoint import WalCheckpointer

DB_FILE = "webapp.db"
MAX_TEXT_CHARS = 40_000  # Slack's limit for chat.postMessage text
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
# A Slack ts is seconds.microseconds; its seconds have 10 digits until the year 2286.
# More than this many digits cannot be a ts (and would overflow SQLite's integers).
MAX_TS_SECONDS_DIGITS = 12
MAX_SQL_INT = 2**63 - 1  # SQLite INTEGER; cursors and seqs beyond it are refused
# Page sizes. Slack recommends 200 and caps most list methods at 1000.
DEFAULT_PAGE = 100
MAX_PAGE = 1000
DEFAULT_HISTORY_PAGE = 100
MAX_HISTORY_PAGE = 999
MAX_CHANNEL_NAME = 80
MAX_DM_OTHERS = 8  # Slack: a group DM holds the caller and at most 8 others
MAX_REACTION_NAME = 100
GENERAL = "general"  # the team's default channel: nobody leaves, is kicked from or archives it
REPLY_USERS_SHOWN = 5  # Slack lists at most this many reply_users on a thread parent
PRESENCES = ("auto", "away")  # users.setPresence: "auto" follows activity, "away" is manual
ID_LENGTH = 11  # after the one-letter prefix, like Slack's U024BE7LH-style ids
JSON_SEPARATORS = (",", ":")
DEFAULT_CACHE_PAGES = -2000  # SQLite's default page cache (negative: KiB)

SCHEMA = """
CREATE TABLE IF NOT EXISTS teams (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    domain TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS users (
    id TEXT PRIMARY KEY,
    team TEXT NOT NULL,
    name TEXT NOT NULL,
    real_name TEXT NOT NULL DEFAULT '',
    is_bot INTEGER NOT NULL DEFAULT 0,
    bot_id TEXT,
    presence TEXT NOT NULL DEFAULT 'auto'
);
CREATE INDEX IF NOT EXISTS users_team ON users (team);
CREATE TABLE IF NOT EXISTS tokens (
    token TEXT PRIMARY KEY,
    user TEXT NOT NULL
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS tokens_user ON tokens (user);
CREATE TABLE IF NOT EXISTS channels (
    id TEXT PRIMARY KEY,
    team TEXT NOT NULL,
    name TEXT NOT NULL,
    created INTEGER NOT NULL,
    creator TEXT NOT NULL,
    is_private INTEGER NOT NULL DEFAULT 0,
    is_archived INTEGER NOT NULL DEFAULT 0,
    kind TEXT NOT NULL DEFAULT 'channel',
    dm_key TEXT,
    UNIQUE (team, name)
);
CREATE TABLE IF NOT EXISTS members (
    channel TEXT NOT NULL,
    user TEXT NOT NULL,
    PRIMARY KEY (channel, user)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS members_user ON members (user, channel);
CREATE TABLE IF NOT EXISTS messages (
    channel TEXT NOT NULL,
    ts_us INTEGER NOT NULL,
    ts TEXT NOT NULL,
    seq INTEGER NOT NULL,
    user TEXT NOT NULL,
    team TEXT NOT NULL,
    text TEXT NOT NULL,
    thread_ts TEXT,
    bot_id TEXT,
    extra TEXT,
    subtype TEXT,
    edited_user TEXT,
    edited_ts TEXT,
    PRIMARY KEY (channel, ts_us)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS reactions (
    channel TEXT NOT NULL,
    ts_us INTEGER NOT NULL,
    name TEXT NOT NULL,
    user TEXT NOT NULL,
    UNIQUE (channel, ts_us, name, user)
);
CREATE TABLE IF NOT EXISTS channel_seq (
    channel TEXT PRIMARY KEY,
    last_seq INTEGER NOT NULL,
    last_ts_us INTEGER NOT NULL DEFAULT 0
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS events (
    channel TEXT NOT NULL,
    seq INTEGER NOT NULL,
    json TEXT NOT NULL,
    ctl TEXT,
    created_at REAL NOT NULL,
    PRIMARY KEY (channel, seq)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS events_created ON events (created_at);
CREATE TABLE IF NOT EXISTS marks (
    name TEXT PRIMARY KEY,
    value REAL NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS dead_letters (
    channel TEXT NOT NULL,
    seq INTEGER NOT NULL,
    reason TEXT NOT NULL,
    detail TEXT NOT NULL DEFAULT '',
    refusals INTEGER NOT NULL,
    state TEXT NOT NULL,
    redrives INTEGER NOT NULL DEFAULT 0,
    parked_at REAL NOT NULL,
    updated_at REAL NOT NULL,
    PRIMARY KEY (channel, seq)
) WITHOUT ROWID;
"""

# Columns added after the first release: a database written by an older
# version gets them (with their defaults) when it is opened.
MIGRATIONS = (
    ("users", "presence", "TEXT NOT NULL DEFAULT 'auto'"),
    ("channels", "kind", "TEXT NOT NULL DEFAULT 'channel'"),
    ("channels", "dm_key", "TEXT"),
    ("messages", "subtype", "TEXT"),
    ("messages", "edited_user", "TEXT"),
    ("messages", "edited_ts", "TEXT"),
)
# Indexes over migrated columns: created once the columns exist.
INDEXES = """
CREATE UNIQUE INDEX IF NOT EXISTS channels_dm_key ON channels (team, dm_key) WHERE dm_key IS NOT NULL;
CREATE INDEX IF NOT EXISTS users_bot ON users (bot_id) WHERE bot_id IS NOT NULL;
"""


class ApiError(Exception):
    """A Slack error code (``channel_not_found``, ...) to answer the caller with."""

    def __init__(self, code: str, status: int = 200, headers: dict[str, str] | None = None) -> None:
        super().__init__(code)
        self.code = code
        self.status = status
        self.headers = headers or {}


@dataclass(frozen=True)
class Team:
    id: str
    name: str
    domain: str

    def to_api(self) -> dict[str, Any]:
        return {"id": self.id, "name": self.name, "domain": self.domain}


@dataclass(frozen=True)
class User:
    id: str
    team: str
    name: str
    real_name: str = ""
    is_bot: bool = False
    bot_id: str | None = None
    presence: str = "auto"  # "auto" or "away" (set by users.setPresence)

    def to_api(self) -> dict[str, Any]:
        """Slack's user object (users.info, users.list)."""
        profile: dict[str, Any] = {
            "real_name": self.real_name,
            "display_name": self.name,
            "real_name_normalized": self.real_name,
            "display_name_normalized": self.name,
            "team": self.team,
        }
        if self.bot_id:
            profile["bot_id"] = self.bot_id
        return {
            "id": self.id,
            "team_id": self.team,
            "name": self.name,
            "real_name": self.real_name,
            "deleted": False,
            "is_bot": self.is_bot,
            "is_app_user": False,
            "profile": profile,
        }


@dataclass(frozen=True)
class Channel:
    """A conversation: a channel (``C…``), a direct message (``D…``, kind ``im``)
    or a group direct message (``G…``, kind ``mpim``). DMs are private: only
    their members see them."""

    id: str
    team: str
    name: str
    created: int
    creator: str
    is_private: bool = False
    is_archived: bool = False
    kind: str = "channel"  # "channel", "im" or "mpim"

    @property
    def is_im(self) -> bool:
        return self.kind == "im"

    @property
    def is_mpim(self) -> bool:
        return self.kind == "mpim"

    @property
    def is_general(self) -> bool:
        return self.kind == "channel" and self.name == GENERAL

    @property
    def channel_type(self) -> str:
        """The letter Slack puts in ``channel_type``: C public, G private or group DM, D direct message."""
        if self.is_im:
            return "D"
        return "G" if self.is_private else "C"

    def to_api(self, **extra: Any) -> dict[str, Any]:
        """Slack's conversation object (conversations.info/list/create/open).

        For a direct message, pass ``user`` (the other member) in ``extra``.
        """
        if self.is_im:
            return {
                "id": self.id,
                "created": self.created,
                "is_im": True,
                "is_org_shared": False,
                "is_archived": False,
                "is_user_deleted": False,
                "context_team_id": self.team,
                "priority": 0,
                **extra,
            }
        return {
            "id": self.id,
            "name": self.name,
            "is_channel": self.kind == "channel" and not self.is_private,
            "is_group": self.kind == "channel" and self.is_private,
            "is_im": False,
            "is_mpim": self.is_mpim,
            "is_private": self.is_private,
            "created": self.created,
            "creator": self.creator,
            "is_archived": self.is_archived,
            "is_general": self.is_general,
            "name_normalized": self.name,
            "is_shared": False,
            "is_org_shared": False,
            "context_team_id": self.team,
            **extra,
        }


@dataclass(frozen=True)
class Event:
    """One persisted event: its channel's ``seq``, the exact JSON, the gateway control map."""

    channel: str
    seq: int
    json: str
    ctl: dict[str, Any] | None
    t0: float  # unix seconds when the event entered the fleet (its created_at)

    @property
    def eid(self) -> str:
        return f"{self.channel}:{self.seq}"


@dataclass(frozen=True)
class DeadLetter:
    """An event the fleet refused for good, parked by the hand-off (see webapp_stub.handoff).

    ``state`` is ``parked`` (waiting for an operator), ``redrive`` (an operator
    asked to send it again; the webapp picks it up within a second),
    ``redriving`` (back in the outbox) or ``delivered`` (a redrive was
    acknowledged). ``refusals`` counts the refusals that parked it, over all
    attempts; ``redrives`` how often an operator sent it again.
    """

    channel: str
    seq: int
    reason: str
    detail: str
    refusals: int
    state: str
    redrives: int
    parked_at: float
    updated_at: float

    @property
    def eid(self) -> str:
        return f"{self.channel}:{self.seq}"


DEAD_LETTER_STATES = ("parked", "redrive", "redriving", "delivered")


@dataclass(frozen=True)
class Page:
    items: list[Any]
    next_cursor: str  # "" on the last page


# -- ids, ts and cursors ------------------------------------------------------------


def new_id(prefix: str) -> str:
    """A Slack-looking id such as ``U5F0A2C97E1B`` (44 random bits)."""
    return prefix + secrets.token_hex(6)[:ID_LENGTH].upper()


def new_token(kind: str) -> str:
    """``xoxp-…`` for people, ``xoxb-…`` for bots."""
    return f"{kind}-{secrets.token_hex(16)}"


def ts_to_us(ts: str) -> int:
    """``"1700000000.000100"`` -> 1700000000000100. Raises ValueError."""
    text = str(ts).strip()
    whole, _, frac = text.partition(".")
    if (
        not whole.isascii()
        or not whole.isdigit()
        or len(whole) > MAX_TS_SECONDS_DIGITS
        or (frac and not (frac.isascii() and frac.isdigit()))
        or len(frac) > 6
    ):
        raise ValueError(f"bad ts {ts!r}")
    return int(whole) * 1_000_000 + int(frac.ljust(6, "0") or 0)


def us_to_ts(us: int) -> str:
    return f"{us // 1_000_000}.{us % 1_000_000:06d}"


def encode_cursor(kind: str, key: str | int) -> str:
    return base64.urlsafe_b64encode(f"{kind}:{key}".encode()).decode()


def decode_cursor(cursor: str | None, kind: str) -> str | None:
    """The key inside ``cursor``; None for no cursor; ``invalid_cursor`` if unreadable."""
    if not cursor:
        return None
    try:
        text = base64.urlsafe_b64decode(cursor.encode() + b"=" * (-len(cursor) % 4)).decode()
    except (binascii.Error, UnicodeError, ValueError):
        raise ApiError("invalid_cursor") from None
    got, _, key = text.partition(":")
    if got != kind or not key:
        raise ApiError("invalid_cursor")
    return key


def _int_cursor(cursor: str | None, kind: str) -> int | None:
    key = decode_cursor(cursor, kind)
    if key is None:
        return None
    if not key.isascii() or not key.isdigit() or len(key) > 19:
        raise ApiError("invalid_cursor")
    number = int(key)
    if number > MAX_SQL_INT:
        raise ApiError("invalid_cursor")
    return number


def dumps(obj: Any) -> str:
    """The one JSON encoding of client-visible events: compact, UTF-8 text."""
    return json.dumps(obj, separators=JSON_SEPARATORS, ensure_ascii=False)


# -- the store ---------------------------------------------------------------------------


class Store:
    """All webapp state in ``<data_dir>/webapp.db`` (or ``path`` if it names a file)."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        clock: Callable[[], float] = time.time,
        background_checkpoints: bool = False,
        synchronous: str = SQLITE_SYNCHRONOUS,
        max_event_bytes: int = MAX_EVENT_BYTES,
    ) -> None:
        """Open (creating if needed) and migrate the database.

        With ``background_checkpoints`` (the webapp process), WAL checkpoints
        run on a thread of their own (:mod:`webapp_stub.checkpoint`) instead of
        inside whichever commit fills the WAL; :meth:`close` stops that thread.
        Without it (tools, the seed, tests), SQLite checkpoints on commit as usual.
        ``synchronous`` is SQLite's ``PRAGMA synchronous`` (FULL: durable across a
        power loss); ``max_event_bytes`` bounds the UTF-8 JSON of every event
        written (``msg_too_long`` beyond it).
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
        path = os.fspath(path)
        if os.path.isdir(path) or not path.endswith(".db"):
            os.makedirs(path, exist_ok=True)
            path = os.path.join(path, DB_FILE)
        else:
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        self.path = path
        self.clock = clock
        # The database holds every user's token: create it 0600 before SQLite opens it (SQLite
        # gives its -wal and -shm files the database file's mode).
        with contextlib.suppress(FileExistsError):
            os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        # isolation_level=None: we issue BEGIN/COMMIT ourselves. One connection,
        # used only from the event loop's thread, so check_same_thread is moot.
        self.conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False, cached_statements=256)
        self.conn.execute("PRAGMA journal_mode=WAL")
        self.conn.execute(f"PRAGMA synchronous={synchronous}")  # FULL: an ok'd commit survives a power loss
        self.conn.execute("PRAGMA foreign_keys=OFF")
        self.conn.execute("PRAGMA busy_timeout=5000")
        self.conn.executescript(SCHEMA)
        self._migrate()
        self.checkpointer: WalCheckpointer | None = None
        if background_checkpoints:
            WalCheckpointer.take_over(self.conn)
            self.checkpointer = WalCheckpointer(path)
            self.checkpointer.start()

    def _migrate(self) -> None:
        """Add the columns of :data:`MIGRATIONS` that an older database lacks, then their indexes."""
        for table, column, decl in MIGRATIONS:
            have = {row[1] for row in self.conn.execute(f"PRAGMA table_info({table})")}
            if column not in have:
                self.conn.execute(f"ALTER TABLE {table} ADD COLUMN {column} {decl}")
        self.conn.executescript(INDEXES)

    def close(self) -> None:
        """Stop the checkpoint thread, if any, then close the connection.

        Closing the last connection to the file checkpoints the WAL into the
        database and removes it (SQLite's own behaviour on close).
        """
        if self.checkpointer is not None:
            self.checkpointer.close()
            self.checkpointer = None
        self.conn.close()

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """``BEGIN IMMEDIATE`` … ``COMMIT``; rolled back on any exception.

        Inside an open batch (:meth:`begin_batch`) it is a savepoint instead:
        an exception undoes only this transaction's writes, and they become
        durable with the batch's :meth:`commit_batch`.
        """
        if not self._in_batch and self.batch_opener is not None:
            self.batch_opener()
        if self._in_batch:
            self.conn.execute("SAVEPOINT tx")
            try:
                yield self.conn
            except BaseException:
                self.conn.execute("ROLLBACK TO tx")
                self.conn.execute("RELEASE tx")
                raise
            self.conn.execute("RELEASE tx")
            return
        self.conn.execute("BEGIN IMMEDIATE")
        try:
            yield self.conn
        except BaseException:
            self.conn.execute("ROLLBACK")
            raise
        self.conn.execute("COMMIT")

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

    # -- events (must run inside a transaction) --------------------------------------
    def _next_seq(self, channel: str, with_ts: bool = False) -> tuple[int, int]:
        """Allocate ``channel``'s next seq (and, if asked, its next ts in µs)."""
        row = self.conn.execute("SELECT last_seq, last_ts_us FROM channel_seq WHERE channel = ?", (channel,)).fetchone()
        last_seq, last_ts_us = row if row else (0, 0)
        ts_us = last_ts_us
        if with_ts:
            ts_us = max(int(self.clock() * 1_000_000), last_ts_us + 1)
        seq = last_seq + 1
        if row:
            self.conn.execute(
                "UPDATE channel_seq SET last_seq = ?, last_ts_us = ? WHERE channel = ?", (seq, ts_us, channel)
            )
        else:
            self.conn.execute(
                "INSERT INTO channel_seq (channel, last_seq, last_ts_us) VALUES (?, ?, ?)", (channel, seq, ts_us)
            )
        return seq, ts_us

    def _append_event(
        self, channel: str, payload: dict[str, Any], ctl: dict[str, Any] | None = None, seq: int | None = None
    ) -> Event:
        if seq is None:
            seq, _ = self._next_seq(channel)
        text = dumps(payload)
        # A str holds at most 4 UTF-8 bytes per character: encode only when it may be too long.
        if len(text) * 4 > self.max_event_bytes and len(text.encode()) > self.max_event_bytes:
            raise ApiError("msg_too_long")
        now = self.clock()
        self.conn.execute(
            "INSERT INTO events (channel, seq, json, ctl, created_at) VALUES (?, ?, ?, ?, ?)",
            (channel, seq, text, None if ctl is None else dumps(ctl), now),
        )
        return Event(channel, seq, text, ctl, now)

    def last_seq(self, channel: str) -> int:
        row = self.conn.execute("SELECT last_seq FROM channel_seq WHERE channel = ?", (channel,)).fetchone()
        return int(row[0]) if row else 0

    def events_after(self, channel: str, after_seq: int, limit: int = 500) -> tuple[list[Event], bool]:
        """Events of ``channel`` with seq > ``after_seq`` in seq order, and whether more follow."""
        rows = self.conn.execute(
            "SELECT seq, json, ctl, created_at FROM events WHERE channel = ? AND seq > ? ORDER BY seq LIMIT ?",
            (channel, after_seq, limit + 1),
        ).fetchall()
        events = [
            Event(channel, seq, text, None if ctl is None else json.loads(ctl), t0) for seq, text, ctl, t0 in rows
        ]
        return events[:limit], len(events) > limit

    def events_since(self, created_at: float) -> list[Event]:
        """Every event created at or after ``created_at``, in seq order per channel (restart
        replay), except dead letters (an operator redrives those)."""
        rows = self.conn.execute(
            "SELECT e.channel, e.seq, e.json, e.ctl, e.created_at FROM events e WHERE e.created_at >= ? "
            "AND NOT EXISTS (SELECT 1 FROM dead_letters d WHERE d.channel = e.channel AND d.seq = e.seq "
            "AND d.state != 'delivered') ORDER BY e.channel, e.seq",
            (created_at,),
        ).fetchall()
        return [Event(ch, seq, text, None if ctl is None else json.loads(ctl), t0) for ch, seq, text, ctl, t0 in rows]

    # -- dead letters (see webapp_stub.handoff) ----------------------------------------------
    _DL_COLS = "channel, seq, reason, detail, refusals, state, redrives, parked_at, updated_at"

    def event(self, channel: str, seq: int) -> Event | None:
        """One stored event, or None."""
        row = self.conn.execute(
            "SELECT json, ctl, created_at FROM events WHERE channel = ? AND seq = ?", (channel, seq)
        ).fetchone()
        if row is None:
            return None
        return Event(channel, seq, row[0], None if row[1] is None else json.loads(row[1]), row[2])

    def park_event(self, event: Event, reason: str, detail: str, refusals: int) -> None:
        """Record ``event`` as refused for good (state ``parked``); a re-park keeps its redrive count."""
        now = self.clock()
        with self.transaction() as db:
            db.execute(
                f"INSERT INTO dead_letters ({self._DL_COLS}) VALUES (?, ?, ?, ?, ?, 'parked', 0, ?, ?) "
                "ON CONFLICT (channel, seq) DO UPDATE SET reason = excluded.reason, detail = excluded.detail, "
                "refusals = dead_letters.refusals + excluded.refusals, state = 'parked', "
                "updated_at = excluded.updated_at",
                (event.channel, event.seq, reason, detail[:500], refusals, now, now),
            )

    def dead_letters(self, states: tuple[str, ...] = ("parked", "redrive", "redriving")) -> list[DeadLetter]:
        """Dead letters in the given states, oldest first."""
        marks = ",".join("?" * len(states))
        rows = self.conn.execute(
            f"SELECT {self._DL_COLS} FROM dead_letters WHERE state IN ({marks}) ORDER BY parked_at, channel, seq",
            states,
        ).fetchall()
        return [DeadLetter(*row) for row in rows]

    def dead_letter(self, channel: str, seq: int) -> DeadLetter | None:
        row = self.conn.execute(
            f"SELECT {self._DL_COLS} FROM dead_letters WHERE channel = ? AND seq = ?", (channel, seq)
        ).fetchone()
        return DeadLetter(*row) if row else None

    def request_redrive(self, channel: str, seq: int) -> DeadLetter | None:
        """Operator: send a parked dead letter again (state ``redrive``). None if there is no
        such dead letter; the row unchanged if it is not ``parked``."""
        with self.transaction() as db:
            db.execute(
                "UPDATE dead_letters SET state = 'redrive', updated_at = ? "
                "WHERE channel = ? AND seq = ? AND state = 'parked'",
                (self.clock(), channel, seq),
            )
        return self.dead_letter(channel, seq)

    def take_redrives(self) -> list[Event]:
        """The events an operator asked to redrive, now marked ``redriving`` (the webapp's
        dead-letter loop puts them back in the outbox). A request whose event is gone is
        marked delivered (nothing left to send)."""
        wanted = self.conn.execute("SELECT channel, seq FROM dead_letters WHERE state = 'redrive'").fetchall()
        if not wanted:
            return []
        events = []
        with self.transaction() as db:
            for channel, seq in wanted:
                event = self.event(channel, seq)
                state = "redriving" if event is not None else "delivered"
                db.execute(
                    "UPDATE dead_letters SET state = ?, redrives = redrives + 1, updated_at = ? "
                    "WHERE channel = ? AND seq = ?",
                    (state, self.clock(), channel, seq),
                )
                if event is not None:
                    events.append(event)
        return events

    def resume_redrives(self) -> int:
        """At start: redrives that were in the outbox when the last run stopped are asked for
        again (state ``redrive``), since restart replay skips dead letters. Returns how many."""
        with self.transaction() as db:
            return int(
                db.execute(
                    "UPDATE dead_letters SET state = 'redrive', redrives = redrives - 1 WHERE state = 'redriving'"
                ).rowcount
            )

    def resolve_dead_letter(self, channel: str, seq: int) -> None:
        """A redriven dead letter was acknowledged by an Admin Server: state ``delivered``."""
        with self.transaction() as db:
            db.execute(
                "UPDATE dead_letters SET state = 'delivered', updated_at = ? WHERE channel = ? AND seq = ?",
                (self.clock(), channel, seq),
            )

    def parked_count(self) -> int:
        """Dead letters not delivered (parked or on their way back)."""
        return int(self.conn.execute("SELECT count(*) FROM dead_letters WHERE state != 'delivered'").fetchone()[0])

    def get_mark(self, name: str) -> float | None:
        row = self.conn.execute("SELECT value FROM marks WHERE name = ?", (name,)).fetchone()
        return float(row[0]) if row else None

    def set_mark(self, name: str, value: float) -> None:
        self.conn.execute(
            "INSERT INTO marks (name, value) VALUES (?, ?) ON CONFLICT (name) DO UPDATE SET value = excluded.value",
            (name, value),
        )

    # -- teams, users, tokens -----------------------------------------------------------
    def create_team(self, name: str, domain: str) -> Team:
        team = Team(new_id("T"), name, domain)
        with self.transaction() as db:
            db.execute("INSERT INTO teams (id, name, domain) VALUES (?, ?, ?)", (team.id, team.name, team.domain))
        return team

    def first_team(self) -> Team | None:
        row = self.conn.execute("SELECT id, name, domain FROM teams ORDER BY rowid LIMIT 1").fetchone()
        return Team(*row) if row else None

    def team(self, team_id: str) -> Team | None:
        row = self.conn.execute("SELECT id, name, domain FROM teams WHERE id = ?", (team_id,)).fetchone()
        return Team(*row) if row else None

    def create_user(self, team: str, name: str, *, real_name: str = "", is_bot: bool = False) -> tuple[User, str]:
        """A user (or bot user, with a ``B…`` bot id) and a token for it."""
        user = User(new_id("U"), team, name, real_name or name, is_bot, new_id("B") if is_bot else None)
        token = new_token("xoxb" if is_bot else "xoxp")
        with self.transaction() as db:
            db.execute(
                "INSERT INTO users (id, team, name, real_name, is_bot, bot_id) VALUES (?, ?, ?, ?, ?, ?)",
                (user.id, user.team, user.name, user.real_name, int(user.is_bot), user.bot_id),
            )
            db.execute("INSERT INTO tokens (token, user) VALUES (?, ?)", (token, user.id))
        return user, token

    _USER_COLS = "id, team, name, real_name, is_bot, bot_id, presence"

    @staticmethod
    def _user(row: tuple[Any, ...]) -> User:
        return User(row[0], row[1], row[2], row[3], bool(row[4]), row[5], row[6])

    def user(self, user_id: str) -> User | None:
        row = self.conn.execute(f"SELECT {self._USER_COLS} FROM users WHERE id = ?", (user_id,)).fetchone()
        return self._user(row) if row else None

    def bot(self, bot_id: str) -> User | None:
        """The bot user whose bot id (``B…``) is ``bot_id``, or None."""
        row = self.conn.execute(f"SELECT {self._USER_COLS} FROM users WHERE bot_id = ?", (bot_id,)).fetchone()
        return self._user(row) if row else None

    def set_presence(self, user: User, presence: str) -> list[Event]:
        """users.setPresence: ``auto`` or ``away``. A change emits ``manual_presence_change``
        on the user's channel (to all of that user's connections). Raises ``invalid_presence``."""
        if presence not in PRESENCES:
            raise ApiError("invalid_presence")
        with self.transaction() as db:
            row = db.execute("SELECT presence FROM users WHERE id = ?", (user.id,)).fetchone()
            if row is None:
                raise ApiError("user_not_found")
            if row[0] == presence:
                return []
            db.execute("UPDATE users SET presence = ? WHERE id = ?", (presence, user.id))
            shown = "away" if presence == "away" else "active"
            return [self._append_event(user.id, {"type": "manual_presence_change", "presence": shown})]

    def manual_away_users(self) -> list[str]:
        """Ids of every user set ``away`` by hand (re-sent to a presence server that starts empty)."""
        return [row[0] for row in self.conn.execute("SELECT id FROM users WHERE presence = 'away'")]

    def auth(self, token: str) -> User | None:
        """The user a token belongs to, or None."""
        row = self.conn.execute(
            f"SELECT {self._USER_COLS} FROM users WHERE id = (SELECT user FROM tokens WHERE token = ?)", (token,)
        ).fetchone()
        return self._user(row) if row else None

    def list_users(self, team: str, *, limit: int = DEFAULT_PAGE, cursor: str | None = None) -> Page:
        after = _int_cursor(cursor, "user") or 0
        rows = self.conn.execute(
            f"SELECT rowid, {self._USER_COLS} FROM users WHERE team = ? AND rowid > ? ORDER BY rowid LIMIT ?",
            (team, after, limit + 1),
        ).fetchall()
        more = len(rows) > limit
        rows = rows[:limit]
        return Page([self._user(r[1:]) for r in rows], encode_cursor("user", rows[-1][0]) if more else "")

    # -- channels -------------------------------------------------------------------------
    _CHANNEL_COLS = "id, team, name, created, creator, is_private, is_archived, kind"

    @staticmethod
    def _channel(row: tuple[Any, ...]) -> Channel:
        return Channel(row[0], row[1], row[2], int(row[3]), row[4], bool(row[5]), bool(row[6]), row[7])

    def channel(self, channel_id: str) -> Channel | None:
        row = self.conn.execute(f"SELECT {self._CHANNEL_COLS} FROM channels WHERE id = ?", (channel_id,)).fetchone()
        return self._channel(row) if row else None

    def channel_by_name(self, team: str, name: str) -> Channel | None:
        row = self.conn.execute(
            f"SELECT {self._CHANNEL_COLS} FROM channels WHERE team = ? AND name = ? AND kind = 'channel'", (team, name)
        ).fetchone()
        return self._channel(row) if row else None

    def memberships(self, user: str, channels: list[str]) -> set[str]:
        """Which of ``channels`` ``user`` is a member of."""
        if not channels:
            return set()
        marks = ",".join("?" * len(channels))
        rows = self.conn.execute(
            f"SELECT channel FROM members WHERE user = ? AND channel IN ({marks})", (user, *channels)
        ).fetchall()
        return {r[0] for r in rows}

    def is_member(self, channel: str, user: str) -> bool:
        return (
            self.conn.execute("SELECT 1 FROM members WHERE channel = ? AND user = ?", (channel, user)).fetchone()
            is not None
        )

    def member_count(self, channel: str) -> int:
        return int(self.conn.execute("SELECT count(*) FROM members WHERE channel = ?", (channel,)).fetchone()[0])

    def dm_peer(self, channel: Channel, viewer: str) -> str:
        """The other member of a direct message (``viewer`` itself for a self-DM)."""
        row = self.conn.execute(
            "SELECT user FROM members WHERE channel = ? AND user != ? LIMIT 1", (channel.id, viewer)
        ).fetchone()
        return str(row[0]) if row else viewer

    def visible_channel(self, channel_id: str, user: User) -> Channel:
        """The channel if ``user`` may see it (same team; private only for members); else ``channel_not_found``."""
        channel = self.channel(channel_id) if isinstance(channel_id, str) and channel_id else None
        if channel is None or channel.team != user.team:
            raise ApiError("channel_not_found")
        if channel.is_private and not self.is_member(channel.id, user.id):
            raise ApiError("channel_not_found")
        return channel

    def create_channel(self, user: User, name: object, *, is_private: bool = False) -> tuple[Channel, list[Event]]:
        """Create ``#name`` with ``user`` as creator and first member.

        Events, in commit order: ``channel_created`` on the team channel
        (public channels only), then the join events of :meth:`join_channel`.
        Raises ``invalid_name_specials``/``invalid_name_required``/``name_taken``.
        """
        name = validate_channel_name(name)
        now = int(self.clock())
        channel = Channel(new_id("C"), user.team, name, now, user.id, is_private, False)
        with self.transaction() as db:
            try:
                db.execute(
                    f"INSERT INTO channels ({self._CHANNEL_COLS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                    (channel.id, channel.team, name, now, user.id, int(is_private), 0, channel.kind),
                )
            except sqlite3.IntegrityError:
                raise ApiError("name_taken") from None
            events = []
            if not is_private:
                events.append(
                    self._append_event(
                        user.team,
                        {
                            "type": "channel_created",
                            "channel": {"id": channel.id, "name": name, "created": now, "creator": user.id},
                        },
                    )
                )
            events += self._join(channel, user)
        return channel, events

    def join_channel(self, channel: Channel, user: User) -> tuple[bool, list[Event]]:
        """Add ``user`` to ``channel``; returns (already_in, events). Raises ``is_archived``."""
        if channel.is_archived:
            raise ApiError("is_archived")
        with self.transaction():
            if self.is_member(channel.id, user.id):
                return True, []
            events = self._join(channel, user)
        return False, events

    def invite(self, channel: Channel, inviter: User, users: list[User]) -> list[Event]:
        """conversations.invite: add ``users`` (the ones not yet in) on ``inviter``'s behalf.

        Raises ``method_not_supported_for_channel_type`` (DMs), ``is_archived``,
        ``not_in_channel`` (the inviter), ``cant_invite_self``,
        ``already_in_channel`` (every invitee is a member already).
        """
        if channel.kind != "channel":
            raise ApiError("method_not_supported_for_channel_type")
        if channel.is_archived:
            raise ApiError("is_archived")
        if any(u.id == inviter.id for u in users):
            raise ApiError("cant_invite_self")
        with self.transaction():
            if not self.is_member(channel.id, inviter.id):
                raise ApiError("not_in_channel")
            new = [u for u in dict((u.id, u) for u in users).values() if not self.is_member(channel.id, u.id)]
            if not new:
                raise ApiError("already_in_channel")
            events: list[Event] = []
            for user in new:
                events += self._join(channel, user, inviter=inviter)
        return events

    def leave_channel(self, channel: Channel, user: User) -> tuple[bool, list[Event]]:
        """conversations.leave: returns (was_not_in, events).

        Raises ``method_not_supported_for_channel_type`` (direct messages) and
        ``cant_leave_general``.
        """
        if channel.is_im:
            raise ApiError("method_not_supported_for_channel_type")
        if channel.is_general:
            raise ApiError("cant_leave_general")
        with self.transaction():
            if not self.is_member(channel.id, user.id):
                return True, []
            events = self._leave(channel, user)
        return False, events

    def kick(self, channel: Channel, kicker: User, target: User) -> list[Event]:
        """conversations.kick: remove ``target``. Raises ``method_not_supported_for_channel_type``,
        ``cant_kick_self``, ``cant_kick_from_general``, ``not_in_channel`` (the target)."""
        if channel.kind != "channel":
            raise ApiError("method_not_supported_for_channel_type")
        if target.id == kicker.id:
            raise ApiError("cant_kick_self")
        if channel.is_general:
            raise ApiError("cant_kick_from_general")
        with self.transaction():
            if not self.is_member(channel.id, target.id):
                raise ApiError("not_in_channel")
            return self._leave(channel, target, actor=kicker)

    def rename_channel(self, channel: Channel, user: User, name: Any) -> tuple[Channel, list[Event]]:
        """conversations.rename: ``channel_rename`` to the team (public) or ``group_rename``
        to the channel (private). Raises ``method_not_supported_for_channel_type``,
        ``not_in_channel``, ``is_archived``, ``name_taken``, ``invalid_name_*``."""
        if channel.kind != "channel":
            raise ApiError("method_not_supported_for_channel_type")
        if channel.is_archived:
            raise ApiError("is_archived")
        name = validate_channel_name(name)
        with self.transaction() as db:
            if not self.is_member(channel.id, user.id):
                raise ApiError("not_in_channel")
            try:
                db.execute("UPDATE channels SET name = ? WHERE id = ?", (name, channel.id))
            except sqlite3.IntegrityError:
                raise ApiError("name_taken") from None
            renamed = replace(channel, name=name)
            info = {
                "id": channel.id,
                "name": name,
                "name_normalized": name,
                "created": channel.created,
                "is_channel": not channel.is_private,
                "is_mpim": False,
            }
            if channel.is_private:
                event = self._append_event(channel.id, {"type": "group_rename", "channel": info})
            else:
                event = self._append_event(channel.team, {"type": "channel_rename", "channel": info})
        return renamed, [event]

    def archive_channel(self, channel: Channel, user: User, archived: bool = True) -> list[Event]:
        """conversations.archive (or, with ``archived=False``, .unarchive).

        ``channel_archive``/``channel_unarchive`` go to the team for a public
        channel, ``group_archive``/``group_unarchive`` to the channel for a
        private one. Raises ``method_not_supported_for_channel_type``,
        ``cant_archive_general``, ``already_archived``/``not_archived``, ``not_in_channel``.
        """
        if channel.kind != "channel":
            raise ApiError("method_not_supported_for_channel_type")
        if channel.is_general:
            raise ApiError("cant_archive_general")
        if channel.is_archived == archived:
            raise ApiError("already_archived" if archived else "not_archived")
        with self.transaction() as db:
            if not self.is_member(channel.id, user.id):
                raise ApiError("not_in_channel")
            db.execute("UPDATE channels SET is_archived = ? WHERE id = ?", (int(archived), channel.id))
            kind = ("group_" if channel.is_private else "channel_") + ("archive" if archived else "unarchive")
            payload = {"type": kind, "channel": channel.id, "user": user.id}
            event = self._append_event(channel.id if channel.is_private else channel.team, payload)
        return [event]

    def open_dm(self, user: User, others: list[User]) -> tuple[Channel, bool, list[Event]]:
        """conversations.open: the direct message (``D…``) between ``user`` and one other
        (or with itself), or the group DM (``G…``) with several; created on first use.

        Returns (channel, already_open, events). A new DM emits ``im_created``
        (``mpim_joined`` for a group) on each member's user channel with
        ``ctl = {"join": D, "since": 0}``, so their open connections follow it
        at once. Raises ``too_many_users``.
        """
        members = sorted({user.id, *(o.id for o in others)})
        if len(members) - 1 > MAX_DM_OTHERS:
            raise ApiError("too_many_users")
        key = ",".join(members)
        kind = "im" if len(members) <= 2 else "mpim"
        with self.transaction() as db:
            row = db.execute(
                f"SELECT {self._CHANNEL_COLS} FROM channels WHERE team = ? AND dm_key = ?", (user.team, key)
            ).fetchone()
            if row is not None:
                return self._channel(row), True, []
            now = int(self.clock())
            cid = new_id("D" if kind == "im" else "G")
            if kind == "im":
                name = cid
            else:
                by_id = {o.id: o.name for o in (user, *others)}
                name = "mpdm-" + "--".join(by_id[m] for m in members) + "-1"
            channel = Channel(cid, user.team, name, now, user.id, True, False, kind)
            try:
                db.execute(
                    f"INSERT INTO channels ({self._CHANNEL_COLS}, dm_key) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (cid, user.team, name, now, user.id, 1, 0, kind, key),
                )
            except sqlite3.IntegrityError:  # an mpim name that a channel already took
                name = f"{name}-{cid.lower()}"
                channel = replace(channel, name=name)
                db.execute(
                    f"INSERT INTO channels ({self._CHANNEL_COLS}, dm_key) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (cid, user.team, name, now, user.id, 1, 0, kind, key),
                )
            db.executemany("INSERT INTO members (channel, user) VALUES (?, ?)", [(cid, m) for m in members])
            events = []
            for member in members:
                if kind == "im":
                    peer = next((m for m in members if m != member), member)
                    payload = {"type": "im_created", "user": peer, "channel": channel.to_api(user=peer, is_open=True)}
                else:
                    payload = {"type": "mpim_joined", "channel": channel.to_api(is_member=True)}
                events.append(self._append_event(member, payload, ctl={"join": cid, "since": 0}))
        return channel, False, events

    def _join(self, channel: Channel, user: User, inviter: User | None = None) -> list[Event]:
        """Membership row, ``member_joined_channel`` on the channel, ``channel_joined``
        (``group_joined`` if private) on the user.

        The user-channel event carries ``ctl = {"join": C, "since": seq}`` where
        ``seq`` is the channel's last seq after its ``member_joined_channel``:
        gateways subscribe that user's connections to C from there, at once.
        """
        self.conn.execute("INSERT INTO members (channel, user) VALUES (?, ?)", (channel.id, user.id))
        payload = {
            "type": "member_joined_channel",
            "user": user.id,
            "channel": channel.id,
            "channel_type": channel.channel_type,
            "team": user.team,
        }
        if inviter is not None:
            payload["inviter"] = inviter.id
        joined = self._append_event(channel.id, payload)
        info = channel.to_api(is_member=True)
        kind = "group_joined" if channel.is_private else "channel_joined"
        own = self._append_event(
            user.id, {"type": kind, "channel": info}, ctl={"join": channel.id, "since": joined.seq}
        )
        return [joined, own]

    def _leave(self, channel: Channel, user: User, actor: User | None = None) -> list[Event]:
        """Membership row gone, ``member_left_channel`` on the channel, ``channel_left``
        (``group_left`` if private; with ``actor_id`` when kicked) on the user with
        ``ctl = {"leave": C}``: gateways stop that user's connections receiving C."""
        self.conn.execute("DELETE FROM members WHERE channel = ? AND user = ?", (channel.id, user.id))
        left = self._append_event(
            channel.id,
            {
                "type": "member_left_channel",
                "user": user.id,
                "channel": channel.id,
                "channel_type": channel.channel_type,
                "team": user.team,
            },
        )
        payload: dict[str, Any] = {
            "type": "group_left" if channel.is_private else "channel_left",
            "channel": channel.id,
        }
        if actor is not None and actor.id != user.id:
            payload["actor_id"] = actor.id
        own = self._append_event(user.id, payload, ctl={"leave": channel.id})
        return [left, own]

    def list_conversations(
        self,
        viewer: User,
        *,
        types: set[str],
        member_of: str | None = None,
        limit: int = DEFAULT_PAGE,
        cursor: str | None = None,
        exclude_archived: bool = False,
    ) -> Page:
        """The conversations of ``viewer``'s team it may see, of the given ``types``
        (``public_channel``, ``private_channel``, ``mpim``, ``im``), in creation order;
        with ``member_of``, only those that user is in (users.conversations)."""
        after = _int_cursor(cursor, "channel") or 0
        mine = "EXISTS (SELECT 1 FROM members m WHERE m.channel = c.id AND m.user = ?)"
        kinds: list[str] = []
        params: list[Any] = [viewer.team, after]
        if "public_channel" in types:
            kinds.append("(c.kind = 'channel' AND c.is_private = 0)")
        for name, where in (
            ("private_channel", "c.kind = 'channel' AND c.is_private = 1"),
            ("mpim", "c.kind = 'mpim'"),
            ("im", "c.kind = 'im'"),
        ):
            if name in types:
                kinds.append(f"({where} AND {mine})")
                params.append(viewer.id)
        if not kinds:
            return Page([], "")
        where = "c.team = ? AND c.rowid > ? AND (" + " OR ".join(kinds) + ")"
        if member_of is not None:
            where += " AND EXISTS (SELECT 1 FROM members m2 WHERE m2.channel = c.id AND m2.user = ?)"
            params.append(member_of)
        if exclude_archived:
            where += " AND c.is_archived = 0"
        rows = self.conn.execute(
            f"SELECT c.rowid, {', '.join('c.' + col.strip() for col in self._CHANNEL_COLS.split(','))} "
            f"FROM channels c WHERE {where} ORDER BY c.rowid LIMIT ?",
            (*params, limit + 1),
        ).fetchall()
        more = len(rows) > limit
        rows = rows[:limit]
        return Page([self._channel(r[1:]) for r in rows], encode_cursor("channel", rows[-1][0]) if more else "")

    def list_channels(
        self,
        user: User,
        *,
        limit: int = DEFAULT_PAGE,
        cursor: str | None = None,
        exclude_archived: bool = False,
        public: bool = True,
        private: bool = False,
    ) -> Page:
        """The team's public channels and, if asked, the private ones ``user`` is in; creation order."""
        types = {t for t, on in (("public_channel", public), ("private_channel", private)) if on}
        return self.list_conversations(user, types=types, limit=limit, cursor=cursor, exclude_archived=exclude_archived)

    def list_members(self, channel: str, *, limit: int = DEFAULT_PAGE, cursor: str | None = None) -> Page:
        after = decode_cursor(cursor, "member") or ""
        rows = self.conn.execute(
            "SELECT user FROM members WHERE channel = ? AND user > ? ORDER BY user LIMIT ?",
            (channel, after, limit + 1),
        ).fetchall()
        more = len(rows) > limit
        users = [r[0] for r in rows[:limit]]
        return Page(users, encode_cursor("member", users[-1]) if more else "")

    def bootstrap(self, user_id: str, resume: dict[str, int] | None = None) -> dict[str, Any] | None:
        """What a gateway needs to connect ``user_id``: self, team, and every channel with its last seq.

        The channels are the user's conversations plus the user's own channel
        and the team channel, each with its current ``last_seq`` (0 if none).
        With ``resume`` (channel -> the last seq a moved connection delivered),
        those channels start at the recorded seq instead (never above the
        latest), so the gateway replays what the connection missed.
        """
        user = self.user(user_id)
        if user is None:
            return None
        team = self.team(user.team)
        rows = self.conn.execute(
            "SELECT m.channel, coalesce(s.last_seq, 0) FROM members m "
            "LEFT JOIN channel_seq s ON s.channel = m.channel WHERE m.user = ?",
            (user.id,),
        ).fetchall()
        seqs: list[tuple[str, int]] = [(user.id, self.last_seq(user.id)), (user.team, self.last_seq(user.team))]
        seqs += [(ch, int(seq)) for ch, seq in rows]
        if resume:
            for i, (channel, seq) in enumerate(seqs):
                recorded = resume.get(channel)
                if recorded is not None:
                    seqs[i] = (channel, max(0, min(int(recorded), seq)))
        channels = [{"id": channel, "seq": seq} for channel, seq in seqs]
        return {
            "user": {"id": user.id, "name": user.name},
            "team": team.to_api() if team else {"id": user.team, "name": user.team, "domain": user.team.lower()},
            "channels": channels,
        }

    # -- messages ------------------------------------------------------------------------
    _MSG_COLS = "ts_us, ts, user, team, text, thread_ts, bot_id, extra, subtype, edited_user, edited_ts"

    def post_message(
        self,
        channel: Channel,
        user: User,
        text: str,
        *,
        thread_ts: str | None = None,
        broadcast: bool = False,
        extra: dict[str, Any] | None = None,
    ) -> tuple[dict[str, Any], Event]:
        """Persist a message and its ``message`` event (one transaction).

        A reply (``thread_ts``) joins the root's thread (a reply to a reply
        joins the same thread) and makes the root a thread parent; with
        ``broadcast`` it is also shown in the channel (subtype
        ``thread_broadcast``). Returns the message as history shows it and the
        event. Raises ``not_in_channel``, ``is_archived``, ``msg_too_long``,
        ``invalid_thread_ts``, ``thread_not_found``.
        """
        if len(text) > MAX_TEXT_CHARS:
            raise ApiError("msg_too_long")
        if channel.is_archived:
            raise ApiError("is_archived")
        if thread_ts is not None:
            try:
                thread_ts = us_to_ts(ts_to_us(thread_ts))
            except ValueError:
                raise ApiError("invalid_thread_ts") from None
        with self.transaction() as db:
            if not self.is_member(channel.id, user.id):
                raise ApiError("not_in_channel")
            if thread_ts is not None:
                parent_us = ts_to_us(thread_ts)
                parent = db.execute(
                    "SELECT thread_ts FROM messages WHERE channel = ? AND ts_us = ?", (channel.id, parent_us)
                ).fetchone()
                if parent is None:
                    raise ApiError("thread_not_found")
                if parent[0] is None:  # the first reply makes the parent a thread root
                    db.execute(
                        "UPDATE messages SET thread_ts = ts WHERE channel = ? AND ts_us = ?", (channel.id, parent_us)
                    )
                thread_ts = parent[0] or thread_ts  # a reply to a reply joins the parent's thread
            subtype = "thread_broadcast" if broadcast and thread_ts is not None else None
            seq, ts_us = self._next_seq(channel.id, with_ts=True)
            ts = us_to_ts(ts_us)
            message = _message_obj(user.id, user.team, text, ts, thread_ts, user.bot_id, extra, subtype)
            payload = {"type": "message", "channel": channel.id, **{k: v for k, v in message.items() if k != "type"}}
            payload["event_ts"] = ts
            db.execute(
                f"INSERT INTO messages (channel, seq, {self._MSG_COLS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    channel.id,
                    seq,
                    ts_us,
                    ts,
                    user.id,
                    user.team,
                    text,
                    thread_ts,
                    user.bot_id,
                    dumps(extra) if extra else None,
                    subtype,
                    None,
                    None,
                ),
            )
            event = self._append_event(channel.id, payload, seq=seq)
        return message, event

    def _find_message(self, channel: str, ts: Any) -> tuple[Any, ...]:
        """The message row at ``ts``. Raises ``invalid_arguments`` (no ts),
        ``invalid_ts`` (not a Slack ts) or ``message_not_found``."""
        if ts is None or ts == "":
            raise ApiError("invalid_arguments")
        try:
            ts_us = ts_to_us(str(ts))
        except ValueError:
            raise ApiError("invalid_ts") from None
        row = self.conn.execute(
            f"SELECT {self._MSG_COLS} FROM messages WHERE channel = ? AND ts_us = ?", (channel, ts_us)
        ).fetchone()
        if row is None:
            raise ApiError("message_not_found")
        return tuple(row)

    def message(self, channel: str, ts: Any) -> dict[str, Any]:
        """One message with its reactions and thread summary (reactions.get)."""
        return self._decorate(channel, [self._find_message(channel, ts)])[0]

    def update_message(
        self, channel: Channel, user: User, ts: Any, text: str, *, extra: dict[str, Any] | None = None
    ) -> tuple[dict[str, Any], Event]:
        """chat.update: new text (and blocks/attachments, if given) for the author's message.

        Emits ``message`` / ``message_changed`` (hidden) with the edited message
        and the previous one. Raises ``invalid_ts``, ``message_not_found``,
        ``cant_update_message`` (not the author), ``msg_too_long``, ``is_archived``.
        """
        if len(text) > MAX_TEXT_CHARS:
            raise ApiError("msg_too_long")
        if channel.is_archived:
            raise ApiError("is_archived")
        with self.transaction() as db:
            row = self._find_message(channel.id, ts)
            if row[2] != user.id:
                raise ApiError("cant_update_message")
            previous = _message_row(row)
            seq, event_us = self._next_seq(channel.id, with_ts=True)
            event_ts = us_to_ts(event_us)
            kept = json.loads(row[7]) if row[7] else None
            new_extra = extra if extra else kept
            db.execute(
                "UPDATE messages SET text = ?, extra = ?, edited_user = ?, edited_ts = ? WHERE channel = ? AND ts_us = ?",
                (text, dumps(new_extra) if new_extra else None, user.id, event_ts, channel.id, row[0]),
            )
            message = _message_row(
                (*row[:4], text, row[5], row[6], dumps(new_extra) if new_extra else None, row[8], user.id, event_ts)
            )
            payload = {
                "type": "message",
                "subtype": "message_changed",
                "hidden": True,
                "channel": channel.id,
                "ts": event_ts,
                "message": message,
                "previous_message": previous,
                "event_ts": event_ts,
            }
            event = self._append_event(channel.id, payload, seq=seq)
        return message, event

    def delete_message(self, channel: Channel, user: User, ts: Any) -> tuple[str, Event]:
        """chat.delete: the author deletes a message (and its reactions).

        Emits ``message`` / ``message_deleted`` (hidden). Returns the deleted
        message's ts and the event. Raises ``invalid_ts``, ``message_not_found``,
        ``cant_delete_message`` (not the author).
        """
        with self.transaction() as db:
            row = self._find_message(channel.id, ts)
            if row[2] != user.id:
                raise ApiError("cant_delete_message")
            seq, event_us = self._next_seq(channel.id, with_ts=True)
            event_ts = us_to_ts(event_us)
            db.execute("DELETE FROM messages WHERE channel = ? AND ts_us = ?", (channel.id, row[0]))
            db.execute("DELETE FROM reactions WHERE channel = ? AND ts_us = ?", (channel.id, row[0]))
            payload = {
                "type": "message",
                "subtype": "message_deleted",
                "hidden": True,
                "channel": channel.id,
                "ts": event_ts,
                "deleted_ts": row[1],
                "previous_message": _message_row(row),
                "event_ts": event_ts,
            }
            event = self._append_event(channel.id, payload, seq=seq)
        return str(row[1]), event

    def post_ephemeral(self, channel: Channel, sender: User, target: User, text: str) -> tuple[str, Event]:
        """chat.postEphemeral: a message only ``target`` sees, never stored in history.

        It is an event on the target's user channel (so it reaches every one of
        their connections, in order, and survives a gateway move) shaped as a
        ``message`` with ``is_ephemeral``. Returns its ts and the event. Raises
        ``msg_too_long``, ``is_archived``, ``not_in_channel`` (the sender),
        ``user_not_in_channel`` (the target).
        """
        if len(text) > MAX_TEXT_CHARS:
            raise ApiError("msg_too_long")
        if channel.is_archived:
            raise ApiError("is_archived")
        with self.transaction():
            if not self.is_member(channel.id, sender.id):
                raise ApiError("not_in_channel")
            if not self.is_member(channel.id, target.id):
                raise ApiError("user_not_in_channel")
            seq, ts_us = self._next_seq(target.id, with_ts=True)
            ts = us_to_ts(ts_us)
            payload: dict[str, Any] = {
                "type": "message",
                "is_ephemeral": True,
                "channel": channel.id,
                "user": sender.id,
                "text": text,
                "ts": ts,
                "team": sender.team,
                "event_ts": ts,
            }
            if sender.bot_id:
                payload["bot_id"] = sender.bot_id
            event = self._append_event(target.id, payload, seq=seq)
        return ts, event

    # -- reactions ---------------------------------------------------------------------------
    def add_reaction(self, channel: Channel, user: User, ts: Any, name: Any) -> Event:
        """reactions.add: emits ``reaction_added`` on the channel. Raises ``invalid_name``,
        ``is_archived``, ``invalid_ts``, ``message_not_found``, ``already_reacted``."""
        name = validate_reaction_name(name)
        if channel.is_archived:
            raise ApiError("is_archived")
        with self.transaction() as db:
            row = self._find_message(channel.id, ts)
            try:
                db.execute(
                    "INSERT INTO reactions (channel, ts_us, name, user) VALUES (?, ?, ?, ?)",
                    (channel.id, row[0], name, user.id),
                )
            except sqlite3.IntegrityError:
                raise ApiError("already_reacted") from None
            return self._reaction_event(channel, user, row, name, "reaction_added")

    def remove_reaction(self, channel: Channel, user: User, ts: Any, name: Any) -> Event:
        """reactions.remove: emits ``reaction_removed``. Raises ``invalid_name``,
        ``invalid_ts``, ``message_not_found``, ``no_reaction``."""
        name = validate_reaction_name(name)
        with self.transaction() as db:
            row = self._find_message(channel.id, ts)
            gone = db.execute(
                "DELETE FROM reactions WHERE channel = ? AND ts_us = ? AND name = ? AND user = ?",
                (channel.id, row[0], name, user.id),
            ).rowcount
            if not gone:
                raise ApiError("no_reaction")
            return self._reaction_event(channel, user, row, name, "reaction_removed")

    def _reaction_event(self, channel: Channel, user: User, row: tuple[Any, ...], name: str, kind: str) -> Event:
        seq, event_us = self._next_seq(channel.id, with_ts=True)
        payload = {
            "type": kind,
            "user": user.id,
            "reaction": name,
            "item_user": row[2],
            "item": {"type": "message", "channel": channel.id, "ts": row[1]},
            "event_ts": us_to_ts(event_us),
        }
        return self._append_event(channel.id, payload, seq=seq)

    # -- reading ---------------------------------------------------------------------------
    def history(
        self,
        channel: str,
        *,
        limit: int = DEFAULT_HISTORY_PAGE,
        cursor: str | None = None,
        oldest: str | None = None,
        latest: str | None = None,
        inclusive: bool = False,
    ) -> tuple[list[dict[str, Any]], bool, str]:
        """Top-level messages newest first: (messages, has_more, next_cursor).

        ``oldest``/``latest`` bound the range (exclusive unless ``inclusive``);
        the cursor continues below the last message of the previous page.
        Thread replies are left out, as in Slack (see :meth:`replies`), except
        those broadcast to the channel. Thread parents carry ``reply_count``,
        ``reply_users``, ``latest_reply``; reacted messages ``reactions``.
        """
        try:
            low = ts_to_us(oldest) if oldest not in (None, "") else None
            high = ts_to_us(latest) if latest not in (None, "") else None
        except ValueError:
            raise ApiError("invalid_ts_latest" if latest and not _is_ts(latest) else "invalid_ts_oldest") from None
        below = _int_cursor(cursor, "ts")
        where = ["channel = ?", "(thread_ts IS NULL OR thread_ts = ts OR subtype = 'thread_broadcast')"]
        params: list[Any] = [channel]
        if low is not None:
            where.append("ts_us >= ?" if inclusive else "ts_us > ?")
            params.append(low)
        if high is not None:
            where.append("ts_us <= ?" if inclusive else "ts_us < ?")
            params.append(high)
        if below is not None:
            where.append("ts_us < ?")
            params.append(below)
        rows = self.conn.execute(
            f"SELECT {self._MSG_COLS} FROM messages WHERE {' AND '.join(where)} ORDER BY ts_us DESC LIMIT ?",
            (*params, limit + 1),
        ).fetchall()
        more = len(rows) > limit
        rows = rows[:limit]
        return self._decorate(channel, rows), more, encode_cursor("ts", rows[-1][0]) if more else ""

    def replies(
        self, channel: str, ts: str, *, limit: int = DEFAULT_HISTORY_PAGE, cursor: str | None = None
    ) -> tuple[list[dict[str, Any]], bool, str]:
        """A thread, oldest first: the parent then its replies. Raises ``thread_not_found``."""
        try:
            parent_us = ts_to_us(ts)
        except ValueError:
            raise ApiError("thread_not_found") from None
        parent = self.conn.execute(
            f"SELECT {self._MSG_COLS} FROM messages WHERE channel = ? AND ts_us = ?", (channel, parent_us)
        ).fetchone()
        if parent is None:
            raise ApiError("thread_not_found")
        root = parent[5] or parent[1]
        after = _int_cursor(cursor, "ts")
        rows = self.conn.execute(
            f"SELECT {self._MSG_COLS} FROM messages "
            "WHERE channel = ? AND (ts = ? OR thread_ts = ?) AND ts_us > ? ORDER BY ts_us LIMIT ?",
            (channel, root, root, -1 if after is None else after, limit + 1),
        ).fetchall()
        more = len(rows) > limit
        rows = rows[:limit]
        return self._decorate(channel, rows), more, encode_cursor("ts", rows[-1][0]) if more else ""

    def _decorate(self, channel: str, rows: list[Any]) -> list[dict[str, Any]]:
        """Message objects with Slack's thread summary on parents and ``reactions``."""
        messages = [_message_row(r) for r in rows]
        if not messages:
            return messages
        roots = [m["ts"] for m in messages if m.get("thread_ts") == m["ts"]]
        if roots:
            marks = ",".join("?" * len(roots))
            summary: dict[str, list[tuple[str, str]]] = {}
            for thread_ts, user, ts in self.conn.execute(
                f"SELECT thread_ts, user, ts FROM messages WHERE channel = ? AND thread_ts IN ({marks}) "
                "AND ts != thread_ts ORDER BY ts_us",
                (channel, *roots),
            ):
                summary.setdefault(thread_ts, []).append((user, ts))
            for message in messages:
                replies = summary.get(message["ts"])
                if message.get("thread_ts") == message["ts"]:
                    users = list(dict.fromkeys(u for u, _ in replies or []))
                    message.update(
                        reply_count=len(replies or []),
                        reply_users=users[:REPLY_USERS_SHOWN],
                        reply_users_count=len(users),
                        latest_reply=replies[-1][1] if replies else message["ts"],
                    )
        stamps = [r[0] for r in rows]
        marks = ",".join("?" * len(stamps))
        reactions: dict[int, dict[str, list[str]]] = {}
        for ts_us, name, user in self.conn.execute(
            f"SELECT ts_us, name, user FROM reactions WHERE channel = ? AND ts_us IN ({marks}) ORDER BY rowid",
            (channel, *stamps),
        ):
            reactions.setdefault(ts_us, {}).setdefault(name, []).append(user)
        if reactions:
            for row, message in zip(rows, messages, strict=False):
                found = reactions.get(row[0])
                if found:
                    message["reactions"] = [{"name": n, "users": u, "count": len(u)} for n, u in found.items()]
        return messages


def _is_ts(value: str) -> bool:
    try:
        ts_to_us(value)
    except ValueError:
        return False
    return True


def _message_obj(
    user: str,
    team: str,
    text: str,
    ts: str,
    thread_ts: str | None,
    bot_id: str | None,
    extra: dict[str, Any] | None,
    subtype: str | None = None,
    edited: dict[str, str] | None = None,
) -> dict[str, Any]:
    message: dict[str, Any] = {"type": "message", "user": user, "text": text, "ts": ts, "team": team}
    if subtype:
        message["subtype"] = subtype
    if thread_ts:
        message["thread_ts"] = thread_ts
    if bot_id:
        message["bot_id"] = bot_id
    if edited:
        message["edited"] = edited
    if extra:
        message.update(extra)
    return message


def _message_row(row: tuple[Any, ...]) -> dict[str, Any]:
    _, ts, user, team, text, thread_ts, bot_id, extra, subtype, edited_user, edited_ts = row
    edited = {"user": edited_user, "ts": edited_ts} if edited_user else None
    return _message_obj(user, team, text, ts, thread_ts, bot_id, json.loads(extra) if extra else None, subtype, edited)


_NAME_OK = set("abcdefghijklmnopqrstuvwxyz0123456789-_")


def validate_channel_name(name: object) -> str:
    """Slack's channel-name rules: lowercase letters, digits, ``-``, ``_``; at most 80 characters."""
    if not isinstance(name, str) or not name.strip():
        raise ApiError("invalid_name_required")
    name = name.strip().lstrip("#")
    if len(name) > MAX_CHANNEL_NAME:
        raise ApiError("invalid_name_maxlength")
    if not name or any(ch not in _NAME_OK for ch in name):
        raise ApiError("invalid_name_specials")
    return name


# Emoji names as Slack writes them (``thumbsup``, ``+1``, ``woman-raising-hand``),
# optionally with a skin tone (``wave::skin-tone-3``). The set of known emoji is
# not checked: custom emoji are names too.
_REACTION_NAME = re.compile(r"[a-z0-9_+'-]+(::skin-tone-[2-6])?")


def validate_reaction_name(name: object) -> str:
    """A reaction name without its surrounding colons; ``invalid_name`` otherwise."""
    if not isinstance(name, str):
        raise ApiError("invalid_name")
    name = name.strip()
    if name.startswith(":") and name.endswith(":") and len(name) > 2:
        name = name[1:-1]
    if not name or len(name) > MAX_REACTION_NAME or not _REACTION_NAME.fullmatch(name):
        raise ApiError("invalid_name")
    return name
