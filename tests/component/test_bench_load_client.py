"""bench/load_client.py against a real HTTP + websocket server: one rtm.connect POST, and the connect
rule end to end (rtm.connect, handshake, hello; retried, or not, as the rule says)."""

from __future__ import annotations

import json
import random
from collections import Counter
from collections.abc import AsyncIterator

import aiohttp
import pytest
from aiohttp import web

from bench import load_client
from bench.client_records import LatencyRecorder
from bench.load_client import Client, RtmConnectError, State, rtm_connect
from tests.support import DEFAULT_WAIT_S


class Webapp:
    """rtm.connect answering each request with the next of ``replies`` (recording the forms), and a
    websocket that says ``greetings.pop(0)`` (hello by default) to each client."""

    def __init__(self) -> None:
        self.replies: list[tuple[dict[str, object], dict[str, str]]] = []
        self.forms: list[dict[str, str]] = []
        self.greetings: list[str] = []
        self.ws_url = ""
        self.open: set[web.WebSocketResponse] = set()

    async def rtm_connect(self, request: web.Request) -> web.Response:
        form = {key: str(value) for key, value in (await request.post()).items()}
        self.forms.append(form | {"auth": request.headers.get("Authorization", "")})
        body, headers = self.replies.pop(0) if self.replies else ({"ok": True}, {})
        if body.get("ok"):
            body = body | {"url": self.ws_url}
        return web.json_response(body, status=200 if body.get("ok") else 429, headers=headers)

    async def websocket(self, request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        greeting = self.greetings.pop(0) if self.greetings else "hello"
        await ws.send_str(json.dumps({"type": greeting}, separators=(",", ":")))
        if greeting == "goodbye":
            await ws.close()
            return ws
        self.open.add(ws)
        async for _ in ws:  # held until either side closes
            pass
        self.open.discard(ws)
        return ws


@pytest.fixture
async def served() -> AsyncIterator[tuple[Webapp, str]]:
    app = Webapp()
    web_app = web.Application()
    web_app.router.add_post("/api/rtm.connect", app.rtm_connect)
    web_app.router.add_get("/ws", app.websocket)
    runner = web.AppRunner(web_app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    app.ws_url = f"ws://127.0.0.1:{port}/ws"
    async with aiohttp.ClientSession() as http:
        saved = load_client.STATE
        load_client.STATE = State(
            recorder=LatencyRecorder(), http=http, api_url=f"http://127.0.0.1:{port}/api/", rng=random.Random(1)
        )
        load_client.STATE.timeout_s = DEFAULT_WAIT_S
        try:
            yield app, f"http://127.0.0.1:{port}/api/"
        finally:
            for client in load_client.STATE.clients.values():
                if client.cur is not None:
                    client.cur.close()
            load_client.STATE = saved
            for ws in list(app.open):
                await ws.close()
    await runner.cleanup()


async def test_one_rtm_connect_posts_the_region_hint_and_reads_retry_after(served: tuple[Webapp, str]) -> None:
    app, api_url = served
    app.replies = [({"ok": False, "error": "ratelimited"}, {"Retry-After": "3"}), ({"ok": True}, {})]
    http = load_client.STATE.http
    assert http is not None
    with pytest.raises(RtmConnectError) as err:
        await rtm_connect(http, api_url, "xoxb-1", "eu-west")
    assert (err.value.error, err.value.retry_after_s, err.value.retryable) == ("ratelimited", 3.0, True)
    assert (await rtm_connect(http, api_url, "xoxb-1"))["url"] == app.ws_url
    assert app.forms == [{"region": "eu-west", "auth": "Bearer xoxb-1"}, {"auth": "Bearer xoxb-1"}]


async def test_retryable_errors_are_retried_until_the_hello(served: tuple[Webapp, str]) -> None:
    app, _ = served
    app.replies = [
        ({"ok": False, "error": "service_unavailable"}, {}),
        ({"ok": False, "error": "fatal_error"}, {}),
        ({"ok": True}, {}),
    ]
    client, retries = Client(0, "t", "us-east"), Counter[str]()
    sess = await client.open("first", retries)
    assert sess.t_hello_us > 0 and client.cur is sess and client.attempts == 3
    assert retries == {"service_unavailable": 1, "fatal_error": 1}


async def test_an_error_outside_the_rule_fails_at_once(served: tuple[Webapp, str]) -> None:
    app, _ = served
    app.replies = [({"ok": False, "error": "invalid_auth"}, {})]
    client, retries, failures = Client(0, "t", ""), Counter[str](), Counter[str]()
    with pytest.raises(RtmConnectError, match="invalid_auth"):
        await client.open("first", retries, failures)
    assert (len(app.forms), retries, failures) == (1, {}, {"invalid_auth": 1})


async def test_a_gateway_that_says_goodbye_before_hello_is_left_at_once(served: tuple[Webapp, str]) -> None:
    app, _ = served
    app.greetings = ["goodbye"]
    client, retries = Client(0, "t", ""), Counter[str]()
    sess = await client.open("moved", retries)
    assert sess.start == "moved" and len(app.forms) == 2
    assert list(retries) == ["hello: GoodbyeBeforeHello: goodbye before hello (code 1000)"]


async def test_the_budget_gives_up_with_the_last_failure(served: tuple[Webapp, str]) -> None:
    app, _ = served
    load_client.STATE.max_attempts = 2
    app.replies = [({"ok": False, "error": "ratelimited"}, {})] * 2
    client, retries = Client(0, "t", ""), Counter[str]()
    with pytest.raises(RtmConnectError, match="ratelimited"):
        await client.open("first", retries)
    assert (len(app.forms), retries) == (2, {"ratelimited": 1})
