"""Posting many due messages in one transaction: the scheduler's bulk path.

When hundreds of scheduled messages and reminders fall due at once, posting
them one by one through :meth:`~webapp_stub.messages.MessageStore.post_message`
costs ~150 µs each (a savepoint, a claim, a row read, cache checks, a seq
update and three inserts: a dozen statements). :func:`post_due_messages` posts
a whole batch with a handful of statements: one membership read for all of
them, one ``UPDATE … FROM (VALUES …)`` that allocates every channel's seqs and
ts at once, and one ``executemany`` each for the messages, the events and the
kinds' own rows. The result is what ``post_message`` would have written, row
for row: the same message rows, the same event JSON (encoded once, by
:func:`~webapp_stub.messages.message_event_json`), each channel's seqs gapless
and in the order of the batch, each ts strictly above the channel's last.

It posts only what it can post without a doubt: a message whose channel is
archived, whose author is no longer a member, or whose text could make its
event too large is handed back, and the scheduler fires it through its kind's
one-by-one firer, which raises the precise Slack error (``is_archived``,
``not_in_channel``, ``msg_too_long``). Threads (``thread_ts``) take that path
too, as do kinds without a preparer.

Must run inside the caller's transaction (the scheduler's batch): nothing here
commits.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from webapp_stub.codecs import stored_loads, us_to_ts
from webapp_stub.messages import MAX_TEXT_CHARS, MessageStore, _message_obj, message_event_text
from webapp_stub.models import Channel, Event, User

# The most characters a message's JSON event may add around its text and extra: ids, ts, user,
# team, the keys. A text of n characters encodes to at most 6n bytes (\uXXXX): a post whose
# 6 * (len(text) + len(extra)) + EVENT_OVERHEAD_BYTES may exceed the store's max_event_bytes goes
# the one-by-one way, which measures it exactly.
EVENT_OVERHEAD_BYTES = 1024
JSON_ESCAPE_FACTOR = 6
# SQLite binds at most 32,766 parameters per statement (3.32+); the statements below use
# 2-3 per post, and a batch is at most a few hundred posts. Chunks keep any batch size safe.
MAX_ROWS_PER_STATEMENT = 4000


@dataclass(frozen=True)
class DuePost:
    """A message one due item posts, as its kind's preparer read it.

    ``extra_json`` is its blocks and attachments as stored (the JSON text of an object that
    :func:`~webapp_stub.codecs.dumps` wrote, the ``extra`` column), None without: decoded once,
    for the event, and written to the message's row as it is (the same text ``dumps`` would
    write again). ``done_sql`` is the kind's own follow-up, run with ``(ts, item_id)`` once
    the message has its ts (``UPDATE scheduled_messages SET state = 'posted', posted_ts = ? WHERE id = ?``)."""

    item_id: str
    channel: Channel
    author: User
    text: str
    extra_json: str | None
    done_sql: str


def chunks(rows: list[Any], size: int = MAX_ROWS_PER_STATEMENT) -> Iterable[list[Any]]:
    for start in range(0, len(rows), size):
        yield rows[start : start + size]


def rows_by_id(store: MessageStore, sql: str, ids: list[str]) -> dict[str, tuple[Any, ...]]:
    """``sql`` (``SELECT id, … FROM t WHERE id IN ({marks})``) for ``ids``: rows by their first column."""
    found: dict[str, tuple[Any, ...]] = {}
    for part in chunks(list(dict.fromkeys(ids))):
        marks = ",".join("?" * len(part))
        for row in store.conn.execute(sql.format(marks=marks), part):
            found[row[0]] = tuple(row)
    return found


def channels_by_id(store: MessageStore, ids: list[str]) -> dict[str, Channel]:
    rows = rows_by_id(store, f"SELECT {store._CHANNEL_COLS} FROM channels WHERE id IN ({{marks}})", ids)
    return {cid: store._channel(row) for cid, row in rows.items()}


def users_by_id(store: MessageStore, ids: list[str]) -> dict[str, User]:
    rows = rows_by_id(store, f"SELECT {store._USER_COLS} FROM users WHERE id IN ({{marks}})", ids)
    return {uid: store._user(row) for uid, row in rows.items()}


def memberships(store: MessageStore, pairs: list[tuple[str, str]]) -> set[tuple[str, str]]:
    """Which (channel, user) pairs are memberships, in one statement per chunk (a join with
    the primary key: ``(channel, user) IN (VALUES …)`` would scan the whole table)."""
    found: set[tuple[str, str]] = set()
    unique = list(dict.fromkeys(pairs))
    for part in chunks(unique):
        values = ",".join("(?, ?)" for _ in part)
        params = [v for pair in part for v in pair]
        rows = store.conn.execute(
            f"SELECT m.channel, m.user FROM (VALUES {values}) AS v "
            "JOIN members m ON m.channel = v.column1 AND m.user = v.column2",
            params,
        )
        found.update((row[0], row[1]) for row in rows)
    return found


def postable(store: MessageStore, posts: list[DuePost]) -> list[bool]:
    """For each post: can the bulk path post it as ``post_message`` would, without an error?
    (Its channel not archived, its author a member, its event surely within the size bound.)"""
    members = memberships(store, [(p.channel.id, p.author.id) for p in posts])
    verdicts = []
    for post in posts:
        size = len(post.text) + (len(post.extra_json) if post.extra_json else 0)
        verdicts.append(
            not post.channel.is_archived
            and (post.channel.id, post.author.id) in members
            and len(post.text) <= MAX_TEXT_CHARS
            and JSON_ESCAPE_FACTOR * size + EVENT_OVERHEAD_BYTES <= store.max_event_bytes
        )
    return verdicts


def allocate(store: MessageStore, counts: dict[str, int], now_us: int) -> dict[str, tuple[int, int]]:
    """Give each channel ``counts[channel]`` seqs and ts at once; returns each channel's first
    (seq, ts_us). The same rule as :meth:`Database._next_seq` applied n times: the seqs follow
    the channel's last, the first ts is ``max(now, last ts + 1 µs)`` and the others follow it."""
    first: dict[str, tuple[int, int]] = {}
    items = list(counts.items())
    for part in chunks(items):
        values = ",".join("(?, ?)" for _ in part)
        params: list[Any] = [now_us, *(v for pair in part for v in pair)]
        rows = store.conn.execute(
            "UPDATE channel_seq SET last_seq = last_seq + v.n, last_ts_us = max(?1, last_ts_us + 1) + v.n - 1 "
            f"FROM (SELECT column1 AS c, column2 AS n FROM (VALUES {values})) AS v "
            "WHERE channel_seq.channel = v.c RETURNING channel_seq.channel, last_seq, last_ts_us",
            params,
        )
        for channel, last_seq, last_ts_us in rows:
            n = counts[channel]
            first[channel] = (int(last_seq) - n + 1, int(last_ts_us) - n + 1)
    missing = [(channel, n) for channel, n in items if channel not in first]
    if missing:  # a channel's first event ever
        store.conn.executemany(
            "INSERT INTO channel_seq (channel, last_seq, last_ts_us) VALUES (?, ?, ?)",
            [(channel, n, now_us + n - 1) for channel, n in missing],
        )
        first.update((channel, (1, now_us)) for channel, _ in missing)
    return first


def post_due_messages(store: MessageStore, posts: list[DuePost]) -> list[Event]:
    """Persist ``posts`` (all :func:`postable`) and their ``message`` events, in this order.
    Returns the events (in the order of ``posts``: each channel's in seq order). Inside the
    caller's transaction."""
    if not posts:
        return []
    now = store.event_clock()
    counts: dict[str, int] = {}
    for post in posts:
        counts[post.channel.id] = counts.get(post.channel.id, 0) + 1
    next_of = allocate(store, counts, int(now * 1_000_000))
    events: list[Event] = []
    message_rows: list[tuple[Any, ...]] = []
    event_rows: list[tuple[Any, ...]] = []
    done: dict[str, list[tuple[str, str]]] = {}
    for post in posts:
        cid, author = post.channel.id, post.author
        seq, ts_us = next_of[cid]
        next_of[cid] = (seq + 1, ts_us + 1)
        ts = us_to_ts(ts_us)
        extra = loads_extra(post.extra_json)
        message = _message_obj(author.id, author.team, post.text, ts, None, author.bot_id, extra)
        encoded = message_event_text(cid, ts, message)
        message_rows.append(
            (
                cid,
                seq,
                ts_us,
                ts,
                author.id,
                author.team,
                post.text,
                None,
                author.bot_id,
                post.extra_json if extra else None,
                None,
                None,
                None,
            )
        )
        event_rows.append((cid, seq, encoded, None, now))
        events.append(Event(cid, seq, encoded, None, now))
        done.setdefault(post.done_sql, []).append((ts, post.item_id))
    conn = store.conn
    conn.executemany(
        f"INSERT INTO messages (channel, seq, {store._MSG_COLS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        message_rows,
    )
    conn.executemany("INSERT INTO events (channel, seq, json, ctl, created_at) VALUES (?, ?, ?, ?, ?)", event_rows)
    for sql, rows in done.items():
        conn.executemany(sql, rows)
    return events


def loads_extra(extra: str | None) -> dict[str, Any] | None:
    """A stored ``extra`` column (blocks, attachments) as the message's fields."""
    return stored_loads(extra) if extra else None
