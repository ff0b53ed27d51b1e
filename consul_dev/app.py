"""The dev Consul agent's HTTP layer: aiohttp in, :class:`ConsulState` calls, Consul-shaped replies out.

Thin by design: routing (Consul's mux: exact paths and ``/prefix/`` paths,
405 with ``Allow`` for a wrong method, empty 404 for unknown paths), query
options (``dc``, ``stale``/``consistent``, ``index``/``wait`` parsed as
Consul does, ``filter`` refused plainly), blocking queries, body decoding,
headers and metrics. Everything Consul-specific about data lives in
:mod:`consul_dev.state`.

Blocking queries: a query with ``?index=N`` re-runs each time the state's
index moves (an :class:`asyncio.Event` is swapped and set on every change)
and answers as soon as its own result index passes N, or at ``wait`` (default
5 m, at most 10 m, plus up to wait/16 of jitter as Consul adds) with the same
index. A background loop applies expiries every :data:`EXPIRY_TICK_S`.

Run it as its own process: ``python -m consul_dev --host H --port P``
or ``rtm consul-dev``. Production runs real Consul (``CONSUL_HTTP_ADDR``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import random
import re
import time
import urllib.parse
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final, TypeVar

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, generate_latest

from consul_dev.acl import (
    Access,
    AccessControl,
    ACLNotFound,
    Authorizer,
    PermissionDenied,
    Resource,
    Rule,
    request_token,
)
from consul_dev.definitions import decode_check_definition, decode_service_definition
from consul_dev.errors import ConsulError, InvalidRequest, NotFound, RequestTooLarge, ServerError
from consul_dev.go_text import parse_go_duration_s
from consul_dev.node import DATACENTER, HEALTH_CRITICAL, HEALTH_PASSING, HEALTH_WARNING, KV_MAX_VALUE_BYTES, NODE_NAME
from consul_dev.state import ConsulState
from services.process import StopFn, run_service

log = logging.getLogger("rtm.consul_dev")

T = TypeVar("T")

SERVICE_NAME: Final = "consul-dev"
DEFAULT_HOST: Final = "127.0.0.1"
DEFAULT_PORT: Final = 8500  # Consul's HTTP port
HOST_ENV: Final = "RTM_CONSUL_DEV_HOST"
PORT_ENV: Final = "RTM_CONSUL_DEV_PORT"
# The management token; with it set, the agent enforces ACLs with default deny.
ACL_TOKEN_ENV: Final = "RTM_CONSUL_DEV_ACL_TOKEN"

# How often expiries (TTL checks, session TTLs, reaping) are applied when no
# request arrives: 100 ms keeps a 1 s test TTL accurate to 10 %.
EXPIRY_TICK_S: Final = 0.1
DEFAULT_BLOCKING_WAIT_S: Final = 300.0  # Consul's default for ?wait
MAX_BLOCKING_WAIT_S: Final = 600.0  # Consul caps ?wait at 10 minutes
BLOCKING_JITTER_DIVISOR: Final = 16  # Consul adds up to wait/16 of random jitter
# Above KV_MAX_VALUE_BYTES so an oversized KV value gets Consul's own 413 text.
MAX_REQUEST_BODY_BYTES: Final = 4 * KV_MAX_VALUE_BYTES
# Blocking queries return at once on shutdown, so handlers finish quickly.
SHUTDOWN_TIMEOUT_S: Final = 2.0

JSON_CONTENT_TYPE: Final = "application/json"
TEXT_CONTENT_TYPE: Final = "text/plain; charset=utf-8"
_QUERY_KEY: Final = "rtm_consul_dev.query"
_AUTHZ_KEY: Final = "rtm_consul_dev.authorizer"
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
    acl: Rule = Rule.CHECK  # how ACLs apply (see consul_dev.acl)
    empty: Any = None  # FILTER routes: what a token that may read nothing gets


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


def _parse_uint(value: str) -> int:
    """Go's ``strconv.ParseUint(value, 10, 64)``; its error reaches the client as a 500."""
    if not _DIGITS_RE.fullmatch(value):
        raise ServerError(f"strconv.ParseUint: parsing {json.dumps(value)}: invalid syntax")
    number = int(value)
    if number > _UINT64_MAX:
        raise ServerError(f"strconv.ParseUint: parsing {json.dumps(value)}: value out of range")
    return number


def _bool_param(query: Mapping[str, str], name: str) -> bool:
    """A boolean query flag: absent is False, bare is True, else Go's ParseBool."""
    if name not in query:
        return False
    value = query.get(name, "")
    if value == "" or value in _GO_TRUE:
        return True
    if value in _GO_FALSE:
        return False
    raise InvalidRequest(f"Invalid value for ?{name}")


class ConsulDevAgent:
    """Serves one :class:`ConsulState` over HTTP as Consul's API does."""

    def __init__(
        self, state: ConsulState, *, rng: random.Random | None = None, access: AccessControl | None = None
    ) -> None:
        self.state = state
        self.access = access or AccessControl()
        self._rng = rng or random.Random()
        self._changed = asyncio.Event()
        self._published_index = state.index
        self._stopping = False
        self.registry = CollectorRegistry()
        self._requests = Counter(
            "rtm_consul_dev_requests",
            "HTTP requests by endpoint and status code",
            ["endpoint", "code"],
            registry=self.registry,
        )
        self._malformed = Counter(
            "rtm_consul_dev_malformed_bodies",
            "Request bodies that failed to decode",
            ["endpoint"],
            registry=self.registry,
        )
        self._acl_refusals = Counter(
            "rtm_consul_dev_acl_refusals",
            "Requests refused by ACLs (403), by reason: acl_not_found or permission_denied",
            ["reason"],
            registry=self.registry,
        )
        self._acl_filtered = Counter(
            "rtm_consul_dev_acl_filtered",
            "List reads answered empty because the token may read nothing",
            registry=self.registry,
        )
        self._blocking_gauge = Gauge(
            "rtm_consul_dev_blocking_queries", "Blocking queries waiting right now", registry=self.registry
        )
        self._index_gauge = Gauge(
            "rtm_consul_dev_raft_index", "The agent's current raft-like index", registry=self.registry
        )
        self._index_gauge.set(state.index)
        self._exact: dict[str, Route] = {}
        self._prefixes: list[Route] = []
        for route in self._routes():
            if route.pattern.endswith("/"):
                self._prefixes.append(route)
            else:
                self._exact[route.pattern] = route
        self._prefixes.sort(key=lambda r: len(r.pattern), reverse=True)

    # ---- wiring -----------------------------------------------------------------
    def _routes(self) -> list[Route]:
        get, put = ("GET",), ("PUT",)
        filtered, open_ = Rule.FILTER, Rule.OPEN
        return [
            Route("/v1/agent/self", get, self.agent_self),
            Route("/v1/agent/services", get, self.agent_services, filterable=True, acl=filtered, empty={}),
            Route("/v1/agent/service/register", put, self.agent_service_register),
            Route("/v1/agent/service/deregister/", put, self.agent_service_deregister),
            Route("/v1/agent/service/", get, self.agent_service),
            Route("/v1/agent/checks", get, self.agent_checks, filterable=True, acl=filtered, empty={}),
            Route("/v1/agent/check/register", put, self.agent_check_register),
            Route("/v1/agent/check/deregister/", put, self.agent_check_deregister),
            Route("/v1/agent/check/pass/", put, self.agent_check_pass),
            Route("/v1/agent/check/warn/", put, self.agent_check_warn),
            Route("/v1/agent/check/fail/", put, self.agent_check_fail),
            Route("/v1/agent/check/update/", put, self.agent_check_update),
            Route("/v1/catalog/datacenters", get, self.catalog_datacenters, acl=open_),
            Route("/v1/catalog/nodes", get, self.catalog_nodes, query=True, filterable=True, acl=filtered, empty=[]),
            Route("/v1/catalog/node/", get, self.catalog_node, query=True, filterable=True, acl=filtered),
            Route(
                "/v1/catalog/services", get, self.catalog_services, query=True, filterable=True, acl=filtered, empty={}
            ),
            Route(
                "/v1/catalog/service/", get, self.catalog_service, query=True, filterable=True, acl=filtered, empty=[]
            ),
            Route("/v1/health/service/", get, self.health_service, query=True, filterable=True, acl=filtered, empty=[]),
            Route("/v1/health/checks/", get, self.health_checks, query=True, filterable=True, acl=filtered, empty=[]),
            Route("/v1/health/state/", get, self.health_state, query=True, filterable=True, acl=filtered, empty=[]),
            Route("/v1/health/node/", get, self.health_node, query=True, filterable=True, acl=filtered, empty=[]),
            Route("/v1/kv/", ("GET", "PUT", "DELETE"), self.kv, query=True),
            Route("/v1/session/create", put, self.session_create, query=True),
            Route("/v1/session/destroy/", put, self.session_destroy, query=True),
            Route("/v1/session/renew/", put, self.session_renew, query=True),
            Route("/v1/session/info/", get, self.session_info, query=True, acl=filtered, empty=[]),
            Route("/v1/session/list", get, self.session_list, query=True, acl=filtered, empty=[]),
            Route("/v1/session/node/", get, self.session_node, query=True, acl=filtered, empty=[]),
            # Consul's Status endpoints resolve no token: open under default deny too.
            Route("/v1/status/leader", get, self.status_leader, acl=open_),
            Route("/v1/status/peers", get, self.status_peers, acl=open_),
            # rtm's own, not Consul's: liveness and the agent's request counters, no Consul data.
            Route("/healthz", get, self.healthz, acl=open_),
            Route("/metrics", get, self.metrics, acl=open_),
        ]

    def application(self) -> web.Application:
        """An aiohttp application routing every path through :meth:`handle`."""
        app = web.Application(client_max_size=MAX_REQUEST_BODY_BYTES)
        app.router.add_route("*", "/{tail:.*}", self.handle)
        return app

    def match(self, path: str) -> tuple[Route | None, str]:
        """The route for ``path`` and the part after a prefix pattern (Go mux rules)."""
        route = self._exact.get(path)
        if route is not None:
            return route, ""
        for route in self._prefixes:
            if path.startswith(route.pattern):
                return route, path[len(route.pattern) :]
        return None, ""

    # ---- change notification and expiry ---------------------------------------------
    def publish(self) -> None:
        """Wake every blocking query if the state's index moved since the last call."""
        if self.state.index == self._published_index:
            return
        self._published_index = self.state.index
        self._index_gauge.set(self.state.index)
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()

    async def expiry_loop(self) -> None:
        """Apply expiries every :data:`EXPIRY_TICK_S` and wake queries they affect; runs until cancelled."""
        while not self._stopping:
            await asyncio.sleep(EXPIRY_TICK_S)
            self.state.tick()
            self.publish()

    def begin_shutdown(self) -> None:
        """Make every blocking query answer now, so the server can close quickly."""
        self._stopping = True
        self._changed.set()

    async def blocking(self, request: web.Request, query: Callable[[], tuple[int, T]]) -> tuple[int, T]:
        """Run ``query``; with ``?index=N`` re-run it on each change until its index passes N or wait ends."""
        options: QueryOptions = request.get(_QUERY_KEY, QueryOptions(0, DEFAULT_BLOCKING_WAIT_S))
        index, result = query()
        self.publish()  # the query may have applied expiries
        if options.min_index == 0:
            return index, result
        loop = asyncio.get_running_loop()
        wait_s = options.wait_s + self._rng.uniform(0.0, options.wait_s / BLOCKING_JITTER_DIVISOR)
        deadline = loop.time() + wait_s
        self._blocking_gauge.inc()
        try:
            while index <= options.min_index and not self._stopping:
                remaining = deadline - loop.time()
                if remaining <= 0:
                    break
                changed = self._changed
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(changed.wait(), remaining)
                index, result = query()
                self.publish()
        finally:
            self._blocking_gauge.dec()
        return index, result

    # ---- request pipeline ---------------------------------------------------------
    async def handle(self, request: web.Request) -> web.StreamResponse:
        """Serve one request; never raises (errors become Consul's status and text)."""
        route, tail = self.match(request.path)
        endpoint = route.pattern if route else "unknown"
        try:
            reply = await self._serve(request, route, tail)
        except ConsulError as err:
            if isinstance(err, InvalidRequest) and str(err).startswith("Request decode failed"):
                self._malformed.labels(endpoint).inc()
                log.info("malformed body on %s %s: %s", request.method, request.path, err)
            reply = Reply(err.status, str(err).encode(), TEXT_CONTENT_TYPE)
            if isinstance(err, (ACLNotFound, PermissionDenied)):
                reason = "acl_not_found" if isinstance(err, ACLNotFound) else "permission_denied"
                self._acl_refusals.labels(reason).inc()
                log.debug("ACL refused %s %s from %s: %s", request.method, request.path, request.remote, err)
            if isinstance(err, MethodNotAllowed):
                reply.headers["Allow"] = ",".join(err.allowed)
        except Exception:  # a bug in the agent must not stop it serving
            log.exception("internal error serving %s %s", request.method, request.path)
            reply = Reply(500, b"internal error in the rtm dev Consul agent", TEXT_CONTENT_TYPE)
        self.publish()
        self._requests.labels(endpoint, str(reply.status)).inc()
        headers = {
            "X-Consul-Index": str(reply.index if reply.index is not None else max(self.state.index, 1)),
            "X-Consul-KnownLeader": "true",
            "X-Consul-LastContact": "0",
            "X-Consul-Default-ACL-Policy": self.access.default_policy,
            "Content-Type": reply.content_type,
        }
        if route is not None and route.query:
            headers["X-Consul-Effective-Consistency"] = "leader"
        headers.update(reply.headers)
        return web.Response(status=reply.status, body=reply.body, headers=headers)

    async def _serve(self, request: web.Request, route: Route | None, tail: str) -> Reply:
        if route is None:
            return Reply(404, b"", TEXT_CONTENT_TYPE)
        if request.method == "OPTIONS":
            return Reply(200, b"", headers={"Allow": ",".join((*route.methods, "OPTIONS"))})
        if request.method not in route.methods:
            raise MethodNotAllowed(request.method, route.methods)
        query = request.query
        if route.query:
            request[_QUERY_KEY] = parse_query_options(query)
        if route.filterable and query.get("filter", ""):
            raise InvalidRequest(
                "?filter= expressions are not supported by the rtm dev Consul agent; "
                "filter the results client-side, or use real Consul (CONSUL_HTTP_ADDR)"
            )
        if route.query:
            dc = query.get("dc", "")
            if dc and dc != DATACENTER:
                raise ServerError("No path to datacenter")
        if route.acl is Rule.OPEN:
            return await route.handler(request, tail)
        authz = self.access.resolve(request_token(query, request.headers))
        request[_AUTHZ_KEY] = authz
        reply = await route.handler(request, tail)
        if route.acl is Rule.FILTER and not authz.allow_all and reply.status == 200:
            # Every item is dropped by the filter; the index (and blocking) is the query's own.
            self._acl_filtered.inc()
            filtered = self._json(request, route.empty, index=reply.index)
            filtered.headers = {k: v for k, v in reply.headers.items() if k != "X-Consul-ContentHash"}
            return filtered
        return reply

    @staticmethod
    def _authz(request: web.Request) -> Authorizer:
        """The authorizer :meth:`_serve` resolved for this request."""
        authz: Authorizer = request[_AUTHZ_KEY]
        return authz

    def _require_check_write(self, request: web.Request, check_id: str) -> None:
        """``service:write`` on the check's service, or ``node:write`` for a node check (unknown: no-op)."""
        owner = self.state.agent_check_service_name(check_id)
        if owner is None:
            return  # the state answers Consul's 404
        if owner:
            self._authz(request).require(Resource.SERVICE, Access.WRITE, owner)
        else:
            self._authz(request).require(Resource.NODE, Access.WRITE, NODE_NAME)

    def _json(self, request: web.Request, obj: Any, *, index: int | None = None, status: int = 200) -> Reply:
        if "pretty" in request.query:
            body = json.dumps(obj, indent=4, ensure_ascii=False) + "\n"
        else:
            body = json.dumps(obj, separators=(",", ":"), ensure_ascii=False)
        return Reply(status, body.encode(), JSON_CONTENT_TYPE, index)

    @staticmethod
    async def _body_json(request: web.Request) -> Any:
        """Decode the body as Go's json.Decoder does: the first JSON value, EOF when empty."""
        text = (await request.read()).decode("utf-8", errors="replace").lstrip(" \t\r\n")
        if not text:
            raise InvalidRequest("Request decode failed: EOF")
        try:
            value, _ = json.JSONDecoder().raw_decode(text)
        except json.JSONDecodeError as exc:
            raise InvalidRequest(f"Request decode failed: {exc}") from None
        return value

    @staticmethod
    def _conflicting(query: Mapping[str, str], *flags: str) -> None:
        if sum(flag in query for flag in flags) > 1:
            items = sorted(query.items(), key=lambda kv: kv[0])  # Go's url.Values.Encode order
            raise InvalidRequest(f"Conflicting flags: {urllib.parse.urlencode(items)}\n")

    # ---- agent ------------------------------------------------------------------
    async def agent_self(self, request: web.Request, tail: str) -> Reply:
        self._authz(request).require(Resource.AGENT, Access.READ, NODE_NAME)
        return self._json(request, self.state.agent_self())

    async def agent_services(self, request: web.Request, tail: str) -> Reply:
        return self._json(request, self.state.agent_services())

    async def agent_service(self, request: web.Request, tail: str) -> Reply:
        name = self.state.agent_service_name(tail)
        if name is not None:
            self._authz(request).require(Resource.SERVICE, Access.READ, name)
        body = self.state.agent_service(tail)
        if body is None:
            raise NotFound(f"unknown service ID: {tail}")
        reply = self._json(request, body)
        reply.headers["X-Consul-ContentHash"] = body["ContentHash"]
        return reply

    async def agent_service_register(self, request: web.Request, tail: str) -> Reply:
        raw = await self._body_json(request)
        definition = decode_service_definition(raw)
        self._authz(request).require(Resource.SERVICE, Access.WRITE, definition.name)
        existing = self.state.agent_service_name(definition.id)
        if existing is not None:  # the registration it would overwrite
            self._authz(request).require(Resource.SERVICE, Access.WRITE, existing)
        flag = request.query.getall("replace-existing-checks", [])
        replace_checks = bool(flag) and flag[0] in ("", "true")
        self.state.register_service(raw, replace_existing_checks=replace_checks)
        return Reply()

    async def agent_service_deregister(self, request: web.Request, tail: str) -> Reply:
        name = self.state.agent_service_name(tail)
        if name is not None:
            self._authz(request).require(Resource.SERVICE, Access.WRITE, name)
        self.state.deregister_service(tail)
        return Reply()

    async def agent_checks(self, request: web.Request, tail: str) -> Reply:
        return self._json(request, self.state.agent_checks())

    async def agent_check_register(self, request: web.Request, tail: str) -> Reply:
        raw = await self._body_json(request)
        definition = decode_check_definition(raw)
        service = self.state.agent_service_name(definition.service_id) if definition.service_id else None
        if service:
            self._authz(request).require(Resource.SERVICE, Access.WRITE, service)
        else:
            self._authz(request).require(Resource.NODE, Access.WRITE, NODE_NAME)
        self._require_check_write(request, definition.check_id)
        self.state.register_check(raw)
        return Reply()

    async def agent_check_deregister(self, request: web.Request, tail: str) -> Reply:
        self._require_check_write(request, tail)
        self.state.deregister_check(tail)
        return Reply()

    async def _ttl_update(self, request: web.Request, check_id: str, status: str) -> Reply:
        self._require_check_write(request, check_id)
        self.state.update_ttl_check(check_id, status, request.query.get("note", ""))
        return Reply()

    async def agent_check_pass(self, request: web.Request, tail: str) -> Reply:
        return await self._ttl_update(request, tail, HEALTH_PASSING)

    async def agent_check_warn(self, request: web.Request, tail: str) -> Reply:
        return await self._ttl_update(request, tail, HEALTH_WARNING)

    async def agent_check_fail(self, request: web.Request, tail: str) -> Reply:
        return await self._ttl_update(request, tail, HEALTH_CRITICAL)

    async def agent_check_update(self, request: web.Request, tail: str) -> Reply:
        raw = await self._body_json(request)
        self._require_check_write(request, tail)
        self.state.update_check(tail, raw)
        return Reply()

    # ---- catalog and health --------------------------------------------------------
    async def catalog_datacenters(self, request: web.Request, tail: str) -> Reply:
        return self._json(request, [DATACENTER])

    async def catalog_nodes(self, request: web.Request, tail: str) -> Reply:
        node_meta = request.query.getall("node-meta", [])
        index, body = await self.blocking(request, lambda: self.state.catalog_nodes(node_meta=node_meta))
        return self._json(request, body, index=index)

    async def catalog_node(self, request: web.Request, tail: str) -> Reply:
        if not tail:
            raise InvalidRequest("Missing node name")
        index, body = await self.blocking(request, lambda: self.state.catalog_node(tail))
        return self._json(request, body, index=index)

    async def catalog_services(self, request: web.Request, tail: str) -> Reply:
        node_meta = request.query.getall("node-meta", [])
        index, body = await self.blocking(request, lambda: self.state.catalog_services(node_meta=node_meta))
        return self._json(request, body, index=index)

    async def catalog_service(self, request: web.Request, tail: str) -> Reply:
        if not tail:
            raise InvalidRequest("Missing service name")
        tags = request.query.getall("tag", [])
        node_meta = request.query.getall("node-meta", [])
        index, body = await self.blocking(
            request, lambda: self.state.catalog_service(tail, tags=tags, node_meta=node_meta)
        )
        return self._json(request, body, index=index)

    async def health_service(self, request: web.Request, tail: str) -> Reply:
        if not tail:
            raise InvalidRequest("Missing service name")
        passing = _bool_param(request.query, "passing")
        tags = request.query.getall("tag", [])
        node_meta = request.query.getall("node-meta", [])
        index, body = await self.blocking(
            request, lambda: self.state.health_service(tail, passing=passing, tags=tags, node_meta=node_meta)
        )
        return self._json(request, body, index=index)

    async def health_checks(self, request: web.Request, tail: str) -> Reply:
        if not tail:
            raise InvalidRequest("Missing service name")
        node_meta = request.query.getall("node-meta", [])
        index, body = await self.blocking(request, lambda: self.state.health_checks(tail, node_meta=node_meta))
        return self._json(request, body, index=index)

    async def health_state(self, request: web.Request, tail: str) -> Reply:
        if not tail:
            raise InvalidRequest("Missing check state")
        node_meta = request.query.getall("node-meta", [])
        index, body = await self.blocking(request, lambda: self.state.health_state(tail, node_meta=node_meta))
        return self._json(request, body, index=index)

    async def health_node(self, request: web.Request, tail: str) -> Reply:
        if not tail:
            raise InvalidRequest("Missing node name")
        index, body = await self.blocking(request, lambda: self.state.health_node(tail))
        return self._json(request, body, index=index)

    # ---- KV -----------------------------------------------------------------------
    async def kv(self, request: web.Request, key: str) -> Reply:
        query = request.query
        if request.method == "GET":
            return await self._kv_get(request, key)
        if request.method == "PUT":
            if key == "":
                raise InvalidRequest("Missing key name")
            self._conflicting(query, "cas", "acquire", "release")
            flags = _parse_uint(query.get("flags", "")) if "flags" in query else 0
            cas = _parse_uint(query.get("cas", "")) if "cas" in query else None
            acquire = query.get("acquire", "") if "acquire" in query else None
            release = query.get("release", "") if "release" in query else None
            self._authz(request).require_bare(Resource.KEY, Access.WRITE, key)
            length = request.content_length or 0
            if length > KV_MAX_VALUE_BYTES:
                raise RequestTooLarge(
                    f"Request body({length} bytes) too large, max size: {KV_MAX_VALUE_BYTES} bytes. "
                    "See https://developer.hashicorp.com/docs/agent/config/config-files#kv_max_value_size."
                )
            value = await request.read()
            done = self.state.kv_put(key, value, flags=flags, cas=cas, acquire=acquire, release=release)
            return self._json(request, done)
        self._conflicting(query, "recurse", "cas")
        recurse = "recurse" in query
        if not recurse and key == "":
            raise InvalidRequest("Missing key name")
        cas = _parse_uint(query.get("cas", "")) if "cas" in query else None
        self._authz(request).require_bare(Resource.KEY, Access.WRITE, key)  # key_prefix write for recurse
        return self._json(request, self.state.kv_delete(key, recurse=recurse, cas=cas))

    async def _kv_get(self, request: web.Request, key: str) -> Reply:
        query = request.query
        authz = self._authz(request)
        if "keys" in query or "recurse" in query:
            if not authz.allowed(Resource.KEY, Access.READ, key):
                # Filtered to nothing: Consul answers a list with no entries 404, at the prefix's index.
                self._acl_filtered.inc()
                listing = self.state.kv_keys if "keys" in query else self.state.kv_list
                index, _ = await self.blocking(request, lambda: (listing(key)[0], None))
                return Reply(404, b"", TEXT_CONTENT_TYPE, index)
        elif key != "":
            authz.require_bare(Resource.KEY, Access.READ, key)
        if "keys" in query:
            separator = query.get("separator", query.get("seperator", ""))  # Consul accepts its old misspelling
            index, keys = await self.blocking(request, lambda: self.state.kv_keys(key, separator))
            if keys is None:
                return Reply(404, b"", TEXT_CONTENT_TYPE, index)
            return self._json(request, keys, index=index)
        if "recurse" in query:
            index, entries = await self.blocking(request, lambda: self.state.kv_list(key))
        else:
            if key == "":
                raise InvalidRequest("Missing key name")
            index, entries = await self.blocking(request, lambda: self.state.kv_get(key))
        if not entries:
            return Reply(404, b"", TEXT_CONTENT_TYPE, index)
        if "raw" in query and "recurse" not in query:
            _, value = self.state.kv_raw(key)
            headers = {"X-Content-Type-Options": "nosniff", "Content-Security-Policy": "sandbox"}
            return Reply(200, value or b"", "text/plain", index, headers)
        return self._json(request, entries, index=index)

    # ---- sessions ------------------------------------------------------------------
    async def session_create(self, request: web.Request, tail: str) -> Reply:
        self._authz(request).require_bare(Resource.SESSION, Access.WRITE, NODE_NAME)
        raw = await self._body_json(request) if await request.read() else None
        return self._json(request, {"ID": self.state.session_create(raw)})

    async def session_destroy(self, request: web.Request, tail: str) -> Reply:
        if not tail:
            raise InvalidRequest("Missing session")
        self._authz(request).require_bare(Resource.SESSION, Access.WRITE, NODE_NAME)
        self.state.session_destroy(tail)
        return self._json(request, True)

    async def session_renew(self, request: web.Request, tail: str) -> Reply:
        if not tail:
            raise InvalidRequest("Missing session")
        self._authz(request).require_bare(Resource.SESSION, Access.WRITE, NODE_NAME)
        return self._json(request, self.state.session_renew(tail))

    async def session_info(self, request: web.Request, tail: str) -> Reply:
        if not tail:
            raise InvalidRequest("Missing session")
        index, body = await self.blocking(request, lambda: self.state.session_info(tail))
        return self._json(request, body, index=index)

    async def session_list(self, request: web.Request, tail: str) -> Reply:
        index, body = await self.blocking(request, self.state.session_list)
        return self._json(request, body, index=index)

    async def session_node(self, request: web.Request, tail: str) -> Reply:
        if not tail:
            raise InvalidRequest("Missing node name")
        index, body = await self.blocking(request, lambda: self.state.session_node(tail))
        return self._json(request, body, index=index)

    # ---- status and rtm's own endpoints ---------------------------------------------
    async def status_leader(self, request: web.Request, tail: str) -> Reply:
        return self._json(request, self.state.leader())

    async def status_peers(self, request: web.Request, tail: str) -> Reply:
        return self._json(request, [self.state.leader()])

    async def healthz(self, request: web.Request, tail: str) -> Reply:
        return self._json(request, {"ok": True})

    async def metrics(self, request: web.Request, tail: str) -> Reply:
        return Reply(200, generate_latest(self.registry), CONTENT_TYPE_LATEST)


async def start_agent(host: str, port: int, acl_token: str = "") -> tuple[dict[str, Any], StopFn]:
    """Start serving on ``host:port`` (0 picks a free port); return the ready info and ``stop``.

    The info is what :func:`services.process.run_service` prints in the ready
    line. ``stop`` answers pending blocking queries, stops the expiry loop and
    closes the server within :data:`SHUTDOWN_TIMEOUT_S`.
    """
    node_address = host if host not in ("", "0.0.0.0", "::") else "127.0.0.1"
    state = ConsulState(time.monotonic, node_address=node_address)
    agent = ConsulDevAgent(state, access=AccessControl(acl_token))
    runner = web.AppRunner(agent.application(), access_log=None, shutdown_timeout=SHUTDOWN_TIMEOUT_S)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    try:
        await site.start()
    except BaseException:
        await runner.cleanup()
        raise
    bound_port = int(runner.addresses[0][1]) if port == 0 else port
    ticker = asyncio.create_task(agent.expiry_loop(), name="consul-dev-expiry")

    async def stop() -> None:
        agent.begin_shutdown()
        ticker.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await ticker
        await runner.cleanup()

    log.info(
        "dev Consul agent serving on http://%s:%d (node %s, dc %s, ACLs %s)",
        host,
        bound_port,
        NODE_NAME,
        DATACENTER,
        "enforced, default deny" if agent.access.enabled else "off",
    )
    info = {
        "service": SERVICE_NAME,
        "id": SERVICE_NAME,
        "host": host,
        "port": bound_port,
        "url": f"http://{host}:{bound_port}",
        "acl": agent.access.enabled,
    }
    return info, stop


def main(argv: list[str] | None = None) -> int:
    """``rtm consul-dev [--host H] [--port P] [--acl-token T]``: run the dev agent until SIGTERM/SIGINT."""
    parser = argparse.ArgumentParser(
        prog="rtm consul-dev",
        description="Run the embedded dev Consul agent. Production runs real Consul (CONSUL_HTTP_ADDR).",
    )
    parser.add_argument(
        "--host", default=os.environ.get(HOST_ENV, DEFAULT_HOST), help=f"address to bind (env {HOST_ENV})"
    )
    parser.add_argument(
        "--port", type=int, default=int(os.environ.get(PORT_ENV, DEFAULT_PORT)), help=f"HTTP port (env {PORT_ENV})"
    )
    parser.add_argument(
        "--acl-token",
        default=os.environ.get(ACL_TOKEN_ENV, ""),
        help="enforce ACLs with default deny; this is the management token, the only one that may do anything "
        f"(env {ACL_TOKEN_ENV}, which keeps it out of the process list; rtm up generates one)",
    )
    args = parser.parse_args(argv)
    from services.logs import configure

    configure(SERVICE_NAME)
    return run_service(lambda: start_agent(args.host, args.port, args.acl_token))
