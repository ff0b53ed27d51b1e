"""What the webapp's commit pacing saves on the publish path (issue 17, docs/publish-path.md).

For each ``--intervals``, ``--caps`` and ``--naps`` value, starts a fleet (``rtm up``, mutual TLS
on, 200 seeded users, no websocket clients) with ``RTM_MIN_COMMIT_INTERVAL_S``,
``RTM_COMMIT_INTERVAL_CAP_S`` (the paced interval grows with the rate of posts up to it:
webapp_stub/commit_pacer.py; a cap at the interval keeps it fixed) and ``RTM_COMMIT_NAP_S`` set to
them, creates ``--channels`` channels,
and posts ``chat.postMessage`` over HTTP at each of ``--rates`` posts per second, paced, for
``--seconds`` each (at most ``--max-inflight`` unanswered). Per step it reports the webapp's and
the admin servers' CPU µs per post (psutil user+system over the step), the group commits per
second and posts per commit (the webapp's ``rtm_webapp_commit_batch_writes`` histogram), the
webapp's event-loop thread's wake-ups (voluntary context switches) and preemptions per post, and the
posts' HTTP latency p50/p99. ``--rounds N`` alternates the settings ``N`` times, so the machine's
load falls on each alike; tables quote medians. No websocket clients: the fan-out's cost does not
depend on the interval, and leaving it out keeps the machine's noise off the publish path.

    python -m bench.commit_pacing --intervals 0,0.005 --rates 100,500,1000,2000 --rounds 2
    python -m bench.commit_pacing --intervals 0.005 --naps 0,0.004 --rates 500,1000,2000 --rounds 3
    python -m bench.commit_pacing --intervals 0.005 --caps 0.005,0.02 --rates 1000,2000,3000 --rounds 2

Writes ``bench/results/commit-pacing.{json,md}``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import time
from typing import Any

import aiohttp
import psutil

from bench.harness import RESULTS_DIR, FleetRun, install_uvloop, machine_info, md_table, paced_requests
from bench.stats import pct

SEED_USERS = 200
CHANNELS = 10
SECONDS = 8.0
MAX_INFLIGHT = 256
POST_TIMEOUT_S = 60.0
WARM_RATE_PER_S = 200.0
WARM_SECONDS = 2.0
SLOW_COMMIT_LE = "0.02"  # a commit slower than this (a bucket of rtm_webapp_commit_seconds) is counted as slow
TEXT_PAD = "x" * 150  # with its id, about the peers' 200-byte message


def bucket_count(page: str, name: str, le: str) -> float:
    """The count of one histogram bucket (``le``, as the page writes it), all other labels summed."""
    total = 0.0
    for line in page.splitlines():
        if line.startswith(name + "_bucket{") and f'le="{le}"' in line:
            total += float(line.rsplit(" ", 1)[1])
    return total


def metric_total(page: str, name: str) -> float:
    """The sum of every sample of ``name`` (all label sets) in a Prometheus text page."""
    total = 0.0
    for line in page.splitlines():
        if line.startswith((name + " ", name + "{")):
            total += float(line.rsplit(" ", 1)[1])
    return total


class Poster:
    def __init__(self, fleet: FleetRun, http: aiohttp.ClientSession, token: str, max_inflight: int) -> None:
        self.fleet, self.http, self.token = fleet, http, token
        self.max_inflight = max_inflight
        self.channels: list[str] = []
        webapp = fleet.processes("webapp")[0]
        self.webapp_id = webapp["id"]
        self.procs = {"webapp": psutil.Process(int(webapp["pid"]))}
        for admin in fleet.processes("admin-server"):
            self.procs[admin["id"]] = psutil.Process(int(admin["pid"]))

    async def call(self, method: str, **fields: Any) -> dict[str, Any]:
        headers = {"Authorization": f"Bearer {self.token}"}
        async with self.http.post(self.fleet.api_url + method, data=fields, headers=headers) as r:
            reply = dict(await r.json(content_type=None))
        if not reply.get("ok"):
            raise RuntimeError(f"{method}: {reply}")
        return reply

    def cpu_s(self) -> dict[str, float]:
        return {label: sum(p.cpu_times()[:2]) for label, p in self.procs.items()}

    async def step(self, rate: float, seconds: float) -> dict[str, Any]:
        slots = asyncio.Semaphore(self.max_inflight)
        latencies: list[float] = []
        failed = 0

        async def one(i: int) -> None:
            nonlocal failed
            try:
                started = time.perf_counter()
                await self.call(
                    "chat.postMessage", channel=self.channels[i % len(self.channels)], text=f"m{i} {TEXT_PAD}"
                )
                latencies.append(time.perf_counter() - started)
            except Exception:  # noqa: BLE001 - counted
                failed += 1
            finally:
                slots.release()

        page0, cpu0, load0 = self.fleet.metrics(self.webapp_id), self.cpu_s(), os.getloadavg()[0]
        switches0 = self.procs["webapp"].num_ctx_switches()
        elapsed = await paced_requests(rate, seconds, slots, one, POST_TIMEOUT_S)
        cpu1, page1 = self.cpu_s(), self.fleet.metrics(self.webapp_id)
        switches1 = self.procs["webapp"].num_ctx_switches()
        posts = max(1, len(latencies))
        commits = metric_total(page1, "rtm_webapp_commit_batch_writes_count") - metric_total(
            page0, "rtm_webapp_commit_batch_writes_count"
        )
        slow = metric_total(page1, "rtm_webapp_commit_seconds_count") - metric_total(
            page0, "rtm_webapp_commit_seconds_count"
        )
        slow -= bucket_count(page1, "rtm_webapp_commit_seconds", SLOW_COMMIT_LE) - bucket_count(
            page0, "rtm_webapp_commit_seconds", SLOW_COMMIT_LE
        )
        napped = metric_total(page1, "rtm_webapp_commit_nap_seconds_total") - metric_total(
            page0, "rtm_webapp_commit_nap_seconds_total"
        )
        return {
            "rate": rate,
            "slow_commits_per_s": slow / elapsed,
            "napped_share": napped / elapsed,
            "achieved_posts_s": len(latencies) / elapsed,
            "failed": failed,
            "commits_per_s": commits / elapsed,
            "posts_per_commit": len(latencies) / max(1.0, commits),
            "webapp_us_per_post": 1e6 * (cpu1["webapp"] - cpu0["webapp"]) / posts,
            "webapp_wakeups_per_post": (switches1.voluntary - switches0.voluntary) / posts,
            "webapp_preempted_per_post": (switches1.involuntary - switches0.involuntary) / posts,
            "admin_us_per_post": 1e6 * sum(cpu1[k] - cpu0[k] for k in cpu1 if k != "webapp") / posts,
            "p50_ms": 1e3 * (pct(latencies, 50) or 0.0),
            "p99_ms": 1e3 * (pct(latencies, 99) or 0.0),
            "load_average_1m": load0,
        }


async def run_interval(interval_s: str, cap_s: str, nap_s: str, args: argparse.Namespace) -> list[dict[str, Any]]:
    rows = []
    env = {"RTM_MIN_COMMIT_INTERVAL_S": interval_s, "RTM_COMMIT_INTERVAL_CAP_S": cap_s, "RTM_COMMIT_NAP_S": nap_s}
    with FleetRun("--seed-users", str(SEED_USERS), env=env) as fleet:
        user = next(u for u in fleet.seed["users"] if not u["is_bot"])
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=args.max_inflight)) as http:
            poster = Poster(fleet, http, user["token"], args.max_inflight)
            for n in range(args.channels):
                poster.channels.append((await poster.call("conversations.create", name=f"pacing-{n}"))["channel"]["id"])
            await poster.step(WARM_RATE_PER_S, WARM_SECONDS)
            for rate in args.rates:
                setting = {"interval_s": float(interval_s), "cap_s": float(cap_s), "nap_s": float(nap_s)}
                row = {**setting, **await poster.step(rate, args.seconds)}
                print(json.dumps(row), flush=True)
                rows.append(row)
    return rows


COLUMNS = (
    ("webapp_us_per_post", "webapp µs/post"),
    ("webapp_wakeups_per_post", "webapp wake-ups/post"),
    ("napped_share", "time napped"),
    ("admin_us_per_post", "admin µs/post"),
    ("posts_per_commit", "posts/commit"),
    ("commits_per_s", "commits/s"),
    ("slow_commits_per_s", "commits > 20 ms /s"),
    ("p50_ms", "p50 ms"),
    ("p99_ms", "p99 ms"),
    ("achieved_posts_s", "posts/s"),
)


def setting_of(row: dict[str, Any]) -> tuple[float, float, float]:
    """A row's minimum interval, cap and nap (rows of older runs: a fixed interval)."""
    return row["interval_s"], row.get("cap_s", row["interval_s"]), row.get("nap_s", 0.0)


def render(rows: list[dict[str, Any]], machine: dict[str, Any]) -> str:
    out = [
        f"# bench/commit_pacing ({machine.get('cpu_model', '')}, {machine.get('nproc')} CPUs, {machine.get('date')}, commit {machine.get('rtm_commit')})",
        "",
    ]
    out.append("Medians over the rounds, per commit interval (its minimum, its cap), nap and offered rate:")
    out.append("")
    table = []
    for setting in sorted({setting_of(r) for r in rows}):
        for rate in sorted({r["rate"] for r in rows}):
            mine = [r for r in rows if setting_of(r) == setting and r["rate"] == rate]
            if not mine:
                continue
            cells = [f"{statistics.median(r[key] for r in mine):.2f}" for key, _ in COLUMNS]
            when = [f"{value * 1000:g} ms" for value in setting]
            table.append([*when, f"{rate:g}", *cells, sum(r["failed"] for r in mine)])
    head = ["interval", "cap", "nap", "offered posts/s", *(label for _, label in COLUMNS), "failed"]
    out.append(md_table(head, table))
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--intervals", default="0,0.005", help="values of RTM_MIN_COMMIT_INTERVAL_S, seconds")
    parser.add_argument("--caps", default="0.02", help="values of RTM_COMMIT_INTERVAL_CAP_S, seconds")
    parser.add_argument("--naps", default="0.004", help="values of RTM_COMMIT_NAP_S, seconds")
    parser.add_argument("--rates", default="100,500,1000,2000", help="offered posts per second, one step each")
    parser.add_argument("--seconds", type=float, default=SECONDS, help="posting time per step")
    parser.add_argument("--rounds", type=int, default=1, help="passes over the intervals and naps, alternating")
    parser.add_argument("--channels", type=int, default=CHANNELS, help="channels the posts go to, in turn")
    parser.add_argument("--max-inflight", type=int, default=MAX_INFLIGHT, help="unanswered posts at most")
    args = parser.parse_args(argv)
    args.rates = [float(r) for r in args.rates.split(",") if r]
    intervals = [i for i in args.intervals.split(",") if i]
    caps = [c for c in args.caps.split(",") if c]
    naps = [n for n in args.naps.split(",") if n]
    install_uvloop()
    rows: list[dict[str, Any]] = []
    for _ in range(args.rounds):
        for interval in intervals:
            for cap in caps:
                for nap in naps:
                    rows += asyncio.run(run_interval(interval, cap, nap, args))
    machine = machine_info()
    report = {
        "benchmark": "commit_pacing",
        "machine": machine,
        "argv": sys.argv[1:] if argv is None else argv,
        "rows": rows,
    }
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    (RESULTS_DIR / "commit-pacing.json").write_text(json.dumps(report, indent=2))
    text = render(rows, machine)
    (RESULTS_DIR / "commit-pacing.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
