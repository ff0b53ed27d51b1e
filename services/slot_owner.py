"""What every process that serves ring slots shares: channel servers and presence servers.

A :class:`SlotOwner` follows one ring document, answers "is this key mine
right now?", keeps the process's ``role`` tag in Consul in step with the ring
(``active`` while it serves a slot, ``spare`` otherwise), and *fences* the
process when its Consul lease lapses: a server that could not pass its TTL
check for a whole TTL may already have lost its slot to a spare without
knowing, so it refuses every key until it reaches Consul again and has
re-read the ring. Peers send the ring version they act on (``rv``); a newer
one than ours makes us re-read the ring and refuse meanwhile.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Coroutine
from typing import Any

from services.directory import RingFollower
from services.discovery import Discovery
from services.ring import RingDocument
from services.tasks import Tasks

log = logging.getLogger("rtm.slot_owner")

RingCallback = Callable[[RingDocument, RingDocument], None]
RING_REFRESH_TIMEOUT_S = 1.0  # a request on a newer ring waits this long for our re-read of it


class SlotOwner:
    def __init__(
        self,
        discovery: Discovery,
        instance_id: str,
        ring_key: str,
        *,
        role: str,
        ttl_s: float,
        on_change: RingCallback,
    ) -> None:
        self.discovery = discovery
        self.instance_id = instance_id
        self.ttl_s = ttl_s
        self.role = role  # the tag we want registered; follows the ring once it lists us
        self.registered_role = role
        self.fenced = False
        self.on_change = on_change
        self.follower = RingFollower(discovery, ring_key, on_change=self._ring_changed)
        self._tasks = Tasks("slot owner")
        # A re-read of the ring that :meth:`accepts` started is running: a burst of requests on a
        # newer ring (every pub of a batch, every retry of the admin server's slow lane) asks once.
        self._refreshing = False

    @property
    def ring_version(self) -> int:
        return self.follower.ring.version

    def start(self) -> None:
        self.discovery.on_lease_restored = self.on_lease_restored
        self.follower.start()

    # -- ownership ---------------------------------------------------------------------
    def accepts(self, peer_version: int = 0) -> bool:
        """False while fenced, or while a peer acts on a newer ring than ours (we re-read it)."""
        if peer_version > self.follower.ring.version:
            if not self._refreshing:  # one re-read at a time, however many requests ask meanwhile
                self._refreshing = True
                self._spawn(self._refresh_for_peer())
            return False
        return not self.is_fenced()

    def is_mine(self, key: str) -> bool:
        return self.follower.ring.owner_for(key) == self.instance_id

    def owns(self, key: str, peer_version: int = 0) -> bool:
        """``key`` is ours in our ring version, that version is not older than the
        peer's, and our lease is intact."""
        return self.accepts(peer_version) and self.is_mine(key)

    def is_fenced(self) -> bool:
        if self.discovery.lease_lapsed(self.ttl_s):
            if not self.fenced:
                log.error("Consul lease lapsed: refusing every key until the ring is re-read")
                self.fenced = True
        return self.fenced

    async def on_lease_restored(self) -> None:
        try:
            await self.follower.refresh()
        except Exception as exc:
            log.warning("ring refresh after the lease came back failed: %s", exc)
            return
        if self.fenced:
            log.warning("Consul lease restored and ring v%s re-read: serving again", self.follower.ring.version)
        self.fenced = False
        if self.registered_role != self.role:
            await self.retag()

    async def read_newer_ring(self, peer_version: int, timeout_s: float = RING_REFRESH_TIMEOUT_S) -> None:
        """A peer acts on a newer ring than ours: re-read it now, waiting at most ``timeout_s``
        (then the request is judged on the ring we have, and refused as :meth:`accepts` says)."""
        if peer_version <= self.follower.ring.version:
            return
        try:
            await asyncio.wait_for(self.refresh_quietly(), timeout_s)
        except TimeoutError:
            pass

    async def _refresh_for_peer(self) -> None:
        """:meth:`accepts`' re-read of the ring (a publish or sub on a newer one)."""
        try:
            await self.refresh_quietly()
        finally:
            self._refreshing = False

    async def refresh_quietly(self) -> None:
        try:
            await self.follower.refresh()
        except Exception as exc:
            log.debug("ring refresh failed: %s", exc)

    async def register(self, service: str, address: str, port: int, metrics_port: int) -> dict[str, Any]:
        """Register this server in Consul under its role tag, with its TTL check; return its ready info."""
        await self.discovery.register(
            service,
            self.instance_id,
            address,
            port,
            tags=[f"role={self.role}"],
            meta={"metrics_port": str(metrics_port)},
            ttl_s=self.ttl_s,
        )
        return {"service": service, "id": self.instance_id, "host": address, "port": port, "metrics_port": metrics_port}

    # -- role ------------------------------------------------------------------------------
    def _ring_changed(self, old: RingDocument, new: RingDocument) -> None:
        role = "active" if new.slots_of(self.instance_id) else "spare"
        if role != self.role:
            log.warning("ring v%s: now %s (slots %s)", new.version, role, new.slots_of(self.instance_id) or "none")
            self.role = role
            self._spawn(self.retag())
        self.on_change(old, new)

    async def retag(self) -> None:
        role = self.role
        try:
            await self.discovery.retag(self.instance_id, [f"role={role}"])
            self.registered_role = role
        except Exception as exc:  # retried when the Consul lease comes back
            log.warning("re-registering as %s failed: %s", role, exc)

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        self._tasks.spawn(coro)
