"""What a client sends over its websocket, and what the gateway does with it.

Client frames are JSON objects ``{"id": N, "type": ...}`` (Slack's RTM
protocol, see SLACK_COMPAT.md):

``ping``
    Answered ``{"type": "pong", "reply_to": N, ...}`` with the other fields
    echoed.
``typing`` ``{"channel": C}``
    A transient event: no webapp, no database, no ``seq``. Routed by the ring
    straight to C's Channel Server as a ``pub`` with ``seq`` nil and
    ``ctl = {"from": U}``; the CS fans it out like any event and each
    gateway writes ``{"type": "user_typing", "channel": C, "user": U}`` to
    C's local sockets except U's own. Only for a channel the connection is
    subscribed to; at most :data:`TYPING_RATE_PER_S` per connection (bursts of
    :data:`TYPING_BURST`); dropped, never queued, when over the limit or when
    the link to the CS is not up. Never answered, as in Slack. Each outcome
    is counted in ``rtm_gw_typing_total{outcome}``.
``message`` ``{"channel": C, "text": T, "thread_ts"?: ts}``
    Posted on the user's behalf through the webapp (``chat.postMessage``,
    persisted with a seq like any post), in a task so the read loop never
    waits; answered ``{"ok": true, "reply_to": N, "ts": ..., "text": T}`` or
    ``{"ok": false, "reply_to": N, "error": {"code": n, "msg": ...}}`` where
    ``msg`` is the Slack error code when the webapp refused the post.
``presence_sub`` ``{"ids": [U, ...]}`` / ``presence_query`` ``{"ids": [...]}`` (at most 500)
    Handed to :mod:`gateway.presence`: the sub replaces the connection's
    watch set; both are answered with ``presence_change`` events.

Anything else gets an error (``reply_to`` when the frame had an ``id``, else
a ``{"type": "error"}`` event); invalid JSON, also JSON nested deeper than
the parser goes (64 KiB of ``[``), gets an error event with code 1 and the
socket stays open; a binary frame closes the socket with 1003. See :class:`ClientError` for the codes.
"""

from __future__ import annotations

import itertools
import json
import logging
import time
import weakref
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from enum import IntEnum
from typing import TYPE_CHECKING, Any, Protocol

from gateway.presence import MAX_QUERY_IDS as MAX_PRESENCE_QUERY_IDS
from gateway.presence import MAX_SUB_IDS as MAX_PRESENCE_SUB_IDS
from gateway.state import Session, text_frame
from gateway.webapp_client import WebappCalls
from services.authz import typing_json
from services.errors import CloseCode, ConnectionLost, PeerError, SendBufferFull
from services.metrics import ServiceMetrics

if TYPE_CHECKING:
    from websockets.asyncio.server import ServerConnection

log = logging.getLogger("rtm.gateway.client")

# Slack's clients send a typing indicator every few seconds while a user types;
# one per second per connection, with a small burst for switching channels,
# covers that and keeps a misbehaving client from flooding a channel's members.
TYPING_RATE_PER_S = 1.0
TYPING_BURST = 3
# Slack's documented RTM limit: about one message per second per connection,
# short bursts allowed; past it a send is refused (code RATE_LIMITED).
MESSAGE_RATE_PER_S = 1.0
MESSAGE_BURST = 20
# Messages a connection may have in flight to the webapp at once; beyond this
# a send is refused (code RATE_LIMITED) rather than queued without bound.
MAX_PENDING_SENDS = 16
KNOWN_TYPES = frozenset({"ping", "typing", "message", "presence_sub", "presence_query"})


class ClientError(IntEnum):
    """``error.code`` in replies and error events."""

    INVALID_JSON = 1  # not a JSON object
    UNSUPPORTED_TYPE = 2  # a ``type`` the gateway does not handle
    BAD_MESSAGE = 3  # a ``message`` without a channel or text
    RATE_LIMITED = 4  # too many messages in flight on this connection
    SEND_FAILED = 5  # the webapp refused the post (msg: its Slack error code) or could not be reached
    BAD_IDS = 6  # presence_sub / presence_query: ids is not a list of user ids, or too long


@dataclass
class TokenBucket:
    """``burst`` tokens, refilled at ``rate_per_s``; one per typing event."""

    rate_per_s: float
    burst: float
    tokens: float
    at: float

    def take(self, now: float) -> bool:
        self.tokens = min(self.burst, self.tokens + (now - self.at) * self.rate_per_s)
        self.at = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return True
        return False


class TypingConnection(Protocol):
    def send(self, message: dict[str, Any]) -> None: ...


class TypingLink(Protocol):
    """A link to a channel server, as a typing indicator uses it (:class:`services.connection.PeerLink`)."""

    @property
    def conn(self) -> TypingConnection | None: ...

    @property
    def connected(self) -> bool: ...


class PresenceFrames(Protocol):
    """Where ``presence_sub`` and ``presence_query`` go (:class:`gateway.presence.GatewayPresence`)."""

    def subscribe(self, session: Session, ids: list[str]) -> None: ...

    def query(self, session: Session, ids: list[str]) -> None: ...


class ClientGateway(Protocol):
    """What :class:`ClientMessages` uses of the gateway."""

    @property
    def metrics(self) -> ServiceMetrics: ...

    @property
    def webapp(self) -> WebappCalls: ...

    @property
    def presence(self) -> PresenceFrames: ...

    def spawn(self, coro: Coroutine[Any, Any, Any]) -> None: ...

    def owner_for(self, channel: str) -> str | None: ...

    def link_to(self, owner: str) -> TypingLink: ...


class ClientMessages:
    """Handles one gateway's client frames. Per-connection state (typing budget,
    sends in flight) lives in weak maps keyed by the session, so it goes away
    with the connection without a hook in the connection's teardown."""

    def __init__(self, gateway: ClientGateway, clock: Callable[[], float] = time.monotonic) -> None:
        self.gw = gateway
        self.clock = clock  # for the typing and message budgets
        metrics = gateway.metrics
        self.client_msgs = metrics.counter("rtm_gw_client_messages_total", "Frames received from clients", ["type"])
        self.typing = metrics.counter("rtm_gw_typing_total", "Typing indicators from clients by outcome", ["outcome"])
        self.sends = metrics.counter(
            "rtm_gw_client_sends_total", "Messages sent over websockets by outcome", ["outcome"]
        )
        self.buckets: weakref.WeakKeyDictionary[Session, TokenBucket] = weakref.WeakKeyDictionary()
        self.in_flight: weakref.WeakKeyDictionary[Session, int] = weakref.WeakKeyDictionary()
        self.message_buckets: weakref.WeakKeyDictionary[Session, TokenBucket] = weakref.WeakKeyDictionary()
        # Typing pubs are requests (a CS serves only requests) that nobody awaits:
        # negative ids, which PeerConnection never allocates, so the CS's reply
        # matches no pending request and is dropped.
        self._typing_ids = itertools.count(-1, -1)

    # -- dispatch ---------------------------------------------------------------------
    def handle(self, ws: ServerConnection, session: Session, message: str | bytes) -> None:
        gw = self.gw
        if isinstance(message, bytes):
            self.client_msgs.labels("binary").inc()
            gw.metrics.error("client_binary_frame")
            gw.spawn(ws.close(CloseCode.UNSUPPORTED_DATA, "binary frames are not supported"))
            return
        try:
            frame = json.loads(message)
            if not isinstance(frame, dict):
                raise ValueError("not an object")
        except (ValueError, RecursionError):  # RecursionError: nesting deeper than the parser goes ("[[[[...")
            self.client_msgs.labels("invalid").inc()
            gw.metrics.error("client_invalid_json")
            self.send(
                session,
                {
                    "type": "error",
                    "error": {"code": ClientError.INVALID_JSON, "msg": "invalid JSON: expected an object"},
                },
            )
            return
        kind = frame.get("type")
        self.client_msgs.labels(kind if kind in KNOWN_TYPES else "other").inc()
        if kind == "ping":
            reply = {k: v for k, v in frame.items() if k not in ("type", "id")}
            reply.update(type="pong", reply_to=frame.get("id"))
            self.send(session, reply)
        elif kind == "typing":
            self.handle_typing(session, frame)
        elif kind == "message":
            self.handle_message(session, frame)
        elif kind in ("presence_sub", "presence_query"):
            self.handle_presence(session, frame, kind)
        else:
            gw.metrics.error("client_unsupported_type")
            self.error(session, frame, ClientError.UNSUPPORTED_TYPE, f"unsupported message type: {kind!r}")

    def send(self, session: Session, body: dict[str, Any]) -> None:
        session.write(text_frame(json.dumps(body).encode()))

    def error(self, session: Session, frame: dict[str, Any], code: ClientError, msg: str) -> None:
        error = {"code": int(code), "msg": msg}
        if "id" in frame:
            self.send(session, {"ok": False, "reply_to": frame["id"], "error": error})
        else:
            self.send(session, {"type": "error", "error": error})

    # -- typing -----------------------------------------------------------------------
    def handle_typing(self, session: Session, frame: dict[str, Any]) -> None:
        """Route a typing indicator to the channel's CS; drop it on any obstacle."""
        channel = frame.get("channel")
        if not isinstance(channel, str) or not session.member_of(channel) or channel in (session.user, session.team):
            self.typing.labels("not_subscribed").inc()
            return
        now = self.clock()
        bucket = self.buckets.get(session)
        if bucket is None:
            bucket = self.buckets[session] = TokenBucket(TYPING_RATE_PER_S, TYPING_BURST, TYPING_BURST, now)
        if not bucket.take(now):
            self.typing.labels("rate_limited").inc()
            return
        owner = self.gw.owner_for(channel)
        if owner is None:
            self.typing.labels("no_owner").inc()
            return
        link = self.gw.link_to(owner)
        conn = link.conn
        if conn is None or not link.connected:
            self.typing.labels("not_connected").inc()
            return
        payload = typing_json(channel, session.user)  # the only bytes a channel server takes from a gateway
        try:
            conn.send(
                {
                    "op": "pub",
                    "id": next(self._typing_ids),
                    "ch": channel,
                    "seq": None,
                    "json": payload,
                    "t0": time.time(),
                    "ctl": {"from": session.user},
                }
            )
        except (ConnectionLost, SendBufferFull):
            self.typing.labels("not_connected").inc()
            return
        self.typing.labels("sent").inc()

    # -- presence (gateway/presence.py does the work) -----------------------------------
    def handle_presence(self, session: Session, frame: dict[str, Any], kind: str) -> None:
        ids = frame.get("ids", [])
        limit = MAX_PRESENCE_QUERY_IDS if kind == "presence_query" else MAX_PRESENCE_SUB_IDS
        if not isinstance(ids, list) or len(ids) > limit or not all(isinstance(i, str) and i for i in ids):
            self.error(session, frame, ClientError.BAD_IDS, f"ids must be a list of at most {limit} user ids")
            return
        if kind == "presence_sub":
            self.gw.presence.subscribe(session, ids)
        else:
            self.gw.presence.query(session, ids)

    # -- messages -----------------------------------------------------------------------
    def handle_message(self, session: Session, frame: dict[str, Any]) -> None:
        channel, text = frame.get("channel"), frame.get("text")
        if not isinstance(channel, str) or not channel:
            self.sends.labels("bad_message").inc()
            self.error(session, frame, ClientError.BAD_MESSAGE, "channel is missing")
            return
        if not isinstance(text, str) or not text:
            self.sends.labels("bad_message").inc()
            self.error(session, frame, ClientError.BAD_MESSAGE, "message text is missing")
            return
        now = self.clock()
        bucket = self.message_buckets.get(session)
        if bucket is None:
            bucket = self.message_buckets[session] = TokenBucket(MESSAGE_RATE_PER_S, MESSAGE_BURST, MESSAGE_BURST, now)
        if not bucket.take(now):
            self.sends.labels("rate_limited").inc()
            self.error(
                session, frame, ClientError.RATE_LIMITED, "rate limited: about one message per second, with bursts"
            )
            return
        pending = self.in_flight.get(session, 0)
        if pending >= MAX_PENDING_SENDS:
            self.sends.labels("rate_limited").inc()
            self.error(session, frame, ClientError.RATE_LIMITED, "too many messages in flight")
            return
        # the ticket's token id: the webapp posts only for a live token of this user (internal.py)
        args: dict[str, Any] = {"user": session.user, "token_id": session.token_id, "channel": channel, "text": text}
        for name in ("thread_ts", "reply_broadcast"):
            if name in frame:
                args[name] = frame[name]
        self.in_flight[session] = pending + 1
        self.gw.spawn(self._post(session, frame, args))

    async def _post(self, session: Session, frame: dict[str, Any], args: dict[str, Any]) -> None:
        try:
            reply = await self.gw.webapp.call("/internal/call/chat.postMessage", args)
        except PeerError as exc:
            self.sends.labels("refused").inc()
            self.error(session, frame, ClientError.SEND_FAILED, exc.code)
        except Exception as exc:  # the webapp is unreachable, slow or broken
            log.warning("message from %s over the websocket failed: %s", session.user, exc)
            self.sends.labels("failed").inc()
            self.gw.metrics.error("client_send_failed")
            self.error(session, frame, ClientError.SEND_FAILED, "webapp unavailable, try again")
        else:
            self.sends.labels("ok").inc()
            self.send(session, {"ok": True, "reply_to": frame.get("id"), "ts": reply.get("ts"), "text": args["text"]})
        finally:
            left = self.in_flight.get(session, 1) - 1
            if left > 0:
                self.in_flight[session] = left
            else:
                self.in_flight.pop(session, None)
