"""The webapp's records: teams, users, conversations, events, dead letters, pages.

Frozen dataclasses read from SQLite by :mod:`webapp_stub.store`; ``to_api``
gives the object Slack's Web API shows for each.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

# Page sizes. Slack recommends 200 and caps most list methods at 1000.
DEFAULT_PAGE = 100
MAX_PAGE = 1000
DEFAULT_HISTORY_PAGE = 100
MAX_HISTORY_PAGE = 999
# Distinct user ids one ``users`` argument may list (Slack's conversations.invite: "up to 1000"),
# checked before any is looked up: 250,000 ids in a 4 MB body held the event loop for 2.6 s.
MAX_USERS_LISTED = 1000
# Entries of one comma-separated ``users`` argument read at most, repeats and blanks included (more:
# the same refusal as too many ids): 4 MiB of commas are 4 million entries, 0.3 s of the event loop.
MAX_USERS_ENTRIES = 100 * MAX_USERS_LISTED
GENERAL = "general"  # the team's default channel: nobody leaves, is kicked from or archives it


@dataclass(frozen=True)
class Team:
    id: str
    name: str
    domain: str

    def to_api(self) -> dict[str, Any]:
        return {"id": self.id, "name": self.name, "domain": self.domain}


@dataclass(frozen=True)
class User:
    id: str
    team: str
    name: str
    real_name: str = ""
    is_bot: bool = False
    bot_id: str | None = None
    presence: str = "auto"  # "auto" or "away" (set by users.setPresence)

    def to_api(self) -> dict[str, Any]:
        """Slack's user object (users.info, users.list)."""
        profile: dict[str, Any] = {
            "real_name": self.real_name,
            "display_name": self.name,
            "real_name_normalized": self.real_name,
            "display_name_normalized": self.name,
            "team": self.team,
        }
        if self.bot_id:
            profile["bot_id"] = self.bot_id
        return {
            "id": self.id,
            "team_id": self.team,
            "name": self.name,
            "real_name": self.real_name,
            "deleted": False,
            "is_bot": self.is_bot,
            "is_app_user": False,
            "profile": profile,
        }


@dataclass(frozen=True)
class Channel:
    """A conversation: a channel (``C…``), a direct message (``D…``, kind ``im``)
    or a group direct message (``G…``, kind ``mpim``). DMs are private: only
    their members see them."""

    id: str
    team: str
    name: str
    created: int
    creator: str
    is_private: bool = False
    is_archived: bool = False
    kind: str = "channel"  # "channel", "im" or "mpim"

    @property
    def is_im(self) -> bool:
        return self.kind == "im"

    @property
    def is_mpim(self) -> bool:
        return self.kind == "mpim"

    @property
    def is_general(self) -> bool:
        return self.kind == "channel" and self.name == GENERAL

    @property
    def channel_type(self) -> str:
        """The letter Slack puts in ``channel_type``: C public, G private or group DM, D direct message."""
        if self.is_im:
            return "D"
        return "G" if self.is_private else "C"

    def to_api(self, **extra: Any) -> dict[str, Any]:
        """Slack's conversation object (conversations.info/list/create/open).

        For a direct message, pass ``user`` (the other member) in ``extra``.
        """
        if self.is_im:
            return {
                "id": self.id,
                "created": self.created,
                "is_im": True,
                "is_org_shared": False,
                "is_archived": False,
                "is_user_deleted": False,
                "context_team_id": self.team,
                "priority": 0,
                **extra,
            }
        return {
            "id": self.id,
            "name": self.name,
            "is_channel": self.kind == "channel" and not self.is_private,
            "is_group": self.kind == "channel" and self.is_private,
            "is_im": False,
            "is_mpim": self.is_mpim,
            "is_private": self.is_private,
            "created": self.created,
            "creator": self.creator,
            "is_archived": self.is_archived,
            "is_general": self.is_general,
            "name_normalized": self.name,
            "is_shared": False,
            "is_org_shared": False,
            "context_team_id": self.team,
            **extra,
        }


@dataclass(frozen=True)
class Event:
    """One persisted event: its channel's ``seq``, the exact JSON, the gateway control map."""

    channel: str
    seq: int
    json: str
    ctl: dict[str, Any] | None
    t0: float  # unix seconds when the event entered the fleet (its created_at)

    @property
    def eid(self) -> str:
        return f"{self.channel}:{self.seq}"


@dataclass(frozen=True)
class DeadLetter:
    """An event the fleet refused for good, parked by the hand-off (see webapp_stub.handoff).

    ``state`` is ``parked`` (waiting for an operator), ``redrive`` (an operator
    asked to send it again; the webapp picks it up within a second),
    ``redriving`` (back in the outbox) or ``delivered`` (a redrive was
    acknowledged). ``refusals`` counts the refusals that parked it, over all
    attempts; ``redrives`` how often an operator sent it again.
    """

    channel: str
    seq: int
    reason: str
    detail: str
    refusals: int
    state: str
    redrives: int
    parked_at: float
    updated_at: float

    @property
    def eid(self) -> str:
        return f"{self.channel}:{self.seq}"


DEAD_LETTER_STATES = ("parked", "redrive", "redriving", "delivered")


@dataclass(frozen=True)
class Page:
    items: list[Any]
    next_cursor: str  # "" on the last page


@dataclass(frozen=True)
class App:
    """A Slack app: its bot user, and the events (its manifest's subscriptions) it receives."""

    id: str
    team: str
    name: str
    bot_user: str
    events: tuple[str, ...]
    created: int

    def to_api(self) -> dict[str, Any]:
        """What a gateway needs to serve the app's Socket Mode connections."""
        return {
            "id": self.id,
            "team": self.team,
            "name": self.name,
            "bot_user": self.bot_user,
            "events": list(self.events),
        }
