"""Presence Server: who is online, for the users its ring slot maps to; pushes changes
only to the gateways that watch those users.

Wiring only: the model is :class:`presence.state.PresenceTable`; this module
connects it to msgpack sockets, the presence ring in Consul
(``rtm/ring/presence``, managed by CHARM like the channel ring), and metrics.

Every message is parsed into its :mod:`services.ops` record before it
touches the table: a bad request is answered ``err bad_request``, a bad push
dropped; both are counted (``rtm_errors_total{kind=bad_request|bad_push}``).

From gateways (every message carries ``gw``, the gateway's instance id; ``rv``
is the sender's presence ring version):

* ``lease`` request {gw, epoch?, rv?} -> ``{epoch, version, ttl_s}``: grant or
  renew the gateway's lease (:data:`presence.state.LEASE_TTL_S`); with
  ``epoch`` it starts a sync (the gateway re-reports everything next).
* ``online`` / ``offline`` push {gw, users, epoch}: the gateway's first
  connection of each user opened / its last one closed; ``online`` carries
  ``teams`` (each user's team; an older gateway leaves it out, counted in
  ``rtm_ps_online_without_team_total``).
* ``psub`` push {gw, users, epoch}: watch these users; answered with a
  ``presence`` push of their current state. ``punsub`` push {gw, users}.
* ``synced`` push {gw, epoch}: the sync is complete (see the state module).
* ``release`` request {gw}: the gateway is gone; drop its users now.
* ``query`` request {users} -> ``{presence: [[user, presence], ...], teams: [team|nil, ...],
  not_owner: [...]}``.

From the webapp:

* ``set_presence`` request {users: [[user, "auto"|"away"], ...]} -> ok
  (``users.setPresence``; the webapp re-sends every manual ``away`` when it
  connects, so a new server learns them).
* ``get_presence`` request {user} -> ``{presence, online, manual_away,
  last_activity}`` (``users.getPresence``).

Pushes to gateways: ``{"op": "presence", "changes": [[user, presence], ...], "teams":
[team|nil, ...]}`` (batched per event-loop turn, one frame per gateway; the teams let
the gateway show each user only to sessions of the user's team, docs/authz-review.md
finding 5), and ``{"op":
"not_owner", "users": [...], "version": v}`` for reports of users this server
does not own in its ring version; the gateway re-reads the ring and re-syncs.

Ownership and fencing are the channel server's: a user is served only if the
ring maps it here in our version, the peer's version is not newer, and our
Consul lease has not lapsed. A server that takes over a slot rebuilds for
:data:`REBUILD_GRACE_S` before it pushes anything (queries wait for it).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Coroutine
from typing import Any

from presence.state import LEASE_TTL_S, PresenceTable, Pushes, merge
from services import debug_faults, ops, wire
from services.config import Parser, service_parser
from services.connection import DEFAULT_MAX_SEND_BUFFER_BYTES, PeerConnection
from services.errors import ConnectionLost, ErrorCode, SendBufferFull
from services.identity import PRESENCE
from services.msgpack_service import SlotService
from services.process import run_main
from services.ring import PRESENCE_RING_KEY, RingDocument
from services.tasks import Tasks

log = logging.getLogger("rtm.presence")

SERVICE = PRESENCE
DEFAULT_PORT = 7500
# How often expired gateway leases are looked for: a dead gateway's users go
# away at most this long after its lease ends.
LEASE_SWEEP_INTERVAL_S = 0.25
# After taking over a slot, how long the new owner waits for the gateways and
# the webapp to re-report before it pushes changes. They see the same ring
# change within milliseconds (a Consul blocking query) and re-report at once;
# this covers a slow link (re)connect. Queries wait for it too.
REBUILD_GRACE_S = 1.5
PUSHES_SERVED: tuple[type[ops.Op], ...] = (
    ops.Online,
    ops.Offline,
    ops.PresenceSubscribe,
    ops.PresenceUnsubscribe,
    ops.Synced,
)
REQUESTS_SERVED: dict[str, type[ops.Op]] = {
    cls.OP: cls for cls in (ops.Lease, ops.Query, ops.GetPresence, ops.SetPresence, ops.Release, ops.Ping)
}
# Pushes go out at the end of the loop turn, but at most once per this interval
# per server: a lone change leaves at once, a storm in fewer, fuller frames.
PUSH_INTERVAL_S = 0.005
# Entries per ``presence`` frame: half the schema's MAX_PRESENCE_CHANGES, so that a frame of
# them with their teams (about 32 bytes an entry with rtm's 11-character ids) stays well under
# the 4 MiB frame limit. Only a rebuild or a re-sync pushes this many to one gateway.
MAX_PUSH_CHANGES = ops.MAX_PRESENCE_CHANGES // 2


class PresenceServer(SlotService):
    def __init__(self, args: Any) -> None:
        super().__init__(args, SERVICE, PRESENCE_RING_KEY, noun="presence server", metric_prefix="rtm_ps", log=log)
        self.table = PresenceTable(lease_ttl_s=args.lease_ttl_s)
        self.gateways: dict[str, PeerConnection] = {}  # gateway id -> its connection
        self.pending: dict[str, dict[str, str]] = {}  # gateway id -> user -> presence, flushed each loop turn
        self.flush_scheduled = False
        self.last_flush = 0.0
        self.rebuilt = asyncio.Event()
        self.rebuilt.set()
        self.rebuild_task: asyncio.Task[None] | None = None
        self.tasks = Tasks("presence server")
        m = self.metrics
        self.updates_in = m.counter("rtm_ps_updates_in_total", "Presence reports received, by kind", ["kind"])
        self.updates_out = m.counter("rtm_ps_updates_out_total", "Presence entries pushed to gateways")
        self.push_frames = m.counter("rtm_ps_push_frames_total", "presence frames written to gateways")
        self.changes = m.counter("rtm_ps_changes_total", "Changes of a user's effective presence")
        self.subscribes = m.counter("rtm_ps_subscribe_total", "Watch requests from gateways, by kind", ["kind"])
        self.queries = m.counter("rtm_ps_queries_total", "Users asked about, by who asked", ["source"])
        self.teamless = m.counter(
            "rtm_ps_online_without_team_total",
            "Users reported online without their team (a gateway older than the team field: shown to every team)",
        )
        self.not_owner = m.counter("rtm_ps_not_owner_total", "Users refused because they are not owned here", ["op"])
        self.lease_ops = m.counter(
            "rtm_ps_lease_events_total", "Gateway lease events: granted, renewed, synced, expired, released", ["event"]
        )
        self.slow_gateways = m.counter("rtm_ps_slow_gateway_disconnects_total", "Gateways cut off for not reading")
        m.gauge("rtm_ps_online_users", "Users online on at least one gateway").set_function(
            lambda: self.table.online_users
        )
        m.gauge("rtm_ps_users", "Users held (online, manually away, or seen)").set_function(
            lambda: len(self.table.users)
        )
        m.gauge("rtm_ps_watched_users", "Users watched by at least one gateway").set_function(
            lambda: len(self.table.watchers)
        )
        m.gauge("rtm_ps_subscriptions", "(user, gateway) watch pairs").set_function(lambda: self.table.subscriptions)
        m.gauge("rtm_ps_leases", "Gateway leases held").set_function(lambda: len(self.table.leases))
        m.gauge("rtm_ps_gateways", "Gateways connected").set_function(lambda: len(self.gateways))
        m.gauge("rtm_ps_rebuilding", "1 while a newly taken slot is being rebuilt from the gateways").set_function(
            lambda: 1 if self.table.rebuilding else 0
        )
        self.slot_gauges()

    # -- lifecycle: services/msgpack_service.py (SlotService) ---------------------------------
    async def starting(self) -> None:
        await super().starting()
        self.spawn(self.expire_loop())

    async def closing(self) -> None:
        await self.tasks.cancel_all()
        await super().closing()

    def spawn(self, coro: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
        return self.tasks.spawn(coro)

    def health(self) -> dict[str, Any]:
        return {
            "ring_version": self.follower.ring.version,
            "online_users": self.table.online_users,
            "watched_users": len(self.table.watchers),
            "leases": len(self.table.leases),
            "gateways": len(self.gateways),
            "consul": self.discovery.consul_ok,
            "role": self.slots.role,
            "rebuilding": self.table.rebuilding,
            "fenced": self.slots.is_fenced(),
        }

    async def expire_loop(self) -> None:
        while True:
            await asyncio.sleep(LEASE_SWEEP_INTERVAL_S)
            gone, pushes = self.table.expire()
            if gone:
                log.warning("gateway lease expired: %s; their users are offline", ", ".join(gone))
                self.lease_ops.labels("expired").inc(len(gone))
                self.push(pushes)

    # -- ownership (fencing and ring version: services.slot_owner) ------------------------
    def owned(self, users: list[str], peer_version: int) -> tuple[list[str], list[str]]:
        """Split ``users`` into (owned here, refused)."""
        if not self.slots.accepts(peer_version):
            return [], users
        owned: list[str] = []
        refused: list[str] = []
        for user in users:
            (owned if self.slots.is_mine(user) else refused).append(user)
        return owned, refused

    # -- pushes ------------------------------------------------------------------------------
    def push(self, pushes: Pushes) -> None:
        """Queue changes for their gateways; written at the end of the loop turn (at most
        every :data:`PUSH_INTERVAL_S`), one frame per gateway."""
        if not pushes:
            return
        merge(self.pending, pushes)
        if not self.flush_scheduled:
            self.flush_scheduled = True
            loop = asyncio.get_running_loop()
            wait_s = self.last_flush + PUSH_INTERVAL_S - loop.time()
            if wait_s > 0:
                loop.call_later(wait_s, self.flush)
            else:
                loop.call_soon(self.flush)

    def flush(self) -> None:
        self.flush_scheduled = False
        self.last_flush = asyncio.get_running_loop().time()
        pending, self.pending = self.pending, {}
        for gw, changes in pending.items():
            conn = self.gateways.get(gw)
            if conn is None:
                continue  # not connected: it re-syncs (and gets the state) when it is back
            team_of = self.table.team_of
            try:
                for batch in ops.batches(list(changes.items()), MAX_PUSH_CHANGES):
                    teams = [team_of(user) for user, _ in batch]
                    conn.send(ops.PresenceChanges(changes=batch, teams=teams).to_message())
            except (ConnectionLost, SendBufferFull):
                continue
            self.updates_out.inc(len(changes))
            self.push_frames.inc()

    def _count_changes(self, before: int) -> None:
        done = self.table.stats.changes - before
        if done:
            self.changes.inc(done)

    # -- connections ------------------------------------------------------------------------------
    def make_connection(self) -> PeerConnection:
        return self.peer_connection(
            f"{self.instance_id}<-peer",
            on_push=self.handle_push,
            on_close=self.on_connection_closed,
            max_send_buffer_bytes=self.args.max_gateway_buffer_bytes,
        )

    def on_connection_closed(self, conn: PeerConnection, reason: BaseException | None) -> None:
        gw = conn.state.get("gw")
        if gw is None or self.gateways.get(gw) is not conn:
            return
        del self.gateways[gw]
        if isinstance(reason, SendBufferFull):
            self.slow_gateways.inc()
        # Its users stay online until its lease expires: a gateway that lost
        # its link for a moment reconnects and re-syncs without a flap.
        log.info("gateway %s disconnected (%s); its lease runs on", gw, reason)

    def _gateway(self, conn: PeerConnection, gw: str) -> str:
        if conn.state.get("gw") != gw:
            previous = self.gateways.get(gw)
            if previous is not None and previous is not conn:
                previous.state.pop("gw", None)  # a reconnect (or a restarted gateway) replaced it
                previous.close()
            conn.state["gw"] = gw
            self.gateways[gw] = conn
        return gw

    def handle_push(self, conn: PeerConnection, msg: dict[str, Any]) -> None:
        """A push from a gateway: parsed first (a :class:`BadMessage` is dropped and counted by the connection)."""
        if msg["op"] not in {cls.OP for cls in PUSHES_SERVED}:
            self.metrics.error("unknown_op")
            log.debug("ignoring push %s from %s", str(msg["op"])[:40], conn.peer)
            return
        refusal = self.authz.check(conn.identity, msg)  # services/authz.py: the sender's role may send this?
        if refusal is not None:
            self.authz.refuse(refusal, None)
            return
        record = ops.parse(msg, PUSHES_SERVED)
        before = self.table.stats.changes
        if isinstance(record, ops.Online | ops.PresenceSubscribe):
            self.report_or_watch(conn, record)
        elif isinstance(record, ops.Offline):
            gw = self._gateway(conn, record.gw)
            self.updates_in.labels("offline").inc(len(record.users))
            self.push(self.table.offline(gw, record.users))
        elif isinstance(record, ops.PresenceUnsubscribe):
            gw = self._gateway(conn, record.gw)
            self.subscribes.labels("punsub").inc(len(record.users))
            self.table.unsubscribe(gw, record.users)
        elif isinstance(record, ops.Synced):
            gw = self._gateway(conn, record.gw)
            self.lease_ops.labels("synced").inc()
            self.push(self.table.synced(gw, record.epoch))
        self._count_changes(before)

    def report_or_watch(self, conn: PeerConnection, record: ops.Online | ops.PresenceSubscribe) -> None:
        gw = self._gateway(conn, record.gw)
        epoch = record.epoch or 0
        owned, refused = self.owned(record.users, record.rv or 0)
        if refused:
            self.not_owner.labels(record.OP).inc(len(refused))
            try:
                conn.send(ops.NotOwnerUsers(users=refused, version=self.follower.ring.version).to_message())
            except (ConnectionLost, SendBufferFull):
                pass
        if isinstance(record, ops.Online):
            self.updates_in.labels("online").inc(len(owned))
            if record.teams is None:
                self.teamless.inc(len(owned))
                teams = None
            else:
                teams = dict(zip(record.users, record.teams, strict=True))  # same length: ops checked it
            self.push(self.table.online(gw, owned, epoch, teams))
        else:
            self.subscribes.labels("psub").inc(len(owned))
            state = self.table.subscribe(gw, owned, epoch)
            if state:
                self.push({gw: state})

    def handle_request(self, conn: PeerConnection, msg: dict[str, Any]) -> Any:
        request_id = ops.request_id(msg)
        cls = REQUESTS_SERVED.get(msg["op"])
        if cls is None:
            self.metrics.error("unknown_op")
            return wire.reply_err(request_id, ErrorCode.UNKNOWN_OP, f"unknown op {str(msg['op'])[:40]!r}")
        refusal = self.authz.check(conn.identity, msg)  # services/authz.py: the sender's role may send this?
        if refusal is not None:
            return self.authz.refuse(refusal, request_id)
        record = ops.parse(msg, cls)  # BadMessage: the connection answers bad_request and counts it
        if isinstance(record, ops.Lease):
            return self.handle_lease(conn, request_id, record)
        if isinstance(record, ops.Query):
            return self.handle_query(request_id, record)
        if isinstance(record, ops.GetPresence):
            return self.handle_get_presence(request_id, record)
        if isinstance(record, ops.SetPresence):
            return self.handle_set_presence(request_id, record)
        if isinstance(record, ops.Release):
            gw = self._gateway(conn, record.gw)
            self.lease_ops.labels("released").inc()
            before = self.table.stats.changes
            self.push(self.table.release(gw))
            self._count_changes(before)
            return wire.reply_ok(request_id)
        return wire.reply_ok(request_id, version=self.follower.ring.version)  # ping

    def handle_lease(self, conn: PeerConnection, request_id: int, lease: ops.Lease) -> dict[str, Any]:
        gw = self._gateway(conn, lease.gw)
        if (lease.rv or 0) > self.follower.ring.version:
            self.spawn(self.slots.refresh_quietly())
        epoch = lease.epoch
        known = gw in self.table.leases
        before = self.table.stats.changes
        current, pushes = self.table.lease(gw, epoch)
        self._count_changes(before)
        self.push(pushes)
        self.lease_ops.labels("renewed" if known and epoch is None else "granted").inc()
        return wire.reply_ok(
            request_id, epoch=current, version=self.follower.ring.version, ttl_s=self.table.lease_ttl_s
        )

    async def handle_query(self, request_id: int, query: ops.Query) -> dict[str, Any]:
        await self.rebuilt.wait()
        owned, refused = self.owned(query.users, query.rv or 0)
        self.queries.labels("gateway").inc(len(owned))
        if refused:
            self.not_owner.labels("query").inc(len(refused))
        return wire.reply_ok(
            request_id,
            presence=self.table.query(owned),
            teams=[self.table.team_of(user) for user in owned],
            not_owner=refused,
            version=self.follower.ring.version,
        )

    async def handle_get_presence(self, request_id: int, get: ops.GetPresence) -> dict[str, Any]:
        user = get.user
        await self.rebuilt.wait()
        owned, _ = self.owned([user], get.rv or 0)
        if not owned:
            self.not_owner.labels("get_presence").inc()
            return wire.reply_err(request_id, ErrorCode.NOT_OWNER, user, version=self.follower.ring.version)
        self.queries.labels("webapp").inc()
        details = self.table.details(user)
        changed_at = details.pop("changed_at")
        # The table's clock is monotonic; Slack's last_activity is unix seconds.
        last = 0 if changed_at is None else int(time.time() - (time.monotonic() - float(changed_at)))  # type: ignore[arg-type]
        return wire.reply_ok(request_id, last_activity=last, **details)

    def handle_set_presence(self, request_id: int, set_presence: ops.SetPresence) -> dict[str, Any]:
        pairs = set_presence.users
        owned, refused = self.owned([u for u, _ in pairs], set_presence.rv or 0)
        mine = set(owned)
        before = self.table.stats.changes
        for user, manual in pairs:
            if user in mine:
                self.push(self.table.set_manual(user, manual))
        self._count_changes(before)
        self.updates_in.labels("manual").inc(len(mine))
        if refused:
            self.not_owner.labels("set_presence").inc(len(refused))
        return wire.reply_ok(request_id, not_owner=refused, version=self.follower.ring.version)

    # -- ring changes ------------------------------------------------------------------------------
    def on_ring_change(self, old: RingDocument, new: RingDocument) -> None:
        mine_before = set(old.slots_of(self.instance_id))
        mine = set(new.slots_of(self.instance_id))
        ring = self.follower.ring
        dropped = self.table.forget(lambda user: ring.owner_for(user) == self.instance_id)
        if dropped:
            log.info("presence ring v%s moved %d users away from %s", new.version, dropped, self.instance_id)
        if mine - mine_before:
            self.begin_rebuild(sorted(mine - mine_before))

    def begin_rebuild(self, slots: list[str]) -> None:
        log.warning("took over %s: rebuilding from the gateways for %.1fs", ", ".join(slots), REBUILD_GRACE_S)
        self.table.start_rebuild()
        self.rebuilt.clear()
        if self.rebuild_task is not None:
            self.rebuild_task.cancel()
        self.rebuild_task = self.spawn(self._end_rebuild())

    async def _end_rebuild(self) -> None:
        await asyncio.sleep(REBUILD_GRACE_S)
        self.push(self.table.end_rebuild())
        self.rebuilt.set()
        log.info("rebuild done: %d users online, %d watched", self.table.online_users, len(self.table.watchers))


def build_parser() -> Parser:
    parser = service_parser("rtm presence", "Run one Presence Server.", DEFAULT_PORT)
    parser.add("--role", "active", "registered role tag: active or spare")
    parser.add("--lease-ttl-s", LEASE_TTL_S, "seconds a gateway's users stay online after its last lease renewal")
    debug_faults.add_flags(parser)
    parser.add(
        "--max-gateway-buffer-bytes", DEFAULT_MAX_SEND_BUFFER_BYTES, "unsent bytes per gateway before it is cut off"
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    debug_faults.check_args(args)
    return run_main(args, "ps", PresenceServer)
