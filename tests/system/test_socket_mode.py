"""Socket Mode against the real fleet (issue 15): slack_bolt apps, unmodified but for the
WebClient's base_url, and the protocol itself over a plain websocket client.

The fleet is ``rtm up`` (tests/system/harness.py); the app is the seed's (``seed.json`` ``apps``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sqlite3
import subprocess
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import websockets
from slack_bolt import App
from slack_bolt.adapter.socket_mode import SocketModeHandler
from slack_bolt.adapter.socket_mode.aiohttp import AsyncSocketModeHandler
from slack_bolt.async_app import AsyncApp
from slack_sdk import WebClient
from slack_sdk.web.async_client import AsyncWebClient

from rtmctl.launcher import rtm_argv
from services.errors import CloseCode
from tests.support import async_wait_until, wait_until
from tests.system.harness import Client, Fleet
from tests.system.peer import metric
from webapp_stub.resume import token_id

EVENT_TIMEOUT_S = 45.0  # generous: a loaded 2-core machine runs the fleet, Bolt and its threads
ACK_TIMEOUT_S = 3.0  # gateway/envelopes.py: Slack's 3 s


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    data_dir: Path = tmp_path_factory.mktemp("socket-mode")
    # Generous resume and webapp-call timeouts: the close-before-disconnect test holds a record's
    # POST while the webapp is stopped (SIGSTOP), and must not race the gateway's 3 s default.
    env = {**os.environ, "RTM_RESUME_TIMEOUT_S": "20", "RTM_WEBAPP_TIMEOUT_S": "25"}
    handle = Fleet.up(data_dir, env=env)
    try:
        yield handle
    finally:
        handle.down()


def app_of(fleet: Fleet) -> dict[str, Any]:
    return dict(fleet.seed["apps"][0])


def bot_token(fleet: Fleet) -> str:
    return str(fleet.user("rtmbot")["token"])


def history_texts(fleet: Fleet, channel: str) -> list[str]:
    web = WebClient(token=fleet.user("alice")["token"], base_url=fleet.api_url)
    return [m.get("text", "") for m in web.conversations_history(channel=channel, limit=50)["messages"]]


async def test_event_posted_between_the_upgrade_and_hello_reaches_the_app(fleet: Fleet) -> None:
    """The app's first connection: an event posted as soon as the websocket is open, before
    ``hello`` is read, reaches the app. slack_sdk's built-in client reports itself connected at
    the HTTP 101 and does not wait for ``hello``, so the gateway takes the app's channel
    positions before the upgrade (gateway/socket_mode.py ``admit``); taken after it, this
    post fell before the app's start and was lost. First in this module on purpose: the app
    has no link on the gateway yet (later tests reuse the link their predecessors made).
    """
    reply = await fleet.api("apps.connections.open", app_of(fleet)["app_token"])
    assert reply["ok"], reply
    async with websockets.connect(reply["url"]) as ws:
        await post(fleet, "before-hello")
        texts: list[str] = []
        async with asyncio.timeout(EVENT_TIMEOUT_S):
            while "before-hello" not in texts:
                frame = json.loads(await ws.recv())
                if frame.get("type") == "events_api":
                    await ws.send(json.dumps({"envelope_id": frame["envelope_id"]}))
                    texts.append(frame["payload"]["event"].get("text", ""))
        assert texts == ["before-hello"]


def test_bolt_app_with_the_builtin_client_answers_mentions_and_hello(fleet: Fleet) -> None:
    app_info, general = app_of(fleet), fleet.channel("general")
    app = App(client=WebClient(token=bot_token(fleet), base_url=fleet.api_url))
    seen: list[str] = []

    @app.event("app_mention")
    def mention(event: dict[str, Any], say: Any) -> None:
        seen.append("mention:" + event["text"])
        say(f"you called, <@{event['user']}>?")

    @app.message("hello")
    def hello(message: dict[str, Any], say: Any) -> None:
        seen.append("hello:" + message["text"])
        say(f"hello to you too, <@{message['user']}>")

    handler = SocketModeHandler(app, app_info["app_token"])
    handler.connect()
    try:
        alice = WebClient(token=fleet.user("alice")["token"], base_url=fleet.api_url)
        wait_until(lambda: handler.client.is_connected(), EVENT_TIMEOUT_S, "socket mode connected")
        alice.chat_postMessage(channel=general, text="hello bot")
        alice.chat_postMessage(channel=general, text=f"<@{app_info['bot_user_id']}> status?")
        wait_until(lambda: len(seen) >= 2, EVENT_TIMEOUT_S, "both handlers")
        assert sorted(s.split(":")[0] for s in seen) == ["hello", "mention"]
        alice_id = fleet.user("alice")["id"]
        wait_until(
            lambda: (
                {f"hello to you too, <@{alice_id}>", f"you called, <@{alice_id}>?"}
                <= set(history_texts(fleet, general))
            ),
            EVENT_TIMEOUT_S,
            "the bot's answers in #general",
        )
    finally:
        handler.close()


async def test_bolt_async_app_with_the_aiohttp_client(fleet: Fleet) -> None:
    app_info, random_ch = app_of(fleet), fleet.channel("random")
    app = AsyncApp(client=AsyncWebClient(token=bot_token(fleet), base_url=fleet.api_url))
    seen: list[dict[str, Any]] = []

    @app.message("hello")
    async def hello(message: dict[str, Any], say: Any) -> None:
        seen.append(message)
        await say("async hello back")

    handler = AsyncSocketModeHandler(app, app_info["app_token"])
    await handler.connect_async()
    try:
        alice = AsyncWebClient(token=fleet.user("alice")["token"], base_url=fleet.api_url)
        await async_wait_until(lambda: _true(handler.client.current_session is not None), EVENT_TIMEOUT_S)
        await alice.chat_postMessage(channel=random_ch, text="hello async")
        await async_wait_until(lambda: _true(bool(seen)), EVENT_TIMEOUT_S, "the async handler")
        assert seen[0]["channel"] == random_ch and seen[0]["channel_type"] == "channel"
        await async_wait_until(
            lambda: _true("async hello back" in history_texts(fleet, random_ch)), EVENT_TIMEOUT_S, "the answer"
        )
    finally:
        await handler.close_async()


async def _true(value: bool) -> bool:
    return value


# -- the protocol, with a plain websocket client ------------------------------------------------
class RawApp:
    """One Socket Mode connection that records every envelope and acks only when told to."""

    def __init__(self, fleet: Fleet, ack: bool = True) -> None:
        self.fleet = fleet
        self.ack = ack
        self.frames: list[dict[str, Any]] = []
        self.ws: Any = None
        self.task: asyncio.Task[None] | None = None
        self.hello: dict[str, Any] = {}
        self.url = ""

    async def open(self) -> RawApp:
        reply = await self.fleet.api("apps.connections.open", app_of(self.fleet)["app_token"])
        assert reply["ok"], reply
        self.url = str(reply["url"])
        self.ws = await websockets.connect(self.url)
        self.hello = json.loads(await self.ws.recv())
        assert self.hello["type"] == "hello", self.hello
        self.task = asyncio.create_task(self._read())
        return self

    async def _read(self) -> None:
        try:
            async for raw in self.ws:
                frame = json.loads(raw)
                self.frames.append(frame)
                if frame.get("type") == "events_api" and self.ack:
                    await self.ws.send(json.dumps({"envelope_id": frame["envelope_id"]}))
        except websockets.ConnectionClosed:
            pass

    def texts(self, marker: str) -> list[tuple[str, int]]:
        """(text, retry_attempt) of the message envelopes whose text has ``marker``."""
        out = []
        for frame in self.frames:
            event = frame.get("payload", {}).get("event", {})
            if frame.get("type") == "events_api" and event.get("type") == "message" and marker in event.get("text", ""):
                out.append((event["text"], int(frame["retry_attempt"])))
        return out

    async def close(self) -> None:
        if self.ws is not None:
            await self.ws.close()
        if self.task is not None:
            await asyncio.gather(self.task, return_exceptions=True)


async def post(fleet: Fleet, text: str, channel: str = "general") -> None:
    reply = await fleet.api("chat.postMessage", fleet.user("bob")["token"], channel=fleet.channel(channel), text=text)
    assert reply["ok"], reply


async def test_hello_and_envelope_shape_and_ack_stops_redelivery(fleet: Fleet) -> None:
    raw = await RawApp(fleet).open()
    try:
        app_info = app_of(fleet)
        assert raw.hello["num_connections"] == 1
        assert raw.hello["connection_info"] == {"app_id": app_info["id"]} and "host" in raw.hello["debug_info"]
        await post(fleet, "shape-1")
        await async_wait_until(lambda: _true(bool(raw.texts("shape-1"))), EVENT_TIMEOUT_S, "the envelope")
        # this envelope, not the first one: events that an earlier test's app left unacknowledged
        # (a Bolt bot's own reply arriving after its handler closed) come here first, as retries
        frame = next(
            f for f in raw.frames if f.get("type") == "events_api" and f["payload"]["event"].get("text") == "shape-1"
        )
        assert set(frame) == {
            "envelope_id",
            "payload",
            "type",
            "accepts_response_payload",
            "retry_attempt",
            "retry_reason",
        }
        assert frame["retry_attempt"] == 0 and frame["retry_reason"] == ""
        payload = frame["payload"]
        assert payload["type"] == "event_callback" and payload["api_app_id"] == app_info["id"]
        assert payload["team_id"] == fleet.seed["team"]["id"] and payload["event_id"].startswith("Ev")
        assert payload["authorizations"][0]["user_id"] == app_info["bot_user_id"]
        assert {"token", "event_time", "event"} <= set(payload)
        await asyncio.sleep(ACK_TIMEOUT_S * 1.5)  # wait-ok: past the ack deadline; acked, so never again
        assert raw.texts("shape-1") == [("shape-1", 0)]
    finally:
        await raw.close()


async def test_unacked_envelope_comes_again_with_retry_attempt_1(fleet: Fleet) -> None:
    raw = await RawApp(fleet, ack=False).open()
    try:
        await post(fleet, "retry-1")
        await async_wait_until(lambda: _true(len(raw.texts("retry-1")) >= 2), EVENT_TIMEOUT_S, "the retry")
        assert raw.texts("retry-1")[:2] == [("retry-1", 0), ("retry-1", 1)]
        retried = [f for f in raw.frames if f.get("retry_attempt") == 1]
        assert retried[0]["retry_reason"] == "timeout"
        raw.ack = True  # ack the next retry: no more after it
        await async_wait_until(lambda: _true(len(raw.texts("retry-1")) >= 3), EVENT_TIMEOUT_S, "the next retry")
        await asyncio.sleep(ACK_TIMEOUT_S * 1.5)  # wait-ok: past the ack deadline, proving no redelivery
        assert len(raw.texts("retry-1")) == 3
    finally:
        await raw.close()


async def test_killed_connection_gets_unacked_events_on_the_next_one(fleet: Fleet) -> None:
    first = await RawApp(fleet, ack=False).open()
    for i in range(5):
        await post(fleet, f"kill-{i}")
    await async_wait_until(lambda: _true(len(first.texts("kill-")) >= 5), EVENT_TIMEOUT_S, "five envelopes")
    first.ws.transport.abort()  # killed mid-stream, nothing acknowledged
    await first.close()
    second = await RawApp(fleet).open()
    try:
        await post(fleet, "kill-after")
        want = {f"kill-{i}" for i in range(5)} | {"kill-after"}
        await async_wait_until(
            lambda: _true({t for t, _ in second.texts("kill-")} >= want), EVENT_TIMEOUT_S, "every event again"
        )
        await asyncio.sleep(ACK_TIMEOUT_S * 1.5)  # wait-ok: past the ack deadline, proving no redelivery
        counts = [t for t, _ in second.texts("kill-")]
        assert sorted(counts) == sorted(want)  # each once on the acking connection
    finally:
        await second.close()


async def test_two_connections_share_events_without_duplicates(fleet: Fleet) -> None:
    one, two = await RawApp(fleet).open(), await RawApp(fleet).open()
    try:
        assert two.hello["num_connections"] == 2
        for i in range(10):
            await post(fleet, f"share-{i}")
        want = [f"share-{i}" for i in range(10)]
        await async_wait_until(
            lambda: _true(len(one.texts("share-")) + len(two.texts("share-")) >= 10), EVENT_TIMEOUT_S, "ten"
        )
        await asyncio.sleep(ACK_TIMEOUT_S * 1.5)  # wait-ok: past the ack deadline, proving no redelivery
        got = [t for t, _ in one.texts("share-")] + [t for t, _ in two.texts("share-")]
        assert sorted(got) == sorted(want)
        assert one.texts("share-") and two.texts("share-")  # both took some
    finally:
        await one.close()
        await two.close()


def rtm(fleet: Fleet, *args: str) -> None:
    done = subprocess.run(
        rtm_argv(*args, "--data-dir", str(fleet.data_dir)), capture_output=True, text=True, timeout=30
    )
    assert done.returncode == 0, done.stdout + done.stderr


def test_drained_region_disconnects_the_bolt_app_and_it_loses_nothing(fleet: Fleet) -> None:
    app_info = app_of(fleet)
    app = App(client=WebClient(token=bot_token(fleet), base_url=fleet.api_url))
    got: list[str] = []
    lock = threading.Lock()

    @app.message("drain-")
    def on_drain(message: dict[str, Any]) -> None:
        with lock:
            got.append(message["text"])

    handler = SocketModeHandler(app, app_info["app_token"])
    handler.connect()
    bob = WebClient(token=fleet.user("bob")["token"], base_url=fleet.api_url)
    general = fleet.channel("general")
    try:
        wait_until(lambda: handler.client.is_connected(), EVENT_TIMEOUT_S, "connected")
        first_url = handler.client.wss_uri
        region = (
            "us-east"
            if any(str(p["port"]) in first_url for p in fleet.processes("gateway") if p.get("region") == "us-east")
            else "eu-west"
        )
        for i in range(5):
            bob.chat_postMessage(channel=general, text=f"drain-{i}")
        rtm(fleet, "drain", region)
        for i in range(5, 15):
            bob.chat_postMessage(channel=general, text=f"drain-{i}")
        want = {f"drain-{i}" for i in range(15)}
        wait_until(lambda: set(got) >= want, EVENT_TIMEOUT_S * 2, "every event after the drain")
        assert handler.client.wss_uri != first_url  # it moved
        with lock:
            duplicates = len(got) - len(set(got))
        assert duplicates <= 1, got  # at most an envelope in flight at the move (docs/socket-mode.md)
    finally:
        handler.close()
        rtm(fleet, "undrain", region)


async def test_bad_input_is_refused_and_counted_and_the_connection_keeps_serving(fleet: Fleet) -> None:
    reply = await fleet.api("apps.connections.open", app_of(fleet)["app_token"])
    forged = reply["url"].replace("ticket=", "ticket=x")
    async with websockets.connect(forged) as ws:
        with pytest.raises(websockets.ConnectionClosed) as closed:
            await ws.recv()
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 4001
    async with websockets.connect(reply["url"]) as ws:  # the real ticket, once
        assert json.loads(await ws.recv())["type"] == "hello"
    async with websockets.connect(reply["url"]) as ws:  # and never twice
        with pytest.raises(websockets.ConnectionClosed):
            await ws.recv()
    raw = await RawApp(fleet).open()
    try:
        await raw.ws.send("not json")
        await raw.ws.send(json.dumps({"envelope_id": 7}))
        await post(fleet, "after-garbage")
        await async_wait_until(lambda: _true(bool(raw.texts("after-garbage"))), EVENT_TIMEOUT_S, "still served")
    finally:
        await raw.close()


async def test_an_app_has_at_most_ten_connections(fleet: Fleet) -> None:
    opened = [await RawApp(fleet).open() for _ in range(10)]
    try:
        reply = await fleet.api("apps.connections.open", app_of(fleet)["app_token"])
        async with websockets.connect(reply["url"]) as ws:
            with pytest.raises(websockets.ConnectionClosed) as closed:
                await ws.recv()
            assert closed.value.rcvd is not None and closed.value.rcvd.code == 4029
    finally:
        for raw in opened:
            await raw.close()


async def test_an_app_connection_closed_during_its_move_has_its_record_withdrawn(fleet: Fleet) -> None:
    """The app's only connection closes by itself while the drain is leaving its record (held
    here by stopping the webapp): it never gets the ``disconnect``, so the gateway withdraws the
    record. Left pending, it would be claimed by the app's connection after a *later* move (the
    oldest record first) and replay what the app had acknowledged since (docs/soak.md, Findings;
    the RTM twin in tests/system/test_resume_restart.py shows the replay itself)."""
    first = await RawApp(fleet).open()
    gw = next(p for p in fleet.processes("gateway") if f":{p['port']}/" in first.url)
    webapp = next(p for p in fleet.processes("webapp"))
    region = str(gw["region"])
    moved_before = await metric(gw, "rtm_gw_sessions_moved_total", reason="region drained")
    try:
        os.kill(int(webapp["pid"]), signal.SIGSTOP)
        try:
            await asyncio.to_thread(rtm, fleet, "drain", region)

            async def detached_not_closed() -> bool:
                return await metric(gw, "rtm_gw_connections") == 0 and await metric(gw, "rtm_gw_sockets") == 1

            await async_wait_until(detached_not_closed, EVENT_TIMEOUT_S, "the app's connection detached")
            await first.close()  # the app's own close, before any disconnect

            async def socket_gone() -> bool:
                return await metric(gw, "rtm_gw_sockets") == 0

            await async_wait_until(socket_gone, EVENT_TIMEOUT_S, "the gateway to see the app's close")
        finally:
            os.kill(int(webapp["pid"]), signal.SIGCONT)

        async def move_done() -> bool:
            return await metric(gw, "rtm_gw_sessions_moved_total", reason="region drained") > moved_before

        await async_wait_until(move_done, EVENT_TIMEOUT_S, "the move to finish")
        assert not [f for f in first.frames if f.get("type") == "disconnect"]
        assert await metric(gw, "rtm_gw_goodbye_missed_total") == 1
        assert await metric(webapp, "rtm_webapp_resumes_total", step="withdrawn") == 1
        second = await RawApp(fleet).open()  # a fresh connection in the other region: the app goes on
        try:
            await post(fleet, "withdrawn-1")
            await async_wait_until(lambda: _true(bool(second.texts("withdrawn-1"))), EVENT_TIMEOUT_S, "the envelope")
        finally:
            await second.close()
    finally:
        await asyncio.to_thread(rtm, fleet, "undrain", region)


async def test_a_private_channel_the_bot_joins_while_connected_reaches_the_app_as_a_group(fleet: Fleet) -> None:
    """The bot invited to a private channel while its app is connected: that channel's messages
    reach the app as ``channel_type`` ``group`` (``message.groups``), not ``channel``
    (``message.channels``), which an app that asked for public channels' messages only would get
    too. The gateway learnt the bot's private channels at connect only (docs/authz-review.md)."""
    raw = await RawApp(fleet).open()
    try:
        alice = str(fleet.user("alice")["token"])
        created = await fleet.api("conversations.create", alice, name=f"bot-secret-{os.getpid()}", is_private="true")
        assert created["ok"], created
        channel = created["channel"]["id"]
        invited = await fleet.api("conversations.invite", alice, channel=channel, users=app_of(fleet)["bot_user_id"])
        assert invited["ok"], invited
        posted = await fleet.api("chat.postMessage", alice, channel=channel, text="group-only-1")
        assert posted["ok"], posted
        await async_wait_until(lambda: _true(bool(raw.texts("group-only-1"))), EVENT_TIMEOUT_S, "the envelope")
        (event,) = [
            f["payload"]["event"]
            for f in raw.frames
            if f.get("type") == "events_api" and f["payload"]["event"].get("text") == "group-only-1"
        ]
        assert event["channel"] == channel and event["channel_type"] == "group"
    finally:
        await raw.close()


async def test_revoking_the_bots_token_tells_the_app_tokens_revoked_and_keeps_its_connection(fleet: Fleet) -> None:
    """auth.revoke of a bot token of the app's bot (a second one, so the seed's stays for the other
    tests): the app's Socket Mode connection gets Slack's ``tokens_revoked`` (the bot's user id, no
    token, no ctl) as an ``events_api`` envelope and stays open, serving the next events; the bot's
    RTM connection of that token, on the same gateway, is closed with 4003 (docs/socket-mode.md)."""
    bot = str(app_of(fleet)["bot_user_id"])
    leaked = f"xoxb-rtmbot-leaked-{uuid.uuid4().hex}"
    with contextlib.closing(sqlite3.connect(fleet.data_dir / "webapp.db", timeout=EVENT_TIMEOUT_S)) as db, db:
        db.execute("INSERT INTO tokens (token, user) VALUES (?, ?)", (leaked, bot))
    raw = await RawApp(fleet).open()
    gw = next(p for p in fleet.processes("gateway") if f":{p['port']}/" in raw.url)
    bot_rtm = Client(fleet, "rtmbot", leaked, region=str(gw["region"]))
    await bot_rtm.open()
    try:
        assert bot_rtm.gateway_port == int(gw["port"])  # the revoke is applied where the app is
        assert await fleet.api("auth.revoke", leaked) == {"ok": True, "revoked": True}

        def revoked() -> list[dict[str, Any]]:
            return [f for f in raw.frames if f.get("payload", {}).get("event", {}).get("type") == "tokens_revoked"]

        await async_wait_until(lambda: _true(bool(revoked())), EVENT_TIMEOUT_S, "tokens_revoked")
        (frame,) = revoked()
        assert frame["type"] == "events_api" and frame["retry_attempt"] == 0
        assert frame["payload"]["event"] == {"type": "tokens_revoked", "tokens": {"bot": [bot]}}
        assert leaked not in json.dumps(raw.frames) and token_id(leaked) not in json.dumps(raw.frames)
        await asyncio.wait_for(bot_rtm.closed.wait(), EVENT_TIMEOUT_S)
        assert bot_rtm.close_code == CloseCode.TOKEN_REVOKED
        await post(fleet, "after-revoke")
        await async_wait_until(lambda: _true(bool(raw.texts("after-revoke"))), EVENT_TIMEOUT_S, "the next event")
        assert raw.ws.close_code is None and raw.task is not None and not raw.task.done()  # still open
    finally:
        await bot_rtm.close()
        await raw.close()


def test_a_welcome_bot_greets_someone_added_with_rtm_users_add(fleet: Fleet) -> None:
    """The classic Slack app: ``@app.event("team_join")`` (webapp_stub/team_join.py announces someone
    ``rtm users add`` made; the gateway passes it to a subscribed app) greets them in #general."""
    app_info, general = app_of(fleet), fleet.channel("general")
    app = App(client=WebClient(token=bot_token(fleet), base_url=fleet.api_url))
    greeted: list[str] = []

    @app.event("team_join")
    def welcome(event: dict[str, Any], client: WebClient) -> None:
        greeted.append(event["user"]["name"])
        client.chat_postMessage(channel=general, text=f"welcome, <@{event['user']['id']}>!")

    handler = SocketModeHandler(app, app_info["app_token"])
    handler.connect()
    try:
        wait_until(lambda: handler.client.is_connected(), EVENT_TIMEOUT_S, "socket mode connected")
        name = f"newcomer-{uuid.uuid4().hex[:6]}"
        done = subprocess.run(
            rtm_argv("users", "add", name, "--data-dir", str(fleet.data_dir)),
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert done.returncode == 0, done.stdout + done.stderr
        made = json.loads(done.stdout)
        wait_until(lambda: name in greeted, EVENT_TIMEOUT_S, "team_join at the Bolt app")
        wait_until(
            lambda: f"welcome, <@{made['id']}>!" in history_texts(fleet, general), EVENT_TIMEOUT_S, "the welcome"
        )
    finally:
        handler.close()
