"""Sans-I/O model of the Consul subset the rtm fleet uses.

:class:`ConsulState` holds one node (``rtm-dev`` in ``dc1``) with its agent
services and TTL checks, the KV store, and sessions. It never awaits, never
reads a real clock (the clock is injected) and never touches a socket: the
aiohttp layer in :mod:`consul_dev.app` decodes HTTP into calls on it
and encodes what it returns. Every public method first applies whatever expired
by the clock (TTL checks, critical-service reaping, session TTLs), so the model
is correct however rarely :meth:`ConsulState.tick` is called.

Indexes follow Consul's state store: one raft-like index advances on every
write that changes something, every record carries ``CreateIndex`` /
``ModifyIndex``, and each query answers with the index of the data it read
(the key's ``ModifyIndex``; the highest index under a KV prefix, tombstones
included; a per-service-name index for health and catalog service queries;
table indexes otherwise). A blocking query therefore wakes only when its own
result changes.

Request bodies are decoded as Go's ``encoding/json`` decodes them into
Consul's structs: keys match case-insensitively (plus Consul's snake_case
aliases), unknown keys are ignored, a type mismatch fails the decode.

Errors are typed; each carries the HTTP status and body text real Consul sends::

    ConsulError                    (500: what Consul's servers answer)
    ├── InvalidRequest             400: decode failures, "Missing service name", ...
    ├── NotFound                   404
    │   ├── UnknownService         agent service ID not registered here
    │   ├── UnknownCheck           agent check ID not registered here
    │   ├── UnknownSession         session renew of an unknown session
    │   └── ServiceNotRegistered   check registration naming an unknown ServiceID
    ├── RequestTooLarge            413: KV value above 512 KiB
    └── ServerError                500: e.g. ``invalid session "..."``, bad session TTL
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, ClassVar, Final

Json = Any

# -- identity of the single dev node ------------------------------------------
NODE_NAME: Final = "rtm-dev"
DATACENTER: Final = "dc1"
CONSUL_VERSION: Final = "1.21.0"  # the Consul release whose API this agent mimics
SERVER_RPC_PORT: Final = 8300
SERF_LAN_PORT: Final = 8301
SERF_CHECK_ID: Final = "serfHealth"
SERF_CHECK_NAME: Final = "Serf Health Status"
SERF_CHECK_OUTPUT: Final = "Agent alive and reachable"
CONSUL_SERVICE_ID: Final = "consul"  # the catalog-only service every Consul server registers

HEALTH_PASSING: Final = "passing"
HEALTH_WARNING: Final = "warning"
HEALTH_CRITICAL: Final = "critical"
HEALTH_ANY: Final = "any"
VALID_STATUSES: Final = (HEALTH_PASSING, HEALTH_WARNING, HEALTH_CRITICAL)

SESSION_RELEASE: Final = "release"
SESSION_DELETE: Final = "delete"

# -- limits, all from Consul's docs or defaults ------------------------------
DEFAULT_LOCK_DELAY_S: Final = 15.0  # session create default
MAX_LOCK_DELAY_S: Final = 60.0  # Consul caps lock-delay at 60 s when it applies it
SESSION_TTL_MIN_S: Final = 10.0  # session_ttl_min default
SESSION_TTL_MAX_S: Final = 86400.0
# Docs: "The minimum timeout is 1 minute" for DeregisterCriticalServiceAfter.
DEREGISTER_CRITICAL_MIN_S: Final = 60.0
CHECK_OUTPUT_MAX_BYTES: Final = 4096  # TTL check output is truncated beyond 4 KiB
KV_MAX_VALUE_BYTES: Final = 512 * 1024  # kv_max_value_size default
# Tombstones keep a deleted key's index so prefix indexes never slide back;
# Consul reaps them after tombstone_ttl (15 minutes).
TOMBSTONE_TTL_S: Final = 15 * 60.0
META_MAX_PAIRS: Final = 64
META_KEY_MAX_LEN: Final = 128
META_VALUE_MAX_LEN: Final = 512
TTL_EXPIRED_OUTPUT: Final = "TTL expired"

_NS_PER_S: Final = 1_000_000_000
# FixupLockDelay: numbers below this many nanoseconds are taken as seconds.
_LOCK_DELAY_SECONDS_THRESHOLD_NS: Final = 1000

_TABLE_NODES: Final = "nodes"
_TABLE_SERVICES: Final = "services"
_TABLE_CHECKS: Final = "checks"
_TABLE_KVS: Final = "kvs"
_TABLE_TOMBSTONES: Final = "tombstones"
_TABLE_SESSIONS: Final = "sessions"


# -- errors ------------------------------------------------------------------
class ConsulError(Exception):
    """Base of every error the model raises.

    ``status`` is the HTTP status real Consul answers with and ``str(err)`` is
    its body text. Errors raised by Consul's servers (RPC errors) reach HTTP
    clients as 500 with the error text, hence the default.
    """

    status: ClassVar[int] = 500


class InvalidRequest(ConsulError):
    """400: the request is malformed or fails validation."""

    status = 400


class NotFound(ConsulError):
    """404: the named object does not exist."""

    status = 404


class UnknownService(NotFound):
    """An agent service ID that is not registered on this agent."""

    def __init__(self, service_id: str) -> None:
        super().__init__(
            f"Unknown service ID {go_quote(service_id)}. Ensure that the service ID is passed, not the service name."
        )
        self.service_id = service_id


class UnknownCheck(NotFound):
    """An agent check ID that is not registered on this agent."""

    def __init__(self, check_id: str) -> None:
        super().__init__(
            f"Unknown check ID {go_quote(check_id)}. Ensure that the check ID is passed, not the check name."
        )
        self.check_id = check_id


class UnknownSession(NotFound):
    """Renew of a session that does not exist (or was invalidated)."""

    def __init__(self, session_id: str) -> None:
        super().__init__(f"Session id '{session_id}' not found")
        self.session_id = session_id


class ServiceNotRegistered(NotFound):
    """A check registration names a ServiceID this agent does not have."""

    def __init__(self, service_id: str) -> None:
        super().__init__(f"ServiceID {go_quote(service_id)} does not exist")
        self.service_id = service_id


class RequestTooLarge(ConsulError):
    """413: a KV value above ``kv_max_value_size``."""

    status = 413


class ServerError(ConsulError):
    """500: an error Consul's servers return (bad session TTL, invalid session, ...)."""

    status = 500


# -- Go-compatible helpers ---------------------------------------------------
def go_quote(text: str) -> str:
    """Quote ``text`` like Go's ``%q`` does for ordinary strings."""
    return json.dumps(text, ensure_ascii=False)


_DURATION_UNITS_NS: Final = {
    "ns": 1,
    "us": 1_000,
    "µs": 1_000,  # U+00B5 micro sign
    "μs": 1_000,  # U+03BC Greek mu
    "ms": 1_000_000,
    "s": _NS_PER_S,
    "m": 60 * _NS_PER_S,
    "h": 3600 * _NS_PER_S,
}


def parse_go_duration_ns(text: str) -> int:
    """Parse a Go ``time.Duration`` string ("10s", "1m30s", "250ms", "0") into nanoseconds.

    Raises :class:`ValueError` carrying Go's own message, e.g.
    ``time: invalid duration "abc"`` or ``time: missing unit in duration "15"``.
    """
    original = text
    quoted = go_quote(original)
    sign = 1
    if text[:1] in ("+", "-"):
        sign = -1 if text[0] == "-" else 1
        text = text[1:]
    if text == "0":
        return 0
    if not text:
        raise ValueError(f"time: invalid duration {quoted}")
    total = 0.0
    pos = 0
    while pos < len(text):
        start = pos
        while pos < len(text) and (text[pos].isdigit() or text[pos] == "."):
            pos += 1
        number = text[start:pos]
        if number in ("", ".") or number.count(".") > 1:
            raise ValueError(f"time: invalid duration {quoted}")
        unit_start = pos
        while pos < len(text) and not (text[pos].isdigit() or text[pos] == "."):
            pos += 1
        unit = text[unit_start:pos]
        if not unit:
            raise ValueError(f"time: missing unit in duration {quoted}")
        if unit not in _DURATION_UNITS_NS:
            raise ValueError(f"time: unknown unit {go_quote(unit)} in duration {quoted}")
        total += float(number) * _DURATION_UNITS_NS[unit]
    return sign * int(round(total))


def parse_go_duration_s(text: str) -> float:
    """Like :func:`parse_go_duration_ns`, in seconds."""
    return parse_go_duration_ns(text) / _NS_PER_S


def format_go_duration(ns: int) -> str:
    """Format nanoseconds the way Go's ``Duration.String`` does ("10s", "24h0m0s", "1.5s", "250ms")."""

    def frac(value: int, unit: int) -> str:
        whole, rest = divmod(value, unit)
        if not rest:
            return str(whole)
        digits = str(rest).rjust(len(str(unit)) - 1, "0").rstrip("0")
        return f"{whole}.{digits}"

    if ns == 0:
        return "0s"
    sign = "-" if ns < 0 else ""
    ns = abs(ns)
    if ns < 1_000:
        return f"{sign}{ns}ns"
    if ns < 1_000_000:
        return f"{sign}{frac(ns, 1_000)}µs"
    if ns < _NS_PER_S:
        return f"{sign}{frac(ns, 1_000_000)}ms"
    hours, rest = divmod(ns, 3600 * _NS_PER_S)
    minutes, rest = divmod(rest, 60 * _NS_PER_S)
    seconds = frac(rest, _NS_PER_S) + "s"
    if hours:
        return f"{sign}{hours}h{minutes}m{seconds}"
    if minutes:
        return f"{sign}{minutes}m{seconds}"
    return f"{sign}{seconds}"


def _json_kind(value: Any) -> str:
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    if isinstance(value, dict):
        return "object"
    return "null"


_MISSING: Final = object()


class _Decoder:
    """Reads one decoded JSON object the way Go's ``encoding/json`` fills a Consul struct.

    Keys match exactly first, then case-insensitively, then through Consul's
    snake_case aliases; unknown keys are ignored; ``null`` leaves the zero
    value; a type mismatch raises :class:`InvalidRequest` with Go's wording.
    """

    def __init__(self, raw: Json, struct: str) -> None:
        if not isinstance(raw, dict):
            raise InvalidRequest(
                f"Request decode failed: json: cannot unmarshal {_json_kind(raw)} into Go value of type structs.{struct}"
            )
        self.raw: dict[str, Any] = raw
        self.struct = struct

    def get(self, name: str, *aliases: str) -> Any:
        if name in self.raw:
            return self.raw[name]
        lower = name.lower()
        for key, value in self.raw.items():
            if key.lower() == lower:
                return value
        for alias in aliases:
            if alias in self.raw:
                return self.raw[alias]
        return _MISSING

    def present(self, name: str, *aliases: str) -> bool:
        value = self.get(name, *aliases)
        return value is not _MISSING and value is not None

    def fail(self, name: str, value: Any, go_type: str) -> InvalidRequest:
        return InvalidRequest(
            f"Request decode failed: json: cannot unmarshal {_json_kind(value)} "
            f"into Go struct field {self.struct}.{name} of type {go_type}"
        )

    def string(self, name: str, *aliases: str) -> str:
        value = self.get(name, *aliases)
        if value is _MISSING or value is None:
            return ""
        if not isinstance(value, str):
            raise self.fail(name, value, "string")
        return value

    def integer(self, name: str, *aliases: str) -> int:
        value = self.get(name, *aliases)
        if value is _MISSING or value is None:
            return 0
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise self.fail(name, value, "int")
        if isinstance(value, float) and not value.is_integer():
            raise InvalidRequest(
                f"Request decode failed: json: cannot unmarshal number {value} into Go struct field "
                f"{self.struct}.{name} of type int"
            )
        return int(value)

    def boolean(self, name: str, *aliases: str) -> bool:
        value = self.get(name, *aliases)
        if value is _MISSING or value is None:
            return False
        if not isinstance(value, bool):
            raise self.fail(name, value, "bool")
        return value

    def string_list(self, name: str, *aliases: str) -> list[str] | None:
        value = self.get(name, *aliases)
        if value is _MISSING or value is None:
            return None
        if not isinstance(value, list):
            raise self.fail(name, value, "[]string")
        for item in value:
            if not isinstance(item, str):
                raise self.fail(name, item, "string")
        return list(value)

    def string_map(self, name: str, *aliases: str) -> dict[str, str] | None:
        value = self.get(name, *aliases)
        if value is _MISSING or value is None:
            return None
        if not isinstance(value, dict):
            raise self.fail(name, value, "map[string]string")
        for item in value.values():
            if not isinstance(item, str):
                raise self.fail(name, item, "string")
        return dict(value)

    def duration_ns(self, name: str, *aliases: str) -> int:
        """A duration given as a Go duration string or as a number of nanoseconds."""
        value = self.get(name, *aliases)
        if value is _MISSING or value is None:
            return 0
        if isinstance(value, str):
            try:
                return parse_go_duration_ns(value)
            except ValueError as exc:
                raise InvalidRequest(f"Request decode failed: {exc}") from None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return int(value)
        raise self.fail(name, value, "time.Duration")


# -- decoded request definitions ----------------------------------------------
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


def _decode_check_type(d: _Decoder) -> tuple[CheckDefinition, str]:
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
    d = _Decoder(raw, "ServiceDefinition")
    name = d.string("Name")
    service_id = d.string("ID")
    tags = d.string_list("Tags") or []
    address = d.string("Address")
    port = d.integer("Port")
    meta = d.string_map("Meta") or {}
    eto = d.boolean("EnableTagOverride", "enable_tag_override")
    kind = d.string("Kind")
    tagged = d.get("TaggedAddresses", "tagged_addresses")
    if tagged is not _MISSING and tagged is not None and not isinstance(tagged, dict):
        raise d.fail("TaggedAddresses", tagged, "map[string]structs.ServiceAddress")
    raw_weights = d.get("Weights")
    weights: dict[str, int] | None = None
    if raw_weights is not _MISSING and raw_weights is not None:
        wd = _Decoder(raw_weights, "Weights")
        weights = {"Passing": wd.integer("Passing"), "Warning": wd.integer("Warning")}
    raw_checks: list[Any] = []
    single = d.get("Check")
    if isinstance(single, dict) and any(v not in (None, "", 0, False, [], {}) for v in single.values()):
        raw_checks.append(single)
    elif single is not _MISSING and single is not None and not isinstance(single, dict):
        raise d.fail("Check", single, "structs.CheckType")
    many = d.get("Checks")
    if many is not _MISSING and many is not None:
        if not isinstance(many, list):
            raise d.fail("Checks", many, "structs.CheckTypes")
        raw_checks.extend(many)

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
    checks: list[CheckDefinition] = []
    for raw_check in raw_checks:
        cd = _Decoder(raw_check, "CheckType")
        definition, status = _decode_check_type(cd)
        if status and status not in VALID_STATUSES:
            raise InvalidRequest("Status for checks must 'passing', 'warning', 'critical'")
        checks.append(replace(definition, check_id=cd.string("CheckID")))
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
        checks=tuple(checks),
    )


def decode_check_definition(raw: Json) -> CheckDefinition:
    """Decode and validate a ``/v1/agent/check/register`` body.

    Raises :class:`InvalidRequest` ("Missing check name", "Bad check status",
    "Invalid check: ...").
    """
    d = _Decoder(raw, "CheckDefinition")
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


# -- stored records -----------------------------------------------------------
@dataclass
class Service:
    """One service instance on the node."""

    id: str
    name: str
    tags: list[str]
    address: str
    port: int
    meta: dict[str, str]
    weights: dict[str, int]
    enable_tag_override: bool
    tagged_addresses: dict[str, Any] | None
    kind: str
    agent_local: bool = True  # False only for the catalog-only "consul" service
    create_index: int = 0
    modify_index: int = 0

    def same_definition(self, other: Service) -> bool:
        return (
            self.name,
            self.tags,
            self.address,
            self.port,
            self.meta,
            self.weights,
            self.enable_tag_override,
            self.tagged_addresses,
            self.kind,
        ) == (
            other.name,
            other.tags,
            other.address,
            other.port,
            other.meta,
            other.weights,
            other.enable_tag_override,
            other.tagged_addresses,
            other.kind,
        )


@dataclass
class Check:
    """One health check on the node: a TTL check, or the built-in serfHealth."""

    check_id: str
    name: str
    status: str
    notes: str
    output: str
    service_id: str
    check_type: str  # "ttl", or "" for serfHealth
    ttl_ns: int = 0
    deregister_after_ns: int = 0
    agent_local: bool = True  # False only for serfHealth
    create_index: int = 0
    modify_index: int = 0
    ttl_deadline_s: float | None = None  # when the TTL timer fires; None once fired
    critical_since_s: float | None = None
    last_output: str = ""  # what the TTL-expired output quotes

    def same_definition(self, other: Check) -> bool:
        # Output is deliberately not compared: an output-only change does not
        # advance any index (see ConsulState.update_ttl_check).
        return (self.name, self.status, self.notes, self.service_id, self.check_type, self.ttl_ns) == (
            other.name,
            other.status,
            other.notes,
            other.service_id,
            other.check_type,
            other.ttl_ns,
        )


@dataclass
class KVEntry:
    """One KV pair (Consul's ``DirEntry``)."""

    key: str
    value: bytes
    flags: int
    session: str
    lock_index: int
    create_index: int = 0
    modify_index: int = 0

    def same_as(self, other: KVEntry) -> bool:
        """Consul's ``DirEntry.Equal``: a set that changes none of these is skipped."""
        return (self.lock_index, self.key, self.flags, self.value, self.session) == (
            other.lock_index,
            other.key,
            other.flags,
            other.value,
            other.session,
        )


@dataclass
class Session:
    """One session: its checks, TTL timer and lock-delay."""

    id: str
    name: str
    node: str
    lock_delay_ns: int
    behavior: str
    ttl: str
    ttl_ns: int
    node_checks: list[str]
    service_checks: list[dict[str, str]]
    checks: list[str]
    create_index: int = 0
    modify_index: int = 0
    deadline_s: float | None = None

    def check_ids(self) -> set[str]:
        return set(self.node_checks) | set(self.checks) | {c["ID"] for c in self.service_checks}


@dataclass
class _Tombstone:
    index: int
    deleted_at_s: float


@dataclass
class _Table:
    """Max index per state-store table, as Consul's index table keeps them."""

    indexes: dict[str, int] = field(default_factory=dict)

    def get(self, *names: str) -> int:
        return max((self.indexes.get(n, 0) for n in names), default=0)

    def touch(self, name: str, index: int) -> None:
        self.indexes[name] = index


# -- the model -----------------------------------------------------------------
class ConsulState:
    """The dev agent's whole state: one node, its services and checks, KV, sessions.

    Not thread-safe and not async: the caller serialises calls. ``now_s`` is
    the clock (seconds, any epoch, never going backwards); every public method
    reads it once to apply expiries first. Query methods return
    ``(index, result)`` where ``index`` is the index a blocking query on that
    result compares against (always >= 1); ``result`` is already in the JSON
    shape Consul replies with.
    """

    def __init__(
        self,
        now_s: Callable[[], float],
        *,
        node_address: str = "127.0.0.1",
        new_id: Callable[[], str] = lambda: str(uuid.uuid4()),
    ) -> None:
        self._now_s = now_s
        self._new_id = new_id
        self._address = node_address
        self._node_id = new_id()
        self._index = 0
        self._pending_index: int | None = None
        self._tables = _Table()
        self._service_index: dict[str, int] = {}  # service name -> index, while it has instances
        self._extinction_index = 0  # when the last instance of some service went away
        self._services: dict[str, Service] = {}
        self._checks: dict[str, Check] = {}
        self._kv: dict[str, KVEntry] = {}
        self._tombstones: dict[str, _Tombstone] = {}
        self._lock_delay_until_s: dict[str, float] = {}
        self._sessions: dict[str, Session] = {}
        self._bootstrap()

    # ---- bookkeeping ------------------------------------------------------
    @property
    def index(self) -> int:
        """The raft-like index of the last write that changed something."""
        return self._index

    @property
    def node_address(self) -> str:
        return self._address

    def _begin(self) -> None:
        """Start one write operation: its changes share one index, allocated on first use."""
        self._pending_index = None

    def _idx(self) -> int:
        if self._pending_index is None:
            self._index += 1
            self._pending_index = self._index
        return self._pending_index

    def _bootstrap(self) -> None:
        self._begin()
        idx = self._idx()
        self._tables.touch(_TABLE_NODES, idx)
        serf = Check(
            check_id=SERF_CHECK_ID,
            name=SERF_CHECK_NAME,
            status=HEALTH_PASSING,
            notes="",
            output=SERF_CHECK_OUTPUT,
            service_id="",
            check_type="",
            agent_local=False,
            create_index=idx,
            modify_index=idx,
        )
        self._checks[SERF_CHECK_ID] = serf
        self._tables.touch(_TABLE_CHECKS, idx)
        consul = Service(
            id=CONSUL_SERVICE_ID,
            name=CONSUL_SERVICE_ID,
            tags=[],
            address="",
            port=SERVER_RPC_PORT,
            meta={"non_voter": "false", "raft_version": "3", "read_replica": "false", "version": CONSUL_VERSION},
            weights={"Passing": 1, "Warning": 1},
            enable_tag_override=False,
            tagged_addresses=None,
            kind="",
            agent_local=False,
            create_index=idx,
            modify_index=idx,
        )
        self._services[CONSUL_SERVICE_ID] = consul
        self._tables.touch(_TABLE_SERVICES, idx)
        self._service_index[CONSUL_SERVICE_ID] = idx

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
        self._tables.touch(_TABLE_CHECKS, self._idx())
        if check.service_id:
            service = self._services.get(check.service_id)
            if service is not None:
                self._touch_service_name(service.name)
        else:  # a node-level check affects the health of every service on the node
            for name in {s.name for s in self._services.values()}:
                self._touch_service_name(name)

    # ---- expiry -------------------------------------------------------------
    def tick(self) -> None:
        """Apply everything that has expired by the clock: TTL checks, reaping, session TTLs."""
        self._expire()

    def _due_events(self, now: float) -> list[tuple[float, int, str, str]]:
        events: list[tuple[float, int, str, str]] = []
        for check in self._checks.values():
            if check.ttl_deadline_s is not None and check.ttl_deadline_s <= now:
                events.append((check.ttl_deadline_s, 0, "check", check.check_id))
            if check.deregister_after_ns and check.service_id and check.critical_since_s is not None:
                after_s = max(check.deregister_after_ns / _NS_PER_S, DEREGISTER_CRITICAL_MIN_S)
                due = check.critical_since_s + after_s
                if due <= now:
                    events.append((due, 1, "reap", check.check_id))
        for session in self._sessions.values():
            if session.deadline_s is not None and session.deadline_s <= now:
                events.append((session.deadline_s, 2, "session", session.id))
        return events

    def _expire(self) -> None:
        now = self._now_s()
        # One event at a time, earliest first: an event may cause others
        # (a check going critical starts its reap timer, invalidates sessions).
        while True:
            events = self._due_events(now)
            if not events:
                break
            due, _, kind, ident = min(events)
            self._begin()
            if kind == "check":
                check = self._checks[ident]
                check.ttl_deadline_s = None
                output = TTL_EXPIRED_OUTPUT
                if check.last_output:
                    output = f"{TTL_EXPIRED_OUTPUT} (last output before timeout follows): {check.last_output}"
                self._set_check_status(check, HEALTH_CRITICAL, output, at_s=due)
            elif kind == "reap":
                service_id = self._checks[ident].service_id
                if service_id in self._services:
                    self._remove_service(service_id, at_s=due)
                else:  # orphaned check: stop considering it
                    self._checks[ident].critical_since_s = None
            else:
                self._invalidate_session(ident, at_s=due)
        for key, stone in list(self._tombstones.items()):
            if now - stone.deleted_at_s >= TOMBSTONE_TTL_S:
                del self._tombstones[key]
        for key, until in list(self._lock_delay_until_s.items()):
            if until <= now:
                del self._lock_delay_until_s[key]

    def next_deadline_s(self) -> float | None:
        """The earliest clock time at which something will expire, if any."""
        deadlines = [c.ttl_deadline_s for c in self._checks.values() if c.ttl_deadline_s is not None]
        deadlines += [s.deadline_s for s in self._sessions.values() if s.deadline_s is not None]
        for check in self._checks.values():
            if check.deregister_after_ns and check.service_id and check.critical_since_s is not None:
                after_s = max(check.deregister_after_ns / _NS_PER_S, DEREGISTER_CRITICAL_MIN_S)
                deadlines.append(check.critical_since_s + after_s)
        return min(deadlines, default=None)

    # ---- agent: services and checks --------------------------------------------
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
        service = Service(
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
        existing = self._services.get(definition.id)
        if existing is not None and not existing.agent_local:
            raise InvalidRequest(f"Service ID {go_quote(definition.id)} is reserved by the agent")
        if existing is None or not existing.same_definition(service):
            idx = self._idx()
            service.create_index = existing.create_index if existing else idx
            service.modify_index = idx
            self._services[service.id] = service
            self._tables.touch(_TABLE_SERVICES, idx)
            if existing is not None and existing.name != service.name:
                self._touch_service_name(existing.name)
            self._touch_service_name(service.name)
        kept: set[str] = set()
        for position, check_def in enumerate(definition.checks):
            check_id = check_def.check_id or f"service:{definition.id}"
            if not check_def.check_id and len(definition.checks) > 1:
                check_id += f":{position + 1}"
            kept.add(check_id)
            status, output = check_def.status or HEALTH_CRITICAL, ""
            if check_id in snapshot:
                status, output = snapshot[check_id]
            self._put_check(
                Check(
                    check_id=check_id,
                    name=check_def.name or f"Service '{definition.name}' check",
                    status=status,
                    notes=check_def.notes,
                    output=output,
                    service_id=definition.id,
                    check_type="ttl",
                    ttl_ns=check_def.ttl_ns,
                    deregister_after_ns=check_def.deregister_after_ns,
                ),
                now,
            )
        if replace_existing_checks:
            for check in list(self._checks.values()):
                if check.service_id == definition.id and check.check_id not in kept:
                    self._delete_check(check, at_s=now)

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
        self._tables.touch(_TABLE_SERVICES, self._idx())
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
        check.ttl_deadline_s = now + check.ttl_ns / _NS_PER_S
        self._set_check_status(check, status, output, at_s=now)

    def update_check(self, check_id: str, raw: Json) -> None:
        """``PUT /v1/agent/check/update/<id>`` with body ``{"Status": ..., "Output": ...}``."""
        d = _Decoder(raw, "checkUpdate")
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
        new.ttl_deadline_s = now + new.ttl_ns / _NS_PER_S if new.ttl_ns > 0 else None
        new.last_output = new.output
        if new.status == HEALTH_CRITICAL:
            was_critical = existing is not None and existing.critical_since_s is not None
            new.critical_since_s = existing.critical_since_s if was_critical and existing else now
        if existing is not None and existing.same_definition(new):
            new.create_index, new.modify_index = existing.create_index, existing.modify_index
            self._checks[new.check_id] = new
            return
        idx = self._idx()
        new.create_index = existing.create_index if existing else idx
        new.modify_index = idx
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
    def agent_services(self) -> dict[str, Json]:
        """``GET /v1/agent/services``: service ID -> AgentService."""
        self._expire()
        return {
            s.id: self._agent_service_json(s)
            for s in sorted(self._services.values(), key=lambda s: s.id)
            if s.agent_local
        }

    def agent_service_name(self, service_id: str) -> str | None:
        """The service name of agent service ``service_id`` (what its ACL rule names), or None."""
        service = self._services.get(service_id)
        return service.name if service is not None and service.agent_local else None

    def agent_check_service_name(self, check_id: str) -> str | None:
        """The service name agent check ``check_id`` belongs to ("" for a node check), or None if unknown.

        Consul checks ``service:write`` on that name, or ``node:write`` on the
        node for a node check, before it updates or removes the check.
        """
        check = self._checks.get(check_id)
        if check is None or not check.agent_local:
            return None
        service = self._services.get(check.service_id) if check.service_id else None
        return service.name if service is not None else ""

    def agent_service(self, service_id: str) -> Json | None:
        """``GET /v1/agent/service/<id>``: the AgentService with its ``ContentHash``, or None."""
        self._expire()
        service = self._services.get(service_id)
        if service is None or not service.agent_local:
            return None
        body = self._agent_service_json(service)
        digest = hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()[:16]
        return {**body, "ContentHash": digest}

    def agent_checks(self) -> dict[str, Json]:
        """``GET /v1/agent/checks``: check ID -> HealthCheck (agent-local indexes are 0)."""
        self._expire()
        return {
            c.check_id: self._check_json(c, agent_view=True)
            for c in sorted(self._checks.values(), key=lambda c: c.check_id)
            if c.agent_local
        }

    def agent_self(self) -> Json:
        """``GET /v1/agent/self``: the minimal Config / Member / Meta this agent can tell."""
        self._expire()
        return {
            "Config": {
                "Datacenter": DATACENTER,
                "PrimaryDatacenter": DATACENTER,
                "NodeName": NODE_NAME,
                "NodeID": self._node_id,
                "Revision": "rtm-dev",
                "Server": True,
                "Version": CONSUL_VERSION,
            },
            "Coord": None,
            "Member": {
                "Name": NODE_NAME,
                "Addr": self._address,
                "Port": SERF_LAN_PORT,
                "Tags": {
                    "build": f"{CONSUL_VERSION}:rtm-dev",
                    "dc": DATACENTER,
                    "id": self._node_id,
                    "port": str(SERVER_RPC_PORT),
                    "role": "consul",
                    "segment": "",
                    "vsn": "2",
                },
                "Status": 1,
                "ProtocolMin": 1,
                "ProtocolMax": 5,
                "ProtocolCur": 2,
                "DelegateMin": 2,
                "DelegateMax": 5,
                "DelegateCur": 4,
            },
            "Stats": {},
            "Meta": self._node_meta(),
        }

    # ---- catalog and health ------------------------------------------------------
    def _node_meta(self) -> dict[str, str]:
        return {"consul-network-segment": "", "consul-version": CONSUL_VERSION}

    def _node_json(self) -> Json:
        addr = self._address
        return {
            "ID": self._node_id,
            "Node": NODE_NAME,
            "Address": addr,
            "Datacenter": DATACENTER,
            "TaggedAddresses": {"lan": addr, "lan_ipv4": addr, "wan": addr, "wan_ipv4": addr},
            "Meta": self._node_meta(),
            "CreateIndex": 1,
            "ModifyIndex": 1,
        }

    def _node_matches(self, node_meta: Sequence[str]) -> bool:
        meta = self._node_meta()
        for pair in node_meta:
            key, _, value = pair.partition(":")
            if meta.get(key) != value:
                return False
        return True

    @staticmethod
    def _has_tags(service: Service, tags: Sequence[str]) -> bool:
        mine = {t.lower() for t in service.tags}
        return all(t.lower() in mine for t in tags)

    def _agent_service_json(self, s: Service) -> Json:
        body: dict[str, Any] = {}
        if s.kind:
            body["Kind"] = s.kind
        body.update(
            {
                "ID": s.id,
                "Service": s.name,
                "Tags": list(s.tags),
                "Meta": dict(s.meta),
                "Port": s.port,
                "Address": s.address,
            }
        )
        if s.tagged_addresses:
            body["TaggedAddresses"] = s.tagged_addresses
        body.update({"Weights": dict(s.weights), "EnableTagOverride": s.enable_tag_override, "Datacenter": DATACENTER})
        return body

    def _node_service_json(self, s: Service) -> Json:
        body: dict[str, Any] = {}
        if s.kind:
            body["Kind"] = s.kind
        body.update({"ID": s.id, "Service": s.name, "Tags": list(s.tags), "Address": s.address})
        if s.tagged_addresses:
            body["TaggedAddresses"] = s.tagged_addresses
        body.update(
            {
                "Meta": dict(s.meta),
                "Port": s.port,
                "Weights": dict(s.weights),
                "EnableTagOverride": s.enable_tag_override,
                "Proxy": {"Mode": "", "MeshGateway": {}, "Expose": {}},
                "Connect": {},
                "PeerName": "",
                "CreateIndex": s.create_index,
                "ModifyIndex": s.modify_index,
            }
        )
        return body

    def _catalog_service_json(self, s: Service) -> Json:
        node = self._node_json()
        body: dict[str, Any] = {
            "ID": node["ID"],
            "Node": NODE_NAME,
            "Address": node["Address"],
            "Datacenter": DATACENTER,
            "TaggedAddresses": node["TaggedAddresses"],
            "NodeMeta": node["Meta"],
            "ServiceKind": s.kind,
            "ServiceID": s.id,
            "ServiceName": s.name,
            "ServiceTags": list(s.tags),
            "ServiceAddress": s.address,
            "ServiceWeights": dict(s.weights),
            "ServiceMeta": dict(s.meta),
            "ServicePort": s.port,
            "ServiceSocketPath": "",
            "ServiceEnableTagOverride": s.enable_tag_override,
            "ServiceProxy": {"Mode": "", "MeshGateway": {}, "Expose": {}},
            "ServiceConnect": {},
            "ServicePeerName": "",
            "CreateIndex": s.create_index,
            "ModifyIndex": s.modify_index,
        }
        if s.tagged_addresses:
            body["ServiceTaggedAddresses"] = s.tagged_addresses
        return body

    def _check_json(self, c: Check, *, agent_view: bool = False) -> Json:
        service = self._services.get(c.service_id) if c.service_id else None
        return {
            "Node": NODE_NAME,
            "CheckID": c.check_id,
            "Name": c.name,
            "Status": c.status,
            "Notes": c.notes,
            "Output": c.output,
            "ServiceID": c.service_id,
            "ServiceName": service.name if service else "",
            "ServiceTags": list(service.tags) if service else [],
            "Type": c.check_type,
            "Interval": "",
            "Timeout": "",
            "ExposedPort": 0,
            "Definition": {},
            "CreateIndex": 0 if agent_view else c.create_index,
            "ModifyIndex": 0 if agent_view else c.modify_index,
        }

    def _service_result_index(self, name: str, *, with_checks: bool) -> int:
        """Consul's ``maxIndexForService``: the name's own index, else the extinction index, else the tables'."""
        if name in self._service_index:
            idx = self._service_index[name]
        elif self._extinction_index:
            idx = self._extinction_index
        elif with_checks:
            idx = self._tables.get(_TABLE_NODES, _TABLE_SERVICES, _TABLE_CHECKS)
        else:
            idx = self._tables.get(_TABLE_NODES, _TABLE_SERVICES)
        return max(idx, 1)

    def _instances(self, name: str) -> list[Service]:
        return sorted((s for s in self._services.values() if s.name == name), key=lambda s: s.id)

    def _checks_for(self, service: Service) -> list[Check]:
        node_checks = sorted((c for c in self._checks.values() if not c.service_id), key=lambda c: c.check_id)
        own = sorted((c for c in self._checks.values() if c.service_id == service.id), key=lambda c: c.check_id)
        return node_checks + own

    def health_service(
        self,
        name: str,
        *,
        passing: bool = False,
        tags: Sequence[str] = (),
        node_meta: Sequence[str] = (),
    ) -> tuple[int, list[Json]]:
        """``GET /v1/health/service/<name>``: one ``{Node, Service, Checks}`` entry per instance.

        ``passing`` drops instances with any check not passing (warning
        included); every tag in ``tags`` must be present (case-insensitive).
        """
        self._expire()
        index = self._service_result_index(name, with_checks=True)
        if not self._node_matches(node_meta):
            return index, []
        result = []
        for service in self._instances(name):
            if not self._has_tags(service, tags):
                continue
            checks = self._checks_for(service)
            if passing and any(c.status != HEALTH_PASSING for c in checks):
                continue
            result.append(
                {
                    "Node": self._node_json(),
                    "Service": self._node_service_json(service),
                    "Checks": [self._check_json(c) for c in checks],
                }
            )
        return index, result

    def health_checks(self, name: str, *, node_meta: Sequence[str] = ()) -> tuple[int, list[Json]]:
        """``GET /v1/health/checks/<service>``: the checks of every instance of ``name``."""
        self._expire()
        index = max(self._tables.get(_TABLE_CHECKS), 1)
        if not self._node_matches(node_meta):
            return index, []
        ids = {s.id for s in self._instances(name)}
        checks = sorted((c for c in self._checks.values() if c.service_id in ids), key=lambda c: c.check_id)
        return index, [self._check_json(c) for c in checks]

    def health_state(self, state: str, *, node_meta: Sequence[str] = ()) -> tuple[int, list[Json]]:
        """``GET /v1/health/state/<state>``: checks in ``state`` (``any`` for all)."""
        self._expire()
        index = max(self._tables.get(_TABLE_CHECKS), 1)
        if not self._node_matches(node_meta):
            return index, []
        checks = sorted(self._checks.values(), key=lambda c: c.check_id)
        return index, [self._check_json(c) for c in checks if state == HEALTH_ANY or c.status == state]

    def health_node(self, node: str) -> tuple[int, list[Json]]:
        """``GET /v1/health/node/<node>``: every check on ``node``."""
        self._expire()
        index = max(self._tables.get(_TABLE_CHECKS), 1)
        if node != NODE_NAME:
            return index, []
        return index, [self._check_json(c) for c in sorted(self._checks.values(), key=lambda c: c.check_id)]

    def catalog_services(self, *, node_meta: Sequence[str] = ()) -> tuple[int, dict[str, list[str]]]:
        """``GET /v1/catalog/services``: service name -> union of its tags."""
        self._expire()
        index = max(self._tables.get(_TABLE_SERVICES), 1)
        if not self._node_matches(node_meta):
            return index, {}
        names: dict[str, set[str]] = {}
        for service in self._services.values():
            names.setdefault(service.name, set()).update(service.tags)
        return index, {name: sorted(tags) for name, tags in sorted(names.items())}

    def catalog_service(
        self, name: str, *, tags: Sequence[str] = (), node_meta: Sequence[str] = ()
    ) -> tuple[int, list[Json]]:
        """``GET /v1/catalog/service/<name>``: one ServiceNode per instance."""
        self._expire()
        index = self._service_result_index(name, with_checks=False)
        if not self._node_matches(node_meta):
            return index, []
        return index, [self._catalog_service_json(s) for s in self._instances(name) if self._has_tags(s, tags)]

    def catalog_nodes(self, *, node_meta: Sequence[str] = ()) -> tuple[int, list[Json]]:
        """``GET /v1/catalog/nodes``: the one node."""
        self._expire()
        index = max(self._tables.get(_TABLE_NODES), 1)
        return index, [self._node_json()] if self._node_matches(node_meta) else []

    def catalog_node(self, node: str) -> tuple[int, Json]:
        """``GET /v1/catalog/node/<node>``: ``{Node, Services}``, or None for an unknown node."""
        self._expire()
        index = max(self._tables.get(_TABLE_NODES, _TABLE_SERVICES), 1)
        if node != NODE_NAME:
            return index, None
        services = {s.id: self._node_service_json(s) for s in sorted(self._services.values(), key=lambda s: s.id)}
        return index, {"Node": self._node_json(), "Services": services}

    def leader(self) -> str:
        """``GET /v1/status/leader``: this node's server RPC address."""
        return f"{self._address}:{SERVER_RPC_PORT}"

    # ---- KV ---------------------------------------------------------------------
    def _kv_table_index(self) -> int:
        return self._tables.get(_TABLE_KVS, _TABLE_TOMBSTONES)

    @staticmethod
    def _kv_json(entry: KVEntry) -> Json:
        body: dict[str, Any] = {
            "LockIndex": entry.lock_index,
            "Key": entry.key,
            "Flags": entry.flags,
            # Consul stores an empty body as a nil value, which JSON shows as null.
            "Value": base64.b64encode(entry.value).decode() if entry.value else None,
        }
        if entry.session:
            body["Session"] = entry.session
        body["CreateIndex"] = entry.create_index
        body["ModifyIndex"] = entry.modify_index
        return body

    def kv_get(self, key: str) -> tuple[int, list[Json]]:
        """``GET /v1/kv/<key>``: ``[entry]``, or ``[]`` (HTTP 404) when absent.

        The index is the key's ModifyIndex, or the KV table's index when absent.
        """
        self._expire()
        entry = self._kv.get(key)
        if entry is None:
            return max(self._kv_table_index(), 1), []
        return entry.modify_index, [self._kv_json(entry)]

    def kv_raw(self, key: str) -> tuple[int, bytes | None]:
        """``GET /v1/kv/<key>?raw``: the value bytes, or None when absent."""
        index, entries = self.kv_get(key)
        entry = self._kv.get(key)
        return index, (entry.value if entries and entry is not None else None)

    def _prefix_index(self, prefix: str, entries: Iterable[KVEntry]) -> int:
        """Consul's ``kvsListTxn`` index: max of entries and tombstones under prefix, else the table's."""
        table = self._kv_table_index()
        if prefix == "":
            return max(table, 1)
        sub = max((e.modify_index for e in entries), default=0)
        tomb = max((t.index for k, t in self._tombstones.items() if k.startswith(prefix)), default=0)
        sub = max(sub, tomb)
        return max(sub or table, 1)

    def kv_list(self, prefix: str) -> tuple[int, list[Json]]:
        """``GET /v1/kv/<prefix>?recurse``: every entry under ``prefix`` in key order ([] = 404)."""
        self._expire()
        entries = [self._kv[k] for k in sorted(self._kv) if k.startswith(prefix)]
        return self._prefix_index(prefix, entries), [self._kv_json(e) for e in entries]

    def kv_keys(self, prefix: str, separator: str = "") -> tuple[int, list[str] | None]:
        """``GET /v1/kv/<prefix>?keys[&separator=/]``: key names, rolled up at ``separator``.

        Returns None (HTTP 404) when nothing matches a non-empty prefix.
        """
        self._expire()
        entries = [self._kv[k] for k in sorted(self._kv) if k.startswith(prefix)]
        keys: list[str] = []
        for entry in entries:
            if not separator:
                keys.append(entry.key)
                continue
            after = entry.key[len(prefix) :]
            cut = after.find(separator)
            name = entry.key[: len(prefix) + cut + len(separator)] if cut >= 0 else entry.key
            if not keys or keys[-1] != name:
                keys.append(name)
        index = self._prefix_index(prefix, entries)
        if not keys and prefix != "":
            return index, None
        return index, keys

    def kv_put(
        self,
        key: str,
        value: bytes,
        *,
        flags: int = 0,
        cas: int | None = None,
        acquire: str | None = None,
        release: str | None = None,
    ) -> bool:
        """``PUT /v1/kv/<key>``: set, check-and-set, lock or unlock; returns Consul's true/false.

        * plain set: always True; keeps the key's Session (and, as Consul does,
          resets LockIndex to 0);
        * ``cas=0``: only if the key does not exist; ``cas=N``: only if its
          ModifyIndex is N;
        * ``acquire=S``: False if another session holds the key or the key is
          in lock-delay; LockIndex increments when a new holder takes it;
        * ``release=S``: False unless S holds the key; clears Session, keeps LockIndex.

        Raises :class:`InvalidRequest` when more than one of cas/acquire/release
        is given, :class:`RequestTooLarge` above 512 KiB, :class:`ServerError`
        for an unknown or empty session.
        """
        self._expire()
        if sum(x is not None for x in (cas, acquire, release)) > 1:
            raise InvalidRequest("Conflicting flags: only one of cas, acquire and release may be given")
        if key == "":
            raise InvalidRequest("Missing key name")
        if len(value) > KV_MAX_VALUE_BYTES:
            raise RequestTooLarge(
                f"Request body({len(value)} bytes) too large, max size: {KV_MAX_VALUE_BYTES} bytes. "
                "See https://developer.hashicorp.com/docs/agent/config/config-files#kv_max_value_size."
            )
        now = self._now_s()
        self._begin()
        existing = self._kv.get(key)
        if acquire is not None:
            if self._lock_delay_until_s.get(key, 0.0) > now:
                return False
            if acquire == "":
                raise ServerError("missing session")
            if acquire not in self._sessions:
                raise ServerError(f"invalid session {go_quote(acquire)}")
            if existing is not None and existing.session not in ("", acquire):
                return False
            if existing is None:
                lock_index = 1
            elif existing.session == acquire:
                lock_index = existing.lock_index
            else:
                lock_index = existing.lock_index + 1
            self._kv_set(KVEntry(key, value, flags, acquire, lock_index))
            return True
        if release is not None:
            if release == "":
                raise ServerError("missing session")
            if existing is None or existing.session != release:
                return False
            self._kv_set(KVEntry(key, value, flags, "", existing.lock_index))
            return True
        if cas is not None:
            if cas == 0 and existing is not None:
                return False
            if cas != 0 and (existing is None or existing.modify_index != cas):
                return False
        self._kv_set(KVEntry(key, value, flags, existing.session if existing else "", 0))
        return True

    def _kv_set(self, entry: KVEntry) -> None:
        existing = self._kv.get(entry.key)
        if existing is not None and existing.same_as(entry):
            return
        idx = self._idx()
        entry.create_index = existing.create_index if existing else idx
        entry.modify_index = idx
        self._kv[entry.key] = entry
        self._tables.touch(_TABLE_KVS, idx)

    def _kv_delete(self, key: str, *, at_s: float) -> None:
        if key not in self._kv:
            return
        del self._kv[key]
        idx = self._idx()
        self._tombstones[key] = _Tombstone(idx, at_s)
        self._tables.touch(_TABLE_KVS, idx)
        self._tables.touch(_TABLE_TOMBSTONES, idx)

    def kv_delete(self, key: str, *, recurse: bool = False, cas: int | None = None) -> bool:
        """``DELETE /v1/kv/<key>``: delete one key, a prefix (``recurse``), or check-and-delete.

        Plain and recursive deletes always return True (deleting nothing is
        fine). With ``cas=N`` the key is deleted only if its ModifyIndex is N;
        as in Consul, a CAS delete of an absent key returns True.
        Raises :class:`InvalidRequest` for recurse with cas, or an empty key without recurse.
        """
        self._expire()
        if recurse and cas is not None:
            raise InvalidRequest("Conflicting flags: recurse and cas cannot be combined")
        if key == "" and not recurse:
            raise InvalidRequest("Missing key name")
        now = self._now_s()
        self._begin()
        if recurse:
            for k in [k for k in sorted(self._kv) if k.startswith(key)]:
                self._kv_delete(k, at_s=now)
            return True
        if cas is not None:
            existing = self._kv.get(key)
            if existing is None or existing.modify_index != cas:
                return existing is None
        self._kv_delete(key, at_s=now)
        return True

    # ---- sessions --------------------------------------------------------------
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
        name, node, behavior, ttl = "", NODE_NAME, SESSION_RELEASE, ""
        lock_delay_ns = int(DEFAULT_LOCK_DELAY_S * _NS_PER_S)
        node_checks: list[str] = [SERF_CHECK_ID]
        checks: list[str] = [SERF_CHECK_ID]
        service_checks: list[dict[str, str]] = []
        if raw is not None:
            d = _Decoder(raw, "Session")
            name = d.string("Name")
            if d.present("Node"):  # null leaves the default, as in Go
                node = d.string("Node")
            if d.present("Behavior"):
                behavior = d.string("Behavior")
            ttl = d.string("TTL")
            if d.present("LockDelay"):
                lock_delay_ns = d.duration_ns("LockDelay")
                if lock_delay_ns < _LOCK_DELAY_SECONDS_THRESHOLD_NS:
                    lock_delay_ns *= _NS_PER_S
            if d.get("Checks") is not _MISSING:
                checks = d.string_list("Checks") or []
            if d.get("NodeChecks") is not _MISSING:
                node_checks = d.string_list("NodeChecks") or []
            raw_service_checks = d.get("ServiceChecks")
            if isinstance(raw_service_checks, list):
                for item in raw_service_checks:
                    sd = _Decoder(item, "ServiceCheck")
                    service_checks.append({"ID": sd.string("ID"), "Namespace": sd.string("Namespace")})
            elif raw_service_checks not in (_MISSING, None):
                raise d.fail("ServiceChecks", raw_service_checks, "[]structs.ServiceCheck")
        # Consul's fixupEmptySessionChecks.
        if not checks:
            node_checks = []
        elif checks == [SERF_CHECK_ID]:
            checks = []
        elif not node_checks:
            checks = []
        if node == "":
            raise ServerError("Must provide Node")
        if behavior not in (SESSION_RELEASE, SESSION_DELETE):
            raise ServerError(f"Invalid Behavior setting '{behavior}'")
        ttl_ns = 0
        if ttl:
            try:
                ttl_ns = parse_go_duration_ns(ttl)
            except ValueError as exc:
                raise ServerError(f"Session TTL '{ttl}' invalid: {exc}") from None
            low, high = int(SESSION_TTL_MIN_S * _NS_PER_S), int(SESSION_TTL_MAX_S * _NS_PER_S)
            if ttl_ns != 0 and not low <= ttl_ns <= high:
                raise ServerError(
                    f"Invalid Session TTL '{ttl_ns}', must be between "
                    f"[{format_go_duration(low)}={format_go_duration(high)}]"
                )
        if node != NODE_NAME:
            raise ServerError("Missing node registration")
        wanted = list(dict.fromkeys([*node_checks, *checks, *(c["ID"] for c in service_checks)]))
        for check_id in wanted:
            check = self._checks.get(check_id)
            if check is None:
                raise ServerError(f"Missing check '{check_id}' registration")
            if check.status == HEALTH_CRITICAL:
                raise ServerError(f"Check '{check_id}' is in {check.status} state")
        self._begin()
        idx = self._idx()
        session = Session(
            id=self._new_id(),
            name=name,
            node=node,
            lock_delay_ns=lock_delay_ns,
            behavior=behavior,
            ttl=ttl,
            ttl_ns=ttl_ns,
            node_checks=list(dict.fromkeys(node_checks)),
            service_checks=service_checks,
            checks=list(dict.fromkeys(checks)),
            create_index=idx,
            modify_index=idx,
            deadline_s=self._now_s() + ttl_ns / _NS_PER_S if ttl_ns > 0 else None,
        )
        self._sessions[session.id] = session
        self._tables.touch(_TABLE_SESSIONS, idx)
        return session.id

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
            session.deadline_s = self._now_s() + session.ttl_ns / _NS_PER_S
        return [self._session_json(session)]

    def session_info(self, session_id: str) -> tuple[int, list[Json]]:
        """``GET /v1/session/info/<id>``: ``[session]``, or ``[]`` when unknown."""
        self._expire()
        index = max(self._tables.get(_TABLE_SESSIONS), 1)
        session = self._sessions.get(session_id)
        return index, [self._session_json(session)] if session else []

    def session_list(self) -> tuple[int, list[Json]]:
        """``GET /v1/session/list``: every session, by ID."""
        self._expire()
        index = max(self._tables.get(_TABLE_SESSIONS), 1)
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
        self._tables.touch(_TABLE_SESSIONS, idx)
        delay_s = min(session.lock_delay_ns / _NS_PER_S, MAX_LOCK_DELAY_S)
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
