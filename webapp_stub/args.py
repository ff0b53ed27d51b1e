"""Web API arguments: reading a request's query, form and JSON body, and typed getters.

Slack's conventions (see SLACK_COMPAT.md): GET or POST, arguments merged from
the query string, a form body and a JSON body (an empty body is fine whatever
its content type), the token in ``Authorization: Bearer`` or a ``token``
argument. Bad input is a Slack error code (:class:`webapp_stub.errors.ApiError`).
"""

from __future__ import annotations

import asyncio
import json
from concurrent.futures import ThreadPoolExecutor
from typing import Any
from urllib.parse import parse_qsl

from aiohttp import web

from webapp_stub.errors import ApiError

TRUE_STRINGS = frozenset({"1", "true", "yes", "on"})
# Arrays and objects nested in one request's arguments (a message's blocks nest a
# few levels; see webapp_stub.limits.MAX_CONTENT_DEPTH). Deeper: invalid_json.
MAX_ARGS_DEPTH = 32
# Every input's shape is bounded before the work it costs, so that no request holds the event loop
# (docs/hardening-webapp.md, section 5): 4 MiB bodies of tiny values took 0.5-2.7 s each to parse
# and check, and the body is read before the token is known.
# A JSON text's arrays and objects, at most: counted before it is parsed, in C (its "[" and "{",
# those inside strings too: an upper bound). json.loads builds each without letting go of the
# event loop: 4 MiB of "[]," took it 0.43 s. Slack's largest payloads (50 blocks, 100 attachments)
# hold a few thousand. More: invalid_json (invalid_blocks, ... for a JSON argument).
MAX_JSON_CONTAINERS = 100_000
# The values :func:`walk_text` looks at in one request's arguments, at most (4 MiB of "0," are two
# million, 2.3 s of walking). More: the same error as a bad value.
MAX_ARGS_VALUES = 50_000
# A form body's fields, at most: its "&" bytes, exact (a "&" in a value is %26), as aiohttp bounds a
# multipart form's (client_max_fields, 1,000). 4 MiB of "a=&" took parse_qsl 1 s. More: invalid_form_data.
MAX_FORM_FIELDS = 1_000
# A body larger than this is parsed on the webapp's body thread (BODY_PARSER_KEY), not in the event
# loop's: what Python does there (percent escapes, the check's walk) lets the loop run beside it. The
# lean front leaves such posts to aiohttp. A chat.postMessage of the peers' 200 bytes is far below.
LARGE_BODY_BYTES = 64 * 1024

Args = dict[str, Any]


def _not_json(constant: str) -> Any:
    raise ValueError(f"{constant} is not JSON")


# One decoder for every body and JSON argument (json.loads with an argument builds a new one per
# call): NaN, Infinity and -Infinity, which Python reads but JSON does not have, are refused, so
# they are never stored, echoed or fanned out to clients as invalid JSON.
_DECODE = json.JSONDecoder(parse_constant=_not_json).decode


def loads(raw: bytes | str) -> Any:
    """:func:`json.loads` (bytes in any of JSON's encodings) without NaN or Infinity, and of at most
    :data:`MAX_JSON_CONTAINERS` arrays and objects. Raises ValueError."""
    if not isinstance(raw, str):
        raw = raw.decode(json.detect_encoding(raw), "surrogatepass")
    if raw.count("[") + raw.count("{") > MAX_JSON_CONTAINERS:
        raise ValueError(f"more than {MAX_JSON_CONTAINERS} arrays and objects")
    return _DECODE(raw)


# The longest a request may take to arrive (--http-request-timeout-s, webapp_stub/http_front.py):
# the lean front times a request from its first byte; aiohttp's requests, their body from when it
# is read (their head: the keep-alive timeout). Past it: request_timeout.
HTTP_REQUEST_TIMEOUT_S = 30.0
REQUEST_TIMEOUT_KEY = web.AppKey("http_request_timeout_s", float)
# Large bodies waiting for the body thread (or being parsed there), at most; more: ratelimited
# (429, Retry-After). Each holds its body (at most MAX_BODY_BYTES, 4 MiB) in memory while it waits.
MAX_LARGE_BODIES_WAITING = 16
LARGE_BODY_RETRY_AFTER_S = 1


class BodyThread:
    """The thread that parses large bodies (:data:`LARGE_BODY_BYTES`): one, so large bodies wait for
    each other, not the event loop for them, and at most ``max_waiting`` of them wait."""

    def __init__(self, max_waiting: int = MAX_LARGE_BODIES_WAITING) -> None:
        self.executor = ThreadPoolExecutor(1, thread_name_prefix="rtm-body-parser")
        self.max_waiting = max_waiting
        self.waiting = 0

    async def parse(self, raw: bytes, ctype: str) -> Args:
        """:func:`parse_body` on the thread. Raises ``ratelimited`` when ``max_waiting`` already wait."""
        if self.waiting >= self.max_waiting:
            raise ApiError("ratelimited", 429, {"Retry-After": str(LARGE_BODY_RETRY_AFTER_S)})
        self.waiting += 1
        try:
            return await asyncio.get_running_loop().run_in_executor(self.executor, parse_body, raw, ctype)
        finally:
            self.waiting -= 1

    def close(self) -> None:
        self.executor.shutdown(wait=False, cancel_futures=True)


# The app's body thread. Without one (tests' apps), bodies are parsed in the loop.
BODY_PARSER_KEY = web.AppKey("body_parser", BodyThread)


def flag(args: Args, name: str, default: bool = False) -> bool:
    """A Slack boolean: JSON true/false, or "1"/"0"/"true"/"false" in forms and queries."""
    value = args.get(name)
    if value is None or value == "":
        return default
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)):
        return value != 0
    return str(value).strip().lower() in TRUE_STRINGS


def int_arg(args: Args, name: str, default: int, maximum: int) -> int:
    """A positive integer argument, clamped to ``maximum``; missing or 0 means ``default``."""
    value = args.get(name)
    if value is None or value == "":
        return default
    try:
        number = int(value)
    except (TypeError, ValueError, OverflowError):  # OverflowError: 1e400 in a JSON body is infinity
        raise ApiError("invalid_arguments") from None
    if number <= 0:
        return default
    return min(number, maximum)


def str_arg(args: Args, name: str) -> str | None:
    """A string argument; a JSON number is taken as its text, a JSON boolean as ``true``/``false``
    (as a form would carry it, never Python's ``True``); an array or object: ``invalid_arguments``."""
    value = args.get(name)
    if value is None:
        return None
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (dict, list)):
        raise ApiError("invalid_arguments")
    return str(value)


def json_arg(args: Args, name: str) -> Any:
    """An array/object argument: real JSON in JSON bodies, a JSON string in forms."""
    value = args.get(name)
    if value is None or value == "":
        return None
    if isinstance(value, str):
        try:
            value = loads(value)
        except (ValueError, RecursionError):
            raise ApiError(f"invalid_{name}") from None
        check_text(value, f"invalid_{name}")
    if not isinstance(value, (list, dict)):
        raise ApiError(f"invalid_{name}")
    return value


def check_text(value: Any, code: str, max_depth: int = MAX_ARGS_DEPTH) -> None:
    """Every string in ``value`` (keys too) is valid Unicode (no lone surrogates, which
    a JSON ``"\\ud800"`` escape makes and UTF-8 cannot hold), and arrays and objects
    nest at most ``max_depth`` deep; else ApiError(``code``). Iterative: any depth is safe."""
    if type(value) is dict and max_depth > 0:
        try:  # the common shape, a flat object of strings, checked in C
            joined = "".join(value) + "".join(value.values())
        except TypeError:
            pass  # a value that is not a string: walk it all, below
        else:
            if not joined.isascii():
                try:
                    joined.encode("utf-8")  # a lone surrogate anywhere fails here
                except UnicodeEncodeError:
                    raise ApiError(code) from None
            return
    walk_text(value, code, max_depth)


def walk_text(value: Any, code: str, max_depth: int = MAX_ARGS_DEPTH, max_values: int = MAX_ARGS_VALUES) -> None:
    """:func:`check_text`'s walk over every node (what its fast path must agree with), of at most
    ``max_values`` nodes (keys count; more: ApiError(``code``), found before a container's nodes are
    stacked)."""
    stack: list[tuple[Any, int]] = [(value, 0)]
    budget = max_values - 1
    while stack:
        node, depth = stack.pop()
        if isinstance(node, str):
            if not node.isascii():
                try:
                    node.encode("utf-8")
                except UnicodeEncodeError:
                    raise ApiError(code) from None
        elif isinstance(node, dict):
            budget -= 2 * len(node)
            if depth >= max_depth or budget < 0:
                raise ApiError(code)
            stack.extend((k, depth) for k in node)
            stack.extend((v, depth + 1) for v in node.values())
        elif isinstance(node, list):
            budget -= len(node)
            if depth >= max_depth or budget < 0:
                raise ApiError(code)
            stack.extend((v, depth + 1) for v in node)


async def read_args(request: web.Request) -> Args:
    """Query string, then form or JSON body, merged (body wins). Raises ``invalid_json``."""
    args: Args = {}
    for key, value in request.query.items():
        args.setdefault(key, value)
    check_text(args, "invalid_arguments")  # the query's; a body's where it is parsed (parse_body)
    if not request.can_read_body:
        return args
    declared = request.content_length
    if declared is not None and declared > request.client_max_size:  # at once, not after waiting for it
        raise web.HTTPRequestEntityTooLarge(max_size=request.client_max_size, actual_size=declared)
    ctype = request.content_type
    try:
        async with asyncio.timeout(request.app.get(REQUEST_TIMEOUT_KEY, HTTP_REQUEST_TIMEOUT_S)):
            if ctype.startswith("multipart/"):
                form = {k: v for k, v in (await request.post()).items() if isinstance(v, str)}
                check_text(form, "invalid_arguments")
                args.update(form)
            else:  # checked by parse_body: a large body's on the body thread, not again in the loop
                args.update(await parse_body_of(request, await request.read(), ctype))
    except TimeoutError:  # a body sent a byte at a time holds no connection for longer
        raise ApiError("request_timeout") from None
    except web.RequestPayloadError:  # a body its Content-Encoding does not decode (gzip that is not)
        request.protocol.close()  # the connection's parser gave up on it: answer, then close
        request.content.feed_eof()  # else aiohttp reads the rest after the answer, raises, logs a traceback
        code = "invalid_json" if ctype == "application/json" else "invalid_form_data"
        raise ApiError(code, headers={"Connection": "close"}) from None
    except ValueError:  # aiohttp's multipart parser; parse_body raises ApiError, not ValueError
        raise ApiError("invalid_form_data") from None
    except LookupError:  # a multipart part in a charset Python does not know (Slack's code for a bad charset)
        raise ApiError("invalid_charset") from None
    return args


async def parse_body_of(request: web.Request, raw: bytes, ctype: str) -> Args:
    """:func:`parse_body`, on the app's body thread when ``raw`` is past :data:`LARGE_BODY_BYTES`."""
    parser = request.app.get(BODY_PARSER_KEY)
    if parser is None or len(raw) <= LARGE_BODY_BYTES:
        return parse_body(raw, ctype)
    return await parser.parse(raw, ctype)


def parse_body(raw: bytes, ctype: str) -> Args:
    """A request body's arguments: JSON when the content type says so (or, with no form
    content type, when the body looks like JSON), else a URL-encoded form; an empty body
    has none. Raises ``invalid_json`` or ``invalid_form_data``. The one body reader of both
    the aiohttp path (:func:`read_args`) and the lean post front (webapp_stub/http_front.py).
    What it returns has passed :func:`check_text` (a form's values are strict UTF-8, flat and
    at most :data:`MAX_FORM_FIELDS`)."""
    if not raw.strip():
        return {}
    looks_json = raw.lstrip()[:1] in (b"{", b"[")
    if ctype == "application/json" or (ctype != "application/x-www-form-urlencoded" and looks_json):
        return parse_json_body(raw)
    if raw.count(b"&") >= MAX_FORM_FIELDS:
        raise ApiError("invalid_form_data")
    try:
        return dict(parse_qsl(raw.decode("utf-8"), keep_blank_values=True))
    except (UnicodeDecodeError, ValueError):
        raise ApiError("invalid_form_data") from None


def parse_json_body(raw: bytes | str) -> Args:
    """A JSON object body. Raises ``invalid_json``: not JSON (``NaN`` and ``Infinity`` are not), not
    an object, nested deeper than :data:`MAX_ARGS_DEPTH` (also when deep enough to exhaust the
    parser's stack), or holding a string that is not valid Unicode."""
    try:
        data = loads(raw)
    except (ValueError, RecursionError):  # UnicodeDecodeError is a ValueError
        raise ApiError("invalid_json") from None
    if not isinstance(data, dict):
        raise ApiError("invalid_json")
    check_text(data, "invalid_json")
    return data


def bearer_token(request: web.Request, args: Args) -> str | None:
    return token_of(request.headers.get("Authorization", ""), args)


def token_of(authorization: str, args: Args) -> str | None:
    """The token of a Web API call: ``Authorization: Bearer`` first, else the ``token`` argument."""
    if authorization[:7].lower() == "bearer " and authorization[7:].strip():
        return authorization[7:].strip()
    token = args.get("token")
    return str(token) if token else None


def paged(key: str, items: list[Any], next_cursor: str, **extra: Any) -> dict[str, Any]:
    return {key: items, **extra, "response_metadata": {"next_cursor": next_cursor}}
