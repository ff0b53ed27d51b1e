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

Sans-I/O core: :func:`parse_request` (bytes in, a verdict out), :func:`post_args` and
:func:`encode_response`; :class:`FrontProtocol` and :class:`HttpFront` are the asyncio layer.
"""

from __future__ import annotations

import asyncio
import enum
import functools
import logging
import re
import time
from collections.abc import Callable
from email.utils import formatdate
from http import HTTPStatus
from typing import TYPE_CHECKING, Any, cast
from urllib.parse import parse_qsl

from services.config import LISTEN_BACKLOG
from webapp_stub.args import Args, check_text, parse_body, token_of
from webapp_stub.codecs import dumps
from webapp_stub.errors import ApiError
from webapp_stub.reply import Answer

if TYPE_CHECKING:
    from webapp_stub.api import WebApi

log = logging.getLogger("rtm.webapp.front")

# The longest request head (request line and headers) read here; longer ones go to aiohttp
# (whose own line and field limits are 8,190 bytes, and which answers them with 400/431).
MAX_HEAD_BYTES = 8190
# Idle keep-alive connections are closed after this (aiohttp's default keepalive_timeout).
KEEPALIVE_TIMEOUT_S = 75.0
# How often idle connections are looked for.
IDLE_SWEEP_S = 5.0
# Bytes of pipelined requests buffered while one is answered; beyond it reading pauses.
MAX_BUFFERED_BYTES = 256 * 1024
# A Content-Length longer than this is refused as too large before int() reads it.
MAX_CONTENT_LENGTH_DIGITS = 18
# A header name is an RFC 9110 token; anything else goes to aiohttp, which answers 400.
_TOKEN = r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+"
_HEADER_NAME = re.compile(_TOKEN)
# Waiting for the answers in flight at stop, at most.
FRONT_SHUTDOWN_TIMEOUT_S = 2.0

METHOD_NAME = "chat.postMessage"
PATH = "/api/" + METHOD_NAME
REQUEST_PREFIX = f"POST {PATH}".encode()


class Verdict(enum.Enum):
    MORE = "more"  # not a whole request yet
    DELEGATE = "delegate"  # not a plain post: aiohttp serves this connection from here on
    MALFORMED = "malformed"  # a head aiohttp refuses (bare LF or CR, NUL, a name not a token): counted, then aiohttp
    TOO_LARGE = "too_large"  # a body over the limit: 413, then close
    READY = "ready"  # a whole post


class PostRequest:
    """One parsed ``POST /api/chat.postMessage``: query string, headers (lower-case names), body."""

    __slots__ = ("query", "headers", "body", "keep_alive")

    def __init__(self, query: str, headers: dict[str, str], body: bytes, keep_alive: bool) -> None:
        self.query = query
        self.headers = headers
        self.body = body
        self.keep_alive = keep_alive


# The common head, read by two regular expressions instead of a loop over its lines: the
# request line, then header fields of a token name and a value without CR, LF or NUL. A head
# of any other shape is read by the loop (:func:`_parse_head`), which gives every verdict.
_PLAIN_HEAD = re.compile(
    "POST " + re.escape(PATH) + r"(?:\?([^ \r\n\0]*))? HTTP/1\.1\r\n((?:" + _TOKEN + r":[^\r\n\0]*\r\n)*)"
)
_FIELD = re.compile("(" + _TOKEN + r"):[ \t]*([^\r\n]*[^\r\n \t])?[ \t]*\r\n")


def parse_request(buf: bytes | bytearray, max_body_bytes: int) -> tuple[Verdict, PostRequest | None, int]:
    """Look at the start of ``buf``: (verdict, the request when READY, bytes it took)."""
    end = buf.find(b"\r\n\r\n")
    if 0 <= end <= MAX_HEAD_BYTES:
        plain = _PLAIN_HEAD.fullmatch(buf[: end + 2].decode("latin-1"))
        if plain is not None:
            fields = _FIELD.findall(plain.group(2))
            headers = {name.lower(): value for name, value in fields}
            if len(headers) == len(fields):  # no duplicates (else aiohttp's rules, below)
                return _post_of(buf, end, plain.group(1) or "", headers, max_body_bytes)
    return _parse_head(buf, max_body_bytes)


def _parse_head(buf: bytes | bytearray, max_body_bytes: int) -> tuple[Verdict, PostRequest | None, int]:
    """:func:`parse_request` for any head, line by line."""
    prefix = bytes(buf[: len(REQUEST_PREFIX)])
    if not REQUEST_PREFIX.startswith(prefix) or (len(buf) > len(REQUEST_PREFIX) and prefix != REQUEST_PREFIX):
        return Verdict.DELEGATE, None, 0
    end = buf.find(b"\r\n\r\n")
    if end < 0:
        return (Verdict.MORE if len(buf) <= MAX_HEAD_BYTES else Verdict.DELEGATE), None, 0
    if end > MAX_HEAD_BYTES:
        return Verdict.DELEGATE, None, 0
    head = bytes(buf[:end])
    if b"\0" in head or head.count(b"\n") != head.count(b"\r\n") or head.count(b"\r") != head.count(b"\r\n"):
        return Verdict.MALFORMED, None, 0  # a bare LF or CR, a NUL: aiohttp answers 400
    lines = head.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ")
    if len(parts) != 3 or parts[2] != "HTTP/1.1":
        return Verdict.DELEGATE, None, 0
    path, _, query = parts[1].partition("?")
    if path != PATH:
        return Verdict.DELEGATE, None, 0
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, colon, value = line.partition(":")
        if not colon or not name or name != name.strip():
            return Verdict.DELEGATE, None, 0  # obsolete folding, a space before the colon, ...
        if _HEADER_NAME.fullmatch(name) is None:
            return Verdict.MALFORMED, None, 0  # not a token: aiohttp answers 400
        name = name.lower()
        if name in headers:
            return Verdict.DELEGATE, None, 0  # duplicates: aiohttp's rules
        headers[name] = value.strip(" \t")
    return _post_of(buf, end, query, headers, max_body_bytes)


def _post_of(
    buf: bytes | bytearray, end: int, query: str, headers: dict[str, str], max_body_bytes: int
) -> tuple[Verdict, PostRequest | None, int]:
    """The verdict on a post whose head (ending at ``end``) was read: its body's framing."""
    if "transfer-encoding" in headers or "expect" in headers or "upgrade" in headers:
        return Verdict.DELEGATE, None, 0
    length_text = headers.get("content-length")
    if length_text is None or not length_text.isascii() or not length_text.isdigit():
        return Verdict.DELEGATE, None, 0
    if len(length_text) > MAX_CONTENT_LENGTH_DIGITS:
        return Verdict.TOO_LARGE, None, 0  # beyond any body limit (and int() of 4,300 digits raises)
    length = int(length_text)
    if length > max_body_bytes:
        return Verdict.TOO_LARGE, None, 0
    total = end + 4 + length
    if len(buf) < total:
        return Verdict.MORE, None, 0
    if content_type(headers).startswith("multipart/"):
        return Verdict.DELEGATE, None, 0
    keep_alive = headers.get("connection", "").lower() != "close"
    return Verdict.READY, PostRequest(query, headers, bytes(buf[end + 4 : total]), keep_alive), total


def content_type(headers: dict[str, str]) -> str:
    """The media type, lower case, without parameters (aiohttp's ``request.content_type``)."""
    value = headers.get("content-type")
    if not value:
        return "application/octet-stream"
    return value.partition(";")[0].strip().lower()


def post_args(request: PostRequest) -> Args:
    """The arguments, exactly as :func:`webapp_stub.args.read_args` merges them: the query
    string, then a form or JSON body (body wins). Raises ``invalid_json``,
    ``invalid_form_data``, ``invalid_arguments``."""
    args: Args = {}
    if request.query:
        try:
            for key, value in parse_qsl(request.query, keep_blank_values=True):
                args.setdefault(key, value)
        except ValueError:
            raise ApiError("invalid_arguments") from None
    args.update(parse_body(request.body, content_type(request.headers)))
    check_text(args, "invalid_arguments")
    return args


def post_token(request: PostRequest, args: Args) -> str | None:
    """``Authorization: Bearer`` first, else the ``token`` argument (as for every Web API call)."""
    return token_of(request.headers.get("authorization", ""), args)


class _Date:
    """The ``Date`` header's value, formatted once a second."""

    def __init__(self) -> None:
        self.second = -1
        self.value = ""

    def now(self) -> str:
        second = int(time.time())
        if second != self.second:
            self.second, self.value = second, formatdate(second, usegmt=True)
        return self.value


_DATE = _Date()


def encode_response(status: int, headers: dict[str, str], text: str, keep_alive: bool) -> bytes:
    """A whole HTTP/1.1 response with a JSON body."""
    body = text.encode()
    head = [
        f"HTTP/1.1 {status} {HTTPStatus(status).phrase}\r\n"
        f"Content-Type: application/json; charset=utf-8\r\nContent-Length: {len(body)}\r\n"
        f"Date: {_DATE.now()}\r\n"
    ]
    for name, value in headers.items():
        head.append(f"{name}: {value}\r\n")
    if not keep_alive:
        head.append("Connection: close\r\n")
    head.append("\r\n")
    return "".join(head).encode("latin-1") + body


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

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not an asyncio.Transport subclass
        self.front.connections.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.front.connections.discard(self)
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
        self.buf += data
        self.last_active = time.monotonic()
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
            if verdict is Verdict.DELEGATE or verdict is Verdict.MALFORMED:
                if verdict is Verdict.MALFORMED:
                    self.front.api.metrics.error("bad_http_head")
                self._hand_over(transport)
                return
            if verdict is Verdict.TOO_LARGE:
                self.front.api.metrics.error("request_too_large")
                self.front.api.count_request(METHOD_NAME, "request_too_large")
                body = dumps({"ok": False, "error": "request_too_large"})
                transport.write(encode_response(413, {}, body, keep_alive=False))
                transport.close()
                return
            assert request is not None
            del self.buf[:used]
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


class HttpFront:
    """The public port's listener: :class:`FrontProtocol` per connection, aiohttp behind it.

    ``fallback`` makes aiohttp's protocol for a connection handed over (``AppRunner.server``).
    """

    def __init__(
        self,
        api: WebApi,
        fallback: Callable[[], Any],
        *,
        max_body_bytes: int,
        keepalive_timeout_s: float = KEEPALIVE_TIMEOUT_S,
    ) -> None:
        self.api = api
        self.fallback = fallback
        self.max_body_bytes = max_body_bytes
        self.keepalive_timeout_s = keepalive_timeout_s
        self.connections: set[FrontProtocol] = set()
        self.handed_over = 0  # connections given to aiohttp (tests, diagnostics)
        self.waiting = 0  # connections whose request waits for its answer (a commit, an async call)
        self._server: asyncio.AbstractServer | None = None
        self._sweep: asyncio.Task[None] | None = None

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
            await asyncio.sleep(IDLE_SWEEP_S)
            self.close_idle(time.monotonic())

    def close_idle(self, now: float) -> int:
        """Close the connections idle for longer than the keep-alive timeout; how many."""
        closed = 0
        for conn in list(self.connections):
            since = conn.idle_since()
            if since is not None and now - since > self.keepalive_timeout_s and conn.transport is not None:
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
