"""Reactions on messages: add, remove (``reactions.get`` reads them with the message)."""

from __future__ import annotations

import re
import sqlite3
from typing import Any

from webapp_stub.codecs import us_to_ts
from webapp_stub.errors import ApiError
from webapp_stub.messages import MessageStore
from webapp_stub.models import Channel, Event, User

MAX_REACTION_NAME = 100


class ReactionStore(MessageStore):
    """The ``reactions`` table."""

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
