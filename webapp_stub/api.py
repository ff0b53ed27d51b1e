"""The Slack Web API over aiohttp, plus the internal endpoints gateways use.

``/api/<method>`` follows Slack's conventions (see SLACK_COMPAT.md): GET or
POST, arguments merged from the query string, a form body and a JSON body
(an empty body is fine whatever its content type), the token in
``Authorization: Bearer`` or a ``token`` argument, HTTP 200 with
``{"ok": true, ...}`` or ``{"ok": false, "error": code}``, cursor pagination
through ``response_metadata.next_cursor`` ("" on the last page), and HTTP 429
with ``Retry-After`` when a token exceeds its per-method budget.

Internal endpoints (header ``X-Rtm-Secret`` carrying the ``internal_http`` key
derived from the fleet secret, :mod:`services.keys`; 403 otherwise):

* ``POST /internal/bootstrap`` ``{"user": U, "resume": id?}`` ->
  ``{"ok": true, "user": {id, name}, "team": {id, name, domain},
  "channels": [{"id": C, "seq": last_seq}, ...], "resumed": bool}``
  (conversations + the user's own channel + the team channel). With a live
  ``resume`` record of that user, its channels carry the recorded seq instead
  and ``resumed`` is true (see :mod:`webapp_stub.resume`).
* ``POST /internal/resume`` ``{"user": U, "channels": {C: last_delivered_seq}}``
  -> ``{"ok": true, "resume": id}``: a gateway about to move a connection
  records where it stopped; the user's next ``rtm.connect`` claims it.
* ``POST /internal/history`` ``{"channel": C, "after_seq": n, "limit": m}`` ->
  ``{"ok": true, "events": [{"seq", "json", "ctl", "t0"}, ...], "has_more"}``.
* ``POST /internal/call/<method>`` ``{"user": U, ...args}`` -> the same reply
  as ``/api/<method>`` would give that user (for messages sent over the
  websocket; not rate limited).

Every store call is synchronous and short; events it commits are handed to the
outbox before the reply is written, and the reply never waits for them.
"""

from __future__ import annotations

import asyncio
import hmac
import inspect
import json
import logging
import math
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl

import aiohttp
from aiohttp import web
from prometheus_client import Counter, Histogram

from services import regions
from services.discovery import Instance
from services.keys import FleetKeys
from services.metrics import LATENCY_BUCKETS_S, ServiceMetrics
from services.ticket import mint
from webapp_stub.commit import GroupCommit
from webapp_stub.handoff import Handoff
from webapp_stub.limits import check_attachments, check_blocks
from webapp_stub.presence import PresenceClient
from webapp_stub.resume import ResumeBook
from webapp_stub.store import (
    DEFAULT_HISTORY_PAGE,
    DEFAULT_PAGE,
    MAX_HISTORY_PAGE,
    MAX_PAGE,
    MAX_SQL_INT,
    ApiError,
    Channel,
    Store,
    User,
)

log = logging.getLogger("rtm.webapp.api")
GATEWAY_LOAD_POLL_S = 1.0  # how often rtm.connect's view of gateway connection counts is refreshed

SECRET_HEADER = "X-Rtm-Secret"
REGION_HEADER = "X-Rtm-Region"
DEFAULT_RATE_LIMIT_PER_MINUTE = 6000  # generous: tests and benchmarks must not trip it
MAX_RATE_BUCKETS = 100_000  # beyond this, full (idle) buckets are forgotten
MAX_BODY_BYTES = 4 * 1024 * 1024
INTERNAL_HISTORY_DEFAULT = 500
INTERNAL_HISTORY_MAX = 1000
TRUE_STRINGS = frozenset({"1", "true", "yes", "on"})
# users.getPresence when no presence server answers: "active" if seen this recently
# (a Web API call or a gateway connecting the user). Slack's own auto-away
# follows 10 minutes of inactivity in its clients; the same figure here.
PRESENCE_ACTIVE_WINDOW_S = 600.0
MAX_RESUME_CHANNELS = 100_000  # channels in one resume record (a user's conversations and more)
# Arrays and objects nested in one request's arguments (a message's blocks nest a
# few levels; see webapp_stub.limits.MAX_CONTENT_DEPTH). Deeper: invalid_json.
MAX_ARGS_DEPTH = 32
# What a refused write's 429 tells the caller to wait when the outbox is full:
# at the hand-off's pace (thousands of events per second) a full outbox drains in well under this.
OUTBOX_RETRY_AFTER_S = 1

Args = dict[str, Any]


# -- argument helpers -------------------------------------------------------------------


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
    value = args.get(name)
    if value is None:
        return None
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
            value = json.loads(value)
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
    stack: list[tuple[Any, int]] = [(value, 0)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, str):
            if not node.isascii():
                try:
                    node.encode("utf-8")
                except UnicodeEncodeError:
                    raise ApiError(code) from None
        elif isinstance(node, dict):
            if depth >= max_depth:
                raise ApiError(code)
            stack.extend((k, depth) for k in node)
            stack.extend((v, depth + 1) for v in node.values())
        elif isinstance(node, list):
            if depth >= max_depth:
                raise ApiError(code)
            stack.extend((v, depth + 1) for v in node)


async def read_args(request: web.Request) -> Args:
    """Query string, then form or JSON body, merged (body wins). Raises ``invalid_json``."""
    args: Args = {}
    for key, value in request.query.items():
        args.setdefault(key, value)
    if not request.can_read_body:
        check_text(args, "invalid_arguments")
        return args
    ctype = request.content_type
    if ctype.startswith("multipart/"):
        try:
            form = await request.post()
        except ValueError:
            raise ApiError("invalid_form_data") from None
        args.update({k: v for k, v in form.items() if isinstance(v, str)})
        check_text(args, "invalid_arguments")
        return args
    raw = await request.read()
    if not raw.strip():
        check_text(args, "invalid_arguments")
        return args
    looks_json = raw.lstrip()[:1] in (b"{", b"[")
    if ctype == "application/json" or (ctype != "application/x-www-form-urlencoded" and looks_json):
        args.update(parse_json_body(raw))
    else:
        try:
            args.update(parse_qsl(raw.decode("utf-8"), keep_blank_values=True))
        except (UnicodeDecodeError, ValueError):
            raise ApiError("invalid_form_data") from None
    check_text(args, "invalid_arguments")
    return args


def parse_json_body(raw: bytes | str) -> Args:
    """A JSON object body. Raises ``invalid_json``: not JSON, not an object, nested deeper
    than :data:`MAX_ARGS_DEPTH` (also when deep enough to exhaust the parser's stack), or
    holding a string that is not valid Unicode."""
    try:
        data = json.loads(raw)
    except (ValueError, RecursionError):  # UnicodeDecodeError is a ValueError
        raise ApiError("invalid_json") from None
    if not isinstance(data, dict):
        raise ApiError("invalid_json")
    check_text(data, "invalid_json")
    return data


def bearer_token(request: web.Request, args: Args) -> str | None:
    header = request.headers.get("Authorization", "")
    if header[:7].lower() == "bearer " and header[7:].strip():
        return header[7:].strip()
    token = args.get("token")
    return str(token) if token else None


def paged(key: str, items: list[Any], next_cursor: str, **extra: Any) -> dict[str, Any]:
    return {key: items, **extra, "response_metadata": {"next_cursor": next_cursor}}


# -- rate limits and gateways ---------------------------------------------------------------


class RateLimiter:
    """Token buckets per (token, method): ``per_minute`` burst, refilled evenly. 0 disables."""

    def __init__(self, per_minute: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.capacity = float(per_minute)
        self.rate_per_s = per_minute / 60.0
        self.clock = clock
        self._buckets: dict[tuple[str, str], tuple[float, float]] = {}

    def retry_after(self, token: str, method: str) -> int:
        """0 and one unit spent if allowed, else whole seconds until the next unit."""
        if self.capacity <= 0:
            return 0
        now = self.clock()
        key = (token, method)
        bucket = self._buckets.get(key)
        tokens = (
            self.capacity if bucket is None else min(self.capacity, bucket[0] + (now - bucket[1]) * self.rate_per_s)
        )
        if tokens >= 1.0:
            self._buckets[key] = (tokens - 1.0, now)
            if len(self._buckets) > MAX_RATE_BUCKETS:
                self._forget_idle(now)
            return 0
        self._buckets[key] = (tokens, now)
        return max(1, math.ceil((1.0 - tokens) / self.rate_per_s))

    def _forget_idle(self, now: float) -> None:
        full_after_s = self.capacity / self.rate_per_s
        for key in [k for k, (_, at) in self._buckets.items() if now - at >= full_after_s]:
            del self._buckets[key]


class GatewayPicker:
    """Which gateway ``rtm.connect`` hands out (see :mod:`services.regions`).

    The Consul watches keep :attr:`instances` (healthy gateways), the region
    map and the drained regions current; :meth:`poll_load_loop` reads each
    gateway's connection count from its ``/healthz``, and every ticket issued
    counts as one more connection until the next reading.
    """

    def __init__(self, region_map: dict[str, list[str]] | None = None) -> None:
        self.instances: list[Instance] = []
        self.config_map = dict(region_map or {})
        self.consul_map: dict[str, list[str]] = {}
        self.drained: set[str] = set()
        self.load: dict[str, int] = {}

    def set_instances(self, instances: list[Instance]) -> None:
        self.instances = sorted(instances, key=lambda inst: inst.id)

    def set_region_map(self, raw: bytes | None) -> None:
        try:
            self.consul_map = regions.parse_map(raw)
        except (ValueError, TypeError):
            log.error("ignoring an unreadable region map in Consul: %r", raw)

    def set_drained(self, entries: dict[str, Any]) -> None:
        self.drained = {key.removeprefix(regions.DRAINED_PREFIX) for key in entries}

    def pick(self, region: str = "") -> Instance | None:
        region_map = self.consul_map or self.config_map
        chosen = regions.choose_gateway(self.instances, region, region_map, self.drained, self.load)
        if chosen is not None:
            self.load[chosen.id] = self.load.get(chosen.id, 0) + 1
        return chosen  # type: ignore[return-value]

    async def poll_load_loop(self, interval_s: float = GATEWAY_LOAD_POLL_S) -> None:
        """Read every gateway's connection count from its /healthz, forever."""
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=interval_s)) as http:
            while True:
                for inst in list(self.instances):
                    port = inst.meta.get("metrics_port")
                    if not port:
                        continue
                    try:
                        async with http.get(f"http://{inst.address}:{port}/healthz") as resp:
                            self.load[inst.id] = int((await resp.json())["connections"])
                    except Exception as exc:  # a gateway that does not answer keeps its last count
                        log.debug("load of %s unknown: %s", inst.id, exc)
                await asyncio.sleep(interval_s)


# -- the API ----------------------------------------------------------------------------------


@dataclass
class Call:
    request: web.Request | None
    args: Args
    user: User | None  # None only for methods without auth

    @property
    def me(self) -> User:
        assert self.user is not None
        return self.user


Handler = Callable[
    ["WebApi", Call], dict[str, Any] | Awaitable[dict[str, Any]]
]  # async for the few that ask other services
METHODS: dict[str, tuple[Handler, bool]] = {}  # name -> (handler, needs auth)
# Methods that persist events: refused with ``ratelimited`` (before anything is
# written) while the hand-off outbox is full. See WebApi.check_backpressure.
WRITES: set[str] = set()


def method(name: str, auth: bool = True, writes: bool = False) -> Callable[[Handler], Handler]:
    def register(fn: Handler) -> Handler:
        METHODS[name] = (fn, auth)
        if writes:
            WRITES.add(name)
        return fn

    return register


class WebApi:
    """The request handlers; state lives in ``store``, events go to ``handoff``."""

    def __init__(
        self,
        store: Store,
        handoff: Handoff,
        gateways: GatewayPicker,
        metrics: ServiceMetrics,
        *,
        secret: bytes,
        rate_limit_per_minute: int = DEFAULT_RATE_LIMIT_PER_MINUTE,
        region: str = "",
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.store = store
        self.handoff = handoff
        self.gateways = gateways
        self.metrics = metrics
        self.keys = FleetKeys.from_secret(secret)  # one key per job; the fleet secret itself is not kept
        self._internal_credential = self.keys.internal_http_credential.encode()
        self.region = region
        self.clock = clock
        self.limiter = RateLimiter(rate_limit_per_minute)
        self.requests = metrics.counter(
            "rtm_webapp_requests_total", "Web API requests by method and outcome", ["method", "outcome"]
        )
        self.latency = metrics.histogram(
            "rtm_webapp_request_seconds", "Web API handling time", LATENCY_BUCKETS_S, ["method"]
        )
        # Their labelled children, found once per label set instead of by labels() on every
        # request (which checks the values and takes a lock). Children are never removed.
        self._request_counts: dict[tuple[str, str], Counter] = {}
        self._latencies: dict[str, Histogram] = {}
        self.posts = metrics.counter(
            "rtm_webapp_posts_total", "Messages persisted (chat.postMessage and websocket sends)"
        )
        self.resume = ResumeBook()
        self.resumes = metrics.counter(
            "rtm_webapp_resumes_total",
            "Resume records by step: recorded, claimed (rtm.connect), used, expired",
            ["step"],
        )
        metrics.gauge("rtm_webapp_resume_records", "Resume records waiting for their connection").set_function(
            lambda: len(self.resume)
        )
        self.backpressure = metrics.counter(
            "rtm_webapp_backpressure_total",
            "Writes refused with ratelimited (HTTP 429) because the hand-off outbox was full",
        )
        # Group commit: set by app.py; without it (some tests) every store call commits on its own.
        self.commits: GroupCommit | None = None
        self.last_seen: dict[str, float] = {}  # user -> last Web API call or gateway connect (presence fallback)
        self.presence: PresenceClient | None = None  # the presence servers (webapp_stub/presence.py), set by app.py

    def count_request(self, method: str, outcome: str) -> None:
        """``rtm_webapp_requests_total{method, outcome}`` += 1."""
        child = self._request_counts.get((method, outcome))
        if child is None:
            child = self._request_counts[(method, outcome)] = self.requests.labels(method, outcome)
        child.inc()

    def observe_latency(self, method: str, seconds: float) -> None:
        """One ``rtm_webapp_request_seconds{method}`` observation."""
        child = self._latencies.get(method)
        if child is None:
            child = self._latencies[method] = self.latency.labels(method)
        child.observe(seconds)

    def routes(self) -> list[web.RouteDef]:
        return [
            web.route("*", "/api/{method}", self.handle_api),
            web.post("/internal/bootstrap", self.handle_bootstrap),
            web.post("/internal/history", self.handle_history),
            web.post("/internal/resume", self.handle_resume),
            web.post("/internal/call/{method}", self.handle_internal_call),
        ]

    # -- /api/<method> -------------------------------------------------------------------
    async def handle_api(self, request: web.Request) -> web.Response:
        name = request.match_info["method"]
        label = name if name in METHODS else "unknown"
        started = time.perf_counter()
        headers: dict[str, str] = {}
        status = 200
        try:
            entry = METHODS.get(name)
            if entry is None:
                raise ApiError("unknown_method")
            handler, needs_auth = entry
            args = await read_args(request)
            user = None
            if needs_auth:
                token = bearer_token(request, args)
                if not token:
                    raise ApiError("not_authed")
                user = self.store.auth(token)
                if user is None:
                    raise ApiError("invalid_auth")
                self.last_seen[user.id] = self.clock()
                wait_s = self.limiter.retry_after(token, name)
                if wait_s:
                    raise ApiError("ratelimited", status=429, headers={"Retry-After": str(wait_s)})
            self.check_backpressure(name)
            result = handler(self, Call(request, args, user))
            body = {"ok": True, **(await result if inspect.isawaitable(result) else result)}
            await self.durable()
            outcome = "ok"
        except ApiError as exc:
            body, status, headers = {"ok": False, "error": exc.code}, exc.status, exc.headers
            # api.test echoes any error it is asked for: keep that out of the label values
            outcome = exc.code if name != "api.test" else "api_test_error"
            self.metrics.error(outcome)
        except web.HTTPRequestEntityTooLarge:
            body, outcome, status = {"ok": False, "error": "request_too_large"}, "request_too_large", 413
            self.metrics.error(outcome)
        except Exception:
            log.exception("%s failed", name)
            body, outcome = {"ok": False, "error": "internal_error"}, "internal_error"
            self.metrics.error(outcome)
        if not body["ok"]:
            await self.durable()  # what a failed call read may sit in the open batch too
        self.count_request(label, outcome)
        self.observe_latency(label, time.perf_counter() - started)
        return web.json_response(body, status=status, headers=headers)

    def check_backpressure(self, name: str) -> None:
        """``ratelimited`` (HTTP 429, Retry-After) for a write while the outbox is full.

        Checked before the handler runs, so a refused call persists nothing:
        the outbox never holds more than its bound plus one call's events, and
        everything it holds is still delivered.
        """
        if name in WRITES and self.handoff.saturated:
            self.backpressure.inc()
            raise ApiError("ratelimited", status=429, headers={"Retry-After": str(OUTBOX_RETRY_AFTER_S)})

    async def durable(self) -> None:
        """Wait until what this request wrote (and read) is committed; see :mod:`webapp_stub.commit`."""
        if self.commits is not None:
            await self.commits.durable()

    # -- internal endpoints ----------------------------------------------------------------
    def _check_secret(self, request: web.Request) -> None:
        given = request.headers.get(SECRET_HEADER, "").encode()
        if not hmac.compare_digest(given, self._internal_credential):
            self.metrics.error("internal_forbidden")
            raise web.HTTPForbidden(
                text=json.dumps({"ok": False, "error": "forbidden"}), content_type="application/json"
            )

    async def _internal_args(self, request: web.Request) -> Args:
        self._check_secret(request)
        if not request.can_read_body:
            return {}
        return parse_json_body(await request.read())

    async def handle_bootstrap(self, request: web.Request) -> web.Response:
        try:
            args = await self._internal_args(request)
            user_id = str(args.get("user") or "")
            rid = args.get("resume")
            resume = self.resume.take(str(rid), user_id) if rid else None
            if rid:
                self.resumes.labels("used" if resume is not None else "expired").inc()
            boot = self.store.bootstrap(user_id, resume)
            if boot is None:
                raise ApiError("user_not_found")
            self.last_seen[user_id] = self.clock()
            body = {"ok": True, **boot, "resumed": resume is not None}
        except ApiError as exc:
            self.metrics.error(exc.code)
            body = {"ok": False, "error": exc.code}
        except web.HTTPException:
            raise  # 403 for a wrong secret, 413 for a body over the limit
        except Exception:
            body = self._internal_failure("internal.bootstrap")
        await self.durable()  # the seqs it names are committed
        self.count_request("internal.bootstrap", "ok" if body["ok"] else body["error"])
        return web.json_response(body)

    def _internal_failure(self, name: str) -> dict[str, Any]:
        log.exception("%s failed", name)
        self.metrics.error("internal_error")
        return {"ok": False, "error": "internal_error"}

    async def handle_resume(self, request: web.Request) -> web.Response:
        """Record where a connection the fleet is moving stopped (see :mod:`webapp_stub.resume`)."""
        try:
            args = await self._internal_args(request)
            user_id = str(args.get("user") or "")
            if not user_id or self.store.user(user_id) is None:
                raise ApiError("user_not_found")
            channels = args.get("channels")
            if not isinstance(channels, dict) or len(channels) > MAX_RESUME_CHANNELS:
                raise ApiError("invalid_arguments")
            try:
                seqs = {str(ch): int(seq) for ch, seq in channels.items()}
            except (TypeError, ValueError, OverflowError):
                raise ApiError("invalid_arguments") from None
            if any(seq < 0 or seq > MAX_SQL_INT for seq in seqs.values()):
                raise ApiError("invalid_arguments")
            body: dict[str, Any] = {"ok": True, "resume": self.resume.add(user_id, seqs)}
            self.resumes.labels("recorded").inc()
        except ApiError as exc:
            self.metrics.error(exc.code)
            body = {"ok": False, "error": exc.code}
        except web.HTTPException:
            raise  # 403 for a wrong secret, 413 for a body over the limit
        except Exception:
            body = self._internal_failure("internal.resume")
        self.count_request("internal.resume", "ok" if body["ok"] else body["error"])
        return web.json_response(body)

    async def handle_history(self, request: web.Request) -> web.Response:
        try:
            args = await self._internal_args(request)
            channel = args.get("channel")
            if not isinstance(channel, str) or not channel:
                raise ApiError("channel_not_found")
            try:
                after_seq = int(args.get("after_seq") or 0)
            except (TypeError, ValueError, OverflowError):
                raise ApiError("invalid_arguments") from None
            if not 0 <= after_seq <= MAX_SQL_INT:
                raise ApiError("invalid_arguments")
            limit = int_arg(args, "limit", INTERNAL_HISTORY_DEFAULT, INTERNAL_HISTORY_MAX)
            events, more = self.store.events_after(channel, after_seq, limit)
            body: dict[str, Any] = {
                "ok": True,
                "events": [{"seq": e.seq, "json": e.json, "ctl": e.ctl, "t0": e.t0} for e in events],
                "has_more": more,
            }
        except ApiError as exc:
            self.metrics.error(exc.code)
            body = {"ok": False, "error": exc.code}
        except web.HTTPException:
            raise  # 403 for a wrong secret, 413 for a body over the limit
        except Exception:
            body = self._internal_failure("internal.history")
        await self.durable()  # never hand a gateway an event that is not yet durable
        self.count_request("internal.history", "ok" if body["ok"] else body["error"])
        return web.json_response(body)

    async def handle_internal_call(self, request: web.Request) -> web.Response:
        name = request.match_info["method"]
        label = name if name in METHODS else "unknown"
        status, headers = 200, {}
        try:
            args = await self._internal_args(request)
            entry = METHODS.get(name)
            if entry is None:
                raise ApiError("unknown_method")
            user = self.store.user(str(args.pop("user", "") or ""))
            if user is None:
                raise ApiError("user_not_found")
            self.check_backpressure(name)
            result = entry[0](self, Call(request, args, user))
            body = {"ok": True, **(await result if inspect.isawaitable(result) else result)}
        except ApiError as exc:
            # api.test echoes any error it is asked for: keep that out of the label values
            outcome = exc.code if name != "api.test" else "api_test_error"
            self.metrics.error(outcome)
            body = {"ok": False, "error": exc.code}
            status = exc.status
            headers = exc.headers
        except web.HTTPException:
            raise
        except Exception:
            body, outcome = self._internal_failure(f"internal.{label}"), "internal_error"
        await self.durable()
        self.count_request(f"internal.{label}", "ok" if body["ok"] else outcome)
        return web.json_response(body, status=status, headers=headers)

    # -- helpers ------------------------------------------------------------------------------
    def channel_arg(self, call: Call, name: str = "channel") -> Channel:
        """The channel named by an id (or ``#name``) that the caller may see; ``channel_not_found`` otherwise."""
        value = str_arg(call.args, name)
        if not value:
            raise ApiError("channel_not_found")
        if value.startswith("#") or not value[:1].isupper():
            found = self.store.channel_by_name(call.me.team, value.lstrip("#"))
            if found is None:
                raise ApiError("channel_not_found")
            value = found.id
        return self.store.visible_channel(value, call.me)

    def publish(self, events: list[Any]) -> None:
        if log.isEnabledFor(
            logging.DEBUG
        ):  # follow one event across processes by its eid (docs/deploy.md: "Following one message")
            for event in events:
                log.debug(
                    "committed %s %.200s", event.eid, event.json, extra={"eid": event.eid, "channel": event.channel}
                )
        if self.commits is not None:
            self.commits.publish(events)  # handed off when their batch commits
        else:
            self.handoff.publish(events)


# -- methods --------------------------------------------------------------------------------------
# Each handler returns the reply's fields besides "ok"; Slack's error codes are
# raised as ApiError by the handlers and by the store.


def user_arg(api: WebApi, call: Call, name: str = "user", default_me: bool = False) -> User:
    """A user of the caller's team named by ``name``; ``user_not_found`` otherwise."""
    user_id = str_arg(call.args, name)
    if not user_id:
        if default_me:
            return call.me
        raise ApiError("user_not_found")
    user = api.store.user(user_id)
    if user is None or user.team != call.me.team:
        raise ApiError("user_not_found")
    return user


def users_arg(api: WebApi, call: Call, name: str = "users") -> list[User]:
    """A comma-separated list (or JSON array) of user ids; [] if absent; ``user_not_found`` for a stranger."""
    value = call.args.get(name)
    if value is None or value == "":
        return []
    ids = value if isinstance(value, list) else str(value).split(",")
    users = []
    for user_id in ids:
        user_id = str(user_id).strip()
        if not user_id:
            continue
        user = api.store.user(user_id)
        if user is None or user.team != call.me.team:
            raise ApiError("user_not_found")
        users.append(user)
    return users


def conversation(api: WebApi, channel: Channel, viewer: User, **extra: Any) -> dict[str, Any]:
    """The conversation object as ``viewer`` sees it (a DM names the other member)."""
    if channel.is_im:
        return channel.to_api(user=api.store.dm_peer(channel, viewer.id), is_open=True, **extra)
    if "is_member" not in extra:
        extra["is_member"] = api.store.is_member(channel.id, viewer.id)
    return channel.to_api(**extra)


def message_content(call: Call) -> tuple[str, dict[str, Any]]:
    """``text`` and the ``blocks``/``attachments`` of a message argument set, within
    Slack's limits (:mod:`webapp_stub.limits`). Raises ``invalid_blocks_format``,
    ``invalid_blocks``, ``invalid_attachments``, ``too_many_attachments``."""
    text = call.args.get("text")
    text = "" if text is None else str(text)
    extra: dict[str, Any] = {}
    try:
        blocks = json_arg(call.args, "blocks")
    except ApiError:
        raise ApiError("invalid_blocks_format") from None
    if blocks is not None:
        blocks = check_blocks(blocks)
        if blocks:
            extra["blocks"] = blocks
    attachments = json_arg(call.args, "attachments")
    if attachments is not None:
        attachments = check_attachments(attachments)
        if attachments:
            extra["attachments"] = attachments
    return text, extra


CONVERSATION_TYPES = frozenset({"public_channel", "private_channel", "mpim", "im"})


def types_arg(call: Call) -> set[str]:
    types = {t.strip() for t in str(call.args.get("types") or "public_channel").split(",") if t.strip()}
    if not types or not types <= CONVERSATION_TYPES:
        raise ApiError("invalid_types")
    return types


@method("api.test", auth=False)
def api_test(api: WebApi, call: Call) -> dict[str, Any]:
    args = {k: v for k, v in call.args.items() if k != "token"}
    if args.get("error"):
        raise ApiError(str(args["error"]))
    return {"args": args} if args else {}


@method("auth.test")
def auth_test(api: WebApi, call: Call) -> dict[str, Any]:
    user = call.me
    team = api.store.team(user.team)
    base = f"{call.request.scheme}://{call.request.host}/" if call.request is not None else "/"
    reply: dict[str, Any] = {
        "url": base,
        "team": team.name if team else user.team,
        "user": user.name,
        "team_id": user.team,
        "user_id": user.id,
        "is_enterprise_install": False,
    }
    if user.bot_id:
        reply["bot_id"] = user.bot_id
    return reply


@method("rtm.connect")
def rtm_connect(api: WebApi, call: Call) -> dict[str, Any]:
    """A signed, single-use ticket URL on a gateway; it names the user's oldest
    pending resume record, if the fleet moved one of their connections."""
    user = call.me
    region = str(call.args.get("region") or "")
    if not region and call.request is not None:
        region = call.request.headers.get(REGION_HEADER, "")
    gateway = api.gateways.pick(region or api.region)
    if gateway is None:
        raise ApiError("service_unavailable")
    resume = api.resume.claim(user.id)
    if resume:
        api.resumes.labels("claimed").inc()
    ticket = mint(api.keys.ticket_signing, user.id, user.team, gateway.id, api.clock(), resume=resume)
    team = api.store.team(user.team)
    # behind an edge proxy a gateway registers the URL clients reach it at (gateway --public-url)
    base = gateway.meta.get("public_url") or f"ws://{gateway.address}:{gateway.port}"
    return {
        "url": f"{base.rstrip('/')}/ws/{ticket}",
        "self": {"id": user.id, "name": user.name},
        "team": team.to_api() if team else {"id": user.team, "name": user.team, "domain": user.team.lower()},
    }


# -- chat ---------------------------------------------------------------------------------------


@method("chat.postMessage", writes=True)
def chat_post_message(api: WebApi, call: Call) -> dict[str, Any]:
    """Post as the caller; ``channel`` may also be a user id (posts in the DM with them)."""
    target = str_arg(call.args, "channel") or ""
    if target[:1] in ("U", "W") and api.store.user(target) is not None:
        channel, _, events = api.store.open_dm(call.me, [user_arg(api, call, "channel")])
        api.publish(events)
    else:
        channel = api.channel_arg(call)
    text, extra = message_content(call)
    if not text and not extra:
        raise ApiError("no_text")
    thread_ts = str_arg(call.args, "thread_ts") or None
    message, event = api.store.post_message(
        channel, call.me, text, thread_ts=thread_ts, broadcast=flag(call.args, "reply_broadcast"), extra=extra or None
    )
    api.publish([event])
    api.posts.inc()
    return {"channel": channel.id, "ts": message["ts"], "message": message}


@method("chat.update", writes=True)
def chat_update(api: WebApi, call: Call) -> dict[str, Any]:
    channel = api.channel_arg(call)
    text, extra = message_content(call)
    if not text and not extra:
        raise ApiError("no_text")
    message, event = api.store.update_message(channel, call.me, call.args.get("ts"), text, extra=extra or None)
    api.publish([event])
    return {"channel": channel.id, "ts": message["ts"], "text": message["text"], "message": message}


@method("chat.delete", writes=True)
def chat_delete(api: WebApi, call: Call) -> dict[str, Any]:
    channel = api.channel_arg(call)
    ts, event = api.store.delete_message(channel, call.me, call.args.get("ts"))
    api.publish([event])
    return {"channel": channel.id, "ts": ts}


@method("chat.postEphemeral", writes=True)
def chat_post_ephemeral(api: WebApi, call: Call) -> dict[str, Any]:
    channel = api.channel_arg(call)
    target = user_arg(api, call)
    text, extra = message_content(call)
    if not text and not extra:
        raise ApiError("no_text")
    ts, event = api.store.post_ephemeral(channel, call.me, target, text)
    api.publish([event])
    return {"message_ts": ts}


# -- conversations --------------------------------------------------------------------------------


@method("conversations.list")
def conversations_list(api: WebApi, call: Call) -> dict[str, Any]:
    page = api.store.list_conversations(
        call.me,
        types=types_arg(call),
        limit=int_arg(call.args, "limit", DEFAULT_PAGE, MAX_PAGE),
        cursor=str_arg(call.args, "cursor"),
        exclude_archived=flag(call.args, "exclude_archived"),
    )
    mine = api.store.memberships(call.me.id, [c.id for c in page.items])
    channels = [conversation(api, c, call.me, **({} if c.is_im else {"is_member": c.id in mine})) for c in page.items]
    return paged("channels", channels, page.next_cursor)


@method("users.conversations")
def users_conversations(api: WebApi, call: Call) -> dict[str, Any]:
    """The conversations ``user`` (default: the caller) is in, that the caller may see."""
    member = user_arg(api, call, default_me=True)
    page = api.store.list_conversations(
        call.me,
        types=types_arg(call),
        member_of=member.id,
        limit=int_arg(call.args, "limit", DEFAULT_PAGE, MAX_PAGE),
        cursor=str_arg(call.args, "cursor"),
        exclude_archived=flag(call.args, "exclude_archived"),
    )
    return paged("channels", [conversation(api, c, call.me) for c in page.items], page.next_cursor)


@method("conversations.history")
def conversations_history(api: WebApi, call: Call) -> dict[str, Any]:
    channel = api.channel_arg(call)
    messages, more, cursor = api.store.history(
        channel.id,
        limit=int_arg(call.args, "limit", DEFAULT_HISTORY_PAGE, MAX_HISTORY_PAGE),
        cursor=str_arg(call.args, "cursor"),
        oldest=str_arg(call.args, "oldest"),
        latest=str_arg(call.args, "latest"),
        inclusive=flag(call.args, "inclusive"),
    )
    return paged("messages", messages, cursor, has_more=more, pin_count=0)


@method("conversations.replies")
def conversations_replies(api: WebApi, call: Call) -> dict[str, Any]:
    channel = api.channel_arg(call)
    ts = str_arg(call.args, "ts")
    if not ts:
        raise ApiError("thread_not_found")
    messages, more, cursor = api.store.replies(
        channel.id,
        ts,
        limit=int_arg(call.args, "limit", DEFAULT_HISTORY_PAGE, MAX_HISTORY_PAGE),
        cursor=str_arg(call.args, "cursor"),
    )
    return paged("messages", messages, cursor, has_more=more)


@method("conversations.create", writes=True)
def conversations_create(api: WebApi, call: Call) -> dict[str, Any]:
    channel, events = api.store.create_channel(call.me, call.args.get("name"), is_private=flag(call.args, "is_private"))
    api.publish(events)
    return {"channel": channel.to_api(is_member=True)}


@method("conversations.join", writes=True)
def conversations_join(api: WebApi, call: Call) -> dict[str, Any]:
    channel = api.channel_arg(call)
    if channel.is_private:
        raise ApiError("method_not_supported_for_channel_type")
    already, events = api.store.join_channel(channel, call.me)
    api.publish(events)
    reply: dict[str, Any] = {"channel": channel.to_api(is_member=True)}
    if already:
        reply["warning"] = "already_in_channel"
        reply["response_metadata"] = {"warnings": ["already_in_channel"]}
    return reply


@method("conversations.leave", writes=True)
def conversations_leave(api: WebApi, call: Call) -> dict[str, Any]:
    channel = api.channel_arg(call)
    was_not_in, events = api.store.leave_channel(channel, call.me)
    api.publish(events)
    return {"not_in_channel": True} if was_not_in else {}


@method("conversations.invite", writes=True)
def conversations_invite(api: WebApi, call: Call) -> dict[str, Any]:
    channel = api.channel_arg(call)
    users = users_arg(api, call)
    if not users:
        raise ApiError("no_user")
    api.publish(api.store.invite(channel, call.me, users))
    return {"channel": channel.to_api(is_member=True)}


@method("conversations.kick", writes=True)
def conversations_kick(api: WebApi, call: Call) -> dict[str, Any]:
    channel = api.channel_arg(call)
    target = user_arg(api, call)
    api.publish(api.store.kick(channel, call.me, target))
    return {}


@method("conversations.rename", writes=True)
def conversations_rename(api: WebApi, call: Call) -> dict[str, Any]:
    channel = api.channel_arg(call)
    renamed, events = api.store.rename_channel(channel, call.me, call.args.get("name"))
    api.publish(events)
    return {"channel": renamed.to_api(is_member=True)}


@method("conversations.archive", writes=True)
def conversations_archive(api: WebApi, call: Call) -> dict[str, Any]:
    api.publish(api.store.archive_channel(api.channel_arg(call), call.me, archived=True))
    return {}


@method("conversations.unarchive", writes=True)
def conversations_unarchive(api: WebApi, call: Call) -> dict[str, Any]:
    api.publish(api.store.archive_channel(api.channel_arg(call), call.me, archived=False))
    return {}


@method("conversations.open", writes=True)
def conversations_open(api: WebApi, call: Call) -> dict[str, Any]:
    """Open (creating on first use) the DM with ``users`` (one id) or the group DM
    (several); or reopen ``channel``, a DM the caller is in."""
    users = users_arg(api, call)
    if users:
        channel, already, events = api.store.open_dm(call.me, users)
        api.publish(events)
    elif str_arg(call.args, "channel"):
        channel = api.channel_arg(call)
        if channel.kind == "channel":
            raise ApiError("method_not_supported_for_channel_type")
        already = True
    else:
        raise ApiError("users_list_not_supplied")
    reply: dict[str, Any] = {
        "channel": conversation(api, channel, call.me) if flag(call.args, "return_im") else {"id": channel.id}
    }
    if already:
        reply.update(no_op=True, already_open=True)
    return reply


@method("conversations.members")
def conversations_members(api: WebApi, call: Call) -> dict[str, Any]:
    channel = api.channel_arg(call)
    page = api.store.list_members(
        channel.id, limit=int_arg(call.args, "limit", DEFAULT_PAGE, MAX_PAGE), cursor=str_arg(call.args, "cursor")
    )
    return paged("members", page.items, page.next_cursor)


@method("conversations.info")
def conversations_info(api: WebApi, call: Call) -> dict[str, Any]:
    channel = api.channel_arg(call)
    extra: dict[str, Any] = {}
    if flag(call.args, "include_num_members"):
        extra["num_members"] = api.store.member_count(channel.id)
    return {"channel": conversation(api, channel, call.me, **extra)}


# -- reactions --------------------------------------------------------------------------------------


def reaction_target(api: WebApi, call: Call) -> tuple[Channel, str]:
    if not str_arg(call.args, "channel") and not str_arg(call.args, "timestamp"):
        raise ApiError("no_item_specified")
    channel = api.channel_arg(call)
    ts = str_arg(call.args, "timestamp")
    if not ts:
        raise ApiError("no_item_specified")
    return channel, ts


@method("reactions.add", writes=True)
def reactions_add(api: WebApi, call: Call) -> dict[str, Any]:
    channel, ts = reaction_target(api, call)
    api.publish([api.store.add_reaction(channel, call.me, ts, call.args.get("name"))])
    return {}


@method("reactions.remove", writes=True)
def reactions_remove(api: WebApi, call: Call) -> dict[str, Any]:
    channel, ts = reaction_target(api, call)
    api.publish([api.store.remove_reaction(channel, call.me, ts, call.args.get("name"))])
    return {}


@method("reactions.get")
def reactions_get(api: WebApi, call: Call) -> dict[str, Any]:
    channel, ts = reaction_target(api, call)
    return {"type": "message", "channel": channel.id, "message": api.store.message(channel.id, ts)}


# -- users and bots -----------------------------------------------------------------------------------


@method("users.list")
def users_list(api: WebApi, call: Call) -> dict[str, Any]:
    page = api.store.list_users(
        call.me.team, limit=int_arg(call.args, "limit", MAX_PAGE, MAX_PAGE), cursor=str_arg(call.args, "cursor")
    )
    return paged("members", [u.to_api() for u in page.items], page.next_cursor, cache_ts=int(api.clock()))


@method("users.info")
def users_info(api: WebApi, call: Call) -> dict[str, Any]:
    return {"user": user_arg(api, call).to_api()}


@method("users.getPresence")
async def users_get_presence(api: WebApi, call: Call) -> dict[str, Any]:
    """From the presence server that owns the user: ``active`` when they have a
    connection on some gateway and are not set ``away`` by hand. When no presence
    server answers, the webapp's own estimate: ``active`` if not set away and seen
    (a Web API call, or a gateway connecting them) within
    :data:`PRESENCE_ACTIVE_WINDOW_S`. Details only for oneself, as Slack."""
    user = user_arg(api, call, default_me=True)
    found = await api.presence.get(user.id) if api.presence is not None else None
    if found is not None:
        presence, online = str(found["presence"]), bool(found["online"])
        manual_away, last_activity = bool(found["manual_away"]), int(found.get("last_activity") or 0)
    else:
        seen = api.last_seen.get(user.id)
        online = seen is not None and api.clock() - seen < PRESENCE_ACTIVE_WINDOW_S
        manual_away = user.presence == "away"
        presence = "active" if online and not manual_away else "away"
        last_activity = int(seen or 0)
    if user.id != call.me.id:
        return {"presence": presence}
    return {
        "presence": presence,
        "online": online,
        "auto_away": not online and not manual_away,
        "manual_away": manual_away,
        "last_activity": last_activity,
    }


@method("users.setPresence", writes=True)
async def users_set_presence(api: WebApi, call: Call) -> dict[str, Any]:
    """Persisted first (SQLite is the durable copy), then told to the user's presence
    server, which pushes the change to watchers; if it cannot be told now, the webapp
    re-sends every manual away when its link to that server comes back."""
    presence = str(call.args.get("presence") or "")
    api.publish(api.store.set_presence(call.me, presence))
    if api.presence is not None:
        await api.presence.set_manual(call.me.id, presence)
    return {}


@method("bots.info")
def bots_info(api: WebApi, call: Call) -> dict[str, Any]:
    """The bot behind a ``B…`` id (the caller's own when ``bot`` is absent and it is a bot)."""
    bot_id = str_arg(call.args, "bot") or call.me.bot_id or ""
    user = api.store.bot(bot_id) if bot_id else None
    if user is None or user.team != call.me.team:
        raise ApiError("bot_not_found")
    return {
        "bot": {
            "id": user.bot_id,
            "deleted": False,
            "name": user.name,
            "updated": 0,
            "app_id": "A" + str(user.bot_id)[1:],
            "user_id": user.id,
            "icons": {},
        }
    }
