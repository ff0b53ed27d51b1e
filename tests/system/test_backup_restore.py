"""``rtm backup`` while the fleet answers posts, ``rtm restore`` into a new data directory, and a
fleet started there: every post answered before the backup began is in history, the backup is one
consistent snapshot (the poster's messages in it are a prefix, no hole), tokens of the backup
authenticate, the next post gets its channel's next seq, and a file shared before the backup
downloads from the restored fleet with the same bytes."""

from __future__ import annotations

import asyncio
import json
import os
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from rtmctl.launcher import rtm_argv
from tests.support import DEFAULT_WAIT_S, async_wait_until
from tests.system.harness import Fleet

BACKUP_TIMEOUT_S = 60.0  # a seeded demo database with a few hundred posts: well under a second
POSTS_BEFORE_BACKUP = 30  # answered before the backup starts
POSTS_AFTER_BACKUP = 10  # answered after it ends: the fleet went on
HISTORY_PAGE = 1000  # conversations.history's largest page
# One of each role: what the test needs of a fleet (a post's whole path, a gateway), started twice.
SMALL_FLEET = (
    *("--admin-servers", "1", "--channel-servers", "1", "--spares", "0", "--charms", "1"),
    *("--presence-servers", "1", "--presence-spares", "0", "--regions", "us-east"),
)


@dataclass(frozen=True)
class Posted:
    text: str
    sent_at: float
    answered_at: float


async def rtm(*args: str) -> tuple[int, str, str]:
    """Run ``rtm ARGS`` as its own process; its exit code, stdout and stderr."""
    proc = await asyncio.create_subprocess_exec(
        *rtm_argv(*args), stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), BACKUP_TIMEOUT_S)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def keep_posting(fleet: Fleet, token: str, channel: str, posted: list[Posted], stop: asyncio.Event) -> None:
    """Post to ``channel`` one after the other until ``stop``; every answer must be ok."""
    url = fleet.api_url + "chat.postMessage"
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {token}"}) as http:
        while not stop.is_set():
            text = f"backup-load {len(posted)}"
            sent_at = time.monotonic()
            async with http.post(url, data={"channel": channel, "text": text}) as resp:
                reply = await resp.json(content_type=None)
            assert reply.get("ok"), (text, reply)
            posted.append(Posted(text, sent_at, time.monotonic()))


async def history_texts(fleet: Fleet, token: str, channel: str) -> list[str]:
    """Every message text of ``channel``, oldest first, through conversations.history's pages."""
    texts: list[str] = []
    cursor = ""
    for _ in range(100):  # bounded: 100 pages of 1,000
        reply = await fleet.api("conversations.history", token, channel=channel, limit=HISTORY_PAGE, cursor=cursor)
        assert reply["ok"], reply
        texts += [m["text"] for m in reply["messages"]]
        cursor = reply.get("response_metadata", {}).get("next_cursor", "")
        if not cursor:
            return texts[::-1]
    raise AssertionError("conversations.history did not end")


def seqs_of(database: Path, channel: str) -> list[tuple[int, str]]:
    """``(seq, json)`` of ``channel``'s events in ``database``, by seq (a read-only connection)."""
    conn = sqlite3.connect(f"{database.resolve().as_uri()}?mode=ro", uri=True)
    try:
        return conn.execute("SELECT seq, json FROM events WHERE channel = ? ORDER BY seq", (channel,)).fetchall()
    finally:
        conn.close()


async def share_file(fleet: Fleet, token: str, channel: str, name: str, data: bytes) -> str:
    """files_upload_v2's three steps over HTTP (the URL, the bytes, the share); the file's id."""
    got = await fleet.api("files.getUploadURLExternal", token, filename=name, length=str(len(data)))
    assert got["ok"], got
    async with aiohttp.ClientSession() as http:
        async with http.post(got["upload_url"], data=data) as resp:
            assert resp.status == 200, await resp.text()
    files = json.dumps([{"id": got["file_id"], "title": name}])
    done = await fleet.api("files.completeUploadExternal", token, files=files, channel_id=channel)
    assert done["ok"], done
    return str(got["file_id"])


async def download(fleet: Fleet, token: str, file_id: str) -> bytes:
    """The file's bytes at its ``url_private_download`` (from ``files.info`` of this fleet)."""
    info = await fleet.api("files.info", token, file=file_id)
    assert info["ok"], info
    async with aiohttp.ClientSession() as http:
        headers = {"Authorization": f"Bearer {token}"}
        async with http.get(info["file"]["url_private_download"], headers=headers) as resp:
            assert resp.status == 200, resp.status
            return await resp.read()


async def backup_under_posts(fleet: Fleet, out: Path) -> tuple[list[Posted], float, float, str]:
    """``rtm backup`` while a task posts to #general; the posts, when the backup ran, its line."""
    posted: list[Posted] = []
    stop = asyncio.Event()
    alice = fleet.user("alice")["token"]
    poster = asyncio.create_task(keep_posting(fleet, alice, fleet.channel("general"), posted, stop))

    async def answered(count: int) -> bool:
        if poster.done():
            poster.result()  # a refused post fails the test here
        return len(posted) >= count

    try:
        await async_wait_until(lambda: answered(POSTS_BEFORE_BACKUP), DEFAULT_WAIT_S, "posts before the backup")
        started = time.monotonic()
        code, line, err = await rtm("backup", str(out), "--data-dir", str(fleet.data_dir))
        ended = time.monotonic()
        assert (code, err) == (0, ""), err
        after = sum(1 for p in posted if p.sent_at > ended) + POSTS_AFTER_BACKUP
        await async_wait_until(lambda: answered(after), DEFAULT_WAIT_S, "posts after the backup")
    finally:
        stop.set()
        await poster
    return posted, started, ended, line


async def test_a_backup_taken_under_posts_restores_into_a_fleet_that_goes_on(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    source = Fleet.up(tmp_path_factory.mktemp("fleet"), *SMALL_FLEET)
    out = tmp_path_factory.mktemp("backups") / "rtm.db"
    report = os.urandom(50_000)  # bytes no text encoding could mend
    try:
        file_id = await share_file(source, source.user("alice")["token"], source.channel("general"), "q3.bin", report)
        posted, started, ended, line = await backup_under_posts(source, out)
        seed: dict[str, Any] = source.seed
    finally:
        source.down()
    during = [p for p in posted if p.answered_at > started and p.sent_at < ended]
    print(f"{line.strip()}; {len(during)} posts answered ok during the backup, of {len(posted)}")
    assert line.startswith(f"backed up to {out}: ") and f"; 1 files (50000 bytes) in {out}.files" in line
    assert during, "no post was answered while the backup ran"
    general = next(c["id"] for c in seed["channels"] if c["name"] == "general")
    backed_up = seqs_of(out, general)
    assert [seq for seq, _ in backed_up] == list(range(1, len(backed_up) + 1))

    restored_dir = tmp_path_factory.mktemp("restored")
    code, said, err = await rtm("restore", str(out), "--data-dir", str(restored_dir))
    assert (code, err) == (0, ""), err
    assert "seed.json lists" in said
    restored = Fleet.up(restored_dir, *SMALL_FLEET)
    try:
        alice = next(u for u in seed["users"] if u["name"] == "alice")  # the source fleet's token
        who = await restored.api("auth.test", alice["token"])
        assert who["ok"] and who["user_id"] == alice["id"], who
        texts = [t for t in await history_texts(restored, alice["token"], general) if t.startswith("backup-load ")]
        assert {p.text for p in posted if p.answered_at < started} <= set(texts)
        assert texts == [p.text for p in posted[: len(texts)]]  # one snapshot: a prefix of the posts, no hole
        bob_token = next(u for u in seed["users"] if u["name"] == "bob")["token"]
        assert await download(restored, bob_token, file_id) == report  # the bytes came with the backup
        bob = await restored.connect("bob")
        reply = await restored.api("chat.postMessage", alice["token"], channel=general, text="after the restore")
        assert reply["ok"], reply
        await bob.wait_texts(["after the restore"], general)
        await bob.close()
        events = seqs_of(restored_dir / "webapp.db", general)
        assert [seq for seq, _ in events] == list(range(1, len(backed_up) + 2))  # gapless, the next seq
        assert "after the restore" in events[-1][1]
    finally:
        restored.down()
