"""CHARM replaces a failed Channel Server with a spare, under load, and nothing
persisted is lost, duplicated or reordered on the way to any client."""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import aiohttp
import pytest

from services.connection import PeerConnection, connect
from services.debug_faults import OPERATOR_TOKEN_HEADER
from services.errors import NotOwner
from tests.support import DEFAULT_WAIT_S, async_wait_until
from tests.system.harness import REGIONS, Client, Fleet, Load, channel_ring, process_by_id

LOAD_BEFORE_KILL_S = 1.0
LOAD_AFTER_FAILOVER_S = 1.5
CATCH_UP_TIMEOUT_S = 30.0
FAILOVER_TIMEOUT_S = 30.0


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    data_dir: Path = tmp_path_factory.mktemp("failover")
    handle = Fleet.up(data_dir, "--debug-faults", "--seed-users", "6")
    try:
        yield handle
    finally:
        handle.down()


@pytest.fixture
async def clients(fleet: Fleet) -> AsyncIterator[list[Client]]:
    """Two connections per user, spread over both gateways."""
    opened = [await fleet.connect(name, region) for name in ("alice", "bob", "carol", "dave") for region in REGIONS]
    assert len({c.gateway_port for c in opened}) == 2
    yield opened
    for client in opened:
        await client.close()


async def wait_ring_change(fleet: Fleet, version: int, slot: str, old_owner: str) -> str:
    async def moved() -> str | None:
        ring = channel_ring(fleet)
        owner = ring.doc.slots.get(slot)
        return owner if ring.version > version and owner not in (None, old_owner) else None

    return await async_wait_until(moved, timeout_s=FAILOVER_TIMEOUT_S, what=f"CHARM to replace {old_owner} in {slot}")


async def assert_everyone_got_everything(clients: list[Client], load: Load) -> None:
    """Each client holds, per channel, exactly the acknowledged posts, in order."""
    assert not load.errors, load.errors[:3]
    for client in clients:
        for channel, texts in load.posted.items():
            await client.wait_for(
                lambda c, ch=channel, want=texts: len([t for t in c.texts(ch) if t.startswith("load-")]) >= len(want),
                timeout_s=CATCH_UP_TIMEOUT_S,
                what=f"{len(texts)} posts in {channel}",
            )
            got = [t for t in client.texts(channel) if t.startswith("load-")]
            assert got == texts, f"{client.name} in {channel}: missing {set(texts) - set(got)}, extra/out of order"


async def run_load_around(fleet: Fleet, clients: list[Client], action: object) -> tuple[Load, float]:
    general, random_ = fleet.channel("general"), fleet.channel("random")
    for client in clients:  # start from a clean slate for this test
        client.events.clear()
    load = Load(fleet, [fleet.user(name)["token"] for name in ("eve", "carol", "dave")], [general, random_])
    task = asyncio.create_task(load.run())
    # wait-ok: the load runs for a fixed time before the kill
    await asyncio.wait_for(asyncio.shield(asyncio.sleep(LOAD_BEFORE_KILL_S)), LOAD_BEFORE_KILL_S + 1)  # wait-ok
    started = time.monotonic()
    await action()  # type: ignore[operator]
    elapsed = time.monotonic() - started
    await asyncio.sleep(LOAD_AFTER_FAILOVER_S)  # wait-ok: keep the load flowing after the failover
    load.stop.set()
    await asyncio.wait_for(task, DEFAULT_WAIT_S)
    return load, elapsed


async def pub_directly(fleet: Fleet, host: str, port: int, channel: str) -> None:
    """Act as a stale admin server (with an admin-server certificate): publish straight to a channel server."""
    conn = await connect(
        host, port, lambda: PeerConnection(name="stale-as"), trust=fleet.trust("admin-server", "as-stale")
    )
    try:
        await conn.request({"op": "pub", "ch": channel, "seq": 10**9, "json": b"{}", "t0": time.time(), "rv": 0})
    finally:
        conn.close()


async def test_kill_channel_server_under_load(fleet: Fleet, clients: list[Client]) -> None:
    general = fleet.channel("general")
    ring = channel_ring(fleet)
    slot, victim = ring.slot_for(general), ring.owner_for(general)

    async def kill_and_wait() -> None:
        fleet.kill(process_by_id(fleet, victim)["pid"])
        await wait_ring_change(fleet, ring.version, slot, victim)

    load, _ = await run_load_around(fleet, clients, kill_and_wait)
    assert sum(len(v) for v in load.posted.values()) > 20
    await assert_everyone_got_everything(clients, load)


async def test_killed_channel_server_comes_back_as_spare(fleet: Fleet, clients: list[Client]) -> None:
    general = fleet.channel("general")
    ring = channel_ring(fleet)
    slot, victim = ring.slot_for(general), ring.owner_for(general)
    old = process_by_id(fleet, victim)
    fleet.kill(old["pid"])
    await wait_ring_change(fleet, ring.version, slot, victim)

    async def restarted() -> bool:
        return process_by_id(fleet, victim)["pid"] != old["pid"]

    await async_wait_until(restarted, timeout_s=FAILOVER_TIMEOUT_S, what="rtm up to restart the killed server")
    back = process_by_id(fleet, victim)
    assert victim not in channel_ring(fleet).doc.slots.values()

    async def refuses() -> bool:
        try:
            await pub_directly(fleet, back["host"], back["port"], general)
        except NotOwner:
            return True
        except OSError:
            return False
        raise AssertionError("a channel server that lost its slot applied a publish")

    await async_wait_until(refuses, what="the restarted server to refuse its old channel")
    load, _ = await run_load_around(fleet, clients, lambda: asyncio.sleep(0))  # wait-ok: no action, load only
    await assert_everyone_got_everything(clients, load)


async def test_hung_channel_server_and_dead_charm_leader_together(fleet: Fleet, clients: list[Client]) -> None:
    """The CHARM leader dies (SIGKILL) while a channel server hangs (SIGSTOP:
    alive to the kernel, so only its lapsing Consul TTL gives it away, and
    ``rtm up`` does not restart it). The standby CHARM must take over and
    promote the spare."""
    from rtmctl.operator import fleet_client, leader_address

    general = fleet.channel("general")
    ring = channel_ring(fleet)
    slot, victim = ring.slot_for(general), ring.owner_for(general)
    consul = fleet_client(fleet.data_dir)
    leader = leader_address(consul)
    assert leader is not None
    hung = process_by_id(fleet, victim)

    async def kill_both() -> None:
        fleet.kill(process_by_id(fleet, leader["id"])["pid"])
        fleet.kill(hung["pid"], signal.SIGSTOP)
        await wait_ring_change(fleet, ring.version, slot, victim)

    try:
        load, _ = await run_load_around(fleet, clients, kill_both)
        await assert_everyone_got_everything(clients, load)
        new_leader = leader_address(consul)
        assert new_leader is not None
    finally:
        fleet.kill(hung["pid"])  # SIGKILL works on a stopped process; rtm up restarts it as a spare


async def test_partitioned_channel_server_stops_serving_its_old_channels(fleet: Fleet, clients: list[Client]) -> None:
    """Split brain: alive but cut off from Consul, a channel server loses its
    slot to a spare and must refuse its old channels, even from a stale AS."""
    general = fleet.channel("general")
    ring = channel_ring(fleet)
    slot, victim = ring.slot_for(general), ring.owner_for(general)
    proc = process_by_id(fleet, victim)
    fault_url = f"http://{proc['host']}:{proc['metrics_port']}/debug/consul-partition"
    # The fault endpoints require the operator token rtm up made (DATA_DIR/operator-token, 0600).
    operator = {OPERATOR_TOKEN_HEADER: (fleet.data_dir / "operator-token").read_text().strip()}
    async with aiohttp.ClientSession() as http:
        for headers in ({}, {OPERATOR_TOKEN_HEADER: "guess"}):  # without it: refused, nothing changes
            async with http.post(fault_url, params={"on": "1"}, headers=headers) as resp:
                assert (resp.status, await resp.json()) == (403, {"ok": False, "error": "forbidden"})
        async with http.get(f"http://{proc['host']}:{proc['metrics_port']}/healthz") as resp:
            assert not (await resp.json())["fenced"]

    async def partition_and_wait() -> None:
        async with aiohttp.ClientSession() as http:
            async with http.post(fault_url, params={"on": "1"}, headers=operator) as resp:
                assert resp.status == 200
        await wait_ring_change(fleet, ring.version, slot, victim)
        with pytest.raises(NotOwner):  # fenced: its lease lapsed, it may have lost the slot
            await pub_directly(fleet, proc["host"], proc["port"], general)

    load, _ = await run_load_around(fleet, clients, partition_and_wait)
    async with aiohttp.ClientSession() as http:
        async with http.post(fault_url, params={"on": "0"}, headers=operator) as resp:
            assert resp.status == 200

    async def healed_and_still_refusing() -> bool:
        with pytest.raises(NotOwner):  # it sees the new ring now: still not the owner
            await pub_directly(fleet, proc["host"], proc["port"], general)
        async with aiohttp.ClientSession() as http:
            async with http.get(f"http://{proc['host']}:{proc['metrics_port']}/healthz") as resp:
                health = await resp.json()
        return not health["fenced"] and health["ring_version"] >= channel_ring(fleet).version

    await async_wait_until(healed_and_still_refusing, timeout_s=FAILOVER_TIMEOUT_S, what="the partition to heal")
    await assert_everyone_got_everything(clients, load)


def rtm_cli(fleet: Fleet, *args: str) -> str:
    """Run an ``rtm`` operator command against this fleet; return its output."""
    import subprocess

    from rtmctl.launcher import rtm_argv

    done = subprocess.run(
        rtm_argv(*args, "--data-dir", str(fleet.data_dir)), capture_output=True, text=True, timeout=30, check=False
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


async def test_operator_adds_and_removes_a_slot_under_load(fleet: Fleet, clients: list[Client]) -> None:
    before = channel_ring(fleet)

    async def spare_exists() -> bool:
        status = rtm_cli(fleet, "status")
        return "role=spare" in status and "DEGRADED" not in status

    await async_wait_until(spare_exists, timeout_s=FAILOVER_TIMEOUT_S, what="a healthy spare")

    async def add_slot() -> None:
        out = await asyncio.to_thread(rtm_cli, fleet, "ring", "add-slot")
        assert f"v{before.version + 1}" in out

    load, _ = await run_load_around(fleet, clients, add_slot)
    added = channel_ring(fleet)
    assert len(added.doc.slots) == len(before.doc.slots) + 1
    new_slot = next(s for s in added.doc.slots if s not in before.doc.slots)
    await assert_everyone_got_everything(clients, load)

    async def remove_slot() -> None:
        await asyncio.to_thread(rtm_cli, fleet, "ring", "remove-slot", new_slot)

    load, _ = await run_load_around(fleet, clients, remove_slot)
    assert new_slot not in channel_ring(fleet).doc.slots
    await assert_everyone_got_everything(clients, load)
    assert "channel ring v" in rtm_cli(fleet, "ring", "show")
