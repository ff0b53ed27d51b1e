"""Reference: CPU per delivery of a bare single-process ``websockets.broadcast()`` server.

No rtm code on the sending side: one server process (uvloop, websockets' asyncio
implementation, ``websockets.asyncio.server.serve(..., compression=None)``)
holds C websockets (default 2,000) and, at a paced rate of rounds/s, calls
``websockets.asyncio.server.broadcast(connections, message)`` with one ~180-byte
text message (a ``"type":"message"`` event like rtm's). The clients are held by
separate load-client processes (default 2 x 1,000; picows + uvloop, the frame
``latency`` recorder of :mod:`bench.load_client`, which records every message frame), so
the setup mirrors the ``big`` scenario of :mod:`bench.fanout` (2,000 clients in
2 load-client processes, 5/10/20/40 posts/s, 6 s steps, 3 interleaved repeats,
medians) with the whole fleet replaced by one ``broadcast()`` per round.

Per step: server CPU µs per delivery (psutil user+system of the server process,
split), deliveries per server CPU-second, load-client CPU µs per delivery, and
frames received vs expected (lost, duplicated). CPU is counted from just before
the first round to the moment the clients have every frame (as in bench.fanout).
A step during which processes outside the benchmark used more than
``--max-foreign-cores`` is run again (bounded), as in bench.fanout.

    python -m bench.broadcast            # 2,000 clients, 5/10/20/40 rounds/s, ~2 minutes
    python -m bench.broadcast --quick    # smoke run, ~20 s

Role (internal): ``--role server`` is the server child process, controlled by JSON lines on
stdin like :mod:`bench.load_client` (the clients' processes, given the server's URL).

Why one module over 500 lines: one reference benchmark whose server role and controller must agree
on the message and the schedule; the clients are bench.load_client's, the statistics bench.stats'.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench.control import control_loop
from bench.harness import (
    ForeignLoad,
    LoadClient,
    LoadClients,
    ProcWatch,
    diff,
    fmt,
    install_uvloop,
    machine_info,
    md_table,
    plt,
    publish,
    raise_nofile,
    save_figure,
    save_text,
)
from bench.stats import med, pct

NAME = "broadcast"
KEY_CONN_BITS = 20  # delivery key = round id << 20 | conn
MESSAGE_BYTES = 180
HELLO = '{"type":"hello"}'  # what a bench.load_client client waits for before it counts a connection open


def message(round_id: int, send_us: int) -> str:
    """A ~180-byte message event; its text ``m<id>:<send µs>`` is what bench.load_client records."""
    head = (
        f'{{"type":"message","channel":"C0123456789A","user":"U0123456789A","text":"m{round_id}:{send_us}",'
        f'"ts":"{send_us // 1_000_000}.{send_us % 1_000_000:06d}","team":"T0123456789A","client_msg_id":"'
    )
    tail = '"}'
    pad = max(0, MESSAGE_BYTES - len(head) - len(tail))
    return head + "x" * pad + tail


# -- child processes: the server and the clients, each answering bench.control's JSON lines --------


async def server_role(ping_interval: float | None) -> None:
    """The bare server: websockets' asyncio serve() + broadcast(), nothing else."""
    from websockets.asyncio.server import ServerConnection, broadcast, serve

    conns: set[ServerConnection] = set()

    async def handler(ws: ServerConnection) -> None:
        conns.add(ws)
        try:
            await ws.send(HELLO)
            await ws.wait_closed()
        finally:
            conns.discard(ws)

    async with serve(handler, "127.0.0.1", 0, compression=None, ping_interval=ping_interval, backlog=4096) as server:
        port = server.sockets[0].getsockname()[1]
        loop = asyncio.get_running_loop()

        async def info(req: dict[str, Any]) -> dict[str, Any]:
            return {"ok": True, "port": port, "open": len(conns), "pid": os.getpid()}

        async def run(req: dict[str, Any]) -> dict[str, Any]:
            rate, rounds, first = float(req["rate"]), int(req["rounds"]), int(req["first_id"])
            targets = 0
            late_max = 0.0
            t0 = t_last = loop.time()
            for i in range(rounds):
                delay = t0 + i / rate - loop.time()
                late_max = max(late_max, -delay)
                await asyncio.sleep(max(0.0, delay))
                t_last = loop.time()
                targets += len(conns)
                broadcast(conns, message(first + i, time.time_ns() // 1000))
            return {
                "ok": True,
                "rounds": rounds,
                "targets": targets,
                "open": len(conns),
                "elapsed_s": loop.time() - t0,
                "first_to_last_round_s": t_last - t0,
                "late_max_ms": late_max * 1e3,
            }

        async def quit_(req: dict[str, Any]) -> dict[str, Any]:
            server.close()  # closes every connection (1001) and the listener
            try:
                await asyncio.wait_for(server.wait_closed(), 15)
            except TimeoutError:
                pass
            return {"ok": True}

        await control_loop({"info": info, "run": run, "quit": quit_})


# -- the controller --------------------------------------------------------------------------------

CHILD_PIDS: list[int] = []  # every process this run started: killed at exit if still there


class Child(LoadClient):
    """A child process this run started (its pid kept for :func:`kill_leftovers`): the server
    (``python -m bench.broadcast --role server``) or a load client (``role="client"``)."""

    def __init__(self, index: int, role: str, extra: list[str] | None = None) -> None:
        super().__init__(index)
        self.role = role
        self.extra = list(extra or [])

    def child_args(self) -> list[str]:
        if self.role == "client":
            return super().child_args()
        return ["-m", "bench.broadcast", "--role", self.role, *self.extra]

    async def start(self, env: dict[str, str] | None = None) -> None:
        await super().start(env)
        CHILD_PIDS.append(self.pid)


def kill_leftovers() -> list[int]:
    """Last resort (error paths): kill any child this process started that is still running."""
    import psutil

    killed = []
    for pid in CHILD_PIDS:
        try:
            p = psutil.Process(pid)
            if p.ppid() == os.getpid() and p.status() != psutil.STATUS_ZOMBIE:
                p.kill()
                killed.append(pid)
            p.wait(timeout=5)
        except (psutil.Error, ChildProcessError):
            pass
    return killed


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m bench.broadcast", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--role", choices=["controller", "server"], default="controller", help=argparse.SUPPRESS)
    p.add_argument("--clients", type=int, default=2000, help="websocket clients (all receive every round)")
    p.add_argument("--client-procs", type=int, default=2, help="load-client processes holding them")
    p.add_argument("--rates", default="5,10,20,40", help="rounds/s (one broadcast() to every client per round)")
    p.add_argument("--step-s", type=float, default=6.0, help="broadcasting time per step")
    p.add_argument("--repeats", type=int, default=3, help="runs of every step (interleaved); tables quote the median")
    p.add_argument(
        "--ping-interval",
        type=float,
        default=20.0,
        help="websockets keepalive ping interval, s (20 = websockets' default and rtm's gateway sweep); 0 = off",
    )
    p.add_argument(
        "--max-foreign-cores",
        type=float,
        default=0.1,
        help="re-run a step during which processes outside the benchmark used more CPU than this (shared machine)",
    )
    p.add_argument("--max-reruns", type=int, default=8, help="re-runs allowed in one run (bounds the time)")
    p.add_argument("--idle-s", type=float, default=5.0, help="idle baseline (clients connected, nothing sent)")
    p.add_argument("--quick", action="store_true", help="smoke run (~20 s): 2 short steps, 1 repeat")
    p.add_argument("--render", metavar="JSON", help="only rebuild the .md and .png from a saved result (no measuring)")
    args = p.parse_args(argv)
    if args.quick:
        args.rates = "5,20"
        args.step_s = 2.0
        args.repeats = 1
        args.idle_s = 1.0
        args.max_reruns = 0
    args.rate_list = [float(x) for x in str(args.rates).split(",") if x]
    return args


class Bench:
    def __init__(self, args: argparse.Namespace, server: Child, clients: list[Child]) -> None:
        self.args = args
        self.server = server
        self.clients = clients
        self.next_id = 1
        self.offsets: list[int] = []
        self.conns = np.zeros(0, dtype=np.int64)  # global indexes of the connected clients
        self.closed: dict[int, int] = {}
        self.tmp = Path(tempfile.mkdtemp(prefix="rtm-broadcast-"))
        self.watch: ProcWatch | None = None
        self.foreign: ForeignLoad | None = None

    async def connect(self, url: str) -> dict[str, Any]:
        n = len(self.clients)
        per = [self.args.clients // n + (1 if k < self.args.clients % n else 0) for k in range(n)]
        started = time.monotonic()
        replies = await asyncio.gather(
            *(c.call("connect", url=url, n=per[k], concurrency=100, timeout_s=30.0) for k, c in enumerate(self.clients))
        )
        conns, errors, offset = [], {}, 0
        for k, reply in enumerate(replies):
            self.offsets.append(offset)
            conns += [offset + i for i in reply["conns"]]
            for e, v in reply["errors"].items():
                errors[e] = errors.get(e, 0) + v
            offset += per[k]
        self.conns = np.array(conns, dtype=np.int64)
        return {
            "requested": self.args.clients,
            "connected": len(conns),
            "failed": self.args.clients - len(conns),
            "errors": errors,
            "per_client_proc": [r["connected"] for r in replies],
            "elapsed_s": time.monotonic() - started,
        }

    async def collect(self) -> np.ndarray:
        return np.asarray(await LoadClients.of(list(self.clients)).collect(self.offsets, self.tmp, self.closed))

    async def step(self, rate: float, duration_s: float, record: bool = True) -> dict[str, Any]:
        assert self.watch is not None and self.foreign is not None
        rounds = max(1, round(rate * duration_s))
        first = self.next_id
        self.next_id += rounds
        await self.collect()  # drop anything stray
        quiet = await self.foreign.wait_quiet(max_wait_s=10.0 if self.args.quick else 60.0) if record else {}
        fmark = self.foreign.mark()
        times0 = self.watch.times()
        t_start = time.monotonic()
        srv = await self.server.call(
            "run", reply_timeout_s=duration_s * 3 + 60, rate=rate, rounds=rounds, first_id=first
        )
        t_sent = time.monotonic()
        live = (
            self.conns
            if not self.closed
            else np.array([c for c in self.conns if int(c) not in self.closed], dtype=np.int64)
        )
        expected = rounds * len(live)
        await LoadClients.of(list(self.clients)).wait_frames(expected)
        t_end = time.monotonic()
        times1 = self.watch.times()
        foreign = self.foreign.since(fmark, self.foreign.mark()) / max(1e-9, t_end - t_start)
        rec = await self.collect()

        rec = rec[(rec[:, 1] >= first) & (rec[:, 1] < first + rounds)]
        keys = (rec[:, 1] << KEY_CONN_BITS) | rec[:, 0]
        uniq, first_idx, counts = np.unique(keys, return_index=True, return_counts=True)
        exp_keys = (
            (np.arange(first, first + rounds, dtype=np.int64)[:, None] << KEY_CONN_BITS) | live[None, :]
        ).ravel()
        hit = np.isin(uniq, exp_keys)
        delivered = int(hit.sum())
        lat_ms = rec[first_idx[hit], 3] / 1e3

        user = {k: times1[k][0] - times0[k][0] for k in times1}
        sys_ = {k: times1[k][1] - times0[k][1] for k in times1}
        cpu = {k: user[k] + sys_[k] for k in times1}
        client_labels = [k for k in cpu if k.startswith("load client")]
        cl_cpu = sum(cpu[k] for k in client_labels)
        cl_sys = sum(sys_[k] for k in client_labels)

        def per(v: float) -> float | None:
            return v * 1e6 / delivered if delivered else None

        return {
            "rounds_per_s": rate,
            "rounds": rounds,
            "first_round_id": first,
            "achieved_rounds_per_s": (rounds - 1) / srv["first_to_last_round_s"]
            if rounds > 1 and srv["first_to_last_round_s"] > 0
            else None,
            "server_round_late_max_ms": srv["late_max_ms"],
            "server_targets": srv["targets"],  # sum over rounds of the connections broadcast() was given
            "expected": expected,
            "frames_received": int(len(rec)),
            "delivered": delivered,
            "lost": expected - delivered,
            "duplicates": int((counts - 1).sum()),
            "unexpected": int((~hit).sum()),
            "deliveries_s": delivered / (t_sent - t_start) if t_sent > t_start else None,
            "sending_s": t_sent - t_start,
            "window_s": t_end - t_start,
            "cpu_s": cpu,
            "cpu_user_s": user,
            "cpu_system_s": sys_,
            "server_us_per_delivery": per(cpu["server"]),
            "server_user_us_per_delivery": per(user["server"]),
            "server_sys_us_per_delivery": per(sys_["server"]),
            "deliveries_per_server_cpu_s": delivered / cpu["server"] if cpu["server"] > 0 else None,
            "clients_us_per_delivery": per(cl_cpu),
            "clients_sys_us_per_delivery": per(cl_sys),
            "controller_us_per_delivery": per(cpu["bench (controller)"]),
            "latency_ms": {
                "p50": pct(lat_ms, 50),
                "p99": pct(lat_ms, 99),
                "max": float(lat_ms.max()) if len(lat_ms) else None,
            },
            "foreign_cores": foreign,
            "quiet_wait": quiet,
        }


def print_step(r: dict[str, Any]) -> None:
    print(
        f"  {r['rounds_per_s']:>4g} rounds/s ({fmt(r['achieved_rounds_per_s'], 1)}): server {fmt(r['server_us_per_delivery'], 2)} µs/delivery "
        f"(user {fmt(r['server_user_us_per_delivery'], 2)}, sys {fmt(r['server_sys_us_per_delivery'], 2)}; "
        f"{fmt(r['deliveries_per_server_cpu_s'], 0)}/server-CPU-s)  clients {fmt(r['clients_us_per_delivery'], 2)} µs/delivery  "
        f"received {r['delivered']:,}/{r['expected']:,} lost {r['lost']} dup {r['duplicates']}  other load {r['foreign_cores']:.2f} cores",
        flush=True,
    )


async def run(args: argparse.Namespace) -> dict[str, Any]:
    nofile = raise_nofile(65536)
    result: dict[str, Any] = {
        "benchmark": NAME,
        "machine": machine_info(),
        "argv": sys.argv[1:],
        "nofile": nofile,
        "config": {k: v for k, v in vars(args).items() if k not in ("role", "rate_list")},
        "message_bytes": len(message(1, time.time_ns() // 1000)),
        "loadavg_1m": {"start": os.getloadavg()[0]},
    }
    ping = ["--ping-interval", str(args.ping_interval)]
    server = Child(0, "server", ping)
    clients = [Child(i, "client") for i in range(args.client_procs)]
    children = [server, *clients]
    bench = Bench(args, server, clients)
    try:
        for c in children:
            await c.start()
        info = await server.call("info", reply_timeout_s=60)
        url = f"ws://127.0.0.1:{info['port']}/"
        print(
            f"broadcast: server pid {server.pid} on {url}; connecting {args.clients} clients from {args.client_procs} processes ...",
            flush=True,
        )
        result["connect"] = await bench.connect(url)
        result["connect"]["server_open"] = (await server.call("info"))["open"]
        print(f"broadcast: connect: {json.dumps(result['connect'])}", flush=True)
        if result["connect"]["connected"] == 0:
            raise RuntimeError("no client connected")
        watch = ProcWatch(
            {
                "server": server.pid,
                **{f"load client {c.index}": c.pid for c in clients},
                "bench (controller)": os.getpid(),
            }
        )
        bench.watch, bench.foreign = watch, ForeignLoad(watch)

        warm = await bench.step(args.rate_list[0], 1.0, record=False)  # not reported: connections and code paths warm
        result["warmup"] = {k: warm[k] for k in ("rounds", "expected", "delivered", "lost", "duplicates")}
        steps, discarded = [], []
        reruns_left = args.max_reruns
        for rep in range(args.repeats):
            for rate in args.rate_list:
                for attempt in range(3):
                    r = await bench.step(rate, args.step_s)
                    r["repeat"] = rep
                    print_step(r)
                    if r["foreign_cores"] <= args.max_foreign_cores or reruns_left <= 0 or attempt == 2:
                        break
                    reruns_left -= 1
                    discarded.append(r)
                    print(
                        f"    (others used {r['foreign_cores']:.2f} cores during that step: running it again)",
                        flush=True,
                    )
                steps.append(r)
        # Idle baseline after the steps, when websockets' keepalive pings (every ping_interval per connection) run.
        await bench.collect()
        cpu0 = watch.cpu()
        await asyncio.sleep(args.idle_s)
        result["idle_cpu_percent"] = {k: v / args.idle_s * 100 for k, v in diff(watch.cpu(), cpu0).items()}
        result["steps"] = steps
        result["discarded_steps"] = discarded
        result["summary"] = aggregate(steps)
        result["peak_rss_since_start_bytes"] = watch.hwm()
        result["closed_connections"] = len(bench.closed)
    finally:
        await asyncio.gather(*(c.stop() for c in children), return_exceptions=True)
        shutil.rmtree(bench.tmp, ignore_errors=True)
        result["loadavg_1m"]["end"] = os.getloadavg()[0]
    return result


def aggregate(steps: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per rate: medians over the repeats; expected, lost and duplicates summed."""
    order: list[float] = []
    groups: dict[float, list[dict[str, Any]]] = {}
    for s in steps:
        if s["rounds_per_s"] not in groups:
            order.append(s["rounds_per_s"])
            groups[s["rounds_per_s"]] = []
        groups[s["rounds_per_s"]].append(s)

    out = []
    for rate in order:
        g = groups[rate]
        row: dict[str, Any] = {"rounds_per_s": rate, "repeats": len(g)}
        for k in (
            "achieved_rounds_per_s",
            "deliveries_s",
            "server_us_per_delivery",
            "server_user_us_per_delivery",
            "server_sys_us_per_delivery",
            "deliveries_per_server_cpu_s",
            "clients_us_per_delivery",
            "clients_sys_us_per_delivery",
            "controller_us_per_delivery",
            "foreign_cores",
        ):
            row[k] = med([s[k] for s in g])
        for k in ("server_us_per_delivery", "clients_us_per_delivery"):
            row[k + "_range"] = (
                [min(s[k] for s in g), max(s[k] for s in g)] if all(s[k] is not None for s in g) else None
            )
        row["foreign_cores_max"] = max(s["foreign_cores"] for s in g)
        row["latency_ms"] = {q: med([s["latency_ms"][q] for s in g]) for q in ("p50", "p99")}
        for k in ("expected", "frames_received", "delivered", "lost", "duplicates", "unexpected"):
            row[k] = sum(s[k] for s in g)
        row["server_cpu_s"] = med([s["cpu_s"]["server"] for s in g])
        out.append(row)
    return out


def render(result: dict[str, Any]) -> str:
    cfg = result["config"]
    rows = []
    for s in result["summary"]:
        rows.append(
            [
                f"{s['rounds_per_s']:g}",
                fmt(s["achieved_rounds_per_s"], 1),
                fmt(s["deliveries_s"], 0),
                f"**{fmt(s['server_us_per_delivery'], 2)}**",
                fmt(s["server_user_us_per_delivery"], 2),
                fmt(s["server_sys_us_per_delivery"], 2),
                "–"
                if not s["server_us_per_delivery_range"]
                else f"{s['server_us_per_delivery_range'][0]:.2f}–{s['server_us_per_delivery_range'][1]:.2f}",
                fmt(s["deliveries_per_server_cpu_s"], 0),
                fmt(s["clients_us_per_delivery"], 2),
                f"{s['frames_received']:,} / {s['expected']:,}",
                s["lost"],
                s["duplicates"],
                f"{fmt(s['foreign_cores'], 2)} / {fmt(s['foreign_cores_max'], 2)}",
            ]
        )
    lines = [
        f"Bare `websockets.broadcast()` server (reference, no rtm code): one process, websockets {result['machine']['packages'].get('websockets')} "
        f"asyncio `serve(compression=None, ping_interval={cfg['ping_interval']:g})` on uvloop, one {result['message_bytes']}-byte text message "
        f"per round to all {result['connect']['connected']:,} clients (held by {cfg['client_procs']} picows + uvloop load-client processes). "
        f"{cfg['step_s']:g} s per step, {cfg['repeats']} interleaved repeats, medians (server µs/delivery: range over the repeats).",
        "",
        md_table(
            [
                "rounds/s",
                "achieved",
                "deliveries/s",
                "server CPU µs/delivery",
                "user",
                "sys",
                "server range (repeats)",
                "deliveries per server CPU-s",
                "load-client CPU µs/delivery (both)",
                "frames received / expected",
                "lost",
                "dup",
                "others' load, cores (median / max)",
            ],
            rows,
        ),
        "",
    ]
    lines.append(
        "Every column is the median of its own (user and sys need not add up to the total); frames and losses are summed over "
        "the repeats. CPU from psutil (10 ms ticks), from just before the first round until the clients had every frame. "
        "Load-client CPU is both processes together (picows + bench.load_client's latency recorder)."
    )
    idle = result.get("idle_cpu_percent", {})
    lines.append(
        f"Idle after the steps ({cfg['idle_s']:g} s, clients connected, nothing sent): "
        + ", ".join(f"{k} {v:.1f}% CPU" for k, v in idle.items())
        + "."
    )
    if result.get("discarded_steps"):
        lines.append(
            f"{len(result['discarded_steps'])} step(s) re-run because other processes used the machine (kept in the JSON)."
        )
    m = result["machine"]
    lines.append(
        f"Machine: {m['nproc']} cores, {m['cpu_model']}, {m['ram_gib']} GiB RAM, Python {m['python']}, uvloop {m['uvloop']}, "
        f"picows {m['packages'].get('picows')}, kernel {m['kernel']} (shared, noisy: medians quoted); {m['date']}; "
        f"1-min load average {result['loadavg_1m']['start']:.1f} at start, {result['loadavg_1m']['end']:.1f} at end; "
        f"run took {result.get('elapsed_s', 0):.0f} s."
    )
    return "\n".join(lines[:3]) + "\n" + "\n\n".join(lines[3:])


def plot(result: dict[str, Any], name: str) -> None:
    pyplot = plt()
    fig, ax = pyplot.subplots(figsize=(7.5, 4.5))
    summary = result["summary"]
    x = [s["rounds_per_s"] for s in summary]
    series = [
        ("server_us_per_delivery", "server (user+sys)", "o-", "C0"),
        ("server_sys_us_per_delivery", "server sys", "v--", "C0"),
        ("server_user_us_per_delivery", "server user", "^:", "C0"),
        ("clients_us_per_delivery", "load clients (both)", "s-", "C1"),
    ]
    for key, label, style, color in series:
        ax.plot(x, [s[key] for s in summary], style, color=color, label=label)
    for s in summary:
        if s["achieved_rounds_per_s"] is not None and s["achieved_rounds_per_s"] < 0.95 * s["rounds_per_s"]:
            ax.annotate(
                f"achieved {s['achieved_rounds_per_s']:.1f}/s\n(server + clients fill the 2 cores)",
                (s["rounds_per_s"], s["server_us_per_delivery"]),
                textcoords="offset points",
                xytext=(-10, 18),
                ha="right",
                fontsize=8,
            )
    for key, color in (("server_us_per_delivery", "C0"), ("clients_us_per_delivery", "C1")):
        pts = [(s["rounds_per_s"], s[key]) for s in result["steps"] if s[key] is not None]
        ax.scatter([p[0] for p in pts], [p[1] for p in pts], s=10, color=color, alpha=0.35)
    ax.set_xscale("log", base=2)
    ax.set_xticks(x, [f"{v:g}" for v in x])
    ax.set_ylim(bottom=0)
    ax.set_xlabel(f"rounds/s (× {result['connect']['connected']:,} deliveries)")
    ax.set_ylabel("CPU µs per delivery")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(
        f"bare websockets.broadcast() server, {result['connect']['connected']:,} clients, {result['machine']['nproc']} cores\n"
        "median of repeats (lines), each repeat (dots)",
        fontsize=10,
    )
    save_figure(fig, name)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.role != "controller":
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # the controller stops us (quit, or EOF on stdin)
        import uvloop

        uvloop.run(server_role(args.ping_interval or None))
        return 0
    if args.render:
        result = json.loads(Path(args.render).read_text())
        name = Path(args.render).stem
        save_text(f"{name}.md", render(result) + "\n")
        plot(result, name)
        print(render(result))
        return 0
    install_uvloop()
    started = time.monotonic()
    try:
        result = asyncio.run(run(args))
    finally:
        killed = kill_leftovers()
        if killed:
            print(f"broadcast: killed leftover child processes {killed}", file=sys.stderr)
    result["elapsed_s"] = time.monotonic() - started
    publish(NAME + ("-quick" if args.quick else ""), result, render, plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
