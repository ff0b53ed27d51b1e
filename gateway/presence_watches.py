"""A gateway's presence model, sans I/O: which local sessions watch which users (reference-counted),
which users have connections here, what each watched user's presence was last said to be; and
Slack's ``presence_change`` events. :mod:`gateway.presence` wires it to the presence servers."""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from gateway.state import Session

JSON_SEPARATORS = (",", ":")


def presence_events(items: Iterable[tuple[str, str]]) -> list[bytes]:
    """Slack's ``presence_change`` JSON for (user, presence) pairs: one event per
    presence value, the ``users`` form when it names several users."""
    by_presence: dict[str, list[str]] = {}
    for user, presence in items:
        by_presence.setdefault(presence, []).append(user)
    events = []
    for presence, users in by_presence.items():
        if len(users) == 1:
            body: dict[str, Any] = {"type": "presence_change", "user": users[0], "presence": presence}
        else:
            body = {"type": "presence_change", "users": users, "presence": presence}
        events.append(json.dumps(body, separators=JSON_SEPARATORS).encode())
    return events


@dataclass
class WatchEffects:
    subscribe: list[str] = field(default_factory=list)  # first watcher here: psub at the owner
    unsubscribe: list[str] = field(default_factory=list)  # last watcher gone: punsub
    answer: list[tuple[str, str]] = field(default_factory=list)  # known already: tell the session now


class PresenceWatches:
    """Sans-I/O: local online counts and reference-counted watches."""

    def __init__(self) -> None:
        self.online: dict[str, int] = {}  # user -> connections on this gateway
        self.watching: dict[Session, set[str]] = {}  # session -> the users it watches
        self.watchers: dict[str, set[Session]] = {}  # user -> sessions watching (the reference count)
        self.known: dict[str, str] = {}  # watched user -> presence last told to its watchers
        self.waiting: dict[str, set[Session]] = {}  # watched user -> sessions not answered yet

    # -- online ------------------------------------------------------------------------------
    def connect(self, user: str) -> bool:
        """A connection of ``user`` opened; True if it is their first here."""
        count = self.online.get(user, 0)
        self.online[user] = count + 1
        return count == 0

    def disconnect(self, user: str) -> bool:
        """A connection of ``user`` closed; True if it was their last here."""
        count = self.online.get(user, 0)
        if count <= 1:
            self.online.pop(user, None)
            return count == 1
        self.online[user] = count - 1
        return False

    # -- watches -----------------------------------------------------------------------------
    def replace(self, session: Session, users: Iterable[str]) -> WatchEffects:
        """``presence_sub``: ``session`` now watches exactly ``users``."""
        effects = WatchEffects()
        new = set(users)
        old = self.watching.get(session, set())
        for user in old - new:
            self._unwatch(session, user, effects)
        for user in sorted(new - old):
            watchers = self.watchers.get(user)
            if watchers is None:
                self.watchers[user] = {session}
                self.waiting.setdefault(user, set()).add(session)
                effects.subscribe.append(user)
                continue
            watchers.add(session)
            presence = self.known.get(user)
            if presence is None:  # asked for, not answered yet
                self.waiting.setdefault(user, set()).add(session)
            else:
                effects.answer.append((user, presence))
        if new:
            self.watching[session] = new
        else:
            self.watching.pop(session, None)
        return effects

    def drop(self, session: Session) -> WatchEffects:
        """The session closed."""
        return self.replace(session, ())

    def _unwatch(self, session: Session, user: str, effects: WatchEffects) -> None:
        watchers = self.watchers.get(user)
        if watchers is None:
            return
        watchers.discard(session)
        waiting = self.waiting.get(user)
        if waiting is not None:
            waiting.discard(session)
        if not watchers:
            del self.watchers[user]
            self.known.pop(user, None)
            self.waiting.pop(user, None)
            effects.unsubscribe.append(user)

    def apply(self, changes: Iterable[tuple[str, str]]) -> dict[Session, list[tuple[str, str]]]:
        """A PS pushed presence (a change, or the state after a ``psub`` or a
        re-sync): what to tell which session. Watchers hear of a user when the
        presence differs from what they were last told; sessions still waiting
        for a first answer hear it in any case."""
        tell: dict[Session, list[tuple[str, str]]] = {}
        for user, presence in changes:
            watchers = self.watchers.get(user)
            if not watchers:
                continue  # unwatched meanwhile
            waiting = self.waiting.pop(user, ())
            targets = watchers if self.known.get(user) != presence else waiting
            self.known[user] = presence
            for session in targets:
                tell.setdefault(session, []).append((user, presence))
        return tell
