"""Gateway Server: holds client websockets, subscribes to Channel Servers, fans events out.

The assembly: this module builds the gateway from its parts, wires them to
each other, and starts and stops them. The model is
:class:`gateway.state.GatewayState`; the parts are

* :mod:`gateway.client_listener`: the websocket server, admission, keepalive;
* :mod:`gateway.client_messages`: what a client sends, and what is done with it;
* :mod:`gateway.channel_links`: links to channel servers, batched subscriptions,
  reroutes, ring changes, reconciliation, the pushed events' fan-out;
* :mod:`gateway.history`: gap fills and shared history reads from the webapp;
* :mod:`gateway.presence`: the presence servers;
* :mod:`gateway.drain`: moving clients off this gateway (region drain, shutdown);
* :mod:`gateway.webapp_client`: the webapp's internal endpoints.

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
import logging
import time
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

import aiohttp
from prometheus_client import Counter

from gateway.channel_links import RECONCILE_INTERVAL_S, ChannelLinks
from gateway.client_listener import (
    BOOTSTRAP_ATTEMPTS,
    DEFAULT_MAX_CONNECTIONS,
    MAX_CLIENT_BUFFER_BYTES,
    MAX_CLIENT_BUFFER_FRAMES,
    MAX_CLIENT_FRAME_BYTES,
    WS_PING_INTERVAL_S,
    ClientListener,
)
from gateway.client_messages import ClientMessages
from gateway.client_socket import ClientConnection, Cork
from gateway.drain import DEFAULT_DRAIN_RATE_PER_S, MAX_MOVES_IN_FLIGHT, Mover, RegionDrain
from gateway.gap_budget import GAP_FILL_BUDGET_S, MAX_GAP_FILL_ATTEMPTS
from gateway.history import History
from gateway.limits import (
    DEFAULT_MAX_CONNECTIONS_PER_ADDRESS,
    DEFAULT_MAX_CONNECTIONS_PER_USER,
    DEFAULT_MAX_HANDSHAKES_PER_ADDRESS,
    HANDSHAKE_TIMEOUT_S,
)
from gateway.presence import GatewayPresence
from gateway.socket_mode import SocketMode
from gateway.state import (
    LEAVE_UPTO_TIMEOUT_S,
    MAX_HELD_EVENTS_PER_CHANNEL,
    MAX_HELD_EVENTS_PER_SESSION,
    MAX_PENDING_LEAVES,
    Effects,
    GatewayState,
    Session,
)
from gateway.webapp_client import WEBAPP_TIMEOUT_S, WebappClient
from services.config import Parser, add_listen_backlog_flag, advertised, service_parser
from services.connection import PeerLink
from services.directory import ServiceDirectory
from services.discovery import Discovery
from services.errors import CloseCode, PeerError
from services.identity import GATEWAY, WEBAPP
from services.keys import FleetKeys
from services.metrics import ServiceMetrics, start_metrics_server
from services.process import StopFn, run_main
from services.tasks import Tasks
from services.ticket import INCARNATION_META, TicketVerifier, new_incarnation
from services.tls import trust_from_args

log = logging.getLogger("rtm.gateway")

SERVICE = GATEWAY
DEFAULT_PORT = 8765
RESUME_TIMEOUT_S = 3.0  # leaving one resume record at the webapp when a session moves
# Withdrawing a record whose client closed before its goodbye (gateway/drain.py): attempts, and the
# pause between them (the webapp may be restarting; the record lives RESUME_TTL_S = 120 s there).
MAX_RESUME_WITHDRAW_ATTEMPTS = 5
RESUME_WITHDRAW_RETRY_S = 2.0
SHUTDOWN_MOVE_BUDGET_S = 5.0  # on SIGTERM, move every session within this (faster than a drain if need be)
LEAVE_CHECK_INTERVAL_S = 1.0  # how often pending leaves past --leave-timeout-s are forced


class Gateway:
    """One gateway: its parts, wired (see the module's docstring), with start/stop."""

    def __init__(self, args: Any) -> None:
        self.args = args
        self.instance_id = args.instance_id
        self.clock = time.monotonic  # subscription retries, gap budgets, pending leaves
        self.state = GatewayState(
            args.max_held_events_per_channel,
            args.max_held_events_per_session,
            clock=self.clock,
            leave_timeout_s=args.leave_timeout_s,
            max_pending_leaves=args.max_pending_leaves,
        )
        self.discovery = Discovery(args.consul, args.consul_token)
        keys = FleetKeys.from_secret(args.secret.encode())  # one key per job (services/keys.py)
        # The webapp's /internal/ endpoints and every channel/presence link: mutual TLS as this gateway.
        self.trust = trust_from_args(args, SERVICE)
        self.webapp = self._webapp_client(args)
        self.sockets: dict[int, ClientConnection] = {}
        self.cork = Cork()  # held while a burst of events from one read fans out (gateway/client_socket.py)
        self.tasks = Tasks("gateway")
        self.stopping = False
        self.metrics = ServiceMetrics(SERVICE, self.instance_id)
        deliveries = self.metrics.counter("rtm_gw_deliveries_total", "Event frames written to client sockets")
        self.forced_leaves = self.metrics.counter(
            "rtm_gw_forced_leaves_total", "Leaves that took effect without their upto event (--leave-timeout-s)"
        )
        self.mover = Mover(self)
        self.history = self._history(deliveries)
        self.channel_links = ChannelLinks(
            instance_id=self.instance_id,
            discovery=self.discovery,
            state=self.state,
            history=self.history,
            metrics=self.metrics,
            deliveries=deliveries,
            cork=self.cork,
            spawn=self.spawn,
            clock=self.clock,
            reconcile_interval_s=args.reconcile_interval_s,
            trust=self.trust,
        )
        self.region_drain = RegionDrain(self, args.region, args.drain_rate_per_s)
        self.presence = GatewayPresence(self)  # presence servers: reports, subscriptions (gateway/presence.py)
        self.client_messages = ClientMessages(self)  # ping, typing, message, presence frames
        self.socket_mode = SocketMode(self)  # Slack apps' Socket Mode connections (gateway/socket_mode.py)
        self.incarnation = new_incarnation()  # registered in Consul meta (services/ticket.py)
        self.listener = self._listener(self._verifier(keys.ticket_signing))
        self._gauges(self.metrics)
        self._stop_metrics: StopFn | None = None

    def _history(self, deliveries: Counter) -> History:
        """Gap fills and catch-ups from the webapp's history, wired to what ends sessions."""
        return History(
            state=self.state,
            webapp=self.webapp,
            metrics=self.metrics,
            deliveries=deliveries,
            spawn=self.spawn,
            apply=self.apply,
            mover=self.mover,
            end_revoked=self.end_revoked,
            end_slots=asyncio.Semaphore(MAX_MOVES_IN_FLIGHT),  # sessions being ended (resume + goodbye) at once
            clock=self.clock,
            gap_fill_budget_s=self.args.gap_fill_budget_s,
            max_gap_fill_attempts=self.args.max_gap_fill_attempts,
        )

    def end_revoked(self, sessions: list[Session]) -> None:
        """Close ``sessions``, whose token was revoked (the history reads the revoke; the listener
        holds the sockets)."""
        self.listener.end_revoked(sessions)

    def _webapp_client(self, args: Any) -> WebappClient:
        """The webapp's internal endpoints, found in Consul (or at ``--webapp-url``)."""
        webapps = ServiceDirectory(self.discovery, WEBAPP)
        return WebappClient(webapps, self.trust, args.webapp_url, timeout_s=args.webapp_timeout_s)

    def _verifier(self, secret: bytes) -> TicketVerifier:
        """Tickets for this process: minted for an earlier start of this gateway id (whose
        nonces this process never saw) and issued before this one began, they are refused."""
        return TicketVerifier(secret, self.instance_id, incarnation=self.incarnation, started_at=time.time())

    def _listener(self, verifier: TicketVerifier) -> ClientListener:
        """The websocket server, wired to the parts a client's life touches."""
        return ClientListener(
            args=self.args,
            state=self.state,
            sockets=self.sockets,
            cork=self.cork,
            verifier=verifier,
            webapp=self.webapp,
            metrics=self.metrics,
            spawn=self.spawn,
            apply=self.apply,
            refusing=lambda: self.stopping or self.region_drain.draining,
            presence=self.presence,
            frames=self.client_messages,
            socket_mode=self.socket_mode.serve,
            socket_mode_admit=self.socket_mode.admit,
        )

    def _gauges(self, m: ServiceMetrics) -> None:
        m.gauge("rtm_gw_connections", "Open client websockets").set_function(lambda: len(self.state.sessions))
        m.gauge(
            "rtm_gw_sockets", "Client websockets open, sessions being moved (detached, not yet closed) included"
        ).set_function(lambda: len(self.sockets))
        m.gauge("rtm_gw_channels", "Channels with at least one local socket").set_function(
            lambda: len(self.state.channels)
        )
        m.gauge("rtm_gw_subscriptions", "Channel subscriptions of open sockets (socket x channel)").set_function(
            lambda: sum(map(len, self.state.channels.values()))
        )
        m.gauge("rtm_gw_duplicates_dropped", "Events dropped as already delivered").set_function(
            lambda: self.state.stats.duplicates
        )

    # -- lifecycle ----------------------------------------------------------------------
    async def start(self) -> dict[str, Any]:
        args = self.args
        port = await self.listener.start()
        metrics_port, self._stop_metrics = await start_metrics_server(
            args.host, args.metrics_port, self.metrics, self.health
        )
        self.channel_links.start()
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
                INCARNATION_META: self.incarnation,
                **({"public_url": args.public_url} if args.public_url else {}),
            },
            ttl_s=args.ttl_s,
        )
        self.region_drain.start()
        self.socket_mode.start()
        self.spawn(self.expire_leaves())
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
        self.channel_links.stop_retries()
        await self.discovery.close()
        await self.region_drain.stop()
        rate = max(self.args.drain_rate_per_s, len(self.state.sessions) / SHUTDOWN_MOVE_BUDGET_S)
        moved = await self.mover.move_all(rate, "gateway shutting down")
        log.info("shutdown: moved %d sessions", moved)
        closing = [ws.close(CloseCode.GOING_AWAY, "gateway shutting down") for ws in list(self.sockets.values())]
        await asyncio.gather(*closing, return_exceptions=True)
        await self.listener.close()
        await self.channel_links.close()
        await self.presence.close()
        await self.webapp.close()
        if self._stop_metrics is not None:
            await self._stop_metrics()

    async def expire_leaves(self) -> None:
        """Every LEAVE_CHECK_INTERVAL_S: leaves whose ``upto`` never arrived take effect anyway."""
        while not self.stopping:
            await asyncio.sleep(LEAVE_CHECK_INTERVAL_S)
            before = self.state.stats.forced_leaves
            self.apply(self.state.expire_leaves())
            forced = self.state.stats.forced_leaves - before
            if forced:
                self.forced_leaves.inc(forced)
                log.warning("%d leaves took effect without their upto after %.0f s", forced, self.args.leave_timeout_s)

    async def retag(self) -> None:
        """Register again with tags that say whether we take new clients."""
        tags = [f"region={self.args.region}"]
        if self.stopping or self.region_drain.draining:
            tags.append("role=draining")
        await self.discovery.retag(self.instance_id, tags)

    async def leave_resume(self, session: Session, where: dict[str, int], until: dict[str, int] | None = None) -> str:
        # The webapp refuses the record past ``deadline``: by then we have given up on it and closed
        # the connection without goodbye (gateway/drain.py), so a late record must not be claimed.
        record: dict[str, Any] = {
            "user": session.user,
            "token_id": session.token_id,
            "channels": where,
            "deadline": time.time() + self.args.resume_timeout_s,
            **({"until": until} if until else {}),
        }
        reply = await asyncio.wait_for(self.webapp.call("/internal/resume", record), self.args.resume_timeout_s)
        return str(reply["resume"])

    async def withdraw_resume(self, owner: str, rid: str) -> bool:
        """Forget resume record ``rid`` of ``owner`` (the user, or a Socket Mode app's id): its
        client closed before its goodbye (gateway/drain.py). Retried while the webapp is
        unreachable, within :data:`MAX_RESUME_WITHDRAW_ATTEMPTS`; True once the webapp answered
        (withdrawn, or kept because an rtm.connect had claimed it)."""
        body = {"user": owner, "resume": rid}
        for attempt in range(1, MAX_RESUME_WITHDRAW_ATTEMPTS + 1):
            try:
                await asyncio.wait_for(self.webapp.call("/internal/resume/withdraw", body), self.args.resume_timeout_s)
                return True
            except PeerError as exc:  # the webapp answered: retrying cannot change it
                log.warning("resume record %s of %s not withdrawn: %s", rid, owner, exc)
                break
            except (TimeoutError, OSError, aiohttp.ClientError) as exc:
                log.info("withdrawing resume record %s failed (attempt %d): %r", rid, attempt, exc)
                if attempt < MAX_RESUME_WITHDRAW_ATTEMPTS:
                    await asyncio.sleep(RESUME_WITHDRAW_RETRY_S)
        self.metrics.error("resume_withdraw_failed")
        return False

    def health(self) -> dict[str, Any]:
        return {
            "ring_version": self.channel_links.follower.ring.version,
            "connections": len(self.state.sessions),
            "channels": len(self.state.channels),
            "region": self.args.region,
            "consul": self.discovery.consul_ok,
            **self.presence.health(),
        }

    # -- what the parts ask of the gateway (the Protocols beside them) -------------------------
    @property
    def draining(self) -> bool:
        """This gateway's region is drained (gateway/drain.py)."""
        return self.region_drain.draining

    def owner_for(self, channel: str) -> str | None:
        return self.channel_links.owner_for(channel)

    def link_to(self, owner: str) -> PeerLink:
        return self.channel_links.link_to(owner)

    def apply(self, effects: Effects) -> None:
        """Effects of the state (subscribe, unsubscribe, fetch) go to the channel links."""
        self.channel_links.apply(effects)

    def spawn(self, coro: Coroutine[Any, Any, Any]) -> None:
        self.tasks.spawn(coro)


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
    add_listen_backlog_flag(parser)
    parser.add("--secret", "", "fleet secret shared with the webapp (the websocket tickets' key is derived from it)")
    parser.add("--data-dir", "./.rtm", "where to find the shared secret when --secret is not given")
    parser.add("--webapp-url", "", "base URL of the webapp's internal listener (default: discovered in Consul)")
    parser.add(
        "--public-url",
        "",
        "base URL clients reach this gateway at, behind an edge proxy (e.g. wss://edge:8443/gw/us-east-1); "
        "registered as Consul meta public_url, rtm.connect then returns <public-url>/ws/<ticket> (default: ws://<advertised host>:<port>)",
    )
    _add_client_limits(parser)
    _add_delivery_settings(parser)
    return parser


def _add_client_limits(parser: Parser) -> None:
    """What one client, user or address may hold on this gateway."""
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
        "--max-handshakes-per-address",
        DEFAULT_MAX_HANDSHAKES_PER_ADDRESS,
        "connections from one TCP peer whose upgrade request has not arrived; past it, HTTP 429 at the "
        "accept (0: no limit; not applied with --client-address-header)",
        at_least=0,
    )
    parser.add(
        "--handshake-timeout-s",
        HANDSHAKE_TIMEOUT_S,
        "the longest from a client's TCP accept to its websocket upgrade",
        above=0.0,
    )
    parser.add(
        "--client-address-header",
        "",
        "behind an edge proxy: the header whose last entry is the client's address (e.g. X-Forwarded-For); "
        "default: the TCP peer",
    )


def _add_delivery_settings(parser: Parser) -> None:
    """Gaps, moves, leaves, reconciliation, drains and keepalive: what keeps delivery whole."""
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
        "--resume-timeout-s",
        RESUME_TIMEOUT_S,
        "seconds a moving session waits for the webapp to take its resume record; past it, 4010 and no goodbye",
        above=0.0,
    )
    parser.add(
        "--webapp-timeout-s",
        WEBAPP_TIMEOUT_S,
        "seconds one call to the webapp's internal endpoints (bootstrap, history, resume) may take",
        above=0.0,
    )
    parser.add(
        "--bootstrap-attempts",
        BOOTSTRAP_ATTEMPTS,
        "times a moved connection's bootstrap is asked of the webapp while it does not answer (same ticket)",
    )
    parser.add(
        "--leave-timeout-s",
        LEAVE_UPTO_TIMEOUT_S,
        "seconds a leave waits for the channel's event of the leave (ctl upto) before it takes effect anyway",
    )
    parser.add(
        "--max-pending-leaves",
        MAX_PENDING_LEAVES,
        "pending-leave deadlines held at once; past it the oldest pending leaves take effect at once",
        above=0,
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


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.secret = load_secret(args)
    return run_main(args, "gw", Gateway)
