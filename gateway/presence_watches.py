"""A gateway's presence model, sans I/O: which local sessions watch which users (reference-counted),
which users have connections here, what each watched user's presence was last said to be; and
Slack's ``presence_change`` events. :mod:`gateway.presence` wires it to the presence servers.

Teams (docs/authz-review.md, finding 5): a session sees the presence of the users of its own
team only, as Slack answers only about users the caller can see. The presence servers say each
user's team beside its presence (they learn it from the gateways' ``online`` reports, which
carry the team of each session's user); a user of another team is answered ``away``, as a user
nobody knows is, and its changes are not pushed to that session. A user whose team no server
has said (never reported online with a team: away anyway, unless reported by a gateway older
than the rule, during a rolling upgrade) is shown to everyone, as before the rule.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from gateway.state import Session

JSON_SEPARATORS = (",", ":")
AWAY = "away"  # what a session is told of a user it may not see: what a user nobody knows is


def visible(viewer_team: str, team: str | None) -> bool:
    """Whether a session of ``viewer_team`` may see the presence of a user of ``team``: the same
    team, or a team not known (a user reported by a gateway older than the rule)."""
    return team is None or team == viewer_team


def shown(viewer_team: str, presence: str, team: str | None) -> str:
    """The presence a session of ``viewer_team`` is told for a user of ``team``: the user's own
    when :func:`visible`, else ``away``."""
    return presence if visible(viewer_team, team) else AWAY


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
        self.online_team: dict[str, str] = {}  # user with connections here -> their team (from the bootstrap)
        self.watching: dict[Session, set[str]] = {}  # session -> the users it watches
        self.watchers: dict[str, set[Session]] = {}  # user -> sessions watching (the reference count)
        self.known: dict[str, str] = {}  # watched user -> presence last told to its watchers
        self.waiting: dict[str, set[Session]] = {}  # watched user -> sessions not answered yet
        self.team: dict[str, str] = {}  # watched user -> team, as a presence server said it
        self.withheld = 0  # entries answered away to, or not pushed to, a session of another team

    # -- online ------------------------------------------------------------------------------
    def connect(self, user: str, team: str) -> bool:
        """A connection of ``user`` (of ``team``) opened; True if it is their first here."""
        count = self.online.get(user, 0)
        self.online[user] = count + 1
        self.online_team[user] = team
        return count == 0

    def disconnect(self, user: str) -> bool:
        """A connection of ``user`` closed; True if it was their last here."""
        count = self.online.get(user, 0)
        if count <= 1:
            self.online.pop(user, None)
            self.online_team.pop(user, None)
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
            presence = self.presence_for(session, user)
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
            self.team.pop(user, None)
            effects.unsubscribe.append(user)

    def presence_for(self, session: Session, user: str) -> str | None:
        """What ``session`` is told of ``user`` from what this gateway knows (None: not known
        yet): its presence, or ``away`` for a user of another team (:func:`shown`)."""
        presence = self.known.get(user)
        if presence is None:
            return None
        if visible(session.team, self.team.get(user)):
            return presence
        self.withheld += 1
        return AWAY

    def apply(
        self, changes: Iterable[tuple[str, str]], teams: Sequence[str | None] | None = None
    ) -> dict[Session, list[tuple[str, str]]]:
        """A PS pushed presence (a change, or the state after a ``psub`` or a
        re-sync), with each user's team (``teams``, in order; None: not said):
        what to tell which session. Watchers hear of a user when the presence
        differs from what they were last told; sessions still waiting for a first
        answer hear it in any case. A session of another team than the user's is
        answered ``away`` once, and hears nothing after."""
        tell: dict[Session, list[tuple[str, str]]] = {}
        for i, (user, presence) in enumerate(changes):
            watchers = self.watchers.get(user)
            if not watchers:
                continue  # unwatched meanwhile
            team = None if teams is None else teams[i]
            if team is not None:
                self.team[user] = team
            else:
                team = self.team.get(user)
            waiting = self.waiting.pop(user, ())
            targets = watchers if self.known.get(user) != presence else waiting
            self.known[user] = presence
            for session in targets:
                if visible(session.team, team):
                    tell.setdefault(session, []).append((user, presence))
                    continue
                self.withheld += 1
                if session in waiting:  # its first answer: as for a user nobody knows
                    tell.setdefault(session, []).append((user, AWAY))
        return tell
