"""The gateway's links to the channel servers and its subscriptions there.

One :class:`services.connection.PeerLink` per channel server the ring names;
the bookkeeping of which channel must be subscribed where, and how far that
got, is :class:`gateway.subscriptions.Subscriptions` (sans I/O). This unit
sends its batched ``sub``/``unsub`` (one flush per server per loop turn),
reports each outcome back to it, requeues failures on a timer, reroutes
channels a server refused or moved, follows ring changes, and every
``--reconcile-interval-s`` asks each server where our channels stand
(``seqs``) to repair differences. Events pushed over the links are handed to
:class:`gateway.state.GatewayState` for fan-out; gaps go to
:class:`gateway.history.History`.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Callable
from typing import Any

from prometheus_client import Counter

from gateway.client_socket import Cork
from gateway.history import FETCH_RETRY_DELAY_S, History, Spawn
from gateway.state import Effects, GatewayState
from gateway.subscriptions import Batch, Phase, Subscriptions
from services import ops
from services.connection import PeerConnection, PeerLink
from services.directory import RingFollower, ServiceDirectory
from services.discovery import Discovery, Instance
from services.errors import ConnectionLost, ErrorCode, NotOwner, PeerError, RequestTimeout, SendBufferFull
from services.identity import CHANNEL_SERVER
from services.metrics import LATENCY_BUCKETS_S, ServiceMetrics
from services.ring import RingDocument
from services.tls import WireTrust

log = logging.getLogger("rtm.gateway")

SUBSCRIBE_TIMEOUT_S = 5.0
# How often each channel server is asked where our confirmed channels stand (``seqs``).
# A lost subscription or event is repaired within this; each audit costs one small
# request per RECONCILE_BATCH_CHANNELS channels per server.
RECONCILE_INTERVAL_S = 30.0
RECONCILE_BATCH_CHANNELS = 5000  # channels per seqs request (a channel server takes up to 10,000)


class ChannelLinks:
    """Links to channel servers, batched subscriptions, reroutes, ring changes, reconciliation."""

    def __init__(
        self,
        *,
        instance_id: str,
        discovery: Discovery,
        state: GatewayState,
        history: History,
        metrics: ServiceMetrics,
        deliveries: Counter,
        cork: Cork,
        spawn: Spawn,
        clock: Callable[[], float],
        reconcile_interval_s: float,
        trust: WireTrust,
    ) -> None:
        self.instance_id = instance_id
        self.trust = trust  # every link dials with mutual TLS as this gateway (docs/trust.md)
        self.state = state
        self.history = history
        self.metrics = metrics
        self.deliveries = deliveries
        self.cork = cork  # held while a burst of events from one read fans out (gateway/client_socket.py)
        self.spawn = spawn
        self.clock = clock  # subscription retries
        self.reconcile_interval_s = reconcile_interval_s
        self.follower = RingFollower(discovery, on_change=self.on_ring_change)
        self.channel_servers = ServiceDirectory(discovery, CHANNEL_SERVER, on_change=self.on_instances)
        self.links: dict[str, PeerLink] = {}
        # channel -> where it must be subscribed and how far that got (gateway/subscriptions.py)
        self.subs = Subscriptions(self.owner_for)
        self.flushing: set[str] = set()  # servers with a flush task running
        self.retry_timers: dict[str, asyncio.TimerHandle] = {}  # server -> the timer of its next requeued sub
        self.stopping = False
        self._metrics(metrics)

    def _metrics(self, m: ServiceMetrics) -> None:
        self.follower.on_bad_document = lambda exc: m.error("bad_kv")
        events_in = m.counter("rtm_gw_events_in_total", "Events received from channel servers", ["kind"])
        self.persisted_in, self.transient_in = events_in.labels("persisted"), events_in.labels("transient")
        self.latency = m.histogram(
            "rtm_gw_event_latency_seconds", "From an event's origin to its fan-out at this gateway", LATENCY_BUCKETS_S
        )
        self.resubscribes = m.counter(
            "rtm_gw_resubscriptions_total", "Channels resubscribed after a reconnect or a ring change"
        )
        self.sub_retries = m.counter(
            "rtm_gw_sub_retries_total", "Channel subscriptions requeued after a failed or timed-out sub"
        )
        self.reconciliations = m.counter("rtm_gw_reconciliations_total", "seqs audits answered by channel servers")
        self.repairs = m.counter(
            "rtm_gw_reconcile_repairs_total", "Differences the reconciliation found and repaired", ["kind"]
        )
        for kind in ("gap", "resubscribe"):
            self.repairs.labels(kind)
        unconfirmed = m.gauge("rtm_gw_subscriptions_by_phase", "Channel subscriptions at servers by phase", ["phase"])
        for phase in Phase:
            unconfirmed.labels(phase.value).set_function(functools.partial(self.subs.count, phase))
        m.gauge("rtm_ring_version", "Version of the channel ring this process acts on").set_function(
            lambda: self.follower.ring.version
        )

    # -- lifecycle ------------------------------------------------------------------------------------
    def start(self) -> None:
        self.follower.start()
        self.channel_servers.start()
        self.spawn(self.reconcile_loop())

    def stop_retries(self) -> None:
        """No more requeued subs: the gateway is stopping."""
        self.stopping = True
        for timer in self.retry_timers.values():
            timer.cancel()
        self.retry_timers.clear()

    async def close(self) -> None:
        await asyncio.gather(*(link.close() for link in self.links.values()), return_exceptions=True)

    def owner_for(self, channel: str) -> str | None:
        return self.follower.ring.owner_for(channel)

    # -- effects of the state: subscriptions and history ----------------------------------------------
    def apply(self, effects: Effects) -> None:
        if not effects:
            return
        for channel, _since in effects.subscribe:
            owner = self.subs.want(channel)
            if owner is not None:
                self.schedule_flush(owner)
            else:
                log.warning(
                    "no owner for %s in ring v%s; will subscribe on the next ring", channel, self.follower.ring.version
                )
        for channel in effects.unsubscribe:
            self.history.forget_gap(channel)
            owner = self.subs.drop(channel)
            if owner is not None:
                self.schedule_flush(owner)
        for fetch in effects.fetch:
            self.spawn(self.history.fetch_history(fetch))

    def schedule_flush(self, owner: str) -> None:
        """Send ``owner``'s due subs and unsubs soon (batched with this loop turn's others)."""
        self.link_to(owner)  # the link's first connect is what sends a new server's batch
        if owner not in self.flushing:
            self.flushing.add(owner)
            self.spawn(self.flush(owner))

    async def flush(self, owner: str) -> None:
        """Send the batched sub/unsub for one channel server, until nothing is due.

        Subscription bookkeeping is :class:`gateway.subscriptions.Subscriptions`;
        this only sends its batches and reports each outcome back to it. A sub
        that fails or times out is requeued there (with backoff) and a timer
        flushes again when it is due: nothing is ever dropped here.
        """
        try:
            await asyncio.sleep(0)  # let this loop iteration's burst join the batch
            while (batch := self.subs.take(owner, self.clock())) is not None:
                link = self.links.get(owner)
                conn = link.conn if link is not None else None
                if conn is None or not conn.is_open:
                    self.sub_failed(batch, "link down")
                    continue
                if batch.unsubscribe:
                    try:
                        await conn.request(
                            {"op": "unsub", "gw": self.instance_id, "chans": batch.unsubscribe}, SUBSCRIBE_TIMEOUT_S
                        )
                    except Exception as exc:  # best effort: the server forgets us when we disconnect
                        log.debug("unsub at %s failed: %s (it forgets us when we disconnect)", owner, exc)
                if batch.subscribe:
                    try:
                        await self.send_sub(batch, conn)
                    except Exception as exc:  # whatever went wrong, the batch is sent again, never lost
                        log.exception("sub at %s failed unexpectedly", owner)
                        self.metrics.error("sub_failed")
                        self.sub_failed(batch, exc)
        finally:
            self.flushing.discard(owner)
            self.schedule_retry(owner)

    def schedule_retry(self, owner: str) -> None:
        """Arm one timer per server for its earliest requeued sub."""
        due = self.subs.next_retry_at(owner)
        timer = self.retry_timers.pop(owner, None)
        if timer is not None:
            timer.cancel()
        if due is None or self.stopping:
            return
        loop = asyncio.get_running_loop()
        self.retry_timers[owner] = loop.call_later(max(0.0, due - self.clock()), self.retry_due, owner)

    def retry_due(self, owner: str) -> None:
        self.retry_timers.pop(owner, None)
        self.schedule_flush(owner)

    def sub_failed(self, batch: Batch, why: Any) -> None:
        requeued = self.subs.failed(batch, self.clock())
        if requeued:
            self.sub_retries.inc(len(requeued))
            log.info("sub of %d channels at %s failed (%s); retrying with backoff", len(requeued), batch.owner, why)

    async def send_sub(self, batch: Batch, conn: PeerConnection) -> None:
        """One ``sub`` request for ``batch``; its outcome goes back to the subscriptions."""
        chans = [[ch, self.state.cursor.get(ch, -1)] for ch in batch.subscribe]
        request = {"op": "sub", "gw": self.instance_id, "chans": chans, "rv": self.follower.ring.version}
        try:
            reply = await conn.request(request, SUBSCRIBE_TIMEOUT_S)
        except NotOwner:
            self.subs.confirmed(batch, refused=batch.subscribe)
            self.spawn(self.reroute(batch.subscribe))
            return
        except (ConnectionLost, RequestTimeout, SendBufferFull, PeerError) as exc:
            self.sub_failed(batch, exc)
            return
        try:  # read the whole reply before acting on any of it
            refused = [str(ch) for ch in reply.get("not_owner", [])]
            last = {str(ch): int(seq) for ch, seq in dict(reply.get("last", {})).items()}
        except (TypeError, ValueError, AttributeError) as exc:  # a malformed reply: send the sub again
            self.metrics.error("bad_sub_reply")
            log.warning("malformed sub reply from %s: %r", batch.owner, exc)
            self.sub_failed(batch, exc)
            return
        catch_ups = self.subs.confirmed(batch, refused)
        for channel, last_seq in last.items():
            fetch = self.state.expect(channel, last_seq)
            if fetch is not None:
                self.spawn(self.history.fetch_history(fetch))
        for channel in catch_ups:
            fetch = self.state.catch_up(channel)
            if fetch is not None:
                self.spawn(self.history.fetch_history(fetch))
        if refused:
            self.spawn(self.reroute(refused))

    async def reroute(self, channels: list[str]) -> None:
        """Channels a server refused or moved: read the ring again and subscribe at the owners."""
        try:
            await self.follower.refresh()
        except Exception as exc:
            log.warning("ring refresh failed: %s", exc)
        await asyncio.sleep(FETCH_RETRY_DELAY_S)  # the new owner may not have seen the ring yet
        watched = [ch for ch in channels if ch in self.state.channels]
        self.resubscribes.inc(len(watched))
        for owner in self.subs.resubscribe(watched):
            self.schedule_flush(owner)

    async def reconcile_loop(self) -> None:
        """Every ``--reconcile-interval-s``, ask each channel server where our confirmed channels
        stand (``seqs``) and repair differences: a channel it does not hold for us is
        subscribed again, a channel whose last seq is past what we delivered gets a gap fill."""
        while True:
            await asyncio.sleep(self.reconcile_interval_s)
            for owner in self.subs.owners():
                try:
                    await self.reconcile(owner)
                except Exception as exc:  # one server's answer must not stop the others' audits
                    log.warning("reconciliation with %s failed: %r", owner, exc)

    async def reconcile(self, owner: str) -> None:
        link = self.links.get(owner)
        if link is None or not link.connected or link.conn is None:
            return
        conn = link.conn
        epoch, channels = self.subs.audit(owner)
        for start in range(0, len(channels), RECONCILE_BATCH_CHANNELS):
            chunk = channels[start : start + RECONCILE_BATCH_CHANNELS]
            try:
                reply = await conn.request({"op": "seqs", "gw": self.instance_id, "chans": chunk}, SUBSCRIBE_TIMEOUT_S)
            except PeerError as exc:
                if exc.code == ErrorCode.UNKNOWN_OP:
                    log.info("%s does not answer seqs: no reconciliation with it", owner)
                    return
                raise
            self.reconciliations.inc()
            for channel, last_seq in dict(reply.get("last", {})).items():
                fetch = self.state.expect(str(channel), int(last_seq))
                if fetch is not None:
                    self.repairs.labels("gap").inc()
                    log.warning("reconciliation: %s is at %s at %s, behind here; filling", channel, last_seq, owner)
                    self.spawn(self.history.fetch_history(fetch))
            repaired = self.subs.reconciled(owner, epoch, [str(ch) for ch in reply.get("missing", [])])
            if repaired:
                self.repairs.labels("resubscribe").inc(len(repaired))
                log.warning("reconciliation: %s does not hold %d of our channels; resubscribing", owner, len(repaired))
                self.schedule_flush(owner)
            refused = [str(ch) for ch in reply.get("not_owner", [])]
            if refused:
                self.spawn(self.reroute(refused))

    # -- channel servers ------------------------------------------------------------------------------
    def link_to(self, owner: str) -> PeerLink:
        link = self.links.get(owner)
        if link is None:

            async def connected(conn: PeerConnection) -> None:
                # Every connect, the first one included: everything this link carries is sent again.
                self.subs.link_up(owner)
                held = len(self.subs.by_owner.get(owner, ()))
                if held:
                    self.resubscribes.inc(held)
                self.schedule_flush(owner)

            def disconnected() -> None:
                self.subs.link_down(owner)

            link = PeerLink(
                f"{self.instance_id}->{owner}",
                address=lambda: self.channel_servers.address(owner),
                factory=lambda: PeerConnection(
                    name=f"{self.instance_id}->{owner}",
                    on_push=self.on_push,
                    on_burst=self.on_burst,
                    on_bad_message=lambda conn, exc, was_request: self.metrics.error("bad_push"),
                ),
                on_connected=connected,
                on_disconnected=disconnected,
                trust=self.trust,
                expect=CHANNEL_SERVER,
            )
            self.links[owner] = link
            link.start()
        return link

    def on_push(self, conn: PeerConnection, msg: dict[str, Any]) -> None:
        """A push from a channel server, parsed first (services.ops): a bad one raises
        BadMessage, and the connection drops and counts it; the link stays up."""
        record = ops.parse(msg, (ops.Event, ops.Moved))
        if isinstance(record, ops.Event):
            channel, seq, ctl = record.ch, record.seq, record.ctl
            before = self.state.stats.delivered
            sender = (ctl or {}).get("from") if seq is None else None  # typing skips its sender
            fetch = self.state.deliver(channel, seq, record.json, exclude_user=sender)
            delivered = self.state.stats.delivered - before
            if delivered:
                self.deliveries.inc(delivered)
            (self.transient_in if seq is None else self.persisted_in).inc()
            self.latency.observe(max(0.0, time.time() - record.t0))
            if seq is not None and log.isEnabledFor(logging.DEBUG):
                log.debug(
                    "delivered %s:%s to %d sockets",
                    channel,
                    seq,
                    delivered,
                    extra={"eid": f"{channel}:{seq}", "channel": channel},
                )
            if fetch is not None:
                self.spawn(self.history.fetch_history(fetch))
            if self.state.overflowing_channels or self.state.overflowing_sessions:
                self.history.check_overflows()
            if ctl:
                self.history.apply_ctl(channel, ctl, seq)
            if self.state.departures:
                self.history.settle()
        elif isinstance(record, ops.Moved):
            self.spawn(self.reroute(record.chans))

    def on_burst(self, starting: bool) -> None:
        """One read from a channel server held several events: write them to each socket at once."""
        if starting:
            self.cork.hold()
        else:
            self.cork.release()

    def on_instances(self, instances: dict[str, Instance]) -> None:
        for gone in [owner for owner in self.links if owner not in instances]:
            log.info("channel server %s left Consul's healthy set", gone)

    def on_ring_change(self, old: RingDocument, new: RingDocument) -> None:
        moved, owners = self.subs.ring_changed()
        self.resubscribes.inc(len(moved))
        for owner in owners:
            self.schedule_flush(owner)
