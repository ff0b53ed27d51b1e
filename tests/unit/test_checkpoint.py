"""webapp_stub.checkpoint: WAL checkpoints on their own connection and thread.

Most tests drive :meth:`WalCheckpointer.poll` synchronously with a fake clock;
two start the real thread and check that closing stops it.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support import FakeClock, wait_until
from webapp_stub.checkpoint import (
    WAL_BACKSTOP_FACTOR,
    WAL_CHECKPOINT_BYTES,
    WAL_CHECKPOINT_GAP_GROWTH_FACTOR,
    WAL_CHECKPOINT_POLL_S,
    WAL_FOLLOW_UP_BUDGET_S,
    WAL_FOLLOW_UP_IDLE_PAUSE_S,
    WAL_FOLLOW_UP_MAX_COUNT,
    WAL_FOLLOW_UP_MAX_MISSES,
    WAL_FOLLOW_UP_MAX_SKIPPED_CHECKPOINTS,
    FollowUps,
    WalCheckpointer,
    follow_up_outcome,
    follow_up_skips,
    frames_added,
    next_checkpoint_gap_s,
    next_follow_up,
)
from webapp_stub.seed import seed_demo
from webapp_stub.store import Store

SMALL_WAL_BYTES = 256 * 1024
POSTS = 1500
POSTS_PER_POLL = 10
LIGHT_LOAD_S = 30
POLLS_PER_LIGHT_POST = 5
POLLS_PER_S = round(1 / WAL_CHECKPOINT_POLL_S)
FOLLOW_UP_POSTS = 4  # within WAL_CHECKPOINT_MIN_GAP_S of polls


def checkpoint_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("rtm-wal-checkpoint")]


@pytest.fixture(autouse=True)
def no_thread_left_behind() -> Iterator[None]:
    yield
    assert checkpoint_threads() == []


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    """A store whose writer does not checkpoint (as with background_checkpoints) but has no thread."""
    s = Store(str(tmp_path))
    # Start from an empty WAL: creating the schema alone (some 40 tables and indexes) writes
    # most of SMALL_WAL_BYTES, and these tests are about what posts add.
    s.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    WalCheckpointer.take_over(s.conn, SMALL_WAL_BYTES)
    yield s
    s.close()


def post(store: Store, seed: dict, count: int) -> None:
    general = store.channel(seed["channels"][0]["id"])
    alice = store.user(seed["users"][0]["id"])
    for i in range(count):
        store.post_message(general, alice, f"message {i} " + "x" * 200)


def pragma(store: Store, name: str) -> int:
    return int(store.conn.execute(f"PRAGMA {name}").fetchone()[0])


def test_take_over_sets_the_writer_pragmas(tmp_path: Path) -> None:
    plain = Store(str(tmp_path / "plain"))
    assert pragma(plain, "wal_autocheckpoint") == 1000  # SQLite checkpoints inside commits
    plain.close()
    s = Store(str(tmp_path / "taken"))
    WalCheckpointer.take_over(s.conn)
    # only a backstop, far past the thread's bound
    assert pragma(s, "wal_autocheckpoint") == WAL_BACKSTOP_FACTOR * WAL_CHECKPOINT_BYTES // pragma(s, "page_size")
    # and the WAL file is cut back to that backstop, not to the thread's bound (see the next test)
    assert pragma(s, "journal_size_limit") == WAL_BACKSTOP_FACTOR * WAL_CHECKPOINT_BYTES
    s.close()


def test_a_restarted_wal_keeps_its_file_up_to_the_backstop(store: Store) -> None:
    """Under load the thread's checkpoint catches the writer only now and then, so the WAL grows
    past the thread's bound before it restarts. The restart must not cut the file back to that
    bound: every frame written past where it was cut would go to a new block (docs/publish-path.md,
    round 9)."""
    seed = seed_demo(store)
    ckpt = WalCheckpointer(store.path, wal_bytes=SMALL_WAL_BYTES)
    for _ in range(200):  # bounded: about 2 KiB of WAL per post
        if ckpt.wal_size() > 2 * SMALL_WAL_BYTES:
            break
        post(store, seed, POSTS_PER_POLL)
    grown = ckpt.wal_size()
    assert 2 * SMALL_WAL_BYTES < grown <= WAL_BACKSTOP_FACTOR * SMALL_WAL_BYTES
    busy, frames, copied = ckpt.checkpoint()  # type: ignore[misc]
    assert busy == 0 and copied == frames > 0
    post(store, seed, 1)  # the next commit starts the WAL over
    assert ckpt.checkpoint()[1] < frames  # type: ignore[index]  (it did start over)
    assert ckpt.wal_size() == grown  # and its file kept its blocks
    ckpt.close()


def test_checkpoint_copies_every_frame_and_the_writer_then_restarts_the_wal(store: Store) -> None:
    seed = seed_demo(store)
    post(store, seed, 20)
    ckpt = WalCheckpointer(store.path)
    busy, frames, copied = ckpt.checkpoint()  # type: ignore[misc]
    assert busy == 0 and frames > 0 and copied == frames
    post(store, seed, 1)  # the next commit starts the WAL over
    assert ckpt.checkpoint()[1] < frames  # type: ignore[index]
    assert ckpt.checkpoints == 2 and ckpt.failures == 0
    ckpt.close()


def test_due_when_the_wal_passes_the_bound_or_the_interval_is_up(tmp_path: Path) -> None:
    clock = FakeClock()
    ckpt = WalCheckpointer(str(tmp_path / "x.db"), interval_s=60.0, wal_bytes=1000, clock=clock)
    assert not ckpt.due(clock.now, 0)
    assert not ckpt.due(clock.now, 1000)
    assert ckpt.due(clock.now, 1001)
    ckpt.checkpoint()  # (of no file: fails, and counts as a checkpoint run)
    # past the bound, the file says nothing more (a restarted WAL keeps its length): the clock decides
    assert not ckpt.due(clock.now, 5000)
    clock.now += ckpt.min_gap_s
    assert ckpt.due(clock.now, 5000)
    assert not ckpt.due(clock.now, 0)
    clock.now += 60.0
    assert ckpt.due(clock.now, 0)


def test_poll_checkpoints_past_the_bound_and_on_the_interval(store: Store) -> None:
    seed = seed_demo(store)
    clock = FakeClock()
    ckpt = WalCheckpointer(store.path, interval_s=60.0, wal_bytes=SMALL_WAL_BYTES, clock=clock)
    assert not ckpt.poll()  # below the bound, interval not up
    post(store, seed, 60)  # 1 KiB pages: 30 posts wrote about 250 KiB of WAL here
    assert ckpt.wal_size() > SMALL_WAL_BYTES
    assert ckpt.poll() and ckpt.checkpoints == 1 and ckpt.last is not None and ckpt.last[2] == ckpt.last[1] > 0
    post(store, seed, 1)  # restarts the WAL, which keeps its file
    assert not ckpt.poll()  # the gap is not up
    clock.now += ckpt.min_gap_s
    assert ckpt.poll() and ckpt.checkpoints == 2  # past the bound, after the gap
    clock.now += 60.0
    assert ckpt.poll() and ckpt.checkpoints == 3
    ckpt.close()


def test_wal_stays_bounded_under_writes(tmp_path: Path, store: Store) -> None:
    seed = seed_demo(store)
    clock = FakeClock()
    ckpt = WalCheckpointer(
        store.path, interval_s=3600.0, wal_bytes=SMALL_WAL_BYTES, min_gap_s=WAL_CHECKPOINT_POLL_S, clock=clock
    )
    largest = 0
    for _ in range(POSTS // POSTS_PER_POLL):
        post(store, seed, POSTS_PER_POLL)
        largest = max(largest, ckpt.wal_size())
        ckpt.poll()
        clock.now += WAL_CHECKPOINT_POLL_S
    ckpt.close()
    assert ckpt.failures == 0 and ckpt.checkpoints >= 10
    # The bound, plus what one gap's writes add, plus the frames the
    # last checkpoint could not yet have copied.
    assert largest < 3 * SMALL_WAL_BYTES, largest

    # The same writes with the thread never running: the writer's backstop alone
    # bounds the WAL (at WAL_BACKSTOP_FACTOR times the bound, plus one commit)...
    backstop = Store(str(tmp_path / "backstop"))
    WalCheckpointer.take_over(backstop.conn, SMALL_WAL_BYTES)
    post(backstop, seed_demo(backstop), POSTS)
    assert os.path.getsize(backstop.path + "-wal") < (WAL_BACKSTOP_FACTOR + 2) * SMALL_WAL_BYTES
    backstop.close()
    # ...where with no checkpoint at all it only grows.
    unchecked = Store(str(tmp_path / "unchecked"))
    unchecked.conn.execute("PRAGMA wal_autocheckpoint=0")
    post(unchecked, seed_demo(unchecked), POSTS)
    assert os.path.getsize(unchecked.path + "-wal") > 10 * SMALL_WAL_BYTES
    unchecked.close()


def test_a_failed_checkpoint_is_counted_not_raised(tmp_path: Path) -> None:
    path = tmp_path / "junk.db"
    path.write_bytes(b"this is not a database" * 100)
    ckpt = WalCheckpointer(str(path))
    assert ckpt.checkpoint() is None
    assert ckpt.failures == 1 and ckpt.last is None
    ckpt.close()


def test_the_thread_checkpoints_and_close_stops_it(store: Store) -> None:
    seed = seed_demo(store)
    ckpt = WalCheckpointer(store.path, interval_s=0.05, poll_s=0.01, wal_bytes=SMALL_WAL_BYTES)
    ckpt.start()
    try:
        assert ckpt.running and len(checkpoint_threads()) == 1
        with pytest.raises(RuntimeError):
            ckpt.start()
        post(store, seed, 5)
        wait_until(
            lambda: ckpt.last is not None and ckpt.last[1] > 0 and ckpt.last[2] == ckpt.last[1],
            what="a background checkpoint of the posted frames",
        )
    finally:
        ckpt.close()
    assert not ckpt.running and checkpoint_threads() == []
    ckpt.close()  # idempotent


def test_store_with_background_checkpoints_stops_them_on_close_and_keeps_its_data(tmp_path: Path) -> None:
    s = Store(str(tmp_path), background_checkpoints=True)
    assert s.checkpointer is not None and s.checkpointer.running
    assert pragma(s, "wal_autocheckpoint") == WAL_BACKSTOP_FACTOR * WAL_CHECKPOINT_BYTES // pragma(s, "page_size")
    seed = seed_demo(s)
    post(s, seed, 50)
    last_seq = s.last_seq(seed["channels"][0]["id"])
    s.close()
    assert checkpoint_threads() == []
    assert not os.path.exists(os.path.join(tmp_path, "webapp.db-wal"))  # the last connection's close checkpointed it

    again = Store(str(tmp_path))
    assert again.checkpointer is None and pragma(again, "wal_autocheckpoint") == 1000
    general = again.channel(seed["channels"][0]["id"])
    messages, _, _ = again.history(general.id, limit=100)
    assert len(messages) == 50 and messages[0]["text"].startswith("message 49 ")
    _, event = again.post_message(general, again.user(seed["users"][0]["id"]), "after reopen")
    assert event.seq == last_seq + 1
    again.close()


BOUND_FRAMES = 4000
BACKSTOP_FRAMES = 4 * BOUND_FRAMES


@pytest.mark.parametrize(
    ("last", "added", "since_s", "gap_s"),
    [
        (None, None, 1.0, 0.5),  # failed: try again soon
        ((0, 100, 100), None, 1.0, 0.5),  # the first (or after a failure): nothing to measure a rate over
        ((0, 100, 100), 100, float("inf"), 0.5),
        ((1, -1, -1), None, 1.0, 0.5),  # busy: the writer checkpoints (its backstop)
        ((0, 100, 60), 100, 1.0, 0.5),  # frames left to copy: a reader holds an older snapshot
        ((0, 0, 0), 0, 1.0, 2.0),  # nothing written since: twice the gap before...
        ((0, 0, 0), 0, 40.0, 60.0),  # ...up to the interval
        ((0, 1000, 1000), 1000, 1.0, 2.0),  # 1,000 frames a second: the bound's 4,000 in 4 s, but at most twice the gap
        ((0, 1000, 1000), 1000, 3.0, 6.0),  # the same frames in 3 s: the bound in 12 s, at most 6
        ((0, 4000, 4000), 4000, 0.5, 0.5),  # as fast as the bound in the gap: the gap
        ((0, 10, 10), 10, 1.0, 2.0),  # a light load, after a short gap: twice it
        ((0, 10, 10), 10, 60.0, 60.0),  # a light load: at most the interval
        # round 11: the WAL did not start over (no checkpoint caught the writer idle), so its frames
        # count every frame since it last did. A light load added 500 of its 9,000 in 8 s: 3,500
        # more (half the way to the backstop) in 56 s; at most twice the gap. (Before, every 0.5 s:
        # the 9,000 frames were taken for 8 s of writes, more than the bound.)
        ((0, 9000, 9000), 500, 8.0, 16.0),
        ((0, 9000, 9000), 2000, 10.0, 17.5),  # 2,000 in 10 s: those 3,500 in 17.5 s
        # near the backstop, half the time left to it: 1,000 frames left at 100 a second
        ((0, BACKSTOP_FRAMES - 1000, BACKSTOP_FRAMES - 1000), 1000, 10.0, 5.0),
        ((0, BACKSTOP_FRAMES - 10, BACKSTOP_FRAMES - 10), 1000, 10.0, 0.5),  # at the least the gap
    ],
)
def test_past_the_bound_the_next_checkpoint_follows_the_writers_rate(
    last: tuple[int, int, int] | None, added: int | None, since_s: float, gap_s: float
) -> None:
    frames = (BOUND_FRAMES, BACKSTOP_FRAMES)
    assert next_checkpoint_gap_s(last, added, since_s, frames, 0.5, 60.0) == pytest.approx(gap_s)


@pytest.mark.parametrize(
    ("previous", "frames", "restarted", "added"),
    [
        (None, 100, False, None),  # no checkpoint before: unknown
        (100, 150, False, 50),  # the same WAL: what it grew by
        (100, 150, True, 150),  # started over (its header says), and grew past the frames before
        (100, 40, False, 40),  # fewer than before: it started over
        (100, 100, False, 0),
    ],
)
def test_frames_added_since_the_checkpoint_before(
    previous: int | None, frames: int, restarted: bool, added: int | None
) -> None:
    assert frames_added(previous, frames, restarted) == added


def test_after_a_burst_a_light_load_does_not_start_the_wal_over_every_gap(store: Store) -> None:
    """review11: once a burst has left the file past the bound, its length says nothing; had
    the checkpoints then come every WAL_CHECKPOINT_MIN_GAP_S, each would have let the writer start
    the WAL over, an fsync in its commit, at any load."""
    seed = seed_demo(store)
    clock = FakeClock()
    ckpt = WalCheckpointer(store.path, interval_s=60.0, wal_bytes=SMALL_WAL_BYTES, clock=clock)
    for _ in range(200):  # bounded: the burst
        if ckpt.wal_size() > 2 * SMALL_WAL_BYTES:
            break
        post(store, seed, POSTS_PER_POLL)
    assert ckpt.poll()  # past the bound: the burst is copied back
    post(store, seed, 1)  # the WAL starts over; its file stays past the bound
    clock.now += ckpt.min_gap_s
    assert ckpt.poll()  # it saw the burst: due again after the least gap...
    light = ckpt.last
    assert light is not None and light[0] == 0 and 0 < light[1] < SMALL_WAL_BYTES // 4096 // 4
    post(store, seed, 1)
    clock.now += ckpt.min_gap_s
    assert ckpt.wal_size() > SMALL_WAL_BYTES and not ckpt.poll()  # ...but after a light one, not so soon
    clock.now += 60.0
    assert ckpt.poll()  # the interval, at the latest
    ckpt.close()


def burst_past_the_bound(store: Store, seed: dict, ckpt: WalCheckpointer) -> None:
    for _ in range(200):  # bounded: about 2 KiB of WAL per post
        if ckpt.wal_size() > 2 * SMALL_WAL_BYTES:
            return
        post(store, seed, POSTS_PER_POLL)
    raise AssertionError("the burst did not pass the bound")


def test_the_wal_header_says_when_the_writer_started_the_wal_over(store: Store) -> None:
    seed = seed_demo(store)
    post(store, seed, 5)
    ckpt = WalCheckpointer(store.path)
    first = ckpt.wal_generation()
    assert first is not None
    post(store, seed, 1)
    assert ckpt.wal_generation() == first  # appended to the same WAL
    ckpt.checkpoint()
    post(store, seed, 1)  # the next commit starts the WAL over
    assert ckpt.wal_generation() not in (None, first)
    ckpt.close()
    assert WalCheckpointer(store.path + ".none").wal_generation() is None


def test_a_light_load_that_never_restarts_the_wal_spaces_its_checkpoints_out(store: Store) -> None:
    """round 11: at 100 posts/s no checkpoint caught the writer between two commits, so the WAL
    never started over (the writer's backstop did, at 4 times the bound), and its frame count only
    grew. Taken for the frames of one gap, they were past the bound: a checkpoint (and its syncs)
    every WAL_CHECKPOINT_MIN_GAP_S at any load. Here the writer opens its next transaction as
    soon as it commits, so every checkpoint falls inside one, as it can at load."""
    seed = seed_demo(store)
    clock = FakeClock()
    ckpt = WalCheckpointer(store.path, interval_s=60.0, wal_bytes=SMALL_WAL_BYTES, clock=clock)
    burst_past_the_bound(store, seed, ckpt)
    generations = set()
    store.begin_batch()
    for i in range(LIGHT_LOAD_S * POLLS_PER_S):
        if i % POLLS_PER_LIGHT_POST == 0:  # 2 posts a second: the bound (~250 frames) in ~15 s
            post(store, seed, 1)
            store.commit_batch()
            store.begin_batch()
        ckpt.poll()
        generations.add(ckpt.wal_generation())
        clock.now += WAL_CHECKPOINT_POLL_S
    store.commit_batch()
    assert ckpt.failures == 0
    assert len(generations) <= 2  # the WAL started over once at most: by the writer's backstop
    # 57 in these 30 s before the fix (every 0.5 s); 13 after, most as the WAL nears the backstop
    assert ckpt.checkpoints <= LIGHT_LOAD_S // 2, ckpt.checkpoints
    ckpt.close()


def test_a_lull_after_a_burst_does_not_put_the_next_checkpoint_an_interval_off(store: Store) -> None:
    """round 11: the checkpoint after a burst fell in a lull and saw a handful of frames; the next
    was put 60 s off, and at 100 posts/s the WAL grew to 51-56 MiB meanwhile."""
    seed = seed_demo(store)
    clock = FakeClock()
    ckpt = WalCheckpointer(store.path, interval_s=60.0, wal_bytes=SMALL_WAL_BYTES, clock=clock)
    burst_past_the_bound(store, seed, ckpt)
    assert ckpt.poll()  # copies the burst back
    post(store, seed, 1)  # the lull: one post, which starts the WAL over
    clock.now += ckpt.min_gap_s
    assert ckpt.poll() and ckpt.last is not None and 0 < ckpt.last[1] < SMALL_WAL_BYTES // 1024 // 10
    post(store, seed, POSTS_PER_POLL)  # the load is back
    clock.now += WAL_CHECKPOINT_GAP_GROWTH_FACTOR * ckpt.min_gap_s
    assert ckpt.poll()  # twice the gap at the latest, not the interval
    ckpt.close()


FIRST = FollowUps(b"header01", 100.0)  # a series, as its checkpoint leaves it
WAITING = FIRST._replace(runs=2, frames=905, waiting=True)  # every frame copied, nothing new


@pytest.mark.parametrize(
    ("series", "report", "after_s", "step"),
    [
        # the checkpoint copied all it saw: the first follow-up at once
        (FIRST, (0, 900, 900), 0.1, (FIRST._replace(frames=900), 0.0)),
        # a follow-up copied a commit made meanwhile: the next at once
        (WAITING._replace(waiting=False, frames=900), (0, 905, 905), 0.1, (WAITING._replace(waiting=False), 0.0)),
        # nothing new: wait for the writer's next transaction
        (WAITING._replace(waiting=False), (0, 905, 905), 0.1, (WAITING, WAL_FOLLOW_UP_IDLE_PAUSE_S)),
        (
            WAITING._replace(waiting=False),
            (0, 905, 800),
            0.1,
            (WAITING._replace(waiting=False), WAL_FOLLOW_UP_IDLE_PAUSE_S),
        ),  # a reader
        # every frame was copied, yet the writer's commit appended: its transaction had begun (a miss)
        (WAITING, (0, 910, 910), 0.1, (WAITING._replace(misses=1, frames=910, waiting=False), 0.0)),
        (
            WAITING._replace(misses=WAL_FOLLOW_UP_MAX_MISSES - 1),
            (0, 910, 910),
            0.1,
            None,
        ),  # ...so many: the writer is never idle
        (WAITING, (0, 905, 905), 0.1, (WAITING, WAL_FOLLOW_UP_IDLE_PAUSE_S)),  # still nothing new: no miss
        (WAITING, (0, 12, 12), 0.1, None),  # fewer frames: the writer started the WAL over
        (WAITING, (0, 0, 0), 0.1, None),
        (WAITING, None, 0.1, None),  # failed
        (WAITING, (1, -1, -1), 0.1, None),  # busy (the writer's backstop checkpoints)
        (FIRST, (0, 0, 0), 0.1, None),  # an empty WAL: nothing to start over
        (WAITING._replace(runs=WAL_FOLLOW_UP_MAX_COUNT), (0, 905, 905), 0.1, None),  # the budget: so many
        (WAITING, (0, 905, 905), WAL_FOLLOW_UP_BUDGET_S, None),  # ...or so long
    ],
)
def test_a_follow_up_comes_after_a_complete_checkpoint_within_its_budget(
    series: FollowUps, report: tuple[int, int, int] | None, after_s: float, step: tuple[FollowUps, float] | None
) -> None:
    assert next_follow_up(series, report, series.began_at + after_s) == step


def test_follow_ups_let_the_writer_start_the_wal_over_after_a_commit_landed_during_the_checkpoint(
    store: Store,
) -> None:
    """round 12: a light load's writer is idle between its commits, but a checkpoint of a gap's frames
    took 10-150 ms and some commit nearly always landed during it; the writer's next transaction then
    began with frames left to copy, so the WAL never started over but through the writer's backstop
    (at 4 times the bound, in a commit on the event loop). Here the checkpoint always catches the
    writer inside a transaction, as it could at load; the follow-ups copy that commit's frames while
    the writer is idle, and its next commit starts the WAL over."""
    seed = seed_demo(store)
    clock = FakeClock()
    ckpt = WalCheckpointer(store.path, interval_s=60.0, wal_bytes=SMALL_WAL_BYTES, clock=clock)
    burst_past_the_bound(store, seed, ckpt)
    before = ckpt.wal_generation()
    for _ in range(FOLLOW_UP_POSTS):  # one post per poll; the checkpoint comes at the first poll
        store.begin_batch()
        post(store, seed, 1)
        ckpt.poll()  # inside the writer's transaction
        store.commit_batch()
        ckpt.poll()  # the writer is idle
        clock.now += WAL_CHECKPOINT_POLL_S
    assert ckpt.failures == 0 and ckpt.checkpoints == 1  # the cadence is the follow-ups' own
    assert ckpt.wal_generation() not in (None, before)  # the writer started the WAL over...
    assert ckpt.restarts == 1 and 1 <= ckpt.follow_ups <= 3, (ckpt.restarts, ckpt.follow_ups)
    report = ckpt.checkpoint()
    assert report is not None and report[1] < SMALL_WAL_BYTES // 1024 // 4  # ...long before its backstop
    ckpt.close()


def test_follow_ups_stop_at_their_budget_when_the_writer_is_never_idle(store: Store) -> None:
    """The writer begins its next transaction as soon as it commits (as at saturation), so no
    follow-up finds it idle: they stop at WAL_FOLLOW_UP_MAX_COUNT, or WAL_FOLLOW_UP_BUDGET_S, and
    the thread goes back to polling every WAL_CHECKPOINT_POLL_S."""
    seed = seed_demo(store)
    clock = FakeClock()
    ckpt = WalCheckpointer(store.path, interval_s=60.0, wal_bytes=SMALL_WAL_BYTES, clock=clock)
    burst_past_the_bound(store, seed, ckpt)
    assert ckpt.wait_s() == WAL_CHECKPOINT_POLL_S
    store.begin_batch()
    post(store, seed, 1)
    assert ckpt.poll() and ckpt.wait_s() == 0.0  # the checkpoint; its first follow-up is due at once
    for _ in range(2 * WAL_FOLLOW_UP_MAX_COUNT):  # the clock stands still: the count is the bound
        store.commit_batch()
        store.begin_batch()
        post(store, seed, 1)
        ckpt.poll()
    assert ckpt.follow_ups == WAL_FOLLOW_UP_MAX_COUNT and ckpt.restarts == 0
    assert ckpt.wait_s() == WAL_CHECKPOINT_POLL_S and not ckpt.poll()

    clock.now += 60.0  # the interval's checkpoint; now the clock moves a poll per commit
    assert ckpt.poll() and ckpt.checkpoints == 2
    for _ in range(2 * WAL_FOLLOW_UP_MAX_COUNT):
        store.commit_batch()
        store.begin_batch()
        post(store, seed, 1)
        clock.now += WAL_CHECKPOINT_POLL_S
        ckpt.poll()
    store.commit_batch()
    assert ckpt.follow_ups - WAL_FOLLOW_UP_MAX_COUNT <= WAL_FOLLOW_UP_BUDGET_S / WAL_CHECKPOINT_POLL_S + 1
    assert ckpt.failures == 0 and ckpt.restarts == 0
    ckpt.close()


def test_follow_ups_that_keep_missing_the_writer_stop(store: Store) -> None:
    """Under load the group commit opens its next batch as soon as it commits (the writer idle
    0.8 ms between batches at the median, at 800-900 posts/s: round 12). A follow-up then finds
    every frame copied and nothing new, yet the writer's transaction began before, and its commit
    appends to the WAL instead of starting it over: a miss. After WAL_FOLLOW_UP_MAX_MISSES of
    them the series stops, rather than run its whole budget at every checkpoint."""
    seed = seed_demo(store)
    clock = FakeClock()
    ckpt = WalCheckpointer(store.path, interval_s=60.0, wal_bytes=SMALL_WAL_BYTES, clock=clock)
    burst_past_the_bound(store, seed, ckpt)
    generation = ckpt.wal_generation()
    store.begin_batch()
    post(store, seed, 1)
    assert ckpt.poll()  # the checkpoint, inside the writer's transaction
    for _ in range(WAL_FOLLOW_UP_MAX_COUNT):  # bounded
        clock.now += WAL_FOLLOW_UP_IDLE_PAUSE_S
        ckpt.poll()  # every frame copied, nothing new: the writer's are not committed yet
        store.commit_batch()  # appends: its transaction began before
        store.begin_batch()
        post(store, seed, 1)
        clock.now += WAL_FOLLOW_UP_IDLE_PAUSE_S
        ckpt.poll()  # copies that commit (a miss)
    store.commit_batch()
    assert ckpt.wal_generation() == generation and ckpt.restarts == 0 and ckpt.failures == 0
    assert ckpt.follow_ups == 2 * WAL_FOLLOW_UP_MAX_MISSES, ckpt.follow_ups
    assert ckpt.wait_s() == WAL_CHECKPOINT_POLL_S and ckpt.failed_series == 1
    # the next checkpoint runs none (follow_up_skips), the one after does
    post(store, seed, 1)
    clock.now += 60.0
    assert ckpt.poll() and ckpt.wait_s() == WAL_CHECKPOINT_POLL_S
    post(store, seed, 1)
    clock.now += 60.0
    assert ckpt.poll() and ckpt.wait_s() == 0.0
    ckpt.close()


@pytest.mark.parametrize(
    ("series", "report", "caught"),
    [
        (WAITING, (0, 12, 12), True),  # the WAL started over
        (WAITING, (0, 905, 905), True),  # every frame copied, nothing new: the next transaction starts it over
        (WAITING._replace(runs=WAL_FOLLOW_UP_MAX_COUNT), (0, 905, 905), True),
        (WAITING._replace(waiting=False, frames=900), (0, 905, 905), False),  # the writer kept committing
        (WAITING._replace(misses=WAL_FOLLOW_UP_MAX_MISSES - 1), (0, 910, 910), False),  # it ended on misses
        (WAITING, None, None),  # failed, or busy: says nothing of the writer
        (WAITING, (1, -1, -1), None),
    ],
)
def test_a_series_of_follow_ups_caught_the_writer_idle_or_not(
    series: FollowUps, report: tuple[int, int, int] | None, caught: bool | None
) -> None:
    assert follow_up_outcome(series, report) is caught


def test_after_series_that_missed_the_writer_checkpoints_run_none_for_a_while() -> None:
    skips = [follow_up_skips(n) for n in range(8)]
    assert skips == [0, 1, 3, 7] + [WAL_FOLLOW_UP_MAX_SKIPPED_CHECKPOINTS] * 4
    assert follow_up_skips(10**6) == WAL_FOLLOW_UP_MAX_SKIPPED_CHECKPOINTS
