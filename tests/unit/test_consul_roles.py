"""One Consul token per role for rtm up's dev agent: the rules, and the tokens file kept across restarts."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest

from consul_dev.acl import Access, AccessControl, Resource, parse_token_file
from rtmctl.consul_roles import (
    ROLES,
    TOKENS_FILE,
    TokensFileError,
    description,
    ensure_role_tokens,
    role_rules,
    role_token,
)
from services.identity import CHARM, GATEWAY, OPERATOR, SERVICES
from services.regions import REGION_MAP_KEY, drained_key
from services.ring import CHANNEL_RING_KEY, CHARM_LEADER_KEY, PRESENCE_RING_KEY

KEY, SERVICE, SESSION = Resource.KEY, Resource.SERVICE, Resource.SESSION
R, W = Access.READ, Access.WRITE
NODE = "rtm-dev"


def access(tmp_path: Path) -> tuple[AccessControl, dict[str, str]]:
    """The dev agent's view of the tokens file rtm up writes."""
    secrets = ensure_role_tokens(tmp_path)
    return AccessControl("", parse_token_file((tmp_path / TOKENS_FILE).read_text())), secrets


def test_every_role_reads_the_fleet_and_writes_only_its_own(tmp_path: Path) -> None:
    control, secrets = access(tmp_path)
    for role in ROLES:
        authz = control.resolve(secrets[role])
        for key in (CHANNEL_RING_KEY, PRESENCE_RING_KEY, CHARM_LEADER_KEY, REGION_MAP_KEY, drained_key("us-east")):
            assert authz.allowed(KEY, R, key), (role, key)
        assert not authz.allowed(KEY, R, "elsewhere/x")
        for service in SERVICES:
            assert authz.allowed(SERVICE, R, service)
            assert authz.allowed(SERVICE, W, service) == (service == role != OPERATOR), (role, service)
        writes_rings = role == CHARM
        for key in (CHANNEL_RING_KEY, PRESENCE_RING_KEY, CHARM_LEADER_KEY):
            assert authz.allowed(KEY, W, key) == writes_rings, (role, key)
        assert authz.allowed(SESSION, W, NODE) == writes_rings, role
        operates = role == OPERATOR
        for key in (REGION_MAP_KEY, drained_key("us-east")):
            assert authz.allowed(KEY, W, key) == operates, (role, key)
        assert not authz.allowed(KEY, W, "rtm/other")


def test_the_tokens_file_is_made_0600_and_kept_across_restarts(tmp_path: Path) -> None:
    old = os.umask(0)  # a mode that came from the umask would show
    try:
        first = ensure_role_tokens(tmp_path)
    finally:
        os.umask(old)
    path = tmp_path / TOKENS_FILE
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert set(first) == set(ROLES) and len(set(first.values())) == len(ROLES)
    before = path.read_text()
    assert ensure_role_tokens(tmp_path) == first
    assert path.read_text() == before  # nothing changed: not rewritten
    assert role_token(tmp_path, OPERATOR) == first[OPERATOR]
    assert role_token(tmp_path / "nowhere", OPERATOR) == ""


def test_a_restart_adds_a_missing_role_and_rewrites_changed_rules_keeping_the_secrets(tmp_path: Path) -> None:
    first = ensure_role_tokens(tmp_path)
    path = tmp_path / TOKENS_FILE
    doc = json.loads(path.read_text())
    accessor = doc[first[GATEWAY]]["AccessorID"]
    doc[first[GATEWAY]]["Rules"] = {"key_prefix": {"": {"policy": "write"}}}  # an older rule set
    del doc[first[CHARM]]
    path.write_text(json.dumps(doc))
    again = ensure_role_tokens(tmp_path)
    assert again[GATEWAY] == first[GATEWAY] and again[CHARM] != first[CHARM]
    doc = json.loads(path.read_text())
    assert doc[first[GATEWAY]] == {
        "AccessorID": accessor,
        "Description": description(GATEWAY),
        "Rules": role_rules(GATEWAY),
    }
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


@pytest.mark.parametrize("content", ["not json", "[]", '{"s": 1}'])
def test_a_file_that_is_not_a_tokens_file_is_a_clear_error(tmp_path: Path, content: str) -> None:
    (tmp_path / TOKENS_FILE).write_text(content)
    with pytest.raises(TokensFileError, match="remove it to have new tokens made"):
        ensure_role_tokens(tmp_path)
    with pytest.raises(TokensFileError):
        role_token(tmp_path, OPERATOR)


def test_unknown_role() -> None:
    with pytest.raises(ValueError, match="no Consul role 'consul-dev'"):
        role_rules("consul-dev")
