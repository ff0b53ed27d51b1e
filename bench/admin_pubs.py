"""The admin server's CPU per message on the publish path, alone (issue 17, docs/publish-path.md).

Starts a small fleet (``rtm up``: one admin server, three channel servers, mutual TLS on the
wire) and drives its admin server with what the webapp's hand-off sends and nothing else:
``pubs`` batches of ``--batch`` events over one mutual-TLS connection with the webapp's
identity, ``--rate`` events per second spread over ``--channels`` channels (each channel's
seqs gapless from 1), at most ``--window`` events unanswered (the hand-off's window). No HTTP,
no SQLite, no websocket clients: the admin server's CPU is the only thing that moves with its
code. Per variant it reports the admin server's CPU µs per event (psutil user+system over the
measured seconds, drain included, divided by the events answered), the channel servers' (sum),
the events that were not answered ``ok``, and the load average beside it.

``--before-tree DIR`` runs a second variant whose fleet imports its code from ``DIR`` (a
``git archive`` export of the code to compare, put first on ``PYTHONPATH``); ``--rounds N``
alternates the two ``N`` times, so the machine's load falls on both alike. ``--profile``
samples the admin server with py-spy (``--native``) during one extra step of this tree and
prints the top entries (raw stacks in ``bench/results/admin-pubs-pyspy.txt``).

    python -m bench.admin_pubs --rate 2000 --batch 8 --seconds 8 --rounds 2 --before-tree /tmp/main-export

Writes ``bench/results/admin-pubs.{json,md}``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import psutil

from bench.harness import (
    REPO_ROOT,
    RESULTS_DIR,
    FleetRun,
    install_uvloop,
    machine_info,
    md_table,
    pyspy_top,
)
from services.connection import PeerConnection, connect
from services.identity import WEBAPP

CHANNELS = 100
BATCH_EVENTS = 8  # events per pubs: the webapp's group commit held 7.5 posts per commit at 2,000 posts/s (round 3)
RATE_PER_S = 2000.0
WINDOW_EVENTS = 256  # the hand-off's MAX_IN_FLIGHT
SECONDS = 8.0
REPLY_TIMEOUT_S = 30.0
DRAIN_TIMEOUT_S = 30.0
PERF_DATA = Path(tempfile.gettempdir()) / "admin-pubs-perf.data"
PERF_TIMEOUT_S = 120.0
IDLE_S = 2.0  # the idle window measured before each step
FLEET_ARGS = (
    "--admin-servers",
    "1",
    "--channel-servers",
    "3",
    "--spares",
    "0",
    "--charms",
    "1",
    "--presence-servers",
    "1",
    "--presence-spares",
    "0",
    "--gateways-per-region",
    "1",
    "--seed-users",
    "4",
)


def event_json(channel: str, seq: int) -> bytes:
    """A message event shaped as the webapp's (about 330 bytes with a 200-byte text)."""
    text = f"bench {seq} " + "x" * 190
    return (
        f'{{"type":"message","channel":"{channel}","user":"U0BENCH0001","text":"{text}",'
        f'"ts":"{1_700_000_000 + seq}.000100","team":"T0BENCH0001","event_ts":"{1_700_000_000 + seq}.000100"}}'
    ).encode()


class Driver:
    """The webapp's side: paced ``pubs`` of ``batch`` events, at most ``window`` unanswered."""

    def __init__(
        self, conn: PeerConnection, channels: list[str], batch: int, window: int, seqs: dict[str, int]
    ) -> None:
        self.conn = conn
        self.channels = channels
        self.batch = batch
        self.window = window
        self.seqs = seqs  # the last seq sent on each channel (shared by the steps of one fleet)
        self.next_channel = 0
        self.outstanding = 0
        self.answered = 0
        self.not_ok = 0
        self.skipped = 0
        self.idle = asyncio.Event()
        self.idle.set()

    def send_batch(self) -> None:
        if self.outstanding + self.batch > self.window:
            self.skipped += self.batch
            return
        evs = []
        now = time.time()
        for _ in range(self.batch):
            channel = self.channels[self.next_channel]
            self.next_channel = (self.next_channel + 1) % len(self.channels)
            seq = self.seqs[channel] = self.seqs[channel] + 1
            evs.append(
                {"ch": channel, "seq": seq, "json": event_json(channel, seq), "t0": now, "eid": f"{channel}:{seq}"}
            )
        self.outstanding += len(evs)
        self.idle.clear()
        future = self.conn.begin_request({"op": "pubs", "evs": evs}, timeout_s=REPLY_TIMEOUT_S)
        future.add_done_callback(lambda done: self._answered(done, len(evs)))

    def _answered(self, done: asyncio.Future[dict[str, Any]], count: int) -> None:
        self.outstanding -= count
        self.answered += count
        if done.cancelled() or done.exception() is not None:
            self.not_ok += count
        else:
            self.not_ok += sum(1 for r in done.result().get("res", ()) if r not in ("ok", "duplicate"))
        if self.outstanding == 0:
            self.idle.set()

    async def run(self, rate: float, seconds: float) -> float:
        """Send at ``rate`` events/s for ``seconds``; returns when every batch is answered."""
        interval = self.batch / rate
        started = time.monotonic()
        n = 0
        while True:
            due = started + n * interval
            now = time.monotonic()
            if due - started >= seconds:
                break
            if due > now:
                await asyncio.sleep(due - now)
            self.send_batch()
            n += 1
        await asyncio.wait_for(self.idle.wait(), DRAIN_TIMEOUT_S)
        return time.monotonic() - started


def cpu_s(pid: int) -> float:
    t = psutil.Process(pid).cpu_times()
    return float(t.user + t.system)


def system_s(pid: int) -> float:
    return float(psutil.Process(pid).cpu_times().system)


async def measure(fleet: FleetRun, args: argparse.Namespace, profile_out: Path | None) -> list[dict[str, Any]]:
    """One step per ``--batch`` size, in one fleet; each channel's seqs continue across steps."""
    admin = fleet.processes("admin-server")[0]
    channel_pids = [int(p["pid"]) for p in fleet.processes("channel-server")]
    admin_pid = int(admin["pid"])
    print(f"admin-pubs: admin server pid {admin_pid}", flush=True)
    conn = await connect(
        str(admin["host"]),
        int(admin["port"]),
        lambda: PeerConnection(name="bench-webapp", coalesce_writes=True),
        trust=fleet.trust(WEBAPP, "bench-webapp"),
    )
    steps = []
    try:
        channels = [f"C0BENCH{i:04d}" for i in range(args.channels)]
        seqs = dict.fromkeys(channels, 0)
        warm = Driver(conn, channels, args.batches[0], args.window, seqs)
        await warm.run(rate=min(args.rate, 500.0), seconds=2.0)  # warm-up: every link up, every channel seen
        idle_before = cpu_s(admin_pid)
        await asyncio.sleep(IDLE_S)  # the admin server's fixed cost (Consul watches, keepalives), for scale
        idle_used = cpu_s(admin_pid) - idle_before
        for batch in args.batches:
            driver = Driver(conn, channels, batch, args.window, seqs)
            load_1m = os.getloadavg()[0]
            admin_before = cpu_s(admin_pid)
            admin_sys_before = system_s(admin_pid)
            cs_before = sum(cpu_s(pid) for pid in channel_pids)
            spy = perf = None
            if args.perf:  # Linux perf: kernel and C time by symbol (py-spy cannot split the loop's C code)
                argv = ["perf", "record", "-F", "999", "-g", "-p", str(admin_pid), "-o", str(PERF_DATA)]
                argv += ["--", "sleep", str(int(args.seconds))]
                perf = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                await asyncio.sleep(0.5)
            if profile_out is not None:
                loop = asyncio.get_running_loop()
                spy = loop.run_in_executor(
                    None, pyspy_top, admin_pid, int(args.seconds), profile_out, True, False, 60, 1000
                )
                await asyncio.sleep(1.0)  # py-spy attaches
            elapsed = await driver.run(rate=args.rate, seconds=args.seconds)
            admin_used = cpu_s(admin_pid) - admin_before
            admin_sys = system_s(admin_pid) - admin_sys_before
            cs_used = sum(cpu_s(pid) for pid in channel_pids) - cs_before
            top = await spy if spy is not None else []
            if perf is not None:
                await asyncio.get_running_loop().run_in_executor(None, perf.wait, PERF_TIMEOUT_S)
            events = driver.answered
            steps.append(
                {
                    "batch": batch,
                    "events": events,
                    "not_ok": driver.not_ok,
                    "skipped": driver.skipped,
                    "events_per_s": events / elapsed,
                    "admin_cpu_us_per_event": 1e6 * admin_used / max(1, events),
                    "admin_system_share": admin_sys / admin_used if admin_used > 0 else 0.0,
                    "cs_cpu_us_per_event": 1e6 * cs_used / max(1, events),
                    "admin_idle_cpu_percent": 100 * idle_used / IDLE_S,
                    "load_average_1m": load_1m,
                    "top": top,
                }
            )
    finally:
        conn.close()
    return steps


def run_variant(
    name: str, tree: str, args: argparse.Namespace, profile_out: Path | None = None
) -> list[dict[str, Any]]:
    env = {"PYTHONPATH": tree} if tree != str(REPO_ROOT) else {}
    with FleetRun(*FLEET_ARGS, env=env) as fleet:
        steps = asyncio.run(measure(fleet, args, profile_out))
    rows = []
    for step in steps:
        row = {"variant": name, **step}
        print(
            f"admin-pubs {name}: batch {row['batch']}, {row['events']} events, {row['events_per_s']:.0f}/s, admin "
            f"{row['admin_cpu_us_per_event']:.1f} µs/event ({100 * row['admin_system_share']:.0f} % system), channel servers {row['cs_cpu_us_per_event']:.1f}, "
            f"not ok {row['not_ok']}, skipped {row['skipped']}, admin idle {row['admin_idle_cpu_percent']:.1f} % "
            f"of a core, load {row['load_average_1m']:.2f}",
            flush=True,
        )
        rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rate", type=float, default=RATE_PER_S, help="events per second offered")
    parser.add_argument("--batch", default=str(BATCH_EVENTS), help="events per pubs; several (8,32): one step each")
    parser.add_argument("--channels", type=int, default=CHANNELS, help="channels the events go to, round robin")
    parser.add_argument("--window", type=int, default=WINDOW_EVENTS, help="events unanswered at most")
    parser.add_argument("--seconds", type=float, default=SECONDS, help="measured seconds per variant")
    parser.add_argument("--rounds", type=int, default=1, help="rounds (each: before, then after)")
    parser.add_argument("--before-tree", default="", help="source tree of the 'before' variant (none: after only)")
    parser.add_argument("--profile", action="store_true", help="py-spy --native on the admin server, one extra step")
    parser.add_argument(
        "--perf", action="store_true", help="perf record on the admin server in every step (the last one's is kept)"
    )
    args = parser.parse_args(argv)
    args.batches = [int(b) for b in str(args.batch).split(",") if b]
    install_uvloop()
    rows: list[dict[str, Any]] = []
    for _ in range(args.rounds):
        if args.before_tree:
            rows += run_variant("before", args.before_tree, args)
        rows += run_variant("after", str(REPO_ROOT), args)
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    if args.profile:
        out = RESULTS_DIR / "admin-pubs-pyspy.txt"
        for row in run_variant("after (py-spy)", str(REPO_ROOT), args, out):
            rows.append(row)
            for function, own, total in row["top"]:
                print(f"  {own:5.1f}% own {total:5.1f}% total  {function}")
    report = {"machine": machine_info(), "args": vars(args), "rows": rows}
    (RESULTS_DIR / "admin-pubs.json").write_text(json.dumps(report, indent=2))
    table = md_table(
        [
            "variant",
            "batch",
            "events",
            "events/s",
            "admin µs/event",
            "of it system",
            "channel servers µs/event",
            "not ok",
            "load avg 1m",
        ],
        [
            [
                r["variant"],
                r["batch"],
                r["events"],
                f"{r['events_per_s']:.0f}",
                f"{r['admin_cpu_us_per_event']:.1f}",
                f"{100 * r['admin_system_share']:.0f} %",
                f"{r['cs_cpu_us_per_event']:.1f}",
                r["not_ok"],
                f"{r['load_average_1m']:.2f}",
            ]
            for r in rows
        ],
    )
    (RESULTS_DIR / "admin-pubs.md").write_text(table + "\n")
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
