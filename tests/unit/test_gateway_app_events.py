"""gateway/app_events.py: RTM events to the Events API events an app subscribed to."""

from __future__ import annotations

from gateway.app_events import AppProfile, app_events, event_callback
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


def test_event_callback_shape() -> None:
    body = event_callback(APP, {"type": "app_mention", "event_ts": "1700000000.000100"}, 5.0)
    assert body["type"] == "event_callback" and body["api_app_id"] == "A1" and body["team_id"] == "T1"
    assert body["event_time"] == 1700000000 and body["event_id"].startswith("Ev")
    assert body["authorizations"] == [
        {"enterprise_id": None, "team_id": "T1", "user_id": "UBOT", "is_bot": True, "is_enterprise_install": False}
    ]
