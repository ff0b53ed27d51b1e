"""What mutual TLS on the internal wire costs (docs/trust.md, "Cost, measured").

Four measurements, each with and without TLS in the same run:

1. **The ladder** (``--ladder-repeats`` fleets per mode, alternating on/off): one
   fleet (``rtm up``), ``--clients`` websocket clients connected, then the
   gateways' CPU (schedstat, nanosecond-exact; user/system, wakeups and read/write
   syscalls from /proc) while idle for ``--idle-s`` (one websocket ping round), at
   each rate of ``--ladder-small`` on the 20-member channels and of ``--ladder-big``
   on #general. Prints CPU per delivery per step, the idle cost, and a
   least-squares line (marginal CPU per delivery) over the steps at load.
   ``--perf``: ``perf record`` of both gateways during an extra step (the share
   of their CPU in the TLS libraries, uvloop's TLS protocol, malloc);
   ``--strace``: ``strace -c -f`` of a gateway idle and at 100 posts/s.
2. **Connect + handshake**, in this process: a fleet server (``serve``) and a
   client (``connect``) on localhost, ``--connects`` sequential dials each
   answered by one ``ping``; wall time per dial (median, p99) and this
   process's CPU per dial (client and server sides together).
3. **The link** (in this process, both ends): CPU per ``ev`` frame on one channel
   server -> gateway connection, one frame per write or four (a loop turn's events
   batched into one write, ``--batch-gateway-events``), and one frame per 2 ms
   wakeup (a low rate: every record read cold). ``--no-micro`` skips 2 and 3.
4. **The message path**, through the whole fleet (``--repeats`` fleets per mode,
   alternating): the fan-out benchmark's steps (bench/fanout.py), reporting the
   gateways' CPU per delivery and the CPU per posted message of the webapp, the
   admin servers and the channel servers (the publish path).

The machine is shared: tables quote medians over the repeats, and each step
records the CPU others used meanwhile (``foreign_cores``).

    python -m bench.tls --clients 2000 --repeats 0 --ladder-repeats 2 --no-micro --perf --step-s 15
    python -m bench.tls --quick      # about 2 minutes
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench import fanout
from bench.harness import machine_info, run_benchmark
from bench.stats import med, pct

NAME = "tls"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.tls", description=__doc__)
    p.add_argument("--connects", type=int, default=300, help="sequential dials per mode (handshake)")
    p.add_argument("--clients", type=int, default=200, help="websocket clients of the fan-out runs")
    p.add_argument("--small-rates", default="100", help="posts/s to small channels")
    p.add_argument("--big-rates", default="10", help="posts/s to #general")
    p.add_argument("--step-s", type=float, default=5.0)
    p.add_argument("--repeats", type=int, default=2, help="fleet runs per mode, alternating on/off")
    p.add_argument("--quick", action="store_true", help="one fleet run per mode, shorter steps")
    p.add_argument(
        "--ladder-repeats",
        type=int,
        default=1,
        help="fleet runs per mode of the ladder (idle, then a ladder of rates; 0: none), alternating on/off",
    )
    p.add_argument("--ladder-small", default=LADDER_SMALL_RATES, help="the ladder's posts/s to 20-member channels")
    p.add_argument("--ladder-big", default=LADDER_BIG_RATES, help="the ladder's posts/s to #general")
    p.add_argument("--idle-s", type=float, default=LADDER_IDLE_S, help="the ladder's idle window, seconds")
    p.add_argument("--name", default=NAME, help="results file name under bench/results/")
    p.add_argument("--no-micro", action="store_true", help="skip the in-process handshake and link measurements")
    p.add_argument("--strace", action="store_true", help="after each ladder, strace -c a gateway (idle; 100 posts/s)")
    p.add_argument("--perf", action="store_true", help="after each ladder, perf record both gateways (idle; small)")
    p.add_argument("--perf-rate", type=float, default=100.0, help="posts/s to small channels while --perf records")
    p.add_argument("--wait-quiet", action="store_true", help="ladder steps wait (bounded) for others' load to pass")
    args = p.parse_args(argv)
    if args.quick:
        args.repeats, args.step_s, args.connects = 1, 4.0, 200
        args.ladder_small, args.idle_s = "100,1000", 10.0
    args.ladder_small = [float(x) for x in args.ladder_small.split(",") if x]
    args.ladder_big = [float(x) for x in args.ladder_big.split(",") if x]
    return args


async def handshakes(mode: str, count: int) -> dict[str, Any]:
    from services import wire
    from services.certs import FleetCertificates
    from services.connection import PeerConnection, connect, serve
    from services.identity import PeerIdentity
    from services.tls import WireTrust

    def trust(certs: FleetCertificates, service: str, iid: str) -> WireTrust:
        if mode == "off":
            return WireTrust.off()
        paths = certs.ensure(iid, PeerIdentity(service, iid))
        return WireTrust.load(paths.ca, paths.cert, paths.key)

    certs = FleetCertificates(Path(tempfile.mkdtemp(prefix="rtm-bench-tls-")))
    server_trust, client_trust = trust(certs, "channel-server", "cs-b"), trust(certs, "gateway", "gw-b")
    server = await serve(
        "127.0.0.1",
        0,
        lambda: PeerConnection(on_request=lambda c, m: wire.reply_ok(m["id"])),
        trust=server_trust,
    )
    port = server.sockets[0].getsockname()[1]
    walls: list[float] = []
    cpu0 = time.process_time()
    for _ in range(count):
        t = time.perf_counter()
        conn = await connect("127.0.0.1", port, PeerConnection, trust=client_trust)
        await conn.request({"op": "ping"})
        walls.append(time.perf_counter() - t)
        conn.close()
        await conn.closed
    cpu = time.process_time() - cpu0
    server.close()
    return {
        "mode": mode,
        "connects": count,
        "median_ms": (pct(walls, 50) or 0.0) * 1e3,
        "p99_ms": (pct(walls, 99) or 0.0) * 1e3,
        "cpu_us_per_connect": cpu / count * 1e6,
    }


# The link measurement (3.): event frames a channel server writes to one gateway, per write.
LINK_FRAMES = 20_000
LINK_BATCHES = (1, 4)  # 1: a write per event (no batching); 4: four events of one loop turn in one write
# The low-rate link series: one frame per wakeup, this far apart (500 events/s: every one its own read).
LINK_LOW_RATE_GAP_S = 0.002
LINK_LOW_RATE_FRAMES = 2_500
LINK_EVENT_JSON_BYTES = 400  # about a message event's client JSON


async def link_frames(mode: str, per_write: int, count: int = LINK_FRAMES, gap_s: float = 0.0) -> dict[str, Any]:
    """CPU per ``ev`` frame on the channel server -> gateway link, both ends in this process:
    the server side writes ``per_write`` frames per transport write, one write per loop turn
    (what ``--batch-gateway-events`` does when a turn holds several events), the client side
    reads and parses them (``on_push``). With ``gap_s``, the writer sleeps that long between
    writes, so every frame is a wakeup and a read of its own, as at a low event rate."""
    from services import wire
    from services.certs import FleetCertificates
    from services.connection import PeerConnection, connect, serve
    from services.identity import PeerIdentity
    from services.tls import WireTrust

    def trust(certs: FleetCertificates, service: str, iid: str) -> WireTrust:
        if mode == "off":
            return WireTrust.off()
        paths = certs.ensure(iid, PeerIdentity(service, iid))
        return WireTrust.load(paths.ca, paths.cert, paths.key)

    certs = FleetCertificates(Path(tempfile.mkdtemp(prefix="rtm-bench-tls-link-")))
    accepted: list[PeerConnection] = []

    def accept() -> PeerConnection:
        conn = PeerConnection(on_request=lambda c, m: wire.reply_ok(m["id"]))
        accepted.append(conn)
        return conn

    server = await serve("127.0.0.1", 0, accept, trust=trust(certs, "channel-server", "cs-l"))
    port = server.sockets[0].getsockname()[1]
    got = 0
    done = asyncio.get_running_loop().create_future()

    def on_push(conn: PeerConnection, msg: dict[str, Any]) -> None:
        nonlocal got
        got += 1
        if got == count and not done.done():
            done.set_result(None)

    client = await connect(
        "127.0.0.1", port, lambda: PeerConnection(on_push=on_push), trust=trust(certs, "gateway", "gw-l")
    )
    await client.request({"op": "ping"})  # the server side is connected
    frame = wire.encode({"op": "ev", "ch": "C0123456789", "seq": 1, "json": b"x" * LINK_EVENT_JSON_BYTES, "t0": 1.0})
    (conn,) = accepted
    cpu0, t0 = time.process_time(), time.perf_counter()
    for _ in range(count // per_write):
        conn.write(frame * per_write)
        await asyncio.sleep(gap_s)
    await asyncio.wait_for(done, 60)
    cpu, wall = time.process_time() - cpu0, time.perf_counter() - t0
    client.close()
    server.close()
    return {
        "mode": mode,
        "per_write": per_write,
        "frames": count,
        "cpu_us_per_frame": cpu / count * 1e6,
        "gap_s": gap_s,
        "wall_s": wall,
    }


# The ladder (4.): fixed cost against cost per delivery, per gateway.
LADDER_IDLE_S = 20.0  # idle window: 2 keepalive intervals, long enough that 10 ms CPU ticks do not matter
LADDER_SMALL_RATES = "100,500,1000,2000"  # posts/s to the 20-member channels
LADDER_BIG_RATES = "10"  # posts/s to #general (all clients)
# The fit of marginal cost uses the steps at or above this rate: below it every event is a wakeup of
# its own (105 a second at 100 posts/s) and the cost per delivery is that of a wakeup, not a slope.
LADDER_FIT_MIN_POSTS_S = 500.0
STRACE_S = 10.0  # each strace -c window (--strace): not measured, strace slows the traced process


def proc_stat_times(pid: int) -> tuple[float, float]:
    """(user, system) CPU-seconds of ``pid``, threads included, from /proc/PID/stat."""
    import os

    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rpartition(")")[2].split()
    tick = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / tick, int(fields[12]) / tick  # utime, stime (fields 14, 15)


def proc_run_s(pid: int) -> float:
    """CPU-seconds ``pid``'s live threads have run, nanosecond-exact (/proc/PID/task/*/schedstat), where
    utime and stime are 10 ms ticks apart: a gateway at 100 posts/s uses a few ticks per second."""
    import os

    total = 0
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                total += int(f.read().split()[0])
        except (OSError, ValueError, IndexError):
            continue
    return total / 1e9


def proc_counters(pid: int) -> dict[str, int]:
    """Context switches (voluntary: wakeups from epoll) and syscall-level I/O counts of ``pid``."""
    out: dict[str, int] = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(("voluntary_ctxt_switches", "nonvoluntary_ctxt_switches")):
                    key, _, value = line.partition(":")
                    out[key] = int(value)
        with open(f"/proc/{pid}/io") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key in ("syscr", "syscw", "rchar", "wchar"):
                    out[key] = int(value)
    except OSError:
        pass
    return out


def gateway_sample(pids: dict[str, int]) -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, float]] = {}
    for label, pid in pids.items():
        user, system = proc_stat_times(pid)
        out[label] = {
            "user_s": user,
            "sys_s": system,
            "run_s": proc_run_s(pid),
            **{k: float(v) for k, v in proc_counters(pid).items()},
        }
    return out


def sample_diff(after: dict[str, dict[str, float]], before: dict[str, dict[str, float]]) -> dict[str, dict[str, float]]:
    return {label: {k: v - before[label].get(k, 0.0) for k, v in after[label].items()} for label in after}


async def strace_window(pid: int, seconds: float, out_path: Path) -> str:
    """``strace -c -f`` on ``pid`` for ``seconds``: syscall counts (the summary table), or '' without strace."""
    import signal

    exe = shutil.which("strace")
    if exe is None:
        return ""
    proc = await asyncio.create_subprocess_exec(
        exe,
        "-c",
        "-f",
        "-p",
        str(pid),
        "-o",
        str(out_path),
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )
    await asyncio.sleep(seconds)
    proc.send_signal(signal.SIGINT)
    await asyncio.wait_for(proc.wait(), 30)
    return out_path.read_text() if out_path.exists() else ""


PERF_S = 12.0  # each perf record window (--perf)


async def perf_window(pids: list[int], seconds: float, out_path: Path) -> dict[str, str]:
    """``perf record -e cpu-clock`` (software clock: works in VMs without hardware counters) on
    ``pids`` for ``seconds``; returns ``perf report`` by shared object and by symbol (text), or {}."""
    import signal

    exe = shutil.which("perf")
    if exe is None:
        return {}
    proc = await asyncio.create_subprocess_exec(
        exe,
        "record",
        "-e",
        "cpu-clock",
        "-F",
        "1999",
        "-p",
        ",".join(str(p) for p in pids),
        "-o",
        str(out_path),
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )
    await asyncio.sleep(seconds)
    proc.send_signal(signal.SIGINT)
    await asyncio.wait_for(proc.wait(), 60)
    out = {}
    for sort in ("dso", "dso,sym"):
        rep = await asyncio.create_subprocess_exec(
            exe,
            "report",
            "-i",
            str(out_path),
            "--sort",
            sort,
            "--stdio",
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.DEVNULL,
        )
        text, _ = await asyncio.wait_for(rep.communicate(), 120)
        lines = [ln for ln in text.decode(errors="replace").splitlines() if ln.strip() and not ln.startswith("#")]
        out[sort] = "\n".join(lines[:60])
    return out


async def fleet_ladder(args: argparse.Namespace, mode: str) -> dict[str, Any]:
    """One fleet (``--wire-tls mode``), ``--clients`` websocket clients: the gateways' CPU (user and
    system apart, from /proc) while idle, then at each rate of the small-channel ladder and on #general."""
    import os

    import aiohttp

    from bench.harness import FleetRun, LoadClients, ProcWatch, raise_nofile

    raise_nofile(65536)
    fargs = fanout.parse_args(["--clients", str(args.clients), "--profile", "no", "--wire-tls", mode])
    out: dict[str, Any] = {"mode": mode, "points": [], "strace": {}}
    with FleetRun("--seed-users", str(args.clients), "--wire-tls", mode) as fleet:
        async with LoadClients(fargs.client_procs) as lc:
            bench = fanout.Bench(fargs, fleet, lc)
            bench.http = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=100))
            try:
                users = [u for u in fleet.seed["users"] if not u["is_bot"]][: args.clients]
                general = next(c["id"] for c in fleet.seed["channels"] if c["name"] == "general")
                groups = await bench.make_channels(users)
                out["connect"] = await bench.connect(users)
                small = [fanout.Target(cid, m[0]["token"], bench.members(m)) for cid, m in groups]
                big = [fanout.Target(general, users[i]["token"], bench.members(users)) for i in range(10)]
                watch = ProcWatch({**fleet.labelled_pids(), **lc.pids(), "poster (bench)": os.getpid()})
                bench.watch = watch
                bench.foreign = fanout.ForeignLoad(watch)
                gw_pids = {label: watch.pids[label] for label in bench.gw_labels}
                await bench.step("warm", small + big[:1], rate=50, duration_s=(len(small) + 1) / 50, record=False)
                # idle: clients connected, nothing posted
                fmark, s0, t0 = bench.foreign.mark(), gateway_sample(gw_pids), time.monotonic()
                await asyncio.sleep(args.idle_s)
                window = time.monotonic() - t0
                out["points"].append(
                    {
                        "scenario": "idle",
                        "offered_posts_s": 0.0,
                        "window_s": window,
                        "deliveries": {label: 0 for label in gw_pids},
                        "gateways": sample_diff(gateway_sample(gw_pids), s0),
                        "foreign_cores": bench.foreign.since(fmark, bench.foreign.mark()) / window,
                    }
                )
                print(f"tls ladder {mode}: idle {out['points'][-1]}", flush=True)
                plan = [("small", small, r) for r in args.ladder_small] + [("big", big, r) for r in args.ladder_big]
                for scenario, targets, rate in plan:
                    s0 = gateway_sample(gw_pids)
                    r = await bench.step(scenario, targets, rate, args.step_s, record=args.wait_quiet)
                    fanout.print_step(r)
                    out["points"].append(
                        {
                            "scenario": scenario,
                            "offered_posts_s": rate,
                            "achieved_posts_s": r["achieved_posts_s"],
                            "window_s": r["window_s"],
                            "deliveries": {label: r["gateways"][label]["deliveries"] for label in gw_pids},
                            "gateways": sample_diff(gateway_sample(gw_pids), s0),
                            "lost": r["lost"],
                            "latency_ms": r["latency_ms"],
                            "foreign_cores": r.get("foreign_cores"),
                        }
                    )
                if args.strace:
                    tmp = Path(tempfile.mkdtemp(prefix="rtm-bench-tls-strace-"))
                    label = bench.gw_labels[0]
                    out["strace"]["idle"] = await strace_window(gw_pids[label], STRACE_S, tmp / "idle.txt")
                    spy = asyncio.ensure_future(strace_window(gw_pids[label], STRACE_S, tmp / "small.txt"))
                    await asyncio.sleep(0.5)
                    await bench.step("small", small, 100.0, STRACE_S - 1.0, record=False)
                    out["strace"]["small100"] = await spy
                    shutil.rmtree(tmp, ignore_errors=True)
                if args.perf:
                    tmp = Path(tempfile.mkdtemp(prefix="rtm-bench-tls-perf-"))
                    pids = list(gw_pids.values())
                    out["perf"] = {"idle": await perf_window(pids, PERF_S, tmp / "idle.data")}
                    spy = asyncio.ensure_future(perf_window(pids, PERF_S, tmp / "small.data"))
                    await asyncio.sleep(0.5)
                    await bench.step("small", small, args.perf_rate, PERF_S - 1.0, record=False)
                    out["perf"]["small"] = await spy
                    shutil.rmtree(tmp, ignore_errors=True)
            finally:
                await bench.http.close()
    return out


def ladder_fit(runs: list[dict[str, Any]], mode: str) -> dict[str, Any]:
    """Per gateway: CPU-seconds per second against deliveries per second over the small-channel steps
    at or above :data:`LADDER_FIT_MIN_POSTS_S`, least squares: ``slope`` is the marginal CPU per
    delivery at load, ``intercept`` what the line puts at zero deliveries (compare the measured idle
    point). Medians over the runs of ``mode``."""
    import numpy as np

    fits: dict[str, list[tuple[float, float, float, float]]] = {}
    for run in runs:
        if run["mode"] != mode:
            continue
        for label in run["points"][0]["gateways"]:
            xs, ys, ysys = [], [], []
            for p in run["points"]:
                if p["scenario"] != "small" or p["offered_posts_s"] < LADDER_FIT_MIN_POSTS_S:
                    continue
                g = p["gateways"][label]
                xs.append(p["deliveries"][label] / p["window_s"])
                ys.append(g["run_s"] / p["window_s"])
                ysys.append(g["sys_s"] / p["window_s"])
            if len(xs) >= 2:
                slope, intercept = np.polyfit(xs, ys, 1)
                sys_slope, sys_intercept = np.polyfit(xs, ysys, 1)
                fits.setdefault(label, []).append((slope, intercept, sys_slope, sys_intercept))
    out: dict[str, Any] = {}
    for label, values in fits.items():
        out[label] = {
            "slope_us_per_delivery": med([v[0] * 1e6 for v in values]),
            "fixed_cpu_percent": med([v[1] * 100 for v in values]),
            "sys_slope_us_per_delivery": med([v[2] * 1e6 for v in values]),
            "sys_fixed_cpu_percent": med([v[3] * 100 for v in values]),
        }
    return out


def publish_path(steps: list[dict[str, Any]]) -> dict[str, float | None]:
    """CPU µs per posted message, per role (webapp, admin servers, channel servers), median over steps."""
    out: dict[str, float | None] = {}
    for role, match in (("webapp", "webapp"), ("admin servers", "as-"), ("channel servers", "cs-")):
        values = []
        for s in steps:
            posts = s.get("posts_ok") or 0
            if posts:
                cpu = sum(v for k, v in s["cpu_s"].items() if k.startswith(match) and "spare" not in k)
                values.append(cpu * 1e6 / posts)
        out[role] = med(values)
    return out


async def run(args: argparse.Namespace) -> dict[str, Any]:
    result: dict[str, Any] = {"benchmark": NAME, "machine": machine_info(), "argv": sys.argv[1:]}
    result["config"] = dict(vars(args))
    result["handshake"] = []
    result["link"] = []
    result["ladder"] = []
    for rep in range(args.ladder_repeats):
        for mode in ("on", "off") if rep % 2 == 0 else ("off", "on"):
            result["ladder"].append(await fleet_ladder(args, mode))
    if result["ladder"]:
        result["ladder_fit"] = {mode: ladder_fit(result["ladder"], mode) for mode in ("off", "on")}
        print(f"tls: ladder fit {result['ladder_fit']}", flush=True)
    for mode in ("off", "on", "off", "on") if not args.no_micro else ():
        result["handshake"].append(await handshakes(mode, args.connects))
        print(f"tls: handshake {result['handshake'][-1]}", flush=True)
    for _ in range(2 if not args.no_micro else 0):
        for per_write in LINK_BATCHES:
            for mode in ("off", "on"):
                result["link"].append(await link_frames(mode, per_write))
                print(f"tls: link {result['link'][-1]}", flush=True)
        for mode in ("off", "on"):
            result["link"].append(await link_frames(mode, 1, LINK_LOW_RATE_FRAMES, LINK_LOW_RATE_GAP_S))
            print(f"tls: link {result['link'][-1]}", flush=True)
    runs: list[dict[str, Any]] = []
    for rep in range(args.repeats):
        for mode in ("on", "off") if rep % 2 == 0 else ("off", "on"):
            fargs = fanout.parse_args(
                [
                    "--clients",
                    str(args.clients),
                    "--small-rates",
                    args.small_rates,
                    "--big-rates",
                    args.big_rates,
                    "--step-s",
                    str(args.step_s),
                    "--repeats",
                    "1",
                    "--profile",
                    "no",
                    "--wire-tls",
                    mode,
                ]
            )
            r = await fanout.run(fargs)
            runs.append(
                {
                    "mode": mode,
                    "repeat": rep,
                    "steps": [
                        {
                            "scenario": s["scenario"],
                            "offered_posts_s": s["offered_posts_s"],
                            "gateway_cpu_us_per_delivery": s["gateway_cpu_us_per_delivery"],
                            "latency_ms": s.get("latency_ms"),
                            "lost": s["lost"],
                            "foreign_cores": s.get("foreign_cores"),
                            "publish_cpu_us_per_message": publish_path([s]),
                        }
                        for s in r["steps"]
                    ],
                }
            )
            print(f"tls: fleet run {mode}: {runs[-1]}", flush=True)
    result["runs"] = runs
    return result


def render(result: dict[str, Any]) -> str:
    lines = [f"# bench/tls: what mutual TLS costs ({result['machine'].get('cpu_model', '?')})", ""]
    if result.get("ladder"):
        lines += render_ladder(result) + [""]
    if result["handshake"]:
        lines += ["| wire | connect + handshake + 1 ping, median ms | p99 ms | CPU µs per connect (both sides) |"]
        lines += ["| --- | --- | --- | --- |"]
    for mode in ("off", "on") if result["handshake"] else ():
        hs = [h for h in result["handshake"] if h["mode"] == mode]
        lines.append(
            f"| {mode} | {med([h['median_ms'] for h in hs]):.3f} | {med([h['p99_ms'] for h in hs]):.3f} "
            f"| {med([h['cpu_us_per_connect'] for h in hs]):.0f} |"
        )
    if result.get("link"):
        lines += [
            "",
            "| event frames per write (CS -> gateway) | wire | CPU µs per frame, both ends |",
            "| --- | --- | --- |",
        ]
        for per_write, gap_s in [(n, 0.0) for n in LINK_BATCHES] + [(1, LINK_LOW_RATE_GAP_S)]:
            for mode in ("off", "on"):
                cpu = med(
                    [
                        x["cpu_us_per_frame"]
                        for x in result["link"]
                        if (x["mode"], x["per_write"], x.get("gap_s", 0.0)) == (mode, per_write, gap_s)
                    ]
                )
                what = f"{per_write}" + (f", one write per {gap_s * 1e3:g} ms" if gap_s else "")
                lines.append(f"| {what} | {mode} | {'-' if cpu is None else f'{cpu:.2f}'} |")
    if not result["runs"]:
        return "\n".join(lines) + "\n"
    lines += [
        "",
        "| scenario | posts/s | wire | gateway CPU µs/delivery | latency p50 / p99 ms | webapp µs/msg | admin µs/msg "
        "| CS µs/msg |",
    ]
    lines += ["| --- | --- | --- | --- | --- | --- | --- | --- |"]
    keys = sorted({(s["scenario"], s["offered_posts_s"]) for r in result["runs"] for s in r["steps"]})
    growth = []
    for scenario, rate in keys:
        row: dict[str, float | None] = {}
        for mode in ("off", "on"):
            steps = [
                s
                for r in result["runs"]
                if r["mode"] == mode
                for s in r["steps"]
                if (s["scenario"], s["offered_posts_s"]) == (scenario, rate)
            ]
            gw = med([s["gateway_cpu_us_per_delivery"] for s in steps])
            p50 = med([(s.get("latency_ms") or {}).get("p50") for s in steps])
            p99 = med([(s.get("latency_ms") or {}).get("p99") for s in steps])
            pub = {
                k: med([s["publish_cpu_us_per_message"][k] for s in steps])
                for k in steps[0]["publish_cpu_us_per_message"]
            }
            row[mode] = gw

            def f(v: float | None) -> str:
                return "-" if v is None else f"{v:.1f}"

            lines.append(
                f"| {scenario} | {rate:g} | {mode} | {f(gw)} | {f(p50)} / {f(p99)} | {f(pub['webapp'])} "
                f"| {f(pub['admin servers'])} "
                f"| {f(pub['channel servers'])} |"
            )
        if row.get("off") and row.get("on"):
            growth.append((scenario, rate, (row["on"] / row["off"] - 1) * 100))  # type: ignore[operator]
    lines.append("")
    for scenario, rate, growth_pct in growth:
        lines.append(f"- gateway CPU per delivery, {scenario} at {rate:g} posts/s: {growth_pct:+.1f} % with TLS")
    return "\n".join(lines) + "\n"


def ladder_rows(result: dict[str, Any]) -> dict[tuple[str, float, str], dict[str, float | None]]:
    """(scenario, posts/s, wire) -> medians over the runs of: both gateways' CPU per second (% of a
    core, each), their system share, CPU per delivery, deliveries/s per gateway, wakeups/s per gateway."""
    acc: dict[tuple[str, float, str], list[dict[str, float]]] = {}
    for run in result["ladder"]:
        for p in run["points"]:
            gws = p["gateways"]
            window = p["window_s"]
            n = len(gws)
            cpu = sum(g["run_s"] for g in gws.values())
            ticks = sum(g["user_s"] + g["sys_s"] for g in gws.values())
            system = sum(g["sys_s"] for g in gws.values())
            deliveries = sum(p["deliveries"].values())
            wakeups = sum(g.get("voluntary_ctxt_switches", 0.0) for g in gws.values())
            acc.setdefault((p["scenario"], p["offered_posts_s"], run["mode"]), []).append(
                {
                    "cpu_percent": cpu / window / n * 100,
                    "sys_share": system / ticks * 100 if ticks else 0.0,
                    "us_per_delivery": cpu * 1e6 / deliveries if deliveries else float("nan"),
                    "deliveries_s": deliveries / window / n,
                    "wakeups_s": wakeups / window / n,
                    "syscalls_s": sum(g.get("syscr", 0.0) + g.get("syscw", 0.0) for g in gws.values()) / window / n,
                }
            )
    return {k: {f: med([v[f] for v in vs]) for f in vs[0]} for k, vs in acc.items()}


def perf_share(report: str, needles: tuple[str, ...]) -> float:
    """The summed percentages of the ``perf report --stdio`` lines that contain one of ``needles``."""
    total = 0.0
    for line in report.splitlines():
        head, _, rest = line.strip().partition("%")
        if any(n in rest for n in needles):
            try:
                total += float(head)
            except ValueError:
                continue
    return total


def render_ladder(result: dict[str, Any]) -> list[str]:
    rows = ladder_rows(result)
    order = {"idle": 0, "small": 1, "big": 2}
    keys = sorted({(k[0], k[1]) for k in rows}, key=lambda k: (order.get(k[0], 9), k[1]))
    lines = [
        "The gateways: CPU per second each (user + system, /proc), by load, TLS off / on (medians of "
        f"{len(result['ladder']) // 2 or 1} fleet run(s) per mode):",
        "",
        "| scenario | posts/s | deliveries/s per gateway | CPU % of a core per gateway, off / on | system share "
        "off / on | µs per delivery off / on | TLS adds | wakeups/s per gateway off / on | read+write syscalls/s "
        "off / on |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]

    def f(v: float | None, digits: int = 1) -> str:
        return "-" if v is None or v != v else f"{v:.{digits}f}"

    for scenario, rate in keys:
        off, on = rows.get((scenario, rate, "off"), {}), rows.get((scenario, rate, "on"), {})
        a, b = off.get("us_per_delivery"), on.get("us_per_delivery")
        adds = f"{(b / a - 1) * 100:+.1f} %" if a and b and a == a and b == b else "-"
        lines.append(
            f"| {scenario} | {rate:g} | {f(off.get('deliveries_s'), 0)} | {f(off.get('cpu_percent'), 2)} / "
            f"{f(on.get('cpu_percent'), 2)} | {f(off.get('sys_share'), 0)} / {f(on.get('sys_share'), 0)} % | "
            f"{f(a)} / {f(b)} | {adds} | {f(off.get('wakeups_s'), 0)} / {f(on.get('wakeups_s'), 0)} | "
            f"{f(off.get('syscalls_s'), 0)} / {f(on.get('syscalls_s'), 0)} |"
        )
    perf = [(run["mode"], run["perf"]["small"]) for run in result["ladder"] if (run.get("perf") or {}).get("small")]
    if perf:
        lines += [
            "",
            "perf record (cpu-clock) of both gateways during an extra small-channel step at "
            f"{result['config'].get('perf_rate', 100):g} posts/s: share of their CPU samples in the TLS libraries "
            "(libcrypto, libssl, CPython's _ssl), in uvloop's TLS protocol and in glibc's malloc:",
            "",
            "| wire | libcrypto + libssl + _ssl | uvloop SSLProtocol | _int_malloc + malloc_consolidate | kernel |",
            "| --- | --- | --- | --- | --- |",
        ]
        for mode, rep in perf:
            lines.append(
                f"| {mode} | {f(perf_share(rep['dso'], ('libcrypto', 'libssl', '_ssl.')), 2)} % "
                f"| {f(perf_share(rep['dso,sym'], ('SSLProtocol',)), 2)} % "
                f"| {f(perf_share(rep['dso,sym'], ('] _int_malloc', '] malloc_consolidate')), 2)} % "
                f"| {f(perf_share(rep['dso'], ('[kernel',)), 1)} % |"
            )
    fit = result.get("ladder_fit") or {}
    if fit:
        lines += [
            "",
            "Least-squares fit per gateway over the small-channel steps at or above "
            f"{LADDER_FIT_MIN_POSTS_S:g} posts/s (CPU/s = intercept + slope x deliveries/s), medians of the runs "
            "(the measured idle cost is the table's first row):",
            "",
            "| gateway | wire | intercept, % of a core | of which system | marginal µs per delivery | of which system |",
            "| --- | --- | --- | --- | --- | --- |",
        ]
        for mode in ("off", "on"):
            for label, v in sorted((fit.get(mode) or {}).items()):
                lines.append(
                    f"| {label} | {mode} | {f(v['fixed_cpu_percent'], 2)} | {f(v['sys_fixed_cpu_percent'], 2)} "
                    f"| {f(v['slope_us_per_delivery'], 2)} | {f(v['sys_slope_us_per_delivery'], 2)} |"
                )
    return lines


def plot(result: dict[str, Any], name: str) -> None:
    return None


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return run_benchmark(args.name, args, run, render, plot, loadavg=True)


if __name__ == "__main__":
    sys.exit(main())
