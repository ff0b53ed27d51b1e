"""Admin Server: stateless entry point from the webapp into the fleet.

For every ``pub`` it looks the channel up on the ring and forwards the event
to the Channel Server that owns it. On ``not_owner`` or a broken connection it
refreshes the ring and retries, with backoff, for at most
``--route-budget-s`` seconds; after that it answers ``unavailable`` and the
webapp's ordered hand-off retries. Forwarding keeps arrival order: a request
is written to the owner's connection before the next one is read, and while
one publish for a slot is retrying (the slot is failing over), the others of
that slot queue behind it, in order, instead of racing it to the new owner.

The common case has no task per publish (issue 17, docs/publish-path.md):
when the owner is known, its link is up and no publish of the slot is on the
slow path, :meth:`AdminServer.forward_now` writes the publish at once and the
webapp is answered from the reply's callback. Both sides' connections are
corked, so the publishes of one read leave in one write per channel server
and their ``ok``s in one write back to the webapp.

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

from services import ops, wire
from services.config import Parser, service_parser
from services.connection import PeerConnection, PeerLink, backoff_delays
from services.directory import RingFollower, ServiceDirectory
from services.discovery import Instance
from services.errors import ConnectionLost, ErrorCode, NotOwner, PeerError, RequestTimeout, SendBufferFull
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
# Publishes being forwarded at once (each is a task while it waits for its
# channel server). The webapp pipelines 256 per connection; this leaves room
# for several webapps and bounds the memory a flood of pubs can take.
MAX_PUBS_IN_FLIGHT = 4096


class AdminServer(MsgpackService):
    def __init__(self, args: Any) -> None:
        super().__init__(args, SERVICE)
        self.follower = RingFollower(self.discovery, on_change=self.on_ring_change)
        self.ring_changed = asyncio.Event()  # wakes publishes that wait for a slot's new owner
        self.channel_servers = ServiceDirectory(self.discovery, CHANNEL_SERVER, on_change=self.on_instances)
        self.links: dict[str, PeerLink] = {}
        # Slots whose owner is failing: later publishes for the slot wait here
        # (in arrival order) until the first one gets through or gives up.
        self.held_slots: dict[str, asyncio.Future[None]] = {}
        # Slots with publishes on the slow path (tasks): later ones of the slot join them there.
        self.slow_slots: dict[str, int] = {}
        m = self.metrics
        self.follower.on_bad_document = lambda exc: self.metrics.error("bad_kv")
        self.forwarded = m.counter("rtm_as_events_forwarded_total", "Events forwarded to their channel server")
        self.retries = m.counter("rtm_as_forward_retries_total", "Forward attempts retried", ["reason"])
        self.given_up = m.counter("rtm_as_forward_unavailable_total", "Publishes answered unavailable after the budget")
        self.latency = m.histogram("rtm_as_forward_seconds", "Time to forward one publish", LATENCY_BUCKETS_S)
        self.refused = m.counter(
            "rtm_as_pubs_refused_total", "Publishes answered unavailable because --max-pubs-in-flight were pending"
        )
        self.pubs_in_flight = 0
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
        self.ring_changed.set()
        self.ring_changed = asyncio.Event()

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
        if op != "pub":
            self.metrics.error("unknown_op")
            return wire.reply_err(request_id, ErrorCode.UNKNOWN_OP, f"unknown op {str(op)[:40]!r}")
        pub = ops.parse_as(msg, ops.Publish)  # BadMessage: the connection answers bad_request
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
        if slot in self.slow_slots:
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
            reply = conn.begin_request(pub, timeout_s=FORWARD_TIMEOUT_S)
        except (ConnectionLost, SendBufferFull):
            return None
        started = time.monotonic()
        answer: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        reply.add_done_callback(lambda done: self._forwarded(done, answer, request_id, record, owner, started))
        return answer

    def _forwarded(
        self,
        done: asyncio.Future[dict[str, Any]],
        answer: asyncio.Future[dict[str, Any]],
        request_id: int,
        record: ops.Publish,
        owner: str,
        started: float,
    ) -> None:
        """The owner answered a fast-path publish (see :meth:`forward_now`)."""
        exc = None if done.cancelled() else done.exception()
        if isinstance(exc, (NotOwner, ConnectionLost, RequestTimeout)) or done.cancelled():
            self.retries.labels("not_owner" if isinstance(exc, NotOwner) else "unreachable").inc()
            retry = asyncio.ensure_future(self.forward(request_id, record))  # uncounts it when done
            retry.add_done_callback(lambda task: _settle(answer, task))
            return
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

    def forward(self, request_id: int, record: ops.Publish) -> Awaitable[dict[str, Any]]:
        """Deliver one publish to the channel's owner, retrying within the budget
        (the caller counted it in :attr:`pubs_in_flight`; this uncounts it).
        From this call until it is answered, later publishes of its slot stay
        off the fast path, so none overtakes it."""
        slot = self.follower.ring.slot_for(record.ch) or ""
        self.slow_slots[slot] = self.slow_slots.get(slot, 0) + 1
        return self._forward_slow(request_id, record, slot)

    async def _forward_slow(self, request_id: int, record: ops.Publish, slot: str) -> dict[str, Any]:
        try:
            return await self._forward(request_id, record)
        finally:
            self.pubs_in_flight -= 1
            left = self.slow_slots[slot] - 1
            if left:
                self.slow_slots[slot] = left
            else:
                del self.slow_slots[slot]

    async def _forward(self, request_id: int, record: ops.Publish) -> dict[str, Any]:
        started = time.monotonic()
        deadline = started + self.args.route_budget_s
        channel = record.ch
        pub = record.to_message()
        slot = self.follower.ring.slot_for(channel) or ""
        delays = backoff_delays()
        retrying: asyncio.Future[None] | None = None
        try:
            while True:
                held = self.held_slots.get(slot)
                if held is not None and held is not retrying:
                    # The slot is failing over: queue behind the publish that is retrying.
                    # Waiters resume in the order they began to wait (arrival order, or the
                    # order of their refusals, which the owner answers in order), so they
                    # are written again in order: none overtakes another.
                    try:
                        await asyncio.wait_for(asyncio.shield(held), max(0.0, deadline - time.monotonic()))
                    except TimeoutError:
                        self.given_up.inc()
                        return wire.reply_err(
                            request_id, ErrorCode.UNAVAILABLE, f"no live owner for {channel}: held behind a retry"
                        )
                    continue
                owner = self.follower.ring.owner_for(channel)
                reason = "no_owner"
                if owner is not None and owner in self.channel_servers.instances:
                    try:
                        remaining = max(0.05, min(FORWARD_TIMEOUT_S, deadline - time.monotonic()))
                        pub["rv"] = self.follower.ring.version
                        reply = await self.link_to(owner).request(pub, timeout_s=remaining)
                        self.forwarded.inc()
                        if log.isEnabledFor(logging.DEBUG):
                            log.debug(
                                "forwarded %s to %s",
                                record.eid,
                                owner,
                                extra={"eid": record.eid, "channel": channel},
                            )
                        self.latency.observe(time.monotonic() - started)
                        return wire.reply_ok(request_id, cs=owner, duplicate=bool(reply.get("duplicate")))
                    except NotOwner:
                        reason = "not_owner"
                    except (ConnectionLost, RequestTimeout):
                        reason = "unreachable"
                    except PeerError as exc:
                        self.metrics.error("cs_" + exc.code)
                        return wire.reply_err(request_id, exc.code, str(exc))
                self.retries.labels(reason).inc()
                if retrying is None:
                    if slot in self.held_slots:
                        continue  # another publish of the slot is retrying: queue behind it
                    retrying = self.held_slots[slot] = asyncio.get_running_loop().create_future()
                if time.monotonic() >= deadline:
                    self.given_up.inc()
                    log.warning(
                        "giving up on %s after %.1fs (%s)", record.eid or channel, self.args.route_budget_s, reason
                    )
                    return wire.reply_err(request_id, ErrorCode.UNAVAILABLE, f"no live owner for {channel}: {reason}")
                changed = self.ring_changed
                try:
                    await self.follower.refresh()
                except Exception as exc:  # Consul unreachable: keep the old ring, try again
                    log.debug("ring refresh failed: %s", exc)
                try:  # back off, but go at once when the ring names a new owner
                    await asyncio.wait_for(changed.wait(), min(next(delays), max(0.0, deadline - time.monotonic())))
                except TimeoutError:
                    pass
        finally:
            if retrying is not None:  # release the publishes queued behind this one, in order
                del self.held_slots[slot]
                retrying.set_result(None)


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
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_main(args, "as", AdminServer)
