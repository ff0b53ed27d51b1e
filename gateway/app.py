"""Gateway Server: holds client websockets, subscribes to Channel Servers, fans events out.

Wiring only: the model is :class:`gateway.state.GatewayState`. This module
owns the websocket server, one :class:`services.connection.PeerLink` per
Channel Server, the webapp client (bootstrap, history), the ring, and metrics.

A client connects to ``ws://host:port/ws/<ticket>`` (the URL ``rtm.connect``
returned). The gateway verifies the ticket, fetches the user's bootstrap
from the webapp, sends ``{"type": "hello"}``, and subscribes the user's
channels at their owning Channel Servers asynchronously, batched per server,
each ``since`` the seq the bootstrap gave, so nothing posted in between is
lost. Events arrive as ``ev`` pushes whose JSON was encoded once at the
webapp; the gateway wraps it in one websocket frame and writes those same
bytes to every local socket of the channel.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import time
from pathlib import Path
from typing import Any

import aiohttp
from websockets.asyncio.server import ServerConnection
from websockets.asyncio.server import serve as ws_serve
from websockets.exceptions import ConnectionClosed
from websockets.protocol import State

from gateway.client_messages import ClientMessages
from gateway.client_socket import KEEPALIVE_PING_FRAME, ClientConnection, ClientSocket, Cork
from gateway.drain import DEFAULT_DRAIN_RATE_PER_S, Mover, RegionDrain, say_goodbye
from gateway.presence import GatewayPresence
from gateway.state import Effects, Fetch, GatewayState, Session, text_frame
from services.config import Parser, advertised, service_parser
from services.connection import PeerConnection, PeerLink
from services.directory import RingFollower, ServiceDirectory
from services.discovery import Discovery, Instance
from services.errors import CloseCode, ConnectionLost, NotOwner, PeerError, RequestTimeout
from services.keys import FleetKeys
from services.metrics import LATENCY_BUCKETS_S, ServiceMetrics, start_metrics_server
from services.process import StopFn, run_main
from services.ring import RingDocument
from services.ticket import InvalidTicket, TicketVerifier

log = logging.getLogger("rtm.gateway")

SERVICE = "gateway"
DEFAULT_PORT = 8765
MAX_CLIENT_FRAME_BYTES = 64 * 1024  # a client frame above this closes the socket with 1009
# Unsent bytes a client may accumulate before it is cut off as a slow consumer.
MAX_CLIENT_BUFFER_BYTES = 1024 * 1024
MAX_CLIENT_BUFFER_FRAMES = 2000
WEBAPP_TIMEOUT_S = 5.0
SUBSCRIBE_TIMEOUT_S = 5.0
HISTORY_PAGE_EVENTS = 500
FETCH_RETRY_DELAY_S = 0.5
FETCH_ATTEMPTS = 20
HISTORY_CONCURRENCY = 8  # history fetches in flight to the webapp at once (a failover fetches many)
CLOSE_TIMEOUT_S = 2.0
RESUME_TIMEOUT_S = 3.0  # leaving one resume record at the webapp when a session moves
SHUTDOWN_MOVE_BUDGET_S = 5.0  # on SIGTERM, move every session within this (faster than a drain if need be)
DEFAULT_MAX_CONNECTIONS = 50_000
# Sockets pinged per event-loop turn by the keepalive sweep: a ping is one write
# of a pre-built frame (~10-20 µs here), so a batch holds deliveries up for a few
# ms at most, also in a sweep of 20,000 sockets.
KEEPALIVE_BATCH_SOCKETS = 200
WS_PING_INTERVAL_S = 20.0
HELLO = b'{"type":"hello"}'


class WebappClient:
    """The webapp's internal endpoints: bootstrap and history."""

    def __init__(self, directory: ServiceDirectory, secret: str, fixed_url: str = "") -> None:
        self.directory = directory
        self.secret = secret
        self.fixed_url = fixed_url.rstrip("/")
        self.session: aiohttp.ClientSession | None = None

    def base_url(self) -> str:
        if self.fixed_url:
            return self.fixed_url
        for inst in self.directory.instances.values():
            return f"http://{inst.address}:{inst.port}"
        raise ConnectionLost("no healthy webapp in Consul")

    async def call(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        if self.session is None:
            self.session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=WEBAPP_TIMEOUT_S))
        async with self.session.post(self.base_url() + path, json=body, headers={"X-Rtm-Secret": self.secret}) as resp:
            reply: dict[str, Any] = await resp.json(content_type=None)
        if not reply.get("ok"):
            raise PeerError(str(reply.get("error", "webapp_error")), reply)
        return reply

    async def close(self) -> None:
        if self.session is not None:
            await self.session.close()


class Gateway:
    def __init__(self, args: Any) -> None:
        self.args = args
        self.instance_id = args.instance_id
        self.state = GatewayState()
        self.discovery = Discovery(args.consul, args.consul_token)
        self.follower = RingFollower(self.discovery, on_change=self.on_ring_change)
        self.channel_servers = ServiceDirectory(self.discovery, "channel-server", on_change=self.on_instances)
        keys = FleetKeys.from_secret(args.secret.encode())  # one key per job (services/keys.py)
        self.webapp = WebappClient(
            ServiceDirectory(self.discovery, "webapp"), keys.internal_http_credential, args.webapp_url
        )
        self.verifier = TicketVerifier(keys.ticket_signing, self.instance_id)
        self.links: dict[str, PeerLink] = {}
        self.subscribed_at: dict[str, str] = {}  # channel -> channel server instance holding our subscription
        self.pending_sub: dict[str, set[str]] = {}
        self.pending_unsub: dict[str, set[str]] = {}
        self.flushing: set[str] = set()
        self.pending_catch_up: set[str] = set()  # channels to check against the webapp once resubscribed
        self.history_slots = asyncio.Semaphore(HISTORY_CONCURRENCY)
        # (channel, after_seq, upto_seq) -> the webapp read in flight: a region drain moves
        # hundreds of sessions that stopped at the same place, and they share one read
        self.history_reads: dict[tuple[str, int, int | None], asyncio.Future[list[tuple[int, bytes]]]] = {}
        self.sockets: dict[int, ClientConnection] = {}
        self.cork = Cork()  # held while a burst of events from one read fans out (gateway/client_socket.py)
        self.sids = itertools.count(1)
        self.tasks: set[asyncio.Task[Any]] = set()
        self.stopping = False
        self.metrics = ServiceMetrics(SERVICE, self.instance_id)
        m = self.metrics
        events_in = m.counter("rtm_gw_events_in_total", "Events received from channel servers", ["kind"])
        self.persisted_in, self.transient_in = events_in.labels("persisted"), events_in.labels("transient")
        self.deliveries = m.counter("rtm_gw_deliveries_total", "Event frames written to client sockets")
        self.latency = m.histogram(
            "rtm_gw_event_latency_seconds", "From an event's origin to its fan-out at this gateway", LATENCY_BUCKETS_S
        )
        self.connects = m.counter("rtm_gw_connects_total", "Websocket connection attempts by outcome", ["outcome"])
        self.slow = m.counter("rtm_gw_slow_consumer_disconnects_total", "Clients cut off for not reading")
        self.gap_fills = m.counter(
            "rtm_gw_gap_fills_total", "History fetches to fill a gap or catch a session up", ["kind"]
        )
        for kind in ("gap", "session"):  # the series exist at 0, so increase() counts the first one
            self.gap_fills.labels(kind)
        self.shared_history_reads = m.counter(
            "rtm_gw_shared_history_reads_total", "History fetches served by a read already in flight for the same range"
        )
        self.resubscribes = m.counter(
            "rtm_gw_resubscriptions_total", "Channels resubscribed after a reconnect or a ring change"
        )
        self.client_msgs = m.counter("rtm_gw_client_messages_total", "Frames received from clients", ["type"])
        m.gauge("rtm_gw_connections", "Open client websockets").set_function(lambda: len(self.state.sessions))
        m.gauge("rtm_gw_channels", "Channels with at least one local socket").set_function(
            lambda: len(self.state.channels)
        )
        m.gauge("rtm_gw_subscriptions", "Channel subscriptions of open sockets (socket x channel)").set_function(
            lambda: sum(map(len, self.state.channels.values()))
        )
        m.gauge("rtm_gw_duplicates_dropped", "Events dropped as already delivered").set_function(
            lambda: self.state.stats.duplicates
        )
        m.gauge("rtm_ring_version", "Version of the channel ring this process acts on").set_function(
            lambda: self.follower.ring.version
        )
        self.mover = Mover(self)
        self.region_drain = RegionDrain(self, args.drain_rate_per_s)
        self.presence = GatewayPresence(self)  # presence servers: reports, subscriptions (gateway/presence.py)
        self.ws_server: Any = None
        self._stop_metrics: StopFn | None = None

    # -- lifecycle ----------------------------------------------------------------------
    async def start(self) -> dict[str, Any]:
        args = self.args
        self.ws_server = await ws_serve(
            self.handle_client,
            args.host,
            args.port,
            max_size=args.max_client_frame_bytes,
            compression=None,
            ping_interval=None,  # one keepalive loop for all sockets instead of a task each: see keepalive_loop
            create_connection=ClientConnection,
            close_timeout=CLOSE_TIMEOUT_S,
            max_queue=64,
        )
        port = int(next(iter(self.ws_server.sockets)).getsockname()[1])
        metrics_port, self._stop_metrics = await start_metrics_server(
            args.host, args.metrics_port, self.metrics, self.health
        )
        self.follower.start()
        self.channel_servers.start()
        self.webapp.directory.start()
        self.presence.start()
        address = advertised(args.host, args.advertise_host)
        await self.discovery.register(
            SERVICE,
            self.instance_id,
            address,
            port,
            tags=[f"region={args.region}"],
            meta={
                "metrics_port": str(metrics_port),
                "region": args.region,
                **({"public_url": args.public_url} if args.public_url else {}),
            },
            ttl_s=args.ttl_s,
        )
        self.region_drain.start()
        self.spawn(self.keepalive_loop())
        log.info("gateway %s (region %s) serving ws://%s:%s", self.instance_id, args.region, address, port)
        return {
            "service": SERVICE,
            "id": self.instance_id,
            "host": address,
            "port": port,
            "metrics_port": metrics_port,
            "region": args.region,
        }

    async def stop(self) -> None:
        """Deregister, move every client elsewhere without loss, close.

        Sessions move as in a region drain (see :mod:`gateway.drain`), at a
        rate that fits the shutdown budget, so a rolling restart loses nothing.
        """
        self.stopping = True
        await self.discovery.close()
        await self.region_drain.stop()
        rate = max(self.args.drain_rate_per_s, len(self.state.sessions) / SHUTDOWN_MOVE_BUDGET_S)
        moved = await self.mover.move_all(rate, "gateway shutting down")
        log.info("shutdown: moved %d sessions", moved)
        closing = [ws.close(CloseCode.GOING_AWAY, "gateway shutting down") for ws in list(self.sockets.values())]
        await asyncio.gather(*closing, return_exceptions=True)
        if self.ws_server is not None:
            self.ws_server.close()
            await self.ws_server.wait_closed()
        await asyncio.gather(*(link.close() for link in self.links.values()), return_exceptions=True)
        await self.presence.close()
        await self.webapp.close()
        if self._stop_metrics is not None:
            await self._stop_metrics()

    async def retag(self) -> None:
        """Register again with tags that say whether we take new clients."""
        tags = [f"region={self.args.region}"]
        if self.stopping or self.region_drain.draining:
            tags.append("role=draining")
        await self.discovery.retag(self.instance_id, tags)

    async def leave_resume(self, session: Session, where: dict[str, int]) -> None:
        await asyncio.wait_for(
            self.webapp.call("/internal/resume", {"user": session.user, "channels": where}), RESUME_TIMEOUT_S
        )

    def health(self) -> dict[str, Any]:
        return {
            "ring_version": self.follower.ring.version,
            "connections": len(self.state.sessions),
            "channels": len(self.state.channels),
            "region": self.args.region,
            "consul": self.discovery.consul_ok,
            **self.presence.health(),
        }

    def spawn(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    # -- clients ---------------------------------------------------------------------------
    async def handle_client(self, ws: ServerConnection) -> None:
        assert isinstance(ws, ClientConnection)  # serve(create_connection=ClientConnection)
        admitted = await self.admit(ws)
        if admitted is None:
            return
        user, team, channels = admitted
        del admitted
        sid = next(self.sids)
        self.sockets[sid] = ws
        client = ClientSocket(
            ws, sid, self.args.max_client_buffer_bytes, self.args.max_client_buffer_frames, self.cut_off, self.cork
        )
        session = Session(sid=sid, user=user, team=team, write=client.write)
        del client  # the session's write holds it
        try:
            await ws.send(HELLO.decode())
            self.connects.labels("ok").inc()
            self.apply(self.state.attach(session, channels))
            del channels  # this coroutine lives as long as the socket: keep its frame small
            self.presence.attached(session)
            async for message in ws:
                self.handle_client_message(ws, session, message)
        except ConnectionClosed:
            pass
        finally:
            self.sockets.pop(sid, None)
            self.apply(self.state.detach(session))
            self.presence.detached(session)

    async def keepalive_loop(self) -> None:
        """Ping every client each ``--ws-ping-interval-s``; close one that did not
        answer the previous sweep's ping (a dead peer or a broken path).

        websockets can do this per connection, but that is a task per socket and
        a future per ping; the sweep writes one pre-built ping frame per socket
        (see :class:`gateway.client_socket.ClientConnection`).
        """
        while True:
            await asyncio.sleep(self.args.ws_ping_interval_s)
            for count, (_sid, ws) in enumerate(list(self.sockets.items()), 1):
                if count % KEEPALIVE_BATCH_SOCKETS == 0:
                    await asyncio.sleep(0)  # never hold deliveries up for a whole sweep
                if ws.state is not State.OPEN or ws.transport.is_closing():
                    continue
                if ws.awaiting_pong:
                    self.metrics.error("keepalive_timeout")
                    self.spawn(ws.close(CloseCode.INTERNAL_ERROR, "keepalive ping timeout"))
                    continue
                ws.awaiting_pong = True
                try:
                    ws.transport.write(KEEPALIVE_PING_FRAME)
                except RuntimeError:  # half-closed (write_eof) in between: it is leaving; the sweep goes on
                    continue

    async def admit(self, ws: ServerConnection) -> tuple[str, str, list[tuple[str, int]]] | None:
        """Check the gateway takes clients and the ticket is good, then fetch the
        bootstrap: (user, team, [(channel, seq)]), or None after closing ``ws``."""
        if self.stopping or self.region_drain.draining:
            self.connects.labels("draining").inc()
            await say_goodbye(ws, "gateway draining: reconnect through rtm.connect")
            return None
        if len(self.sockets) >= self.args.max_connections:
            self.connects.labels("full").inc()
            self.metrics.error("gateway_full")
            await ws.close(CloseCode.TRY_AGAIN_LATER, "gateway full: reconnect through rtm.connect")
            return None
        path = ws.request.path if ws.request is not None else ""
        try:  # slack_sdk requests "/ws/<ticket>?": cut the query string
            ticket = self.verifier.verify(path.split("?", 1)[0].rsplit("/", 1)[-1], time.time())
        except InvalidTicket as exc:
            self.connects.labels("invalid_ticket").inc()
            self.metrics.error("invalid_ticket")
            await ws.close(CloseCode.INVALID_TICKET, str(exc))
            return None
        try:
            request = {"user": ticket.user, **({"resume": ticket.resume} if ticket.resume else {})}
            boot = await self.webapp.call("/internal/bootstrap", request)
        except Exception as exc:
            log.warning("bootstrap for %s failed: %s", ticket.user, exc)
            self.connects.labels("bootstrap_failed").inc()
            self.metrics.error("bootstrap_failed")
            await ws.close(CloseCode.BOOTSTRAP_FAILED, "bootstrap failed, retry rtm.connect")
            return None
        return ticket.user, ticket.team, [(str(c["id"]), int(c.get("seq", 0))) for c in boot["channels"]]

    def cut_off(self, client: ClientSocket) -> None:
        """``client`` stopped reading (its backlog passed the bound): close it, 4008."""
        self.slow.inc()
        log.warning(
            "client %s (sid %s) is not reading: cut off as a slow consumer", client.ws.remote_address, client.sid
        )
        self.spawn(client.ws.close(CloseCode.SLOW_CONSUMER, "slow consumer: reconnect and catch up"))

    def handle_client_message(self, ws: ServerConnection, session: Session, message: str | bytes) -> None:
        ClientMessages.of(self).handle(ws, session, message)  # ping, typing, message: gateway/client_messages.py

    def send_json(self, session: Session, body: dict[str, Any]) -> None:
        session.write(text_frame(json.dumps(body).encode()))

    # -- effects: subscriptions and history -------------------------------------------------------
    def apply(self, effects: Effects) -> None:
        if not effects:
            return
        for channel, _since in effects.subscribe:
            self.queue_sub(channel)
        for channel in effects.unsubscribe:
            owner = self.subscribed_at.pop(channel, None)
            if owner is not None:
                self.pending_sub.get(owner, set()).discard(channel)
                self.pending_unsub.setdefault(owner, set()).add(channel)
                self.schedule_flush(owner)
        for fetch in effects.fetch:
            self.spawn(self.fetch_history(fetch))

    def queue_sub(self, channel: str, catch_up: bool = False) -> None:
        """Subscribe ``channel`` at its owner in the next batch; with ``catch_up``,
        also fetch from the webapp whatever the previous owner did not deliver."""
        if catch_up:
            self.pending_catch_up.add(channel)
        owner = self.follower.ring.owner_for(channel)
        if owner is None:
            log.warning(
                "no owner for %s in ring v%s; will subscribe on the next ring", channel, self.follower.ring.version
            )
            self.subscribed_at.pop(channel, None)
            return
        self.subscribed_at[channel] = owner
        self.pending_unsub.get(owner, set()).discard(channel)
        self.pending_sub.setdefault(owner, set()).add(channel)
        self.schedule_flush(owner)

    def schedule_flush(self, owner: str) -> None:
        if owner not in self.flushing:
            self.flushing.add(owner)
            self.spawn(self.flush(owner))

    async def flush(self, owner: str) -> None:
        """Send the batched sub/unsub for one channel server."""
        try:
            await asyncio.sleep(0)  # let this loop iteration's burst join the batch
            link = self.link_to(owner)
            while self.pending_sub.get(owner) or self.pending_unsub.get(owner):
                unsubs = self.pending_unsub.pop(owner, set())
                subs = self.pending_sub.pop(owner, set())
                if unsubs:
                    try:
                        await link.request(
                            {"op": "unsub", "gw": self.instance_id, "chans": sorted(unsubs)}, SUBSCRIBE_TIMEOUT_S
                        )
                    except (ConnectionLost, RequestTimeout, PeerError) as exc:
                        log.debug("unsub at %s failed: %s (it forgets us when we disconnect)", owner, exc)
                if subs:
                    await self.subscribe_at(owner, link, sorted(subs))
        finally:
            self.flushing.discard(owner)

    async def subscribe_at(self, owner: str, link: PeerLink | PeerConnection, channels: list[str]) -> None:
        chans: list[list[Any]] = [
            [ch, self.state.cursor.get(ch, -1)] for ch in channels if self.subscribed_at.get(ch) == owner
        ]
        if not chans:
            return
        try:
            request = {"op": "sub", "gw": self.instance_id, "chans": chans, "rv": self.follower.ring.version}
            reply = await link.request(request, SUBSCRIBE_TIMEOUT_S)
        except (ConnectionLost, RequestTimeout) as exc:
            # The link's on_connected resubscribes everything we hold there.
            log.info("sub at %s failed (%s); the link resubscribes on reconnect", owner, exc)
            return
        except NotOwner:
            await self.reroute([c for c, _ in chans])
            return
        refused = list(reply.get("not_owner", []))
        for channel, last_seq in dict(reply.get("last", {})).items():
            fetch = self.state.expect(channel, int(last_seq))
            if fetch is not None:
                self.spawn(self.fetch_history(fetch))
        for channel, _ in chans:
            if channel in self.pending_catch_up and channel not in refused:
                self.pending_catch_up.discard(channel)
                fetch = self.state.catch_up(channel)
                if fetch is not None:
                    self.spawn(self.fetch_history(fetch))
        if refused:
            await self.reroute(refused)

    async def reroute(self, channels: list[str]) -> None:
        """Channels a server refused or moved: read the ring again and subscribe at the owners."""
        try:
            await self.follower.refresh()
        except Exception as exc:
            log.warning("ring refresh failed: %s", exc)
        await asyncio.sleep(FETCH_RETRY_DELAY_S)  # the new owner may not have seen the ring yet
        for channel in channels:
            if channel in self.state.channels:
                self.resubscribes.inc()
                self.queue_sub(channel, catch_up=True)

    async def fetch_history(self, fetch: Fetch) -> None:
        """Fill a gap (or catch one session up) from the webapp's history, in order."""
        self.gap_fills.labels("session" if fetch.session else "gap").inc()
        key = (fetch.channel, fetch.after_seq, fetch.upto_seq)
        reading = self.history_reads.get(key)
        if reading is None:  # sessions catching up from the same place share one read
            reading = self.history_reads[key] = asyncio.ensure_future(self.read_history(*key))
            reading.add_done_callback(lambda _: self.history_reads.pop(key, None))
        else:
            self.shared_history_reads.inc()
        events = await asyncio.shield(reading)
        if fetch.session is not None:
            self.state.fill_session(fetch.session, fetch.channel, events)
            return
        before = self.state.stats.delivered
        again = self.state.fill(fetch.channel, events)
        self.deliveries.inc(self.state.stats.delivered - before)
        if again is not None:
            self.spawn(self.fetch_history(again))

    async def read_history(self, channel: str, after: int, upto: int | None) -> list[tuple[int, bytes]]:
        """The webapp's history of ``channel`` with after < seq <= upto (None: to the newest), paged."""
        events: list[tuple[int, bytes]] = []
        for attempt in range(FETCH_ATTEMPTS):
            try:
                async with self.history_slots:
                    reply = await self.webapp.call(
                        "/internal/history", {"channel": channel, "after_seq": after, "limit": HISTORY_PAGE_EVENTS}
                    )
            except Exception as exc:
                log.warning("history of %s after %s failed (attempt %d): %s", channel, after, attempt + 1, exc)
                await asyncio.sleep(FETCH_RETRY_DELAY_S)
                continue
            for event in reply["events"]:
                seq = int(event["seq"])
                if upto is not None and seq > upto:
                    break
                events.append((seq, str(event["json"]).encode()))
                self.apply_ctl(channel, event.get("ctl"))
                after = seq
            if not reply.get("has_more") or (upto is not None and after >= upto):
                return events
        self.metrics.error("history_fetch_failed")
        return events

    def apply_ctl(self, channel: str, ctl: Any) -> None:
        if not isinstance(ctl, dict):
            return
        if "join" in ctl:
            self.apply(self.state.join(channel, str(ctl["join"]), int(ctl.get("since", 0))))
        if "leave" in ctl:
            self.apply(self.state.leave(channel, str(ctl["leave"])))

    # -- channel servers ------------------------------------------------------------------------------
    def link_to(self, owner: str) -> PeerLink:
        link = self.links.get(owner)
        if link is None:
            connects = itertools.count()

            async def resubscribe(conn: PeerConnection) -> None:
                if next(connects) == 0:
                    return  # first connect: the pending batch subscribes
                held = [ch for ch, at in self.subscribed_at.items() if at == owner]
                if held:
                    self.resubscribes.inc(len(held))
                    self.pending_catch_up.update(held)  # the server may have restarted empty
                    self.spawn(self.subscribe_at(owner, conn, held))

            link = PeerLink(
                f"{self.instance_id}->{owner}",
                address=lambda: self.channel_servers.address(owner),
                factory=lambda: PeerConnection(
                    name=f"{self.instance_id}->{owner}", on_push=self.on_push, on_burst=self.on_burst
                ),
                on_connected=resubscribe,
            )
            link.start()
            self.links[owner] = link
        return link

    def on_push(self, conn: PeerConnection, msg: dict[str, Any]) -> None:
        op = msg["op"]
        if op == "ev":
            channel = msg["ch"]
            seq = msg.get("seq")
            before = self.state.stats.delivered
            sender = (msg.get("ctl") or {}).get("from") if seq is None else None  # typing skips its sender
            fetch = self.state.deliver(channel, seq, msg["json"], exclude_user=sender)
            delivered = self.state.stats.delivered - before
            if delivered:
                self.deliveries.inc(delivered)
            (self.transient_in if seq is None else self.persisted_in).inc()
            self.latency.observe(max(0.0, time.time() - float(msg.get("t0", 0.0))))
            if seq is not None and log.isEnabledFor(logging.DEBUG):
                log.debug(
                    "delivered %s:%s to %d sockets",
                    channel,
                    seq,
                    delivered,
                    extra={"eid": f"{channel}:{seq}", "channel": channel},
                )
            if fetch is not None:
                self.spawn(self.fetch_history(fetch))
            ctl = msg.get("ctl")
            if ctl:
                self.apply_ctl(channel, ctl)
        elif op == "moved":
            self.spawn(self.reroute([str(ch) for ch in msg.get("chans", [])]))

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
        moved = [ch for ch in self.state.channels if self.subscribed_at.get(ch) != self.follower.ring.owner_for(ch)]
        for channel in moved:
            self.resubscribes.inc()
            self.queue_sub(channel, catch_up=True)


def load_secret(args: Any) -> str:
    if args.secret:
        return str(args.secret)
    path = Path(args.data_dir) / "secret"
    if path.exists():
        return path.read_text().strip()
    raise SystemExit("the gateway needs --secret (or RTM_SECRET, or DATA_DIR/secret) shared with the webapp")


def build_parser() -> Parser:
    parser = service_parser("rtm gateway", "Run one Gateway Server.", DEFAULT_PORT)
    parser.add("--region", "us-east", "region tag of this gateway")
    parser.add("--secret", "", "secret shared with the webapp (tickets, internal endpoints)")
    parser.add("--data-dir", "./.rtm", "where to find the shared secret when --secret is not given")
    parser.add("--webapp-url", "", "webapp base URL (default: discovered in Consul)")
    parser.add(
        "--public-url",
        "",
        "base URL clients reach this gateway at, behind an edge proxy (e.g. wss://edge:8443/gw/us-east-1); "
        "registered as Consul meta public_url, rtm.connect then returns <public-url>/ws/<ticket> (default: ws://<advertised host>:<port>)",
    )
    parser.add("--max-client-frame-bytes", MAX_CLIENT_FRAME_BYTES, "largest websocket frame a client may send")
    parser.add("--max-client-buffer-bytes", MAX_CLIENT_BUFFER_BYTES, "unsent bytes per client before it is cut off")
    parser.add("--max-client-buffer-frames", MAX_CLIENT_BUFFER_FRAMES, "unsent frames per client before it is cut off")
    parser.add("--max-connections", DEFAULT_MAX_CONNECTIONS, "client websockets this gateway holds; past it, 1013")
    parser.add("--drain-rate-per-s", DEFAULT_DRAIN_RATE_PER_S, "sessions moved per second when the region is drained")
    parser.add(
        "--ws-ping-interval-s",
        WS_PING_INTERVAL_S,
        "keepalive: ping every client this often; one that has not "
        "answered the previous ping by the next is closed (1011)",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.secret = load_secret(args)
    return run_main(args, "gw", Gateway)
