"""Issue 13 at the gateway, against the real fleet (``rtm up``): subscriptions are not lost
when a channel server is unreachable, a webapp outage ends in everything delivered exactly
once (or a reconnect that catches up), bad frames get Slack's error, connection limits hold.

One fleet for the module, with no spare channel server (so a stopped server keeps its slot and
comes back to it, rather than being failed over) and small connection limits.
"""

from __future__ import annotations

import asyncio
import json
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import websockets

from rtmctl.launcher import rtm_argv, start
from services.config import CONSUL_TOKEN_ENV
from services.errors import CloseCode
from tests.support import DEFAULT_WAIT_S, async_wait_until
from tests.system.harness import Client, Fleet, Load, channel_ring, consul_client, process_by_id

MAX_PER_USER = 3
MAX_PER_ADDRESS = 8
OTHER_ADDRESS = "127.0.0.9"  # the per-address test connects from here, apart from every other test
GAP_BUDGET_S = 8.0
UNREACHABLE_S = 5.5  # longer than a sub waits (SUBSCRIBE_TIMEOUT_S): the old gateway gave up then
WEBAPP_OUTAGE_S = 30.0
CATCH_UP_TIMEOUT_S = 45.0
RECONNECT_CODES = {CloseCode.RESYNC, CloseCode.BOOTSTRAP_FAILED, CloseCode.GOING_AWAY, CloseCode.TRY_AGAIN_LATER}


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    data_dir: Path = tmp_path_factory.mktemp("gateway-hardening")
    env = {
        "RTM_MAX_CONNECTIONS_PER_USER": str(MAX_PER_USER),
        "RTM_MAX_CONNECTIONS_PER_ADDRESS": str(MAX_PER_ADDRESS),
        "RTM_GAP_FILL_BUDGET_S": str(GAP_BUDGET_S),
    }
    handle = Fleet.up(data_dir, "--spares", "0", env=env)
    try:
        yield handle
    finally:
        handle.down()


async def post(fleet: Fleet, user: str, channel: str, text: str) -> None:
    reply = await fleet.api("chat.postMessage", fleet.user(user)["token"], channel=channel, text=text)
    assert reply["ok"], reply


def contiguous_run(received: list[str], posted: list[str]) -> bool:
    """``received`` is posted[k:k+len(received)] for some k: nothing skipped, doubled or reordered."""
    if not received:
        return True
    if received[0] not in posted:
        return False
    k = posted.index(received[0])
    return posted[k : k + len(received)] == received


async def passing_channel_servers(fleet: Fleet) -> set[str]:
    def read() -> set[str]:
        _, nodes = consul_client(fleet).health.service("channel-server", passing=True)
        return {n["Service"]["ID"] for n in nodes}

    return await asyncio.to_thread(read)


# -- a channel server unreachable while a gateway starts ---------------------------------------------


async def test_a_gateway_started_while_its_channel_server_is_unreachable_delivers_everything(fleet: Fleet) -> None:
    general = fleet.channel("general")
    owner = channel_ring(fleet).owner_for(general)
    victim = process_by_id(fleet, owner)
    late: Any = None
    client: Client | None = None
    fleet.kill(victim["pid"], signal.SIGSTOP)
    try:
        # Consul marks it critical: the new gateway finds no address for it at all (connects refused).
        await async_wait_until(
            lambda: _not_passing(fleet, owner), timeout_s=DEFAULT_WAIT_S, what=f"{owner} to turn critical"
        )
        argv = rtm_argv(
            "gateway",
            "--host",
            "127.0.0.1",
            "--port",
            "0",
            "--consul",
            fleet.info["consul_url"],
            "--instance-id",
            "gw-late-0",
            "--region",
            "late",
            "--data-dir",
            str(fleet.data_dir),
            *fleet.tls_flags("gateway", "gw-late-0"),
        )
        token = (fleet.data_dir / "consul-acl-token").read_text().strip()  # the dev agent enforces ACLs
        late = await asyncio.to_thread(start, "gw-late-0", argv, env={CONSUL_TOKEN_ENV: token})
        late_port = int(late.ready["port"])
        await async_wait_until(lambda: _connect_goes_to(fleet, "late", late_port), what="rtm.connect to use it")
        client = await fleet.connect("carol", region="late")
        assert client.gateway_port == int(late.ready["port"])
        during = [f"unreachable-{n}" for n in range(3)]
        for text in during:
            await post(fleet, "alice", general, text)
        await asyncio.sleep(UNREACHABLE_S)  # wait-ok: the fault itself: the server stays stopped this long
    finally:
        fleet.kill(victim["pid"], signal.SIGCONT)
    try:
        assert client is not None
        await client.wait_texts(during, general, timeout_s=CATCH_UP_TIMEOUT_S)
        await post(fleet, "bob", general, "after-unreachable")
        await client.wait_texts([*during, "after-unreachable"], general, timeout_s=CATCH_UP_TIMEOUT_S)
        assert client.texts(general) == [*during, "after-unreachable"]  # once each, in order
    finally:
        if client is not None:
            await client.close()
        if late is not None:
            await asyncio.to_thread(late.stop)


async def _not_passing(fleet: Fleet, instance: str) -> bool:
    return instance not in await passing_channel_servers(fleet)


async def _connect_goes_to(fleet: Fleet, region: str, port: int) -> bool:
    reply = await fleet.api("rtm.connect", fleet.user("eve")["token"], region=region)
    return bool(reply.get("ok")) and f":{port}/" in str(reply["url"])


# -- bad frames and limits ----------------------------------------------------------------------------


async def test_a_frame_of_64_kib_of_brackets_gets_error_code_1_and_the_socket_stays_open(fleet: Fleet) -> None:
    client = await fleet.connect("dave")
    try:
        await client.send("[" * (64 * 1024))
        await client.wait_for(lambda c: any(e.get("type") == "error" for e in c.events), what="the error event")
        error = next(e for e in client.events if e.get("type") == "error")
        assert error["error"]["code"] == 1, error
        await client.send({"id": 7, "type": "ping"})
        await client.wait_for(lambda c: any(e.get("reply_to") == 7 for e in c.events), what="the pong")
        assert not client.closed.is_set()
        general = fleet.channel("general")
        await post(fleet, "alice", general, "after-brackets")
        await client.wait_texts(["after-brackets"], general)
    finally:
        await client.close()


async def test_the_per_user_limit_refuses_the_next_connection_with_4029(fleet: Fleet) -> None:
    region = "us-east"  # one gateway: the limit is per gateway
    opened = [await fleet.connect("eve", region=region) for _ in range(MAX_PER_USER)]
    try:
        assert len({c.gateway_port for c in opened}) == 1
        reply = await fleet.api("rtm.connect", fleet.user("eve")["token"], region=region)
        async with websockets.connect(reply["url"]) as ws:
            with pytest.raises(websockets.ConnectionClosed):
                await asyncio.wait_for(ws.recv(), DEFAULT_WAIT_S)
            assert ws.close_code == CloseCode.TOO_MANY_CONNECTIONS
        other = await fleet.connect("dave", region=region)  # another user is not affected
        await other.close()
        await opened.pop().close()
        await async_wait_until(lambda: _can_connect(fleet, "eve", region), what="room for eve again")
    finally:
        for client in opened:
            await client.close()


async def _can_connect(fleet: Fleet, name: str, region: str) -> bool:
    try:
        client = await fleet.connect(name, region=region)
    except (AssertionError, websockets.ConnectionClosed):
        return False
    await client.close()
    return True


async def test_the_per_address_limit_refuses_the_next_handshake_with_429(fleet: Fleet) -> None:
    holders: list[Any] = []
    try:
        names = ["alice", "bob", "carol", "dave"]  # two each: under the per-user limit
        for i in range(MAX_PER_ADDRESS):
            holders.append(await _open_from(fleet, names[i % len(names)], OTHER_ADDRESS))
        assert len({port for port, _ in holders}) == 1
        reply = await fleet.api("rtm.connect", fleet.user("eve")["token"], region="eu-west")
        with pytest.raises(websockets.InvalidStatus) as refused:
            await websockets.connect(reply["url"], local_addr=(OTHER_ADDRESS, 0))
        assert refused.value.response.status_code == 429
        assert refused.value.response.headers.get("Retry-After")
        other = await fleet.connect("eve", region="eu-west")  # from another address: served
        await other.close()
        await holders.pop()[1].close()
        again = await _open_from(fleet, "eve", OTHER_ADDRESS)  # a closed one makes room
        holders.append(again)
    finally:
        for _, ws in holders:
            await ws.close()


async def _open_from(fleet: Fleet, name: str, address: str) -> tuple[int, Any]:
    """A websocket of ``name`` on the eu-west gateway from source ``address``, past its hello."""
    reply = await fleet.api("rtm.connect", fleet.user(name)["token"], region="eu-west")
    assert reply["ok"], reply
    ws = await websockets.connect(reply["url"], local_addr=(address, 0))
    assert json.loads(await asyncio.wait_for(ws.recv(), DEFAULT_WAIT_S)) == {"type": "hello"}
    port = int(reply["url"].split("://", 1)[1].split("/", 1)[0].rsplit(":", 1)[1])
    return port, ws


# -- the webapp down for 30 s while sessions attach mid-stream ---------------------------------------------


async def test_webapp_down_30s_while_sessions_attach_mid_stream_loses_nothing(fleet: Fleet) -> None:
    """The webapp stops for 30 s with a stream of posts under way and sessions attaching. Meanwhile the
    channel's server is killed and comes back empty (``rtm up`` restarts it; with no spare it keeps
    its slot), so every gateway must read what it may have missed from the webapp, which is down:
    the gap budget runs out and the channel's sessions are ended with 4010 instead of skipping
    events or staying held. When the webapp is back, every session that stayed has every post
    exactly once in order; every one that was ended reconnects and finds the rest in history."""
    general = fleet.channel("general")
    webapp = fleet.processes("webapp")[0]
    channel_server = process_by_id(fleet, channel_ring(fleet).owner_for(general))
    load = Load(fleet, [fleet.user("alice")["token"], fleet.user("bob")["token"]], [general], max_posts=400)
    steady = [await fleet.connect("carol", region=r) for r in ("us-east", "eu-west")]
    attached: list[Client] = []
    poster = asyncio.create_task(load.run())
    stopped = False
    try:
        await async_wait_until(_posted_at_least(load, general, 10), what="the stream to start")
        for region in ("us-east", "eu-west", "us-east"):  # attach mid-stream, the last just before the outage
            attached.append(await fleet.connect("dave", region=region))
        tickets = [await fleet.api("rtm.connect", fleet.user("eve")["token"], region=r) for r in ("us-east", "eu-west")]
        fleet.kill(webapp["pid"], signal.SIGSTOP)
        stopped = True
        outage_started = time.monotonic()
        # sessions that attach during the outage: the gateway cannot bootstrap them (4002) and says so
        codes = await asyncio.gather(*(_attach_during_outage(t["url"]) for t in tickets))
        assert all(code == CloseCode.BOOTSTRAP_FAILED for code in codes), codes
        fleet.kill(channel_server["pid"])  # comes back empty: the gateways must catch up from the webapp
        await asyncio.gather(
            *(c.wait_for(lambda c: c.closed.is_set(), GAP_BUDGET_S + DEFAULT_WAIT_S, "4010") for c in steady)
        )
        assert [c.close_code for c in steady] == [CloseCode.RESYNC, CloseCode.RESYNC]
        # the webapp is down, so no resume record could be left: no goodbye (which promises one);
        # they reconnect and catch up from history (gateway/drain.py)
        assert not any(e == {"type": "goodbye"} for c in steady for e in c.events)
        await asyncio.sleep(max(0.0, WEBAPP_OUTAGE_S - (time.monotonic() - outage_started)))  # wait-ok: the fault
    finally:
        if stopped:
            fleet.kill(webapp["pid"], signal.SIGCONT)
    await async_wait_until(_posted_at_least(load, general, 60), timeout_s=CATCH_UP_TIMEOUT_S, what="more posts")
    load.stop.set()
    await asyncio.wait_for(poster, CATCH_UP_TIMEOUT_S)
    assert not load.errors, load.errors[:3]
    posted = load.posted[general]
    late = await fleet.connect("eve", region="eu-west")  # attaches after the outage
    await post(fleet, "alice", general, "after-outage")
    posted = [*posted, "after-outage"]
    try:
        for client in [*steady, *attached, late]:
            if client.closed.is_set():  # ended to reconnect: catch up through the normal path
                assert client.close_code in RECONNECT_CODES, (client.name, client.close_code)
                await _reconnect_and_catch_up(fleet, client, general, posted)
                continue
            await client.wait_for(
                lambda c: c.texts(general)[-1:] == ["after-outage"], CATCH_UP_TIMEOUT_S, "the last post"
            )
            texts = client.texts(general)
            assert len(texts) == len(set(texts)), f"{client.name}: duplicates"
            assert contiguous_run(texts, posted), f"{client.name}: skipped or reordered: {texts[:5]}..."
        counts = [await _counter(p, "rtm_gw_sessions_ended_total", reason="gap_unfilled") for p in gateways(fleet)]
        ended = sum(counts)
        assert ended >= len(steady) + len(attached)  # every session of the channel: ended, none left skipping
    finally:
        for client in [*steady, *attached, late]:
            await client.close()


def gateways(fleet: Fleet) -> list[dict[str, Any]]:
    fleet.reload()
    return fleet.processes("gateway")


async def _counter(proc: dict[str, Any], name: str, **labels: str) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    async with aiohttp.ClientSession() as http:
        async with http.get(f"http://{proc['host']}:{proc['metrics_port']}/metrics") as resp:
            text = await resp.text()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return float(sample.value)
    return 0.0


def _posted_at_least(load: Load, channel: str, n: int) -> Any:
    async def check() -> bool:
        return len(load.posted.get(channel, [])) >= n

    return check


async def _attach_during_outage(url: str) -> int | None:
    async with websockets.connect(url, max_size=None) as ws:
        try:
            while True:
                await asyncio.wait_for(ws.recv(), DEFAULT_WAIT_S)
        except websockets.ConnectionClosed:
            return ws.close_code


async def _reconnect_and_catch_up(fleet: Fleet, client: Client, channel: str, posted: list[str]) -> None:
    """What a Slack client does after a reconnect close: connect again and read what it missed
    with conversations.history. Together, once each and in order."""
    before = client.texts(channel)
    assert len(before) == len(set(before)) and contiguous_run(before, posted), client.name
    again = await fleet.connect(client.name)
    try:
        history = await fleet.api(
            "conversations.history", fleet.user(client.name)["token"], channel=channel, limit=1000
        )
        assert history["ok"], history
        seen = [str(m.get("text")) for m in reversed(history["messages"])]
        missed = [t for t in posted if t not in before]
        assert all(t in seen for t in missed), f"{client.name}: history lacks what the session missed"
    finally:
        await again.close()
