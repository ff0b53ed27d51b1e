"""rtmctl.demo_client.describe: one line per event for `rtm tail` (no sockets)."""

from __future__ import annotations

from rtmctl.demo_client import describe

NAMES = {"U1": "alice"}
CHANNELS = {"C1": "general"}


def test_a_message_names_its_channel_and_author() -> None:
    line = describe({"type": "message", "channel": "C1", "user": "U1", "text": "hi"}, NAMES, CHANNELS)
    assert line.startswith("message") and "#general" in line and "alice" in line and line.rstrip().endswith("hi")


def test_an_event_with_a_channel_object_shows_its_name_not_the_object() -> None:
    line = describe({"type": "channel_joined", "channel": {"id": "C2", "name": "random"}}, NAMES, CHANNELS)
    assert "#random" in line and "{" not in line


def test_an_event_without_a_channel_shows_a_dash() -> None:
    line = describe({"type": "tokens_revoked", "tokens": {"oauth": ["U1"]}}, NAMES, CHANNELS)
    assert line.split()[:2] == ["tokens_revoked", "-"]
