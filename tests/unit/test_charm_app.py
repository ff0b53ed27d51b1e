"""CHARM's ring keeper against a Consul stand-in: no value in KV stops it from reconciling."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from charm import app as charm_app
from charm.app import Charm, RingManager, build_parser
from services.discovery import Instance
from services.ring import CHANNEL_RING_KEY, RingDocument
from tests.support import DEFAULT_WAIT_S, FleetCA


class FakeKV:
    """The part of Discovery a RingManager uses: one KV key with CAS, and health answers."""

    def __init__(self, raw: bytes | None, instances: list[Instance]) -> None:
        self.raw = raw
        self.modify_index = 1
        self.instances = instances
        self.writes: list[RingDocument] = []
        self.fail_reads = 0

    async def key_modify_index(self, key: str) -> tuple[int, bytes | None]:
        if self.fail_reads:
            self.fail_reads -= 1
            raise OSError("consul unreachable")
        return self.modify_index, self.raw

    async def put_key(self, key: str, value: bytes, cas: int | None = None) -> bool:
        if cas != self.modify_index:
            return False
        self.raw = value
        self.modify_index += 1
        self.writes.append(RingDocument.from_json(value))
        return True

    async def healthy(self, service: str, index: int | None = None, wait_s: int | None = None) -> Any:
        if index is not None:
            await asyncio.sleep(3600)  # wait-ok: a blocking query with no change; cancelled at the end
        return 1, self.instances


def instance(iid: str, spare: bool = False) -> Instance:
    return Instance(iid, "channel-server", "127.0.0.1", 1, tags=(f"role={'spare' if spare else 'active'}",))


GOOD = RingDocument(version=4, slots={"cs-0": "cs-a", "cs-1": "cs-b"})


def manager(kv: FakeKV) -> RingManager:
    # No wire in this test (Consul is a fake, no probes, no server): plaintext flags, no certificates.
    charm = Charm(
        build_parser().parse_args(["--instance-id", "charm-test", "--consul", "127.0.0.1:1", "--wire-tls", "off"])
    )
    asyncio.get_running_loop().create_task(charm.discovery.client.close())  # never used: Consul is the fake
    charm.discovery = kv  # type: ignore[assignment]
    ring = charm.managers["channel"]
    assert ring.key == CHANNEL_RING_KEY
    ring.after_change = lambda: None  # type: ignore[method-assign]  # no TCP probes in a unit test
    return ring


def bad_kv(ring: RingManager) -> float:
    return float(ring.charm.metrics.errors.labels("bad_kv")._value.get())


async def wait_for(predicate: Any, what: str) -> None:
    for _ in range(int(DEFAULT_WAIT_S / 0.01)):
        if predicate():
            return
        await asyncio.sleep(0.01)  # wait-ok: bounded poll of the manager's progress
    raise AssertionError(f"timed out waiting for {what}")


@pytest.mark.parametrize("raw", [b"[]", b"null", b'{"version": Infinity}', b"{oops", b'{"version": 2, "slots": {}}'])
async def test_a_bad_ring_value_is_repaired_from_the_last_good_one_and_reconciling_goes_on(raw: bytes) -> None:
    kv = FakeKV(GOOD.to_json(), [instance("cs-a"), instance("cs-b"), instance("cs-c", spare=True)])
    ring = manager(kv)
    task = asyncio.create_task(ring.run())
    try:
        await wait_for(lambda: ring.reconciles >= 1, "the first reconcile")
        assert ring.doc == GOOD and kv.writes == []
        kv.raw = raw  # somebody writes garbage (or an old version) into the key
        kv.modify_index += 1
        ring.wake.set()
        await wait_for(lambda: kv.writes, "the repair")
        assert kv.writes[-1] == RingDocument(version=5, slots=GOOD.slots)
        assert bad_kv(ring) >= 1
        # The owner of cs-0 dies: the failover is still made, on the repaired ring.
        kv.instances = [instance("cs-b"), instance("cs-c", spare=True)]
        ring.healthy = kv.instances
        ring.wake.set()
        await wait_for(lambda: kv.writes[-1].slots.get("cs-0") == "cs-c", "the failover")
        assert kv.writes[-1].version == 6
        assert not task.done()
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def test_with_no_good_ring_known_a_bad_value_writes_nothing_and_reconciling_goes_on(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(charm_app, "RECONCILE_INTERVAL_S", 0.05)
    kv = FakeKV(b"[]", [instance("cs-a"), instance("cs-b")])
    ring = manager(kv)
    kv.fail_reads = 1  # and Consul fails once, too
    task = asyncio.create_task(ring.run())
    try:
        await wait_for(lambda: ring.reconciles >= 3, "reconciles to go on")
        assert kv.writes == [] and not task.done()
        assert bad_kv(ring) >= 1
        assert ring.charm.metrics.errors.labels("reconcile_failed")._value.get() >= 1
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def test_the_owner_probe_keeps_its_connection_alive_through_the_idle_timeout(
    monkeypatch: pytest.MonkeyPatch,
    fleet_ca: FleetCA,
) -> None:
    from services.connection import PeerConnection, PeerLimits, serve

    monkeypatch.setattr(charm_app, "KEEPALIVE_INTERVAL_S", 0.05)
    limits = PeerLimits(idle_timeout_s=0.3, keepalive_interval_s=0.05)
    accepted: list[PeerConnection] = []

    def factory() -> PeerConnection:
        accepted.append(PeerConnection(name="owner", limits=limits))
        return accepted[-1]

    server = await serve("127.0.0.1", 0, factory, trust=fleet_ca.trust("channel-server", "cs-a"))
    ring = manager(FakeKV(None, []))
    ring.charm.trust = fleet_ca.trust("charm", "charm-test")  # the probe is a TLS connection as this CHARM
    try:
        reader, writer = await ring.dial("127.0.0.1", server.sockets[0].getsockname()[1])
        held = asyncio.create_task(ring.hold_open(reader, writer))
        await asyncio.sleep(0.8)  # wait-ok: well past the owner's idle timeout
        assert not held.done() and accepted[0].is_open
        accepted[0].close()  # the owner goes away: the probe notices at once
        await asyncio.wait_for(held, DEFAULT_WAIT_S)
        writer.close()
    finally:
        server.close()
