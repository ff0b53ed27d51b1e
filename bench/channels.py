"""ONE channel server holding many channels (one subscribed gateway each, no history): RSS per channel.

Starts dev Consul (``rtm consul-dev``) and one ``rtm channel-server
--history-events 0`` as real processes, writes the channel ring document
(``rtm/ring/channel`` = ``{"version": 1, "slots": {"cs-0": "<the CS>"}}``)
so the server owns every channel, then acts as a gateway over msgpack/TCP
(``services.connection.connect`` + ``PeerConnection``): ``sub`` requests of
10,000 channels each, ``[[channel, -1], ...]`` (live only), until the server
holds 1,000,000 channels. Channel ids look like the webapp's (``C`` + 11 hex
digits). At 0, 250k, 500k, 750k and 1M channels it waits for the server's RSS
to settle and records it; bytes per channel = (RSS - RSS at 0) / channels.

    python -m bench.channels            # 1,000,000 channels
    python -m bench.channels --quick    # 100,000 channels
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

from bench.harness import (
    cpu_seconds,
    fmt,
    machine_info,
    md_table,
    mib,
    plt,
    rtm_env,
    run_benchmark,
    save_figure,
    settled_rss,
)
from rtmctl.ports import free_port_base

NAME = "channels"
GOAL_BYTES_PER_CHANNEL = 300
CS_ID = "cs-bench"
GW_ID = "bench-gw"
SETTLE_BAND_BYTES = 256 * 1024  # RSS has settled: 3 samples (1 s apart) within this band,
SETTLE_MIN_S = 3.0  # not before this,
SETTLE_MAX_S = 30.0  # or after this, whatever they are


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m bench.channels", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--channels", type=int, default=1_000_000, help="channels to subscribe in total")
    p.add_argument("--checkpoints", default="250000,500000,750000,1000000", help="channel counts to measure RSS at")
    p.add_argument("--batch", type=int, default=10_000, help="channels per sub request")
    p.add_argument("--quick", action="store_true", help="smoke run: 100,000 channels")
    args = p.parse_args(argv)
    if args.quick:
        args.channels = 100_000
        args.checkpoints = "25000,50000,100000"
    args.points = sorted(
        {int(x) for x in args.checkpoints.split(",") if x and int(x) <= args.channels} | {args.channels}
    )
    return args


def channel_id(i: int) -> str:
    return f"C{i:011X}"


def http_json(url: str, method: str = "GET", body: bytes | None = None) -> Any:
    req = urllib.request.Request(url, data=body, method=method)
    with urllib.request.urlopen(req, timeout=10) as resp:
        raw = resp.read()
    return json.loads(raw) if raw else None


async def run(args: argparse.Namespace) -> dict[str, Any]:
    from consul_dev.app import ACL_TOKEN_ENV
    from rtmctl.launcher import rtm_argv, start
    from services.config import CONSUL_TOKEN_ENV
    from services.connection import PeerConnection, connect
    from services.ring import CHANNEL_RING_KEY, RingDocument
    from services.secret_file import new_token

    result: dict[str, Any] = {"benchmark": NAME, "machine": machine_info(), "argv": sys.argv[1:]}
    result["config"] = {k: v for k, v in vars(args).items()}
    base = free_port_base(span=10)
    consul_addr = f"127.0.0.1:{base}"
    # The dev agent with ACLs on, as rtm up runs it; every process gets the token by env.
    token = new_token()
    env = {**rtm_env(), ACL_TOKEN_ENV: token, CONSUL_TOKEN_ENV: token}
    consul = start("consul-dev", rtm_argv("consul-dev", "--host", "127.0.0.1", "--port", str(base)), env=env)
    from services.certs import FleetCertificates
    from services.identity import PeerIdentity
    from services.tls import WireTrust

    certs = FleetCertificates(Path(tempfile.mkdtemp(prefix="rtm-bench-tls-")))
    cs_paths = certs.ensure("cs", PeerIdentity("channel-server", CS_ID))
    gw_paths = certs.ensure("gw", PeerIdentity("gateway", GW_ID))
    gw_trust = WireTrust.load(gw_paths.ca, gw_paths.cert, gw_paths.key)
    try:
        ring = RingDocument(version=1, slots={"cs-0": CS_ID})
        http_json(f"http://{consul_addr}/v1/kv/{CHANNEL_RING_KEY}?token={token}", "PUT", ring.to_json())
        cs = start(
            "channel-server",
            rtm_argv(
                "channel-server",
                "--host",
                "127.0.0.1",
                "--port",
                str(base + 1),
                "--metrics-port",
                str(base + 2),
                "--instance-id",
                CS_ID,
                "--history-events",
                "0",
                "--consul",
                consul_addr,
                "--tls-ca",
                str(cs_paths.ca),
                "--tls-cert",
                str(cs_paths.cert),
                "--tls-key",
                str(cs_paths.key),
            ),
            env=env,
        )
        try:
            dial = functools.partial(connect, trust=gw_trust)
            result["points"] = await measure(args, cs.pid, base + 1, base + 2, PeerConnection, dial)
            result["cs_ready"] = cs.ready
        finally:
            cs.stop()
    finally:
        consul.stop()
    return result


async def measure(
    args: argparse.Namespace, pid: int, port: int, metrics_port: int, PeerConnection: Any, connect: Any
) -> list[dict[str, Any]]:
    conn = await connect("127.0.0.1", port, lambda: PeerConnection(name=GW_ID))
    try:
        deadline = time.monotonic() + 30
        while True:  # the server must have adopted the ring before it owns anything
            reply = await conn.request({"op": "ping"}, 5.0)
            if int(reply.get("version", 0)) >= 1:
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"the channel server never adopted ring v1: {reply}")
            await asyncio.sleep(0.1)
        rss0, samples0 = await settled_rss(pid, SETTLE_BAND_BYTES, SETTLE_MAX_S, SETTLE_MIN_S)
        points: list[dict[str, Any]] = [{"channels": 0, "cs_rss_bytes": rss0, "settle_samples": samples0}]
        print(f"channels: channel server RSS with no channel: {mib(rss0)} MiB", flush=True)
        have = 0
        refused_total = 0
        for target in args.points:
            cpu0 = cpu_seconds(pid)
            t0 = time.monotonic()
            while have < target:
                n = min(args.batch, target - have)
                chans = [[channel_id(i), -1] for i in range(have, have + n)]
                reply = await conn.request({"op": "sub", "gw": GW_ID, "chans": chans, "rv": 1}, 60.0)
                refused_total += len(reply.get("not_owner", []))
                have += n
            sub_s = time.monotonic() - t0
            sub_cpu = cpu_seconds(pid) - cpu0
            rss, samples = await settled_rss(pid, SETTLE_BAND_BYTES, SETTLE_MAX_S, SETTLE_MIN_S)
            held = http_json(f"http://127.0.0.1:{metrics_port}/healthz")
            prev = points[-1]
            point = {
                "channels": target,
                "cs_channels": held.get("channels"),
                "refused": refused_total,
                "cs_rss_bytes": rss,
                "settle_samples": samples,
                "bytes_per_channel": (rss - rss0) / target,
                "incremental_bytes_per_channel": (rss - prev["cs_rss_bytes"]) / (target - prev["channels"]),
                "sub_s": sub_s,
                "cs_cpu_us_per_channel_sub": sub_cpu * 1e6 / (target - prev["channels"]),
            }
            point["goal_met"] = point["bytes_per_channel"] <= GOAL_BYTES_PER_CHANNEL and refused_total == 0
            points.append(point)
            print(
                f"  {target:>9,} channels (server says {point['cs_channels']}, refused {refused_total}): RSS {mib(rss)} MiB, "
                f"{point['bytes_per_channel']:.0f} B/channel (incremental {point['incremental_bytes_per_channel']:.0f}), "
                f"sub {point['cs_cpu_us_per_channel_sub']:.1f} µs CPU/channel",
                flush=True,
            )
        return points
    finally:
        conn.close()


def render(result: dict[str, Any]) -> str:
    rows = []
    for p in result["points"]:
        if p["channels"] == 0:
            rows.append(["0", mib(p["cs_rss_bytes"]), "–", "–", "–", "–"])
            continue
        rows.append(
            [
                f"{p['channels']:,}",
                mib(p["cs_rss_bytes"]),
                f"{p['bytes_per_channel']:.0f}",
                f"{p['incremental_bytes_per_channel']:.0f}",
                fmt(p["cs_cpu_us_per_channel_sub"], 1),
                "met" if p["goal_met"] else "**missed**",
            ]
        )
    return md_table(
        [
            "channels",
            "channel server RSS MiB",
            "bytes per channel",
            "incremental bytes/channel",
            "CS CPU µs per channel sub",
            "goal ≤300 B/channel",
        ],
        rows,
    )


def plot(result: dict[str, Any], name: str) -> None:
    pyplot = plt()
    pts = result["points"]
    x = [p["channels"] / 1e3 for p in pts]
    y = [p["cs_rss_bytes"] / 2**20 for p in pts]
    fig, ax = pyplot.subplots(figsize=(6.5, 4.2))
    ax.plot(x, y, "o-", label="channel server RSS (measured)")
    ax.plot(
        [0, x[-1]],
        [y[0], y[0] + pts[-1]["channels"] * GOAL_BYTES_PER_CHANNEL / 2**20],
        "--",
        color="grey",
        label="goal: 300 B/channel",
    )
    for p in pts[1:]:
        ax.annotate(
            f"{p['bytes_per_channel']:.0f} B/ch",
            (p["channels"] / 1e3, p["cs_rss_bytes"] / 2**20),
            textcoords="offset points",
            xytext=(-25, 8),
            fontsize=8,
        )
    ax.set_xlabel("channels held (thousands), one subscribed gateway each")
    ax.set_ylabel("channel server RSS, MiB")
    ax.set_title("rtm channel server memory per channel")
    ax.grid(True, alpha=0.3)
    ax.legend(loc="upper left")
    save_figure(fig, name)


def main(argv: list[str] | None = None) -> int:
    return run_benchmark(NAME, parse_args(argv), run, render, plot)


if __name__ == "__main__":
    sys.exit(main())
