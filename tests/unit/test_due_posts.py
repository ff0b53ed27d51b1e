"""webapp_stub.due_posts: the scheduler's bulk path writes, row for row, what firing one by one
through post_message writes; what it cannot post without a doubt goes the one-by-one way."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support import FakeClock
from webapp_stub import reminders, scheduled
from webapp_stub.due_queue import DueItem, fair_order
from webapp_stub.scheduler import CLAIM_SQL, FIRERS, FirerRegistry, add_due, due_rows, fire_batch
from webapp_stub.seed import seed_demo
from webapp_stub.store import Store, User

T0 = 1_700_000_000.0
DUE = T0 + 60


def one_by_one() -> FirerRegistry:
    """The kinds' firers without their preparers: every item through post_message."""
    firers = FirerRegistry()
    for kind in (scheduled.KIND, reminders.KIND):
        firer = FIRERS.get(kind)
        assert firer is not None
        firers.register(kind, firer)
    return firers


def add_reminder(store: Store, user: User, rid: str, text: str, creator: User | None = None) -> None:
    with store.transaction():
        reminders.ensure_slackbot(store, user.team)
    store.open_dm(reminders.slackbot(user.team), [user])
    with store.transaction() as db:
        db.execute(
            "INSERT INTO reminders (id, team, creator, user, text, time) VALUES (?, ?, ?, ?, ?, ?)",
            (rid, user.team, (creator or user).id, user.id, text, int(DUE)),
        )
        add_due(store, DueItem(rid, reminders.KIND, user.team, user.id, DUE))


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    """A database with scheduled messages (two channels, one with blocks) and reminders due at DUE."""
    path = tmp_path / "seeded"
    store = Store(str(path), clock=FakeClock(T0))
    seed = seed_demo(store, users=4, channels=2, bots=0)
    users = [store.user(u["id"]) for u in seed["users"]]
    team = users[0].team if users[0] else ""
    channels = [c["id"] for c in seed["channels"]]
    for n in range(12):
        user = users[n % 4]
        assert user is not None
        extra = {"blocks": [{"type": "section", "text": {"type": "mrkdwn", "text": f"b{n}"}}]} if n == 5 else None
        scheduled.schedule(
            store,
            channels[n % 2],
            team,
            user.id,
            int(DUE),
            f"hello {n} \u00e9\u2603",
            thread_ts=None,
            reply_broadcast=False,
            extra=extra,
        )
    for n, user in enumerate(users * 2):
        assert user is not None
        add_reminder(store, user, f"Rm{n:04d}", f"call {n}")
    store.close()
    return path


def copy_of(data_dir: Path, name: str) -> Store:
    target = data_dir.parent / name
    shutil.copytree(data_dir, target)
    return Store(str(target), clock=FakeClock(DUE + 1))


def dump(store: Store) -> dict[str, list[tuple[object, ...]]]:
    tables = {
        "messages": "SELECT * FROM messages ORDER BY channel, seq",
        "events": "SELECT channel, seq, json, ctl, created_at FROM events ORDER BY channel, seq",
        "channel_seq": "SELECT * FROM channel_seq ORDER BY channel",
        "due_items": "SELECT * FROM due_items ORDER BY id",
        "scheduled_messages": "SELECT * FROM scheduled_messages ORDER BY id",
        "reminders": "SELECT * FROM reminders ORDER BY id",
    }
    return {name: [tuple(row) for row in store.conn.execute(sql)] for name, sql in tables.items()}


@pytest.fixture
def stores(data_dir: Path) -> Iterator[tuple[Store, Store]]:
    bulk, alone = copy_of(data_dir, "bulk"), copy_of(data_dir, "alone")
    yield bulk, alone
    bulk.close()
    alone.close()


def test_the_bulk_path_writes_exactly_what_post_message_writes(stores: tuple[Store, Store]) -> None:
    bulk, alone = stores
    items = fair_order(due_rows(bulk, DUE, 1000))
    assert len(items) == 12 + 8
    fired_bulk = fire_batch(bulk, FIRERS, items, DUE + 1)
    fired_alone = fire_batch(alone, one_by_one(), items, DUE + 1)
    assert [o for _, o in fired_bulk.outcomes] == ["posted"] * 20
    assert [o for _, o in fired_alone.outcomes] == ["posted"] * 20
    assert dump(bulk) == dump(alone)
    assert fired_bulk.events == fired_alone.events  # the same events, in the same (commit) order
    blocks = [e for e in fired_bulk.events if '"blocks"' in e.json]
    assert len(blocks) == 1 and '"text":"b5"' in blocks[0].json


def test_events_of_each_channel_come_in_seq_order_across_batches(stores: tuple[Store, Store]) -> None:
    bulk, _ = stores
    items = fair_order(due_rows(bulk, DUE, 1000))
    events = []
    for start in range(0, len(items), 3):  # small batches: each channel gets seqs in several allocations
        events += fire_batch(bulk, FIRERS, items[start : start + 3], DUE + 1).events
    seqs: dict[str, list[int]] = {}
    for event in events:
        seqs.setdefault(event.channel, []).append(event.seq)
    for channel, got in seqs.items():
        assert got == list(range(got[0], got[0] + len(got))), channel  # gapless, increasing
        assert got[-1] == bulk.last_seq(channel)


def test_what_the_bulk_path_cannot_post_fails_with_the_precise_error_or_goes_one_by_one(
    stores: tuple[Store, Store],
) -> None:
    store, _ = stores
    items = fair_order(due_rows(store, DUE, 1000))
    messages = [i for i in items if i.kind == scheduled.KIND]
    archived_channel, other_channel = messages[0].lane, messages[1].lane
    author_row = store.conn.execute("SELECT user FROM scheduled_messages WHERE id = ?", (messages[1].id,)).fetchone()
    leaver = store.user(author_row[0])
    assert leaver is not None
    # (in SQL: #general can be neither archived nor left through the API)
    store.conn.execute("UPDATE channels SET is_archived = 1 WHERE id = ?", (archived_channel,))
    store.conn.execute("DELETE FROM members WHERE channel = ? AND user = ?", (other_channel, leaver.id))
    other = store.channel(other_channel)
    poster = store.conn.execute("SELECT user FROM members WHERE channel = ?", (other_channel,)).fetchone()[0]
    user = store.user(poster)
    assert other is not None and user is not None
    # a thread reply goes one by one (post_message finds its root), in the same batch as bulk posts
    parent, _ = store.post_message(other, user, "root")
    threaded = next(
        i
        for i in messages
        if (row := store.conn.execute("SELECT channel, user FROM scheduled_messages WHERE id = ?", (i.id,)).fetchone())
        and row[0] == other_channel
        and row[1] != leaver.id
    )
    store.conn.execute("UPDATE scheduled_messages SET thread_ts = ? WHERE id = ?", (parent["ts"], threaded.id))
    # a reminder whose DM with Slackbot was removed: the firer opens it again
    gone_dm = next(i for i in items if i.kind == reminders.KIND)
    store.conn.execute("DELETE FROM channels WHERE dm_key = ?", (reminders.dm_key(gone_dm.lane),))
    fired = fire_batch(store, FIRERS, items, DUE + 1)
    outcome = {i.id: o for i, o in fired.outcomes}
    for i in messages:
        row = store.conn.execute("SELECT channel, user FROM scheduled_messages WHERE id = ?", (i.id,)).fetchone()
        if row[0] == archived_channel:
            assert outcome[i.id] == "failed:is_archived"
        elif row[0] == other_channel and row[1] == leaver.id:
            assert outcome[i.id] == "failed:not_in_channel"
        else:
            assert outcome[i.id] == "posted", i
    assert all(outcome[i.id] == "posted" for i in items if i.kind == reminders.KIND)
    errors = dict(store.conn.execute("SELECT id, error FROM due_items WHERE state = 'failed'").fetchall())
    assert set(errors.values()) == {"is_archived", "not_in_channel"}
    reply = store.conn.execute("SELECT posted_ts FROM scheduled_messages WHERE id = ?", (threaded.id,)).fetchone()[0]
    thread = store.conn.execute(
        "SELECT thread_ts FROM messages WHERE channel = ? AND ts = ?", (other_channel, reply)
    ).fetchone()[0]
    assert thread == parent["ts"]
    assert any('"type":"im_created"' in e.json for e in fired.events)  # the reopened DM
    # each channel's events, as handed to the outbox, in seq order
    last: dict[str, int] = {}
    for event in fired.events:
        assert event.seq > last.get(event.channel, 0)
        last[event.channel] = event.seq


def test_a_claim_is_a_primary_key_lookup_and_claims_each_item_once(stores: tuple[Store, Store]) -> None:
    store, _ = stores
    plan = store.conn.execute(
        "EXPLAIN QUERY PLAN " + CLAIM_SQL.format(marks="?,?"), ("fired", DUE, "a", "b", "pending")
    ).fetchall()
    assert "PRIMARY KEY" in str(plan) and "due_items_pending" not in str(plan)  # not a scan of all pending
    items = fair_order(due_rows(store, DUE, 1000))
    first = fire_batch(store, FIRERS, items[:5], DUE + 1)
    again = fire_batch(store, FIRERS, items[:7], DUE + 2)
    assert [o for _, o in first.outcomes] == ["posted"] * 5
    assert [o for _, o in again.outcomes] == ["gone"] * 5 + ["posted"] * 2
    assert len(again.events) == 2


def test_blocks_and_attachments_are_written_and_delivered_as_post_message_writes_them(data_dir: Path) -> None:
    """The bulk path writes a scheduled message's stored blocks as they are and decodes them once
    for the event: the same row and event bytes as post_message's, for text JSON escapes,
    non-ASCII, numbers and nesting; the delivered event carries the blocks given."""
    blocks = [
        {
            "type": "section",
            "text": {"type": "mrkdwn", "text": 'a "quote" \\ back\nline \u2028 \u00e9\u2603 \U0001f600'},
        },
        {"type": "context", "elements": [{"type": "plain_text", "text": "", "emoji": True}], "n": [1, -0.5, 1e-07]},
    ]
    attachments = [{"fallback": "f", "color": "#36a64f", "fields": [{"title": "t", "value": "\t", "short": False}]}]
    store = Store(str(data_dir), clock=FakeClock(T0))
    author = store.conn.execute("SELECT user, channel FROM members ORDER BY user, channel LIMIT 1").fetchone()
    user = store.user(author[0])
    assert user is not None
    scheduled.schedule(
        store,
        author[1],
        user.team,
        user.id,
        int(DUE),
        "",
        thread_ts=None,
        reply_broadcast=False,
        extra={"blocks": blocks, "attachments": attachments},
    )
    store.close()
    bulk, alone = copy_of(data_dir, "bulk"), copy_of(data_dir, "alone")
    try:
        items = fair_order(due_rows(bulk, DUE, 1000))
        fired_bulk = fire_batch(bulk, FIRERS, items, DUE + 1)
        fired_alone = fire_batch(alone, one_by_one(), items, DUE + 1)
        assert [o for _, o in fired_bulk.outcomes] == ["posted"] * len(items)
        assert dump(bulk) == dump(alone)
        assert fired_bulk.events == fired_alone.events
        delivered = [json.loads(e.json) for e in fired_bulk.events if '"attachments"' in e.json]
        assert [(e["blocks"], e["attachments"], e["text"]) for e in delivered] == [(blocks, attachments, "")]
    finally:
        bulk.close()
        alone.close()


def test_a_reminder_set_by_another_user_says_who_set_it_on_both_paths(tmp_path: Path) -> None:
    """Slackbot's message for a reminder someone else set names them (``reminders.add`` with
    ``user``): without it any user made Slackbot say any text, unattributed, in anyone's DM
    with Slackbot (docs/authz-review.md). One's own reminder reads as before."""
    for n, firers in enumerate((FIRERS, one_by_one())):
        store = Store(str(tmp_path / str(n)), clock=FakeClock(T0))
        seed = seed_demo(store, users=2, channels=1, bots=0)
        alice, bob = (store.user(u["id"]) for u in seed["users"])
        assert alice is not None and bob is not None
        add_reminder(store, bob, "Rm0001", "wire the money to account 42", creator=alice)
        add_reminder(store, bob, "Rm0002", "water the plants")
        fired = fire_batch(store, firers, fair_order(due_rows(store, DUE, 10)), DUE + 1)
        assert [o for _, o in fired.outcomes] == ["posted", "posted"]
        texts = sorted(json.loads(e.json)["text"] for e in fired.events if '"type":"message"' in e.json)
        assert texts == [f"Reminder from <@{alice.id}>: wire the money to account 42.", "Reminder: water the plants."]
        store.close()
