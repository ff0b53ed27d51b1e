"""``rtm users add`` / ``rtm users list`` (rtmctl/users.py): your own people, bots and apps,
written into the webapp's database while the webapp runs (in this process, on a real port),
and their tokens working there at once."""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import os
import sqlite3
import stat
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest

from rtmctl import cli
from rtmctl.fleet_lock import UP_LOCK_FILE
from tests.support import DEFAULT_WAIT_S, REPO_ROOT, async_wait_until, free_port
from tests.webapp_harness import FakeAdminServer, Webapp
from webapp_stub import users as user_store
from webapp_stub.seed import APP_MANIFEST, EMAIL_DOMAIN, SEED_FILE, seed_demo, write_seed_file
from webapp_stub.store import Store


async def rtm_users(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, dict[str, Any] | None, str, str]:
    """``rtm users ...`` in a thread (it writes SQLite and calls the webapp of this event loop):
    exit code, the JSON object it printed (if any), stdout and stderr."""
    code = await asyncio.to_thread(cli.main, ["users", *argv])
    out, err = capsys.readouterr()
    first = out.splitlines()[0] if out.strip() else ""
    return code, json.loads(first) if first.startswith("{") else None, out, err


def seed_file(data_dir: Path) -> dict[str, Any]:
    return dict(json.loads((data_dir / SEED_FILE).read_text()))


def count_users(data_dir: Path) -> int:
    with sqlite3.connect(data_dir / "webapp.db") as db:
        return int(db.execute("SELECT count(*) FROM users").fetchone()[0])


async def test_a_person_is_made_and_the_running_webapp_authenticates_the_token_at_once(
    webapp: Webapp, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, made, _, err = await rtm_users(
        capsys, "add", "frank", "--real-name", "Frank Z", "--email", "frank@mail.example", "--data-dir", str(tmp_path)
    )
    assert code == 0 and made is not None, err
    assert set(made) == {"id", "name", "token"} and made["name"] == "frank" and made["token"].startswith("xoxp-")
    status, me = await webapp.call("auth.test", made["token"])  # no wait: the first call after the command
    assert status == 200 and me["ok"] and me["user_id"] == made["id"] and me["user"] == "frank", me
    _, info = await webapp.call("users.info", webapp.user("alice")["token"], data={"user": made["id"]})
    assert info["user"]["real_name"] == "Frank Z" and info["user"]["profile"]["email"] == "frank@mail.example"
    assert not info["user"]["is_bot"]
    # seed.json rewritten as rtm seed writes it (0600), the seeded users still there
    seed = seed_file(tmp_path)
    assert stat.S_IMODE(os.stat(tmp_path / SEED_FILE).st_mode) == 0o600
    entry = next(u for u in seed["users"] if u["name"] == "frank")
    assert entry == {"id": made["id"], "name": "frank", "token": made["token"], "is_bot": False}
    assert {u["name"] for u in seed["users"]} >= {"alice", "bob", "rtmbot", "frank"}
    # the browser's sign-in picker lists the new person
    async with webapp.session.get(f"{webapp.url}/demo/users") as resp:
        assert "frank" in {u["name"] for u in (await resp.json())["users"]}


async def test_a_token_looked_up_before_it_existed_works_once_made(
    webapp: Webapp, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The webapp's token cache keeps no unknown token: a token asked for (invalid_auth) just
    before the command makes it is good on the next call."""
    token = "xoxp-" + "ab" * 16
    monkeypatch.setattr(user_store, "new_token", lambda prefix: token)
    _, before = await webapp.call("auth.test", token)
    assert before["error"] == "invalid_auth"
    code, made, _, err = await rtm_users(capsys, "add", "grace", "--data-dir", str(tmp_path))
    assert code == 0 and made is not None and made["token"] == token, err
    _, after = await webapp.call("auth.test", token)
    assert after["ok"] and after["user_id"] == made["id"], after


async def test_a_bot_and_an_app_get_their_tokens_and_the_seed_apps_subscriptions(
    webapp: Webapp, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, bot, _, err = await rtm_users(capsys, "add", "helper", "--bot", "--data-dir", str(tmp_path))
    assert code == 0 and bot is not None, err
    assert set(bot) == {"id", "name", "token", "bot_id"} and bot["token"].startswith("xoxb-")
    _, me = await webapp.call("auth.test", bot["token"])
    assert me["ok"] and me["bot_id"] == bot["bot_id"] and me["user_id"] == bot["id"], me

    code, app, _, err = await rtm_users(capsys, "add", "mybolt", "--app", "--data-dir", str(tmp_path))
    assert code == 0 and app is not None, err
    assert set(app) == {"id", "name", "token", "bot_id", "app_id", "app_token"}
    assert app["app_token"].startswith(f"xapp-1-{app['app_id']}-")
    _, me = await webapp.call("auth.test", app["token"])
    assert me["ok"] and me["bot_id"] == app["bot_id"], me
    _, info = await webapp.call("bots.info", webapp.user("alice")["token"], data={"bot": app["bot_id"]})
    assert info["bot"]["app_id"] == app["app_id"], info
    _, opened = await webapp.call("apps.connections.open", app["app_token"])
    assert opened["ok"] and opened["url"].startswith("ws://"), opened
    listed = next(a for a in seed_file(tmp_path)["apps"] if a["id"] == app["app_id"])
    assert listed["app_token"] == app["app_token"] and listed["bot_user_id"] == app["id"]
    events = listed["manifest"]["settings"]["event_subscriptions"]["bot_events"]
    assert events == APP_MANIFEST["settings"]["event_subscriptions"]["bot_events"]

    code, _, out, _ = await rtm_users(capsys, "list", "--data-dir", str(tmp_path))
    lines = {line.split()[1]: line.split() for line in out.splitlines()}
    assert code == 0 and lines["helper"][-2:] == ["bot", "token"] and lines["mybolt"][-2:] == ["app", "token"]
    assert lines["alice"][-2:] == ["person", "token"]
    assert lines["slackbot"][-3:] == ["person", "no", "token"] and lines["rtmbot"][-2:] == ["app", "token"]


@pytest.mark.parametrize(
    ("argv", "code", "sentence"),
    [
        (["alice"], 1, "the name alice is taken"),
        (["frank", "--email", f"bob@{EMAIL_DOMAIN}"], 1, f"the email bob@{EMAIL_DOMAIN} is taken"),
        (["Frank Z"], 2, "is not a user name: a name is lowercase letters"),  # bad usage: exit 2
        (["frank", "--email", "not-an-address"], 2, "is not an email address"),
        (["frank", "--real-name", "x" * 1000], 2, "a real name is at most"),
        (["frank", "--join", "general,nowhere"], 1, "no channel #nowhere"),
    ],
)
def test_what_is_refused_is_one_sentence_and_changes_nothing(
    argv: list[str], code: int, sentence: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A malformed argument is bad usage (exit 2, as argparse's refusals); what the team's state
    refuses (a name or email taken, no such channel) is exit 1."""
    seed_demo(str(tmp_path))
    users_before = count_users(tmp_path)
    assert cli.main(["users", "add", *argv, "--data-dir", str(tmp_path)]) == code
    out, err = capsys.readouterr()
    assert out == "" and err.startswith("rtm users add: ") and sentence in err and err.count("\n") == 1, err
    assert count_users(tmp_path) == users_before
    assert not (tmp_path / SEED_FILE).exists()


def test_no_database_is_one_sentence(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for action in (["add", "frank"], ["list"]):
        assert cli.main(["users", *action, "--data-dir", str(tmp_path)]) == 1
        err = capsys.readouterr().err
        assert f"no webapp database at {tmp_path / 'webapp.db'}" in err and "Traceback" not in err, err
    assert not (tmp_path / "webapp.db").exists()


def test_join_without_a_fleet_writes_the_memberships(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    seed_demo(str(tmp_path), channels=3)
    (tmp_path / "fleet.json").write_text(json.dumps({"api_url": f"http://127.0.0.1:{free_port()}/api/"}))  # stale
    assert cli.main(["users", "add", "frank", "--join", "general,#channel-0002", "--data-dir", str(tmp_path)]) == 0
    out, err = capsys.readouterr()
    made = json.loads(out)
    assert made["joined"] == ["general", "channel-0002"]
    assert "no fleet is running: frank was made a member of #general, #channel-0002 in the database" in err
    with sqlite3.connect(tmp_path / "webapp.db") as db:
        rows = db.execute(
            "SELECT c.name FROM members m JOIN channels c ON c.id = m.channel WHERE m.user = ? ORDER BY c.name",
            (made["id"],),
        ).fetchall()
        assert [r[0] for r in rows] == ["channel-0002", "general"]
        assert db.execute("SELECT count(*) FROM events WHERE channel = ?", (made["id"],)).fetchone()[0] == 0


def test_a_fleet_whose_webapp_does_not_answer_is_refused_before_anything_is_made(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    seed_demo(str(tmp_path))
    (tmp_path / "fleet.json").write_text(json.dumps({"api_url": f"http://127.0.0.1:{free_port()}/api/"}))
    users_before = count_users(tmp_path)
    fd = os.open(tmp_path / UP_LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # as rtm up and its fleet hold it
        assert cli.main(["users", "add", "frank", "--join", "general", "--data-dir", str(tmp_path)]) == 1
    finally:
        os.close(fd)
    assert "its webapp does not answer" in capsys.readouterr().err
    assert count_users(tmp_path) == users_before


async def test_join_with_the_fleet_up_goes_through_the_web_api(
    webapp: Webapp, fake_as: FakeAdminServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """fleet.json names the running webapp: the join is the new user's conversations.join, so its
    member_joined_channel is handed to the fleet like any join's."""
    (tmp_path / "fleet.json").write_text(json.dumps({"api_url": webapp.url + "/api/"}))
    code, made, _, err = await rtm_users(capsys, "add", "frank", "--join", "general", "--data-dir", str(tmp_path))
    assert code == 0 and made is not None, err
    assert "frank joined #general through the Web API" in err
    general = webapp.channel("general")

    async def handed_off() -> bool:
        events = [json.loads(p["json"]) for p in fake_as.pubs_for(general)]
        return any(e["type"] == "member_joined_channel" and e["user"] == made["id"] for e in events)

    await async_wait_until(handed_off, what="frank's member_joined_channel handed to the admin server")
    _, members = await webapp.call("conversations.members", made["token"], data={"channel": general})
    assert made["id"] in members["members"], members
    # and the team learns of frank (webapp_stub/team_join.py): Slack's team_join on the team channel, once
    _, me = await webapp.call("auth.test", made["token"])
    team = me["team_id"]

    def joins() -> list[dict[str, Any]]:
        events = [json.loads(p["json"]) for p in fake_as.pubs_for(team)]
        return [e for e in events if e["type"] == "team_join" and e["user"]["id"] == made["id"]]

    async def announced() -> bool:
        return bool(joins())

    await async_wait_until(announced, what="frank's team_join handed to the admin server")
    (event,) = joins()
    assert event["user"]["name"] == "frank" and "profile" in event["user"]


def schema_of(path: Path) -> list[tuple[str, str]]:
    with contextlib.closing(sqlite3.connect(path)) as db:
        return sorted(db.execute("SELECT name, coalesce(sql, '') FROM sqlite_master").fetchall())


@pytest.mark.parametrize(
    ("change", "sentence"),
    [  # an older version's database: what migrate() would add
        ("ALTER TABLE members DROP COLUMN last_read", "start `rtm up` with this version once to migrate it"),
        ("DROP TABLE resume_records", "start `rtm up` with this version once to migrate it"),
        # a newer version's: what this version does not know
        (
            "ALTER TABLE users ADD COLUMN pronouns TEXT NOT NULL DEFAULT ''",
            "it has column users.pronouns that this version",
        ),
    ],
)
def test_a_database_of_another_version_is_refused_and_left_as_it_is(
    change: str, sentence: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``rtm users`` opens the database a running webapp (maybe of another version) has open: it
    checks the schema and never migrates it (before: Store's migrate() altered it)."""
    seed_demo(str(tmp_path))
    db = tmp_path / "webapp.db"
    with contextlib.closing(sqlite3.connect(db)) as conn:
        conn.execute(change)
    schema, users_before = schema_of(db), count_users(tmp_path)
    for argv in (["add", "frank"], ["list"]):
        assert cli.main(["users", *argv, "--data-dir", str(tmp_path)]) == 2
        out, err = capsys.readouterr()
        assert out == "" and err.count("\n") == 1, err
        assert err.startswith(f"rtm users {argv[0]}: the database at {db} is from another version of rtm; ")
        assert sentence in err, err
    assert schema_of(db) == schema and count_users(tmp_path) == users_before
    assert not (tmp_path / SEED_FILE).exists()


# Each child: the real `rtm users add`, once every child is ready (all start at once), with the
# window between reading the database and writing seed.json widened (as a busy machine may): the
# fewer added users a child read, the longer it waits, so without the lock a stale read is written last.
CONCURRENT_ADD = """
import sys, time
from webapp_stub import seed
real_describe = seed.describe

def slow_describe(store):
    found = real_describe(store)
    added = sum(1 for user in found["users"] if user["name"].startswith("user-"))
    time.sleep(0.1 * (int(sys.argv[1]) - added))  # wait-ok: the race window, widened on purpose
    return found

seed.describe = slow_describe
from rtmctl import cli
print("ready", flush=True)
sys.stdin.readline()  # the go: every child is ready
sys.exit(cli.main(sys.argv[2:]))
"""
CONCURRENT_ADDS = 8


def test_concurrent_adds_all_end_up_in_seed_json(tmp_path: Path) -> None:
    """Eight ``rtm users add`` processes at once, no fleet: each rewrites seed.json after its own
    commit, one at a time (before: a writer that read the database before another's commit could
    write last and drop that user from seed.json, though the database had them)."""
    seed_demo(str(tmp_path))
    names = [f"user-{i}" for i in range(CONCURRENT_ADDS)]
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    children = [
        subprocess.Popen(
            [
                sys.executable,
                "-c",
                CONCURRENT_ADD,
                str(CONCURRENT_ADDS),
                "users",
                "add",
                name,
                "--data-dir",
                str(tmp_path),
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
            cwd=REPO_ROOT,
        )
        for name in names
    ]
    try:
        for child in children:
            assert child.stdout is not None and child.stdout.readline() == "ready\n"
        for child in children:  # all at once
            assert child.stdin is not None
            child.stdin.write("go\n")
            child.stdin.flush()
        made = {}
        for child in children:
            out, err = child.communicate(timeout=DEFAULT_WAIT_S * 3)
            assert child.returncode == 0, err
            user = json.loads(out)
            made[user["name"]] = user
    finally:
        for child in children:
            if child.poll() is None:
                child.kill()
                child.wait()
    assert sorted(made) == names
    listed = {u["name"]: u for u in seed_file(tmp_path)["users"]}
    assert {name: listed.get(name) for name in names} == {
        name: {"id": u["id"], "name": name, "token": u["token"], "is_bot": False} for name, u in made.items()
    }
    assert stat.S_IMODE(os.stat(tmp_path / SEED_FILE).st_mode) == 0o600
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []  # no temporary file left


def test_seed_json_is_written_under_its_lock(tmp_path: Path) -> None:
    """A writer waits for the holder of seed.json.lock before it reads the database."""
    seed_demo(str(tmp_path))
    store = Store(tmp_path)
    fd = os.open(tmp_path / "seed.json.lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        done = []
        writer = threading.Thread(target=lambda: done.append(write_seed_file(str(tmp_path), store)))
        writer.start()
        writer.join(0.3)
        assert writer.is_alive() and not (tmp_path / SEED_FILE).exists()
    finally:
        os.close(fd)
    writer.join(DEFAULT_WAIT_S)
    store.close()
    assert done and seed_file(tmp_path) == done[0]


@pytest.mark.parametrize("argv", [["list"], ["redrive", "C1:1"]])
def test_rtm_deadletter_never_migrates_the_live_database_either(
    argv: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``rtm deadletter`` (and ``rtm status``'s dead letters) open the database the same way as
    ``rtm users``: another version's is refused in one sentence and left as it is."""
    seed_demo(str(tmp_path))
    db = tmp_path / "webapp.db"
    with contextlib.closing(sqlite3.connect(db)) as conn:
        conn.execute("ALTER TABLE members DROP COLUMN last_read")
    schema = schema_of(db)
    assert cli.main(["deadletter", *argv, "--data-dir", str(tmp_path)]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1, err
    assert err.startswith(f"rtm deadletter: the database at {db} is from another version of rtm; "), err
    assert schema_of(db) == schema
