"""The Slack Web API over aiohttp, plus the internal endpoints gateways use.

``/api/<method>`` follows Slack's conventions (see SLACK_COMPAT.md): GET or
POST, arguments merged from the query string, a form body and a JSON body
(an empty body is fine whatever its content type), the token in
``Authorization: Bearer`` or a ``token`` argument, HTTP 200 with
``{"ok": true, ...}`` or ``{"ok": false, "error": code}``, cursor pagination
through ``response_metadata.next_cursor`` ("" on the last page), and HTTP 429
with ``Retry-After`` when a token exceeds its per-method budget.

This module is the dispatch: the ``@method`` registry, :class:`Call`, :class:`WebApi` (auth, rate
limit, backpressure, metrics, the reply); the helpers method handlers share to resolve arguments
into users and channels are in :mod:`webapp_stub.call_args`. The methods themselves are in :mod:`webapp_stub.methods` by family
(importing that package registers them); argument parsing in :mod:`webapp_stub.args`, rate limits in
:mod:`webapp_stub.ratelimit`, the gateway choice in :mod:`webapp_stub.gateway_picker`, and
``/internal/...`` in :mod:`webapp_stub.internal`. :class:`RateLimiter` and :class:`GatewayPicker` stay
importable from here.

Every store call is synchronous and short; events it commits are handed to the
outbox before the reply is written, and the reply never waits for them.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from aiohttp import web

from services.keys import FleetKeys
from services.metrics import LATENCY_BUCKETS_S, ServiceMetrics
from webapp_stub.args import (
    MAX_ARGS_DEPTH,
    TRUE_STRINGS,
    Args,
    bearer_token,
    check_text,
    flag,
    int_arg,
    json_arg,
    paged,
    parse_json_body,
    read_args,
    str_arg,
)
from webapp_stub.commit import CommitFailed, GroupCommit
from webapp_stub.errors import ApiError
from webapp_stub.gateway_picker import GATEWAY_LOAD_POLL_S, GatewayPicker
from webapp_stub.handoff import Handoff
from webapp_stub.models import Channel, User
from webapp_stub.presence import PresenceClient
from webapp_stub.ratelimit import DEFAULT_RATE_LIMIT_PER_MINUTE, MAX_RATE_BUCKETS, RateLimiter
from webapp_stub.reply import OK_BODY, Answer, EncodedReply, Failure
from webapp_stub.resume import ResumeBook
from webapp_stub.resume_table import ResumeTable
from webapp_stub.store import Store
from webapp_stub.tally import TallyCounter, TallyHistogram

if TYPE_CHECKING:
    from webapp_stub.file_transfer import FileService
    from webapp_stub.scheduler import Scheduler

__all__ = [
    "DEFAULT_RATE_LIMIT_PER_MINUTE",
    "GATEWAY_LOAD_POLL_S",
    "MAX_ARGS_DEPTH",
    "MAX_BODY_BYTES",
    "MAX_RATE_BUCKETS",
    "METHODS",
    "TRUE_STRINGS",
    "WRITES",
    "ApiError",
    "Args",
    "Call",
    "EncodedReply",
    "GatewayPicker",
    "RateLimiter",
    "WebApi",
    "bearer_token",
    "check_text",
    "flag",
    "int_arg",
    "json_arg",
    "method",
    "paged",
    "parse_json_body",
    "read_args",
    "str_arg",
]

log = logging.getLogger("rtm.webapp.api")
MAX_BODY_BYTES = 4 * 1024 * 1024
# What a refused write's 429 tells the caller to wait when the outbox is full:
# at the hand-off's pace (thousands of events per second) a full outbox drains in well under this.
OUTBOX_RETRY_AFTER_S = 1


@dataclass
class Call:
    request: web.Request | None
    args: Args
    user: User | None  # None only for methods without auth
    # The call's token, read once where it was dispatched (``Authorization: Bearer``, else the
    # ``token`` argument): the one :meth:`WebApi.authenticate` checked for a method with auth;
    # a method without (``apps.connections.open``) checks it itself. None: the call had none.
    token: str | None = None

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
        self.region = region
        self.public_url = ""  # --public-url (client.py: public_base_url), set by app.py; "": the request's own
        self.clock = clock
        self.limiter = RateLimiter(rate_limit_per_minute)
        # Per-request metrics in plain ints, exported on scrape (webapp_stub/tally.py): three
        # prometheus updates per post cost 1.6 µs of locks and calls, these 0.3 µs.
        self.requests = TallyCounter(
            metrics.registry,
            "rtm_webapp_requests_total",
            "Web API requests by method and outcome",
            ["method", "outcome"],
        )
        self.latency = TallyHistogram(
            metrics.registry, "rtm_webapp_request_seconds", "Web API handling time", LATENCY_BUCKETS_S, ["method"]
        )
        self.posts = TallyCounter(
            metrics.registry, "rtm_webapp_posts_total", "Messages persisted (chat.postMessage and websocket sends)"
        )
        self.resume = ResumeBook(clock=clock, rows=ResumeTable(store))  # durable: a restart keeps them
        self.resumes = metrics.counter(
            "rtm_webapp_resumes_total",
            "Resume records by step: recorded, claimed (rtm.connect), used, expired, late (refused: past its deadline), confirmed / unconfirmed (the gateway sent hello), withdrawn / kept (its connection closed before goodbye)",
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
        self.scheduler: Scheduler | None = None  # due items (webapp_stub/scheduler.py), set by app.py
        self.files: FileService | None = None  # files' bytes and limits (webapp_stub/file_transfer.py), set by app.py
        self.revoke_fanout_wait_s: float | None = None  # --revoke-fanout-wait-s (methods/auth.py), set by app.py

    def count_request(self, method: str, outcome: str) -> None:
        """``rtm_webapp_requests_total{method, outcome}`` += 1."""
        self.requests.inc(method, outcome)

    def observe_latency(self, method: str, seconds: float) -> None:
        """One ``rtm_webapp_request_seconds{method}`` observation."""
        self.latency.observe(seconds, method)

    def routes(self) -> list[web.RouteDef]:
        return [web.route("*", "/api/{method}", self.handle_api)]

    # -- /api/<method> -------------------------------------------------------------------
    async def handle_api(self, request: web.Request) -> web.Response:
        name = request.match_info["method"]

        def token_of(args: Args) -> str | None:
            return bearer_token(request, args)

        status, headers, body, encoded = await self.answer(name, request, lambda: read_args(request), token_of)
        if encoded is not None:
            return web.Response(text=encoded, content_type="application/json")
        return web.json_response(body, status=status, headers=headers)

    async def answer(
        self,
        name: str,
        request: web.Request | None,
        reading: Args | Callable[[], Awaitable[Args]],
        token_of: Callable[[Args], str | None],
    ) -> Answer:
        """One Web API call, whatever server read it (aiohttp's, or the lean front of
        webapp_stub/http_front.py): ``reading`` is its arguments (or reads them: a raising
        read is answered like any other error), ``token_of`` gives its token.
        Returns (status, headers, body, encoded): ``encoded``, when not None, is the whole
        successful reply already encoded (send it instead of encoding ``body``)."""
        started = time.perf_counter()
        args: Args | Exception = {}
        if isinstance(reading, dict):
            args = reading
        elif name in METHODS:  # an unknown method's body is not read: unknown_method at once
            try:
                args = await reading()
            except ConnectionResetError:  # the client hung up before its body came: not our failure
                args = ApiError("client_gone")
            except Exception as exc:  # answered by _start, after the method's lookup
                args = exc
        called: dict[str, Any] | Failure | Awaitable[dict[str, Any]]
        try:
            called = self._start(name, request, args, token_of)
        except Exception as exc:
            called = self.failure(name, exc)
        return await self._settle(name, started, called)

    def answer_now(
        self,
        name: str,
        args: Args | ApiError,
        token_of: Callable[[Args], str | None],
        reply: Callable[[Answer], None],
    ) -> asyncio.Future[Any] | None:
        """:meth:`answer` without a task (the lean front's posts): ``reply`` is called once the call
        is durable (at once, or from the commit's callback); returns what it waits for, else None.
        ``args``: an :class:`ApiError` if reading them failed. An async handler runs on a task."""
        started = time.perf_counter()
        result: dict[str, Any] | Failure
        try:
            called = self._start(name, None, args, token_of)
            if inspect.isawaitable(called):
                task = asyncio.ensure_future(self._settle(name, started, called))

                def settled(t: asyncio.Future[Answer]) -> None:  # cancelled (at stop): answered too
                    failed = CommitFailed() if t.cancelled() else t.exception()
                    reply(t.result() if failed is None else self.finish(name, started, self.failure(name, failed)))

                task.add_done_callback(settled)
                return task
            result = called
        except Exception as exc:
            result = self.failure(name, exc)
        pending = self.commits.pending() if self.commits is not None else None
        if pending is None:
            reply(self.finish(name, started, result))
            return None

        def committed(future: asyncio.Future[None]) -> None:
            failed = (
                None if isinstance(result, Failure) else CommitFailed() if future.cancelled() else future.exception()
            )
            reply(self.finish(name, started, result if failed is None else self.failure(name, failed)))

        pending.add_done_callback(committed)
        return pending

    def _start(
        self,
        name: str,
        request: web.Request | None,
        args: Args | Exception,
        token_of: Callable[[Args], str | None],
    ) -> dict[str, Any] | Awaitable[dict[str, Any]]:
        """What :meth:`answer` and :meth:`answer_now` share, in order: the method, its ``args``
        (or the exception reading them raised), :meth:`authenticate`, :meth:`check_backpressure`,
        the handler. Returns its result (awaitable if async); raises what any step raises."""
        entry = METHODS.get(name)
        if entry is None:
            raise ApiError("unknown_method")
        if isinstance(args, Exception):
            raise args
        handler, needs_auth = entry
        token = token_of(args)
        user = self.authenticate(name, token) if needs_auth else None
        self.check_backpressure(name)
        return handler(self, Call(request, args, user, token))

    async def _settle(
        self, name: str, started: float, called: dict[str, Any] | Failure | Awaitable[dict[str, Any]]
    ) -> Answer:
        """The answer of a call :meth:`_start` began (its result, its failure, or what to await
        for its result), once what it wrote (and read) is durable."""
        result: dict[str, Any] | Failure
        if isinstance(called, Failure):
            result = called
        else:
            try:
                result = await called if inspect.isawaitable(called) else called
                await self.durable()
            except Exception as exc:
                result = self.failure(name, exc)
            else:
                return self.finish(name, started, result)
        try:
            await self.durable()  # what a failed call read may sit in the open batch too
        except CommitFailed as exc:  # answered all the same (not raised out: aiohttp's 500)
            result = self.failure(name, exc)
        return self.finish(name, started, result)

    def failure(self, name: str, exc: BaseException) -> Failure:
        """What a call that raised ``exc`` answers (counted in ``rtm_errors_total``)."""
        if isinstance(exc, ApiError):
            # api.test echoes any error it is asked for: keep that out of the label values
            outcome = exc.code if name != "api.test" else "api_test_error"
            failed = Failure({"ok": False, "error": exc.code}, exc.status, exc.headers, outcome)
        elif isinstance(exc, web.HTTPRequestEntityTooLarge):
            failed = Failure({"ok": False, "error": "request_too_large"}, 413, {}, "request_too_large")
        else:
            log.error("%s failed", name, exc_info=exc)
            failed = Failure({"ok": False, "error": "internal_error"}, 200, {}, "internal_error")
        self.metrics.error(failed.outcome)
        return failed

    def finish(self, name: str, started: float, result: dict[str, Any] | Failure) -> Answer:
        """Count the call and shape its answer: (status, headers, body, encoded)."""
        label = name if name in METHODS else "unknown"
        if isinstance(result, Failure):
            self.count_request(label, result.outcome)
            self.observe_latency(label, time.perf_counter() - started)
            return result.status, result.headers, result.body, None
        self.count_request(label, "ok")
        self.observe_latency(label, time.perf_counter() - started)
        if type(result) is EncodedReply:
            return 200, {}, OK_BODY, result.text
        return 200, {}, {"ok": True, **result}, None

    def authenticate(self, name: str, token: str | None) -> User:
        """The caller of ``name`` by its token, within its rate limit. Raises ``not_authed``,
        ``invalid_auth``, ``not_allowed_token_type``, ``ratelimited`` (429, Retry-After)."""
        if not token:
            raise ApiError("not_authed")
        user = self.store.auth(token)
        if user is None:  # an app-level token opens Socket Mode connections and calls nothing else
            raise ApiError("not_allowed_token_type" if self.store.app_by_token(token) else "invalid_auth")
        self.last_seen[user.id] = self.clock()
        wait_s = self.limiter.retry_after(token, name)
        if wait_s:
            raise ApiError("ratelimited", status=429, headers={"Retry-After": str(wait_s)})
        return user

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
