"""Drain benchmark (issue 6): `rtm drain` a loaded region; how fast do its clients move, what
reconnect rate does the target region see, what happens to latency, is anything lost?

For each drain rate (``--rates``, gateways' ``RTM_DRAIN_RATE_PER_S``; default
500/s, the fleet's default, and 2,000/s) a fresh ``rtm up`` (regions
``us-east,eu-west``, one gateway each) with ``--clients`` + ``--others``
seeded users. ``--clients`` connect hinted to ``eu-west`` (the region to drain)
and ``--others`` to ``us-east``, one websocket per user, from
``--client-procs`` picows client processes that follow Slack's ``goodbye``:
on goodbye and close they call ``rtm.connect`` again (same hint) and open the
new URL. A poster sends ``--post-rate`` messages/s alternately to #general and
#random, where every user is a member (text ``m<id>:<send µs>``). After a
baseline, ``rtm drain eu-west --data-dir DIR`` runs (the real command); the
drain starts when it writes the Consul key (its value is that time).

Reported per rate: time from the drain until every client is connected again
(its new ``hello``), how long each client was away (goodbye -> new hello), the
peak reconnect rate that the target region saw (client-side new-hello times per
100 ms bucket), message latency (post sent -> client receipt) before and
during the move, and lost / duplicated deliveries over the whole run (every
acknowledged post must reach every client exactly once: a moved client gets
what it missed replayed by its new gateway).

    python -m bench.drain            # 2,000 + 200 clients, rates 500/s and 2,000/s
    python -m bench.drain --quick    # 400 + 50 clients
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from typing import Any

import numpy as np

from bench.fleet_events import Api, EvClients, Poster, deliveries, now_us, scrape
from bench.harness import (
    FleetRun,
    ProcWatch,
    diff,
    fmt,
    machine_info,
    md_table,
    plt,
    raise_nofile,
    run_benchmark,
    save_figure,
)
from bench.stats import pct

NAME = "drain"
DRAIN_REGION = "eu-west"
OTHER_REGION = "us-east"
BUCKET_US = 100_000


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m bench.drain", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--clients", type=int, default=2000, help="clients on the region that is drained")
    p.add_argument("--others", type=int, default=200, help="clients on the other region")
    p.add_argument("--rates", default="500,2000", help="drain rates (sessions/s per gateway), one fleet each")
    p.add_argument("--post-rate", type=float, default=4.0, help="messages/s to the channels everyone is in")
    p.add_argument("--baseline-s", type=float, default=6.0, help="posting before the drain")
    p.add_argument("--after-s", type=float, default=4.0, help="posting after every client has moved")
    p.add_argument("--move-timeout-s", type=float, default=120.0)
    p.add_argument("--client-procs", type=int, default=2)
    p.add_argument("--quick", action="store_true", help="400 + 50 clients")
    args = p.parse_args(argv)
    if args.quick:
        args.clients = min(args.clients, 400)
        args.others = min(args.others, 50)
        args.baseline_s = 3.0
        args.after_s = 2.0
    args.rate_list = [float(x) for x in args.rates.split(",") if x]
    return args


async def one_rate(args: argparse.Namespace, rate: float) -> dict[str, Any]:
    n_users = args.clients + args.others
    print(f"drain: rate {rate:g}/s: starting the fleet ({n_users} users) ...", flush=True)
    out: dict[str, Any] = {"drain_rate_per_s": rate}
    with FleetRun("--seed-users", str(n_users), env={"RTM_DRAIN_RATE_PER_S": str(rate)}) as fleet:
        out["fleet_startup_s"] = fleet.startup_s
        api = Api(fleet.api_url)
        try:
            async with EvClients(args.client_procs) as ec:
                await body(args, fleet, api, ec, out)
        finally:
            await api.close()
    return out


async def body(args: argparse.Namespace, fleet: FleetRun, api: Api, ec: EvClients, out: dict[str, Any]) -> None:
    users = [u for u in fleet.seed["users"] if not u["is_bot"]][: args.clients + args.others]
    chans = {c["name"]: c["id"] for c in fleet.seed["channels"]}
    targets = [chans["general"], chans["random"]]
    regions = [DRAIN_REGION] * args.clients + [OTHER_REGION] * args.others
    gws = {f"{p['host']}:{p['port']}": p for p in fleet.processes("gateway")}
    t = time.monotonic()
    conn = await ec.connect(
        fleet.api_url, [u["token"] for u in users], regions, follow_goodbye=True, concurrency=50, timeout_s=30.0
    )
    per_gw = {gws[g]["region"]: conn["gw"].count(g) for g in set(conn["gw"]) if g}
    out["connect"] = {
        "connected": conn["connected"],
        "failed": conn["failed"],
        "errors": conn["errors"],
        "per_region": per_gw,
        "elapsed_s": time.monotonic() - t,
    }
    print(
        f"drain: connected {conn['connected']} in {out['connect']['elapsed_s']:.0f}s ({per_gw}); failed {conn['failed']}",
        flush=True,
    )
    if conn["failed"]:
        raise RuntimeError(f"connect failed: {conn['errors']}")
    on_drained = np.array(
        [i for i, g in enumerate(conn["gw"]) if g and gws[g]["region"] == DRAIN_REGION], dtype=np.int64
    )
    everyone = np.arange(len(users), dtype=np.int64)
    members = {0: everyone, 1: everyone}
    poster_users = users[args.clients :] or users
    poster = Poster(api, [(targets[i % 2], poster_users[i % len(poster_users)]["token"]) for i in range(2)])
    watch = ProcWatch({**fleet.labelled_pids(), **ec.pids(), "poster (bench)": os.getpid()})
    stop = asyncio.Event()
    post_task = asyncio.ensure_future(
        poster.run(args.post_rate, args.baseline_s + args.move_timeout_s + args.after_s + 30, stop)
    )
    try:
        await asyncio.sleep(args.baseline_s)
        moved0 = scrape(fleet, "gateway", "rtm_gw_sessions_moved_total")
        cpu0 = watch.cpu()
        t_cmd = now_us()
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "rtmctl.cli",
            "drain",
            DRAIN_REGION,
            "--data-dir",
            str(fleet.data_dir),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
        cmd_out, _ = await asyncio.wait_for(proc.communicate(), 60)
        t_cmd_done = now_us()
        from services.regions import drained_key

        _, kv = fleet_consul(fleet).kv.get(drained_key(DRAIN_REGION))
        t_drain = int(float(kv["Value"]) * 1e6) if kv and kv.get("Value") else t_cmd_done
        out["drain_command"] = {
            "output": cmd_out.decode().strip(),
            "returncode": proc.returncode,
            "command_s": (t_cmd_done - t_cmd) / 1e6,
            "key_written_after_start_s": (t_drain - t_cmd) / 1e6,
        }
        # until every client on the drained region has moved (bounded)
        deadline = time.monotonic() + args.move_timeout_s
        while time.monotonic() < deadline:
            s = await ec.stat()
            if s["moves"] >= len(on_drained) and s["reconnecting"] == 0:
                break
            await asyncio.sleep(0.2)
        t_moved_seen = now_us()
        cpu_move = diff(watch.cpu(), cpu0)
        moved1 = scrape(fleet, "gateway", "rtm_gw_sessions_moved_total")
        await asyncio.sleep(args.after_s)
    finally:
        stop.set()
        await post_task
        await poster.settle()
    exp = sum(len(members[p["target"]]) for p in poster.posts if p["ok"])
    await ec.wait_msgs(exp, max_s=60.0, idle_s=5.0)
    resume_fail = scrape(fleet, "gateway", "rtm_gw_resume_failures_total")
    connects = scrape(fleet, "gateway", "rtm_gw_connects_total")
    out["gateway_gap_fills"] = scrape(fleet, "gateway", "rtm_gw_gap_fills_total")
    try:
        out["webapp_resumes"] = scrape(fleet, "webapp", "rtm_webapp_resumes_total")
    except Exception as exc:  # noqa: BLE001 - diagnostics only
        out["webapp_resumes"] = repr(exc)
    rec = await ec.dump()
    analyze(out, poster, members, rec, on_drained, t_drain, t_moved_seen, gws, conn)
    out["gateway_sessions_moved"] = {g: sum(moved1[g].values()) - sum(moved0[g].values()) for g in moved1}
    out["gateway_resume_failures"] = {g: sum(v.values()) for g, v in resume_fail.items()}
    out["gateway_connects"] = connects
    out["cpu_s_move_window"] = cpu_move
    n = max(1, len(on_drained))
    out["cpu_ms_per_moved_client"] = {k: v * 1e3 / n for k, v in cpu_move.items() if v == v}


def fleet_consul(fleet: FleetRun) -> Any:
    from rtmctl.operator import fleet_client

    return fleet_client(fleet.data_dir)


def analyze(
    out: dict[str, Any],
    poster: Poster,
    members: dict[int, np.ndarray],
    rec: dict[str, Any],
    on_drained: np.ndarray,
    t_drain: int,
    t_moved_seen: int,
    gws: dict[str, Any],
    conn: dict[str, Any],
) -> None:
    posts = poster.posts
    d = deliveries(rec["msgs"], posts, members)
    mv = rec["moves"]
    ok = mv[mv[:, 4] > 0]
    failed = mv[mv[:, 4] == 0]
    moved_conns = set(int(c) for c in mv[:, 0])
    drained_set = set(int(c) for c in on_drained)
    target_regions = {}
    for g in rec["move_gw"]:
        if g:
            r = gws.get(g, {}).get("region", g)
            target_regions[r] = target_regions.get(r, 0) + 1
    t_all = int(ok[:, 4].max()) if len(ok) else None
    away_ms = (ok[:, 4] - ok[:, 1]) / 1e3 if len(ok) else np.zeros(0)
    # reconnect rate at the target: new hellos per 100 ms bucket (and rtm.connect calls)
    hist = {}
    peak = {}
    for label, col in (("hello", 4), ("goodbye", 1), ("rtm_connect", 3)):
        ts = ok[:, col] if label != "goodbye" else mv[:, 1]
        ts = ts[ts > 0]
        if len(ts):
            b = ((ts - t_drain) // BUCKET_US).astype(np.int64)
            b0 = int(b.min())
            counts = np.bincount(b - b0)
            hist[label] = {"first_bucket": b0, "counts": counts.tolist()}
            peak[label] = int(counts.max())
    post_by_id = {p["id"]: p for p in posts}
    recv = d["recv"]
    send = (
        np.array([post_by_id[int(x)]["send_us"] for x in recv[:, 1]], dtype=np.int64)
        if len(recv)
        else np.zeros(0, np.int64)
    )
    lat = (recv[:, 2] - send) / 1e3 if len(recv) else np.zeros(0)
    end = t_all or t_moved_seen
    before = lat[send < t_drain]
    during = lat[(send >= t_drain) & (send <= end)]
    moved_mask = np.isin(recv[:, 0], on_drained) if len(recv) else np.zeros(0, bool)
    during_moved = lat[(send >= t_drain) & (send <= end) & moved_mask]
    during_stayed = lat[(send >= t_drain) & (send <= end) & ~moved_mask]

    def q(a: np.ndarray) -> dict[str, Any]:
        return {"n": int(len(a)), "p50": pct(a, 50), "p99": pct(a, 99), "max": float(a.max()) if len(a) else None}

    out["clients_on_drained_region"] = int(len(on_drained))
    out["moves"] = {
        "recorded": int(len(mv)),
        "ok": int(len(ok)),
        "failed": int(len(failed)),
        "not_moved": len(drained_set - moved_conns),
        "moved_but_not_on_drained": len(moved_conns - drained_set),
        "attempts_max": int(mv[:, 5].max()) if len(mv) else 0,
        "attempts_gt1": int((mv[:, 5] > 1).sum()) if len(mv) else 0,
        "target_regions": target_regions,
    }
    out["first_goodbye_s"] = (
        (int(mv[:, 1][mv[:, 1] > 0].min()) - t_drain) / 1e6 if len(mv) and (mv[:, 1] > 0).any() else None
    )
    out["all_moved_s"] = (t_all - t_drain) / 1e6 if t_all else None
    out["last_goodbye_s"] = (int(mv[:, 1].max()) - t_drain) / 1e6 if len(mv) else None
    gb = mv[:, 1][mv[:, 1] > 0]
    out["achieved_goodbye_rate_per_s"] = (
        (len(gb) - 1) / ((int(gb.max()) - int(gb.min())) / 1e6) if len(gb) > 1 and gb.max() > gb.min() else None
    )
    out["away_ms"] = q(away_ms)
    out["reconnect_hist_100ms"] = hist
    out["peak_per_100ms"] = peak
    out["peak_reconnects_per_s"] = peak.get("hello", 0) * 10
    out["mean_reconnects_per_s"] = (len(ok) / ((t_all - int(ok[:, 4].min())) / 1e6)) if len(ok) > 1 and t_all else None
    out["latency_ms"] = {
        "before": q(before),
        "during": q(during),
        "during_moved_clients": q(during_moved),
        "during_other_clients": q(during_stayed),
    }
    out["deliveries"] = {k: d[k] for k in ("expected", "delivered", "lost", "duplicates", "unexpected", "lost_sample")}
    out["posts"] = {"sent": len(posts), "ok": sum(1 for p in posts if p["ok"]), "errors": poster.errors}
    out["unexpected_closes"] = len(rec["closed"])
    out["move_errors"] = rec["move_errors"]
    # who lost what: by the number of reconnect attempts a client needed, and when
    att = {int(r[0]): int(r[5]) for r in mv}
    gb = {int(r[0]): int(r[1]) for r in mv}
    hl = {int(r[0]): int(r[4]) for r in mv}
    lost_conns = [int(c) for c in d["lost_conns"]]
    by_att: dict[str, dict[str, int]] = {}
    for a in att.values():
        row = by_att.setdefault(str(a), {"clients": 0, "clients_with_loss": 0})
        row["clients"] += 1
    for c in lost_conns:
        a = str(att.get(c, 0))
        by_att.setdefault(a, {"clients": 0, "clients_with_loss": 0})["clients_with_loss"] += 1
    out["loss_by_attempts"] = by_att
    # lost deliveries: was the post sent while the client was away (goodbye .. new hello)?
    lk = d["lost_keys"]
    BITS = 24
    in_gap = 0
    for k in lk.tolist():
        pid, c = k >> BITS, k & ((1 << BITS) - 1)
        sent_us = post_by_id[pid]["send_us"]
        if c in gb and gb[c] <= sent_us <= (hl.get(c) or 1 << 62):
            in_gap += 1
    out["lost_sent_while_client_away"] = in_gap
    out["lost_clients"] = len(lost_conns)
    out["_plot"] = {
        "hello_s": ((ok[:, 4] - t_drain) / 1e6).tolist() if len(ok) else [],
        "send_s": ((send - t_drain) / 1e6)[:: max(1, len(send) // 20000)].tolist(),
        "lat_ms": lat[:: max(1, len(send) // 20000)].tolist(),
    }


def render(result: dict[str, Any]) -> str:
    rows = []
    for r in result["runs"]:
        lat = r["latency_ms"]
        rows.append(
            [
                f"{r['drain_rate_per_s']:,.0f}",
                fmt(r.get("achieved_goodbye_rate_per_s"), 0),
                f"{r['clients_on_drained_region']:,}",
                f"{r['moves']['ok']:,} ({r['moves']['failed']} failed)",
                fmt(r["first_goodbye_s"], 2),
                fmt(r["all_moved_s"], 2),
                f"{fmt(r['away_ms']['p50'], 0)} / {fmt(r['away_ms']['p99'], 0)}",
                f"{r['peak_per_100ms'].get('hello', 0)} ({r['peak_reconnects_per_s']:,}/s)",
                fmt(r["mean_reconnects_per_s"], 0),
                f"{fmt(lat['before']['p99'], 1)}",
                f"{fmt(lat['during']['p50'], 1)} / {fmt(lat['during']['p99'], 1)} / {fmt(lat['during']['max'], 0)}",
                fmt(lat["during_other_clients"]["p99"], 1),
                f"{r['deliveries']['lost']} / {r['deliveries']['expected']:,}",
                r["deliveries"]["duplicates"],
            ]
        )
    lines = [
        md_table(
            [
                "drain rate /s",
                "achieved goodbyes/s",
                "clients on drained region",
                "moved",
                "first goodbye s",
                "all moved s",
                "away per client p50 / p99 ms",
                "peak reconnects per 100 ms",
                "mean reconnects/s",
                "msg p99 before ms",
                "msg p50 / p99 / max during move ms",
                "msg p99 during, clients not moved",
                "lost / expected",
                "dup",
            ],
            rows,
        )
    ]
    lines.append("")
    cpu_rows = []
    labels = [k for k in result["runs"][0]["cpu_ms_per_moved_client"]]
    for k in labels:
        vals = [r["cpu_ms_per_moved_client"].get(k) for r in result["runs"]]
        if max((v or 0) for v in vals) < 0.05:
            continue
        cpu_rows.append(
            [k]
            + [
                f"{fmt(v, 2)} ({fmt(r['cpu_s_move_window'].get(k), 2)})"
                for v, r in zip(vals, result["runs"], strict=False)
            ]
        )
    lines += [
        "CPU ms per moved client in the move window (CPU-seconds in it; messages kept flowing):",
        "",
        md_table(
            ["process"]
            + [f"drain {r['drain_rate_per_s']:,.0f}/s ({fmt(r['all_moved_s'], 1)} s)" for r in result["runs"]],
            cpu_rows,
        ),
    ]
    for r in result["runs"]:
        la = r.get("loss_by_attempts", {})
        lines.append(
            f"* drain {r['drain_rate_per_s']:,.0f}/s: {r['deliveries']['lost']:,} deliveries lost at {r.get('lost_clients', 0)} clients "
            f"({r.get('lost_sent_while_client_away', 0):,} of them sent while that client was away); by reconnect attempts: "
            + ", ".join(
                f"{k} attempt(s): {v['clients_with_loss']} of {v['clients']} clients lost some"
                for k, v in sorted(la.items())
            )
            + f"; failed reconnect attempts: {r.get('move_errors') or 'none'}; gateway connects: {r.get('gateway_connects')}; "
            f"webapp resume records: {r.get('webapp_resumes')}; gateway history fetches: {r.get('gateway_gap_fills')}."
        )
    cfg = result["config"]
    lines += [
        "",
        f"Load: {cfg['clients']:,} clients on {DRAIN_REGION} + {cfg['others']:,} on {OTHER_REGION}, one gateway per region, "
        f"{cfg['post_rate']:g} messages/s alternately to #general and #random (every client is in both: "
        f"{cfg['clients'] + cfg['others']:,} deliveries per message). Times from the drain key's write in Consul; "
        "reconnect = the client's new hello on the target region (client clock).",
    ]
    m = result["machine"]
    lines.append(
        f"Machine: {m['nproc']} cores, {m['cpu_model']}, {m['ram_gib']} GiB RAM, Python {m['python']}, uvloop {m['uvloop']} (shared, noisy); 1-min load average {result['loadavg_1m']['start']:.1f} at start, {result['loadavg_1m']['end']:.1f} at end."
    )
    return "\n".join(lines)


def plot(result: dict[str, Any], name: str) -> None:
    pyplot = plt()
    runs = result["runs"]
    fig, axes = pyplot.subplots(1, 2, figsize=(12, 4.2))
    ax = axes[0]
    for r in runs:
        h = r["reconnect_hist_100ms"].get("hello")
        if not h:
            continue
        x = (np.arange(len(h["counts"])) + h["first_bucket"]) * BUCKET_US / 1e6
        ax.step(x, np.array(h["counts"]) * 10, where="post", label=f"drain rate {r['drain_rate_per_s']:,.0f}/s")
    ax.set_xlabel("seconds after `rtm drain`")
    ax.set_ylabel("reconnects/s at the target (per 100 ms bucket ×10)")
    ax.set_title("reconnects seen by the target region")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    ax = axes[1]
    for r in runs:
        pd = r["_plot"]
        ax.scatter(pd["send_s"], pd["lat_ms"], s=2, alpha=0.3, label=f"drain rate {r['drain_rate_per_s']:,.0f}/s")
    ax.set_yscale("log")
    ax.set_xlabel("message sent at, s after `rtm drain`")
    ax.set_ylabel("delivery latency, ms")
    ax.set_title("message latency, every delivery (sampled)")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8, markerscale=4)
    fig.suptitle(f"rtm region drain, {result['config']['clients']:,} clients moved, {result['machine']['nproc']} cores")
    save_figure(fig, name)


async def run(args: argparse.Namespace) -> dict[str, Any]:
    nofile = raise_nofile(65536)
    result: dict[str, Any] = {
        "benchmark": NAME,
        "machine": machine_info(),
        "argv": sys.argv[1:],
        "nofile": nofile,
        "config": {k: v for k, v in vars(args).items() if k != "rate_list"},
        "runs": [],
    }
    for rate in args.rate_list:
        r = await one_rate(args, rate)
        result["runs"].append(r)
        print(
            f"  drain {rate:g}/s: all {r['moves']['ok']} moved in {fmt(r['all_moved_s'], 2)} s, peak {r['peak_per_100ms'].get('hello', 0)} reconnects/100 ms, "
            f"msg p99 during {fmt(r['latency_ms']['during']['p99'], 1)} ms, lost {r['deliveries']['lost']} dup {r['deliveries']['duplicates']}",
            flush=True,
        )
    return result


def main(argv: list[str] | None = None) -> int:
    return run_benchmark(NAME, parse_args(argv), run, render, plot, loadavg=True)


if __name__ == "__main__":
    sys.exit(main())
