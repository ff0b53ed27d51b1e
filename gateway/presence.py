"""A gateway's side of presence: report who is online here, watch what local clients look at.

Two parts, as elsewhere in rtm: :class:`gateway.presence_watches.PresenceWatches` is the model (sans
I/O: which local sessions watch which users, reference-counted; which users
have connections here; what each watched user's presence was last said to
be), and :class:`GatewayPresence` wires it to the presence servers.

What the gateway does (see docs/design.md, "Presence"):

* It follows the presence ring (``rtm/ring/presence``) and keeps one
  :class:`services.connection.PeerLink` per presence server (PS) in it, and
  holds a lease at each (renewed :data:`LEASE_RENEWALS_PER_TTL` times per TTL).
* A user's first connection on this gateway reports them ``online`` to the PS
  that owns them; their last one closing reports ``offline``. Reports are
  batched per PS (one flush per loop turn, at most every
  :data:`FLUSH_INTERVAL_S`).
* ``presence_sub`` replaces a session's watch set. The gateway subscribes
  (``psub``) at the owning PSs for the union of the users its sessions watch,
  once per user however many sessions watch them, and unsubscribes when the
  last watcher goes. A session is answered with ``presence_change`` for the
  users it added: at once when the gateway already knows their presence,
  else when the PS answers the ``psub``.
* Changes pushed by the PSs go only to the sessions that watch those users,
  in Slack's shape: ``{"type": "presence_change", "user": U, "presence": P}``,
  or ``{"type": "presence_change", "users": [...], "presence": P}`` when
  several of a session's users changed to the same presence at once.
* ``presence_query`` (at most :data:`MAX_QUERY_IDS` ids) is answered with
  ``presence_change`` from what the gateway knows, else from the PSs.
* Teams (docs/authz-review.md, finding 5): ``online`` reports carry each user's
  team (the session's, from its bootstrap); the PSs say each user's team beside
  its presence, and a session is told only of users of its own team: one of
  another team is answered ``away`` and never pushed
  (:mod:`gateway.presence_watches`; ``rtm_gw_presence_withheld_total``).
* Failover: when a link (re)connects, or the ring changes, the gateway
  re-syncs with that PS: a new lease epoch, every local online user it owns,
  every watched user it owns, then ``synced``. A new PS thus rebuilds within
  a moment, and clients see correct presence without reconnecting (the
  gateway forwards only what differs from what they last saw).
* A stopping gateway reports nobody offline: its clients are moving to
  another gateway, and its lease lapses in seconds anyway.

Why one module of about 500 lines: the batched reports and watches, the
links and the re-syncs share one lease epoch per presence server and one
queue of pending reports. A sync re-reports in its new epoch exactly what the
pending batches would have sent, and a flush sends in the current epoch of
the same link; split apart, each half would reach into the other's epochs
and queues. The sans-I/O model is already its own module
(:mod:`gateway.presence_watches`).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections import deque
from collections.abc import Coroutine
from typing import Any, Protocol

from gateway.presence_watches import PresenceWatches, WatchEffects, presence_events, shown
from gateway.state import GatewayState, Session, text_frame
from services.connection import PeerConnection, PeerLink
from services.directory import RingFollower, ServiceDirectory
from services.discovery import Discovery
from services.errors import BadMessage, ConnectionLost, PeerError, RequestTimeout, SendBufferFull
from services.identity import PRESENCE
from services.metrics import ServiceMetrics
from services.ops import NotOwnerUsers, PresenceChanges, parse, query_answer
from services.ring import PRESENCE_RING_KEY, RingDocument
from services.tls import WireTrust

log = logging.getLogger("rtm.gateway.presence")

PRESENCE_SERVICE = PRESENCE
MAX_QUERY_IDS = 500  # Slack's limit for presence_query
# presence_sub has no documented limit in Slack; this bounds what one client
# can make the gateway watch (a client shows far fewer users at once).
MAX_SUB_IDS = 5000
MAX_BATCH_USERS = 5000  # users per online/offline/psub frame (a re-sync sends several)
# Reports and watches go out at the end of the loop turn, but at most once per
# this interval: a lone change leaves at once, a storm in fewer, fuller frames.
FLUSH_INTERVAL_S = 0.005
# Sessions written presence_change per loop turn (~2-3 ms of work): a push for
# more waits for the next turns, so channel events interleave with it.
TELL_SLICE_SESSIONS = 256
LEASE_RENEWALS_PER_TTL = 4
DEFAULT_LEASE_TTL_S = 5.0  # until the first lease reply says otherwise
REQUEST_TIMEOUT_S = 5.0
# After a PS refuses users (not_owner), read the ring and re-sync after this:
# the PS or we may have acted on an older ring for a moment.
RESYNC_DELAY_S = 0.3
JSON_SEPARATORS = (",", ":")
# A session moved off a draining gateway reconnects elsewhere within a second
# or two; its offline report waits this long, so the PS sees it online there first.
MOVED_OFFLINE_DELAY_S = 5.0


class PresenceGateway(Protocol):
    """What :class:`GatewayPresence` uses of the gateway."""

    @property
    def instance_id(self) -> str: ...

    @property
    def discovery(self) -> Discovery: ...

    @property
    def metrics(self) -> ServiceMetrics: ...

    @property
    def state(self) -> GatewayState: ...

    @property
    def stopping(self) -> bool: ...

    @property
    def draining(self) -> bool: ...

    @property
    def trust(self) -> WireTrust: ...

    def spawn(self, coro: Coroutine[Any, Any, Any]) -> None: ...


class GatewayPresence:
    """The gateway's presence links, reports and subscriptions (owned by :class:`gateway.app.Gateway`)."""

    def __init__(self, gateway: PresenceGateway) -> None:
        self.gw = gateway
        self.gw_id = gateway.instance_id
        self.model = PresenceWatches()
        self.present: set[int] = set()  # sids of attached sessions
        self.follower = RingFollower(gateway.discovery, PRESENCE_RING_KEY, on_change=self.on_ring_change)
        self.servers = ServiceDirectory(gateway.discovery, PRESENCE_SERVICE)
        self.links: dict[str, PeerLink] = {}
        # Sync epochs are unique across restarts of a gateway (a restarted
        # gateway keeps its instance id, so its epochs must not repeat).
        self.epochs = itertools.count(time.time_ns())
        self.epoch_of: dict[str, int] = {}  # PS instance -> epoch of our current sync there
        self.syncing: dict[str, int] = {}  # PS instance -> syncs in progress there
        self.resyncing: set[str] = set()
        self.rerouting: set[str] = set()
        self.pending_report: dict[str, bool] = {}  # user -> online?
        self.pending_watch: dict[str, bool] = {}  # user -> watch?
        self.flush_scheduled = False
        self.last_flush = 0.0
        # presence_change writes waiting for their slice: (session, [(user, presence)], frame cache of its push)
        self.telling: deque[tuple[Session, list[tuple[str, str]], dict[Any, list[bytes]]]] = deque()
        self.tell_scheduled = False
        self.lease_ttl_s = DEFAULT_LEASE_TTL_S
        self.renew_task: asyncio.Task[None] | None = None
        m = gateway.metrics
        self.follower.on_bad_document = lambda exc: m.error("bad_kv")
        self.reports = m.counter("rtm_gw_presence_reports_total", "Users reported to presence servers", ["kind"])
        self.updates_in = m.counter("rtm_gw_presence_updates_in_total", "Presence entries pushed by presence servers")
        self.events_out = m.counter("rtm_gw_presence_events_out_total", "presence_change events written to clients")
        self.sub_ops = m.counter(
            "rtm_gw_presence_subscribe_total", "Users subscribed / unsubscribed at presence servers", ["kind"]
        )
        self.syncs = m.counter(
            "rtm_gw_presence_syncs_total", "Full re-syncs with a presence server, by reason", ["reason"]
        )
        self.renewals = m.counter("rtm_gw_presence_lease_renewals_total", "Lease renewals by outcome", ["outcome"])
        self.queries = m.counter(
            "rtm_gw_presence_queries_total", "presence_query ids, by where the answer came from", ["source"]
        )
        self.withheld = m.counter(
            "rtm_gw_presence_withheld_total",
            "Presence entries answered away to, or not pushed to, a session of another team than the user's",
        )
        m.gauge("rtm_gw_presence_watched_users", "Distinct users watched by this gateway's clients").set_function(
            lambda: len(self.model.watchers)
        )
        m.gauge("rtm_gw_presence_watches", "(session, user) watch pairs").set_function(
            lambda: sum(len(u) for u in self.model.watching.values())
        )
        m.gauge("rtm_gw_presence_online_users", "Users with a connection on this gateway").set_function(
            lambda: len(self.model.online)
        )
        m.gauge("rtm_gw_presence_ring_version", "Version of the presence ring this gateway acts on").set_function(
            lambda: self.follower.ring.version
        )

    # -- lifecycle ------------------------------------------------------------------------------
    def start(self) -> None:
        self.follower.start()
        self.servers.start()
        self.renew_task = asyncio.create_task(self.renew_loop(), name="presence-lease-renewals")

    async def close(self) -> None:
        if self.renew_task is not None:
            self.renew_task.cancel()
            await asyncio.gather(self.renew_task, return_exceptions=True)
        await asyncio.gather(*(link.close() for link in self.links.values()), return_exceptions=True)

    def health(self) -> dict[str, Any]:
        return {
            "presence_ring_version": self.follower.ring.version,
            "presence_links": sum(1 for link in self.links.values() if link.connected),
        }

    # -- hooks from the client listener (gateway/client_listener.py) ------------------------------------------------------------
    def attached(self, session: Session) -> None:
        self.present.add(session.sid)
        if self.model.connect(session.user, session.team):
            self.queue_report(session.user, True)

    def detached(self, session: Session) -> None:
        if session.sid not in self.present:
            return  # closed before it was attached
        self.present.discard(session.sid)
        self.queue_watch(self.model.drop(session))
        if not self.model.disconnect(session.user):
            return
        if self.gw.stopping:
            return  # its clients move to other gateways; our lease lapses in seconds
        if self.gw.draining:
            # Moved to another region: it is back there in a moment. Reporting
            # it offline later spares its watchers an away-and-back flap.
            asyncio.get_running_loop().call_later(MOVED_OFFLINE_DELAY_S, self._offline_if_gone, session.user)
            return
        self.queue_report(session.user, False)

    def _offline_if_gone(self, user: str) -> None:
        if user not in self.model.online:
            self.queue_report(user, False)

    # -- client frames (from gateway/client_messages.py) ------------------------------------------------
    def subscribe(self, session: Session, ids: list[str]) -> None:
        """``presence_sub``: replace the session's set; answer the users added."""
        before = self.model.withheld
        effects = self.model.replace(session, ids)
        self._count_withheld(before)
        self.queue_watch(effects)
        if effects.answer:
            self.tell({session: effects.answer})

    def _count_withheld(self, before: int) -> None:
        if self.model.withheld != before:
            self.withheld.inc(self.model.withheld - before)

    def query(self, session: Session, ids: list[str]) -> None:
        """``presence_query``: answer from what we know, ask the PSs for the rest
        (a user of another team than the session's is answered ``away``)."""
        before = self.model.withheld
        known = [(u, p) for u in ids if (p := self.model.presence_for(session, u)) is not None]
        self._count_withheld(before)
        unknown = [u for u in dict.fromkeys(ids) if u not in self.model.known]
        self.queries.labels("gateway").inc(len(known))
        if not unknown:
            self.tell({session: known})
            return
        self.gw.spawn(self._query(session, known, unknown))

    async def _query(self, session: Session, known: list[tuple[str, str]], unknown: list[str]) -> None:
        by_owner: dict[str, list[str]] = {}
        for user in unknown:
            owner = self.follower.ring.owner_for(user)
            if owner is not None:
                by_owner.setdefault(owner, []).append(user)
        replies = await asyncio.gather(
            *(
                self.link_to(owner).request(
                    {"op": "query", "users": users, "rv": self.follower.ring.version}, REQUEST_TIMEOUT_S
                )
                for owner, users in by_owner.items()
            ),
            return_exceptions=True,
        )
        answer = list(known)
        for reply in replies:
            if isinstance(reply, BaseException):
                log.info("presence_query: a presence server did not answer: %s", reply)
                self.queries.labels("failed").inc()
                continue
            try:
                found = query_answer(reply)
            except BadMessage as exc:
                log.warning("presence_query: a presence server's answer is out of shape: %s", exc)
                self.gw.metrics.error("ps_bad_reply")
                continue
            self.queries.labels("server").inc(len(found))
            for user, presence, team in found:
                told = shown(session.team, presence, team)
                if told != presence:
                    self.withheld.inc()
                answer.append((user, told))
        if answer and session.sid in self.gw.state.sessions:
            self.tell({session: answer})

    def tell(self, what: dict[Session, list[tuple[str, str]]]) -> None:
        """Write presence_change events, in order, at most :data:`TELL_SLICE_SESSIONS`
        sessions per loop turn: one push that concerns thousands of sessions (a storm,
        a re-sync) never holds message delivery up for more than a slice.
        Identical events of one push are encoded once."""
        frames: dict[tuple[tuple[str, str], ...], list[bytes]] = {}
        for session, items in what.items():
            self.telling.append((session, items, frames))
        if len(self.telling) <= TELL_SLICE_SESSIONS and not self.tell_scheduled:
            self._write_told()
        elif not self.tell_scheduled:
            self.tell_scheduled = True
            asyncio.get_running_loop().call_soon(self._write_told)

    def _write_told(self) -> None:
        self.tell_scheduled = False
        written = 0
        queue = self.telling
        for _ in range(min(len(queue), TELL_SLICE_SESSIONS)):
            session, items, frames = queue.popleft()
            key = tuple(items)
            encoded = frames.get(key)
            if encoded is None:
                encoded = frames[key] = [text_frame(e) for e in presence_events(items)]
            for frame in encoded:
                try:
                    ok = session.write(frame)
                except RuntimeError as exc:  # a socket half-closed under us: it is going anyway
                    log.debug("presence_change to sid %s not written: %s", session.sid, exc)
                    break
                if ok:
                    written += 1
        if written:
            self.events_out.inc(written)
        if queue and not self.tell_scheduled:
            self.tell_scheduled = True
            asyncio.get_running_loop().call_soon(self._write_told)

    # -- batching to the presence servers --------------------------------------------------------------
    def queue_report(self, user: str, online: bool) -> None:
        self.pending_report[user] = online
        self.schedule_flush()

    def queue_watch(self, effects: WatchEffects) -> None:
        for user in effects.unsubscribe:
            self.pending_watch[user] = False
        for user in effects.subscribe:
            self.pending_watch[user] = True
        if effects.subscribe or effects.unsubscribe:
            self.schedule_flush()

    def schedule_flush(self) -> None:
        """Flush at the end of this loop turn, or, if the last flush was less than
        :data:`FLUSH_INTERVAL_S` ago, when that interval is up: immediate when
        idle, and fewer, fuller batches under a storm of connects."""
        if self.flush_scheduled:
            return
        self.flush_scheduled = True
        loop = asyncio.get_running_loop()
        wait_s = self.last_flush + FLUSH_INTERVAL_S - loop.time()
        if wait_s > 0:
            loop.call_later(wait_s, self.flush)
        else:
            loop.call_soon(self.flush)

    def flush(self) -> None:
        """Send this turn's reports and watches, batched per PS. A PS whose link is
        down gets nothing now: the re-sync after its reconnect carries everything."""
        self.flush_scheduled = False
        self.last_flush = asyncio.get_running_loop().time()
        reports, self.pending_report = self.pending_report, {}
        watches, self.pending_watch = self.pending_watch, {}
        batches: dict[str, dict[str, list[str]]] = {}
        ring = self.follower.ring
        for user, online in reports.items():
            owner = ring.owner_for(user)
            if owner is not None:
                batches.setdefault(owner, {}).setdefault("online" if online else "offline", []).append(user)
        for user, watch in watches.items():
            owner = ring.owner_for(user)
            if owner is not None:
                batches.setdefault(owner, {}).setdefault("psub" if watch else "punsub", []).append(user)
        for owner, ops in batches.items():
            conn = self.link_to(owner).conn
            if conn is None or not conn.is_open:
                continue
            try:
                for op in ("offline", "punsub", "online", "psub"):
                    users = ops.get(op)
                    if users:
                        self._send_batches(conn, op, owner, users)
            except (ConnectionLost, SendBufferFull):
                continue  # the link reconnects and re-syncs
        for kind in ("online", "offline"):
            count = sum(1 for on in reports.values() if on == (kind == "online"))
            if count:
                self.reports.labels(kind).inc(count)
        for kind in ("psub", "punsub"):
            count = sum(1 for w in watches.values() if w == (kind == "psub"))
            if count:
                self.sub_ops.labels(kind).inc(count)

    def _send_batches(
        self, conn: PeerConnection, op: str, owner: str, users: list[str], epoch: int | None = None
    ) -> None:
        if epoch is None:
            epoch = self.epoch_of.get(owner, 0)
        rv = self.follower.ring.version
        teams = self.model.online_team
        for i in range(0, len(users), MAX_BATCH_USERS):
            batch = users[i : i + MAX_BATCH_USERS]
            message = {"op": op, "gw": self.gw_id, "users": batch, "epoch": epoch, "rv": rv}
            if op == "online":  # each user's team: the PS says it beside their presence (finding 5)
                message["teams"] = [teams.get(user) for user in batch]
            conn.send(message)

    # -- links and syncs ------------------------------------------------------------------------------------
    def link_to(self, owner: str) -> PeerLink:
        link = self.links.get(owner)
        if link is None:

            async def on_connected(conn: PeerConnection) -> None:
                await self.sync(owner, conn, "connect")

            link = PeerLink(
                f"{self.gw_id}->{owner}",
                address=lambda: self.servers.address(owner),
                factory=lambda: PeerConnection(
                    name=f"{self.gw_id}->{owner}",
                    on_push=self.on_push,
                    on_bad_message=lambda conn, exc, was_request: self.gw.metrics.error("bad_push"),
                ),
                on_connected=on_connected,
                trust=self.gw.trust,
                expect=PRESENCE_SERVICE,
            )
            link.start()
            self.links[owner] = link
        return link

    async def sync(self, owner: str, conn: PeerConnection, reason: str) -> None:
        """Re-report everything this PS owns in a new lease epoch (see presence/state.py).

        The lease request is awaited; everything after it is written without a
        pause, so no report can slip in between and be undone. Two syncs may
        overlap on one connection: the PS honours only the newest epoch's
        ``synced``, and the newest sync re-reports the latest state."""
        self.syncs.labels(reason).inc()
        epoch = next(self.epochs)
        self.epoch_of[owner] = epoch
        self.syncing[owner] = self.syncing.get(owner, 0) + 1
        try:
            reply = await conn.request(
                {"op": "lease", "gw": self.gw_id, "epoch": epoch, "rv": self.follower.ring.version}, REQUEST_TIMEOUT_S
            )
            self.lease_ttl_s = float(reply.get("ttl_s", self.lease_ttl_s))
            ring = self.follower.ring
            online = [u for u in self.model.online if ring.owner_for(u) == owner]
            watched = [u for u in self.model.watchers if ring.owner_for(u) == owner]
            if online:
                self._send_batches(conn, "online", owner, online, epoch)
            if watched:
                self._send_batches(conn, "psub", owner, watched, epoch)
            conn.send({"op": "synced", "gw": self.gw_id, "epoch": epoch})
            log.info("presence: synced with %s (%s): %d online, %d watched", owner, reason, len(online), len(watched))
        finally:
            left = self.syncing[owner] - 1
            if left:
                self.syncing[owner] = left
            else:
                del self.syncing[owner]

    async def resync(self, owner: str, reason: str) -> None:
        """Sync again over the current connection (ring change, lost lease, refusal);
        requests for one PS made while one runs are folded into it."""
        if owner in self.resyncing:
            return
        self.resyncing.add(owner)
        try:
            await asyncio.sleep(0)  # fold the requests of this loop turn into one
            link = self.links.get(owner)
            if link is None or not link.connected or link.conn is None:
                return  # the link's own (re)connect syncs
            await self.sync(owner, link.conn, reason)
        except (ConnectionLost, RequestTimeout, PeerError, SendBufferFull) as exc:
            log.info("presence: re-sync with %s failed (%s); the link re-syncs when it reconnects", owner, exc)
        finally:
            self.resyncing.discard(owner)

    async def renew_loop(self) -> None:
        while True:
            await asyncio.sleep(self.lease_ttl_s / LEASE_RENEWALS_PER_TTL)
            for owner, link in list(self.links.items()):
                if link.connected and owner not in self.syncing:
                    self.gw.spawn(self.renew(owner, link))

    async def renew(self, owner: str, link: PeerLink) -> None:
        epoch = self.epoch_of.get(owner)
        try:
            reply = await link.request({"op": "lease", "gw": self.gw_id}, REQUEST_TIMEOUT_S)
        except (ConnectionLost, RequestTimeout, PeerError) as exc:
            self.renewals.labels("failed").inc()
            log.debug("presence: lease renewal at %s failed: %s", owner, exc)
            return
        self.renewals.labels("ok").inc()
        if int(reply.get("epoch", 0)) != epoch and self.epoch_of.get(owner) == epoch and owner not in self.syncing:
            # The PS forgot us (our lease expired there, or it restarted): sync again.
            log.warning("presence: %s no longer holds our lease; re-syncing", owner)
            await self.resync(owner, "lease_lost")

    def on_push(self, conn: PeerConnection, msg: dict[str, Any]) -> None:
        """A push from a presence server, parsed first (services.ops; a bad one is dropped and counted)."""
        record = parse(msg, (PresenceChanges, NotOwnerUsers))
        if isinstance(record, PresenceChanges):
            changes = record.changes
            self.updates_in.inc(len(changes))
            before = self.model.withheld
            tell = self.model.apply(changes, record.teams)
            self._count_withheld(before)
            if tell:
                self.tell(tell)
        else:
            owner = next((o for o, link in self.links.items() if link.conn is conn), None)
            if owner is not None and owner not in self.rerouting:
                self.rerouting.add(owner)
                self.gw.spawn(self.reroute(owner))

    async def reroute(self, owner: str) -> None:
        """A PS refused users: one of us acts on an older ring. Read it, wait a moment, re-sync."""
        try:
            try:
                await self.follower.refresh()
            except Exception as exc:
                log.warning("presence ring refresh failed: %s", exc)
            await asyncio.sleep(RESYNC_DELAY_S)
            self.ensure_links()
            await self.resync(owner, "not_owner")
        finally:
            self.rerouting.discard(owner)

    def ensure_links(self) -> None:
        """A link to every PS in the ring; links to instances no longer in it are closed."""
        owners = {o for o in self.follower.ring.doc.slots.values() if o}
        for owner in owners:
            self.link_to(owner)
        for gone in [o for o in self.links if o not in owners]:
            link = self.links.pop(gone)
            self.epoch_of.pop(gone, None)
            self.gw.spawn(link.close())

    def on_ring_change(self, old: RingDocument, new: RingDocument) -> None:
        before = set(self.links)
        self.ensure_links()
        if set(old.slots) != set(new.slots):  # slots added or removed: users moved between live servers
            for owner in before & set(self.links):
                self.gw.spawn(self.resync(owner, "ring"))
