"""Top of the hour: a spike of due items through the fleet, beside live traffic.

Starts a fleet with ``rtm up``, seeds C users (default 2,000), makes C/2 channels
(default 1,000) of two members each through the Web API, and connects one websocket
per user from load-client processes (:mod:`bench.load_client`). Then, through the
Web API with many requests in flight, it schedules S messages (``chat.scheduleMessage``,
default 10,000, spread over the channels, each by one of the channel's members) and
R reminders (``reminders.add``, default 10,000, spread over the users), all due at one
instant D. From D - ``--before-s`` a poster sends live ``chat.postMessage`` posts at
``--bg-rate`` per second (default 50) round-robin over the channels, and keeps on until
``--after-s`` after the last spike delivery.

Every text is ``m<id>:<µs>``: the send time for a live post, D for a spike item (a
reminder arrives as Slackbot's ``Reminder: m<id>:<µs>.``), so the load clients record
each delivery's delay without parsing JSON.

Reported: time from D to the last spike delivery; spike delivery delay from D (p50, p99,
max); live posts' end-to-end p99 before, during and after the spike; CPU-seconds per
process during the spike; lost and duplicated deliveries (spike: both members of the
channel for a scheduled message, the user for a reminder; live: both members); and a plot
of deliveries per second around D. Goals: live p99 during the spike under 50 ms, every
spike item delivered within 10 s of D, none lost or duplicated.

    python -m bench.spike            # the issue's run: 2,000 clients, 20,000 due items
    python -m bench.spike --quick    # smoke: 200 clients, 2,000 due items

Why one module over 500 lines: one benchmark, read top to bottom as its run goes (arguments,
channels and clients, the items created ahead of D, the live poster, the wait for the spike,
the report and plot); its shared parts already live in bench.harness and bench.load_client.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import math
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np

from bench.harness import (
    RESULTS_DIR,
    FleetRun,
    LoadClients,
    ProcWatch,
    fmt,
    machine_info,
    md_table,
    plt,
    pyspy_top,
    raise_nofile,
    run_benchmark,
    save_figure,
)
from bench.stats import pct

NAME = "spike"
GOAL_LIVE_P99_MS = 50.0
GOAL_SPIKE_S = 10.0
SCHEDULED_BASE = 10_000_000  # ids of scheduled messages; reminders from REMINDER_BASE; live posts below
REMINDER_BASE = 20_000_000
KEY_CONN_BITS = 20
SPIKE_WAIT_MAX_S = 120.0  # give up waiting for the spike this long after D
CREATE_ATTEMPTS = 5
# D is set this far ahead: the items must all be created before D - before_s. 400/s was too
# optimistic on a shared machine under load 15 (20,000 items took 70 s).
CREATE_RATE_FLOOR_PER_S = 200


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m bench.spike", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--clients", type=int, default=2000, help="websocket clients (= seeded users)")
    p.add_argument("--scheduled", type=int, default=10_000, help="scheduled messages due at D")
    p.add_argument("--reminders", type=int, default=10_000, help="reminders due at D")
    p.add_argument("--bg-rate", type=float, default=50.0, help="live posts per second")
    p.add_argument("--before-s", type=float, default=10.0, help="live traffic before D")
    p.add_argument("--after-s", type=float, default=10.0, help="live traffic after the last spike delivery")
    p.add_argument("--create-concurrency", type=int, default=48, help="Web API calls in flight while creating items")
    p.add_argument("--client-procs", type=int, default=2, help="load-client processes")
    p.add_argument("--scheduler-rate-per-s", type=float, default=0.0, help="the webapp's flag (0: its default)")
    p.add_argument("--scheduler-batch-max", type=int, default=0, help="the webapp's flag (0: its default)")
    p.add_argument("--scheduler-duty-cycle", type=float, default=0.0, help="the webapp's flag (0: its default)")
    p.add_argument(
        "--commit-fsync-thread",
        action="store_true",
        help="the webapp's --commit-fsync-thread (group commit's fsync off the loop)",
    )
    p.add_argument("--quick", action="store_true", help="smoke run: 200 clients, 1,000 + 1,000 due items")
    p.add_argument("--name", default=NAME, help="results under bench/results/<name>.* (default: spike)")
    p.add_argument(
        "--profile-s",
        type=int,
        default=0,
        help="sample the webapp with py-spy for this many seconds from D (raw stacks: bench/results/<name>-webapp.txt)",
    )
    args = p.parse_args(argv)
    if args.quick:
        args.clients = min(args.clients, 200)
        args.scheduled = min(args.scheduled, 1000)
        args.reminders = min(args.reminders, 1000)
        args.before_s = min(args.before_s, 5.0)
        args.after_s = min(args.after_s, 5.0)
    args.clients -= args.clients % 2
    return args


class Spike:
    def __init__(self, args: argparse.Namespace, fleet: FleetRun, lc: LoadClients) -> None:
        self.args = args
        self.fleet = fleet
        self.lc = lc
        self.http: aiohttp.ClientSession | None = None
        self.conn_of_user: dict[str, int] = {}
        self.offsets: list[int] = []
        self.tmp = Path(tempfile.mkdtemp(prefix="rtm-spike-"))
        self.channels: list[tuple[str, list[dict[str, Any]]]] = []

    async def api(self, method: str, token: str, **fields: Any) -> dict[str, Any]:
        assert self.http is not None
        for attempt in range(CREATE_ATTEMPTS):
            try:
                async with self.http.post(
                    self.fleet.api_url + method, data=fields, headers={"Authorization": f"Bearer {token}"}
                ) as r:
                    return dict(await r.json(content_type=None))
            except (aiohttp.ClientError, TimeoutError):
                if attempt == CREATE_ATTEMPTS - 1:
                    raise
                await asyncio.sleep(0.5)
        raise AssertionError("unreachable")

    async def bounded(self, calls: list[Any], concurrency: int) -> list[dict[str, Any]]:
        sem = asyncio.Semaphore(concurrency)

        async def one(call: Any) -> dict[str, Any]:
            async with sem:
                reply: dict[str, Any] = await call()
                return reply

        return list(await asyncio.gather(*(one(c) for c in calls)))

    async def make_channels(self, users: list[dict[str, Any]]) -> None:
        pairs = [users[i : i + 2] for i in range(0, len(users), 2)]

        async def make(k: int, pair: list[dict[str, Any]]) -> dict[str, Any]:
            reply = await self.api("conversations.create", pair[0]["token"], name=f"spike-{k:04d}")
            if not reply.get("ok"):
                raise RuntimeError(f"conversations.create: {reply}")
            joined = await self.api("conversations.join", pair[1]["token"], channel=reply["channel"]["id"])
            if not joined.get("ok"):
                raise RuntimeError(f"conversations.join: {joined}")
            return reply

        replies = await self.bounded([lambda k=k, p=p: make(k, p) for k, p in enumerate(pairs)], 32)
        self.channels = [(r["channel"]["id"], pair) for r, pair in zip(replies, pairs, strict=True)]

    async def connect(self, users: list[dict[str, Any]]) -> dict[str, Any]:
        got = await self.lc.connect_users(self.fleet, users, concurrency=100, timeout_s=30.0)
        self.offsets, self.conn_of_user = got.offsets, got.conn_of_user
        return {"connected": len(self.conn_of_user), "errors": got.errors, "elapsed_s": got.elapsed_s}

    def members(self, channel: int) -> list[int]:
        return [self.conn_of_user[u["id"]] for u in self.channels[channel][1] if u["id"] in self.conn_of_user]

    # -- the spike --------------------------------------------------------------------------
    async def create_items(self, users: list[dict[str, Any]], due: int) -> dict[str, Any]:
        due_us = due * 1_000_000
        n_channels = len(self.channels)
        calls = []
        for k in range(self.args.scheduled):
            cid, pair = self.channels[k % n_channels]
            author = pair[(k // n_channels) % 2]
            text = f"m{SCHEDULED_BASE + k}:{due_us}"
            calls.append(
                lambda t=author["token"], c=cid, x=text: self.api(
                    "chat.scheduleMessage", t, channel=c, post_at=due, text=x
                )
            )
        for k in range(self.args.reminders):
            user = users[k % len(users)]
            text = f"m{REMINDER_BASE + k}:{due_us}"
            calls.append(lambda t=user["token"], x=text: self.api("reminders.add", t, text=x, time=str(due)))
        started = time.monotonic()
        replies = await self.bounded(calls, self.args.create_concurrency)
        failed: dict[str, int] = {}
        for r in replies:
            if not r.get("ok"):
                failed[str(r.get("error"))] = failed.get(str(r.get("error")), 0) + 1
        elapsed = time.monotonic() - started
        return {
            "created": len(replies) - sum(failed.values()),
            "failed": failed,
            "elapsed_s": elapsed,
            "per_s": len(replies) / max(elapsed, 1e-9),
        }

    def expected_spike(self, users: list[dict[str, Any]]) -> np.ndarray:
        keys = []
        n_channels = len(self.channels)
        for k in range(self.args.scheduled):
            for conn in self.members(k % n_channels):
                keys.append(((SCHEDULED_BASE + k) << KEY_CONN_BITS) | conn)
        for k in range(self.args.reminders):
            conn = self.conn_of_user.get(users[k % len(users)]["id"])
            if conn is not None:
                keys.append(((REMINDER_BASE + k) << KEY_CONN_BITS) | conn)
        return np.array(keys, dtype=np.int64)

    async def live_poster(self, stop: asyncio.Event, posts: list[dict[str, Any]]) -> None:
        loop = asyncio.get_running_loop()
        ids = itertools.count(1)
        tasks: set[asyncio.Task[None]] = set()

        async def one(post: dict[str, Any]) -> None:
            cid, pair = self.channels[post["channel"]]
            try:
                reply = await self.api("chat.postMessage", pair[0]["token"], channel=cid, text=post["text"])
                post["ok"] = bool(reply.get("ok"))
            except Exception as exc:  # noqa: BLE001 - counted as a failed post
                post["error"] = repr(exc)

        t0 = loop.time()
        for i in itertools.count():
            delay = t0 + i / self.args.bg_rate - loop.time()
            if delay > 0:
                try:
                    await asyncio.wait_for(stop.wait(), delay)
                except TimeoutError:
                    pass
            if stop.is_set():
                break
            pid = next(ids)
            send_us = time.time_ns() // 1000
            post = {
                "id": pid,
                "channel": i % len(self.channels),
                "send_us": send_us,
                "text": f"m{pid}:{send_us}",
                "ok": False,
            }
            posts.append(post)
            task = asyncio.ensure_future(one(post))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        if tasks:
            await asyncio.wait(tasks, timeout=30)

    async def scheduler_metrics(self) -> dict[str, float]:
        """The webapp's ``rtm_scheduler_*`` and group-commit counters at the end of the run."""
        assert self.http is not None
        url = self.fleet.api_url.split("/api/")[0] + "/metrics"
        async with self.http.get(url) as r:
            text = await r.text()
        wanted = ("rtm_scheduler_batches_total", "rtm_scheduler_yields_total", "rtm_webapp_commit_seconds_")
        out = {}
        for line in text.splitlines():
            if line.startswith(wanted) and not line.startswith("#"):
                name, _, value = line.rpartition(" ")
                out[name] = float(value)
        return out

    async def frames(self) -> int:
        return await self.lc.frames()

    async def collect(self) -> np.ndarray:
        return np.asarray(await self.lc.collect(self.offsets, self.tmp))


def loss(expected: np.ndarray, got: np.ndarray) -> dict[str, int]:
    unique, counts = np.unique(got, return_counts=True)
    return {
        "expected": int(len(expected)),
        "delivered": int(len(got)),
        "lost": int(len(np.setdiff1d(expected, unique))),
        "duplicated": int((counts - 1).sum()),
        "unexpected": int(len(np.setdiff1d(unique, expected))),
    }


async def run(args: argparse.Namespace) -> dict[str, Any]:
    nofile = raise_nofile(65536)
    result: dict[str, Any] = {"benchmark": NAME, "machine": machine_info(), "argv": sys.argv[1:], "nofile": nofile}
    result["config"] = vars(args)
    env = {}
    if args.scheduler_rate_per_s:
        env["RTM_SCHEDULER_RATE_PER_S"] = str(args.scheduler_rate_per_s)
    if args.scheduler_batch_max:
        env["RTM_SCHEDULER_BATCH_MAX"] = str(args.scheduler_batch_max)
    if args.scheduler_duty_cycle:
        env["RTM_SCHEDULER_DUTY_CYCLE"] = str(args.scheduler_duty_cycle)
    if args.commit_fsync_thread:
        env["RTM_COMMIT_FSYNC_THREAD"] = "1"
    with FleetRun("--seed-users", str(args.clients), env=env) as fleet:
        result["fleet_startup_s"] = fleet.startup_s
        async with LoadClients(args.client_procs) as lc:
            spike = Spike(args, fleet, lc)
            spike.http = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=max(100, args.create_concurrency * 2)),
                timeout=aiohttp.ClientTimeout(total=60),
            )
            try:
                result.update(await measure(args, fleet, lc, spike))
            finally:
                await spike.http.close()
                shutil.rmtree(spike.tmp, ignore_errors=True)
    return result


async def measure(args: argparse.Namespace, fleet: FleetRun, lc: LoadClients, spike: Spike) -> dict[str, Any]:
    out: dict[str, Any] = {}
    users = [u for u in fleet.seed["users"] if not u["is_bot"]][: args.clients]
    t = time.monotonic()
    await spike.make_channels(users)
    out["channels"] = {"count": len(spike.channels), "elapsed_s": time.monotonic() - t}
    out["connect"] = await spike.connect(users)
    print(f"spike: {len(spike.channels)} channels, {out['connect']['connected']} clients connected", flush=True)
    # D: far enough ahead for the items to be created (measured rate, with margin), on a whole second
    items = args.scheduled + args.reminders
    due = math.ceil(time.time() + args.before_s + 10 + items / CREATE_RATE_FLOOR_PER_S)
    out["create"] = await spike.create_items(users, due)
    print(f"spike: created {out['create']['created']} items in {out['create']['elapsed_s']:.1f}s", flush=True)
    if time.time() > due - args.before_s:
        raise RuntimeError(f"creating the items took too long: D was {due - time.time():.1f}s away after it")
    await spike.collect()  # drop anything stray
    expected_spike = spike.expected_spike(users)
    watch = ProcWatch({**fleet.labelled_pids(), **lc.pids(), "poster (bench)": os.getpid()})
    await asyncio.sleep(max(0.0, due - args.before_s - time.time()))
    stop = asyncio.Event()
    posts: list[dict[str, Any]] = []
    poster = asyncio.create_task(spike.live_poster(stop, posts))
    cpu_bg0, bg_t0 = watch.cpu(), time.monotonic()
    await asyncio.sleep(max(0.0, due - time.time()))
    cpu0, bg_s = watch.cpu(), time.monotonic() - bg_t0
    profile: asyncio.Future[list[tuple[str, float, float]]] | None = None
    if args.profile_s:
        webapp_pid = fleet.labelled_pids()["webapp"]
        path = RESULTS_DIR / f"{args.name}-webapp.txt"
        profile = asyncio.ensure_future(asyncio.to_thread(pyspy_top, webapp_pid, args.profile_s, path, idle=True))
    base = await spike.frames()
    # wait until every spike delivery has been counted (the live ones keep coming too)
    deadline = due + SPIKE_WAIT_MAX_S
    while time.time() < deadline:
        live_expected = 2 * sum(1 for p in posts if p["send_us"] >= due * 1_000_000)
        if await spike.frames() - base >= len(expected_spike) + live_expected * 0.9:
            break
        await asyncio.sleep(0.1)
    cpu1 = watch.cpu()
    spike_window_s = time.time() - due
    await asyncio.sleep(args.after_s)
    stop.set()
    await poster
    await asyncio.sleep(2.0)  # the last live posts' deliveries
    if profile is not None:
        out["webapp_profile_top"] = await profile
    out["webapp_scheduler_metrics"] = await spike.scheduler_metrics()
    rec = await spike.collect()

    keys = (rec[:, 1] << KEY_CONN_BITS) | rec[:, 0]
    is_spike = rec[:, 1] >= SCHEDULED_BASE
    due_us = due * 1_000_000
    s_rec = rec[is_spike]
    s_delay_ms = (s_rec[:, 2] - due_us) / 1e3
    last_s = float(s_delay_ms.max() / 1e3) if len(s_rec) else None
    spike_end_us = due_us + int((last_s or 0) * 1e6)
    out["due_unix"] = due
    out["spike"] = {
        **loss(expected_spike, keys[is_spike]),
        "last_delivery_after_due_s": last_s,
        "delay_ms": {q: pct(s_delay_ms, p) for q, p in (("p50", 50), ("p99", 99), ("max", 100))},
        "scheduled_delay_ms_p50": pct(s_delay_ms[s_rec[:, 1] < REMINDER_BASE], 50),
        "reminder_delay_ms_p50": pct(s_delay_ms[s_rec[:, 1] >= REMINDER_BASE], 50),
        "early": int((s_delay_ms < 0).sum()),
    }
    l_rec = rec[~is_spike]
    ok_posts = [p for p in posts if p.get("ok")]
    expected_live = np.array(
        [(p["id"] << KEY_CONN_BITS) | c for p in ok_posts for c in spike.members(p["channel"])], dtype=np.int64
    )
    send_of = {p["id"]: p["send_us"] for p in posts}
    sends = np.array([send_of.get(int(i), 0) for i in l_rec[:, 1]], dtype=np.int64)
    lat_ms = l_rec[:, 3] / 1e3
    phases = {
        "before": sends < due_us,
        "during": (sends >= due_us) & (sends <= spike_end_us),
        "after": sends > spike_end_us,
    }
    out["live"] = {
        **loss(expected_live, keys[~is_spike]),
        "posts": len(posts),
        "failed_posts": len(posts) - len(ok_posts),
        "phases": {
            name: {
                "deliveries": int(mask.sum()),
                "p50_ms": pct(lat_ms[mask], 50),
                "p99_ms": pct(lat_ms[mask], 99),
                "max_ms": pct(lat_ms[mask], 100),
            }
            for name, mask in phases.items()
        },
    }
    out["cpu_during_spike_s"] = {k: round(cpu1[k] - cpu0[k], 2) for k in cpu1}
    # CPU per fired item: the spike window's CPU less what the live traffic alone cost per second
    # (measured from the poster's start to D), over the items fired
    out["cpu_background_per_s"] = {k: round((cpu0[k] - cpu_bg0[k]) / max(bg_s, 1e-9), 4) for k in cpu0}
    fired = args.scheduled + args.reminders
    out["cpu_per_item_us"] = {
        k: round(1e6 * (cpu1[k] - cpu0[k] - out["cpu_background_per_s"][k] * spike_window_s) / max(fired, 1), 1)
        for k in cpu1
    }
    out["spike_window_s"] = spike_window_s
    out["goals"] = {
        "live_p99_during_ms<50": (out["live"]["phases"]["during"]["p99_ms"] or 0) < GOAL_LIVE_P99_MS,
        "spike_within_10s": last_s is not None and last_s <= GOAL_SPIKE_S,
        "none_lost_or_duplicated": out["spike"]["lost"] == 0
        and out["spike"]["duplicated"] == 0
        and out["live"]["lost"] == 0
        and out["live"]["duplicated"] == 0,
    }
    out["_plot"] = {
        "spike_recv_s": ((s_rec[:, 2] - due_us) / 1e6).tolist(),
        "live_recv_s": ((l_rec[:, 2] - due_us) / 1e6).tolist(),
        "live_lat_ms": lat_ms.tolist(),
    }
    return out


def render(r: dict[str, Any]) -> str:
    s, live = r["spike"], r["live"]
    lines = [
        f"Spike: {r['config']['scheduled']:,} scheduled messages + {r['config']['reminders']:,} reminders due at one "
        f"instant; {r['connect']['connected']:,} clients over {r['channels']['count']:,} channels; live posts at "
        f"{r['config']['bg_rate']:g}/s. Machine: {r['machine'].get('nproc', '?')} × {r['machine'].get('cpu_model', '')}, "
        f"commit {r['machine'].get('rtm_commit', '?')}, load average {fmt(r.get('loadavg_1m', {}).get('start'))} at the start "
        "(the machine is shared with other work).",
        "",
        md_table(
            ["measure", "value", "goal"],
            [
                ["last spike delivery after the due instant", f"{fmt(s['last_delivery_after_due_s'], 2)} s", "≤ 10 s"],
                [
                    "spike delivery delay p50 / p99 / max",
                    " / ".join(f"{fmt(v / 1e3 if v is not None else None, 2)} s" for v in s["delay_ms"].values()),
                    "",
                ],
                ["spike deliveries expected / delivered", f"{s['expected']:,} / {s['delivered']:,}", ""],
                ["spike lost / duplicated / early", f"{s['lost']} / {s['duplicated']} / {s['early']}", "0 / 0 / 0"],
                *[
                    [
                        f"live p50 / p99 / max, {name}",
                        f"{fmt(p['p50_ms'])} / {fmt(p['p99_ms'])} / {fmt(p['max_ms'])} ms ({p['deliveries']:,} deliveries)",
                        "p99 < 50 ms" if name == "during" else "",
                    ]
                    for name, p in live["phases"].items()
                ],
                ["live lost / duplicated", f"{live['lost']} / {live['duplicated']}", "0 / 0"],
                [
                    f"items created (Web API, {r['config']['create_concurrency']} in flight)",
                    f"{r['create']['created']:,} in {fmt(r['create']['elapsed_s'])} s ({fmt(r['create']['per_s'], 0)}/s)",
                    "",
                ],
            ],
        ),
        "",
        f"CPU-seconds per process from the due instant until the last spike delivery ({fmt(r['spike_window_s'], 1)} s); "
        "the background's cores (live posts alone, from the poster's start to the due instant); and CPU per "
        "fired item (the window's CPU less the background's, over the items):",
        "",
        md_table(
            ["process", "CPU s", "cores", "background cores", "µs per item"],
            [
                [
                    k,
                    fmt(v, 2),
                    fmt(v / max(r["spike_window_s"], 1e-9), 2),
                    fmt(r.get("cpu_background_per_s", {}).get(k), 3),
                    fmt(r.get("cpu_per_item_us", {}).get(k), 0),
                ]
                for k, v in sorted(r["cpu_during_spike_s"].items(), key=lambda kv: -kv[1])
            ],
        ),
        "",
        "Goals: " + ", ".join(f"{k}: {'met' if v else 'MISSED'}" for k, v in r["goals"].items()),
    ]
    if r.get("webapp_scheduler_metrics"):
        lines += ["", "The webapp's scheduler and group-commit counters at the end:", ""]
        lines += [f"    {k} {v:g}" for k, v in r["webapp_scheduler_metrics"].items() if "bucket" not in k]
    if r.get("webapp_profile_top"):
        lines += [
            "",
            f"The webapp's functions by own time (py-spy, {r['config']['profile_s']} s from D, waits included):",
            "",
            md_table(
                ["function", "own %", "total %"], [[f, fmt(o, 1), fmt(t, 1)] for f, o, t in r["webapp_profile_top"]]
            ),
        ]
    return "\n".join(lines)


def plot(r: dict[str, Any], name: str) -> None:
    data = r.get("_plot")
    if not data:
        return
    pyplot = plt()
    fig, (top, bottom) = pyplot.subplots(2, 1, figsize=(9, 6.5), sharex=True)
    spike = np.array(data["spike_recv_s"])
    live = np.array(data["live_recv_s"])
    low = math.floor(min(live.min() if len(live) else 0, -r["config"]["before_s"]))
    high = math.ceil(max(spike.max() if len(spike) else 0, live.max() if len(live) else 0))
    bins = np.arange(low, high + 0.25, 0.25)
    top.hist(
        [spike, live],
        bins=bins,
        stacked=True,
        label=["spike (scheduled messages + reminders)", "live posts"],
        weights=[np.full(len(spike), 4.0), np.full(len(live), 4.0)],
    )
    top.set_ylabel("deliveries per second")
    top.axvline(0, color="k", lw=0.8, ls="--")
    top.legend(loc="upper right")
    top.set_title(f"{len(spike):,} spike deliveries due at t=0, live posts at {r['config']['bg_rate']:g}/s")
    bottom.scatter(live, data["live_lat_ms"], s=3)
    bottom.axhline(GOAL_LIVE_P99_MS, color="r", lw=0.8, ls="--", label="50 ms")
    bottom.set_ylabel("live post latency (ms)")
    bottom.set_xlabel("seconds from the due instant")
    bottom.legend(loc="upper right")
    save_figure(fig, name)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return run_benchmark(args.name, args, run, render, plot, loadavg=True)


if __name__ == "__main__":
    raise SystemExit(main())
