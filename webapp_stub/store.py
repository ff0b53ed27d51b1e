"""The webapp's durable state: one SQLite file, synchronous and plain.

This is the sans-I/O core of the webapp: no asyncio, no sockets. The aiohttp
layer (:mod:`webapp_stub.api`) calls it directly; every call is one short
transaction on one connection, which SQLite in WAL mode serves in tens of
microseconds.

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

Errors a client can cause raise :class:`ApiError` with the Slack error code.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import secrets
import sqlite3
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

DB_FILE = "webapp.db"
MAX_TEXT_CHARS = 40_000  # Slack's limit for chat.postMessage text
# Page sizes. Slack recommends 200 and caps most list methods at 1000.
DEFAULT_PAGE = 100
MAX_PAGE = 1000
DEFAULT_HISTORY_PAGE = 100
MAX_HISTORY_PAGE = 999
MAX_CHANNEL_NAME = 80
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
    bot_id TEXT
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
    PRIMARY KEY (channel, ts_us)
) WITHOUT ROWID;
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
    id: str
    team: str
    name: str
    created: int
    creator: str
    is_private: bool = False
    is_archived: bool = False

    def to_api(self, **extra: Any) -> dict[str, Any]:
        """Slack's conversation object (conversations.info/list/create)."""
        return {
            "id": self.id,
            "name": self.name,
            "is_channel": not self.is_private,
            "is_group": self.is_private,
            "is_im": False,
            "is_mpim": False,
            "is_private": self.is_private,
            "created": self.created,
            "creator": self.creator,
            "is_archived": self.is_archived,
            "is_general": self.name == "general",
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
    if not whole.isdigit() or (frac and not frac.isdigit()) or len(frac) > 6:
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
    except (binascii.Error, UnicodeDecodeError, ValueError):
        raise ApiError("invalid_cursor") from None
    got, _, key = text.partition(":")
    if got != kind or not key:
        raise ApiError("invalid_cursor")
    return key


def _int_cursor(cursor: str | None, kind: str) -> int | None:
    key = decode_cursor(cursor, kind)
    if key is None:
        return None
    try:
        return int(key)
    except ValueError:
        raise ApiError("invalid_cursor") from None


def dumps(obj: Any) -> str:
    """The one JSON encoding of client-visible events: compact, UTF-8 text."""
    return json.dumps(obj, separators=JSON_SEPARATORS, ensure_ascii=False)


# -- the store ---------------------------------------------------------------------------


class Store:
    """All webapp state in ``<data_dir>/webapp.db`` (or ``path`` if it names a file)."""

    def __init__(self, path: str | os.PathLike[str], *, clock: Callable[[], float] = time.time) -> None:
        path = os.fspath(path)
        if os.path.isdir(path) or not path.endswith(".db"):
            os.makedirs(path, exist_ok=True)
            path = os.path.join(path, DB_FILE)
        else:
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        self.path = path
        self.clock = clock
        # isolation_level=None: we issue BEGIN/COMMIT ourselves. One connection,
        # used only from the event loop's thread, so check_same_thread is moot.
        self.conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False, cached_statements=256)
        self.conn.execute("PRAGMA journal_mode=WAL")
        self.conn.execute("PRAGMA synchronous=NORMAL")  # durable across process crashes; WAL keeps it consistent
        self.conn.execute("PRAGMA foreign_keys=OFF")
        self.conn.execute("PRAGMA busy_timeout=5000")
        self.conn.executescript(SCHEMA)

    def close(self) -> None:
        self.conn.close()

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """``BEGIN IMMEDIATE`` … ``COMMIT``; rolled back on any exception."""
        self.conn.execute("BEGIN IMMEDIATE")
        try:
            yield self.conn
        except BaseException:
            self.conn.execute("ROLLBACK")
            raise
        self.conn.execute("COMMIT")

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
        events = [Event(channel, seq, text, None if ctl is None else json.loads(ctl), t0) for seq, text, ctl, t0 in rows]
        return events[:limit], len(events) > limit

    def events_since(self, created_at: float) -> list[Event]:
        """Every event created at or after ``created_at``, in seq order per channel (restart replay)."""
        rows = self.conn.execute(
            "SELECT channel, seq, json, ctl, created_at FROM events WHERE created_at >= ? ORDER BY channel, seq",
            (created_at,),
        ).fetchall()
        return [Event(ch, seq, text, None if ctl is None else json.loads(ctl), t0) for ch, seq, text, ctl, t0 in rows]

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

    _USER_COLS = "id, team, name, real_name, is_bot, bot_id"

    @staticmethod
    def _user(row: tuple[Any, ...]) -> User:
        return User(row[0], row[1], row[2], row[3], bool(row[4]), row[5])

    def user(self, user_id: str) -> User | None:
        row = self.conn.execute(f"SELECT {self._USER_COLS} FROM users WHERE id = ?", (user_id,)).fetchone()
        return self._user(row) if row else None

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
    _CHANNEL_COLS = "id, team, name, created, creator, is_private, is_archived"

    @staticmethod
    def _channel(row: tuple[Any, ...]) -> Channel:
        return Channel(row[0], row[1], row[2], int(row[3]), row[4], bool(row[5]), bool(row[6]))

    def channel(self, channel_id: str) -> Channel | None:
        row = self.conn.execute(f"SELECT {self._CHANNEL_COLS} FROM channels WHERE id = ?", (channel_id,)).fetchone()
        return self._channel(row) if row else None

    def channel_by_name(self, team: str, name: str) -> Channel | None:
        row = self.conn.execute(
            f"SELECT {self._CHANNEL_COLS} FROM channels WHERE team = ? AND name = ?", (team, name)
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

    def visible_channel(self, channel_id: str, user: User) -> Channel:
        """The channel if ``user`` may see it (same team; private only for members); else ``channel_not_found``."""
        channel = self.channel(channel_id) if isinstance(channel_id, str) and channel_id else None
        if channel is None or channel.team != user.team:
            raise ApiError("channel_not_found")
        if channel.is_private and not self.is_member(channel.id, user.id):
            raise ApiError("channel_not_found")
        return channel

    def create_channel(self, user: User, name: str, *, is_private: bool = False) -> tuple[Channel, list[Event]]:
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
                    f"INSERT INTO channels ({self._CHANNEL_COLS}) VALUES (?, ?, ?, ?, ?, ?, ?)",
                    (channel.id, channel.team, name, now, user.id, int(is_private), 0),
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

    def _join(self, channel: Channel, user: User) -> list[Event]:
        """Membership row, ``member_joined_channel`` on the channel, ``channel_joined`` on the user.

        The user-channel event carries ``ctl = {"join": C, "since": seq}`` where
        ``seq`` is the channel's last seq after its ``member_joined_channel``:
        gateways subscribe that user's connections to C from there, at once.
        """
        self.conn.execute("INSERT INTO members (channel, user) VALUES (?, ?)", (channel.id, user.id))
        joined = self._append_event(
            channel.id,
            {
                "type": "member_joined_channel",
                "user": user.id,
                "channel": channel.id,
                "channel_type": "G" if channel.is_private else "C",
                "team": user.team,
            },
        )
        info = channel.to_api(is_member=True)
        own = self._append_event(
            user.id, {"type": "channel_joined", "channel": info}, ctl={"join": channel.id, "since": joined.seq}
        )
        return [joined, own]

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
        after = _int_cursor(cursor, "channel") or 0
        kinds = []
        if public:
            kinds.append("is_private = 0")
        if private:
            kinds.append("(is_private = 1 AND EXISTS (SELECT 1 FROM members m WHERE m.channel = c.id AND m.user = ?))")
        if not kinds:
            return Page([], "")
        where = "team = ? AND rowid > ? AND (" + " OR ".join(kinds) + ")"
        params: list[Any] = [user.team, after] + ([user.id] if private else [])
        if exclude_archived:
            where += " AND is_archived = 0"
        rows = self.conn.execute(
            f"SELECT rowid, {self._CHANNEL_COLS} FROM channels c WHERE {where} ORDER BY rowid LIMIT ?",
            (*params, limit + 1),
        ).fetchall()
        more = len(rows) > limit
        rows = rows[:limit]
        return Page([self._channel(r[1:]) for r in rows], encode_cursor("channel", rows[-1][0]) if more else "")

    def list_members(self, channel: str, *, limit: int = DEFAULT_PAGE, cursor: str | None = None) -> Page:
        after = decode_cursor(cursor, "member") or ""
        rows = self.conn.execute(
            "SELECT user FROM members WHERE channel = ? AND user > ? ORDER BY user LIMIT ?",
            (channel, after, limit + 1),
        ).fetchall()
        more = len(rows) > limit
        users = [r[0] for r in rows[:limit]]
        return Page(users, encode_cursor("member", users[-1]) if more else "")

    def bootstrap(self, user_id: str) -> dict[str, Any] | None:
        """What a gateway needs to connect ``user_id``: self, team, and every channel with its last seq.

        The channels are the user's conversations plus the user's own channel
        and the team channel, each with its current ``last_seq`` (0 if none).
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
        channels = [{"id": user.id, "seq": self.last_seq(user.id)}, {"id": user.team, "seq": self.last_seq(user.team)}]
        channels += [{"id": ch, "seq": int(seq)} for ch, seq in rows]
        return {
            "user": {"id": user.id, "name": user.name},
            "team": team.to_api() if team else {"id": user.team, "name": user.team, "domain": user.team.lower()},
            "channels": channels,
        }

    # -- messages ------------------------------------------------------------------------
    def post_message(
        self,
        channel: Channel,
        user: User,
        text: str,
        *,
        thread_ts: str | None = None,
        extra: dict[str, Any] | None = None,
    ) -> tuple[dict[str, Any], Event]:
        """Persist a message and its ``message`` event (one transaction).

        Returns the message as history shows it and the event. Raises
        ``not_in_channel``, ``is_archived``, ``msg_too_long``, ``invalid_thread_ts``.
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
                parent = db.execute(
                    "SELECT thread_ts FROM messages WHERE channel = ? AND ts_us = ?", (channel.id, ts_to_us(thread_ts))
                ).fetchone()
                if parent is None:
                    raise ApiError("thread_not_found")
                thread_ts = parent[0] or thread_ts  # a reply to a reply joins the parent's thread
            seq, ts_us = self._next_seq(channel.id, with_ts=True)
            ts = us_to_ts(ts_us)
            message = _message_obj(user.id, user.team, text, ts, thread_ts, user.bot_id, extra)
            payload = {"type": "message", "channel": channel.id, **{k: v for k, v in message.items() if k != "type"}}
            payload["event_ts"] = ts
            db.execute(
                "INSERT INTO messages (channel, ts_us, ts, seq, user, team, text, thread_ts, bot_id, extra) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (channel.id, ts_us, ts, seq, user.id, user.team, text, thread_ts, user.bot_id, dumps(extra) if extra else None),
            )
            event = self._append_event(channel.id, payload, seq=seq)
        return message, event

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
        Thread replies are left out, as in Slack (see :meth:`replies`).
        """
        try:
            low = ts_to_us(oldest) if oldest not in (None, "") else None
            high = ts_to_us(latest) if latest not in (None, "") else None
        except ValueError:
            raise ApiError("invalid_ts_latest" if latest and not _is_ts(latest) else "invalid_ts_oldest") from None
        below = _int_cursor(cursor, "ts")
        where = ["channel = ?", "(thread_ts IS NULL OR thread_ts = ts)"]
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
            "SELECT ts_us, ts, user, team, text, thread_ts, bot_id, extra FROM messages "
            f"WHERE {' AND '.join(where)} ORDER BY ts_us DESC LIMIT ?",
            (*params, limit + 1),
        ).fetchall()
        more = len(rows) > limit
        rows = rows[:limit]
        messages = [_message_row(r) for r in rows]
        return messages, more, encode_cursor("ts", rows[-1][0]) if more else ""

    def replies(self, channel: str, ts: str, *, limit: int = DEFAULT_HISTORY_PAGE, cursor: str | None = None) -> tuple[list[dict[str, Any]], bool, str]:
        """A thread, oldest first: the parent then its replies."""
        try:
            parent_us = ts_to_us(ts)
        except ValueError:
            raise ApiError("thread_not_found") from None
        parent = self.conn.execute(
            "SELECT ts_us, ts, user, team, text, thread_ts, bot_id, extra FROM messages WHERE channel = ? AND ts_us = ?",
            (channel, parent_us),
        ).fetchone()
        if parent is None:
            raise ApiError("thread_not_found")
        root = parent[5] or parent[1]
        after = _int_cursor(cursor, "ts")
        rows = self.conn.execute(
            "SELECT ts_us, ts, user, team, text, thread_ts, bot_id, extra FROM messages "
            "WHERE channel = ? AND (ts = ? OR thread_ts = ?) AND ts_us > ? ORDER BY ts_us LIMIT ?",
            (channel, root, root, -1 if after is None else after, limit + 1),
        ).fetchall()
        more = len(rows) > limit
        rows = rows[:limit]
        return [_message_row(r) for r in rows], more, encode_cursor("ts", rows[-1][0]) if more else ""


def _is_ts(value: str) -> bool:
    try:
        ts_to_us(value)
    except ValueError:
        return False
    return True


def _message_obj(
    user: str, team: str, text: str, ts: str, thread_ts: str | None, bot_id: str | None, extra: dict[str, Any] | None
) -> dict[str, Any]:
    message: dict[str, Any] = {"type": "message", "user": user, "text": text, "ts": ts, "team": team}
    if thread_ts:
        message["thread_ts"] = thread_ts
    if bot_id:
        message["bot_id"] = bot_id
    if extra:
        message.update(extra)
    return message


def _message_row(row: tuple[Any, ...]) -> dict[str, Any]:
    _, ts, user, team, text, thread_ts, bot_id, extra = row
    return _message_obj(user, team, text, ts, thread_ts, bot_id, json.loads(extra) if extra else None)


_NAME_OK = set("abcdefghijklmnopqrstuvwxyz0123456789-_")


def validate_channel_name(name: Any) -> str:
    """Slack's channel-name rules: lowercase letters, digits, ``-``, ``_``; at most 80 characters."""
    if not isinstance(name, str) or not name.strip():
        raise ApiError("invalid_name_required")
    name = name.strip().lstrip("#")
    if len(name) > MAX_CHANNEL_NAME:
        raise ApiError("invalid_name_maxlength")
    if not name or any(ch not in _NAME_OK for ch in name):
        raise ApiError("invalid_name_specials")
    return name
