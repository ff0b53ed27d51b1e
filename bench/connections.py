"""Idle connections held by ONE gateway: the gateway's RSS per websocket connection.

Starts a fleet with one gateway (``rtm up --regions us-east
--gateways-per-region 1``) and as many seeded users as connections (each
connection is a distinct user: its own user channel, plus the team channel,
#general and #random, as Slack clients have). Load-client processes (picows +
uvloop) open the connections in steps (default 5k, 10k, 20k), bound to
several 127.0.0.x source addresses so no source address runs out of
ephemeral ports; ``rtm.connect`` runs concurrently under a semaphore.

After each step the bench waits until the gateway reports every connection
(``/healthz``) and its RSS has settled (several samples within 64 KiB), then
records the RSS. Per connection = (RSS now - RSS with no connection) / count;
the incremental figure is between consecutive steps.

RLIMIT_NOFILE: the bench raises its own limit (soft to hard, and the hard
limit too when running as root) before starting the fleet; ``rtm up`` and
every fleet process inherit it.

    python -m bench.connections            # 5k, 10k, 20k connections
    python -m bench.connections --quick    # 500, 1k, 2k

Why one module over 500 lines: one benchmark, read top to bottom as its run goes (arguments, the
stepped connect, the RSS settling, the tracemalloc trace run, the report); its shared parts already
live in bench.harness and bench.load_client.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

from bench.harness import (
    BENCH_DIR,
    REPO_ROOT,
    RESULTS_DIR,
    FleetRun,
    LoadClients,
    cpu_seconds,
    fmt,
    install_uvloop,
    machine_info,
    md_table,
    mib,
    plt,
    publish,
    pyspy_available,
    pyspy_top,
    raise_nofile,
    rss_bytes,
    save_figure,
    save_json,
    settled_rss,
)
from rtmctl.consul_roles import role_token
from rtmctl.operator import consul_token
from services.certs import FleetCertificates
from services.identity import GATEWAY, PeerIdentity

NAME = "connections"
GOAL_BYTES_PER_CONN = 16 * 1024
SETTLE_BAND_BYTES = 64 * 1024  # RSS has settled: 3 samples (1 s apart) within this band,
SETTLE_MIN_S = 4.0  # not before this (--settle-s: the longest wait)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m bench.connections", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--counts", default="5000,10000,20000", help="connection counts to measure at")
    p.add_argument("--client-procs", type=int, default=2, help="load-client processes")
    p.add_argument("--per-addr", type=int, default=5000, help="connections per 127.0.0.x source address")
    p.add_argument("--concurrency", type=int, default=64, help="rtm.connect + websocket handshakes in flight")
    p.add_argument("--settle-s", type=float, default=30.0, help="longest wait for the gateway's RSS to settle")
    p.add_argument("--connect-deadline-s", type=float, default=300.0, help="longest time one step may spend connecting")
    p.add_argument(
        "--profile-idle",
        default=True,
        action=argparse.BooleanOptionalAction,
        help="py-spy the idle gateway at the top count (25 s: at least one keepalive sweep)",
    )
    p.add_argument(
        "--probe-s",
        type=float,
        default=45.0,
        help="at the top count, time RTM pings of one more client for this long (0: skip)",
    )
    p.add_argument(
        "--idle-s",
        type=float,
        default=40.0,
        help="window for the gateway's idle CPU at each count (two 20 s keepalive periods)",
    )
    p.add_argument(
        "--trace",
        type=int,
        default=0,
        metavar="N",
        help="instead: run a gateway in this process under tracemalloc, open N connections, print where the memory goes",
    )
    p.add_argument("--quick", action="store_true", help="smoke run: 500, 1k, 2k connections")
    args = p.parse_args(argv)
    if args.quick:
        args.counts = "500,1000,2000"
        args.settle_s = 10.0
        args.idle_s = 3.0
        args.probe_s = 25.0
    args.count_list = sorted(int(x) for x in args.counts.split(",") if x)
    return args


class ConsulWatch:
    """Polls Consul (every 0.5 s) for a passing gateway; adds up the time with none."""

    def __init__(self, consul_url: str, token: str = "") -> None:
        self.url = consul_url.rstrip("/") + "/v1/health/service/gateway?passing=1"
        self.headers = {"X-Consul-Token": token} if token else {}  # without it, ACLs filter every gateway out
        self.down_s = 0.0
        self.task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self.task = asyncio.ensure_future(self._run())

    async def _run(self) -> None:
        import aiohttp

        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as http:
            while True:
                try:
                    async with http.get(self.url, headers=self.headers) as resp:
                        passing = len(await resp.json(content_type=None))
                except Exception:  # noqa: BLE001 - counted as unknown, not as down
                    passing = 1
                if passing == 0:
                    self.down_s += 0.5
                await asyncio.sleep(0.5)

    async def stop(self) -> float:
        if self.task is not None:
            self.task.cancel()
            await asyncio.gather(self.task, return_exceptions=True)
        return self.down_s


async def ping_probe(api_url: str, token: str, seconds: float, interval_s: float = 0.01) -> dict[str, Any]:
    """One more client sends Slack RTM pings (``{"type": "ping", "id": n}``) every ``interval_s`` for
    ``seconds`` and times each pong: how long the gateway's event loop leaves a message waiting."""
    import aiohttp
    from websockets.asyncio.client import connect as ws_connect

    async with aiohttp.ClientSession() as http:
        async with http.post(api_url + "rtm.connect", headers={"Authorization": f"Bearer {token}"}) as resp:
            reply = await resp.json(content_type=None)
    if not reply.get("ok"):
        return {"error": reply.get("error")}
    rtts: list[tuple[float, float]] = []  # (seconds since start, rtt ms)
    started = time.monotonic()
    async with ws_connect(reply["url"], max_size=None, ping_interval=None) as ws:
        await asyncio.wait_for(ws.recv(), 10)  # hello
        n = 0
        while time.monotonic() - started < seconds:
            n += 1
            t0 = time.perf_counter()
            await ws.send(json.dumps({"type": "ping", "id": n}))
            while True:  # skip anything that is not our pong (bounded by the timeout)
                frame = json.loads(await asyncio.wait_for(ws.recv(), 30))
                if frame.get("type") == "pong" and frame.get("reply_to") == n:
                    break
            rtts.append((time.monotonic() - started, (time.perf_counter() - t0) * 1e3))
            await asyncio.sleep(interval_s)
    values = sorted(r for _, r in rtts)

    def q(p: float) -> float:
        return values[min(len(values) - 1, int(p / 100 * len(values)))]

    worst = sorted(rtts, key=lambda x: -x[1])[:5]
    return {
        "pings": len(values),
        "p50_ms": q(50),
        "p99_ms": q(99),
        "max_ms": values[-1],
        "over_100ms": sum(1 for v in values if v > 100),
        "worst": [{"at_s": round(t, 2), "rtt_ms": round(r, 1)} for t, r in worst],
    }


def health(port: int) -> dict[str, Any]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5) as resp:
        return dict(json.loads(resp.read()))


async def run(args: argparse.Namespace) -> dict[str, Any]:
    top = args.count_list[-1]
    nofile = raise_nofile(max(65536, 2 * top + 4096))
    result: dict[str, Any] = {"benchmark": NAME, "machine": machine_info(), "argv": sys.argv[1:], "nofile": nofile}
    result["config"] = {k: v for k, v in vars(args).items()}
    cap = nofile[0] - 500  # the gateway's other descriptors: listeners, Consul, its webapp pool (up to 100), CS links
    if top > cap:
        print(
            f"connections: RLIMIT_NOFILE is {nofile} and cannot be raised here; one gateway holds at most "
            f"~{cap} sockets: measuring at {cap} instead of {top}",
            file=sys.stderr,
        )
        result["clipped"] = {"asked": top, "measured": cap, "nofile": nofile}
        args.count_list = sorted({min(c, cap) for c in args.count_list})
        top = cap
    print(f"connections: starting a one-gateway fleet with {top} seeded users (nofile {nofile}) ...", flush=True)
    with FleetRun("--regions", "us-east", "--gateways-per-region", "1", "--seed-users", str(top + 1)) as fleet:
        result["fleet_startup_s"] = fleet.startup_s
        gw = fleet.processes("gateway")[0]
        gw_pid, gw_metrics = int(gw["pid"]), int(gw["metrics_port"])
        users = [u for u in fleet.seed["users"] if not u["is_bot"]][:top]
        n_addrs = max(1, -(-top // args.per_addr))
        addrs = [f"127.0.0.{2 + k}" for k in range(n_addrs)]
        async with LoadClients(args.client_procs) as lc:
            rss0, samples0 = await settled_rss(gw_pid, SETTLE_BAND_BYTES, args.settle_s, SETTLE_MIN_S)
            points = [{"connections": 0, "held": 0, "gateway_rss_bytes": rss0, "settle_samples": samples0}]
            print(f"connections: gateway RSS with no connection: {mib(rss0)} MiB", flush=True)
            have = 0
            for count in args.count_list:
                batch = users[have:count]
                n = len(lc.clients)
                chunks = [batch[k::n] for k in range(n)]
                cpu0 = cpu_seconds(gw_pid)
                t0 = time.monotonic()
                watch = ConsulWatch(fleet.info["consul_url"], consul_token(str(fleet.data_dir)))
                watch.start()
                replies = await lc.all(
                    "connect",
                    per_client=[{"tokens": [u["token"] for u in c]} for c in chunks],
                    api_url=fleet.api_url,
                    local_addrs=addrs,
                    concurrency=max(1, args.concurrency // n),
                    timeout_s=30.0,
                    deadline_s=args.connect_deadline_s,
                )
                connect_s = time.monotonic() - t0
                connect_cpu = cpu_seconds(gw_pid) - cpu0
                unhealthy_s = await watch.stop()
                failed = sum(r["failed"] for r in replies)
                errors: dict[str, int] = {}
                retries: dict[str, int] = {}
                for r in replies:
                    for k, v in r["errors"].items():
                        errors[k] = errors.get(k, 0) + v
                    for k, v in r.get("retries", {}).items():
                        retries[k] = retries.get(k, 0) + v
                have = count
                held = health(gw_metrics)
                rss, samples = await settled_rss(gw_pid, SETTLE_BAND_BYTES, args.settle_s, SETTLE_MIN_S)
                idle0, t_idle = cpu_seconds(gw_pid), time.monotonic()
                await asyncio.sleep(args.idle_s)  # held and idle: websocket keepalive pings, Consul TTL
                idle_pct = (cpu_seconds(gw_pid) - idle0) / (time.monotonic() - t_idle) * 100
                held = health(gw_metrics)
                held_n = int(held.get("connections") or count)  # what the gateway holds is the denominator
                stats = await lc.all("stat")
                point = {
                    "connections": count,
                    "connected_total": sum(s["open"] for s in stats),
                    "gateway_connections": held.get("connections"),
                    "gateway_channels": held.get("channels"),
                    "failed": failed,
                    "errors": errors,
                    "rtm_connect_retries": retries,
                    "gateway_not_passing_in_consul_s": unhealthy_s,
                    "connect_s": connect_s,
                    "connects_per_s": len(batch) / connect_s if connect_s else None,
                    "gateway_cpu_s_connecting": connect_cpu,
                    "gateway_cpu_ms_per_connect": connect_cpu * 1e3 / max(1, len(batch) - failed),
                    "gateway_rss_bytes": rss,
                    "settle_samples": samples,
                    "bytes_per_connection": (rss - rss0) / max(1, held_n),
                    "incremental_bytes_per_connection": (rss - points[-1]["gateway_rss_bytes"])
                    / max(1, held_n - points[-1].get("held", 0)),
                    "held": held_n,
                    "gateway_idle_cpu_percent": idle_pct,
                    "load_client_rss_bytes": {lab: rss_bytes(pid) for lab, pid in lc.pids().items()},
                }
                point["goal_met"] = point["bytes_per_connection"] <= GOAL_BYTES_PER_CONN
                points.append(point)
                print(
                    f"  {count:>6} connections (gateway says {point['gateway_connections']}, failed {failed}): "
                    f"RSS {mib(rss)} MiB, {point['bytes_per_connection'] / 1024:.1f} KiB/conn "
                    f"(incremental {point['incremental_bytes_per_connection'] / 1024:.1f}), connect {connect_s:.1f}s, "
                    f"gateway {point['gateway_cpu_ms_per_connect']:.2f} ms CPU/connect, idle CPU {idle_pct:.1f}%",
                    flush=True,
                )
                if errors or retries or unhealthy_s:
                    print(
                        f"    errors: {errors}; rtm.connect retried: {retries}; "
                        f"gateway not passing in Consul for ~{unhealthy_s:.1f}s while connecting",
                        flush=True,
                    )
            result["points"] = points
            if args.probe_s > 0:  # does the idle gateway leave messages waiting (keepalive sweeps, GC)?
                spare = [u for u in fleet.seed["users"] if not u["is_bot"]][top]
                probe = await ping_probe(fleet.api_url, spare["token"], args.probe_s)
                result["ping_probe"] = probe
                print(
                    f"connections: RTM ping round trips through the gateway holding {points[-1].get('held')} idle "
                    f"connections, {args.probe_s:.0f} s: {json.dumps(probe)}",
                    flush=True,
                )
            if args.profile_idle and pyspy_available():
                out = RESULTS_DIR / f"{NAME}{'-quick' if args.quick else ''}-pyspy-idle-gateway.txt"
                loop = asyncio.get_running_loop()
                top_fns = await loop.run_in_executor(None, pyspy_top, gw_pid, 25, out)
                result["idle_profile"] = {
                    "connections": points[-1].get("held"),
                    "top": top_fns,
                    "raw": str(out.relative_to(REPO_ROOT)),
                }
                print(f"connections: py-spy of the idle gateway holding {points[-1].get('held')} connections:")
                for f, own, tot in top_fns[:10]:
                    print(f"    {own:5.1f}% own {tot:5.1f}% total  {f}")
    return result


def trace_gateway_tls(data_dir: Path) -> list[str]:
    """``--tls-*`` flags for the traced gateway: a gateway certificate from the fleet's own CA."""
    paths = FleetCertificates(data_dir / "tls").ensure("bench-gw-trace", PeerIdentity(GATEWAY, "gw-trace"))
    return ["--tls-ca", str(paths.ca), "--tls-cert", str(paths.cert), "--tls-key", str(paths.key)]


async def trace(args: argparse.Namespace) -> dict[str, Any]:
    """Where a connection's memory goes: the gateway's own code run in THIS process under tracemalloc.

    A one-gateway fleet runs as usual; a second gateway (the same ``gateway.app.Gateway``, region
    ``trace``) runs in this process, and the load client asks ``rtm.connect`` for region ``trace``.
    Python heap allocations made while the connections open (and still live after a settle) are
    grouped by allocation site; allocations of the bench's own code are excluded.
    """
    import gc
    import tracemalloc

    from gateway.app import Gateway, build_parser, load_secret

    n = args.trace
    raise_nofile(65536)
    result: dict[str, Any] = {"benchmark": NAME + "-trace", "machine": machine_info(), "connections": n}
    with FleetRun("--regions", "us-east", "--gateways-per-region", "1", "--seed-users", str(n + 1)) as fleet:
        consul = fleet.info["consul_url"].removeprefix("http://")
        gw_args = build_parser().parse_args(
            [
                "--host",
                "127.0.0.1",
                "--port",
                "0",
                "--metrics-port",
                "0",
                "--instance-id",
                "gw-trace",
                "--region",
                "trace",
                "--consul",
                consul,
                "--consul-token",
                role_token(Path(fleet.data_dir), GATEWAY),  # a gateway registers as one: the gateway's token
                "--data-dir",
                str(fleet.data_dir),
                "--log-level",
                "WARNING",
                *trace_gateway_tls(Path(fleet.data_dir)),
            ]
        )
        gw_args.secret = load_secret(gw_args)
        tracemalloc.start(12)
        gateway = Gateway(gw_args)
        info = await gateway.start()
        mine = f"{info['host']}:{info['port']}"
        try:
            users = [u for u in fleet.seed["users"] if not u["is_bot"]][: n + 1]
            async with LoadClients(1) as lc:
                client = lc.clients[0]
                deadline = time.monotonic() + 30  # the webapp learns of our gateway from Consul
                while True:
                    probe = await client.call(
                        "connect", tokens=[users[0]["token"]], api_url=fleet.api_url, region="trace"
                    )
                    if probe["gw"][0] == mine or time.monotonic() > deadline:
                        break
                    await asyncio.sleep(0.5)
                if probe["gw"][0] != mine:
                    raise RuntimeError(f"the webapp never handed out tickets for {mine}: {probe}")
                await asyncio.sleep(2.0)
                gc.collect()
                before = tracemalloc.take_snapshot()
                reply = await client.call(
                    "connect",
                    tokens=[u["token"] for u in users[1:]],
                    api_url=fleet.api_url,
                    region="trace",
                    concurrency=100,
                    timeout_s=60.0,
                )
                await asyncio.sleep(5.0)
                gc.collect()
                after = tracemalloc.take_snapshot()
                held = len(gateway.state.sessions) - 1
        finally:
            await gateway.stop()
            tracemalloc.stop()
    keep = [tracemalloc.Filter(False, str(BENCH_DIR) + "/*"), tracemalloc.Filter(False, tracemalloc.__file__)]
    diff = after.filter_traces(keep).compare_to(before.filter_traces(keep), "traceback")
    conns = max(1, held)
    total = sum(d.size_diff for d in diff)
    by_site: dict[str, int] = {}
    by_area: dict[str, int] = {}
    for d in diff:
        frames = list(d.traceback)[::-1]  # most recent call first
        site = next((f for f in frames if _short(f.filename).startswith(("gateway/", "services/"))), frames[0])
        key = f"{_short(frames[0].filename)}:{frames[0].lineno} <- {_short(site.filename)}:{site.lineno}"
        by_site[key] = by_site.get(key, 0) + d.size_diff
        area = _area(frames)
        by_area[area] = by_area.get(area, 0) + d.size_diff
    result.update(
        {
            "connected": reply["connected"],
            "gateway_sessions": held,
            "traced_bytes_per_connection": total / conns,
            "by_area_bytes_per_connection": {k: v / conns for k, v in sorted(by_area.items(), key=lambda kv: -kv[1])},
            "top_sites_bytes_per_connection": {
                k: v / conns for k, v in sorted(by_site.items(), key=lambda kv: -kv[1])[:40]
            },
        }
    )
    print(f"traced Python heap per connection: {total / conns:,.0f} B over {held} sessions")
    for k, v in list(result["by_area_bytes_per_connection"].items())[:15]:
        print(f"  {v:8,.0f} B  {k}")
    print("top allocation sites (allocating line <- first rtm frame):")
    for k, v in list(result["top_sites_bytes_per_connection"].items())[:25]:
        print(f"  {v:8,.0f} B  {k}")
    return result


def _short(filename: str) -> str:
    for marker in ("site-packages/", str(REPO_ROOT) + "/", "python3.11/"):
        if marker in filename:
            return filename.split(marker, 1)[1]
    return filename


def _area(frames: list[Any]) -> str:
    """Who asked for the memory: the library that allocated it and the first rtm frame above it."""
    names = [_short(f.filename) for f in frames]
    lib = names[0].split("/", 1)[0] if "/" in names[0] else names[0]
    rtm = [n for n in names if n.startswith(("gateway/", "services/"))]
    if names[0].startswith(("gateway/", "services/")):
        return names[0]
    return f"{lib} (via {rtm[0]})" if rtm else lib


def render(result: dict[str, Any]) -> str:
    rows = []
    for p in result["points"]:
        if p["connections"] == 0:
            rows.append([0, mib(p["gateway_rss_bytes"]), "–", "–", "–", "–", "–", "–"])
            continue
        rows.append(
            [
                f"{p['connections']:,}",
                mib(p["gateway_rss_bytes"]),
                f"{p['bytes_per_connection'] / 1024:.2f}",
                f"{p['incremental_bytes_per_connection'] / 1024:.2f}",
                f"{p['gateway_connections']:,}" if p["gateway_connections"] is not None else "?",
                fmt(p["gateway_cpu_ms_per_connect"], 2),
                fmt(p.get("gateway_idle_cpu_percent"), 1),
                "met" if p["goal_met"] else "**missed**",
            ]
        )
    return md_table(
        [
            "connections",
            "gateway RSS MiB",
            "KiB per connection",
            "incremental KiB/conn",
            "held (gateway /healthz)",
            "gateway CPU ms per connect",
            "gateway idle CPU %",
            "goal ≤16 KiB/conn",
        ],
        rows,
    )


def plot(result: dict[str, Any], name: str) -> None:
    pyplot = plt()
    pts = result["points"]
    x = [p["connections"] for p in pts]
    y = [p["gateway_rss_bytes"] / 2**20 for p in pts]
    fig, ax = pyplot.subplots(figsize=(6.5, 4.2))
    ax.plot(x, y, "o-", label="gateway RSS (measured)")
    base = y[0]
    ax.plot(
        [0, x[-1]],
        [base, base + x[-1] * GOAL_BYTES_PER_CONN / 2**20],
        "--",
        color="grey",
        label="goal: 16 KiB/connection",
    )
    for p in pts[1:]:
        ax.annotate(
            f"{p['bytes_per_connection'] / 1024:.1f} KiB/conn",
            (p["connections"], p["gateway_rss_bytes"] / 2**20),
            textcoords="offset points",
            xytext=(-30, 8),
            fontsize=8,
        )
    ax.set_xlabel("idle websocket connections on one gateway")
    ax.set_ylabel("gateway RSS, MiB")
    ax.set_title("rtm gateway memory per connection")
    ax.grid(True, alpha=0.3)
    ax.legend(loc="upper left")
    save_figure(fig, name)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    install_uvloop()
    started = time.monotonic()
    if args.trace:
        result = asyncio.run(trace(args))
        save_json(NAME + "-trace", result)
        print(f"wrote bench/results/{NAME}-trace.json in {time.monotonic() - started:.0f}s")
        return 0
    result = asyncio.run(run(args))
    result["elapsed_s"] = time.monotonic() - started
    publish(NAME + ("-quick" if args.quick else ""), result, render, plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
