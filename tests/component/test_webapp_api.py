"""The webapp in-process on a real port, a tiny fake Admin Server over real msgpack sockets,
and the official slack_sdk clients against it, unmodified.

Discovery is the FixedDiscovery seam (fixed admin-server/gateway lists); the
Consul registration path is covered at the end when the dev agent is present.
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families
from slack_sdk import WebClient
from slack_sdk.errors import SlackApiError
from slack_sdk.web.async_client import AsyncWebClient

from services.identity import ADMIN_SERVER, WEBAPP
from services.ticket import InvalidTicket, TicketVerifier
from tests.support import async_wait_until, free_port
from tests.webapp_harness import GATEWAY_INCARNATION, GATEWAY_INSTANCE, KEYS, SECRET, FakeAdminServer, Webapp, start
from webapp_stub.app import WebappServer, build_parser
from webapp_stub.checkpoint import WAL_CHECKPOINT_BYTES
from webapp_stub.resume import token_id
from webapp_stub.seed import seed_demo


async def test_post_reaches_admin_server_with_seq_and_exact_json(webapp: Webapp, fake_as: FakeAdminServer) -> None:
    alice, general = webapp.user("alice"), webapp.channel("general")
    status, reply = await webapp.call(
        "chat.postMessage", alice["token"], json_body={"channel": general, "text": "hello"}
    )
    assert status == 200 and reply["ok"], reply
    assert reply["channel"] == general and reply["message"]["text"] == "hello" and reply["ts"] == reply["message"]["ts"]

    async def arrived() -> bool:
        return bool(fake_as.pubs_for(general))

    await async_wait_until(arrived, what="the pub at the fake AS")
    pub = fake_as.pubs_for(general)[0]
    assert pub["seq"] == 1 and pub["eid"] == f"{general}:1" and isinstance(pub["t0"], float) and "ctl" not in pub
    event = json.loads(pub["json"])
    assert event == {
        "type": "message",
        "channel": general,
        "user": alice["id"],
        "text": "hello",
        "ts": reply["ts"],
        "team": webapp.seed["team"]["id"],
        "event_ts": reply["ts"],
    }
    # the bytes the AS got are exactly the stored JSON the gateways' history reads
    _, history = await webapp.internal("history", {"channel": general, "after_seq": 0})
    assert history["events"][0]["json"].encode() == pub["json"] and history["has_more"] is False


async def test_bad_inputs_get_slack_errors_and_server_keeps_serving(webapp: Webapp) -> None:
    alice, general = webapp.user("alice"), webapp.channel("general")
    cases = [
        (await webapp.call("no.such.method", alice["token"]), "unknown_method"),
        (await webapp.call("auth.test"), "not_authed"),
        (await webapp.call("auth.test", "xoxp-wrong"), "invalid_auth"),
        (await webapp.call("chat.postMessage", alice["token"], json_body={"text": "x"}), "channel_not_found"),
        (
            await webapp.call("chat.postMessage", alice["token"], json_body={"channel": "CNOPE", "text": "x"}),
            "channel_not_found",
        ),
        (
            await webapp.call("chat.postMessage", alice["token"], json_body={"channel": general, "text": "x" * 40_001}),
            "msg_too_long",
        ),
        (await webapp.call("chat.postMessage", alice["token"], json_body={"channel": general}), "no_text"),
        (
            await webapp.call(
                "chat.postMessage",
                alice["token"],
                data=b'{"channel": "C1", "text"',
                headers={"Content-Type": "application/json"},
            ),
            "invalid_json",
        ),
        (
            await webapp.call("conversations.history", alice["token"], params={"channel": general, "cursor": "%%%"}),
            "invalid_cursor",
        ),
        (
            await webapp.call("conversations.history", alice["token"], params={"channel": general, "limit": "many"}),
            "invalid_arguments",
        ),
        (await webapp.call("conversations.create", alice["token"], data={"name": "general"}), "name_taken"),
    ]
    for (status, reply), code in cases:
        assert status == 200 and reply == {"ok": False, "error": code}
    status, reply = await webapp.call(
        "chat.postMessage",
        alice["token"],
        data=b"x" * (5 * 1024 * 1024),
        headers={"Content-Type": "application/x-www-form-urlencoded"},
    )
    assert status == 413 and reply == {"ok": False, "error": "request_too_large"}
    status, reply = await webapp.call("api.test", data={"foo": "bar"})
    assert reply == {"ok": True, "args": {"foo": "bar"}}
    async with webapp.session.get(f"{webapp.url}/metrics") as resp:
        text = await resp.text()
    assert 'rtm_errors_total{kind="invalid_auth"} 1.0' in text
    assert 'rtm_webapp_requests_total{method="unknown",outcome="unknown_method"} 1.0' in text
    async with webapp.session.get(f"{webapp.url}/healthz") as resp:
        health = await resp.json()
    assert health["ok"] and health["service"] == "webapp" and health["admin_servers"] == 1


async def test_argument_styles_query_form_json_and_empty_body(webapp: Webapp) -> None:
    alice, general = webapp.user("alice"), webapp.channel("general")
    status, reply = await webapp.call(
        "chat.postMessage", data={"channel": general, "text": "form", "token": alice["token"]}
    )
    assert reply["ok"], reply
    status, reply = await webapp.call(
        "conversations.history",
        alice["token"],
        params={"channel": general},
        data=b"",
        headers={"Content-Type": "application/json"},
    )
    assert reply["ok"] and reply["messages"][0]["text"] == "form"
    status, reply = await webapp.call(
        "conversations.info", alice["token"], http="GET", params={"channel": general, "include_num_members": "1"}
    )
    assert reply["channel"]["num_members"] == 6 and reply["channel"]["is_member"] is True
    status, reply = await webapp.call(
        "chat.postMessage", alice["token"], params={"channel": "#general", "text": "by name"}
    )
    assert reply["ok"] and reply["channel"] == general


async def test_create_and_join_emit_team_channel_and_user_events(webapp: Webapp, fake_as: FakeAdminServer) -> None:
    alice, bob = webapp.user("alice"), webapp.user("bob")
    team = webapp.seed["team"]["id"]
    _, reply = await webapp.call("conversations.create", alice["token"], data={"name": "launch"})
    assert reply["ok"], reply
    cid = reply["channel"]["id"]
    _, reply = await webapp.call("conversations.join", bob["token"], data={"channel": cid})
    assert reply["ok"] and "warning" not in reply
    _, reply = await webapp.call("conversations.join", bob["token"], data={"channel": cid})
    assert reply["warning"] == "already_in_channel"

    async def all_arrived() -> bool:
        return len(fake_as.pubs_for(bob["id"])) == 1 and len(fake_as.pubs_for(cid)) == 2

    await async_wait_until(all_arrived, what="create and join events")
    created = fake_as.pubs_for(team)[0]
    assert json.loads(created["json"])["type"] == "channel_created" and created["seq"] == 1
    joins = fake_as.pubs_for(cid)
    assert [json.loads(p["json"])["user"] for p in joins] == [alice["id"], bob["id"]] and [p["seq"] for p in joins] == [
        1,
        2,
    ]
    bob_joined = fake_as.pubs_for(bob["id"])[0]
    assert bob_joined["ctl"] == {"join": cid, "since": 2}
    assert json.loads(bob_joined["json"])["channel"]["id"] == cid

    status, boot = await webapp.internal("bootstrap", {"user": bob["id"]})
    assert status == 200 and boot["ok"] and boot["user"] == {"id": bob["id"], "name": "bob"}
    assert boot["team"] == webapp.seed["team"]
    seqs = {c["id"]: c["seq"] for c in boot["channels"]}
    assert seqs[cid] == 2 and seqs[bob["id"]] == 1 and seqs[team] == 1
    _, hist = await webapp.internal("history", {"channel": bob["id"], "after_seq": 0})
    assert hist["events"][0]["ctl"] == {"join": cid, "since": 2}
    status, denied = await webapp.internal("bootstrap", {"user": bob["id"]}, role=ADMIN_SERVER)
    assert status == 403 and denied == {"ok": False, "error": "forbidden"}
    async with webapp.session.post(f"{webapp.url}/internal/bootstrap", json={"user": bob["id"]}) as resp:
        assert resp.status == 404  # the public port does not serve /internal/ at all
    _, missing = await webapp.internal("bootstrap", {"user": "UNOBODY"})
    assert missing == {"ok": False, "error": "user_not_found"}

    # a resume record with a leave the moved connection had not reached: the bootstrap names it
    rec = {"user": bob["id"], "token_id": token_id(bob["token"]), "channels": {bob["id"]: 1, cid: 1, team: 1}}
    rec["until"] = {cid: 2}
    _, recorded = await webapp.internal("resume", rec)
    assert recorded["ok"]
    _, resumed = await webapp.internal("bootstrap", {"user": bob["id"], "resume": recorded["resume"]})
    assert resumed["resumed"] and resumed["until"] == {cid: 2}
    assert {c["id"]: c["seq"] for c in resumed["channels"]}[cid] == 1
    for bad in ({cid: -1}, [cid], {cid: "x"}):
        _, refused = await webapp.internal("resume", {**rec, "until": bad})
        assert refused == {"ok": False, "error": "invalid_arguments"}


async def test_admin_server_down_then_back_delivers_in_order(webapp: Webapp, fake_as: FakeAdminServer) -> None:
    alice, general = webapp.user("alice"), webapp.channel("general")
    _, reply = await webapp.call("chat.postMessage", alice["token"], json_body={"channel": general, "text": "m0"})

    async def first_arrived() -> bool:
        return len(fake_as.pubs_for(general)) == 1

    await async_wait_until(first_arrived, what="first pub")
    await fake_as.kill()
    for i in range(1, 21):  # the AS is gone: every post is still ok (durable)
        _, reply = await webapp.call(
            "chat.postMessage", alice["token"], json_body={"channel": general, "text": f"m{i}"}
        )
        assert reply["ok"], reply
    handoff = webapp.server.handoff
    assert len(handoff) == 20 and len(fake_as.pubs) == 1  # queued, waiting, nothing lost
    await fake_as.start()

    async def rest_arrived() -> bool:
        return {p["seq"] for p in fake_as.pubs_for(general)} == set(range(1, 22))

    await async_wait_until(rest_arrived, what="queued pubs after the AS came back")
    seqs = [p["seq"] for p in fake_as.pubs_for(general)]
    first_seen = list(dict.fromkeys(seqs))
    assert first_seen == list(range(1, 22)), seqs  # in order, none lost
    assert [json.loads(p["json"])["text"] for p in fake_as.pubs_for(general)][-1] == "m20"


async def test_admin_server_dying_with_pubs_in_flight_gets_them_again(webapp: Webapp, fake_as: FakeAdminServer) -> None:
    alice, general = webapp.user("alice"), webapp.channel("general")
    fake_as.hold = True
    for i in range(5):
        assert (await webapp.call("chat.postMessage", alice["token"], json_body={"channel": general, "text": f"m{i}"}))[
            1
        ]["ok"]

    async def all_in_flight() -> bool:
        return len(fake_as.pubs) == 5

    await async_wait_until(all_in_flight, what="5 unanswered pubs")
    await fake_as.kill()  # they were never acknowledged
    fake_as.hold = False
    fake_as.pubs.clear()
    await fake_as.start()

    async def resent() -> bool:
        return len(fake_as.pubs) >= 5

    await async_wait_until(resent, what="the unacknowledged pubs resent")
    assert [p["seq"] for p in fake_as.pubs[:5]] == [1, 2, 3, 4, 5]
    handoff = webapp.server.handoff
    assert handoff.retries >= 1 and await handoff.flush(5.0)


async def test_events_posted_without_an_admin_server_are_handed_off_after_restart(
    tmp_path: Path, fake_as: FakeAdminServer
) -> None:
    app = await start(tmp_path, fake_as)
    app.discovery.set_instances("admin-server", [])  # no Admin Server at all
    general, alice = app.channel("general"), app.user("alice")
    for i in range(3):
        assert (await app.call("chat.postMessage", alice["token"], json_body={"channel": general, "text": f"m{i}"}))[1][
            "ok"
        ]
    await app.session.close()
    await app.stop()  # does not wait: nobody to flush to; the mark stays below the queued events
    assert fake_as.pubs_for(general) == []
    again = await start(tmp_path, fake_as)
    try:

        async def replayed() -> bool:
            return [p["seq"] for p in fake_as.pubs_for(general)] == [1, 2, 3]

        await async_wait_until(replayed, what="the queued events after the restart")
    finally:
        await again.session.close()
        await again.stop()


async def test_checkpoints_run_beside_the_event_loop_and_stop_with_the_webapp(
    tmp_path: Path, fake_as: FakeAdminServer
) -> None:
    app = await start(tmp_path, fake_as)
    store = app.server.store
    checkpointer = store.checkpointer
    try:
        assert checkpointer is not None and checkpointer.running
        # no checkpoint inside a commit but the backstop, far past the thread's bound
        page_bytes = store.conn.execute("PRAGMA page_size").fetchone()[0]
        assert store.conn.execute("PRAGMA wal_autocheckpoint").fetchone()[0] * page_bytes > WAL_CHECKPOINT_BYTES
        general, alice = app.channel("general"), app.user("alice")
        for i in range(5):
            assert (
                await app.call("chat.postMessage", alice["token"], json_body={"channel": general, "text": f"m{i}"})
            )[1]["ok"]
        async with app.session.get(f"{app.url}/metrics") as resp:
            text = await resp.text()
        samples = {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text)
            for s in family.samples
        }
        method = ("method", "chat.postMessage")
        assert samples[("rtm_webapp_requests_total", (method, ("outcome", "ok")))] == 5
        assert samples[("rtm_webapp_request_seconds_count", (method,))] == 5
    finally:
        await app.session.close()
        await app.stop()
    assert not checkpointer.running and store.checkpointer is None


async def test_rtm_connect_mints_a_ticket_for_a_healthy_gateway(webapp: Webapp) -> None:
    alice = webapp.user("alice")
    _, reply = await webapp.call("rtm.connect", alice["token"])
    assert (
        reply["ok"] and reply["self"] == {"id": alice["id"], "name": "alice"} and reply["team"] == webapp.seed["team"]
    )
    prefix = f"ws://{GATEWAY_INSTANCE.address}:{GATEWAY_INSTANCE.port}/ws/"
    assert reply["url"].startswith(prefix)
    ticket = TicketVerifier(KEYS.ticket_signing, GATEWAY_INSTANCE.id, incarnation=GATEWAY_INCARNATION).verify(
        reply["url"][len(prefix) :], now_s=time.time()
    )
    assert ticket.user == alice["id"] and ticket.team == webapp.seed["team"]["id"]
    assert ticket.incarnation == GATEWAY_INCARNATION  # bound to the gateway's current start (Consul meta)
    _, again = await webapp.call("rtm.connect", alice["token"])
    with pytest.raises(InvalidTicket, match="earlier start"):  # the same gateway id, restarted
        TicketVerifier(KEYS.ticket_signing, GATEWAY_INSTANCE.id, incarnation="restarted").verify(
            again["url"][len(prefix) :], now_s=time.time()
        )
    webapp.discovery.set_instances("gateway", [])
    _, reply = await webapp.call("rtm.connect", alice["token"])
    assert reply == {"ok": False, "error": "service_unavailable"}


async def test_rate_limit_answers_429_with_retry_after(tmp_path: Path, fake_as: FakeAdminServer) -> None:
    app = await start(tmp_path, fake_as, "--rate-limit-per-minute", "2")
    try:
        token = app.user("alice")["token"]
        assert (await app.call("auth.test", token))[1]["ok"]
        assert (await app.call("auth.test", token))[1]["ok"]
        async with app.session.post(f"{app.url}/api/auth.test", headers={"Authorization": f"Bearer {token}"}) as resp:
            assert resp.status == 429 and int(resp.headers["Retry-After"]) >= 1
            assert await resp.json() == {"ok": False, "error": "ratelimited"}
        assert (await app.call("users.list", token))[1]["ok"]  # per method
    finally:
        await app.session.close()
        await app.stop()


async def test_slack_sdk_clients_unmodified(webapp: Webapp, fake_as: FakeAdminServer) -> None:
    alice, bot, general = webapp.user("alice"), webapp.user("rtmbot"), webapp.channel("general")
    base_url = f"http://127.0.0.1:{webapp.port}/api/"

    def sync_calls() -> dict[str, Any]:
        client = WebClient(token=alice["token"], base_url=base_url)
        out: dict[str, Any] = {"auth": client.auth_test().data}
        out["bot_auth"] = WebClient(token=bot["token"], base_url=base_url).auth_test().data
        out["posts"] = [client.chat_postMessage(channel=general, text=f"sdk {i}").data for i in range(7)]
        out["history"] = [
            m["text"] for page in client.conversations_history(channel=general, limit=3) for m in page["messages"]
        ]
        out["pages"] = len(list(client.conversations_history(channel=general, limit=3)))
        out["users"] = [u["name"] for page in client.users_list(limit=2) for u in page["members"]]
        out["channels"] = [c["name"] for page in client.conversations_list(limit=1) for c in page["channels"]]
        out["members"] = [m for page in client.conversations_members(channel=general, limit=4) for m in page["members"]]
        out["rtm"] = client.rtm_connect().data
        try:
            WebClient(token="xoxp-nope", base_url=base_url).auth_test()
        except SlackApiError as exc:
            out["bad"] = exc.response["error"]
        return out

    out = await asyncio.to_thread(sync_calls)
    assert out["auth"]["user_id"] == alice["id"] and "bot_id" not in out["auth"]
    assert out["auth"]["team_id"] == webapp.seed["team"]["id"] and out["auth"]["user"] == "alice"
    assert out["bot_auth"]["bot_id"] == bot["bot_id"]
    assert all(p["ok"] for p in out["posts"])
    assert out["history"] == [f"sdk {i}" for i in reversed(range(7))] and out["pages"] == 3
    assert out["users"] == ["alice", "bob", "carol", "dave", "eve", "rtmbot", "slackbot"]  # Slack lists Slackbot too
    assert out["channels"] == ["general", "random"]
    assert sorted(out["members"]) == sorted(u["id"] for u in webapp.seed["users"])
    assert out["rtm"]["url"].startswith("ws://127.0.0.1:45678/ws/")
    assert out["bad"] == "invalid_auth"

    # AsyncWebClient reads with GET and query arguments
    client = AsyncWebClient(token=bot["token"], base_url=base_url)
    posted = await client.chat_postMessage(channel=general, text="from the bot")
    assert posted["message"]["bot_id"] == bot["bot_id"]
    texts = []
    async for page in await client.conversations_history(channel=general, limit=4):
        texts += [m["text"] for m in page["messages"]]
    assert texts[0] == "from the bot" and len(texts) == 8
    users = []
    async for page in await client.users_list(limit=4):
        users += [u["id"] for u in page["members"]]
    assert len(users) == 7  # the seed's six and Slackbot

    async def pubs_arrived() -> bool:
        return len(fake_as.pubs_for(general)) == 8

    await async_wait_until(pubs_arrived, what="all sdk posts at the AS")
    assert [p["seq"] for p in fake_as.pubs_for(general)] == list(range(1, 9))


@pytest.mark.skipif(importlib.util.find_spec("consul_dev") is None, reason="dev Consul agent not present")
async def test_registers_in_consul_and_watches_admin_servers(tmp_path: Path, fake_as: FakeAdminServer) -> None:
    """Through real Discovery against the dev agent: register, find the AS, hand off."""
    from services.discovery import Discovery

    port = free_port()
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "consul_dev",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )
    consul_addr = f"127.0.0.1:{port}"
    other = Discovery(consul_addr)
    try:

        async def agent_up() -> bool:
            try:
                await other.healthy("webapp")
            except Exception:
                return False
            return True

        await async_wait_until(agent_up, what="dev consul agent")
        await other.register("admin-server", "as-fake", "127.0.0.1", fake_as.port, ttl_s=3.0)
        seed = seed_demo(str(tmp_path), users=2, channels=2, bots=0)
        args = build_parser().parse_args(
            [
                "--port",
                "0",
                "--data-dir",
                str(tmp_path),
                "--secret",
                SECRET,
                "--consul",
                consul_addr,
                "--instance-id",
                "webapp-consul",
                *fake_as.ca.flags(WEBAPP, "webapp-consul"),
            ]
        )
        server = WebappServer(args)
        info = await server.start()
        try:
            _, instances = await other.healthy("webapp")
            assert [(i.id, i.port, i.meta.get("metrics_port")) for i in instances] == [
                ("webapp-consul", info["port"], str(info["port"]))
            ]
            async with aiohttp.ClientSession() as session:
                async with session.post(
                    f"{info['url']}/api/chat.postMessage",
                    json={"channel": seed["channels"][0]["id"], "text": "via consul"},
                    headers={"Authorization": f"Bearer {seed['users'][0]['token']}"},
                ) as resp:
                    assert (await resp.json())["ok"]

            async def delivered() -> bool:
                return bool(fake_as.pubs)

            await async_wait_until(delivered, what="pub via an AS found in Consul")
        finally:
            await server.stop()
        _, instances = await other.healthy("webapp")
        assert instances == []  # deregistered on stop
    finally:
        await other.close()
        proc.terminate()
        await proc.wait()


# -- issue 5: every method's bad input, resume records ------------------------------------------


async def test_each_method_answers_slacks_error_code_for_bad_input_and_counts_it(webapp: Webapp) -> None:
    alice, bob, general = webapp.user("alice"), webapp.user("bob"), webapp.channel("general")
    a, b = alice["token"], bob["token"]

    async def ok(method: str, token: str, **args: Any) -> dict[str, Any]:
        _, reply = await webapp.call(method, token, json_body=args)
        assert reply["ok"], (method, reply)
        return reply

    posted = (await ok("chat.postMessage", a, channel=general, text="mine"))["ts"]
    await ok("reactions.add", b, channel=general, timestamp=posted, name="eyes")
    own = (await ok("conversations.create", a, name="alices"))["channel"]["id"]
    gone = (await ok("conversations.create", a, name="gone"))["channel"]["id"]
    await ok("conversations.archive", a, channel=gone)
    cases: list[tuple[str, str, dict[str, Any], str]] = [
        ("chat.postMessage", a, {"channel": general, "text": "x", "thread_ts": "soon"}, "invalid_thread_ts"),
        ("chat.postMessage", a, {"channel": general, "text": "x", "thread_ts": "1.000001"}, "thread_not_found"),
        ("chat.postMessage", b, {"channel": own, "text": "x"}, "not_in_channel"),
        ("chat.postMessage", a, {"channel": gone, "text": "x"}, "is_archived"),
        ("chat.update", a, {"ts": posted, "text": "x"}, "channel_not_found"),
        ("chat.update", a, {"channel": general, "text": "x"}, "invalid_arguments"),
        ("chat.update", a, {"channel": general, "ts": "noon", "text": "x"}, "invalid_ts"),
        ("chat.update", a, {"channel": general, "ts": "1.000001", "text": "x"}, "message_not_found"),
        ("chat.update", b, {"channel": general, "ts": posted, "text": "x"}, "cant_update_message"),
        ("chat.update", a, {"channel": general, "ts": posted, "text": "x" * 40_001}, "msg_too_long"),
        ("chat.update", a, {"channel": general, "ts": posted}, "no_text"),
        ("chat.delete", a, {"channel": general, "ts": "1.000001"}, "message_not_found"),
        ("chat.delete", a, {"channel": general, "ts": "x.y"}, "invalid_ts"),
        ("chat.delete", b, {"channel": general, "ts": posted}, "cant_delete_message"),
        ("chat.postEphemeral", a, {"channel": general, "text": "x"}, "user_not_found"),
        ("chat.postEphemeral", a, {"channel": own, "user": bob["id"], "text": "x"}, "user_not_in_channel"),
        ("chat.postEphemeral", a, {"channel": general, "user": bob["id"]}, "no_text"),
        ("conversations.create", a, {}, "invalid_name_required"),
        ("conversations.create", a, {"name": "No Spaces"}, "invalid_name_specials"),
        ("conversations.create", a, {"name": "x" * 81}, "invalid_name_maxlength"),
        ("conversations.join", a, {"channel": "CNOPE"}, "channel_not_found"),
        ("conversations.join", b, {"channel": gone}, "is_archived"),
        ("conversations.leave", a, {"channel": general}, "cant_leave_general"),
        ("conversations.leave", a, {}, "channel_not_found"),
        ("conversations.invite", a, {"channel": own}, "no_user"),
        ("conversations.invite", a, {"channel": own, "users": "UNOBODY"}, "user_not_found"),
        ("conversations.invite", a, {"channel": own, "users": alice["id"]}, "cant_invite_self"),
        ("conversations.invite", b, {"channel": own, "users": webapp.user("carol")["id"]}, "not_in_channel"),
        ("conversations.invite", a, {"channel": general, "users": bob["id"]}, "already_in_channel"),
        ("conversations.kick", a, {"channel": own, "user": alice["id"]}, "cant_kick_self"),
        ("conversations.kick", a, {"channel": own, "user": "UNOBODY"}, "user_not_found"),
        ("conversations.kick", a, {"channel": own, "user": bob["id"]}, "not_in_channel"),
        ("conversations.kick", a, {"channel": general, "user": bob["id"]}, "cant_kick_from_general"),
        ("conversations.list", a, {"types": "public_channel,feeds"}, "invalid_types"),
        ("conversations.list", a, {"cursor": "bogus!"}, "invalid_cursor"),
        ("conversations.list", a, {"limit": "ten"}, "invalid_arguments"),
        ("conversations.info", a, {"channel": "CNOPE"}, "channel_not_found"),
        ("conversations.members", a, {"channel": "CNOPE"}, "channel_not_found"),
        ("conversations.history", a, {"channel": general, "oldest": "dawn"}, "invalid_ts_oldest"),
        ("conversations.history", a, {"channel": general, "latest": "dusk"}, "invalid_ts_latest"),
        ("conversations.replies", a, {"channel": general, "ts": "1.000001"}, "thread_not_found"),
        ("conversations.replies", a, {"channel": general}, "thread_not_found"),
        ("conversations.open", a, {}, "users_list_not_supplied"),
        ("conversations.open", a, {"users": "UNOBODY"}, "user_not_found"),
        ("conversations.open", a, {"channel": general}, "method_not_supported_for_channel_type"),
        ("conversations.rename", a, {"channel": own, "name": "Bad Name"}, "invalid_name_specials"),
        ("conversations.rename", b, {"channel": own, "name": "bobs"}, "not_in_channel"),
        ("conversations.rename", a, {"channel": own, "name": "random"}, "name_taken"),
        ("conversations.archive", a, {"channel": general}, "cant_archive_general"),
        ("conversations.archive", a, {"channel": gone}, "already_archived"),
        ("conversations.unarchive", a, {"channel": own}, "not_archived"),
        ("reactions.add", a, {}, "no_item_specified"),
        ("reactions.add", a, {"channel": general, "timestamp": posted, "name": "not valid"}, "invalid_name"),
        ("reactions.add", a, {"channel": general, "timestamp": "1.000001", "name": "ok"}, "message_not_found"),
        ("reactions.add", a, {"channel": general, "timestamp": "then", "name": "ok"}, "invalid_ts"),
        ("reactions.add", b, {"channel": general, "timestamp": posted, "name": "eyes"}, "already_reacted"),
        ("reactions.add", a, {"channel": "CNOPE", "timestamp": posted, "name": "ok"}, "channel_not_found"),
        ("reactions.remove", a, {"channel": general, "timestamp": posted, "name": "eyes"}, "no_reaction"),
        ("reactions.get", a, {"channel": general, "timestamp": "1.000001"}, "message_not_found"),
        ("users.info", a, {"user": "UNOBODY"}, "user_not_found"),
        ("users.info", a, {}, "user_not_found"),
        ("users.conversations", a, {"user": "UNOBODY"}, "user_not_found"),
        ("users.conversations", a, {"types": "dm"}, "invalid_types"),
        ("users.getPresence", a, {"user": "UNOBODY"}, "user_not_found"),
        ("users.setPresence", a, {"presence": "busy"}, "invalid_presence"),
        ("users.setPresence", a, {}, "invalid_presence"),
        ("bots.info", a, {"bot": "BNOPE"}, "bot_not_found"),
        ("bots.info", a, {}, "bot_not_found"),
    ]
    for method_name, token, args, code in cases:
        status, reply = await webapp.call(method_name, token, json_body=args)
        assert (status, reply) == (200, {"ok": False, "error": code}), (method_name, args, reply)
    # the same errors arrive the same way from form bodies and query strings
    _, reply = await webapp.call("chat.update", a, data={"channel": general, "ts": "noon", "text": "x"})
    assert reply == {"ok": False, "error": "invalid_ts"}
    _, reply = await webapp.call("reactions.get", a, http="GET", params={"channel": general, "timestamp": "1.000001"})
    assert reply == {"ok": False, "error": "message_not_found"}
    async with webapp.session.get(f"{webapp.url}/metrics") as resp:
        text = await resp.text()
    counted = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "rtm_errors_total":
                counted[sample.labels["kind"]] = sample.value
    for _, _, _, code in cases:
        assert counted.get(code, 0) >= 1, f"{code} not counted"
    assert counted["invalid_ts"] >= 4 and counted["message_not_found"] >= 5


async def test_new_methods_reply_in_slacks_shapes(webapp: Webapp, fake_as: FakeAdminServer) -> None:
    alice, bob, bot = webapp.user("alice"), webapp.user("bob"), webapp.user("rtmbot")
    a, b = alice["token"], bob["token"]
    general = webapp.channel("general")

    async def ok(method: str, token: str, **args: Any) -> dict[str, Any]:
        _, reply = await webapp.call(method, token, json_body=args)
        assert reply["ok"], (method, reply)
        return reply

    opened = await ok("conversations.open", a, users=bob["id"])
    dm = opened["channel"]["id"]
    assert dm.startswith("D") and "already_open" not in opened
    again = await ok("conversations.open", b, users=alice["id"], return_im=True)
    assert again["channel"]["id"] == dm and again["already_open"] and again["channel"]["user"] == alice["id"]
    info = (await ok("conversations.info", a, channel=dm))["channel"]
    assert info["is_im"] and info["user"] == bob["id"]
    by_user = await ok("chat.postMessage", a, channel=bob["id"], text="to bob's DM")
    assert by_user["channel"] == dm
    ims = (await ok("users.conversations", b, types="im"))["channels"]
    assert [c["id"] for c in ims] == [dm]
    posted = await ok("chat.postMessage", a, channel=general, text="v1")
    updated = await ok("chat.update", a, channel=general, ts=posted["ts"], text="v2")
    assert (
        updated["ts"] == posted["ts"]
        and updated["text"] == "v2"
        and updated["message"]["edited"]["user"] == alice["id"]
    )
    await ok("reactions.add", b, channel=general, timestamp=posted["ts"], name="tada")
    got = await ok("reactions.get", a, channel=general, timestamp=posted["ts"])
    assert got["type"] == "message" and got["message"]["reactions"] == [
        {"name": "tada", "users": [bob["id"]], "count": 1}
    ]
    eph = await ok("chat.postEphemeral", a, channel=general, user=bob["id"], text="psst")
    assert set(eph) == {"ok", "message_ts"}
    deleted = await ok("chat.delete", a, channel=general, ts=posted["ts"])
    assert deleted == {"ok": True, "channel": general, "ts": posted["ts"]}
    presence = await ok("users.getPresence", a)
    assert presence["presence"] == "active" and presence["online"] and not presence["manual_away"]
    await ok("users.setPresence", a, presence="away")
    assert (await ok("users.getPresence", a))["presence"] == "away"
    assert (await ok("users.getPresence", b, user=alice["id"])) == {"ok": True, "presence": "away"}
    assert (await ok("users.getPresence", a, user=webapp.user("eve")["id"]))["presence"] == "away"  # never seen
    bot_info = (await ok("bots.info", a, bot=bot["bot_id"]))["bot"]
    assert bot_info["id"] == bot["bot_id"] and bot_info["user_id"] == bot["id"] and bot_info["name"] == "rtmbot"
    assert (await ok("bots.info", bot["token"]))["bot"]["id"] == bot["bot_id"]
    left = await ok("conversations.leave", a, channel=webapp.channel("random"))
    assert left == {"ok": True}
    assert await ok("conversations.leave", a, channel=webapp.channel("random")) == {"ok": True, "not_in_channel": True}

    async def user_events_arrived() -> bool:
        return any(json.loads(p["json"])["type"] == "channel_left" for p in fake_as.pubs_for(alice["id"]))

    await async_wait_until(user_events_arrived, what="channel_left on alice's channel")
    kinds = [json.loads(p["json"])["type"] for p in fake_as.pubs_for(alice["id"])]
    assert kinds == ["im_created", "manual_presence_change", "channel_left"]
    left_pub = fake_as.pubs_for(alice["id"])[-1]
    random_left = [p for p in fake_as.pubs_for(webapp.channel("random")) if b"member_left_channel" in p["json"]]
    # the leaver's connections get #random up to its member_left_channel, none after
    assert left_pub["ctl"] == {"leave": webapp.channel("random"), "upto": random_left[-1]["seq"]}
    assert [json.loads(p["json"])["type"] for p in fake_as.pubs_for(bob["id"])] == [
        "im_created",
        "message",
    ]  # the ephemeral


async def test_resume_record_flows_from_gateway_to_rtm_connect_to_bootstrap(webapp: Webapp) -> None:
    alice, general = webapp.user("alice"), webapp.channel("general")
    for i in range(4):
        assert (await webapp.call("chat.postMessage", alice["token"], json_body={"channel": general, "text": f"m{i}"}))[
            1
        ]["ok"]
    mine = {"user": alice["id"], "token_id": token_id(alice["token"])}
    status, reply = await webapp.internal("resume", {**mine, "channels": {general: 1, alice["id"]: 0}})
    assert status == 200 and reply["ok"] and reply["resume"]
    rid = reply["resume"]
    _, connect = await webapp.call("rtm.connect", alice["token"])
    prefix = f"ws://{GATEWAY_INSTANCE.address}:{GATEWAY_INSTANCE.port}/ws/"
    ticket = TicketVerifier(KEYS.ticket_signing, GATEWAY_INSTANCE.id, incarnation=GATEWAY_INCARNATION).verify(
        connect["url"][len(prefix) :], now_s=time.time()
    )
    assert ticket.resume == rid
    # Claimed but not taken (as if that ticket failed): a retry gets the same record again.
    _, connect = await webapp.call("rtm.connect", alice["token"])
    assert (
        TicketVerifier(KEYS.ticket_signing, GATEWAY_INSTANCE.id, incarnation=GATEWAY_INCARNATION)
        .verify(connect["url"][len(prefix) :], now_s=time.time())
        .resume
        == rid
    )
    _, boot = await webapp.internal("bootstrap", {"user": alice["id"], "resume": rid})
    seqs = {c["id"]: c["seq"] for c in boot["channels"]}
    assert boot["resumed"] is True and seqs[general] == 1 and seqs[webapp.channel("random")] == 0
    _, boot = await webapp.internal("bootstrap", {"user": alice["id"], "resume": rid})  # used up
    assert boot["resumed"] is False and {c["id"]: c["seq"] for c in boot["channels"]}[general] == 4
    _, connect = await webapp.call("rtm.connect", alice["token"])  # taken: nothing left to claim
    assert (
        TicketVerifier(KEYS.ticket_signing, GATEWAY_INSTANCE.id, incarnation=GATEWAY_INCARNATION)
        .verify(connect["url"][len(prefix) :], now_s=time.time())
        .resume
        == ""
    )
    for body, code in (
        ({"user": "UNOBODY", "channels": {}}, "user_not_found"),
        ({**mine, "channels": [general]}, "invalid_arguments"),
        ({**mine, "channels": {general: "many"}}, "invalid_arguments"),
        ({**mine, "channels": {general: -1}}, "invalid_arguments"),
        ({"user": alice["id"], "channels": {general: 1}}, "invalid_arguments"),  # no token id: none could claim it
        ({**mine, "token_id": ["x"], "channels": {general: 1}}, "invalid_arguments"),
        ({**mine, "token_id": "x" * 65, "channels": {general: 1}}, "invalid_arguments"),
    ):
        assert (await webapp.internal("resume", body))[1] == {"ok": False, "error": code}
    status, _ = await webapp.internal("resume", {"user": alice["id"], "channels": {}}, role=WEBAPP)
    assert status == 403
    async with webapp.session.get(f"{webapp.url}/metrics") as resp:
        text = await resp.text()
    for step, count in (("recorded", 1), ("claimed", 2), ("used", 1), ("expired", 1)):
        assert f'rtm_webapp_resumes_total{{step="{step}"}} {count}.0' in text, step


def add_token(webapp: Webapp, user_id: str, token: str) -> None:
    """A second token of ``user_id`` (a second device), written to the store directly."""
    with webapp.server.store.transaction() as db:
        db.execute("INSERT INTO tokens (token, user) VALUES (?, ?)", (token, user_id))


def ticket_reader(webapp: Webapp) -> Callable[[str], Awaitable[Any]]:
    """The ticket inside the URL that ``rtm.connect`` answers a token with, verified."""
    prefix = f"ws://{GATEWAY_INSTANCE.address}:{GATEWAY_INSTANCE.port}/ws/"
    verifier = TicketVerifier(KEYS.ticket_signing, GATEWAY_INSTANCE.id, incarnation=GATEWAY_INCARNATION)

    async def ticket_of(token: str) -> Any:
        _, connect = await webapp.call("rtm.connect", token)
        return verifier.verify(connect["url"][len(prefix) :], now_s=time.time())

    return ticket_of


async def test_resume_records_are_claimed_by_the_token_whose_connection_moved(webapp: Webapp) -> None:
    """Two devices of dave, two tokens, both moved: each device's rtm.connect names its own record
    (whichever asks first), the ticket carries the token's id (not the token), and a record is
    never handed to the other device."""
    dave, general = webapp.user("dave"), webapp.channel("general")
    laptop, phone = dave["token"], "xoxp-dave-phone-0123456789abcdef"
    add_token(webapp, dave["id"], phone)
    ticket_of = ticket_reader(webapp)
    for i in range(3):
        assert (await webapp.call("chat.postMessage", laptop, json_body={"channel": general, "text": f"d{i}"}))[1]["ok"]
    first = await ticket_of(laptop)
    assert first.token_id == token_id(laptop) and laptop not in json.dumps(first.__dict__)
    records = {}
    for token, seq in ((laptop, 1), (phone, 3)):
        body = {"user": dave["id"], "token_id": (await ticket_of(token)).token_id, "channels": {general: seq}}
        _, reply = await webapp.internal("resume", body)
        records[token] = reply["resume"]
    assert (await ticket_of(phone)).resume == records[phone]  # the phone first: its own, not the older one
    assert (await ticket_of(laptop)).resume == records[laptop]
    _, boot = await webapp.internal("bootstrap", {"user": dave["id"], "resume": records[phone], "nonce": "n-p"})
    assert {c["id"]: c["seq"] for c in boot["channels"]}[general] == 3
    assert (await webapp.internal("resume/confirm", {"user": dave["id"], "resume": records[phone], "nonce": "n-p"}))[1][
        "confirmed"
    ]
    assert (await ticket_of(phone)).resume == ""  # the laptop's record stays the laptop's
    assert (await ticket_of(laptop)).resume == records[laptop]


async def test_auth_revoke_publishes_the_revoke_and_refuses_the_tokens_tickets_and_records(
    webapp: Webapp, fake_as: FakeAdminServer
) -> None:
    """Finding 7 (docs/authz-review.md), the webapp's part: auth.revoke publishes ``tokens_revoked``
    on the user's channel with ``ctl = {"revoke": token id}`` (a pub every hop accepts); a ticket
    minted before the revoke is refused at the bootstrap (``token_revoked``: the gateway closes
    with 4003), with or without the resume record it names, which is gone; the user's other token
    still connects, and a bootstrap without a token id (Socket Mode) is unchanged."""
    dave = webapp.user("dave")
    leaked, phone = dave["token"], "xoxp-dave-phone-fedcba9876543210"
    add_token(webapp, dave["id"], phone)
    ticket_of = ticket_reader(webapp)
    body = {"user": dave["id"], "token_id": token_id(leaked), "channels": {webapp.channel("general"): 0}}
    rid = (await webapp.internal("resume", body))[1]["resume"]
    minted = await ticket_of(leaked)  # before the revoke: names the record
    assert minted.resume == rid and minted.token_id == token_id(leaked)
    assert (await webapp.call("auth.revoke", leaked))[1] == {"ok": True, "revoked": True}

    async def arrived() -> bool:
        return bool(fake_as.pubs_for(dave["id"]))

    await async_wait_until(arrived, what="the revoke's pub at the fake AS")
    pub = fake_as.pubs_for(dave["id"])[-1]
    assert pub["ctl"] == {"revoke": token_id(leaked)} and leaked.encode() not in pub["json"]
    assert json.loads(pub["json"]) == {"type": "tokens_revoked", "tokens": {"oauth": [dave["id"]]}}
    boot = {"user": dave["id"], "token_id": minted.token_id}
    for extra in ({"resume": rid, "nonce": minted.nonce}, {}):
        status, reply = await webapp.internal("bootstrap", {**boot, **extra})
        assert reply == {"ok": False, "error": "token_revoked"}, extra
    assert rid not in {r.id for r in webapp.server.api.resume._records.values()}
    assert (await webapp.call("rtm.connect", leaked))[1] == {"ok": False, "error": "invalid_auth"}
    fresh = await ticket_of(phone)
    assert (await webapp.internal("bootstrap", {"user": dave["id"], "token_id": fresh.token_id}))[1]["ok"]
    assert (await webapp.internal("bootstrap", {"user": dave["id"]}))[1]["ok"]  # no token id: not checked
    for bad in (["x"], "x" * 65):  # not a string; longer than any token id
        status, reply = await webapp.internal("bootstrap", {"user": dave["id"], "token_id": bad})
        assert reply == {"ok": False, "error": "invalid_arguments"}, bad
    assert (await webapp.internal("bootstrap", {"user": dave["id"], "token_id": fresh.token_id}))[1]["ok"]


async def test_auth_revoke_replies_after_its_bound_when_the_fleet_does_not_take_its_event(
    webapp: Webapp, fake_as: FakeAdminServer
) -> None:
    """An Admin Server that never answers: auth.revoke still replies (revoked, durable) once
    --revoke-fanout-wait-s has passed, counted; the event waits in the hand-off for the fleet."""
    webapp.server.api.revoke_fanout_wait_s = 0.2
    fake_as.hold = True
    eve = webapp.user("eve")
    started = time.monotonic()
    assert (await webapp.call("auth.revoke", eve["token"]))[1] == {"ok": True, "revoked": True}
    assert time.monotonic() - started >= 0.2
    assert (await webapp.call("auth.test", eve["token"]))[1] == {"ok": False, "error": "invalid_auth"}
    async with webapp.session.get(f"{webapp.url}/metrics") as resp:
        assert 'rtm_errors_total{kind="revoke_fanout_late"} 1.0' in await resp.text()


async def test_resume_records_survive_a_webapp_restart(tmp_path: Path, fake_as: FakeAdminServer) -> None:
    """A record answered ok is committed: a new webapp process on the same data dir still hands it
    to the moved connection's token (the kill -9 case is in tests/system/test_resume_restart.py)."""
    first = await start(tmp_path, fake_as)
    try:
        erin, general = first.user("eve"), first.channel("general")
        body = {"user": erin["id"], "token_id": token_id(erin["token"]), "channels": {general: 0}}
        _, reply = await first.internal("resume", body)
        rid = reply["resume"]
    finally:
        await first.session.close()
        await first.stop()
    again = await start(tmp_path, fake_as)
    try:
        _, connect = await again.call("rtm.connect", erin["token"])
        prefix = f"ws://{GATEWAY_INSTANCE.address}:{GATEWAY_INSTANCE.port}/ws/"
        verifier = TicketVerifier(KEYS.ticket_signing, GATEWAY_INSTANCE.id, incarnation=GATEWAY_INCARNATION)
        assert verifier.verify(connect["url"][len(prefix) :], now_s=time.time()).resume == rid
        _, boot = await again.internal("bootstrap", {"user": erin["id"], "resume": rid, "nonce": "n-1"})
        assert boot["resumed"] is True and {c["id"]: c["seq"] for c in boot["channels"]}[general] == 0
    finally:
        await again.session.close()
        await again.stop()


async def test_a_resume_record_past_its_deadline_is_refused(webapp: Webapp) -> None:
    """The gateway gave up on the reply at ``deadline`` and closed the connection without goodbye:
    a record arriving later must not be kept, or a later connection of the user would claim it
    and replay events it already had."""
    bob, general = webapp.user("bob"), webapp.channel("general")
    record = {"user": bob["id"], "token_id": token_id(bob["token"]), "channels": {general: 0}}
    late = await webapp.internal("resume", {**record, "deadline": time.time() - 0.5})
    assert late[1] == {"ok": False, "error": "resume_expired"}
    for bad, code in (("soon", "invalid_arguments"), (True, "invalid_arguments"), ([1], "invalid_arguments")):
        refused = await webapp.internal("resume", {**record, "deadline": bad})
        assert refused[1] == {"ok": False, "error": code}, bad
    refused = await webapp.internal("resume", {**record, "deadline": float("nan")})  # sent as NaN: not JSON
    assert refused[1] == {"ok": False, "error": "invalid_json"}
    _, connect = await webapp.call("rtm.connect", bob["token"])  # nothing was recorded to claim
    prefix = f"ws://{GATEWAY_INSTANCE.address}:{GATEWAY_INSTANCE.port}/ws/"
    verifier = TicketVerifier(KEYS.ticket_signing, GATEWAY_INSTANCE.id, incarnation=GATEWAY_INCARNATION)
    assert verifier.verify(connect["url"][len(prefix) :], now_s=time.time()).resume == ""
    in_time = await webapp.internal("resume", {**record, "deadline": time.time() + 30})
    assert in_time[1]["ok"] and in_time[1]["resume"]
    async with webapp.session.get(f"{webapp.url}/metrics") as resp:
        text = await resp.text()
    assert 'rtm_webapp_resumes_total{step="late"} 1.0' in text
    assert 'rtm_webapp_resumes_total{step="recorded"} 1.0' in text


async def test_a_resume_record_whose_client_closed_before_goodbye_is_withdrawn(webapp: Webapp) -> None:
    """The gateway withdraws the record of a connection that closed before its goodbye: the token's
    next rtm.connect claims nothing (or its own newer record), never the stale one. A record
    already claimed is kept; bad input is refused and counted; only gateways may ask."""
    frank, general = webapp.user("eve"), webapp.channel("general")
    franks = {"user": frank["id"], "token_id": token_id(frank["token"])}
    prefix = f"ws://{GATEWAY_INSTANCE.address}:{GATEWAY_INSTANCE.port}/ws/"
    verifier = TicketVerifier(KEYS.ticket_signing, GATEWAY_INSTANCE.id, incarnation=GATEWAY_INCARNATION)

    async def claimed() -> str:
        _, connect = await webapp.call("rtm.connect", frank["token"])
        return str(verifier.verify(connect["url"][len(prefix) :], now_s=time.time()).resume)

    _, stale = await webapp.internal("resume", {**franks, "channels": {general: 0}})
    withdraw = {"user": frank["id"], "resume": stale["resume"]}
    assert (await webapp.internal("resume/withdraw", withdraw))[1] == {"ok": True, "withdrawn": True}
    assert await claimed() == ""
    _, newer = await webapp.internal("resume", {**franks, "channels": {general: 0}})
    assert await claimed() == newer["resume"]
    kept = {"user": frank["id"], "resume": newer["resume"]}
    assert (await webapp.internal("resume/withdraw", kept))[1] == {"ok": True, "withdrawn": False}
    for bad in ({**kept, "resume": ""}, {**kept, "user": ["x"]}, {"user": frank["id"]}, {**kept, "resume": "r" * 129}):
        assert (await webapp.internal("resume/withdraw", bad))[1] == {"ok": False, "error": "invalid_arguments"}
    status, _ = await webapp.internal("resume/withdraw", kept, role=WEBAPP)
    assert status == 403
    async with webapp.session.get(f"{webapp.url}/metrics") as resp:
        text = await resp.text()
    assert 'rtm_webapp_resumes_total{step="withdrawn"} 1.0' in text
    assert 'rtm_webapp_resumes_total{step="kept"} 1.0' in text


async def test_a_bootstrap_retried_with_its_tickets_nonce_gets_the_resume_record_again(webapp: Webapp) -> None:
    """A gateway whose bootstrap call timed out after the webapp took the record asks again with the
    same ticket nonce and gets the same recorded seqs; another ticket does not."""
    carol, general = webapp.user("carol"), webapp.channel("general")
    carols = {"user": carol["id"], "token_id": token_id(carol["token"])}
    _, recorded = await webapp.internal("resume", {**carols, "channels": {general: 0}})
    rid = recorded["resume"]
    ask = {"user": carol["id"], "resume": rid, "nonce": "n-1"}
    for _ in range(2):
        _, boot = await webapp.internal("bootstrap", ask)
        assert boot["resumed"] is True and {c["id"]: c["seq"] for c in boot["channels"]}[general] == 0
    # The gateway's bootstrap then failed for good: the client's next rtm.connect names the taken
    # record once more, so that its gateway is told the record is gone (it closes 4010), not a
    # ticket naming nothing that would start the moved connection silently at a fresh bootstrap.
    prefix = f"ws://{GATEWAY_INSTANCE.address}:{GATEWAY_INSTANCE.port}/ws/"
    verifier = TicketVerifier(KEYS.ticket_signing, GATEWAY_INSTANCE.id, incarnation=GATEWAY_INCARNATION)
    _, connect = await webapp.call("rtm.connect", carol["token"])
    assert verifier.verify(connect["url"][len(prefix) :], now_s=time.time()).resume == rid
    _, other = await webapp.internal("bootstrap", {**ask, "nonce": "n-2"})
    assert other["resumed"] is False
    _, connect = await webapp.call("rtm.connect", carol["token"])  # refused once: now a fresh connection
    assert verifier.verify(connect["url"][len(prefix) :], now_s=time.time()).resume == ""
    # A record whose connection got its hello is confirmed: no later connection is refused for it.
    _, again = await webapp.internal("resume", {**carols, "channels": {general: 0}})
    held = {"user": carol["id"], "resume": again["resume"], "nonce": "n-3"}
    assert (await webapp.internal("bootstrap", held))[1]["resumed"] is True
    assert (await webapp.internal("resume/confirm", {**held, "nonce": "n-4"}))[1] == {"ok": True, "confirmed": False}
    assert (await webapp.internal("resume/confirm", held))[1] == {"ok": True, "confirmed": True}
    _, connect = await webapp.call("rtm.connect", carol["token"])
    assert verifier.verify(connect["url"][len(prefix) :], now_s=time.time()).resume == ""
    for bad in ({**held, "nonce": ["n-3"]}, {**held, "resume": ""}, {"user": carol["id"]}):
        assert (await webapp.internal("resume/confirm", bad))[1] == {"ok": False, "error": "invalid_arguments"}
    status, _ = await webapp.internal("resume/confirm", held, role=WEBAPP)
    assert status == 403
    _, bad = await webapp.internal("bootstrap", {**ask, "nonce": ["n-1"]})
    assert bad == {"ok": False, "error": "invalid_arguments"}


async def test_internal_call_runs_only_what_a_websocket_client_may_send(webapp: Webapp) -> None:
    """A gateway speaks for its users only as far as RTM lets them: ``auth.revoke`` (or any
    method but ``chat.postMessage``) over /internal/call is 403 ``forbidden``, counted, and
    changes nothing; an unknown method is ``unknown_method``; neither becomes a label value."""
    alice, bob = webapp.user("alice"), webapp.user("bob")
    status, body = await webapp.internal("call/auth.revoke", {"user": bob["id"], "token": bob["token"]})
    assert status == 403 and body == {"ok": False, "error": "forbidden"}
    status, reply = await webapp.call("auth.test", bob["token"])
    assert status == 200 and reply["ok"], "a refused call revoked the token"
    for error in ("made_up_1", "made_up_2"):
        status, body = await webapp.internal("call/api.test", {"user": alice["id"], "error": error})
        assert status == 403 and body == {"ok": False, "error": "forbidden"}
    status, body = await webapp.internal("call/made.up", {"user": alice["id"]})
    assert status == 200 and body == {"ok": False, "error": "unknown_method"}
    general = webapp.channel("general")
    status, posted = await webapp.internal(
        "call/chat.postMessage",
        {"user": alice["id"], "token_id": token_id(alice["token"]), "channel": general, "text": "hi"},
    )
    assert status == 200 and posted["ok"], posted
    # only for a live token of that user, named by its ticket's token id: none, another user's, or
    # one revoked since are refused, and nothing is posted (red team, session 13)
    for tid, code in (
        (None, "not_authed"),
        (token_id(bob["token"]), "token_revoked"),
        (["x"], "invalid_arguments"),
    ):
        ask = {"user": alice["id"], "channel": general, "text": "forged", **({} if tid is None else {"token_id": tid})}
        assert await webapp.internal("call/chat.postMessage", ask) == (200, {"ok": False, "error": code})
    carol = webapp.user("carol")
    _, revoked = await webapp.call("auth.revoke", carol["token"])
    assert revoked["ok"], revoked
    ask = {"user": carol["id"], "token_id": token_id(carol["token"]), "channel": general, "text": "late"}
    assert await webapp.internal("call/chat.postMessage", ask) == (200, {"ok": False, "error": "token_revoked"})
    _, history = await webapp.call("conversations.history", alice["token"], data={"channel": general, "limit": 5})
    assert not any(m["text"] in ("forged", "late") for m in history["messages"])
    async with webapp.session.get(f"{webapp.url}/metrics") as resp:
        text = await resp.text()
    samples = [s for family in text_string_to_metric_families(text) for s in family.samples]
    outcomes = {
        (s.labels["method"], s.labels["outcome"])
        for s in samples
        if s.name == "rtm_webapp_requests_total" and s.labels.get("method", "").startswith("internal.")
    }
    assert {
        ("internal.auth.revoke", "forbidden"),
        ("internal.api.test", "forbidden"),
        ("internal.unknown", "unknown_method"),
        ("internal.chat.postMessage", "ok"),
    } <= outcomes
    assert not any("made_up" in outcome for _, outcome in outcomes)
    forbidden = [s for s in samples if s.name == "rtm_errors_total" and s.labels.get("kind") == "forbidden"]
    assert forbidden and forbidden[0].value >= 3


async def test_auth_revoke_ends_a_cached_token_at_once(webapp: Webapp) -> None:
    """Issue 17's token cache: a token that just authenticated (cached) is refused on the
    very next call after auth.revoke; ``test`` revokes nothing."""
    bob = webapp.user("bob")
    for _ in range(2):
        status, reply = await webapp.call("auth.test", bob["token"])
        assert status == 200 and reply["ok"] and reply["user_id"] == bob["id"]
    status, reply = await webapp.call("auth.revoke", bob["token"], json_body={"test": True})
    assert reply == {"ok": True, "revoked": False}
    assert (await webapp.call("auth.test", bob["token"]))[1]["ok"]
    status, reply = await webapp.call("auth.revoke", bob["token"])
    assert reply == {"ok": True, "revoked": True}
    status, reply = await webapp.call("auth.test", bob["token"])
    assert reply == {"ok": False, "error": "invalid_auth"}
    status, reply = await webapp.call("chat.postMessage", bob["token"], json_body={"channel": "#general", "text": "x"})
    assert reply == {"ok": False, "error": "invalid_auth"}


async def test_under_load_one_pubs_carries_the_events_of_several_commits(
    tmp_path: Path, fake_as: FakeAdminServer
) -> None:
    """The hand-off's pacing, wired to the group commit's rate of writes (commit_pacer.handoff_interval_s).
    A base rate far below anything (0.001 writes/s) paces from the second commit on, at the cap: a
    post sent while the hand-off is held goes out with the ones after it, in one ``pubs``."""
    cap_s = 0.5
    app = await start(
        tmp_path, fake_as, "--handoff-pacing-base-rate-per-s", "0.001", "--handoff-interval-cap-s", str(cap_s)
    )
    try:
        alice, general = app.user("alice"), app.channel("general")
        assert app.server.handoff.interval_s() == 0.0  # no commit yet: no rate, no pacing

        async def post(text: str) -> None:
            _, reply = await app.call("chat.postMessage", alice["token"], json_body={"channel": general, "text": text})
            assert reply["ok"], reply

        await post("first")  # one commit: no rate measured yet, so it goes at once

        async def first_arrived() -> bool:
            return len(fake_as.pubs_for(general)) == 1

        await async_wait_until(first_arrived, what="the first post at the fake AS")
        sent_before = len(fake_as.batches)
        await post("second")  # a second commit: a rate, far past the base, so the cap; held
        await post("third")
        assert app.server.handoff.interval_s() == cap_s
        assert len(fake_as.pubs_for(general)) == 1  # both answered, neither handed off yet

        async def both_arrived() -> bool:
            return len(fake_as.pubs_for(general)) == 3

        await async_wait_until(both_arrived, what="the held posts at the fake AS")
        assert fake_as.batches[sent_before:] == [[f"{general}:2", f"{general}:3"]]  # one pubs for both
        metrics = await app.session.get(f"{app.url}/metrics")
        assert f"rtm_webapp_handoff_interval_seconds {cap_s}" in await metrics.text()
    finally:
        await app.session.close()
        await app.stop()
