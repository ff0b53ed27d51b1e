"""A channel server answers a sub made on a newer ring after re-reading the ring, not with a refusal."""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import AsyncIterator
from typing import Any

import pytest

from channel_server.app import ChannelServer, build_parser
from services.authz import typing_json
from services.identity import ADMIN_SERVER, GATEWAY, WEBAPP, PeerIdentity
from services.ring import HashRing, RingDocument
from tests.support import FleetCA

SLOTS = ("cs-0", "cs-1", "cs-2")


class Conn:
    """Enough of a PeerConnection for handle_request."""

    def __init__(self, identity: PeerIdentity = PeerIdentity(GATEWAY, "gw-a")) -> None:  # noqa: B008 - frozen
        self.identity = identity  # what its certificate said
        self.state: dict[str, Any] = {}
        self.frames: list[bytes] = []
        self.is_open = True
        self.closed_by_server = False

    def write(self, frame: bytes) -> None:
        self.frames.append(frame)

    def close(self) -> None:
        self.closed_by_server = True


@pytest.fixture
async def server(fleet_ca: FleetCA) -> AsyncIterator[ChannelServer]:
    flags = fleet_ca.flags("channel-server", "spare-1")
    cs = ChannelServer(build_parser().parse_args(["--instance-id", "spare-1", *flags]))
    yield cs
    await cs.discovery.close()


def rings() -> tuple[RingDocument, RingDocument, str]:
    """v1 without us, v2 with us promoted into cs-1; a channel of cs-1."""
    v1 = RingDocument(version=1, slots={slot: f"inst-{slot}" for slot in SLOTS})
    v2 = v1.with_owner("cs-1", "spare-1")
    ring = HashRing()
    ring.update(v2)
    channel = next(f"C{n}" for n in range(1000) if ring.owner_for(f"C{n}") == "spare-1")
    return v1, v2, channel


async def test_a_sub_on_a_newer_ring_is_answered_after_the_ring_is_reread(server: ChannelServer) -> None:
    v1, v2, channel = rings()
    server.follower.apply(v1)
    reads: list[int] = []

    async def refresh() -> None:  # what the Consul read returns: the ring the gateway already acts on
        reads.append(1)
        server.follower.apply(v2)

    server.follower.refresh = refresh  # type: ignore[method-assign]
    reply = server.handle_request(Conn(), {"op": "sub", "id": 7, "gw": "gw-a", "chans": [[channel, 0]], "rv": 2})
    assert inspect.isawaitable(reply)
    reply = await reply
    assert reply["op"] == "ok" and reply["not_owner"] == [] and reply["version"] == 2
    assert reads == [1]
    assert server.table.subscribers.get(channel)  # subscribed


async def test_a_sub_on_a_newer_ring_that_cannot_be_read_is_refused(server: ChannelServer) -> None:
    v1, _, channel = rings()
    server.follower.apply(v1)

    async def refresh() -> None:
        raise OSError("consul unreachable")

    server.follower.refresh = refresh  # type: ignore[method-assign]
    reply = await server.handle_request(Conn(), {"op": "sub", "id": 8, "gw": "gw-a", "chans": [[channel, 0]], "rv": 2})
    assert reply["not_owner"] == [channel]


async def test_a_sub_on_the_same_ring_is_answered_at_once(server: ChannelServer) -> None:
    _, v2, channel = rings()
    server.follower.apply(v2)
    reply = server.handle_request(Conn(), {"op": "sub", "id": 9, "gw": "gw-a", "chans": [[channel, 0]], "rv": 2})
    assert not inspect.isawaitable(reply)
    assert reply["not_owner"] == []


async def test_a_connection_that_closed_during_the_ring_read_does_not_replace_the_new_one(
    server: ChannelServer,
) -> None:
    v1, v2, channel = rings()
    server.follower.apply(v1)
    old, new = Conn(), Conn()
    release = asyncio.Event()

    async def refresh() -> None:
        await release.wait()
        server.follower.apply(v2)

    server.follower.refresh = refresh  # type: ignore[method-assign]
    delayed = asyncio.ensure_future(
        server.handle_request(old, {"op": "sub", "id": 1, "gw": "gw-a", "chans": [[channel, 0]], "rv": 2})
    )
    await asyncio.sleep(0)  # wait-ok: the delayed sub is now waiting for the ring read
    old.is_open = False  # the gateway's connection dropped; it reconnects and subscribes again
    release.set()
    server.follower.apply(v2)
    reply = server.handle_request(new, {"op": "sub", "id": 2, "gw": "gw-a", "chans": [[channel, 0]], "rv": 2})
    assert reply["not_owner"] == []
    late = await delayed
    assert late["op"] == "err"
    assert not new.closed_by_server and server.gateways[new.state["gw_index"]] is new


def forbidden_count(server: ChannelServer) -> float:
    return server.metrics.errors.labels("forbidden")._value.get()  # type: ignore[no-any-return]


@pytest.mark.parametrize(
    ("identity", "msg"),
    [
        (PeerIdentity(ADMIN_SERVER, "as-0"), {"op": "sub", "gw": "as-0", "chans": [["C1", 0]]}),
        (PeerIdentity(WEBAPP, "webapp-0"), {"op": "pub", "ch": "C1", "seq": 1, "json": b"{}"}),
        (PeerIdentity(GATEWAY, "gw-a"), {"op": "pub", "ch": "C1", "seq": 5, "json": b"{}"}),  # only transient
        (PeerIdentity(GATEWAY, "gw-a"), {"op": "pub", "ch": "C1", "seq": None, "json": b"{}", "ctl": {"from": "U1"}}),
        (PeerIdentity(GATEWAY, "gw-a"), {"op": "sub", "gw": "gw-b", "chans": [["C1", 0]]}),  # another gateway's id
        (PeerIdentity(GATEWAY, "gw-a"), {"op": "unsub", "gw": "gw-b", "chans": ["C1"]}),
        (PeerIdentity("operator", "rtm-cli"), {"op": "unsub", "gw": "rtm-cli", "chans": ["C1"]}),
    ],
)
async def test_a_role_is_refused_each_op_it_may_not_send(
    server: ChannelServer, identity: PeerIdentity, msg: dict[str, Any]
) -> None:
    _, v2, _ = rings()
    server.follower.apply(v2)
    before = forbidden_count(server)
    reply = server.handle_request(Conn(identity), {**msg, "id": 3})
    assert reply["op"] == "err" and reply["code"] == "forbidden"
    assert forbidden_count(server) == before + 1
    assert not server.table.subscribers and not server.table.history and not server.gateways  # nothing changed


async def test_a_gateway_may_publish_typing_and_ping(server: ChannelServer) -> None:
    _, v2, channel = rings()
    server.follower.apply(v2)
    gw = Conn()
    assert server.handle_request(gw, {"op": "ping", "id": 1})["op"] == "ok"
    typing = {"op": "pub", "id": 2, "ch": channel, "seq": None, "json": typing_json(channel, "U1")}
    reply = server.handle_request(gw, {**typing, "ctl": {"from": "U1"}})
    assert reply["op"] == "ok"
    assert forbidden_count(server) == 0


async def test_seqs_reports_last_seqs_and_the_channels_this_gateway_is_not_subscribed_to(
    server: ChannelServer,
) -> None:
    _, v2, channel = rings()
    server.follower.apply(v2)
    ring = HashRing()
    ring.update(v2)
    other = next(f"D{n}" for n in range(1000) if ring.owner_for(f"D{n}") == "spare-1")
    foreign = next(f"E{n}" for n in range(1000) if ring.owner_for(f"E{n}") != "spare-1")
    conn = Conn()
    assert server.handle_request(conn, {"op": "sub", "id": 1, "gw": "gw-a", "chans": [[channel, 0]]})["op"] == "ok"
    server.table.publish(channel, 5, b"{}", 0.0)
    server.table.publish(other, 9, b"{}", 0.0)
    reply = server.handle_request(conn, {"op": "seqs", "id": 2, "gw": "gw-a", "chans": [channel, other, foreign]})
    assert reply["op"] == "ok"
    assert reply["last"] == {channel: 5, other: 9}
    assert reply["missing"] == [other]  # gw-a never subscribed it: the gateway must resubscribe
    assert reply["not_owner"] == [foreign]


async def test_seqs_refuses_a_malformed_or_oversized_request(server: ChannelServer) -> None:
    from services.errors import BadMessage
    from services.ops import MAX_SEQS_CHANNELS

    for chans in ("C1", [f"C{n}" for n in range(MAX_SEQS_CHANNELS + 1)], [1, 2]):
        with pytest.raises(BadMessage):  # the connection answers it bad_request and stays up
            server.handle_request(Conn(), {"op": "seqs", "id": 3, "gw": "gw-a", "chans": chans})
