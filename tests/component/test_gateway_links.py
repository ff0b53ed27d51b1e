"""A gateway's channel-server link over real localhost sockets: a server that is unreachable when
the gateway first needs it still gets every subscription once it listens, and a server that
restarts empty gets them all again (issue 13: "a link's first connect skips the resubscription")."""

from __future__ import annotations

import asyncio
import json
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from gateway.app import Gateway, build_parser
from gateway.state import Session
from services import wire
from services.connection import PeerConnection, serve
from services.ring import RingDocument
from tests.support import DEFAULT_WAIT_S, FleetCA, free_port

HOST = "127.0.0.1"
OWNER = "cs-inst-0"
CA = FleetCA(Path(tempfile.mkdtemp(prefix="rtm-test-ca-")))  # this module's fleet CA


class ChannelServerDouble:
    """A msgpack server that answers subs like a channel server and records them."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.subs: asyncio.Queue[list[Any]] = asyncio.Queue()
        self.conns: list[PeerConnection] = []
        self.server: asyncio.Server | None = None

    async def start(self) -> None:
        def factory() -> PeerConnection:
            conn = PeerConnection(name="cs-double", on_request=self.on_request)
            self.conns.append(conn)
            return conn

        self.server = await serve(HOST, self.port, factory, trust=CA.trust("channel-server", OWNER))

    def on_request(self, conn: PeerConnection, msg: dict[str, Any]) -> dict[str, Any]:
        if msg["op"] == "sub":
            self.subs.put_nowait(msg["chans"])
        return wire.reply_ok(int(msg["id"]), version=1, not_owner=[], last={})

    async def stop(self) -> None:
        assert self.server is not None
        self.server.close()
        for conn in self.conns:
            conn.abort()
        await self.server.wait_closed()
        self.conns.clear()


@pytest.fixture
async def gw() -> AsyncIterator[Gateway]:
    flags = CA.flags("gateway", "gw-test")
    gateway = Gateway(build_parser().parse_args(["--secret", "s", "--instance-id", "gw-test", *flags]))
    gateway.channel_links.follower.ring.update(RingDocument(version=1, slots={"cs-0": OWNER}))
    yield gateway
    gateway.channel_links.stop_retries()
    await gateway.channel_links.close()
    for task in list(gateway.tasks):
        task.cancel()
    await asyncio.gather(*gateway.tasks, return_exceptions=True)
    await gateway.discovery.close()


class Sock:
    def __init__(self) -> None:
        self.frames: list[bytes] = []
        self.changed = asyncio.Event()

    def write(self, frame: bytes) -> bool:
        self.frames.append(frame)
        self.changed.set()
        return True


async def test_a_server_unreachable_at_first_still_gets_the_subscription_and_delivers(
    gw: Gateway, monkeypatch: pytest.MonkeyPatch
) -> None:
    import gateway.channel_links

    # Unreachable for longer than a sub may wait: the old gateway gave up on the sub then, and the
    # link's first connect did not resubscribe, so the channel stayed silent for good.
    monkeypatch.setattr(gateway.channel_links, "SUBSCRIBE_TIMEOUT_S", 0.3)
    port = free_port()
    gw.channel_links.channel_servers.address = lambda owner: (HOST, port)  # type: ignore[method-assign]
    sock = Sock()
    session = Session(sid=1, user="U1", team="T1", write=sock.write)
    gw.apply(gw.state.attach(session, [("C1", 4)]))  # nothing listens on the port yet: connects are refused
    await asyncio.sleep(1.0)  # wait-ok: the server stays unreachable for a while (several refused connects)
    assert not gw.channel_links.links[OWNER].connected
    server = ChannelServerDouble(port)
    await server.start()
    try:
        assert await asyncio.wait_for(server.subs.get(), DEFAULT_WAIT_S) == [["C1", 4]]
        conn = server.conns[0]
        conn.write(wire.encode_event("C1", 5, json.dumps({"seq": 5}).encode(), 0.0, None))
        await asyncio.wait_for(sock.changed.wait(), DEFAULT_WAIT_S)
        assert [json.loads(f[2:])["seq"] for f in sock.frames] == [5]

        # The server restarts empty: the reconnect subscribes everything again, from where we are.
        await server.stop()
        await server.start()
        assert await asyncio.wait_for(server.subs.get(), DEFAULT_WAIT_S) == [["C1", 5]]
    finally:
        await server.stop()
