"""The webapp's hand-off to admin servers under faults, against the real fleet (``rtm up``).

Issue 13's fault-injection case "an admin server killed and the webapp-to-admin link cut
under load": a steady load of posts to #general and #random while the admin server the
webapp is connected to is killed, and (separately) while the webapp's TCP connection to it
is cut by the kernel (``ss -K``, a socket destroy: the webapp gets ECONNABORTED and the
admin server a RST) with the admin server alive. Both happen while the admin server is
stopped (SIGSTOP), so that pubs are in flight when the fault hits: the webapp must rewind
and resend them (counted), and in the cut case the stale admin server, continued, still
forwards its old pubs late (channel servers and gateways must drop those duplicates).

Asserted each time: every post is answered ok (or a retryable error, which the load
retries); after recovery every connection (four users on both gateways) has every post
of each channel exactly once and in the order of the webapp's history; the fault is
counted (``rtm_webapp_handoff_retries_total``); rtm up restarted a killed admin server and
Consul shows every admin server passing again; and the fleet still serves a new post.
"""

from __future__ import annotations

import asyncio
import shutil
import signal
import subprocess
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from services.identity import ADMIN_SERVER, WEBAPP
from tests.support import DEFAULT_WAIT_S, async_wait_until
from tests.system.harness import REGIONS, Client, Fleet, Load, consul_client, process_by_id
from tests.system.peer import metric

LOAD_USERS = ("eve", "carol", "dave")
CLIENT_USERS = ("alice", "bob", "carol", "dave")
MIN_POSTS_BEFORE_FAULT = 10
MIN_QUEUED_AT_FAULT = 5  # events the webapp has handed off (or queued) but not had acknowledged
LOAD_AFTER_RECOVERY_POSTS = 20  # posts answered after the hand-off drained again
CATCH_UP_TIMEOUT_S = 30.0 * DEFAULT_WAIT_S / 10.0
RECOVERY_TIMEOUT_S = 60.0 * DEFAULT_WAIT_S / 10.0
RETRYABLE_ERRORS = frozenset({"ratelimited"})  # what a client may be told to retry (the load retries it)
HISTORY_PAGE = 1000
MAX_HISTORY_PAGES = 20


def kernel_can_cut_sockets() -> bool:
    """``ss -K`` needs CAP_NET_ADMIN and a kernel with INET_DIAG_DESTROY: try it on a socket of our own."""
    import socket

    if shutil.which("ss") is None:
        return False
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]
        with socket.create_connection(("127.0.0.1", port)) as client:
            accepted, _ = server.accept()
            with accepted:
                cut(client.getsockname()[1], port)
                client.settimeout(DEFAULT_WAIT_S)
                try:
                    client.send(b"x")
                    return client.recv(1) == b""
                except OSError:
                    return True


def cut(local_port: int, remote_port: int) -> str:
    """Destroy the loopback TCP connection local_port -> remote_port (both directions see it end)."""
    done = subprocess.run(
        ["ss", "-K", "-t", "-n", "src", f"127.0.0.1:{local_port}", "dst", f"127.0.0.1:{remote_port}"],
        capture_output=True,
        text=True,
        timeout=DEFAULT_WAIT_S,
        check=False,
    )
    return done.stdout + done.stderr


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    data_dir: Path = tmp_path_factory.mktemp("handoff-faults")
    handle = Fleet.up(data_dir, "--seed-users", "6")
    try:
        yield handle
    finally:
        handle.down()


@pytest.fixture
async def clients(fleet: Fleet) -> AsyncIterator[list[Client]]:
    """Two connections per user, one on each gateway."""
    opened = [await fleet.connect(name, region) for name in CLIENT_USERS for region in REGIONS]
    assert len({c.gateway_port for c in opened}) == 2
    yield opened
    for client in opened:
        await client.close()


def webapp(fleet: Fleet) -> dict[str, Any]:
    fleet.reload()
    [proc] = fleet.processes(WEBAPP)
    return proc


def current_admin_link(fleet: Fleet) -> tuple[dict[str, Any], int]:
    """The admin server the webapp's hand-off is connected to, and the webapp's local port of that link."""
    fleet.reload()
    by_port = {int(p["port"]): p for p in fleet.processes(ADMIN_SERVER)}
    for conn in psutil.Process(int(webapp(fleet)["pid"])).net_connections(kind="tcp"):
        if conn.status == psutil.CONN_ESTABLISHED and conn.raddr and conn.raddr.port in by_port:
            return by_port[conn.raddr.port], conn.laddr.port
    raise AssertionError(f"the webapp holds no connection to an admin server ({sorted(by_port)})")


async def queued(fleet: Fleet) -> float:
    return await metric(webapp(fleet), "rtm_webapp_handoff_queue_depth")


async def rewinds(fleet: Fleet) -> float:
    return await metric(webapp(fleet), "rtm_webapp_handoff_retries_total")


def admin_servers_passing(fleet: Fleet) -> int:
    _, entries = consul_client(fleet).health.service(ADMIN_SERVER, passing=True)
    return len(entries)


async def history_texts(fleet: Fleet, channel: str, prefix: str) -> list[str]:
    """The channel's messages with ``prefix``, oldest first, as the webapp's history has them."""
    texts: list[str] = []
    cursor = ""
    token = fleet.user("alice")["token"]
    for _ in range(MAX_HISTORY_PAGES):
        params: dict[str, Any] = {"channel": channel, "limit": HISTORY_PAGE, **({"cursor": cursor} if cursor else {})}
        reply = await fleet.api("conversations.history", token, **params)
        assert reply["ok"], reply
        texts.extend(str(m.get("text")) for m in reply["messages"] if str(m.get("text", "")).startswith(prefix))
        cursor = (reply.get("response_metadata") or {}).get("next_cursor", "")
        if not reply.get("has_more") or not cursor:
            return texts[::-1]
    raise AssertionError(f"history of {channel} has more than {MAX_HISTORY_PAGES} pages")


async def assert_nothing_lost(fleet: Fleet, clients: list[Client], load: Load) -> None:
    """Every post answered ok (or retryably), and each connection has every post of each channel
    exactly once, in the order of the webapp's history."""
    assert all(e.get("error") in RETRYABLE_ERRORS for e in load.errors), load.errors[:3]
    assert sum(len(texts) for texts in load.posted.values()) >= MIN_POSTS_BEFORE_FAULT + LOAD_AFTER_RECOVERY_POSTS
    for channel, posted in load.posted.items():
        order = await history_texts(fleet, channel, load.prefix)
        assert order == posted, f"history of {channel} differs from what was answered ok"
        for client in clients:
            await client.wait_for(
                lambda c, ch=channel, want=order: (
                    len([t for t in c.texts(ch) if t.startswith(load.prefix)]) >= len(want)
                ),
                timeout_s=CATCH_UP_TIMEOUT_S,
                what=f"{len(order)} posts in {channel}",
            )
            got = [t for t in client.texts(channel) if t.startswith(load.prefix)]
            missing = [t for t in order if t not in got]
            assert got == order, f"{client.name} in {channel}: missing {missing[:5]}, or duplicated/out of order"


async def still_serves(fleet: Fleet, clients: list[Client]) -> None:
    text = f"after-{uuid.uuid4().hex[:8]}"
    general = fleet.channel("general")
    reply = await fleet.api("chat.postMessage", fleet.user("alice")["token"], channel=general, text=text)
    assert reply["ok"], reply
    for client in clients:
        await client.wait_texts([text], general, timeout_s=CATCH_UP_TIMEOUT_S)


async def under_load(fleet: Fleet, clients: list[Client], fault: Any) -> Load:
    """Run ``fault(admin_server, webapp_port)`` on the webapp's current admin server while it is
    stopped with pubs in flight, under a steady load; return the load once the hand-off drained
    and more posts went through."""
    for client in clients:
        client.events.clear()
    general, random_ = fleet.channel("general"), fleet.channel("random")
    load = Load(
        fleet,
        [fleet.user(name)["token"] for name in LOAD_USERS],
        [general, random_],
        prefix=f"hf-{uuid.uuid4().hex[:6]}-",
    )
    task = asyncio.create_task(load.run())
    try:

        async def posted(n: int) -> bool:
            return sum(len(v) for v in load.posted.values()) >= n or task.done()

        await async_wait_until(lambda: posted(MIN_POSTS_BEFORE_FAULT), what="posts before the fault")
        victim, webapp_port = current_admin_link(fleet)
        fleet.kill(int(victim["pid"]), signal.SIGSTOP)
        try:

            async def backlog() -> bool:
                return await queued(fleet) >= MIN_QUEUED_AT_FAULT or task.done()

            await async_wait_until(backlog, what="pubs in flight to the stopped admin server")
            before = await rewinds(fleet)
            await fault(victim, webapp_port)
        finally:
            try:
                fleet.kill(int(victim["pid"]), signal.SIGCONT)
            except ProcessLookupError:
                pass

        async def rewound() -> bool:
            return await rewinds(fleet) > before

        await async_wait_until(rewound, timeout_s=RECOVERY_TIMEOUT_S, what="the hand-off to count the fault")

        async def drained() -> bool:
            return await queued(fleet) == 0

        await async_wait_until(drained, timeout_s=RECOVERY_TIMEOUT_S, what="the hand-off to drain")
        at_recovery = sum(len(v) for v in load.posted.values())
        await async_wait_until(
            lambda: posted(at_recovery + LOAD_AFTER_RECOVERY_POSTS), timeout_s=RECOVERY_TIMEOUT_S, what="posts after"
        )
    finally:
        load.stop.set()
        await asyncio.wait_for(task, DEFAULT_WAIT_S)
    return load


async def test_admin_server_killed_with_pubs_in_flight_under_load(fleet: Fleet, clients: list[Client]) -> None:
    killed: dict[str, Any] = {}

    async def kill(victim: dict[str, Any], webapp_port: int) -> None:
        killed.update(victim)
        fleet.kill(int(victim["pid"]))  # SIGKILL: its sockets close with a RST, its pubs are lost

    load = await under_load(fleet, clients, kill)
    await assert_nothing_lost(fleet, clients, load)

    async def restarted() -> bool:
        return process_by_id(fleet, killed["id"])["pid"] != killed["pid"]

    await async_wait_until(restarted, timeout_s=RECOVERY_TIMEOUT_S, what="rtm up to restart the admin server")

    async def all_passing() -> bool:
        return admin_servers_passing(fleet) == len(fleet.processes(ADMIN_SERVER))

    await async_wait_until(all_passing, timeout_s=RECOVERY_TIMEOUT_S, what="every admin server passing in Consul")
    await still_serves(fleet, clients)


async def test_webapp_to_admin_link_cut_with_pubs_in_flight_under_load(fleet: Fleet, clients: list[Client]) -> None:
    if not kernel_can_cut_sockets():
        pytest.skip("ss -K cannot destroy sockets here (needs CAP_NET_ADMIN and CONFIG_INET_DIAG_DESTROY)")
    survivor: dict[str, Any] = {}

    async def cut_link(victim: dict[str, Any], webapp_port: int) -> None:
        survivor.update(victim)
        output = cut(webapp_port, int(victim["port"]))
        assert f":{webapp_port}" in output, output  # ss lists what it destroyed

    load = await under_load(fleet, clients, cut_link)
    await assert_nothing_lost(fleet, clients, load)
    assert process_by_id(fleet, survivor["id"])["pid"] == survivor["pid"]  # a cut, not a kill
    assert admin_servers_passing(fleet) == len(fleet.processes(ADMIN_SERVER))
    await still_serves(fleet, clients)
