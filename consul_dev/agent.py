"""The agent's services and TTL checks in the dev agent's model: register, deregister, update, and the indexes they move."""

from __future__ import annotations

from consul_dev.definitions import (
    ServiceDefinition,
    decode_check_definition,
    decode_service_definition,
    service_check_ids,
)
from consul_dev.errors import InvalidRequest, ServerError, ServiceNotRegistered, UnknownCheck, UnknownService
from consul_dev.go_json import GoDecoder, Json
from consul_dev.go_text import go_quote
from consul_dev.node import (
    CHECK_OUTPUT_MAX_BYTES,
    HEALTH_CRITICAL,
    NS_PER_S,
    TABLE_CHECKS,
    TABLE_SERVICES,
    VALID_STATUSES,
)
from consul_dev.records import Check, Service
from consul_dev.sessions import SessionState


class AgentState(SessionState):
    """Services and checks registered on this agent; a check going critical invalidates the sessions on it."""

    def _touch_service_name(self, name: str) -> None:
        """Advance the per-name index, or record the name's extinction."""
        idx = self._idx()
        if any(s.name == name for s in self._services.values()):
            self._service_index[name] = idx
        else:
            self._service_index.pop(name, None)
            self._extinction_index = idx

    def _touch_for_check(self, check: Check) -> None:
        """A check changed: the checks table and the service names whose health it affects."""
        self._tables.touch(TABLE_CHECKS, self._idx())
        if check.service_id:
            service = self._services.get(check.service_id)
            if service is not None:
                self._touch_service_name(service.name)
        else:  # a node-level check affects the health of every service on the node
            for name in {s.name for s in self._services.values()}:
                self._touch_service_name(name)

    # ---- expiry -------------------------------------------------------------

    def register_service(self, raw: Json, *, replace_existing_checks: bool = False) -> None:
        """``PUT /v1/agent/service/register``: add or replace a service and its checks.

        New checks start ``critical`` unless they give ``Status``; a check that
        already existed under the same ID keeps its status and output (Consul
        snapshots check state around re-registration). With
        ``replace_existing_checks`` the service's checks missing from the body
        are removed. Nothing advances the index if nothing changed.
        Raises :class:`InvalidRequest`.
        """
        self._expire()
        definition = decode_service_definition(raw)
        now = self._now_s()
        self._begin()
        snapshot = {c.check_id: (c.status, c.output) for c in self._checks.values() if c.agent_local}
        self._put_service(_service_of(definition))
        kept = self._put_service_checks(definition, snapshot, now)
        if replace_existing_checks:
            for check in list(self._checks.values()):
                if check.service_id == definition.id and check.check_id not in kept:
                    self._delete_check(check, at_s=now)

    def _put_service(self, service: Service) -> None:
        """Store ``service``; advance indexes only if it changed. Raises :class:`InvalidRequest` for a reserved ID."""
        existing = self._services.get(service.id)
        if existing is not None and not existing.agent_local:
            raise InvalidRequest(f"Service ID {go_quote(service.id)} is reserved by the agent")
        if existing is not None and existing.same_definition(service):
            return
        idx = self._stamp(service, existing)
        self._services[service.id] = service
        self._tables.touch(TABLE_SERVICES, idx)
        if existing is not None and existing.name != service.name:
            self._touch_service_name(existing.name)
        self._touch_service_name(service.name)

    def _put_service_checks(
        self, definition: ServiceDefinition, snapshot: dict[str, tuple[str, str]], now: float
    ) -> set[str]:
        """Store the checks a service registration names; returns their IDs.

        A check that existed before keeps its status and output (``snapshot``);
        a new one starts ``critical`` unless it gives ``Status``.
        """
        kept: set[str] = set()
        for check_id, check_def in zip(service_check_ids(definition), definition.checks, strict=True):
            kept.add(check_id)
            status, output = snapshot.get(check_id, (check_def.status or HEALTH_CRITICAL, ""))
            check = Check(
                check_id=check_id,
                name=check_def.name or f"Service '{definition.name}' check",
                status=status,
                notes=check_def.notes,
                output=output,
                service_id=definition.id,
                check_type="ttl",
                ttl_ns=check_def.ttl_ns,
                deregister_after_ns=check_def.deregister_after_ns,
            )
            self._put_check(check, now)
        return kept

    def deregister_service(self, service_id: str) -> None:
        """``PUT /v1/agent/service/deregister/<id>``: remove the service and its checks.

        Raises :class:`UnknownService` when this agent has no such service ID.
        """
        self._expire()
        service = self._services.get(service_id)
        if service is None or not service.agent_local:
            raise UnknownService(service_id)
        self._begin()
        self._remove_service(service_id, at_s=self._now_s())

    def _remove_service(self, service_id: str, *, at_s: float) -> None:
        service = self._services.pop(service_id)
        self._tables.touch(TABLE_SERVICES, self._idx())
        for check in [c for c in self._checks.values() if c.service_id == service_id]:
            self._delete_check(check, at_s=at_s)
        self._touch_service_name(service.name)

    def register_check(self, raw: Json) -> None:
        """``PUT /v1/agent/check/register``: add or replace a TTL check.

        The check starts ``critical`` unless it gives ``Status``. Raises
        :class:`InvalidRequest`, or :class:`ServiceNotRegistered` when its
        ``ServiceID`` is unknown.
        """
        self._expire()
        definition = decode_check_definition(raw)
        if definition.service_id and definition.service_id not in self._services:
            raise ServiceNotRegistered(definition.service_id)
        if definition.service_id and not self._services[definition.service_id].agent_local:
            raise ServiceNotRegistered(definition.service_id)
        existing = self._checks.get(definition.check_id)
        if existing is not None and not existing.agent_local:
            raise InvalidRequest(f"Check ID {go_quote(definition.check_id)} is reserved by the agent")
        self._begin()
        self._put_check(
            Check(
                check_id=definition.check_id,
                name=definition.name,
                status=definition.status or HEALTH_CRITICAL,
                notes=definition.notes,
                output="",
                service_id=definition.service_id,
                check_type="ttl",
                ttl_ns=definition.ttl_ns,
                deregister_after_ns=definition.deregister_after_ns,
            ),
            self._now_s(),
        )

    def deregister_check(self, check_id: str) -> None:
        """``PUT /v1/agent/check/deregister/<id>``. Raises :class:`UnknownCheck`."""
        self._expire()
        check = self._agent_check(check_id)
        self._begin()
        self._delete_check(check, at_s=self._now_s())

    def update_ttl_check(self, check_id: str, status: str, output: str) -> None:
        """``PUT /v1/agent/check/pass|warn|fail/<id>`` (``note``) and ``/update/<id>``.

        Sets status and output and restarts the TTL timer. A status change
        advances the index and wakes blocking queries; an output-only change is
        stored but advances nothing. Raises :class:`UnknownCheck`, or
        :class:`InvalidRequest` for a status other than passing/warning/critical.
        """
        self._expire()
        if status not in VALID_STATUSES:
            raise InvalidRequest(f"Invalid check status: '{status}'")
        check = self._agent_check(check_id)
        if check.check_type != "ttl":
            raise ServerError(f"CheckID {go_quote(check_id)} does not have associated TTL")
        encoded = output.encode()
        if len(encoded) > CHECK_OUTPUT_MAX_BYTES:
            head = encoded[:CHECK_OUTPUT_MAX_BYTES].decode(errors="ignore")
            output = f"{head} ... (captured {CHECK_OUTPUT_MAX_BYTES} of {len(encoded)} bytes)"
        now = self._now_s()
        self._begin()
        check.last_output = output
        check.ttl_deadline_s = now + check.ttl_ns / NS_PER_S
        self._set_check_status(check, status, output, at_s=now)

    def update_check(self, check_id: str, raw: Json) -> None:
        """``PUT /v1/agent/check/update/<id>`` with body ``{"Status": ..., "Output": ...}``."""
        d = GoDecoder(raw, "checkUpdate")
        status = d.string("Status")
        output = d.string("Output")
        if status not in VALID_STATUSES:
            raise InvalidRequest(f"Invalid check status: '{status}'")
        self.update_ttl_check(check_id, status, output)

    def _agent_check(self, check_id: str) -> Check:
        check = self._checks.get(check_id)
        if check is None or not check.agent_local:
            raise UnknownCheck(check_id)
        return check

    def _put_check(self, new: Check, now: float) -> None:
        """Store ``new`` (restarting its TTL timer); advance indexes only if it changed."""
        existing = self._checks.get(new.check_id)
        new.ttl_deadline_s = now + new.ttl_ns / NS_PER_S if new.ttl_ns > 0 else None
        new.last_output = new.output
        if new.status == HEALTH_CRITICAL:
            was_critical = existing is not None and existing.critical_since_s is not None
            new.critical_since_s = existing.critical_since_s if was_critical and existing else now
        if existing is not None and existing.same_definition(new):
            new.create_index, new.modify_index = existing.create_index, existing.modify_index
            self._checks[new.check_id] = new
            return
        self._stamp(new, existing)
        self._checks[new.check_id] = new
        if existing is not None and existing.service_id != new.service_id:
            self._touch_for_check(existing)
        self._touch_for_check(new)
        if new.status == HEALTH_CRITICAL and (existing is None or existing.status != HEALTH_CRITICAL):
            self._invalidate_sessions_using(new.check_id, at_s=now)

    def _delete_check(self, check: Check, *, at_s: float) -> None:
        del self._checks[check.check_id]
        self._touch_for_check(check)
        self._invalidate_sessions_using(check.check_id, at_s=at_s)

    def _set_check_status(self, check: Check, status: str, output: str, *, at_s: float) -> None:
        check.output = output
        if check.status == status:
            return
        check.status = status
        check.critical_since_s = at_s if status == HEALTH_CRITICAL else None
        check.modify_index = self._idx()
        self._touch_for_check(check)
        if status == HEALTH_CRITICAL:
            self._invalidate_sessions_using(check.check_id, at_s=at_s)

    # ---- agent views ------------------------------------------------------------


def _service_of(definition: ServiceDefinition) -> Service:
    """The record a validated registration stores."""
    return Service(
        id=definition.id,
        name=definition.name,
        tags=list(definition.tags),
        address=definition.address,
        port=definition.port,
        meta=dict(sorted(definition.meta.items())),  # Go encodes map keys sorted
        weights=dict(definition.weights),
        enable_tag_override=definition.enable_tag_override,
        tagged_addresses=dict(definition.tagged_addresses) if definition.tagged_addresses else None,
        kind=definition.kind,
    )
