"""``rtm users add NAME`` and ``rtm users list``: people, bots and apps of your own.

``rtm users add`` writes into the webapp's SQLite file (``DATA_DIR/webapp.db``), in the
database's first team, the way ``rtm seed`` does (:mod:`webapp_stub.seed`): a user (``--bot``:
a bot user; ``--app``: a bot user and its app, with the seed app's event subscriptions and an
app-level ``xapp-`` token), its token (``xoxp-`` for people, ``xoxb-`` for bots) and its profile
(the ``--email`` given, else none). Everything is one transaction: a taken name or email, or a
name against Slack's rules (the webapp's own check, :func:`~webapp_stub.store.validate_channel_name`),
changes nothing. It then prints one JSON object (id, name, token and, as they apply, bot_id,
app_id, app_token) and rewrites ``DATA_DIR/seed.json`` as ``rtm seed`` writes it (0600), so
``rtm tail NAME``, ``rtm post NAME`` and the browser's sign-in picker know the new user at once.

It works while the fleet runs: the store's connection waits out the webapp's short group
commits (SQLite's busy timeout, as for ``rtm deadletter redrive``), and the running webapp
authenticates the new token on its next call (its token cache never keeps an unknown token:
:class:`~webapp_stub.users.UserStore`). It never changes the schema of a database that a webapp,
maybe of another version, has open: the store is opened with ``migrate=False`` (and, as for any
tool, without the webapp's checkpoint thread), and a database whose tables are not this version's
is refused in one sentence, exit 2 (:class:`~webapp_stub.schema.SchemaMismatch`).

Concurrent ``rtm users add`` (and ``rtm seed``) rewrite ``seed.json`` one at a time, each from
the database after its own commit (:func:`~webapp_stub.seed.write_seed_file`): none drops a user
another has just added.

``--join general,random``: channels by name, checked before anything is written. With the
fleet up (``DATA_DIR/fleet.json`` names the webapp, and it answers), the new user joins each
through the Web API with its own token (``conversations.join``), so every connected member gets
``member_joined_channel`` as for any join. With no fleet holding the data directory, the
memberships are written in the same transaction (nobody is connected to miss the event). A
fleet that holds the directory but whose webapp does not answer is refused before anything is
written.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sqlite3
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp

from rtmctl.demo_client import call, fleet_file
from rtmctl.fleet_lock import data_dir_in_use
from services.config import env_default
from webapp_stub.database import DB_FILE
from webapp_stub.errors import ApiError
from webapp_stub.models import Channel, Team
from webapp_stub.profiles import PROFILE_FIELD_MAX_CHARS, validate_email
from webapp_stub.schema import SchemaMismatch
from webapp_stub.seed import APP_MANIFEST, write_seed_file
from webapp_stub.store import MAX_CHANNEL_NAME, Store, validate_channel_name

JOIN_TIMEOUT_S = 10.0  # one conversations.join through the running webapp, answer included
PROBE_TIMEOUT_S = 2.0  # whether the webapp named in fleet.json answers api.test

NAME_RULES = {
    "invalid_name_required": "a name is required",
    "invalid_name_maxlength": f"a name is at most {MAX_CHANNEL_NAME} characters",
    "invalid_name_specials": "a name is lowercase letters, digits, '-' and '_' only (Slack's rule)",
}


class UsersError(Exception):
    """What ``rtm users`` refuses, as one sentence for the operator (exit 1)."""


class UsageError(UsersError):
    """An argument that could never be right (a malformed name or email): bad usage, exit 2 as
    argparse's own refusals; what the team's state refuses (a name taken, no such channel) is 1."""


@dataclass(frozen=True)
class NewUser:
    """What ``rtm users add`` was asked to create."""

    name: str
    real_name: str
    email: str | None
    is_bot: bool
    app: bool
    join: tuple[str, ...]


def open_store(data_dir: str) -> Store:
    """The webapp's database in ``data_dir`` (the store's connection, with its busy timeout), as
    it is: never migrated (raises :class:`SchemaMismatch` when it is another version's)."""
    path = Path(data_dir) / DB_FILE
    if not path.is_file():
        raise UsersError(f"no webapp database at {path}: give the --data-dir of `rtm up` (or run `rtm seed` there)")
    return Store(path, migrate=False)


def first_team(store: Store) -> Team:
    team = store.first_team()
    if team is None:
        raise UsersError(f"{store.path} has no team yet: run `rtm seed` (or `rtm up`) first")
    return team


def checked(args: argparse.Namespace) -> NewUser:
    """The request, its name, real name and email checked by the webapp's own rules."""
    try:
        name = validate_channel_name(args.name)
    except ApiError as exc:
        raise UsageError(f"{args.name!r} is not a user name: {NAME_RULES.get(exc.code, exc.code)}") from None
    real_name = (args.real_name or "").strip() or name
    if len(real_name) > PROFILE_FIELD_MAX_CHARS["real_name"]:
        raise UsageError(f"a real name is at most {PROFILE_FIELD_MAX_CHARS['real_name']} characters")
    email = None
    if args.email:
        try:
            email = validate_email(args.email)
        except ApiError:
            raise UsageError(f"{args.email!r} is not an email address") from None
    join = tuple(dict.fromkeys(c.strip().lstrip("#") for c in (args.join or "").split(",") if c.strip()))
    return NewUser(name, real_name, email, args.bot or args.app, args.app, join)


def channels_to_join(store: Store, team: Team, names: tuple[str, ...]) -> list[Channel]:
    """The channels named, each one a user may join (public, not archived)."""
    found = []
    for name in names:
        channel = store.channel_by_name(team.id, name)
        if channel is None:
            raise UsersError(f"no channel #{name} in team {team.name}")
        if channel.is_archived or channel.is_private:
            raise UsersError(f"#{name} is {'archived' if channel.is_archived else 'private'}: nobody joins it")
        found.append(channel)
    return found


def running_webapp(data_dir: str) -> str | None:
    """The Web API URL of the fleet running on ``data_dir``, or None when no fleet holds it.
    Raises :class:`UsersError` when one holds it but its webapp does not answer."""
    api_url = str((fleet_file(data_dir) or {}).get("api_url") or "")
    if api_url and asyncio.run(answers(api_url)):
        return api_url
    if data_dir_in_use(Path(data_dir)):
        raise UsersError(
            "the fleet holds this data directory but its webapp does not answer: "
            "try again once it is up (rtm status), so the join reaches connected members"
        )
    return None


async def answers(api_url: str) -> bool:
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=PROBE_TIMEOUT_S)) as http:
            async with http.get(api_url + "api.test") as resp:
                return resp.status == 200
    except (aiohttp.ClientError, TimeoutError):
        return False


def create(store: Store, team: Team, new: NewUser, members_of: list[Channel]) -> dict[str, Any]:
    """Write the user (and its app) in one transaction, with memberships of ``members_of``;
    returns what ``rtm users add`` prints. Raises :class:`UsersError` for a taken name or email."""
    try:
        with store.transaction() as db:
            taken = db.execute("SELECT id FROM users WHERE team = ? AND name = ?", (team.id, new.name)).fetchone()
            if taken is not None:
                raise UsersError(f"the name {new.name} is taken (by {taken[0]})")
            if new.email and db.execute("SELECT 1 FROM profiles WHERE email = ?", (new.email,)).fetchone():
                raise UsersError(f"the email {new.email} is taken")
            user, token = store.create_user(team.id, new.name, real_name=new.real_name, is_bot=new.is_bot)
            db.execute("INSERT INTO profiles (user, email, fields) VALUES (?, ?, '{}')", (user.id, new.email))
            made: dict[str, Any] = {"id": user.id, "name": user.name, "token": token}
            if user.bot_id:
                made["bot_id"] = user.bot_id
            if new.app:
                events = APP_MANIFEST["settings"]["event_subscriptions"]["bot_events"]
                app, app_token = store.create_app(team.id, user.id, user.name, events)
                made.update(app_id=app.id, app_token=app_token)
            db.executemany("INSERT INTO members (channel, user) VALUES (?, ?)", [(c.id, user.id) for c in members_of])
    except sqlite3.IntegrityError:  # another writer took the email between the check and the insert
        raise UsersError(f"the email {new.email} is taken") from None
    return made


async def join_through(api_url: str, token: str, channels: list[Channel]) -> None:
    """``conversations.join`` of each channel with the new user's own token."""
    for channel in channels:
        try:
            reply = await asyncio.wait_for(
                call(api_url, token, "conversations.join", channel=channel.id), JOIN_TIMEOUT_S
            )
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise UsersError(f"could not join #{channel.name} through the webapp at {api_url} ({exc})") from None
        if not reply.get("ok"):
            raise UsersError(f"the webapp refused to join #{channel.name}: {reply.get('error')}")


def add(args: argparse.Namespace) -> int:
    new = checked(args)
    store = open_store(args.data_dir)
    try:
        team = first_team(store)
        channels = channels_to_join(store, team, new.join)
        api_url = running_webapp(args.data_dir) if channels else None
        made = create(store, team, new, [] if api_url else channels)
        write_seed_file(args.data_dir, store)
    finally:
        store.close()
    if channels:
        made["joined"] = [c.name for c in channels]
    print(json.dumps(made), flush=True)
    if not channels:
        return 0
    where = ", ".join(f"#{c.name}" for c in channels)
    if api_url is None:
        print(f"no fleet is running: {new.name} was made a member of {where} in the database", file=sys.stderr)
        return 0
    try:
        asyncio.run(join_through(api_url, made["token"], channels))
    except UsersError as exc:
        raise UsersError(f"{new.name} was made (above) but joined no further: {exc}") from None
    print(f"{new.name} joined {where} through the Web API: members connected were told", file=sys.stderr)
    return 0


def list_users(args: argparse.Namespace) -> int:
    store = open_store(args.data_dir)
    try:
        team = first_team(store)
        rows = store.conn.execute(
            "SELECT u.id, u.name, u.real_name, u.is_bot, "
            "EXISTS (SELECT 1 FROM apps a WHERE a.bot_user = u.id), EXISTS (SELECT 1 FROM tokens t WHERE t.user = u.id) "
            "FROM users u WHERE u.team = ? ORDER BY u.rowid",
            (team.id,),
        ).fetchall()
    finally:
        store.close()
    for uid, name, real_name, is_bot, has_app, has_token in rows:
        kind = "app" if has_app else "bot" if is_bot else "person"
        print(f"{uid:<12} {name:<21} {real_name:<24} {kind:<7} {'token' if has_token else 'no token'}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from rtmctl.cli import COMMANDS  # its one-line summary

    parser = argparse.ArgumentParser(prog="rtm users", description=COMMANDS["users"][1])
    actions = parser.add_subparsers(dest="action", required=True)
    new = actions.add_parser("add", help="add a person (--bot: a bot user; --app: a bot user and its app)")
    new.add_argument("name", help="lowercase letters, digits, '-' and '_' (Slack's rule)")
    new.add_argument("--real-name", default="", help="the name people see (default: NAME)")
    new.add_argument("--email", default="", help="the profile's email (default: none); refused if taken")
    new.add_argument("--bot", action="store_true", help="a bot user (xoxb- token)")
    new.add_argument("--app", action="store_true", help="a bot user and its Slack app (app-level xapp- token)")
    new.add_argument("--join", default="", help="channels to join, by name: general,random")
    listing = actions.add_parser("list", help="one line per user: id, name, real name, person/bot/app, token")
    for sub in (new, listing):
        sub.add_argument("--data-dir", default=env_default("--data-dir", "./.rtm"), help="where webapp.db is")
    return parser


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    run: Callable[[argparse.Namespace], int] = add if args.action == "add" else list_users
    try:
        return run(args)
    except UsersError as exc:
        print(f"rtm users {args.action}: {exc}", file=sys.stderr)
        return 2 if isinstance(exc, UsageError) else 1
    except SchemaMismatch as exc:  # changed nothing: the webapp of this version migrates it
        print(f"rtm users {args.action}: {exc}", file=sys.stderr)
        return 2
    except sqlite3.OperationalError as exc:  # "database is locked" past the busy timeout, a read-only file
        print(f"rtm users {args.action}: the webapp's database refused the change ({exc}); try again", file=sys.stderr)
        return 1
