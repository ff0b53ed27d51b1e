"""A channel server and an admin server on real sockets, fed bad ops: each is answered
``bad_request`` and counted, the connection stays up, and later real events are delivered.

The servers run in this process without Consul (``--consul`` points at a closed
port); the ring is applied by hand, as the Consul watch would.
"""

from __future__ import annotations

import asyncio
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from admin_server.app import AdminServer
from admin_server.app import build_parser as admin_parser
from channel_server.app import ChannelServer
from services import ops
from services.connection import PeerConnection, connect, serve
from services.errors import ErrorCode, PeerError
from tests.support import DEFAULT_WAIT_S, FleetCA

HOST = "127.0.0.1"
NO_CONSUL = "127.0.0.1:1"  # nothing listens there: every Consul call fails at once
CHANNEL = "C0A1B2C3D4E"
CA = FleetCA(Path(tempfile.mkdtemp(prefix="rtm-test-ca-")))  # this module's fleet CA
# Who each dialling name is: its certificate's identity (the gateway "gw" subscribes as gw-1).
IDENTITIES = {"gw": ("gateway", "gw-1"), "as": ("admin-server", "as-1"), "webapp": ("webapp", "webapp-1")}


async def dial(port: int, name: str, pushes: asyncio.Queue[dict[str, Any]] | None = None) -> PeerConnection:
    """Dial a fleet server as a peer. The one place a test connects: it presents
    whatever credentials the fleet's listeners require."""
    on_push = (lambda c, m: pushes.put_nowait(m)) if pushes is not None else (lambda c, m: None)
    service, instance = IDENTITIES.get(name, ("gateway", name))
    return await connect(
        HOST, port, lambda: PeerConnection(name=name, on_push=on_push), trust=CA.trust(service, instance)
    )


def errors(metrics: Any, kind: str) -> float:
    return float(metrics.errors.labels(kind)._value.get())


@pytest.fixture
async def channel_server() -> AsyncIterator[tuple[ChannelServer, int]]:
    cs = CA.channel_server()
    server = await serve(HOST, 0, cs.make_connection, trust=cs.trust)
    yield cs, int(server.sockets[0].getsockname()[1])
    server.close()
    for conn in list(cs.gateways.values()):
        conn.abort()
    await cs.discovery.close()


def pub(seq: int | None, text: str = "x", **extra: Any) -> dict[str, Any]:
    return {"op": "pub", "ch": CHANNEL, "seq": seq, "json": f'{{"text":"{text}"}}'.encode(), "t0": 1.0, **extra}


async def next_event(pushes: asyncio.Queue[dict[str, Any]]) -> dict[str, Any]:
    return await asyncio.wait_for(pushes.get(), DEFAULT_WAIT_S)


async def test_bad_pubs_are_refused_and_later_real_events_still_delivered(
    channel_server: tuple[ChannelServer, int],
) -> None:
    cs, port = channel_server
    pushes: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
    gateway = await dial(port, "gw", pushes)
    admin = await dial(port, "as")
    try:
        await gateway.request({"op": "sub", "gw": "gw-1", "chans": [[CHANNEL, -1]]})
        await admin.request(pub(1, "one"))
        assert (await next_event(pushes))["seq"] == 1
        bad = [
            pub(2**63),  # used to become the channel's last seq: every later event a "duplicate"
            pub(None, ctl=[1, 2]),  # used to reach every gateway and make it drop its link
            {**pub(2), "ch": 12345},
            pub(2, ctl={"join": "C1", "evil": True}),
        ]
        for message in bad:
            with pytest.raises(PeerError) as info:
                await admin.request(message)
            assert info.value.code == ErrorCode.BAD_REQUEST
            assert info.value.reply["detail"]
        assert errors(cs.metrics, "bad_request") == len(bad)
        reply = await admin.request(pub(2, "two"))
        assert not reply.get("duplicate")
        event = await next_event(pushes)
        assert (event["seq"], event["json"]) == (2, b'{"text":"two"}')
        assert gateway.is_open and admin.is_open
        assert cs.table.last_seq[CHANNEL] == 2
    finally:
        gateway.close()
        admin.close()


async def test_a_sub_with_400k_channels_is_refused_and_the_gateway_keeps_its_link(
    channel_server: tuple[ChannelServer, int],
) -> None:
    cs, port = channel_server
    gateway = await dial(port, "gw")
    try:
        chans = [[f"C{i:X}", -1] for i in range(400_000)]  # short ids: 400k fit in one 4 MiB frame
        with pytest.raises(PeerError) as info:
            await gateway.request({"op": "sub", "gw": "gw-1", "chans": chans}, timeout_s=30)
        assert info.value.code == ErrorCode.BAD_REQUEST
        assert str(ops.MAX_SUB_CHANNELS) in info.value.reply["detail"]
        assert cs.table.subscribers == {}
        reply = await gateway.request({"op": "sub", "gw": "gw-1", "chans": [[CHANNEL, -1]]})
        assert reply["not_owner"] == []
    finally:
        gateway.close()


async def test_gateway_indexes_are_reused_across_connections(channel_server: tuple[ChannelServer, int]) -> None:
    cs, port = channel_server
    steady = await dial(port, "gw-steady")
    await steady.request({"op": "sub", "gw": "gw-steady", "chans": [[CHANNEL, -1]]})
    try:
        for n in range(30):  # gateways restarting under new instance ids
            conn = await dial(port, f"gw-{n}")
            await conn.request({"op": "sub", "gw": f"gw-{n}", "chans": [[CHANNEL, -1]]})
            conn.close()
            await asyncio.wait_for(conn.closed, DEFAULT_WAIT_S)
            for _ in range(100):  # the server sees the close a moment later
                if len(cs.gateways) == 1:
                    break
                await asyncio.sleep(0.01)  # wait-ok: bounded poll for the server-side close
        assert len(cs.gateways) == 1
        assert max(cs.table.gateway_index.values()) <= 1
        assert cs.table.subscribers[CHANNEL] < 4  # a small int, not a 31-bit mask
    finally:
        steady.close()


@pytest.fixture
async def admin_server() -> AsyncIterator[tuple[AdminServer, int]]:
    args = admin_parser().parse_args(
        ["--instance-id", "as-test", "--consul", NO_CONSUL, "--route-budget-s", "1.0", "--max-pubs-in-flight", "2"]
        + CA.flags("admin-server", "as-test")
    )
    admin = AdminServer(args)
    server = await serve(HOST, 0, admin.make_connection, trust=admin.trust)
    yield admin, int(server.sockets[0].getsockname()[1])
    server.close()
    await admin.discovery.close()


async def test_the_admin_server_refuses_bad_pubs_and_bounds_pubs_in_flight(
    admin_server: tuple[AdminServer, int],
) -> None:
    admin, port = admin_server
    webapp = await dial(port, "webapp")
    try:
        for message in (pub(2**63), pub(None, ctl="x"), {**pub(1), "ch": 7}):
            with pytest.raises(PeerError) as info:
                await webapp.request(message)
            assert info.value.code == ErrorCode.BAD_REQUEST
        assert errors(admin.metrics, "bad_request") == 3
        # No channel server: each pub waits its route budget. Two fit; the third is refused at once.
        waiting = [webapp.begin_request(pub(n), timeout_s=DEFAULT_WAIT_S) for n in (1, 2)]
        with pytest.raises(PeerError) as info:
            await asyncio.wait_for(webapp.request(pub(3)), 0.5)
        assert info.value.code == ErrorCode.UNAVAILABLE  # transient: the hand-off backs off and resends
        assert admin.refused._value.get() == 1
        for future in waiting:
            with pytest.raises(PeerError, match="unavailable"):
                await future
        assert admin.pubs_in_flight == 0
        assert (await webapp.request({"op": "ping"}))["op"] == "ok"
    finally:
        webapp.close()
