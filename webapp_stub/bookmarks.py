"""Channel bookmarks: ``bookmarks.add``, ``bookmarks.edit``, ``bookmarks.remove``,
``bookmarks.list``, and the events that tell a conversation's members.

A bookmark is a row of ``bookmarks``: a link with a title and an emoji, in a
conversation, at most :data:`MAX_BOOKMARKS_PER_CHANNEL` (Slack: "Conversations are
limited to 100 bookmarks"). Its object follows Slack's ``bookmarks.add`` reply
(``id`` ``Bk…``, ``channel_id``, ``title``, ``link``, ``emoji``, ``icon_url``,
``type``, ``entity_id``, ``date_created``, ``date_updated``, ``rank``,
``last_updated_by_user_id``, ``last_updated_by_team_id``, ``shortcut_id``,
``app_id``). Only ``type=link`` is accepted, as in Slack's docs
(``invalid_bookmark_type`` otherwise); a link must be an ``http(s)://`` URL.

Events: Slack's public docs list no RTM or Events API event for bookmarks (its own
client learns of them through internal events). rtm emits, on the conversation, in
``seq`` order with its messages: ``{"type": "bookmark_added", "channel_id",
"bookmark", "event_ts"}``, ``bookmark_updated`` (the edited bookmark) and
``bookmark_removed`` (the removed one). Error names where Slack's docs are silent
are rtm's: ``invalid_title``, ``invalid_link``, ``invalid_emoji``, ``too_many_bookmarks``,
``not_found`` (an unknown ``bookmark_id`` in that channel).
"""

from __future__ import annotations

import re
from typing import Any

from webapp_stub.api import Call, WebApi, method, str_arg
from webapp_stub.store import ApiError, Channel, Event, Store, new_id, us_to_ts

MAX_BOOKMARKS_PER_CHANNEL = 100  # Slack: conversations are limited to 100 bookmarks
MAX_TITLE_CHARS = 256
MAX_LINK_CHARS = 4096
MAX_EMOJI_CHARS = 100
TYPES = ("link",)
_LINK = re.compile(r"https?://[^\s]+", re.IGNORECASE)
_EMOJI = re.compile(r":[a-z0-9_+'-]+(::skin-tone-[2-6])?:")
_COLS = "id, channel, team, title, link, emoji, type, entity_id, date_created, date_updated, updated_by, position"


def bookmark_obj(row: tuple[Any, ...]) -> dict[str, Any]:
    bid, channel, team, title, link, emoji, kind, entity_id, created, updated, updated_by, position = row
    return {
        "id": bid,
        "channel_id": channel,
        "title": title,
        "link": link,
        "emoji": emoji,
        "icon_url": None,
        "type": kind,
        "entity_id": entity_id,
        "date_created": created,
        "date_updated": updated,
        "rank": _rank(position),
        "last_updated_by_user_id": updated_by,
        "last_updated_by_team_id": team,
        "shortcut_id": None,
        "app_id": None,
    }


def _rank(position: int) -> str:
    """A sortable rank string (Slack's are short letter strings)."""
    return f"{position:06d}"


def _title(value: Any) -> str:
    if not isinstance(value, str) or not value.strip() or len(value) > MAX_TITLE_CHARS:
        raise ApiError("invalid_title")
    return value.strip()


def _link(value: Any) -> str:
    if not isinstance(value, str) or len(value) > MAX_LINK_CHARS or not _LINK.fullmatch(value.strip()):
        raise ApiError("invalid_link")
    return value.strip()


def _emoji(value: Any) -> str | None:
    if value is None or value == "":
        return None
    if not isinstance(value, str) or len(value) > MAX_EMOJI_CHARS or not _EMOJI.fullmatch(value.strip()):
        raise ApiError("invalid_emoji")
    return value.strip()


def _channel(api: WebApi, call: Call, writing: bool) -> Channel:
    channel = api.channel_arg(call, "channel_id")
    if writing:
        if channel.is_archived:
            raise ApiError("is_archived")
        if not api.store.is_member(channel.id, call.me.id):
            raise ApiError("not_in_channel")
    return channel


def _find(store: Store, channel: Channel, call: Call) -> tuple[Any, ...]:
    bid = str_arg(call.args, "bookmark_id")
    if not bid:
        raise ApiError("invalid_arguments")
    row = store.conn.execute(
        f"SELECT {_COLS} FROM bookmarks WHERE id = ? AND channel = ?", (bid, channel.id)
    ).fetchone()
    if row is None:
        raise ApiError("not_found")
    return tuple(row)


def _event(store: Store, channel: Channel, kind: str, bookmark: dict[str, Any]) -> Event:
    seq, event_us = store._next_seq(channel.id, with_ts=True)
    payload = {"type": kind, "channel_id": channel.id, "bookmark": bookmark, "event_ts": us_to_ts(event_us)}
    return store._append_event(channel.id, payload, seq=seq)


@method("bookmarks.add", writes=True)
def bookmarks_add(api: WebApi, call: Call) -> dict[str, Any]:
    channel = _channel(api, call, writing=True)
    title = _title(call.args.get("title"))
    kind = str_arg(call.args, "type") or ""
    if kind not in TYPES:
        raise ApiError("invalid_bookmark_type")
    link = _link(call.args.get("link"))
    emoji = _emoji(call.args.get("emoji"))
    entity_id = str_arg(call.args, "entity_id") or None
    parent_id = str_arg(call.args, "parent_id") or None
    store, me = api.store, call.me
    with store.transaction() as db:
        count, top = db.execute(
            "SELECT count(*), coalesce(max(position), 0) FROM bookmarks WHERE channel = ?", (channel.id,)
        ).fetchone()
        if count >= MAX_BOOKMARKS_PER_CHANNEL:
            raise ApiError("too_many_bookmarks")
        row = (
            new_id("Bk"),
            channel.id,
            me.team,
            title,
            link,
            emoji,
            kind,
            entity_id,
            int(api.clock()),
            0,
            me.id,
            top + 1,
        )
        db.execute(
            f"INSERT INTO bookmarks ({_COLS}, parent_id) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (*row, parent_id),
        )
        bookmark = bookmark_obj(row)
        event = _event(store, channel, "bookmark_added", bookmark)
    api.publish([event])
    return {"bookmark": bookmark}


@method("bookmarks.edit", writes=True)
def bookmarks_edit(api: WebApi, call: Call) -> dict[str, Any]:
    channel = _channel(api, call, writing=True)
    store = api.store
    changes: dict[str, Any] = {}
    if call.args.get("title") is not None:
        changes["title"] = _title(call.args.get("title"))
    if call.args.get("link") is not None:
        changes["link"] = _link(call.args.get("link"))
    if call.args.get("emoji") is not None:
        changes["emoji"] = _emoji(call.args.get("emoji"))
    with store.transaction() as db:
        row = _find(store, channel, call)
        changes.update(date_updated=int(api.clock()), updated_by=call.me.id)
        sets = ", ".join(f"{name} = ?" for name in changes)
        db.execute(f"UPDATE bookmarks SET {sets} WHERE id = ?", (*changes.values(), row[0]))
        updated = db.execute(f"SELECT {_COLS} FROM bookmarks WHERE id = ?", (row[0],)).fetchone()
        bookmark = bookmark_obj(tuple(updated))
        event = _event(store, channel, "bookmark_updated", bookmark)
    api.publish([event])
    return {"bookmark": bookmark}


@method("bookmarks.remove", writes=True)
def bookmarks_remove(api: WebApi, call: Call) -> dict[str, Any]:
    channel = _channel(api, call, writing=True)
    store = api.store
    with store.transaction() as db:
        row = _find(store, channel, call)
        db.execute("DELETE FROM bookmarks WHERE id = ?", (row[0],))
        event = _event(store, channel, "bookmark_removed", bookmark_obj(row))
    api.publish([event])
    return {}


@method("bookmarks.list")
def bookmarks_list(api: WebApi, call: Call) -> dict[str, Any]:
    channel = _channel(api, call, writing=False)
    rows = api.store.conn.execute(
        f"SELECT {_COLS} FROM bookmarks WHERE channel = ? ORDER BY position", (channel.id,)
    ).fetchall()
    return {"bookmarks": [bookmark_obj(tuple(r)) for r in rows]}
