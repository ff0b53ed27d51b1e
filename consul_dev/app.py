"""The dev Consul agent's HTTP layer: aiohttp in, :class:`ConsulState` calls, Consul-shaped replies out.

Thin by design: routing (Consul's mux: exact paths and ``/prefix/`` paths,
405 with ``Allow`` for a wrong method, empty 404 for unknown paths), query
options (``dc``, ``stale``/``consistent``, ``index``/``wait`` parsed as
Consul does, ``filter`` refused plainly), blocking queries, body decoding,
headers and metrics. Everything Consul-specific about data lives in
:mod:`consul_dev.state`; the endpoints' handlers are in :mod:`consul_dev.endpoints`,
Consul's request conventions in :mod:`consul_dev.request`.

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
import logging
import os
import random
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Final, TypeVar

from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Gauge

from consul_dev.acl import (
    AccessControl,
    ACLNotFound,
    PermissionDenied,
    Rule,
    RulesError,
    Token,
    parse_token_file,
    request_token,
)
from consul_dev.endpoints import ConsulEndpoints
from consul_dev.errors import ConsulError, InvalidRequest, ServerError
from consul_dev.node import DATACENTER, KV_MAX_VALUE_BYTES, NODE_NAME
from consul_dev.request import (
    ACL_FILTERED_KEY,
    AUTHZ_KEY,
    DEFAULT_BLOCKING_WAIT_S,
    QUERY_KEY,
    TEXT_CONTENT_TYPE,
    MethodNotAllowed,
    QueryOptions,
    Reply,
    Route,
    parse_query_options,
)
from consul_dev.state import ConsulState
from services.metrics import add_process_collectors
from services.process import StopFn, run_service

log = logging.getLogger("rtm.consul_dev")

T = TypeVar("T")

SERVICE_NAME: Final = "consul-dev"
DEFAULT_HOST: Final = "127.0.0.1"
DEFAULT_PORT: Final = 8500  # Consul's HTTP port
HOST_ENV: Final = "RTM_CONSUL_DEV_HOST"
PORT_ENV: Final = "RTM_CONSUL_DEV_PORT"
# The management token; with it (or a tokens file) set, the agent enforces ACLs with default deny.
ACL_TOKEN_ENV: Final = "RTM_CONSUL_DEV_ACL_TOKEN"
# The tokens with rules (consul_dev.acl.parse_token_file): SecretID -> AccessorID, Description, Rules.
ACL_TOKENS_FILE_ENV: Final = "RTM_CONSUL_DEV_ACL_TOKENS_FILE"

# How often expiries (TTL checks, session TTLs, reaping) are applied when no
# request arrives: 100 ms keeps a 1 s test TTL accurate to 10 %.
EXPIRY_TICK_S: Final = 0.1
BLOCKING_JITTER_DIVISOR: Final = 16  # Consul adds up to wait/16 of random jitter
# Above KV_MAX_VALUE_BYTES so an oversized KV value gets Consul's own 413 text.
MAX_REQUEST_BODY_BYTES: Final = 4 * KV_MAX_VALUE_BYTES
# Blocking queries return at once on shutdown, so handlers finish quickly.
SHUTDOWN_TIMEOUT_S: Final = 2.0


class ConsulDevAgent(ConsulEndpoints):
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
        add_process_collectors(self.registry)  # process_cpu_seconds_total and the rest, as every rtm process
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
            "List reads from which ACLs removed entries the token may not read",
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
        for route in self.routes():
            if route.pattern.endswith("/"):
                self._prefixes.append(route)
            else:
                self._exact[route.pattern] = route
        self._prefixes.sort(key=lambda r: len(r.pattern), reverse=True)

    # ---- wiring -----------------------------------------------------------------
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
        options: QueryOptions = request.get(QUERY_KEY, QueryOptions(0, DEFAULT_BLOCKING_WAIT_S))
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
            request[QUERY_KEY] = parse_query_options(query)
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
        request[AUTHZ_KEY] = authz
        reply = await route.handler(request, tail)
        if route.acl is Rule.FILTER and reply.status == 200 and not request.get(ACL_FILTERED_KEY):
            # A list handler that forgot its ACL filter would leak what the token may not read.
            raise ServerError(f"{route.pattern}: the rtm dev agent answered a list without filtering it by ACLs")
        return reply


async def start_agent(
    host: str, port: int, acl_token: str = "", acl_tokens: Mapping[str, Token] | None = None
) -> tuple[dict[str, Any], StopFn]:
    """Start serving on ``host:port`` (0 picks a free port); return the ready info and ``stop``.

    ``acl_token`` is the management token, ``acl_tokens`` the tokens with rules; with
    either, ACLs are enforced with default deny.

    The info is what :func:`services.process.run_service` prints in the ready
    line. ``stop`` answers pending blocking queries, stops the expiry loop and
    closes the server within :data:`SHUTDOWN_TIMEOUT_S`.
    """
    node_address = host if host not in ("", "0.0.0.0", "::") else "127.0.0.1"
    state = ConsulState(time.monotonic, node_address=node_address)
    agent = ConsulDevAgent(state, access=AccessControl(acl_token, acl_tokens))
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
        f"enforced, default deny, {len(acl_tokens or {})} token(s) with rules" if agent.access.enabled else "off",
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
    """``rtm consul-dev [--host H] [--port P] [--acl-token T] [--acl-tokens-file PATH]``: run until SIGTERM/SIGINT."""
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
        help="enforce ACLs with default deny; this is the management token, which may do everything "
        f"(env {ACL_TOKEN_ENV}, which keeps it out of the process list; rtm up generates one and gives it to no "
        "other process)",
    )
    parser.add_argument(
        "--acl-tokens-file",
        default=os.environ.get(ACL_TOKENS_FILE_ENV, ""),
        help="enforce ACLs with default deny; the tokens with rules, a JSON object SecretID -> "
        '{"AccessorID", "Description", "Rules"} with Consul\'s JSON rule syntax (keep it 0600; '
        f"env {ACL_TOKENS_FILE_ENV}; rtm up writes DATA_DIR/consul-acl-tokens.json, one token per role)",
    )
    args = parser.parse_args(argv)
    tokens: dict[str, Token] = {}
    if args.acl_tokens_file:
        try:
            tokens = parse_token_file(Path(args.acl_tokens_file).read_text(encoding="utf-8"))
        except (OSError, RulesError) as exc:
            parser.error(f"--acl-tokens-file {args.acl_tokens_file}: {exc}")
    from services.logs import configure

    configure(SERVICE_NAME)
    return run_service(lambda: start_agent(args.host, args.port, args.acl_token, tokens))
