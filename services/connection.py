"""The one module that owns msgpack sockets and their timeouts.

* :class:`PeerConnection` is an ``asyncio.Protocol`` around the sans-I/O
  :class:`services.wire.FrameDecoder`: request/reply with ids and deadlines,
  pushes, pre-encoded frame writes for fan-out, a bounded send buffer (a peer
  that lets it overflow is disconnected, never waited for), and a clean
  disconnect on any framing error (logged and counted by the owner's
  ``on_protocol_error``).
* :func:`serve` accepts connections; :func:`connect` dials one.
* :class:`PeerLink` keeps one outbound connection alive: reconnects with
  exponential backoff and full jitter, and runs an ``on_connected`` hook
  (resubscribe, say) after every (re)connect.
"""

from __future__ import annotations

import asyncio
import inspect
import itertools
import logging
import random
import socket
from collections.abc import Awaitable, Callable
from typing import Any

from services import wire
from services.errors import (
    ConnectionLost,
    ErrorCode,
    MalformedFrame,
    ProtocolError,
    RequestTimeout,
    SendBufferFull,
    error_from_reply,
)

log = logging.getLogger("rtm.connection")

DEFAULT_REQUEST_TIMEOUT_S = 5.0
# A peer whose unsent bytes pass this bound is too slow: it is disconnected
# (and catches up from history when it comes back) rather than buffered for.
DEFAULT_MAX_SEND_BUFFER_BYTES = 16 * 1024 * 1024
CONNECT_TIMEOUT_S = 3.0
RECONNECT_INITIAL_DELAY_S = 0.05
RECONNECT_MAX_DELAY_S = 2.0

Message = dict[str, Any]
RequestHandler = Callable[["PeerConnection", Message], "Message | Awaitable[Message] | None"]
PushHandler = Callable[["PeerConnection", Message], None]
CloseHandler = Callable[["PeerConnection", "BaseException | None"], None]
ErrorHandler = Callable[["PeerConnection", BaseException], None]
BurstHandler = Callable[[bool], None]


def _ignore_push(conn: PeerConnection, msg: Message) -> None:
    log.debug("%s: push %s ignored", conn.name, msg.get("op"))


def _refuse_request(conn: PeerConnection, msg: Message) -> Message:
    return wire.reply_err(int(msg["id"]), ErrorCode.UNKNOWN_OP, f"no requests served here ({msg.get('op')})")


class PeerConnection(asyncio.Protocol):
    """One msgpack/TCP connection, either side."""

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
    ) -> None:
        self.name = name
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
        self._pending: dict[int, asyncio.Future[Message]] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self.closed: asyncio.Future[None] = asyncio.get_event_loop().create_future()
        self.close_reason: BaseException | None = None
        self.state: dict[str, Any] = {}  # owner's per-connection data (e.g. gateway id)

    # -- asyncio.Protocol ---------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's transports are not asyncio.Transport subclasses
        sock = transport.get_extra_info("socket")
        if sock is not None:
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError:
                pass
        peername = transport.get_extra_info("peername")
        if peername:
            self.peer = f"{peername[0]}:{peername[1]}"

    def data_received(self, data: bytes) -> None:
        frames = self.decoder.feed(data)
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
        reason = self.close_reason or exc
        for future in self._pending.values():
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
            future = self._pending.pop(reply_id, None)
            if future is not None and not future.done():
                if op == "ok":
                    future.set_result(frame)
                else:
                    future.set_exception(error_from_reply(frame))
            return
        request_id = frame.get("id")
        if request_id is None:
            try:
                self.on_push(self, frame)
            except Exception as exc:  # a malformed push: drop the peer, keep the server
                log.warning("%s: bad %s push from %s: %r", self.name, op, self.peer, exc)
                self._fail(MalformedFrame(f"bad {op} push: {exc!r}"))
            return
        if not isinstance(request_id, int):
            self._fail(MalformedFrame("request id must be an integer"))
            return
        try:
            result = self.on_request(self, frame)
        except Exception as exc:  # a handler bug must not kill the connection or the server
            log.exception("%s: handler for %s failed", self.name, op)
            result = wire.reply_err(request_id, ErrorCode.INTERNAL, f"{type(exc).__name__}: {exc}")
        if result is None:
            return
        if inspect.isawaitable(result):
            task = asyncio.ensure_future(self._finish(request_id, result))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        else:
            self.send(result)

    async def _finish(self, request_id: int, pending: Awaitable[Message]) -> None:
        try:
            reply = await pending
        except Exception as exc:
            log.warning("%s: request %s failed: %s", self.name, request_id, exc)
            reply = wire.reply_err(request_id, ErrorCode.INTERNAL, f"{type(exc).__name__}: {exc}")
        if self.is_open:
            self.send(reply)

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
        transport.write(frame)
        pending = transport.get_write_buffer_size()
        if pending > self.max_send_buffer_bytes:
            error = SendBufferFull(pending, self.max_send_buffer_bytes)
            log.warning("%s: %s is too slow (%s); disconnecting", self.name, self.peer, error)
            self.abort(error)
            raise error

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
        loop = asyncio.get_running_loop()
        request_id = next(self._ids)
        future: asyncio.Future[Message] = loop.create_future()
        self._pending[request_id] = future
        try:
            self.send({**message, "id": request_id})
        except BaseException:
            del self._pending[request_id]
            raise
        timer = loop.call_later(timeout_s, self._time_out, future, message.get("op"), timeout_s)

        def settled(_: asyncio.Future[Message]) -> None:
            timer.cancel()
            self._pending.pop(request_id, None)

        future.add_done_callback(settled)
        return future

    def _time_out(self, future: asyncio.Future[Message], op: Any, timeout_s: float) -> None:
        if not future.done():
            future.set_exception(RequestTimeout(f"{self.name}: {op} to {self.peer} got no reply in {timeout_s}s"))

    async def request(self, message: Message, timeout_s: float = DEFAULT_REQUEST_TIMEOUT_S) -> Message:
        """Send a request and wait for its reply (see :meth:`begin_request`)."""
        return await self.begin_request(message, timeout_s)

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    def abort(self, reason: BaseException | None = None) -> None:
        self.close_reason = reason
        if self.transport is not None:
            self.transport.abort()


ConnectionFactory = Callable[[], PeerConnection]


async def serve(host: str, port: int, factory: ConnectionFactory) -> asyncio.Server:
    """Accept msgpack connections on ``host:port``; ``factory`` builds each protocol."""
    loop = asyncio.get_running_loop()
    return await loop.create_server(factory, host, port, reuse_address=True)


async def connect(
    host: str, port: int, factory: ConnectionFactory, timeout_s: float = CONNECT_TIMEOUT_S
) -> PeerConnection:
    loop = asyncio.get_running_loop()
    _, protocol = await asyncio.wait_for(loop.create_connection(factory, host, port), timeout_s)
    assert isinstance(protocol, PeerConnection)
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
    moved. ``on_connected(conn)`` runs after each successful connect, before
    :meth:`request` callers waiting for the link are released.
    """

    def __init__(
        self,
        name: str,
        address: Callable[[], tuple[str, int] | None],
        factory: ConnectionFactory,
        on_connected: Callable[[PeerConnection], Awaitable[None]] | None = None,
        on_disconnected: Callable[[], None] | None = None,
    ) -> None:
        self.name = name
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
                conn = await connect(address[0], address[1], self.factory)
            except (TimeoutError, OSError) as exc:
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
