"""The webapp's link to the presence servers: ``users.getPresence`` and ``users.setPresence``.

The webapp follows the presence ring (``rtm/ring/presence``) like a gateway
and keeps one :class:`services.connection.PeerLink` per presence server (PS)
in it. ``users.getPresence`` asks the PS that owns the user
(``get_presence``); ``users.setPresence`` persists the manual presence in
SQLite first (it is durable there) and then tells the owning PS
(``set_presence``).

A PS holds manual presence only in memory, so whenever a link (re)connects
— a new PS took a slot, or one restarted — the webapp re-sends every user set
``away`` whom that PS owns. With the gateways' re-sync, that is the whole of
a new PS's state.

When no PS can answer (none in the ring, or the owner's link is down, for
example in the seconds before CHARM promotes a spare), :meth:`get` returns
None and the API falls back to the webapp's own estimate (see
``users.getPresence`` in :mod:`webapp_stub.api`).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Coroutine
from typing import Any

from services.connection import PeerConnection, PeerLink
from services.directory import RingFollower, ServiceDirectory
from services.errors import ConnectionLost, NotOwner, PeerError, RequestTimeout
from services.identity import PRESENCE
from services.ring import PRESENCE_RING_KEY, RingDocument
from services.tasks import Tasks
from services.tls import WireTrust

log = logging.getLogger("rtm.webapp.presence")

PRESENCE_SERVICE = PRESENCE
# A PS that just took over a slot answers after its rebuild grace (1.5 s);
# past this the API answers from the webapp's estimate instead.
REQUEST_TIMEOUT_S = 2.5
MAX_BATCH_USERS = 5000
# After a not_owner (the PS or we acted on an older ring for a moment), ask again after this.
NOT_OWNER_RETRY_S = 0.3
MANUAL_RESEND_ATTEMPTS = 10


class PresenceClient:
    def __init__(self, discovery: Any, away_users: Callable[[], list[str]], trust: WireTrust) -> None:
        self.trust = trust
        self.follower = RingFollower(discovery, PRESENCE_RING_KEY, on_change=self.on_ring_change)
        self.servers = ServiceDirectory(discovery, PRESENCE_SERVICE)
        self.away_users = away_users  # every user whose manual presence is away (from the store)
        self.links: dict[str, PeerLink] = {}
        self.tasks = Tasks("webapp presence client")

    def start(self) -> None:
        self.follower.start()
        self.servers.start()

    async def close(self) -> None:
        await asyncio.gather(
            self.tasks.cancel_all(), *(link.close() for link in self.links.values()), return_exceptions=True
        )

    @property
    def available(self) -> bool:
        return bool(self.follower.ring.doc.slots)

    # -- requests ------------------------------------------------------------------------------
    async def _request(self, user: str, message: dict[str, Any]) -> dict[str, Any] | None:
        """Ask the owner of ``user``; on ``not_owner`` (one of us is behind the ring)
        read the ring, wait a moment and ask once more. None when nobody answers."""
        for attempt in range(2):
            owner = self.follower.ring.owner_for(user)
            if owner is None:
                return None
            try:
                reply = await self.link_to(owner).request(
                    {**message, "rv": self.follower.ring.version}, REQUEST_TIMEOUT_S
                )
                if user not in reply.get("not_owner", ()):
                    return reply
            except NotOwner:
                pass
            except (ConnectionLost, RequestTimeout, PeerError) as exc:
                log.info("presence server %s did not answer %s: %s", owner, message.get("op"), exc)
                return None
            if attempt == 0:
                await self._refresh()
                await asyncio.sleep(NOT_OWNER_RETRY_S)
        return None

    async def get(self, user: str) -> dict[str, Any] | None:
        """``{presence, online, manual_away, last_activity}`` from the owning PS, or None."""
        return await self._request(user, {"op": "get_presence", "user": user})

    async def set_manual(self, user: str, manual: str) -> bool:
        """Tell the owning PS; False when it could not be told now (it learns it on the next re-send)."""
        return await self._request(user, {"op": "set_presence", "users": [[user, manual]]}) is not None

    async def _refresh(self) -> None:
        try:
            await self.follower.refresh()
        except Exception as exc:
            log.debug("presence ring refresh failed: %s", exc)

    # -- links ------------------------------------------------------------------------------------
    def link_to(self, owner: str) -> PeerLink:
        link = self.links.get(owner)
        if link is None:

            async def on_connected(conn: PeerConnection) -> None:
                if await self.send_manual(owner, conn):
                    self._spawn(self._resend(owner))  # it is not serving that slot yet: again, shortly

            link = PeerLink(
                f"webapp->{owner}",
                address=lambda: self.servers.address(owner),
                factory=lambda: PeerConnection(name=f"webapp->{owner}"),
                on_connected=on_connected,
                trust=self.trust,
                expect=PRESENCE,
            )
            link.start()
            self.links[owner] = link
        return link

    async def send_manual(self, owner: str, conn: PeerConnection) -> list[str]:
        """Every manual ``away`` this PS owns (it may have just started empty); returns
        the users it refused (it has not seen the ring that gives it their slot yet)."""
        ring = self.follower.ring
        away = [u for u in self.away_users() if ring.owner_for(u) == owner]
        refused: list[str] = []
        for i in range(0, len(away), MAX_BATCH_USERS):
            batch = [[u, "away"] for u in away[i : i + MAX_BATCH_USERS]]
            reply = await conn.request({"op": "set_presence", "users": batch, "rv": ring.version}, REQUEST_TIMEOUT_S)
            refused += [str(u) for u in reply.get("not_owner", ())]
        if away:
            log.info("told presence server %s of %d users set away (%d refused)", owner, len(away), len(refused))
        return refused

    def on_ring_change(self, old: RingDocument, new: RingDocument) -> None:
        owners = {o for o in new.slots.values() if o}
        existing = set(self.links)
        for owner in owners:
            self.link_to(owner)  # a new owner gets the manual aways when its link connects
        for gone in [o for o in self.links if o not in owners]:
            self._spawn(self.links.pop(gone).close())
        if set(old.slots) != set(new.slots):  # slots added or removed: users moved between live servers
            for owner in existing & owners:
                self._spawn(self._resend(owner))

    async def _resend(self, owner: str) -> None:
        for _ in range(MANUAL_RESEND_ATTEMPTS):
            await asyncio.sleep(NOT_OWNER_RETRY_S)
            link = self.links.get(owner)
            if link is None or link.conn is None or not link.connected:
                return  # gone, or reconnecting: its on_connected sends them
            try:
                if not await self.send_manual(owner, link.conn):
                    return
            except (ConnectionLost, RequestTimeout, PeerError) as exc:
                log.info("re-sending manual presence to %s failed: %s", owner, exc)
                return
            await self._refresh()

    def _spawn(self, coro: Coroutine[Any, Any, Any]) -> None:
        self.tasks.spawn(coro)
