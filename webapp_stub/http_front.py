"""A lean HTTP/1.1 front for the Web API's hottest call, ``POST /api/chat.postMessage``.

Issue 17: aiohttp's per-request work (its request and response objects, routing, a
multidict of headers, the response's header block) was the largest single item of a
post's CPU after SQLite. The front owns the webapp's public port. On each connection it
reads the requests itself for as long as they are plain posts: ``POST
/api/chat.postMessage`` over HTTP/1.1 with a ``Content-Length`` body (form or JSON, the
token as ``Authorization: Bearer`` or a ``token`` argument: what ``slack_sdk`` sends, keep-alive
or not), and answers them through the same :meth:`WebApi.answer` as aiohttp does (auth,
rate limit, backpressure, the handler, group commit, metrics, Slack errors). The first
request that is anything else (another path or method, chunked, ``Expect``, multipart,
HTTP/1.0, an oversized or odd head) hands the connection, with everything buffered, to
aiohttp for good (``transport.set_protocol``), which serves the rest of the API,
``/metrics``, ``/healthz`` and the browser client exactly as before. A body over
``MAX_BODY_BYTES`` is refused with 413 ``request_too_large`` and the connection closed,
as aiohttp does.

Requests of one connection are answered in order, one at a time (a pipelined request
waits in the buffer, bounded: reading pauses beyond ``MAX_BUFFERED_BYTES``). An idle
connection is closed after ``KEEPALIVE_TIMEOUT_S`` (aiohttp's default).

The front also holds the port's limits (webapp_stub/http_limits.py) for every connection,
aiohttp's included: connections at once and per client address (past either: 503
``too_many_connections``), and a request that has not wholly arrived ``--http-request-timeout-s``
after its first byte (one sent a byte at a time) is answered 408 ``request_timeout`` and closed.
With ``--no-lean-post-path`` every connection goes to aiohttp at once, inside the same limits.

Sans-I/O core: webapp_stub/http_codec.py (:func:`parse_request`: bytes in, a verdict out;
:func:`post_args`, :func:`encode_response`); :class:`FrontProtocol` and :class:`HttpFront` here
are the asyncio layer.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, cast

from services.config import LISTEN_BACKLOG
from webapp_stub.args import HTTP_REQUEST_TIMEOUT_S, Args
from webapp_stub.codecs import dumps
from webapp_stub.errors import ApiError
from webapp_stub.http_codec import METHOD_NAME, Verdict, encode_response, parse_request, post_args, post_token
from webapp_stub.http_limits import MAX_HTTP_CONNECTIONS, MAX_HTTP_CONNECTIONS_PER_ADDRESS, PortLimits, client_source
from webapp_stub.reply import Answer

if TYPE_CHECKING:
    from webapp_stub.api import WebApi

log = logging.getLogger("rtm.webapp.front")

# Idle keep-alive connections are closed after this (aiohttp's default keepalive_timeout).
KEEPALIVE_TIMEOUT_S = 75.0
# How often idle connections are looked for.
IDLE_SWEEP_S = 5.0
# Bytes of pipelined requests buffered while one is answered; beyond it reading pauses.
MAX_BUFFERED_BYTES = 256 * 1024
# A refused connection looks for aiohttp's closed ones (HttpFront.prune: a pass over all of them,
# 2 ms at 10,000) at most this often: a flood of connections at the limit cannot spend the loop on it.
PRUNE_ON_REFUSAL_S = 0.1
# Waiting for the answers in flight at stop, at most.
FRONT_SHUTDOWN_TIMEOUT_S = 2.0


def refuse(api: WebApi, transport: asyncio.BaseTransport, status: int, code: str) -> None:
    """Count ``code``, answer it as Slack's error with ``status`` and close the connection (413,
    408, 503: the front's own refusals)."""
    api.metrics.error(code)
    cast(asyncio.Transport, transport).write(
        encode_response(status, {}, dumps({"ok": False, "error": code}), keep_alive=False)
    )
    transport.close()


class FrontProtocol(asyncio.Protocol):
    """One connection: plain posts here, anything else handed to aiohttp.

    No task per post (round 4 of docs/publish-path.md): a post is handled synchronously in
    :meth:`_next` (:meth:`WebApi.answer_now`) and answered by :meth:`_reply`, at once or from
    the group commit's completion callback."""

    def __init__(self, front: HttpFront) -> None:
        self.front = front
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.busy = False  # a request is being answered
        self.waiting: asyncio.Future[Any] | None = None  # what its answer waits for (a commit)
        self.counted_waiting = False  # counted in HttpFront.waiting
        self.keep_alive = True  # of the request being answered
        self.last_active = time.monotonic()
        self.reading_paused = False
        self.writing_paused = False
        self.address = ""  # the source its client counts under (http_limits.client_source)
        self.admitted = False  # counted in HttpFront.limits
        self.request_started: float | None = None  # when the request now arriving sent its first byte

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not an asyncio.Transport subclass
        self.address = client_source(transport.get_extra_info("peername"))
        if not self.front.admit(self):
            return  # answered 503 and closed
        self.front.connections.add(self)
        if not self.front.lean:
            self._hand_over(self.transport)

    def connection_lost(self, exc: Exception | None) -> None:
        self.front.connections.discard(self)
        if self.transport is not None:
            self.front.stalled.pop(self.transport, None)
        if self.admitted:
            self.admitted = False
            self.front.limits.release(self.address)
        self._stop_waiting()
        self.front.fill_if_every_connection_waits()  # it may have been the last one that could post

    def _stop_waiting(self) -> None:
        """No longer counted in HttpFront.waiting (answered, or gone while its answer waits)."""
        if self.counted_waiting:
            self.counted_waiting = False
            self.front.waiting -= 1

    def pause_writing(self) -> None:
        self.writing_paused = True

    def resume_writing(self) -> None:
        self.writing_paused = False
        if not self.busy and self.buf:
            self._next()
        self._flow()

    def data_received(self, data: bytes) -> None:
        self.last_active = time.monotonic()
        if not self.buf:
            self.request_started = self.last_active
        self.buf += data
        if not self.busy:
            self._next()
        self._flow()

    def _flow(self) -> None:
        """Read while the buffer may hold the request being read; pause reading while an answer
        is pending (a request in flight, or the client not reading its answers) and more than
        MAX_BUFFERED_BYTES wait behind it. An incomplete request in the buffer is bounded by
        itself (MAX_HEAD_BYTES and --max-body-bytes: parse_request), so reading it never pauses."""
        if not self.reading_paused and len(self.buf) <= MAX_BUFFERED_BYTES:
            return  # reading, with no cause to pause: nearly always (twice per post)
        transport = self.transport
        if transport is None or transport.is_closing() or self not in self.front.connections:
            return  # closed, or aiohttp's now
        waiting = self.busy or self.writing_paused
        pause = waiting and len(self.buf) > MAX_BUFFERED_BYTES
        if pause and not self.reading_paused:
            self.reading_paused = True
            transport.pause_reading()
        elif not pause and self.reading_paused:
            self.reading_paused = False
            transport.resume_reading()

    def eof_received(self) -> bool | None:
        return None  # close once what is in flight is written (the transport closes itself)

    def _next(self) -> None:
        """Answer the whole requests in the buffer, one at a time, until one waits for its
        commit (then :meth:`_reply` goes on) or the buffer holds no whole request."""
        while True:
            transport = self.transport
            if transport is None or transport.is_closing() or self.writing_paused or self.busy:
                return
            verdict, request, used = parse_request(self.buf, self.front.max_body_bytes)
            if verdict is Verdict.MORE:
                return
            if verdict is Verdict.DELEGATE or verdict is Verdict.MALFORMED:  # MALFORMED: aiohttp refuses
                self._hand_over(transport)  # it, counted as bad_http_request (webapp_stub/http_refusals.py)
                return
            if verdict is Verdict.TOO_LARGE:
                self.front.api.count_request(METHOD_NAME, "request_too_large")
                refuse(self.front.api, transport, 413, "request_too_large")
                return
            assert request is not None
            del self.buf[:used]
            self.request_started = time.monotonic() if self.buf else None
            self.busy, self.keep_alive = True, request.keep_alive
            args: Args | ApiError
            try:
                args = post_args(request)
            except ApiError as exc:
                args = exc  # answered like any other error
            try:
                self.waiting = self.front.api.answer_now(
                    METHOD_NAME, args, functools.partial(post_token, request), self._reply
                )
            except Exception:  # never leave the connection hanging
                log.exception("lean post path failed")
                self.busy = False
                transport.close()
                return
            if self.waiting is not None:
                self.counted_waiting = True
                self.front.request_waits()
                return  # _reply goes on

    def _reply(self, answer: Answer) -> None:
        """Write the answer of the request in flight; go on with the next one if the answer
        came from a commit's callback (an answer given at once returns to :meth:`_next`)."""
        transport = self.transport
        resumed = self.waiting is not None
        self.busy, self.waiting = False, None
        self._stop_waiting()
        self.last_active = time.monotonic()
        if transport is None:
            return
        try:
            status, headers, body, encoded = answer
            text = encoded if encoded is not None else dumps(body)
            transport.write(encode_response(status, headers, text, self.keep_alive))
        except Exception:  # never leave the connection hanging
            log.exception("lean post path failed")
            transport.close()
            return
        if not self.keep_alive:
            transport.close()
            return
        if resumed:
            if self.buf:
                self._next()
            self._flow()

    def _hand_over(self, transport: asyncio.Transport) -> None:
        """aiohttp serves this connection from now on, starting with what is buffered."""
        self.front.connections.discard(self)
        self.front.handed_over += 1
        self.front.handed[transport] = self.address  # still counted in the limits (HttpFront.prune)
        self.admitted = False
        self.front.fill_if_every_connection_waits()
        handler = self.front.fallback()
        transport.set_protocol(handler)
        handler.connection_made(transport)
        if self.reading_paused:
            self.reading_paused = False
            transport.resume_reading()
        data, self.buf = bytes(self.buf), bytearray()
        if data:
            handler.data_received(data)

    def idle_since(self) -> float | None:
        """When it went idle (no request in flight), None while one is answered."""
        return None if self.busy else self.last_active

    def arriving_since(self) -> float | None:
        """When the request still arriving (not wholly read, not being answered) began, else None;
        None too while its client does not read its answers (what waits in the buffer may have
        arrived whole: the keep-alive timeout ends such a connection, not a 408)."""
        return None if self.busy or self.writing_paused or not self.buf else self.request_started


class HttpFront:
    """The public port's listener: :class:`FrontProtocol` per connection, aiohttp behind it.

    ``fallback`` makes aiohttp's protocol for a connection handed over (``AppRunner.server``);
    ``lean=False`` hands every connection over at once. ``max_connections`` and
    ``max_connections_per_address`` (0: no limit) bound the connections open at once, aiohttp's
    included; ``request_timeout_s`` bounds a request's arrival here (module docstring).
    """

    def __init__(
        self,
        api: WebApi,
        fallback: Callable[[], Any],
        *,
        max_body_bytes: int,
        keepalive_timeout_s: float = KEEPALIVE_TIMEOUT_S,
        lean: bool = True,
        max_connections: int = MAX_HTTP_CONNECTIONS,
        max_connections_per_address: int = MAX_HTTP_CONNECTIONS_PER_ADDRESS,
        request_timeout_s: float = HTTP_REQUEST_TIMEOUT_S,
    ) -> None:
        self.api = api
        self.fallback = fallback
        self.max_body_bytes = max_body_bytes
        self.keepalive_timeout_s = keepalive_timeout_s
        self.lean = lean
        self.limits = PortLimits(max_connections, max_connections_per_address)
        self.request_timeout_s = request_timeout_s
        self.sweep_s = min(IDLE_SWEEP_S, keepalive_timeout_s / 2, request_timeout_s / 2)
        self.connections: set[FrontProtocol] = set()
        self.handed: dict[asyncio.Transport, str] = {}  # aiohttp's connections -> their source
        self.handed_over = 0  # connections given to aiohttp (tests, diagnostics)
        self.waiting = 0  # connections whose request waits for its answer (a commit, an async call)
        # transports with unwritten answers -> (how many bytes, since when): a client not reading
        self.stalled: dict[asyncio.Transport, tuple[int, float]] = {}
        self._pruned_at = float("-inf")
        self._server: asyncio.AbstractServer | None = None
        self._sweep: asyncio.Task[None] | None = None

    @classmethod
    def from_args(cls, api: WebApi, fallback: Callable[[], Any], args: Any, *, max_body_bytes: int) -> HttpFront:
        """The front of ``rtm webapp``'s flags (``--lean-post-path`` and http_limits' flags)."""
        return cls(
            api,
            fallback,
            max_body_bytes=max_body_bytes,
            lean=args.lean_post_path,
            max_connections=args.max_http_connections,
            max_connections_per_address=args.max_http_connections_per_address,
            request_timeout_s=args.http_request_timeout_s,
        )

    def admit(self, conn: FrontProtocol) -> bool:
        """Count a new connection against the limits; past one, answer it 503
        ``too_many_connections``, close it and return False."""
        if not self.limits.take(conn.address):
            now = time.monotonic()
            if now - self._pruned_at >= PRUNE_ON_REFUSAL_S:
                self.prune(now)  # aiohttp's closed connections are only found by looking
            if not self.limits.take(conn.address):
                assert conn.transport is not None
                refuse(self.api, conn.transport, 503, "too_many_connections")
                return False
        conn.admitted = True
        return True

    def prune(self, now: float | None = None) -> None:
        """Stop counting the connections aiohttp served that have closed since. One closed with
        answers still unwritten stays counted (its socket is open) until they are written, or is
        aborted when they have not moved for the request timeout; one aiohttp still serves is
        aborted when its unwritten answers have not moved for the keep-alive timeout (aiohttp waits
        for a client that never reads for ever)."""
        now = time.monotonic() if now is None else now
        self._pruned_at = now
        for transport, source in list(self.handed.items()):
            closing = transport.is_closing()
            if closing and not transport.get_write_buffer_size():
                pass  # gone, or its last bytes with the kernel
            elif self._stalled(transport, now, self.request_timeout_s if closing else self.keepalive_timeout_s):
                self.api.metrics.error("client_not_reading")
                transport.abort()
            else:
                continue
            del self.handed[transport]
            self.stalled.pop(transport, None)
            self.limits.release(source)

    def _stalled(self, transport: asyncio.Transport, now: float, limit_s: float) -> bool:
        """Whether ``transport``'s unwritten bytes have not moved for longer than ``limit_s``."""
        size = transport.get_write_buffer_size()
        if not size:
            self.stalled.pop(transport, None)
            return False
        seen = self.stalled.get(transport)
        if seen is None or seen[0] != size:
            self.stalled[transport] = (size, now)
            return False
        return now - seen[1] > limit_s

    def request_waits(self) -> None:
        """One more connection's request waits for its answer. When every connection's does, no
        more posts can join the open batch from them: it commits at the next turn
        (:meth:`webapp_stub.commit.GroupCommit.fill`)."""
        self.waiting += 1
        self.fill_if_every_connection_waits()

    def fill_if_every_connection_waits(self) -> None:
        """:meth:`GroupCommit.fill <webapp_stub.commit.GroupCommit.fill>` when at least one
        connection's request waits and every connection's does: when one more starts waiting, and
        when one that did not goes (closed, or handed to aiohttp), which would otherwise leave the
        batch held for the paced interval with nobody left to add to it."""
        commits = self.api.commits
        if commits is not None and self.waiting > 0 and self.waiting >= len(self.connections):
            commits.fill()

    async def start(self, host: str, port: int, backlog: int = LISTEN_BACKLOG) -> int:
        """Listen; return the port."""
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            lambda: FrontProtocol(self), host, port, reuse_address=True, backlog=backlog
        )
        self._sweep = loop.create_task(self._idle_loop(), name="http-front-idle-loop")
        return int(self._server.sockets[0].getsockname()[1])

    async def _idle_loop(self) -> None:
        while True:
            await asyncio.sleep(self.sweep_s)
            now = time.monotonic()
            self.close_idle(now)
            self.prune(now)

    def close_idle(self, now: float) -> int:
        """Close the connections idle for longer than the keep-alive timeout, and answer 408
        ``request_timeout`` and close those whose request has been arriving for longer than
        the request timeout; how many were closed."""
        closed = 0
        for conn in list(self.connections):
            if conn.transport is None:
                continue
            if conn.transport.is_closing():  # closed: not answered again; aborted if its client does not read
                if self._stalled(conn.transport, now, self.request_timeout_s):
                    self.api.metrics.error("client_not_reading")
                    conn.transport.abort()
                    closed += 1
                continue
            arriving = conn.arriving_since()
            if arriving is not None and now - arriving > self.request_timeout_s:
                refuse(self.api, conn.transport, 408, "request_timeout")
                closed += 1
                continue
            since = conn.idle_since()
            if since is not None and now - since > self.keepalive_timeout_s:
                conn.transport.close()
                closed += 1
        return closed

    async def stop(self, timeout_s: float = FRONT_SHUTDOWN_TIMEOUT_S) -> None:
        """Stop accepting, let the answers in flight finish (bounded), close the connections."""
        if self._sweep is not None:
            self._sweep.cancel()
            self._sweep = None
        if self._server is not None:
            self._server.close()
        waiting = {conn.waiting for conn in self.connections if conn.waiting is not None}
        if waiting:
            await asyncio.wait(waiting, timeout=timeout_s)
        for conn in list(self.connections):
            if conn.transport is not None:
                conn.transport.close()
        self.connections.clear()
