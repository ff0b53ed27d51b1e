"""Sessions of the dev agent's model: create (checks, TTL, lock-delay, behavior), renew, destroy, invalidation."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

from consul_dev.errors import ServerError, UnknownSession
from consul_dev.go_json import MISSING, GoDecoder, Json
from consul_dev.go_text import format_go_duration, parse_go_duration_ns
from consul_dev.kv import KVState
from consul_dev.node import (
    DEFAULT_LOCK_DELAY_S,
    HEALTH_CRITICAL,
    LOCK_DELAY_SECONDS_THRESHOLD_NS,
    MAX_LOCK_DELAY_S,
    NODE_NAME,
    NS_PER_S,
    SERF_CHECK_ID,
    SESSION_DELETE,
    SESSION_RELEASE,
    SESSION_TTL_MAX_S,
    SESSION_TTL_MIN_S,
    TABLE_SESSIONS,
)
from consul_dev.records import Session


class SessionState(KVState):
    """Consul's sessions: tied to checks, with a TTL; invalidating one releases or deletes its keys."""

    @staticmethod
    def _session_json(s: Session) -> Json:
        body: dict[str, Any] = {
            "ID": s.id,
            "Name": s.name,
            "Node": s.node,
            "LockDelay": s.lock_delay_ns,
            "Behavior": s.behavior,
            "TTL": s.ttl,
            "NodeChecks": list(s.node_checks) or None,
            "ServiceChecks": [dict(c) for c in s.service_checks] or None,
        }
        if s.checks:
            body["Checks"] = list(s.checks)
        body["CreateIndex"] = s.create_index
        body["ModifyIndex"] = s.modify_index
        return body

    def session_create(self, raw: Json | None) -> str:
        """``PUT /v1/session/create``: create a session on this node; returns its ID.

        Defaults follow Consul: the node's ``serfHealth`` check, LockDelay 15 s,
        Behavior ``release``, no TTL. Raises :class:`InvalidRequest` for a body
        that does not decode, :class:`ServerError` with Consul's text for an
        invalid Behavior, a TTL outside 10s..24h, an unknown node, or a check
        that is missing or critical.
        """
        self._expire()
        request = decode_session_request(raw)
        ttl_ns = _validate_session(request)
        self._check_session_checks(request)
        self._begin()
        idx = self._idx()
        session = Session(
            id=self._new_id(),
            name=request.name,
            node=request.node,
            lock_delay_ns=request.lock_delay_ns,
            behavior=request.behavior,
            ttl=request.ttl,
            ttl_ns=ttl_ns,
            node_checks=list(dict.fromkeys(request.node_checks)),
            service_checks=request.service_checks,
            checks=list(dict.fromkeys(request.checks)),
            create_index=idx,
            modify_index=idx,
            deadline_s=self._now_s() + ttl_ns / NS_PER_S if ttl_ns > 0 else None,
        )
        self._sessions[session.id] = session
        self._tables.touch(TABLE_SESSIONS, idx)
        return session.id

    def _check_session_checks(self, request: SessionRequest) -> None:
        """Every check a new session names must exist and not be critical; raises :class:`ServerError`."""
        wanted = [*request.node_checks, *request.checks, *(c["ID"] for c in request.service_checks)]
        for check_id in dict.fromkeys(wanted):
            check = self._checks.get(check_id)
            if check is None:
                raise ServerError(f"Missing check '{check_id}' registration")
            if check.status == HEALTH_CRITICAL:
                raise ServerError(f"Check '{check_id}' is in {check.status} state")

    def session_destroy(self, session_id: str) -> None:
        """``PUT /v1/session/destroy/<id>``: invalidate the session (a no-op if unknown)."""
        self._expire()
        if session_id in self._sessions:
            self._begin()
            self._invalidate_session(session_id, at_s=self._now_s())

    def session_renew(self, session_id: str) -> list[Json]:
        """``PUT /v1/session/renew/<id>``: restart the TTL timer; returns ``[session]``.

        Renewal is not a write in Consul, so no index advances.
        Raises :class:`UnknownSession`.
        """
        self._expire()
        session = self._sessions.get(session_id)
        if session is None:
            raise UnknownSession(session_id)
        if session.ttl_ns > 0:
            session.deadline_s = self._now_s() + session.ttl_ns / NS_PER_S
        return [self._session_json(session)]

    def session_info(self, session_id: str) -> tuple[int, list[Json]]:
        """``GET /v1/session/info/<id>``: ``[session]``, or ``[]`` when unknown."""
        self._expire()
        index = max(self._tables.get(TABLE_SESSIONS), 1)
        session = self._sessions.get(session_id)
        return index, [self._session_json(session)] if session else []

    def session_list(self) -> tuple[int, list[Json]]:
        """``GET /v1/session/list``: every session, by ID."""
        self._expire()
        index = max(self._tables.get(TABLE_SESSIONS), 1)
        return index, [self._session_json(self._sessions[k]) for k in sorted(self._sessions)]

    def session_node(self, node: str) -> tuple[int, list[Json]]:
        """``GET /v1/session/node/<node>``: the sessions on ``node``."""
        index, sessions = self.session_list()
        return index, [s for s in sessions if s["Node"] == node]

    def _invalidate_sessions_using(self, check_id: str, *, at_s: float) -> None:
        for session_id in [s.id for s in self._sessions.values() if check_id in s.check_ids()]:
            self._invalidate_session(session_id, at_s=at_s)

    def _invalidate_session(self, session_id: str, *, at_s: float) -> None:
        """Destroy the session: release or delete its keys, and start their lock-delay."""
        session = self._sessions.pop(session_id)
        idx = self._idx()
        self._tables.touch(TABLE_SESSIONS, idx)
        delay_s = min(session.lock_delay_ns / NS_PER_S, MAX_LOCK_DELAY_S)
        for key in [k for k in sorted(self._kv) if self._kv[k].session == session_id]:
            if session.behavior == SESSION_DELETE:
                self._kv_delete(key, at_s=at_s)
            else:
                held = self._kv[key]
                self._kv_set(replace(held, session=""))
            if delay_s > 0:
                self._lock_delay_until_s[key] = at_s + delay_s

    def lock_delay_until_s(self, key: str) -> float | None:
        """When the lock-delay on ``key`` ends (clock time), or None if there is none."""
        self._expire()
        return self._lock_delay_until_s.get(key)


@dataclass
class SessionRequest:
    """A ``/v1/session/create`` body, decoded, with Consul's defaults for what it leaves out."""

    name: str = ""
    node: str = NODE_NAME
    behavior: str = SESSION_RELEASE
    ttl: str = ""
    lock_delay_ns: int = int(DEFAULT_LOCK_DELAY_S * NS_PER_S)
    node_checks: list[str] = field(default_factory=lambda: [SERF_CHECK_ID])
    checks: list[str] = field(default_factory=lambda: [SERF_CHECK_ID])
    service_checks: list[dict[str, str]] = field(default_factory=list)


def decode_session_request(raw: Json | None) -> SessionRequest:
    """Decode a session body as Go does (``null`` leaves a default); raises :class:`InvalidRequest`."""
    request = SessionRequest()
    if raw is not None:
        d = GoDecoder(raw, "Session")
        request.name = d.string("Name")
        if d.present("Node"):  # null leaves the default, as in Go
            request.node = d.string("Node")
        if d.present("Behavior"):
            request.behavior = d.string("Behavior")
        request.ttl = d.string("TTL")
        if d.present("LockDelay"):
            request.lock_delay_ns = d.duration_ns("LockDelay")
            if request.lock_delay_ns < LOCK_DELAY_SECONDS_THRESHOLD_NS:
                request.lock_delay_ns *= NS_PER_S
        if d.get("Checks") is not MISSING:
            request.checks = d.string_list("Checks") or []
        if d.get("NodeChecks") is not MISSING:
            request.node_checks = d.string_list("NodeChecks") or []
        request.service_checks = _decode_service_checks(d)
    _fixup_empty_session_checks(request)
    return request


def _decode_service_checks(d: GoDecoder) -> list[dict[str, str]]:
    raw_service_checks = d.get("ServiceChecks")
    if isinstance(raw_service_checks, list):
        service_checks = []
        for item in raw_service_checks:
            sd = GoDecoder(item, "ServiceCheck")
            service_checks.append({"ID": sd.string("ID"), "Namespace": sd.string("Namespace")})
        return service_checks
    if raw_service_checks not in (MISSING, None):
        raise d.fail("ServiceChecks", raw_service_checks, "[]structs.ServiceCheck")
    return []


def _fixup_empty_session_checks(request: SessionRequest) -> None:
    """Consul's ``fixupEmptySessionChecks``."""
    if not request.checks:
        request.node_checks = []
    elif request.checks == [SERF_CHECK_ID] or not request.node_checks:
        request.checks = []


def _validate_session(request: SessionRequest) -> int:
    """Consul's checks on a new session, in its order; returns the TTL in ns (0: none). Raises :class:`ServerError`."""
    if request.node == "":
        raise ServerError("Must provide Node")
    if request.behavior not in (SESSION_RELEASE, SESSION_DELETE):
        raise ServerError(f"Invalid Behavior setting '{request.behavior}'")
    ttl_ns = 0
    if request.ttl:
        try:
            ttl_ns = parse_go_duration_ns(request.ttl)
        except ValueError as exc:
            raise ServerError(f"Session TTL '{request.ttl}' invalid: {exc}") from None
        low, high = int(SESSION_TTL_MIN_S * NS_PER_S), int(SESSION_TTL_MAX_S * NS_PER_S)
        if ttl_ns != 0 and not low <= ttl_ns <= high:
            raise ServerError(
                f"Invalid Session TTL '{ttl_ns}', must be between [{format_go_duration(low)}={format_go_duration(high)}]"
            )
    if request.node != NODE_NAME:
        raise ServerError("Missing node registration")
    return ttl_ns
