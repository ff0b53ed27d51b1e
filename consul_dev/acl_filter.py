"""ACL filtering of list answers, entry by entry, as Consul's ``aclFilter`` does (sans-I/O).

A list endpoint is not refused: it answers with what the token may read.
Each function takes the token's :class:`~consul_dev.acl.Authorizer` and the
endpoint's result (its JSON shape) and returns ``(kept, removed)``: the
result without the entries the token may not read, and whether any was
removed (what sets ``X-Consul-Results-Filtered-By-ACLs``). The rules are
Consul's (``agent/consul/acl.go``, ``aclFilter``; ``agent/acl.go`` for the
agent's own lists):

* health/service, catalog/service: ``node:read`` on the entry's node **and**
  ``service:read`` on its service (``filterCheckServiceNodes``,
  ``filterServiceNodes``);
* health/checks, health/state, health/node: ``node:read`` on the check's node
  and, for a service check, ``service:read`` on its service (``filterHealthChecks``);
* catalog/services, agent/services: ``service:read`` on each name (``filterServices``,
  ``filterServicesWithAuthorizer``);
* agent/checks: ``service:read`` on a service check's service, ``node:read``
  on the node for a node check (``filterChecksWithAuthorizer``);
* catalog/nodes: ``node:read``; catalog/node: nothing (``null``) without
  ``node:read``, else its services filtered by ``service:read`` (``filterNodeServices``);
* session info/list/node: ``session:read`` on the session's node (``filterSessions``);
* KV ``recurse`` and ``keys``: ``key:read`` on each key (``FilterDirEnt``,
  ``FilterKeys``; ``acl.enable_key_list_policy`` is off, Consul's default).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from consul_dev.acl import Access, Authorizer, Resource

ACLFilter = Callable[[Authorizer, Any], tuple[Any, bool]]


def _readable(authz: Authorizer, resource: Resource, name: str) -> bool:
    return authz.allowed(resource, Access.READ, name)


def _service_ok(authz: Authorizer, name: str) -> bool:
    """``allowService``: a check of no service (a node check) needs no service rule."""
    return name == "" or _readable(authz, Resource.SERVICE, name)


def _keep_list(items: list[Any], keep: Callable[[Any], bool]) -> tuple[list[Any], bool]:
    kept = [item for item in items if keep(item)]
    return kept, len(kept) != len(items)


def _keep_dict(items: dict[str, Any], keep: Callable[[str, Any], bool]) -> tuple[dict[str, Any], bool]:
    kept = {k: v for k, v in items.items() if keep(k, v)}
    return kept, len(kept) != len(items)


def check_service_nodes(authz: Authorizer, entries: list[Any]) -> tuple[list[Any], bool]:
    """``/v1/health/service/<name>``: ``{Node, Service, Checks}`` entries."""
    return _keep_list(
        entries,
        lambda e: (
            _readable(authz, Resource.NODE, e["Node"]["Node"])
            and _readable(authz, Resource.SERVICE, e["Service"]["Service"])
        ),
    )


def service_nodes(authz: Authorizer, entries: list[Any]) -> tuple[list[Any], bool]:
    """``/v1/catalog/service/<name>``: flat ``{Node, ServiceName, ...}`` entries."""
    return _keep_list(
        entries,
        lambda e: _readable(authz, Resource.NODE, e["Node"]) and _readable(authz, Resource.SERVICE, e["ServiceName"]),
    )


def health_checks(authz: Authorizer, checks: list[Any]) -> tuple[list[Any], bool]:
    """``/v1/health/checks/<service>``, ``/v1/health/state/<state>``, ``/v1/health/node/<node>``."""
    return _keep_list(
        checks, lambda c: _readable(authz, Resource.NODE, c["Node"]) and _service_ok(authz, c["ServiceName"])
    )


def service_names(authz: Authorizer, names: dict[str, Any]) -> tuple[dict[str, Any], bool]:
    """``/v1/catalog/services``: service name -> tags."""
    return _keep_dict(names, lambda name, _: _readable(authz, Resource.SERVICE, name))


def agent_services(authz: Authorizer, services: dict[str, Any]) -> tuple[dict[str, Any], bool]:
    """``/v1/agent/services``: service id -> AgentService."""
    return _keep_dict(services, lambda _, s: _readable(authz, Resource.SERVICE, s["Service"]))


def agent_checks(authz: Authorizer, checks: dict[str, Any]) -> tuple[dict[str, Any], bool]:
    """``/v1/agent/checks``: check id -> HealthCheck."""

    def keep(_: str, c: Any) -> bool:
        if c["ServiceID"]:
            return _readable(authz, Resource.SERVICE, c["ServiceName"])
        return _readable(authz, Resource.NODE, c["Node"])

    return _keep_dict(checks, keep)


def nodes(authz: Authorizer, entries: list[Any]) -> tuple[list[Any], bool]:
    """``/v1/catalog/nodes``."""
    return _keep_list(entries, lambda n: _readable(authz, Resource.NODE, n["Node"]))


def node_services(authz: Authorizer, body: Any) -> tuple[Any, bool]:
    """``/v1/catalog/node/<node>``: ``{Node, Services}`` or ``null``."""
    if body is None:
        return None, False
    if not _readable(authz, Resource.NODE, body["Node"]["Node"]):
        return None, True
    services, removed = agent_services(authz, body["Services"])
    return {**body, "Services": services}, removed


def sessions(authz: Authorizer, entries: list[Any]) -> tuple[list[Any], bool]:
    """``/v1/session/info/<id>``, ``/v1/session/list``, ``/v1/session/node/<node>``."""
    return _keep_list(entries, lambda s: _readable(authz, Resource.SESSION, s["Node"]))


def kv_entries(authz: Authorizer, entries: list[Any]) -> tuple[list[Any], bool]:
    """``/v1/kv/<prefix>?recurse``."""
    return _keep_list(entries, lambda e: _readable(authz, Resource.KEY, e["Key"]))


def kv_keys(authz: Authorizer, keys: list[str]) -> tuple[list[str], bool]:
    """``/v1/kv/<prefix>?keys``."""
    return _keep_list(keys, lambda k: _readable(authz, Resource.KEY, k))
