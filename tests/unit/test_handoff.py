"""webapp_stub.handoff: the ordered outbox, without sockets (a fake sender)."""

from __future__ import annotations

import asyncio
import threading
import time
from collections import defaultdict
from collections.abc import Awaitable
from typing import Any

import pytest

import webapp_stub.handoff as handoff_module
from services.errors import ConnectionLost, FrameTooLarge, NoOwner, PeerError, RequestTimeout
from services.metrics import ServiceMetrics
from webapp_stub.commit import GroupCommit
from webapp_stub.database import EventClock
from webapp_stub.handoff import (
    HANDOFF_MARK,
    MARK_MARGIN_S,
    Handoff,
    Outbox,
    pub_message,
    refusal_of,
    replay_from_mark,
    write_mark,
)
from webapp_stub.seed import seed_demo
from webapp_stub.store import Event, Store
from webapp_stub.wal_fsync import wal_path_of


def ev(channel: str, seq: int, ctl: dict[str, Any] | None = None) -> Event:
    return Event(channel, seq, f'{{"type":"message","n":{seq}}}', ctl, 1_700_000_000.0 + seq)


def events(n: int, channels: tuple[str, ...] = ("C1", "C2", "U1")) -> list[Event]:
    seqs: dict[str, int] = defaultdict(int)
    out = []
    for i in range(n):
        ch = channels[i % len(channels)]
        seqs[ch] += 1
        out.append(ev(ch, seqs[ch]))
    return out


# -- the sans-I/O window ----------------------------------------------------------------


def test_pub_message_shape() -> None:
    plain = pub_message(ev("C1", 3))
    assert plain == {
        "op": "pub",
        "ch": "C1",
        "seq": 3,
        "json": b'{"type":"message","n":3}',
        "t0": 1_700_000_003.0,
        "eid": "C1:3",
    }
    assert "ctl" not in plain
    assert pub_message(ev("U1", 1, {"join": "C9", "since": 4}))["ctl"] == {"join": "C9", "since": 4}


def test_window_takes_in_order_and_bounded() -> None:
    box = Outbox(max_in_flight=3)
    for e in events(5):
        box.append(e)
    first = box.take()
    assert [x.event.eid for x in first] == ["C1:1", "C2:1", "U1:1"]
    assert box.take() == [] and not box.sendable
    box.ack(first[1])  # out-of-order ack: head not acknowledged, window does not move
    assert box.take() == [] and len(box) == 5
    box.ack(first[0])  # head and the acked one behind it pop: two slots open
    assert len(box) == 3
    assert [x.event.eid for x in box.take()] == ["C1:2", "C2:2"]


def test_fail_rewinds_from_oldest_unacked_once_per_epoch() -> None:
    box = Outbox(max_in_flight=4)
    for e in events(6):
        box.append(e)
    sent = box.take()
    epoch = box.epoch
    box.ack(sent[0])
    box.ack(sent[2])  # acked, but behind an unacked one
    assert box.fail(epoch) is True
    assert box.fail(epoch) is False  # the other failures of that attempt change nothing
    resend = box.take()
    # from the oldest unacknowledged, in order, skipping what was acknowledged
    assert [x.event.eid for x in resend] == ["C2:1", "C1:2", "C2:2"]
    assert [x.attempts for x in resend] == [2, 2, 1]
    box.ack(sent[1])  # a late reply to the first attempt still counts
    assert [e.eid for e in box.pending()] == ["C1:2", "C2:2", "U1:2"]


# -- the loop, with a fake sender -----------------------------------------------------------


class FakeSender:
    """Records every pub; can fail chosen events once, or be down."""

    def __init__(self) -> None:
        self.epoch_of: Any = lambda: 0  # set to the outbox's epoch by the test
        self.sent: list[tuple[int, str]] = []  # (epoch at send time, eid)
        self.applied: list[str] = []
        self.fail_once: dict[str, BaseException] = {}
        self.refuse: dict[str, BaseException] = {}  # fails every time, until removed
        self.script: dict[str, list[BaseException]] = {}  # fails with these, in turn, then succeeds
        self.up = asyncio.Event()
        self.up.set()
        self.failures: list[BaseException] = []
        self.concurrent = 0
        self.max_concurrent = 0
        self.batches: list[int] = []  # events per pubs request

    async def ready(self, timeout_s: float) -> bool:
        try:
            await asyncio.wait_for(self.up.wait(), timeout_s)
        except TimeoutError:
            return False
        return True

    @property
    def connected(self) -> bool:
        return self.up.is_set()

    def send(self, message: dict[str, Any], timeout_s: float) -> Awaitable[Any]:
        if message["op"] == "pubs":  # one request, one result per event (as an Admin Server answers)
            eids = [item["eid"] for item in message["evs"]]
            for eid in eids:  # the encoder refuses the whole frame before anything is written
                if isinstance(self.refuse.get(eid), FrameTooLarge):
                    raise FrameTooLarge(5_000_000, 4_194_304)
            self.batches.append(len(eids))
            self.sent.extend((self.epoch_of(), eid) for eid in eids)
            return self._batch_outcome(eids)
        eid = message["eid"]
        self.sent.append((self.epoch_of(), eid))  # on the wire at once, as AdminServerLink's is
        return self._outcome(eid)

    async def _batch_outcome(self, eids: list[str]) -> dict[str, Any]:
        """Each event's outcome in order, all in one turn (as a channel server applies a
        batch); an error that is not the event's own (a lost link, a timeout) fails the
        whole request, after the events before it were applied."""
        self.concurrent += 1
        self.max_concurrent = max(self.max_concurrent, self.concurrent)
        try:
            await asyncio.sleep(0)  # wait-ok: let other sends overlap, as on a real pipelined link
            results: list[str] = []
            for eid in eids:
                try:
                    self._apply(eid)
                except PeerError as exc:
                    results.append(exc.code)
                    continue
                results.append("ok")
            return {"op": "ok", "res": results}
        finally:
            self.concurrent -= 1

    async def _outcome(self, eid: str) -> None:
        self.concurrent += 1
        self.max_concurrent = max(self.max_concurrent, self.concurrent)
        try:
            await asyncio.sleep(0)  # wait-ok: let other sends overlap, as on a real pipelined link
            self._apply(eid)
        finally:
            self.concurrent -= 1

    def _apply(self, eid: str) -> None:
        if not self.up.is_set():
            raise ConnectionLost("down")
        script = self.script.get(eid)
        error = self.fail_once.pop(eid, None) or self.refuse.get(eid) or (script.pop(0) if script else None)
        if error is not None:
            raise error
        self.applied.append(eid)

    def failed(self, error: BaseException) -> None:
        self.failures.append(error)

    async def close(self) -> None:
        pass


def per_channel(eids: list[str]) -> dict[str, list[int]]:
    out: dict[str, list[int]] = defaultdict(list)
    for eid in eids:
        ch, seq = eid.split(":")
        out[ch].append(int(seq))
    return out


def queue_index(eid: str, channels: tuple[str, ...] = ("C1", "C2", "U1")) -> int:
    """Where :func:`events` put ``eid`` in the queue."""
    ch, seq = eid.split(":")
    return (int(seq) - 1) * len(channels) + channels.index(ch)


def sends_in_queue_order(sent: list[tuple[int, str]]) -> bool:
    """Within each attempt (epoch) pubs went out in queue order: never reordered."""
    by_epoch: dict[int, list[int]] = defaultdict(list)
    for epoch, eid in sent:
        by_epoch[epoch].append(queue_index(eid))
    return all(idx == sorted(idx) and len(set(idx)) == len(idx) for idx in by_epoch.values())


BATCHING = True  # set by the autouse fixture below: every test runs with pubs batches and with single pubs


@pytest.fixture(autouse=True, params=[True, False], ids=["pubs", "pub"])
def batching(request: pytest.FixtureRequest) -> Any:
    global BATCHING
    BATCHING = request.param
    yield request.param
    BATCHING = True


def make_handoff(sender: FakeSender, **kwargs: Any) -> Handoff:
    kwargs.setdefault("batching", BATCHING)
    handoff = Handoff(sender, **kwargs)
    sender.epoch_of = lambda: handoff.outbox.epoch
    return handoff


@pytest.fixture
def sender() -> FakeSender:
    return FakeSender()


async def test_delivers_everything_in_order_within_the_window(sender: FakeSender) -> None:
    metrics = ServiceMetrics("webapp", "test")
    handoff = make_handoff(sender, metrics=metrics, max_in_flight=8)
    handoff.start()
    batch = events(500)
    for i in range(0, 500, 50):
        handoff.publish(batch[i : i + 50])
    assert await handoff.flush(5.0)
    assert sender.applied == [e.eid for e in batch]  # no failures: exactly once, in order
    if BATCHING:  # the window's events leave together, one request for many
        assert max(sender.batches) == 8 and len(sender.batches) < 500 / 4
    else:
        assert 1 < sender.max_concurrent <= 8
    assert handoff.delivered == 500 and handoff.retries == 0 and len(handoff) == 0
    text = metrics.render().decode()
    assert "rtm_webapp_handoff_queue_depth 0.0" in text
    assert "rtm_webapp_handoff_delivered_total 500.0" in text
    await handoff.close()


@pytest.mark.parametrize("error", [RequestTimeout("slow"), ConnectionLost("gone"), PeerError("unavailable", {})])
async def test_failure_resends_from_oldest_unacked(sender: FakeSender, error: BaseException) -> None:
    handoff = make_handoff(sender, max_in_flight=16, retry_initial_s=0.001, retry_max_s=0.005)
    batch = events(60)
    failing = batch[20].eid
    sender.fail_once[failing] = error
    handoff.start()
    handoff.publish(batch)
    assert await handoff.flush(5.0)
    assert set(sender.applied) == {e.eid for e in batch}  # nothing dropped
    assert handoff.retries == 1 and len(sender.failures) == 1  # told to move to the next AS
    assert type(sender.failures[0]) is type(error) and str(sender.failures[0]) == str(error)
    assert sends_in_queue_order(sender.sent)
    # the second attempt starts at the oldest unacknowledged event: the failed one, or with
    # pubs, the first of its batch when the whole request failed (the ones before it are resent
    # and the channel server drops them as duplicates)
    resent = [eid for epoch, eid in sender.sent if epoch == 1][0]
    if BATCHING:
        assert queue_index(resent) <= queue_index(failing)
    else:
        assert resent == failing
    assert sender.applied.count(failing) == 1
    await handoff.close()


async def test_waits_while_down_then_delivers_in_order(sender: FakeSender) -> None:
    handoff = make_handoff(sender, max_in_flight=32, retry_initial_s=0.001, retry_max_s=0.01)
    handoff.start()
    sender.up.clear()
    batch = events(100)
    handoff.publish(batch[:40])
    assert not await handoff.flush(0.2)  # nothing reachable: the queue waits, nothing lost
    handoff.publish(batch[40:])
    assert len(handoff) == 100 and sender.applied == []
    sender.up.set()
    assert await handoff.flush(5.0)
    assert sender.applied == [e.eid for e in batch]
    await handoff.close()


async def test_repeated_failures_never_drop_or_reorder(sender: FakeSender) -> None:
    handoff = make_handoff(sender, max_in_flight=8, retry_initial_s=0.001, retry_max_s=0.002)
    batch = events(120)
    for i in range(5, 120, 17):
        sender.fail_once[batch[i].eid] = RequestTimeout("flaky")
    handoff.start()
    handoff.publish(batch)
    assert await handoff.flush(5.0)
    assert set(sender.applied) == {e.eid for e in batch}
    assert sends_in_queue_order(sender.sent)
    assert handoff.retries == 7
    await handoff.close()


async def test_publish_writes_at_once_when_the_link_is_up(sender: FakeSender) -> None:
    handoff = make_handoff(sender, max_in_flight=4)
    handoff.start()
    batch = events(6)
    handoff.publish(batch[:3])
    # on the wire before publish returns: before the webapp writes the HTTP reply
    assert [eid for _, eid in sender.sent] == [e.eid for e in batch[:3]]
    handoff.publish(batch[3:])
    assert len(sender.sent) == 4  # the window (4) is full: the rest waits for acknowledgements
    assert await handoff.flush(5.0)
    assert sender.applied == [e.eid for e in batch]
    assert sends_in_queue_order(sender.sent)
    await handoff.close()


async def test_paced_what_is_published_within_the_interval_goes_out_together(sender: FakeSender) -> None:
    """Under load (commit_pacer.handoff_interval_s) a send waits until the interval has passed since
    the last one, and takes everything published meanwhile: several commits in one pubs."""
    hold_s = 0.3
    handoff = make_handoff(sender, interval_s=lambda: hold_s)
    handoff.start()
    batch = events(9)
    started = time.monotonic()
    handoff.publish(batch[:3])
    assert len(sender.sent) == 3  # nothing was sent before: at once
    handoff.publish(batch[3:6])
    handoff.publish(batch[6:])
    assert len(sender.sent) == 3  # held, not written by publish
    await asyncio.wait_for(_until(lambda: len(sender.sent) == 9), 5.0)
    assert time.monotonic() - started >= hold_s
    if BATCHING:
        assert sender.batches == [3, 6]  # the two later publishes in one pubs
    assert await handoff.flush(5.0)
    assert sender.applied == [e.eid for e in batch]
    assert sends_in_queue_order(sender.sent)
    await handoff.close()


async def test_paced_a_held_send_goes_at_once_when_enough_events_wait(sender: FakeSender) -> None:
    """However long the interval, a held send goes as soon as ``batch_events`` events wait: past
    that size a pubs gains little from waiting (commit_pacer.HANDOFF_BATCH_EVENTS)."""
    handoff = make_handoff(sender, interval_s=lambda: 3600.0, batch_events=5)
    handoff.start()
    batch = events(8)
    handoff.publish(batch[:3])
    assert len(sender.sent) == 3  # nothing was sent before: at once
    handoff.publish(batch[3:5])
    assert len(sender.sent) == 3  # 2 wait, fewer than 5: held
    handoff.publish(batch[5:8])
    assert len(sender.sent) == 8  # 5 wait: sent by publish itself, not after the hour
    if BATCHING:
        assert sender.batches == [3, 5]
    assert await handoff.flush(5.0)
    assert sender.applied == [e.eid for e in batch]
    await handoff.close()


@pytest.mark.parametrize("interval", [float("nan"), -1.0, "fails"])
async def test_an_interval_that_fails_or_is_not_a_hold_paces_nothing(sender: FakeSender, interval: Any) -> None:
    def interval_s() -> float:
        if interval == "fails":
            raise RuntimeError("no rate")
        return float(interval)

    handoff = make_handoff(sender, interval_s=interval_s)
    handoff.start()
    batch = events(4)
    handoff.publish(batch[:2])
    handoff.publish(batch[2:])  # not held: sent by publish, as without pacing
    assert len(sender.sent) == 4
    assert await handoff.flush(5.0)
    await handoff.close()


async def test_an_endless_interval_holds_no_longer_than_its_bound(
    sender: FakeSender, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(handoff_module, "MAX_HANDOFF_INTERVAL_S", 0.2)  # the bound, made short for the test
    handoff = make_handoff(sender, interval_s=lambda: float("inf"))
    handoff.start()
    batch = events(2)
    handoff.publish(batch[:1])
    handoff.publish(batch[1:])
    assert len(sender.sent) == 1  # held...
    assert await handoff.flush(5.0)  # ...and sent within the bound, not never
    await handoff.close()


async def test_publish_while_down_or_failing_leaves_sending_to_the_loop(sender: FakeSender) -> None:
    handoff = make_handoff(sender, max_in_flight=8, retry_initial_s=0.05, retry_max_s=0.05)
    handoff.start()
    sender.up.clear()
    handoff.publish(events(1, ("C1",)))
    assert sender.sent == []  # down: nothing is written, the loop waits for the link
    sender.up.set()
    assert await handoff.flush(5.0)
    batch = [ev("C2", n) for n in range(1, 4)]
    sender.fail_once[batch[0].eid] = RequestTimeout("slow")
    handoff.publish(batch[:1])
    await asyncio.wait_for(_until(lambda: handoff.retries == 1), 5.0)
    written = len(sender.sent)
    handoff.publish(batch[1:])  # failing: the loop resends after its backoff, in order
    assert len(sender.sent) == written
    assert await handoff.flush(5.0)
    assert sender.applied[-3:] == [e.eid for e in batch]
    assert sends_in_queue_order(sender.sent)
    await handoff.close()


async def _until(predicate: Any) -> None:
    while not predicate():
        await asyncio.sleep(0)  # wait-ok: bounded by the caller's wait_for


async def test_close_keeps_unsent_events_reported(sender: FakeSender) -> None:
    handoff = make_handoff(sender, max_in_flight=4)
    sender.up.clear()
    handoff.start()
    handoff.publish(events(10))
    assert not await handoff.flush(0.05)
    await handoff.close()  # returns promptly although nothing was delivered
    assert len(handoff.outbox.pending()) == 10


async def test_restart_replays_from_the_mark(tmp_path: Any, sender: FakeSender) -> None:
    now = [1_700_000_000.0]
    store = Store(str(tmp_path), clock=lambda: now[0])
    seed = seed_demo(store)
    alice, general = store.user(seed["users"][0]["id"]), store.channel(seed["channels"][0]["id"])
    first = make_handoff(sender)
    assert replay_from_mark(store, first, now[0]) == 0  # first start: nothing to replay
    assert store.get_mark(HANDOFF_MARK) == now[0] - MARK_MARGIN_S
    old_event = store.post_message(general, alice, "acknowledged long ago")[1]
    now[0] += 60
    write_mark(store, first, now[0])  # empty outbox: everything so far was acknowledged
    now[0] += 60
    pending = [store.post_message(general, alice, f"pending {i}")[1] for i in range(3)]
    first.publish(pending)  # never sent: the process "crashes" here
    write_mark(store, first, now[0] + 30)
    assert store.get_mark(HANDOFF_MARK) == pending[0].t0 - MARK_MARGIN_S

    second = make_handoff(sender)
    assert replay_from_mark(store, second, now[0]) == 3
    assert [e.eid for e in second.outbox.pending()] == [e.eid for e in pending]
    assert old_event.eid not in [e.eid for e in second.outbox.pending()]
    second.start()
    assert await second.flush(5.0)
    assert sender.applied == [e.eid for e in pending]
    await second.close()
    store.close()


async def test_the_mark_stays_below_committed_events_that_wait_for_their_fsync(
    tmp_path: Any, sender: FakeSender
) -> None:
    """A fired scheduled message is committed (no fsync) and waits for the WAL's fsync before it
    joins the outbox; a slow disk holds it there past the mark's interval. The mark must not pass
    it: a crash then (its commit survives in the WAL) would leave it out of the restart's replay,
    committed, marked fired, and never handed off."""
    now = [1_700_000_000.0]
    store = Store(str(tmp_path), clock=lambda: now[0])
    seed = seed_demo(store)
    alice, general = seed["users"][0]["id"], seed["channels"][0]["id"]
    first = make_handoff(sender)
    replay_from_mark(store, first, now[0])
    now[0] += 60
    write_mark(store, first, now[0])  # empty outbox: everything so far was acknowledged
    sync = threading.Event()
    commits = GroupCommit(store, first, wal_path=wal_path_of(store.path), sync_wal=lambda path: _held(sync))
    fired = Store(store.path, synchronous="NORMAL", clock=lambda: now[0])  # the scheduler's connection
    due = fired.post_message(fired.channel(general), fired.user(alice), "due now")[1]
    commits.publish_after_sync([due])  # on its way to the outbox once the WAL is on disk
    assert not first.outbox and commits.oldest_t0() == due.t0
    now[0] += 60  # the fsync is slow; the mark loop runs meanwhile
    write_mark(store, first, now[0], commits.oldest_t0())
    assert store.get_mark(HANDOFF_MARK) == due.t0 - MARK_MARGIN_S

    # The process dies here, before the fsync ends; the restart replays from the mark.
    second = make_handoff(sender)
    replay_from_mark(store, second, now[0])
    assert [e.eid for e in second.outbox.pending()] == [due.eid]
    sync.set()
    commits.close()
    fired.close()
    store.close()


def _held(release: threading.Event) -> None:
    assert release.wait(10.0), "the test never released the fsync"


async def test_events_written_after_a_mark_are_replayed_even_when_the_wall_clock_steps_back(
    tmp_path: Any, sender: FakeSender
) -> None:
    """A wall clock stepped back by more than MARK_MARGIN_S after a mark must not stamp new events
    below it: a crash before their hand-off would leave them out of the replay (committed,
    answered ok, never sent). Events of the scheduler's connection share the webapp's clock."""
    now = [1_700_000_000.0]
    store = Store(str(tmp_path), clock=lambda: now[0])
    scheduler_store = Store(str(tmp_path), clock=lambda: now[0], event_clock=store.event_clock)
    seed = seed_demo(store)
    alice, general = store.user(seed["users"][0]["id"]), store.channel(seed["channels"][0]["id"])
    first = make_handoff(sender)
    replay_from_mark(store, first, now[0])
    store.post_message(general, alice, "acknowledged")
    now[0] += 60
    write_mark(store, first, now[0])  # empty outbox: everything so far was acknowledged
    now[0] -= 30  # NTP steps the clock back, by more than MARK_MARGIN_S
    pending = [store.post_message(general, alice, "after the step")[1]]
    pending.append(scheduler_store.post_message(general, alice, "scheduled, after the step")[1])
    first.publish(pending)  # never sent: the process "crashes" here
    mark = store.get_mark(HANDOFF_MARK)
    assert mark is not None and all(e.t0 >= mark for e in pending)

    second = make_handoff(sender)
    assert replay_from_mark(store, second, now[0]) == 2
    assert [e.eid for e in second.outbox.pending()] == [e.eid for e in pending]
    await second.close()
    scheduler_store.close()
    store.close()
    # a restart goes on from the newest event stamped, not from the stepped-back clock
    reopened = Store(str(tmp_path), clock=lambda: now[0])
    assert reopened.event_clock() == max(e.t0 for e in pending)
    reopened.close()


def test_the_event_clock_never_goes_back_and_holds_what_it_is_told() -> None:
    now = [100.0]
    clock = EventClock(lambda: now[0])
    assert clock() == 100.0
    now[0] = 90.0
    assert clock() == 100.0
    clock.hold_at_least(120.0)
    assert clock() == 120.0
    now[0] = 130.0
    assert clock() == 130.0
    clock.hold_at_least(110.0)  # below what it gave: no change
    now[0] = 125.0
    assert clock() == 130.0


async def test_the_send_loop_outlives_an_unexpected_error(sender: FakeSender) -> None:
    """The one task that resends must not die of an error nobody foresaw: it backs off and goes on."""
    handoff = make_handoff(sender)
    broken = [True]
    ready = sender.ready

    async def ready_once_broken(timeout_s: float) -> bool:
        if broken[0]:
            broken[0] = False
            raise RuntimeError("unforeseen")
        return await ready(timeout_s)

    sender.ready = ready_once_broken  # type: ignore[method-assign]
    sender.up.clear()  # down: publish() leaves the events to the loop
    handoff.start()
    batch = events(5)
    handoff.publish(batch)
    sender.up.set()
    assert await handoff.flush(5.0)
    assert not broken[0]
    assert sender.applied == [e.eid for e in batch]
    await handoff.close()


# -- dead letters: no head-of-line poison ------------------------------------------------------


class FakeDeadLetters:
    """Records what the hand-off parks and resolves (the store's side is tested in test_store)."""

    def __init__(self) -> None:
        self.parked: list[tuple[str, str, int]] = []  # (eid, reason, refusals)
        self.resolved: list[str] = []

    def park_event(self, event: Event, reason: str, detail: str, refusals: int) -> None:
        self.parked.append((event.eid, reason, refusals))

    def resolve_dead_letter(self, channel: str, seq: int) -> None:
        self.resolved.append(f"{channel}:{seq}")


def fast(**kwargs: Any) -> dict[str, Any]:
    return {"retry_initial_s": 0.001, "retry_max_s": 0.004, **kwargs}


@pytest.mark.parametrize(
    ("error", "reason"),
    [
        (PeerError("bad_request", {"code": "bad_request"}), "bad_request"),
        (PeerError("internal", {}), "internal"),
        (PeerError("some_new_validation_code", {}), "some_new_validation_code"),
        (FrameTooLarge(5_000_000, 4_194_304), "too_large"),
    ],
)
async def test_refused_event_is_parked_and_everything_behind_it_moves_on(
    sender: FakeSender, error: BaseException, reason: str
) -> None:
    metrics = ServiceMetrics("webapp", "test")
    dead = FakeDeadLetters()
    handoff = make_handoff(sender, metrics=metrics, max_in_flight=8, dead_letters=dead, max_refusals=3, **fast())
    batch = events(60)
    poison = batch[10].eid  # C2:4
    sender.refuse[poison] = error
    handoff.start()
    handoff.publish(batch)
    assert await handoff.flush(5.0)
    assert dead.parked == [(poison, reason, 3)]
    assert [eid for _, eid in sender.sent].count(poison) == 3  # exactly the bounded number of attempts
    assert set(sender.applied) == {e.eid for e in batch} - {poison}
    assert sends_in_queue_order(sender.sent)
    for channel, seqs in per_channel(list(dict.fromkeys(sender.applied))).items():
        assert seqs == sorted(seqs), channel  # per-channel order kept for everything else
    assert handoff.parked == 1 and len(handoff) == 0
    label = reason if reason in ("bad_request", "internal", "too_large") else "other"
    assert f'rtm_deadletter_total{{reason="{label}"}} 1.0' in metrics.render().decode()
    await handoff.close()


@pytest.mark.parametrize(
    "error",
    [
        ConnectionLost("gone"),
        RequestTimeout("slow"),
        NoOwner("C2"),
        PeerError("unavailable", {}),
        PeerError("not_owner", {}),
    ],
)
async def test_transient_failures_wait_and_retry_in_order_never_park(sender: FakeSender, error: BaseException) -> None:
    dead = FakeDeadLetters()
    handoff = make_handoff(sender, max_in_flight=4, dead_letters=dead, max_refusals=2, **fast())
    batch = events(12)
    stuck = batch[3].eid
    sender.refuse[stuck] = error
    handoff.start()
    handoff.publish(batch)
    await asyncio.wait_for(_until(lambda: [eid for _, eid in sender.sent].count(stuck) >= 6), 5.0)
    assert dead.parked == [] and stuck not in sender.applied
    assert len(handoff) >= 9  # the head waits: nothing behind it was dropped
    del sender.refuse[stuck]
    assert await handoff.flush(5.0)
    assert set(sender.applied) == {e.eid for e in batch} and dead.parked == []
    assert sends_in_queue_order(sender.sent)
    await handoff.close()


async def test_a_different_refusal_restarts_the_count(sender: FakeSender) -> None:
    dead = FakeDeadLetters()
    handoff = make_handoff(sender, max_in_flight=2, dead_letters=dead, max_refusals=2, **fast())
    event = ev("C1", 1)
    # one bad_request, then internal twice: parked on the second identical one (third in all)
    sender.script[event.eid] = [PeerError("bad_request", {}), PeerError("internal", {}), PeerError("internal", {})]
    handoff.start()
    handoff.publish([event])
    assert await handoff.flush(5.0)
    assert dead.parked == [(event.eid, "internal", 2)] and len(sender.sent) == 3
    await handoff.close()


async def test_an_event_over_the_size_limit_is_parked_without_being_sent(sender: FakeSender) -> None:
    dead = FakeDeadLetters()
    handoff = make_handoff(sender, max_in_flight=4, dead_letters=dead, max_event_bytes=100, **fast())
    big = Event("C1", 2, '{"type":"message","text":"' + "x" * 200 + '"}', None, 1_700_000_000.0)
    batch = [ev("C1", 1), big, ev("C1", 3), ev("C2", 1)]
    handoff.start()
    handoff.publish(batch)
    assert await handoff.flush(5.0)
    assert "C1:2" not in [eid for _, eid in sender.sent]  # never on the wire
    assert dead.parked == [("C1:2", "too_large", 1)]
    assert sender.applied == ["C1:1", "C1:3", "C2:1"]


async def test_an_event_the_encoder_refuses_is_parked(sender: FakeSender) -> None:
    dead = FakeDeadLetters()
    handoff = make_handoff(sender, max_in_flight=4, dead_letters=dead, max_refusals=2, **fast())
    original = sender.send

    def send(message: dict[str, Any], timeout_s: float) -> Awaitable[Any]:
        if any(item["eid"] == "C1:1" for item in message.get("evs", [message])):
            raise OverflowError("int too big to convert")  # what msgpack raises, before writing anything
        return original(message, timeout_s)

    sender.send = send  # type: ignore[method-assign]
    handoff.start()
    handoff.publish([ev("C1", 1), ev("C1", 2)])
    assert await handoff.flush(5.0)
    assert dead.parked == [("C1:1", "unencodable", 2)] and sender.applied == ["C1:2"]


async def test_redrive_delivers_a_parked_event_and_resolves_it(sender: FakeSender) -> None:
    metrics = ServiceMetrics("webapp", "test")
    dead = FakeDeadLetters()
    handoff = make_handoff(sender, metrics=metrics, dead_letters=dead, max_refusals=1, **fast())
    event = ev("C1", 1)
    sender.refuse[event.eid] = PeerError("bad_request", {})
    handoff.start()
    handoff.publish([event, ev("C1", 2)])
    assert await handoff.flush(5.0)
    assert dead.parked == [("C1:1", "bad_request", 1)]
    handoff.redrive([event])  # refused again: parked again
    assert await handoff.flush(5.0)
    assert dead.parked[-1] == ("C1:1", "bad_request", 1) and dead.resolved == []
    del sender.refuse[event.eid]  # the cause is fixed
    handoff.redrive([event])
    assert await handoff.flush(5.0)
    assert dead.resolved == ["C1:1"] and sender.applied == ["C1:2", "C1:1"]
    text = metrics.render().decode()
    assert 'rtm_deadletter_redriven_total{outcome="delivered"} 1.0' in text
    assert 'rtm_deadletter_redriven_total{outcome="parked_again"} 1.0' in text
    await handoff.close()


async def test_saturated_while_the_queue_is_at_its_bound(sender: FakeSender) -> None:
    handoff = make_handoff(sender, max_queue_events=5, **fast())
    sender.up.clear()
    handoff.start()
    handoff.publish(events(4))
    assert not handoff.saturated
    handoff.publish(events(1, ("C9",)))
    assert handoff.saturated  # the Web API refuses new writes now (429), nothing is dropped here
    sender.up.set()
    assert await handoff.flush(5.0)
    assert not handoff.saturated and len(sender.applied) == 5
    await handoff.close()


def test_refusal_classification() -> None:
    assert refusal_of(PeerError("bad_request", {})) == "bad_request"
    assert refusal_of(FrameTooLarge(10, 5)) == "too_large"
    assert refusal_of(TypeError("can not serialize")) == "unencodable"
    for transient in ("unavailable", "not_owner", "no_owner", "forbidden", "unknown_op", "overloaded"):
        assert refusal_of(PeerError(transient, {})) is None, transient
    for error in (ConnectionLost("x"), RequestTimeout("x"), NoOwner("x"), RuntimeError("x")):
        assert refusal_of(error) is None


async def test_restart_replay_skips_parked_events(tmp_path: Any, sender: FakeSender) -> None:
    store = Store(str(tmp_path))
    seed = seed_demo(store)
    alice, general = store.user(seed["users"][0]["id"]), store.channel(seed["channels"][0]["id"])
    store.set_mark(HANDOFF_MARK, 0.0)
    posted = [store.post_message(general, alice, f"m{i}")[1] for i in range(3)]
    store.park_event(posted[1], "bad_request", "refused", 3)
    handoff = make_handoff(sender)
    replay_from_mark(store, handoff, posted[-1].t0)
    queued = [e.eid for e in handoff.outbox.pending()]
    assert posted[0].eid in queued and posted[2].eid in queued and posted[1].eid not in queued
    store.close()


async def test_settled_waits_for_the_events_acknowledgement_or_parking_within_its_bound(sender: FakeSender) -> None:
    """auth.revoke's wait (Handoff.settled): done once the event is acknowledged, not before; an event
    parked as a dead letter settles too; one never published gives up at the bound; no waiter stays."""
    dead = FakeDeadLetters()
    handoff = make_handoff(sender, dead_letters=dead, max_refusals=1, **fast())
    revoke, poison, never = ev("U1", 1, ctl={"revoke": "a" * 32}), ev("C2", 1), ev("C3", 1)
    sender.up.clear()  # down: nothing is acknowledged yet
    handoff.start()
    waiting = asyncio.ensure_future(handoff.settled(revoke, 5.0))
    handoff.publish([revoke])
    for _ in range(3):
        await asyncio.sleep(0)  # wait-ok: the waiter must still be waiting while the link is down
    assert not waiting.done() and revoke.eid not in sender.applied
    sender.up.set()
    assert await asyncio.wait_for(waiting, 5.0) is True and revoke.eid in sender.applied
    sender.refuse[poison.eid] = PeerError("bad_request", {})
    parked = asyncio.ensure_future(handoff.settled(poison, 5.0))
    handoff.publish([poison])
    assert await asyncio.wait_for(parked, 5.0) is True and dead.parked[0][0] == poison.eid
    assert await handoff.settled(never, 0.05) is False
    assert handoff._waiters == {}
    await handoff.close()


async def test_settled_watches_from_the_call_and_a_cancelled_wait_leaves_no_waiter(sender: FakeSender) -> None:
    """auth.revoke first waits for its event's commit, then for the fan-out: the wait must count an
    acknowledgement that came in between (registered when settled() is called, not when its task
    first runs), and a wait cancelled before it ran (the commit failed) must leave no waiter."""
    handoff = make_handoff(sender)
    revoke, failed = ev("U1", 1, ctl={"revoke": "a" * 32}), ev("U2", 1, ctl={"revoke": "b" * 32})
    handoff.start()
    fanned_out = handoff.settled(revoke, 5.0)
    handoff.publish([revoke])
    handoff._release_waiters(revoke)  # as an acknowledgement does, before anyone awaited the wait
    assert await asyncio.wait_for(fanned_out, 5.0) is True
    cancelled = handoff.settled(failed, 5.0)
    cancelled.cancel()  # before its task ran
    await asyncio.wait({cancelled}, timeout=5.0)
    await asyncio.sleep(0)  # wait-ok: the task's done callbacks run on the next loop turn
    assert handoff._waiters == {}
    await handoff.close()
