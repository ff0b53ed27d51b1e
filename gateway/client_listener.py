"""Client websockets in: accept, admission, the read loop, keepalive.

A client connects to ``ws://host:port/ws/<ticket>`` (the URL ``rtm.connect``
returned). Before the upgrade an address at its connection limit gets HTTP
429. After it, the listener checks that the gateway takes clients, the ticket
and the per-user limit, fetches the user's bootstrap from the webapp, sends
``{"type": "hello"}`` and attaches the session to the gateway's state; frames
the client sends go to :class:`gateway.client_messages.ClientMessages`. One
keepalive sweep pings every socket.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections.abc import Callable, Coroutine
from http import HTTPStatus
from typing import Any, Protocol

import aiohttp
from websockets.asyncio.server import Server, ServerConnection
from websockets.asyncio.server import serve as ws_serve
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response
from websockets.protocol import State

from gateway.client_socket import KEEPALIVE_PING_FRAME, ClientConnection, ClientSocket, Cork
from gateway.drain import say_goodbye
from gateway.limits import ConnectionLimits, client_address
from gateway.socket_mode import is_socket_mode
from gateway.state import Effects, GatewayState, Session
from gateway.webapp_client import WebappCalls
from services.errors import CloseCode, PeerError, ResumeLost
from services.metrics import ServiceMetrics
from services.ticket import InvalidTicket, Ticket, TicketVerifier

log = logging.getLogger("rtm.gateway")

MAX_CLIENT_FRAME_BYTES = 64 * 1024  # a client frame above this closes the socket with 1009
# Unsent bytes a client may accumulate before it is cut off as a slow consumer.
MAX_CLIENT_BUFFER_BYTES = 1024 * 1024
MAX_CLIENT_BUFFER_FRAMES = 2000
CLOSE_TIMEOUT_S = 2.0
DEFAULT_MAX_CONNECTIONS = 50_000
# Sockets pinged per event-loop turn by the keepalive sweep: a ping is one write
# of a pre-built frame (~10-20 µs here), so a batch holds deliveries up for a few
# ms at most, also in a sweep of 20,000 sockets.
KEEPALIVE_BATCH_SOCKETS = 200
WS_PING_INTERVAL_S = 20.0
CONNECTION_LIMIT_RETRY_AFTER_S = 5  # Retry-After of a 429 for an address at its connection limit
HELLO = b'{"type":"hello"}'
# The close reason of 4003, and the webapp's error for a bootstrap of a revoked token: Slack's
# error code for a revoked token (what the client's next rtm.connect with it is told, as invalid_auth).
TOKEN_REVOKED_REASON = "token_revoked"
# A moved connection's bootstrap takes its resume record at the webapp. If the reply does not
# come back (the webapp is slow: the gateway's call times out), the record may be taken already;
# the gateway asks again with the same ticket nonce, which gets the same record (webapp_stub/
# resume.py), instead of closing with 4002 and leaving the client to a fresh bootstrap that would
# skip what it missed. Fresh connections are not retried here (the client retries rtm.connect).
BOOTSTRAP_ATTEMPTS = 3
BOOTSTRAP_RETRY_DELAY_S = 0.5  # times the attempt number


class SessionPresence(Protocol):
    """The presence hooks of a session's life (:class:`gateway.presence.GatewayPresence`)."""

    def attached(self, session: Session) -> None: ...

    def detached(self, session: Session) -> None: ...


class ClientFrames(Protocol):
    """Where a client's frames go (:class:`gateway.client_messages.ClientMessages`)."""

    def handle(self, ws: ServerConnection, session: Session, message: str | bytes) -> None: ...


class ClientListener:
    """The websocket server of one gateway and every client's life on it."""

    def __init__(
        self,
        *,
        args: Any,
        state: GatewayState,
        sockets: dict[int, ClientConnection],
        cork: Cork,
        verifier: TicketVerifier,
        webapp: WebappCalls,
        metrics: ServiceMetrics,
        spawn: Callable[[Coroutine[Any, Any, Any]], None],
        apply: Callable[[Effects], None],
        refusing: Callable[[], bool],
        presence: SessionPresence,
        frames: ClientFrames,
        socket_mode: Callable[[ClientConnection], Coroutine[Any, Any, None]] | None = None,
        socket_mode_admit: Callable[[ClientConnection, Request], Coroutine[Any, Any, None]] | None = None,
    ) -> None:
        self.args = args  # the gateway's flags: host, port, client limits, keepalive interval
        self.state = state
        self.sockets = sockets  # sid -> open client websocket, shared with the gateway (drain, stop)
        self.cork = cork
        self.verifier = verifier
        self.webapp = webapp
        self.metrics = metrics
        self.spawn = spawn
        self.apply = apply
        self.refusing = refusing  # the gateway is stopping or its region drained: goodbye to newcomers
        self.presence = presence
        self.frames = frames
        self.socket_mode = socket_mode  # serves /link/... (Slack apps): gateway/socket_mode.py
        self.socket_mode_admit = socket_mode_admit  # ... after admitting them before the upgrade
        self.limits = ConnectionLimits(args.max_connections_per_user, args.max_connections_per_address)
        # handshakes in progress per TCP peer (gateway/limits.py): none behind an edge proxy
        per_address = 0 if args.client_address_header else args.max_handshakes_per_address
        self.handshakes = ConnectionLimits(max_per_address=per_address)
        self.sids = itertools.count(1)
        self.ws_server: Server | None = None
        self.connects = metrics.counter(
            "rtm_gw_connects_total", "Websocket connection attempts by outcome", ["outcome"]
        )
        self.slow = metrics.counter("rtm_gw_slow_consumer_disconnects_total", "Clients cut off for not reading")
        self.revoked = metrics.counter(
            "rtm_gw_revoked_connections_total", "Connections closed (4003) because their token was revoked"
        )
        self.bootstrap_retries = metrics.counter(
            "rtm_gw_bootstrap_retries_total", "Bootstraps of moved connections asked again after no reply"
        )

    async def start(self) -> int:
        """Serve websockets; return the port."""
        args = self.args
        self.ws_server = await ws_serve(
            self.handle_client,
            args.host,
            args.port,
            max_size=args.max_client_frame_bytes,
            compression=None,
            ping_interval=None,  # one keepalive loop for all sockets instead of a task each: see keepalive_loop
            create_connection=self.new_connection,  # type: ignore[arg-type]  # a factory of ClientConnection
            process_request=self.before_upgrade,
            open_timeout=args.handshake_timeout_s,
            close_timeout=CLOSE_TIMEOUT_S,
            max_queue=64,
            backlog=args.listen_backlog,
        )
        self.spawn(self.keepalive_loop())
        return int(next(iter(self.ws_server.sockets)).getsockname()[1])

    async def close(self) -> None:
        if self.ws_server is not None:
            self.ws_server.close()
            await self.ws_server.wait_closed()

    def client_address(self, ws: ServerConnection, request: Request | None) -> str:
        """The address a client's connections count under (see gateway/limits.py)."""
        header = self.args.client_address_header
        value = request.headers.get(header) if header and request is not None else None
        peer = ws.remote_address[0] if ws.remote_address else ""
        return client_address(str(peer), value)

    def new_connection(self, *args: Any, **kwargs: Any) -> ClientConnection:
        """websockets' connection factory: a :class:`ClientConnection` whose handshake counts
        against ``--max-handshakes-per-address`` until its upgrade request has arrived."""
        ws = ClientConnection(*args, **kwargs)
        if self.handshakes.max_per_address:
            ws.handshake_start = self.handshake_started
            ws.handshake_end = self.handshake_ended
        return ws

    def handshake_started(self, ws: ClientConnection) -> bool:
        """At the TCP accept: count the handshake under its peer's address; False past the bound."""
        peer = ws.transport.get_extra_info("peername")
        source = client_address(str(peer[0]) if isinstance(peer, tuple) and peer else "", None)
        if not self.handshakes.take_address(source):
            self.connects.labels("handshake_limit").inc()
            self.metrics.error("handshake_limit")
            return False
        ws.handshake_source = source
        return True

    def handshake_ended(self, ws: ClientConnection) -> None:
        """The upgrade request arrived, or the connection ended: its handshake no longer counts."""
        source, ws.handshake_source = ws.handshake_source, None
        if source is not None:
            self.handshakes.release_address(source)

    async def before_upgrade(self, ws: ServerConnection, request: Request) -> Response | None:
        """Before the websocket upgrade (the HTTP 101): refuse a crowded address; admit a
        Socket Mode connection (its ticket and bootstrap: gateway/socket_mode.py ``admit``)."""
        if isinstance(ws, ClientConnection):
            self.handshake_ended(ws)  # its request is here: no longer a handshake that may dawdle
        refused = self.refuse_crowded_address(ws, request)
        if refused is not None:
            return refused
        if self.socket_mode_admit is not None and is_socket_mode(request.path):
            assert isinstance(ws, ClientConnection)  # serve(create_connection=ClientConnection)
            await self.socket_mode_admit(ws, request)
        return None

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
        if self.socket_mode is not None and ws.request is not None and is_socket_mode(ws.request.path):
            await self.socket_mode(ws)  # a Slack app's Socket Mode connection
            return
        admitted = await self.admit(ws)
        if admitted is None:
            return
        user, team, channels, until, ticket = admitted
        del admitted
        sid = next(self.sids)
        self.sockets[sid] = ws
        client = ClientSocket(
            ws, sid, self.args.max_client_buffer_bytes, self.args.max_client_buffer_frames, self.cut_off, self.cork
        )
        session = Session(sid=sid, user=user, team=team, write=client.write, token_id=ticket.token_id)
        del client  # the session's write holds it
        try:
            await ws.send(HELLO.decode())
            self.connects.labels("ok").inc()
            if ticket.resume:
                self.spawn(self.confirm_resume(ticket))
            del ticket
            self.apply(self.state.attach(session, channels, until))
            del channels, until  # this coroutine lives as long as the socket: keep its frame small
            self.presence.attached(session)
            async for message in ws:
                try:
                    self.frames.handle(ws, session, message)
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

    async def admit(
        self, ws: ServerConnection
    ) -> tuple[str, str, list[tuple[str, int]], dict[str, int], Ticket] | None:
        """Check the gateway takes clients, the ticket is good and its user under the
        per-user limit (counted from here: the caller releases it), then fetch the
        bootstrap: (user, team, [(channel, seq)], {channel: leave seq still owed up to}, ticket),
        or None after closing ``ws``."""
        if self.refusing():
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
            if ticket.app:  # apps.connections.open's: an app-level token opens Socket Mode, never RTM
                raise InvalidTicket("a Socket Mode ticket: connect at /link/")
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
            boot = await self.bootstrap(ticket)
            channels = [(str(c["id"]), int(c.get("seq", 0))) for c in boot["channels"]]
            until = {str(ch): int(seq) for ch, seq in (boot.get("until") or {}).items()}
            return ticket.user, ticket.team, channels, until, ticket
        except ResumeLost as exc:  # starting it here would skip what it missed since its move, silently
            self.limits.release_user(ticket.user)
            log.warning("%s: closing with %d before hello; it catches up from history", exc, CloseCode.RESYNC)
            self.connects.labels("resume_lost").inc()
            self.metrics.error("resume_lost")
            await ws.close(CloseCode.RESYNC, "resume record gone: reconnect and catch up")
            return None
        except Exception as exc:
            self.limits.release_user(ticket.user)
            if isinstance(exc, PeerError) and exc.code == TOKEN_REVOKED_REASON:  # minted before auth.revoke
                log.info("ticket of %s: its token was revoked; closing with %d", ticket.user, CloseCode.TOKEN_REVOKED)
                self.connects.labels("token_revoked").inc()
                self.metrics.error("token_revoked")
                await ws.close(CloseCode.TOKEN_REVOKED, TOKEN_REVOKED_REASON)
                return None
            log.warning("bootstrap for %s failed: %s", ticket.user, exc)
            self.connects.labels("bootstrap_failed").inc()
            self.metrics.error("bootstrap_failed")
            await ws.close(CloseCode.BOOTSTRAP_FAILED, "bootstrap failed, retry rtm.connect")
            return None

    async def bootstrap(self, ticket: Ticket) -> dict[str, Any]:
        """``/internal/bootstrap`` for ``ticket``; a resumed one is asked up to ``--bootstrap-attempts``
        times while the webapp does not answer (see :data:`BOOTSTRAP_ATTEMPTS`)."""
        request: dict[str, Any] = {"user": ticket.user}
        if ticket.token_id:  # the webapp refuses a ticket whose token was revoked since (token_revoked)
            request["token_id"] = ticket.token_id
        if ticket.resume:
            request.update(resume=ticket.resume, nonce=ticket.nonce)
        attempts = max(1, self.args.bootstrap_attempts) if ticket.resume else 1
        for attempt in range(1, attempts + 1):
            try:
                boot = await self.webapp.call("/internal/bootstrap", request)
                if ticket.resume and not boot.get("resumed"):
                    raise ResumeLost(f"resume record {ticket.resume} of {ticket.user} is gone")
                return boot
            except (TimeoutError, OSError, aiohttp.ClientError) as exc:  # no answer: the record may be taken
                if attempt >= attempts:
                    raise
                self.bootstrap_retries.inc()
                log.warning("bootstrap of moved %s: no answer (%r); asking again", ticket.user, exc)
                await asyncio.sleep(BOOTSTRAP_RETRY_DELAY_S * attempt)
        raise AssertionError("unreachable")  # the loop returns or raises

    async def confirm_resume(self, ticket: Ticket) -> bool:
        """Tell the webapp that the connection whose bootstrap took ``ticket``'s resume record got its
        ``hello``, so the record is not handed to the user's next ``rtm.connect`` (which would be
        refused with 4010; webapp_stub/resume.py). Best effort: without it, one later connection of
        the user within the record's grace is refused once and reconnects fresh."""
        try:
            reply = await self.webapp.call(
                "/internal/resume/confirm", {"user": ticket.user, "resume": ticket.resume, "nonce": ticket.nonce}
            )
        except (TimeoutError, OSError, aiohttp.ClientError, PeerError) as exc:
            log.info("resume record %s of %s not confirmed: %r", ticket.resume, ticket.user, exc)
            self.metrics.error("resume_confirm_failed")
            return False
        return bool(reply.get("confirmed"))

    def end_revoked(self, sessions: list[Session]) -> None:
        """The token ``sessions`` were opened with was revoked: they get nothing more from now on
        (detached from the state at once), and their sockets close with 4003 ``TOKEN_REVOKED``.
        The user's other connections are untouched (see :meth:`GatewayState.revoked`)."""
        for session in sessions:
            if session.sid not in self.state.sessions:
                continue
            self.apply(self.state.detach(session))
            self.revoked.inc()
            log.info(
                "token of %s (sid %s) revoked: closing with %d", session.user, session.sid, CloseCode.TOKEN_REVOKED
            )
            ws = self.sockets.get(session.sid)
            if ws is not None:
                self.spawn(ws.close(CloseCode.TOKEN_REVOKED, TOKEN_REVOKED_REASON))

    def cut_off(self, client: ClientSocket) -> None:
        """``client`` stopped reading (its backlog passed the bound): close it, 4008."""
        self.slow.inc()
        log.warning(
            "client %s (sid %s) is not reading: cut off as a slow consumer", client.ws.remote_address, client.sid
        )
        self.spawn(client.ws.close(CloseCode.SLOW_CONSUMER, "slow consumer: reconnect and catch up"))
