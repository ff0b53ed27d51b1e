"""Posts per second and latency of chat.postMessage at the webapp, before and after group commit.

Starts the dev Consul agent and one webapp process per variant (no Admin
Server: the outbox only queues, so this measures the webapp and its SQLite
commits), seeds a demo team, and runs ``--posters`` concurrent HTTP clients
posting for ``--seconds``. Variants:

* ``before``: the webapp's code from ``--before-tree`` (default: the main
  worktree), as it was: ``synchronous=NORMAL``, one commit per post.
* ``after``: this tree: ``synchronous=FULL`` (an ok'd post survives a power
  loss), group commit.
* ``after-normal``: this tree with ``--sqlite-synchronous NORMAL``: what the
  fsyncs cost.

Each row also gives the webapp process's CPU per post (psutil user+system over
the measured seconds, divided by the posts answered ``ok``): with no Admin
Server this is the HTTP, auth, SQLite and JSON work of a post (issue 17).
``--after-tree`` measures an exported tree instead of this one, and
``--rounds N`` runs the before/after pair N times, alternating, so that a
shared machine's load falls on both alike (``--no-normal`` skips
``after-normal``).

Usage: ``python -m bench.webapp_posts [--posters 32] [--seconds 10]``.
Writes ``bench/results/webapp-posts.{json,md}``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
import psutil

from bench.harness import RESULTS_DIR, machine_info, md_table
from bench.stats import pct
from rtmctl.launcher import RunningProcess, rtm_argv, start
from webapp_stub.seed import seed_demo

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_BEFORE_TREE = "/work/main"  # a checkout (or `git archive main` export) of the code to compare against
READY_TIMEOUT_S = 60.0
POST_TIMEOUT_S = 30.0


async def post_loop(
    http: aiohttp.ClientSession, url: str, token: str, channel: str, until: float, latencies: list[float]
) -> int:
    errors = 0
    n = 0
    while time.monotonic() < until:
        n += 1
        started = time.perf_counter()
        async with http.post(
            url, json={"channel": channel, "text": f"bench {n}"}, headers={"Authorization": f"Bearer {token}"}
        ) as resp:
            body = await resp.json()
        if body.get("ok"):
            latencies.append(time.perf_counter() - started)
        else:
            errors += 1
    return errors


def cpu_s(process: psutil.Process | None) -> float:
    return sum(cpu_split_s(process))


def cpu_split_s(process: psutil.Process | None) -> tuple[float, float]:
    """(user, system) CPU-seconds of ``process`` so far."""
    if process is None:
        return 0.0, 0.0
    times = process.cpu_times()
    return float(times.user), float(times.system)


async def load(
    api_url: str, seed: dict[str, Any], posters: int, seconds: float, webapp: psutil.Process | None = None
) -> dict[str, Any]:
    users = [u for u in seed["users"] if not u.get("is_bot")]
    channel = seed["channels"][0]["id"]
    latencies: list[float] = []
    timeout = aiohttp.ClientTimeout(total=POST_TIMEOUT_S)
    async with aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=posters)) as http:
        url = api_url + "chat.postMessage"
        await post_loop(http, url, users[0]["token"], channel, time.monotonic() + 1.0, [])  # warm up
        started = time.monotonic()
        user_before, sys_before = cpu_split_s(webapp)
        until = started + seconds
        errors = await asyncio.gather(
            *(post_loop(http, url, users[i % len(users)]["token"], channel, until, latencies) for i in range(posters))
        )
        elapsed = time.monotonic() - started
        user_after, sys_after = cpu_split_s(webapp)
        user_used, sys_used = user_after - user_before, sys_after - sys_before
        cpu_used = user_used + sys_used
    return {
        "posts": len(latencies),
        "errors": sum(errors),
        "posts_per_s": len(latencies) / elapsed,
        "p50_ms": 1000 * (pct(latencies, 50) or 0.0),
        "p99_ms": 1000 * (pct(latencies, 99) or 0.0),
        "webapp_cpu_us_per_post": 1e6 * cpu_used / max(1, len(latencies)),
        "webapp_sys_share": sys_used / cpu_used if cpu_used > 0 else 0.0,
        "load_average_1m": os.getloadavg()[0],
    }


def run_variant(name: str, tree: str, extra: list[str], consul: str, posters: int, seconds: float) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix=f"bench-{name}-") as data_dir:
        seed = seed_demo(Path(data_dir) / "webapp.db", users=posters, channels=2, bots=0)
        env = {**os.environ, "PYTHONPATH": tree}
        cli = "rtmctl.cli" if (Path(tree) / "rtmctl" / "cli.py").exists() else "services.cli"  # before the move
        argv = [sys.executable, "-m", cli, "webapp", "--port", "0", "--consul", consul]
        argv += ["--data-dir", data_dir, "--rate-limit-per-minute", "0", "--instance-id", f"webapp-{name}"]
        argv += ["--wire-tls", "off", *extra]  # no Admin Server here: nothing to authenticate
        proc: RunningProcess = start(f"webapp-{name}", argv, ready_timeout_s=READY_TIMEOUT_S, env=env, cwd=tree)
        try:
            api_url = f"http://{proc.ready['host']}:{proc.ready['port']}/api/"
            webapp = psutil.Process(proc.pid)
            result = asyncio.run(load(api_url, seed, posters, seconds, webapp))
        finally:
            proc.stop()
    return {"variant": name, **result}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--posters", type=int, default=32, help="concurrent HTTP posters")
    parser.add_argument("--seconds", type=float, default=10.0, help="measured seconds per variant")
    parser.add_argument("--before-tree", default=DEFAULT_BEFORE_TREE, help="source tree of the 'before' webapp")
    parser.add_argument("--after-tree", default=str(REPO_ROOT), help="source tree of the 'after' webapp")
    parser.add_argument("--rounds", type=int, default=1, help="before/after pairs, alternating")
    parser.add_argument("--no-normal", action="store_true", help="skip the after-normal variant")
    args = parser.parse_args(argv)
    consul_proc = start("consul-dev", rtm_argv("consul-dev", "--port", "0"), ready_timeout_s=READY_TIMEOUT_S)
    rows: list[dict[str, Any]] = []
    try:
        consul = f"{consul_proc.ready['host']}:{consul_proc.ready['port']}"
        for _ in range(args.rounds):
            rows.append(run_variant("before", args.before_tree, [], consul, args.posters, args.seconds))
            rows.append(run_variant("after", args.after_tree, [], consul, args.posters, args.seconds))
        if not args.no_normal:
            rows.append(
                run_variant(
                    "after-normal",
                    args.after_tree,
                    ["--sqlite-synchronous", "NORMAL"],
                    consul,
                    args.posters,
                    args.seconds,
                )
            )
    finally:
        consul_proc.stop()
    report = {"machine": machine_info(), "posters": args.posters, "seconds": args.seconds, "rows": rows}
    RESULTS_DIR.mkdir(exist_ok=True)
    (RESULTS_DIR / "webapp-posts.json").write_text(json.dumps(report, indent=2))
    table = md_table(
        ["variant", "posts", "posts/s", "p50 ms", "p99 ms", "errors", "webapp CPU µs/post", "of it system", "load avg"],
        [
            [
                r["variant"],
                r["posts"],
                f"{r['posts_per_s']:.0f}",
                f"{r['p50_ms']:.2f}",
                f"{r['p99_ms']:.2f}",
                r["errors"],
                f"{r['webapp_cpu_us_per_post']:.0f}",
                f"{100 * r['webapp_sys_share']:.0f} %",
                f"{r['load_average_1m']:.1f}",
            ]
            for r in rows
        ],
    )
    (RESULTS_DIR / "webapp-posts.md").write_text(table + "\n")
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
