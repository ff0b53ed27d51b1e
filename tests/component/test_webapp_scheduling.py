"""Scheduled messages, reminders, bookmarks and pins through the official slack_sdk WebClient,
against the webapp in-process on a real port, with the fake Admin Server recording each pub.

Every method is called for what it does and for each of its errors; due items are seen
leaving for the Admin Server at their time, exactly once.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import pytest
from slack_sdk import WebClient
from slack_sdk.errors import SlackApiError

from tests.support import async_wait_until
from tests.webapp_harness import FakeAdminServer, Webapp
from webapp_stub.reminders import SLACKBOT_ID, parse_time
from webapp_stub.store import ApiError


class Sdk:
    """One user's WebClient, called off the event loop."""

    def __init__(self, webapp: Webapp, name: str) -> None:
        self.client = WebClient(token=webapp.user(name)["token"], base_url=webapp.url + "/api/")

    async def __call__(self, method: str, **kwargs: Any) -> dict[str, Any]:
        fn = getattr(self.client, method)
        return dict((await asyncio.to_thread(fn, **kwargs)).data)

    async def error(self, method: str, **kwargs: Any) -> str:
        with pytest.raises(SlackApiError) as err:
            await self(method, **kwargs)
        assert err.value.response["ok"] is False
        return str(err.value.response["error"])


def pub_events(fake_as: FakeAdminServer, channel: str) -> list[dict[str, Any]]:
    return [json.loads(p["json"]) for p in fake_as.pubs_for(channel)]


async def metrics_text(webapp: Webapp) -> str:
    async with webapp.session.get(f"{webapp.url}/metrics") as resp:
        return await resp.text()


async def test_schedule_list_delete_and_post_at_its_time_once(webapp: Webapp, fake_as: FakeAdminServer) -> None:
    alice, bob = Sdk(webapp, "alice"), Sdk(webapp, "bob")
    general, random = webapp.channel("general"), webapp.channel("random")
    now = int(time.time())
    first = await alice("chat_scheduleMessage", channel=general, post_at=now + 2, text="in two seconds")
    assert first["scheduled_message_id"].startswith("Q") and first["channel"] == general
    assert first["post_at"] == str(now + 2) and first["message"]["text"] == "in two seconds"
    keep = await alice("chat_scheduleMessage", channel=random, post_at=now + 3600, text="later")
    gone = await alice("chat_scheduleMessage", channel=general, post_at=now + 3, text="never")
    await bob("chat_scheduleMessage", channel=general, post_at=now + 3600, text="bob's own")

    # list: only the caller's, soonest first, per channel, bounded, paged
    listed = (await alice("chat_scheduledMessages_list"))["scheduled_messages"]
    assert [m["text"] for m in listed] == ["in two seconds", "never", "later"]
    assert set(listed[0]) == {"id", "channel_id", "post_at", "date_created", "text"}
    assert [m["text"] for m in (await alice("chat_scheduledMessages_list", channel=random))["scheduled_messages"]] == [
        "later"
    ]
    bounded = await alice("chat_scheduledMessages_list", oldest=now + 3, latest=now + 3600)
    assert [m["text"] for m in bounded["scheduled_messages"]] == ["never", "later"]
    pages = await asyncio.to_thread(
        lambda: [p["scheduled_messages"] for p in alice.client.chat_scheduledMessages_list(limit=1)]
    )
    assert [m["text"] for page in pages for m in page] == ["in two seconds", "never", "later"] and len(pages) == 3

    # delete one before its time: it never leaves
    assert await alice(
        "chat_deleteScheduledMessage", channel=general, scheduled_message_id=gone["scheduled_message_id"]
    )
    assert (
        await alice.error(
            "chat_deleteScheduledMessage", channel=general, scheduled_message_id=gone["scheduled_message_id"]
        )
        == "invalid_scheduled_message_id"
    )

    async def posted() -> bool:
        return any(e.get("text") == "in two seconds" for e in pub_events(fake_as, general))

    await async_wait_until(posted, timeout_s=10, what="the scheduled message at the admin server")
    event = next(e for e in pub_events(fake_as, general) if e.get("text") == "in two seconds")
    assert event["type"] == "message" and event["user"] == webapp.user("alice")["id"]
    assert float(event["ts"]) >= now + 2  # not early
    history = await bob("conversations_history", channel=general, limit=5)
    assert [m["text"] for m in history["messages"]].count("in two seconds") == 1
    # posted: it left the list, and cannot be deleted any more
    assert [m["text"] for m in (await alice("chat_scheduledMessages_list"))["scheduled_messages"]] == ["later"]
    assert (
        await alice.error(
            "chat_deleteScheduledMessage", channel=general, scheduled_message_id=first["scheduled_message_id"]
        )
        == "invalid_scheduled_message_id"
    )
    # past the deleted one's time (3 s): a bounded wait, only to prove a negative
    await asyncio.sleep(1.5)  # wait-ok
    assert all(e.get("text") != "never" for e in pub_events(fake_as, general))
    assert [e.get("text") for e in pub_events(fake_as, general)].count("in two seconds") == 1
    text = await metrics_text(webapp)
    assert 'rtm_scheduler_fired_total{kind="message",late="false",outcome="posted"} 1.0' in text
    assert keep["scheduled_message_id"]


async def test_schedule_message_errors(webapp: Webapp) -> None:
    alice, bob = Sdk(webapp, "alice"), Sdk(webapp, "bob")
    general = webapp.channel("general")
    now = int(time.time())
    private = (await bob("conversations_create", name="bobs-room", is_private=True))["channel"]["id"]
    cases = {
        "time_in_past": dict(channel=general, post_at=now - 10, text="x"),
        "time_too_far": dict(channel=general, post_at=now + 121 * 86_400, text="x"),
        "invalid_time": dict(channel=general, post_at="soon", text="x"),
        "no_text": dict(channel=general, post_at=now + 60),
        "msg_too_long": dict(channel=general, post_at=now + 60, text="x" * 40_001),
        "channel_not_found": dict(channel=private, post_at=now + 60, text="x"),
        "invalid_thread_ts": dict(channel=general, post_at=now + 60, text="x", thread_ts="yesterday"),
    }
    for code, kwargs in cases.items():
        assert await alice.error("chat_scheduleMessage", **kwargs) == code, code
    await bob("conversations_leave", channel=webapp.channel("random"))
    assert (
        await bob.error("chat_scheduleMessage", channel=webapp.channel("random"), post_at=now + 60, text="x")
        == "not_in_channel"
    )
    # Slack: at most 30 to one channel within 5 minutes
    for i in range(30):
        await alice("chat_scheduleMessage", channel=general, post_at=now + 600 + i, text=f"m{i}")
    assert (
        await alice.error("chat_scheduleMessage", channel=general, post_at=now + 650, text="x") == "restricted_too_many"
    )
    assert await alice("chat_scheduleMessage", channel=general, post_at=now + 600 + 301, text="next window")
    # list and delete
    assert await alice.error("chat_scheduledMessages_list", oldest=now + 10, latest=now) == "invalid_arguments"
    assert await alice.error("chat_scheduledMessages_list", cursor="%%%") == "invalid_cursor"
    assert await alice.error("chat_scheduledMessages_list", channel="CNOPE") == "channel_not_found"
    mine = (await alice("chat_scheduledMessages_list", limit=1))["scheduled_messages"][0]
    assert (
        await bob.error("chat_deleteScheduledMessage", channel=general, scheduled_message_id=mine["id"])
        == "invalid_scheduled_message_id"
    )
    assert (
        await alice.error(
            "chat_deleteScheduledMessage", channel=webapp.channel("random"), scheduled_message_id=mine["id"]
        )
        == "invalid_scheduled_message_id"
    )
    assert (
        await alice.error("chat_deleteScheduledMessage", channel=general, scheduled_message_id="Qnope")
        == "invalid_scheduled_message_id"
    )
    text = await metrics_text(webapp)
    assert 'rtm_errors_total{kind="time_in_past"} 1.0' in text
    assert 'rtm_errors_total{kind="restricted_too_many"} 1.0' in text


async def test_scheduled_reply_broadcast_and_blocks_fire_like_post_message(
    webapp: Webapp, fake_as: FakeAdminServer
) -> None:
    alice = Sdk(webapp, "alice")
    general = webapp.channel("general")
    parent = await alice("chat_postMessage", channel=general, text="parent")
    blocks = [{"type": "section", "text": {"type": "plain_text", "text": "hi"}}]
    await alice(
        "chat_scheduleMessage",
        channel=general,
        post_at=int(time.time()) + 1,
        text="reply",
        thread_ts=parent["ts"],
        reply_broadcast=True,
        blocks=blocks,
    )

    async def posted() -> dict[str, Any] | None:
        return next((e for e in pub_events(fake_as, general) if e.get("text") == "reply"), None)

    event = await async_wait_until(posted, timeout_s=10, what="the scheduled reply")
    assert event["thread_ts"] == parent["ts"] and event["subtype"] == "thread_broadcast" and event["blocks"] == blocks
    seqs = [p["seq"] for p in fake_as.pubs_for(general)]
    assert seqs == list(range(1, len(seqs) + 1))  # the channel's next seq, gapless


async def test_a_scheduled_message_whose_author_left_fails_and_is_counted(
    webapp: Webapp, fake_as: FakeAdminServer
) -> None:
    bob = Sdk(webapp, "bob")
    random = webapp.channel("random")
    await bob("chat_scheduleMessage", channel=random, post_at=int(time.time()) + 1, text="orphan")
    await bob("conversations_leave", channel=random)

    async def failed() -> bool:
        return 'rtm_scheduler_fired_total{kind="message",late="false",outcome="failed"} 1.0' in await metrics_text(
            webapp
        )

    await async_wait_until(failed, timeout_s=10, what="the failure counted")
    assert all(e.get("text") != "orphan" for e in pub_events(fake_as, random))
    assert 'rtm_errors_total{kind="scheduled_not_in_channel"} 1.0' in await metrics_text(webapp)


async def test_reminders_add_list_info_complete_delete_and_arrive_from_slackbot(
    webapp: Webapp, fake_as: FakeAdminServer
) -> None:
    alice, bob = Sdk(webapp, "alice"), Sdk(webapp, "bob")
    alice_id, bob_id = webapp.user("alice")["id"], webapp.user("bob")["id"]
    soon = await alice("reminders_add", text="stretch", time="1")
    reminder = soon["reminder"]
    assert reminder["id"].startswith("Rm") and reminder["creator"] == alice_id and reminder["user"] == alice_id
    assert reminder["recurring"] is False and reminder["complete_ts"] == 0 and reminder["text"] == "stretch"
    for_bob = (await alice("reminders_add", text="call alice", time="in 2 hours", user=bob_id))["reminder"]
    assert for_bob["user"] == bob_id and for_bob["time"] >= int(time.time()) + 7199
    later = (await alice("reminders_add", text="tomorrow thing", time="tomorrow"))["reminder"]

    async def delivered() -> tuple[str, dict[str, Any]] | None:
        for pub in fake_as.pubs:
            event = json.loads(pub["json"])
            if event.get("type") == "message" and event.get("text") == "Reminder: stretch.":
                return str(pub["ch"]), event
        return None

    dm, event = await async_wait_until(delivered, timeout_s=10, what="the reminder from Slackbot")
    assert dm.startswith("D") and event["user"] == SLACKBOT_ID
    # the DM was opened on Alice's user channel first, so her connections follow it
    created = [json.loads(p["json"]) for p in fake_as.pubs_for(alice_id)]
    assert any(e["type"] == "im_created" and e["channel"]["id"] == dm and e["user"] == SLACKBOT_ID for e in created)
    history = await alice("conversations_history", channel=dm)
    assert [m["text"] for m in history["messages"]] == ["Reminder: stretch."]

    listed = (await alice("reminders_list"))["reminders"]
    assert [r["text"] for r in listed] == ["stretch", "call alice", "tomorrow thing"]
    assert [r["text"] for r in (await bob("reminders_list"))["reminders"]] == ["call alice"]
    assert (await bob("reminders_info", reminder=for_bob["id"]))["reminder"] == for_bob
    await bob("reminders_complete", reminder=for_bob["id"])
    assert (await alice("reminders_info", reminder=for_bob["id"]))["reminder"]["complete_ts"] > 0
    assert await bob.error("reminders_complete", reminder=for_bob["id"]) == "already_complete"
    await alice("reminders_delete", reminder=later["id"])
    assert await alice.error("reminders_info", reminder=later["id"]) == "not_found"
    carol = Sdk(webapp, "carol")
    assert await carol.error("reminders_info", reminder=reminder["id"]) == "not_found"
    assert await carol.error("reminders_delete", reminder=reminder["id"]) == "not_found"
    assert await carol.error("reminders_complete", reminder="Rmnope") == "not_found"


async def test_reminder_errors(webapp: Webapp) -> None:
    alice = Sdk(webapp, "alice")
    bot_id = next(u["id"] for u in webapp.seed["users"] if u["is_bot"])
    cases = {
        "cannot_parse": dict(text="x", time="whenever"),
        "time_in_past": dict(text="x", time=str(int(time.time()) - 100_000)),
        "no_text": dict(text="  ", time="in 5 minutes"),
        "user_not_found": dict(text="x", time="in 5 minutes", user="UNOPE"),
        "cannot_add_bot": dict(text="x", time="in 5 minutes", user=bot_id),
        "cannot_add_slackbot": dict(text="x", time="in 5 minutes", user=SLACKBOT_ID),
    }
    for code, kwargs in cases.items():
        assert await alice.error("reminders_add", **kwargs) == code, code
    assert await alice.error("reminders_add", text="x", time="every thursday") == "cannot_parse"
    assert await alice.error("reminders_info", reminder="") == "not_found"


def test_reminder_times() -> None:
    now = 1_700_000_000.0  # 2023-11-14 22:13:20 UTC
    assert parse_time("60", now) == now + 60
    assert parse_time(86_400, now) == now + 86_400
    assert parse_time(str(int(now) + 90_000), now) == int(now) + 90_000
    assert parse_time("in 15 minutes", now) == now + 900
    assert parse_time("in 2 hours", now) == now + 7200
    assert parse_time("in a day", now) == now + 86_400
    assert parse_time("In 3 Weeks", now) == now + 3 * 7 * 86_400
    assert parse_time("tomorrow", now) == 1_700_038_800  # 2023-11-15 09:00 UTC
    for bad in ("in 5 fortnights", "in minutes", "-5", "nan", "inf", "", "every day"):
        with pytest.raises(ApiError):
            parse_time(bad, now)
    with pytest.raises(ApiError, match="cannot_parse"):
        parse_time(str(int(now) + 6 * 365 * 86_400), now)


async def test_pins_add_list_remove_emit_events_and_errors(webapp: Webapp, fake_as: FakeAdminServer) -> None:
    alice, bob = Sdk(webapp, "alice"), Sdk(webapp, "bob")
    general = webapp.channel("general")
    posted = await bob("chat_postMessage", channel=general, text="pin me")
    assert await alice("pins_add", channel=general, timestamp=posted["ts"])
    items = (await bob("pins_list", channel=general))["items"]
    assert len(items) == 1 and items[0]["type"] == "message" and items[0]["message"]["text"] == "pin me"
    assert items[0]["created_by"] == webapp.user("alice")["id"]
    assert await alice.error("pins_add", channel=general, timestamp=posted["ts"]) == "already_pinned"
    assert await alice.error("pins_add", channel=general) == "no_item_specified"
    assert await alice.error("pins_add", channel=general, timestamp="noon") == "bad_timestamp"
    assert await alice.error("pins_add", channel=general, timestamp="1.000001") == "message_not_found"
    assert await alice.error("pins_add", channel="CNOPE", timestamp=posted["ts"]) == "channel_not_found"
    await alice("pins_remove", channel=general, timestamp=posted["ts"])
    assert await alice.error("pins_remove", channel=general, timestamp=posted["ts"]) == "no_pin"
    assert (await bob("pins_list", channel=general))["items"] == []

    async def both() -> list[dict[str, Any]] | None:
        found = [e for e in pub_events(fake_as, general) if e["type"] in ("pin_added", "pin_removed")]
        return found if len(found) == 2 else None

    added, removed = await async_wait_until(both, what="pin events on the channel")
    assert added["channel_id"] == general and added["user"] == webapp.user("alice")["id"]
    assert added["item"]["message"]["ts"] == posted["ts"] and added["item_user"] == webapp.user("bob")["id"]
    assert added["pin_count"] == 1 and added["pinned_info"]["pinned_by"] == webapp.user("alice")["id"]
    assert removed["pin_count"] == 0 and removed["has_pins"] is False and "event_ts" in removed


async def test_bookmarks_add_edit_remove_list_emit_events_and_errors(webapp: Webapp, fake_as: FakeAdminServer) -> None:
    alice, bob = Sdk(webapp, "alice"), Sdk(webapp, "bob")
    general = webapp.channel("general")
    added = (
        await alice(
            "bookmarks_add", channel_id=general, title="Docs", type="link", link="https://example.com/", emoji=":book:"
        )
    )["bookmark"]
    assert added["id"].startswith("Bk") and added["channel_id"] == general and added["emoji"] == ":book:"
    assert added["last_updated_by_user_id"] == webapp.user("alice")["id"] and added["date_updated"] == 0
    edited = (await bob("bookmarks_edit", channel_id=general, bookmark_id=added["id"], title="Manual"))["bookmark"]
    assert edited["title"] == "Manual" and edited["link"] == "https://example.com/" and edited["date_updated"] > 0
    second = (await bob("bookmarks_add", channel_id=general, title="Two", type="link", link="http://b.example"))[
        "bookmark"
    ]
    assert [b["title"] for b in (await alice("bookmarks_list", channel_id=general))["bookmarks"]] == ["Manual", "Two"]
    await alice("bookmarks_remove", channel_id=general, bookmark_id=second["id"])
    assert [b["id"] for b in (await alice("bookmarks_list", channel_id=general))["bookmarks"]] == [added["id"]]

    async def events() -> list[dict[str, Any]] | None:
        found = [e for e in pub_events(fake_as, general) if e["type"].startswith("bookmark_")]
        return found if len(found) == 4 else None

    kinds = [(e["type"], e["bookmark"]["title"]) for e in await async_wait_until(events, what="bookmark events")]
    assert kinds == [
        ("bookmark_added", "Docs"),
        ("bookmark_updated", "Manual"),
        ("bookmark_added", "Two"),
        ("bookmark_removed", "Two"),
    ]

    errors = {
        "invalid_bookmark_type": dict(channel_id=general, title="x", type="file", link="https://x.example"),
        "invalid_link": dict(channel_id=general, title="x", type="link", link="javascript:alert(1)"),
        "invalid_title": dict(channel_id=general, title=" ", type="link", link="https://x.example"),
        "invalid_emoji": dict(channel_id=general, title="x", type="link", link="https://x.example", emoji="book"),
        "channel_not_found": dict(channel_id="CNOPE", title="x", type="link", link="https://x.example"),
    }
    for code, kwargs in errors.items():
        assert await alice.error("bookmarks_add", **kwargs) == code, code
    assert await alice.error("bookmarks_edit", channel_id=general, bookmark_id="Bknope", title="x") == "not_found"
    assert await alice.error("bookmarks_remove", channel_id=general, bookmark_id="Bknope") == "not_found"
    await bob("conversations_leave", channel=webapp.channel("random"))
    assert (
        await bob.error(
            "bookmarks_add", channel_id=webapp.channel("random"), title="x", type="link", link="https://x.example"
        )
        == "not_in_channel"
    )
    for i in range(99):
        await alice("bookmarks_add", channel_id=general, title=f"b{i}", type="link", link=f"https://x.example/{i}")
    assert (
        await alice.error("bookmarks_add", channel_id=general, title="101", type="link", link="https://x.example")
        == "too_many_bookmarks"
    )
