"""Messages: posting, threads, edits, deletions, ephemeral messages, history and replies.

Edits and deletions are events on the message's channel with their own ``seq``
and ``event_ts``; ephemeral messages are events on the target user's channel
and never enter history.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Callable
from typing import Any

from webapp_stub import search_index
from webapp_stub.codecs import dumps, encode_cursor, int_cursor, stored_loads, ts_to_us, us_to_ts
from webapp_stub.conversations import ConversationStore
from webapp_stub.errors import ApiError
from webapp_stub.models import DEFAULT_HISTORY_PAGE, Channel, Event, User

MAX_TEXT_CHARS = 40_000  # Slack's limit for chat.postMessage text
REPLY_USERS_SHOWN = 5  # Slack lists at most this many reply_users on a thread parent


class MessageStore(ConversationStore):
    """The ``messages`` table (and, to decorate history, ``reactions``)."""

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
        subtype: str | None = None,
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
                thread_ts = self._thread_root(channel.id, thread_ts)
            if subtype is None and broadcast and thread_ts is not None:
                subtype = "thread_broadcast"
            seq, ts_us = self._next_seq(channel.id, with_ts=True)
            ts = us_to_ts(ts_us)
            message = _message_obj(user.id, user.team, text, ts, thread_ts, user.bot_id, extra, subtype)
            encoded = message_event_text(channel.id, ts, message)
            self._insert_message(db, channel.id, seq, ts_us, ts, user, text, thread_ts, extra, subtype)
            event = self._append_event(channel.id, {}, seq=seq, text=encoded)
        return message, event

    def _insert_message(
        self,
        db: sqlite3.Connection,
        channel: str,
        seq: int,
        ts_us: int,
        ts: str,
        user: User,
        text: str,
        thread_ts: str | None,
        extra: dict[str, Any] | None,
        subtype: str | None,
    ) -> None:
        """The ``messages`` row of a new post (inside the caller's transaction)."""
        db.execute(
            f"INSERT INTO messages (channel, seq, {self._MSG_COLS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                channel,
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

    def _thread_root(self, channel: str, thread_ts: str) -> str:
        """The ts of the thread a reply to ``thread_ts`` joins; the first reply makes its parent
        a thread root (inside the caller's transaction). Raises ``thread_not_found``."""
        parent_us = ts_to_us(thread_ts)
        parent = self.conn.execute(
            "SELECT thread_ts FROM messages WHERE channel = ? AND ts_us = ?", (channel, parent_us)
        ).fetchone()
        if parent is None:
            raise ApiError("thread_not_found")
        if parent[0] is None:  # the first reply makes the parent a thread root
            self.conn.execute(
                "UPDATE messages SET thread_ts = ts WHERE channel = ? AND ts_us = ?", (channel, parent_us)
            )
        return str(parent[0] or thread_ts)  # a reply to a reply joins the parent's thread

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
            kept = stored_loads(row[7]) if row[7] else None
            new_extra = extra if extra else kept
            search_index.note_change(db, channel.id, row[0])  # the search index's old text: search_index.py
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
            search_index.note_change(db, channel.id, row[0])
            db.execute("DELETE FROM messages WHERE channel = ? AND ts_us = ?", (channel.id, row[0]))
            search_index.note_deleted(db)
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
        below = int_cursor(cursor, "ts")
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
        after = int_cursor(cursor, "ts")
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


MESSAGE_PREFIX = '{"type":"message",'
_PLAIN_MESSAGE_KEYS = ["type", "user", "text", "ts", "team"]  # what _message_obj makes of a plain post
# The JSON string encoder that dumps (ensure_ascii=False) uses: the same text, without the encoder object.
_string: Callable[[str], str] = json.encoder.encode_basestring


def message_event_json(channel: str, ts: str, message: dict[str, Any]) -> str | None:
    """The ``message`` event's JSON for ``message`` posted in ``channel``, encoded once:
    ``{"type":"message","channel":C, <the message's other fields, in order>, "event_ts":ts}``,
    the exact text ``dumps`` gives for that payload, made from the message's own encoding
    so that :func:`message_reply_json` can give the message back without encoding it again.
    None when the message has fields that the splice cannot place (a ``channel`` or
    ``event_ts`` of its own): the caller encodes the payload as usual."""
    if len(message) == 5 and message.get("type") == "message":
        try:  # the common post: {"type","user","text","ts","team"}, strings, in this order
            user, text, msg_ts, team = message["user"], message["text"], message["ts"], message["team"]
            if list(message) == _PLAIN_MESSAGE_KEYS:
                return (
                    f'{{"type":"message","channel":{_string(channel)},"user":{_string(user)},"text":{_string(text)},'
                    f'"ts":{_string(msg_ts)},"team":{_string(team)},"event_ts":{_string(ts)}}}'
                )
        except (KeyError, TypeError):
            pass  # not strings: encode it the general way
    return spliced_event_json(channel, ts, message)


def message_event_text(channel: str, ts: str, message: dict[str, Any]) -> str:
    """The ``message`` event's JSON for ``message`` posted in ``channel``: :func:`message_event_json`,
    or, for a message it cannot splice, its payload encoded the general way (the same text)."""
    encoded = message_event_json(channel, ts, message)
    if encoded is not None:
        return encoded
    payload = {"type": "message", "channel": channel, **{k: v for k, v in message.items() if k != "type"}}
    payload["event_ts"] = ts
    return dumps(payload)


def spliced_event_json(channel: str, ts: str, message: dict[str, Any]) -> str | None:
    """:func:`message_event_json` for any message: spliced into its own encoding."""
    if "channel" in message or "event_ts" in message:
        return None
    body = dumps(message)
    if not body.startswith(MESSAGE_PREFIX):
        return None
    return (
        f'{{"type":"message","channel":{_quoted(channel)},{body[len(MESSAGE_PREFIX) : -1]},"event_ts":{_quoted(ts)}}}'
    )


def message_reply_json(channel: str, ts: str, event_json: str) -> str | None:
    """chat.postMessage's whole reply, ``{"ok":true,"channel":C,"ts":ts,"message":{...}}``,
    cut from the event's JSON (:func:`message_event_json`) instead of encoded again; None
    if ``event_json`` is not of that shape."""
    channel_json, ts_json = _quoted(channel), _quoted(ts)
    head = f'{{"type":"message","channel":{channel_json},'
    tail = f',"event_ts":{ts_json}}}'
    if not (event_json.startswith(head) and event_json.endswith(tail)):
        return None
    fields = event_json[len(head) : -len(tail)]
    return f'{{"ok":true,"channel":{channel_json},"ts":{ts_json},"message":{MESSAGE_PREFIX}{fields}}}}}'


def _quoted(value: str) -> str:
    """``dumps(value)`` for a string; without the encoder for ids and ts strings (letters,
    digits and dots, which JSON writes as they are)."""
    if value.isascii() and value.replace(".", "").isalnum():
        return f'"{value}"'
    return dumps(value)


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
    return _message_obj(
        user, team, text, ts, thread_ts, bot_id, stored_loads(extra) if extra else None, subtype, edited
    )
