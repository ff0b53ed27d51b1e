"""The one module that owns msgpack sockets and their timeouts.

* :class:`PeerConnection` is an ``asyncio.Protocol`` around the sans-I/O
  :class:`services.wire.FrameDecoder`: request/reply with ids and deadlines,
  pushes, pre-encoded frame writes for fan-out, a bounded send buffer (a peer
  that lets it overflow is disconnected, never waited for), and a clean
  disconnect on any framing error (logged and counted by the owner's
  ``on_protocol_error``).
* :func:`serve` accepts connections; :func:`connect` dials one. Both speak
  mutual TLS with the fleet's CA (a :class:`services.tls.WireTrust`): a server
  hands a connection to its protocol only after the peer's certificate is
  verified (:class:`services.tls_gate.TlsGate`), and
  :attr:`PeerConnection.identity` is the identity it names.
  A peer that fails the handshake (no certificate, another CA, expired, no
  fleet identity) or does not finish it within the handshake timeout is
  disconnected and reported to ``on_refused`` (counted as
  ``rtm_errors_total{kind="auth"}``), and logged at most once per source
  address per minute.
* :class:`PeerLink` keeps one outbound connection alive: reconnects with
  exponential backoff and full jitter, and runs an ``on_connected`` hook
  (resubscribe, say) after every (re)connect.

Limits on every connection (:class:`PeerLimits`, docs/wire.md "Limits"): the
frame limit (a bigger length header is refused before anything is
buffered); a frame begun must be complete within ``frame_timeout_s`` (a
peer that sends 3 bytes and stalls is cut off); a connection that hears
nothing for ``idle_timeout_s`` is closed, and each side sends a ``ping``
push (the keepalive, never dispatched) when it has sent nothing for
``keepalive_interval_s``; at most ``max_requests_in_flight`` requests of
one peer are being served at once: at the cap the connection stops reading
(TCP backpressure) and a request beyond it in the same read is answered
``err unavailable``. A request or push whose fields break
:mod:`services.ops` (a :class:`services.errors.BadMessage` from its
handler) is answered ``err bad_request`` or dropped, and counted through
``on_bad_message``; the connection stays up.

Why one module of about 700 lines: it is the one place that owns msgpack
sockets and their timeouts (DESIGN.md), and its parts share one lifecycle.
:class:`PeerConnection` is a single ``asyncio.Protocol`` whose limits (frame
deadline, idle timeout, keepalive, in-flight cap, send buffer) act on the same
transport and decoder inside the same callbacks; :func:`serve` and
:func:`connect` build it, and :class:`PeerLink` is its reconnecting owner
that every service links through. The part that stands alone, the server's
TLS handshake gate, is :mod:`services.tls_gate`.
"""

from __future__ import annotations

import asyncio
import collections
import functools
import inspect
import itertools
import logging
import random
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from services import wire
from services.errors import (
    BadMessage,
    ConnectionLost,
    ErrorCode,
    FrameTimeout,
    IdleTimeout,
    MalformedFrame,
    NotTrusted,
    ProtocolError,
    RequestTimeout,
    SendBufferFull,
    error_from_reply,
)
from services.identity import BadIdentity, PeerIdentity
from services.tls import WireTrust, transport_identity
from services.tls_gate import RefusedHandler, TlsGate

log = logging.getLogger("rtm.connection")


DEFAULT_REQUEST_TIMEOUT_S = 5.0
# A peer whose unsent bytes pass this bound is too slow: it is disconnected
# (and catches up from history when it comes back) rather than buffered for.
DEFAULT_MAX_SEND_BUFFER_BYTES = 16 * 1024 * 1024
CONNECT_TIMEOUT_S = 3.0
RECONNECT_INITIAL_DELAY_S = 0.05
RECONNECT_MAX_DELAY_S = 2.0
# Requests of one peer being served at once (async handlers). The webapp's
# hand-off pipelines at most 256, so a well-behaved peer never reaches it.
MAX_REQUESTS_IN_FLIGHT = 1024
# A frame whose first byte arrived must be complete within this: 4 MiB at
# 1 MB/s takes 4 s; a peer that sends part of a frame and stalls holds a
# buffer and a socket for nothing.
FRAME_TIMEOUT_S = 10.0
# A connection that hears nothing (no frame, no keepalive) for this long is
# closed: the peer is gone or stuck. Checked once per keepalive interval.
IDLE_TIMEOUT_S = 60.0
# Each side sends a ``ping`` push when it has sent nothing for this long, so
# a quiet but healthy link is never taken for an idle one.
KEEPALIVE_INTERVAL_S = 10.0
KEEPALIVE_FRAME = wire.encode({"op": "ping"})
# The connection's own receive buffer: the loop reads (plaintext) or decrypts (TLS) into it,
# up to this much per read, as uvloop reads 256 KiB per recv. Owning it matters with TLS:
# for a protocol without one, uvloop's TLS layer calls ``SSLObject.read(256 KiB)``, which
# allocates a fresh 256 KiB bytes object for every record (an mmap and munmap each, or a
# consolidating malloc: ~13 µs a record, more than the decryption; docs/trust.md).
READ_BUFFER_BYTES = 256 * 1024
# A deadline timer may fire up to this much early (the loop's timers have millisecond
# resolution): requests due within it are timed out then, rather than rearming for them.
DEADLINE_SLACK_S = 0.001
# Empty timeout groups (RequestDeadlines) a connection keeps, each with its timer armed, so that the
# next request with that timeout needs no new timer; past it an emptied group is dropped at once.
MAX_IDLE_TIMEOUT_GROUPS = 8


class RequestDeadlines:
    """The deadlines of one connection's requests that share one timeout, oldest first.

    Sans I/O: times come in as arguments. Requests with the same timeout fall due in the
    order they were made, so one timer (armed by the connection for :meth:`next_due`)
    serves all of them: a request costs an insertion and a removal, not a timer of its
    own (a loop timer and its cancellation cost ~5 µs each under uvloop; issue 17).
    """

    __slots__ = ("timeout_s", "_due", "timer")

    def __init__(self, timeout_s: float) -> None:
        self.timeout_s = timeout_s
        self._due: collections.OrderedDict[int, tuple[float, Any]] = collections.OrderedDict()  # id -> (due, op)
        self.timer: asyncio.TimerHandle | None = None  # the connection's, armed for next_due()

    def __len__(self) -> int:
        return len(self._due)

    def add(self, request_id: int, now: float, op: Any = None) -> None:
        """``request_id`` (an ``op``) was sent at ``now`` (``now`` never goes back between calls)."""
        self._due[request_id] = (now + self.timeout_s, op)

    def discard(self, request_id: int) -> None:
        """``request_id`` was answered (or given up): it will not time out."""
        self._due.pop(request_id, None)

    def next_due(self) -> float | None:
        """When the oldest request falls due, or None when none waits."""
        for due, _ in self._due.values():
            return due
        return None

    def expire(self, now: float) -> list[tuple[int, Any]]:
        """Remove and return the requests (id, op) due by ``now`` (within :data:`DEADLINE_SLACK_S`), oldest first."""
        out: list[tuple[int, Any]] = []
        due = self._due
        limit = now + DEADLINE_SLACK_S
        while due:
            request_id, (when, op) = next(iter(due.items()))
            if when > limit:
                break
            due.popitem(last=False)
            out.append((request_id, op))
        return out


@dataclass(frozen=True)
class PeerLimits:
    """Per-connection caps and timeouts (flags ``--max-peer-requests-in-flight``,
    ``--peer-frame-timeout-s``, ``--peer-idle-timeout-s``, ``--peer-keepalive-interval-s``)."""

    max_requests_in_flight: int = MAX_REQUESTS_IN_FLIGHT
    frame_timeout_s: float = FRAME_TIMEOUT_S
    idle_timeout_s: float = IDLE_TIMEOUT_S
    keepalive_interval_s: float = KEEPALIVE_INTERVAL_S

    @classmethod
    def from_args(cls, args: Any) -> PeerLimits:
        """From a service's parsed flags (services.config.service_parser adds them)."""
        return cls(
            max_requests_in_flight=int(getattr(args, "max_peer_requests_in_flight", MAX_REQUESTS_IN_FLIGHT)),
            frame_timeout_s=float(getattr(args, "peer_frame_timeout_s", FRAME_TIMEOUT_S)),
            idle_timeout_s=float(getattr(args, "peer_idle_timeout_s", IDLE_TIMEOUT_S)),
            keepalive_interval_s=float(getattr(args, "peer_keepalive_interval_s", KEEPALIVE_INTERVAL_S)),
        )


DEFAULT_LIMITS = PeerLimits()

Message = dict[str, Any]
RequestHandler = Callable[["PeerConnection", Message], "Message | Awaitable[Message] | None"]
PushHandler = Callable[["PeerConnection", Message], None]
CloseHandler = Callable[["PeerConnection", "BaseException | None"], None]
ErrorHandler = Callable[["PeerConnection", BaseException], None]
BadMessageHandler = Callable[["PeerConnection", BadMessage, bool], None]  # (conn, error, was_request)
BurstHandler = Callable[[bool], None]


def _ignore_push(conn: PeerConnection, msg: Message) -> None:
    log.debug("%s: push %s ignored", conn.name, msg.get("op"))


def _refuse_request(conn: PeerConnection, msg: Message) -> Message:
    return wire.reply_err(int(msg["id"]), ErrorCode.UNKNOWN_OP, f"no requests served here ({msg.get('op')})")


def set_nodelay(transport: asyncio.BaseTransport) -> None:
    """Turn Nagle off on ``transport``'s socket: frames leave at once (a socket without one, or
    that refuses the option, is left as it is)."""
    sock = transport.get_extra_info("socket")
    if sock is not None:
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            pass


class PeerConnection(asyncio.BufferedProtocol):
    """One msgpack/TCP connection, either side.

    A buffered protocol: the loop reads into this connection's buffer
    (:meth:`get_buffer`, :data:`READ_BUFFER_BYTES`), and :meth:`buffer_updated`
    hands what arrived to :meth:`data_received`, which the frame decoder copies.
    """

    def __init__(
        self,
        *,
        name: str = "peer",
        on_request: RequestHandler = _refuse_request,
        on_push: PushHandler = _ignore_push,
        on_close: CloseHandler | None = None,
        on_protocol_error: ErrorHandler | None = None,
        on_burst: BurstHandler | None = None,
        max_frame_bytes: int = wire.DEFAULT_MAX_FRAME_BYTES,
        max_send_buffer_bytes: int = DEFAULT_MAX_SEND_BUFFER_BYTES,
        limits: PeerLimits = DEFAULT_LIMITS,
        on_bad_message: BadMessageHandler | None = None,
        coalesce_writes: bool = False,
    ) -> None:
        self.name = name
        # Corked writes: frames written in one event-loop turn leave in one
        # transport write (one syscall) at the end of the turn, instead of one each.
        self.coalesce_writes = coalesce_writes
        self._out: list[bytes] = []
        self._out_bytes = 0
        self._deferred = 0  # requests answered through a future's callback (no task each)
        self.on_request = on_request
        self.on_push = on_push
        # Called with True before and False after dispatching the frames of one read
        # that held more than one frame: lets a receiver batch its own output
        # (the gateway writes a burst of events to each client socket at once).
        self.on_burst = on_burst
        self.on_close = on_close
        self.on_protocol_error = on_protocol_error
        self.max_send_buffer_bytes = max_send_buffer_bytes
        self.decoder = wire.FrameDecoder(max_frame_bytes)
        self.transport: asyncio.Transport | None = None
        self.peer: str = "?"
        self._ids = itertools.count(1)
        self._pending: dict[int, tuple[asyncio.Future[Message], RequestDeadlines]] = {}
        self._deadlines: dict[float, RequestDeadlines] = {}  # by timeout: one timer each
        self._tasks: set[asyncio.Task[None]] = set()
        # The loop, looked up once: asyncio.get_running_loop() costs a getpid() system call
        # on every call in Python 3.11 (its fork check).
        self._loop = asyncio.get_event_loop()
        self.closed: asyncio.Future[None] = self._loop.create_future()
        self.close_reason: BaseException | None = None
        self.state: dict[str, Any] = {}  # owner's per-connection data (e.g. gateway id)
        # The peer's verified certificate identity (None on a plaintext wire, --wire-tls off).
        self.identity: PeerIdentity | None = None
        self.limits = limits
        self.on_bad_message = on_bad_message
        self._read_view: memoryview | None = None
        self._init_limits()

    # -- asyncio.Protocol ---------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's transports are not asyncio.Transport subclasses
        set_nodelay(transport)
        peername = transport.get_extra_info("peername")
        if peername:
            self.peer = f"{peername[0]}:{peername[1]}"
        try:
            self.identity = transport_identity(transport)
        except BadIdentity:  # a server checked it before handing the connection over; a client checks in connect()
            self.identity = None
        self._start_keepalive()

    def get_buffer(self, sizehint: int) -> memoryview:
        view = self._read_view
        if view is None:  # allocated at the first read: a connection that never reads holds none
            view = self._read_view = memoryview(bytearray(READ_BUFFER_BYTES))
        return view

    def buffer_updated(self, nbytes: int) -> None:
        assert self._read_view is not None
        self.data_received(self._read_view[:nbytes])

    def data_received(self, data: bytes | memoryview) -> None:
        """Bytes from the peer (the decoder copies them: ``data`` may be the reused read buffer)."""
        self._heard = True
        frames = self.decoder.feed(data)
        self._watch_partial_frame(len(frames))
        burst = self.on_burst is not None and len(frames) > 1
        if burst:
            self.on_burst(True)  # type: ignore[misc]
        try:
            for frame in frames:
                if not self.is_open:
                    return
                self._dispatch(frame)
        finally:
            if burst:
                self.on_burst(False)  # type: ignore[misc]
        if self.decoder.error is not None:
            self._fail(self.decoder.error)

    def _fail(self, error: ProtocolError) -> None:
        """The peer broke the protocol: log, count (through the owner), disconnect."""
        if not self.is_open:
            return
        log.warning("%s: protocol error from %s: %s; disconnecting", self.name, self.peer, error)
        if self.on_protocol_error is not None:
            self.on_protocol_error(self, error)
        self.abort(error)

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        self._stop_limit_timers()
        reason = self.close_reason or exc
        for deadlines in self._deadlines.values():
            if deadlines.timer is not None:
                deadlines.timer.cancel()
        self._deadlines.clear()
        for future, _ in self._pending.values():
            if not future.done():
                future.set_exception(ConnectionLost(f"{self.name}: connection to {self.peer} lost"))
        self._pending.clear()
        if not self.closed.done():
            self.closed.set_result(None)
        if self.on_close is not None:
            self.on_close(self, reason)

    # -- dispatch -----------------------------------------------------------
    def _dispatch(self, frame: Message) -> None:
        op = frame["op"]
        if op == "ok" or op == "err":
            reply_id = frame.get("id")
            if not isinstance(reply_id, int):
                self._fail(MalformedFrame(f"{op} reply without an integer id"))
                return
            pending = self._pending.pop(reply_id, None)
            if pending is not None:
                future, deadlines = pending
                deadlines.discard(reply_id)
                if not deadlines and len(self._deadlines) > MAX_IDLE_TIMEOUT_GROUPS:
                    self._drop_deadlines(deadlines)
                if not future.done():
                    if op == "ok":
                        future.set_result(frame)
                    else:
                        future.set_exception(error_from_reply(frame))
            return
        request_id = frame.get("id")
        if request_id is None:
            if op == "ping":
                return  # the keepalive: hearing it was the point
            self._dispatch_push(op, frame)
            return
        if not isinstance(request_id, int):
            self._fail(MalformedFrame("request id must be an integer"))
            return
        if self.requests_in_flight >= self.limits.max_requests_in_flight:
            self._refuse_over_cap(request_id, op)
            return
        try:
            result = self.on_request(self, frame)
        except BadMessage as exc:
            result = self._bad_request(request_id, exc)
        except Exception as exc:  # a handler bug must not kill the connection or the server
            log.exception("%s: handler for %s failed", self.name, op)
            result = wire.reply_err(request_id, ErrorCode.INTERNAL, f"{type(exc).__name__}: {exc}")
        if result is None:
            return
        if isinstance(result, asyncio.Future):  # answered from its callback: no task per request
            self._deferred += 1
            result.add_done_callback(functools.partial(self._future_done, request_id))
            self._apply_backpressure()
        elif inspect.isawaitable(result):
            task = asyncio.ensure_future(self._finish(request_id, result))
            self._tasks.add(task)
            task.add_done_callback(self._request_done)
            self._apply_backpressure()
        else:
            self.send(result)

    async def _finish(self, request_id: int, pending: Awaitable[Message]) -> None:
        try:
            reply = await pending
        except BadMessage as exc:
            reply = self._bad_request(request_id, exc)
        except Exception as exc:
            log.warning("%s: request %s failed: %s", self.name, request_id, exc)
            reply = wire.reply_err(request_id, ErrorCode.INTERNAL, f"{type(exc).__name__}: {exc}")
        if self.is_open:
            self.send(reply)

    def _future_done(self, request_id: int, future: asyncio.Future[Message]) -> None:
        self._deferred -= 1
        if future.cancelled():
            reply = wire.reply_err(request_id, ErrorCode.INTERNAL, "cancelled")
        else:
            exc = future.exception()
            if exc is None:
                reply = future.result()
            elif isinstance(exc, BadMessage):
                reply = self._bad_request(request_id, exc)
            else:
                log.warning("%s: request %s failed: %s", self.name, request_id, exc)
                reply = wire.reply_err(request_id, ErrorCode.INTERNAL, f"{type(exc).__name__}: {exc}")
        if self.is_open:
            try:
                self.send(reply)
            except (ConnectionLost, SendBufferFull):
                return
        self._resume_if_below_cap()

    @property
    def requests_in_flight(self) -> int:
        """Requests of this peer being served now (tasks and deferred futures)."""
        return len(self._tasks) + self._deferred

    # -- validation outcomes (services.ops) -------------------------------------
    def _dispatch_push(self, op: str, frame: Message) -> None:
        """A push: a bad one is dropped and counted, never the link."""
        try:
            self.on_push(self, frame)
        except BadMessage as exc:
            self._count_bad(exc, was_request=False)
        except Exception as exc:  # a handler bug: log it, drop this push, keep serving the link
            log.exception("%s: handling %s push from %s failed", self.name, op, self.peer)
            self._count_bad(BadMessage(op, f"{type(exc).__name__}: {exc}"), was_request=False)

    def _bad_request(self, request_id: int, exc: BadMessage) -> Message:
        self._count_bad(exc, was_request=True)
        return wire.reply_err(request_id, ErrorCode.BAD_REQUEST, f"{exc.op}: {exc.detail}")

    def _count_bad(self, exc: BadMessage, was_request: bool) -> None:
        log.warning("%s: %s from %s (%s)", self.name, exc, self.peer, "refused" if was_request else "dropped")
        if self.on_bad_message is not None:
            self.on_bad_message(self, exc, was_request)

    # -- limits: in-flight requests, half-sent frames, idle peers ------------------
    def _init_limits(self) -> None:
        self._heard = False
        self._sent = False
        self._last_heard = 0.0
        self._paused = False
        self._keepalive_timer: asyncio.TimerHandle | None = None
        self._frame_timer: asyncio.TimerHandle | None = None
        self._frames_done = 0  # frames completed, to tell a stalled partial frame from a stream of them

    def _refuse_over_cap(self, request_id: int, op: str) -> None:
        log.warning(
            "%s: %s has %d requests in flight (cap %d); refusing %s",
            self.name,
            self.peer,
            self.requests_in_flight,
            self.limits.max_requests_in_flight,
            op,
        )
        if self.on_bad_message is not None:
            self.on_bad_message(self, BadMessage(op, "over max_requests_in_flight", kind="requests_over_cap"), True)
        self.send(wire.reply_err(request_id, ErrorCode.UNAVAILABLE, "too many requests in flight; retry"))

    def _apply_backpressure(self) -> None:
        if (
            not self._paused
            and self.requests_in_flight >= self.limits.max_requests_in_flight
            and self.transport is not None
        ):
            self._paused = True
            self.transport.pause_reading()

    def _request_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        self._resume_if_below_cap()

    def _resume_if_below_cap(self) -> None:
        if self._paused and self.requests_in_flight < self.limits.max_requests_in_flight and self.is_open:
            self._paused = False
            self.transport.resume_reading()  # type: ignore[union-attr]

    def _watch_partial_frame(self, completed: int) -> None:
        """Arm the frame timer while a frame is partly received; disarm it when none is."""
        self._frames_done += completed
        if self.decoder.buffered_bytes == 0 or self.decoder.error is not None:
            if self._frame_timer is not None:
                self._frame_timer.cancel()
                self._frame_timer = None
        elif self._frame_timer is None and self.transport is not None:
            self._frame_timer = self._loop.call_later(
                self.limits.frame_timeout_s, self._frame_timed_out, self._frames_done
            )

    def _frame_timed_out(self, frames_done_when_armed: int) -> None:
        self._frame_timer = None
        if self.decoder.buffered_bytes == 0:
            return
        if self._frames_done != frames_done_when_armed:  # frames kept completing: a busy stream, not a stall
            self._frame_timer = self._loop.call_later(
                self.limits.frame_timeout_s, self._frame_timed_out, self._frames_done
            )
            return
        self._fail(
            FrameTimeout(
                f"a frame begun was not complete after {self.limits.frame_timeout_s}s "
                f"({self.decoder.buffered_bytes} bytes held)"
            )
        )

    def _start_keepalive(self) -> None:
        loop = self._loop
        self._last_heard = loop.time()
        self._keepalive_timer = loop.call_later(self.limits.keepalive_interval_s, self._keepalive_tick)

    def _keepalive_tick(self) -> None:
        """Once per keepalive interval: close a peer silent for the idle timeout; ping if we were silent."""
        self._keepalive_timer = None
        if not self.is_open:
            return
        loop = self._loop
        now = loop.time()
        if self._heard:
            self._heard = False
            self._last_heard = now
        elif now - self._last_heard >= self.limits.idle_timeout_s:
            self._fail(IdleTimeout(f"nothing received for {now - self._last_heard:.1f}s"))
            return
        if not self._sent:
            try:
                self.write(KEEPALIVE_FRAME)
            except (ConnectionLost, SendBufferFull):
                return
        self._sent = False
        self._keepalive_timer = loop.call_later(self.limits.keepalive_interval_s, self._keepalive_tick)

    def _stop_limit_timers(self) -> None:
        for timer in (self._keepalive_timer, self._frame_timer):
            if timer is not None:
                timer.cancel()
        self._keepalive_timer = self._frame_timer = None

    # -- sending ------------------------------------------------------------
    @property
    def is_open(self) -> bool:
        return self.transport is not None and not self.transport.is_closing()

    def write(self, frame: bytes) -> None:
        """Write one already-encoded frame. Raises :class:`ConnectionLost` when closed.

        Never blocks: if the peer's unsent bytes pass the bound, the peer is
        disconnected with :class:`SendBufferFull` and the write raises it.
        """
        transport = self.transport
        if transport is None or transport.is_closing():
            raise ConnectionLost(f"{self.name}: connection to {self.peer} is closed")
        self._sent = True
        if self.coalesce_writes:
            if not self._out:
                self._loop.call_soon(self.flush)
            self._out.append(frame)
            self._out_bytes += len(frame)
            pending = transport.get_write_buffer_size() + self._out_bytes
        else:
            transport.write(frame)
            pending = transport.get_write_buffer_size()
        if pending > self.max_send_buffer_bytes:
            error = SendBufferFull(pending, self.max_send_buffer_bytes)
            log.warning("%s: %s is too slow (%s); disconnecting", self.name, self.peer, error)
            self.abort(error)
            raise error

    def flush(self) -> None:
        """Write the frames corked in this turn (``coalesce_writes``) in one transport write."""
        out = self._out
        if not out:
            return
        self._out, self._out_bytes = [], 0
        transport = self.transport
        if transport is None or transport.is_closing():
            return  # the connection is gone: its pending requests fail with ConnectionLost
        transport.write(out[0] if len(out) == 1 else b"".join(out))

    def send(self, message: Message) -> None:
        self.write(wire.encode(message))

    def begin_request(self, message: Message, timeout_s: float = DEFAULT_REQUEST_TIMEOUT_S) -> asyncio.Future[Message]:
        """Write a request now; return the future of its reply.

        The request is on the wire when this returns (or it raises
        :class:`ConnectionLost` / :class:`SendBufferFull`), so a caller can get
        a request out before anything else it does in this event-loop turn.
        The future resolves to the ``ok`` reply, or fails with
        :class:`services.errors.PeerError` (or ``NotOwner``) for an ``err``
        reply, :class:`RequestTimeout` after ``timeout_s``, or
        :class:`ConnectionLost`.
        """
        loop = self._loop
        request_id = next(self._ids)
        future: asyncio.Future[Message] = loop.create_future()
        deadlines = self._deadlines.get(timeout_s)
        if deadlines is None:
            deadlines = self._deadlines[timeout_s] = RequestDeadlines(timeout_s)
        self._pending[request_id] = (future, deadlines)
        try:
            self.send({**message, "id": request_id})
        except BaseException:
            del self._pending[request_id]
            if not deadlines:
                self._deadlines.pop(timeout_s, None)
            raise
        now = loop.time()
        deadlines.add(request_id, now, message.get("op"))
        if deadlines.timer is None:
            deadlines.timer = loop.call_at(now + timeout_s, self._expire, deadlines)
        return future

    def _expire(self, deadlines: RequestDeadlines) -> None:
        """The deadline timer of one timeout: time out the requests that are due, rearm for the next."""
        deadlines.timer = None
        loop = self._loop
        for request_id, op in deadlines.expire(loop.time()):
            pending = self._pending.pop(request_id, None)
            if pending is not None and not pending[0].done():
                pending[0].set_exception(
                    RequestTimeout(f"{self.name}: {op} to {self.peer} got no reply in {deadlines.timeout_s}s")
                )
        due = deadlines.next_due()
        if due is not None:
            deadlines.timer = loop.call_at(due, self._expire, deadlines)
        else:
            self._drop_deadlines(deadlines)

    def _drop_deadlines(self, deadlines: RequestDeadlines) -> None:
        """Forget an empty timeout group (and its timer). Groups stay while they are few: callers
        that pass a computed timeout (a remaining budget) make one per request, and each would
        otherwise live, with its timer, until its timeout even when its request was answered."""
        if deadlines.timer is not None:
            deadlines.timer.cancel()
            deadlines.timer = None
        if self._deadlines.get(deadlines.timeout_s) is deadlines:
            del self._deadlines[deadlines.timeout_s]

    async def request(self, message: Message, timeout_s: float = DEFAULT_REQUEST_TIMEOUT_S) -> Message:
        """Send a request and wait for its reply (see :meth:`begin_request`)."""
        return await self.begin_request(message, timeout_s)

    def close(self) -> None:
        if self.transport is not None:
            self.flush()
            self.transport.close()

    def abort(self, reason: BaseException | None = None) -> None:
        self.close_reason = reason
        self._out, self._out_bytes = [], 0
        if self.transport is not None:
            self.transport.abort()


ConnectionFactory = Callable[[], PeerConnection]


async def serve(
    host: str,
    port: int,
    factory: Callable[[], asyncio.BaseProtocol],
    *,
    trust: WireTrust,
    on_refused: RefusedHandler | None = None,
) -> asyncio.Server:
    """Accept connections on ``host:port``; ``factory`` builds each protocol.

    With ``trust`` enabled, each connection first passes mutual TLS
    (:class:`TlsGate`); ``on_refused(source_ip, exc)`` is called for each peer
    refused. ``factory`` may build any protocol (the webapp serves aiohttp's
    HTTP protocol through the same gate).
    """
    loop = asyncio.get_running_loop()
    if not trust.enabled:
        return await loop.create_server(factory, host, port, reuse_address=True)
    gate = TlsGate(trust, factory, on_refused)
    return await loop.create_server(gate.protocol, host, port, reuse_address=True)


async def connect(
    host: str,
    port: int,
    factory: ConnectionFactory,
    timeout_s: float = CONNECT_TIMEOUT_S,
    *,
    trust: WireTrust,
    expect: str | None = None,
) -> PeerConnection:
    """Dial ``host:port`` (mutual TLS when ``trust`` is enabled).

    ``expect`` is the service the server must be (its certificate's); a server
    with another identity is disconnected and :class:`NotTrusted` raised. A
    failed handshake raises ``ssl.SSLError`` (an ``OSError``).
    """
    loop = asyncio.get_running_loop()
    if trust.enabled:
        _, protocol = await asyncio.wait_for(
            loop.create_connection(
                factory, host, port, ssl=trust.client, ssl_handshake_timeout=trust.handshake_timeout_s
            ),
            timeout_s,
        )
    else:
        _, protocol = await asyncio.wait_for(loop.create_connection(factory, host, port), timeout_s)
    assert isinstance(protocol, PeerConnection)
    if trust.enabled:
        try:
            identity = transport_identity(protocol.transport)
        except BadIdentity as exc:
            protocol.abort(exc)
            raise NotTrusted(f"{host}:{port}: {exc}") from exc
        if identity is None or (expect is not None and identity.service != expect):
            protocol.abort()
            raise NotTrusted(f"{host}:{port} is {identity}, expected a {expect}")
    return protocol


def backoff_delays(initial_s: float = RECONNECT_INITIAL_DELAY_S, max_s: float = RECONNECT_MAX_DELAY_S) -> Any:
    """Exponential backoff with jitter: uniform(initial/2, min(max, initial * 2**n)).

    The floor of initial/2 keeps a fleet of reconnecting peers from retrying
    in a tight loop; the jitter spreads them out.
    """
    ceiling = initial_s
    while True:
        yield random.uniform(initial_s / 2, ceiling)
        ceiling = min(max_s, ceiling * 2)


class PeerLink:
    """A self-healing outbound connection to one peer.

    ``address()`` is asked before every attempt, so a link follows a peer that
    moved. Every attempt dials with ``trust`` and requires the server to be
    an ``expect`` (see :func:`connect`). ``on_connected(conn)`` runs after each successful connect, before
    :meth:`request` callers waiting for the link are released.
    """

    def __init__(
        self,
        name: str,
        address: Callable[[], tuple[str, int] | None],
        factory: ConnectionFactory,
        on_connected: Callable[[PeerConnection], Awaitable[None]] | None = None,
        on_disconnected: Callable[[], None] | None = None,
        *,
        trust: WireTrust,
        expect: str | None = None,
    ) -> None:
        self.name = name
        self.trust = trust
        self.expect = expect
        self.address = address
        self.factory = factory
        self.on_connected = on_connected
        self.on_disconnected = on_disconnected
        self.conn: PeerConnection | None = None
        self._ready = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._stopped = False

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._connect_loop(), name=f"link-{self.name}")

    async def close(self) -> None:
        self._stopped = True
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except (asyncio.CancelledError, Exception):
                pass
        if self.conn is not None:
            self.conn.close()

    @property
    def connected(self) -> bool:
        return self.conn is not None and self.conn.is_open and self._ready.is_set()

    async def wait_connected(self, timeout_s: float) -> PeerConnection:
        try:
            await asyncio.wait_for(self._ready.wait(), timeout_s)
        except TimeoutError:
            raise ConnectionLost(f"link {self.name}: not connected within {timeout_s}s") from None
        assert self.conn is not None
        return self.conn

    async def request(self, message: Message, timeout_s: float = DEFAULT_REQUEST_TIMEOUT_S) -> Message:
        conn = self.conn if self.connected and self.conn is not None else await self.wait_connected(timeout_s)
        return await conn.request(message, timeout_s)

    async def _connect_loop(self) -> None:
        delays = backoff_delays()
        while not self._stopped:
            address = self.address()
            if address is None:
                await asyncio.sleep(next(delays))
                continue
            try:
                conn = await connect(address[0], address[1], self.factory, trust=self.trust, expect=self.expect)
            except (TimeoutError, OSError, NotTrusted) as exc:
                log.debug("link %s: connect to %s failed: %s", self.name, address, exc)
                await asyncio.sleep(next(delays))
                continue
            self.conn = conn
            try:
                if self.on_connected is not None:
                    await self.on_connected(conn)
            except Exception as exc:
                log.warning("link %s: on_connected failed: %s; reconnecting", self.name, exc)
                conn.abort(exc)
            else:
                delays = backoff_delays()
                self._ready.set()
            # Shielded: cancelling this loop (close()) must not cancel the
            # connection's own ``closed`` future, which others may await.
            await asyncio.shield(conn.closed)
            self._ready.clear()
            if self.on_disconnected is not None and not self._stopped:
                self.on_disconnected()
            if not self._stopped:
                await asyncio.sleep(next(delays))
