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
import functools
import itertools
import json
import logging
import time
from http import HTTPStatus
from pathlib import Path
from typing import Any

import aiohttp
from websockets.asyncio.server import ServerConnection
from websockets.asyncio.server import serve as ws_serve
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response
from websockets.protocol import State

from gateway.client_messages import ClientMessages
from gateway.client_socket import KEEPALIVE_PING_FRAME, ClientConnection, ClientSocket, Cork
from gateway.drain import DEFAULT_DRAIN_RATE_PER_S, MAX_MOVES_IN_FLIGHT, Mover, RegionDrain, say_goodbye
from gateway.gap_budget import GAP_FILL_BUDGET_S, MAX_GAP_FILL_ATTEMPTS, GapBudget, GapUnfilled
from gateway.limits import (
    DEFAULT_MAX_CONNECTIONS_PER_ADDRESS,
    DEFAULT_MAX_CONNECTIONS_PER_USER,
    ConnectionLimits,
    client_address,
)
from gateway.presence import GatewayPresence
from gateway.socket_mode import SocketMode, is_socket_mode
from gateway.state import (
    MAX_HELD_EVENTS_PER_CHANNEL,
    MAX_HELD_EVENTS_PER_SESSION,
    Effects,
    Fetch,
    GatewayState,
    Session,
    text_frame,
)
from gateway.subscriptions import Batch, Phase, Subscriptions
from services import ops
from services.config import Parser, advertised, service_parser
from services.connection import PeerConnection, PeerLink
from services.directory import RingFollower, ServiceDirectory
from services.discovery import Discovery, Instance
from services.errors import (
    CloseCode,
    ConnectionLost,
    ErrorCode,
    NotOwner,
    PeerError,
    RequestTimeout,
    SendBufferFull,
)
from services.identity import CHANNEL_SERVER, WEBAPP
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
# How often each channel server is asked where our confirmed channels stand (``seqs``).
# A lost subscription or event is repaired within this; each audit costs one small
# request per RECONCILE_BATCH_CHANNELS channels per server.
RECONCILE_INTERVAL_S = 30.0
RECONCILE_BATCH_CHANNELS = 5000  # channels per seqs request (a channel server takes up to 10,000)
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
CONNECTION_LIMIT_RETRY_AFTER_S = 5  # Retry-After of a 429 for an address at its connection limit
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
        self.state = GatewayState(args.max_held_events_per_channel, args.max_held_events_per_session)
        self.clock = time.monotonic  # subscription retries and gap budgets
        self.discovery = Discovery(args.consul, args.consul_token)
        self.follower = RingFollower(self.discovery, on_change=self.on_ring_change)
        self.channel_servers = ServiceDirectory(self.discovery, CHANNEL_SERVER, on_change=self.on_instances)
        keys = FleetKeys.from_secret(args.secret.encode())  # one key per job (services/keys.py)
        self.webapp = WebappClient(
            ServiceDirectory(self.discovery, WEBAPP), keys.internal_http_credential, args.webapp_url
        )
        self.verifier = TicketVerifier(keys.ticket_signing, self.instance_id)
        self.links: dict[str, PeerLink] = {}
        # channel -> where it must be subscribed and how far that got (gateway/subscriptions.py)
        self.subs = Subscriptions(self.owner_for)
        self.flushing: set[str] = set()  # servers with a flush task running
        self.retry_timers: dict[str, asyncio.TimerHandle] = {}  # server -> the timer of its next requeued sub
        self.gap_budgets: dict[str, GapBudget] = {}  # channel -> the budget of its open gap
        self.end_slots = asyncio.Semaphore(MAX_MOVES_IN_FLIGHT)  # sessions being ended (resume + goodbye) at once
        self.limits = ConnectionLimits(args.max_connections_per_user, args.max_connections_per_address)
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
        self.follower.on_bad_document = lambda exc: self.metrics.error("bad_kv")
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
        self.sub_retries = m.counter(
            "rtm_gw_sub_retries_total", "Channel subscriptions requeued after a failed or timed-out sub"
        )
        self.reconciliations = m.counter("rtm_gw_reconciliations_total", "seqs audits answered by channel servers")
        self.repairs = m.counter(
            "rtm_gw_reconcile_repairs_total", "Differences the reconciliation found and repaired", ["kind"]
        )
        for kind in ("gap", "resubscribe"):
            self.repairs.labels(kind)
        self.sessions_ended = m.counter(
            "rtm_gw_sessions_ended_total", "Sessions ended with 4010 to reconnect and catch up", ["reason"]
        )
        for reason in ("gap_unfilled", "held_overflow"):
            self.sessions_ended.labels(reason)
        unconfirmed = m.gauge("rtm_gw_subscriptions_by_phase", "Channel subscriptions at servers by phase", ["phase"])
        for phase in Phase:
            unconfirmed.labels(phase.value).set_function(functools.partial(self.subs.count, phase))
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
        self.socket_mode = SocketMode(self)  # Slack apps' Socket Mode connections (gateway/socket_mode.py)
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
            process_request=self.refuse_crowded_address,
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
        self.socket_mode.start()
        self.spawn(self.keepalive_loop())
        self.spawn(self.reconcile_loop())
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
        for timer in self.retry_timers.values():
            timer.cancel()
        self.retry_timers.clear()
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

    def owner_for(self, channel: str) -> str | None:
        return self.follower.ring.owner_for(channel)

    def spawn(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    # -- clients ---------------------------------------------------------------------------
    def client_address(self, ws: ServerConnection, request: Request | None) -> str:
        """The address a client's connections count under (see gateway/limits.py)."""
        header = self.args.client_address_header
        value = request.headers.get(header) if header and request is not None else None
        peer = ws.remote_address[0] if ws.remote_address else ""
        return client_address(str(peer), value)

    def refuse_crowded_address(self, ws: ServerConnection, request: Request) -> Response | None:
        """Before the websocket upgrade: HTTP 429 for an address at its connection limit."""
        if not self.limits.address_full(self.client_address(ws, request)):
            return None
        self.connects.labels("address_limit").inc()
        self.metrics.error("address_limit")
        response = ws.respond(HTTPStatus.TOO_MANY_REQUESTS, "too many connections from this address\n")
        response.headers["Retry-After"] = str(CONNECTION_LIMIT_RETRY_AFTER_S)
        return response

    async def handle_client(self, ws: ServerConnection) -> None:
        address = self.client_address(ws, ws.request)
        if not self.limits.take_address(address):  # a handshake that raced past refuse_crowded_address
            self.connects.labels("address_limit").inc()
            self.metrics.error("address_limit")
            await ws.close(CloseCode.TOO_MANY_CONNECTIONS, "too many connections from this address")
            return
        try:
            await self.serve_client(ws)
        finally:
            self.limits.release_address(address)

    async def serve_client(self, ws: ServerConnection) -> None:
        assert isinstance(ws, ClientConnection)  # serve(create_connection=ClientConnection)
        if ws.request is not None and is_socket_mode(ws.request.path):  # a Slack app: gateway/socket_mode.py
            await self.socket_mode.serve(ws)
            return
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
                try:
                    self.handle_client_message(ws, session, message)
                except Exception:  # a bug in one frame's handling must not close the socket with 1011
                    log.exception("client frame from %s not handled", session.user)
                    self.metrics.error("client_frame_failed")
        except ConnectionClosed:
            pass
        finally:
            self.limits.release_user(user)
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
        """Check the gateway takes clients, the ticket is good and its user under the
        per-user limit (counted from here: the caller releases it), then fetch the
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
        if not self.limits.take_user(ticket.user):
            self.connects.labels("user_limit").inc()
            self.metrics.error("user_limit")
            await ws.close(CloseCode.TOO_MANY_CONNECTIONS, "too many connections for this user")
            return None
        try:
            request = {"user": ticket.user, **({"resume": ticket.resume} if ticket.resume else {})}
            boot = await self.webapp.call("/internal/bootstrap", request)
            return ticket.user, ticket.team, [(str(c["id"]), int(c.get("seq", 0))) for c in boot["channels"]]
        except Exception as exc:
            self.limits.release_user(ticket.user)
            log.warning("bootstrap for %s failed: %s", ticket.user, exc)
            self.connects.labels("bootstrap_failed").inc()
            self.metrics.error("bootstrap_failed")
            await ws.close(CloseCode.BOOTSTRAP_FAILED, "bootstrap failed, retry rtm.connect")
            return None

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
            owner = self.subs.want(channel)
            if owner is not None:
                self.schedule_flush(owner)
            else:
                log.warning(
                    "no owner for %s in ring v%s; will subscribe on the next ring", channel, self.follower.ring.version
                )
        for channel in effects.unsubscribe:
            self.gap_budgets.pop(channel, None)
            owner = self.subs.drop(channel)
            if owner is not None:
                self.schedule_flush(owner)
        for fetch in effects.fetch:
            self.spawn(self.fetch_history(fetch))

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
                self.spawn(self.fetch_history(fetch))
        for channel in catch_ups:
            fetch = self.state.catch_up(channel)
            if fetch is not None:
                self.spawn(self.fetch_history(fetch))
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
            await asyncio.sleep(self.args.reconcile_interval_s)
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
                    self.spawn(self.fetch_history(fetch))
            repaired = self.subs.reconciled(owner, epoch, [str(ch) for ch in reply.get("missing", [])])
            if repaired:
                self.repairs.labels("resubscribe").inc(len(repaired))
                log.warning("reconciliation: %s does not hold %d of our channels; resubscribing", owner, len(repaired))
                self.schedule_flush(owner)
            refused = [str(ch) for ch in reply.get("not_owner", [])]
            if refused:
                self.spawn(self.reroute(refused))

    async def fetch_history(self, fetch: Fetch) -> None:
        """Fill a gap (or catch one session up) from the webapp's history, in order.

        Within the gap's :class:`gateway.gap_budget.GapBudget`; when it is spent, or
        anything in the fill fails, the affected sessions are ended with 4010
        (:meth:`end_unfilled`) rather than let skip events or stay held.
        """
        self.gap_fills.labels("session" if fetch.session else "gap").inc()
        if fetch.session is None:
            budget = self.gap_budgets.get(fetch.channel)
            if budget is None:
                budget = self.gap_budgets[fetch.channel] = self.new_gap_budget()
        else:
            budget = self.new_gap_budget()
        try:
            key = (fetch.channel, fetch.after_seq, fetch.upto_seq)
            reading = self.history_reads.get(key)
            if reading is None:  # sessions catching up from the same place share one read
                reading = self.history_reads[key] = asyncio.ensure_future(self.read_history(*key, budget=budget))
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
            if fetch.channel not in self.state.gaps:
                self.gap_budgets.pop(fetch.channel, None)
            if again is not None:
                if budget.expired(self.clock()):
                    raise GapUnfilled(f"history of {fetch.channel} still has a hole after {again.after_seq}")
                await asyncio.sleep(FETCH_RETRY_DELAY_S)  # the webapp's history may lag a moment behind
                self.spawn(self.fetch_history(again))
        except Exception as exc:  # the budget is spent, or the fill itself failed: never stay held
            self.end_unfilled(fetch, exc)
        finally:
            self.check_overflows()

    def new_gap_budget(self) -> GapBudget:
        return GapBudget(self.clock(), self.args.gap_fill_budget_s, self.args.max_gap_fill_attempts)

    async def read_history(
        self, channel: str, after: int, upto: int | None, budget: GapBudget | None = None
    ) -> list[tuple[int, bytes]]:
        """The webapp's history of ``channel`` with after < seq <= upto (None: to the newest), paged.

        Failed reads are retried with backoff within ``budget``; when it is spent this raises
        :class:`GapUnfilled`. It never returns part of the range as if it were all of it.
        """
        budget = budget or self.new_gap_budget()
        events: list[tuple[int, bytes]] = []
        while True:
            try:
                async with self.history_slots:
                    reply = await self.webapp.call(
                        "/internal/history", {"channel": channel, "after_seq": after, "limit": HISTORY_PAGE_EVENTS}
                    )
            except Exception as exc:
                delay = budget.after_failure(self.clock())
                log.warning("history of %s after %s failed (attempt %d): %s", channel, after, budget.failures, exc)
                if delay is None:
                    self.metrics.error("history_fetch_failed")
                    raise GapUnfilled(f"history of {channel} after {after}: {budget.failures} reads failed") from exc
                await asyncio.sleep(delay)
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

    def end_unfilled(self, fetch: Fetch, exc: BaseException) -> None:
        """A gap could not be filled: end the sessions it holds (4010) instead of skipping events."""
        if fetch.session is not None:
            sessions = [fetch.session] if fetch.session.sid in self.state.sessions else []
        else:
            self.gap_budgets.pop(fetch.channel, None)
            sessions = list(self.state.channels.get(fetch.channel, ())) if fetch.channel in self.state.gaps else []
        if not sessions:
            return
        self.metrics.error("gap_unfilled")
        log.warning(
            "gap in %s after %s not filled (%r): ending %d sessions with %d",
            fetch.channel,
            fetch.after_seq,
            exc,
            len(sessions),
            CloseCode.RESYNC,
        )
        self.end_sessions(sessions, "gap_unfilled")

    def check_overflows(self) -> None:
        """Sessions whose held events passed their bound are ended (4010), never silently skipped ahead."""
        if not (self.state.overflowing_channels or self.state.overflowing_sessions):
            return
        channels, sessions = self.state.take_overflows()
        for channel in channels:
            self.gap_budgets.pop(channel, None)
            sessions.extend(self.state.channels.get(channel, ()))
        if sessions:
            self.metrics.error("held_overflow")
            log.warning("held events past their bound in %s: ending %d sessions", channels, len(set(sessions)))
            self.end_sessions(list(dict.fromkeys(sessions)), "held_overflow")

    def end_sessions(self, sessions: list[Session], reason: str) -> None:
        """End ``sessions`` as a drain moves them (position noted and delivery stopped in one
        step, a resume record left where the webapp takes it, goodbye), closing with 4010."""
        for session in sessions:
            if session.sid not in self.state.sessions:
                continue
            where = self.mover.detach(session)
            self.sessions_ended.labels(reason).inc()
            self.spawn(self.mover.finish(session, where, reason, self.end_slots, CloseCode.RESYNC))

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
                self.spawn(self.fetch_history(fetch))
            if self.state.overflowing_channels or self.state.overflowing_sessions:
                self.check_overflows()
            if ctl:
                self.apply_ctl(channel, ctl)
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
    parser.add(
        "--max-connections-per-user",
        DEFAULT_MAX_CONNECTIONS_PER_USER,
        "client websockets of one user on this gateway; past it, 4029 (0: no limit)",
    )
    parser.add(
        "--max-connections-per-address",
        DEFAULT_MAX_CONNECTIONS_PER_ADDRESS,
        "client websockets from one address; past it, HTTP 429 at the handshake (0: no limit)",
    )
    parser.add(
        "--client-address-header",
        "",
        "behind an edge proxy: the header whose last entry is the client's address (e.g. X-Forwarded-For); "
        "default: the TCP peer",
    )
    parser.add(
        "--gap-fill-budget-s",
        GAP_FILL_BUDGET_S,
        "seconds a gap may take to fill from the webapp before its sessions are ended with 4010",
    )
    parser.add("--max-gap-fill-attempts", MAX_GAP_FILL_ATTEMPTS, "failed history reads a gap may take before 4010")
    parser.add(
        "--max-held-events-per-channel",
        MAX_HELD_EVENTS_PER_CHANNEL,
        "live events held behind an open gap; past it, the channel's sessions are ended with 4010",
    )
    parser.add(
        "--max-held-events-per-session",
        MAX_HELD_EVENTS_PER_SESSION,
        "live events held for a session catching up; past it, the session is ended with 4010",
    )
    parser.add(
        "--reconcile-interval-s",
        RECONCILE_INTERVAL_S,
        "how often channel servers are asked where our channels stand (seqs) to repair differences",
    )
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
