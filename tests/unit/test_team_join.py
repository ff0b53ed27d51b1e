"""Slack's team_join for people added outside the Web API (webapp_stub/team_join.py), driven
synchronously over a real SQLite store."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

from tests.support import async_wait_until
from webapp_stub.commit import CommitFailed
from webapp_stub.seed import seed_demo
from webapp_stub.store import Store
from webapp_stub.team_join import NewPeople, announce_new_people


def test_people_added_after_the_start_are_announced_once_on_their_team_channel(tmp_path: Path) -> None:
    store = Store(str(tmp_path / "webapp.db"))
    try:
        seed = seed_demo(store, users=5, bots=1)
        team = seed["team"]["id"]
        people = NewPeople(store)
        assert people.announce() == []  # the seed's people were there before: not announced
        frank, _ = store.create_user(team, "frank", real_name="Frank Z")
        bot, _ = store.create_user(team, "helper", is_bot=True)
        events = people.announce()
        assert [e.channel for e in events] == [team, team]
        payloads = [json.loads(e.json) for e in events]
        assert [p["type"] for p in payloads] == ["team_join", "team_join"]
        assert [p["user"]["id"] for p in payloads] == [frank.id, bot.id]
        assert payloads[0]["user"]["real_name"] == "Frank Z" and "profile" in payloads[0]["user"]
        assert [e.seq for e in events] == [events[0].seq, events[0].seq + 1]  # the team channel's next seqs
        assert store.last_seq(team) == events[-1].seq  # committed
        assert people.announce() == []  # once
    finally:
        store.close()


def test_a_look_announces_a_bounded_number_and_the_next_the_rest(tmp_path: Path) -> None:
    store = Store(str(tmp_path / "webapp.db"))
    try:
        team = seed_demo(store, users=2, bots=0)["team"]["id"]
        people = NewPeople(store, max_per_poll=2)
        made = [store.create_user(team, f"p{i}")[0].id for i in range(3)]
        first, second = people.announce(), people.announce()
        assert [json.loads(e.json)["user"]["id"] for e in first + second] == made
        assert (len(first), len(second)) == (2, 1)
    finally:
        store.close()


async def test_people_whose_commit_failed_are_announced_again(tmp_path: Path) -> None:
    """The group commit that held a look's team_join failed (rolled back): the next look announces
    the same people, instead of never (review13)."""
    store = Store(str(tmp_path / "webapp.db"))
    published: list[list[str]] = []
    failures = [CommitFailed("disk I/O error")]

    async def durable() -> None:
        if failures:
            raise failures.pop()

    team = seed_demo(store, users=2, bots=0)["team"]["id"]
    people = NewPeople(store)
    store.create_user(team, "frank")
    task = asyncio.create_task(
        announce_new_people(
            people,
            lambda events: published.append([json.loads(e.json)["user"]["name"] for e in events]),
            durable,
            0.001,
        )
    )
    try:
        await async_wait_until(lambda: _true(len(published) >= 2), what="frank announced twice")
        assert published[:2] == [["frank"], ["frank"]]
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        store.close()


async def _true(value: bool) -> bool:
    return value
