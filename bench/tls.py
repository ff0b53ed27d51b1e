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
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench import fanout
from bench.harness import machine_info, run_benchmark
from bench.stats import med, pct
from bench.tls_ladder import (
    LADDER_BIG_RATES,
    LADDER_IDLE_S,
    LADDER_SMALL_RATES,
    fleet_ladder,
    ladder_fit,
    render_ladder,
)

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


def plot(result: dict[str, Any], name: str) -> None:
    return None


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return run_benchmark(args.name, args, run, render, plot, loadavg=True)


if __name__ == "__main__":
    sys.exit(main())
