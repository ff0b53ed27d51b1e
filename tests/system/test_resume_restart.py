"""A moved connection resumes across a webapp kill: its resume record is in SQLite, not memory;
and a connection its client closed while being moved leaves no record behind to be replayed later.

The gateway of a drained region saves a connection's resume record at the webapp
(``POST /internal/resume``), then sends ``goodbye``. If the webapp is killed (-9) before
the client's next ``rtm.connect`` and ``rtm up`` restarts it, the restarted webapp must
still hand that record to the client's token, so that the new gateway replays exactly what
the connection missed: nothing lost, nothing twice. With records kept only in memory, the
client started at a fresh bootstrap and silently skipped what was posted after its goodbye.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import websockets

from rtmctl.launcher import rtm_argv
from services.identity import WEBAPP
from services.process import READY_PREFIX
from tests.support import DEFAULT_WAIT_S, async_wait_until
from tests.system.harness import Fleet
from tests.system.peer import metric

RESTART_TIMEOUT_S = 60.0


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    data_dir: Path = tmp_path_factory.mktemp("resume-restart")
    # Generous resume and webapp-call timeouts: the close-before-goodbye test holds a record's
    # POST while the webapp is stopped (SIGSTOP), and must not race the gateway's 3 s default.
    env = {**os.environ, "RTM_RESUME_TIMEOUT_S": "20", "RTM_WEBAPP_TIMEOUT_S": "25"}
    handle = Fleet.up(data_dir, "--seed-users", "6", env=env)
    try:
        yield handle
    finally:
        handle.down()


def rtm(fleet: Fleet, *args: str) -> None:
    done = subprocess.run(
        rtm_argv(*args, "--data-dir", str(fleet.data_dir)), capture_output=True, text=True, timeout=30
    )
    assert done.returncode == 0, done.stdout + done.stderr


def webapp_pid(fleet: Fleet) -> int:
    fleet.reload()
    [proc] = fleet.processes(WEBAPP)
    return int(proc["pid"])


def assert_both_runs_in_the_log_file(fleet: Fleet, old_pid: int, new_pid: int) -> None:
    """The restarted webapp appended to its log file (DATA_DIR/logs/webapp.log, 0600): the killed
    run's ready line and its end, then the new run's; and ``rtm logs webapp -n 5`` prints its tail."""
    path = Path(fleet.info["log_dir"]) / "webapp.log"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    text = path.read_text()
    ready = [json.loads(line.removeprefix(READY_PREFIX)) for line in text.splitlines() if line.startswith(READY_PREFIX)]
    assert [r["pid"] for r in ready][-2:] == [old_pid, new_pid]
    assert "rtm.launcher: output ended; exited with -9\n" in text
    assert (
        text.index(f"started (pid {old_pid})") < text.index("exited with -9") < text.index(f"started (pid {new_pid})")
    )
    done = subprocess.run(
        rtm_argv("logs", "webapp", "-n", "5", "--data-dir", str(fleet.data_dir)),
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 0, done.stderr
    shown = done.stdout.splitlines()
    assert len(shown) == 5 and all(line in text.splitlines() for line in shown), shown


def assert_rtm_top_shows_the_restarted_webapp(fleet: Fleet, new_pid: int) -> None:
    """``rtm top`` reads the fleet.json that ``rtm up`` rewrote: the webapp's row is its new run,
    and it answers (up, with its resident memory)."""
    done = subprocess.run(
        rtm_argv("top", "--count", "1", "--data-dir", str(fleet.data_dir)),
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 0 and not done.stderr, done.stdout + done.stderr
    rows = {line.split()[0]: line.split() for line in done.stdout.splitlines()[2:]}
    assert rows["webapp"][1:4] == ["webapp", str(new_pid), "up"], done.stdout
    assert float(rows["webapp"][5]) > 0, done.stdout  # its resident memory: the new run answered


async def post(fleet: Fleet, token: str, channel: str, texts: list[str]) -> None:
    for text in texts:
        reply = await fleet.api("chat.postMessage", token, channel=channel, text=text)
        assert reply["ok"], reply


async def read_until(ws: Any, done: Any, seen: list[dict[str, Any]]) -> None:
    """Read events from ``ws`` into ``seen`` until ``done(seen)`` (bounded by the caller's timeout)."""
    while not done(seen):
        seen.append(json.loads(await ws.recv()))


def texts_of(events: list[dict[str, Any]], channel: str) -> list[str]:
    return [str(e["text"]) for e in events if e.get("type") == "message" and e.get("channel") == channel]


async def test_a_connection_moved_by_a_drain_resumes_after_the_webapp_is_killed_and_restarted(fleet: Fleet) -> None:
    general = fleet.channel("general")
    alice, poster = fleet.user("alice"), fleet.user("user0005")
    connect = await fleet.api("rtm.connect", alice["token"], region="eu-west")
    ws = await websockets.connect(connect["url"], max_size=None)
    first: list[dict[str, Any]] = []
    try:
        assert json.loads(await asyncio.wait_for(ws.recv(), DEFAULT_WAIT_S)) == {"type": "hello"}
        before = [f"before-{i}" for i in range(5)]
        await post(fleet, poster["token"], general, before)
        await asyncio.wait_for(read_until(ws, lambda s: texts_of(s, general) == before, first), DEFAULT_WAIT_S)

        await asyncio.to_thread(rtm, fleet, "drain", "eu-west")  # the gateway saves the record, says goodbye
        await asyncio.wait_for(read_until(ws, lambda s: s[-1].get("type") == "goodbye", first), DEFAULT_WAIT_S)
    finally:
        await ws.close()
    missed = [f"while-away-{i}" for i in range(5)]
    await post(fleet, poster["token"], general, missed)  # after the goodbye: only a resume replays them

    old_pid = webapp_pid(fleet)
    fleet.kill(old_pid, signal.SIGKILL)

    async def restarted() -> bool:
        if webapp_pid(fleet) == old_pid:
            return False
        try:
            return bool((await fleet.api("api.test"))["ok"])
        except OSError:
            return False

    await async_wait_until(restarted, timeout_s=RESTART_TIMEOUT_S, what="rtm up to restart the killed webapp")
    assert_both_runs_in_the_log_file(fleet, old_pid, webapp_pid(fleet))
    assert_rtm_top_shows_the_restarted_webapp(fleet, webapp_pid(fleet))
    after = [f"after-{i}" for i in range(5)]
    await post(fleet, poster["token"], general, after)

    connect = await fleet.api("rtm.connect", alice["token"], region="eu-west")
    assert connect["ok"], connect
    second: list[dict[str, Any]] = []
    ws = await websockets.connect(connect["url"], max_size=None)
    try:
        assert json.loads(await asyncio.wait_for(ws.recv(), DEFAULT_WAIT_S)) == {"type": "hello"}
        await post(fleet, poster["token"], general, ["last"])  # general's events arrive in seq order: it ends them
        await asyncio.wait_for(read_until(ws, lambda s: "last" in texts_of(s, general), second), DEFAULT_WAIT_S)
    finally:
        await ws.close()
    assert texts_of(second, general) == [*missed, *after, "last"]  # resumed where it stopped: none lost, none twice
    await asyncio.to_thread(rtm, fleet, "undrain", "eu-west")


async def test_a_connection_closed_by_its_client_during_its_move_leaves_no_record_to_replay_later(fleet: Fleet) -> None:
    """bob has two tabs with one token, one per region. The eu-west tab is being moved by a drain
    (its record on its way to the webapp, held here by stopping the webapp) when its client closes
    it: it never gets the goodbye. The us-east tab is then moved too. Its reconnect must resume
    from its own record, not the closed tab's older one: before, that stale record stayed pending
    and was claimed first (oldest), and the tab got everything since the old position again
    (the smoke soak's duplicates, docs/soak.md, Findings)."""
    general = fleet.channel("general")
    poster = fleet.user("user0005")
    east = await fleet.connect("bob", "us-east", follow_goodbye=True)
    west = await fleet.connect("bob", "eu-west")
    [west_gw] = [p for p in fleet.processes("gateway") if p.get("region") == "eu-west"]
    try:
        await post(fleet, poster["token"], general, ["one"])
        await west.wait_texts(["one"], general)
        await east.wait_texts(["one"], general)

        webapp = webapp_pid(fleet)
        fleet.kill(webapp, signal.SIGSTOP)
        try:
            await asyncio.to_thread(rtm, fleet, "drain", "eu-west")

            async def detached_not_closed() -> bool:
                return await metric(west_gw, "rtm_gw_connections") == 0 and await metric(west_gw, "rtm_gw_sockets") == 1

            await async_wait_until(detached_not_closed, what="the eu-west tab detached, its record on its way")
            await west.close()  # the client's own close, before any goodbye

            async def socket_gone() -> bool:
                return await metric(west_gw, "rtm_gw_sockets") == 0

            await async_wait_until(socket_gone, what="the eu-west gateway to see the client's close")
        finally:
            fleet.kill(webapp, signal.SIGCONT)

        async def move_done() -> bool:
            return await metric(west_gw, "rtm_gw_sessions_moved_total", reason="region drained") == 1

        await async_wait_until(move_done, what="the eu-west tab's move to finish")
        assert not any(e.get("type") == "goodbye" for e in west.events)  # closed before it could come
        await post(fleet, poster["token"], general, ["two", "three"])
        await east.wait_texts(["two", "three"], general)

        await asyncio.to_thread(rtm, fleet, "undrain", "eu-west")
        await asyncio.to_thread(rtm, fleet, "drain", "us-east")  # the us-east tab moves (goodbye, resume)
        await east.wait_for(lambda c: len(c.urls) == 2, what="the us-east tab to reconnect")
        await post(fleet, poster["token"], general, ["four"])
        await east.wait_texts(["four"], general)
        assert east.texts(general) == ["one", "two", "three", "four"]  # resumed from its own place: none twice
        assert await metric(west_gw, "rtm_gw_goodbye_missed_total") == 1
    finally:
        await asyncio.to_thread(rtm, fleet, "undrain", "us-east")
        await asyncio.to_thread(rtm, fleet, "undrain", "eu-west")
        await east.close()
