"""ACL filtering of list answers, entry by entry, on the shapes the dev agent's state produces."""

from __future__ import annotations

from consul_dev import acl_filter
from consul_dev.acl import ALLOW_ALL, ANONYMOUS_DENY, Authorizer
from consul_dev.acl_rules import parse_rules
from consul_dev.node import NODE_NAME
from consul_dev.state import ConsulState

READ = {"policy": "read"}


def token(rules: dict[str, object]) -> Authorizer:
    return Authorizer("acc", allow_all=False, rules=parse_rules(rules))


def fleet_state() -> ConsulState:
    state = ConsulState(lambda: 1000.0)
    state.register_service({"Name": "gateway", "ID": "gw-1", "Check": {"TTL": "5s", "Status": "passing"}})
    state.register_service({"Name": "webapp", "ID": "web-1", "Check": {"TTL": "5s", "Status": "passing"}})
    state.register_check({"Name": "disk", "TTL": "5s"})
    state.kv_put("rtm/ring/channel", b"{}")
    state.kv_put("rtm/regions/map", b"{}")
    state.kv_put("other/secret", b"x")
    state.session_create(None)
    return state


SEES_GATEWAY = token({"service": {"gateway": READ}, "node_prefix": {"": READ}})
NO_NODE = token({"service_prefix": {"": READ}})


def test_health_and_catalog_entries_need_node_and_service_read() -> None:
    state = fleet_state()
    _, gateway = state.health_service("gateway")
    _, webapp = state.health_service("webapp")
    assert acl_filter.check_service_nodes(SEES_GATEWAY, gateway) == (gateway, False)
    assert acl_filter.check_service_nodes(SEES_GATEWAY, webapp) == ([], True)
    assert acl_filter.check_service_nodes(NO_NODE, gateway) == ([], True)  # the node's read is needed too
    _, flat = state.catalog_service("gateway")
    assert acl_filter.service_nodes(SEES_GATEWAY, flat) == (flat, False)
    assert acl_filter.service_nodes(NO_NODE, flat) == ([], True)


def test_checks_need_node_read_and_service_read_for_a_service_check() -> None:
    state = fleet_state()
    _, checks = state.health_node(NODE_NAME)
    kept, removed = acl_filter.health_checks(SEES_GATEWAY, checks)
    assert removed and {c["CheckID"] for c in kept} == {"serfHealth", "disk", "service:gw-1"}
    assert acl_filter.health_checks(NO_NODE, checks) == ([], True)
    agent_kept, removed = acl_filter.agent_checks(SEES_GATEWAY, state.agent_checks())
    assert removed and set(agent_kept) == {"disk", "service:gw-1"}


def test_service_maps_node_and_sessions() -> None:
    state = fleet_state()
    _, names = state.catalog_services()
    assert acl_filter.service_names(SEES_GATEWAY, names) == ({"gateway": names["gateway"]}, True)
    kept, removed = acl_filter.agent_services(SEES_GATEWAY, state.agent_services())
    assert removed and list(kept) == ["gw-1"]
    _, nodes = state.catalog_nodes()
    assert acl_filter.nodes(SEES_GATEWAY, nodes) == (nodes, False)
    assert acl_filter.nodes(NO_NODE, nodes) == ([], True)
    _, node = state.catalog_node(NODE_NAME)
    kept, removed = acl_filter.node_services(SEES_GATEWAY, node)
    assert removed and list(kept["Services"]) == ["gw-1"] and kept["Node"] == node["Node"]
    assert acl_filter.node_services(NO_NODE, node) == (None, True)
    assert acl_filter.node_services(NO_NODE, None) == (None, False)
    _, sessions = state.session_list()
    assert len(sessions) == 1
    assert acl_filter.sessions(token({"session_prefix": {"": READ}}), sessions) == (sessions, False)
    assert acl_filter.sessions(token({"session": {"elsewhere": READ}}), sessions) == ([], True)


def test_kv_lists_are_filtered_key_by_key() -> None:
    state = fleet_state()
    rtm_only = token({"key_prefix": {"rtm/": READ}})
    _, entries = state.kv_list("")
    kept, removed = acl_filter.kv_entries(rtm_only, entries)
    assert removed and [e["Key"] for e in kept] == ["rtm/regions/map", "rtm/ring/channel"]
    _, keys = state.kv_keys("")
    assert acl_filter.kv_keys(rtm_only, keys or []) == (["rtm/regions/map", "rtm/ring/channel"], True)
    one_key = token({"key": {"rtm/ring/channel": READ}})  # an exact rule reads that key in a list too
    assert acl_filter.kv_keys(one_key, keys or []) == (["rtm/ring/channel"], True)


def test_management_reads_everything_and_the_anonymous_token_nothing() -> None:
    state = fleet_state()
    _, entries = state.health_service("gateway")
    assert acl_filter.check_service_nodes(ALLOW_ALL, entries) == (entries, False)
    assert acl_filter.check_service_nodes(ANONYMOUS_DENY, entries) == ([], True)
