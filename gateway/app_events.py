"""From the fleet's RTM events to the Events API events an app subscribed to, pure.

The gateway follows an app's bot user like any user (its conversations, its
user channel, its team channel); each event that reaches it is turned here
into the Events API events of the app's manifest, each wrapped in Slack's
``event_callback`` payload (docs/socket-mode.md):

* ``message`` (all subtypes but ephemeral ones) -> ``message`` with
  ``channel_type`` (``channel``, ``group``, ``im``, ``mpim``), if the app
  subscribed to ``message.channels`` / ``.groups`` / ``.im`` / ``.mpim``.
  The bot's own messages are delivered too, as Slack does (Bolt drops them
  itself); an edit or deletion is the ``message`` event with its subtype.
* a message that mentions the bot (``<@U…>``), not by the bot itself ->
  ``app_mention`` as well.
* ``reaction_added``, ``reaction_removed``, ``member_joined_channel``,
  ``member_left_channel``, ``channel_created``, ``channel_rename``,
  ``channel_archive``, ``team_join``, ``user_change`` -> the same event, if subscribed.
* ``tokens_revoked`` naming the bot among ``tokens.bot`` (``auth.revoke`` of a
  bot token: the webapp's event on the bot's user channel, docs/authz-review.md
  finding 7) -> Slack's ``tokens_revoked`` ``{"tokens": {"bot": [bot user]}}``,
  if subscribed (Slack sends it "if it is subscribed"). It is built anew from the
  bot's id: nothing else of the fleet's event reaches the app (its ``ctl``, the
  revoked token's id, travels beside the event's JSON and is never in it).
* everything else (typing, presence, the bot's own ``channel_joined`` and
  the like, ephemeral messages) -> nothing.

Which channels are private the profile learns at connect (the bootstrap's
``private``) and from each ``group_joined`` on the bot's own channel (the bot
invited to, or creating, a private channel while its app is connected): without
the latter such a channel's messages would go out as ``channel_type`` ``channel``,
to an app that subscribed to ``message.channels`` only (docs/authz-review.md).
That record is the one thing :func:`app_events` changes; it is otherwise pure.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field
from typing import Any

from services.app_event_names import APP_MENTION, MESSAGE_EVENTS, PASSED_THROUGH, TOKENS_REVOKED

# Slack's verification token is a per-app string sent in every payload; deprecated, kept for shape.
VERIFICATION_TOKEN_PREFIX = "rtm-verification-"


@dataclass
class AppProfile:
    """What the gateway knows of an app: from ``/internal/bootstrap`` with ``app``."""

    id: str
    team: str
    bot_user: str
    events: frozenset[str]
    private: set[str] = field(default_factory=set)  # private channels the bot was in at connect

    @classmethod
    def from_bootstrap(cls, boot: dict[str, Any]) -> AppProfile:
        app = boot["app"]
        return cls(
            str(app["id"]),
            str(app["team"]),
            str(app["bot_user"]),
            frozenset(str(e) for e in app["events"]),
            {str(c) for c in boot.get("private", [])},
        )

    def learn(self, event: dict[str, Any]) -> None:
        """Note a private channel the bot joined (``group_joined`` on its own channel)."""
        if event.get("type") == "group_joined":
            channel = event.get("channel")
            if isinstance(channel, dict) and isinstance(channel.get("id"), str):
                self.private.add(channel["id"])

    def channel_type(self, channel: str) -> str:
        if channel.startswith("D"):
            return "im"
        if channel.startswith("G"):
            return "mpim"
        return "group" if channel in self.private else "channel"


def app_events(app: AppProfile, event: dict[str, Any]) -> list[dict[str, Any]]:
    """The Events API events ``event`` (an RTM event the bot's connection received) gives ``app``."""
    app.learn(event)
    kind = event.get("type")
    if kind == "message":
        if event.get("is_ephemeral") or not isinstance(event.get("channel"), str):
            return []
        channel_type = app.channel_type(event["channel"])
        out = []
        if MESSAGE_EVENTS[channel_type] in app.events:
            out.append({**event, "channel_type": channel_type})
        text = event.get("text")
        mentioned = isinstance(text, str) and f"<@{app.bot_user}>" in text
        plain = event.get("subtype") in (None, "thread_broadcast")
        if mentioned and plain and event.get("user") != app.bot_user and APP_MENTION in app.events:
            mention: dict[str, Any] = {
                k: event[k] for k in ("user", "text", "ts", "channel", "event_ts", "team") if k in event
            }
            if event.get("thread_ts"):
                mention["thread_ts"] = event["thread_ts"]
            for extra in ("blocks", "attachments"):
                if extra in event:
                    mention[extra] = event[extra]
            out.append({"type": APP_MENTION, **mention})
        return out
    if kind == TOKENS_REVOKED:
        return _tokens_revoked(app, event)
    if kind in PASSED_THROUGH and kind in app.events:
        out_event = dict(event)
        if kind in ("member_joined_channel", "member_left_channel") and isinstance(event.get("channel"), str):
            out_event.setdefault("channel_type", "G" if app.channel_type(event["channel"]) != "channel" else "C")
        return [out_event]
    return []


def _tokens_revoked(app: AppProfile, event: dict[str, Any]) -> list[dict[str, Any]]:
    """Slack's ``tokens_revoked`` when the revoked token is the app's bot's, if the app subscribed."""
    tokens = event.get("tokens")
    bots = tokens.get("bot") if isinstance(tokens, dict) else None
    if TOKENS_REVOKED not in app.events or not isinstance(bots, list) or app.bot_user not in bots:
        return []
    return [{"type": TOKENS_REVOKED, "tokens": {"bot": [app.bot_user]}}]


def event_callback(app: AppProfile, event: dict[str, Any], now: float) -> dict[str, Any]:
    """Slack's Events API ``event_callback`` payload around ``event``."""
    ts = event.get("event_ts") or event.get("ts")
    try:
        event_time = int(float(ts)) if ts else int(now)
    except (TypeError, ValueError):
        event_time = int(now)
    return {
        "token": VERIFICATION_TOKEN_PREFIX + app.id,
        "team_id": app.team,
        "context_team_id": app.team,
        "context_enterprise_id": None,
        "api_app_id": app.id,
        "event": event,
        "type": "event_callback",
        "event_id": "Ev" + secrets.token_hex(5).upper(),
        "event_time": event_time,
        "authorizations": [
            {
                "enterprise_id": None,
                "team_id": app.team,
                "user_id": app.bot_user,
                "is_bot": True,
                "is_enterprise_install": False,
            }
        ],
        "is_ext_shared_channel": False,
        "event_context": "4-" + secrets.token_urlsafe(24),
    }
