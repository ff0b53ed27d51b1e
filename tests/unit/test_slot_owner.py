"""services.slot_owner: ownership on a peer's newer ring, without Consul (a fake discovery)."""

from __future__ import annotations

import asyncio
from typing import Any

from services.ring import CHANNEL_RING_KEY, RingDocument
from services.slot_owner import SlotOwner
from tests.support import async_wait_until


class SlowRingReads:
    """The ring document in Consul, read only when the test lets the reads finish."""

    def __init__(self, doc: RingDocument) -> None:
        self.doc = doc
        self.reads = 0
        self.release = asyncio.Event()

    def lease_lapsed(self, ttl_s: float) -> bool:
        return False

    async def retag(self, instance_id: str, tags: list[str]) -> None:
        pass

    async def get_key(self, key: str, index: int | None = None, wait_s: int | None = None) -> tuple[int, bytes | None]:
        self.reads += 1
        await self.release.wait()
        return 1, self.doc.to_json()


async def test_a_burst_on_a_newer_ring_reads_it_once() -> None:
    """A spare just promoted gets a whole ``pubs`` (and then the admin server's slow-lane retries)
    on a ring it has not read yet: each is refused, and the ring is re-read once, not once each
    (a Consul read and a task per publish, unbounded, on exactly the moment of a failover)."""
    consul = SlowRingReads(RingDocument(version=2, slots={"cs-0": "cs-b"}))
    owner = SlotOwner(consul, "cs-b", CHANNEL_RING_KEY, role="spare", ttl_s=10.0, on_change=lambda old, new: None)  # type: ignore[arg-type]
    owner.follower.apply(RingDocument(version=1, slots={"cs-0": "cs-a"}))
    assert not any(owner.owns("C1", peer_version=2) for _ in range(500))
    await asyncio.sleep(0)  # wait-ok: one turn, for the refresh task to start its read
    assert consul.reads == 1 and len(owner._tasks) == 1
    consul.release.set()
    await async_wait_until(lambda: _true(owner.ring_version == 2), what="the ring re-read")
    assert owner.owns("C1", peer_version=2)
    await async_wait_until(lambda: _true(len(owner._tasks) == 0), what="the refresh task to end")
    # A later, newer ring is read again (the flag is down once the read ended).
    consul.doc, consul.release = RingDocument(version=3, slots={"cs-0": "cs-b"}), asyncio.Event()
    assert not owner.owns("C1", peer_version=3)
    await asyncio.sleep(0)  # wait-ok: one turn, for the refresh task to start its read
    assert consul.reads == 2
    consul.release.set()
    await async_wait_until(lambda: _true(owner.ring_version == 3), what="the second re-read")
    await owner._tasks.cancel_all()


async def _true(value: Any) -> bool:
    return bool(value)
