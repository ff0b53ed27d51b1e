"""Chaos soak (issue 13, item 7): mixed traffic for N minutes while every role is killed at random;
then every connection's received stream is checked against the webapp's database.

The fleet is ``rtm up --debug-faults`` as a subprocess (:class:`bench.harness.FleetRun`),
with one seeded user per client. Setup: the demo bot creates ``--clients / --channel-size``
channels and invites every user into two of them (everyone is also in #general and
#random). ``--clients`` websockets (one per user) are held by ``--client-procs``
:mod:`bench.load_client` processes (recording ``sessions``, reconnecting ``always``), regions alternating.

Traffic, for ``--minutes``, at ``--rate`` operations/s (seeded random choice, each
operation as a random user over the Web API; at most ``MAX_OPS_IN_FLIGHT`` at once,
the rest skipped and counted): ``chat.postMessage`` (2 % of them to #general or
#random, 2,000 recipients), ``chat.update`` and ``chat.delete`` of the user's own
recent messages, ``reactions.add``/``.remove``, typing over the websocket,
``conversations.join``/``.leave`` of the soak channels; plus ``--reconnect-rate``
client-initiated reconnects/s.

Chaos, at the same time (``--seed``; one fault every ``--fault-interval-s`` on
average, at most ``--max-faults``, each bounded in time, the next one only
after the fleet is whole again): the kinds of :data:`FAULT_KINDS` are dealt in a
shuffled deck, so every kind comes up before any repeats. Kills use the
operator's ``rtm kill`` (SIGKILL) and ``rtm up`` restarts the process; a
gateway restart is a SIGTERM (its clients move with ``goodbye`` and resume);
the CHARM leader is found with ``rtm status``; a partition cuts a channel-server
slot owner off from Consul (``POST /debug/consul-partition``, see README
"Split brain") for :data:`PARTITION_HOLD_S`; a drain is ``rtm drain`` of a region,
``rtm undrain`` :data:`DRAIN_HOLD_S` later.

Then traffic and chaos stop, the fleet heals, deliveries settle, and
:mod:`bench.soak_check` checks every connection against the ``events`` table of
the webapp's SQLite (read-only): lost, duplicated and reordered events per
channel per connection, every other (client, event) pair accounted for by
reason, and what each client read with ``conversations.history`` after each
fresh reconnect. Exit status 1 if the check failed.

    python -m bench.soak                       # 10 minutes, 2,000 clients
    python -m bench.soak --minutes 4           # what docs/soak.md reports
    python -m bench.soak --short               # ~40 s smoke run, 120 clients

Why one module over 500 lines: the soak's run (traffic, chaos, counters, settling, the report) is
one scenario whose parts share the fleet, the clients and the seeded random source; the verdict is
apart (bench.soak_check, sans-I/O), the clients are bench.load_client's.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import pickle
import random
import signal
import sqlite3
import subprocess
import sys
import time
from collections import Counter, deque
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import psutil

from bench.harness import (
    FleetRun,
    LoadClient,
    fmt,
    install_uvloop,
    machine_info,
    md_table,
    publish,
    raise_nofile,
)
from bench.soak_check import REASONS, DbEvent, HistoryRead, Session, check, event_kind
from rtmctl.fleet import OPERATOR_TOKEN_FILE
from rtmctl.launcher import rtm_argv
from rtmctl.operator import consul_token
from services.debug_faults import OPERATOR_TOKEN_HEADER
from services.identity import ADMIN_SERVER, CHANNEL_SERVER, CHARM, GATEWAY, PRESENCE, WEBAPP

NAME = "soak"
REGIONS = ("us-east", "eu-west")
BIG_CHANNELS = ("general", "random")
FAULT_KINDS = (
    "kill_channel_server",
    "kill_admin_server",
    "kill_presence_server",
    "kill_gateway",
    "restart_gateway",
    "kill_charm_leader",
    "kill_webapp",
    "partition_channel_server",
    "drain_region",
)
OP_WEIGHTS = {  # the traffic mix, relative weights per operation
    "post": 40,
    "edit": 12,
    "delete": 8,
    "react": 12,
    "unreact": 4,
    "typing": 12,
    "join": 6,
    "leave": 6,
}
REACTIONS = ("thumbsup", "tada", "eyes", "rocket", "wave", "heart")
BIG_POST_SHARE = 0.02  # of posts, to #general or #random (every client is in both)
MAX_OPS_IN_FLIGHT = 32
RECENT_MESSAGES = 50  # per channel, candidates for edits, deletes and reactions
HTTP_TIMEOUT_S = 15.0
PARTITION_HOLD_S = 6.0  # 3 x rtm up's channel-server TTL (2 s): the slot moves to the spare
DRAIN_HOLD_S = 8.0
SHORT_DRAIN_HOLD_S = 4.0
RECOVERY_TIMEOUT_S = 60.0
RECOVERY_POLL_S = 0.5
SETTLE_IDLE_S = 5.0  # deliveries have settled when no client received anything for this long
HISTORY_LOOKBACK_S = 60.0  # a fresh reconnect reads history from this long before its old connection closed
HISTORY_PAGE = 200
MAX_HISTORY_PAGES = 5
HISTORY_WORKERS = 6
MAX_HISTORY_QUEUE = 20_000
# A history read that fails (the webapp killed by the chaos and restarting, a 429, a timeout) is
# tried again, at most this many times in all, after a delay that doubles from the first, within
# a budget: a restart of the webapp takes a few seconds (RECOVERY_TIMEOUT_S bounds it at 60).
HISTORY_READ_ATTEMPTS = 5
HISTORY_RETRY_DELAY_S = 1.0
HISTORY_RETRY_BUDGET_S = 30.0
CLI_TIMEOUT_S = 30.0
CPU_SAMPLE_S = 2.0
COUNTER_SCRAPE_S = 5.0
STAT_POLL_S = 1.0
MAX_EXTENSION_S = 90.0  # --min-faults may extend the run by at most this
SHORT_MIN_FAULTS = 4  # --short: on a slow machine 30 s may hold only 3 faults


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m bench.soak", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--minutes", type=float, default=10.0, help="traffic and chaos time")
    p.add_argument("--clients", type=int, default=2000, help="websocket clients, one per user")
    p.add_argument("--client-procs", type=int, default=2, help="soak client processes holding them")
    p.add_argument("--seed", type=int, default=1, help="seed of every random choice (traffic and chaos)")
    p.add_argument("--rate", type=float, default=30.0, help="Web API / typing operations per second")
    p.add_argument("--reconnect-rate", type=float, default=1.0, help="client-initiated reconnects per second")
    p.add_argument("--fault-interval-s", type=float, default=20.0, help="mean time between faults")
    p.add_argument("--max-faults", type=int, default=200)
    p.add_argument(
        "--min-faults",
        type=int,
        default=0,
        help=f"keep traffic and chaos going past --minutes until this many faults (at most {MAX_EXTENSION_S:.0f} s more)",
    )
    p.add_argument("--channel-size", type=int, default=20, help="members per soak channel (each user is in two)")
    p.add_argument("--settle-s", type=float, default=90.0, help="bound on the wait for deliveries to settle")
    p.add_argument("--short", action="store_true", help="smoke run: ~40 s, 120 clients, one client process")
    p.add_argument("--json", default="", help="write only this JSON file (not bench/results/)")
    p.add_argument("--raw", default="", help="also pickle the check's inputs here (events, connections, frames)")
    p.add_argument(
        "--fleet-log",
        default="",
        help="write every fleet process's log lines here (rtm up --verbose; for analysing a failure)",
    )
    p.add_argument("--recheck", default="", help="check a --raw pickle again and print the verdict (no fleet)")
    args = p.parse_args(argv)
    if args.short:
        args.minutes = min(args.minutes, 0.5)
        args.clients = min(args.clients, 120)
        args.client_procs = 1
        args.rate = min(args.rate, 15.0)
        args.reconnect_rate = min(args.reconnect_rate, 0.5)
        args.fault_interval_s = min(args.fault_interval_s, 3.0)
        args.settle_s = min(args.settle_s, 45.0)
        args.min_faults = max(args.min_faults, SHORT_MIN_FAULTS)
    return args


def now_us() -> int:
    return time.time_ns() // 1000


# -- the fleet's public faces: the rtm command line, Consul's HTTP API, the debug-faults endpoint --------


def rtm_cli(fleet: FleetRun, *args: str) -> str:
    """Run ``rtm ARGS --data-dir DIR`` (the operator's command line) and return its output."""
    out = subprocess.run(
        rtm_argv(*args, "--data-dir", str(fleet.data_dir)),
        capture_output=True,
        text=True,
        timeout=CLI_TIMEOUT_S,
        check=False,
    )
    return (out.stdout + out.stderr).strip()


def fleet_processes(fleet: FleetRun) -> list[dict[str, Any]]:
    """Every fleet process as ``fleet.json`` lists it now (``rtm up`` rewrites it on each restart)."""
    try:
        return list(json.loads((fleet.data_dir / "fleet.json").read_text())["processes"])
    except (OSError, ValueError, KeyError):
        return list(fleet.info["processes"])


def status_leader(status: str) -> str:
    """The CHARM leader's instance id from ``rtm status`` output ("CHARM leader: ID (host:port)")."""
    for line in status.splitlines():
        if line.startswith("CHARM leader:"):
            rest = line.split(":", 1)[1].strip()
            return "" if rest == "none" else rest.split()[0]
    return ""


def status_channel_owners(status: str) -> dict[str, str]:
    """Slot -> owner of the channel ring from ``rtm status`` output."""
    owners: dict[str, str] = {}
    in_ring = False
    for line in status.splitlines():
        if line.startswith("channel ring"):
            in_ring = True
            continue
        if in_ring:
            if not line.startswith("  "):
                break
            parts = line.split()
            if len(parts) >= 3 and parts[1] == "->" and parts[2] != "(none)":
                owners[parts[0]] = parts[2]
    return owners


async def consul_partition(
    http: aiohttp.ClientSession, fleet: FleetRun, proc: dict[str, Any], on: bool
) -> dict[str, Any]:
    """Cut ``proc`` (a channel server run with ``--debug-faults``) off from Consul, or heal it.

    The one place the soak calls the debug-faults endpoint (``POST /debug/consul-partition?on=1|0``
    on the process's metrics port, with the operator token ``rtm up`` wrote in the data directory).
    A refusal (403 without the token) raises: the fault was not injected."""
    url = f"http://{proc['host']}:{proc['metrics_port']}/debug/consul-partition"
    token = (fleet.data_dir / OPERATOR_TOKEN_FILE).read_text().strip()
    async with http.post(url, params={"on": "1" if on else "0"}, headers={OPERATOR_TOKEN_HEADER: token}) as resp:
        body = (await resp.text())[:200]
        if resp.status != 200:
            raise RuntimeError(f"consul-partition on={on}: HTTP {resp.status} {body}")
        return {"status": resp.status, "body": body}


async def passing_counts(http: aiohttp.ClientSession, fleet: FleetRun) -> dict[str, int]:
    """Healthy (passing) instances per service, from Consul's HTTP API (with the fleet's ACL token)."""
    out = {}
    consul_url = fleet.info["consul_url"]
    token = consul_token(str(fleet.data_dir))
    headers = {"X-Consul-Token": token} if token else {}
    for service in (WEBAPP, ADMIN_SERVER, CHANNEL_SERVER, GATEWAY, PRESENCE, CHARM):
        try:
            async with http.get(
                f"{consul_url}/v1/health/service/{service}", params={"passing": "1"}, headers=headers
            ) as resp:
                out[service] = len(await resp.json(content_type=None)) if resp.status == 200 else 0
        except (aiohttp.ClientError, TimeoutError, ValueError):
            out[service] = 0
    return out


# -- traffic -------------------------------------------------------------------------------------------


class Traffic:
    """The soak's Web API users: what they may do next, what they did, how it went."""

    def __init__(self, args: argparse.Namespace, fleet: FleetRun, http: aiohttp.ClientSession, rng: random.Random):
        self.args = args
        self.api = fleet.api_url
        self.http = http
        self.rng = rng
        users = [u for u in fleet.seed["users"] if not u["is_bot"]][: args.clients]
        if len(users) < args.clients:
            raise RuntimeError(f"the fleet seeded {len(users)} users, {args.clients} asked")
        self.users = users
        self.bot = next(u for u in fleet.seed["users"] if u["is_bot"])
        self.big = [c["id"] for c in fleet.seed["channels"] if c["name"] in BIG_CHANNELS]
        self.channels: list[str] = []  # the soak's own channels
        self.members: dict[str, set[int]] = {}
        self.joined: dict[int, set[str]] = {i: set() for i in range(len(users))}
        self.recent: dict[str, deque[tuple[str, int]]] = {}
        self.reacted: list[tuple[str, str, str, int]] = []
        self.ops: dict[str, Counter[str]] = {k: Counter() for k in OP_WEIGHTS}
        self.in_flight = 0
        self.tasks: set[asyncio.Task[Any]] = set()
        self.clients: list[LoadClient] = []
        self.client_of: list[int] = []

    async def call(self, method: str, token: str, **params: Any) -> dict[str, Any]:
        async with self.http.post(self.api + method, data=params, headers={"Authorization": f"Bearer {token}"}) as resp:
            return dict(await resp.json(content_type=None))

    async def setup(self) -> dict[str, Any]:
        n = max(2, len(self.users) // self.args.channel_size)
        started = time.monotonic()
        for k in range(n):
            reply = await self.call("conversations.create", self.bot["token"], name=f"soak-{k:04d}")
            if not reply.get("ok"):
                raise RuntimeError(f"conversations.create: {reply}")
            ch = reply["channel"]["id"]
            self.channels.append(ch)
            self.members[ch] = set()
            self.recent[ch] = deque(maxlen=RECENT_MESSAGES)
        for ch in self.big:
            self.members[ch] = set(range(len(self.users)))
            self.recent[ch] = deque(maxlen=RECENT_MESSAGES)
        invites: dict[str, list[int]] = {ch: [] for ch in self.channels}
        for i in range(len(self.users)):
            a = i % n
            b = (i * 7 + 3) % n
            if b == a:
                b = (a + 1) % n
            for k in (a, b):
                invites[self.channels[k]].append(i)
        for ch, who in invites.items():
            for j in range(0, len(who), 100):
                batch = who[j : j + 100]
                reply = await self.call(
                    "conversations.invite",
                    self.bot["token"],
                    channel=ch,
                    users=",".join(self.users[i]["id"] for i in batch),
                )
                if not reply.get("ok"):
                    raise RuntimeError(f"conversations.invite: {reply}")
                for i in batch:
                    self.members[ch].add(i)
                    self.joined[i].add(ch)
        return {"channels": n, "setup_s": time.monotonic() - started}

    def member_channels(self, i: int) -> list[str]:
        return sorted(self.joined[i]) + self.big

    def start_op(self) -> None:
        if self.in_flight >= MAX_OPS_IN_FLIGHT:
            self.ops.setdefault("skipped", Counter())["in_flight_full"] += 1
            return
        kind = self.rng.choices(list(OP_WEIGHTS), weights=list(OP_WEIGHTS.values()))[0]
        task = asyncio.ensure_future(self.run_op(kind))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def run_op(self, kind: str) -> None:
        self.in_flight += 1
        try:
            outcome = await getattr(self, "op_" + kind)()
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            outcome = "http:" + type(exc).__name__
        finally:
            self.in_flight -= 1
        self.ops[kind][outcome] += 1

    @staticmethod
    def outcome(reply: dict[str, Any]) -> str:
        return "ok" if reply.get("ok") else str(reply.get("error"))

    async def op_post(self) -> str:
        i = self.rng.randrange(len(self.users))
        chans = self.member_channels(i)
        ch = (
            self.rng.choice(self.big)
            if self.rng.random() < BIG_POST_SHARE
            else self.rng.choice(sorted(self.joined[i]) or self.big)
        )
        assert ch in chans
        reply = await self.call("chat.postMessage", self.users[i]["token"], channel=ch, text=f"soak {now_us()} by {i}")
        if reply.get("ok"):
            self.recent[ch].append((reply["ts"], i))
        return self.outcome(reply)

    def pick_recent(self) -> tuple[str, str, int] | None:
        candidates = [ch for ch, d in self.recent.items() if d]
        if not candidates:
            return None
        ch = self.rng.choice(candidates)
        ts, author = self.rng.choice(list(self.recent[ch]))
        return ch, ts, author

    async def op_edit(self) -> str:
        got = self.pick_recent()
        if got is None:
            return "nothing_yet"
        ch, ts, author = got
        reply = await self.call(
            "chat.update", self.users[author]["token"], channel=ch, ts=ts, text=f"edited {now_us()}"
        )
        return self.outcome(reply)

    async def op_delete(self) -> str:
        got = self.pick_recent()
        if got is None:
            return "nothing_yet"
        ch, ts, author = got
        try:
            self.recent[ch].remove((ts, author))
        except ValueError:
            return "raced"
        reply = await self.call("chat.delete", self.users[author]["token"], channel=ch, ts=ts)
        return self.outcome(reply)

    async def op_react(self) -> str:
        got = self.pick_recent()
        if got is None:
            return "nothing_yet"
        ch, ts, _ = got
        members = sorted(self.members.get(ch, ()))
        if not members:
            return "no_members"
        i = self.rng.choice(members)
        name = self.rng.choice(REACTIONS)
        reply = await self.call("reactions.add", self.users[i]["token"], channel=ch, timestamp=ts, name=name)
        if reply.get("ok"):
            self.reacted.append((ch, ts, name, i))
        return self.outcome(reply)

    async def op_unreact(self) -> str:
        if not self.reacted:
            return "nothing_yet"
        ch, ts, name, i = self.reacted.pop(self.rng.randrange(len(self.reacted)))
        reply = await self.call("reactions.remove", self.users[i]["token"], channel=ch, timestamp=ts, name=name)
        return self.outcome(reply)

    async def op_typing(self) -> str:
        i = self.rng.randrange(len(self.users))
        ch = self.rng.choice(self.member_channels(i))
        reply = await self.clients[self.client_of[i]].call("typing", sends=[[i, ch]])
        return "sent" if reply["sent"] else "not_connected"

    async def op_join(self) -> str:
        i = self.rng.randrange(len(self.users))
        options = [ch for ch in self.channels if ch not in self.joined[i]]
        if not options:
            return "in_all"
        ch = self.rng.choice(options)
        self.joined[i].add(ch)  # at once: no second join of the same pair while this one runs
        reply = await self.call("conversations.join", self.users[i]["token"], channel=ch)
        if reply.get("ok"):
            self.members[ch].add(i)
        else:
            self.joined[i].discard(ch)
        return self.outcome(reply)

    async def op_leave(self) -> str:
        i = self.rng.randrange(len(self.users))
        options = sorted(self.joined[i])
        if len(options) <= 1:
            return "keeps_last"
        ch = self.rng.choice(options)
        self.joined[i].discard(ch)
        self.members[ch].discard(i)
        reply = await self.call("conversations.leave", self.users[i]["token"], channel=ch)
        if not reply.get("ok"):
            self.joined[i].add(ch)
            self.members[ch].add(i)
        return self.outcome(reply)

    async def settle(self) -> None:
        if self.tasks:
            await asyncio.wait(list(self.tasks), timeout=HTTP_TIMEOUT_S * 2)


async def traffic_loop(traffic: Traffic, rate: float, stop: asyncio.Event) -> None:
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    n = 0
    while not stop.is_set():
        n += 1
        delay = t0 + n / rate - loop.time()
        if delay > 0:
            try:
                await asyncio.wait_for(stop.wait(), delay)
                return
            except TimeoutError:
                pass
        traffic.start_op()


async def reconnect_loop(traffic: Traffic, rate: float, stop: asyncio.Event, counts: Counter[str]) -> None:
    if rate <= 0:
        return
    while not stop.is_set():
        try:
            await asyncio.wait_for(stop.wait(), traffic.rng.expovariate(rate))
            return
        except TimeoutError:
            pass
        i = traffic.rng.randrange(len(traffic.users))
        try:
            reply = await traffic.clients[traffic.client_of[i]].call("reconnect", clients=[i])
            counts["asked" if reply["asked"] else "not_connected"] += 1
        except RuntimeError as exc:
            counts["error: " + str(exc)[:60]] += 1


# -- history reads after fresh reconnects ---------------------------------------------------------------


class HistoryReader:
    """After each fresh reconnect, the client reads what it missed with ``conversations.history``,
    as Slack's clients do; what it read is kept for :func:`bench.soak_check.check`."""

    def __init__(
        self,
        traffic: Traffic,
        workers: int = HISTORY_WORKERS,
        attempts: int = HISTORY_READ_ATTEMPTS,
        retry_delay_s: float = HISTORY_RETRY_DELAY_S,
        retry_budget_s: float = HISTORY_RETRY_BUDGET_S,
    ) -> None:
        self.traffic = traffic
        self.attempts = attempts
        self.retry_delay_s = retry_delay_s
        self.retry_budget_s = retry_budget_s
        self.queue: asyncio.Queue[tuple[int, int, int, int]] = asyncio.Queue()
        self.reads: dict[int, dict[str, HistoryRead]] = {}
        self.counts: Counter[str] = Counter()
        self.workers = [asyncio.ensure_future(self.worker()) for _ in range(workers)]

    def add(self, fresh: list[list[int]]) -> None:
        for client, sid, closed_us, hello_us in fresh:
            if self.queue.qsize() >= MAX_HISTORY_QUEUE:
                self.counts["skipped_queue_full"] += 1
                continue
            self.queue.put_nowait((int(client), int(sid), int(closed_us), int(hello_us)))

    async def worker(self) -> None:
        while True:
            client, sid, closed_us, _ = await self.queue.get()
            try:
                await self.read_with_retries(client, sid, closed_us)
                self.counts["read"] += 1
            except (aiohttp.ClientError, TimeoutError, ValueError, KeyError) as exc:
                self.counts["failed: " + type(exc).__name__] += 1
            finally:
                self.queue.task_done()

    async def read_with_retries(self, client: int, sid: int, closed_us: int) -> None:
        """:meth:`read`, tried again after a failure (counted as ``retried``) at most
        ``attempts`` times in all, with doubling delays, within ``retry_budget_s``; the last
        failure is raised (the worker counts it)."""
        deadline = time.monotonic() + self.retry_budget_s
        delay = self.retry_delay_s
        for attempt in range(1, self.attempts + 1):
            try:
                await self.read(client, sid, closed_us)
                return
            except (aiohttp.ClientError, TimeoutError, ValueError, KeyError):
                if attempt >= self.attempts or time.monotonic() + delay > deadline:
                    raise
            self.counts["retried"] += 1
            await asyncio.sleep(delay)  # wait-ok: a bounded backoff between attempts of one read
            delay *= 2

    async def read(self, client: int, sid: int, closed_us: int) -> None:
        t = self.traffic
        token = t.users[client]["token"]
        reply = await t.call("users.conversations", token, limit="1000")
        if not reply.get("ok"):
            raise ValueError(f"users.conversations: {reply.get('error')}")
        oldest_us = closed_us - int(HISTORY_LOOKBACK_S * 1e6)
        oldest = f"{oldest_us // 1_000_000}.{oldest_us % 1_000_000:06d}"
        out: dict[str, HistoryRead] = {}
        for ch in (c["id"] for c in reply["channels"]):
            read_us = now_us()
            seen: set[str] = set()
            cursor = ""
            complete = False
            for _ in range(MAX_HISTORY_PAGES):
                params = {"channel": ch, "oldest": oldest, "limit": str(HISTORY_PAGE)}
                if cursor:
                    params["cursor"] = cursor
                page = await t.call("conversations.history", token, **params)
                if not page.get("ok"):
                    raise ValueError(f"conversations.history: {page.get('error')}")
                seen.update(str(m["ts"]) for m in page.get("messages", []))
                cursor = (page.get("response_metadata") or {}).get("next_cursor") or ""
                if not page.get("has_more") or not cursor:
                    complete = True
                    break
            out[ch] = HistoryRead(read_us, oldest_us, seen, complete)
        self.reads[sid] = out

    async def drain(self, timeout_s: float) -> None:
        try:
            await asyncio.wait_for(self.queue.join(), timeout_s)
        except TimeoutError:
            self.counts["unread_at_end"] += self.queue.qsize()
        for w in self.workers:
            w.cancel()


# -- chaos -----------------------------------------------------------------------------------------------


class Chaos:
    """Faults, one at a time, dealt from a shuffled deck of :data:`FAULT_KINDS`."""

    def __init__(self, args: argparse.Namespace, fleet: FleetRun, http: aiohttp.ClientSession, t0: float) -> None:
        self.args = args
        self.fleet = fleet
        self.http = http
        self.rng = random.Random(args.seed * 7919 + 1)
        self.t0 = t0
        self.log: list[dict[str, Any]] = []
        self.deck: list[str] = []
        self.baseline: dict[str, int] = {}
        self.drain_hold_s = SHORT_DRAIN_HOLD_S if args.short else DRAIN_HOLD_S

    def next_kind(self) -> str:
        if not self.deck:
            self.deck = list(FAULT_KINDS)
            self.rng.shuffle(self.deck)
        return self.deck.pop()

    async def recovered(self, killed_pid: int = 0) -> float:
        """Wait (bounded) until ``rtm up`` has restarted ``killed_pid`` (it lists a new pid in
        ``fleet.json`` once the new process is ready) and Consul has as many passing instances of
        each service as at the start."""
        started = time.monotonic()
        while time.monotonic() - started < RECOVERY_TIMEOUT_S:
            restarted = not killed_pid or all(int(p["pid"]) != killed_pid for p in fleet_processes(self.fleet))
            if restarted:
                counts = await passing_counts(self.http, self.fleet)
                if all(counts.get(s, 0) >= n for s, n in self.baseline.items()):
                    return time.monotonic() - started
            await asyncio.sleep(RECOVERY_POLL_S)
        return float("nan")

    async def run(self, stop: asyncio.Event) -> None:
        self.baseline = await passing_counts(self.http, self.fleet)
        while not stop.is_set() and len(self.log) < self.args.max_faults:
            gap = self.args.fault_interval_s * self.rng.uniform(0.5, 1.5)
            try:
                await asyncio.wait_for(stop.wait(), gap)
                return
            except TimeoutError:
                pass
            kind = self.next_kind()
            entry: dict[str, Any] = {"kind": kind, "at_s": round(time.monotonic() - self.t0, 2)}
            started = time.monotonic()
            try:
                entry.update(await getattr(self, kind)())
                entry["ok"] = True
            except Exception as exc:  # noqa: BLE001 - a fault that could not be injected is reported
                entry["ok"] = False
                entry["error"] = repr(exc)[:300]
            entry["inject_s"] = round(time.monotonic() - started, 2)
            entry["recovery_s"] = round(await self.recovered(int(entry.get("pid", 0))), 2)
            self.log.append(entry)
            print(f"soak: fault {len(self.log)}: {entry}", flush=True)

    def procs(self, service: str) -> list[dict[str, Any]]:
        return [p for p in fleet_processes(self.fleet) if p["service"] == service]

    async def cli(self, *args: str) -> str:
        return await asyncio.to_thread(rtm_cli, self.fleet, *args)

    async def kill(self, service: str, name: str) -> dict[str, Any]:
        out = await self.cli("kill", service, name)
        if not out.startswith("killed"):
            raise RuntimeError(out)
        pid = int(out.split("(pid ", 1)[1].split(")", 1)[0])  # "killed SERVICE ID (pid N) with SIGKILL"
        return {"target": name, "pid": pid, "output": out}

    async def kill_channel_server(self) -> dict[str, Any]:
        owners = status_channel_owners(await self.cli("status"))
        return await self.kill(CHANNEL_SERVER, self.rng.choice(sorted(owners)))

    async def kill_admin_server(self) -> dict[str, Any]:
        return await self.kill(ADMIN_SERVER, self.rng.choice(sorted(p["id"] for p in self.procs(ADMIN_SERVER))))

    async def kill_presence_server(self) -> dict[str, Any]:
        slots = int(self.fleet._flag("--presence-servers", 2))
        return await self.kill(PRESENCE, f"ps-{self.rng.randrange(slots)}")

    async def kill_gateway(self) -> dict[str, Any]:
        return await self.kill(GATEWAY, self.rng.choice(sorted(p["id"] for p in self.procs(GATEWAY))))

    async def restart_gateway(self) -> dict[str, Any]:
        proc = self.rng.choice(sorted(self.procs(GATEWAY), key=lambda p: p["id"]))
        os.kill(int(proc["pid"]), signal.SIGTERM)  # a rolling restart: it moves its clients, rtm up restarts it
        return {"target": proc["id"], "pid": int(proc["pid"]), "signal": "SIGTERM"}

    async def kill_charm_leader(self) -> dict[str, Any]:
        leader = status_leader(await self.cli("status"))
        if not leader:
            raise RuntimeError("rtm status names no CHARM leader")
        return await self.kill(CHARM, leader)

    async def kill_webapp(self) -> dict[str, Any]:
        return await self.kill(WEBAPP, self.procs(WEBAPP)[0]["id"])

    async def partition_channel_server(self) -> dict[str, Any]:
        owners = status_channel_owners(await self.cli("status"))
        slot = self.rng.choice(sorted(owners))
        proc = next(p for p in self.procs(CHANNEL_SERVER) if p["id"] == owners[slot])
        on = await consul_partition(self.http, self.fleet, proc, True)
        try:
            await asyncio.sleep(PARTITION_HOLD_S)
        finally:
            off = await consul_partition(self.http, self.fleet, proc, False)
        return {"target": f"{slot} ({proc['id']})", "hold_s": PARTITION_HOLD_S, "on": on, "off": off}

    async def drain_region(self) -> dict[str, Any]:
        region = self.rng.choice(REGIONS)
        out = await self.cli("drain", region)
        try:
            await asyncio.sleep(self.drain_hold_s)
        finally:
            out2 = await self.cli("undrain", region)
        return {"target": region, "hold_s": self.drain_hold_s, "output": [out, out2]}


# -- CPU per service ---------------------------------------------------------------------------------------


class CpuBook:
    """CPU-seconds per service: every fleet process (restarted ones too, by their last sample), the
    soak's client processes and the soak itself, sampled every :data:`CPU_SAMPLE_S`."""

    def __init__(self, fleet: FleetRun, extra: dict[str, int]) -> None:
        self.fleet = fleet
        self.extra = extra
        self.last: dict[int, tuple[str, float]] = {}
        self.first: dict[int, float] = {}

    def sample(self) -> None:
        labelled = [(p["service"], int(p["pid"])) for p in fleet_processes(self.fleet)]
        labelled += [(label, pid) for label, pid in self.extra.items()]
        for label, pid in labelled:
            try:
                t = psutil.Process(pid).cpu_times()
            except psutil.Error:
                continue
            self.last[pid] = (label, float(t.user + t.system))
            self.first.setdefault(pid, float(t.user + t.system))

    async def loop(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            await asyncio.to_thread(self.sample)
            try:
                await asyncio.wait_for(stop.wait(), CPU_SAMPLE_S)
            except TimeoutError:
                pass

    def by_label(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for pid, (label, cpu) in self.last.items():
            out.setdefault(label, 0.0)
            out[label] += cpu - self.first.get(pid, 0.0)
        return {k: round(v, 1) for k, v in sorted(out.items())}


class CounterBook:
    """Every non-zero ``rtm_*_total`` counter of every fleet process, scraped from its ``/metrics``
    every :data:`COUNTER_SCRAPE_S` (a killed process keeps its last scrape), summed per service."""

    def __init__(self, fleet: FleetRun, http: aiohttp.ClientSession) -> None:
        self.fleet = fleet
        self.http = http
        self.last: dict[tuple[str, int], dict[str, float]] = {}

    async def scrape(self) -> None:
        for p in fleet_processes(self.fleet):
            if p["service"] == "consul-dev":
                continue
            url = f"http://{p['host']}:{p.get('metrics_port') or p['port']}/metrics"
            try:
                async with self.http.get(url) as resp:
                    text = await resp.text()
            except (aiohttp.ClientError, TimeoutError):
                continue
            values = {}
            for line in text.splitlines():
                if line.startswith("rtm_") and "_total" in line.split(" ", 1)[0]:
                    name, _, value = line.rpartition(" ")
                    try:
                        if float(value):
                            values[name] = float(value)
                    except ValueError:
                        continue
            self.last[(p["service"], int(p["pid"]))] = values

    async def loop(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            await self.scrape()
            try:
                await asyncio.wait_for(stop.wait(), COUNTER_SCRAPE_S)
            except TimeoutError:
                pass

    def by_service(self) -> dict[str, dict[str, float]]:
        out: dict[str, Counter[str]] = {}
        for (service, _), values in self.last.items():
            out.setdefault(service, Counter()).update(values)
        return {s: dict(sorted(c.items())) for s, c in sorted(out.items())}


# -- the run ---------------------------------------------------------------------------------------------


def read_events(data_dir: Path) -> list[DbEvent]:
    """Every row of the webapp's ``events`` table (read-only)."""
    conn = sqlite3.connect(f"file:{data_dir / 'webapp.db'}?mode=ro", uri=True, timeout=30)
    try:
        rows = conn.execute("SELECT channel, seq, json, created_at FROM events").fetchall()
    finally:
        conn.close()
    return [DbEvent(ch, int(seq), int(round(float(created) * 1e6)), text) for ch, seq, text, created in rows]


async def run(args: argparse.Namespace) -> dict[str, Any]:
    raise_nofile(65536)
    rng = random.Random(args.seed)
    out: dict[str, Any] = {
        "machine": machine_info(),
        "args": {k: v for k, v in vars(args).items() if k != "json"},
        "seed": args.seed,
    }
    print(f"soak: starting the fleet ({args.clients} users) ...", flush=True)
    fleet_run = FleetRun(
        "--seed-users", str(args.clients), "--debug-faults", *(["--verbose"] if args.fleet_log else [])
    )
    if args.fleet_log:
        fleet_run.echo = open(args.fleet_log, "w")  # noqa: SIM115 - lives as long as the fleet
    with fleet_run as fleet:
        out["fleet_startup_s"] = round(fleet.startup_s, 1)
        timeout = aiohttp.ClientTimeout(total=HTTP_TIMEOUT_S)
        async with aiohttp.ClientSession(
            timeout=timeout, connector=aiohttp.TCPConnector(limit=MAX_OPS_IN_FLIGHT * 2)
        ) as http:
            clients = [LoadClient(i, records="sessions") for i in range(args.client_procs)]
            try:
                for c in clients:
                    await c.start()
                await soak(args, fleet, http, clients, rng, out)
            finally:
                await asyncio.gather(*(c.stop() for c in clients), return_exceptions=True)
    return out


async def soak(
    args: argparse.Namespace,
    fleet: FleetRun,
    http: aiohttp.ClientSession,
    clients: list[LoadClient],
    rng: random.Random,
    out: dict[str, Any],
) -> None:
    traffic = Traffic(args, fleet, http, rng)
    traffic.clients = list(clients)
    out["setup"] = await traffic.setup()
    print(f"soak: setup {out['setup']}", flush=True)
    n = len(traffic.users)
    traffic.client_of = [i % len(clients) for i in range(n)]
    t = time.monotonic()
    replies = await asyncio.gather(
        *(
            c.call(
                "connect",
                api_url=fleet.api_url,
                proc=c.index,
                reconnect="always",
                indices=[i for i in range(n) if traffic.client_of[i] == c.index],
                tokens=[traffic.users[i]["token"] for i in range(n) if traffic.client_of[i] == c.index],
                regions=[REGIONS[i % len(REGIONS)] for i in range(n) if traffic.client_of[i] == c.index],
                concurrency=50,
                timeout_s=30.0,
            )
            for c in clients
        )
    )
    connected = sum(r["connected"] for r in replies)
    out["connect"] = {
        "connected": connected,
        "failed": sum(r["failed"] for r in replies),
        "errors": [r["errors"] for r in replies],
        "elapsed_s": round(time.monotonic() - t, 1),
    }
    print(f"soak: {out['connect']}", flush=True)
    if connected < n:
        raise RuntimeError(f"only {connected} of {n} clients connected: {out['connect']}")

    cpu = CpuBook(fleet, {**{f"soak client {c.index}": c.pid for c in clients}, "soak (driver)": os.getpid()})
    cpu.sample()
    history = HistoryReader(traffic)
    stop, stop_chaos, stop_cpu = asyncio.Event(), asyncio.Event(), asyncio.Event()
    t0 = time.monotonic()
    traffic_start_us = now_us()
    chaos = Chaos(args, fleet, http, t0)
    reconnects: Counter[str] = Counter()
    tasks = [
        asyncio.ensure_future(traffic_loop(traffic, args.rate, stop)),
        asyncio.ensure_future(reconnect_loop(traffic, args.reconnect_rate, stop, reconnects)),
    ]
    chaos_task = asyncio.ensure_future(chaos.run(stop_chaos))
    cpu_task = asyncio.ensure_future(cpu.loop(stop_cpu))
    counters = CounterBook(fleet, http)
    counters_task = asyncio.ensure_future(counters.loop(stop_cpu))
    progress: list[dict[str, Any]] = []
    duration_s = args.minutes * 60
    try:
        while time.monotonic() - t0 < duration_s or (
            len(chaos.log) < args.min_faults and time.monotonic() - t0 < duration_s + MAX_EXTENSION_S
        ):
            await asyncio.sleep(STAT_POLL_S)
            stats = [await c.call("stat") for c in clients]
            for s in stats:
                history.add(s["fresh"])
            row = {
                "t_s": round(time.monotonic() - t0, 1),
                "open": sum(s["open"] for s in stats),
                "reconnecting": sum(s["reconnecting"] for s in stats),
                "frames": sum(s["frames"] for s in stats),
                "faults": len(chaos.log),
            }
            progress.append(row)
            if len(progress) % 15 == 1:
                print(f"soak: {row} history queue {history.queue.qsize()}", flush=True)
    finally:
        stop.set()
        stop_chaos.set()
        await asyncio.gather(*tasks, return_exceptions=True)
        await traffic.settle()
        await chaos_task  # a fault in progress finishes (a partition heals, a drain is undone)
    traffic_end_us = now_us()
    print("soak: traffic and chaos stopped; waiting for the fleet to heal and deliveries to settle", flush=True)
    out["final_recovery_s"] = round(await chaos.recovered(), 1)
    settle = await settle_clients(clients, history, args.settle_s)
    out["settle"] = settle
    await history.drain(max(30.0, args.settle_s))
    stop_cpu.set()
    await cpu_task
    await counters_task
    await counters.scrape()
    cpu.sample()

    tmp = fleet.data_dir / "soak"
    tmp.mkdir(exist_ok=True)
    sessions: list[Session] = []
    frames = []
    types: Counter[str] = Counter()
    client_errors: Counter[str] = Counter()
    gws: Counter[str] = Counter()
    for c in clients:
        path = tmp / f"frames-{c.index}.npy"
        reply = await c.call("dump", path=str(path))
        frames.append(np.load(path))
        types.update(reply["types"])
        client_errors.update(reply["errors"])
        for sid, client, t_ws, t_hello, t_close, code, start, gw in reply["sessions"]:
            sessions.append(Session(sid, client, t_ws, t_hello, t_close, code, start))
            gws[gw] += 1
    events = await asyncio.to_thread(read_events, fleet.data_dir)
    allf = np.concatenate(frames) if frames else np.zeros((0, 2), np.int64)
    team = str(fleet.seed["team"]["id"])
    client_users = {i: (u["id"], team) for i, u in enumerate(traffic.users)}
    initial = {i: set(traffic.big) for i in range(n)}
    print(f"soak: checking {len(sessions)} connections, {len(allf):,} frames, {len(events):,} events", flush=True)
    t_check = time.monotonic()
    inputs = (events, sessions, [(int(a), int(b)) for a, b in allf], client_users, initial, history.reads)
    if args.raw:
        Path(args.raw).write_bytes(pickle.dumps(inputs))
    verdict = await asyncio.to_thread(check, *inputs)
    out["check_s"] = round(time.monotonic() - t_check, 1)
    out["verdict"] = verdict.as_dict()
    soak_events = [e for e in events if traffic_start_us <= e.created_us <= traffic_end_us]
    out["minutes"] = round((traffic_end_us - traffic_start_us) / 6e7, 2)
    out["events_by_kind"] = dict(Counter(event_kind(e.json) for e in soak_events).most_common())
    out["events_total"] = len(soak_events)
    out["events_timeline"] = events_per_second(soak_events, traffic_start_us)
    out["ops"] = {k: dict(v) for k, v in traffic.ops.items()}
    out["reconnects_client_initiated"] = dict(reconnects)
    out["frames_by_type"] = dict(types.most_common())
    out["client_errors"] = dict(client_errors.most_common(30))
    out["sessions_by_start"] = dict(Counter(s.start for s in sessions))
    out["sessions_by_gateway"] = dict(gws)
    out["history_reads"] = dict(history.counts)
    out["faults"] = chaos.log
    out["faults_by_kind"] = dict(Counter(f["kind"] for f in chaos.log if f["ok"]))
    out["faults_failed"] = [f for f in chaos.log if not f["ok"]]
    out["cpu_s_by_process"] = cpu.by_label()
    out["fleet_counters"] = counters.by_service()
    out["progress"] = progress


async def settle_clients(clients: list[LoadClient], history: HistoryReader, max_s: float) -> dict[str, Any]:
    """Wait (bounded) until no client is reconnecting and nothing was received for :data:`SETTLE_IDLE_S`."""
    started = time.monotonic()
    last_frames, last_change = -1, time.monotonic()
    stats: list[dict[str, Any]] = []
    while time.monotonic() - started < max_s:
        stats = [await c.call("stat") for c in clients]
        for s in stats:
            history.add(s["fresh"])
        frames = sum(s["frames"] for s in stats)
        if frames != last_frames:
            last_frames, last_change = frames, time.monotonic()
        busy = sum(s["reconnecting"] for s in stats)
        if not busy and time.monotonic() - last_change >= SETTLE_IDLE_S:
            break
        await asyncio.sleep(STAT_POLL_S)
    return {
        "waited_s": round(time.monotonic() - started, 1),
        "open": sum(s["open"] for s in stats),
        "reconnecting": sum(s["reconnecting"] for s in stats),
        "gave_up": sum(s["gave_up"] for s in stats),
    }


def events_per_second(events: list[DbEvent], t0_us: int) -> list[int]:
    if not events:
        return []
    secs = np.array([(e.created_us - t0_us) // 1_000_000 for e in events], dtype=np.int64)
    secs = secs[secs >= 0]
    return np.bincount(secs).tolist() if len(secs) else []


# -- output ----------------------------------------------------------------------------------------------


def render(r: dict[str, Any]) -> str:
    v = r["verdict"]
    m = r["machine"]
    a = r["args"]
    faults = ", ".join(f"{k} {n}" for k, n in sorted(r["faults_by_kind"].items())) or "none"
    head = md_table(
        [
            "minutes",
            "clients",
            "events",
            "faults injected",
            "connections checked",
            "frames checked",
            "lost",
            "duplicated",
            "reordered",
            "lost from history",
        ],
        [
            [
                r["minutes"],
                f"{a['clients']:,}",
                f"{r['events_total']:,}",
                f"{sum(r['faults_by_kind'].values())} ({faults})",
                f"{v['connections']:,} ({v['clients']:,} clients, {v['segments']:,} segments)",
                f"{v['frames_checked']:,}",
                v["lost"],
                v["duplicated"],
                v["reordered"],
                v["lost_from_history"],
            ]
        ],
    )
    kinds = md_table(
        ["event kind (persisted during the soak)", "count"], [[k, f"{n:,}"] for k, n in r["events_by_kind"].items()]
    )
    ops = md_table(
        ["operation", "outcomes"],
        [
            [k, ", ".join(f"{o} {n:,}" for o, n in sorted(c.items(), key=lambda x: -x[1]))]
            for k, c in r["ops"].items()
            if c
        ]
        + [["client-initiated reconnect", ", ".join(f"{o} {n}" for o, n in r["reconnects_client_initiated"].items())]],
    )
    reasons = md_table(
        ["(client, event) pairs by reason", "count", "meaning"],
        [[k, f"{n:,}", REASONS.get(k, "")] for k, n in sorted(v["pairs_by_reason"].items(), key=lambda x: -x[1])],
    )
    fault_rows = [
        [
            i + 1,
            f["at_s"],
            f["kind"],
            f.get("target", ""),
            "yes" if f["ok"] else f"no: {f.get('error', '')[:60]}",
            f["recovery_s"],
        ]
        for i, f in enumerate(r["faults"])
    ]
    faults_t = md_table(["#", "at s", "fault", "target", "injected", "fleet whole again after s"], fault_rows)
    cpu = md_table(["process (all incarnations)", "CPU s"], [[k, fmt(x, 1)] for k, x in r["cpu_s_by_process"].items()])
    other = [
        f"- verdict: **{'PASS' if v['ok'] else 'FAIL'}**; unmatched frames {v['unmatched_frames']}, delivered to a non-member "
        f"{v['delivered_to_non_member']}, received before their bootstrap {v['received_before_bootstrap']}",
        f"- history after fresh reconnects: {v['history']}; reads {r['history_reads']}",
        f"- tail at close (age at close, s): {v['tail_age_s']}",
        f"- connections by start: {r['sessions_by_start']}",
        f"- fleet counters of note (sum over each process's incarnations): {notable_counters(r.get('fleet_counters', {}))}",
        f"- settle: {r['settle']}; final recovery {r['final_recovery_s']} s; check took {r['check_s']} s",
        f"- machine: {m['nproc']} cores {m['cpu_model']}, Python {m['python']}; commit {m['rtm_commit']}"
        f"{' + uncommitted ' + ', '.join(m['rtm_uncommitted_files']) if m['rtm_uncommitted_files'] else ''}; {m['date']}; seed {r['seed']}",
    ]
    if v["examples"]:
        other.append(f"- failure examples: `{json.dumps(v['examples'])[:3000]}`")
    return "\n\n".join([head, kinds, ops, faults_t, reasons, cpu, "\n".join(other)])


NOTABLE_COUNTERS = (
    "resume_failures",
    "goodbye_missed",
    "resumes_total",
    "rtm_errors_total",
    "gap",
    "deadletter",
    "history_fetch",
    "dropped",
    "slow",
)


def notable_counters(by_service: dict[str, dict[str, float]]) -> dict[str, float]:
    """The counters a reader of a soak wants first: failures, errors, gaps."""
    return {
        f"{service} {name}": value
        for service, values in by_service.items()
        for name, value in values.items()
        if any(word in name for word in NOTABLE_COUNTERS)
    }


def plot(r: dict[str, Any], name: str) -> None:
    try:
        from bench.harness import plt, save_figure
    except ImportError:  # pragma: no cover
        return
    try:
        pyplot = plt()
    except ImportError:
        return
    fig, ax = pyplot.subplots(figsize=(10, 4))
    ax.plot(r["events_timeline"], lw=0.8, color="tab:blue", label="events persisted /s")
    colors = pyplot.get_cmap("tab10")
    for f in r["faults"]:
        k = FAULT_KINDS.index(f["kind"]) + 1 if f["kind"] in FAULT_KINDS else 0
        ax.axvline(f["at_s"], color=colors(k), lw=1, alpha=0.8)
    for k, kind in enumerate(FAULT_KINDS):
        ax.plot([], [], color=colors(k + 1), label=kind)
    ax.set_xlabel("s since traffic started")
    ax.set_ylabel("events/s")
    ax.set_title(f"chaos soak: {r['args']['clients']} clients, lines = faults")
    ax.legend(fontsize=7, loc="upper right", ncol=2)
    save_figure(fig, name)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.recheck:
        verdict = check(*pickle.loads(Path(args.recheck).read_bytes()))
        print(json.dumps(verdict.as_dict(), indent=2))
        return 0 if verdict.ok else 1
    install_uvloop()
    started = time.monotonic()
    load0 = os.getloadavg()[0]
    result = asyncio.run(run(args))
    result["elapsed_s"] = time.monotonic() - started
    result["loadavg_1m"] = {"start": load0, "end": os.getloadavg()[0]}
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2, default=str) + "\n")
        print(render(result))
    else:
        publish(NAME + ("-short" if args.short else ""), result, render, plot)
    return 0 if result["verdict"]["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
