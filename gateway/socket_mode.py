"""Socket Mode on the gateway: Slack apps' websockets beside RTM ones (docs/socket-mode.md).

An app opens ``ws://<gateway>/link/?ticket=…&app_id=A…`` (the URL
``apps.connections.open`` returned: a signed, single-use ticket naming the
app and its bot user). The gateway holds, per app, one :class:`AppLink`:

* a :class:`gateway.state.Session` of the app's bot user in the gateway's
  model, so the bot's channels are subscribed, gap-filled and joined/left
  exactly like a user connection's; its ``write`` turns each event into the
  app's Events API events (:mod:`gateway.app_events`);
* an :class:`gateway.envelopes.EnvelopeBook`: each event to exactly one of
  the app's open connections (at most :data:`MAX_CONNECTIONS_PER_APP`, Slack's
  10), acknowledged by ``{"envelope_id": …}``, retried after 3 s, kept for a
  while when the app has no connection.

The link outlives its connections by :data:`APP_IDLE_KEEP_S`, so events that
arrive while an app reconnects wait for it. When the gateway moves its
clients (region drain, shutdown: :mod:`gateway.drain`), an app link is moved
like a session: its position in each channel and every unacknowledged
envelope go into a resume record at the webapp (keyed by the app), then each
connection gets Slack's ``disconnect`` (``refresh_requested`` on a drain,
``warning`` on shutdown) and a 1001 close a moment later; the SDK opens a new
connection through ``apps.connections.open``, which hands out the record, and
the new gateway replays what the app missed and re-sends what it had not
acknowledged.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import time
import weakref
from collections.abc import Coroutine
from dataclasses import dataclass, field
from typing import Any, Protocol
from urllib.parse import parse_qs, urlparse

from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request
from websockets.protocol import State

from gateway.app_events import AppProfile, app_events, event_callback
from gateway.client_socket import ClientConnection, ClientSocket, Cork
from gateway.envelopes import EnvelopeBook, Send, acked_envelope
from gateway.state import Effects, GatewayState, Session, _payload_of, text_frame
from gateway.webapp_client import WebappCalls
from services.errors import CloseCode
from services.metrics import ServiceMetrics
from services.ticket import InvalidTicket, Ticket

log = logging.getLogger("rtm.gateway.socket_mode")

SOCKET_MODE_PATH = "/link"
MAX_CONNECTIONS_PER_APP = 10  # Slack allows up to 10 open Socket Mode connections per app
APP_IDLE_KEEP_S = 60.0  # an app link with no connection keeps following its channels this long
ACK_CHECK_INTERVAL_S = 0.25  # how often ack deadlines and idle links are checked
DISCONNECT_GRACE_S = 2.0  # after a disconnect envelope, the connection is closed this much later
MAX_ACK_FRAME_BYTES = 64 * 1024  # an app frame larger than this is refused (the gateway's client frame bound)
BUILD_NUMBER = 1


def is_socket_mode(path: str) -> bool:
    return path.split("?", 1)[0].rstrip("/") == SOCKET_MODE_PATH


class AppGateway(Protocol):
    """What :class:`SocketMode` uses of the gateway (:class:`gateway.app.Gateway`)."""

    instance_id: str
    args: Any  # the client buffer bounds, --resume-timeout-s
    state: GatewayState
    sockets: dict[int, ClientConnection]  # sid -> websocket: the keepalive sweep and stop() see app connections too
    cork: Cork
    metrics: ServiceMetrics
    stopping: bool

    @property
    def webapp(self) -> WebappCalls: ...  # bootstrap and resume records

    listener: Any  # gateway.client_listener.ClientListener: its ticket verifier, sids and slow-consumer cut-off
    region_drain: Any  # gateway.drain.RegionDrain: .draining
    mover: Any  # gateway.drain.Mover: its moved, resume_failures and goodbye_missed counters

    def apply(self, effects: Effects) -> None: ...

    async def withdraw_resume(self, owner: str, rid: str) -> bool: ...

    def spawn(self, coro: Coroutine[Any, Any, Any]) -> None: ...


@dataclass(frozen=True)
class Admitted:
    """A Socket Mode connection's verified ticket and its bootstrap, taken before the upgrade."""

    ticket: Ticket
    boot: dict[str, Any]


@dataclass(frozen=True)
class Refusal:
    """Why a Socket Mode connection is refused: its connects outcome, error kind and close."""

    outcome: str
    error: str
    code: int
    reason: str


Admission = Admitted | Refusal


@dataclass
class AppLink:
    profile: AppProfile
    session: Session
    book: EnvelopeBook
    conns: dict[int, ClientSocket] = field(default_factory=dict)
    idle_since: float | None = None


class SocketMode:
    """The gateway's Socket Mode connections, per app."""

    def __init__(self, gateway: AppGateway) -> None:
        self.gateway = gateway
        self.links: dict[str, AppLink] = {}  # app id -> link
        self.by_sid: dict[int, AppLink] = {}  # the link's session sid -> link
        self.ids = itertools.count(1)
        # outcomes of admit(), taken before the upgrade, until serve() picks them up;
        # weak, so a handshake that fails after admit() leaves nothing behind
        self.admissions: weakref.WeakKeyDictionary[ClientConnection, Admission] = weakref.WeakKeyDictionary()
        m = gateway.metrics
        self.envelopes = m.counter(
            "rtm_gw_socket_mode_envelopes_total",
            "Socket Mode envelopes by outcome: sent, retried, acked, undelivered, expired, overflow",
            ["outcome"],
        )
        self.connects = m.counter(
            "rtm_gw_socket_mode_connects_total", "Socket Mode connections by outcome", ["outcome"]
        )
        m.gauge("rtm_gw_socket_mode_connections", "Open Socket Mode connections").set_function(
            lambda: sum(len(link.conns) for link in self.links.values())
        )
        m.gauge("rtm_gw_socket_mode_apps", "Apps with a link on this gateway").set_function(lambda: len(self.links))
        self._reported: dict[str, dict[str, int]] = {}

    def start(self) -> None:
        self.gateway.spawn(self.tick_loop())

    def owns(self, session: Session) -> bool:
        return session.sid in self.by_sid

    # -- connections --------------------------------------------------------------------
    async def admit(self, ws: ClientConnection, request: Request) -> None:
        """Before the websocket upgrade: verify the ticket and bootstrap, so the app's
        channel positions are taken before its SDK sees the connection open.

        slack_sdk's built-in client reports itself connected at the HTTP 101 and does not
        wait for ``hello``; an event posted in between must still reach the app. Taking
        the positions only after the 101 (as an RTM connection may, whose clients wait
        for ``hello``) would put such an event before the link's start: lost.
        :meth:`serve` uses the outcome kept here (a refusal is still a close code).
        """
        self.admissions[ws] = await self._admission(request.path)

    async def _admission(self, path: str) -> Admission:
        gateway = self.gateway
        if gateway.stopping or gateway.region_drain.draining:
            return Refusal("draining", "", 0, "")  # serve() says disconnect itself
        query = parse_qs(urlparse(path).query)
        try:
            ticket = gateway.listener.verifier.verify((query.get("ticket") or [""])[0], time.time())
            if not ticket.app or (query.get("app_id") or [ticket.app])[0] != ticket.app:
                raise InvalidTicket("not a Socket Mode ticket")
        except InvalidTicket as exc:
            return Refusal("invalid_ticket", "invalid_ticket", CloseCode.INVALID_TICKET, str(exc))
        too_many = self._too_many(ticket.app)
        if too_many is not None:
            return too_many
        try:
            request: dict[str, Any] = {"user": ticket.user, "app": ticket.app}
            if ticket.resume:
                request["resume"] = ticket.resume
            boot = await gateway.webapp.call("/internal/bootstrap", request)
        except Exception as exc:
            log.warning("bootstrap for app %s failed: %s", ticket.app, exc)
            return Refusal(
                "bootstrap_failed",
                "bootstrap_failed",
                CloseCode.BOOTSTRAP_FAILED,
                "bootstrap failed, call apps.connections.open again",
            )
        return Admitted(ticket, boot)

    def _too_many(self, app_id: str) -> Refusal | None:
        link = self.links.get(app_id)
        if link is not None and len(link.conns) >= MAX_CONNECTIONS_PER_APP:
            return Refusal(
                "too_many",
                "socket_mode_too_many_connections",
                CloseCode.TOO_MANY_CONNECTIONS,
                f"at most {MAX_CONNECTIONS_PER_APP} connections per app",
            )
        return None

    async def serve(self, ws: ClientConnection) -> None:
        """One Socket Mode connection, from its ticket to its close."""
        admission = await self._admission_now(ws)
        if isinstance(admission, Refusal):
            await self._refuse(ws, admission)
            return
        link, sid = self._attach(ws, admission)
        self.connects.labels("ok").inc()
        try:
            await ws.send(json.dumps(self._hello(link)))
            self._send(link, link.book.open(sid, time.monotonic()))
            async for message in ws:
                self._handle_frame(link, message)
        except ConnectionClosed:
            pass
        finally:
            self._detach(link, sid)

    async def _admission_now(self, ws: ClientConnection) -> Admitted | Refusal:
        """The admission made before the upgrade, checked again: the gateway may have begun draining,
        or other connections of the app arrived, meanwhile."""
        gateway = self.gateway
        admission = self.admissions.pop(ws, None)
        if admission is None:  # not admitted before the upgrade (no admit hook): do it now
            admission = await self._admission(ws.request.path if ws.request is not None else "")
        if isinstance(admission, Admitted) and (gateway.stopping or gateway.region_drain.draining):
            admission = Refusal("draining", "", 0, "")  # began draining during the upgrade
        if isinstance(admission, Admitted):
            admission = self._too_many(admission.ticket.app) or admission  # others connected meanwhile
        return admission

    async def _refuse(self, ws: ClientConnection, refusal: Refusal) -> None:
        """Close a refused connection: a draining gateway asks for a refresh, anything else is an error."""
        self.connects.labels(refusal.outcome).inc()
        if refusal.outcome == "draining":
            await self._disconnect(ws, "refresh_requested")
            return
        self.gateway.metrics.error(refusal.error)
        await ws.close(refusal.code, refusal.reason)

    def _attach(self, ws: ClientConnection, admission: Admitted) -> tuple[AppLink, int]:
        """Add the connection to its app's link (made on the app's first connection here); returns it and the sid."""
        gateway = self.gateway
        ticket, boot = admission.ticket, admission.boot
        now = time.monotonic()
        link = self.links.get(ticket.app)
        if link is None:
            link = self._link(boot, now)
        elif boot.get("resumed"):  # moved here while a link exists: replay from the recorded seqs too
            for channel in boot["channels"]:
                gateway.apply(gateway.state.join(ticket.user, str(channel["id"]), int(channel.get("seq", 0))))
        link.book.take_over(list(boot.get("carried") or []), now)
        sid = next(gateway.listener.sids)
        gateway.sockets[sid] = ws  # the keepalive sweep pings it like any client
        link.conns[sid] = ClientSocket(
            ws,
            sid,
            gateway.args.max_client_buffer_bytes,
            gateway.args.max_client_buffer_frames,
            gateway.listener.cut_off,
            gateway.cork,
        )
        link.idle_since = None
        return link, sid

    def _hello(self, link: AppLink) -> dict[str, Any]:
        return {
            "type": "hello",
            "num_connections": len(link.conns),
            "debug_info": {
                "host": self.gateway.instance_id,
                "build_number": BUILD_NUMBER,
                "approximate_connection_time": 18060,
            },
            "connection_info": {"app_id": link.profile.id},
        }

    def _detach(self, link: AppLink, sid: int) -> None:
        """The connection closed: the link forgets it (what it had not acknowledged is retried on another, on time)."""
        self.gateway.sockets.pop(sid, None)
        link.conns.pop(sid, None)
        link.book.close(sid)
        if not link.conns:
            link.idle_since = time.monotonic()

    def _link(self, boot: dict[str, Any], now: float) -> AppLink:
        gateway = self.gateway
        profile = AppProfile.from_bootstrap(boot)
        book = EnvelopeBook()
        session = Session(
            sid=next(gateway.listener.sids), user=profile.bot_user, team=profile.team, write=lambda frame: True
        )
        link = AppLink(profile, session, book)
        session.write = lambda frame: self._on_event(link, frame)
        self.links[profile.id] = link
        self.by_sid[session.sid] = link
        channels = [(str(c["id"]), int(c.get("seq", 0))) for c in boot["channels"]]
        until = {str(ch): int(seq) for ch, seq in (boot.get("until") or {}).items()}  # leaves still owed up to
        gateway.apply(gateway.state.attach(session, channels, until))
        return link

    def _on_event(self, link: AppLink, frame: bytes) -> bool:
        """The bot's session received an event: the app's envelopes for it."""
        try:
            event = json.loads(_payload_of(frame))
        except ValueError:
            return True
        if not isinstance(event, dict):
            return True
        now = time.monotonic()
        for app_event in app_events(link.profile, event):
            self._send(link, link.book.add(event_callback(link.profile, app_event, time.time()), now))
        return True

    def _handle_frame(self, link: AppLink, message: str | bytes) -> None:
        """An app's frame: an acknowledgement ``{"envelope_id": …}`` (a ``payload`` is ignored);
        anything else is counted and the connection goes on."""
        envelope_id = acked_envelope(message)
        if envelope_id is None:
            self.gateway.metrics.error("socket_mode_bad_frame")
            return
        link.book.ack(envelope_id)

    def _send(self, link: AppLink, sends: list[Send]) -> None:
        for send in sends:
            client = link.conns.get(send.conn)
            if client is not None:
                client.write(text_frame(send.text().encode()))

    # -- time ------------------------------------------------------------------------------
    async def tick_loop(self) -> None:
        while True:
            await asyncio.sleep(ACK_CHECK_INTERVAL_S)
            now = time.monotonic()
            for app_id, link in list(self.links.items()):
                self._send(link, link.book.tick(now))
                self._count(app_id, link)
                if link.idle_since is not None and now - link.idle_since > APP_IDLE_KEEP_S:
                    self._drop(link)

    def _count(self, app_id: str, link: AppLink) -> None:
        stats = vars(link.book.stats)
        seen = self._reported.setdefault(app_id, {})
        for outcome, value in stats.items():
            if outcome == "unknown_acks":
                continue
            if value > seen.get(outcome, 0):
                self.envelopes.labels(outcome).inc(value - seen.get(outcome, 0))
                seen[outcome] = value

    def _drop(self, link: AppLink) -> None:
        self._count(link.profile.id, link)
        self.links.pop(link.profile.id, None)
        self._reported.pop(link.profile.id, None)
        self.by_sid.pop(link.session.sid, None)
        self.gateway.apply(self.gateway.state.detach(link.session))

    # -- moving ------------------------------------------------------------------------------
    async def move(self, session: Session, where: dict[str, int], reason: str) -> None:
        """The gateway moves its clients (the session is already detached at ``where``):
        leave the app's resume record with its unacknowledged envelopes, then disconnect."""
        link = self.by_sid.get(session.sid)
        if link is None:
            return
        self._count(link.profile.id, link)
        self.links.pop(link.profile.id, None)
        self._reported.pop(link.profile.id, None)
        self.by_sid.pop(session.sid, None)
        carried = link.book.hand_over(time.monotonic())
        rid = ""
        try:
            reply = await asyncio.wait_for(
                self.gateway.webapp.call(
                    "/internal/resume",
                    {"user": session.user, "app": link.profile.id, "channels": where, "envelopes": carried},
                ),
                self.gateway.args.resume_timeout_s,
            )
            rid = str(reply.get("resume") or "")
        except Exception as exc:
            self.gateway.mover.resume_failures.inc()
            log.warning("resume record for app %s not taken: %s", link.profile.id, exc)
        kind = "warning" if self.gateway.stopping else "refresh_requested"
        told = await asyncio.gather(
            *(self._disconnect(c.ws, kind) for c in list(link.conns.values())), return_exceptions=True
        )
        if rid and not any(t is True for t in told):
            # Every connection of the app had closed by itself: it reconnects fresh, and the record
            # left pending would be claimed by the app's next move and replay old events (drain.py).
            self.gateway.mover.goodbye_missed.inc()
            await self.gateway.withdraw_resume(link.profile.id, rid)
        self.gateway.mover.moved.labels(reason).inc()

    async def _disconnect(self, ws: Any, reason: str) -> bool:
        """Slack's ``disconnect``, then a 1001 close after a grace (the SDK reconnects first).
        False if the connection had closed before the ``disconnect`` could be sent."""
        if ws.state is not State.OPEN:
            return False
        try:
            await ws.send(
                json.dumps({"type": "disconnect", "reason": reason, "debug_info": {"host": self.gateway.instance_id}})
            )
        except ConnectionClosed:
            return False
        try:
            await asyncio.wait_for(ws.wait_closed(), DISCONNECT_GRACE_S)
        except TimeoutError:
            await ws.close(CloseCode.GOING_AWAY, f"socket mode {reason}")
        return True
