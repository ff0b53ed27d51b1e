"""What the dev agent's model stores: services, checks, KV entries, sessions, tombstones, table indexes.

Plain records; every one carries Consul's ``CreateIndex``/``ModifyIndex``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


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
class Tombstone:
    index: int
    deleted_at_s: float


@dataclass
class IndexTable:
    """Max index per state-store table, as Consul's index table keeps them."""

    indexes: dict[str, int] = field(default_factory=dict)

    def get(self, *names: str) -> int:
        return max((self.indexes.get(n, 0) for n in names), default=0)

    def touch(self, name: str, index: int) -> None:
        self.indexes[name] = index
