"""The lean front's HTTP/1.1 codec, sans I/O (webapp_stub/http_front.py is its asyncio layer).

:func:`parse_request` looks at the start of a connection's buffer and gives a verdict: a whole
plain ``POST /api/chat.postMessage`` (:class:`PostRequest`), more bytes needed, a request to
hand to aiohttp, a malformed head, or a body over the limit. :func:`post_args` and
:func:`post_token` read a post's arguments and token exactly as the aiohttp path does
(webapp_stub/args.py); :func:`encode_response` writes a whole HTTP/1.1 answer with a JSON body.
Bytes in, values out: unit-tested without sockets (tests/unit/test_http_front.py).
"""

from __future__ import annotations

import enum
import re
import time
from email.utils import formatdate
from http import HTTPStatus
from urllib.parse import parse_qsl

from webapp_stub.args import LARGE_BODY_BYTES, Args, check_text, parse_body, token_of
from webapp_stub.errors import ApiError

# The longest request head (request line and headers) read here; longer ones go to aiohttp
# (whose own line and field limits are 8,190 bytes, and which answers them with 400/431).
MAX_HEAD_BYTES = 8190
# A Content-Length longer than this is refused as too large before int() reads it.
MAX_CONTENT_LENGTH_DIGITS = 18
# A header name is an RFC 9110 token; anything else goes to aiohttp, which answers 400.
_TOKEN = r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+"
_HEADER_NAME = re.compile(_TOKEN)
METHOD_NAME = "chat.postMessage"
PATH = "/api/" + METHOD_NAME
REQUEST_PREFIX = f"POST {PATH}".encode()


class Verdict(enum.Enum):
    MORE = "more"  # not a whole request yet
    DELEGATE = "delegate"  # not a plain post: aiohttp serves this connection from here on
    MALFORMED = "malformed"  # a head aiohttp refuses (bare LF or CR, NUL, a name not a token): aiohttp's 400
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
        if b"\0" in buf or buf.count(b"\n") != buf.count(b"\r\n"):
            return Verdict.MALFORMED, None, 0  # a head with a bare LF never ends in CRLF CRLF: aiohttp's 400 now
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
    if "content-encoding" in headers:  # a gzip or deflate body: aiohttp decodes it (this front would read it raw)
        return Verdict.DELEGATE, None, 0
    length_text = headers.get("content-length")
    if length_text is None or not length_text.isascii() or not length_text.isdigit():
        return Verdict.DELEGATE, None, 0
    if len(length_text) > MAX_CONTENT_LENGTH_DIGITS:
        return Verdict.TOO_LARGE, None, 0  # beyond any body limit (and int() of 4,300 digits raises)
    length = int(length_text)
    if length > max_body_bytes:
        return Verdict.TOO_LARGE, None, 0
    if length > LARGE_BODY_BYTES:
        return Verdict.DELEGATE, None, 0  # parsed on aiohttp's side, off the event loop (args.py)
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
        check_text(args, "invalid_arguments")  # the query's; a body's where it is parsed (parse_body)
    args.update(parse_body(request.body, content_type(request.headers)))
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
