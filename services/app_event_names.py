"""The Events API events an app may subscribe to (its manifest's ``bot_events``), named once.

The webapp checks a manifest against :data:`APP_EVENTS` (webapp_stub/apps.py); the
gateway turns the RTM events a bot's connection receives into them
(gateway/app_events.py). docs/socket-mode.md describes each.
"""

from __future__ import annotations

# message.* name the message events of one conversation type, by the event's ``channel_type``.
MESSAGE_EVENTS = {"channel": "message.channels", "group": "message.groups", "im": "message.im", "mpim": "message.mpim"}
APP_MENTION = "app_mention"
# RTM events an app gets as they are, if it subscribed to them.
PASSED_THROUGH = (
    "reaction_added",
    "reaction_removed",
    "member_joined_channel",
    "member_left_channel",
    "channel_created",
    "channel_rename",
    "channel_archive",
    "team_join",  # someone new in the team (rtm users add; webapp_stub/team_join.py): the welcome bot's event
    "user_change",  # a profile changed (users.profile.set)
)
# The app's own bot token revoked (auth.revoke): Slack sends it "if it is subscribed"
# (docs.slack.dev/reference/events/tokens_revoked), so it is a subscription like the others.
TOKENS_REVOKED = "tokens_revoked"
APP_EVENTS = (*MESSAGE_EVENTS.values(), APP_MENTION, *PASSED_THROUGH, TOKENS_REVOKED)
