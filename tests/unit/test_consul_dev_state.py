"""Synchronous tests of the dev Consul agent's model, on a fake clock."""

from __future__ import annotations

import base64
import itertools
from typing import Any

import pytest

from consul_dev.errors import (
    InvalidRequest,
    RequestTooLarge,
    ServerError,
    ServiceNotRegistered,
    UnknownCheck,
    UnknownService,
    UnknownSession,
)
from consul_dev.go_text import format_go_duration, parse_go_duration_ns
from consul_dev.node import DEFAULT_LOCK_DELAY_S, DEREGISTER_CRITICAL_MIN_S, KV_MAX_VALUE_BYTES, MAX_LOCK_DELAY_S
from consul_dev.state import ConsulState
from tests.support import FakeClock


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def state(clock: FakeClock) -> ConsulState:
    counter = itertools.count(1)
    return ConsulState(clock, new_id=lambda: f"00000000-0000-0000-0000-{next(counter):012d}")


def register(state: ConsulState, service_id: str, name: str = "web", ttl: str = "1s", **extra: Any) -> None:
    check: dict[str, Any] = {"TTL": ttl, **extra.pop("check", {})}
    state.register_service({"ID": service_id, "Name": name, "Port": 80, "Checks": [check], **extra})


def check_status(state: ConsulState, check_id: str) -> str:
    return str(state.agent_checks()[check_id]["Status"])


def kv_value(state: ConsulState, key: str) -> dict[str, Any] | None:
    _, entries = state.kv_get(key)
    return entries[0] if entries else None


# ---- TTL checks --------------------------------------------------------------
def test_ttl_check_starts_critical_passes_then_expires_to_critical(state: ConsulState, clock: FakeClock) -> None:
    register(state, "web-1", ttl="10s")
    assert check_status(state, "service:web-1") == "critical"
    assert state.health_service("web", passing=True)[1] == []

    state.update_ttl_check("service:web-1", "passing", "all good")
    _, entries = state.health_service("web", passing=True)
    assert [e["Service"]["ID"] for e in entries] == ["web-1"]
    assert [c["CheckID"] for c in entries[0]["Checks"]] == ["serfHealth", "service:web-1"]

    clock.advance(9.9)
    assert check_status(state, "service:web-1") == "passing"
    clock.advance(0.2)
    state.tick()
    checks = state.agent_checks()
    assert checks["service:web-1"]["Status"] == "critical"
    assert checks["service:web-1"]["Output"] == "TTL expired (last output before timeout follows): all good"
    assert state.health_service("web", passing=True)[1] == []


def test_ttl_expiry_without_output_says_ttl_expired(state: ConsulState, clock: FakeClock) -> None:
    register(state, "web-1", ttl="1s", check={"Status": "passing"})
    assert check_status(state, "service:web-1") == "passing"  # Status given at registration wins
    clock.advance(1.0)
    assert state.agent_checks()["service:web-1"]["Output"] == "TTL expired"


def test_warning_is_not_passing(state: ConsulState) -> None:
    register(state, "web-1", ttl="10s")
    state.update_ttl_check("service:web-1", "warning", "slow")
    assert state.health_service("web")[1][0]["Checks"][1]["Status"] == "warning"
    assert state.health_service("web", passing=True)[1] == []


def test_deregister_critical_service_after_has_the_documented_one_minute_floor(
    state: ConsulState, clock: FakeClock
) -> None:
    register(state, "web-1", ttl="1s", check={"DeregisterCriticalServiceAfter": "10s"})
    state.update_ttl_check("service:web-1", "passing", "")
    clock.advance(1.0)  # TTL expires: critical from now on
    assert check_status(state, "service:web-1") == "critical"
    clock.advance(30.0)
    assert "web-1" in state.agent_services()  # 10s asked, but the minimum is 1 minute
    clock.advance(DEREGISTER_CRITICAL_MIN_S - 30.0)
    state.tick()
    assert "web-1" not in state.agent_services()
    assert "service:web-1" not in state.agent_checks()
    assert state.health_service("web")[1] == []


def test_passing_again_stops_the_reaper(state: ConsulState, clock: FakeClock) -> None:
    register(state, "web-1", ttl="1s", check={"deregister_critical_service_after": "1m"})
    clock.advance(50.0)
    state.update_ttl_check("service:web-1", "passing", "")
    clock.advance(0.5)
    assert "web-1" in state.agent_services()
    clock.advance(0.5 + 59.0)
    assert "web-1" in state.agent_services()  # critical for 59 s only
    clock.advance(1.0)
    assert "web-1" not in state.agent_services()


def test_reregistration_keeps_check_status_and_does_not_move_the_index(state: ConsulState) -> None:
    register(state, "web-1", ttl="10s", tags=["a"])
    state.update_ttl_check("service:web-1", "passing", "ok")
    index, _ = state.health_service("web")
    register(state, "web-1", ttl="10s", tags=["a"])
    assert check_status(state, "service:web-1") == "passing"
    assert state.health_service("web")[0] == index
    register(state, "web-1", ttl="10s", tags=["b"])  # a real change
    assert state.health_service("web")[0] > index
    assert state.health_service("web", tags=["B"])[1][0]["Service"]["Tags"] == ["b"]
    assert state.health_service("web", tags=["a"])[1] == []


def test_replace_existing_checks_drops_checks_missing_from_the_body(state: ConsulState) -> None:
    state.register_service({"Name": "web", "Checks": [{"TTL": "5s"}, {"TTL": "5s", "CheckID": "extra"}]})
    assert set(state.agent_checks()) == {"service:web:1", "extra"}
    state.register_service({"Name": "web", "Checks": [{"TTL": "5s", "CheckID": "extra"}]})
    assert set(state.agent_checks()) == {"service:web:1", "extra"}  # kept without the flag
    state.register_service({"Name": "web", "Checks": [{"TTL": "5s", "CheckID": "extra"}]}, replace_existing_checks=True)
    assert set(state.agent_checks()) == {"extra"}


def test_check_register_and_update_and_deregister(state: ConsulState) -> None:
    register(state, "web-1")
    state.register_check({"name": "disk", "ttl": "30s", "serviceid": "web-1", "notes": "n"})
    assert state.agent_checks()["disk"]["ServiceName"] == "web"
    state.update_check("disk", {"Status": "warning", "Output": "80%"})
    assert state.agent_checks()["disk"]["Output"] == "80%"
    state.deregister_check("disk")
    assert "disk" not in state.agent_checks()
    with pytest.raises(ServiceNotRegistered, match='ServiceID "nope" does not exist'):
        state.register_check({"Name": "x", "TTL": "1s", "ServiceID": "nope"})


def test_errors_carry_consuls_status_and_text(state: ConsulState) -> None:
    with pytest.raises(UnknownService) as svc:
        state.deregister_service("nope")
    assert svc.value.status == 404
    assert str(svc.value) == 'Unknown service ID "nope". Ensure that the service ID is passed, not the service name.'
    with pytest.raises(UnknownCheck) as chk:
        state.update_ttl_check("nope", "passing", "")
    assert chk.value.status == 404
    assert str(chk.value) == 'Unknown check ID "nope". Ensure that the check ID is passed, not the check name.'
    with pytest.raises(UnknownCheck):
        state.update_ttl_check("serfHealth", "passing", "")  # not an agent check
    with pytest.raises(InvalidRequest, match="Invalid check status: 'bogus'"):
        state.update_check("x", {"Status": "bogus"})


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"Port": 1}, "Missing service name"),
        ({"Name": "w", "Address": "0.0.0.0"}, "Invalid service address"),
        (
            {"Name": "w", "Port": "80"},
            "cannot unmarshal string into Go struct field ServiceDefinition.Port of type int",
        ),
        ({"Name": "w", "Checks": [{}]}, "Invalid check: TTL must be > 0 for TTL checks"),
        ({"Name": "w", "Checks": [{"TTL": "1x"}]}, 'time: unknown unit "x" in duration "1x"'),
        ({"Name": "w", "Checks": [{"HTTP": "http://x", "Interval": "1s"}]}, "only TTL checks"),
        (
            {"Name": "w", "Checks": [{"TTL": "1s", "Status": "ok"}]},
            "Status for checks must 'passing', 'warning', 'critical'",
        ),
        ({"Name": "w", "Meta": {"bad key": "v"}}, "Key contains invalid characters"),
        ({"Name": "w", "Meta": {"consul-x": "v"}}, "Key prefix 'consul-' is reserved"),
        ({"Name": "w", "Weights": {"Passing": 0, "Warning": 1}}, "Invalid Weights: Passing must be greater than 0"),
        ([1, 2], "cannot unmarshal array into Go value of type structs.ServiceDefinition"),
    ],
)
def test_invalid_registrations_are_rejected_with_consuls_text(state: ConsulState, body: Any, message: str) -> None:
    before = state.index
    with pytest.raises(InvalidRequest, match=message) as err:
        state.register_service(body)
    assert err.value.status == 400
    assert state.index == before


# ---- indexes -------------------------------------------------------------------
def test_health_index_moves_only_on_a_relevant_change(state: ConsulState, clock: FakeClock) -> None:
    register(state, "web-1", name="web", ttl="10s")
    register(state, "api-1", name="api", ttl="10s")
    web_index, _ = state.health_service("web")
    state.update_ttl_check("service:api-1", "passing", "")  # another service
    state.kv_put("some/key", b"v")  # KV
    state.session_create(None)  # sessions
    assert state.health_service("web")[0] == web_index
    state.update_ttl_check("service:web-1", "passing", "first")
    passed_index, _ = state.health_service("web")
    assert passed_index > web_index
    state.update_ttl_check("service:web-1", "passing", "second")  # output only: nothing to wake for
    index, entries = state.health_service("web")
    assert index == passed_index
    assert entries[0]["Checks"][1]["Output"] == "second"
    clock.advance(10.0)  # TTL expiry is a status change
    assert state.health_service("web")[0] > passed_index


def test_index_of_a_vanished_service_does_not_go_backwards(state: ConsulState) -> None:
    register(state, "web-1")
    index, _ = state.health_service("web")
    state.deregister_service("web-1")
    after, entries = state.health_service("web")
    assert entries == []
    assert after > index
    assert state.health_service("never-registered")[0] >= 1


def test_catalog_views(state: ConsulState) -> None:
    register(state, "web-1", tags=["b", "a"])
    register(state, "web-2", tags=["c"])
    _, services = state.catalog_services()
    assert services == {"consul": [], "web": ["a", "b", "c"]}
    _, nodes = state.catalog_service("web", tags=["c"])
    assert [n["ServiceID"] for n in nodes] == ["web-2"]
    assert nodes[0]["Node"] == "rtm-dev" and nodes[0]["Datacenter"] == "dc1"
    assert state.catalog_nodes()[1][0]["Node"] == "rtm-dev"
    assert "consul" not in state.agent_services()  # the catalog-only server service


# ---- KV ----------------------------------------------------------------------------
def test_kv_put_get_and_value_encoding(state: ConsulState) -> None:
    assert state.kv_put("a/b", b"hello", flags=42)
    entry = kv_value(state, "a/b")
    assert entry is not None
    assert base64.b64decode(entry["Value"]) == b"hello"
    assert (entry["Flags"], entry["LockIndex"], entry["CreateIndex"]) == (42, 0, entry["ModifyIndex"])
    assert "Session" not in entry
    assert state.kv_put("empty", b"")
    assert kv_value(state, "empty")["Value"] is None  # type: ignore[index]
    index, entries = state.kv_get("missing")
    assert entries == [] and index >= 1


def test_kv_cas_semantics(state: ConsulState) -> None:
    assert state.kv_put("k", b"1", cas=0)  # create-only: absent, so created
    assert not state.kv_put("k", b"2", cas=0)  # create-only: exists
    modify = kv_value(state, "k")["ModifyIndex"]  # type: ignore[index]
    assert not state.kv_put("k", b"2", cas=modify + 100)
    assert state.kv_put("k", b"2", cas=modify)
    assert not state.kv_put("absent", b"x", cas=5)
    new_modify = kv_value(state, "k")["ModifyIndex"]  # type: ignore[index]
    assert not state.kv_delete("k", cas=modify)  # stale index
    assert state.kv_delete("k", cas=new_modify)
    assert kv_value(state, "k") is None
    assert state.kv_delete("k", cas=123)  # as in Consul: CAS delete of an absent key is true


def test_kv_indexes_only_move_on_relevant_keys(state: ConsulState, clock: FakeClock) -> None:
    state.kv_put("app/a", b"1")
    state.kv_put("other/x", b"1")
    key_index, _ = state.kv_get("app/a")
    prefix_index, _ = state.kv_list("app/")
    state.kv_put("other/y", b"2")
    state.kv_put("app/a", b"1")  # identical write: skipped, no index
    assert state.kv_get("app/a")[0] == key_index
    assert state.kv_list("app/")[0] == prefix_index
    state.kv_put("app/b", b"2")
    assert state.kv_get("app/a")[0] == key_index
    assert state.kv_list("app/")[0] > prefix_index
    before_delete = state.kv_list("app/")[0]
    state.kv_delete("app/b")  # a tombstone keeps the prefix index moving forward
    assert state.kv_list("app/")[0] > before_delete
    assert [e["Key"] for e in state.kv_list("app/")[1]] == ["app/a"]


def test_kv_keys_and_separator(state: ConsulState) -> None:
    for key in ("a/b/c", "a/b/d", "a/e", "f"):
        state.kv_put(key, b"")
    assert state.kv_keys("")[1] == ["a/b/c", "a/b/d", "a/e", "f"]
    assert state.kv_keys("", "/")[1] == ["a/", "f"]
    assert state.kv_keys("a/", "/")[1] == ["a/b/", "a/e"]
    assert state.kv_keys("zzz")[1] is None  # HTTP 404
    assert state.kv_delete("a/", recurse=True)
    assert state.kv_keys("", "/")[1] == ["f"]


def test_kv_rejects_oversized_values_and_conflicting_flags(state: ConsulState) -> None:
    with pytest.raises(RequestTooLarge) as err:
        state.kv_put("big", b"x" * (KV_MAX_VALUE_BYTES + 1))
    assert err.value.status == 413
    with pytest.raises(InvalidRequest, match="Conflicting flags"):
        state.kv_put("k", b"", cas=0, acquire="s")


# ---- sessions and locks -------------------------------------------------------------
def test_acquire_release_and_lock_index(state: ConsulState) -> None:
    one = state.session_create({"Name": "one", "LockDelay": "0s"})
    two = state.session_create({"Name": "two", "LockDelay": "0s"})
    assert state.kv_put("lock", b"1", acquire=one)
    entry = kv_value(state, "lock")
    assert entry is not None and (entry["Session"], entry["LockIndex"]) == (one, 1)
    assert not state.kv_put("lock", b"2", acquire=two)
    assert state.kv_put("lock", b"3", acquire=one)  # re-acquire by the holder
    assert kv_value(state, "lock")["LockIndex"] == 1  # type: ignore[index]
    assert not state.kv_put("lock", b"", release=two)
    assert state.kv_put("lock", b"4", release=one)
    entry = kv_value(state, "lock")
    assert entry is not None and "Session" not in entry and entry["LockIndex"] == 1
    assert state.kv_put("lock", b"5", acquire=two)
    assert kv_value(state, "lock")["LockIndex"] == 2  # type: ignore[index]
    with pytest.raises(ServerError, match='invalid session "nope"') as err:
        state.kv_put("other", b"", acquire="nope")
    assert err.value.status == 500


def test_session_ttl_invalidation_releases_the_lock_then_lock_delay_blocks(
    state: ConsulState, clock: FakeClock
) -> None:
    holder = state.session_create({"TTL": "10s"})
    other = state.session_create({"LockDelay": "0s"})
    info = state.session_info(holder)[1][0]
    assert (info["TTL"], info["LockDelay"], info["Behavior"], info["NodeChecks"]) == (
        "10s",
        int(DEFAULT_LOCK_DELAY_S * 1e9),
        "release",
        ["serfHealth"],
    )
    assert state.kv_put("leader", b"me", acquire=holder)
    clock.advance(9.9)
    state.session_renew(holder)  # the TTL restarts
    clock.advance(9.9)
    assert state.session_info(holder)[1] != []
    clock.advance(0.2)
    state.tick()
    assert state.session_info(holder)[1] == []
    entry = kv_value(state, "leader")
    assert entry is not None and "Session" not in entry and entry["Value"] is not None
    assert not state.kv_put("leader", b"you", acquire=other)  # lock-delay
    clock.advance(DEFAULT_LOCK_DELAY_S - 0.2)
    assert not state.kv_put("leader", b"you", acquire=other)
    clock.advance(0.2)
    assert state.kv_put("leader", b"you", acquire=other)
    with pytest.raises(UnknownSession, match=f"Session id '{holder}' not found") as err:
        state.session_renew(holder)
    assert err.value.status == 404


def test_explicit_release_has_no_lock_delay_but_destroy_does(state: ConsulState, clock: FakeClock) -> None:
    one = state.session_create({"LockDelay": "5s"})
    two = state.session_create(None)
    assert state.kv_put("k", b"", acquire=one)
    assert state.kv_put("k", b"", release=one)
    assert state.kv_put("k", b"", acquire=two)
    assert state.kv_put("k", b"", release=two)
    assert state.kv_put("k", b"", acquire=one)
    state.session_destroy(one)
    assert not state.kv_put("k", b"", acquire=two)
    assert state.lock_delay_until_s("k") == pytest.approx(clock() + 5.0)
    clock.advance(5.0)
    assert state.kv_put("k", b"", acquire=two)


def test_lock_delay_is_capped_at_sixty_seconds(state: ConsulState, clock: FakeClock) -> None:
    holder = state.session_create({"LockDelay": "5m"})
    state.kv_put("k", b"", acquire=holder)
    state.session_destroy(holder)
    assert state.lock_delay_until_s("k") == pytest.approx(clock() + MAX_LOCK_DELAY_S)


def test_lock_delay_numbers_below_a_microsecond_mean_seconds(state: ConsulState) -> None:
    session = state.session_create({"LockDelay": 7})
    assert state.session_info(session)[1][0]["LockDelay"] == 7_000_000_000


def test_delete_behavior_removes_held_keys(state: ConsulState) -> None:
    session = state.session_create({"Behavior": "delete", "LockDelay": "0s"})
    state.kv_put("ephemeral", b"x", acquire=session)
    state.session_destroy(session)
    assert kv_value(state, "ephemeral") is None


def test_session_bound_to_a_check_dies_when_the_check_goes_critical(state: ConsulState, clock: FakeClock) -> None:
    state.register_check({"Name": "alive", "TTL": "5s", "Status": "passing"})
    session = state.session_create({"Checks": ["serfHealth", "alive"], "LockDelay": "0s"})
    state.kv_put("k", b"", acquire=session)
    clock.advance(5.0)
    assert state.session_info(session)[1] == []
    assert "Session" not in kv_value(state, "k")  # type: ignore[operator]
    with pytest.raises(ServerError, match="Check 'alive' is in critical state"):
        state.session_create({"Checks": ["alive"]})
    with pytest.raises(ServerError, match="Missing check 'nope' registration"):
        state.session_create({"NodeChecks": ["nope"]})


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"TTL": "5s"}, r"Invalid Session TTL '5000000000', must be between \[10s=24h0m0s\]"),
        ({"TTL": "25h"}, r"Invalid Session TTL '90000000000000', must be between \[10s=24h0m0s\]"),
        ({"TTL": "abc"}, "Session TTL 'abc' invalid: time: invalid duration \"abc\""),
        ({"Behavior": "keep"}, "Invalid Behavior setting 'keep'"),
        ({"Node": "elsewhere"}, "Missing node registration"),
    ],
)
def test_session_create_errors(state: ConsulState, body: dict[str, Any], message: str) -> None:
    with pytest.raises(ServerError, match=message) as err:
        state.session_create(body)
    assert err.value.status == 500


def test_session_lists_and_renew_returns_the_session(state: ConsulState) -> None:
    session = state.session_create({"Name": "n", "TTL": "10s"})
    index, sessions = state.session_list()
    assert [s["ID"] for s in sessions] == [session] and index >= 1
    assert state.session_node("rtm-dev")[1] == sessions
    assert state.session_node("other")[1] == []
    assert state.session_renew(session)[0]["Name"] == "n"
    assert state.session_renew(session)[0]["ModifyIndex"] == sessions[0]["ModifyIndex"]  # renew is not a write


# ---- Go-compatible helpers --------------------------------------------------------------
@pytest.mark.parametrize(
    ("text", "ns"),
    [("10s", 10_000_000_000), ("1m30s", 90_000_000_000), ("250ms", 250_000_000), ("0", 0), ("1.5h", 5_400_000_000_000)],
)
def test_parse_go_duration(text: str, ns: int) -> None:
    assert parse_go_duration_ns(text) == ns


@pytest.mark.parametrize(
    ("text", "message"), [("15", "missing unit"), ("", "invalid duration"), ("1y", "unknown unit")]
)
def test_parse_go_duration_errors(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_go_duration_ns(text)


@pytest.mark.parametrize(
    ("ns", "text"),
    [(10_000_000_000, "10s"), (86_400_000_000_000, "24h0m0s"), (1_500_000_000, "1.5s"), (250_000_000, "250ms")],
)
def test_format_go_duration(ns: int, text: str) -> None:
    assert format_go_duration(ns) == text
