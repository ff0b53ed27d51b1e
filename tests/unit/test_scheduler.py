"""webapp_stub.scheduler: fair order, the bounded rate, exactly-once firing — fake clock, no sockets."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from services.metrics import ServiceMetrics
from tests.support import FakeClock
from webapp_stub.due_queue import LIVE_POLL_S, OUTBOX_POLL_S, DueItem
from webapp_stub.scheduler import (
    DUE_ROWS_SQL,
    READ_CHUNK,
    FirerRegistry,
    Scheduler,
    add_due,
    cancel_due,
    fire_batch,
    open_scheduler_store,
)
from webapp_stub.seed import seed_demo
from webapp_stub.store import ApiError, Event, Store

T0 = 1_700_000_000.0


def item(iid: str, team: str = "T1", lane: str = "C1", due_at: float = T0, kind: str = "test") -> DueItem:
    return DueItem(iid, kind, team, lane, due_at)


# -- firing, exactly once ---------------------------------------------------------------------------------


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    s = Store(str(tmp_path), clock=FakeClock(T0))
    seed_demo(s, users=3, channels=2, bots=0)
    yield s
    s.close()


def firers_posting_to(store: Store, fail: set[str] | None = None) -> FirerRegistry:
    """A firer that appends one event on its lane (as a kind's firer would), or fails."""
    firers = FirerRegistry()

    def fire(s: Store, iid: str, now: float) -> list[Event]:
        s._append_event("LANE", {"type": "fired", "id": iid})
        if fail and iid in fail:
            raise ApiError("not_in_channel")
        return [s._append_event("LANE", {"type": "fired-again", "id": iid})]

    firers.register("test", fire)
    return firers


def test_fire_batch_claims_each_item_once_and_isolates_failures(store: Store) -> None:
    with store.transaction():
        for iid in ("a", "b", "c"):
            add_due(store, item(iid))
    firers = firers_posting_to(store, fail={"b"})
    fired = fire_batch(store, firers, [item("a"), item("b"), item("c")], T0)
    assert [(i.id, outcome) for i, outcome in fired.outcomes] == [
        ("a", "posted"),
        ("b", "failed:not_in_channel"),
        ("c", "posted"),
    ]
    # b's own writes were undone with its savepoint: LANE holds a's and c's two events each
    events, _ = store.events_after("LANE", 0)
    assert [e.seq for e in events] == [1, 2, 3, 4] and [e.seq for e in fired.events] == [2, 4]
    states = dict(store.conn.execute("SELECT id, state FROM due_items").fetchall())
    assert states == {"a": "fired", "b": "failed", "c": "fired"}
    # firing again does nothing: nothing is pending any more
    again = fire_batch(store, firers, [item("a"), item("c")], T0 + 1)
    assert [o for _, o in again.outcomes] == ["gone", "gone"] and again.events == []


def test_a_batch_that_dies_before_commit_leaves_everything_pending(store: Store) -> None:
    with store.transaction():
        add_due(store, item("a"))
    firers = FirerRegistry()

    def crash(s: Store, iid: str, now: float) -> list[Event]:
        s._append_event("LANE", {"type": "x"})
        raise KeyboardInterrupt  # the process dies mid-transaction: nothing of it commits

    firers.register("test", crash)
    with pytest.raises(KeyboardInterrupt):
        fire_batch(store, firers, [item("a")], T0)
    assert store.conn.execute("SELECT state FROM due_items").fetchone()[0] == "pending"
    assert store.last_seq("LANE") == 0


def test_cancel_only_touches_pending_items(store: Store) -> None:
    with store.transaction():
        add_due(store, item("a"))
        add_due(store, item("b"))
    fire_batch(store, firers_posting_to(store), [item("a")], T0)
    with store.transaction():
        assert cancel_due(store, "a") is False and cancel_due(store, "b") is True


class Recorder:
    def __init__(self) -> None:
        self.events: list[Event] = []

    def __call__(self, events: list[Event]) -> None:
        self.events += events


def metric(metrics: ServiceMetrics, name: str, **labels: Any) -> float:
    value = metrics.registry.get_sample_value(name, labels)
    return 0.0 if value is None else value


def test_scheduler_fires_on_time_at_its_rate_and_counts_late_items(store: Store) -> None:
    clock = FakeClock(T0)
    with store.transaction():
        add_due(store, item("missed", due_at=T0 - 60))  # due while the webapp was down
        for n in range(30):
            add_due(store, item(f"i{n}", lane=f"C{n % 3}", due_at=T0 + 10))
    published = Recorder()
    metrics = ServiceMetrics("webapp", "test")
    scheduler = Scheduler(
        store,
        published,
        metrics,
        firers=firers_posting_to(store),
        rate_per_s=10.0,
        batch_max=5,
        clock=clock,
        duty_cycle=1.0,  # no rests: the rate alone paces it here
    )
    assert scheduler.step() == 0.0  # fired the missed one at once
    assert [e.json for e in published.events] == ['{"type":"fired-again","id":"missed"}']
    assert metric(metrics, "rtm_scheduler_fired_total", kind="test", outcome="posted", late="true") == 1
    wait = scheduler.step()
    assert wait == 1.0  # the next is 10 s away: the loop looks again within MAX_IDLE_WAIT_S
    clock.advance(9.5)
    assert scheduler.step() == pytest.approx(0.5)  # wakes exactly at the due time
    clock.advance(0.5)
    scheduler.step()
    assert len(published.events) == 1 + 5  # one batch
    for _ in range(100):
        if len(published.events) == 31:
            break
        clock.advance(max(scheduler.step(), 0.01))
    assert len(published.events) == 31
    assert clock() - (T0 + 10) == pytest.approx(2.5, abs=0.05)  # 25 more at 10/s after the first batch
    assert metric(metrics, "rtm_scheduler_fired_total", kind="test", outcome="posted", late="false") == 30
    assert metric(metrics, "rtm_scheduler_late_seconds_count", kind="test") == 31


def test_scheduler_yields_to_an_open_live_write_and_to_a_full_outbox(store: Store) -> None:
    clock = FakeClock(T0)
    with store.transaction():
        for n in range(4):
            add_due(store, item(f"i{n}", lane=f"C{n}"))
    published = Recorder()
    live = {"writing": True, "backlog": 0}
    metrics = ServiceMetrics("webapp", "test")
    scheduler = Scheduler(
        store,
        published,
        metrics,
        firers=firers_posting_to(store),
        batch_max=2,
        clock=clock,
        live_writing=lambda: live["writing"],
        outbox_backlog=lambda: live["backlog"],
        max_outbox_backlog=10,
    )
    assert scheduler.step() == LIVE_POLL_S and published.events == []  # a live post is being written
    live.update(writing=False, backlog=11)
    assert scheduler.step() == OUTBOX_POLL_S and published.events == []  # live events wait in the outbox
    live["backlog"] = 10
    scheduler.step()
    assert len(published.events) == 2  # one batch, then the rate
    assert metric(metrics, "rtm_scheduler_yields_total", reason="live_write") == 1
    assert metric(metrics, "rtm_scheduler_yields_total", reason="outbox") == 1
    assert len(scheduler.queue) == 2


def test_a_batch_whose_commit_fails_leaves_its_items_pending_and_the_connection_usable(store: Store) -> None:
    # a deferred foreign key makes the COMMIT itself fail, after the events were registered
    store.conn.execute("PRAGMA foreign_keys=ON")
    store.conn.execute("CREATE TABLE parent (id INTEGER PRIMARY KEY)")
    store.conn.execute("CREATE TABLE child (p INTEGER REFERENCES parent (id) DEFERRABLE INITIALLY DEFERRED)")
    with store.transaction():
        add_due(store, item("a"))
    firers = FirerRegistry()

    def orphan(s: Store, iid: str, now: float) -> list[Event]:
        s.conn.execute("INSERT INTO child (p) VALUES (42)")
        return [s._append_event("LANE", {"type": "fired", "id": iid})]

    firers.register("test", orphan)
    with pytest.raises(sqlite3.IntegrityError):
        fire_batch(store, firers, [item("a")], T0)
    assert not store.conn.in_transaction
    assert store.conn.execute("SELECT state FROM due_items").fetchone()[0] == "pending"
    assert store.last_seq("LANE") == 0
    store.conn.execute("DELETE FROM child")
    store.conn.execute("INSERT INTO parent (id) VALUES (42)")
    assert [o for _, o in fire_batch(store, firers, [item("a")], T0).outcomes] == ["posted"]


def test_the_whole_due_set_is_read_a_chunk_per_turn_before_the_first_batch(store: Store) -> None:
    clock = FakeClock(T0)
    with store.transaction():
        for n in range(READ_CHUNK + 10):
            add_due(store, item(f"busy{n:04d}", lane="C-busy", kind="message"))
        add_due(store, item("zz-reminder", lane="U1", kind="reminder"))  # sorts last by id
        add_due(store, item("soon", lane="C2", due_at=T0 + 1))
    published = Recorder()
    firers = firers_posting_to(store)
    firers.register("message", firers.get("test"))  # type: ignore[arg-type]
    firers.register("reminder", firers.get("test"))  # type: ignore[arg-type]
    scheduler = Scheduler(store, published, ServiceMetrics("webapp", "test"), firers=firers, clock=clock)
    assert scheduler.step() == 0.0 and published.events == [] and len(scheduler.queue) == READ_CHUNK
    scheduler.step()  # the rest read, then the first batch: the reminder's turn comes second
    fired = [json.loads(e.json)["id"] for e in published.events]
    assert fired[:3] == ["busy0000", "zz-reminder", "busy0001"]
    assert scheduler.refill(T0) == 0  # nothing new
    assert scheduler.refill(T0 + 1) == 1  # what fell due since


def test_a_resumed_read_is_an_index_range_not_a_scan_of_the_second(store: Store) -> None:
    # 20,000 items due in one second: the read that resumes after the last id must not visit them all
    plan = store.conn.execute("EXPLAIN QUERY PLAN " + DUE_ROWS_SQL, ("pending", T0, T0, "x", 500)).fetchall()
    detail = " ".join(str(row[-1]) for row in plan)
    assert "USING INDEX due_items_pending" in detail and "(due_at,id)>(?,?)" in detail
    assert "TEMP B-TREE" not in detail  # no sort either


def test_a_stream_of_wakes_does_not_keep_the_scheduler_from_firing(store: Store) -> None:
    with store.transaction():
        for n in range(READ_CHUNK * 2):
            add_due(store, item(f"i{n:04d}", lane=f"C{n % 50}"))
    published = Recorder()
    scheduler = Scheduler(
        store, published, ServiceMetrics("webapp", "test"), firers=firers_posting_to(store), clock=FakeClock(T0)
    )
    for _ in range(10):
        scheduler.wake()  # an API call scheduled something, before every turn
        scheduler.step()
    assert len(scheduler.queue) + len(published.events) == READ_CHUNK * 2 and published.events


def test_the_scheduler_connection_sees_a_webapp_commit_at_once(store: Store) -> None:
    own = open_scheduler_store(store.path)
    try:
        channel = next(c for c in store.conn.execute("SELECT channel, user FROM members"))
        assert own.is_member(*channel)  # cached on the scheduler's connection
        with store.transaction() as db:  # the webapp's connection: the member leaves
            db.execute("DELETE FROM members WHERE channel = ? AND user = ?", channel)
        assert not own.is_member(*channel)  # seen by the next check, not 0.1 s later
    finally:
        own.close()


def test_the_duty_cycle_rests_as_long_as_the_batch_took_cpu_not_wall_time(store: Store) -> None:
    clock = FakeClock(T0)
    with store.transaction():
        for n in range(4):
            add_due(store, item(f"i{n}", lane=f"C{n}"))
    cpu = iter([10.0, 10.004])  # the batch took 4 ms of the loop thread's CPU (whatever the wall time)
    scheduler = Scheduler(
        store,
        Recorder(),
        ServiceMetrics("webapp", "test"),
        firers=firers_posting_to(store),
        rate_per_s=1e6,
        batch_max=2,
        clock=clock,
        cpu_clock=lambda: next(cpu),
        duty_cycle=0.5,
    )
    assert scheduler.step() == pytest.approx(0.004)  # half the loop's work at most: rest as long as it took
    assert len(scheduler.queue) == 2
