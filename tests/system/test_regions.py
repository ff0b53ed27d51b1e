"""Regions: drain a region under load, undrain it, SIGTERM a gateway under load,
and cut off a client that stops reading without slowing anyone else."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import websockets

from rtmctl.launcher import rtm_argv
from services.errors import CloseCode
from tests.support import DEFAULT_WAIT_S, async_wait_until
from tests.system.harness import REGIONS, Client, Fleet, Load

SLOW_CLIENT_BUFFER_BYTES = 256 * 1024
LOAD_DURING_MOVE_S = 2.0
CATCH_UP_TIMEOUT_S = 30.0
OTHERS_MAX_LAG_S = 5.0


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    data_dir: Path = tmp_path_factory.mktemp("regions")
    env = {"RTM_MAX_CLIENT_BUFFER_BYTES": str(SLOW_CLIENT_BUFFER_BYTES), "RTM_DRAIN_RATE_PER_S": "20"}
    handle = Fleet.up(data_dir, "--seed-users", "8", env=env)
    try:
        yield handle
    finally:
        handle.down()


@pytest.fixture
async def clients(fleet: Fleet) -> AsyncIterator[list[Client]]:
    """Clients in both regions that follow goodbye, as Slack's clients do."""
    names = ["alice", "bob", "carol", "dave", "eve"]
    opened = [await fleet.connect(name, region, follow_goodbye=True) for name in names for region in REGIONS]
    yield opened
    for client in opened:
        await client.close()


def rtm(fleet: Fleet, *args: str) -> str:
    done = subprocess.run(
        rtm_argv(*args, "--data-dir", str(fleet.data_dir)), capture_output=True, text=True, timeout=30
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def gateway_port_of(fleet: Fleet, region: str) -> int:
    fleet.reload()
    return int(next(p["port"] for p in fleet.processes("gateway") if p.get("region") == region))


async def post_during(fleet: Fleet, action: object, seconds: float = LOAD_DURING_MOVE_S) -> Load:
    load = Load(
        fleet,
        [fleet.user(n)["token"] for n in ("user0005", "user0006", "user0007")],
        [fleet.channel("general"), fleet.channel("random")],
    )
    task = asyncio.create_task(load.run())
    await action()  # type: ignore[operator]
    await asyncio.sleep(seconds)  # wait-ok: keep posting while clients move
    load.stop.set()
    await asyncio.wait_for(task, DEFAULT_WAIT_S)
    return load


async def assert_exactly_once_in_order(clients: list[Client], load: Load) -> None:
    assert not load.errors, load.errors[:3]
    for client in clients:
        for channel, texts in load.posted.items():
            await client.wait_for(
                lambda c, ch=channel, want=texts: set(want) <= set(c.texts(ch)),
                timeout_s=CATCH_UP_TIMEOUT_S,
                what=f"{len(texts)} posts in {channel}",
            )
            got = [t for t in client.texts(channel) if t.startswith("load-")]
            assert got == texts, f"{client.name}: {len(got)} received vs {len(texts)} posted, or out of order"


async def test_drain_moves_every_client_without_loss_and_undrain_brings_new_ones_home(
    fleet: Fleet, clients: list[Client]
) -> None:
    west = gateway_port_of(fleet, "eu-west")
    east = gateway_port_of(fleet, "us-east")
    assert any(c.gateway_port == west for c in clients)

    async def drain() -> None:
        await asyncio.to_thread(rtm, fleet, "drain", "eu-west")

    load = await post_during(fleet, drain)
    for client in clients:
        await client.wait_for(lambda c: c.gateway_port == east, timeout_s=CATCH_UP_TIMEOUT_S, what="move to us-east")
    await assert_exactly_once_in_order(clients, load)
    assert "role=draining" in rtm(fleet, "status")
    # A new client that asks for the drained region lands on the nearest good one.
    newcomer = await fleet.connect("user0005", "eu-west")
    assert newcomer.gateway_port == east
    await newcomer.close()

    await asyncio.to_thread(rtm, fleet, "undrain", "eu-west")

    async def home_again() -> bool:
        client = await fleet.connect("user0006", "eu-west")
        await client.close()
        return client.gateway_port == west

    await async_wait_until(home_again, what="new eu-west clients to land home after undrain")


async def test_sigterm_gateway_under_load_loses_nothing(fleet: Fleet, clients: list[Client]) -> None:
    fleet.reload()
    victim = next(p for p in fleet.processes("gateway") if p.get("region") == "us-east")
    on_victim = [c for c in clients if c.gateway_port == victim["port"]]
    assert on_victim

    async def terminate() -> None:
        fleet.kill(victim["pid"], signal.SIGTERM)

    load = await post_during(fleet, terminate)
    for client in on_victim:
        await client.wait_for(
            lambda c: len(c.urls) >= 2, timeout_s=CATCH_UP_TIMEOUT_S, what="a reconnect after goodbye"
        )
    await assert_exactly_once_in_order(clients, load)


async def test_client_that_stops_reading_is_cut_off_and_others_keep_up(fleet: Fleet, clients: list[Client]) -> None:
    reply = await fleet.api("rtm.connect", fleet.user("user0007")["token"], region="us-east")
    stalled = await websockets.connect(reply["url"], max_size=None)
    assert (await asyncio.wait_for(stalled.recv(), DEFAULT_WAIT_S)) == '{"type":"hello"}'
    stalled.transport.pause_reading()  # stop reading: the gateway's buffer for it grows
    big = "x" * 39_000
    general = fleet.channel("general")
    token = fleet.user("alice")["token"]
    started = time.monotonic()
    posted = []
    for i in range(150):  # ~6 MB towards the stalled client: past its buffer bound plus the kernel's
        text = f"flood-{i}-{big}"
        assert (await fleet.api("chat.postMessage", token, channel=general, text=text))["ok"]
        posted.append(text)
    last_posted_at = time.monotonic()
    for client in clients:  # everyone else receives everything, promptly, while one client is stuck
        await client.wait_texts(posted[-1:], general, timeout_s=CATCH_UP_TIMEOUT_S)
        assert [t for t in client.texts(general) if t.startswith("flood-")] == posted
    lag = time.monotonic() - last_posted_at
    # The stuck client must not hold the others back: the last post reached all of
    # them within a bound far below what waiting on the stuck one would cost
    # (it never reads), generous for a loaded CI machine.
    assert lag < OTHERS_MAX_LAG_S, f"others lagged {lag:.1f}s behind while one client was stuck"
    took = time.monotonic() - started
    stalled.transport.resume_reading()
    with pytest.raises(websockets.ConnectionClosed):
        while True:
            await asyncio.wait_for(stalled.recv(), DEFAULT_WAIT_S)
    assert stalled.close_code == CloseCode.SLOW_CONSUMER
    assert took < CATCH_UP_TIMEOUT_S
