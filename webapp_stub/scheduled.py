"""Scheduled messages: ``chat.scheduleMessage``, ``chat.scheduledMessages.list``,
``chat.deleteScheduledMessage``, and the firer that posts them when due.

A scheduled message is a row of ``scheduled_messages`` and a due item
(:mod:`webapp_stub.scheduler`, kind ``message``, lane = its channel), written in
one transaction. At ``post_at`` the scheduler posts it as its author through
:meth:`Store.post_message`, exactly as ``chat.postMessage`` would (the channel's
next ``seq``, the ``message`` event through the hand-off), in the transaction
that marks it fired. Checked again then: a channel archived or left meanwhile,
or a thread parent deleted, fails the item (counted in
``rtm_scheduler_fired_total{outcome="failed"}`` and ``rtm_errors_total``).

Slack's rules (docs.slack.dev, chat.scheduleMessage): ``post_at`` in the future
(``time_in_past``), at most 120 days ahead (``time_too_far``), at most 30
messages to one channel within any 5 minutes (``restricted_too_many``).
``chat.scheduledMessages.list`` lists the caller's pending messages, soonest
first, with ``oldest``/``latest`` (inclusive) and cursor paging.
``chat.deleteScheduledMessage`` answers ``invalid_scheduled_message_id`` for an
id that is unknown, not the caller's, in another channel, or already posted.
"""

from __future__ import annotations

from typing import Any

from webapp_stub.api import Call, WebApi, flag, int_arg, method, paged, str_arg
from webapp_stub.call_args import message_content
from webapp_stub.due_posts import DuePost, channels_by_id, loads_extra, rows_by_id, users_by_id
from webapp_stub.due_queue import DueItem
from webapp_stub.scheduler import add_due, cancel_due, register_kind, register_preparer
from webapp_stub.store import (
    DEFAULT_PAGE,
    MAX_PAGE,
    MAX_TEXT_CHARS,
    ApiError,
    Event,
    Store,
    decode_cursor,
    dumps,
    encode_cursor,
    new_id,
    ts_to_us,
    us_to_ts,
)

KIND = "message"
MAX_AHEAD_S = 120 * 86_400  # Slack: up to 120 days into the future
WINDOW_S = 300  # Slack: at most MAX_PER_WINDOW messages to one channel within 5 minutes
MAX_PER_WINDOW = 30


def parse_post_at(value: Any) -> int:
    """A unix time in whole seconds (Slack sends strings or numbers); ``invalid_time`` otherwise."""
    if value is None or value == "" or isinstance(value, (bool, list, dict)):
        raise ApiError("invalid_time")
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ApiError("invalid_time") from None
    if number != number or number in (float("inf"), float("-inf")) or number < 0 or number > 2**40:
        raise ApiError("invalid_time")
    return int(number)


def crowded(times: list[int], post_at: int) -> bool:
    """Would one more message at ``post_at`` put more than :data:`MAX_PER_WINDOW` messages in
    some window of :data:`WINDOW_S` seconds? ``times``: the channel's pending post times near it."""
    times = sorted([*times, post_at])
    for start in times:
        if start <= post_at < start + WINDOW_S:
            if sum(1 for t in times if start <= t < start + WINDOW_S) > MAX_PER_WINDOW:
                return True
    return False


def schedule(
    store: Store,
    channel_id: str,
    team: str,
    user: str,
    post_at: int,
    text: str,
    *,
    thread_ts: str | None,
    reply_broadcast: bool,
    extra: dict[str, Any] | None,
) -> str:
    """Store a scheduled message and its due item; returns its id (``Q…``).
    Raises ``restricted_too_many``."""
    sid = new_id("Q")
    with store.transaction() as db:
        near = [
            int(row[0])
            for row in db.execute(
                "SELECT post_at FROM scheduled_messages WHERE channel = ? AND state = 'pending' "
                "AND post_at > ? AND post_at < ?",
                (channel_id, post_at - WINDOW_S, post_at + WINDOW_S),
            )
        ]
        if crowded(near, post_at):
            raise ApiError("restricted_too_many")
        db.execute(
            "INSERT INTO scheduled_messages (id, team, channel, user, post_at, date_created, text, thread_ts, "
            "reply_broadcast, extra) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                sid,
                team,
                channel_id,
                user,
                post_at,
                int(store.clock()),
                text,
                thread_ts,
                int(reply_broadcast),
                dumps(extra) if extra else None,
            ),
        )
        add_due(store, DueItem(sid, KIND, team, channel_id, float(post_at)))
    return sid


@register_kind(KIND)
def fire(store: Store, sid: str, now: float) -> list[Event]:
    """Post the scheduled message ``sid`` as its author (inside the scheduler's transaction)."""
    row = store.conn.execute(
        "SELECT channel, user, text, thread_ts, reply_broadcast, extra FROM scheduled_messages WHERE id = ?", (sid,)
    ).fetchone()
    if row is None:
        raise ApiError("invalid_scheduled_message_id")
    channel_id, user_id, text, thread_ts, broadcast, extra = row
    channel = store.channel(channel_id)
    author = store.user(user_id)
    if channel is None:
        raise ApiError("channel_not_found")
    if author is None:
        raise ApiError("user_not_found")
    message, event = store.post_message(
        channel,
        author,
        text,
        thread_ts=thread_ts,
        broadcast=bool(broadcast),
        extra=loads_extra(extra),
    )
    store.conn.execute(POSTED_SQL, (message["ts"], sid))
    return [event]


POSTED_SQL = "UPDATE scheduled_messages SET state = 'posted', posted_ts = ? WHERE id = ?"


@register_preparer(KIND)
def prepare(store: Store, items: list[DueItem]) -> list[DuePost | None]:
    """The bulk path (:mod:`webapp_stub.due_posts`): what each due scheduled message posts,
    read in three statements for the whole batch; None for one that :func:`fire` must post
    (a thread reply, a missing channel or author: it raises the precise error)."""
    rows = rows_by_id(
        store,
        "SELECT id, channel, user, text, thread_ts, extra FROM scheduled_messages WHERE id IN ({marks})",
        [item.id for item in items],
    )
    channels = channels_by_id(store, [row[1] for row in rows.values()])
    authors = users_by_id(store, [row[2] for row in rows.values()])
    posts: list[DuePost | None] = []
    for item in items:
        row = rows.get(item.id)
        channel = authors_of = None
        if row is not None and row[4] is None:
            channel, authors_of = channels.get(row[1]), authors.get(row[2])
        if row is None or channel is None or authors_of is None:
            posts.append(None)
            continue
        posts.append(DuePost(item.id, channel, authors_of, row[3], row[5], POSTED_SQL))
    return posts


# -- the Web API -----------------------------------------------------------------------------------


@method("chat.scheduleMessage", writes=True)
def chat_schedule_message(api: WebApi, call: Call) -> dict[str, Any]:
    """Schedule a message as the caller in ``channel`` at ``post_at`` (unix seconds)."""
    channel = api.channel_arg(call)
    post_at = parse_post_at(call.args.get("post_at"))
    now = api.clock()
    if post_at <= now:
        raise ApiError("time_in_past")
    if post_at > now + MAX_AHEAD_S:
        raise ApiError("time_too_far")
    text, extra = message_content(call)
    if not text and not extra:
        raise ApiError("no_text")
    if len(text) > MAX_TEXT_CHARS:
        raise ApiError("msg_too_long")
    if channel.is_archived:
        raise ApiError("is_archived")
    if not api.store.is_member(channel.id, call.me.id):
        raise ApiError("not_in_channel")
    thread_ts = str_arg(call.args, "thread_ts") or None
    if thread_ts is not None:
        try:
            thread_ts = us_to_ts(ts_to_us(thread_ts))
        except ValueError:
            raise ApiError("invalid_thread_ts") from None
    sid = schedule(
        api.store,
        channel.id,
        call.me.team,
        call.me.id,
        post_at,
        text,
        thread_ts=thread_ts,
        reply_broadcast=flag(call.args, "reply_broadcast"),
        extra=extra or None,
    )
    if api.scheduler is not None:
        api.scheduler.wake()
    message: dict[str, Any] = {"type": "delayed_message", "text": text, "user": call.me.id, "team": call.me.team}
    if call.me.bot_id:
        message["bot_id"] = call.me.bot_id
    if thread_ts:
        message["thread_ts"] = thread_ts
    message.update(extra)
    return {"channel": channel.id, "scheduled_message_id": sid, "post_at": str(post_at), "message": message}


def _time_arg(call: Call, name: str) -> int | None:
    value = call.args.get(name)
    if value is None or value == "":
        return None
    try:
        return parse_post_at(value)
    except ApiError:
        raise ApiError("invalid_arguments") from None


@method("chat.scheduledMessages.list")
def chat_scheduled_messages_list(api: WebApi, call: Call) -> dict[str, Any]:
    """The caller's pending scheduled messages (in ``channel`` if given), soonest first."""
    where = ["user = ?", "state = 'pending'"]
    params: list[Any] = [call.me.id]
    if str_arg(call.args, "channel"):
        where.append("channel = ?")
        params.append(api.channel_arg(call).id)
    oldest, latest = _time_arg(call, "oldest"), _time_arg(call, "latest")
    if oldest is not None and latest is not None and oldest > latest:
        raise ApiError("invalid_arguments")
    if oldest is not None:
        where.append("post_at >= ?")
        params.append(oldest)
    if latest is not None:
        where.append("post_at <= ?")
        params.append(latest)
    after = decode_cursor(str_arg(call.args, "cursor"), "scheduled")
    if after is not None:
        at, _, last_id = after.partition("/")
        if not at.isdigit() or not last_id:
            raise ApiError("invalid_cursor")
        where.append("(post_at > ? OR (post_at = ? AND id > ?))")
        params += [int(at), int(at), last_id]
    limit = int_arg(call.args, "limit", DEFAULT_PAGE, MAX_PAGE)
    rows = api.store.conn.execute(
        f"SELECT id, channel, post_at, date_created, text FROM scheduled_messages WHERE {' AND '.join(where)} "
        "ORDER BY post_at, id LIMIT ?",
        (*params, limit + 1),
    ).fetchall()
    more = len(rows) > limit
    rows = rows[:limit]
    items = [
        {"id": sid, "channel_id": channel, "post_at": post_at, "date_created": created, "text": text}
        for sid, channel, post_at, created, text in rows
    ]
    cursor = encode_cursor("scheduled", f"{rows[-1][2]}/{rows[-1][0]}") if more else ""
    return paged("scheduled_messages", items, cursor)


@method("chat.deleteScheduledMessage", writes=True)
def chat_delete_scheduled_message(api: WebApi, call: Call) -> dict[str, Any]:
    """Delete one of the caller's pending scheduled messages before it is posted."""
    channel = api.channel_arg(call)
    sid = str_arg(call.args, "scheduled_message_id")
    if not sid:
        raise ApiError("invalid_scheduled_message_id")
    with api.store.transaction() as db:
        row = db.execute(
            "SELECT channel, user FROM scheduled_messages WHERE id = ? AND state = 'pending'", (sid,)
        ).fetchone()
        if row is None or row[0] != channel.id or row[1] != call.me.id or not cancel_due(api.store, sid):
            raise ApiError("invalid_scheduled_message_id")
        db.execute("UPDATE scheduled_messages SET state = 'deleted' WHERE id = ?", (sid,))
    return {}
