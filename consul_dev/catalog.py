"""What the dev agent's model answers about services: agent views, catalog and health queries, in Consul's JSON shapes."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from typing import Any

from consul_dev.agent import AgentState
from consul_dev.go_json import Json
from consul_dev.node import (
    CONSUL_VERSION,
    DATACENTER,
    HEALTH_ANY,
    HEALTH_PASSING,
    NODE_NAME,
    SERF_LAN_PORT,
    SERVER_RPC_PORT,
    TABLE_CHECKS,
    TABLE_NODES,
    TABLE_SERVICES,
)
from consul_dev.records import Check, Service


class CatalogState(AgentState):
    """Read-only views of the node's services and checks; each query returns ``(index, result)``."""

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
            idx = self._tables.get(TABLE_NODES, TABLE_SERVICES, TABLE_CHECKS)
        else:
            idx = self._tables.get(TABLE_NODES, TABLE_SERVICES)
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
        index = max(self._tables.get(TABLE_CHECKS), 1)
        if not self._node_matches(node_meta):
            return index, []
        ids = {s.id for s in self._instances(name)}
        checks = sorted((c for c in self._checks.values() if c.service_id in ids), key=lambda c: c.check_id)
        return index, [self._check_json(c) for c in checks]

    def health_state(self, state: str, *, node_meta: Sequence[str] = ()) -> tuple[int, list[Json]]:
        """``GET /v1/health/state/<state>``: checks in ``state`` (``any`` for all)."""
        self._expire()
        index = max(self._tables.get(TABLE_CHECKS), 1)
        if not self._node_matches(node_meta):
            return index, []
        checks = sorted(self._checks.values(), key=lambda c: c.check_id)
        return index, [self._check_json(c) for c in checks if state == HEALTH_ANY or c.status == state]

    def health_node(self, node: str) -> tuple[int, list[Json]]:
        """``GET /v1/health/node/<node>``: every check on ``node``."""
        self._expire()
        index = max(self._tables.get(TABLE_CHECKS), 1)
        if node != NODE_NAME:
            return index, []
        return index, [self._check_json(c) for c in sorted(self._checks.values(), key=lambda c: c.check_id)]

    def catalog_services(self, *, node_meta: Sequence[str] = ()) -> tuple[int, dict[str, list[str]]]:
        """``GET /v1/catalog/services``: service name -> union of its tags."""
        self._expire()
        index = max(self._tables.get(TABLE_SERVICES), 1)
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
        index = max(self._tables.get(TABLE_NODES), 1)
        return index, [self._node_json()] if self._node_matches(node_meta) else []

    def catalog_node(self, node: str) -> tuple[int, Json]:
        """``GET /v1/catalog/node/<node>``: ``{Node, Services}``, or None for an unknown node."""
        self._expire()
        index = max(self._tables.get(TABLE_NODES, TABLE_SERVICES), 1)
        if node != NODE_NAME:
            return index, None
        services = {s.id: self._node_service_json(s) for s in sorted(self._services.values(), key=lambda s: s.id)}
        return index, {"Node": self._node_json(), "Services": services}

    def leader(self) -> str:
        """``GET /v1/status/leader``: this node's server RPC address."""
        return f"{self._address}:{SERVER_RPC_PORT}"
