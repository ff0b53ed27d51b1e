"""A conversation's topic and purpose, and where each member has read up to.

``conversations.setTopic`` / ``setPurpose`` store the value with who set it and
when, and post Slack's ``channel_topic`` / ``channel_purpose`` message (for a
private channel ``group_topic`` / ``group_purpose``) in the conversation.
``conversations.mark`` stores the member's read position and tells all of
that user's connections with ``channel_marked`` (``group_marked`` for private
channels and group DMs, ``im_marked`` for DMs) on the user's channel.
"""

from __future__ import annotations

from typing import Any

from webapp_stub.codecs import ts_to_us, us_to_ts
from webapp_stub.errors import ApiError
from webapp_stub.messages import MessageStore
from webapp_stub.models import Channel, Event, User

MAX_TOPIC_CHARS = 250  # Slack: "too_long" past 250 characters (topic and purpose alike)
DETAIL_KINDS = ("topic", "purpose")


class ChannelDetailStore(MessageStore):
    """The ``channel_details`` table and ``members.last_read``."""

    def details(self, channel: str) -> dict[str, dict[str, Any]]:
        """``{"topic": {value, creator, last_set}, "purpose": {...}}`` (empty values when never set)."""
        found = {kind: {"value": "", "creator": "", "last_set": 0} for kind in DETAIL_KINDS}
        for kind, value, creator, last_set in self.conn.execute(
            "SELECT kind, value, creator, last_set FROM channel_details WHERE channel = ?", (channel,)
        ):
            found[kind] = {"value": value, "creator": creator, "last_set": int(last_set)}
        return found

    def set_detail(self, channel: Channel, user: User, kind: str, value: str) -> list[Event]:
        """Set ``kind`` (topic or purpose) and post its message. Raises ``too_long``,
        ``not_in_channel``, ``is_archived``, ``method_not_supported_for_channel_type`` (a DM)."""
        assert kind in DETAIL_KINDS
        if channel.is_im:
            raise ApiError("method_not_supported_for_channel_type")
        if len(value) > MAX_TOPIC_CHARS:
            raise ApiError("too_long")
        prefix = "group" if channel.is_private or channel.is_mpim else "channel"
        if value:
            text = f"<@{user.id}> set the channel {kind}: {value}"
        else:
            text = f"<@{user.id}> cleared the channel {kind}"
        # two short transactions: the message (which checks membership and archiving), then the value
        _message, event = self.post_message(channel, user, text, subtype=f"{prefix}_{kind}", extra={kind: value})
        with self.transaction() as db:
            db.execute(
                "INSERT INTO channel_details (channel, kind, value, creator, last_set) VALUES (?, ?, ?, ?, ?) "
                "ON CONFLICT (channel, kind) DO UPDATE SET value = excluded.value, creator = excluded.creator, "
                "last_set = excluded.last_set",
                (channel.id, kind, value, user.id, int(self.clock())),
            )
        return [event]

    def mark(self, channel: Channel, user: User, ts: Any) -> list[Event]:
        """Move ``user``'s read position in ``channel`` to ``ts`` (back too: "mark unread"); a mark where it
        already is writes nothing. Raises ``invalid_timestamp``, ``not_in_channel``."""
        try:
            ts_text = us_to_ts(ts_to_us(str(ts))) if ts not in (None, "") else ""
        except ValueError:
            raise ApiError("invalid_timestamp") from None
        if not ts_text:
            raise ApiError("invalid_timestamp")
        kind = (
            "im_marked"
            if channel.is_im
            else ("group_marked" if channel.is_private or channel.is_mpim else "channel_marked")
        )
        with self.transaction() as db:
            if not self.is_member(channel.id, user.id):
                raise ApiError("not_in_channel")
            if self.last_read(channel.id, user.id) == ts_text:
                return []  # where it is already: no write, no event (a client marking as it reads)
            db.execute(
                "UPDATE members SET last_read = ? WHERE channel = ? AND user = ?", (ts_text, channel.id, user.id)
            )
            payload = {
                "type": kind,
                "channel": channel.id,
                "ts": ts_text,
                "unread_count": 0,
                "unread_count_display": 0,
                "num_mentions": 0,
                "num_mentions_display": 0,
                "mention_count": 0,
                "mention_count_display": 0,
            }
            seq, ts_us = self._next_seq(user.id, with_ts=True)
            payload["event_ts"] = us_to_ts(ts_us)
            return [self._append_event(user.id, payload, seq=seq)]

    def last_read(self, channel: str, user: str) -> str:
        row = self.conn.execute(
            "SELECT last_read FROM members WHERE channel = ? AND user = ?", (channel, user)
        ).fetchone()
        return str(row[0]) if row and row[0] else "0000000000.000000"
