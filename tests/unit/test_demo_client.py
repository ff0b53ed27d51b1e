"""rtmctl.demo_client: ``describe``, one line per event for `rtm tail` (no sockets); ``rtm post`` and
``rtm tail`` when the webapp does not answer."""

from __future__ import annotations

import json
import socket
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from rtmctl import demo_client
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


def a_fleet_that_is_not_up(data_dir: Path) -> str:
    """seed.json and fleet.json as ``rtm up`` left them, the webapp's port now closed; its API URL."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        api_url = f"http://127.0.0.1:{probe.getsockname()[1]}/api/"
    users = [{"id": "U1", "name": "alice", "token": "xoxp-1"}, {"id": "U2", "name": "bob", "token": "xoxp-2"}]
    (data_dir / "seed.json").write_text(json.dumps({"users": users, "channels": [{"id": "C1", "name": "general"}]}))
    (data_dir / "fleet.json").write_text(json.dumps({"api_url": api_url}))
    return api_url


@pytest.mark.parametrize("argv", [["post", "alice", "general", "hi"], ["tail", "bob"]])
def test_a_fleet_that_is_not_up_is_a_sentence_not_a_traceback(
    argv: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``rtm post`` / ``rtm tail`` after the fleet stopped (before: aiohttp's ClientConnectorError traceback)."""
    api_url = a_fleet_that_is_not_up(tmp_path)
    assert demo_client.main([*argv, "--data-dir", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"rtm {argv[0]}: cannot reach the webapp at {api_url} (")
    assert err.rstrip().endswith(f"is the fleet up (`rtm up --data-dir {tmp_path}`)?")


def test_tail_rides_through_a_webapp_restart(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Once connected, a webapp that does not answer (``rtm kill webapp``: it is restarting) is
    retried like a closed socket, not a traceback that ends ``rtm tail``."""
    a_fleet_that_is_not_up(tmp_path)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        closed_ws = f"ws://127.0.0.1:{probe.getsockname()[1]}/ws/ticket"
    answers: list[Any] = [
        {"ok": True, "url": closed_ws},  # connected; then its gateway is gone too
        aiohttp.ClientConnectionError("webapp restarting"),
        {"ok": False, "error": "invalid_auth"},  # the end of the test: rtm tail exits 1
    ]

    async def scripted_call(*args: Any, **kwargs: Any) -> dict[str, Any]:
        answer = answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return dict(answer)

    monkeypatch.setattr(demo_client, "call", scripted_call)
    monkeypatch.setattr(demo_client, "RECONNECT_DELAY_S", 0.0)
    assert demo_client.main(["tail", "bob", "--data-dir", str(tmp_path)]) == 1
    out = capsys.readouterr()
    assert "the webapp does not answer (webapp restarting); retrying" in out.out
    assert "rtm.connect failed: invalid_auth" in out.err and not answers


def test_someone_who_joins_the_team_is_named_from_then_on() -> None:
    names = dict(NAMES)
    joined = {"type": "team_join", "user": {"id": "U9", "name": "frank", "profile": {"title": ""}}}
    assert describe(joined, names, CHANNELS).split() == ["team_join", "-", "frank"]
    line = describe({"type": "message", "channel": "C1", "user": "U9", "text": "frank here"}, names, CHANNELS)
    assert line.split()[:4] == ["message", "#general", "frank", "frank"]


@pytest.mark.parametrize(
    ("channel", "error", "said"),
    [
        (
            "nosuch",
            "channel_not_found",
            "rtm post: no channel 'nosuch' (channel_not_found); known: general, or a channel's id",
        ),
        ("general", "not_in_channel", "rtm post: the webapp refused the post: not_in_channel"),
    ],
)
def test_a_refused_post_says_so_in_one_line_naming_the_command(
    channel: str,
    error: str,
    said: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``rtm post alice nosuch hi`` printed ``error: channel_not_found``, not which command or what to give."""
    a_fleet_that_is_not_up(tmp_path)

    async def refused(*args: Any, **kwargs: Any) -> dict[str, Any]:
        return {"ok": False, "error": error}

    monkeypatch.setattr(demo_client, "call", refused)
    assert demo_client.main(["post", "alice", channel, "hi", "--data-dir", str(tmp_path)]) == 1
    assert capsys.readouterr().err == said + "\n"
