"""The dev agent's ACL model, without sockets: token resolution, refusals' texts, the state's lookups."""

from __future__ import annotations

import json

import pytest

from consul_dev.acl import (
    ANONYMOUS_DENY,
    ANONYMOUS_TOKEN_ACCESSOR_ID,
    Access,
    AccessControl,
    ACLNotFound,
    Authorizer,
    PermissionDenied,
    Resource,
    RulesError,
    parse_token_file,
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


def rules_token(accessor: str, rules: object, description: str = "rtm gateway") -> dict[str, object]:
    return {"AccessorID": accessor, "Description": description, "Rules": rules}


GATEWAY_RULES = {
    "service": {"gateway": {"policy": "write"}},
    "service_prefix": {"": {"policy": "read"}},
    "key_prefix": {"rtm/": {"policy": "read"}},
}


def test_a_token_with_rules_may_do_what_they_grant_and_is_named_when_refused() -> None:
    tokens = parse_token_file(json.dumps({"gw-secret": rules_token("acc-gw", GATEWAY_RULES)}))
    access = AccessControl("", tokens)
    assert access.enabled and access.default_policy == "deny"  # a tokens file alone turns ACLs on
    authz = access.resolve("gw-secret")
    assert not authz.anonymous and authz.accessor_id == "acc-gw"
    authz.require(Resource.SERVICE, Access.WRITE, "gateway")
    authz.require(Resource.KEY, Access.READ, "rtm/ring/channel")
    with pytest.raises(PermissionDenied) as err:
        authz.require(Resource.KEY, Access.WRITE, "rtm/ring/channel")
    assert str(err.value) == (
        "Permission denied: token with AccessorID 'acc-gw' lacks permission 'key:write' on \"rtm/ring/channel\""
    )
    with pytest.raises(PermissionDenied, match="'key:write' on \"rtm/\""):
        authz.require_key_write_prefix("rtm/")
    with pytest.raises(ACLNotFound):
        access.resolve("gw-secret ")
    assert access.resolve("") is ANONYMOUS_DENY


def test_management_token_and_tokens_with_rules_together() -> None:
    tokens = parse_token_file(json.dumps({"gw": rules_token("acc-gw", json.dumps(GATEWAY_RULES))}))  # Rules as text
    access = AccessControl(TOKEN, tokens)
    assert access.resolve(TOKEN).allow_all
    assert not access.resolve("gw").allowed(Resource.SERVICE, Access.WRITE, "webapp")


@pytest.mark.parametrize(
    ("doc", "error"),
    [
        ("not json", "not JSON"),
        ("[]", "must be a JSON object"),
        (json.dumps({"": rules_token("a", {})}), "SecretID must be non-empty"),
        (json.dumps({" s": rules_token("a", {})}), "without surrounding spaces"),
        (json.dumps({"s": {"Rules": {}}}), "AccessorID string"),
        (json.dumps({"s": rules_token("a", {}), "t": rules_token("a", {})}), "used twice"),
        (json.dumps({"s": rules_token(ANONYMOUS_TOKEN_ACCESSOR_ID, {})}), "reserved"),
        (json.dumps({"s": rules_token("a", {}, description=3)}), "Description must be a string"),  # type: ignore[arg-type]
        (json.dumps({"s": rules_token("a", 'key "" { policy = "read" }')}), "does not parse HCL"),
        (json.dumps({"s": rules_token("a", {"key": {"x": {"policy": "all"}}})}), "token a: key 'x': invalid"),
    ],
)
def test_a_bad_tokens_file_is_refused_with_what_is_wrong(doc: str, error: str) -> None:
    with pytest.raises(RulesError, match=error):
        parse_token_file(doc)
