"""Unit tests for gateway.subscriptions: no channel is lost silently (fake clock, no sockets)."""

from __future__ import annotations

from gateway.subscriptions import SUB_RETRY_INITIAL_S, SUB_RETRY_MAX_S, Phase, Subscriptions, retry_delay_s


class Ring:
    def __init__(self, owners: dict[str, str | None] | None = None, default: str | None = "cs-a") -> None:
        self.owners = owners or {}
        self.default = default

    def __call__(self, channel: str) -> str | None:
        return self.owners.get(channel, self.default)


def subs_with(*channels: str, ring: Ring | None = None) -> Subscriptions:
    subs = Subscriptions(ring or Ring())
    for channel in channels:
        subs.want(channel)
    return subs


def test_nothing_is_sent_before_the_link_is_up_and_the_first_connect_sends_everything() -> None:
    subs = subs_with("C1", "C2")
    assert subs.take("cs-a", 0.0) is None  # link not up yet: nothing waits on a dead link
    subs.link_up("cs-a")  # the FIRST connect, too
    batch = subs.take("cs-a", 0.0)
    assert batch is not None and batch.subscribe == ["C1", "C2"] and batch.epoch == 1
    assert subs.take("cs-a", 0.0) is None
    assert subs.confirmed(batch, refused=[]) == []  # a first sub owes no catch-up: it subscribes since bootstrap
    assert subs.count(Phase.CONFIRMED) == 2


def test_a_failed_sub_is_retried_with_backoff_and_never_dropped() -> None:
    subs = subs_with("C1")
    subs.link_up("cs-a")
    now = 100.0
    delays = []
    for attempt in range(1, 10):
        batch = subs.take("cs-a", now)
        assert batch is not None and batch.subscribe == ["C1"], attempt
        assert subs.failed(batch, now) == ["C1"]
        due = subs.next_retry_at("cs-a")
        assert due is not None
        delays.append(round(due - now, 3))
        assert subs.take("cs-a", due - 0.001) is None  # not before its time
        assert not subs.has_due("cs-a", due - 0.001) and subs.has_due("cs-a", due)
        now = due
    assert delays[0] == SUB_RETRY_INITIAL_S and delays[1] == 2 * SUB_RETRY_INITIAL_S
    assert delays[-1] == SUB_RETRY_MAX_S and max(delays) == SUB_RETRY_MAX_S
    batch = subs.take("cs-a", now)
    assert batch is not None
    assert subs.confirmed(batch, refused=[]) == ["C1"]  # it was sent before: catch up what it may have missed
    assert subs.next_retry_at("cs-a") is None


def test_retry_delays() -> None:
    assert [retry_delay_s(n) for n in (1, 2, 3)] == [0.2, 0.4, 0.8]
    assert retry_delay_s(50) == SUB_RETRY_MAX_S


def test_every_reconnect_resends_everything_the_link_carries_with_a_catch_up() -> None:
    subs = subs_with("C1", "C2", "C3")
    subs.link_up("cs-a")
    first = subs.take("cs-a", 0.0)
    assert first is not None
    subs.confirmed(first, refused=[])
    subs.want("C4")
    in_flight = subs.take("cs-a", 0.0)
    assert in_flight is not None and in_flight.subscribe == ["C4"]
    subs.link_down("cs-a")
    assert subs.take("cs-a", 0.0) is None
    subs.link_up("cs-a")
    again = subs.take("cs-a", 0.0)
    assert again is not None and again.subscribe == ["C1", "C2", "C3", "C4"] and again.epoch == 2
    # the old connection's reply arrives late: it changes nothing
    assert subs.confirmed(in_flight, refused=[]) == []
    assert subs.failed(in_flight, 0.0) == []
    assert subs.confirmed(again, refused=[]) == ["C1", "C2", "C3", "C4"]


def test_refused_channels_wait_for_a_resubscribe_at_the_new_owner() -> None:
    ring = Ring()
    subs = subs_with("C1", "C2", ring=ring)
    subs.link_up("cs-a")
    subs.link_up("cs-b")
    batch = subs.take("cs-a", 0.0)
    assert batch is not None
    assert subs.confirmed(batch, refused=["C2"]) == []
    assert subs.owner_of("C2") == "cs-a"
    ring.owners["C2"] = "cs-b"
    assert subs.resubscribe(["C2", "CGONE"]) == {"cs-b"}
    moved = subs.take("cs-b", 0.0)
    assert moved is not None and moved.subscribe == ["C2"]
    assert subs.confirmed(moved, refused=[]) == ["C2"]


def test_a_ring_change_moves_channels_and_places_those_that_had_no_owner() -> None:
    ring = Ring({"C3": None})
    subs = subs_with("C1", "C2", "C3", ring=ring)
    assert subs.owner_of("C3") is None
    subs.link_up("cs-a")
    subs.link_up("cs-b")
    batch = subs.take("cs-a", 0.0)
    assert batch is not None and batch.subscribe == ["C1", "C2"]
    subs.confirmed(batch, refused=[])
    ring.owners = {"C2": "cs-b", "C3": "cs-b"}
    moved, owners = subs.ring_changed()
    assert sorted(moved) == ["C2", "C3"] and owners == {"cs-b"}
    at_b = subs.take("cs-b", 0.0)
    assert at_b is not None and at_b.subscribe == ["C2", "C3"]
    assert subs.take("cs-a", 0.0) is None  # the old owner forgets moved channels itself
    assert subs.confirmed(at_b, refused=[]) == ["C2", "C3"]


def test_drop_unsubscribes_only_what_was_sent() -> None:
    subs = subs_with("C1", "C2")
    assert subs.drop("C2") is None  # never sent: nothing to undo
    subs.link_up("cs-a")
    batch = subs.take("cs-a", 0.0)
    assert batch is not None
    subs.confirmed(batch, refused=[])
    assert subs.drop("C1") == "cs-a"
    unsub = subs.take("cs-a", 0.0)
    assert unsub is not None and unsub.unsubscribe == ["C1"] and unsub.subscribe == []
    assert subs.drop("C1") is None
    assert subs.channels == {} and subs.pending == {} and subs.by_owner == {}


def test_a_rejoin_before_the_unsub_went_out_cancels_it() -> None:
    subs = subs_with("C1")
    subs.link_up("cs-a")
    batch = subs.take("cs-a", 0.0)
    assert batch is not None
    subs.confirmed(batch, refused=[])
    subs.drop("C1")
    subs.want("C1")
    again = subs.take("cs-a", 0.0)
    assert again is not None and again.unsubscribe == [] and again.subscribe == ["C1"]


def test_batches_are_bounded() -> None:
    subs = Subscriptions(Ring(), max_batch=3)
    for i in range(7):
        subs.want(f"C{i}")
    subs.link_up("cs-a")
    sizes = []
    while (batch := subs.take("cs-a", 0.0)) is not None:
        sizes.append(len(batch.subscribe))
    assert sizes == [3, 3, 1]


def test_reconciliation_requeues_what_the_server_does_not_hold() -> None:
    subs = subs_with("C1", "C2", "C3")
    subs.link_up("cs-a")
    batch = subs.take("cs-a", 0.0)
    assert batch is not None
    subs.confirmed(batch, refused=[])
    epoch, audited = subs.audit("cs-a")
    assert audited == ["C1", "C2", "C3"]
    assert subs.reconciled("cs-a", epoch, ["C2", "CUNKNOWN"]) == ["C2"]
    repair = subs.take("cs-a", 0.0)
    assert repair is not None and repair.subscribe == ["C2"]
    assert subs.confirmed(repair, refused=[]) == ["C2"]
    # an answer from before a reconnect is stale
    epoch, _ = subs.audit("cs-a")
    subs.link_up("cs-a")
    assert subs.reconciled("cs-a", epoch, ["C1"]) == []


def test_a_channel_sent_again_is_settled_only_by_its_latest_batch() -> None:
    subs = subs_with("C1")
    subs.link_up("cs-a")
    first = subs.take("cs-a", 0.0)
    assert first is not None
    subs.failed(first, 0.0)
    second = subs.take("cs-a", 10.0)
    assert second is not None and second.number != first.number
    assert subs.confirmed(first, refused=[]) == []  # the late reply of the timed-out batch
    assert subs.channels["C1"].phase is Phase.SENT
    assert subs.confirmed(second, refused=[]) == ["C1"]
    assert subs.channels["C1"].phase is Phase.CONFIRMED
