"""Service and check registrations, decoded and validated as Consul does (``/v1/agent/.../register``)."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any, Final

from consul_dev.errors import InvalidRequest
from consul_dev.go_json import MISSING, GoDecoder, Json
from consul_dev.node import META_KEY_MAX_LEN, META_MAX_PAIRS, META_VALUE_MAX_LEN, VALID_STATUSES


@dataclass(frozen=True)
class CheckDefinition:
    """One check of a service registration, or the body of ``/v1/agent/check/register``."""

    check_id: str
    name: str
    notes: str
    status: str
    ttl_ns: int
    deregister_after_ns: int
    service_id: str = ""


@dataclass(frozen=True)
class ServiceDefinition:
    """The body of ``/v1/agent/service/register`` after validation."""

    id: str
    name: str
    tags: tuple[str, ...]
    address: str
    port: int
    meta: Mapping[str, str]
    weights: Mapping[str, int]
    enable_tag_override: bool
    tagged_addresses: Mapping[str, Any] | None
    kind: str
    checks: tuple[CheckDefinition, ...]


_INTERVAL_CHECK_FIELDS: Final = ("HTTP", "TCP", "UDP", "GRPC", "H2PING", "OSService", "Script", "DockerContainerID")
_META_KEY_RE: Final = re.compile(r"^[a-zA-Z0-9_-]+$")
_ANY_ADDRESSES: Final = frozenset({"0.0.0.0", "::", "[::]"})


def _decode_check_type(d: GoDecoder) -> tuple[CheckDefinition, str]:
    """Decode and validate a check (Consul's ``CheckType.Validate``), keeping only TTL checks.

    Returns the definition and its ``Status`` (validated by the caller, whose
    message differs between service and check registration).
    """
    ttl_ns = d.duration_ns("TTL")
    interval_ns = d.duration_ns("Interval")
    args = d.string_list("Args", "args") or d.string_list("ScriptArgs", "script_args") or []
    interval_kind = next((f for f in _INTERVAL_CHECK_FIELDS if d.string(f)), "Args" if args else "")
    is_alias = bool(d.string("AliasNode") or d.string("AliasService"))
    output_max = d.integer("OutputMaxSize")
    if interval_ns > 0 and ttl_ns > 0:
        raise InvalidRequest("Invalid check: Interval and TTL cannot both be specified")
    if interval_kind and interval_ns <= 0:
        raise InvalidRequest(
            "Invalid check: Interval must be > 0 for Script, HTTP, H2PING, TCP, UDP or OSService checks"
        )
    if interval_kind and is_alias:
        raise InvalidRequest("Invalid check: Interval cannot be set for Alias checks")
    if is_alias and ttl_ns > 0:
        raise InvalidRequest("Invalid check: TTL must be not be set for Alias checks")
    if not interval_kind and not is_alias and ttl_ns <= 0:
        raise InvalidRequest("Invalid check: TTL must be > 0 for TTL checks")
    if output_max < 0:
        raise InvalidRequest("Invalid check: MaxOutputMaxSize must be positive")
    if interval_kind or is_alias:
        kind = "Alias" if is_alias else interval_kind
        raise InvalidRequest(
            f"Invalid check: {kind} checks are not supported by the rtm dev agent, which runs only TTL checks; "
            "use real Consul (CONSUL_HTTP_ADDR) for them"
        )
    definition = CheckDefinition(
        check_id="",
        name=d.string("Name"),
        notes=d.string("Notes"),
        status=d.string("Status"),
        ttl_ns=ttl_ns,
        deregister_after_ns=d.duration_ns("DeregisterCriticalServiceAfter", "deregister_critical_service_after"),
    )
    return definition, definition.status


def _validate_meta(meta: Mapping[str, str]) -> None:
    """Consul's ``ValidateServiceMetadata``; raises :class:`InvalidRequest`."""
    if len(meta) > META_MAX_PAIRS:
        raise InvalidRequest(
            f"Invalid Service Meta: Node metadata cannot contain more than {META_MAX_PAIRS} key/value pairs"
        )
    for key, value in meta.items():
        problem = ""
        if key == "":
            problem = "Key cannot be blank"
        elif not _META_KEY_RE.match(key):
            problem = "Key contains invalid characters"
        elif len(key) > META_KEY_MAX_LEN:
            problem = f"Key is too long (limit: {META_KEY_MAX_LEN} characters)"
        elif key.startswith("consul-"):
            problem = "Key prefix 'consul-' is reserved for internal use"
        elif len(value) > META_VALUE_MAX_LEN:
            problem = f"Value is too long (limit: {META_VALUE_MAX_LEN} characters)"
        if problem:
            raise InvalidRequest(f"Invalid Service Meta: Couldn't load metadata pair ('{key}', '{value}'): {problem}")


def decode_service_definition(raw: Json) -> ServiceDefinition:
    """Decode and validate a ``/v1/agent/service/register`` body in Consul's order.

    Raises :class:`InvalidRequest` with Consul's texts ("Missing service name",
    "Invalid check: ...", "Invalid Service Meta: ...", ...).
    """
    d = GoDecoder(raw, "ServiceDefinition")
    name = d.string("Name")
    service_id = d.string("ID")
    tags = d.string_list("Tags") or []
    address = d.string("Address")
    port = d.integer("Port")
    meta = d.string_map("Meta") or {}
    eto = d.boolean("EnableTagOverride", "enable_tag_override")
    kind = d.string("Kind")
    tagged = d.get("TaggedAddresses", "tagged_addresses")
    if tagged is not MISSING and tagged is not None and not isinstance(tagged, dict):
        raise d.fail("TaggedAddresses", tagged, "map[string]structs.ServiceAddress")
    weights = _decode_weights(d)
    raw_checks = _raw_service_checks(d)
    _validate_service(name, address, weights, meta)
    return ServiceDefinition(
        id=service_id or name,
        name=name,
        tags=tuple(tags),
        address=address,
        port=port,
        meta=meta,
        weights=weights or {"Passing": 1, "Warning": 1},
        enable_tag_override=eto,
        tagged_addresses=tagged if isinstance(tagged, dict) else None,
        kind=kind,
        checks=tuple(_service_check(raw_check) for raw_check in raw_checks),
    )


def _decode_weights(d: GoDecoder) -> dict[str, int] | None:
    raw_weights = d.get("Weights")
    if raw_weights is MISSING or raw_weights is None:
        return None
    wd = GoDecoder(raw_weights, "Weights")
    return {"Passing": wd.integer("Passing"), "Warning": wd.integer("Warning")}


def _raw_service_checks(d: GoDecoder) -> list[Any]:
    """The undecoded checks of a registration: ``Check`` (unless empty) then ``Checks``."""
    raw_checks: list[Any] = []
    single = d.get("Check")
    if isinstance(single, dict) and any(v not in (None, "", 0, False, [], {}) for v in single.values()):
        raw_checks.append(single)
    elif single is not MISSING and single is not None and not isinstance(single, dict):
        raise d.fail("Check", single, "structs.CheckType")
    many = d.get("Checks")
    if many is not MISSING and many is not None:
        if not isinstance(many, list):
            raise d.fail("Checks", many, "structs.CheckTypes")
        raw_checks.extend(many)
    return raw_checks


def _validate_service(name: str, address: str, weights: dict[str, int] | None, meta: Mapping[str, str]) -> None:
    """Consul's ``ServiceDefinition.Validate`` for what rtm's agent keeps; raises :class:`InvalidRequest`."""
    if name == "":
        raise InvalidRequest("Missing service name")
    if address in _ANY_ADDRESSES:
        raise InvalidRequest("Invalid service address")
    if weights is not None:
        if weights["Passing"] < 1:
            raise InvalidRequest("Invalid Weights: Passing must be greater than 0")
        if weights["Warning"] < 0:
            raise InvalidRequest("Invalid Weights: Warning must be greater or equal than 0")
    _validate_meta(meta)


def _service_check(raw_check: Any) -> CheckDefinition:
    """One check of a service registration, decoded and validated."""
    cd = GoDecoder(raw_check, "CheckType")
    definition, status = _decode_check_type(cd)
    if status and status not in VALID_STATUSES:
        raise InvalidRequest("Status for checks must 'passing', 'warning', 'critical'")
    return replace(definition, check_id=cd.string("CheckID"))


def decode_check_definition(raw: Json) -> CheckDefinition:
    """Decode and validate a ``/v1/agent/check/register`` body.

    Raises :class:`InvalidRequest` ("Missing check name", "Bad check status",
    "Invalid check: ...").
    """
    d = GoDecoder(raw, "CheckDefinition")
    name = d.string("Name")
    check_id = d.string("ID")
    service_id = d.string("ServiceID", "service_id")
    status = d.string("Status")
    if name == "":
        raise InvalidRequest("Missing check name")
    if status and status not in VALID_STATUSES:
        raise InvalidRequest("Bad check status")
    definition, _ = _decode_check_type(d)
    return replace(definition, check_id=check_id or name, service_id=service_id)


def service_check_ids(definition: ServiceDefinition) -> list[str]:
    """The IDs of the checks a service registration names, as Consul gives them: its own
    ``CheckID``, else ``service:<id>`` (``:<n>`` after it when there are several)."""
    ids = []
    for position, check_def in enumerate(definition.checks):
        check_id = check_def.check_id or f"service:{definition.id}"
        if not check_def.check_id and len(definition.checks) > 1:
            check_id += f":{position + 1}"
        ids.append(check_id)
    return ids
