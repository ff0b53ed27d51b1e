"""Channel Server: owns the channels its ring slot maps to, fans each event out once per gateway.

Wiring only: the model is :class:`channel_server.state.ChannelTable`; this
module connects it to msgpack sockets, the ring in Consul, and metrics.

Requests served (declared, with their ranges, in :mod:`services.ops`; each is
parsed into its record before it touches the table, and a bad one is
answered ``err bad_request`` and counted):

* ``sub``   {gw, chans: [[ch, since_seq], ...]} -> replays held events with
  seq > since_seq as ``ev`` pushes, then replies ``{version, not_owner: [...],
  last: {ch: seq}}``. ``since_seq`` -1 subscribes live only.
* ``unsub`` {gw, chans: [ch, ...]}
* ``seqs``  {gw, chans: [ch, ...]} -> ``{last: {ch: seq}, missing: [...],
  not_owner: [...]}``: the gateway's periodic reconciliation. ``last`` is the
  highest seq applied here, ``missing`` the channels this gateway is not
  subscribed to here. Answered from memory; at most
  :data:`services.ops.MAX_SEQS_CHANNELS` channels a request.
* ``pub``   {ch, seq, json, t0, ctl?} -> applied and written to every
  subscribed gateway, or ``err not_owner`` with this server's ring version.
* ``pubs``  {evs: [{ch, seq, json, t0, ctl?}, ...], rv?} -> each event applied as a
  ``pub`` would be, in order; one ``ok`` with ``res``: a result per event
  (``ok``, ``duplicate``, ``not_owner``, ``bad_request``), ``version`` when any
  is ``not_owner``. A bad or foreign event is refused alone (docs/publish-path.md).
* ``ping``

When the ring moves channels away from this server it forgets them and
pushes ``{"op": "moved", "chans": [...], "version": v}`` to their
subscribers, who resubscribe at the new owner.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable
from typing import Any

from channel_server.pub_fence import MAX_FENCED_CHANNELS_PER_CONNECTION, PUB_FENCE_HOLD_S, PubFence
from channel_server.state import DEFAULT_HISTORY_EVENTS, NO_SEQ, ChannelTable, mask_indexes
from services import debug_faults, ops, wire
from services.config import Parser, service_parser
from services.connection import DEFAULT_MAX_SEND_BUFFER_BYTES, PeerConnection
from services.errors import BadMessage, ConnectionLost, ErrorCode, SendBufferFull
from services.identity import CHANNEL_SERVER
from services.metrics import FANOUT_BUCKETS, LATENCY_BUCKETS_S
from services.msgpack_service import SlotService
from services.process import run_main
from services.ring import CHANNEL_RING_KEY, RingDocument

log = logging.getLogger("rtm.channel_server")

SERVICE = CHANNEL_SERVER
DEFAULT_PORT = 7100
SERVED_OPS: dict[str, type[ops.Op]] = {
    cls.OP: cls for cls in (ops.Publish, ops.Publishes, ops.Subscribe, ops.Unsubscribe, ops.Seqs, ops.Ping)
}


class ChannelServer(SlotService):
    def __init__(self, args: Any) -> None:
        super().__init__(args, SERVICE, CHANNEL_RING_KEY, noun="channel server", metric_prefix="rtm_cs", log=log)
        self.table = ChannelTable(history_events=args.history_events)
        self.gateways: dict[int, PeerConnection] = {}
        # Connections that had a publish refused, and the channels they are held on (channel_server/pub_fence.py)
        self.fences: dict[PeerConnection, PubFence] = {}
        m = self.metrics
        events_in = m.counter("rtm_cs_events_in_total", "Events published to this channel server", ["kind"])
        self.persisted_in, self.transient_in = events_in.labels("persisted"), events_in.labels("transient")
        self.events_out = m.counter("rtm_cs_events_out_total", "Event frames written to gateways")
        self.duplicates = m.counter(
            "rtm_cs_duplicate_events_total", "Publishes dropped because their seq was already applied"
        )
        self.not_owner = m.counter(
            "rtm_cs_not_owner_total", "Requests refused because the channel is not owned here", ["op"]
        )
        self.fenced = m.counter(
            "rtm_cs_pub_fenced_total",
            "Publishes refused (not_owner) because an earlier one of the channel was refused on their connection",
        )
        self.fence_evictions = m.counter(
            "rtm_cs_pub_fence_evictions_total", "Refused channels forgotten past --max-fenced-channels-per-connection"
        )
        self.fanout = m.histogram("rtm_cs_fanout_gateways", "Gateways one event was written to", FANOUT_BUCKETS)
        self.pub_latency = m.histogram(
            "rtm_cs_publish_latency_seconds", "From the event's origin to its fan-out here", LATENCY_BUCKETS_S
        )
        self.slow_gateways = m.counter("rtm_cs_slow_gateway_disconnects_total", "Gateways cut off for not reading")
        self.moved = m.counter("rtm_cs_channels_moved_total", "Channels dropped because the ring moved them away")
        m.gauge("rtm_cs_channels", "Channels with at least one subscribed gateway").set_function(
            lambda: len(self.table.subscribers)
        )
        m.gauge("rtm_cs_channels_with_history", "Channels holding history").set_function(
            lambda: len(self.table.history)
        )
        m.gauge("rtm_cs_history_bytes", "Bytes of event frames held in history").set_function(
            lambda: self.table.history_bytes
        )
        m.gauge("rtm_cs_gateways", "Gateways connected").set_function(lambda: len(self.gateways))
        m.gauge("rtm_cs_subscriptions", "Channel subscriptions held (channel x gateway)").set_function(
            lambda: sum(mask.bit_count() for mask in self.table.subscribers.values())
        )
        self.slot_gauges()

    # -- lifecycle: services/msgpack_service.py (SlotService) ---------------------------------

    def health(self) -> dict[str, Any]:
        return {
            "ring_version": self.follower.ring.version,
            "channels": len(self.table.subscribers),
            "gateways": len(self.gateways),
            "consul": self.discovery.consul_ok,
            "role": self.slots.role,
            "fenced": self.slots.is_fenced(),
        }

    # -- connections ------------------------------------------------------------------
    def make_connection(self) -> PeerConnection:
        return self.peer_connection(
            f"{self.instance_id}<-peer",
            on_close=self.on_connection_closed,
            max_send_buffer_bytes=self.args.max_gateway_buffer_bytes,
            # Not corked here: a gateway's connection is corked once it says it is one
            # (_gateway_index, --batch-gateway-events); admin servers' replies are not.
        )

    def on_connection_closed(self, conn: PeerConnection, reason: BaseException | None) -> None:
        self.fences.pop(conn, None)
        index = conn.state.get("gw_index")
        if index is None or self.gateways.get(index) is not conn:
            return
        del self.gateways[index]
        if isinstance(reason, SendBufferFull):
            self.slow_gateways.inc()
        left = self.table.drop_gateway(index)
        log.info("gateway %s disconnected (%s); left %d channels", conn.state.get("gw"), reason, left)

    def handle_request(self, conn: PeerConnection, msg: dict[str, Any]) -> dict[str, Any] | Awaitable[dict[str, Any]]:
        """Parse (a :class:`BadMessage` is answered ``bad_request`` by the connection), then act."""
        request_id = ops.request_id(msg)
        if msg["op"] not in SERVED_OPS:
            self.metrics.error("unknown_op")
            return wire.reply_err(request_id, ErrorCode.UNKNOWN_OP, f"unknown op {str(msg['op'])[:40]!r}")
        refusal = self.authz.check(conn.identity, msg)  # services/authz.py: the sender's role may send this?
        if refusal is not None:
            return self.authz.refuse(refusal, request_id)  # type: ignore[return-value]
        record = ops.parse(msg, SERVED_OPS[msg["op"]])
        if isinstance(record, ops.Publish):
            return self.handle_pub(request_id, record, conn)
        if isinstance(record, ops.Publishes):
            return self.handle_pubs(request_id, record, conn)
        if isinstance(record, ops.Subscribe):
            if (record.rv or 0) > self.slots.ring_version:
                return self.sub_after_refresh(conn, request_id, record)
            return self.handle_sub(conn, request_id, record)
        if isinstance(record, ops.Unsubscribe):
            return self.handle_unsub(conn, request_id, record)
        if isinstance(record, ops.Seqs):
            return self.handle_seqs(conn, request_id, record)
        return wire.reply_ok(request_id, version=self.follower.ring.version)  # ping

    def _gateway_index(self, conn: PeerConnection, gateway_id: str) -> int:
        index = conn.state.get("gw_index")
        if index is None:
            index = self.table.index_of(gateway_id)
            previous = self.gateways.get(index)
            if previous is not None and previous is not conn:
                previous.state.pop("gw_index", None)  # a reconnect replaced it
                previous.close()
            conn.state["gw_index"] = index
            conn.state["gw"] = gateway_id
            # Corked: the events (and replies) written to this gateway in one loop turn leave
            # in one write, so one TLS record, one encryption here and one read and decryption
            # at the gateway, instead of one per event (docs/trust.md, "Cost, measured").
            conn.coalesce_writes = self.args.batch_gateway_events
            self.gateways[index] = conn
        return int(index)

    def handle_sub(self, conn: PeerConnection, request_id: int, sub: ops.Subscribe) -> dict[str, Any]:
        index = self._gateway_index(conn, sub.gw)
        accepting = self.slots.accepts(sub.rv or 0)
        refused: list[str] = []
        last: dict[str, int] = {}
        for channel, since_seq in sub.chans:
            if not (accepting and self.slots.is_mine(channel)):
                refused.append(channel)
                continue
            for frame in self.table.subscribe(index, channel, since_seq):
                conn.write(frame)
            known = self.table.last_seq.get(channel)
            if known is not None:
                last[channel] = known
        if refused:
            self.not_owner.labels("sub").inc(len(refused))
        return wire.reply_ok(request_id, version=self.follower.ring.version, not_owner=refused, last=last)

    async def sub_after_refresh(self, conn: PeerConnection, request_id: int, sub: ops.Subscribe) -> dict[str, Any]:
        """A gateway subscribes on a newer ring than ours (typically: we are the spare
        just promoted, and the gateway saw the ring first). Re-read the ring, then
        answer, instead of refusing and making the gateway come back later. Subs are
        idempotent, so answering one after a pub that arrived meanwhile changes nothing."""
        await self.slots.read_newer_ring(sub.rv or 0)
        if not conn.is_open:  # gone meanwhile: its gateway may already be back on a new connection
            return wire.reply_err(request_id, ErrorCode.UNAVAILABLE, "connection closed while the ring was re-read")
        return self.handle_sub(conn, request_id, sub)

    def handle_unsub(self, conn: PeerConnection, request_id: int, unsub: ops.Unsubscribe) -> dict[str, Any]:
        index = self._gateway_index(conn, unsub.gw)
        for channel in unsub.chans:
            self.table.unsubscribe(index, channel)
        return wire.reply_ok(request_id)

    def handle_seqs(self, conn: PeerConnection, request_id: int, seqs: ops.Seqs) -> dict[str, Any]:
        """The gateway's reconciliation: where each channel stands here, and whether it is subscribed."""
        bit = 1 << self._gateway_index(conn, seqs.gw)
        accepting = not self.slots.is_fenced()
        last: dict[str, int] = {}
        missing: list[str] = []
        refused: list[str] = []
        for channel in seqs.chans:
            if not (accepting and self.slots.is_mine(channel)):
                refused.append(channel)
                continue
            known = self.table.last_seq.get(channel)
            if known is not None:
                last[channel] = known
            if not self.table.subscribers.get(channel, 0) & bit:
                missing.append(channel)
        return wire.reply_ok(
            request_id, version=self.follower.ring.version, last=last, missing=missing, not_owner=refused
        )

    def handle_pub(self, request_id: int, pub: ops.Publish, conn: PeerConnection) -> dict[str, Any]:
        result = self.apply_pub(pub, pub.rv or 0, conn)
        if result == ops.PUB_OK:
            return wire.reply_ok(request_id)
        if result == ops.PUB_DUPLICATE:
            return wire.reply_ok(request_id, duplicate=True)
        return wire.reply_err(request_id, ErrorCode.NOT_OWNER, pub.ch, version=self.follower.ring.version)

    def handle_pubs(self, request_id: int, batch: ops.Publishes, conn: PeerConnection) -> dict[str, Any]:
        """Each event of the batch as :meth:`handle_pub` would, in order; one reply with a
        result per event. A refused item (bad, or not owned here) changes nothing else."""
        rv = batch.rv or 0
        results: list[str] = []
        details: list[tuple[int, str]] = []
        refused_owner = False
        for i, item in enumerate(batch.evs):
            if isinstance(item, BadMessage):
                self.metrics.error("bad_request")
                results.append(ErrorCode.BAD_REQUEST)
                details.append((i, item.detail))
                continue
            result = self.apply_pub(item, rv, conn)
            if result == ErrorCode.NOT_OWNER:
                refused_owner = True
                details.append((i, item.ch))
            results.append(result)
        reply = wire.reply_ok(request_id, res=results)
        if details:
            reply["det"] = details
        if refused_owner:
            reply["version"] = self.follower.ring.version
        return reply

    def apply_pub(self, pub: ops.Publish, rv: int, conn: PeerConnection) -> str:
        """Apply one event and write it to its subscribed gateways: ``ops.PUB_OK``,
        ``ops.PUB_DUPLICATE`` (its seq was applied already) or ``ErrorCode.NOT_OWNER``
        (not owned here; or, on ``conn``, an earlier publish of the channel was refused
        and has not been applied yet: channel_server/pub_fence.py)."""
        channel, seq = pub.ch, pub.seq
        fence = self.fences.get(conn) if seq is not None else None
        if fence is not None and fence.holds(channel, seq, self.table.last_seq.get(channel, NO_SEQ), time.monotonic()):
            self.fenced.inc()
            self.not_owner.labels("pub").inc()
            return ErrorCode.NOT_OWNER
        if not self.slots.owns(channel, rv):
            self.not_owner.labels("pub").inc()
            if seq is not None and rv > self.follower.ring.version:
                self._refused(conn, channel, seq)  # behind the sender: about to own it (pub_fence.py)
            return ErrorCode.NOT_OWNER
        t0 = pub.t0 or time.time()
        published = self.table.publish(channel, seq, pub.json, t0, pub.ctl)
        if published is None:
            self.duplicates.inc()
            return ops.PUB_DUPLICATE
        (self.transient_in if seq is None else self.persisted_in).inc()
        sent = 0
        for index in mask_indexes(published.mask):
            gateway = self.gateways.get(index)
            if gateway is None:
                continue
            try:
                gateway.write(published.frame)
                sent += 1
            except (ConnectionLost, SendBufferFull):
                pass  # on_connection_closed cleans up; the gateway catches up when it resubscribes
        self.events_out.inc(sent)
        self.fanout.observe(sent)
        if seq is not None and log.isEnabledFor(logging.DEBUG):
            log.debug("fanned out %s to %d gateways", pub.eid, sent, extra={"eid": pub.eid, "channel": channel})
        self.pub_latency.observe(max(0.0, time.time() - t0))
        return ops.PUB_OK

    def _refused(self, conn: PeerConnection, channel: str, seq: int) -> None:
        """``conn``'s publish ``seq`` of ``channel`` was refused: hold its later ones (pub_fence.py)."""
        fence = self.fences.get(conn)
        if fence is None:
            if not conn.is_open:
                return
            fence = self.fences[conn] = PubFence(
                self.args.max_fenced_channels_per_connection, self.args.pub_fence_hold_s
            )
        evicted = fence.evictions
        fence.refuse(channel, seq, time.monotonic())
        if fence.evictions != evicted:
            self.fence_evictions.inc()

    # -- ring changes ------------------------------------------------------------------
    def on_ring_change(self, old: RingDocument, new: RingDocument) -> None:
        if self.fences:
            gone = {ch for fence in self.fences.values() for ch in fence.refused if not self.slots.is_mine(ch)}
            for fence in self.fences.values():
                fence.forget(gone)
        lost = [ch for ch in self.table.known_channels() if not self.slots.is_mine(ch)]
        if not lost:
            return
        by_gateway: dict[int, list[str]] = {}
        for channel in lost:
            mask = self.table.forget(channel)
            for index in mask_indexes(mask):
                by_gateway.setdefault(index, []).append(channel)
        self.moved.inc(len(lost))
        log.info("ring v%s moved %d channels away from %s", new.version, len(lost), self.instance_id)
        for index, channels in by_gateway.items():
            gateway = self.gateways.get(index)
            if gateway is not None:
                try:
                    for batch in ops.batches(channels, ops.MAX_SUB_CHANNELS):
                        gateway.send(ops.Moved(chans=batch, version=new.version).to_message())
                except (ConnectionLost, SendBufferFull):
                    pass


def build_parser() -> Parser:
    parser = service_parser("rtm channel-server", "Run one Channel Server.", DEFAULT_PORT)
    parser.add("--history-events", DEFAULT_HISTORY_EVENTS, "events of history held per channel")
    parser.add("--role", "active", "registered role tag: active or spare")
    parser.add(
        "--max-fenced-channels-per-connection",
        MAX_FENCED_CHANNELS_PER_CONNECTION,
        "channels one connection may have refused publishes held for (channel_server/pub_fence.py)",
        above=0,
    )
    parser.add(
        "--pub-fence-hold-s",
        PUB_FENCE_HOLD_S,
        "seconds a refused publish holds its channel's later ones at most (channel_server/pub_fence.py)",
        above=0.0,
    )
    debug_faults.add_flags(parser)
    parser.add(
        "--max-gateway-buffer-bytes", DEFAULT_MAX_SEND_BUFFER_BYTES, "unsent bytes per gateway before it is cut off"
    )
    parser.add(
        "--batch-gateway-events",
        True,
        "write the events for one gateway of one loop turn in one write (one TLS record) instead of one each",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    debug_faults.check_args(args)
    return run_main(args, "cs", ChannelServer)
