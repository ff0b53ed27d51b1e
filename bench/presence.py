"""Presence: how fast a change reaches watchers, how much one presence server takes,
and whether a reconnect storm stalls message delivery.

Starts the whole fleet (``rtm up``: 2 gateways, 2 presence servers and a spare, ...)
with enough seeded users, then three parts:

1. **Propagation latency** (through the whole fleet). ``--watchers`` websocket
   clients (half on each gateway) ``presence_sub`` to ``--subjects`` users. Each
   subject in turn connects (t0 = its ``hello``: the gateway reports it online
   right after writing hello), closes (t0 = the close), and sets itself away and
   back through ``users.setPresence`` (t0 = the HTTP call). Latency = receipt of
   the matching ``presence_change`` at each watcher - t0, all clocks in this
   process.
2. **Presence-server throughput** (each PS driven directly over msgpack, like a
   gateway). A fake watcher gateway subscribes to ``--ps-users`` synthetic users;
   a fake reporter gateway then writes ``online`` and ``offline`` batches (1,000
   users each, pre-encoded) for all of them, ``--ps-cycles`` times, as fast as
   the socket takes them, to both PSs at once; a ``lease`` request after the last
   batch marks the end (replies follow every earlier frame). Updates per second =
   updates sent to that PS / elapsed; changes out = presence entries the watcher
   received.
3. **Reconnect storm**. ``--observers`` clients (load-client processes) sit in a
   channel of their own while one of them posts to it at ``--post-rate`` a second
   (the latency of each message is measured at every observer). ``--storm``
   clients, each a distinct user, connect at once, each sending a
   ``presence_sub`` of ``--storm-subs`` random users right after hello; then all
   of them disconnect and reconnect at once (the reconnect storm). Message latency
   is reported before, during and after each storm.

    python -m bench.presence            # 5,000-client storm
    python -m bench.presence --quick    # 500-client storm, fewer rounds

Why one module over 500 lines: one benchmark of three measured phases (propagation, a presence
server's throughput, connect storms) that share the fleet, the observers and the report; its clients
are bench.load_client's.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import websockets

from bench.harness import (
    FleetRun,
    LoadClients,
    ProcWatch,
    diff,
    fmt,
    install_uvloop,
    machine_info,
    md_table,
    plt,
    raise_nofile,
    save_figure,
    save_json,
    save_text,
)
from bench.stats import pct

NAME = "presence"
WAIT_S = 10.0  # any single expected event; a miss is counted, not waited for forever
# t0 of "online" is the subject's hello; a watcher may be woken by the change in
# the same loop turn of this process as the subject by its hello, so a change seen
# up to this long before t0 counts (as 0 ms). The previous change of that user is
# seconds older.
EARLY_S = 0.05
PS_BATCH = 1000
REGIONS = ("us-east", "eu-west")  # rtm up's default regions: one gateway each
CONTROL = "reconnect storm, no presence_sub"  # the same storm without subscriptions, for comparison
PHASES = ("connect storm", "reconnect storm", CONTROL)
WINDOW_SETTLE_S = 2.0  # after a storm's last hello, still "during the storm" (its presence pushes)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m bench.presence", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--watchers", type=int, default=40, help="clients watching the subjects (part 1)")
    p.add_argument("--subjects", type=int, default=20, help="users whose presence changes (part 1)")
    p.add_argument("--rounds", type=int, default=5, help="times each subject goes online/offline/away (part 1)")
    p.add_argument("--ps-users", type=int, default=50_000, help="synthetic users across both PSs (part 2)")
    p.add_argument("--ps-cycles", type=int, default=4, help="online+offline cycles per user (part 2)")
    p.add_argument("--storm", type=int, default=5000, help="clients in the reconnect storm (part 3)")
    p.add_argument("--storm-subs", type=int, default=100, help="users each storm client subscribes to")
    p.add_argument("--observers", type=int, default=20, help="clients measuring message latency (part 3)")
    p.add_argument("--post-rate", type=float, default=20.0, help="messages per second to the observers")
    p.add_argument("--client-procs", type=int, default=4, help="load-client processes for the storm")
    p.add_argument("--concurrency", type=int, default=64, help="connects in flight across the storm clients")
    p.add_argument("--quick", action="store_true", help="smoke run")
    p.add_argument("--out", default=NAME, help="results name under bench/results/")
    args = p.parse_args(argv)
    if args.quick:
        args.watchers, args.subjects, args.rounds = 10, 5, 2
        args.ps_users, args.ps_cycles = 10_000, 2
        args.storm, args.client_procs = 500, 2
        if args.out == NAME:
            args.out = NAME + "-quick"
    return args


def http_text(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as resp:
        return str(resp.read().decode())


def scrape(port: int, names: tuple[str, ...]) -> dict[str, float]:
    """Sum of each named sample (over labels) on a process's /metrics."""
    from prometheus_client.parser import text_string_to_metric_families

    out = {n: 0.0 for n in names}
    for family in text_string_to_metric_families(http_text(f"http://127.0.0.1:{port}/metrics")):
        for sample in family.samples:
            if sample.name in out:
                out[sample.name] += float(sample.value)
    return out


class Api:
    def __init__(self, url: str) -> None:
        self.url = url
        self.http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30))

    async def __call__(self, method: str, token: str, **fields: Any) -> dict[str, Any]:
        async with self.http.post(self.url + method, data=fields, headers={"Authorization": f"Bearer {token}"}) as resp:
            return dict(await resp.json(content_type=None))

    async def close(self) -> None:
        await self.http.close()


# -- part 1: propagation latency ------------------------------------------------------------------


class Watcher:
    """A websocket client that timestamps every presence_change it gets."""

    def __init__(self) -> None:
        self.ws: Any = None
        self.got: list[tuple[str, str, float]] = []  # (user, presence, monotonic time)
        self.changed = asyncio.Event()
        self.task: asyncio.Task[None] | None = None

    async def open(self, api: Api, token: str, region: str) -> None:
        reply = await api("rtm.connect", token, region=region)
        self.ws = await websockets.connect(reply["url"], max_size=None)
        assert json.loads(await self.ws.recv()) == {"type": "hello"}
        self.task = asyncio.create_task(self.read())

    async def read(self) -> None:
        try:
            async for raw in self.ws:
                now = time.monotonic()
                e = json.loads(raw)
                if e.get("type") != "presence_change":
                    continue
                for user in e.get("users") or [e.get("user")]:
                    self.got.append((str(user), str(e["presence"]), now))
                self.changed.set()
        except websockets.ConnectionClosed:
            pass

    def first_after(self, user: str, presence: str, t0: float) -> float | None:
        for u, p, t in self.got:
            if u == user and p == presence and t >= t0:
                return t
        return None

    async def close(self) -> None:
        await self.ws.close()
        if self.task is not None:
            await asyncio.gather(self.task, return_exceptions=True)


async def wait_all(watchers: list[Watcher], user: str, presence: str, t0: float, early_s: float = 0.0) -> list[float]:
    """Latencies (ms) of every watcher's first ``presence`` for ``user`` after t0
    (from ``early_s`` before it, counted as 0: see EARLY_S)."""
    deadline = time.monotonic() + WAIT_S
    while True:
        times = [w.first_after(user, presence, t0 - early_s) for w in watchers]
        if all(t is not None for t in times) or time.monotonic() > deadline:
            return [max(0.0, t - t0) * 1e3 for t in times if t is not None]
        await asyncio.sleep(0.002)


async def propagation(
    args: argparse.Namespace, api: Api, watcher_users: list[dict[str, Any]], subjects: list[dict[str, Any]]
) -> dict[str, Any]:
    regions = REGIONS
    watchers = [Watcher() for _ in watcher_users]
    await asyncio.gather(
        *(
            w.open(api, u["token"], regions[i % 2])
            for i, (w, u) in enumerate(zip(watchers, watcher_users, strict=False))
        )
    )
    ids = [s["id"] for s in subjects]
    for w in watchers:
        await w.ws.send(json.dumps({"type": "presence_sub", "ids": ids}))
    t_sub = time.monotonic() - 60
    for s in ids:
        await wait_all(watchers, s, "away", t_sub)
    lat: dict[str, list[float]] = {"online": [], "offline": [], "manual away": []}
    expected = 0
    for _ in range(args.rounds):
        for i, subject in enumerate(subjects):
            expected += len(watchers)
            # online: the gateway reports it right after writing hello
            reply = await api("rtm.connect", subject["token"], region=regions[(i + 1) % 2])
            ws = await websockets.connect(reply["url"], max_size=None)
            assert json.loads(await ws.recv()) == {"type": "hello"}
            t0 = time.monotonic()
            lat["online"] += await wait_all(watchers, subject["id"], "active", t0, EARLY_S)
            # manual away (users.setPresence), then back
            t0 = time.monotonic()
            await api("users.setPresence", subject["token"], presence="away")
            lat["manual away"] += await wait_all(watchers, subject["id"], "away", t0)
            t0 = time.monotonic()
            await api("users.setPresence", subject["token"], presence="auto")
            await wait_all(watchers, subject["id"], "active", t0)
            # offline: the last connection closes
            t0 = time.monotonic()
            await ws.close()
            lat["offline"] += await wait_all(watchers, subject["id"], "away", t0)
    await asyncio.gather(*(w.close() for w in watchers))
    rows = []
    for kind, values in lat.items():
        rows.append(
            {
                "kind": kind,
                "samples": len(values),
                "missed": expected - len(values),
                "p50_ms": pct(values, 50),
                "p99_ms": pct(values, 99),
                "max_ms": max(values) if values else None,
            }
        )
    return {
        "watchers": len(watchers),
        "subjects": len(subjects),
        "rounds": args.rounds,
        "rows": rows,
        "samples_ms": {k: v for k, v in lat.items()},
    }


# -- part 2: one presence server's throughput -------------------------------------------------------------


async def ps_throughput(args: argparse.Namespace, fleet: FleetRun) -> dict[str, Any]:
    from rtmctl.operator import fleet_client
    from services import wire
    from services.connection import PeerConnection, connect
    from services.ring import PRESENCE_RING_KEY, HashRing, RingDocument

    _, raw = fleet_client(fleet.data_dir).kv.get(PRESENCE_RING_KEY)
    ring = HashRing(RingDocument.from_json(raw["Value"]))
    procs = {p["id"]: p for p in fleet.processes("presence")}
    users = [f"UBENCH{i:08X}" for i in range(args.ps_users)]
    bench_team = "TBENCH0001"  # one team for every bench user
    by_owner: dict[str, list[str]] = {}
    for u in users:
        by_owner.setdefault(str(ring.owner_for(u)), []).append(u)

    async def one(owner: str, mine: list[str]) -> dict[str, Any]:
        proc = procs[owner]
        received = {"n": 0}
        final: dict[str, str] = {}
        done = asyncio.Event()
        goal = {"n": -1}

        def on_push(conn: PeerConnection, msg: dict[str, Any]) -> None:
            if msg["op"] == "presence":
                received["n"] += len(msg["changes"])
                for u, p in msg["changes"]:
                    final[u] = p
                if goal["n"] >= 0 and sum(1 for p in final.values() if p == "away") >= goal["n"]:
                    done.set()

        gw_w, gw_r = f"bench-watch-{owner}", f"bench-report-{owner}"
        watch = await connect(
            proc["host"],
            proc["port"],
            lambda: PeerConnection(name="bench-watch", on_push=on_push),
            trust=fleet.trust("gateway", gw_w),
        )
        report = await connect(
            proc["host"], proc["port"], lambda: PeerConnection(name="bench-report"), trust=fleet.trust("gateway", gw_r)
        )
        await watch.request({"op": "lease", "gw": gw_w, "epoch": 1})
        await report.request({"op": "lease", "gw": gw_r, "epoch": 1})
        for i in range(0, len(mine), PS_BATCH):
            watch.send({"op": "psub", "gw": gw_w, "users": mine[i : i + PS_BATCH], "epoch": 1})
        await watch.request({"op": "lease", "gw": gw_w})  # every psub is processed
        stop_renew = asyncio.Event()

        async def renew() -> None:
            while not stop_renew.is_set():
                await asyncio.sleep(1.0)
                await watch.request({"op": "lease", "gw": gw_w})
                await report.request({"op": "lease", "gw": gw_r})

        renewer = asyncio.create_task(renew())
        frames = []
        for _ in range(args.ps_cycles):
            for op in ("online", "offline"):
                for i in range(0, len(mine), PS_BATCH):
                    batch = mine[i : i + PS_BATCH]
                    frame = {"op": op, "gw": gw_r, "users": batch, "epoch": 1}
                    if op == "online":  # as a gateway reports: each user's team (docs/authz-review.md, finding 5)
                        frame["teams"] = [bench_team] * len(batch)
                    frames.append(wire.encode(frame))
        updates = args.ps_cycles * 2 * len(mine)
        await asyncio.sleep(0.5)
        received["n"] = 0
        final.clear()
        pid = int(proc["pid"])
        watch_cpu = ProcWatch({"ps": pid})
        cpu0 = watch_cpu.cpu()
        t0 = time.monotonic()
        for frame in frames:
            report.write(frame)
            if report.transport is not None and report.transport.get_write_buffer_size() > 4 * 2**20:
                await asyncio.sleep(0)  # let the socket drain; the PS is the bottleneck either way
        await report.request({"op": "lease", "gw": gw_r}, timeout_s=120)
        processed_s = time.monotonic() - t0
        goal["n"] = len(mine)
        if sum(1 for p in final.values() if p == "away") < len(mine):
            try:
                await asyncio.wait_for(done.wait(), 30)
            except TimeoutError:
                pass
        delivered_s = time.monotonic() - t0
        cpu = diff(watch_cpu.cpu(), cpu0)["ps"]
        stop_renew.set()
        renewer.cancel()
        await asyncio.gather(renewer, return_exceptions=True)
        report.send({"op": "offline", "gw": gw_r, "users": mine[:1]})
        await report.request({"op": "release", "gw": gw_r})
        await watch.request({"op": "release", "gw": gw_w})
        watch.close()
        report.close()
        return {
            "ps": owner,
            "users": len(mine),
            "updates_in": updates,
            "processed_s": processed_s,
            "updates_per_s": updates / processed_s,
            "changes_out": received["n"],
            "changes_out_per_s": received["n"] / delivered_s,
            "ps_cpu_s": cpu,
            "updates_per_cpu_s": updates / cpu if cpu > 0 else None,
        }

    rows = await asyncio.gather(*(one(o, u) for o, u in sorted(by_owner.items())))
    return {"users": args.ps_users, "cycles": args.ps_cycles, "batch": PS_BATCH, "rows": list(rows)}


# -- part 3: the reconnect storm ------------------------------------------------------------------------------


async def storm(
    args: argparse.Namespace,
    fleet: FleetRun,
    api: Api,
    observers: list[dict[str, Any]],
    storm_users: list[dict[str, Any]],
    everyone: list[str],
) -> dict[str, Any]:
    owner = observers[0]
    made = await api("conversations.create", owner["token"], name=f"presence-bench-{random.randrange(1 << 30):x}")
    channel = made["channel"]["id"]
    others = [o["id"] for o in observers[1:]]
    for i in range(0, len(others), 30):
        assert (await api("conversations.invite", owner["token"], channel=channel, users=",".join(others[i : i + 30])))[
            "ok"
        ]
    rng = random.Random(4)
    subs = [json.dumps({"type": "presence_sub", "ids": rng.sample(everyone, args.storm_subs)}) for _ in storm_users]
    addrs = [f"127.0.0.{2 + k}" for k in range(4)]
    tmp = Path(tempfile.mkdtemp(prefix="rtm-presence-bench-"))
    marks: dict[str, float] = {}
    connects: list[dict[str, Any]] = []
    pids = {
        f"{p['service']} {p['id']}": int(p["pid"])
        for p in fleet.processes()
        if p["service"] in ("gateway", "presence", "webapp", "channel-server")
    }
    watch = ProcWatch(pids)
    ps_ports = [int(p["metrics_port"]) for p in fleet.processes("presence")]
    gw_ports = [int(p["metrics_port"]) for p in fleet.processes("gateway")]
    ps_names = ("rtm_ps_updates_in_total", "rtm_ps_updates_out_total", "rtm_ps_changes_total")
    gw_names = ("rtm_gw_presence_events_out_total", "rtm_gw_presence_reports_total", "rtm_gw_presence_subscribe_total")

    def counters() -> dict[str, float]:
        out: dict[str, float] = {}
        for port in ps_ports:
            for k, v in scrape(port, ps_names).items():
                out[k] = out.get(k, 0.0) + v
        for port in gw_ports:
            for k, v in scrape(port, gw_names).items():
                out[k] = out.get(k, 0.0) + v
        return out

    async with LoadClients(1) as obs_lc:
        rep = await obs_lc.clients[0].call(
            "connect",
            api_url=fleet.api_url,
            tokens=[o["token"] for o in observers],
            concurrency=50,
            timeout_s=60.0,
            region=REGIONS[0],
        )
        assert rep["failed"] == 0, rep
        posting = asyncio.Event()
        posts: list[int] = []

        async def poster() -> None:
            loop = asyncio.get_running_loop()
            t0 = loop.time()
            n = 0
            while not posting.is_set():
                delay = t0 + n / args.post_rate - loop.time()
                if delay > 0:
                    await asyncio.sleep(delay)
                send_us = time.time_ns() // 1000
                asyncio.ensure_future(api("chat.postMessage", owner["token"], channel=channel, text=f"m{n}:{send_us}"))
                posts.append(send_us)
                n += 1

        post_task = asyncio.create_task(poster())
        marks["baseline_start"] = time.time()
        await asyncio.sleep(5.0)
        phases = []
        storm_lc = LoadClients(args.client_procs)
        await storm_lc.__aenter__()
        try:
            for phase in PHASES:
                with_subs = phase != CONTROL
                if phase != "connect storm":
                    fresh = LoadClients(args.client_procs)  # started first, so the reconnect follows at once
                    await fresh.__aenter__()
                c0, cpu0 = counters(), watch.cpu()
                start = time.time()
                if phase != "connect storm":
                    await storm_lc.stop()  # every websocket closes at once
                    storm_lc = fresh
                n = len(storm_lc.clients)
                marks[phase + " start"] = start
                replies = await storm_lc.all(
                    "connect",
                    per_client=[
                        {
                            "tokens": [u["token"] for u in storm_users[k::n]],
                            "after_hello": subs[k::n] if with_subs else [],
                            "region": REGIONS[k % 2],
                        }
                        for k in range(n)
                    ],
                    api_url=fleet.api_url,
                    local_addrs=addrs,
                    concurrency=max(1, args.concurrency // n),
                    timeout_s=60.0,
                )
                end = time.time()
                await asyncio.sleep(WINDOW_SETTLE_S)
                c1, cpu1 = counters(), watch.cpu()
                marks[phase + " end"] = end + WINDOW_SETTLE_S
                stats = await storm_lc.all("stat")
                connects.append(
                    {"phase": phase, "replies": [{k: r[k] for k in ("connected", "failed", "errors")} for r in replies]}
                )
                phases.append(
                    {
                        "phase": phase,
                        "window": (start, end + WINDOW_SETTLE_S),
                        "connect_s": end - start,
                        "connected": sum(r["connected"] for r in replies),
                        "failed": sum(r["failed"] for r in replies),
                        "presence_frames_to_storm_clients": sum(s["other"] for s in stats),
                        "counters": {k: c1[k] - c0.get(k, 0.0) for k in c1},
                        "cpu_s": {k: round(v, 2) for k, v in diff(cpu1, cpu0).items()},
                    }
                )
                await asyncio.sleep(3.0)
        finally:
            await storm_lc.stop()
        marks["after_start"] = time.time()
        await asyncio.sleep(5.0)
        posting.set()
        await post_task
        await asyncio.sleep(2.0)
        path = tmp / "observers.npy"
        await obs_lc.clients[0].call("dump", path=str(path))
        data = np.load(path)
    recv_s = data[:, 2] / 1e6 if data.size else np.array([])
    lat_ms = data[:, 3] / 1e3 if data.size else np.array([])

    def window(lo: float, hi: float) -> dict[str, Any]:
        sel = lat_ms[(recv_s >= lo) & (recv_s < hi)]
        return {
            "deliveries": int(sel.size),
            "p50_ms": pct(sel, 50),
            "p99_ms": pct(sel, 99),
            "max_ms": float(sel.max()) if sel.size else None,
        }

    windows = [{"window": "before (no storm)", **window(marks["baseline_start"], marks["connect storm start"])}]
    for ph in phases:
        windows.append({"window": f"during the {ph['phase']}", **window(*ph["window"])})
    windows.append({"window": "after", **window(marks["after_start"], marks["after_start"] + 5.0)})
    expected = len(posts) * len(observers)
    return {
        "storm_clients": args.storm,
        "subs_per_client": args.storm_subs,
        "observers": len(observers),
        "post_rate": args.post_rate,
        "posts": len(posts),
        "deliveries": int(lat_ms.size),
        "expected_deliveries": expected,
        "phases": phases,
        "windows": windows,
        "connects": connects,
        "series": {
            "recv_s": (recv_s - marks["baseline_start"]).round(3).tolist(),
            "lat_ms": lat_ms.round(2).tolist(),
            "marks": {k: v - marks["baseline_start"] for k, v in marks.items()},
        },
    }


# -- the run -----------------------------------------------------------------------------------------------------


async def run(args: argparse.Namespace) -> dict[str, Any]:
    raise_nofile(65536)
    seeded = args.watchers + args.subjects + args.observers + args.storm + 10
    result: dict[str, Any] = {
        "machine": machine_info(),
        "config": dict(vars(args)),
        "loadavg_at_start": os.getloadavg(),
    }
    print(f"presence: starting the fleet with {seeded} seeded users ...", flush=True)
    with FleetRun("--seed-users", str(seeded)) as fleet:
        result["fleet_startup_s"] = fleet.startup_s
        users = [u for u in fleet.seed["users"] if not u["is_bot"]]
        w, s, o = args.watchers, args.subjects, args.observers
        watcher_users, subjects, observers = users[:w], users[w : w + s], users[w + s : w + s + o]
        storm_users = users[w + s + o : w + s + o + args.storm]
        api = Api(fleet.api_url)
        try:
            print("presence: part 1, propagation latency ...", flush=True)
            result["propagation"] = await propagation(args, api, watcher_users, subjects)
            for row in result["propagation"]["rows"]:
                print(
                    f"  {row['kind']:<12} p50 {fmt(row['p50_ms'], 2)} ms  p99 {fmt(row['p99_ms'], 2)} ms  ({row['samples']} samples)"
                )
            print("presence: part 2, presence-server throughput ...", flush=True)
            result["throughput"] = await ps_throughput(args, fleet)
            for row in result["throughput"]["rows"]:
                print(
                    f"  {row['ps']}: {fmt(row['updates_per_s'], 0)} updates/s in, {fmt(row['changes_out_per_s'], 0)} changes/s out"
                )
            print(f"presence: part 3, reconnect storm of {args.storm} clients ...", flush=True)
            everyone = [u["id"] for u in users]
            result["storm"] = await storm(args, fleet, api, observers, storm_users, everyone)
            for row in result["storm"]["windows"]:
                print(
                    f"  {row['window']:<28} p50 {fmt(row['p50_ms'], 1)} ms  p99 {fmt(row['p99_ms'], 1)} ms  max {fmt(row['max_ms'], 1)} ms"
                )
        finally:
            await api.close()
    return result


def render(result: dict[str, Any]) -> str:
    m, cfg = result["machine"], result["config"]
    prop, thr, st = result["propagation"], result["throughput"], result["storm"]
    out = [
        f"# Presence benchmark\n\n{m['nproc']} cores ({m['cpu_model']}), {m['ram_gib']} GiB, Python {m['python']}, "
        f"uvloop {m['uvloop']}, {m['date']}. Fleet: `rtm up` defaults (2 gateways, 2 presence servers + spare, "
        f"3 channel servers + spare, 2 admin servers, webapp, 2 CHARMs), all on this machine "
        f"(load average {result['loadavg_at_start'][0]:.1f} when the run began).\n"
    ]
    out.append(
        f"## Propagation latency\n\n{prop['watchers']} watchers (half on each gateway) subscribed to "
        f"{prop['subjects']} users; each user went online, away (users.setPresence) and offline "
        f"{prop['rounds']} times. Latency from the trigger to each watcher's `presence_change`.\n"
    )
    out.append(
        md_table(
            ["change", "samples", "p50 ms", "p99 ms", "max ms", "missed"],
            [
                [r["kind"], r["samples"], fmt(r["p50_ms"], 2), fmt(r["p99_ms"], 2), fmt(r["max_ms"], 2), r["missed"]]
                for r in prop["rows"]
            ],
        )
    )
    out.append(
        f"\n\n## Presence-server throughput\n\n{thr['users']:,} synthetic users over both PSs, "
        f"{thr['cycles']} online+offline cycles each, batches of {thr['batch']}, both PSs driven at once "
        f"(one watcher gateway subscribed to every user). A PS pushes to a gateway at most every 5 ms and "
        f"folds a user's changes within that into the latest, so the watcher gets fewer entries than updates.\n"
    )
    out.append(
        md_table(
            ["PS", "users", "updates in", "updates/s in", "entries pushed", "PS CPU s", "updates per CPU-s"],
            [
                [
                    r["ps"],
                    f"{r['users']:,}",
                    f"{r['updates_in']:,}",
                    fmt(r["updates_per_s"], 0),
                    f"{r['changes_out']:,}",
                    fmt(r["ps_cpu_s"], 2),
                    fmt(r["updates_per_cpu_s"], 0),
                ]
                for r in thr["rows"]
            ],
        )
    )
    out.append(
        f"\n\n## Message latency during a reconnect storm\n\n{st['storm_clients']:,} clients (distinct users), "
        f"each sending `presence_sub` for {st['subs_per_client']} random users right after hello, connect at once, "
        f"then all disconnect and reconnect at once, half on each gateway ({cfg['client_procs']} load-client processes, "
        f"{cfg['concurrency']} connects in flight). Meanwhile {st['observers']} observers in their own channel "
        f"(on the us-east gateway) receive {st['post_rate']:g} posts/s; latency from post to receipt; the last "
        f"storm repeats the reconnect without any `presence_sub`, for comparison. Delivered "
        f"{st['deliveries']:,} of {st['expected_deliveries']:,} expected.\n"
    )
    out.append(
        md_table(
            ["window", "deliveries", "p50 ms", "p99 ms", "max ms"],
            [
                [w["window"], f"{w['deliveries']:,}", fmt(w["p50_ms"], 1), fmt(w["p99_ms"], 1), fmt(w["max_ms"], 1)]
                for w in st["windows"]
            ],
        )
    )
    out.append("\n")
    rows = []
    for ph in st["phases"]:
        c = ph["counters"]
        rows.append(
            [
                ph["phase"],
                f"{ph['connected']:,}",
                ph["failed"],
                fmt(ph["connect_s"], 1),
                f"{int(c.get('rtm_gw_presence_reports_total', 0)):,}",
                f"{int(c.get('rtm_ps_updates_in_total', 0)):,}",
                f"{int(c.get('rtm_ps_updates_out_total', 0)):,}",
                f"{int(c.get('rtm_gw_presence_events_out_total', 0)):,}",
            ]
        )
    out.append(
        md_table(
            [
                "storm",
                "connected",
                "failed",
                "seconds",
                "reports (gw)",
                "updates in (PS)",
                "entries pushed (PS)",
                "presence_change to clients",
            ],
            rows,
        )
    )
    busiest = []
    for ph in st["phases"]:
        top = sorted(ph["cpu_s"].items(), key=lambda kv: -kv[1])[:4]
        busiest.append(f"{ph['phase']}: " + ", ".join(f"{k} {v:.1f}" for k, v in top))
    out.append("\n\nCPU-seconds of the busiest processes per storm window: " + "; ".join(busiest) + ".\n")
    return "\n".join(out)


def plot(result: dict[str, Any], name: str) -> None:
    pyplot = plt()
    fig, (ax1, ax2) = pyplot.subplots(1, 2, figsize=(13, 4.5))
    samples = result["propagation"]["samples_ms"]
    for kind, values in samples.items():
        if values:
            xs = np.sort(np.asarray(values))
            ax1.plot(xs, np.linspace(0, 1, xs.size), label=kind)
    ax1.set_xscale("log")
    ax1.set_xlabel("presence_change latency, ms")
    ax1.set_ylabel("fraction of deliveries")
    ax1.set_title("Propagation (CDF)")
    ax1.legend()
    series = result["storm"]["series"]
    ax2.scatter(series["recv_s"], series["lat_ms"], s=2)
    colors = {"connect storm": "tab:orange", "reconnect storm": "tab:red", CONTROL: "tab:gray"}
    for phase, color in colors.items():
        start, end = series["marks"].get(phase + " start"), series["marks"].get(phase + " end")
        if start is not None and end is not None:
            ax2.axvspan(start, end, color=color, alpha=0.15, label=phase)
    ax2.legend(loc="upper left")
    ax2.set_yscale("log")
    ax2.set_xlabel("seconds")
    ax2.set_ylabel("message latency, ms")
    ax2.set_title(f"Messages during a {result['storm']['storm_clients']:,}-client reconnect storm")
    save_figure(fig, name)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    install_uvloop()
    result = asyncio.run(run(args))
    save_json(args.out, {k: v for k, v in result.items()})
    text = render(result)
    save_text(f"{args.out}.md", text)
    plot(result, args.out)
    print("\n" + text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
