"""webapp_stub.store: seqs, ts, pagination, history — synchronous, no sockets."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.support import FakeClock
from webapp_stub.database import SQLITE_PAGE_SIZE_BYTES
from webapp_stub.resume import token_id
from webapp_stub.schema import SchemaMismatch
from webapp_stub.seed import seed_demo
from webapp_stub.store import ApiError, Store, decode_cursor, encode_cursor, ts_to_us, us_to_ts


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(1_700_000_000.0)


@pytest.fixture
def store(tmp_path: Path, clock: FakeClock) -> Store:
    s = Store(str(tmp_path), clock=clock)
    yield s
    s.close()


@pytest.fixture
def demo(store: Store) -> dict:
    return seed_demo(store, users=5, channels=3, bots=1)


def user(store: Store, demo: dict, name: str):
    uid = next(u["id"] for u in demo["users"] if u["name"] == name)
    return store.user(uid)


def channel(store: Store, demo: dict, name: str):
    cid = next(c["id"] for c in demo["channels"] if c["name"] == name)
    return store.channel(cid)


def test_schema_file_and_wal(tmp_path: Path, store: Store) -> None:
    assert (tmp_path / "webapp.db").exists()
    assert store.conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_seed_shape_and_idempotence(store: Store, demo: dict) -> None:
    names = [u["name"] for u in demo["users"]]
    assert names == ["alice", "bob", "carol", "dave", "eve", "rtmbot"]
    assert [c["name"] for c in demo["channels"]] == ["general", "random", "channel-0002"]
    assert demo["team"]["id"].startswith("T")
    bot = demo["users"][-1]
    assert bot["is_bot"] and bot["token"].startswith("xoxb-") and bot["bot_id"].startswith("B")
    assert all(u["token"].startswith("xoxp-") for u in demo["users"][:-1])
    assert store.auth(bot["token"]).bot_id == bot["bot_id"]
    assert seed_demo(store, users=50) == demo  # existing data wins
    general = channel(store, demo, "general")
    assert store.member_count(general.id) == 6


def test_seed_large_is_fast_enough_and_sparse(tmp_path: Path) -> None:
    seed = seed_demo(str(tmp_path / "big"), users=3000, channels=5, bots=0)
    assert len(seed["users"]) == 3000 and seed["users"][5]["name"] == "user0005"
    s = Store(str(tmp_path / "big"))
    boot = s.bootstrap(seed["users"][7]["id"])
    # own channel + team channel + general + random + exactly one extra channel
    assert len(boot["channels"]) == 5
    s.close()


def test_post_gives_gapless_seq_and_increasing_ts(store: Store, demo: dict, clock: FakeClock) -> None:
    alice, general = user(store, demo, "alice"), channel(store, demo, "general")
    seqs, stamps = [], []
    for i in range(5):  # the clock does not move: ts must still increase
        message, event = store.post_message(general, alice, f"hi {i}")
        seqs.append(event.seq)
        stamps.append(ts_to_us(message["ts"]))
    clock.now -= 10  # the clock goes back: still increasing
    message, event = store.post_message(general, alice, "after clock step back")
    seqs.append(event.seq)
    stamps.append(ts_to_us(message["ts"]))
    assert seqs == [1, 2, 3, 4, 5, 6]
    assert stamps == sorted(set(stamps))
    assert message["ts"] == "1700000000.000005"
    payload = json.loads(event.json)
    assert payload == {
        "type": "message",
        "channel": general.id,
        "user": alice.id,
        "text": "after clock step back",
        "ts": message["ts"],
        "team": alice.team,
        "event_ts": message["ts"],
    }
    assert store.last_seq(general.id) == 6
    # another channel has its own sequence
    _, other = store.post_message(channel(store, demo, "random"), alice, "x")
    assert other.seq == 1


def test_bot_posts_carry_bot_id(store: Store, demo: dict) -> None:
    bot = user(store, demo, "rtmbot")
    message, event = store.post_message(channel(store, demo, "general"), bot, "beep")
    assert message["bot_id"] == bot.bot_id == json.loads(event.json)["bot_id"]


def test_post_errors(store: Store, demo: dict) -> None:
    alice, general = user(store, demo, "alice"), channel(store, demo, "general")
    with pytest.raises(ApiError) as err:
        store.post_message(general, alice, "x" * 40_001)
    assert err.value.code == "msg_too_long"
    store.post_message(general, alice, "x" * 40_000)
    created, _ = store.create_channel(alice, "alice-only")
    with pytest.raises(ApiError) as err:
        store.post_message(created, user(store, demo, "bob"), "hello")
    assert err.value.code == "not_in_channel"
    with pytest.raises(ApiError) as err:
        store.post_message(general, alice, "reply", thread_ts="1.000001")
    assert err.value.code == "thread_not_found"
    assert store.last_seq(general.id) == 1  # failed posts used no seq


def test_create_and_join_events_on_team_user_and_channel(store: Store, demo: dict) -> None:
    alice, bob = user(store, demo, "alice"), user(store, demo, "bob")
    ch, events = store.create_channel(alice, "#Projects".lower())
    assert ch.name == "projects" and ch.id.startswith("C")
    assert [(e.channel, e.seq) for e in events] == [(alice.team, 1), (ch.id, 1), (alice.id, 1)]
    created, joined, own = (json.loads(e.json) for e in events)
    assert created == {
        "type": "channel_created",
        "channel": {"id": ch.id, "name": "projects", "created": ch.created, "creator": alice.id},
    }
    assert joined == {
        "type": "member_joined_channel",
        "user": alice.id,
        "channel": ch.id,
        "channel_type": "C",
        "team": alice.team,
    }
    assert own["type"] == "channel_joined" and own["channel"]["id"] == ch.id and own["channel"]["name"] == "projects"
    assert events[2].ctl == {"join": ch.id, "since": 1}
    assert events[0].ctl is None

    store.post_message(ch, alice, "before bob")  # seq 2 on the channel
    already, events = store.join_channel(ch, bob)
    assert not already
    assert [(e.channel, e.seq) for e in events] == [(ch.id, 3), (bob.id, 1)]
    assert events[1].ctl == {"join": ch.id, "since": 3}
    assert store.join_channel(ch, bob) == (True, [])
    with pytest.raises(ApiError) as err:
        store.create_channel(bob, "projects")
    assert err.value.code == "name_taken"
    with pytest.raises(ApiError) as err:
        store.create_channel(bob, "Bad Name!")
    assert err.value.code == "invalid_name_specials"
    _, events = store.create_channel(bob, "second")
    assert events[0].channel == alice.team and events[0].seq == 2  # team channel stays gapless


def test_events_after_and_bootstrap(store: Store, demo: dict) -> None:
    alice, general = user(store, demo, "alice"), channel(store, demo, "general")
    for i in range(7):
        store.post_message(general, alice, f"m{i}")
    events, more = store.events_after(general.id, 2, limit=3)
    assert [e.seq for e in events] == [3, 4, 5] and more
    events, more = store.events_after(general.id, 5, limit=3)
    assert [e.seq for e in events] == [6, 7] and not more
    assert json.loads(events[-1].json)["text"] == "m6"
    assert store.events_after("C_NOPE", 0) == ([], False)

    ch, _ = store.create_channel(alice, "mine")
    boot = store.bootstrap(alice.id)
    seqs = {c["id"]: c["seq"] for c in boot["channels"]}
    assert boot["user"] == {"id": alice.id, "name": "alice"}
    assert boot["team"] == demo["team"]
    assert seqs[alice.id] == 1 and seqs[alice.team] == 1 and seqs[general.id] == 7 and seqs[ch.id] == 1
    assert seqs[channel(store, demo, "random").id] == 0
    assert len(seqs) == 2 + 4  # own + team + general, random, channel-0002, mine
    assert store.bootstrap("UNOBODY") is None


def test_history_pagination_and_bounds(store: Store, demo: dict, clock: FakeClock) -> None:
    alice, general = user(store, demo, "alice"), channel(store, demo, "general")
    stamps = []
    for i in range(10):
        clock.now += 1
        stamps.append(store.post_message(general, alice, f"m{i}")[0]["ts"])
    seen, cursor, pages = [], None, 0
    while True:
        messages, more, cursor = store.history(general.id, limit=3, cursor=cursor)
        pages += 1
        seen += [m["text"] for m in messages]
        assert more == bool(cursor)
        if not cursor:
            break
    assert seen == [f"m{i}" for i in reversed(range(10))] and pages == 4
    messages, more, _ = store.history(general.id, oldest=stamps[2], latest=stamps[5])
    assert [m["text"] for m in messages] == ["m4", "m3"] and not more
    messages, _, _ = store.history(general.id, oldest=stamps[2], latest=stamps[5], inclusive=True)
    assert [m["text"] for m in messages] == ["m5", "m4", "m3", "m2"]
    with pytest.raises(ApiError) as err:
        store.history(general.id, cursor="garbage!")
    assert err.value.code == "invalid_cursor"
    with pytest.raises(ApiError) as err:
        store.history(general.id, cursor=encode_cursor("user", 3))
    assert err.value.code == "invalid_cursor"


def test_threads_stay_out_of_history(store: Store, demo: dict) -> None:
    alice, general = user(store, demo, "alice"), channel(store, demo, "general")
    parent, _ = store.post_message(general, alice, "parent")
    reply, event = store.post_message(general, alice, "reply", thread_ts=parent["ts"])
    assert reply["thread_ts"] == parent["ts"] == json.loads(event.json)["thread_ts"]
    messages, _, _ = store.history(general.id)
    assert [m["text"] for m in messages] == ["parent"]
    thread, _, _ = store.replies(general.id, parent["ts"])
    assert [m["text"] for m in thread] == ["parent", "reply"]


def test_list_pagination(store: Store, demo: dict) -> None:
    alice = user(store, demo, "alice")
    for i in range(4):
        store.create_channel(alice, f"extra-{i}")
    names, cursor = [], None
    while True:
        page = store.list_channels(alice, limit=2, cursor=cursor)
        names += [c.name for c in page.items]
        cursor = page.next_cursor
        if not cursor:
            break
    assert names == ["general", "random", "channel-0002", "extra-0", "extra-1", "extra-2", "extra-3"]

    users, cursor = [], None
    while True:
        page = store.list_users(alice.team, limit=4, cursor=cursor)
        users += [u.name for u in page.items]
        cursor = page.next_cursor
        if not cursor:
            break
    assert users == ["alice", "bob", "carol", "dave", "eve", "rtmbot", "slackbot"]  # Slack lists Slackbot too

    general = channel(store, demo, "general")
    members, cursor = [], None
    while True:
        page = store.list_members(general.id, limit=5, cursor=cursor)
        members += page.items
        cursor = page.next_cursor
        if not cursor:
            break
    assert sorted(members) == sorted(u["id"] for u in demo["users"])


def test_private_channels_are_invisible_to_non_members(store: Store, demo: dict) -> None:
    alice, bob = user(store, demo, "alice"), user(store, demo, "bob")
    secret, events = store.create_channel(alice, "secret", is_private=True)
    assert [e.channel for e in events] == [secret.id, alice.id]  # no channel_created on the team
    assert store.visible_channel(secret.id, alice) == secret
    with pytest.raises(ApiError):
        store.visible_channel(secret.id, bob)
    assert "secret" not in [c.name for c in store.list_channels(bob, private=True).items]
    assert "secret" in [c.name for c in store.list_channels(alice, private=True).items]


def test_ts_and_cursor_helpers() -> None:
    assert ts_to_us("1700000000.000100") == 1_700_000_000_000_100
    assert us_to_ts(1_700_000_000_000_100) == "1700000000.000100"
    assert ts_to_us("1700000000") == 1_700_000_000_000_000
    for bad in ("", "abc", "1.2.3", "1.1234567"):
        with pytest.raises(ValueError):
            ts_to_us(bad)
    assert decode_cursor(encode_cursor("user", 42), "user") == "42"
    assert decode_cursor("", "user") is None


def test_a_new_database_gets_small_pages_and_an_old_one_keeps_its_own(tmp_path: Path) -> None:
    """Round 10 of docs/publish-path.md: a database file created by the store has 1 KiB pages; one
    created before (SQLite's 4 KiB) keeps them, and is read and written as before."""
    new = Store(str(tmp_path / "new"))
    assert new.conn.execute("PRAGMA page_size").fetchone()[0] == SQLITE_PAGE_SIZE_BYTES == 1024
    new.close()
    old_path = tmp_path / "old" / "webapp.db"
    old_path.parent.mkdir()
    conn = sqlite3.connect(old_path)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("CREATE TABLE made_before (x INTEGER)")  # the file exists, with SQLite's default pages
    conn.close()
    old = Store(str(old_path))
    seed = seed_demo(old, users=2, channels=1, bots=0)
    general, alice = old.channel(seed["channels"][0]["id"]), old.user(seed["users"][0]["id"])
    old.post_message(general, alice, "x" * 3000)  # larger than a page of either size
    assert old.conn.execute("PRAGMA page_size").fetchone()[0] == 4096
    old.close()
    reopened = Store(str(old_path))
    assert reopened.history(general.id)[0][0]["text"] == "x" * 3000
    reopened.close()


def test_state_survives_reopen(tmp_path: Path) -> None:
    first = Store(str(tmp_path))
    seed = seed_demo(first)
    alice = first.user(seed["users"][0]["id"])
    general = first.channel(seed["channels"][0]["id"])
    first.post_message(general, alice, "durable")
    first.close()
    second = Store(str(tmp_path / "webapp.db"))
    _, event = second.post_message(general, alice, "next")
    assert event.seq == 2
    assert second.history(general.id)[0][1]["text"] == "durable"
    second.close()


# -- issue 5: Slack's conversations, messages and reactions ---------------------------------------


def events_of(events: list) -> list[tuple[str, str, object]]:
    """(channel, type[/subtype], ctl) per event, for compact assertions."""
    out = []
    for e in events:
        body = json.loads(e.json)
        kind = body["type"] + (f"/{body['subtype']}" if "subtype" in body else "")
        out.append((e.channel, kind, e.ctl))
    return out


def test_leave_invite_kick_emit_membership_events_with_ctl(store: Store, demo: dict) -> None:
    alice, bob, carol = (user(store, demo, n) for n in ("alice", "bob", "carol"))
    ch, _ = store.create_channel(alice, "crew")
    events = store.invite(ch, alice, [bob, carol])
    assert events_of(events) == [
        (ch.id, "member_joined_channel", None),
        (bob.id, "channel_joined", {"join": ch.id, "since": 2}),
        (ch.id, "member_joined_channel", None),
        (carol.id, "channel_joined", {"join": ch.id, "since": 3}),
    ]
    assert json.loads(events[0].json)["inviter"] == alice.id
    for users, code in (([bob], "already_in_channel"), ([alice], "cant_invite_self")):
        with pytest.raises(ApiError) as err:
            store.invite(ch, alice, users)
        assert err.value.code == code
    with pytest.raises(ApiError) as err:
        store.invite(ch, user(store, demo, "dave"), [user(store, demo, "eve")])
    assert err.value.code == "not_in_channel"

    not_in, events = store.leave_channel(ch, bob)
    assert not not_in
    upto = events[0].seq  # the connections of the leaver get the channel up to its member_left_channel
    assert events_of(events) == [
        (ch.id, "member_left_channel", None),
        (bob.id, "channel_left", {"leave": ch.id, "upto": upto}),
    ]
    assert store.leave_channel(ch, bob) == (True, [])
    events = store.kick(ch, alice, carol)
    assert events_of(events) == [
        (ch.id, "member_left_channel", None),
        (carol.id, "channel_left", {"leave": ch.id, "upto": events[0].seq}),
    ]
    assert json.loads(events[1].json)["actor_id"] == alice.id
    assert not store.is_member(ch.id, carol.id)
    for target, code in ((alice, "cant_kick_self"), (carol, "not_in_channel")):
        with pytest.raises(ApiError) as err:
            store.kick(ch, alice, target)
        assert err.value.code == code
    with pytest.raises(ApiError) as err:  # an outsider (bob left) kicks nobody, even from a public channel
        store.kick(ch, bob, alice)
    assert err.value.code == "not_in_channel" and store.is_member(ch.id, alice.id)
    general = channel(store, demo, "general")
    for call, code in (
        (lambda: store.leave_channel(general, bob), "cant_leave_general"),
        (lambda: store.kick(general, alice, bob), "cant_kick_from_general"),
    ):
        with pytest.raises(ApiError) as err:
            call()
        assert err.value.code == code


def test_rename_and_archive(store: Store, demo: dict) -> None:
    alice, bob = user(store, demo, "alice"), user(store, demo, "bob")
    ch, _ = store.create_channel(alice, "old-name")
    renamed, events = store.rename_channel(ch, alice, "new-name")
    assert renamed.name == "new-name" and store.channel(ch.id).name == "new-name"
    assert events_of(events) == [(alice.team, "channel_rename", None)]
    assert json.loads(events[0].json)["channel"]["name"] == "new-name"
    with pytest.raises(ApiError) as err:
        store.rename_channel(ch, bob, "bobs")
    assert err.value.code == "not_in_channel"
    events = store.archive_channel(store.channel(ch.id), alice)
    assert events_of(events) == [(alice.team, "channel_archive", None)]
    archived = store.channel(ch.id)
    assert archived.is_archived
    for call, code in (
        (lambda: store.post_message(archived, alice, "x"), "is_archived"),
        (lambda: store.join_channel(archived, bob), "is_archived"),
        (lambda: store.leave_channel(archived, alice), "is_archived"),
        (lambda: store.kick(archived, alice, bob), "is_archived"),
        (lambda: store.archive_channel(archived, alice), "already_archived"),
        (lambda: store.archive_channel(channel(store, demo, "general"), alice), "cant_archive_general"),
    ):
        with pytest.raises(ApiError) as err:
            call()
        assert err.value.code == code
    assert events_of(store.archive_channel(archived, alice, archived=False)) == [
        (alice.team, "channel_unarchive", None)
    ]
    secret, _ = store.create_channel(alice, "hush", is_private=True)
    _, events = store.rename_channel(secret, alice, "hushed")
    assert events_of(events) == [(secret.id, "group_rename", None)]  # private: only its members hear it


def test_direct_messages_are_private_channels_opened_once(store: Store, demo: dict) -> None:
    alice, bob, carol = (user(store, demo, n) for n in ("alice", "bob", "carol"))
    dm, already, events = store.open_dm(alice, [bob])
    assert dm.id.startswith("D") and dm.is_im and not already
    assert events_of(events) == sorted(
        [(alice.id, "im_created", {"join": dm.id, "since": 0}), (bob.id, "im_created", {"join": dm.id, "since": 0})]
    )
    assert store.open_dm(bob, [alice]) == (dm, True, [])
    assert store.dm_peer(dm, alice.id) == bob.id and store.dm_peer(dm, bob.id) == alice.id
    with pytest.raises(ApiError):
        store.visible_channel(dm.id, carol)
    group, _, events = store.open_dm(alice, [bob, carol])
    assert group.id.startswith("G") and group.is_mpim and len(events) == 3
    assert group.to_api()["is_mpim"] and group.name.startswith("mpdm-")
    message, event = store.post_message(dm, bob, "psst")
    assert event.channel == dm.id and event.seq == 1
    boot = {c["id"] for c in store.bootstrap(bob.id)["channels"]}
    assert {dm.id, group.id} <= boot
    ims = store.list_conversations(alice, types={"im"}).items
    assert [c.id for c in ims] == [dm.id]
    assert store.list_conversations(carol, types={"im"}).items == []
    assert [c.id for c in store.list_conversations(carol, types={"mpim"}).items] == [group.id]
    assert dm.to_api(user=bob.id)["is_im"] is True
    for call, code in (
        (lambda: store.leave_channel(dm, alice), "method_not_supported_for_channel_type"),
        (lambda: store.invite(dm, alice, [carol]), "method_not_supported_for_channel_type"),
    ):
        with pytest.raises(ApiError) as err:
            call()
        assert err.value.code == code
    with pytest.raises(ApiError) as err:
        store.open_dm(
            alice,
            [user(store, demo, n) for n in ("bob", "carol", "dave", "eve", "rtmbot")] * 2
            + [store.create_user(alice.team, f"extra{i}")[0] for i in range(4)],
        )
    assert err.value.code == "too_many_users"


def test_update_and_delete_only_by_the_author(store: Store, demo: dict) -> None:
    alice, bob, general = user(store, demo, "alice"), user(store, demo, "bob"), channel(store, demo, "random")
    message, _ = store.post_message(general, alice, "first draft")
    updated, event = store.update_message(general, alice, message["ts"], "final")
    body = json.loads(event.json)
    assert event.seq == 2 and body["subtype"] == "message_changed" and body["hidden"] is True
    assert body["message"]["text"] == "final" and body["previous_message"]["text"] == "first draft"
    assert body["message"]["edited"] == {"user": alice.id, "ts": body["ts"]} == updated["edited"]
    assert store.history(general.id)[0][0]["text"] == "final"
    for call, code in (
        (lambda: store.update_message(general, bob, message["ts"], "hijack"), "cant_update_message"),
        (lambda: store.update_message(general, alice, "1.000001", "x"), "message_not_found"),
        (lambda: store.update_message(general, alice, "yesterday", "x"), "invalid_ts"),
        (lambda: store.update_message(general, alice, None, "x"), "invalid_arguments"),
        (lambda: store.update_message(general, alice, message["ts"], "x" * 40_001), "msg_too_long"),
        (lambda: store.delete_message(general, bob, message["ts"]), "cant_delete_message"),
    ):
        with pytest.raises(ApiError) as err:
            call()
        assert err.value.code == code
    ts, event = store.delete_message(general, alice, message["ts"])
    body = json.loads(event.json)
    assert ts == message["ts"] and body["subtype"] == "message_deleted" and body["deleted_ts"] == ts and event.seq == 3
    assert store.history(general.id)[0] == []
    with pytest.raises(ApiError) as err:
        store.delete_message(general, alice, message["ts"])
    assert err.value.code == "message_not_found"


def test_reactions_add_remove_and_show_in_history(store: Store, demo: dict) -> None:
    alice, bob, general = user(store, demo, "alice"), user(store, demo, "bob"), channel(store, demo, "random")
    message, _ = store.post_message(general, alice, "react to me")
    event = store.add_reaction(general, bob, message["ts"], ":thumbsup:")
    body = json.loads(event.json)
    assert body == {
        "type": "reaction_added",
        "user": bob.id,
        "reaction": "thumbsup",
        "item_user": alice.id,
        "item": {"type": "message", "channel": general.id, "ts": message["ts"]},
        "event_ts": body["event_ts"],
    }
    store.add_reaction(general, alice, message["ts"], "thumbsup")
    store.add_reaction(general, alice, message["ts"], "wave::skin-tone-3")
    shown = store.message(general.id, message["ts"])
    assert shown["reactions"] == [
        {"name": "thumbsup", "users": [bob.id, alice.id], "count": 2},
        {"name": "wave::skin-tone-3", "users": [alice.id], "count": 1},
    ]
    assert store.history(general.id)[0][0]["reactions"] == shown["reactions"]
    for call, code in (
        (lambda: store.add_reaction(general, bob, message["ts"], "thumbsup"), "already_reacted"),
        (lambda: store.add_reaction(general, bob, message["ts"], "Not A Name"), "invalid_name"),
        (lambda: store.add_reaction(general, bob, message["ts"], ""), "invalid_name"),
        (lambda: store.add_reaction(general, bob, "1.000001", "ok"), "message_not_found"),
        (lambda: store.remove_reaction(general, bob, message["ts"], "wave::skin-tone-3"), "no_reaction"),
    ):
        with pytest.raises(ApiError) as err:
            call()
        assert err.value.code == code
    removed = json.loads(store.remove_reaction(general, bob, message["ts"], "thumbsup").json)
    assert removed["type"] == "reaction_removed" and removed["reaction"] == "thumbsup"
    assert store.message(general.id, message["ts"])["reactions"][0] == {
        "name": "thumbsup",
        "users": [alice.id],
        "count": 1,
    }


def test_thread_summary_and_broadcast_replies(store: Store, demo: dict) -> None:
    alice, bob, general = user(store, demo, "alice"), user(store, demo, "bob"), channel(store, demo, "random")
    parent, _ = store.post_message(general, alice, "parent")
    store.post_message(general, bob, "r1", thread_ts=parent["ts"])
    last, event = store.post_message(general, alice, "r2", thread_ts=parent["ts"], broadcast=True)
    assert json.loads(event.json)["subtype"] == "thread_broadcast"
    messages, _, _ = store.history(general.id)
    assert [m["text"] for m in messages] == ["r2", "parent"]  # the broadcast reply shows in the channel
    root = messages[1]
    assert root["thread_ts"] == parent["ts"] and root["reply_count"] == 2
    assert (
        root["reply_users"] == [bob.id, alice.id]
        and root["reply_users_count"] == 2
        and root["latest_reply"] == last["ts"]
    )
    thread, _, _ = store.replies(general.id, parent["ts"])
    assert [m["text"] for m in thread] == ["parent", "r1", "r2"]


def test_ephemeral_goes_to_the_target_users_channel_not_history(store: Store, demo: dict) -> None:
    alice, bob, general = user(store, demo, "alice"), user(store, demo, "bob"), channel(store, demo, "random")
    ts, event = store.post_ephemeral(general, alice, bob, "only you")
    body = json.loads(event.json)
    assert event.channel == bob.id and body["is_ephemeral"] and body["channel"] == general.id and body["ts"] == ts
    assert store.history(general.id)[0] == [] and store.last_seq(general.id) == 0
    outsider, _ = store.create_channel(alice, "outside")
    with pytest.raises(ApiError) as err:
        store.post_ephemeral(outsider, alice, bob, "x")
    assert err.value.code == "user_not_in_channel"


def test_presence_and_bots(store: Store, demo: dict) -> None:
    alice = user(store, demo, "alice")
    events = store.set_presence(alice, "away")
    assert events_of(events) == [(alice.id, "manual_presence_change", None)]
    assert json.loads(events[0].json)["presence"] == "away" and store.user(alice.id).presence == "away"
    assert store.set_presence(store.user(alice.id), "away") == []
    with pytest.raises(ApiError) as err:
        store.set_presence(alice, "busy")
    assert err.value.code == "invalid_presence"
    bot = next(u for u in demo["users"] if u["is_bot"])
    assert store.bot(bot["bot_id"]).id == bot["id"] and store.bot("BNOPE") is None


def test_bootstrap_with_a_resume_record_starts_at_the_recorded_seqs(store: Store, demo: dict) -> None:
    alice, general = user(store, demo, "alice"), channel(store, demo, "general")
    for i in range(5):
        store.post_message(general, alice, f"m{i}")
    random_ch = channel(store, demo, "random")
    boot = store.bootstrap(alice.id, {general.id: 2, random_ch.id: 9, "CNOTMINE": 1})
    seqs = {c["id"]: c["seq"] for c in boot["channels"]}
    assert seqs[general.id] == 2  # replay 3..5
    assert seqs[random_ch.id] == 0  # never above the latest
    assert "CNOTMINE" not in seqs  # not a channel of the user's any more


def _resume_after_join_and_leave(store: Store, demo: dict) -> tuple[dict, dict[str, int], str, str, str]:
    """alice's connection is moved while it is in #general (at seq 2) and not in a new channel;
    while it is away she joins the new channel, and leaves #general after two more posts."""
    alice, bob, general = user(store, demo, "alice"), user(store, demo, "bob"), channel(store, demo, "random")
    newch, _ = store.create_channel(bob, "newch")
    for i in range(2):
        store.post_message(general, bob, f"g{i}")
    record = {alice.id: store.last_seq(alice.id), general.id: store.last_seq(general.id), alice.team: 0}
    _, joined = store.join_channel(newch, alice)  # while away: member_joined_channel, channel_joined
    store.post_message(newch, bob, "n1")  # owed to the moved connection: it joined before
    store.post_message(general, bob, "g2")  # owed: she is still in #general
    _, left = store.leave_channel(general, alice)  # member_left_channel, channel_left
    store.post_message(general, bob, "g3")  # not owed: she left
    boot = store.bootstrap(alice.id, record)
    assert json.loads(joined[0].json)["type"] == "member_joined_channel" and left
    return boot, record, newch.id, general.id, alice.id


def test_resumed_bootstrap_leaves_a_channel_joined_while_away_to_the_replayed_join(store: Store, demo: dict) -> None:
    """Joined while away: the bootstrap must not start the channel at its latest seq (the
    connection would skip what followed the join); the user channel's replay joins it at the
    join's ``since``, so it is not in the bootstrap at all."""
    boot, record, newch, _, alice = _resume_after_join_and_leave(store, demo)
    seqs = {c["id"]: c["seq"] for c in boot["channels"]}
    assert newch not in seqs
    assert seqs[alice] == record[alice]  # the replay of her channel carries the join
    joins = [e.ctl for e in store.events_after(alice, record[alice])[0] if e.ctl and "join" in e.ctl]
    assert joins == [{"join": newch, "since": 2}]  # right after her member_joined_channel (bob's is 1)


def test_resumed_bootstrap_keeps_a_channel_left_while_away_until_the_replayed_leave(store: Store, demo: dict) -> None:
    """Left while away: the channel is still followed from the record, and the replayed leave
    names the channel's seq of the leave, up to which the connection is owed its events."""
    boot, record, _, general, alice = _resume_after_join_and_leave(store, demo)
    seqs = {c["id"]: c["seq"] for c in boot["channels"]}
    assert seqs[general] == record[general]
    leaves = [e.ctl for e in store.events_after(alice, record[alice])[0] if e.ctl and "leave" in e.ctl]
    left_at = store.last_seq(general) - 1  # member_left_channel, then g3
    assert leaves == [{"leave": general, "upto": left_at}]


def test_fresh_bootstrap_lists_only_current_channels(store: Store, demo: dict) -> None:
    _, _, newch, general, alice = _resume_after_join_and_leave(store, demo)
    seqs = {c["id"]: c["seq"] for c in store.bootstrap(alice)["channels"]}
    assert seqs[newch] == store.last_seq(newch) and general not in seqs


def test_an_older_database_gets_the_new_columns(tmp_path: Path) -> None:
    import sqlite3

    path = tmp_path / "old"
    path.mkdir()
    db = sqlite3.connect(path / "webapp.db")
    db.executescript(
        "CREATE TABLE users (id TEXT PRIMARY KEY, team TEXT NOT NULL, name TEXT NOT NULL, real_name TEXT NOT NULL DEFAULT '',"
        " is_bot INTEGER NOT NULL DEFAULT 0, bot_id TEXT);"
        "CREATE TABLE channels (id TEXT PRIMARY KEY, team TEXT NOT NULL, name TEXT NOT NULL, created INTEGER NOT NULL,"
        " creator TEXT NOT NULL, is_private INTEGER NOT NULL DEFAULT 0, is_archived INTEGER NOT NULL DEFAULT 0, UNIQUE (team, name));"
        "INSERT INTO channels VALUES ('C1', 'T1', 'general', 1, 'U1', 0, 0);"
    )
    db.close()
    store = Store(str(path))
    assert store.channel("C1").kind == "channel"
    cols = {row[1] for row in store.conn.execute("PRAGMA table_info(messages)")}
    assert {"subtype", "edited_user", "edited_ts"} <= cols
    store.close()


OLD_CLUSTERED_TABLES = """
CREATE TABLE messages (channel TEXT NOT NULL, ts_us INTEGER NOT NULL, ts TEXT NOT NULL, seq INTEGER NOT NULL,
    user TEXT NOT NULL, team TEXT NOT NULL, text TEXT NOT NULL, thread_ts TEXT, bot_id TEXT, extra TEXT,
    PRIMARY KEY (channel, ts_us)) WITHOUT ROWID;
CREATE TABLE events (channel TEXT NOT NULL, seq INTEGER NOT NULL, json TEXT NOT NULL, ctl TEXT,
    created_at REAL NOT NULL, PRIMARY KEY (channel, seq)) WITHOUT ROWID;
CREATE INDEX events_created ON events (created_at);
"""


def test_an_older_database_with_clustered_messages_and_events_is_rebuilt_with_every_row(tmp_path: Path) -> None:
    """Round 6 of docs/publish-path.md: messages and events became rowid tables with their key as a
    unique index. A database written before (both tables WITHOUT ROWID, and messages still without
    the columns added later) keeps every row, its history and event log read the same, and posts go
    on gapless."""
    import sqlite3

    clock = FakeClock(1_700_000_000.0)
    store = Store(str(tmp_path), clock=clock)
    demo = seed_demo(store, users=3, channels=2, bots=0)
    alice = user(store, demo, "alice")
    general, random_ = channel(store, demo, "general"), channel(store, demo, "random")
    for n in range(30):
        clock.advance(1)
        store.post_message(general if n % 3 else random_, alice, f"m{n}")
    history = {c.id: store.history(c.id, limit=100)[0] for c in (general, random_)}
    events = {c.id: store.events_after(c.id, 0)[0] for c in (general, random_)}
    store.close()
    # the older version's tables, with the same rows
    db = sqlite3.connect(tmp_path / "webapp.db", isolation_level=None)
    db.execute("BEGIN")
    db.execute("ALTER TABLE messages RENAME TO messages_now")
    db.execute("ALTER TABLE events RENAME TO events_now")
    db.execute("DROP INDEX events_created")
    for statement in OLD_CLUSTERED_TABLES.split(";"):
        if statement.strip():
            db.execute(statement)
    old_columns = "channel, ts_us, ts, seq, user, team, text, thread_ts, bot_id, extra"
    db.execute(f"INSERT INTO messages ({old_columns}) SELECT {old_columns} FROM messages_now")
    db.execute("INSERT INTO events SELECT channel, seq, json, ctl, created_at FROM events_now")
    db.execute("DROP TABLE messages_now")
    db.execute("DROP TABLE events_now")
    db.execute("COMMIT")
    db.close()
    # a tool that must not migrate (rtm users) is told what migrate() would change, and changes nothing
    with pytest.raises(SchemaMismatch) as mismatch:
        Store(str(tmp_path), migrate=False)
    assert {"table messages (clustered)", "table events (clustered)", "column messages.subtype"} <= set(
        mismatch.value.missing
    )
    assert mismatch.value.unknown == [] and "start `rtm up` with this version once" in str(mismatch.value)

    store = Store(str(tmp_path), clock=clock)
    tables = dict(store.conn.execute("SELECT name, sql FROM sqlite_master WHERE type = 'table'").fetchall())
    assert "WITHOUT ROWID" not in tables["messages"] and "WITHOUT ROWID" not in tables["events"]
    assert not any(name.endswith("__rowid") for name in tables)
    indexes = {row[0] for row in store.conn.execute("SELECT name FROM sqlite_master WHERE type = 'index'")}
    assert {"messages_key", "events_key", "events_created"} <= indexes
    assert {c.id: store.history(c.id, limit=100)[0] for c in (general, random_)} == history
    assert {c.id: store.events_after(c.id, 0)[0] for c in (general, random_)} == events
    clock.advance(1)
    _, event = store.post_message(general, alice, "after the rebuild")
    assert event.seq == events[general.id][-1].seq + 1
    with pytest.raises(sqlite3.IntegrityError, match="messages.channel, messages.ts_us"):  # still a key
        key = "channel, ts_us, ts, seq, user, team, text"
        store.conn.execute(f"INSERT INTO messages ({key}) SELECT {key} FROM messages WHERE channel = ?", (general.id,))
    store.close()
    Store(str(tmp_path), clock=clock).close()  # opening it again changes nothing
    Store(str(tmp_path), migrate=False).close()  # migrated: this version's schema


def test_a_clustered_table_rebuilt_by_another_connection_meanwhile_is_not_rebuilt_again(tmp_path: Path) -> None:
    """Two processes open an older database at once (a webapp starting, ``rtm deadletter list``): the
    one that saw the clustered table before the other's rebuild committed must not rebuild it again
    once it has the write lock, dropping the indexes the first made (the hand-off's replay names
    events_created) and copying every row a second time."""
    import sqlite3
    import threading

    from webapp_stub.schema import _rebuild_clustered

    path = tmp_path / "webapp.db"
    first = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    first.execute("PRAGMA journal_mode=WAL")
    first.executescript(OLD_CLUSTERED_TABLES)
    first.execute("INSERT INTO events VALUES ('C1', 1, '{}', NULL, 1.0)")
    second = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    second.execute("PRAGMA busy_timeout=10000")
    waiting = threading.Event()
    second.set_trace_callback(lambda sql: waiting.set() if sql.startswith("BEGIN IMMEDIATE") else None)
    first.execute("BEGIN IMMEDIATE")  # the first connection's rebuild has the write lock
    rebuild = threading.Thread(target=_rebuild_clustered, args=(second, "events"))
    rebuild.start()
    assert waiting.wait(10.0)  # the second saw the clustered table and waits for the lock
    _rebuild_clustered_in(first, "events")
    first.execute("CREATE UNIQUE INDEX events_key ON events (channel, seq)")
    first.execute("CREATE INDEX events_created ON events (created_at)")
    first.execute("COMMIT")
    rebuild.join(15.0)
    assert not rebuild.is_alive()
    indexes = {row[0] for row in first.execute("SELECT name FROM sqlite_master WHERE type = 'index'")}
    assert {"events_key", "events_created"} <= indexes
    assert first.execute("SELECT id, channel, seq FROM events").fetchall() == [(1, "C1", 1)]
    first.close()
    second.close()


def _rebuild_clustered_in(conn: object, table: str) -> None:
    """What webapp_stub.schema._rebuild_clustered does, inside the caller's open transaction."""
    import sqlite3

    from webapp_stub.schema import APPEND_TABLES, _append_table_sql

    assert isinstance(conn, sqlite3.Connection)
    columns = ", ".join(line.split()[0] for line in APPEND_TABLES[table][0].split("\n"))
    conn.execute(_append_table_sql(f"{table}__rowid", table))
    conn.execute(f"INSERT INTO {table}__rowid ({columns}) SELECT {columns} FROM {table}")
    conn.execute(f"DROP TABLE {table}")
    conn.execute(f"ALTER TABLE {table}__rowid RENAME TO {table}")


# -- durability, event size, group commit, dead letters (issue 13) ------------------------------------


def test_synchronous_full_by_default_and_configurable(tmp_path: Path) -> None:
    full = Store(str(tmp_path / "a"))
    assert full.conn.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL: an ok'd commit survives power loss
    full.close()
    normal = Store(str(tmp_path / "b"), synchronous="normal")
    assert normal.conn.execute("PRAGMA synchronous").fetchone()[0] == 1
    normal.close()
    with pytest.raises(ValueError):
        Store(str(tmp_path / "c"), synchronous="FULL; DROP TABLE users")


def test_event_size_limit_refuses_post_and_edit_with_msg_too_long(tmp_path: Path) -> None:
    store = Store(str(tmp_path), max_event_bytes=20_000)
    demo = seed_demo(store)
    alice, general = user(store, demo, "alice"), channel(store, demo, "general")
    before = store.last_seq(general.id)
    blocks = [{"type": "rich_text", "elements": [{"type": "text", "text": "é" * 6000}]}]  # 12 KB of UTF-8
    message, _ = store.post_message(general, alice, "fits", extra={"blocks": blocks})
    assert store.last_seq(general.id) == before + 1
    with pytest.raises(ApiError) as too_big:
        store.post_message(general, alice, "no", extra={"blocks": blocks * 2})
    assert too_big.value.code == "msg_too_long"
    # the edit's event carries the new message and previous_message: 24 KB > 20 KB
    with pytest.raises(ApiError) as edit:
        store.update_message(general, alice, message["ts"], "edited", extra={"blocks": blocks})
    assert edit.value.code == "msg_too_long"
    assert store.last_seq(general.id) == before + 1  # nothing written, no seq used
    assert store.message(general.id, message["ts"])["text"] == "fits"
    store.close()


def test_twenty_digit_ts_and_cursors_get_slack_codes(store: Store, demo: dict) -> None:
    alice, general = user(store, demo, "alice"), channel(store, demo, "general")
    huge = "99999999999999999999.000000"
    for call, code in (
        (lambda: store.history(general.id, oldest=huge), "invalid_ts_oldest"),
        (lambda: store.history(general.id, latest=huge), "invalid_ts_latest"),
        (lambda: store.history(general.id, cursor=encode_cursor("ts", "9" * 20)), "invalid_cursor"),
        (lambda: store.update_message(general, alice, huge, "x"), "invalid_ts"),
        (lambda: store.post_message(general, alice, "x", thread_ts=huge), "invalid_thread_ts"),
        (lambda: store.replies(general.id, huge), "thread_not_found"),
        (lambda: store.list_users(alice.team, cursor=encode_cursor("user", "9" * 20)), "invalid_cursor"),
    ):
        with pytest.raises(ApiError) as caught:
            call()
        assert caught.value.code == code


def test_batch_groups_transactions_and_a_failed_one_rolls_back_alone(store: Store, demo: dict) -> None:
    alice, general = user(store, demo, "alice"), channel(store, demo, "general")
    random = channel(store, demo, "random")
    before = store.last_seq(general.id)
    store.begin_batch()
    first = store.post_message(general, alice, "one")[1]
    with pytest.raises(ApiError):
        store.post_message(general, alice, "x" * 40_001)  # refused before its savepoint
    with pytest.raises(ApiError):
        store.update_message(general, alice, "1.000001", "no such message")  # refused inside: rolled back
    second = store.post_message(general, alice, "two")[1]
    other = store.post_message(random, alice, "three")[1]
    assert store.in_batch
    # another connection sees nothing until the batch commits
    peek = Store(store.path)
    assert peek.last_seq(general.id) == before
    store.commit_batch()
    assert peek.last_seq(general.id) == before + 2
    peek.close()
    assert [first.seq, second.seq] == [before + 1, before + 2] and other.seq >= 1  # gapless
    assert not store.in_batch


def test_dead_letter_lifecycle(store: Store, demo: dict, clock: FakeClock) -> None:
    alice, general = user(store, demo, "alice"), channel(store, demo, "general")
    event = store.post_message(general, alice, "refused downstream")[1]
    assert store.dead_letters() == [] and store.parked_count() == 0
    store.park_event(event, "bad_request", "pub needs ch", 3)
    [letter] = store.dead_letters()
    assert (letter.eid, letter.reason, letter.refusals, letter.state, letter.redrives) == (
        event.eid,
        "bad_request",
        3,
        "parked",
        0,
    )
    later = store.post_message(general, alice, "after it")[1]
    assert [e.eid for e in store.events_since(0.0)] == [later.eid]  # restart replay skips the dead letter
    assert store.request_redrive("C-none", 1) is None
    assert store.request_redrive(event.channel, event.seq).state == "redrive"
    assert store.take_redrives() == [event]
    assert store.dead_letter(event.channel, event.seq).state == "redriving"
    assert store.take_redrives() == []
    # a crash while it was in the outbox: asked for again at the next start
    assert store.resume_redrives() == 1
    assert store.take_redrives() == [event]
    store.park_event(event, "bad_request", "again", 3)  # refused again
    again = store.dead_letter(event.channel, event.seq)
    assert (again.state, again.refusals, again.redrives) == ("parked", 6, 1)
    store.request_redrive(event.channel, event.seq)
    store.take_redrives()
    store.resolve_dead_letter(event.channel, event.seq)
    assert store.dead_letters() == [] and store.parked_count() == 0
    assert store.dead_letters(("delivered",))[0].redrives == 2


def test_resumed_bootstrap_keeps_a_leave_the_moved_connection_had_not_reached(store: Store, demo: dict) -> None:
    """Moved twice: the first gateway saw the leave but had not delivered the channel up to it."""
    alice, random_ch = user(store, demo, "alice"), channel(store, demo, "random")
    store.post_message(random_ch, alice, "m1")
    _, left = store.leave_channel(random_ch, alice)
    upto = left[0].seq
    record = {alice.id: store.last_seq(alice.id), random_ch.id: 0, alice.team: 0}  # past the leave
    boot = store.bootstrap(alice.id, record, {random_ch.id: upto, "CNOTINRECORD": 3})
    seqs = {c["id"]: c["seq"] for c in boot["channels"]}
    assert seqs[random_ch.id] == 0 and boot["until"] == {random_ch.id: upto}
    assert "CNOTINRECORD" not in seqs


# -- the token -> user cache (issue 17): never outlives a change -------------------------------
def a_token(store: Store, demo: dict, name: str) -> tuple[str, str]:
    person = next(u for u in demo["users"] if u["name"] == name)
    return person["token"], person["id"]


def test_auth_is_cached_and_a_revoked_token_stops_at_once(store: Store, demo: dict) -> None:
    token, uid = a_token(store, demo, "alice")
    assert store.auth(token).id == uid
    store.conn.execute("UPDATE tokens SET user = user WHERE 0")  # a statement that changes nothing
    assert token in store.auth_cache  # cached: later lookups do not query
    assert store.revoke_token(token)
    assert store.auth(token) is None and token not in store.auth_cache
    assert store.revoke_token(token) == []


def test_a_revocation_emits_tokens_revoked_on_the_users_channel_naming_the_token_id(store: Store, demo: dict) -> None:
    """The event every gateway holding the user's connections reads (ctl revoke = the token's id,
    never the token), in the revoke's transaction; the user's other tokens stay live."""
    token, uid = a_token(store, demo, "alice")
    phone = "xoxp-alice-phone-0123456789abcdef"
    with store.transaction() as db:
        db.execute("INSERT INTO tokens (token, user) VALUES (?, ?)", (phone, uid))
    before = store.last_seq(uid)
    events = store.revoke_token(token)
    assert events_of(events) == [(uid, "tokens_revoked", {"revoke": token_id(token)})]
    assert json.loads(events[0].json) == {"type": "tokens_revoked", "tokens": {"oauth": [uid]}}
    assert events[0].seq == before + 1 and token not in events[0].json
    assert store.events_after(uid, before, 10)[0][0].ctl == {"revoke": token_id(token)}  # durable, as sent
    assert not store.token_is_live(uid, token_id(token)) and store.token_is_live(uid, token_id(phone))
    assert not store.token_is_live("U0NOBODY", token_id(phone))
    bot = next(u for u in demo["users"] if u.get("is_bot"))
    assert json.loads(store.revoke_token(bot["token"])[0].json)["tokens"] == {"bot": [bot["id"]]}


def test_a_revocation_inside_an_open_batch_is_seen_by_the_next_lookup_of_the_same_batch(
    store: Store, demo: dict
) -> None:
    token, _ = a_token(store, demo, "alice")
    assert store.auth(token) is not None
    store.begin_batch()  # group commit: the revocation and the next request share one transaction
    store.revoke_token(token)
    assert store.auth(token) is None
    store.commit_batch()
    assert store.auth(token) is None


def test_any_change_to_a_user_row_reaches_auth_whoever_makes_it(store: Store, demo: dict) -> None:
    """A writer this module does not know (a deactivation added later, an operator's SQL):
    the TEMP triggers see every change on this connection."""
    token, uid = a_token(store, demo, "bob")
    assert store.auth(token).presence == "auto"
    store.set_presence(store.auth(token), "away")
    assert store.auth(token).presence == "away"
    with store.transaction() as db:
        db.execute("UPDATE users SET name = 'robert' WHERE id = ?", (uid,))
    assert store.auth(token).name == "robert"
    with store.transaction() as db:
        db.execute("DELETE FROM users WHERE id = ?", (uid,))  # deactivated the hard way
    assert store.auth(token) is None


def test_a_rolled_back_change_leaves_nothing_cached(store: Store, demo: dict) -> None:
    token, uid = a_token(store, demo, "carol")
    assert store.auth(token).name == "carol"
    with pytest.raises(RuntimeError), store.transaction() as db:
        db.execute("UPDATE users SET name = 'mallory' WHERE id = ?", (uid,))
        assert store.auth(token).name == "mallory"  # what this transaction sees, not cached
        raise RuntimeError("rolled back")
    assert store.auth(token).name == "carol"


def test_a_change_from_another_connection_is_seen_within_the_foreign_check_interval(
    store: Store, demo: dict, clock: FakeClock
) -> None:
    import sqlite3

    token, _ = a_token(store, demo, "dave")
    assert store.auth(token) is not None
    other = sqlite3.connect(store.path, isolation_level=None)  # another process, as far as SQLite knows
    try:
        other.execute("DELETE FROM tokens WHERE token = ?", (token,))
        clock.advance(store.auth_cache.foreign_check_s / 2)
        assert store.auth(token) is not None  # within the documented bound, the cache may still answer
        clock.advance(store.auth_cache.foreign_check_s)
        assert store.auth(token) is None
        store.auth_cache.foreign_check_s = 0.0  # exact: checked on every lookup
        eve, uid = a_token(store, demo, "eve")
        assert store.auth(eve) is not None
        other.execute("DELETE FROM users WHERE id = ?", (uid,))
        assert store.auth(eve) is None
    finally:
        other.close()


# -- the Slack JSON of a post, encoded once (issue 17) ----------------------------------------
@pytest.mark.parametrize(
    "text,kwargs",
    [
        ("hello", {}),
        ('quotes " and \\ and ünïcödé 💬 and \u2028', {}),
        ("in a thread", {"thread": True, "broadcast": True}),
        ("", {"extra": {"blocks": [{"type": "section", "text": {"type": "mrkdwn", "text": "*b*"}}]}}),
    ],
)
def test_a_posts_event_json_and_reply_are_exactly_what_encoding_them_gives(
    store: Store, demo: dict, text: str, kwargs: dict
) -> None:
    from webapp_stub.codecs import dumps
    from webapp_stub.messages import message_reply_json

    general = channel(store, demo, "general")
    alice = user(store, demo, "alice")
    thread_ts = None
    if kwargs.pop("thread", False):
        root, _ = store.post_message(general, alice, "root")
        thread_ts = root["ts"]
    message, event = store.post_message(
        general, alice, text, thread_ts=thread_ts, broadcast=kwargs.get("broadcast", False), extra=kwargs.get("extra")
    )
    payload = {"type": "message", "channel": general.id, **{k: v for k, v in message.items() if k != "type"}}
    payload["event_ts"] = message["ts"]
    assert event.json == dumps(payload)  # byte for byte what encoding the payload gives
    reply = message_reply_json(general.id, message["ts"], event.json)
    assert reply == dumps({"ok": True, "channel": general.id, "ts": message["ts"], "message": message})
    assert message_reply_json("C0OTHER", message["ts"], event.json) is None  # not of that shape: no splice


@settings(max_examples=300)
@given(
    text=st.text(st.characters(codec=None)),
    ids=st.lists(st.text(st.characters(codec=None), max_size=12), min_size=4, max_size=4),
)
def test_a_plain_posts_event_json_built_directly_is_what_encoding_it_gives(text: str, ids: list[str]) -> None:
    # round 4 (docs/publish-path.md): the common post's event JSON is written field by field
    from webapp_stub.codecs import dumps
    from webapp_stub.messages import _message_obj, message_event_json

    user_id, team, ts, channel_id = ids
    message = _message_obj(user_id, team, text, ts, None, None, None)
    payload = {"type": "message", "channel": channel_id, **{k: v for k, v in message.items() if k != "type"}}
    payload["event_ts"] = ts
    assert message_event_json(channel_id, ts, message) == dumps(payload)


def test_channel_and_membership_reads_are_cached_and_follow_every_change(store: Store, demo: dict) -> None:
    general, bob = channel(store, demo, "general"), user(store, demo, "bob")
    private, _ = store.create_channel(user(store, demo, "alice"), "secret", is_private=True)
    assert store.is_member(general.id, bob.id) and not store.is_member(private.id, bob.id)
    assert (private.id, bob.id) in store.member_cache  # a "no" is cached too
    store.join_channel(private, bob)
    assert store.is_member(private.id, bob.id)
    store.leave_channel(private, bob)
    assert not store.is_member(private.id, bob.id)
    assert store.channel(general.id) == general and general.id in store.channel_cache
    lounge = channel(store, demo, [c["name"] for c in demo["channels"] if c["name"] != "general"][0])
    store.archive_channel(lounge, bob)
    assert store.channel(lounge.id).is_archived  # an archive is seen at once
    with store.transaction() as db:
        db.execute("UPDATE channels SET name = 'renamed' WHERE id = ?", (general.id,))
    assert store.channel(general.id).name == "renamed"
    with store.transaction() as db:
        db.execute("DELETE FROM members WHERE channel = ? AND user = ?", (general.id, bob.id))
    assert not store.is_member(general.id, bob.id)


def test_reads_inside_the_group_commit_are_cached_again_once_a_change_is_committed(store: Store, demo: dict) -> None:
    # Under load every post reads inside the open batch. A membership change used to turn the
    # cache off until a read came outside any transaction, which under load never did.
    general, bob = channel(store, demo, "general"), user(store, demo, "bob")
    private, _ = store.create_channel(user(store, demo, "alice"), "secret", is_private=True)
    store.begin_batch()
    store.join_channel(private, bob)  # the change, in the batch
    assert store.is_member(private.id, bob.id) and (private.id, bob.id) not in store.member_cache
    store.commit_batch()
    for _ in range(2):  # the batches after it, as a loaded webapp runs them
        store.begin_batch()
        assert store.is_member(private.id, bob.id) and store.is_member(general.id, bob.id)
        assert store.channel(general.id) == general
        store.commit_batch()
    assert (private.id, bob.id) in store.member_cache and (general.id, bob.id) in store.member_cache
    store.begin_batch()
    store.leave_channel(private, bob)
    store.conn.execute("ROLLBACK")  # a batch that SQLite (or a failure) rolled back
    store._in_batch = False
    store.transaction_ended()
    assert store.is_member(private.id, bob.id)  # the leave never happened: read again, right


def test_a_transaction_whose_commit_fails_is_rolled_back_not_left_open(store: Store, demo: dict) -> None:
    # Left open, the next transaction() would be a savepoint inside it, released but never committed.
    store.conn.execute("PRAGMA foreign_keys=ON")
    store.conn.execute("CREATE TEMP TABLE parent (id INTEGER PRIMARY KEY)")
    store.conn.execute("CREATE TEMP TABLE child (p INTEGER REFERENCES parent(id) DEFERRABLE INITIALLY DEFERRED)")
    with pytest.raises(sqlite3.IntegrityError), store.transaction() as db:  # fails at its COMMIT
        db.execute("INSERT INTO child VALUES (1)")
    assert not store.conn.in_transaction
    with store.transaction() as db:
        db.execute("INSERT INTO parent VALUES (7)")
    assert not store.conn.in_transaction
    assert store.conn.execute("SELECT count(*) FROM child").fetchone()[0] == 0


# -- the seq hint (round 4, docs/publish-path.md) ------------------------------------------------
def test_seqs_from_the_hint_stay_gapless_across_rollbacks_and_other_writers(
    store: Store, demo: dict, clock: FakeClock
) -> None:
    general, alice = channel(store, demo, "general"), user(store, demo, "alice")
    first = store.post_message(general, alice, "one")[1].seq
    assert store._seqs[general.id][0] == first  # remembered
    # a savepoint rolled back after its allocation: the hint is ahead of the row
    store.begin_batch()
    with pytest.raises(RuntimeError), store.transaction():
        store.post_message(general, alice, "undone")
        raise RuntimeError("handler failed after its write")
    assert store._seqs[general.id][0] == first + 1 and store.last_seq(general.id) == first
    second = store.post_message(general, alice, "two")[1].seq
    store.commit_batch()
    assert second == first + 1  # no gap: the row, not the hint, decided
    # a whole batch rolled back: the same
    store.begin_batch()
    store.post_message(general, alice, "lost")
    store.conn.execute("ROLLBACK")
    store._in_batch = False
    assert store.post_message(general, alice, "three")[1].seq == first + 2
    # another connection (the scheduler's, another process) moves the row
    other = Store(store.path, clock=clock)
    assert other.post_message(general, alice, "elsewhere")[1].seq == first + 3
    other.close()
    event = store.post_message(general, alice, "four")[1]
    assert event.seq == first + 4
    seqs = [e.seq for e in store.events_after(general.id, 0)[0]]
    assert seqs == list(range(1, first + 5))


def test_ts_from_the_hint_still_rises_when_the_clock_goes_back(store: Store, demo: dict, clock: FakeClock) -> None:
    general, alice = channel(store, demo, "general"), user(store, demo, "alice")
    stamps = []
    for step in (0.0, -5.0, 0.0, 3.0):
        clock.advance(step)  # -5: the clock went back
        stamps.append(ts_to_us(store.post_message(general, alice, "x")[0]["ts"]))
    assert stamps == sorted(stamps) and len(set(stamps)) == len(stamps)


def test_the_restart_replay_reads_only_recent_events_through_their_index(store: Store) -> None:
    """events_since (the hand-off's replay at start) must not scan the whole event log: SQLite's
    planner, left alone, scans it in key order rather than sort the recent events."""
    from webapp_stub.events import EVENTS_SINCE_SQL

    plan = [row[3] for row in store.conn.execute("EXPLAIN QUERY PLAN " + EVENTS_SINCE_SQL, (0.0,))]
    assert any("USING INDEX events_created" in step for step in plan), plan


def test_a_profile_field_of_the_wrong_type_is_invalid_profile(store: Store, demo: dict) -> None:
    """A JSON ``true`` as ``status_expiration`` used to be stored as 1 (``int(True)``)."""
    alice = user(store, demo, "alice")
    for bad in (
        {"status_expiration": True},
        {"status_expiration": [1]},
        {"status_expiration": "soon"},
        {"title": True},
    ):
        with pytest.raises(ApiError) as caught:
            store.set_profile(alice, bad)
        assert caught.value.code == "invalid_profile", bad
    profile, _ = store.set_profile(alice, {"status_expiration": 1_900_000_000, "title": 5})
    assert (profile["status_expiration"], profile["title"]) == (1_900_000_000, "5")
