"""gateway.client_messages: what clients send over their websocket, against a fake gateway."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest

from gateway.client_messages import TYPING_BURST, ClientError, ClientMessages
from gateway.state import Session
from services.errors import PeerError
from tests.support import FakeClientGateway, FakeClock, FakeWs, Socket


@pytest.fixture
def gw() -> FakeClientGateway:
    return FakeClientGateway()


def setup(gw: FakeClientGateway, clock: FakeClock | None = None) -> tuple[ClientMessages, Session, Socket]:
    sock = Socket()
    session = Session(sid=1, user="UA", team="T1", write=sock.write, channels={"UA", "T1", "C1"}, token_id="tid-UA")
    return ClientMessages(gw, clock=clock or FakeClock(100.0)), session, sock


def count(gw: FakeClientGateway, name: str, **labels: str) -> float:
    return gw.metrics.registry.get_sample_value(name, labels) or 0.0


def test_ping_is_answered_with_echoed_fields(gw: FakeClientGateway) -> None:
    handler, session, sock = setup(gw)
    handler.handle(FakeWs(gw), session, json.dumps({"id": 3, "type": "ping", "time": 9}))
    assert sock.events == [{"type": "pong", "reply_to": 3, "time": 9}]


def test_invalid_and_unsupported_frames_get_errors(gw: FakeClientGateway) -> None:
    handler, session, sock = setup(gw)
    handler.handle(FakeWs(gw), session, "[1, 2]")
    handler.handle(FakeWs(gw), session, json.dumps({"id": 4, "type": "dance"}))
    handler.handle(FakeWs(gw), session, json.dumps({"type": "dance"}))
    assert [e.get("error", {}).get("code") for e in sock.events] == [
        ClientError.INVALID_JSON,
        ClientError.UNSUPPORTED_TYPE,
        ClientError.UNSUPPORTED_TYPE,
    ]
    assert sock.events[1]["reply_to"] == 4 and sock.events[1]["ok"] is False and sock.events[2]["type"] == "error"
    assert count(gw, "rtm_errors_total", kind="client_unsupported_type") == 2


@pytest.mark.parametrize(
    "frame", ["[" * 65536, '{"a":' * 30000, "[" * 200_000 + "]" * 200_000], ids=["brackets", "objects", "balanced"]
)
def test_json_nested_past_the_parser_gets_error_code_1(gw: FakeClientGateway, frame: str) -> None:
    """64 KiB of ``[`` used to raise RecursionError out of the read loop: a 1011 close."""
    handler, session, sock = setup(gw)
    handler.handle(FakeWs(gw), session, frame)
    handler.handle(FakeWs(gw), session, json.dumps({"id": 5, "type": "ping"}))  # the connection still works
    assert sock.events[0] == {"type": "error", "error": {"code": 1, "msg": "invalid JSON: expected an object"}}
    assert sock.events[1] == {"type": "pong", "reply_to": 5}
    assert count(gw, "rtm_errors_total", kind="client_invalid_json") == 1
    assert gw.closed == []


async def test_binary_frame_closes_with_1003(gw: FakeClientGateway) -> None:
    handler, session, _ = setup(gw)
    handler.handle(FakeWs(gw), session, b"\x00")
    await asyncio.gather(*gw.tasks)
    assert gw.closed == [1003]


def test_typing_goes_to_the_owner_as_a_transient_pub_from_the_user(gw: FakeClientGateway) -> None:
    handler, session, sock = setup(gw)
    handler.handle(FakeWs(gw), session, json.dumps({"id": 1, "type": "typing", "channel": "C1"}))
    [pub] = gw.link.conn.sent
    assert pub["op"] == "pub" and pub["ch"] == "C1" and pub["seq"] is None and pub["ctl"] == {"from": "UA"}
    assert pub["id"] < 0  # a request nobody waits for: its reply matches nothing
    assert json.loads(pub["json"]) == {"type": "user_typing", "channel": "C1", "user": "UA"}
    assert sock.frames == []  # typing is never answered
    assert count(gw, "rtm_gw_typing_total", outcome="sent") == 1


def test_typing_only_for_subscribed_conversations(gw: FakeClientGateway) -> None:
    handler, session, _ = setup(gw)
    for channel in ("C2", "UA", "T1", None):
        handler.handle(FakeWs(gw), session, json.dumps({"id": 1, "type": "typing", "channel": channel}))
    assert gw.link.conn.sent == []
    assert count(gw, "rtm_gw_typing_total", outcome="not_subscribed") == 4


def test_no_typing_into_a_channel_the_user_left(gw: FakeClientGateway) -> None:
    """A leave still waiting for its ``upto`` (the session follows C1 up to the leave) already
    ends the user's say in C1: their typing is not sent."""
    handler, session, _ = setup(gw)
    session.until["C1"] = 9
    handler.handle(FakeWs(gw), session, json.dumps({"id": 1, "type": "typing", "channel": "C1"}))
    assert gw.link.conn.sent == []
    assert count(gw, "rtm_gw_typing_total", outcome="not_subscribed") == 1


def test_typing_is_rate_limited_per_connection_and_refills(gw: FakeClientGateway) -> None:
    clock = FakeClock(100.0)
    handler, session, _ = setup(gw, clock)
    other = Session(sid=2, user="UB", team="T1", write=Socket().write, channels={"C1"})
    frame = json.dumps({"id": 1, "type": "typing", "channel": "C1"})
    for _ in range(TYPING_BURST + 2):
        handler.handle(FakeWs(gw), session, frame)
    assert len(gw.link.conn.sent) == TYPING_BURST
    assert count(gw, "rtm_gw_typing_total", outcome="rate_limited") == 2
    handler.handle(FakeWs(gw), other, frame)  # another connection has its own budget
    assert len(gw.link.conn.sent) == TYPING_BURST + 1
    clock.now += 1.0
    handler.handle(FakeWs(gw), session, frame)
    assert len(gw.link.conn.sent) == TYPING_BURST + 2


def test_typing_is_dropped_when_the_link_is_down_or_no_owner(gw: FakeClientGateway) -> None:
    handler, session, _ = setup(gw)
    session.channels.add("CORPHAN")
    handler.handle(FakeWs(gw), session, json.dumps({"type": "typing", "channel": "CORPHAN"}))
    gw.link.connected = False
    handler.handle(FakeWs(gw), session, json.dumps({"type": "typing", "channel": "C1"}))
    assert gw.link.conn.sent == []
    assert count(gw, "rtm_gw_typing_total", outcome="no_owner") == 1
    assert count(gw, "rtm_gw_typing_total", outcome="not_connected") == 1


async def test_message_is_posted_through_the_webapp_and_acknowledged(gw: FakeClientGateway) -> None:
    handler, session, sock = setup(gw)
    handler.handle(
        FakeWs(gw), session, json.dumps({"id": 7, "type": "message", "channel": "C1", "text": "hi", "thread_ts": "1.2"})
    )
    await asyncio.gather(*gw.tasks)
    assert gw.webapp.calls == [
        (
            "/internal/call/chat.postMessage",
            {"user": "UA", "token_id": "tid-UA", "channel": "C1", "text": "hi", "thread_ts": "1.2"},
        )
    ]
    assert sock.events == [{"ok": True, "reply_to": 7, "ts": "1700000000.000100", "text": "hi"}]


async def test_message_errors_are_replies_with_codes(gw: FakeClientGateway) -> None:
    handler, session, sock = setup(gw)
    handler.handle(FakeWs(gw), session, json.dumps({"id": 1, "type": "message", "channel": "C1"}))
    handler.handle(FakeWs(gw), session, json.dumps({"id": 2, "type": "message", "text": "x"}))
    gw.webapp.error = PeerError("not_in_channel", {"ok": False, "error": "not_in_channel"})
    handler.handle(FakeWs(gw), session, json.dumps({"id": 3, "type": "message", "channel": "C9", "text": "x"}))
    await asyncio.gather(*gw.tasks)
    gw.webapp.error = OSError("connection refused")
    handler.handle(FakeWs(gw), session, json.dumps({"id": 4, "type": "message", "channel": "C9", "text": "x"}))
    await asyncio.gather(*gw.tasks)
    replies = {e["reply_to"]: e for e in sock.events}
    assert replies[1]["error"] == {"code": ClientError.BAD_MESSAGE, "msg": "message text is missing"}
    assert replies[2]["error"]["code"] == ClientError.BAD_MESSAGE
    assert replies[3] == {
        "ok": False,
        "reply_to": 3,
        "error": {"code": ClientError.SEND_FAILED, "msg": "not_in_channel"},
    }
    assert replies[4]["error"]["code"] == ClientError.SEND_FAILED
    assert handler.in_flight.get(session) is None  # nothing left in flight


async def test_sends_in_flight_are_bounded_per_connection(gw: FakeClientGateway) -> None:
    from gateway.client_messages import MAX_PENDING_SENDS

    handler, session, sock = setup(gw)
    release = asyncio.Event()
    original = gw.webapp.call

    async def slow(path: str, body: dict[str, Any]) -> dict[str, Any]:
        await release.wait()
        return await original(path, body)

    gw.webapp.call = slow  # type: ignore[method-assign]
    for i in range(MAX_PENDING_SENDS + 1):
        handler.handle(FakeWs(gw), session, json.dumps({"id": i, "type": "message", "channel": "C1", "text": "x"}))
    assert [e["reply_to"] for e in sock.events] == [MAX_PENDING_SENDS]
    assert sock.events[0]["error"]["code"] == ClientError.RATE_LIMITED
    release.set()
    await asyncio.gather(*gw.tasks)
    assert sum(1 for e in sock.events if e.get("ok")) == MAX_PENDING_SENDS


async def test_messages_are_limited_to_about_one_per_second_with_bursts(gw: FakeClientGateway) -> None:
    from gateway.client_messages import MESSAGE_BURST

    clock = FakeClock(100.0)
    handler, session, sock = setup(gw, clock)
    for i in range(MESSAGE_BURST + 1):
        handler.handle(FakeWs(gw), session, json.dumps({"id": i, "type": "message", "channel": "C1", "text": "x"}))
        await asyncio.gather(*gw.tasks)  # each send completes: only the rate counts here
    refused = [e for e in sock.events if e.get("ok") is False]
    assert [e["reply_to"] for e in refused] == [MESSAGE_BURST]
    assert refused[0]["error"]["code"] == ClientError.RATE_LIMITED
    clock.now += 1.0  # one second later: one more token
    handler.handle(FakeWs(gw), session, json.dumps({"id": 99, "type": "message", "channel": "C1", "text": "x"}))
    await asyncio.gather(*gw.tasks)
    assert any(e.get("ok") and e.get("reply_to") == 99 for e in sock.events)
