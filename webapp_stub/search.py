"""``search.messages``: the messages a user may read that match a query, in Slack's shapes.

Who finds what (docs/authz-review.md): a user token finds messages of its team's public
channels (what ``conversations.history`` lets it read) and of the private channels, DMs and group
DMs it is a member of, never another team's; the rule is one SQL condition on every match, so a
filter (``in:``) can only narrow it. A bot token is ``not_allowed_token_type``, as in Slack
(search needs a user token). Deleted messages are gone from ``messages`` and never match; an
edited one matches its new text only (webapp_stub/search_index.py).

The index is brought up to date by the search itself, before it reads (bounded:
:data:`webapp_stub.search_index.MAX_INDEX_ROWS_PER_SEARCH`); while a backlog is left, the answer
carries ``warning: search_index_incomplete`` (also in ``response_metadata.warnings``): newer
messages may be missing, nothing shown is wrong. The query language: webapp_stub/search_query.py.

Neither part holds the event loop for long (webapp_stub/search_reader.py): the catch-up runs in
slices of a few ms with the loop served between them, and :func:`find` runs on a thread of its own,
over a read-only connection, once the catch-up is committed.

Reply: ``{"query", "messages": {"total", "matches": [{"type": "message", "iid", "team",
"channel": {...}, "user", "username", "ts", "text", "permalink", "blocks"?, "attachments"?}],
"paging": {"count", "total", "page", "pages"}, "pagination": {"total_count", "page", "per_page",
"page_count", "first", "last"}}}``. ``sort``: ``score`` (FTS5's bm25, the default) or
``timestamp``; ``sort_dir``: ``desc`` (default) or ``asc``; an unknown value is the default.
``highlight``: matched words between ``\\ue000`` and ``\\ue001``, as Slack marks them.
"""

from __future__ import annotations

import sqlite3
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from webapp_stub import search_index, search_reader
from webapp_stub.api import Call, WebApi, flag, int_arg, method, str_arg
from webapp_stub.codecs import stored_loads
from webapp_stub.errors import ApiError
from webapp_stub.methods.chat import permalink
from webapp_stub.models import User
from webapp_stub.search_query import DEFAULT_COUNT, MAX_COUNT, Paging, QueryError, SearchQuery, paging, parse
from webapp_stub.search_reader import SearchReader
from webapp_stub.store import Store

# The largest page number read (larger is clamped to it, and answered empty: beyond MAX_PAGE).
_PAGE_ARG_MAX = 1_000_000
HIGHLIGHT_START, HIGHLIGHT_END = "\ue000", "\ue001"  # Slack's highlight markers
INCOMPLETE = "search_index_incomplete"  # the index has a backlog left: newer messages may be missing
CAPPED = "search_results_capped"  # more readable messages matched than MAX_CANDIDATES: the newest answered
# The most matching messages one search counts and ranks, newest first, among those the caller may
# read (and that match its ``in:`` / ``from:``). Bounds a search's work whatever the database's
# size: a word found in 22,000 of 50,000 messages cost 60 ms to count and rank in full on this
# project's 2-core VM; this many, 15-35 ms (bench/search.py; docs/slack-compat.md), on the search
# reader's thread. What the caller may not read is walked past (time) but takes no place here.
MAX_CANDIDATES = 5_000
_IID = uuid.UUID("5c0f2a57-8d1e-4b8e-9a57-2f6d3c1e7b10")  # the namespace of matches' iid (uuid5)
# Who may read a conversation's messages, for a user (the caller: its team, its id): a public
# channel of its team, or a conversation it is a member of (private channels, DMs, group DMs).
_READABLE = (
    "c.team = ? AND ((c.kind = 'channel' AND c.is_private = 0) "
    "OR EXISTS (SELECT 1 FROM members mb WHERE mb.channel = c.id AND mb.user = ?))"
)


@method("search.messages")
async def search_messages(api: WebApi, call: Call) -> dict[str, Any]:
    """Raises ``not_allowed_token_type`` (a bot token), ``no_query``, ``invalid_arguments`` (too long,
    too many terms, a bad number), ``service_unavailable`` (this SQLite has no FTS5), ``ratelimited``
    (429: :data:`~webapp_stub.search_reader.MAX_SEARCHES_IN_FLIGHT` searches at once already)."""
    if call.me.is_bot:
        raise ApiError("not_allowed_token_type")
    text = str_arg(call.args, "query")
    try:
        query = parse(text)
    except QueryError as exc:
        raise ApiError(exc.code) from None
    page = paging(int_arg(call.args, "count", DEFAULT_COUNT, MAX_COUNT), int_arg(call.args, "page", 1, _PAGE_ARG_MAX))
    by_time = (str_arg(call.args, "sort") or "").lower() == "timestamp"
    ascending = (str_arg(call.args, "sort_dir") or "").lower() == "asc"
    store, me, highlight = api.store, call.me, flag(call.args, "highlight")
    if not search_index.available(store.conn):
        raise ApiError("service_unavailable")
    progress, found = await run_search(
        store, api.durable, me, query, page, by_time=by_time, ascending=ascending, highlight=highlight
    )
    matches = [_match(api, call, row) for row in found.rows]
    reply: dict[str, Any] = {
        "query": text,
        "messages": {"total": found.total, "matches": matches, **page.shapes(found.total, len(matches))},
    }
    warnings = [name for name, on in ((INCOMPLETE, progress.behind), (CAPPED, found.capped)) if on]
    if warnings:  # as Slack warns: comma-separated in ``warning``, a list in ``response_metadata``
        reply["warning"] = ",".join(warnings)
        reply["response_metadata"] = {"warnings": warnings}
    return reply


async def run_search(
    store: Store,
    durable: Callable[[], Awaitable[None]],
    me: User,
    query: SearchQuery,
    page: Paging,
    *,
    by_time: bool,
    ascending: bool,
    highlight: bool,
) -> tuple[search_index.CatchUp, Found]:
    """One search, admitted by ``store``'s reader: the index's catch-up (in slices, on the loop),
    ``durable`` (the group commit's: what it indexed committed), then :func:`find` on the reader's
    thread. Raises ``ratelimited`` (429) past :data:`~webapp_stub.search_reader.MAX_SEARCHES_IN_FLIGHT`."""
    reader = reader_of(store)
    with reader.admitted():
        progress = await search_reader.catch_up(store, reader.catch_up_lock)
        await durable()  # the reader sees committed data only
        found = await reader.read(
            lambda conn: find(conn, me, query, page, by_time=by_time, ascending=ascending, highlight=highlight)
        )
    return progress, found


def reader_of(store: Store) -> SearchReader:
    """``store``'s search reader, made at its first search (closed with the store)."""
    reader = store.search_reader
    if not isinstance(reader, SearchReader):
        reader = store.search_reader = SearchReader(store.path)
    return reader


@dataclass(frozen=True)
class Found:
    """What :func:`find` found: ``total`` matches the caller may read, the page's ``rows``, and
    whether more messages it may read matched than :data:`MAX_CANDIDATES` (``capped``: ``total``
    counts the newest of them only)."""

    total: int
    rows: list[tuple[Any, ...]]
    capped: bool


def find(
    conn: sqlite3.Connection,
    me: User,
    query: SearchQuery,
    page: Paging,
    *,
    by_time: bool,
    ascending: bool,
    highlight: bool,
) -> Found:
    """What ``me`` may read matching ``query``: the newest :data:`MAX_CANDIDATES` such messages at
    most, from the index as it is: reads only, on ``conn`` (the search reader's, on its thread,
    in one read transaction; any connection to the database will do).

    Each row: channel, ts, user, team, text (highlighted if asked), thread_ts, extra, the channel's
    name, is_private and kind, the user's name."""
    where = _where(conn, me, query)
    if where is None:
        return Found(0, [], False)
    match, clauses, params = where
    # the candidates: FTS5 walks its matches newest (highest rowid) first, keeps those the caller may
    # read (and asked for), and stops at the bound. What the caller may not read takes no place among
    # them: bounded before that condition, a short ``total`` and ``capped`` told a user that messages
    # it may not read hold the words it searched for (docs/authz-review.md, finding 10).
    hits = (
        "SELECT search_fts.rowid AS id{} FROM search_fts JOIN messages m ON m.id = search_fts.rowid JOIN channels c "
        f"ON c.id = m.channel WHERE search_fts MATCH ? AND {clauses} ORDER BY search_fts.rowid DESC LIMIT ? OFFSET ?"
    )
    capped = conn.execute(hits.format(""), (match, *params, 1, MAX_CANDIDATES)).fetchone() is not None
    joins = "FROM ({}) h JOIN messages m ON m.id = h.id JOIN channels c ON c.id = m.channel"
    params = [match, *params, MAX_CANDIDATES, 0]
    direction = "ASC" if ascending else "DESC"
    # bm25 (FTS5's rank) is lower for a better match: the best first is rank ASC
    order = (
        f"m.ts_us {direction}, m.id {direction}" if by_time else f"h.rank {'DESC' if ascending else 'ASC'}, m.id DESC"
    )
    rows = []
    if not page.beyond:  # one pass: the page and, beside each row, the count of all (a window)
        rows = conn.execute(
            "SELECT m.id, m.channel, m.ts, m.user, m.team, m.text, m.thread_ts, m.extra, c.name, c.is_private, "
            f"c.kind, (SELECT u.name FROM users u WHERE u.id = m.user), count(*) OVER () "
            f"{joins.format(hits.format('' if by_time else ', search_fts.rank'))} ORDER BY {order} LIMIT ? OFFSET ?",
            (*params, page.count, page.offset),
        ).fetchall()
    if rows:
        total = int(rows[0][-1])
    else:  # past the last page (or none): count alone, without ranking
        total = int(conn.execute(f"SELECT count(*) {joins.format(hits.format(''))}", params).fetchone()[0])
    marked = _highlighted(conn, match, [row[0] for row in rows]) if highlight else {}
    return Found(total, [(*row[1:5], marked.get(row[0], row[5]), *row[6:-1]) for row in rows], capped)


def _highlighted(conn: sqlite3.Connection, match: str, ids: list[int]) -> dict[int, str]:
    """The texts of rows ``ids`` with ``match``'s words between Slack's markers (FTS5's ``highlight``)."""
    rows = conn.execute(
        f"SELECT rowid, highlight(search_fts, 0, '{HIGHLIGHT_START}', '{HIGHLIGHT_END}') FROM search_fts "
        f"WHERE search_fts MATCH ? AND rowid IN ({','.join('?' * len(ids))})",
        (match, *ids),
    )
    return {int(rowid): str(text) for rowid, text in rows if text is not None}


def _where(conn: sqlite3.Connection, me: User, query: SearchQuery) -> tuple[str, str, list[Any]] | None:
    """The MATCH expression, the WHERE clause over a candidate and its parameters; None when nothing
    can match (no word to search for, or an ``in:`` / ``from:`` naming nothing this user knows)."""
    match = query.match()
    if match is None:
        return None
    clauses = [_READABLE, "m.id NOT IN (SELECT id FROM search_stale)"]
    params: list[Any] = [me.team, me.id]
    for column, wanted in (("m.channel", _channel_ids(conn, me, query)), ("m.user", _user_ids(conn, me, query))):
        if wanted is None:
            continue
        if not wanted:
            return None
        clauses.append(f"{column} IN ({','.join('?' * len(wanted))})")
        params += wanted
    return match, " AND ".join(clauses), params


def _channel_ids(conn: sqlite3.Connection, me: User, query: SearchQuery) -> list[str] | None:
    """The conversations ``in:`` names (None: no ``in:``); a name resolves in ``me``'s team (a
    channel's, as ``Store.channel_by_name`` finds it)."""
    if not query.channels:
        return None
    ids = []
    for ref in query.channels:
        if ref.startswith("#"):
            row = conn.execute(
                "SELECT id FROM channels WHERE team = ? AND name = ? AND kind = 'channel'", (me.team, ref[1:])
            ).fetchone()
            if row is not None:
                ids.append(str(row[0]))
        else:
            ids.append(ref)
    return ids


def _user_ids(conn: sqlite3.Connection, me: User, query: SearchQuery) -> list[str] | None:
    """The authors ``from:`` names (None: no ``from:``); a name resolves in ``me``'s team."""
    if not query.users:
        return None
    ids = []
    for ref in query.users:
        if ref == "me":
            ids.append(me.id)
        elif ref.startswith("@"):
            row = conn.execute("SELECT id FROM users WHERE team = ? AND name = ?", (me.team, ref[1:])).fetchone()
            if row is not None:
                ids.append(str(row[0]))
        else:
            ids.append(ref)
    return ids


def _match(api: WebApi, call: Call, row: tuple[Any, ...]) -> dict[str, Any]:
    """One of Slack's ``matches``."""
    channel, ts, user, team, text, thread_ts, extra, name, is_private, kind, username = row
    if kind == "im":
        name = api.store.dm_peer(api.store.visible_channel(channel, call.me), call.me.id)
    match: dict[str, Any] = {
        "type": "message",
        "iid": str(uuid.uuid5(_IID, f"{channel}/{ts}")),
        "team": team,
        "channel": {
            "id": channel,
            "name": name,
            "is_channel": kind == "channel" and not is_private,
            "is_group": kind == "channel" and bool(is_private),
            "is_im": kind == "im",
            "is_mpim": kind == "mpim",
            "is_private": bool(is_private),
            "is_shared": False,
            "is_ext_shared": False,
            "is_org_shared": False,
            "is_pending_ext_shared": False,
            "pending_shared": [],
        },
        "user": user,
        "username": username or "",
        "ts": ts,
        "text": text,
        "permalink": permalink(api, call, channel, ts, thread_ts),
    }
    content = stored_loads(extra) if extra else {}
    match.update({key: content[key] for key in ("blocks", "attachments") if key in content})
    return match
