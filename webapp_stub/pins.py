"""Pins: ``pins.add``, ``pins.remove``, ``pins.list``, and the ``pin_added`` /
``pin_removed`` events.

A pin is a row of ``pins`` (channel, message ts, who, when). Adding or removing one
emits Slack's event on the conversation (its members receive it over RTM, in ``seq``
order with the channel's messages), shaped as in Slack's docs
(docs.slack.dev/reference/events/pin_added):
``{"type": "pin_added", "user", "channel_id", "item": {"type": "message", "channel",
"message", "created", "created_by"}, "item_user", "pin_count", "pinned_info":
{"channel", "pinned_by", "pinned_ts"}, "event_ts"}``; ``pin_removed`` has the same
fields and ``has_pins``. Errors: ``no_item_specified`` (no ``timestamp``),
``bad_timestamp``, ``message_not_found``, ``already_pinned``, ``no_pin``,
``not_in_channel``, ``is_archived``, and ``too_many_pins`` past
:data:`MAX_PINS_PER_CHANNEL` (rtm's name: Slack's docs list no such error). A pin
whose message is deleted later is left out of ``pins.list``.
"""

from __future__ import annotations

from typing import Any

from webapp_stub.api import Call, WebApi, method, str_arg
from webapp_stub.methods.conversations import readable_channel
from webapp_stub.store import ApiError, Channel, Event, Store, User, ts_to_us, us_to_ts

MAX_PINS_PER_CHANNEL = 100  # the most pins one conversation holds (Slack's limit on free plans)


def _target(api: WebApi, call: Call) -> tuple[Channel, int]:
    channel = api.channel_arg(call)
    ts = str_arg(call.args, "timestamp")
    if not ts:
        raise ApiError("no_item_specified")
    try:
        return channel, ts_to_us(ts)
    except ValueError:
        raise ApiError("bad_timestamp") from None


def _pin_count(store: Store, channel: str) -> int:
    return int(store.conn.execute("SELECT count(*) FROM pins WHERE channel = ?", (channel,)).fetchone()[0])


def _pin_event(store: Store, kind: str, channel: Channel, user: User, ts_us: int, created: int) -> Event:
    """``pin_added``/``pin_removed`` on the channel with its next seq (inside a transaction)."""
    message = store.message(channel.id, us_to_ts(ts_us))
    seq, event_us = store._next_seq(channel.id, with_ts=True)
    count = _pin_count(store, channel.id)
    payload: dict[str, Any] = {
        "type": kind,
        "user": user.id,
        "channel_id": channel.id,
        "item": {
            "type": "message",
            "channel": channel.id,
            "message": message,
            "created": created,
            "created_by": user.id,
        },
        "item_user": message.get("user"),
        "pin_count": count,
        "pinned_info": {"channel": channel.id, "pinned_by": user.id, "pinned_ts": created},
        "event_ts": us_to_ts(event_us),
    }
    if kind == "pin_removed":
        payload["has_pins"] = count > 0
    return store._append_event(channel.id, payload, seq=seq)


@method("pins.add", writes=True)
def pins_add(api: WebApi, call: Call) -> dict[str, Any]:
    channel, ts_us = _target(api, call)
    if channel.is_archived:
        raise ApiError("is_archived")
    store = api.store
    with store.transaction() as db:
        if not store.is_member(channel.id, call.me.id):
            raise ApiError("not_in_channel")
        store.message(channel.id, us_to_ts(ts_us))  # message_not_found
        if db.execute("SELECT 1 FROM pins WHERE channel = ? AND ts_us = ?", (channel.id, ts_us)).fetchone():
            raise ApiError("already_pinned")
        if _pin_count(store, channel.id) >= MAX_PINS_PER_CHANNEL:
            raise ApiError("too_many_pins")
        created = int(api.clock())
        db.execute(
            "INSERT INTO pins (channel, ts_us, pinned_by, created) VALUES (?, ?, ?, ?)",
            (channel.id, ts_us, call.me.id, created),
        )
        event = _pin_event(store, "pin_added", channel, call.me, ts_us, created)
    api.publish([event])
    return {}


@method("pins.remove", writes=True)
def pins_remove(api: WebApi, call: Call) -> dict[str, Any]:
    channel, ts_us = _target(api, call)
    store = api.store
    with store.transaction() as db:
        if not store.is_member(channel.id, call.me.id):
            raise ApiError("not_in_channel")
        row = db.execute("SELECT created FROM pins WHERE channel = ? AND ts_us = ?", (channel.id, ts_us)).fetchone()
        if row is None:
            store.message(channel.id, us_to_ts(ts_us))  # message_not_found before no_pin
            raise ApiError("no_pin")
        db.execute("DELETE FROM pins WHERE channel = ? AND ts_us = ?", (channel.id, ts_us))
        try:
            event = _pin_event(store, "pin_removed", channel, call.me, ts_us, int(row[0]))
        except ApiError:  # the message was deleted after it was pinned: the pin just goes
            return {}
    api.publish([event])
    return {}


@method("pins.list")
def pins_list(api: WebApi, call: Call) -> dict[str, Any]:
    channel = readable_channel(api, call)
    rows = api.store.conn.execute(
        "SELECT ts_us, pinned_by, created FROM pins WHERE channel = ? ORDER BY created DESC, ts_us DESC", (channel.id,)
    ).fetchall()
    items = []
    for ts_us, pinned_by, created in rows:
        try:
            message = api.store.message(channel.id, us_to_ts(ts_us))
        except ApiError:
            continue
        items.append(
            {"type": "message", "channel": channel.id, "message": message, "created": created, "created_by": pinned_by}
        )
    return {"items": items}
