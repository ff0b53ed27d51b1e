"""The dev agent's endpoints: one handler per Consul HTTP endpoint (agent, catalog, health, KV, sessions, status).

Each handler checks the request's ACL rights, calls :class:`~consul_dev.state.ConsulState`
and shapes the reply; the request pipeline around them (routing, query options,
blocking, errors, headers, metrics) is :class:`~consul_dev.app.ConsulDevAgent`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, generate_latest

from consul_dev import acl_filter
from consul_dev.acl import Access, Resource, Rule
from consul_dev.acl_filter import ACLFilter
from consul_dev.definitions import decode_check_definition, decode_service_definition, service_check_ids
from consul_dev.errors import InvalidRequest, NotFound, RequestTooLarge
from consul_dev.node import (
    DATACENTER,
    HEALTH_CRITICAL,
    HEALTH_PASSING,
    HEALTH_WARNING,
    KV_MAX_VALUE_BYTES,
    NODE_NAME,
    SERF_CHECK_ID,
)
from consul_dev.request import (
    ACL_FILTERED_KEY,
    FILTERED_BY_ACLS_HEADER,
    TEXT_CONTENT_TYPE,
    Reply,
    Route,
    authorizer_of,
    bool_param,
    json_reply,
    parse_uint,
    read_json_body,
    refuse_conflicting_flags,
)
from consul_dev.state import ConsulState

T = TypeVar("T")


class ConsulEndpoints:
    """The handlers, over the agent's state; :class:`~consul_dev.app.ConsulDevAgent` serves them."""

    state: ConsulState
    registry: CollectorRegistry
    _acl_filtered: Counter

    async def blocking(self, request: web.Request, query: Callable[[], tuple[int, T]]) -> tuple[int, T]:
        """Run ``query`` as a blocking query (the agent defines it)."""
        raise NotImplementedError

    async def _blocking_json(self, request: web.Request, query: Callable[[], tuple[int, Any]], acl: ACLFilter) -> Reply:
        """A list endpoint's reply: ``query`` run as a blocking query, its result filtered by
        ``acl`` for the request's token, as JSON at the query's index."""
        index, body = await self.blocking(request, query)
        return self._filtered_json(request, body, acl, index=index)

    def _acl_filter(self, request: web.Request, body: T, acl: ACLFilter) -> tuple[T, dict[str, str]]:
        """``body`` without what the token may not read, and the headers that say so.

        ``X-Consul-Results-Filtered-By-ACLs: true`` when something was removed, but
        not for the anonymous token (Consul masks it: ``maskResultsFilteredByACLs``).
        """
        request[ACL_FILTERED_KEY] = True
        authz = authorizer_of(request)
        if authz.allow_all:
            return body, {}
        kept, removed = acl(authz, body)
        if not removed:
            return kept, {}
        self._acl_filtered.inc()
        return kept, {} if authz.anonymous else {FILTERED_BY_ACLS_HEADER: "true"}

    def _filtered_json(self, request: web.Request, body: Any, acl: ACLFilter, *, index: int | None = None) -> Reply:
        kept, headers = self._acl_filter(request, body, acl)
        reply = json_reply(request, kept, index=index)
        reply.headers.update(headers)
        return reply

    def routes(self) -> list[Route]:
        """Every endpoint the agent serves, with its methods and how queries and ACLs apply."""
        get, put = ("GET",), ("PUT",)
        filtered, open_ = Rule.FILTER, Rule.OPEN
        return [
            Route("/v1/agent/self", get, self.agent_self),
            Route("/v1/agent/services", get, self.agent_services, filterable=True, acl=filtered),
            Route("/v1/agent/service/register", put, self.agent_service_register),
            Route("/v1/agent/service/deregister/", put, self.agent_service_deregister),
            Route("/v1/agent/service/", get, self.agent_service),
            Route("/v1/agent/checks", get, self.agent_checks, filterable=True, acl=filtered),
            Route("/v1/agent/check/register", put, self.agent_check_register),
            Route("/v1/agent/check/deregister/", put, self.agent_check_deregister),
            Route("/v1/agent/check/pass/", put, self.agent_check_pass),
            Route("/v1/agent/check/warn/", put, self.agent_check_warn),
            Route("/v1/agent/check/fail/", put, self.agent_check_fail),
            Route("/v1/agent/check/update/", put, self.agent_check_update),
            Route("/v1/catalog/datacenters", get, self.catalog_datacenters, acl=open_),
            Route("/v1/catalog/nodes", get, self.catalog_nodes, query=True, filterable=True, acl=filtered),
            Route("/v1/catalog/node/", get, self.catalog_node, query=True, filterable=True, acl=filtered),
            Route("/v1/catalog/services", get, self.catalog_services, query=True, filterable=True, acl=filtered),
            Route("/v1/catalog/service/", get, self.catalog_service, query=True, filterable=True, acl=filtered),
            Route("/v1/health/service/", get, self.health_service, query=True, filterable=True, acl=filtered),
            Route("/v1/health/checks/", get, self.health_checks, query=True, filterable=True, acl=filtered),
            Route("/v1/health/state/", get, self.health_state, query=True, filterable=True, acl=filtered),
            Route("/v1/health/node/", get, self.health_node, query=True, filterable=True, acl=filtered),
            Route("/v1/kv/", ("GET", "PUT", "DELETE"), self.kv, query=True),
            Route("/v1/session/create", put, self.session_create, query=True),
            Route("/v1/session/destroy/", put, self.session_destroy, query=True),
            Route("/v1/session/renew/", put, self.session_renew, query=True),
            Route("/v1/session/info/", get, self.session_info, query=True, acl=filtered),
            Route("/v1/session/list", get, self.session_list, query=True, acl=filtered),
            Route("/v1/session/node/", get, self.session_node, query=True, acl=filtered),
            # Consul's Status endpoints resolve no token: open under default deny too.
            Route("/v1/status/leader", get, self.status_leader, acl=open_),
            Route("/v1/status/peers", get, self.status_peers, acl=open_),
            # rtm's own, not Consul's: liveness and the agent's request counters, no Consul data.
            Route("/healthz", get, self.healthz, acl=open_),
            Route("/metrics", get, self.metrics, acl=open_),
        ]

    def _require_check_write(self, request: web.Request, check_id: str) -> None:
        """``service:write`` on the check's service, or ``node:write`` for a node check (unknown: no-op)."""
        owner = self.state.agent_check_service_name(check_id)
        if owner is None:
            return  # the state answers Consul's 404
        if owner:
            authorizer_of(request).require(Resource.SERVICE, Access.WRITE, owner)
        else:
            authorizer_of(request).require(Resource.NODE, Access.WRITE, NODE_NAME)

    # ---- agent ------------------------------------------------------------------
    async def agent_self(self, request: web.Request, tail: str) -> Reply:
        authorizer_of(request).require(Resource.AGENT, Access.READ, NODE_NAME)
        return json_reply(request, self.state.agent_self())

    async def agent_services(self, request: web.Request, tail: str) -> Reply:
        return self._filtered_json(request, self.state.agent_services(), acl_filter.agent_services)

    async def agent_service(self, request: web.Request, tail: str) -> Reply:
        name = self.state.agent_service_name(tail)
        if name is not None:
            authorizer_of(request).require(Resource.SERVICE, Access.READ, name)
        body = self.state.agent_service(tail)
        if body is None:
            raise NotFound(f"unknown service ID: {tail}")
        reply = json_reply(request, body)
        reply.headers["X-Consul-ContentHash"] = body["ContentHash"]
        return reply

    async def agent_service_register(self, request: web.Request, tail: str) -> Reply:
        raw = await read_json_body(request)
        definition = decode_service_definition(raw)
        authorizer_of(request).require(Resource.SERVICE, Access.WRITE, definition.name)
        existing = self.state.agent_service_name(definition.id)
        if existing is not None:  # the registration it would overwrite
            authorizer_of(request).require(Resource.SERVICE, Access.WRITE, existing)
        for check_id in service_check_ids(definition):  # a check it would take from another service or the node
            if check_id == SERF_CHECK_ID:  # the node's own (sessions hang on it): node:write
                authorizer_of(request).require(Resource.NODE, Access.WRITE, NODE_NAME)
            self._require_check_write(request, check_id)
        flag = request.query.getall("replace-existing-checks", [])
        replace_checks = bool(flag) and flag[0] in ("", "true")
        self.state.register_service(raw, replace_existing_checks=replace_checks)
        return Reply()

    async def agent_service_deregister(self, request: web.Request, tail: str) -> Reply:
        name = self.state.agent_service_name(tail)
        if name is not None:
            authorizer_of(request).require(Resource.SERVICE, Access.WRITE, name)
        self.state.deregister_service(tail)
        return Reply()

    async def agent_checks(self, request: web.Request, tail: str) -> Reply:
        return self._filtered_json(request, self.state.agent_checks(), acl_filter.agent_checks)

    async def agent_check_register(self, request: web.Request, tail: str) -> Reply:
        raw = await read_json_body(request)
        definition = decode_check_definition(raw)
        service = self.state.agent_service_name(definition.service_id) if definition.service_id else None
        if service:
            authorizer_of(request).require(Resource.SERVICE, Access.WRITE, service)
        else:
            authorizer_of(request).require(Resource.NODE, Access.WRITE, NODE_NAME)
        self._require_check_write(request, definition.check_id)
        self.state.register_check(raw)
        return Reply()

    async def agent_check_deregister(self, request: web.Request, tail: str) -> Reply:
        self._require_check_write(request, tail)
        self.state.deregister_check(tail)
        return Reply()

    async def _ttl_update(self, request: web.Request, check_id: str, status: str) -> Reply:
        self._require_check_write(request, check_id)
        self.state.update_ttl_check(check_id, status, request.query.get("note", ""))
        return Reply()

    async def agent_check_pass(self, request: web.Request, tail: str) -> Reply:
        return await self._ttl_update(request, tail, HEALTH_PASSING)

    async def agent_check_warn(self, request: web.Request, tail: str) -> Reply:
        return await self._ttl_update(request, tail, HEALTH_WARNING)

    async def agent_check_fail(self, request: web.Request, tail: str) -> Reply:
        return await self._ttl_update(request, tail, HEALTH_CRITICAL)

    async def agent_check_update(self, request: web.Request, tail: str) -> Reply:
        raw = await read_json_body(request)
        self._require_check_write(request, tail)
        self.state.update_check(tail, raw)
        return Reply()

    # ---- catalog and health --------------------------------------------------------
    async def catalog_datacenters(self, request: web.Request, tail: str) -> Reply:
        return json_reply(request, [DATACENTER])

    async def catalog_nodes(self, request: web.Request, tail: str) -> Reply:
        node_meta = request.query.getall("node-meta", [])
        return await self._blocking_json(
            request, lambda: self.state.catalog_nodes(node_meta=node_meta), acl_filter.nodes
        )

    async def catalog_node(self, request: web.Request, tail: str) -> Reply:
        _require_name(tail, "Missing node name")
        return await self._blocking_json(request, lambda: self.state.catalog_node(tail), acl_filter.node_services)

    async def catalog_services(self, request: web.Request, tail: str) -> Reply:
        node_meta = request.query.getall("node-meta", [])
        return await self._blocking_json(
            request, lambda: self.state.catalog_services(node_meta=node_meta), acl_filter.service_names
        )

    async def catalog_service(self, request: web.Request, tail: str) -> Reply:
        _require_name(tail, "Missing service name")
        tags = request.query.getall("tag", [])
        node_meta = request.query.getall("node-meta", [])
        return await self._blocking_json(
            request, lambda: self.state.catalog_service(tail, tags=tags, node_meta=node_meta), acl_filter.service_nodes
        )

    async def health_service(self, request: web.Request, tail: str) -> Reply:
        _require_name(tail, "Missing service name")
        passing = bool_param(request.query, "passing")
        tags = request.query.getall("tag", [])
        node_meta = request.query.getall("node-meta", [])
        return await self._blocking_json(
            request,
            lambda: self.state.health_service(tail, passing=passing, tags=tags, node_meta=node_meta),
            acl_filter.check_service_nodes,
        )

    async def health_checks(self, request: web.Request, tail: str) -> Reply:
        _require_name(tail, "Missing service name")
        node_meta = request.query.getall("node-meta", [])
        return await self._blocking_json(
            request, lambda: self.state.health_checks(tail, node_meta=node_meta), acl_filter.health_checks
        )

    async def health_state(self, request: web.Request, tail: str) -> Reply:
        _require_name(tail, "Missing check state")
        node_meta = request.query.getall("node-meta", [])
        return await self._blocking_json(
            request, lambda: self.state.health_state(tail, node_meta=node_meta), acl_filter.health_checks
        )

    async def health_node(self, request: web.Request, tail: str) -> Reply:
        _require_name(tail, "Missing node name")
        return await self._blocking_json(request, lambda: self.state.health_node(tail), acl_filter.health_checks)

    # ---- KV -----------------------------------------------------------------------
    async def kv(self, request: web.Request, key: str) -> Reply:
        query = request.query
        if request.method == "GET":
            return await self._kv_get(request, key)
        if request.method == "PUT":
            if key == "":
                raise InvalidRequest("Missing key name")
            refuse_conflicting_flags(query, "cas", "acquire", "release")
            flags = parse_uint(query.get("flags", "")) if "flags" in query else 0
            cas = parse_uint(query.get("cas", "")) if "cas" in query else None
            acquire = query.get("acquire", "") if "acquire" in query else None
            release = query.get("release", "") if "release" in query else None
            length = request.content_length or 0
            if length > KV_MAX_VALUE_BYTES:  # the HTTP layer's check, before the RPC that resolves ACLs
                raise RequestTooLarge(
                    f"Request body({length} bytes) too large, max size: {KV_MAX_VALUE_BYTES} bytes. "
                    "See https://developer.hashicorp.com/docs/agent/config/config-files#kv_max_value_size."
                )
            authorizer_of(request).require(Resource.KEY, Access.WRITE, key)
            value = await request.read()
            done = self.state.kv_put(key, value, flags=flags, cas=cas, acquire=acquire, release=release)
            return json_reply(request, done)
        refuse_conflicting_flags(query, "recurse", "cas")
        recurse = "recurse" in query
        if not recurse and key == "":
            raise InvalidRequest("Missing key name")
        cas = parse_uint(query.get("cas", "")) if "cas" in query else None
        if recurse:  # KeyWritePrefix: write on the prefix and on every rule under it
            authorizer_of(request).require_key_write_prefix(key)
        else:
            authorizer_of(request).require(Resource.KEY, Access.WRITE, key)
        return json_reply(request, self.state.kv_delete(key, recurse=recurse, cas=cas))

    async def _kv_get(self, request: web.Request, key: str) -> Reply:
        query = request.query
        if "keys" in query:
            # A list is filtered key by key (FilterKeys), not refused; nothing left is 404 as for no keys,
            # but at the root, where Consul's KVSGetKeys answers an empty list instead.
            separator = query.get("separator", query.get("seperator", ""))  # Consul accepts its old misspelling
            index, keys = await self.blocking(request, lambda: self.state.kv_keys(key, separator))
            kept, headers = self._acl_filter(request, keys or [], acl_filter.kv_keys)
            if not kept and key != "":
                return Reply(404, b"", TEXT_CONTENT_TYPE, index, headers)
            reply = json_reply(request, kept, index=index)
            reply.headers.update(headers)
            return reply
        if "recurse" in query:
            index, entries = await self.blocking(request, lambda: self.state.kv_list(key))
            kept, headers = self._acl_filter(request, entries, acl_filter.kv_entries)
            if not kept:
                return Reply(404, b"", TEXT_CONTENT_TYPE, index, headers)
            reply = json_reply(request, kept, index=index)
            reply.headers.update(headers)
            return reply
        if key == "":
            raise InvalidRequest("Missing key name")
        authorizer_of(request).require(Resource.KEY, Access.READ, key)  # before blocking, as Consul's Get
        index, entries = await self.blocking(request, lambda: self.state.kv_get(key))
        if not entries:
            return Reply(404, b"", TEXT_CONTENT_TYPE, index)
        if "raw" in query:
            _, value = self.state.kv_raw(key)
            headers = {"X-Content-Type-Options": "nosniff", "Content-Security-Policy": "sandbox"}
            return Reply(200, value or b"", "text/plain", index, headers)
        return json_reply(request, entries, index=index)

    # ---- sessions ------------------------------------------------------------------
    def _require_session_write(self, request: web.Request, session_id: str) -> None:
        """``session:write`` on the node of an existing session; nothing for an unknown one.

        As Consul's ``Session.Apply`` (destroy) and ``Session.Renew``: the session is looked
        up first, so an unknown id gets the state's answer (destroy: ``true``, renew: 404),
        not a refusal, whatever the (resolved) token.
        """
        if self.state.session_info(session_id)[1]:
            authorizer_of(request).require(Resource.SESSION, Access.WRITE, NODE_NAME)

    async def session_create(self, request: web.Request, tail: str) -> Reply:
        authorizer_of(request).require(Resource.SESSION, Access.WRITE, NODE_NAME)
        raw = await read_json_body(request) if await request.read() else None
        return json_reply(request, {"ID": self.state.session_create(raw)})

    async def session_destroy(self, request: web.Request, tail: str) -> Reply:
        _require_name(tail, "Missing session")
        self._require_session_write(request, tail)
        self.state.session_destroy(tail)
        return json_reply(request, True)

    async def session_renew(self, request: web.Request, tail: str) -> Reply:
        _require_name(tail, "Missing session")
        self._require_session_write(request, tail)
        return json_reply(request, self.state.session_renew(tail))

    async def session_info(self, request: web.Request, tail: str) -> Reply:
        _require_name(tail, "Missing session")
        return await self._blocking_json(request, lambda: self.state.session_info(tail), acl_filter.sessions)

    async def session_list(self, request: web.Request, tail: str) -> Reply:
        return await self._blocking_json(request, self.state.session_list, acl_filter.sessions)

    async def session_node(self, request: web.Request, tail: str) -> Reply:
        _require_name(tail, "Missing node name")
        return await self._blocking_json(request, lambda: self.state.session_node(tail), acl_filter.sessions)

    # ---- status and rtm's own endpoints ---------------------------------------------
    async def status_leader(self, request: web.Request, tail: str) -> Reply:
        return json_reply(request, self.state.leader())

    async def status_peers(self, request: web.Request, tail: str) -> Reply:
        return json_reply(request, [self.state.leader()])

    async def healthz(self, request: web.Request, tail: str) -> Reply:
        return json_reply(request, {"ok": True})

    async def metrics(self, request: web.Request, tail: str) -> Reply:
        return Reply(200, generate_latest(self.registry), CONTENT_TYPE_LATEST)


def _require_name(tail: str, missing: str) -> None:
    """The name a prefix route needs after its prefix; Consul's 400 ``missing`` without it."""
    if not tail:
        raise InvalidRequest(missing)
