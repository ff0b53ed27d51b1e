"""Bad input gets a clear error, is counted, and loses nothing: the fleet keeps serving."""

from __future__ import annotations

import asyncio
import struct
import uuid

import aiohttp
import pytest
import websockets
from prometheus_client.parser import text_string_to_metric_families

from services.connection import PeerConnection, connect
from services.errors import CloseCode, PeerError
from tests.support import DEFAULT_WAIT_S, async_wait_until
from tests.system.harness import Fleet


async def scrape(host: str, port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    async with aiohttp.ClientSession() as http:
        async with http.get(f"http://{host}:{port}/metrics") as resp:
            text = await resp.text()
    samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return samples


async def error_count(proc: dict, kind: str) -> float:
    samples = await scrape(proc["host"], proc["metrics_port"])
    return samples.get(("rtm_errors_total", (("kind", kind),)), 0.0)


async def still_delivers(fleet: Fleet) -> None:
    """A post still reaches a fresh client: nothing was broken by the bad input."""
    client = await fleet.connect("bob")
    text = f"still-alive-{uuid.uuid4().hex[:8]}"
    general = fleet.channel("general")
    reply = await fleet.api("chat.postMessage", fleet.user("alice")["token"], channel=general, text=text)
    assert reply["ok"], reply
    await client.wait_texts([text], general)
    await client.close()


@pytest.mark.parametrize(
    ("method", "token_of", "params", "error"),
    [
        ("no.such.method", "alice", {}, "unknown_method"),
        ("auth.test", "nobody", {}, "invalid_auth"),
        ("auth.test", None, {}, "not_authed"),
        ("chat.postMessage", "alice", {"channel": "CNOSUCH", "text": "x"}, "channel_not_found"),
        ("chat.postMessage", "alice", {"text": "x"}, "channel_not_found"),
        ("chat.postMessage", "alice", {"channel": "general", "text": "x" * 40_001}, "msg_too_long"),
    ],
)
async def test_web_api_errors(fleet: Fleet, method: str, token_of: str | None, params: dict, error: str) -> None:
    if params.get("channel") == "general":
        params = {**params, "channel": fleet.channel("general")}
    token = None if token_of is None else ("xoxp-forged" if token_of == "nobody" else fleet.user(token_of)["token"])
    reply = await fleet.api(method, token, **params)
    assert reply == {"ok": False, "error": error} or (reply["ok"] is False and reply["error"] == error), reply


async def test_malformed_json_body(fleet: Fleet) -> None:
    token = fleet.user("alice")["token"]
    async with aiohttp.ClientSession() as http:
        async with http.post(
            fleet.api_url + "chat.postMessage",
            data=b'{"channel": "C1", "text": ',
            headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
        ) as resp:
            body = await resp.json(content_type=None)
    assert body["ok"] is False and body["error"] == "invalid_json", body
    await still_delivers(fleet)


@pytest.mark.parametrize("service", ["admin-server", "channel-server"])
async def test_malformed_msgpack_is_disconnected_and_counted(fleet: Fleet, service: str) -> None:
    proc = fleet.processes(service)[0]
    before = await error_count(proc, "protocol")
    # A fleet peer with a valid certificate (of a role that may talk to this server) that breaks framing.
    sender = {"admin-server": ("webapp", "webapp-bad"), "channel-server": ("admin-server", "as-bad")}[service]
    tls = fleet.trust(*sender).client
    for payload in (
        struct.pack(">I", 5) + b"\xc1\xc1\xc1\xc1\xc1",  # 0xc1 is never valid msgpack
        struct.pack(">I", 3) + b"\x93\x01\x02",  # valid msgpack, but an array, not a map
        struct.pack(">I", 0xFFFFFFF0),  # declares a frame far over the limit
    ):
        reader, writer = await asyncio.open_connection(proc["host"], proc["port"], ssl=tls)
        writer.write(payload)
        await writer.drain()
        try:
            rest = await asyncio.wait_for(reader.read(), DEFAULT_WAIT_S)
        except ConnectionResetError:  # the server aborts the connection (RST)
            rest = b""
        assert rest == b"", "the server must hang up without answering"
        writer.close()

    async def counted() -> bool:
        return await error_count(proc, "protocol") >= before + 3

    await async_wait_until(counted, what="protocol errors counted")
    await still_delivers(fleet)


async def test_invalid_ticket_closes_with_4001(fleet: Fleet) -> None:
    client = await fleet.connect("carol")
    base = client.url.rsplit("/", 1)[0]
    await client.close()
    for bad in (base + "/not-a-ticket", client.url):  # forged, then reused
        async with websockets.connect(bad) as ws:
            with pytest.raises(websockets.ConnectionClosed):
                await asyncio.wait_for(ws.recv(), DEFAULT_WAIT_S)
            assert ws.close_code == CloseCode.INVALID_TICKET


async def test_oversized_websocket_frame_closes_with_1009(fleet: Fleet) -> None:
    client = await fleet.connect("dave")
    await client.send("x" * (1024 * 1024))
    await asyncio.wait_for(client.closed.wait(), DEFAULT_WAIT_S)
    assert client.close_code == CloseCode.MESSAGE_TOO_BIG
    await still_delivers(fleet)


async def test_invalid_json_over_websocket_gets_an_error_event(fleet: Fleet) -> None:
    client = await fleet.connect("eve")
    await client.send("{not json")
    await client.wait_for(lambda c: any(e.get("type") == "error" for e in c.events), what="error event")
    error = next(e for e in client.events if e.get("type") == "error")
    assert error["error"]["code"] == 1
    await client.send({"id": 7, "type": "ping", "time": 123})
    await client.wait_for(lambda c: any(e.get("type") == "pong" for e in c.events), what="pong")
    assert next(e for e in client.events if e.get("type") == "pong") == {"type": "pong", "reply_to": 7, "time": 123}
    await client.close()


async def test_binary_websocket_frame_closes_with_1003(fleet: Fleet) -> None:
    client = await fleet.connect("eve")
    await client.send(b"\x00\x01")
    await asyncio.wait_for(client.closed.wait(), DEFAULT_WAIT_S)
    assert client.close_code == CloseCode.UNSUPPORTED_DATA
    await still_delivers(fleet)


async def test_presence_teams_and_revoke_ctl_out_of_shape_are_refused_counted_and_stop_nothing(fleet: Fleet) -> None:
    """The fields session 10 added, each sent out of shape by the role that may send them: a
    presence server drops an ``online`` whose ``teams`` do not go one per user or are not team ids
    (``bad_push``), an admin server refuses a ``pub`` whose ``revoke`` ctl is not a token id
    (``bad_request``); the connection stays, nothing is registered, and the fleet goes on serving
    (presence answers, posts are delivered)."""
    ps, admin = fleet.processes("presence")[0], fleet.processes("admin-server")[0]
    bob = fleet.user("bob")["id"]
    pushes_before, requests_before = await error_count(ps, "bad_push"), await error_count(admin, "bad_request")
    gw = await connect(ps["host"], int(ps["port"]), PeerConnection, trust=fleet.trust("gateway", "gw-bad-teams"))
    try:
        before = await gw.request({"op": "query", "users": [bob]}, DEFAULT_WAIT_S)
        for teams in (["T0A1B2C3D4E", "T0A1B2C3D4E"], ["not a team id"], [7]):
            gw.send({"op": "online", "gw": "gw-bad-teams", "users": [bob], "epoch": 1, "teams": teams})
        assert (await gw.request({"op": "ping"}, DEFAULT_WAIT_S))["op"] == "ok"  # the pushes were handled
        after = await gw.request({"op": "query", "users": [bob]}, DEFAULT_WAIT_S)
        assert (after["presence"], after["teams"]) == (before["presence"], before["teams"])  # nothing registered
    finally:
        gw.close()
    webapp = await connect(admin["host"], int(admin["port"]), PeerConnection, trust=fleet.trust("webapp", "webapp-bad"))
    try:
        for token_id in ("not-a-token-id", "A" * 32, 7):
            pub = {"op": "pub", "ch": bob, "seq": 10**9, "json": b"{}", "t0": 0.0, "ctl": {"revoke": token_id}}
            with pytest.raises(PeerError) as refused:
                await webapp.request(pub, DEFAULT_WAIT_S)
            assert refused.value.code == "bad_request" and "revoke" in str(refused.value.reply.get("detail")), token_id
        assert webapp.is_open
    finally:
        webapp.close()
    assert await error_count(ps, "bad_push") == pushes_before + 3
    assert await error_count(admin, "bad_request") == requests_before + 3
    await still_delivers(fleet)
