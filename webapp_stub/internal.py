"""The internal endpoints gateways use (never exposed to clients).

Served on their own listener (``--internal-port``), never on the public one,
and only to a peer with a fleet client certificate of role ``gateway``
(mutual TLS, see docs/trust.md); anyone else gets 403:

* ``POST /internal/bootstrap`` ``{"user": U, "resume": id?, "nonce": ticket nonce?, "token_id": T?}`` ->
  ``{"ok": true, "user": {id, name}, "team": {id, name, domain},
  "channels": [{"id": C, "seq": last_seq}, ...], "resumed": bool}``
  (conversations + the user's own channel + the team channel). With a live
  ``resume`` record of that user, its channels carry the recorded seq instead
  and ``resumed`` is true (see :mod:`webapp_stub.resume`); the channels are then
  the ones the user was in at the record's position, and ``until`` (if any)
  names, per channel, the seq of a leave the connection is still owed events
  up to (docs/design.md, "Resume: joins and leaves while away"). With ``"app": A``
  (a Socket Mode connection; ``user`` is the app's bot user) the reply adds
  ``"app": {id, team, name, bot_user, events}`` and ``"carried"``: the
  envelopes of the app's resume record (gateway/socket_mode.py). With ``token_id`` (the
  ticket's: an ``rtm.connect`` connection), ``token_revoked`` if the user no longer holds that
  token: the ticket was minted before ``auth.revoke``, and the gateway closes with 4003.
* ``POST /internal/resume`` ``{"user": U, "token_id": T, "channels": {C: last_delivered_seq},
  "until": {C: leave_seq}?}`` -> ``{"ok": true, "resume": id}``: a gateway about
  to move a connection records where it stopped (and the leaves it had not
  reached yet); the next ``rtm.connect`` with the token the connection was opened
  with (``token_id``: its id from the ticket, never the token) claims it. The reply
  comes once the record is committed to SQLite (it survives a webapp kill).
  ``too_many_resume_records`` past the per-user or total bound. ``"deadline"``
  (unix seconds, optional): the gateway gives up waiting for this reply then,
  and closes the connection without ``goodbye``; a record that arrives later
  is refused (``resume_expired``, counted as step ``late``), so that it can
  never be claimed by a later, unrelated connection and replay old events. With
  ``"app": A`` and ``"envelopes": [...]`` the record is the app's, claimed by
  its next ``apps.connections.open``.
* ``POST /internal/resume/confirm`` ``{"user": U, "resume": id, "nonce": ticket nonce}`` ->
  ``{"ok": true, "confirmed": bool}``: the gateway sent ``hello`` to the connection whose
  bootstrap took that record, so the record is not handed to the user's next ``rtm.connect``
  (which would be refused with 4010: see :mod:`webapp_stub.resume`).
* ``POST /internal/resume/withdraw`` ``{"user": U, "resume": id}`` -> ``{"ok": true,
  "withdrawn": bool}``: the connection that record was left for closed before its
  ``goodbye`` could be sent, so it will start fresh; the record is forgotten unless an
  ``rtm.connect`` has claimed it already (see :mod:`webapp_stub.resume`).
* ``POST /internal/history`` ``{"channel": C, "after_seq": n, "limit": m}`` ->
  ``{"ok": true, "events": [{"seq", "json", "ctl", "t0"}, ...], "has_more"}``.
* ``POST /internal/call/<method>`` ``{"user": U, "token_id": T, ...args}`` -> the same reply
  as ``/api/<method>`` would give that user (for messages sent over the
  websocket; not rate limited). ``token_id`` is the one of the ticket the sending connection
  was opened with: no live token of that user, no call (``not_authed``, ``token_revoked``),
  so a gateway speaks only for users connected through it, with a token not revoked since. Only the methods in :data:`INTERNAL_CALL_METHODS`
  (what an RTM client may send over its websocket); any other is HTTP 403
  ``forbidden``, counted, and runs nothing: a gateway speaks for its users only as
  far as the RTM protocol lets them speak.

Every reply is JSON; a caller that is not a gateway is HTTP 403 ``{"ok": false,
"error": "forbidden"}``, counted as ``rtm_errors_total{kind="forbidden"}``.
"""

from __future__ import annotations

import inspect
import json
import logging
import math
import time
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from services.identity import GATEWAY, BadIdentity
from services.tls import RefusalLog, transport_identity
from webapp_stub.api import METHODS, Call, WebApi
from webapp_stub.args import Args, int_arg, parse_json_body
from webapp_stub.codecs import MAX_SQL_INT
from webapp_stub.commit import CommitFailed
from webapp_stub.errors import ApiError

log = logging.getLogger("rtm.webapp.api")

INTERNAL_HISTORY_DEFAULT = 500
INTERNAL_HISTORY_MAX = 1000
# Unacknowledged Socket Mode envelopes one app's resume record carries (the gateway's
# per-app bound on envelopes in flight and waiting: gateway/envelopes.py).
MAX_RESUME_ENVELOPES = 10_000
MAX_RESUME_CHANNELS = 100_000  # channels in one resume record (a user's conversations and more)
MAX_NONCE_CHARS = 128  # a ticket's nonce, naming the connection a resume record is taken for
MAX_TOKEN_ID_CHARS = 64  # a ticket's token id (webapp_stub.resume.token_id: 32 hex characters)

# What one internal endpoint does with a request's arguments: its reply's fields besides "ok".
InternalHandler = Callable[[web.Request, Args], Awaitable[dict[str, Any]]]


class InternalEndpoints:
    """``/internal/...``: bootstrap, resume, history and calls on a user's behalf, for gateways.

    Shares the Web API's store, metrics and request accounting (``api``); checks on
    every request that the caller's verified client certificate is a gateway's
    (``check_callers`` False only with ``--wire-tls off``: debugging, nobody checked).
    """

    def __init__(self, api: WebApi, *, check_callers: bool = True) -> None:
        self.api = api
        self.check_callers = check_callers
        self.refusal_log = RefusalLog()  # a refused caller is logged at most once a minute, counted always

    def routes(self) -> list[web.RouteDef]:
        return [
            web.post("/internal/bootstrap", self.handle_bootstrap),
            web.post("/internal/history", self.handle_history),
            web.post("/internal/resume", self.handle_resume),
            web.post("/internal/resume/confirm", self.handle_resume_confirm),
            web.post("/internal/resume/withdraw", self.handle_resume_withdraw),
            web.post("/internal/call/{method}", self.handle_internal_call),
        ]

    async def handle_bootstrap(self, request: web.Request) -> web.Response:
        # durable: the seqs it names are committed
        return await self._answer(request, "internal.bootstrap", self._bootstrap, durable=True)

    async def handle_resume(self, request: web.Request) -> web.Response:
        # durable: the gateway says goodbye once answered, so the record must survive a webapp kill
        # (its row joins the group commit: a drain's thousands of records share a few fsyncs)
        return await self._answer(request, "internal.resume", self._resume, durable=True)

    async def handle_resume_confirm(self, request: web.Request) -> web.Response:
        return await self._answer(request, "internal.resume.confirm", self._resume_confirm, durable=True)

    async def handle_resume_withdraw(self, request: web.Request) -> web.Response:
        # durable: a withdrawn record must not come back with a webapp restart
        return await self._answer(request, "internal.resume.withdraw", self._resume_withdraw, durable=True)

    async def handle_history(self, request: web.Request) -> web.Response:
        # durable: never hand a gateway an event that is not yet durable
        return await self._answer(request, "internal.history", self._history, durable=True)

    async def handle_internal_call(self, request: web.Request) -> web.Response:
        name = request.match_info["method"]
        label = name if name in METHODS else "unknown"
        return await self._answer(request, f"internal.{label}", self._call, durable=True)

    async def _answer(
        self, request: web.Request, name: str, handler: InternalHandler, *, durable: bool
    ) -> web.Response:
        """One internal request, the same way for every endpoint.

        The caller is checked and its JSON body read, then ``handler`` answers it. Its
        :class:`ApiError` becomes ``{"ok": false, "error": code}`` with the error's status
        and headers, any other exception ``internal_error`` (logged); both are counted in
        ``rtm_errors_total``. HTTP errors pass through: 403 for a caller that is not a
        gateway, 413 for a body over the limit. With ``durable`` the reply waits for the
        current group commit, so nothing it names can be lost. Every request is counted
        under ``name`` with its outcome.
        """
        status, headers = 200, {}
        try:
            args = await self._internal_args(request)
            body = {"ok": True, **(await handler(request, args))}
            outcome = "ok"
        except ApiError as exc:
            outcome = exc.code  # a bounded set: api.test, which echoes any error, is not callable here
            self.api.metrics.error(outcome)
            body = {"ok": False, "error": exc.code}
            status, headers = exc.status, exc.headers
        except web.HTTPException:
            raise
        except Exception:
            log.exception("%s failed", name)
            self.api.metrics.error("internal_error")
            body, outcome = {"ok": False, "error": "internal_error"}, "internal_error"
        if durable:
            try:
                await self.api.durable()
            except CommitFailed as exc:  # answered like any failure (not raised out: aiohttp's bare 500)
                failed = self.api.failure(name, exc)
                body, outcome, status, headers = failed.body, failed.outcome, failed.status, failed.headers
        self.api.count_request(name, outcome)
        return web.json_response(body, status=status, headers=headers)

    def _check_caller(self, request: web.Request) -> None:
        """Only a gateway (by its verified client certificate) calls the internal endpoints."""
        if not self.check_callers:
            return
        try:
            identity = transport_identity(request.transport)
        except BadIdentity:
            identity = None
        if identity is None or identity.role != GATEWAY:
            self.api.metrics.error("forbidden")
            if self.refusal_log.should_log(str(identity), time.monotonic()):
                skipped = self.refusal_log.take_suppressed()
                more = f" ({skipped} more refusals not logged)" if skipped else ""
                log.warning("forbidden: %s called %s (only gateways may)%s", identity, request.path, more)
            raise web.HTTPForbidden(
                text=json.dumps({"ok": False, "error": "forbidden"}), content_type="application/json"
            )

    async def _internal_args(self, request: web.Request) -> Args:
        self._check_caller(request)
        if not request.can_read_body:
            return {}
        return parse_json_body(await request.read())

    async def _bootstrap(self, request: web.Request, args: Args) -> dict[str, Any]:
        """A user's (or a Socket Mode app's bot user's) channels to connect, resumed where a record says."""
        user_id = str(args.get("user") or "")
        rid = args.get("resume")
        app_id = str(args.get("app") or "")
        app = self.api.store.app(app_id) if app_id else None
        if app_id and (app is None or app.bot_user != user_id):
            raise ApiError("app_not_found")
        # an app's records are kept under its id, with the envelopes its moved connections had not acknowledged
        nonce = args.get("nonce") or ""
        if not isinstance(nonce, str) or len(nonce) > MAX_NONCE_CHARS:
            raise ApiError("invalid_arguments")
        tid = args.get("token_id") or ""
        if tid:  # a ticket minted before auth.revoke is refused (an app's carries none)
            self._check_token_id(user_id, tid)
        # the ticket's nonce: the same connection's bootstrap, retried, gets the same record again
        record = self.api.resume.take_record(str(rid), app_id or user_id, holder=nonce) if rid else None
        resume = record.channels if record is not None else None
        if rid:
            self.api.resumes.labels("used" if resume is not None else "expired").inc()
        boot = self.api.store.bootstrap(user_id, resume, record.until if record is not None else None)
        if boot is None:
            raise ApiError("user_not_found")
        if app is not None:
            boot["app"] = app.to_api()
            boot["private"] = self.api.store.private_channels_of(user_id)
            boot["carried"] = record.carried if record is not None else []
        else:
            self.api.last_seen[user_id] = self.api.clock()
        return {**boot, "resumed": resume is not None}

    async def _resume(self, request: web.Request, args: Args) -> dict[str, Any]:
        """Record where a connection the fleet is moving stopped (see :mod:`webapp_stub.resume`)."""
        user_id = str(args.get("user") or "")
        if not user_id or self.api.store.user(user_id) is None:
            raise ApiError("user_not_found")
        seqs = _channel_seqs(args.get("channels"))
        until = _channel_seqs(args.get("until") or {})
        self._check_deadline(args.get("deadline"))
        tid = args.get("token_id") or ""
        if not isinstance(tid, str) or len(tid) > MAX_TOKEN_ID_CHARS:
            raise ApiError("invalid_arguments")
        key, carried = user_id, None
        if args.get("app"):  # a Socket Mode app's connections: keyed by the app, with its unacknowledged envelopes
            app = self.api.store.app(str(args["app"]))
            carried = args.get("envelopes") or []
            if app is None or app.bot_user != user_id:
                raise ApiError("app_not_found")
            if not isinstance(carried, list) or len(carried) > MAX_RESUME_ENVELOPES:
                raise ApiError("invalid_arguments")
            key, tid = app.id, ""  # any connection of the app takes over its envelopes
        elif not tid:  # no rtm.connect could claim it: the client would start fresh, silently
            raise ApiError("invalid_arguments")
        body = {"resume": self.api.resume.add(key, seqs, carried, until, token_id=tid)}
        self.api.resumes.labels("recorded").inc()
        return body

    async def _resume_confirm(self, request: web.Request, args: Args) -> dict[str, Any]:
        """The connection that took a resume record got its ``hello`` (see :mod:`webapp_stub.resume`)."""
        user_id, rid, nonce = args.get("user"), args.get("resume"), args.get("nonce")
        for value in (user_id, rid, nonce):
            if not isinstance(value, str) or not value or len(value) > MAX_NONCE_CHARS:
                raise ApiError("invalid_arguments")
        assert isinstance(user_id, str) and isinstance(rid, str) and isinstance(nonce, str)
        confirmed = self.api.resume.confirm(rid, user_id, nonce)
        self.api.resumes.labels("confirmed" if confirmed else "unconfirmed").inc()
        return {"confirmed": confirmed}

    async def _resume_withdraw(self, request: web.Request, args: Args) -> dict[str, Any]:
        """The connection a resume record was left for closed before its ``goodbye``."""
        user_id, rid = args.get("user"), args.get("resume")
        for value in (user_id, rid):
            if not isinstance(value, str) or not value or len(value) > MAX_NONCE_CHARS:
                raise ApiError("invalid_arguments")
        assert isinstance(user_id, str) and isinstance(rid, str)
        withdrawn = self.api.resume.withdraw(rid, user_id)
        self.api.resumes.labels("withdrawn" if withdrawn else "kept").inc()
        return {"withdrawn": withdrawn}

    def _check_deadline(self, deadline: Any) -> None:
        """A resume record past its ``deadline``: the gateway has given up on it and not said goodbye."""
        if deadline is None:
            return
        if isinstance(deadline, bool) or not isinstance(deadline, (int, float)) or not math.isfinite(deadline):
            raise ApiError("invalid_arguments")
        if time.time() > deadline:
            self.api.resumes.labels("late").inc()
            raise ApiError("resume_expired")

    async def _history(self, request: web.Request, args: Args) -> dict[str, Any]:
        """A channel's events after a seq, for a gateway's gap fill or shared history read."""
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
        events, more = self.api.store.events_after(channel, after_seq, limit)
        return {
            "events": [{"seq": e.seq, "json": e.json, "ctl": e.ctl, "t0": e.t0} for e in events],
            "has_more": more,
        }

    def _check_token_id(self, user_id: str, tid: Any) -> None:
        """``tid`` names a live token of ``user_id`` (:func:`webapp_stub.resume.token_id`, from the
        ticket its connection was opened with). Raises ``not_authed`` (none), ``invalid_arguments``,
        ``token_revoked`` (not one of the user's tokens, or revoked since)."""
        if not tid:
            raise ApiError("not_authed")
        if not isinstance(tid, str) or len(tid) > MAX_TOKEN_ID_CHARS:
            raise ApiError("invalid_arguments")
        if not self.api.store.token_is_live(user_id, tid):
            raise ApiError("token_revoked")

    async def _call(self, request: web.Request, args: Args) -> dict[str, Any]:
        """A Web API method on a user's behalf (a message sent over the websocket); not rate limited."""
        name = request.match_info["method"]
        entry = METHODS.get(name)
        if entry is None:
            raise ApiError("unknown_method")
        if name not in INTERNAL_CALL_METHODS:
            raise ApiError("forbidden", 403)
        user = self.api.store.user(str(args.pop("user", "") or ""))
        if user is None:
            raise ApiError("user_not_found")
        # the ticket's token id of the connection that sent it: a gateway speaks only for users
        # connected through it, and not for one whose token was revoked since (docs/trust.md)
        self._check_token_id(user.id, args.pop("token_id", None) or "")
        self.api.check_backpressure(name)
        # No token authenticated this call (the gateway's certificate vouches for the user): None.
        result = entry[0](self.api, Call(request, args, user, None))
        return await result if inspect.isawaitable(result) else result


# The Web API methods a gateway may call for one of its users (``/internal/call``): what the
# gateway's RTM clients may send over the websocket (gateway/client_messages.py).
INTERNAL_CALL_METHODS = frozenset({"chat.postMessage"})


def _channel_seqs(value: Any) -> dict[str, int]:
    """A resume record's ``{channel: seq}`` map, checked; raises ``invalid_arguments``."""
    if not isinstance(value, dict) or len(value) > MAX_RESUME_CHANNELS:
        raise ApiError("invalid_arguments")
    try:
        seqs = {str(ch): int(seq) for ch, seq in value.items()}
    except (TypeError, ValueError, OverflowError):
        raise ApiError("invalid_arguments") from None
    if any(seq < 0 or seq > MAX_SQL_INT for seq in seqs.values()):
        raise ApiError("invalid_arguments")
    return seqs
