"""gateway/app_events.py: RTM events to the Events API events an app subscribed to."""

from __future__ import annotations

import json

from gateway.app_events import AppProfile, app_events, event_callback
from gateway.envelopes import EnvelopeBook
from services.app_event_names import APP_EVENTS

APP = AppProfile("A1", "T1", "UBOT", frozenset(APP_EVENTS), {"CPRIV"})


def test_message_gets_channel_type_by_conversation() -> None:
    for channel, kind in (("C1", "channel"), ("CPRIV", "group"), ("D1", "im"), ("G1", "mpim")):
        (out,) = app_events(APP, {"type": "message", "channel": channel, "user": "U1", "text": "hi", "ts": "1.000001"})
        assert out["channel_type"] == kind


def test_mention_gives_app_mention_too_but_not_for_the_bots_own_or_edits() -> None:
    msg = {"type": "message", "channel": "C1", "user": "U1", "text": "<@UBOT> hi", "ts": "1.1", "event_ts": "1.1"}
    kinds = [e["type"] for e in app_events(APP, msg)]
    assert kinds == ["message", "app_mention"]
    assert [e["type"] for e in app_events(APP, {**msg, "user": "UBOT"})] == ["message"]
    assert [e["type"] for e in app_events(APP, {**msg, "subtype": "message_changed"})] == ["message"]


def test_unsubscribed_and_other_events_give_nothing() -> None:
    only_mentions = AppProfile("A1", "T1", "UBOT", frozenset({"app_mention"}))
    assert app_events(only_mentions, {"type": "message", "channel": "C1", "user": "U1", "text": "x"}) == []
    assert app_events(APP, {"type": "user_typing", "channel": "C1", "user": "U1"}) == []
    assert app_events(APP, {"type": "message", "channel": "U1", "is_ephemeral": True, "text": "x"}) == []
    assert app_events(APP, {"type": "channel_joined", "channel": {"id": "C1"}}) == []
    (reaction,) = app_events(APP, {"type": "reaction_added", "user": "U1", "reaction": "+1"})
    assert reaction["reaction"] == "+1"


def test_someone_new_in_the_team_is_team_join_for_a_welcome_bot_if_subscribed() -> None:
    joined = {"type": "team_join", "user": {"id": "U9", "name": "frank"}}
    assert app_events(APP, joined) == [joined]
    changed = {"type": "user_change", "user": {"id": "U9", "name": "frank", "real_name": "F"}}
    assert app_events(APP, changed) == [changed]
    older = AppProfile("A1", "T1", "UBOT", frozenset(APP_EVENTS) - {"team_join", "user_change"})
    assert app_events(older, joined) == [] and app_events(older, changed) == []


def test_event_callback_shape() -> None:
    body = event_callback(APP, {"type": "app_mention", "event_ts": "1700000000.000100"}, 5.0)
    assert body["type"] == "event_callback" and body["api_app_id"] == "A1" and body["team_id"] == "T1"
    assert body["event_time"] == 1700000000 and body["event_id"].startswith("Ev")
    assert body["authorizations"] == [
        {"enterprise_id": None, "team_id": "T1", "user_id": "UBOT", "is_bot": True, "is_enterprise_install": False}
    ]


def test_a_private_channel_the_bot_joins_after_connecting_is_a_group_not_a_channel() -> None:
    """The bot invited to a private channel while its app is connected: that channel's messages
    are ``message.groups`` (``channel_type`` ``group``), never ``message.channels``, so an app
    that subscribed to public channels' messages only does not receive a private channel's."""
    public_only = AppProfile("A1", "T1", "UBOT", frozenset({"message.channels", "member_joined_channel"}))
    joined = {"type": "group_joined", "channel": {"id": "CLATER", "is_private": True, "is_channel": False}}
    assert app_events(public_only, joined) == []
    message = {"type": "message", "channel": "CLATER", "user": "U1", "text": "secret", "ts": "1.000001"}
    assert app_events(public_only, message) == []
    (member,) = app_events(public_only, {"type": "member_joined_channel", "user": "U2", "channel": "CLATER"})
    assert member["channel_type"] == "G"
    assert app_events(APP, {"type": "group_joined", "channel": {"id": "CLATER2"}}) == []
    (seen,) = app_events(APP, {**message, "channel": "CLATER2"})
    assert seen["channel_type"] == "group"
    (public,) = app_events(public_only, {**message, "channel": "CPUBLIC"})  # a public channel's still arrive
    assert public["channel_type"] == "channel"


def test_a_revoke_of_the_bots_token_is_slacks_tokens_revoked_if_subscribed_and_nothing_more() -> None:
    """auth.revoke of the app's bot token: the webapp's event on the bot's user channel becomes
    Slack's ``tokens_revoked`` (docs.slack.dev/reference/events/tokens_revoked: user ids, never
    tokens), in an ``event_callback`` and an ``events_api`` envelope like any other event; Slack
    sends it "if it is subscribed", so an app without the subscription gets nothing."""
    revoke = {"type": "tokens_revoked", "tokens": {"bot": ["UBOT"]}}
    (event,) = app_events(APP, revoke)
    assert event == {"type": "tokens_revoked", "tokens": {"bot": ["UBOT"]}}
    # rebuilt from the bot's id: whatever else an event carried never reaches the app
    leaky = {**revoke, "ctl": {"revoke": "a" * 32}, "token": "xoxb-secret", "tokens": {"bot": ["UBOT"], "x": ["y"]}}
    assert app_events(APP, leaky) == [event]
    unsubscribed = AppProfile("A1", "T1", "UBOT", frozenset(e for e in APP_EVENTS if e != "tokens_revoked"))
    assert app_events(unsubscribed, revoke) == []
    assert app_events(APP, {"type": "tokens_revoked", "tokens": {"bot": ["U2"]}}) == []  # not this app's bot
    assert app_events(APP, {"type": "tokens_revoked", "tokens": {"oauth": ["UBOT"]}}) == []
    assert app_events(APP, {"type": "tokens_revoked", "tokens": "UBOT"}) == []  # out of shape: nothing
    book = EnvelopeBook()
    book.open(1, 0.0)
    (send,) = book.add(event_callback(APP, event, 5.0), 0.0)
    frame = json.loads(send.text())
    assert frame["type"] == "events_api" and frame["retry_attempt"] == 0 and frame["envelope_id"]
    payload = frame["payload"]
    assert payload["type"] == "event_callback" and payload["api_app_id"] == "A1" and payload["team_id"] == "T1"
    assert payload["event"] == {"type": "tokens_revoked", "tokens": {"bot": ["UBOT"]}}
    assert payload["event_time"] == 5 and payload["authorizations"][0]["user_id"] == "UBOT"
    assert set(payload) == set(event_callback(APP, event, 5.0))  # the same fields as every event's, no ctl
