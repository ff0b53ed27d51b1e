"""Reminders: ``reminders.add``/``.list``/``.info``/``.complete``/``.delete``, and the firer
that delivers them as Slackbot.

A reminder is a row of ``reminders`` and a due item (:mod:`webapp_stub.scheduler`, kind
``reminder``, lane = the user it is for). When due it arrives the way Slack shows it: a
message from Slackbot (:data:`SLACKBOT_ID`) in the user's direct message with Slackbot,
``"Reminder: <text>."`` (``"Reminder from <@creator>: <text>."`` for one another user set), posted through :meth:`Store.post_message` in the transaction that
marks it fired. The DM is opened when the reminder is added (``im_created`` on the user's
channel, so their open connections follow it at once), so that a spike of due reminders
only posts messages; the firer opens it again if it is gone.

``time`` (Slack: "the Unix timestamp (up to five years from now), the number of seconds
until the reminder (if within 24 hours), or a natural language description"): a number
up to 86,400 is seconds from now, a larger one a unix time; the phrases understood are
``in N seconds|minutes|hours|days|weeks`` (also ``sec``/``min``/``hr`` and ``a``/``an``
for 1), ``tomorrow`` (09:00 UTC the next day) and ``now``. Recurring phrases (``every
…``) are not supported: ``cannot_parse``. Times: ``cannot_parse`` when unreadable,
``time_in_past`` before now (rtm's decision: Slack's docs say nothing), ``cannot_parse``
beyond five years.

``user``: Slack used to allow a reminder for someone else in the workspace (and now
answers ``cannot_add_others``); rtm keeps the older behaviour, as the issue asks: any
person of the caller's team, not a bot (``cannot_add_bot``) nor Slackbot
(``cannot_add_slackbot``). ``reminders.list`` lists the reminders the caller created or
is reminded of, soonest first; ``reminders.complete`` marks one complete (a pending one
then never fires; ``already_complete`` the second time); ``reminders.delete`` removes
it. Reminders of others: ``not_found``.
"""

from __future__ import annotations

import math
import re
from typing import Any

from webapp_stub.api import Call, WebApi, method, str_arg
from webapp_stub.call_args import user_arg
from webapp_stub.due_posts import DuePost, rows_by_id, users_by_id
from webapp_stub.due_queue import DueItem
from webapp_stub.scheduler import add_due, cancel_due, register_kind, register_preparer
from webapp_stub.store import MAX_TEXT_CHARS, ApiError, Channel, Event, Store, User, new_id

KIND = "reminder"
SLACKBOT_ID = "USLACKBOT"  # Slack's own id for Slackbot, the same in every workspace
SLACKBOT_NAME = "slackbot"
SLACKBOT_REAL_NAME = "Slackbot"
RELATIVE_MAX_S = 86_400  # Slack: a number up to this is "seconds until the reminder"
MAX_AHEAD_S = 5 * 365 * 86_400  # Slack: up to five years from now
TOMORROW_HOUR_UTC = 9  # "tomorrow" means 09:00 UTC the next day (rtm has no user time zones)
UNITS_S = {
    "second": 1,
    "sec": 1,
    "minute": 60,
    "min": 60,
    "hour": 3600,
    "hr": 3600,
    "day": 86_400,
    "week": 7 * 86_400,
}
_RELATIVE = re.compile(r"in\s+(\d+|an?)\s+([a-z]+?)s?")


def parse_time(value: Any, now: float) -> int:
    """``time`` as a unix time in whole seconds. Raises ``cannot_parse`` or ``time_in_past``."""
    if value is None or isinstance(value, (bool, list, dict)):
        raise ApiError("cannot_parse")
    text = str(value).strip().lower()
    if not text:
        raise ApiError("cannot_parse")
    when: float
    try:
        number = float(text)
    except ValueError:
        number = math.nan
    if not math.isnan(number):
        if math.isinf(number) or number < 0:
            raise ApiError("cannot_parse")
        when = now + number if number <= RELATIVE_MAX_S else number
    elif text == "now":
        when = now
    elif text == "tomorrow":
        when = (math.floor(now / 86_400) + 1) * 86_400 + TOMORROW_HOUR_UTC * 3600
    else:
        match = _RELATIVE.fullmatch(text)
        if match is None or match.group(2) not in UNITS_S:
            raise ApiError("cannot_parse")
        count = 1 if match.group(1) in ("a", "an") else int(match.group(1))
        when = now + count * UNITS_S[match.group(2)]
    if when > now + MAX_AHEAD_S:
        raise ApiError("cannot_parse")
    if when < math.floor(now):
        raise ApiError("time_in_past")
    return math.ceil(when)


def reminder_obj(row: tuple[Any, ...]) -> dict[str, Any]:
    rid, creator, user, text, when, complete_ts = row
    return {
        "id": rid,
        "creator": creator,
        "user": user,
        "text": text,
        "recurring": False,
        "time": when,
        "complete_ts": complete_ts,
    }


_COLS = "id, creator, user, text, time, complete_ts"


def slackbot(team: str) -> User:
    """Slackbot as seen from ``team`` (its row is created on first use: seed.py also writes it)."""
    return User(SLACKBOT_ID, team, SLACKBOT_NAME, SLACKBOT_REAL_NAME)


def ensure_slackbot(store: Store, team: str) -> None:
    store.conn.execute(
        "INSERT OR IGNORE INTO users (id, team, name, real_name, is_bot, bot_id) VALUES (?, ?, ?, ?, 0, NULL)",
        (SLACKBOT_ID, team, SLACKBOT_NAME, SLACKBOT_REAL_NAME),
    )


@register_kind(KIND)
def fire(store: Store, rid: str, now: float) -> list[Event]:
    """Deliver reminder ``rid`` as Slackbot's message in the user's DM with Slackbot."""
    row = store.conn.execute("SELECT team, user, text, creator FROM reminders WHERE id = ?", (rid,)).fetchone()
    if row is None:
        raise ApiError("not_found")
    team, user_id, text, creator = row
    user = store.user(user_id)
    if user is None:
        raise ApiError("user_not_found")
    ensure_slackbot(store, team)
    bot = slackbot(user.team)
    channel, _, events = store.open_dm(bot, [user])
    message, event = store.post_message(channel, bot, reminder_text(text, creator, user.id))
    store.conn.execute(FIRED_SQL, (message["ts"], rid))
    return [*events, event]


FIRED_SQL = "UPDATE reminders SET fired_ts = ? WHERE id = ?"


def dm_key(user_id: str) -> str:
    """The ``dm_key`` of a user's DM with Slackbot (as :meth:`ConversationStore.open_dm` writes it)."""
    return ",".join(sorted((SLACKBOT_ID, user_id)))


def reminder_text(text: str, creator: str = "", user: str = "") -> str:
    """What Slackbot says for a due reminder: ``Reminder: <text>.``, or for one that ``creator`` set
    for another ``user``, ``Reminder from <@creator>: <text>.`` (as Slack's says who asked): Slackbot
    never passes one user's words to another as its own (docs/authz-review.md)."""
    if creator and creator != user:
        return f"Reminder from <@{creator}>: {text}."
    return f"Reminder: {text}."


@register_preparer(KIND)
def prepare(store: Store, items: list[DueItem]) -> list[DuePost | None]:
    """The bulk path (:mod:`webapp_stub.due_posts`): what each due reminder posts (Slackbot's
    message in the user's DM with Slackbot), read in a few statements for the whole batch; None
    for one that :func:`fire` must post (its DM gone, Slackbot not seeded, the user gone)."""
    rows = rows_by_id(
        store, "SELECT id, team, user, text, creator FROM reminders WHERE id IN ({marks})", [i.id for i in items]
    )
    users = users_by_id(store, [row[2] for row in rows.values()] + [SLACKBOT_ID])
    keys = {(user.team, dm_key(user.id)) for user in (users.get(row[2]) for row in rows.values()) if user}
    dms: dict[tuple[str, str], Channel] = {}
    if keys and SLACKBOT_ID in users:
        values = ",".join("(?, ?)" for _ in keys)
        for row in store.conn.execute(
            f"SELECT c.team, c.dm_key, {', '.join('c.' + col for col in store._CHANNEL_COLS.split(', '))} "
            f"FROM (VALUES {values}) AS v JOIN channels c ON c.team = v.column1 AND c.dm_key = v.column2 "
            "WHERE c.dm_key IS NOT NULL",
            [v for key in keys for v in key],
        ):
            dms[(row[0], row[1])] = store._channel(tuple(row[2:]))
    posts: list[DuePost | None] = []
    for item in items:
        row = rows.get(item.id)
        user = users.get(row[2]) if row is not None else None
        if row is None or user is None:
            posts.append(None)
            continue
        channel = dms.get((user.team, dm_key(user.id)))
        if channel is None:
            posts.append(None)
            continue
        text = reminder_text(row[3], row[4], user.id)
        posts.append(DuePost(item.id, channel, slackbot(user.team), text, None, FIRED_SQL))
    return posts


def _mine(api: WebApi, call: Call) -> tuple[Any, ...]:
    rid = str_arg(call.args, "reminder")
    if not rid:
        raise ApiError("not_found")
    row = api.store.conn.execute(f"SELECT {_COLS} FROM reminders WHERE id = ?", (rid,)).fetchone()
    if row is None or call.me.id not in (row[1], row[2]):
        raise ApiError("not_found")
    return tuple(row)


@method("reminders.add", writes=True)
def reminders_add(api: WebApi, call: Call) -> dict[str, Any]:
    text = str_arg(call.args, "text") or ""
    if not text.strip():
        raise ApiError("no_text")
    if len(text) > MAX_TEXT_CHARS:
        raise ApiError("msg_too_long")
    if call.args.get("recurrence"):
        raise ApiError("cannot_parse")  # recurring reminders are not supported
    target = call.me
    if str_arg(call.args, "user"):
        if str_arg(call.args, "user") == SLACKBOT_ID:
            raise ApiError("cannot_add_slackbot")
        target = user_arg(api, call)
        if target.is_bot:
            raise ApiError("cannot_add_bot")
    when = parse_time(call.args.get("time"), api.clock())
    rid = new_id("Rm")
    # The DM with Slackbot is opened now, not when the reminder fires: a spike of due
    # reminders then only posts messages, into conversations the user's connections follow.
    with api.store.transaction():
        ensure_slackbot(api.store, call.me.team)
    _, _, opened = api.store.open_dm(slackbot(target.team), [target])
    api.publish(opened)
    with api.store.transaction() as db:
        db.execute(
            "INSERT INTO reminders (id, team, creator, user, text, time) VALUES (?, ?, ?, ?, ?, ?)",
            (rid, call.me.team, call.me.id, target.id, text, when),
        )
        add_due(api.store, DueItem(rid, KIND, call.me.team, target.id, float(when)))
    if api.scheduler is not None:
        api.scheduler.wake()
    return {"reminder": reminder_obj((rid, call.me.id, target.id, text, when, 0))}


@method("reminders.list")
def reminders_list(api: WebApi, call: Call) -> dict[str, Any]:
    rows = api.store.conn.execute(
        f"SELECT {_COLS} FROM reminders WHERE user = ? OR creator = ? ORDER BY time, id", (call.me.id, call.me.id)
    ).fetchall()
    return {"reminders": [reminder_obj(tuple(r)) for r in rows]}


@method("reminders.info")
def reminders_info(api: WebApi, call: Call) -> dict[str, Any]:
    return {"reminder": reminder_obj(_mine(api, call))}


@method("reminders.complete", writes=True)
def reminders_complete(api: WebApi, call: Call) -> dict[str, Any]:
    row = _mine(api, call)
    if row[5]:
        raise ApiError("already_complete")
    with api.store.transaction() as db:
        db.execute("UPDATE reminders SET complete_ts = ? WHERE id = ?", (int(api.clock()), row[0]))
        cancel_due(api.store, row[0])
    return {}


@method("reminders.delete", writes=True)
def reminders_delete(api: WebApi, call: Call) -> dict[str, Any]:
    row = _mine(api, call)
    with api.store.transaction() as db:
        db.execute("DELETE FROM reminders WHERE id = ?", (row[0],))
        cancel_due(api.store, row[0])
    return {}
