"""Consul's ACL rule matching, without sockets: exact over prefix, longest prefix, deny, read vs write."""

from __future__ import annotations

from typing import Any

import pytest

from consul_dev.acl_rules import Access, Level, Resource, RulesError, RuleSet, grants, parse_rules
from rtmctl.consul_roles import role_rules
from services.identity import CHARM, OPERATOR
from services.regions import REGION_MAP_KEY
from services.ring import CHARM_LEADER_KEY

KEY, SERVICE, SESSION, NODE = Resource.KEY, Resource.SERVICE, Resource.SESSION, Resource.NODE
R, W = Access.READ, Access.WRITE

# The example of Consul's ACL rules reference, plus an exact rule under a denied prefix.
REFERENCE = {
    "key_prefix": {"": {"policy": "read"}, "foo/": {"policy": "write"}, "foo/private/": {"policy": "deny"}},
    "key": {"foo/bar/secret": {"policy": "deny"}, "foo/private/open": {"policy": "read"}},
}


@pytest.mark.parametrize(
    ("key", "read", "write"),
    [
        ("anything", True, False),  # key_prefix "" read
        ("", True, False),
        ("foo/x", True, True),  # the longer prefix "foo/" write wins over "" read
        ("foo/", True, True),
        ("foo", True, False),  # "foo" does not start with "foo/": only "" applies
        ("foo/private/x", False, False),  # the longest prefix, deny
        ("foo/bar/secret", False, False),  # exact deny over prefix write
        ("foo/bar/secret2", True, True),  # an exact rule is for that key only
        ("foo/private/open", True, False),  # exact read over the longer prefix deny
    ],
)
def test_exact_rule_wins_then_longest_prefix(key: str, read: bool, write: bool) -> None:
    rules = parse_rules(REFERENCE)
    assert (rules.allows(KEY, R, key), rules.allows(KEY, W, key)) == (read, write)


def test_no_rule_is_the_default_policy_deny() -> None:
    rules = parse_rules({"key_prefix": {"rtm/": {"policy": "write"}}})
    assert not rules.allows(KEY, R, "other/x")
    assert not rules.allows(SERVICE, R, "webapp")  # no service rule at all
    assert not RuleSet().allows(KEY, R, "")


def test_resources_do_not_leak_into_each_other() -> None:
    rules = parse_rules({"service": {"gateway": {"policy": "write"}}, "node_prefix": {"": {"policy": "read"}}})
    assert rules.allows(SERVICE, W, "gateway") and not rules.allows(SERVICE, W, "gateway-2")
    assert not rules.allows(SERVICE, R, "webapp")
    assert rules.allows(NODE, R, "rtm-dev") and not rules.allows(NODE, W, "rtm-dev")
    assert not rules.allows(KEY, R, "gateway") and not rules.allows(SESSION, R, "rtm-dev")


@pytest.mark.parametrize(
    ("level", "read", "write"),
    [(Level.READ, True, False), (Level.LIST, True, False), (Level.WRITE, True, True), (Level.DENY, False, False)],
)
def test_what_each_disposition_grants(level: Level, read: bool, write: bool) -> None:
    assert (grants(level, R), grants(level, W)) == (read, write)


def test_precedence_order_and_exact_and_prefix_rules_on_one_segment() -> None:
    # Consul's takesPrecedenceOver, for one segment named twice: deny > write > list > read
    assert Level.DENY > Level.WRITE > Level.LIST > Level.READ
    # an exact and a prefix rule on the same segment: exact for that key, the prefix for the rest
    rules = parse_rules({"key": {"a": {"policy": "write"}}, "key_prefix": {"a": {"policy": "deny"}}})
    assert rules.allows(KEY, W, "a") and not rules.allows(KEY, R, "ab")


def test_key_write_prefix_needs_write_on_every_rule_under_the_prefix() -> None:
    rules = parse_rules(REFERENCE)
    assert rules.allows_key_write_prefix("foo/bar/x/")  # foo/ write, nothing below denies
    assert not rules.allows_key_write_prefix("foo/")  # foo/private/ and foo/bar/secret under it
    assert not rules.allows_key_write_prefix("foo/bar/")  # the exact deny on foo/bar/secret
    assert not rules.allows_key_write_prefix("")  # "" is only read
    charm = parse_rules({"key_prefix": {"rtm/": {"policy": "read"}, "rtm/ring/": {"policy": "write"}}})
    assert charm.allows_key_write_prefix("rtm/ring/") and not charm.allows_key_write_prefix("rtm/")


def test_key_write_prefix_takes_no_exact_rule_for_the_prefix() -> None:
    """Consul's KeyWritePrefix reads the longest *prefix* rule on the path only: an exact rule
    covers its one key, while a recursive delete of that name takes every key starting with it."""
    operator = parse_rules(role_rules(OPERATOR))  # key_prefix "rtm/" read, key "rtm/regions/map" write
    assert operator.allows(KEY, W, REGION_MAP_KEY)  # the key itself: written, deleted
    assert not operator.allows(KEY, W, REGION_MAP_KEY + "-old")
    assert not operator.allows_key_write_prefix(REGION_MAP_KEY)  # would delete rtm/regions/map-old too
    charm = parse_rules(role_rules(CHARM))
    assert charm.allows(KEY, W, CHARM_LEADER_KEY) and not charm.allows_key_write_prefix(CHARM_LEADER_KEY)
    assert charm.allows_key_write_prefix("rtm/ring/")  # a prefix rule of its own: as before
    # an exact write beside a prefix write on the same name: the prefix rule decides
    assert parse_rules(
        {"key_prefix": {"a": {"policy": "write"}}, "key": {"a": {"policy": "write"}}}
    ).allows_key_write_prefix("a")


@pytest.mark.parametrize(
    ("doc", "error"),
    [
        ([], "rules must be a JSON object"),
        ({"acl": "write"}, "unsupported rule block 'acl'"),
        ({"operator": {"": {"policy": "read"}}}, "unsupported rule block 'operator'"),
        ({"key": ["a"]}, "key: must map segments"),
        ({"key": {"a": "write"}}, "key 'a': must be"),
        ({"key": {"a": {"policy": "write", "extra": 1}}}, "key 'a': must be"),
        ({"key": {"a": {"policy": "admin"}}}, "key 'a': invalid policy 'admin'"),
        ({"key": {"a": {"policy": 3}}}, "key 'a': invalid policy 3"),
    ],
)
def test_bad_rules_are_refused_with_what_is_wrong(doc: Any, error: str) -> None:
    with pytest.raises(RulesError, match=error.replace("(", r"\(").replace("[", r"\[")):
        parse_rules(doc)
