"""The message path end to end, through real processes started by ``rtm up``:
webapp -> Admin Server -> Channel Server -> Gateway Server -> websocket."""

from __future__ import annotations

import asyncio
import base64
import json
import signal
import sqlite3
import time
import uuid
from typing import Any

import pytest
import websockets

from services.errors import CloseCode
from tests.support import DEFAULT_WAIT_S, async_wait_until
from tests.system.harness import REGIONS, Client, Fleet


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


async def connect_on_both_gateways(fleet: Fleet, names: list[str]) -> list[Client]:
    """Connect each user, alternating the region hint, so both gateways are in play."""
    clients = [await fleet.connect(name, REGIONS[i % 2]) for i, name in enumerate(names)]
    assert len({c.gateway_port for c in clients}) == 2, [c.url for c in clients]
    return clients


async def test_post_reaches_every_member_exactly_once_and_nobody_else(fleet: Fleet) -> None:
    alice, bob, carol = fleet.user("alice"), fleet.user("bob"), fleet.user("carol")
    created = await fleet.api("conversations.create", alice["token"], name=unique("proj"))
    assert created["ok"], created
    channel = created["channel"]["id"]
    assert (await fleet.api("conversations.join", bob["token"], channel=channel))["ok"]
    clients = await connect_on_both_gateways(fleet, ["alice", "bob", "carol", "dave"])
    by_name = {c.name: c for c in clients}
    texts = [unique("msg") for _ in range(20)]
    for text in texts:
        reply = await fleet.api("chat.postMessage", alice["token"], channel=channel, text=text)
        assert reply["ok"], reply
    for name in ("alice", "bob"):
        await by_name[name].wait_texts(texts, channel)
    general = fleet.channel("general")
    marker = unique("marker")
    assert (await fleet.api("chat.postMessage", carol["token"], channel=general, text=marker))["ok"]
    for client in clients:  # everyone is in #general: once they all have the marker, nothing else is in flight
        await client.wait_texts([marker], general)
    for name in ("alice", "bob"):
        assert by_name[name].texts(channel) == texts, f"{name} got them out of order or twice"
    for name in ("carol", "dave"):
        assert by_name[name].messages(channel) == [], f"{name} is not a member"
    for client in clients:
        assert client.texts(general).count(marker) == 1
        await client.close()


async def test_member_who_joins_later_receives_later_posts(fleet: Fleet) -> None:
    alice, eve = fleet.user("alice"), fleet.user("eve")
    created = await fleet.api("conversations.create", alice["token"], name=unique("late"))
    channel = created["channel"]["id"]
    eve_client = await fleet.connect("eve")
    before = unique("before")
    assert (await fleet.api("chat.postMessage", alice["token"], channel=channel, text=before))["ok"]
    assert (await fleet.api("conversations.join", eve["token"], channel=channel))["ok"]
    # The join reaches eve's open connection through her user channel, without a reconnect.
    await eve_client.wait_for(lambda c: any(e.get("type") == "channel_joined" for e in c.events), what="channel_joined")
    after = [unique("after") for _ in range(3)]
    for text in after:
        assert (await fleet.api("chat.postMessage", alice["token"], channel=channel, text=text))["ok"]
    await eve_client.wait_texts(after, channel)
    assert before not in eve_client.texts(channel)
    assert eve_client.texts(channel) == after
    await eve_client.close()


async def assert_ticket_refused(fleet: Fleet, url: str) -> None:
    payload = url.rsplit("/", 1)[-1].split(".", 1)[0]
    expires_at = float(json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))["exp"])
    assert time.time() < expires_at - 1, "the restart took longer than a ticket lives: the replay proves nothing"
    ws = await websockets.connect(url, max_size=None)
    with pytest.raises(websockets.ConnectionClosed):
        await asyncio.wait_for(ws.recv(), DEFAULT_WAIT_S)  # no hello: closed at once
    assert ws.close_code == CloseCode.INVALID_TICKET, (ws.close_code, ws.close_reason)
    assert ws.close_reason is not None and "earlier start" in ws.close_reason


async def handled(client: Client, frame_id: int) -> None:
    """Ping and wait for the pong: the gateway has handled every frame ``client`` sent before."""
    await client.send({"id": frame_id, "type": "ping"})
    await client.wait_for(lambda c: any(e.get("reply_to") == frame_id for e in c.events), what="the pong")


async def test_a_kicked_member_gets_nothing_of_the_channel_after_and_outsiders_typing_reaches_nobody(
    fleet: Fleet,
) -> None:
    """Authz over the websocket (docs/authz-review.md): after ``conversations.kick`` the kicked
    user's connection gets ``channel_left`` and none of the channel's later posts; its typing
    there, and the typing of a user never in the channel, reach nobody. Bob, dave and carol share
    a gateway, so bob's and carol's typing (handled first: their pongs) would reach the channel
    server ahead of dave's on the same link: alice's seeing dave's proves theirs went nowhere."""
    alice, bob, dave = fleet.user("alice"), fleet.user("bob"), fleet.user("dave")
    created = await fleet.api("conversations.create", alice["token"], name=unique("kick"), is_private="true")
    assert created["ok"], created
    channel = created["channel"]["id"]
    invited = await fleet.api(
        "conversations.invite", alice["token"], channel=channel, users=f"{bob['id']},{dave['id']}"
    )
    assert invited["ok"], invited
    watcher = await fleet.connect("alice", REGIONS[0])
    kicked, member, outsider = [await fleet.connect(name, REGIONS[1]) for name in ("bob", "dave", "carol")]
    assert kicked.gateway_port == member.gateway_port == outsider.gateway_port != watcher.gateway_port
    before = unique("before")
    assert (await fleet.api("chat.postMessage", alice["token"], channel=channel, text=before))["ok"]
    await kicked.wait_texts([before], channel)
    assert (await fleet.api("conversations.kick", alice["token"], channel=channel, user=bob["id"]))["ok"]
    await kicked.wait_for(
        lambda c: any(e.get("type") == "group_left" and e.get("channel") == channel for e in c.events),
        what="group_left",
    )
    after = [unique("after") for _ in range(3)]
    for text in after:
        assert (await fleet.api("chat.postMessage", alice["token"], channel=channel, text=text))["ok"]
    await member.wait_texts(after, channel)
    general, marker = fleet.channel("general"), unique("marker")
    assert (await fleet.api("chat.postMessage", alice["token"], channel=general, text=marker))["ok"]
    await kicked.wait_texts([marker], general)  # after the channel's posts on the same gateway
    assert kicked.texts(channel) == [before], "the kicked user got posts after the kick"

    await kicked.send({"type": "typing", "channel": channel})
    await handled(kicked, 101)
    await outsider.send({"type": "typing", "channel": channel})
    await handled(outsider, 102)
    await member.send({"type": "typing", "channel": channel})

    def typing_from(user: str) -> Any:
        return lambda c: any(e.get("type") == "user_typing" and e.get("user") == user for e in c.events)

    await watcher.wait_for(typing_from(dave["id"]), what="dave's typing")
    typists = {e.get("user") for e in watcher.events if e.get("type") == "user_typing"}
    assert typists == {dave["id"]}, typists
    for client in (watcher, kicked, member, outsider):
        await client.close()


async def test_gateway_restart_clients_reconnect_and_receive_later_posts(fleet: Fleet) -> None:
    alice = fleet.user("alice")
    general = fleet.channel("general")
    clients = await connect_on_both_gateways(fleet, ["bob", "carol", "dave"])
    victim_port = clients[0].gateway_port
    victim = next(p for p in fleet.processes("gateway") if p["port"] == victim_port)
    used_url = clients[0].url  # a ticket the victim accepted (and remembered as used, in its memory only)
    fleet.kill(victim["pid"], signal.SIGKILL)
    on_victim = [c for c in clients if c.gateway_port == victim_port]
    for client in on_victim:
        await asyncio.wait_for(client.closed.wait(), 10)

    async def restarted() -> bool:
        fleet.reload()
        return any(p["port"] == victim_port and p["pid"] != victim["pid"] for p in fleet.processes("gateway"))

    await async_wait_until(restarted, timeout_s=30, what="rtm up to restart the gateway")
    # Replaying the captured ticket on the restarted gateway (same id, fresh nonce store) is refused,
    # though it is still within its TTL: it names the gateway's previous start (services/ticket.py).
    await assert_ticket_refused(fleet, used_url)
    reconnected = []
    for client in clients:
        if client in on_victim:
            fresh = await fleet.connect(client.name, client.region)
            reconnected.append(fresh)
        else:
            reconnected.append(client)
    texts = [unique("after-restart") for _ in range(5)]
    for text in texts:
        assert (await fleet.api("chat.postMessage", alice["token"], channel=general, text=text))["ok"]
    for client in reconnected:
        await client.wait_texts(texts, general, timeout_s=15)
        got = [t for t in client.texts(general) if t in texts]
        assert got == texts
        await client.close()


async def test_auth_revoke_closes_the_tokens_open_connections_on_every_gateway_and_no_other(fleet: Fleet) -> None:
    """Finding 7 (docs/authz-review.md), the real fleet: carol holds two more tokens (a leaked one,
    open on both regions' gateways, and her phone's, open beside it). ``auth.revoke`` of the leaked
    token closes both of its connections with 4003 after the ``tokens_revoked`` event, and they get
    none of the posts that follow the revoke's reply; the phone's connection keeps receiving; the
    leaked token can no longer ``rtm.connect``."""
    carol, alice, general = fleet.user("carol"), fleet.user("alice"), fleet.channel("general")
    leaked, phone = f"xoxp-carol-leaked-{uuid.uuid4().hex}", f"xoxp-carol-phone-{uuid.uuid4().hex}"
    db = sqlite3.connect(fleet.data_dir / "webapp.db", timeout=DEFAULT_WAIT_S)
    try:
        with db:
            db.executemany(
                "INSERT INTO tokens (token, user) VALUES (?, ?)", [(leaked, carol["id"]), (phone, carol["id"])]
            )
    finally:
        db.close()
    thieves = [Client(fleet, "carol", leaked, region=region) for region in REGIONS]
    kept = Client(fleet, "carol", phone, region=REGIONS[1])
    for client in (*thieves, kept):
        await client.open()
    assert thieves[0].gateway_port != thieves[1].gateway_port == kept.gateway_port
    before = unique("before")
    assert (await fleet.api("chat.postMessage", alice["token"], channel=general, text=before))["ok"]
    for client in (*thieves, kept):
        await client.wait_texts([before], general)

    assert await fleet.api("auth.revoke", leaked) == {"ok": True, "revoked": True}
    after = [unique("after") for _ in range(3)]
    for text in after:  # at once: no wait for the closes
        assert (await fleet.api("chat.postMessage", alice["token"], channel=general, text=text))["ok"]
    await kept.wait_texts(after, general)
    for thief in thieves:
        await asyncio.wait_for(thief.closed.wait(), DEFAULT_WAIT_S)
        assert thief.close_code == CloseCode.TOKEN_REVOKED, thief.close_code
        assert thief.ws.close_reason == "token_revoked"
        assert {"type": "tokens_revoked", "tokens": {"oauth": [carol["id"]]}} in thief.events
        assert not set(after) & set(thief.texts(general)), "a revoked connection got posts after the revoke"
    assert not kept.closed.is_set() and any(e.get("type") == "tokens_revoked" for e in kept.events)
    assert await fleet.api("rtm.connect", leaked) == {"ok": False, "error": "invalid_auth"}
    await kept.close()
