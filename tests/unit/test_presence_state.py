"""presence.state: the presence server's model, with a fake clock."""

from __future__ import annotations

import pytest

from presence.state import ACTIVE, AWAY, PresenceTable, merge
from tests.support import FakeClock


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def table(clock: FakeClock) -> PresenceTable:
    return PresenceTable(clock=clock, lease_ttl_s=5.0)


def test_online_offline_pushes_only_to_watchers(table: PresenceTable) -> None:
    table.lease("gw-a")
    table.lease("gw-b")
    assert table.subscribe("gw-b", ["U1"]) == [["U1", AWAY]]
    assert table.online("gw-a", ["U1", "U2"]) == {"gw-b": [["U1", ACTIVE]]}  # nobody watches U2
    assert table.presence_of("U2") == ACTIVE
    assert table.offline("gw-a", ["U1"]) == {"gw-b": [["U1", AWAY]]}
    table.unsubscribe("gw-b", ["U1"])
    assert table.online("gw-a", ["U1"]) == {}
    assert table.watchers == {}


def test_user_on_two_gateways_stays_active_until_both_leave(table: PresenceTable) -> None:
    table.subscribe("gw-w", ["U1"])
    assert table.online("gw-a", ["U1"]) == {"gw-w": [["U1", ACTIVE]]}
    assert table.online("gw-b", ["U1"]) == {}  # already active
    assert table.offline("gw-a", ["U1"]) == {}
    assert table.details("U1")["gateways"] == 1
    assert table.offline("gw-b", ["U1"]) == {"gw-w": [["U1", AWAY]]}


def test_manual_away_overrides_and_auto_restores(table: PresenceTable, clock: FakeClock) -> None:
    table.subscribe("gw-w", ["U1"])
    table.online("gw-a", ["U1"])
    clock.now += 1
    assert table.set_manual("U1", "away") == {"gw-w": [["U1", AWAY]]}
    details = table.details("U1")
    assert details == {"presence": AWAY, "online": True, "manual_away": True, "gateways": 1, "changed_at": clock.now}
    assert table.set_manual("U1", "away") == {}
    assert table.set_manual("U1", "auto") == {"gw-w": [["U1", ACTIVE]]}
    assert table.set_manual("U9", "auto") == {} and "U9" not in table.users
    assert table.set_manual("U9", "away") == {} and table.details("U9")["manual_away"] is True
    with pytest.raises(ValueError):
        table.set_manual("U1", "busy")


def test_expired_lease_takes_its_users_offline(table: PresenceTable, clock: FakeClock) -> None:
    table.lease("gw-a")
    table.lease("gw-w")
    table.subscribe("gw-w", ["U1", "U2"])
    table.online("gw-a", ["U1", "U2"])
    table.online("gw-b", ["U2"])  # implicit lease for gw-b, granted now
    clock.now += 4.0
    table.lease("gw-w")  # renewed
    table.lease("gw-b")
    assert table.expire() == ([], {})
    clock.now += 1.5  # gw-a: 5.5 s without renewal
    gone, pushes = table.expire()
    assert gone == ["gw-a"]
    assert pushes == {"gw-w": [["U1", AWAY]]}  # U2 is still on gw-b
    assert table.presence_of("U2") == ACTIVE
    assert "gw-a" not in table.leases and table.stats.expired_leases == 1


def test_dead_gateways_watches_go_with_its_lease(table: PresenceTable, clock: FakeClock) -> None:
    table.subscribe("gw-w", ["U1"])
    clock.now += 6
    table.lease("gw-a")
    table.expire()
    assert table.watchers == {}
    assert table.online("gw-a", ["U1"]) == {}


def test_renewal_of_an_expired_lease_reports_a_new_epoch(table: PresenceTable, clock: FakeClock) -> None:
    table.subscribe("gw-w", ["U1"])
    assert table.lease("gw-a", epoch=7) == (7, {})
    table.online("gw-a", ["U1"], epoch=7)
    clock.now += 6  # not swept yet, but expired: the renewal drops it first
    epoch, pushes = table.lease("gw-a")
    assert epoch == 0 and pushes == {"gw-w": [["U1", AWAY]]}


def test_sync_drops_only_what_the_new_epoch_did_not_report(table: PresenceTable) -> None:
    table.subscribe("gw-w", ["U1", "U2"])
    table.lease("gw-a", epoch=1)
    table.online("gw-a", ["U1", "U2"], epoch=1)
    table.subscribe("gw-a", ["U5", "U6"], epoch=1)
    # The link broke; meanwhile U2 left and the session watching U6 closed. Re-sync:
    assert table.lease("gw-a", epoch=2) == (2, {})
    assert table.online("gw-a", ["U1"], epoch=2) == {}  # no flap for U1
    table.subscribe("gw-a", ["U5"], epoch=2)
    assert table.synced("gw-a", 2) == {"gw-w": [["U2", AWAY]]}
    assert table.presence_of("U1") == ACTIVE
    assert set(table.watchers) == {"U1", "U2", "U5"}


def test_an_older_syncs_synced_is_ignored(table: PresenceTable) -> None:
    table.lease("gw-a", epoch=1)
    table.lease("gw-a", epoch=2)  # a second sync began before the first finished
    table.online("gw-a", ["U1"], epoch=1)
    table.online("gw-a", ["U2"], epoch=2)
    assert table.synced("gw-a", 1) == {}
    assert table.presence_of("U2") == ACTIVE
    table.synced("gw-a", 2)
    assert table.presence_of("U1") == AWAY and table.presence_of("U2") == ACTIVE


def test_release_drops_a_gateway_at_once(table: PresenceTable) -> None:
    table.subscribe("gw-w", ["U1"])
    table.online("gw-a", ["U1"])
    assert table.release("gw-a") == {"gw-w": [["U1", AWAY]]}
    assert table.release("gw-a") == {}


def test_rebuild_suppresses_pushes_then_sends_the_state(table: PresenceTable) -> None:
    table.start_rebuild()
    assert table.subscribe("gw-w", ["U1", "U2"]) == []  # answered when the rebuild ends
    assert table.online("gw-a", ["U1"]) == {}
    table.set_manual("U2", "away")
    pushes = table.end_rebuild()
    assert sorted(pushes["gw-w"]) == [["U1", ACTIVE], ["U2", AWAY]]
    assert table.offline("gw-a", ["U1"]) == {"gw-w": [["U1", AWAY]]}


def test_forget_drops_users_moved_away(table: PresenceTable) -> None:
    table.online("gw-a", ["U1", "U2"])
    table.subscribe("gw-a", ["U1", "U2"])
    assert table.forget(lambda u: u == "U1") == 1
    assert set(table.users) == {"U1"} and set(table.watchers) == {"U1"}
    assert table.leases["gw-a"].online == {"U1"} and set(table.leases["gw-a"].watching) == {"U1"}


def test_query_and_counts(table: PresenceTable) -> None:
    table.online("gw-a", ["U1"])
    table.subscribe("gw-a", ["U1", "U2"])
    table.subscribe("gw-b", ["U1"])
    assert table.query(["U1", "U2"]) == [["U1", ACTIVE], ["U2", AWAY]]
    assert table.online_users == 1 and table.subscriptions == 3
    assert table.details("UNKNOWN")["presence"] == AWAY


def test_merge_keeps_the_last_presence_per_user() -> None:
    pending: dict[str, dict[str, str]] = {}
    merge(pending, {"gw": [["U1", ACTIVE]]})
    merge(pending, {"gw": [["U1", AWAY], ["U2", ACTIVE]], "gw2": [["U1", AWAY]]})
    assert pending == {"gw": {"U1": AWAY, "U2": ACTIVE}, "gw2": {"U1": AWAY}}


def test_a_users_team_is_kept_from_the_online_report(table: PresenceTable) -> None:
    """Finding 5 (docs/authz-review.md): the table keeps each user's team as the gateway
    reported it, to say beside their presence; a report without one keeps what is known."""
    assert table.online("gw-a", ["U1", "U2"], teams={"U1": "T1", "U2": None}) == {}
    assert (table.team_of("U1"), table.team_of("U2"), table.team_of("U9")) == ("T1", None, None)
    table.offline("gw-a", ["U1"])
    table.online("gw-b", ["U1"])  # a gateway older than the field: the team stays known
    table.set_manual("U1", "away")
    assert table.team_of("U1") == "T1"
    table.set_manual("U3", "away")  # set away by hand, never online: no team
    assert table.team_of("U3") is None
    table.forget(lambda user: user != "U1")
    assert table.team_of("U1") is None
