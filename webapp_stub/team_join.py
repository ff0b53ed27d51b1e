"""Slack's ``team_join`` for people added outside the Web API.

No Web API method makes a user: people, bots and apps come from ``rtm seed`` and ``rtm users add``
(rtmctl/users.py), which write the webapp's database directly. So that connected clients learn of
someone added while they run (Slack's clients add them to their directory; a welcome bot greets
them on ``team_join``, the classic Slack app), the webapp looks every :data:`NEW_PEOPLE_POLL_S` for
users it has not announced and appends ``{"type": "team_join", "user": <user object>}`` on each one's
team channel, which every connection of the team subscribes to. The event is committed and handed
off like any other (a transaction, the team channel's next seq), so it reaches every client once
and in order.

Announced once per process, from the newest user at its start: people added while no webapp ran
are not announced (no client was connected to miss them, and a client's boot reads ``users.list``),
and a webapp that crashes between a user's insert and its next look does not announce that one.
A look whose group commit fails is looked at again.

:class:`NewPeople` is the step, called synchronously (tests drive it without a loop);
:func:`announce_new_people` the thin loop around it.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from webapp_stub.commit import CommitFailed
from webapp_stub.models import Event
from webapp_stub.reminders import SLACKBOT_ID
from webapp_stub.store import Store

log = logging.getLogger("rtm.webapp.team_join")

# How often the webapp looks for people it has not announced (one indexed SELECT of nothing, usually).
NEW_PEOPLE_POLL_S = 1.0
# The most people one look announces; more wait for the next (a seed of thousands made while the
# webapp runs is announced over a few seconds, not in one transaction that holds every request).
MAX_ANNOUNCED_PER_POLL = 200


class NewPeople:
    """The users added since the last look (by rowid, which only grows), each announced once."""

    def __init__(self, store: Store, max_per_poll: int = MAX_ANNOUNCED_PER_POLL) -> None:
        self.store = store
        self.max_per_poll = max_per_poll
        self.last_rowid = int(store.conn.execute("SELECT coalesce(max(rowid), 0) FROM users").fetchone()[0])

    def announce(self) -> list[Event]:
        """``team_join`` for each user added since the last call (at most ``max_per_poll``), committed;
        the caller publishes them."""
        rows = self.store.conn.execute(
            "SELECT rowid, id FROM users WHERE rowid > ? ORDER BY rowid LIMIT ?", (self.last_rowid, self.max_per_poll)
        ).fetchall()
        if not rows:
            return []
        events: list[Event] = []
        with self.store.transaction():
            for _, user_id in rows:
                user = self.store.user(user_id)
                if user is None or user.id == SLACKBOT_ID:
                    continue
                payload = {"type": "team_join", "user": self.store.user_object(user)}
                events.append(self.store._append_event(user.team, payload))
        self.last_rowid = int(rows[-1][0])
        return events


async def announce_new_people(
    people: NewPeople,
    publish: Callable[[list[Event]], None],
    durable: Callable[[], Awaitable[None]],
    poll_s: float = NEW_PEOPLE_POLL_S,
) -> None:
    """Every ``poll_s``: :meth:`NewPeople.announce`, its events to ``publish`` (the Web API's, so they
    go out with the group commit that holds them), then ``durable`` (the Web API's: that commit); if
    the commit failed, nothing of it was kept and the same people are announced next time."""
    while True:
        await asyncio.sleep(poll_s)
        before = people.last_rowid
        try:
            events = people.announce()
        except Exception:  # a locked or failing database: the same people next time
            log.exception("announcing new people failed")
            continue
        if not events:
            continue
        publish(events)
        try:
            await durable()
        except CommitFailed:  # the batch that held them was rolled back: announce them again
            people.last_rowid = before
