"""Demo data: one team, named users, a bot, Slackbot, #general and #random.

``seed_demo`` writes straight into the tables in one transaction with
``executemany`` (100,000 users in a few seconds) and emits no events: every
channel starts at seq 0. It is idempotent: on a database that already has a
team it changes nothing and returns what is there.

Apps: the first bot (``rtmbot``) belongs to an app (``A…``, named
:data:`APP_NAME`) with one app-level token (``xapp-…``, ``connections:write``)
and the event subscriptions of :data:`APP_MANIFEST`; seed.json lists it under
``apps`` (docs/socket-mode.md). People get an email, ``<name>@`` :data:`EMAIL_DOMAIN`.

Membership: everyone (bots included) is in #general and #random. Further
channels (``channel-0002``, ...) hold everyone in small seeds
(up to :data:`SMALL_SEED_USERS` users); in larger seeds user ``i`` joins only
extra channel ``2 + i % (channels - 2)``, so bootstraps stay small.

``seed.json`` holds every user's token (0600). Whoever rewrites it (``rtm seed``, ``rtm users
add``, any number at once) does so through :func:`write_seed_file`: under an exclusive lock on
``seed.json.lock`` beside it, held from reading the database to the atomic rename, so the file
last written was read after every commit that came before it, and no added user is dropped.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from services.app_event_names import APP_EVENTS
from services.config import Parser
from services.secret_file import ensure_private_dir, replace_secret_file
from webapp_stub.apps import APP_TOKEN_SCOPES
from webapp_stub.codecs import new_id, new_token
from webapp_stub.database import DB_FILE, DEFAULT_CACHE_PAGES
from webapp_stub.reminders import SLACKBOT_ID, SLACKBOT_NAME, SLACKBOT_REAL_NAME
from webapp_stub.store import Store

NAMES = ("alice", "bob", "carol", "dave", "eve")
FIRST_CHANNELS = ("general", "random")
TEAM_NAME = "rtm demo"
TEAM_DOMAIN = "rtm-demo"
SMALL_SEED_USERS = 1000
SEED_FILE = "seed.json"
SEED_LOCK_FILE = "seed.json.lock"  # held (flock) by each writer of seed.json, from its read to its rename
EMAIL_DOMAIN = "rtm-demo.example"  # .example: reserved, never a real mailbox
APP_NAME = "rtmbot"
# The demo app's manifest: the bot events it subscribes to (services.app_event_names.APP_EVENTS).
APP_MANIFEST: dict[str, Any] = {
    "display_information": {"name": APP_NAME},
    "settings": {
        "socket_mode_enabled": True,
        "event_subscriptions": {"bot_events": list(APP_EVENTS)},
    },
}
SEED_CACHE_KIB = 256 * 1024  # page cache while seeding: random index inserts stay in memory


def user_name(i: int) -> str:
    return NAMES[i] if i < len(NAMES) else f"user{i:04d}"


def bot_name(j: int) -> str:
    return "rtmbot" if j == 0 else f"rtmbot{j}"


def channel_name(k: int) -> str:
    return FIRST_CHANNELS[k] if k < len(FIRST_CHANNELS) else f"channel-{k:04d}"


def _unique_ids(prefix: str, count: int, taken: set[str]) -> list[str]:
    ids: list[str] = []
    while len(ids) < count:
        candidate = new_id(prefix)
        if candidate not in taken:
            taken.add(candidate)
            ids.append(candidate)
    return ids


def seed_demo(
    store_or_path: Store | str | os.PathLike[str], *, users: int = 5, channels: int = 2, bots: int = 1
) -> dict[str, Any]:
    """Seed (once) and return the seed.json content:
    ``{"team": {id, name, domain}, "users": [{id, name, token, is_bot[, bot_id]}], "channels": [{id, name}],
    "apps": [{id, name, bot_user_id, bot_id, app_token, scopes, manifest}]}``.
    """
    check_counts(users, channels, bots)
    own = not isinstance(store_or_path, Store)
    store = store_or_path if isinstance(store_or_path, Store) else Store(os.fspath(store_or_path))
    try:
        if store.first_team() is None:
            _create(store, users, channels, bots)
        _ensure_app(store)
        return describe(store)
    finally:
        if own:
            store.close()


def check_counts(users: int, channels: int, bots: int) -> None:
    """Raise ValueError unless the counts make a seed."""
    if users < 1 or channels < 1 or bots < 0:
        raise ValueError("need at least one user and one channel")


def _create(store: Store, users: int, channels: int, bots: int) -> None:
    now = int(store.clock())
    taken: set[str] = set()
    team_id = _unique_ids("T", 1, taken)[0]
    user_ids = _unique_ids("U", users + bots, taken)
    bot_ids = _unique_ids("B", bots, taken)
    channel_ids = _unique_ids("C", channels, taken)
    user_rows: list[tuple[str, str, str, str, int, str | None]] = [
        (user_ids[i], team_id, user_name(i), user_name(i).capitalize(), 0, None) for i in range(users)
    ]
    user_rows += [(user_ids[users + j], team_id, bot_name(j), "RTM Bot", 1, bot_ids[j]) for j in range(bots)]
    token_rows = [(new_token("xoxb" if row[4] else "xoxp"), row[0]) for row in user_rows]
    # Slackbot (reminders arrive as its DM messages): no token, in no channel, not in seed.json.
    user_rows.append((SLACKBOT_ID, team_id, SLACKBOT_NAME, SLACKBOT_REAL_NAME, 0, None))
    channel_rows = [(channel_ids[k], team_id, channel_name(k), now, user_ids[0], 0, 0) for k in range(channels)]
    everyone_everywhere = users + bots <= SMALL_SEED_USERS
    member_rows = []
    extra = channels - len(FIRST_CHANNELS)
    for k in range(min(channels, len(FIRST_CHANNELS))):
        member_rows += [(channel_ids[k], uid) for uid in user_ids]
    if extra > 0:
        if everyone_everywhere:
            for k in range(len(FIRST_CHANNELS), channels):
                member_rows += [(channel_ids[k], uid) for uid in user_ids]
        else:
            member_rows += [(channel_ids[len(FIRST_CHANNELS) + i % extra], uid) for i, uid in enumerate(user_ids)]
    # Keyed inserts in key order: SQLite appends to its B-trees instead of
    # splitting pages at random (users keep creation order in their rowid).
    token_rows.sort()
    member_rows.sort()
    store.conn.execute(f"PRAGMA cache_size = -{SEED_CACHE_KIB}")
    with store.transaction() as db:
        db.execute("INSERT INTO teams (id, name, domain) VALUES (?, ?, ?)", (team_id, TEAM_NAME, TEAM_DOMAIN))
        db.executemany(
            "INSERT INTO users (id, team, name, real_name, is_bot, bot_id) VALUES (?, ?, ?, ?, ?, ?)", user_rows
        )
        db.executemany("INSERT INTO tokens (token, user) VALUES (?, ?)", token_rows)
        db.executemany(
            "INSERT INTO channels (id, team, name, created, creator, is_private, is_archived) VALUES (?, ?, ?, ?, ?, ?, ?)",
            channel_rows,
        )
        db.executemany("INSERT INTO members (channel, user) VALUES (?, ?)", member_rows)
        db.executemany(
            "INSERT INTO profiles (user, email, fields) VALUES (?, ?, '{}')",
            sorted((row[0], f"{row[2]}@{EMAIL_DOMAIN}") for row in user_rows if not row[4]),
        )
    store.conn.execute(f"PRAGMA cache_size = {DEFAULT_CACHE_PAGES}")


def _ensure_app(store: Store) -> None:
    """The first bot's app, created once (also in a database seeded before apps existed)."""
    row = store.conn.execute("SELECT id, team FROM users WHERE is_bot = 1 ORDER BY rowid LIMIT 1").fetchone()
    if row is None or store.app_of_bot(row[0]) is not None:
        return
    events = APP_MANIFEST["settings"]["event_subscriptions"]["bot_events"]
    store.create_app(row[1], row[0], APP_MANIFEST["display_information"]["name"], events)


def describe(store: Store) -> dict[str, Any]:
    """The seed.json content for the database's first team."""
    team = store.first_team()
    if team is None:
        raise LookupError("the database has no team; run rtm seed")
    users = []
    rows = store.conn.execute(
        "SELECT u.id, u.name, u.is_bot, u.bot_id, (SELECT t.token FROM tokens t WHERE t.user = u.id LIMIT 1) "
        "FROM users u WHERE u.team = ? AND u.id != ? ORDER BY u.rowid",
        (team.id, SLACKBOT_ID),
    )
    for uid, name, is_bot, bot_id, token in rows:
        entry: dict[str, Any] = {"id": uid, "name": name, "token": token, "is_bot": bool(is_bot)}
        if bot_id:
            entry["bot_id"] = bot_id
        users.append(entry)
    channels = [
        {"id": cid, "name": name}
        for cid, name in store.conn.execute("SELECT id, name FROM channels WHERE team = ? ORDER BY rowid", (team.id,))
    ]
    apps = []
    for (app_id,) in store.conn.execute("SELECT id FROM apps WHERE team = ? ORDER BY rowid", (team.id,)).fetchall():
        app = store.app(app_id)
        bot = store.user(app.bot_user) if app is not None else None
        if app is None or bot is None:
            continue
        apps.append(
            {
                "id": app.id,
                "name": app.name,
                "bot_user_id": bot.id,
                "bot_id": bot.bot_id,
                "app_token": store.app_tokens(app.id)[0],
                "scopes": list(APP_TOKEN_SCOPES),
                "manifest": {
                    "display_information": {"name": app.name},
                    "settings": {
                        "socket_mode_enabled": True,
                        "event_subscriptions": {"bot_events": list(app.events)},
                    },
                },
            }
        )
    return {"team": team.to_api(), "users": users, "channels": channels, "apps": apps}


@contextlib.contextmanager
def seed_file_lock(data_dir: str) -> Iterator[None]:
    """Hold the exclusive lock on ``DATA_DIR/seed.json.lock`` (created 0600; waits for the holder)."""
    fd = os.open(os.path.join(data_dir, SEED_LOCK_FILE), os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def write_seed_file(data_dir: str, store: Store) -> dict[str, Any]:
    """Rewrite ``DATA_DIR/seed.json`` from ``store`` (:func:`describe`) and return its content: the
    one writer of the file. It holds every user's token: written 0600 to a temporary file, fsynced,
    renamed over the old one. Under :func:`seed_file_lock` from the read to the rename, so of two
    writers the later reads the database after the earlier's commit (a lost update otherwise)."""
    with seed_file_lock(data_dir):
        seed = describe(store)
        replace_secret_file(Path(data_dir) / SEED_FILE, json.dumps(seed, indent=1) + "\n")
    return seed


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="rtm seed", description="Create the demo team, users, bots and channels (idempotent)")
    parser.add("--data-dir", "./.rtm", "directory of webapp.db; seed.json is written there")
    parser.add("--users", 5, "number of people (alice, bob, carol, dave, eve, user0005, ...)")
    parser.add("--channels", 2, "number of channels (#general, #random, channel-0002, ...)")
    parser.add("--bots", 1, "number of bot users (rtmbot, rtmbot1, ...)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    started = time.monotonic()
    ensure_private_dir(Path(args.data_dir))
    try:
        check_counts(args.users, args.channels, args.bots)
    except ValueError as exc:
        print(f"rtm seed: {exc}", file=sys.stderr)
        return 2
    store = Store(args.data_dir)
    try:
        seed_demo(store, users=args.users, channels=args.channels, bots=args.bots)
        seed = write_seed_file(args.data_dir, store)
    finally:
        store.close()
    path = os.path.join(args.data_dir, SEED_FILE)
    people = sum(1 for u in seed["users"] if not u["is_bot"])
    print(
        f"seeded team {seed['team']['id']} ({people} users, {len(seed['users']) - people} bots, "
        f"{len(seed['channels'])} channels) in {os.path.join(args.data_dir, DB_FILE)}; "
        f"wrote {path} in {time.monotonic() - started:.2f}s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
