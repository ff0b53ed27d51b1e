"""The dev agent's ACL model, without sockets: token resolution, refusals' texts, the state's lookups."""

from __future__ import annotations

import pytest

from consul_dev.acl import (
    ANONYMOUS_TOKEN_ACCESSOR_ID,
    Access,
    AccessControl,
    ACLNotFound,
    Authorizer,
    PermissionDenied,
    Resource,
    request_token,
)
from consul_dev.state import ConsulState

TOKEN = "0f6c2d1e-management"


def test_acls_off_allows_everything_whatever_the_token() -> None:
    access = AccessControl("")
    assert not access.enabled and access.default_policy == "allow"
    for token in ("", "anything"):
        assert access.resolve(token).allowed(Resource.KEY, Access.WRITE, "rtm/ring/channel")


def test_the_management_token_may_do_everything() -> None:
    access = AccessControl(TOKEN)
    assert access.enabled and access.default_policy == "deny"
    authz = access.resolve(TOKEN)
    for resource in Resource:
        for level in Access:
            assert authz.allowed(resource, level, "x")
    authz.require(Resource.SERVICE, Access.WRITE, "webapp")
    authz.require(Resource.KEY, Access.WRITE, "rtm/ring/channel")


@pytest.mark.parametrize("token", ["wrong", TOKEN + "x", TOKEN[:-1], " " + TOKEN])
def test_an_unknown_token_is_acl_not_found(token: str) -> None:
    with pytest.raises(ACLNotFound) as err:
        AccessControl(TOKEN).resolve(token)
    assert (err.value.status, str(err.value)) == (403, "ACL not found")


def test_no_token_is_the_anonymous_token_with_no_rights_under_default_deny() -> None:
    authz = AccessControl(TOKEN).resolve("")
    assert authz.anonymous and authz.accessor_id == ANONYMOUS_TOKEN_ACCESSOR_ID
    assert not authz.allowed(Resource.SERVICE, Access.READ, "gateway")
    with pytest.raises(PermissionDenied) as err:
        authz.require(Resource.SERVICE, Access.WRITE, "webapp")
    assert err.value.status == 403
    assert str(err.value) == (
        "Permission denied: anonymous token lacks permission 'service:write' on \"webapp\". "
        "The anonymous token is used implicitly when a request does not specify a token."
    )
    # KV and sessions name what is missing too (Consul >= 1.12: KeyReadAllowed, SessionWriteAllowed)
    with pytest.raises(PermissionDenied) as err:
        authz.require(Resource.KEY, Access.READ, "rtm/ring/channel")
    assert str(err.value) == (
        "Permission denied: anonymous token lacks permission 'key:read' on \"rtm/ring/channel\". "
        "The anonymous token is used implicitly when a request does not specify a token."
    )
    with pytest.raises(PermissionDenied) as err:  # a delete of the whole tree names no key
        authz.require(Resource.KEY, Access.WRITE, "")
    assert str(err.value) == (
        "Permission denied: anonymous token lacks permission 'key:write'. "
        "The anonymous token is used implicitly when a request does not specify a token."
    )


def test_a_named_token_lacking_rights_names_its_accessor() -> None:
    authz = Authorizer("b1b2c3d4-0000-0000-0000-000000000001", allow_all=False)
    with pytest.raises(PermissionDenied) as err:
        authz.require(Resource.AGENT, Access.READ, "rtm-dev")
    assert str(err.value) == (
        "Permission denied: token with AccessorID 'b1b2c3d4-0000-0000-0000-000000000001' "
        "lacks permission 'agent:read' on \"rtm-dev\""
    )


@pytest.mark.parametrize(
    ("query", "headers", "expected"),
    [
        ({}, {}, ""),
        ({"token": "q"}, {"X-Consul-Token": "h", "Authorization": "Bearer b"}, "q"),
        ({}, {"X-Consul-Token": "h", "Authorization": "Bearer b"}, "h"),
        ({}, {"Authorization": "Bearer b"}, "b"),
        ({}, {"Authorization": "Bearer  b  trailing"}, "b"),
        ({}, {"Authorization": "bearer b"}, ""),  # the scheme is case-sensitive in Consul
        ({}, {"Authorization": "Bearer"}, ""),
        ({}, {"Authorization": "Basic dXNlcjpwYXNz"}, ""),
        ({"token": ""}, {"X-Consul-Token": "h"}, "h"),
    ],
)
def test_request_token_reads_consuls_three_places_in_consuls_order(
    query: dict[str, str], headers: dict[str, str], expected: str
) -> None:
    assert request_token(query, headers) == expected


def test_state_names_what_a_service_or_check_acl_rule_applies_to() -> None:
    state = ConsulState(lambda: 1000.0)
    state.register_service({"Name": "gateway", "ID": "gw-1", "Check": {"TTL": "5s"}})
    state.register_check({"Name": "disk", "TTL": "5s"})
    assert state.agent_service_name("gw-1") == "gateway"
    assert state.agent_service_name("nope") is None
    assert state.agent_service_name("consul") is None  # catalog-only, not an agent service
    assert state.agent_check_service_name("service:gw-1") == "gateway"
    assert state.agent_check_service_name("disk") == ""  # a node check: node:write
    assert state.agent_check_service_name("nope") is None
