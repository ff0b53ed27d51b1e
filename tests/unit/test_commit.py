"""webapp_stub.commit: the writes of one loop turn share one commit; events go out only after it."""

from __future__ import annotations

import asyncio
import sqlite3
import threading
from pathlib import Path
from typing import Any

import pytest

from tests.support import async_wait_until
from webapp_stub.commit import NAP_AFTER_TURNS, CommitFailed, GroupCommit
from webapp_stub.seed import seed_demo
from webapp_stub.store import ApiError, Event, Store
from webapp_stub.wal_fsync import wal_path_of


class Sink:
    def __init__(self) -> None:
        self.published: list[Event] = []

    def publish(self, events: list[Event]) -> None:
        self.published.extend(events)


class RaisingSink(Sink):
    """A sink that raises on every publish (the hand-off failing unexpectedly)."""

    def publish(self, events: list[Event]) -> None:
        raise RuntimeError("the sink broke")


class RaisingOnceSink(Sink):
    """A sink that takes the first events it is given, then raises once."""

    def publish(self, events: list[Event]) -> None:
        super().publish(events)
        if len(self.published) == len(events):
            raise RuntimeError("the sink broke once")


@pytest.fixture
def store(tmp_path: Path) -> Any:
    s = Store(str(tmp_path))
    yield s
    s.close()


async def test_one_turn_one_commit_and_events_only_after_it(store: Store) -> None:
    alice, general = _team(store)
    sink = Sink()
    commits = GroupCommit(store, sink)
    before = store.last_seq(general.id)

    async def post(i: int) -> Event:
        event = store.post_message(general, alice, f"post {i}")[1]
        commits.publish([event])
        await commits.durable()
        return event

    tasks = [asyncio.ensure_future(post(i)) for i in range(20)]
    await asyncio.sleep(0)  # wait-ok: one loop turn: every task wrote, none committed yet
    assert store.in_batch and sink.published == []
    peek = Store(store.path)
    assert peek.last_seq(general.id) == before  # not visible to anyone else before the commit
    events = await asyncio.gather(*tasks)
    assert peek.last_seq(general.id) == before + 20
    peek.close()
    assert commits.batches == 1
    assert [e.seq for e in sink.published] == [before + i for i in range(1, 21)]  # commit order = seq order
    assert sink.published == list(events)
    commits.close()
    assert store.batch_opener is None


async def test_failed_write_rolls_back_alone(store: Store) -> None:
    alice, general = _team(store)
    sink = Sink()
    commits = GroupCommit(store, sink)
    ok = store.post_message(general, alice, "kept")[1]
    commits.publish([ok])
    with pytest.raises(ApiError):
        store.delete_message(general, alice, "1.000001")  # message_not_found, inside the batch
    await commits.durable()
    assert sink.published == [ok] and store.events_after(general.id, ok.seq - 1)[0] == [ok]
    commits.close()


class BrokenStore:
    """A store whose COMMIT fails (disk full), to see what callers get."""

    def __init__(self) -> None:
        self.batch_opener: Any = None
        self.in_batch = False

    def begin_batch(self) -> None:
        self.in_batch = True

    def commit_batch(self) -> None:
        self.in_batch = False
        raise sqlite3.OperationalError("database or disk is full")

    def write(self) -> None:
        if not self.in_batch:
            self.batch_opener()


async def test_a_sink_that_raises_leaves_no_caller_of_its_batch_waiting(store: Store) -> None:
    """The batch is committed (on disk) whatever the hand-off does with its events: a sink that
    raises must not leave the batch's callers waiting for ever."""
    demo = seed_demo(store)
    alice, general = store.user(demo["users"][0]["id"]), store.channel(demo["channels"][0]["id"])
    commits = GroupCommit(store, RaisingSink())
    event = store.post_message(general, alice, "committed anyway")[1]
    commits.publish([event])
    waiting = commits.pending()  # what every caller of this batch awaits
    assert waiting is not None and not waiting.done()
    with pytest.raises(RuntimeError, match="the sink broke"):
        commits.commit()
    assert waiting.done() and waiting.exception() is None
    peek = Store(store.path)
    assert peek.last_seq(general.id) == event.seq
    peek.close()
    commits.close()


async def test_a_failed_commit_fails_every_caller_and_hands_off_nothing() -> None:
    store, sink = BrokenStore(), Sink()
    commits = GroupCommit(store, sink)  # type: ignore[arg-type]
    store.write()
    commits.publish([Event("C1", 1, "{}", None, 0.0)])
    with pytest.raises(CommitFailed):
        await commits.durable()
    assert sink.published == []
    await commits.durable()  # nothing open: returns at once


async def test_window_keeps_the_batch_open_longer(store: Store) -> None:
    alice, general = _team(store)
    commits = GroupCommit(store, Sink(), window_s=0.05)
    store.post_message(general, alice, "first")
    await asyncio.sleep(0)  # wait-ok: one turn passes, the window keeps the batch open
    assert store.in_batch
    store.post_message(general, alice, "second")
    await asyncio.wait_for(commits.durable(), 5.0)
    assert commits.batches == 1 and not store.in_batch


async def test_under_load_a_batch_opened_within_the_min_interval_waits_for_it(store: Store) -> None:
    alice, general = _team(store)
    loop = asyncio.get_running_loop()
    interval_s = 0.2
    commits = GroupCommit(store, Sink(), min_interval_s=interval_s)

    def post(text: str) -> None:  # as the Web API does: the write, then its events to the batch
        commits.publish([store.post_message(general, alice, text)[1]])

    # A batch of two writes (load): it commits at the next turn, nothing committed before it.
    post("first")
    post("second")
    await asyncio.sleep(0)  # wait-ok: exactly one turn
    assert commits.batches == 1 and not store.in_batch
    first_at = loop.time()
    # Opened right after that commit: it stays open across turns until the interval has passed.
    post("third")
    for _ in range(3):
        await asyncio.sleep(0)  # wait-ok: turns pass, the interval keeps the batch open
    assert store.in_batch and commits.batches == 1
    post("fourth")  # joins the same batch
    await asyncio.wait_for(commits.durable(), 5.0)
    assert commits.batches == 2 and not store.in_batch
    assert loop.time() - first_at >= interval_s - 0.01  # the loop's clock: ms resolution under uvloop
    # Opened once the interval has passed since the last commit: commits at the next turn again.
    await asyncio.wait_for(asyncio.sleep(interval_s), 5.0)  # wait-ok: the interval itself is the subject
    post("fifth")
    await asyncio.sleep(0)  # wait-ok: exactly one turn
    assert commits.batches == 3 and not store.in_batch


async def test_under_more_load_the_paced_interval_grows_to_its_cap(store: Store) -> None:
    """The interval follows the rate of writes (webapp_stub/commit_pacer.py): with a base rate of
    one write in 1,000 s, two commits of two writes (however far apart, within seconds) take it to
    the cap."""
    alice, general = _team(store)
    loop = asyncio.get_running_loop()
    commits = GroupCommit(store, Sink(), min_interval_s=0.02, interval_cap_s=0.3, pacing_base_rate_per_s=0.001)

    def post(text: str) -> None:
        commits.publish([store.post_message(general, alice, text)[1]])

    for n in range(2):  # two commits of two writes each: load, at 100 writes per second
        post(f"first {n}")
        post(f"second {n}")
        await asyncio.wait_for(commits.durable(), 5.0)
    assert commits.batches == 2 and commits.pacer.interval_s == 0.3
    second_at = loop.time()
    post("third")  # opened right after the second commit: held for the cap, not the minimum
    await asyncio.wait_for(commits.durable(), 5.0)
    assert commits.batches == 3 and loop.time() - second_at >= 0.3 - 0.01  # uvloop's clock: ms resolution


async def test_after_a_lone_write_the_next_batch_commits_at_once(store: Store) -> None:
    """Light load: a commit of one write is no sign of load, so the next post waits for nothing."""
    alice, general = _team(store)
    commits = GroupCommit(store, Sink(), min_interval_s=10.0)

    def post(text: str) -> None:
        commits.publish([store.post_message(general, alice, text)[1]])

    for n in range(3):
        post(f"post {n}")
        await asyncio.sleep(0)  # wait-ok: exactly one turn
        assert commits.batches == n + 1 and not store.in_batch


class Naps:
    """A fake sleep that records each nap, and what had gone out before it."""

    def __init__(self, sink: Sink | None = None) -> None:
        self.naps: list[float] = []
        self.published_before: list[int] = []
        self.sink = sink

    def __call__(self, seconds: float) -> None:
        self.naps.append(seconds)
        self.published_before.append(len(self.sink.published) if self.sink else 0)


async def test_under_load_the_loop_naps_after_a_commit_until_the_next_is_due(store: Store) -> None:
    alice, general = _team(store)
    sink = Sink()
    naps = Naps(sink=sink)
    commits = GroupCommit(store, sink, min_interval_s=0.2, nap_s=0.05, sleep=naps)
    answered: list[bool] = []

    def post(text: str) -> None:
        commits.publish([store.post_message(general, alice, text)[1]])

    post("first")
    post("second")  # two writes in one turn: load
    done = commits.pending()
    assert done is not None
    done.add_done_callback(lambda f: answered.append(not naps.naps))  # the reply is written before any nap
    for _ in range(NAP_AFTER_TURNS + 3):
        await asyncio.sleep(0)  # wait-ok: the commit's turn, the turns the nap waits, then the nap's
    assert commits.batches == 1 and answered == [True]
    assert len(naps.naps) == 1 and 0 < naps.naps[0] <= 0.05  # at most nap_s, however long the interval
    assert naps.published_before == [2]  # its events were handed over before the nap
    # A lone write's commit is no sign of load: no nap after it.
    await asyncio.wait_for(asyncio.sleep(0.2), 5.0)  # wait-ok: past the interval, so the next commits at once
    post("third")
    for _ in range(NAP_AFTER_TURNS + 3):
        await asyncio.sleep(0)  # wait-ok: turns pass, as many as a nap would wait
    assert commits.batches == 2 and commits.naps == 1 and len(naps.naps) == 1


async def test_callers_that_await_durable_are_answered_before_the_nap(store: Store) -> None:
    """An aiohttp handler or an /internal/ read awaits durable() (through asyncio.shield: one more
    turn than the commit's own callbacks), and WebApi._settle writes its reply from its task's
    done-callback (one more again): both are answered before the loop naps, not after it."""
    alice, general = _team(store)
    naps = Naps()
    commits = GroupCommit(store, Sink(), min_interval_s=0.2, nap_s=0.05, sleep=naps)
    answered: list[tuple[str, int]] = []

    async def handler(text: str) -> str:
        commits.publish([store.post_message(general, alice, text)[1]])
        await commits.durable()
        answered.append(("resumed", len(naps.naps)))
        return text

    settled = asyncio.ensure_future(handler("first"))
    settled.add_done_callback(lambda t: answered.append(("done-callback", len(naps.naps))))
    awaited = asyncio.ensure_future(handler("second"))  # two writes in one turn: load
    await asyncio.wait_for(asyncio.gather(settled, awaited), 5.0)
    for _ in range(NAP_AFTER_TURNS + 3):
        await asyncio.sleep(0)  # wait-ok: past the turn the nap runs in
    assert commits.batches == 1 and len(naps.naps) == 1  # one commit, one nap ...
    assert sorted(answered) == [("done-callback", 0), ("resumed", 0), ("resumed", 0)]  # ... after every answer
    commits.close()


async def test_a_filled_batch_commits_at_the_next_turn_and_no_nap_follows(store: Store) -> None:
    """fill(): every client that could add to the batch waits in it (HttpFront.request_waits)."""
    alice, general = _team(store)
    naps = Naps()
    commits = GroupCommit(store, Sink(), min_interval_s=10.0, nap_s=0.05, sleep=naps)

    def post(text: str) -> None:
        commits.publish([store.post_message(general, alice, text)[1]])

    commits.fill()  # no batch open: nothing to do
    post("first")
    post("second")  # load: the next batch is held for the interval (10 s), and a nap follows
    for _ in range(NAP_AFTER_TURNS + 3):
        await asyncio.sleep(0)  # wait-ok: the commit's turn, the turns the nap waits, then the nap's
    assert commits.batches == 1 and len(naps.naps) == 1
    post("third")
    post("fourth")
    for _ in range(3):
        await asyncio.sleep(0)  # wait-ok: turns pass, the interval holds the batch
    assert store.in_batch and commits.batches == 1
    commits.fill()
    commits.fill()  # once is enough
    await asyncio.sleep(0)  # wait-ok: exactly one turn
    assert commits.batches == 2 and commits.fills == 1 and not store.in_batch
    for _ in range(NAP_AFTER_TURNS + 3):
        await asyncio.sleep(0)  # wait-ok: as many turns as a nap would wait
    assert len(naps.naps) == 1  # none after the filled commit
    post("fifth")  # the next batch is held again: the fill was that batch's alone
    for _ in range(3):
        await asyncio.sleep(0)  # wait-ok: turns pass, the interval holds the batch
    assert store.in_batch and commits.batches == 2
    commits.close()


@pytest.mark.parametrize("setting", ["nap off", "pacing off", "fsync thread", "no time left"])
async def test_no_nap_when_off_or_when_no_time_is_left(store: Store, setting: str) -> None:
    alice, general = _team(store)
    naps = Naps()
    options: dict[str, Any] = {"min_interval_s": 0.2, "nap_s": 0.05, "sleep": naps}
    if setting == "nap off":
        options["nap_s"] = 0.0
    elif setting == "pacing off":
        options["min_interval_s"] = 0.0
    elif setting == "fsync thread":
        options.update(wal_path=wal_path_of(store.path), sync_wal=lambda path: None, fsync_thread=True)
    else:  # saturated: the next commit is already due when the nap would start
        options["min_interval_s"] = 1e-9
    commits = GroupCommit(store, Sink(), **options)
    for text in ("first", "second"):
        commits.publish([store.post_message(general, alice, text)[1]])
    await asyncio.wait_for(commits.durable(), 5.0)
    for _ in range(NAP_AFTER_TURNS + 3):
        await asyncio.sleep(0)  # wait-ok: past the turn a nap would run in
    assert commits.batches == 1 and naps.naps == [] and commits.naps == 0
    commits.close()


# -- events committed without an fsync (the scheduler's connection) ------------------------------
class HeldSync:
    """A WAL fsync that finishes only when the test says so (it runs on a thread)."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.calls: list[str] = []

    def __call__(self, path: str) -> None:
        self.calls.append(path)
        assert self.release.wait(10.0), "the test never released the fsync"


async def test_unsynced_events_go_out_only_after_the_wal_is_synced(store: Store) -> None:
    alice, general = _team(store)
    sink, sync = Sink(), HeldSync()
    commits = GroupCommit(store, sink, wal_path=wal_path_of(store.path), sync_wal=sync)
    fired = Store(store.path, synchronous="NORMAL")  # the scheduler's connection: commits without fsync
    event = fired.post_message(fired.channel(general.id), fired.user(alice.id), "due now")[1]
    commits.publish_after_sync([event])
    await async_wait_until(lambda: _true(bool(sync.calls)), what="the fsync to start")
    assert sink.published == []  # committed, not yet on disk: nobody may see it
    sync.release.set()
    await async_wait_until(lambda: _true(sink.published == [event]), what="the event after the fsync")
    assert sync.calls == [store.path + "-wal"]
    fired.close()
    commits.close()


async def test_a_live_commit_releases_unsynced_events_first_in_seq_order(store: Store) -> None:
    alice, general = _team(store)
    sink, sync = Sink(), HeldSync()
    commits = GroupCommit(store, sink, wal_path=wal_path_of(store.path), sync_wal=sync)
    fired, due = _fired_unsynced(store, commits, alice, general)
    live = store.post_message(general, alice, "live, after it")[1]  # the next seq of the channel
    commits.publish([live])
    await commits.durable()  # its COMMIT (synchronous=FULL) synced the whole WAL, the due one's too
    assert [e.seq for e in sink.published] == [due.seq, live.seq] and live.seq == due.seq + 1
    sync.release.set()  # the thread's fsync finishing later publishes nothing twice
    await async_wait_until(lambda: _true(not commits.syncing), what="the fsync to end")
    assert sink.published == [due, live]
    fired.close()
    commits.close()


async def test_unsynced_events_are_synced_for_real(store: Store) -> None:
    alice, general = _team(store)
    sink = Sink()
    commits = GroupCommit(store, sink, wal_path=wal_path_of(store.path))  # os.fsync of the real WAL
    fired = Store(store.path, synchronous="NORMAL")
    event = fired.post_message(fired.channel(general.id), fired.user(alice.id), "due now")[1]
    commits.publish_after_sync([event])
    await async_wait_until(lambda: _true(sink.published == [event]), what="the event after a real fsync")
    fired.close()
    commits.close()


def test_wal_path_of() -> None:
    assert wal_path_of("/x/webapp.db") == "/x/webapp.db-wal"
    assert wal_path_of(":memory:") is None


async def _true(value: bool) -> bool:
    return value


async def test_unsynced_events_are_counted_until_released(store: Store) -> None:
    """The scheduler's backlog bound counts them (webapp_stub/app.py ``scheduler_backlog``)."""
    alice, general = _team(store)
    sink, sync = Sink(), HeldSync()
    commits = GroupCommit(store, sink, wal_path=wal_path_of(store.path), sync_wal=sync)
    fired = Store(store.path, synchronous="NORMAL")
    events = [fired.post_message(fired.channel(general.id), fired.user(alice.id), f"due {i}")[1] for i in range(3)]
    commits.publish_after_sync(events[:2])
    commits.publish_after_sync(events[2:])
    assert commits.unsynced == 3
    sync.release.set()
    await async_wait_until(lambda: _true(commits.unsynced == 0), what="the fsync to release them")
    assert sink.published == events
    fired.close()
    commits.close()


async def test_a_read_waits_for_unsynced_scheduler_events(store: Store) -> None:
    """Without the fsync thread too: a read (a bootstrap's seqs, a gateway's history fill) must not
    name a fired event before it is on disk. A power loss would take it back, the channel's next
    post would reuse its seq, and a gateway that started past it would drop that post as a duplicate."""
    alice, general = _team(store)
    sink, sync = Sink(), HeldSync()
    commits = GroupCommit(store, sink, wal_path=wal_path_of(store.path), sync_wal=sync)
    fired, due = _fired_unsynced(store, commits, alice, general)
    assert store.last_seq(general.id) == due.seq  # visible to the webapp's connection at once
    read = asyncio.ensure_future(commits.durable())
    await asyncio.sleep(0)  # wait-ok: one turn, for the read to run up to its wait
    await async_wait_until(lambda: _true(bool(sync.calls)), what="the fsync to start")
    assert not read.done()  # not on disk yet: the reply naming it waits
    sync.release.set()
    await asyncio.wait_for(read, 10.0)
    assert sink.published == [due]
    fired.close()
    commits.close()


async def test_a_batch_rolled_back_by_sqlite_takes_no_later_write_alone(store: Store) -> None:
    """After SQLITE_FULL or SQLITE_IOERR SQLite may roll the whole transaction back by itself. The
    batch's later writes must not then run as savepoints outside any transaction (each released
    = committed on its own) while the batch's COMMIT fails and drops their events: committed
    messages, answered internal_error, never handed off."""
    alice, general = _team(store)
    sink = Sink()
    commits = GroupCommit(store, sink)
    before = store.last_seq(general.id)
    first = store.post_message(general, alice, "first")[1]
    commits.publish([first])
    store.conn.execute("ROLLBACK")  # what SQLite does on its own after some I/O errors mid-transaction
    with pytest.raises(sqlite3.OperationalError):
        store.post_message(general, alice, "second")
    with pytest.raises(CommitFailed):
        await commits.durable()
    assert sink.published == []
    peek = Store(store.path)
    assert peek.last_seq(general.id) == before  # nothing of the lost batch is in the database
    peek.close()
    after = store.post_message(general, alice, "after")[1]  # the next batch works as usual
    commits.publish([after])
    await commits.durable()
    assert sink.published == [after] and after.seq == before + 1
    commits.close()


# -- the WAL's fsync on a dedicated thread (fsync_thread=True, --commit-fsync-thread; off by default) --
def _fired_unsynced(store: Store, commits: GroupCommit, alice: Any, general: Any) -> tuple[Store, Event]:
    """The scheduler's connection (its commits do not fsync) and one message it committed, handed
    to ``commits`` to go out once the WAL is on disk."""
    fired = Store(store.path, synchronous="NORMAL")
    due = fired.post_message(fired.channel(general.id), fired.user(alice.id), "due now")[1]
    commits.publish_after_sync([due])
    return fired, due


def _team(store: Store) -> tuple[Any, Any]:
    demo = seed_demo(store)
    return store.user(demo["users"][0]["id"]), store.channel(demo["channels"][0]["id"])


class CountingSync(HeldSync):
    """A held fsync that can be released one call at a time, or fail."""

    def __init__(self) -> None:
        super().__init__()
        self.fail_next = False

    def __call__(self, path: str) -> None:
        super().__call__(path)
        self.release.clear()  # the next call waits for its own release
        if self.fail_next:
            self.fail_next = False
            raise OSError(5, "Input/output error")


async def test_with_the_fsync_thread_callers_and_events_wait_for_the_fsync_not_the_loop(store: Store) -> None:
    alice, general = _team(store)
    sink, sync = Sink(), CountingSync()
    commits = GroupCommit(store, sink, wal_path=wal_path_of(store.path), sync_wal=sync, fsync_thread=True)
    assert store.conn.execute("PRAGMA synchronous").fetchone()[0] == 1  # NORMAL: the thread fsyncs

    async def post(text: str) -> Event:
        event = store.post_message(general, alice, text)[1]
        commits.publish([event])
        await commits.durable()
        return event

    first = asyncio.ensure_future(post("first"))
    await async_wait_until(lambda: _true(len(sync.calls) == 1), what="the first batch's fsync to start")
    assert commits.batches == 1 and not first.done() and sink.published == []  # committed, not on disk yet
    peek = Store(store.path)
    first_seq = peek.last_seq(general.id)  # visible to other connections, but nothing was said about it
    # The loop is free while the fsync runs: two more batches commit behind it, in order.
    second = asyncio.ensure_future(post("second"))
    await async_wait_until(lambda: _true(commits.batches == 2), what="the second batch's commit")
    third = asyncio.ensure_future(post("third"))
    await async_wait_until(lambda: _true(commits.batches == 3), what="the third batch's commit")
    assert len(sync.calls) == 1 and commits.unsynced == 3
    # A read waits for the fsync of everything committed before it.
    read = asyncio.ensure_future(commits.durable())
    sync.release.set()  # the first fsync ends: only the first batch is known to be on disk
    assert (await first).seq == first_seq
    await async_wait_until(lambda: _true(len(sync.calls) == 2), what="one fsync for the two batches behind it")
    assert sink.published == [first.result()]
    assert not second.done() and not third.done() and not read.done()
    sync.release.set()
    events = [await second, await third]
    await read
    assert sink.published == [first.result(), *events]
    assert [e.seq for e in sink.published] == [first_seq, first_seq + 1, first_seq + 2]
    assert commits.syncs == 2 and commits.unsynced == 0
    peek.close()
    commits.close()
    assert store.conn.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL again for what follows


async def test_with_the_fsync_thread_a_failed_fsync_fails_its_callers_and_delays_its_events(store: Store) -> None:
    alice, general = _team(store)
    sink, sync = Sink(), CountingSync()
    commits = GroupCommit(store, sink, wal_path=wal_path_of(store.path), sync_wal=sync, fsync_thread=True)
    sync.fail_next = True
    sync.release.set()
    event = store.post_message(general, alice, "lost fsync")[1]
    commits.publish([event])
    with pytest.raises(CommitFailed):  # not known to be on disk: not acknowledged
        await asyncio.wait_for(commits.durable(), 5.0)
    assert sink.published == [] and commits.unsynced == 1 and commits.syncing
    reader = asyncio.ensure_future(commits.durable())  # waits for the retry, not failed by the old fsync
    await async_wait_until(lambda: _true(len(sync.calls) == 2), what="the retried fsync")
    sync.release.set()
    await asyncio.wait_for(reader, 5.0)
    assert sink.published == [event] and commits.unsynced == 0
    commits.close()


async def test_with_the_fsync_thread_scheduler_events_keep_their_place(store: Store) -> None:
    alice, general = _team(store)
    sink, sync = Sink(), CountingSync()
    commits = GroupCommit(store, sink, wal_path=wal_path_of(store.path), sync_wal=sync, fsync_thread=True)
    fired = Store(store.path, synchronous="NORMAL")  # the scheduler's connection
    due = fired.post_message(fired.channel(general.id), fired.user(alice.id), "due")[1]
    commits.publish_after_sync([due])
    live = store.post_message(general, alice, "live")[1]
    commits.publish([live])
    waiting = asyncio.ensure_future(commits.durable())
    await async_wait_until(lambda: _true(commits.batches == 1), what="the live commit")
    sync.release.set()  # the first fsync (started for the due event) does not cover the live commit
    await async_wait_until(lambda: _true(len(sync.calls) == 2), what="the live commit's own fsync")
    assert sink.published == [due] and not waiting.done()
    sync.release.set()
    await asyncio.wait_for(waiting, 5.0)
    assert sink.published == [due, live] and live.seq == due.seq + 1
    fired.close()
    commits.close()


async def test_with_the_fsync_thread_close_syncs_and_hands_over_what_waits(store: Store) -> None:
    alice, general = _team(store)
    sink = Sink()
    commits = GroupCommit(store, sink, wal_path=wal_path_of(store.path), fsync_thread=True)  # real os.fsync
    event = store.post_message(general, alice, "at close")[1]
    commits.publish([event])
    waiting = asyncio.ensure_future(commits.durable())
    commits.close()  # commits the open batch and fsyncs on this thread
    await asyncio.wait_for(waiting, 5.0)
    assert sink.published == [event] and commits.unsynced == 0


async def test_with_the_fsync_thread_real_fsyncs_keep_seq_order(store: Store) -> None:
    alice, general = _team(store)
    sink = Sink()
    commits = GroupCommit(store, sink, wal_path=wal_path_of(store.path), fsync_thread=True)

    async def post(i: int) -> Event:
        event = store.post_message(general, alice, f"post {i}")[1]
        commits.publish([event])
        await commits.durable()
        return event

    events = []
    for _ in range(5):  # batches that overlap fsyncs
        events += await asyncio.wait_for(asyncio.gather(*(post(i) for i in range(10))), 10.0)
        await asyncio.sleep(0)  # wait-ok: one turn, so the next round is a new batch
    assert [e.seq for e in sink.published] == sorted(e.seq for e in events)
    assert commits.syncs >= 1
    commits.close()


async def test_with_the_fsync_thread_a_sink_that_raises_leaves_no_caller_waiting(store: Store) -> None:
    """As without the thread: the batch is committed and on disk whatever the hand-off does with
    its events, so its callers are answered (with the thread they are answered by the fsync's
    release of what waited for it, not by the commit)."""
    alice, general = _team(store)
    sync = HeldSync()
    commits = GroupCommit(store, RaisingSink(), wal_path=wal_path_of(store.path), sync_wal=sync, fsync_thread=True)
    waiting = []
    for text in ("first", "second"):  # two batches, both covered by one fsync
        commits.publish([store.post_message(general, alice, text)[1]])
        batch = commits.pending()  # what every caller of this batch awaits
        assert batch is not None
        waiting.append(batch)
        commits.commit()
    sync.release.set()
    for batch in waiting:
        await asyncio.wait_for(asyncio.shield(batch), 10.0)
        assert batch.exception() is None
    assert commits.unsynced == 0
    commits.close()


@pytest.mark.parametrize("committed", ["in_a_batch", "alone"])
async def test_a_sink_that_raises_on_earlier_events_loses_no_later_event(store: Store, committed: str) -> None:
    """The sink raises on the scheduler's events released ahead of later ones (queued, then its
    send failed, as the hand-off's publish may), after a batch's COMMIT or a write committed alone
    (publish() with no batch open): the later events must still reach it, after them, and stay
    below the hand-off mark (GroupCommit.oldest_t0) until then; dropped, they were committed,
    answered ok, and never handed off, not even by a restart's replay."""
    alice, general = _team(store)
    sink, sync = RaisingOnceSink(), HeldSync()
    commits = GroupCommit(store, sink, wal_path=wal_path_of(store.path), sync_wal=sync)
    fired, due = _fired_unsynced(store, commits, alice, general)
    if committed == "in_a_batch":
        event = store.post_message(general, alice, "live")[1]
        commits.publish([event])
        with pytest.raises(RuntimeError, match="the sink broke once"):
            commits.commit()  # its COMMIT synced the WAL: the fired event goes first, and the sink raises
    else:
        alone = Store(store.path)  # a write committed by itself (synchronous=FULL), no batch open
        event = alone.post_message(alone.channel(general.id), alone.user(alice.id), "committed alone")[1]
        alone.close()
        with pytest.raises(RuntimeError, match="the sink broke once"):
            commits.publish([event])
    held = commits.oldest_t0()
    assert event in sink.published or (held is not None and held <= event.t0)
    sync.release.set()
    await async_wait_until(lambda: _true(event in sink.published), what="the later event handed off")
    assert sink.published == [due, event]
    fired.close()
    commits.close()
