"""The official Python Slack SDK, unmodified, against the real fleet started by ``rtm up``.

``WebClient`` and ``AsyncWebClient`` run the same scenario through every Web
API method the fleet speaks (pagination, errors as ``SlackApiError``), and
``search_messages``, and ``files_upload_v2`` (the file's message fanned out to a websocket,
``files_info``, the download with the token); 429
with ``Retry-After`` is checked against a webapp started here with a tiny
budget. ``rtm_v2.RTMClient`` with the bot token receives hello, messages,
thread replies, edits, deletions, reactions, membership and typing from
others (never its own posts), follows joins, kicks and DMs live, and sends
typing and messages over its socket; the legacy ``rtm.RTMClient`` receives
events and sends typing. Last, ``goodbye``: SIGTERM of the gateway an
rtm_v2 client is on makes it reconnect elsewhere.
"""

from __future__ import annotations

import asyncio
import signal
import threading
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from slack_sdk import WebClient
from slack_sdk.errors import SlackApiError
from slack_sdk.http_retry.builtin_async_handlers import AsyncRateLimitErrorRetryHandler
from slack_sdk.rtm import RTMClient as LegacyRTMClient
from slack_sdk.rtm_v2 import RTMClient
from slack_sdk.web.async_client import AsyncWebClient

from tests.support import DEFAULT_WAIT_S, async_wait_until
from tests.system.harness import Fleet


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


async def eventually(predicate: Callable[[], Any], what: str, timeout_s: float = DEFAULT_WAIT_S) -> Any:
    async def check() -> Any:
        return predicate()

    return await async_wait_until(check, timeout_s=timeout_s, what=what)


# -- one scenario, two clients -------------------------------------------------------------------


class Api:
    """The calls of one user through one SDK client flavour, always awaited."""

    def __init__(self, client: WebClient | AsyncWebClient) -> None:
        self.client = client

    async def __call__(self, method: str, **kwargs: Any) -> Any:
        fn = getattr(self.client, method)
        if isinstance(self.client, AsyncWebClient):
            return (await fn(**kwargs)).data
        return (await asyncio.to_thread(fn, **kwargs)).data

    async def pages(self, method: str, key: str, **kwargs: Any) -> list[list[Any]]:
        """Every page through the SDK's own cursor pagination (iterating the response)."""
        fn = getattr(self.client, method)
        if isinstance(self.client, AsyncWebClient):
            return [page[key] async for page in await fn(**kwargs)]
        return await asyncio.to_thread(lambda: [page[key] for page in fn(**kwargs)])

    async def error(self, method: str, **kwargs: Any) -> str:
        with pytest.raises(SlackApiError) as err:
            await self(method, **kwargs)
        assert err.value.response.status_code == 200 and err.value.response["ok"] is False
        return str(err.value.response["error"])


async def web_api_scenario(fleet: Fleet, make: Callable[[str], WebClient | AsyncWebClient]) -> None:
    alice, bob, carol = (
        Api(make(fleet.user("alice")["token"])),
        Api(make(fleet.user("bob")["token"])),
        Api(make(fleet.user("carol")["token"])),
    )
    bot_user = next(u for u in fleet.seed["users"] if u["is_bot"])
    bot = Api(make(bot_user["token"]))
    ids = {name: fleet.user(name)["id"] for name in ("alice", "bob", "carol", "dave", "eve")}

    assert (await alice("api_test", foo="bar"))["args"] == {"foo": "bar"}
    me = await alice("auth_test")
    assert me["user_id"] == ids["alice"] and me["team_id"] == fleet.seed["team"]["id"] and "bot_id" not in me
    assert (await bot("auth_test"))["bot_id"] == bot_user["bot_id"]
    connect = await bot("rtm_connect")
    assert connect["url"].startswith("ws://") and "/ws/" in connect["url"] and connect["self"]["id"] == bot_user["id"]

    # channels, enough of them to page through
    tag = unique("sdk")
    created = [(await alice("conversations_create", name=f"{tag}-{i}"))["channel"] for i in range(5)]
    pages = await alice.pages("conversations_list", "channels", limit=2)
    names = [c["name"] for page in pages for c in page]
    assert len(pages) >= 4 and all(len(p) <= 2 for p in pages)
    assert [c["name"] for c in created] == [n for n in names if n.startswith(tag)]
    channel = created[0]["id"]

    # membership
    await alice("conversations_invite", channel=channel, users=[ids["bob"], ids["carol"]])
    pages = await alice.pages("conversations_members", "members", channel=channel, limit=1)
    assert (
        sorted(m for page in pages for m in page) == sorted([ids["alice"], ids["bob"], ids["carol"]])
        and len(pages) == 3
    )
    info = (await bob("conversations_info", channel=channel, include_num_members=True))["channel"]
    assert info["is_member"] and info["num_members"] == 3 and info["name"] == f"{tag}-0"
    await alice("conversations_kick", channel=channel, user=ids["carol"])
    assert (await bob("conversations_leave", channel=channel)) == {"ok": True}
    assert (await bob("conversations_leave", channel=channel))["not_in_channel"] is True
    assert (await alice("conversations_members", channel=channel))["members"] == [ids["alice"]]
    await bob("conversations_join", channel=channel)
    assert (await bob("conversations_join", channel=channel))["warning"] == "already_in_channel"
    mine = [c["id"] for page in await bob.pages("users_conversations", "channels", limit=2) for c in page]
    assert channel in mine and fleet.channel("general") in mine

    # messages and history, across pages and bounds
    stamps = [(await alice("chat_postMessage", channel=channel, text=f"m{i}"))["ts"] for i in range(7)]
    pages = await bob.pages("conversations_history", "messages", channel=channel, limit=3)
    assert [m["text"] for page in pages for m in page] == [f"m{i}" for i in reversed(range(7))] and len(pages) == 3
    bounded = await bob("conversations_history", channel=channel, oldest=stamps[1], latest=stamps[4], inclusive=True)
    assert [m["text"] for m in bounded["messages"]] == ["m4", "m3", "m2", "m1"] and bounded["has_more"] is False
    bounded = await bob("conversations_history", channel=channel, oldest=stamps[1], latest=stamps[4])
    assert [m["text"] for m in bounded["messages"]] == ["m3", "m2"]

    # threads
    reply = await bob("chat_postMessage", channel=channel, text="r1", thread_ts=stamps[0])
    assert reply["message"]["thread_ts"] == stamps[0]
    shown = await alice("chat_postMessage", channel=channel, text="r2", thread_ts=stamps[0], reply_broadcast=True)
    thread = await alice("conversations_replies", channel=channel, ts=stamps[0])
    assert [m["text"] for m in thread["messages"]] == ["m0", "r1", "r2"]
    latest = (await alice("conversations_history", channel=channel, limit=1))["messages"][0]
    assert latest["ts"] == shown["ts"] and latest["subtype"] == "thread_broadcast"
    parent = (await alice("conversations_history", channel=channel, latest=stamps[0], inclusive=True, limit=1))[
        "messages"
    ][0]
    assert parent["reply_count"] == 2 and parent["reply_users"] == [ids["bob"], ids["alice"]]

    # edit, delete, ephemeral, reactions
    edited = await alice("chat_update", channel=channel, ts=stamps[6], text="m6 (edited)")
    assert edited["ts"] == stamps[6] and edited["message"]["edited"]["user"] == ids["alice"]
    assert (await alice("chat_delete", channel=channel, ts=stamps[5]))["ts"] == stamps[5]
    texts = [m["text"] for m in (await bob("conversations_history", channel=channel, limit=4))["messages"]]
    assert texts == ["r2", "m6 (edited)", "m4", "m3"]
    assert (await alice("chat_postEphemeral", channel=channel, user=ids["bob"], text="just you"))["message_ts"]
    await bob("reactions_add", channel=channel, timestamp=stamps[6], name="thumbsup")
    await alice("reactions_add", channel=channel, timestamp=stamps[6], name="thumbsup")
    got = await carol("reactions_get", channel=channel, timestamp=stamps[6])
    assert got["message"]["reactions"] == [{"name": "thumbsup", "users": [ids["bob"], ids["alice"]], "count": 2}]
    await bob("reactions_remove", channel=channel, timestamp=stamps[6], name="thumbsup")
    assert (await carol("reactions_get", channel=channel, timestamp=stamps[6]))["message"]["reactions"][0]["count"] == 1

    # direct messages and group DMs
    dm = (await alice("conversations_open", users=[ids["bob"]]))["channel"]["id"]
    assert dm.startswith("D")
    again = await bob("conversations_open", users=ids["alice"], return_im=True)
    assert again["channel"]["id"] == dm and again["already_open"] and again["channel"]["user"] == ids["alice"]
    group = (await alice("conversations_open", users=[ids["bob"], ids["carol"]]))["channel"]["id"]
    assert group.startswith("G") and group != dm
    await alice("chat_postMessage", channel=dm, text=f"{tag} just us")  # the DM outlives this scenario
    assert (await bob("conversations_history", channel=dm, limit=1))["messages"][0]["text"] == f"{tag} just us"
    both = {c["id"] for c in (await bob("users_conversations", types="im,mpim"))["channels"]}
    assert {dm, group} <= both
    assert (await carol("conversations_info", channel=group))["channel"]["is_mpim"] is True

    # rename, archive
    renamed = await alice("conversations_rename", channel=created[1]["id"], name=f"{tag}-renamed")
    assert renamed["channel"]["name"] == f"{tag}-renamed"
    await alice("conversations_archive", channel=created[2]["id"])
    assert (await alice("conversations_info", channel=created[2]["id"]))["channel"]["is_archived"] is True

    # users, presence, bots
    pages = await alice.pages("users_list", "members", limit=2)
    assert [u["name"] for page in pages for u in page] == ["alice", "bob", "carol", "dave", "eve", "rtmbot", "slackbot"]
    assert (await alice("users_info", user=bot_user["id"]))["user"]["is_bot"] is True
    assert (await alice("users_getPresence", user=ids["alice"]))["presence"] == "away"  # no RTM connection, as Slack
    await alice("users_setPresence", presence="away")
    assert (await bob("users_getPresence", user=ids["alice"]))["presence"] == "away"
    await alice("users_setPresence", presence="auto")
    assert (await alice("users_getPresence", user=ids["alice"]))["manual_away"] is False
    assert (await alice("bots_info", bot=bot_user["bot_id"]))["bot"]["user_id"] == bot_user["id"]

    # Slack's error codes, raised by the SDK as SlackApiError
    errors = [
        (alice, "chat_postMessage", {"channel": "CNOSUCHCHAN", "text": "x"}, "channel_not_found"),
        (carol, "chat_postMessage", {"channel": channel, "text": "x"}, "not_in_channel"),
        (alice, "chat_postMessage", {"channel": channel, "text": "x" * 40_001}, "msg_too_long"),
        (alice, "chat_postMessage", {"channel": created[2]["id"], "text": "x"}, "is_archived"),
        (alice, "chat_update", {"channel": channel, "ts": "1.000001", "text": "x"}, "message_not_found"),
        (bob, "chat_update", {"channel": channel, "ts": stamps[6], "text": "x"}, "cant_update_message"),
        (bob, "chat_delete", {"channel": channel, "ts": stamps[6]}, "cant_delete_message"),
        (alice, "chat_delete", {"channel": channel, "ts": "not-a-ts"}, "invalid_ts"),
        (alice, "reactions_add", {"channel": channel, "timestamp": stamps[6], "name": "thumbsup"}, "already_reacted"),
        (bob, "reactions_remove", {"channel": channel, "timestamp": stamps[6], "name": "thumbsup"}, "no_reaction"),
        (alice, "conversations_history", {"channel": channel, "limit": "lots"}, "invalid_arguments"),
        (alice, "conversations_invite", {"channel": channel, "users": ids["bob"]}, "already_in_channel"),
        (alice, "conversations_kick", {"channel": channel, "user": ids["alice"]}, "cant_kick_self"),
        (alice, "users_info", {"user": "UNOSUCHUSER"}, "user_not_found"),
        (alice, "conversations_join", {"channel": created[2]["id"]}, "is_archived"),
        (Api(make("xoxp-forged")), "auth_test", {}, "invalid_auth"),
    ]
    for api, method, kwargs, code in errors:
        assert await api.error(method, **kwargs) == code, (method, kwargs)


def test_web_client_speaks_every_method(fleet: Fleet) -> None:
    asyncio.run(web_api_scenario(fleet, lambda token: WebClient(token=token, base_url=fleet.api_url)))


async def test_async_web_client_speaks_every_method(fleet: Fleet) -> None:
    await web_api_scenario(fleet, lambda token: AsyncWebClient(token=token, base_url=fleet.api_url))


def test_web_client_search_messages(fleet: Fleet) -> None:
    """``WebClient.search_messages`` as the SDK sends it: a user token finds what it may read, in
    Slack's shape; a bot token is refused as Slack refuses it."""
    word = unique("srch").replace("-", "")
    alice = WebClient(token=fleet.user("alice")["token"], base_url=fleet.api_url)
    general = fleet.channel("general")
    posted = [alice.chat_postMessage(channel=general, text=f"{word} number {i}")["ts"] for i in range(3)]
    found = alice.search_messages(query=f"{word} in:#general", sort="timestamp", sort_dir="asc", count=2, page=2)
    assert found["query"] == f"{word} in:#general"
    messages = found["messages"]
    assert messages["total"] == 3 and messages["paging"] == {"count": 2, "total": 3, "page": 2, "pages": 2}
    (match,) = messages["matches"]
    assert match["ts"] == posted[2] and match["channel"]["id"] == general and match["username"] == "alice"
    assert match["permalink"].endswith(f"/archives/{general}/p{posted[2].replace('.', '')}")
    bot = WebClient(token=next(u for u in fleet.seed["users"] if u["is_bot"])["token"], base_url=fleet.api_url)
    with pytest.raises(SlackApiError) as err:
        bot.search_messages(query=word)
    assert err.value.response["error"] == "not_allowed_token_type"


async def test_files_upload_v2_reaches_a_websocket_client_and_downloads_with_the_token(fleet: Fleet) -> None:
    """``WebClient.files_upload_v2`` as the SDK runs it (files.getUploadURLExternal, a POST of the bytes
    to the URL, files.completeUploadExternal): the file's message is fanned out to bob's websocket,
    ``files_info`` describes it, and its ``url_private_download`` with bob's token gives the bytes."""
    alice = WebClient(token=fleet.user("alice")["token"], base_url=fleet.api_url)
    bob_token = fleet.user("bob")["token"]
    general = fleet.channel("general")
    data = uuid.uuid4().bytes * 1000  # 16 KB
    bob = await fleet.connect("bob")
    try:
        name = unique("report") + ".bin"
        reply = await asyncio.to_thread(
            alice.files_upload_v2, channel=general, content=data, filename=name, initial_comment="the report"
        )
        file_id = reply["file"]["id"]

        def shared(client: Any) -> bool:
            return any(m.get("files", [{}])[0].get("id") == file_id for m in client.messages(general) if "files" in m)

        await bob.wait_for(shared, what="the file's message")
        message = next(m for m in bob.messages(general) if "files" in m and m["files"][0]["id"] == file_id)
        assert message["subtype"] == "file_share" and message["text"] == "the report"
        info = WebClient(token=bob_token, base_url=fleet.api_url).files_info(file=file_id)["file"]
        assert info["name"] == name and info["size"] == len(data) and info["channels"] == [general]
        headers = {"Authorization": f"Bearer {bob_token}"}
        async with aiohttp.ClientSession() as http:
            async with http.get(info["url_private_download"], headers=headers) as resp:
                assert resp.status == 200 and await resp.read() == data
                assert resp.headers["Content-Disposition"].startswith("attachment;")
            async with http.get(info["url_private_download"]) as resp:
                assert resp.status == 401
    finally:
        await bob.close()


async def test_rate_limit_429_with_retry_after_through_the_sdk(tmp_path: Path) -> None:
    """A webapp of our own with a budget of 60 calls a minute (Retry-After: 1 s once spent)."""
    from tests.webapp_harness import FakeAdminServer, start

    fake_as = FakeAdminServer()
    await fake_as.start()
    app = await start(tmp_path, fake_as, "--rate-limit-per-minute", "60")
    try:
        token = app.user("alice")["token"]
        base_url = f"{app.url}/api/"
        client = AsyncWebClient(token=token, base_url=base_url)
        for _ in range(60):
            await client.auth_test()
        with pytest.raises(SlackApiError) as err:
            await client.auth_test()
        assert err.value.response.status_code == 429 and err.value.response["error"] == "ratelimited"
        assert int(err.value.response.headers["Retry-After"]) == 1
        sync_error = await asyncio.to_thread(lambda: _sync_error(base_url, token))
        assert sync_error == (429, "ratelimited", "1")
        # the SDK's own retry handler honours Retry-After and then succeeds
        patient = AsyncWebClient(
            token=token, base_url=base_url, retry_handlers=[AsyncRateLimitErrorRetryHandler(max_retry_count=2)]
        )
        assert (await patient.auth_test())["ok"]
        assert (await client.users_list())["ok"]  # budgets are per method
    finally:
        await app.session.close()
        await app.stop()
        await fake_as.kill()


def _sync_error(base_url: str, token: str) -> tuple[int, str, str]:
    try:
        WebClient(token=token, base_url=base_url).auth_test()
    except SlackApiError as exc:
        headers = {k.lower(): v for k, v in exc.response.headers.items()}
        value = headers.get("retry-after")
        return exc.response.status_code, exc.response["error"], value[0] if isinstance(value, list) else value
    raise AssertionError("no 429")


# -- RTM -----------------------------------------------------------------------------------------


class Recorder:
    """What an rtm_v2 client's listeners got (after the SDK's own filtering), and the raw frames."""

    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []
        self.raw: list[str] = []
        self.lock = threading.Lock()

    def add(self, event: dict[str, Any]) -> None:
        with self.lock:
            self.events.append(event)

    def of(self, kind: str, **match: Any) -> list[dict[str, Any]]:
        with self.lock:
            events = list(self.events)
        return [e for e in events if e.get("type") == kind and all(e.get(k) == v for k, v in match.items())]

    def texts(self, channel: str) -> list[str]:
        return [e.get("text", "") for e in self.of("message", channel=channel) if "subtype" not in e]


@contextmanager
def rtm_v2(fleet: Fleet, name: str) -> Iterator[tuple[RTMClient, Recorder]]:
    """An rtm_v2 client connected as ``name``; fully stopped afterwards (no reconnects, no threads)."""
    recorder = Recorder()
    rtm = RTMClient(
        token=fleet.user(name)["token"],
        base_url=fleet.api_url,
        ping_interval=2,
        on_message_listeners=[recorder.raw.append],
    )

    @rtm.on("*")
    def record(client: RTMClient, event: dict[str, Any]) -> None:
        recorder.add(event)

    rtm.connect()
    try:
        yield rtm, recorder
    finally:
        rtm.auto_reconnect_enabled = False
        rtm.default_auto_reconnect_enabled = False
        rtm.close()
        for runner in (rtm.current_app_monitor, rtm.current_session_runner, rtm.message_processor):
            runner.event.set()  # each daemon thread ends after its current round (not joined: a round may block)
        rtm.message_workers.shutdown(wait=False)


def gateway_port(url: str) -> int:
    return int(url.split("://", 1)[1].split("/", 1)[0].rsplit(":", 1)[1])


async def test_rtm_v2_bot_receives_what_others_do_and_follows_membership_live(fleet: Fleet) -> None:
    bot_user = next(u for u in fleet.seed["users"] if u["is_bot"])
    alice = AsyncWebClient(token=fleet.user("alice")["token"], base_url=fleet.api_url)
    bob_web = AsyncWebClient(token=fleet.user("bob")["token"], base_url=fleet.api_url)
    bot_web = AsyncWebClient(token=bot_user["token"], base_url=fleet.api_url)
    bob_id = fleet.user("bob")["id"]
    general = fleet.channel("general")
    with rtm_v2(fleet, "rtmbot") as (rtm, got):
        await eventually(lambda: got.of("hello"), "hello")
        assert rtm.bot_id == bot_user["bot_id"]
        name = unique("rtm")
        channel = (await alice.conversations_create(name=name))["channel"]["id"]
        await eventually(lambda: got.of("channel_created"), "channel_created on the team channel")
        assert got.of("channel_created")[-1]["channel"]["name"] == name
        await alice.conversations_invite(channel=channel, users=bot_user["id"])
        await eventually(
            lambda: [e for e in got.of("channel_joined") if e["channel"]["id"] == channel], "channel_joined"
        )
        bob = await fleet.connect("bob")
        try:
            await bob_web.conversations_join(channel=channel)
            await eventually(lambda: got.of("member_joined_channel", channel=channel, user=bob_id), "bob's join")
            await bob.wait_for(
                lambda c: any(e.get("type") == "channel_joined" for e in c.events), what="bob's channel_joined"
            )

            posted = await alice.chat_postMessage(channel=channel, text="hello bot")
            await eventually(lambda: "hello bot" in got.texts(channel), "a message")
            reply = await alice.chat_postMessage(channel=channel, text="in thread", thread_ts=posted["ts"])
            await eventually(lambda: got.of("message", channel=channel, thread_ts=posted["ts"]), "a thread reply")
            assert got.of("message", channel=channel, thread_ts=posted["ts"])[0]["ts"] == reply["ts"]
            await alice.chat_update(channel=channel, ts=posted["ts"], text="hello bot (edited)")
            await eventually(lambda: got.of("message", channel=channel, subtype="message_changed"), "message_changed")
            changed = got.of("message", subtype="message_changed")[0]
            assert changed["message"]["text"] == "hello bot (edited)" and changed["message"]["ts"] == posted["ts"]
            await bob_web.reactions_add(channel=channel, timestamp=posted["ts"], name="eyes")
            await eventually(lambda: got.of("reaction_added", user=bob_id), "reaction_added")
            added = got.of("reaction_added")[0]
            assert added["reaction"] == "eyes" and added["item"] == {
                "type": "message",
                "channel": channel,
                "ts": posted["ts"],
            }
            await bob_web.reactions_remove(channel=channel, timestamp=posted["ts"], name="eyes")
            await eventually(lambda: got.of("reaction_removed", user=bob_id), "reaction_removed")
            await alice.chat_delete(channel=channel, ts=reply["ts"])
            await eventually(lambda: got.of("message", channel=channel, subtype="message_deleted"), "message_deleted")
            assert got.of("message", subtype="message_deleted")[0]["deleted_ts"] == reply["ts"]

            # typing, both ways, never back to the typist
            await bob.send({"id": 1, "type": "typing", "channel": channel})
            await eventually(lambda: got.of("user_typing", channel=channel, user=bob_id), "bob typing")
            rtm.send({"id": 1, "type": "typing", "channel": channel})
            await bob.wait_for(
                lambda c: any(e.get("type") == "user_typing" and e.get("user") == bot_user["id"] for e in c.events),
                what="the bot typing",
            )
            # the bot's own posts reach others with its bot_id, and are not handed to its own listeners
            await bot_web.chat_postMessage(channel=channel, text="own post")
            rtm.send({"id": 42, "type": "message", "channel": channel, "text": "over the socket"})
            await eventually(lambda: [e for e in got.events if e.get("reply_to") == 42], "the reply to the socket send")
            ack = next(e for e in got.events if e.get("reply_to") == 42)
            assert ack["ok"] is True and ack["text"] == "over the socket" and ack["ts"]
            await bob.wait_texts(["own post", "over the socket"], channel)
            assert all(
                m.get("bot_id") == bot_user["bot_id"]
                for m in bob.messages(channel)
                if m.get("text") in ("own post", "over the socket")
            )
            await alice.chat_postMessage(channel=channel, text="marker")
            await eventually(lambda: "marker" in got.texts(channel), "marker")
            assert "own post" not in got.texts(channel) and "over the socket" not in got.texts(channel)
            assert any("own post" in raw for raw in got.raw), "the frame arrived; the SDK dropped it by bot_id"
            await bob.wait_texts(["marker"], channel)
            assert not [e for e in bob.events if e.get("type") == "user_typing" and e.get("user") == bob_id]

            # a kick stops the channel at once, without reconnecting; a DM starts at once
            await alice.conversations_kick(channel=channel, user=bot_user["id"])
            await eventually(lambda: got.of("channel_left", channel=channel), "channel_left")
            await alice.chat_postMessage(channel=channel, text="after the kick")
            dm = (await alice.conversations_open(users=bot_user["id"]))["channel"]["id"]
            await eventually(lambda: [e for e in got.of("im_created") if e["channel"]["id"] == dm], "im_created")
            await alice.chat_postMessage(channel=dm, text="direct")
            await eventually(lambda: "direct" in got.texts(dm), "a DM")
            await bob.wait_texts(["after the kick"], channel)
            tail = unique("tail")
            await alice.chat_postMessage(channel=general, text=tail)
            await eventually(lambda: tail in got.texts(general), "a later post in #general")
            assert "after the kick" not in got.texts(channel)
            await alice.conversations_rename(channel=channel, name=f"{name}-b")
            await alice.conversations_archive(channel=channel)
            await eventually(lambda: got.of("channel_archive", channel=channel), "channel_archive")
            assert got.of("channel_rename")[-1]["channel"] == {
                **got.of("channel_rename")[-1]["channel"],
                "id": channel,
                "name": f"{name}-b",
            }
            assert len(got.of("hello")) == 1
        finally:
            await bob.close()


async def test_legacy_rtm_client_receives_events_and_sends_typing(fleet: Fleet) -> None:
    """The legacy client in a thread of its own (its start() blocks and would take over signals in the main thread)."""
    hello, messages = threading.Event(), []
    general = fleet.channel("general")

    def on_hello(**payload: Any) -> None:
        hello.set()

    def on_message(**payload: Any) -> None:
        messages.append(payload["data"])

    loop = asyncio.new_event_loop()
    client = LegacyRTMClient(token=fleet.user("carol")["token"], base_url=fleet.api_url, loop=loop, ping_interval=5)
    LegacyRTMClient.on(event="hello", callback=on_hello)
    LegacyRTMClient.on(event="message", callback=on_message)

    def run() -> None:
        asyncio.set_event_loop(loop)
        try:
            client.start()
        except Exception:  # stop() closes the socket under it
            pass

    thread = threading.Thread(target=run, name="legacy-rtm", daemon=True)
    thread.start()
    bob = await fleet.connect("bob")
    try:
        await eventually(hello.is_set, "legacy hello")
        text = unique("legacy")
        alice = AsyncWebClient(token=fleet.user("alice")["token"], base_url=fleet.api_url)
        await alice.chat_postMessage(channel=general, text=text)
        await eventually(lambda: [m for m in messages if m.get("text") == text], "a message on the legacy client")
        assert next(m for m in messages if m.get("text") == text)["channel"] == general
        asyncio.run_coroutine_threadsafe(client.typing(channel=general), loop).result(DEFAULT_WAIT_S)
        carol_id = fleet.user("carol")["id"]
        await bob.wait_for(
            lambda c: any(e.get("type") == "user_typing" and e.get("user") == carol_id for e in c.events),
            what="carol typing from the legacy client",
        )
    finally:
        await bob.close()
        loop.call_soon_threadsafe(client.stop)
        await asyncio.to_thread(thread.join, DEFAULT_WAIT_S)
        for event, callback in (("hello", on_hello), ("message", on_message)):
            LegacyRTMClient._callbacks[event].remove(callback)
        assert not thread.is_alive()
        loop.close()


# -- goodbye ---------------------------------------------------------------------------------------


async def terminate_gateway_of(fleet: Fleet, url: str) -> dict[str, Any]:
    """SIGTERM the gateway serving ``url`` (it says goodbye); return its process entry."""
    fleet.reload()
    port = gateway_port(url)
    victim = next(p for p in fleet.processes("gateway") if p["port"] == port)
    fleet.kill(victim["pid"], signal.SIGTERM)
    return victim


async def wait_restarted(fleet: Fleet, victim: dict[str, Any]) -> None:
    def restarted() -> bool:
        fleet.reload()
        return any(p["port"] == victim["port"] and p["pid"] != victim["pid"] for p in fleet.processes("gateway"))

    await eventually(restarted, "rtm up to restart the gateway", timeout_s=30)


async def webapp_counter(fleet: Fleet, name: str, **labels: str) -> float:
    import aiohttp
    from prometheus_client.parser import text_string_to_metric_families

    async with aiohttp.ClientSession() as http:
        async with http.get(f"{fleet.info['webapp_url']}/metrics") as resp:
            text = await resp.text()
    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items())
    )


async def test_goodbye_makes_rtm_v2_reconnect_and_receive_later_posts(fleet: Fleet) -> None:
    general = fleet.channel("general")
    alice = AsyncWebClient(token=fleet.user("alice")["token"], base_url=fleet.api_url)
    with rtm_v2(fleet, "rtmbot") as (rtm, got):
        await eventually(lambda: got.of("hello"), "hello")
        first_url = rtm.wss_uri
        victim = await terminate_gateway_of(fleet, first_url)
        await eventually(lambda: got.of("goodbye"), "goodbye")
        await eventually(lambda: len(got.of("hello")) == 2, "hello on the new connection", timeout_s=20)
        assert rtm.wss_uri != first_url
        texts = [unique("after-goodbye") for _ in range(3)]
        for text in texts:
            await alice.chat_postMessage(channel=general, text=text)
        await eventually(lambda: all(t in got.texts(general) for t in texts), "posts after the reconnect")
        assert [t for t in got.texts(general) if t in texts] == texts
    await wait_restarted(fleet, victim)


async def test_goodbye_loses_nothing_posted_during_the_move(fleet: Fleet) -> None:
    """A steady stream of posts across the move arrives exactly once, in order: the
    stopping gateway leaves a resume record, rtm.connect names it in the new
    ticket, and the new gateway replays from it (DESIGN.md, "Ordering and no loss")."""
    general = fleet.channel("general")
    token = fleet.user("alice")["token"]
    posted: list[str] = []
    stop = threading.Event()

    def post_steadily() -> None:
        client = WebClient(token=token, base_url=fleet.api_url)
        n = 0
        while not stop.is_set():
            text = f"move-{n}"
            client.chat_postMessage(channel=general, text=text)
            posted.append(text)
            n += 1

    with rtm_v2(fleet, "rtmbot") as (rtm, got):
        await eventually(lambda: got.of("hello"), "hello")
        poster = threading.Thread(target=post_steadily, name="poster", daemon=True)
        poster.start()
        try:
            await eventually(lambda: len(posted) >= 20 and "move-10" in got.texts(general), "steady posts flowing")
            victim = await terminate_gateway_of(fleet, rtm.wss_uri)
            await eventually(lambda: len(got.of("hello")) == 2, "hello on the new connection", timeout_s=20)
            count = len(posted)
            await eventually(lambda: len(posted) >= count + 20, "posts after the move")
        finally:
            stop.set()
            await asyncio.to_thread(poster.join, DEFAULT_WAIT_S)
        last = posted[-1]
        await eventually(lambda: last in got.texts(general), "the last post")
        received = [t for t in got.texts(general) if t.startswith("move-")]
        await wait_restarted(fleet, victim)
        assert await webapp_counter(fleet, "rtm_webapp_resumes_total", step="used") >= 1, "the move went through resume"
        missing = [t for t in posted if t not in received]
        assert not missing, f"{len(missing)} of {len(posted)} posts lost during the move: {missing[:5]}..."
        assert received == posted, "each post exactly once, in order"
