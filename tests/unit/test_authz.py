"""The role table: every (server, sender role, op) decision, and the gw claim."""

from __future__ import annotations

import pytest

from services.authz import PERMISSIONS, Authorizer, typing_json
from services.identity import (
    ADMIN_SERVER,
    CHANNEL_SERVER,
    CHARM,
    GATEWAY,
    OPERATOR,
    PRESENCE,
    SERVICES,
    WEBAPP,
    PeerIdentity,
)

ALL_OPS = ("pub", "sub", "unsub", "ping", "lease", "release", "query", "online", "offline", "psub", "punsub")
ALL_OPS += ("synced", "get_presence", "set_presence", "ring_add_slot", "ring_remove_slot", "moved", "ev", "seqs")
ALL_OPS += ("pubs",)
TYPING = typing_json("C1", "U1")
ALLOWED = {
    (ADMIN_SERVER, WEBAPP): {"pub", "pubs"},
    (CHANNEL_SERVER, ADMIN_SERVER): {"pub", "pubs"},
    (CHANNEL_SERVER, GATEWAY): {"sub", "unsub", "seqs", "pub"},  # pub: transient only, below; never pubs
    (PRESENCE, GATEWAY): {"lease", "release", "query", "online", "offline", "psub", "punsub", "synced"},
    (PRESENCE, WEBAPP): {"get_presence", "set_presence"},
    (CHARM, OPERATOR): {"ring_add_slot", "ring_remove_slot"},
}


@pytest.mark.parametrize("server", [ADMIN_SERVER, CHANNEL_SERVER, PRESENCE, CHARM])
@pytest.mark.parametrize("role", SERVICES)
def test_the_table_allows_exactly_what_docs_trust_says(server: str, role: str) -> None:
    authz = Authorizer(server, enforcing=True)
    me = PeerIdentity(role, "i-1")
    for op in ALL_OPS:
        msg = {"op": op, "gw": "i-1", "seq": None, "ch": "C1", "ctl": {"from": "U1"}, "json": TYPING}
        allowed = op == "ping" or op in ALLOWED.get((server, role), set())
        assert (authz.check(me, msg) is None) == allowed, (server, role, op)


def test_a_gateway_publishes_only_transient_events() -> None:
    authz = Authorizer(CHANNEL_SERVER, enforcing=True)
    gw = PeerIdentity(GATEWAY, "gw-1")
    assert authz.check(gw, {"op": "pub", "ch": "C1", "seq": None, "ctl": {"from": "U1"}, "json": TYPING}) is None
    assert authz.check(gw, {"op": "pub", "ch": "C1", "ctl": {"from": "U1"}, "json": TYPING}) is None
    refusal = authz.check(gw, {"op": "pub", "ch": "C1", "seq": 7})
    assert refusal is not None and "transient" in refusal.detail
    assert authz.check(PeerIdentity(ADMIN_SERVER, "as-0"), {"op": "pub", "seq": 7}) is None


def test_a_gateways_transient_event_carries_no_join_or_leave() -> None:
    """A join or leave in ``ctl`` on a user's channel makes every gateway holding it subscribe that
    user's connections to the named channel (gateway/history.py ``apply_ctl``): with a transient
    pub, one gateway's certificate could have every other gateway stream a private channel to
    any user. Only the webapp's persisted events carry them; a gateway's typing carries ``from``."""
    authz = Authorizer(CHANNEL_SERVER, enforcing=True)
    gw = PeerIdentity(GATEWAY, "gw-1")
    assert authz.check(gw, {"op": "pub", "ch": "C1", "seq": None, "ctl": {"from": "U1"}, "json": TYPING}) is None
    for ctl in ({"join": "C9", "since": 0}, {"leave": "C9"}, {"from": "U1", "join": "C9"}, "x"):
        refusal = authz.check(gw, {"op": "pub", "ch": "U1", "seq": None, "ctl": ctl})
        assert refusal is not None and "ctl" in refusal.detail, ctl
    admin = PeerIdentity(ADMIN_SERVER, "as-0")
    assert authz.check(admin, {"op": "pub", "ch": "U1", "seq": 3, "ctl": {"join": "C9", "since": 0}}) is None


@pytest.mark.parametrize(
    "json,ctl",
    [
        (b'{"type":"message","channel":"C1","user":"U1","text":"from the CEO","ts":"1.000001"}', {"from": "U1"}),
        (typing_json("C2", "U1"), {"from": "U1"}),  # another channel's
        (typing_json("C1", "U2"), {"from": "U1"}),  # another user's than the one its sockets skip
        (b'{"type": "user_typing", "channel": "C1", "user": "U1", "x": 1}', {"from": "U1"}),
        (TYPING, None),  # no ctl.from
        (None, {"from": "U1"}),
    ],
)
def test_a_gateway_publishes_nothing_but_a_typing_indicator(json: bytes | None, ctl: object) -> None:
    """A transient pub goes to every gateway's clients of the channel: with any payload, one gateway's
    certificate could have put a message "from" anyone before every member on every gateway (the
    red-team run did, from gw-eu-west-0's certificate to a client of gw-us-east-0)."""
    authz = Authorizer(CHANNEL_SERVER, enforcing=True)
    refusal = authz.check(
        PeerIdentity(GATEWAY, "gw-1"), {"op": "pub", "ch": "C1", "seq": None, "json": json, "ctl": ctl}
    )
    assert refusal is not None and "user_typing" in refusal.detail
    admin = PeerIdentity(ADMIN_SERVER, "as-0")  # the fleet's persisted events carry any payload
    assert authz.check(admin, {"op": "pub", "ch": "C1", "seq": 3, "json": json}) is None


@pytest.mark.parametrize("server,op", [(CHANNEL_SERVER, "sub"), (PRESENCE, "online"), (PRESENCE, "release")])
def test_a_gateway_speaks_only_as_its_own_id(server: str, op: str) -> None:
    authz = Authorizer(server, enforcing=True)
    assert authz.check(PeerIdentity(GATEWAY, "gw-1"), {"op": op, "gw": "gw-1"}) is None
    refusal = authz.check(PeerIdentity(GATEWAY, "gw-1"), {"op": op, "gw": "gw-2"})
    assert refusal is not None and "gw-2" in refusal.detail


def test_refusals_answer_forbidden_and_are_counted() -> None:
    counted: list[str] = []
    authz = Authorizer(CHARM, enforcing=True, count=counted.append)
    refusal = authz.check(PeerIdentity(GATEWAY, "gw-1"), {"op": "ring_add_slot"})
    assert refusal is not None
    assert authz.refuse(refusal, 5) == {"op": "err", "id": 5, "code": "forbidden", "detail": refusal.detail}
    assert authz.refuse(refusal, None) is None  # a push: no reply
    assert counted == ["forbidden", "forbidden"]


def test_no_identity_is_refused_and_off_checks_nothing() -> None:
    assert Authorizer(ADMIN_SERVER, enforcing=True).check(None, {"op": "ping"}) is not None
    assert Authorizer(ADMIN_SERVER, enforcing=False).check(None, {"op": "pub"}) is None


def test_every_server_in_the_table_is_a_service() -> None:
    assert set(PERMISSIONS) <= set(SERVICES)
    for rules in PERMISSIONS.values():
        assert set(rules) <= set(SERVICES)


def test_the_table_agrees_with_the_op_tables_senders() -> None:
    """services/ops.py declares who sends each op; every grant here is one of those, and every
    server-bound op's sender has a grant somewhere (so a new op cannot be forgotten here)."""
    import inspect

    from services import ops

    granted: dict[str, set[str]] = {}
    for rules in PERMISSIONS.values():
        for role, names in rules.items():
            for name in names:
                granted.setdefault(name.split(":")[0], set()).add(role)
    declared = {
        cls.OP: set(cls.SENT_BY)
        for _, cls in inspect.getmembers(ops, inspect.isclass)
        if issubclass(cls, ops.Op) and cls is not ops.Op and getattr(cls, "OP", None)
    }
    for name, roles in granted.items():
        assert roles <= declared[name], (name, roles, declared[name])
    server_bound = {n: r for n, r in declared.items() if not r <= {CHANNEL_SERVER, PRESENCE} and n != "ping"}
    for name, roles in server_bound.items():
        assert granted.get(name) == roles, (name, granted.get(name), roles)
