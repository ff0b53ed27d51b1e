"""webapp_stub.http_front: the lean chat.postMessage path's parser, arguments and responses (no sockets)."""

from __future__ import annotations

import asyncio
import json
import random
import shutil
import subprocess
from collections.abc import Callable

import pytest

from tests.support import async_wait_until
from webapp_stub.api import Answer
from webapp_stub.errors import ApiError
from webapp_stub.http_codec import (
    MAX_HEAD_BYTES,
    PostRequest,
    Verdict,
    _parse_head,
    encode_response,
    parse_request,
    post_args,
    post_token,
)
from webapp_stub.http_front import MAX_BUFFERED_BYTES, FrontProtocol, HttpFront

MAX_BODY = 1000


def post(body: bytes, *headers: str, target: str = "/api/chat.postMessage", version: str = "HTTP/1.1") -> bytes:
    lines = [f"POST {target} {version}", "Host: 127.0.0.1", *headers]
    if not any(h.lower().startswith(("content-length", "transfer-encoding")) for h in headers):
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def test_a_plain_json_post_is_read_whole_and_what_follows_is_left() -> None:
    raw = post(b'{"channel":"C1","text":"hi"}', "Content-Type: application/json", "Authorization: Bearer xoxp-1")
    verdict, request, used = parse_request(raw + b"POST /api/chat", MAX_BODY)
    assert verdict is Verdict.READY and used == len(raw) and request is not None
    assert request.headers["authorization"] == "Bearer xoxp-1" and request.keep_alive
    assert post_args(request) == {"channel": "C1", "text": "hi"}
    assert post_token(request, {}) == "xoxp-1"


def test_every_prefix_of_a_post_asks_for_more() -> None:
    raw = post(b"channel=C1&text=hi", "Content-Type: application/x-www-form-urlencoded")
    for n in range(len(raw)):
        assert parse_request(raw[:n], MAX_BODY)[0] is Verdict.MORE, n
    assert parse_request(raw, MAX_BODY)[0] is Verdict.READY


@pytest.mark.parametrize(
    "raw",
    [
        b"GET /api/chat.postMessage HTTP/1.1\r\n\r\n",
        b"POST /api/auth.test HTTP/1.1\r\nContent-Length: 0\r\n\r\n",
        b"POST /api/chat.postMessageX HTTP/1.1\r\nContent-Length: 0\r\n\r\n",
        post(b"", version="HTTP/1.0"),
        post(b"0\r\n\r\n", "Transfer-Encoding: chunked"),
        post(b"x=1", "Expect: 100-continue"),
        post(b"x=1", "Content-Encoding: gzip"),
        post(b"--b--", "Content-Type: multipart/form-data; boundary=b"),
        post(b"", "Content-Length: 0", "Content-Length: 0"),
        post(b"", "Bad header"),
        post(b"", "X-Folded : yes"),
        post(b"", "Content-Length: +3"),
        b"POST /api/chat.postMessage HTTP/1.1\r\nX: " + b"a" * MAX_HEAD_BYTES,
        b"\r\nPOST /api/chat.postMessage HTTP/1.1\r\n\r\n",
    ],
)
def test_anything_but_a_plain_post_goes_to_aiohttp(raw: bytes) -> None:
    assert parse_request(raw, MAX_BODY)[0] is Verdict.DELEGATE


def test_a_body_over_the_limit_is_refused_before_it_is_read() -> None:
    raw = post(b"", f"Content-Length: {MAX_BODY + 1}")
    assert parse_request(raw, MAX_BODY)[0] is Verdict.TOO_LARGE


def test_connection_close_is_kept() -> None:
    raw = post(b"channel=C1", "Connection: close")
    request = parse_request(raw, MAX_BODY)[1]
    assert request is not None and not request.keep_alive


def request(body: bytes, ctype: str | None = None, query: str = "") -> PostRequest:
    headers = {} if ctype is None else {"content-type": ctype}
    return PostRequest(query, headers, body, True)


def test_arguments_merge_like_read_args() -> None:
    # query first, the body wins; a form with the token in it; JSON without a content type
    assert post_args(request(b"text=body", "application/x-www-form-urlencoded", "text=q&channel=C1")) == {
        "text": "body",
        "channel": "C1",
    }
    assert post_args(request(b'{"text": "j"}')) == {"text": "j"}
    assert post_args(request(b"  ", "application/json", "channel=C2")) == {"channel": "C2"}
    form = request(b"token=xoxb-2&channel=C1&text=a+b%21", "application/x-www-form-urlencoded; charset=utf-8")
    args = post_args(form)
    assert args == {"token": "xoxb-2", "channel": "C1", "text": "a b!"} and post_token(form, args) == "xoxb-2"


@pytest.mark.parametrize(
    ("body", "ctype", "code"),
    [
        (b"{not json", "application/json", "invalid_json"),
        (b"[1]", "application/json", "invalid_json"),
        (b'{"text": "\\ud800"}', "application/json", "invalid_json"),
        (b"text=\xff", "application/x-www-form-urlencoded", "invalid_form_data"),
    ],
)
def test_bad_bodies_get_slack_errors(body: bytes, ctype: str, code: str) -> None:
    with pytest.raises(ApiError) as err:
        post_args(request(body, ctype))
    assert err.value.code == code


def test_responses_are_whole_http_messages() -> None:
    raw = encode_response(429, {"Retry-After": "1"}, '{"ok":false,"error":"ratelimited"}', keep_alive=False)
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    assert lines[0] == "HTTP/1.1 429 Too Many Requests"
    assert "Retry-After: 1" in lines and "Connection: close" in lines
    assert f"Content-Length: {len(body)}" in lines and "Content-Type: application/json; charset=utf-8" in lines
    assert any(line.startswith("Date: ") for line in lines)
    assert json.loads(body) == {"ok": False, "error": "ratelimited"}
    text = '{"ok":true,"text":"é"}'
    assert encode_response(200, {}, text, keep_alive=True).endswith(text.encode())


@pytest.mark.parametrize(
    "raw",
    [
        post(b"", "X-A: a\nContent-Length: 0"),  # a bare LF inside the head
        post(b"", "X-A: a\rb"),  # a lone CR
        post(b"", "X-A: a\0b"),  # a NUL
        post(b"", "Content Length: 0"),  # a name that is not a token
        # bare LFs throughout: the head never ends in CRLF CRLF, so waiting for more would hold the
        # connection until the request timeout (408) where aiohttp answers 400 at once
        b"POST /api/chat.postMessage HTTP/1.1\nHost: x\nContent-Length: 3\n\nx=1",
        b"POST /api/chat.postMessage HTTP/1.1\n",
        b"POST /api/chat.postMessage HTTP/1.1\r\nX: \0",  # a NUL before the head's end
    ],
)
def test_heads_aiohttp_would_refuse_go_to_aiohttp(raw: bytes) -> None:
    assert parse_request(raw, MAX_BODY)[0] is Verdict.MALFORMED  # counted, then aiohttp's 400


def test_a_content_length_of_thousands_of_digits_is_too_large_not_a_crash() -> None:
    raw = post(b"", "Content-Length: " + "9" * 5000)
    assert parse_request(raw, 4 * 1024 * 1024)[0] is Verdict.TOO_LARGE


class FlowTransport:
    """The transport calls FrontProtocol makes, recorded (no socket)."""

    def __init__(self, peer: str = "127.0.0.1") -> None:
        self.reading = True
        self.written: list[bytes] = []
        self.closed = False
        self.aborted = False
        self.unwritten = 0  # bytes a client that does not read leaves in the transport
        self.peer = peer

    def pause_reading(self) -> None:
        self.reading = False

    def resume_reading(self) -> None:
        self.reading = True

    def is_closing(self) -> bool:
        return self.closed

    def get_extra_info(self, name: str, default: object = None) -> object:
        return (self.peer, 50_000) if name == "peername" else default

    def write(self, data: bytes) -> None:
        self.written.append(data)

    def set_protocol(self, protocol: object) -> None:
        self.protocol = protocol

    def close(self) -> None:
        self.closed = True

    def get_write_buffer_size(self) -> int:
        return self.unwritten

    def abort(self) -> None:
        self.closed = self.aborted = True


class ErrorsSeen:
    """ServiceMetrics.error, recorded."""

    def __init__(self) -> None:
        self.kinds: list[str] = []

    def error(self, kind: str) -> None:
        self.kinds.append(kind)


class BlockingApi:
    """WebApi.answer_now whose answers wait until released, so a request stays in flight."""

    def __init__(self) -> None:
        self.release = asyncio.Event()
        self.commits: Filled | None = None
        self.metrics = ErrorsSeen()

    def answer_now(
        self, name: str, args: object, token_of: object, reply: Callable[[Answer], None]
    ) -> asyncio.Future[None]:
        async def later() -> None:
            await self.release.wait()
            reply((200, {}, {"ok": True}, None))

        return asyncio.ensure_future(later())


class Filled:
    """The group commit's fill(), counted."""

    def __init__(self) -> None:
        self.fills = 0

    def fill(self) -> None:
        self.fills += 1


class AiohttpStandIn:
    """What a connection handed over to aiohttp receives (the front's ``fallback`` protocol)."""

    def __init__(self) -> None:
        self.data = bytearray()

    def connection_made(self, transport: object) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.data += data


def flow_protocol(max_body_bytes: int) -> tuple[FrontProtocol, FlowTransport, BlockingApi]:
    api = BlockingApi()
    front = HttpFront(api, AiohttpStandIn, max_body_bytes=max_body_bytes)  # type: ignore[arg-type]
    protocol = FrontProtocol(front)
    transport = FlowTransport()
    protocol.connection_made(transport)  # type: ignore[arg-type]
    return protocol, transport, api


async def test_a_client_that_does_not_read_its_answers_stops_being_read() -> None:
    # Writes paused (the client reads none of its answers): what it keeps sending must not
    # pile up without bound; before, the buffer grew with every byte (125 MiB in a review).
    protocol, transport, _ = flow_protocol(MAX_BODY)
    protocol.pause_writing()
    for _ in range(1000):  # as a socket delivers: only while reading
        if not transport.reading:
            break
        protocol.data_received(post(b"channel=C1&text=x") * 100)
    assert not transport.reading
    assert len(protocol.buf) <= MAX_BUFFERED_BYTES + len(post(b"channel=C1&text=x") * 100)


async def test_a_large_pipelined_post_behind_one_in_flight_is_read_whole() -> None:
    # Post A in flight; post B (over MAX_BUFFERED_BYTES) arrives behind it: reading pauses,
    # and once A is answered it must resume so B can be read whole (before: paused for good).
    # B is past LARGE_BODY_BYTES, so it is aiohttp's to read (its body parsed off the event loop):
    # the connection goes to aiohttp with every byte of B read so far.
    body = b"channel=C1&text=" + b"x" * (MAX_BUFFERED_BYTES + 100_000)
    protocol, transport, api = flow_protocol(4 * 1024 * 1024)
    protocol.data_received(post(b"channel=C1&text=a"))
    assert protocol.busy and protocol.waiting is not None
    big = post(body)
    protocol.data_received(big[: MAX_BUFFERED_BYTES + 1000])
    assert not transport.reading
    api.release.set()
    await _answered(transport, 1)
    assert transport.reading  # B is incomplete: its bytes are read
    handler = transport.protocol
    assert isinstance(handler, AiohttpStandIn) and bytes(handler.data) == big[: MAX_BUFFERED_BYTES + 1000]


async def _answered(transport: FlowTransport, count: int) -> None:
    async def written() -> bool:
        return len(transport.written) >= count

    await async_wait_until(written, what=f"{count} answers written")


def _seen(result: tuple[Verdict, PostRequest | None, int]) -> tuple[object, ...]:
    verdict, request, used = result
    if request is None:
        return verdict, None, used
    return verdict, request.query, request.headers, request.body, request.keep_alive, used


def test_the_regular_expression_reading_agrees_with_the_line_by_line_reading() -> None:
    # parse_request reads common heads with two regular expressions and falls back to the
    # loop (_parse_head) for the rest: over many odd heads both must give the same verdict.
    rng = random.Random(17)
    lines = [
        "Host: 127.0.0.1",
        "Content-Type: application/json",
        "content-type:application/x-www-form-urlencoded ",
        "Authorization: Bearer xoxp-1",
        "AUTHORIZATION:\tBearer  xoxp-2\t",
        "Connection: close",
        "Connection: keep-alive",
        "X-Empty:",
        "X-Spaces:   ",
        "Bad Name: 1",
        "Bad(Name): 1",
        " folded",
        "NoColon",
        ":novalue",
        "X-Nul: a\0b",
        "X-Cr: a\rb",
        "X-Lf: a\nb",
        "X-Ctl: a\x0bb",
        "Transfer-Encoding: chunked",
        "Expect: 100-continue",
        "Content-Type: multipart/form-data; boundary=b",
        "Content-Length: 5",
        "Content-Length: 0005",
        "Content-Length: 99999999999999999999",
        "Content-Length: -1",
        "Content-Length: ５",
    ]
    request_lines = [
        "POST /api/chat.postMessage HTTP/1.1",
        "POST /api/chat.postMessage?token=xoxp-3&channel=C1 HTTP/1.1",
        "POST /api/chat.postMessage? HTTP/1.1",
        "POST /api/chat.postMessage?a?b HTTP/1.1",
        "POST /api/chat.postMessage HTTP/1.0",
        "POST /api/chat.postMessage  HTTP/1.1",
        "POST /api/chat.postMessageX HTTP/1.1",
        "POST /api/chat.postMessage HTTP/1.1 x",
    ]
    for _ in range(3000):
        head = [rng.choice(request_lines), *rng.sample(lines, rng.randint(0, 6))]
        if rng.random() < 0.7:
            head.append(f"Content-Length: {rng.randint(0, 12)}")
        raw = ("\r\n".join(head) + "\r\n\r\n").encode("latin-1", "replace") + b"channel=C1&text=hi"
        for cut in (len(raw), len(raw) - 3):
            buf = bytearray(raw[:cut])
            assert _seen(parse_request(buf, MAX_BODY)) == _seen(_parse_head(buf, MAX_BODY)), raw


class Fallback:
    """aiohttp's protocol for a connection handed over, reduced to what the front calls."""

    def connection_made(self, transport: object) -> None:
        pass

    def data_received(self, data: bytes) -> None:
        pass


class HandedTransport(FlowTransport):
    def set_protocol(self, protocol: object) -> None:
        pass


def waiting_front(connections: int) -> tuple[HttpFront, BlockingApi, list[FrontProtocol], list[HandedTransport]]:
    """A lean front over a :class:`BlockingApi` whose group commit counts its fills, with
    ``connections`` connections made."""
    api = BlockingApi()
    api.commits = Filled()
    front = HttpFront(api, Fallback, max_body_bytes=MAX_BODY)  # type: ignore[arg-type]
    protocols, transports = [], []
    for _ in range(connections):
        protocol, transport = FrontProtocol(front), HandedTransport()
        protocol.connection_made(transport)  # type: ignore[arg-type]
        protocols.append(protocol)
        transports.append(transport)
    return front, api, protocols, transports


async def test_when_every_connection_waits_for_its_commit_the_batch_is_filled() -> None:
    """A client that keeps a fixed number of requests in flight adds nothing more to the open batch
    once all of them wait in it: the front tells the group commit (GroupCommit.fill), so pacing
    does not cap such a client's rate (docs/publish-path.md, round 8)."""
    front, api, protocols, transports = waiting_front(3)
    protocols[0].data_received(post(b"channel=C1&text=a"))
    protocols[1].data_received(post(b"channel=C1&text=b"))
    assert front.waiting == 2 and api.commits.fills == 0  # one connection is idle: it may still post
    protocols[2].connection_lost(None)  # the idle one goes: every connection left waits
    assert front.waiting == 2 and api.commits.fills == 1
    protocols[0].data_received(post(b"channel=C1&text=c"))  # pipelined behind a: not a new waiter
    assert front.waiting == 2 and api.commits.fills == 1
    protocols[1].connection_lost(None)  # gone while its answer waits: no longer counted
    assert front.waiting == 1 and api.commits.fills == 2  # (the real fill() is once per batch)
    api.release.set()
    await _answered(transports[0], 2)  # a, then c: c waited alone, every connection's request
    assert front.waiting == 0 and api.commits.fills == 3


async def test_when_the_last_connection_that_could_post_goes_the_batch_is_filled() -> None:
    """The connections left all wait in the open batch once the one idle connection closes, or
    is handed to aiohttp (another call): nobody on the lean front can add to the batch, so it is
    filled then, not held for the rest of the paced interval (review10)."""
    for goes in ("closed", "handed over"):
        front, api, protocols, transports = waiting_front(3)
        protocols[0].data_received(post(b"channel=C1&text=a"))
        protocols[1].data_received(post(b"channel=C1&text=b"))
        assert front.waiting == 2 and api.commits.fills == 0, goes
        if goes == "closed":
            protocols[2].connection_lost(None)
        else:
            protocols[2].data_received(b"GET /api/auth.test HTTP/1.1\r\nHost: x\r\n\r\n")
            assert front.handed_over == 1
        assert front.waiting == 2 and api.commits.fills == 1, goes
        api.release.set()
        await _answered(transports[0], 1)
        await _answered(transports[1], 1)
        assert front.waiting == 0, goes


async def test_the_front_listens_with_the_backlog_it_is_given() -> None:
    """--listen-backlog (services/config.py: asyncio's 100 overflowed when 2,000 clients connected
    at once). The kernel shows a listener's backlog as its Send-Q in ``ss -ltn``."""
    ss = shutil.which("ss")
    if ss is None:
        pytest.skip("no ss (iproute2) to read a listener's backlog with")
    front = HttpFront(BlockingApi(), lambda: None, max_body_bytes=MAX_BODY)  # type: ignore[arg-type]
    port = await front.start("127.0.0.1", 0, backlog=777)
    try:
        shown = subprocess.run([ss, "-ltnH", f"sport = :{port}"], capture_output=True, text=True, timeout=10)
        assert [line.split()[2] for line in shown.stdout.splitlines()] == ["777"]
    finally:
        await front.stop()
