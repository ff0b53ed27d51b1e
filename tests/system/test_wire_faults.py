"""Faults at the fleet's internal boundaries, against the real fleet (``rtm up``).

Bad ops sent straight to a channel server and an admin server, a ``sub`` of
400k channels, a 4 GiB length header, 1,000 connections holding half-sent
frames, and every kind of malformed ring document in Consul followed by a
channel server's death. Each is refused or ignored with a count, and the
fleet goes on delivering every message.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from services import ops
from services.connection import FRAME_TIMEOUT_S
from services.errors import ErrorCode, PeerError
from services.ring import CHANNEL_RING_KEY, RingDocument
from tests.support import DEFAULT_WAIT_S, async_wait_until
from tests.system.harness import Client, Fleet, channel_ring, consul_client, process_by_id
from tests.system.peer import dial, error_count, metric, open_raw

FAILOVER_TIMEOUT_S = 30.0
HALF_SENT_CONNECTIONS = 1000


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    data_dir: Path = tmp_path_factory.mktemp("wire-faults")
    handle = Fleet.up(data_dir, "--spares", "2")
    try:
        yield handle
    finally:
        handle.down()


@pytest.fixture
async def bob(fleet: Fleet) -> AsyncIterator[Client]:
    client = await fleet.connect("bob")
    yield client
    await client.close()


async def delivered(fleet: Fleet, client: Client, timeout_s: float = DEFAULT_WAIT_S) -> None:
    """A post to #general reaches ``client``: the fleet still serves."""
    text = f"alive-{uuid.uuid4().hex[:8]}"
    general = fleet.channel("general")
    reply = await fleet.api("chat.postMessage", fleet.user("alice")["token"], channel=general, text=text)
    assert reply["ok"], reply
    await client.wait_texts([text], general, timeout_s=timeout_s)


def owner_of_general(fleet: Fleet) -> dict[str, Any]:
    return process_by_id(fleet, channel_ring(fleet).owner_for(fleet.channel("general")))


def bad_pubs(channel: str) -> list[dict[str, Any]]:
    event = b'{"type":"message","text":"poison"}'
    return [
        {"op": "pub", "ch": channel, "seq": 2**63, "json": event, "t0": time.time()},
        {"op": "pub", "ch": channel, "seq": None, "json": event, "t0": time.time(), "ctl": [1, 2, 3]},
        {"op": "pub", "ch": 4242, "seq": 1, "json": event, "t0": time.time()},
    ]


@pytest.mark.parametrize("service", ["channel-server", "admin-server"])
async def test_bad_pubs_are_refused_counted_and_later_events_delivered(fleet: Fleet, bob: Client, service: str) -> None:
    general = fleet.channel("general")
    proc = owner_of_general(fleet) if service == "channel-server" else fleet.processes("admin-server")[0]
    before = await error_count(proc, "bad_request")
    conn = await dial(fleet, proc, "as" if service == "channel-server" else "webapp")
    try:
        for message in bad_pubs(general):
            with pytest.raises(PeerError) as info:
                await conn.request(message)
            assert info.value.code == ErrorCode.BAD_REQUEST, info.value.reply
        assert conn.is_open
        assert (await conn.request({"op": "ping"}))["op"] == "ok"  # the same connection still serves
    finally:
        conn.close()
    assert await error_count(proc, "bad_request") == before + 3
    for _ in range(3):  # real events after the poison: none taken for a duplicate, all delivered
        await delivered(fleet, bob)


async def test_a_sub_of_400k_channels_is_refused_and_the_fleet_serves(fleet: Fleet, bob: Client) -> None:
    proc = owner_of_general(fleet)
    before = await error_count(proc, "bad_request")
    conn = await dial(fleet, proc, "gw")
    try:
        chans = [[f"C{i:X}", -1] for i in range(400_000)]
        with pytest.raises(PeerError) as info:
            await conn.request({"op": "sub", "gw": "gw-stranger", "chans": chans}, timeout_s=30)
        assert info.value.code == ErrorCode.BAD_REQUEST
        assert str(ops.MAX_SUB_CHANNELS) in info.value.reply["detail"]
    finally:
        conn.close()
    assert await error_count(proc, "bad_request") == before + 1
    assert await metric(proc, "rtm_cs_subscriptions") < 1000  # none of the 400k was taken
    await delivered(fleet, bob)


async def test_a_4_gib_header_is_refused_at_once_and_half_sent_frames_time_out(fleet: Fleet, bob: Client) -> None:
    proc = owner_of_general(fleet)
    protocol_before = await error_count(proc, "protocol")
    reader, writer = await open_raw(fleet, proc)
    writer.write((2**32 - 1).to_bytes(4, "big"))
    await writer.drain()
    assert await asyncio.wait_for(reader.read(), 2.0) == b""  # closed at once, nothing buffered
    writer.close()

    started = time.monotonic()
    held = [await open_raw(fleet, proc) for _ in range(HALF_SENT_CONNECTIONS)]
    for _, w in held:
        w.write(b"\x00\x00\x01")  # 3 bytes of a 4-byte length header, and then nothing
    await asyncio.gather(*(w.drain() for _, w in held))
    await delivered(fleet, bob)  # while they hang, everyone else is served

    async def all_closed() -> bool:
        results = await asyncio.gather(*(asyncio.wait_for(r.read(), 0.01) for r, _ in held), return_exceptions=True)
        return all(res == b"" or isinstance(res, ConnectionError) for res in results)

    await async_wait_until(all_closed, timeout_s=FRAME_TIMEOUT_S * 3, what="half-sent frames to be cut off")
    elapsed = time.monotonic() - started
    assert elapsed >= FRAME_TIMEOUT_S * 0.9, f"closed after {elapsed:.1f}s, before the frame timeout"
    for _, w in held:
        w.close()
    assert await error_count(proc, "protocol") >= protocol_before + 1 + HALF_SENT_CONNECTIONS
    await delivered(fleet, bob)


MALFORMED_RINGS = [b"[]", b"null", b'{"version": Infinity}', b"{not json", "older"]


async def spare_ready(fleet: Fleet) -> bool:
    ring = channel_ring(fleet)
    _, entries = consul_client(fleet).health.service("channel-server", passing=True)
    mapped = set(ring.doc.slots.values())
    return any(e["Service"]["ID"] not in mapped for e in entries)


async def test_each_malformed_ring_then_a_channel_server_killed_still_delivers_everything(
    fleet: Fleet, bob: Client
) -> None:
    consul = consul_client(fleet)
    general = fleet.channel("general")
    gateway = fleet.processes("gateway")[0]
    for bad in MALFORMED_RINGS:
        await async_wait_until(lambda: spare_ready(fleet), timeout_s=FAILOVER_TIMEOUT_S, what="a spare")
        good = channel_ring(fleet)
        bad_before = await error_count(gateway, "bad_kv")
        raw = RingDocument(version=1, slots=dict(good.doc.slots)).to_json() if bad == "older" else bad
        assert consul.kv.put(CHANNEL_RING_KEY, raw)
        await async_wait_until(
            lambda b=bad_before: _counted(gateway, b), what=f"the gateway to count the bad ring {raw[:20]!r}"
        )
        await delivered(fleet, bob)  # every process kept its last good ring
        slot, victim = good.slot_for(general), good.owner_for(general)
        fleet.kill(process_by_id(fleet, victim)["pid"])

        async def replaced(version: int = good.version, slot: str = slot, victim: str = victim) -> bool:
            try:
                ring = channel_ring(fleet)
            except ValueError:
                return False  # still the bad value: CHARM has not written yet
            return ring.version > version and ring.doc.slots.get(slot) not in (None, victim)

        await async_wait_until(replaced, timeout_s=FAILOVER_TIMEOUT_S, what=f"failover after {raw[:20]!r}")
        await delivered(fleet, bob, timeout_s=FAILOVER_TIMEOUT_S)


async def _counted(proc: dict[str, Any], before: float) -> bool:
    return await error_count(proc, "bad_kv") > before
