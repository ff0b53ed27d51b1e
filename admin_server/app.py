"""Admin Server: stateless entry point from the webapp into the fleet.

For every ``pub`` it looks the channel up on the ring and forwards the event
to the Channel Server that owns it. On ``not_owner`` or a broken connection it
refreshes the ring and retries, with backoff, for at most
``--route-budget-s`` seconds; after that it answers ``unavailable`` and the
webapp's ordered hand-off retries. Forwarding keeps arrival order: a request
is written to the owner's connection before the next one is read, and while
one publish for a slot is retrying (the slot is failing over), the others of
that slot queue behind it, in order, in the slot's :class:`SlowLane`, instead
of racing it to the new owner (docs/publish-path.md, "Ordering on the slow path").
When the ring gives a slot to another owner while fast-path publishes of it are
in flight to the old one, the slot's later publishes wait behind a barrier in
its lane until those are answered, and the ones refused there are retried ahead
of them (docs/wire.md, "Publishes refused mid-stream": the ring barrier).

The common case has no task per publish (issue 17, docs/publish-path.md):
when the owner is known, its link is up and no publish of the slot is on the
slow path, :meth:`AdminServer.forward_now` writes the publish at once and the
webapp is answered from the reply's callback. Both sides' connections are
corked, so the publishes of one read leave in one write per channel server
and their ``ok``s in one write back to the webapp.

The webapp sends its events as ``pubs`` (many in one frame; docs/wire.md,
"Batched publishes"): :meth:`AdminServer.handle_pubs` forwards the events of
one ``pubs`` whose owner is live in one ``pubs`` per channel server, and
answers the webapp once, with a result per event, when the last is settled.
The rest (no live owner, no link yet, a slot on the slow path, ``not_owner``)
go on the slow path one by one, in order, as single ``pub``s do. A batch is
admitted whole under ``--max-pubs-in-flight`` (or whatever its size when nothing else is
in flight) or refused whole.

Why one module: the fast path (:meth:`AdminServer.forward_now`), the batch path and the
slow path share one ordering rule (the fast path steps aside while a slot has a slow
lane), one in-flight bound and one set of counters; apart, each would have to reach into
the others' state. The slow lane's bookkeeping, which needs none of it, is its own module
(:mod:`admin_server.slow_lane`).

Every ``pub`` is parsed into :class:`services.ops.Publish` first (a bad one
is answered ``err bad_request`` and counted, and forwards nothing). At most
``--max-pubs-in-flight`` publishes are being forwarded at once; one beyond
is answered ``err unavailable`` at once (counted in
``rtm_as_pubs_refused_total``), which the webapp's hand-off treats as
transient: it backs off and resends, in order.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable
from typing import Any

from admin_server.given_up import GIVEN_UP_HOLD_S, MAX_GIVEN_UP_CHANNELS, GivenUpChannels
from admin_server.slow_lane import SlowLane, Turn
from services import ops, wire
from services.config import Parser, service_parser
from services.connection import PeerConnection, PeerLink, backoff_delays
from services.directory import RingFollower, ServiceDirectory
from services.discovery import Instance
from services.errors import (
    BadMessage,
    ConnectionLost,
    ErrorCode,
    NotOwner,
    PeerError,
    RequestTimeout,
    SendBufferFull,
)
from services.identity import ADMIN_SERVER, CHANNEL_SERVER
from services.metrics import LATENCY_BUCKETS_S
from services.msgpack_service import MsgpackService
from services.process import run_main
from services.ring import RingDocument

log = logging.getLogger("rtm.admin_server")

SERVICE = ADMIN_SERVER
DEFAULT_PORT = 7000
ROUTE_BUDGET_S = 10.0  # how long one publish may wait for a live owner
FORWARD_TIMEOUT_S = 2.0  # one attempt at the owning channel server
# How long a ring barrier may hold a slot (docs/wire.md, "Publishes refused mid-stream"). The
# fast-path publishes it waits for were written before it with FORWARD_TIMEOUT_S each, so they
# are answered, lost or timed out (and retried ahead of it, in order) sooner; this bound only
# matters when it is set below --forward-timeout-s, trading order for latency at a ring change.
RING_BARRIER_S = 2 * FORWARD_TIMEOUT_S
# The largest --forward-timeout-s and --ring-barrier-s accepted: how long an unanswered publish
# (and, behind a barrier, its slot's later ones) may be held at most.
MAX_FORWARD_TIMEOUT_S = 60.0
MAX_RING_BARRIER_S = 60.0
# Publishes being forwarded at once (each is a task while it waits for its
# channel server). The webapp pipelines 256 per connection; this leaves room
# for several webapps and bounds the memory a flood of pubs can take.
MAX_PUBS_IN_FLIGHT = 4096


def held_back_detail(channel: str) -> str:
    """The error detail of a publish held back behind a given-up one (admin_server/given_up.py)."""
    return f"an earlier publish of {channel} was given up"


class AdminServer(MsgpackService):
    def __init__(self, args: Any) -> None:
        super().__init__(args, SERVICE)
        self.follower = RingFollower(self.discovery, on_change=self.on_ring_change)
        self.ring_changed = asyncio.Event()  # wakes publishes that wait for a slot's new owner
        self.channel_servers = ServiceDirectory(self.discovery, CHANNEL_SERVER, on_change=self.on_instances)
        self.links: dict[str, PeerLink] = {}
        # Slots with publishes on the slow path (tasks), each slot's in arrival order: later
        # publishes of the slot join them there, and none is written before the earlier ones.
        self.slow_lanes: dict[str, SlowLane] = {}
        # Fast-path publishes written and not yet answered, per slot: a slot whose owner changes
        # while some are in flight is held behind them (a barrier in its lane) until they are
        # answered, so none of its later publishes overtakes them at the new owner.
        self.fast_in_flight: dict[str, int] = {}
        self.forward_timeout_s: float = args.forward_timeout_s
        if args.ring_barrier_s < args.forward_timeout_s:  # allowed (docs/wire.md): order traded for latency
            log.warning(
                "--ring-barrier-s %g is below --forward-timeout-s %g: after a ring change, a slot's later "
                "publishes may overtake ones still in flight to its old owner",
                args.ring_barrier_s,
                args.forward_timeout_s,
            )
        # Channels with a publish given up: their later publishes are answered unavailable until it
        # is resent, so the webapp resends them all in order (admin_server/given_up.py)
        self.given_up_channels = GivenUpChannels(args.given_up_hold_s, args.max_given_up_channels)
        m = self.metrics
        self.follower.on_bad_document = lambda exc: self.metrics.error("bad_kv")
        self.forwarded = m.counter("rtm_as_events_forwarded_total", "Events forwarded to their channel server")
        self.retries = m.counter("rtm_as_forward_retries_total", "Forward attempts retried", ["reason"])
        self.given_up = m.counter("rtm_as_forward_unavailable_total", "Publishes answered unavailable after the budget")
        self.held_back = m.counter(
            "rtm_as_pubs_held_behind_given_up_total",
            "Publishes answered unavailable because an earlier one of their channel was given up",
        )
        self.latency = m.histogram("rtm_as_forward_seconds", "Time to forward one publish", LATENCY_BUCKETS_S)
        self.refused = m.counter(
            "rtm_as_pubs_refused_total", "Publishes answered unavailable because --max-pubs-in-flight were pending"
        )
        self.barriers = m.counter(
            "rtm_as_ring_barriers_total",
            "Slots held behind fast-path publishes in flight to a previous owner (or before a slow lane)",
        )
        self.barriers_expired = m.counter(
            "rtm_as_ring_barriers_expired_total", "Ring barriers released by --ring-barrier-s, not by the answers"
        )
        self.pubs_in_flight = 0
        # Looked up once: asyncio.get_running_loop() costs a getpid() system call per call (Python 3.11)
        self.loop = asyncio.get_event_loop()
        m.gauge("rtm_as_pubs_in_flight", "Publishes being forwarded now").set_function(lambda: self.pubs_in_flight)
        m.gauge("rtm_ring_version", "Version of the channel ring this process acts on").set_function(
            lambda: self.follower.ring.version
        )

    # -- lifecycle (services/msgpack_service.py: the order) --------------------------------
    async def starting(self) -> None:
        self.follower.start()
        self.channel_servers.start()

    async def closing(self) -> None:
        await asyncio.gather(*(link.close() for link in self.links.values()), return_exceptions=True)

    def health(self) -> dict[str, Any]:
        return {
            "ring_version": self.follower.ring.version,
            "channel_servers": sorted(self.channel_servers.instances),
            "consul": self.discovery.consul_ok,
        }

    def on_ring_change(self, old: RingDocument, new: RingDocument) -> None:
        """Wake the publishes waiting for an owner, and hold each slot that changed owner while
        fast-path publishes are in flight to the previous one (the ring barrier: docs/wire.md,
        "Publishes refused mid-stream"): its later publishes must not reach the new owner first."""
        for slot in self.fast_in_flight:
            if old.slots.get(slot) != new.slots.get(slot):
                self._hold(slot)
        self.ring_changed.set()
        self.ring_changed = asyncio.Event()

    # -- the ring barrier --------------------------------------------------------------------
    def _lane(self, slot: str) -> SlowLane:
        """``slot``'s slow lane, made if it has none; a new lane is held behind the slot's fast-path
        publishes in flight (they were written before it: nothing in it may overtake them)."""
        lane = self.slow_lanes.get(slot)
        if lane is None:
            lane = self.slow_lanes[slot] = SlowLane()
            if slot in self.fast_in_flight:
                self._hold_lane(slot, lane)
        return lane

    def _hold(self, slot: str) -> None:
        lane = self.slow_lanes.get(slot)
        if lane is None:
            self._lane(slot)  # held: the slot has fast-path publishes in flight
        elif lane.barrier is None:
            self._hold_lane(slot, lane)

    def _hold_lane(self, slot: str, lane: SlowLane) -> None:
        lane.hold()
        lane.barrier_timer = self.loop.call_later(self.args.ring_barrier_s, self._barrier_expired, slot, lane)
        self.barriers.inc()

    def _barrier_expired(self, slot: str, lane: SlowLane) -> None:
        """--ring-barrier-s passed before the fast-path publishes it waited for were all answered:
        the slot's later publishes go now (those still in flight, if retried, follow them)."""
        lane.barrier_timer = None
        if lane.barrier is None:
            return
        self.barriers_expired.inc()
        log.warning(
            "ring barrier of %s expired after %.1fs with %d fast-path publishes unanswered",
            slot,
            self.args.ring_barrier_s,
            self.fast_in_flight.get(slot, 0),
        )
        self._release(slot, lane)

    def _release(self, slot: str, lane: SlowLane) -> None:
        lane.release()
        if not lane and self.slow_lanes.get(slot) is lane:
            del self.slow_lanes[slot]

    def _fast_answered(self, slot: str) -> None:
        """A fast-path publish of ``slot`` was answered (its retry, if any, already joined the lane):
        the last one in flight releases the slot's barrier."""
        left = self.fast_in_flight[slot] - 1
        if left:
            self.fast_in_flight[slot] = left
            return
        del self.fast_in_flight[slot]
        lane = self.slow_lanes.get(slot)
        if lane is not None and lane.barrier is not None:
            self._release(slot, lane)

    def on_instances(self, instances: dict[str, Instance]) -> None:
        for gone in [iid for iid in self.links if iid not in instances]:
            asyncio.ensure_future(self.links.pop(gone).close())

    def link_to(self, cs_id: str) -> PeerLink:
        link = self.links.get(cs_id)
        if link is None:
            link = PeerLink(
                f"{self.instance_id}->{cs_id}",
                address=lambda: self.channel_servers.address(cs_id),
                factory=lambda: PeerConnection(name=f"{self.instance_id}->{cs_id}", coalesce_writes=True),
                trust=self.trust,
                expect=CHANNEL_SERVER,
            )
            link.start()
            self.links[cs_id] = link
        return link

    def make_connection(self) -> PeerConnection:
        return self.peer_connection(f"{self.instance_id}<-webapp", coalesce_writes=True)

    def handle_request(self, conn: PeerConnection, msg: dict[str, Any]) -> Any:
        request_id = ops.request_id(msg)
        op = msg["op"]
        refusal = self.authz.check(conn.identity, msg)  # services/authz.py: the sender's role may send this?
        if refusal is not None:
            return self.authz.refuse(refusal, request_id)
        if op == "ping":
            return wire.reply_ok(request_id, version=self.follower.ring.version)
        if op == "pubs":
            return self.handle_pubs(request_id, ops.parse_as(msg, ops.Publishes))
        if op != "pub":
            self.metrics.error("unknown_op")
            return wire.reply_err(request_id, ErrorCode.UNKNOWN_OP, f"unknown op {str(op)[:40]!r}")
        pub = ops.parse_as(msg, ops.Publish)  # BadMessage: the connection answers bad_request
        if self.given_up_channels.holds(pub.ch, pub.seq, time.monotonic()):
            return self._held_back(request_id, pub.ch)
        if self.pubs_in_flight >= self.args.max_pubs_in_flight:
            self.refused.inc()
            return wire.reply_err(
                request_id, ErrorCode.UNAVAILABLE, f"{self.pubs_in_flight} publishes in flight here; retry"
            )
        self.pubs_in_flight += 1  # counted now: several pubs of one read are all dispatched before any task runs
        fast = self.forward_now(request_id, pub)
        if fast is not None:
            return fast
        return self.forward(request_id, pub)

    # -- pubs: many events in one frame -----------------------------------------------------
    def handle_pubs(self, request_id: int, batch: ops.Publishes) -> dict[str, Any] | asyncio.Future[dict[str, Any]]:
        """Forward every event of ``batch``, in order; answer once, with a result per event.

        Admission is all or nothing: if the batch does not fit under
        ``--max-pubs-in-flight`` it is refused whole (``unavailable``, transient), so a
        resend never finds a later event of a channel applied before an earlier one; with
        nothing else in flight it is admitted whatever its size.
        A bad item is answered ``bad_request`` alone. The events whose owner is live
        go to it in one ``pubs`` per channel server (:meth:`_send_group`); the others,
        and any that a channel server answers ``not_owner``, take the slow path
        (:meth:`forward`), in order, exactly as single ``pub`` s do.
        """
        count = len(batch.evs)
        # With nothing else in flight a batch is admitted whatever its size (at most ops.MAX_PUBS_EVENTS):
        # under a bound below one batch, the webapp's resend of the same batch would be refused for ever.
        if self.pubs_in_flight and self.pubs_in_flight + count > self.args.max_pubs_in_flight:
            self.refused.inc(count)
            return wire.reply_err(
                request_id, ErrorCode.UNAVAILABLE, f"{self.pubs_in_flight} publishes in flight here; retry"
            )
        reply = _BatchReply(request_id, count, self.loop)
        given_up = self.given_up_channels
        now = time.monotonic()
        ring = self.follower.ring
        instances = self.channel_servers.instances
        slow_lanes = self.slow_lanes
        groups: dict[str, list[tuple[int, ops.Publish, str]]] = {}
        for index, item in enumerate(batch.evs):
            if isinstance(item, BadMessage):
                self.metrics.error("bad_request")
                reply.settle(index, ErrorCode.BAD_REQUEST, item.detail)
                continue
            if given_up.holds(item.ch, item.seq, now):
                self.held_back.inc()
                reply.settle(index, ErrorCode.UNAVAILABLE, held_back_detail(item.ch))
                continue
            self.pubs_in_flight += 1
            channel = item.ch
            slot = ring.slot_for(channel) or ""
            owner = None if slot in slow_lanes else ring.owner_for(channel)
            if owner is not None and owner in instances:
                group = groups.get(owner)
                if group is None:
                    group = groups[owner] = []
                group.append((index, item, slot))
                continue
            self._slow(reply, index, item)
        for owner, group in groups.items():
            self._send_group(reply, owner, group, ring.version)
        return reply.future

    def _held_back(self, request_id: int, channel: str) -> dict[str, Any]:
        """The answer to a publish held back behind a given-up one of its channel (counted)."""
        self.held_back.inc()
        return wire.reply_err(request_id, ErrorCode.UNAVAILABLE, held_back_detail(channel))

    def _give_up(self, record: ops.Publish, lane: SlowLane, turn: Turn) -> None:
        """``record`` is answered unavailable: so are the later ones of its channel, waiting in the
        lane or arriving until it is resent (admin_server/given_up.py)."""
        self.given_up.inc()
        lane.abandon_later(turn)
        self.given_up_channels.give_up(record.ch, record.seq, time.monotonic())

    def _slow(self, reply: _BatchReply, index: int, item: ops.Publish, retry: bool = False) -> None:
        """One event of a batch on the slow path (:meth:`forward`); its result settles ``index``.
        ``retry``: a fast-path attempt of it failed (it goes ahead of the slot's barrier)."""
        task = asyncio.ensure_future(self.forward(0, item, retry))
        task.add_done_callback(lambda done: reply.settle_from(index, done))

    def _send_group(self, reply: _BatchReply, owner: str, group: list[tuple[int, ops.Publish, str]], rv: int) -> None:
        """The events of one batch that ``owner`` serves, in one ``pubs`` to it."""
        link = self.links.get(owner)
        conn = link.conn if link is not None and link.connected else None
        future: asyncio.Future[dict[str, Any]] | None = None
        if conn is not None:
            message = {"op": "pubs", "evs": [ops.publish_item(item) for _, item, _ in group], "rv": rv}
            try:
                future = conn.begin_request(message, timeout_s=self.forward_timeout_s)
            except (ConnectionLost, SendBufferFull):
                future = None
        if future is None:  # no connection yet: the slow path connects, waits and retries
            for index, item, _ in group:
                self._slow(reply, index, item)
            return
        fast_in_flight = self.fast_in_flight
        for _, _, slot in group:
            fast_in_flight[slot] = fast_in_flight.get(slot, 0) + 1
        started = time.monotonic()
        future.add_done_callback(lambda done: self._group_answered(done, reply, owner, group, started))

    def _group_answered(
        self,
        done: asyncio.Future[dict[str, Any]],
        reply: _BatchReply,
        owner: str,
        group: list[tuple[int, ops.Publish, str]],
        started: float,
    ) -> None:
        """``owner`` answered a ``pubs``: settle each event, in order; ``not_owner`` ones
        (and all of them, if the request failed in transit) continue on the slow path, ahead
        of their slot's barrier; then the slots' fast-path counts drop (which may release it)."""
        try:
            self._settle_group(done, reply, owner, group, started)
        finally:
            for _, _, slot in group:
                self._fast_answered(slot)

    def _settle_group(
        self,
        done: asyncio.Future[dict[str, Any]],
        reply: _BatchReply,
        owner: str,
        group: list[tuple[int, ops.Publish, str]],
        started: float,
    ) -> None:
        exc = None if done.cancelled() else done.exception()
        if exc is not None or done.cancelled():
            if isinstance(exc, PeerError) and not isinstance(exc, NotOwner) and exc.code != ErrorCode.UNKNOWN_OP:
                self.metrics.error("cs_" + exc.code)
                for index, _, _ in group:
                    self.pubs_in_flight -= 1
                    reply.settle(index, exc.code, str(exc))
                return
            # Lost, timed out, refused for ownership, or a channel server that predates ``pubs``:
            # the slow path sends each one as a ``pub``, retrying within the route budget.
            self.retries.labels("not_owner" if isinstance(exc, NotOwner) else "unreachable").inc(len(group))
            for index, item, _ in group:
                self._slow(reply, index, item, retry=True)  # stays counted in pubs_in_flight; forward() uncounts it
            return
        answer = done.result()
        results = answer.get("res")
        if type(results) is not list or len(results) != len(group):
            self.metrics.error("cs_bad_reply")
            for index, _, _ in group:
                self.pubs_in_flight -= 1
                reply.settle(index, ErrorCode.INTERNAL, f"{owner} answered pubs without a result per event")
            return
        details = _details(answer)  # by position in the group's pubs, not in the webapp's batch
        elapsed = time.monotonic() - started
        ok = 0
        for position, ((index, item, _), result) in enumerate(zip(group, results, strict=True)):
            if result == ErrorCode.NOT_OWNER:
                self.retries.labels("not_owner").inc()
                self._slow(reply, index, item, retry=True)  # stays counted in pubs_in_flight; forward() uncounts it
                continue
            self.pubs_in_flight -= 1
            if result == ops.PUB_OK or result == ops.PUB_DUPLICATE:
                ok += 1
                reply.settle(index, result, "")
            else:
                code = str(result)[:100]
                self.metrics.error("cs_" + (code if code in _CS_CODES else "other"))
                reply.settle(index, code, details.get(position, ""))
        if ok:
            self.forwarded.inc(ok)
            self.latency.observe(elapsed)
        if log.isEnabledFor(logging.DEBUG):
            for _, item, _ in group:
                log.debug("forwarded %s to %s", item.eid, owner, extra={"eid": item.eid, "channel": item.ch})

    def forward_now(self, request_id: int, record: ops.Publish) -> asyncio.Future[dict[str, Any]] | None:
        """The common case, without a task: the owner is known and its link is up, so the
        publish is written to it now (in arrival order) and answered from the reply's
        callback. None when the slow path must take it: no live owner, no connection yet,
        or an earlier publish of the same slot still on the slow path (it must not be
        overtaken). A fast attempt that fails with ``not_owner`` or a lost connection
        continues on the slow path, with its retries and the route budget."""
        channel = record.ch
        ring = self.follower.ring
        slot = ring.slot_for(channel) or ""
        if slot in self.slow_lanes:
            return None
        owner = ring.owner_for(channel)
        if owner is None or owner not in self.channel_servers.instances:
            return None
        link = self.links.get(owner)
        conn = link.conn if link is not None and link.connected else None
        if conn is None:
            return None
        pub = record.to_message()
        pub["rv"] = ring.version
        try:
            reply = conn.begin_request(pub, timeout_s=self.forward_timeout_s)
        except (ConnectionLost, SendBufferFull):
            return None
        self.fast_in_flight[slot] = self.fast_in_flight.get(slot, 0) + 1
        started = time.monotonic()
        answer: asyncio.Future[dict[str, Any]] = self.loop.create_future()
        reply.add_done_callback(lambda done: self._forwarded(done, answer, request_id, record, owner, slot, started))
        return answer

    def _forwarded(
        self,
        done: asyncio.Future[dict[str, Any]],
        answer: asyncio.Future[dict[str, Any]],
        request_id: int,
        record: ops.Publish,
        owner: str,
        slot: str,
        started: float,
    ) -> None:
        """The owner answered a fast-path publish (see :meth:`forward_now`)."""
        exc = None if done.cancelled() else done.exception()
        if isinstance(exc, (NotOwner, ConnectionLost, RequestTimeout)) or done.cancelled():
            self.retries.labels("not_owner" if isinstance(exc, NotOwner) else "unreachable").inc()
            retry = asyncio.ensure_future(self.forward(request_id, record, True))  # uncounts it when done
            retry.add_done_callback(lambda task: _settle(answer, task))
            self._fast_answered(slot)  # after its retry took its place ahead of the barrier
            return
        self._fast_answered(slot)
        self.pubs_in_flight -= 1
        if isinstance(exc, PeerError):
            self.metrics.error("cs_" + exc.code)
            answer.set_result(wire.reply_err(request_id, exc.code, str(exc)))
            return
        if exc is not None:
            answer.set_exception(exc)
            return
        self.forwarded.inc()
        self.latency.observe(time.monotonic() - started)
        if log.isEnabledFor(logging.DEBUG):
            log.debug("forwarded %s to %s", record.eid, owner, extra={"eid": record.eid, "channel": record.ch})
        answer.set_result(wire.reply_ok(request_id, cs=owner, duplicate=bool(done.result().get("duplicate"))))

    @property
    def slow_slots(self) -> dict[str, int]:
        """How many publishes each slot has on the slow path (for tests and diagnostics); a slot
        held by a ring barrier with none is listed with 0."""
        return {slot: lane.publishes for slot, lane in self.slow_lanes.items()}

    def forward(self, request_id: int, record: ops.Publish, retry: bool = False) -> Awaitable[dict[str, Any]]:
        """Deliver one publish to the channel's owner, retrying within the budget
        (the caller counted it in :attr:`pubs_in_flight`; this uncounts it).
        From this call until it is answered, it holds its place in its slot's
        :class:`SlowLane`, and later publishes of the slot stay off the fast path,
        so none overtakes it. ``retry``: its fast-path attempt failed, so it takes its
        place ahead of the slot's barrier (the publishes behind it arrived after it)."""
        slot = self.follower.ring.slot_for(record.ch) or ""
        lane = self._lane(slot)
        turn = lane.join_ahead_of_barrier(record.ch) if retry else lane.join(record.ch)
        return self._forward_slow(request_id, record, slot, lane, turn)

    async def _forward_slow(
        self, request_id: int, record: ops.Publish, slot: str, lane: SlowLane, turn: Turn
    ) -> dict[str, Any]:
        try:
            return await self._forward(request_id, record, lane, turn)
        finally:
            self.pubs_in_flight -= 1
            lane.leave(turn)
            if not lane and self.slow_lanes.get(slot) is lane:
                del self.slow_lanes[slot]

    async def _forward(self, request_id: int, record: ops.Publish, lane: SlowLane, turn: Turn) -> dict[str, Any]:
        started = time.monotonic()
        deadline = started + self.args.route_budget_s
        channel = record.ch
        pub = record.to_message()
        delays = backoff_delays()
        while True:
            # Wait for this publish's turn in its slot's lane: every earlier one is on the
            # wire ahead of it or answered (and, for a retry, answered: one retry at a time).
            if turn.abandoned:
                return self._held_back(request_id, channel)
            if not await self._await_turn(lane, turn, deadline):
                return self._queued_too_long(request_id, record, lane, turn)
            if turn.abandoned:
                continue
            owner = self.follower.ring.owner_for(channel)
            reason = "no_owner"
            if owner is not None and turn.prev is not None and turn.prev.sent_to != owner:
                # The earlier ones (all on the wire) went to the previous owner: not past them (ring barrier)
                if not await self._await_wake(lane, turn, deadline):
                    return self._queued_too_long(request_id, record, lane, turn)
                continue
            if owner is not None and owner in self.channel_servers.instances:
                link = self.link_to(owner)
                remaining = max(0.05, min(self.forward_timeout_s, deadline - time.monotonic()))
                try:
                    if not link.connected or link.conn is None:
                        await link.wait_connected(remaining)
                        if not link.connected:  # ready, but its connection is closed (the link too, at exit)
                            raise ConnectionLost(f"link to {owner} is not connected")
                        continue  # others may have written meanwhile: take the turn again
                    pub["rv"] = self.follower.ring.version
                    reply_future = link.conn.begin_request(pub, timeout_s=remaining)
                    turn.sent_to = owner
                    lane.written(turn)  # on the wire: later ones of the slot may follow it
                    reply = await reply_future
                    lane.answered(turn)
                    self.forwarded.inc()
                    if log.isEnabledFor(logging.DEBUG):
                        log.debug(
                            "forwarded %s to %s", record.eid, owner, extra={"eid": record.eid, "channel": channel}
                        )
                    self.latency.observe(time.monotonic() - started)
                    return wire.reply_ok(request_id, cs=owner, duplicate=bool(reply.get("duplicate")))
                except NotOwner:
                    reason = "not_owner"
                except (ConnectionLost, RequestTimeout, SendBufferFull):
                    reason = "unreachable"
                except PeerError as exc:
                    self.metrics.error("cs_" + exc.code)
                    return wire.reply_err(request_id, exc.code, str(exc))
            lane.refused(turn)  # from now on it waits until every earlier one is answered
            self.retries.labels(reason).inc()
            if time.monotonic() >= deadline:
                self._give_up(record, lane, turn)
                log.warning("giving up on %s after %.1fs (%s)", record.eid or channel, self.args.route_budget_s, reason)
                return wire.reply_err(request_id, ErrorCode.UNAVAILABLE, f"no live owner for {channel}: {reason}")
            if not lane.is_head(turn):
                continue  # queue behind the earlier ones; the first of the lane backs off and retries
            await self._back_off(min(next(delays), max(0.0, deadline - time.monotonic())))

    def _queued_too_long(self, request_id: int, record: ops.Publish, lane: SlowLane, turn: Turn) -> dict[str, Any]:
        """The route budget of a publish waiting for its turn ran out: it is given up."""
        self._give_up(record, lane, turn)
        return wire.reply_err(
            request_id, ErrorCode.UNAVAILABLE, f"no live owner for {record.ch}: queued behind a retry"
        )

    @staticmethod
    async def _await_turn(lane: SlowLane, turn: Turn, deadline: float) -> bool:
        """Until every earlier publish of the slot is on the wire ahead of ``turn`` or answered
        (and, for a retry, answered: one retry at a time). False when ``deadline`` passed first."""
        while not lane.may_write(turn) and not turn.abandoned:
            if not await AdminServer._await_wake(lane, turn, deadline):
                return False
        return True

    @staticmethod
    async def _await_wake(lane: SlowLane, turn: Turn, deadline: float) -> bool:
        """Until the lane wakes ``turn`` (an earlier publish was answered or moved); False when
        ``deadline`` passed first."""
        try:
            await asyncio.wait_for(lane.wait(turn), max(0.0, deadline - time.monotonic()))
        except TimeoutError:
            return False
        return True

    async def _back_off(self, delay_s: float) -> None:
        """Re-read the ring, then wait ``delay_s``, or less if the ring names a new owner."""
        changed = self.ring_changed
        try:
            await self.follower.refresh()
        except Exception as exc:  # Consul unreachable: keep the old ring, try again
            log.debug("ring refresh failed: %s", exc)
        try:
            await asyncio.wait_for(changed.wait(), delay_s)
        except TimeoutError:
            pass


# Error codes a channel server answers for one event of a ``pubs``, used as metric labels
# (any other code is counted as "other": a peer must not mint label values).
_CS_CODES = frozenset({ErrorCode.BAD_REQUEST, ErrorCode.INTERNAL, ErrorCode.FORBIDDEN, ErrorCode.UNAVAILABLE})


def _details(answer: dict[str, Any]) -> dict[int, str]:
    """``det`` of a ``pubs`` reply (``[[index, detail], ...]``) as a map; anything malformed is skipped."""
    out: dict[int, str] = {}
    entries = answer.get("det")
    if type(entries) is list:
        for entry in entries:
            if type(entry) is list and len(entry) == 2 and type(entry[0]) is int:
                out[entry[0]] = str(entry[1])[:200]
    return out


class _BatchReply:
    """The one reply to a ``pubs``: a result per event, sent when the last one is settled."""

    __slots__ = ("request_id", "results", "details", "left", "future")

    def __init__(self, request_id: int, count: int, loop: asyncio.AbstractEventLoop) -> None:
        self.request_id = request_id
        self.results: list[str] = [ErrorCode.INTERNAL] * count
        self.details: list[tuple[int, str]] = []
        self.left = count
        self.future: asyncio.Future[dict[str, Any]] = loop.create_future()

    def settle(self, index: int, result: str, detail: str) -> None:
        self.results[index] = result
        if detail:
            self.details.append((index, detail))
        self.left -= 1
        if self.left == 0 and not self.future.done():
            reply = wire.reply_ok(self.request_id, res=self.results)
            if self.details:
                reply["det"] = self.details
            self.future.set_result(reply)

    def settle_from(self, index: int, task: asyncio.Future[dict[str, Any]]) -> None:
        """Settle ``index`` from the reply a slow-path :meth:`AdminServer.forward` made for it."""
        if task.cancelled():
            self.settle(index, ErrorCode.UNAVAILABLE, "cancelled")
            return
        exc = task.exception()
        if exc is not None:
            self.settle(index, ErrorCode.INTERNAL, f"{type(exc).__name__}: {exc}")
            return
        answer = task.result()
        if answer.get("op") == "ok":
            self.settle(index, ops.PUB_DUPLICATE if answer.get("duplicate") else ops.PUB_OK, "")
        else:
            self.settle(index, str(answer.get("code") or ErrorCode.INTERNAL), str(answer.get("detail") or ""))


def _settle(answer: asyncio.Future[dict[str, Any]], task: asyncio.Task[dict[str, Any]]) -> None:
    """Pass a slow-path task's outcome on to the future the connection waits on."""
    if answer.done():
        return
    if task.cancelled():
        answer.cancel()
    elif task.exception() is not None:
        answer.set_exception(task.exception())  # type: ignore[arg-type]
    else:
        answer.set_result(task.result())


def build_parser() -> Parser:
    parser = service_parser("rtm admin-server", "Run one Admin Server.", DEFAULT_PORT)
    parser.add("--route-budget-s", ROUTE_BUDGET_S, "seconds a publish may wait for a live channel owner")
    parser.add("--max-pubs-in-flight", MAX_PUBS_IN_FLIGHT, "publishes forwarded at once; beyond, err unavailable")
    parser.add(
        "--forward-timeout-s",
        FORWARD_TIMEOUT_S,
        "seconds one attempt at the owning channel server may take",
        above=0.0,
        at_most=MAX_FORWARD_TIMEOUT_S,
    )
    parser.add(
        "--ring-barrier-s",
        RING_BARRIER_S,
        "after a slot changes owner, how long its later publishes may wait at most for those in flight to the old one",
        above=0.0,
        at_most=MAX_RING_BARRIER_S,
    )
    parser.add(
        "--given-up-hold-s",
        GIVEN_UP_HOLD_S,
        "after a publish is given up, how long later ones of its channel are answered unavailable at most",
        above=0.0,
    )
    parser.add(
        "--max-given-up-channels", MAX_GIVEN_UP_CHANNELS, "channels held behind a given-up publish at once", above=0
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_main(args, "as", AdminServer)
