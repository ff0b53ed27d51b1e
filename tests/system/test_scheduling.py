"""Scheduled messages, reminders, bookmarks and pins on the real fleet started by ``rtm up``.

A message scheduled two seconds ahead reaches a connected client once, at its time; one
deleted before its time never does; a reminder arrives as Slackbot's message in the
user's DM with Slackbot; bookmark and pin events reach the conversation's members over
RTM. Last (it restarts the webapp): a message due while the webapp is frozen and then
SIGKILLed arrives once, late, after ``rtm up`` restarts it, and the metric says so.
"""

from __future__ import annotations

import os
import signal
import time
import uuid
from typing import Any

import aiohttp

from tests.support import DEFAULT_WAIT_S, wait_until
from tests.system.harness import Client, Fleet
from webapp_stub.reminders import SLACKBOT_ID


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


async def call(fleet: Fleet, name: str, method: str, **params: Any) -> dict[str, Any]:
    reply = await fleet.api(method, fleet.user(name)["token"], **params)
    assert reply["ok"], (method, reply)
    return reply


async def settle(fleet: Fleet, client: Client, channel: str) -> None:
    """Post a marker after everything else on ``channel`` and wait for it: anything the fleet
    would deliver before it (a duplicate included) has been delivered by then."""
    marker = unique("marker")
    await call(fleet, "alice", "chat.postMessage", channel=channel, text=marker)
    await client.wait_texts([marker], channel)


def arrival(client: Client, text: str) -> list[float]:
    return [e["_at"] for e in client.events if e.get("type") == "message" and e.get("text") == text]


def stamp_arrivals(client: Client) -> None:
    """Record when each event arrived (the harness keeps events, not times)."""
    original = client.events

    class Stamped(list):  # type: ignore[type-arg]
        def append(self, event: Any) -> None:
            event["_at"] = time.time()
            super().append(event)

    client.events = Stamped(original)


async def test_scheduled_message_arrives_once_at_its_time(fleet: Fleet) -> None:
    bob = await fleet.connect("bob")
    stamp_arrivals(bob)
    general = fleet.channel("general")
    text = unique("scheduled")
    post_at = int(time.time()) + 2
    await call(fleet, "alice", "chat.scheduleMessage", channel=general, post_at=post_at, text=text)
    await bob.wait_texts([text], general)
    await settle(fleet, bob, general)
    times = arrival(bob, text)
    assert len(times) == 1
    assert post_at - 0.05 <= times[0] <= post_at + 1.5, times[0] - post_at
    await bob.close()


async def test_deleted_scheduled_message_never_arrives(fleet: Fleet) -> None:
    bob = await fleet.connect("bob")
    general = fleet.channel("general")
    doomed, sentinel = unique("doomed"), unique("sentinel")
    now = int(time.time())
    scheduled = await call(fleet, "alice", "chat.scheduleMessage", channel=general, post_at=now + 2, text=doomed)
    await call(fleet, "alice", "chat.scheduleMessage", channel=general, post_at=now + 3, text=sentinel)
    await call(
        fleet,
        "alice",
        "chat.deleteScheduledMessage",
        channel=general,
        scheduled_message_id=scheduled["scheduled_message_id"],
    )
    await bob.wait_texts([sentinel], general)  # due after the deleted one
    await settle(fleet, bob, general)
    assert doomed not in bob.texts()
    await bob.close()


async def test_reminder_arrives_as_slackbots_dm_message(fleet: Fleet) -> None:
    carol = await fleet.connect("carol")
    text = unique("reminder")
    await call(fleet, "carol", "reminders.add", text=text, time="1")
    await carol.wait_for(lambda c: f"Reminder: {text}." in c.texts(), what="the reminder")
    message = next(m for m in carol.messages() if m.get("text") == f"Reminder: {text}.")
    assert message["user"] == SLACKBOT_ID and message["channel"].startswith("D")
    opened = [e for e in carol.events if e.get("type") == "im_created"]
    assert opened and opened[0]["user"] == SLACKBOT_ID and opened[0]["channel"]["id"] == message["channel"]
    assert [m.get("text") for m in carol.messages(message["channel"])].count(f"Reminder: {text}.") == 1
    await carol.close()


async def test_bookmark_and_pin_events_reach_the_members(fleet: Fleet) -> None:
    dave = await fleet.connect("dave")
    general = fleet.channel("general")
    added = await call(
        fleet, "alice", "bookmarks.add", channel_id=general, title="Runbook", type="link", link="https://example.com/"
    )
    bookmark = added["bookmark"]["id"]
    await call(fleet, "alice", "bookmarks.edit", channel_id=general, bookmark_id=bookmark, title="Runbook v2")
    await call(fleet, "alice", "bookmarks.remove", channel_id=general, bookmark_id=bookmark)
    posted = await call(fleet, "alice", "chat.postMessage", channel=general, text=unique("pinned"))
    await call(fleet, "bob", "pins.add", channel=general, timestamp=posted["ts"])
    await call(fleet, "bob", "pins.remove", channel=general, timestamp=posted["ts"])
    kinds = ("bookmark_added", "bookmark_updated", "bookmark_removed", "pin_added", "pin_removed")

    def seen(c: Client) -> list[dict[str, Any]]:
        return [e for e in c.events if e.get("type") in kinds]

    await dave.wait_for(lambda c: len(seen(c)) == 5, what="bookmark and pin events")
    events = seen(dave)
    assert [e["type"] for e in events] == list(kinds)
    assert [e["bookmark"]["title"] for e in events[:3]] == ["Runbook", "Runbook v2", "Runbook v2"]
    assert all(e["channel_id"] == general for e in events)
    assert events[3]["item"]["message"]["ts"] == posted["ts"] and events[4]["has_pins"] is False
    await dave.close()


async def webapp_metric(fleet: Fleet, name: str) -> float:
    base = fleet.api_url.rsplit("/api/", 1)[0]
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{base}/metrics") as resp:
            text = await resp.text()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name))


async def test_due_while_the_webapp_is_down_arrives_once_late(fleet: Fleet) -> None:
    eve = await fleet.connect("eve")
    general = fleet.channel("general")
    text = unique("late")
    post_at = int(time.time()) + 2
    await call(fleet, "alice", "chat.scheduleMessage", channel=general, post_at=post_at, text=text)
    fleet.reload()
    webapp = fleet.processes("webapp")[0]
    # Frozen before its time, killed after it: the webapp is down when the message is due.
    os.kill(webapp["pid"], signal.SIGSTOP)
    wait_until(lambda: time.time() > post_at + 1, timeout_s=5, what="the due time to pass")
    os.kill(webapp["pid"], signal.SIGKILL)
    assert text not in eve.texts()

    def restarted() -> bool:
        fleet.reload()
        return any(p["pid"] != webapp["pid"] for p in fleet.processes("webapp"))

    wait_until(restarted, timeout_s=DEFAULT_WAIT_S * 3, what="rtm up restarting the webapp")
    await eve.wait_texts([text], general, timeout_s=DEFAULT_WAIT_S * 2)
    await settle(fleet, eve, general)
    assert eve.texts(general).count(text) == 1
    message = next(m for m in eve.messages(general) if m.get("text") == text)
    assert float(message["ts"]) > post_at + 1  # posted late, on restart
    late = await webapp_metric(fleet, 'rtm_scheduler_fired_total{kind="message",late="true",outcome="posted"}')
    assert late == 1
    await eve.close()
