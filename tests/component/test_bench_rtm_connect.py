"""bench/rtm_connect.py: the benchmarks' rtm.connect retry rule, against a real HTTP server."""

from __future__ import annotations

from collections.abc import AsyncIterator

import aiohttp
import pytest
from aiohttp import web

from bench.rtm_connect import OVERLOAD, RATELIMITED_ONLY, RtmConnectError, rtm_connect


class Webapp:
    """An rtm.connect that answers each request with the next of ``replies`` and records the forms."""

    def __init__(self) -> None:
        self.replies: list[dict[str, object]] = []
        self.forms: list[dict[str, str]] = []

    async def handle(self, request: web.Request) -> web.Response:
        form = {key: str(value) for key, value in (await request.post()).items()}
        self.forms.append(form | {"auth": request.headers.get("Authorization", "")})
        return web.json_response(self.replies.pop(0))


@pytest.fixture
async def served() -> AsyncIterator[tuple[Webapp, str, aiohttp.ClientSession]]:
    app = Webapp()
    web_app = web.Application()
    web_app.router.add_post("/api/rtm.connect", app.handle)
    runner = web.AppRunner(web_app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    async with aiohttp.ClientSession() as http:
        yield app, f"http://127.0.0.1:{port}/api/", http
    await runner.cleanup()


async def test_retryable_errors_are_retried_then_the_reply_returned(
    served: tuple[Webapp, str, aiohttp.ClientSession],
) -> None:
    app, url, http = served
    app.replies = [
        {"ok": False, "error": "ratelimited"},
        {"ok": False, "error": "service_unavailable"},
        {"ok": True, "url": "ws://x"},
    ]
    retried: list[str] = []
    reply = await rtm_connect(
        http, url, "xoxb-1", "eu-west", attempts=3, retry_delay_s=0.0, retryable=OVERLOAD, on_retry=retried.append
    )
    assert reply["url"] == "ws://x"
    assert retried == ["ratelimited", "service_unavailable"]
    assert app.forms == [{"region": "eu-west", "auth": "Bearer xoxb-1"}] * 3


async def test_an_error_outside_the_rule_fails_at_once(served: tuple[Webapp, str, aiohttp.ClientSession]) -> None:
    app, url, http = served
    app.replies = [{"ok": False, "error": "service_unavailable"}]
    with pytest.raises(RtmConnectError, match="rtm.connect: service_unavailable$"):
        await rtm_connect(http, url, "t", attempts=5, retry_delay_s=0.0, retryable=RATELIMITED_ONLY)
    assert app.forms == [{"auth": "Bearer t"}]  # no region hint when none is given


async def test_a_retryable_error_that_keeps_coming_fails_after_the_attempts(
    served: tuple[Webapp, str, aiohttp.ClientSession],
) -> None:
    app, url, http = served
    app.replies = [{"ok": False, "error": "ratelimited"}] * 2
    with pytest.raises(RtmConnectError, match="ratelimited 2 times"):
        await rtm_connect(http, url, "t", attempts=2, retry_delay_s=0.0, retryable=RATELIMITED_ONLY)
    assert len(app.forms) == 2
