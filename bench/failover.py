"""Failover benchmark (issue 3): SIGKILL a busy channel server under load; how fast do its
channels deliver again, how fast does everyone catch up, and is anything lost?

Starts ``rtm up`` (3 channel servers + a spare, 2 gateways in two regions),
creates ``--channels`` channels with ``--members`` members each out of
``--clients`` users (at least ``--min-per-slot`` channels on every ring slot),
connects every user once (picows clients in a separate process, alternately
hinted to each region, so both gateways serve), and posts ``--rate`` posts/s
round-robin over the channels for the whole run (text ``m<id>:<send µs>``).
Then, ``--repeats`` times: SIGKILL the owner of slot ``cs-(i mod 3)`` (the
pid from fleet.json, as ``rtm kill`` does), and wait until ``rtm up`` has
restarted it and it is back as a healthy spare (Consul health passing, not in
the ring) and every delivery so far is in; then the next kill.

Per kill, on the killed slot's channels ("affected"):

(a) kill -> first delivery of a post sent after the kill;
(b) kill -> full catch-up: the first time t at or after (a)'s delivery at which
    every client holds every post acknowledged (HTTP ok) up to t;
detection: kill -> CHARM's "is gone (probe refused)" log line, and kill -> the
    ring change it wrote (both from the fleet's JSON log lines, `rtm up --verbose`).

Over the whole run: lost and duplicated deliveries (every acknowledged post
must reach every member exactly once).

    python -m bench.failover            # 10 kills, a few minutes
    python -m bench.failover --quick    # 3 kills

Why one module over 500 lines: one benchmark, read top to bottom as its run goes (setup, kills,
analysis, report); what it shares with typing and drain lives in bench.fleet_events, the clients in
bench.load_client.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import signal
import sys
import time
from typing import Any

import numpy as np

from bench.fleet_events import Api, EvClients, LoggedFleet, Poster, deliveries, now_us
from bench.harness import ProcWatch, diff, fmt, machine_info, md_table, plt, raise_nofile, run_benchmark, save_figure
from bench.stats import med, pct

NAME = "failover"
GOAL_KILL_TO_DELIVERY_S = 2.0
SLACK_KILL_TO_DELIVERY_S = 20.0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m bench.failover", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--clients", type=int, default=48, help="websocket clients (one per user)")
    p.add_argument("--channels", type=int, default=21, help="channels (more are added if a slot has too few)")
    p.add_argument("--members", type=int, default=8, help="members per channel")
    p.add_argument("--min-per-slot", type=int, default=5, help="channels on every ring slot at least")
    p.add_argument("--rate", type=float, default=50.0, help="posts/s, round-robin over the channels")
    p.add_argument("--repeats", type=int, default=10, help="kills")
    p.add_argument("--settle-s", type=float, default=3.0, help="steady load after each recovery, before the next kill")
    p.add_argument("--recovery-timeout-s", type=float, default=60.0, help="give up waiting for a recovery after this")
    p.add_argument("--quick", action="store_true", help="3 kills")
    args = p.parse_args(argv)
    if args.quick:
        args.repeats = min(args.repeats, 3)
    return args


async def wait_recovered(fleet: LoggedFleet, killed: str, old_pid: int, timeout_s: float) -> dict[str, Any]:
    """Until the killed instance is restarted (new pid), healthy in Consul, and a spare
    (serves no slot), and every slot has an owner. Returns the times (s after call)."""
    t0 = time.monotonic()
    out: dict[str, Any] = {"ok": False}
    while time.monotonic() - t0 < timeout_s:
        try:
            ring = fleet.ring()
            owners = set(ring.doc.slots.values())
            all_owned = all(ring.doc.slots.values())
            healthy = {h["id"]: h for h in fleet.healthy("channel-server")}
            proc = fleet.process(killed)
            restarted = int(proc["pid"]) != old_pid
        except Exception:  # noqa: BLE001 - Consul or fleet.json mid-rewrite: try again
            await asyncio.sleep(0.2)
            continue
        if all_owned and "slot_owned_s" not in out and killed not in owners:
            out["slot_owned_s"] = time.monotonic() - t0
        if restarted and "restarted_s" not in out:
            out["restarted_s"] = time.monotonic() - t0
        if all_owned and restarted and killed in healthy and killed not in owners:
            out["spare_s"] = time.monotonic() - t0
            out["ok"] = True
            out["spare_tags"] = healthy[killed]["tags"]
            return out
        await asyncio.sleep(0.2)
    return out


def catch_up(posts: list[dict[str, Any]], completion: dict[int, float], after_us: int, start_us: int) -> float | None:
    """First t >= start_us such that every ok post with ack <= t is complete by t (µs), or None."""
    rows = sorted((p["ack_us"], completion.get(p["id"], float("inf"))) for p in posts if p["ok"])
    if not rows:
        return None
    acks = np.array([r[0] for r in rows], dtype=float)
    comp = np.array([r[1] for r in rows], dtype=float)
    prefix = np.maximum.accumulate(comp)
    cands = np.unique(np.concatenate([comp[np.isfinite(comp) & (comp >= start_us)], [float(start_us)]]))
    for t in cands:
        i = int(np.searchsorted(acks, t, side="right"))
        if i == 0 or prefix[i - 1] <= t:
            return float(t)
    return None


async def run(args: argparse.Namespace) -> dict[str, Any]:
    raise_nofile(65536)
    rnd = random.Random(42)
    result: dict[str, Any] = {"benchmark": NAME, "machine": machine_info(), "argv": sys.argv[1:], "config": vars(args)}
    print(f"failover: starting the fleet ({args.clients} users) ...", flush=True)
    fleet = LoggedFleet("--seed-users", str(args.clients))
    with fleet:
        try:
            result["fleet_startup_s"] = fleet.startup_s
            api = Api(fleet.api_url)
            try:
                async with EvClients(1) as ec:
                    await body(args, fleet, api, ec, rnd, result)
            finally:
                await api.close()
        finally:
            result["log_lines"] = len(fleet.log_lines())
            fleet.remove_log()
    return result


async def body(
    args: argparse.Namespace, fleet: LoggedFleet, api: Api, ec: EvClients, rnd: random.Random, result: dict[str, Any]
) -> None:
    users = [u for u in fleet.seed["users"] if not u["is_bot"]][: args.clients]
    ring = fleet.ring()
    slots = sorted(ring.doc.slots)
    # channels: random member sets; add channels until every slot has enough (bounded)
    groups: list[list[int]] = []
    channels: list[str] = []
    for attempt in range(6):
        want = args.channels if attempt == 0 else 3
        new = [rnd.sample(range(len(users)), args.members) for _ in range(want)]
        ids = await api.make_channels([[users[i] for i in g] for g in new], prefix=f"fo{attempt}")
        groups += new
        channels += ids
        per = {s: sum(1 for c in channels if ring.slot_for(c) == s) for s in slots}
        if min(per.values()) >= args.min_per_slot:
            break
    slot_of = {c: ring.slot_for(c) for c in channels}
    result["channels"] = len(channels)
    result["channels_per_slot"] = {s: sum(1 for c in channels if slot_of[c] == s) for s in slots}
    print(
        f"failover: {len(channels)} channels of {args.members}, per slot {result['channels_per_slot']}; connecting ...",
        flush=True,
    )
    regions = ["us-east", "eu-west"]
    conn = await ec.connect(
        fleet.api_url, [u["token"] for u in users], [regions[i % 2] for i in range(len(users))], follow_goodbye=False
    )
    result["connect"] = {k: v for k, v in conn.items() if k != "gw"}
    result["connect"]["per_gateway"] = {g: conn["gw"].count(g) for g in set(conn["gw"]) if g}
    if conn["failed"]:
        raise RuntimeError(f"connect failed: {conn['errors']}")
    members = {t: np.array(sorted(g), dtype=np.int64) for t, g in enumerate(groups)}  # conn i = users[i]
    poster_tokens = [users[g[0]]["token"] for g in groups]
    poster = Poster(api, list(zip(channels, poster_tokens, strict=False)))
    watch = ProcWatch({**fleet.labelled_pids(), **ec.pids(), "poster (bench)": os.getpid()})
    stop = asyncio.Event()
    max_run_s = 60 + args.repeats * (args.recovery_timeout_s + args.settle_s + 30)
    post_task = asyncio.ensure_future(poster.run(args.rate, max_run_s, stop))
    cpu0 = watch.cpu()
    t_run0 = time.monotonic()

    def expected_so_far(before_us: int) -> int:
        return sum(
            len(members[p["target"]]) for p in poster.posts if p["ok"] and p["ack_us"] and p["ack_us"] < before_us
        )

    kills: list[dict[str, Any]] = []
    try:
        await asyncio.sleep(5.0)  # warm: every channel has been posted to and delivered
        for rep in range(args.repeats):
            fleet.reload()
            ring = fleet.ring()
            slot = slots[rep % len(slots)]
            owner = ring.doc.slots[slot]
            pid = int(fleet.process(owner)["pid"])
            affected = [t for t, c in enumerate(channels) if slot_of[c] == slot]
            t_kill = now_us()
            os.kill(pid, signal.SIGKILL)
            rec = await wait_recovered(fleet, owner, pid, args.recovery_timeout_s)
            # every delivery of what was acked a moment ago is in (bounded), then steady load
            mark = now_us() - 500_000
            await ec.wait_msgs(expected_so_far(mark), max_s=30.0, idle_s=5.0)
            await asyncio.sleep(args.settle_s)
            kills.append(
                {
                    "rep": rep,
                    "slot": slot,
                    "killed": owner,
                    "pid": pid,
                    "kill_us": t_kill,
                    "affected": affected,
                    "recovery": rec,
                    "new_owner": fleet.ring().doc.slots[slot],
                }
            )
            print(
                f"  kill {rep + 1}/{args.repeats}: slot {slot} owner {owner} (pid {pid}) -> {kills[-1]['new_owner']}; "
                f"slot re-owned after {fmt(rec.get('slot_owned_s'), 2)} s (poll), back as a spare after {fmt(rec.get('spare_s'), 1)} s",
                flush=True,
            )
            if not rec["ok"]:
                print(
                    "failover: the killed server did not come back as a spare in time; stopping the repeats", flush=True
                )
                break
    finally:
        stop.set()
        await post_task
        await poster.settle()
    run_s = time.monotonic() - t_run0
    cpu = diff(watch.cpu(), cpu0)
    await ec.wait_msgs(expected_so_far(now_us() + 1), max_s=30.0, idle_s=5.0)
    rec = await ec.dump()
    logs = fleet.log_lines()
    result["_gw_of_conn"] = conn["gw"]
    analyze(args, result, poster, members, rec["msgs"], kills, logs, channels)
    result.pop("_gw_of_conn", None)
    total_deliv = result["totals"]["delivered"]
    result["cpu_s"] = cpu
    result["run_s"] = run_s
    # a killed channel server's CPU is gone with it: only processes alive from start to end
    result["cpu_us_per_delivery"] = {
        k: (v * 1e6 / total_deliv if total_deliv else None) for k, v in cpu.items() if v == v
    }
    result["post_errors"] = poster.errors


def analyze(
    args: argparse.Namespace,
    result: dict[str, Any],
    poster: Poster,
    members: dict[int, np.ndarray],
    msgs: np.ndarray,
    kills: list[dict[str, Any]],
    logs: list[dict[str, Any]],
    channels: list[str],
) -> None:
    posts = poster.posts
    d = deliveries(msgs, posts, members)
    result["totals"] = {k: d[k] for k in ("expected", "delivered", "lost", "duplicates", "unexpected", "lost_sample")}
    result["totals"]["posts"] = len(posts)
    result["totals"]["posts_ok"] = sum(1 for p in posts if p["ok"])
    recv = d["recv"]
    by_post: dict[int, list[int]] = {}
    first_recv: dict[int, int] = {}
    for _c, pid, t in recv.tolist():
        by_post.setdefault(pid, []).append(t)
    completion: dict[int, float] = {}
    post_by_id = {p["id"]: p for p in posts}
    for pid, ts in by_post.items():
        p = post_by_id[pid]
        first_recv[pid] = min(ts)
        if len(ts) == len(members[p["target"]]):
            completion[pid] = float(max(ts))
    lat_ms = (
        (recv[:, 2] - np.array([post_by_id[int(x)]["send_us"] for x in recv[:, 1]], dtype=np.int64)) / 1e3
        if len(recv)
        else np.zeros(0)
    )
    result["latency_ms_all"] = {
        "p50": pct(lat_ms, 50),
        "p99": pct(lat_ms, 99),
        "max": float(lat_ms.max()) if len(lat_ms) else None,
    }
    rows = []
    for i, k in enumerate(kills):
        t0 = k["kill_us"]
        t_next = kills[i + 1]["kill_us"] if i + 1 < len(kills) else float("inf")
        aff = set(k["affected"])
        aposts = [p for p in posts if p["target"] in aff and p["send_us"] < t_next]
        after = [p for p in aposts if p["send_us"] > t0 and p["id"] in first_recv]
        first = min((first_recv[p["id"]] for p in after), default=None)
        first_sent = min((p["send_us"] for p in aposts if p["send_us"] > t0), default=None)
        cu = catch_up(aposts, completion, t0, first if first is not None else t0)
        # unaffected channels: latency of posts sent in the 3 s after the kill
        un = [p for p in posts if p["target"] not in aff and t0 <= p["send_us"] < t0 + 3_000_000]
        un_ids = {p["id"] for p in un}
        un_lat = [(t - post_by_id[pid]["send_us"]) / 1e3 for _, pid, t in recv.tolist() if pid in un_ids]
        # affected: the worst delivery latency among posts sent in the outage
        a_lat = [
            (t - post_by_id[pid]["send_us"]) / 1e3
            for _, pid, t in recv.tolist()
            if pid in {p["id"] for p in aposts if t0 <= p["send_us"] < t0 + 3_000_000}
        ]
        # late deliveries after delivery resumed (not explained by the outage itself), and the log around the kill
        resumed = first if first is not None else t0
        late = [
            (pid, c, t)
            for c, pid, t in recv.tolist()
            if post_by_id[pid]["target"] in aff
            and t0 <= post_by_id[pid]["send_us"] < t_next
            and post_by_id[pid]["send_us"] > resumed
            and t - post_by_id[pid]["send_us"] > 300_000
        ]
        gw_of = result.get("_gw_of_conn") or []
        late_sample = [
            {
                "post": pid,
                "channel": channels[post_by_id[pid]["target"]],
                "conn": c,
                "gateway": gw_of[c] if c < len(gw_of) else None,
                "sent_after_kill_s": (post_by_id[pid]["send_us"] - t0) / 1e6,
                "latency_ms": (t - post_by_id[pid]["send_us"]) / 1e3,
            }
            for pid, c, t in late[:20]
        ]
        window = [
            f"+{e['ts'] - t0 / 1e6:.3f}s [{e['proc']}] {e['msg'][:200]}"
            for e in logs
            if t0 / 1e6 - 0.2 <= e["ts"] <= t0 / 1e6 + 4.0
        ][:40]
        gone = next(
            (
                e
                for e in logs
                if "is gone (probe refused)" in e.get("msg", "") and k["killed"] in e["msg"] and e["ts"] * 1e6 >= t0
            ),
            None,
        )
        ring_line = next(
            (
                e
                for e in logs
                if e.get("msg", "").startswith("channel ring v") and "->" in e["msg"] and e["ts"] * 1e6 >= t0
            ),
            None,
        )
        ttl_line = next(
            (
                e
                for e in logs
                if "critical" in e.get("msg", "").lower() and k["killed"] in e.get("msg", "") and e["ts"] * 1e6 >= t0
            ),
            None,
        )
        rows.append(
            {
                "rep": k["rep"],
                "slot": k["slot"],
                "killed": k["killed"],
                "new_owner": k["new_owner"],
                "affected_channels": len(aff),
                "kill_to_first_post_sent_s": (first_sent - t0) / 1e6 if first_sent else None,
                "kill_to_delivery_s": (first - t0) / 1e6 if first else None,
                "kill_to_catch_up_s": (cu - t0) / 1e6 if cu is not None else None,
                "detected_s": (gone["ts"] * 1e6 - t0) / 1e6 if gone else None,
                "detected_by": "probe refused" if gone else ("ttl" if ttl_line else "not in log"),
                "detected_line": f"[{gone['proc']}] {gone['msg']}" if gone else None,
                "ring_changed_s": (ring_line["ts"] * 1e6 - t0) / 1e6 if ring_line else None,
                "ring_line": f"[{ring_line['proc']}] {ring_line['msg']}" if ring_line else None,
                "affected_max_latency_ms": max(a_lat) if a_lat else None,
                "unaffected_p99_ms": pct(un_lat, 99),
                "unaffected_max_ms": max(un_lat) if un_lat else None,
                "back_as_spare_s": k["recovery"].get("spare_s"),
                "late_deliveries_after_resume": len(late),
                "late_sample": late_sample,
                "log_window": window,
            }
        )
    result["kills"] = rows
    result["summary"] = {
        "kills": len(rows),
        "kill_to_delivery_s": {
            "median": med([r["kill_to_delivery_s"] for r in rows]),
            "max": max((r["kill_to_delivery_s"] or 0) for r in rows) if rows else None,
        },
        "kill_to_catch_up_s": {
            "median": med([r["kill_to_catch_up_s"] for r in rows]),
            "max": max((r["kill_to_catch_up_s"] or 0) for r in rows) if rows else None,
        },
        "detected_s": {
            "median": med([r["detected_s"] for r in rows]),
            "max": max((r["detected_s"] or 0) for r in rows) if rows else None,
        },
        "ring_changed_s": {
            "median": med([r["ring_changed_s"] for r in rows]),
            "max": max((r["ring_changed_s"] or 0) for r in rows) if rows else None,
        },
        "detected_by": sorted({r["detected_by"] for r in rows}),
        "unaffected_p99_ms_median": med([r["unaffected_p99_ms"] for r in rows]),
        "lost": result["totals"]["lost"],
        "duplicates": result["totals"]["duplicates"],
    }
    s = result["summary"]
    s["goal_met"] = bool(
        s["kill_to_delivery_s"]["median"] is not None
        and s["kill_to_delivery_s"]["median"] < GOAL_KILL_TO_DELIVERY_S
        and s["lost"] == 0
        and s["duplicates"] == 0
        and len(rows) == args.repeats
    )
    # for the plot: per post, send time and first-delivery latency, affected or not
    result["_plot"] = {
        "send_s": [(p["send_us"] - posts[0]["send_us"]) / 1e6 for p in posts if p["id"] in first_recv],
        "first_ms": [(first_recv[p["id"]] - p["send_us"]) / 1e3 for p in posts if p["id"] in first_recv],
        "kills_s": [(k["kill_us"] - posts[0]["send_us"]) / 1e6 for k in kills],
    }


def render(result: dict[str, Any]) -> str:
    rows = []
    for r in result["kills"]:
        rows.append(
            [
                r["rep"] + 1,
                r["slot"],
                r["affected_channels"],
                fmt(r["detected_s"], 2),
                fmt(r["ring_changed_s"], 2),
                fmt(r["kill_to_delivery_s"], 2),
                fmt(r["kill_to_catch_up_s"], 2),
                fmt(r["affected_max_latency_ms"], 0),
                fmt(r["unaffected_p99_ms"], 1),
                r["late_deliveries_after_resume"],
                r["detected_by"],
            ]
        )
    s = result["summary"]
    t = result["totals"]
    lines = [
        md_table(
            [
                "kill",
                "slot",
                "affected channels",
                "detected s",
                "ring changed s",
                "(a) kill→delivery s",
                "(b) kill→full catch-up s",
                "worst affected latency ms",
                "unaffected p99 ms",
                "late deliveries after resume (>300 ms)",
                "detected by",
            ],
            rows,
        ),
        "",
    ]
    lines.append(
        md_table(
            [
                "kills",
                "(a) median s",
                "(a) max s",
                "(b) median s",
                "(b) max s",
                "detection median s",
                "ring change median s",
                "lost / expected deliveries",
                "duplicates",
                f"goal (a) median < {GOAL_KILL_TO_DELIVERY_S:g} s, 0 lost/dup",
            ],
            [
                [
                    s["kills"],
                    fmt(s["kill_to_delivery_s"]["median"], 2),
                    fmt(s["kill_to_delivery_s"]["max"], 2),
                    fmt(s["kill_to_catch_up_s"]["median"], 2),
                    fmt(s["kill_to_catch_up_s"]["max"], 2),
                    fmt(s["detected_s"]["median"], 2),
                    fmt(s["ring_changed_s"]["median"], 2),
                    f"{t['lost']} / {t['expected']:,}",
                    t["duplicates"],
                    "met" if s["goal_met"] else "**missed**",
                ]
            ],
        )
    )
    cfg = result["config"]
    lines += [
        "",
        f"Load: {result['connect']['connected']} clients on {len(result['connect']['per_gateway'])} gateways, "
        f"{result['channels']} channels of {cfg['members']} (per slot {result['channels_per_slot']}), "
        f"{cfg['rate']:g} posts/s round-robin; {t['posts_ok']:,} posts acknowledged, {t['expected']:,} deliveries expected. "
        f"Slack's figure for the same: {SLACK_KILL_TO_DELIVERY_S:g} s.",
    ]
    ex = next((r for r in result["kills"] if r["detected_line"]), None)
    if ex:
        lines.append(f"Detection (fleet log): `{ex['detected_line']}` then `{ex['ring_line']}`.")
    top = sorted(((k, v) for k, v in result["cpu_us_per_delivery"].items() if v), key=lambda kv: -kv[1])[:8]
    lines.append(
        "CPU µs per delivery over the whole run (failovers included; channel servers that were killed are not counted): "
        + ", ".join(f"{k} {v:.0f}" for k, v in top)
        + "."
    )
    m = result["machine"]
    lines.append(
        f"Machine: {m['nproc']} cores, {m['cpu_model']}, {m['ram_gib']} GiB RAM, Python {m['python']}, uvloop {m['uvloop']} (shared, noisy: medians quoted); 1-min load average {result['loadavg_1m']['start']:.1f} at start, {result['loadavg_1m']['end']:.1f} at end."
    )
    return "\n".join(lines)


def plot(result: dict[str, Any], name: str) -> None:
    pyplot = plt()
    fig, axes = pyplot.subplots(1, 2, figsize=(12, 4.2))
    pd = result["_plot"]
    ax = axes[0]
    ax.scatter(pd["send_s"], pd["first_ms"], s=3, alpha=0.5)
    for k in pd["kills_s"]:
        ax.axvline(k, color="red", lw=0.8, alpha=0.6)
    ax.set_yscale("log")
    ax.set_xlabel("post sent at, s (red: SIGKILL of a channel server)")
    ax.set_ylabel("first delivery latency, ms")
    ax.set_title("every post: send -> first client receipt")
    ax.grid(True, alpha=0.3)
    ax = axes[1]
    ks = result["kills"]
    x = np.arange(len(ks))
    w = 0.27
    ax.bar(x - w, [r["detected_s"] or 0 for r in ks], w, label="detected (probe)")
    ax.bar(x, [r["kill_to_delivery_s"] or 0 for r in ks], w, label="(a) kill → first delivery")
    ax.bar(x + w, [r["kill_to_catch_up_s"] or 0 for r in ks], w, label="(b) kill → full catch-up")
    ax.axhline(GOAL_KILL_TO_DELIVERY_S, color="grey", ls="--", lw=1, label="goal 2 s")
    ax.set_xticks(x, [str(i + 1) for i in x])
    ax.set_xlabel("kill")
    ax.set_ylabel("seconds after SIGKILL")
    ax.set_title("channel server failover")
    ax.legend(fontsize=8)
    ax.grid(True, axis="y", alpha=0.3)
    fig.suptitle(
        f"rtm failover, {result['connect']['connected']} clients, {result['config']['rate']:g} posts/s, {result['machine']['nproc']} cores"
    )
    save_figure(fig, name)


def main(argv: list[str] | None = None) -> int:
    return run_benchmark(NAME, parse_args(argv), run, render, plot, loadavg=True)


if __name__ == "__main__":
    sys.exit(main())
