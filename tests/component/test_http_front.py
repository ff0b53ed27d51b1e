"""The lean chat.postMessage front (webapp_stub/http_front.py) on the webapp's real port: raw
HTTP/1.1 over a socket, so pipelining, the hand-over to aiohttp and closes are seen as bytes."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

from tests.component.test_webapp_hardening import metric, metrics
from tests.support import async_wait_until
from tests.webapp_harness import FakeAdminServer, Webapp, start
from webapp_stub.api import MAX_BODY_BYTES

READ_TIMEOUT_S = 10.0


def post(token: str, body: dict[str, Any], *, close: bool = False, target: str = "chat.postMessage") -> bytes:
    data = json.dumps(body).encode()
    head = (
        f"POST /api/{target} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(data)}\r\n"
    )
    if close:
        head += "Connection: close\r\n"
    return (head + "\r\n").encode() + data


async def read_response(reader: asyncio.StreamReader) -> tuple[int, dict[str, str], dict[str, Any]]:
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), READ_TIMEOUT_S)
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ")[1])
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:] if line)}
    body = await asyncio.wait_for(reader.readexactly(int(headers["content-length"])), READ_TIMEOUT_S)
    return status, headers, json.loads(body)


async def test_pipelined_posts_then_another_method_on_the_same_connection(
    webapp: Webapp, fake_as: FakeAdminServer
) -> None:
    alice, general = webapp.user("alice"), webapp.channel("general")
    front = webapp.server.front
    assert front is not None
    reader, writer = await asyncio.open_connection("127.0.0.1", webapp.port)
    # two posts in one write (pipelined), then auth.test: aiohttp takes the connection from
    # there, and a post after it is still answered, in order
    writer.write(
        post(alice["token"], {"channel": general, "text": "p1"})
        + post(alice["token"], {"channel": general, "text": "p2"})
        + post(alice["token"], {}, target="auth.test")
        + post(alice["token"], {"channel": general, "text": "p3"})
    )
    replies = [await read_response(reader) for _ in range(4)]
    assert [r[0] for r in replies] == [200] * 4
    assert [r[2]["message"]["text"] for r in (replies[0], replies[1], replies[3])] == ["p1", "p2", "p3"]
    assert replies[2][2]["ok"] and replies[2][2]["user_id"] == alice["id"]
    assert "aiohttp" not in replies[0][1].get("server", "") and front.handed_over == 1
    writer.close()

    async def delivered() -> bool:
        return [json.loads(p["json"])["text"] for p in fake_as.pubs_for(general)] == ["p1", "p2", "p3"]

    await async_wait_until(delivered, what="the three posts at the admin server, in order")


async def test_errors_on_the_lean_path_are_slacks_and_counted(webapp: Webapp) -> None:
    general = webapp.channel("general")
    reader, writer = await asyncio.open_connection("127.0.0.1", webapp.port)
    writer.write(post("xoxp-nope", {"channel": general, "text": "x"}))
    status, _, body = await read_response(reader)
    assert (status, body) == (200, {"ok": False, "error": "invalid_auth"})
    data = b"{broken"
    writer.write(
        b"POST /api/chat.postMessage HTTP/1.1\r\nContent-Type: application/json\r\n"
        + f"Content-Length: {len(data)}\r\n\r\n".encode()
        + data
    )
    status, _, body = await read_response(reader)
    assert (status, body) == (200, {"ok": False, "error": "invalid_json"})
    # a body over the limit: 413 before it is sent, and the connection is closed
    writer.write(
        b"POST /api/chat.postMessage HTTP/1.1\r\nContent-Type: application/json\r\n"
        + f"Content-Length: {MAX_BODY_BYTES + 1}\r\n\r\n".encode()
    )
    status, headers, body = await read_response(reader)
    assert (status, body["error"], headers["connection"]) == (413, "request_too_large", "close")
    assert await asyncio.wait_for(reader.read(), READ_TIMEOUT_S) == b""
    writer.close()
    values = await metrics(webapp)
    assert metric(values, "rtm_errors_total", kind="invalid_auth") >= 1
    assert metric(values, "rtm_errors_total", kind="invalid_json") >= 1
    assert metric(values, "rtm_errors_total", kind="request_too_large") >= 1
    # the server keeps serving
    status, reply = await webapp.call(
        "chat.postMessage", webapp.user("alice")["token"], json_body={"channel": general, "text": "ok"}
    )
    assert status == 200 and reply["ok"]


async def test_connection_close_and_idle_connections_are_closed(webapp: Webapp) -> None:
    alice, general = webapp.user("alice"), webapp.channel("general")
    front = webapp.server.front
    assert front is not None
    reader, writer = await asyncio.open_connection("127.0.0.1", webapp.port)
    writer.write(post(alice["token"], {"channel": general, "text": "bye"}, close=True))
    status, headers, body = await read_response(reader)
    assert status == 200 and body["ok"] and headers["connection"] == "close"
    assert await asyncio.wait_for(reader.read(), READ_TIMEOUT_S) == b""
    writer.close()
    idle_reader, idle_writer = await asyncio.open_connection("127.0.0.1", webapp.port)
    await async_wait_until(lambda: _true(len(front.connections) >= 1), what="the idle connection")
    assert front.close_idle(time.monotonic() + front.keepalive_timeout_s + 1) >= 1
    assert await asyncio.wait_for(idle_reader.read(), READ_TIMEOUT_S) == b""
    idle_writer.close()


async def _true(value: bool) -> bool:
    return value


async def test_a_malformed_head_gets_400_is_counted_and_nothing_else_stops(webapp: Webapp) -> None:
    general = webapp.channel("general")
    reader, writer = await asyncio.open_connection("127.0.0.1", webapp.port)
    # a bare LF inside the head: the front does not read it, aiohttp refuses it
    writer.write(b"POST /api/chat.postMessage HTTP/1.1\r\nX-A: a\nContent-Length: 0\r\nContent-Length: 0\r\n\r\n")
    first_line = await asyncio.wait_for(reader.readline(), READ_TIMEOUT_S)
    assert first_line.split(b" ")[1] == b"400"  # aiohttp answers a head it cannot parse as HTTP/1.0
    writer.close()
    values = await metrics(webapp)
    assert metric(values, "rtm_errors_total", kind="bad_http_request") == 1
    status, reply = await webapp.call(
        "chat.postMessage", webapp.user("alice")["token"], json_body={"channel": general, "text": "still ok"}
    )
    assert status == 200 and reply["ok"]


async def test_slow_requests_and_too_many_connections_are_refused_and_everyone_else_served(
    tmp_path: Path, fake_as: FakeAdminServer
) -> None:
    """Session 12 (webapp_stub/http_limits.py): a body sent a byte at a time to an aiohttp method
    is answered ``request_timeout``; a head that never ends on the lean path, 408
    ``request_timeout`` and closed; past the per-address limit, 503 ``too_many_connections``;
    each counted, and a post still goes through."""
    app = await start(tmp_path, fake_as, "--http-request-timeout-s", "0.5", "--max-http-connections-per-address", "4")
    front = app.server.front
    assert front is not None
    alice, general = app.user("alice"), app.channel("general")
    try:
        slow_reader, slow_body = await asyncio.open_connection("127.0.0.1", app.port)
        slow_body.write(
            f"POST /api/auth.test HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {alice['token']}\r\n"
            "Content-Type: application/x-www-form-urlencoded\r\nContent-Length: 100\r\n\r\nx=1".encode()
        )
        status, _, body = await read_response(slow_reader)
        assert (status, body) == (200, {"ok": False, "error": "request_timeout"})  # a Slack error, as any
        slow_body.close()

        head_reader, slow_head = await asyncio.open_connection("127.0.0.1", app.port)
        slow_head.write(b"POST /api/chat.postMessage HTTP/1.1\r\nHost: x\r\n")
        status, _, body = await read_response(head_reader)
        assert (status, body) == (408, {"ok": False, "error": "request_timeout"})
        assert await asyncio.wait_for(head_reader.read(), READ_TIMEOUT_S) == b""
        slow_head.close()

        async def released() -> bool:
            front.prune()
            return front.limits.per_address.addresses.get("127.0.0.1", 0) == 0

        await async_wait_until(released, what="the slow connections released")
        held = [await asyncio.open_connection("127.0.0.1", app.port) for _ in range(4)]
        refused_reader, refused_writer = await asyncio.open_connection("127.0.0.1", app.port)
        status, _, body = await read_response(refused_reader)
        assert (status, body) == (503, {"ok": False, "error": "too_many_connections"})
        refused_writer.close()
        poster_reader, poster = held[0]
        poster.write(post(alice["token"], {"channel": general, "text": "still served"}))
        status, _, body = await read_response(poster_reader)
        assert status == 200 and body["ok"]
        for _, writer in held:
            writer.close()
        await async_wait_until(released, what="the held connections released")
        values = await metrics(app)
        assert metric(values, "rtm_errors_total", kind="request_timeout") == 2
        assert metric(values, "rtm_errors_total", kind="too_many_connections") == 1
    finally:
        await app.session.close()
        await app.stop()
