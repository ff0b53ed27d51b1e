"""Consul's HTTP conventions, as the dev agent reads requests and writes replies.

Query options (``index``/``wait``, ``stale``/``consistent``) and query values
parsed as Go parses them, bodies decoded as Go's ``json.Decoder`` does, the
records of a reply and a route, and the per-request keys the agent stores
(query options, the token's authorizer).
"""

from __future__ import annotations

import json
import re
import urllib.parse
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final

from aiohttp import web

from consul_dev.acl import Authorizer, Rule
from consul_dev.errors import ConsulError, InvalidRequest, ServerError
from consul_dev.go_text import parse_go_duration_s

DEFAULT_BLOCKING_WAIT_S: Final = 300.0  # Consul's default for ?wait
MAX_BLOCKING_WAIT_S: Final = 600.0  # Consul caps ?wait at 10 minutes

JSON_CONTENT_TYPE: Final = "application/json"
TEXT_CONTENT_TYPE: Final = "text/plain; charset=utf-8"
QUERY_KEY: Final = "rtm_consul_dev.query"  # the request's QueryOptions (query routes)
AUTHZ_KEY: Final = "rtm_consul_dev.authorizer"  # the request's Authorizer (routes under ACLs)
ACL_FILTERED_KEY: Final = "rtm_consul_dev.acl_filtered"  # set once a FILTER route's handler filtered its answer
FILTERED_BY_ACLS_HEADER: Final = "X-Consul-Results-Filtered-By-ACLs"
_UINT64_MAX: Final = 2**64 - 1
_DIGITS_RE: Final = re.compile(r"[0-9]+")
_GO_TRUE: Final = frozenset({"1", "t", "T", "TRUE", "true", "True"})
_GO_FALSE: Final = frozenset({"0", "f", "F", "FALSE", "false", "False"})


@dataclass(frozen=True)
class QueryOptions:
    """``?index`` and ``?wait`` as Consul reads them."""

    min_index: int
    wait_s: float


@dataclass
class Reply:
    """One HTTP reply before the Consul headers are added."""

    status: int = 200
    body: bytes = b""
    content_type: str = JSON_CONTENT_TYPE
    index: int | None = None
    headers: dict[str, str] = field(default_factory=dict)


Handler = Callable[[web.Request, str], Awaitable[Reply]]


@dataclass(frozen=True)
class Route:
    """One endpoint: a path (a trailing ``/`` makes it a prefix, as in Go's mux) and its methods."""

    pattern: str
    methods: tuple[str, ...]
    handler: Handler
    query: bool = False  # parses dc, consistency, index/wait (a catalog/health/kv/session endpoint)
    filterable: bool = False  # Consul accepts ?filter= here; the dev agent refuses it plainly
    acl: Rule = Rule.CHECK  # how ACLs apply (see consul_dev.acl); FILTER handlers use consul_dev.acl_filter


class MethodNotAllowed(ConsulError):
    """405, with the ``Allow`` header listing the route's methods."""

    status = 405

    def __init__(self, method: str, allowed: tuple[str, ...]) -> None:
        super().__init__(f"method {method} not allowed")
        self.allowed = allowed


def parse_query_options(query: Mapping[str, str]) -> QueryOptions:
    """Read ``stale``/``consistent``, ``wait`` and ``index`` as Consul's ``parse`` does.

    Raises :class:`InvalidRequest` with Consul's texts ("Invalid wait time",
    "Invalid index", the stale/consistent conflict). ``wait`` is clamped to
    10 minutes; zero or negative means the 5 minute default.
    """
    if "stale" in query and "consistent" in query:
        raise InvalidRequest("Cannot specify ?stale with ?consistent, conflicting semantics.")
    wait_s = DEFAULT_BLOCKING_WAIT_S
    wait = query.get("wait", "")
    if wait:
        try:
            wait_s = parse_go_duration_s(wait)
        except ValueError:
            raise InvalidRequest("Invalid wait time") from None
    min_index = 0
    index_text = query.get("index", "")
    if index_text:
        if not _DIGITS_RE.fullmatch(index_text) or int(index_text) > _UINT64_MAX:
            raise InvalidRequest("Invalid index")
        min_index = int(index_text)
    if wait_s > MAX_BLOCKING_WAIT_S:
        wait_s = MAX_BLOCKING_WAIT_S
    elif wait_s <= 0:
        wait_s = DEFAULT_BLOCKING_WAIT_S
    return QueryOptions(min_index=min_index, wait_s=wait_s)


def parse_uint(value: str) -> int:
    """Go's ``strconv.ParseUint(value, 10, 64)``; its error reaches the client as a 500."""
    if not _DIGITS_RE.fullmatch(value):
        raise ServerError(f"strconv.ParseUint: parsing {json.dumps(value)}: invalid syntax")
    number = int(value)
    if number > _UINT64_MAX:
        raise ServerError(f"strconv.ParseUint: parsing {json.dumps(value)}: value out of range")
    return number


def bool_param(query: Mapping[str, str], name: str) -> bool:
    """A boolean query flag: absent is False, bare is True, else Go's ParseBool."""
    if name not in query:
        return False
    value = query.get(name, "")
    if value == "" or value in _GO_TRUE:
        return True
    if value in _GO_FALSE:
        return False
    raise InvalidRequest(f"Invalid value for ?{name}")


def authorizer_of(request: web.Request) -> Authorizer:
    """The authorizer the agent resolved for this request (from its token)."""
    authz: Authorizer = request[AUTHZ_KEY]
    return authz


def json_reply(request: web.Request, obj: Any, *, index: int | None = None, status: int = 200) -> Reply:
    """``obj`` as Consul encodes JSON (indented with ``?pretty``)."""
    if "pretty" in request.query:
        body = json.dumps(obj, indent=4, ensure_ascii=False) + "\n"
    else:
        body = json.dumps(obj, separators=(",", ":"), ensure_ascii=False)
    return Reply(status, body.encode(), JSON_CONTENT_TYPE, index)


async def read_json_body(request: web.Request) -> Any:
    """Decode the body as Go's json.Decoder does: the first JSON value, EOF when empty."""
    text = (await request.read()).decode("utf-8", errors="replace").lstrip(" \t\r\n")
    if not text:
        raise InvalidRequest("Request decode failed: EOF")
    try:
        value, _ = json.JSONDecoder().raw_decode(text)
    except json.JSONDecodeError as exc:
        raise InvalidRequest(f"Request decode failed: {exc}") from None
    return value


def refuse_conflicting_flags(query: Mapping[str, str], *flags: str) -> None:
    """Consul's 400 when more than one of ``flags`` is in the query."""
    if sum(flag in query for flag in flags) > 1:
        items = sorted(query.items(), key=lambda kv: kv[0])  # Go's url.Values.Encode order
        raise InvalidRequest(f"Conflicting flags: {urllib.parse.urlencode(items)}\n")
