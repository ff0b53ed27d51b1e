"""Typing benchmark (issue 5): typing indicators through the fleet, and what they cost messages.

Starts ``rtm up`` (2 gateways in two regions, 3 channel servers), creates
``--channels`` channels of ``--clients``/``--channels`` members (each user in
one), and connects every user once (picows clients in 2 separate processes,
alternately hinted to each region, so a channel's members sit on both
gateways). Each step runs ``--step-s`` seconds with a poster sending
``--msg-rate`` messages/s round-robin over the channels (HTTP, text
``m<id>:<send µs>``) while every connection sends
``{"type":"typing","channel":C}`` in its channel at a per-connection rate
(its own random phase): 0 (messages only), 0.5/s, 1/s (the limit), and 2/s
(over the 1/s budget: about half must be dropped by the gateway's rate limit).

Typing path: client -> gateway (budget check) -> owning channel server (``pub``
with no seq) -> each subscribed gateway -> every member's socket except the
sender's. The receiver records (channel, user, receive time); a receipt is
matched to the latest send by that user in that channel at or before it (sends
of one connection are >= 0.5 s apart, latencies are ms, so this is
unambiguous). Clocks: every process reads the same machine clock (time_ns).

Drops are classified per send: *before fan-out* (no member got it: the gateway
dropped it — its ``rtm_gw_typing_total{outcome}`` says why: ``rate_limited``,
``not_connected``, ``no_owner``) or *at some receivers* (pressure further on).

    python -m bench.typing            # 4 steps x 2 repeats of 15 s, a few minutes
    python -m bench.typing --quick    # 1 repeat of 6 s steps
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from bisect import bisect_right
from typing import Any

import numpy as np

from bench.fleet_events import Api, EvClients, Poster, deliveries, prom_values
from bench.harness import (
    FleetRun,
    ProcWatch,
    fmt,
    machine_info,
    md_table,
    plt,
    raise_nofile,
    run_benchmark,
    save_figure,
)
from bench.stats import med, pct

NAME = "typing"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m bench.typing", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--clients", type=int, default=200, help="websocket connections (one per user)")
    p.add_argument("--channels", type=int, default=4, help="channels (clients split evenly)")
    p.add_argument("--msg-rate", type=float, default=20.0, help="messages/s posted during every step")
    p.add_argument(
        "--typing-rates",
        default="0,0.5,1,2:4",
        help="typing sends/s per connection, one step each; RATE:B sends bursts of B back to back (B/RATE s apart)",
    )
    p.add_argument("--step-s", type=float, default=15.0)
    p.add_argument("--repeats", type=int, default=2, help="runs of every step (interleaved); medians quoted")
    p.add_argument("--client-procs", type=int, default=2)
    p.add_argument("--quick", action="store_true", help="1 repeat of 6 s steps")
    args = p.parse_args(argv)
    if args.quick:
        args.step_s = 6.0
        args.repeats = 1
    args.rates = []
    for x in args.typing_rates.split(","):
        if x:
            rate, _, burst = x.partition(":")
            args.rates.append((float(rate), int(burst or 1)))
    return args


class Fleet(FleetRun):
    def typing_counters(self) -> dict[str, float]:
        """Sum over gateways of rtm_gw_typing_total by outcome."""
        out: dict[str, float] = {}
        for p in self.processes("gateway"):
            for labels, v in prom_values(self.metrics(p["id"]), "rtm_gw_typing_total").items():
                outcome = labels.split('outcome="', 1)[1].split('"', 1)[0] if 'outcome="' in labels else labels
                out[outcome] = out.get(outcome, 0.0) + v
        return out

    def slow_consumers(self) -> float:
        total = 0.0
        for p in self.processes("gateway"):
            for name in ("rtm_gw_slow_consumers_total", "rtm_gw_slow_consumer_disconnects_total"):
                total += sum(prom_values(self.metrics(p["id"]), name).values())
        return total


BURST_GAP_US = 50_000  # sends of one connection closer than this are one burst


def match_typing(
    sent: list[tuple[int, str, int]],
    typ: list[tuple[int, str, str, int]],
    user_of: dict[int, str],
    members: dict[str, list[int]],
) -> dict[str, Any]:
    """Match receipts to sends and classify what was not delivered.

    A connection's sends come in bursts (1 send, or ``burst`` back to back) at
    least 0.5 s apart; a receipt belongs to the latest burst of that (channel,
    user) at or before it (latency = receipt - burst send time; sends within a
    burst are µs apart). Per burst, the sends the gateway accepted are taken as
    the most receipts any receiver got from it; the rest of the burst was
    dropped before fan-out (the gateway's counters say why), and receivers with
    fewer receipts than that lost some after fan-out.
    """
    bursts: dict[tuple[str, str], list[list[int]]] = {}  # (channel, user) -> [[send µs, ...], ...]
    for conn, ch, t in sorted(sent, key=lambda x: x[2]):
        b = bursts.setdefault((ch, user_of[conn]), [])
        if b and t - b[-1][-1] < BURST_GAP_US:
            b[-1].append(t)
        else:
            b.append([t])
    starts = {k: [b[0] for b in v] for k, v in bursts.items()}
    got: dict[tuple[str, str, int], dict[int, int]] = {}  # (channel, user, burst) -> receiver -> receipts
    lat_us: list[int] = []
    unmatched = over = 0
    for recv_conn, ch, user, t in typ:
        st = starts.get((ch, user))
        i = bisect_right(st, t) - 1 if st else -1
        if i < 0:
            unmatched += 1
            continue
        per = got.setdefault((ch, user, i), {})
        n = per.get(recv_conn, 0)
        if n >= len(bursts[(ch, user)][i]):
            over += 1  # more receipts than sends in that burst: a duplicate or a late one mismatched
            continue
        per[recv_conn] = n + 1
        lat_us.append(t - bursts[(ch, user)][i][n])
    n_sends = sum(len(b) for v in bursts.values() for b in v)
    accepted = dropped_before = missing_after = expected = 0
    for (ch, user), v in bursts.items():
        receivers = len(members[ch]) - 1
        for i, b in enumerate(v):
            per = got.get((ch, user, i), {})
            a = max(per.values(), default=0)
            accepted += a
            dropped_before += len(b) - a
            expected += a * receivers
            missing_after += a * receivers - sum(per.values())
    lat = np.array(lat_us, dtype=float) / 1e3
    return {
        "sends": n_sends,
        "receipts": len(typ),
        "matched": len(lat_us),
        "accepted_inferred": accepted,
        "dropped_before_fanout": dropped_before,
        "expected_after_fanout": expected,
        "missing_after_fanout": missing_after,
        "unmatched_receipts": unmatched,
        "extra_receipts": over,
        "latency_ms": {
            "p50": pct(lat, 50),
            "p90": pct(lat, 90),
            "p99": pct(lat, 99),
            "max": float(lat.max()) if len(lat) else None,
        },
    }


async def run(args: argparse.Namespace) -> dict[str, Any]:
    raise_nofile(65536)
    result: dict[str, Any] = {
        "benchmark": NAME,
        "machine": machine_info(),
        "argv": sys.argv[1:],
        "config": {k: v for k, v in vars(args).items() if k != "rates"},
    }
    print(f"typing: starting the fleet ({args.clients} users) ...", flush=True)
    with Fleet("--seed-users", str(args.clients)) as fleet:
        result["fleet_startup_s"] = fleet.startup_s
        api = Api(fleet.api_url)
        try:
            async with EvClients(args.client_procs) as ec:
                await body(args, fleet, api, ec, result)
        finally:
            await api.close()
    return result


async def body(args: argparse.Namespace, fleet: Fleet, api: Api, ec: EvClients, result: dict[str, Any]) -> None:
    users = [u for u in fleet.seed["users"] if not u["is_bot"]][: args.clients]
    size = len(users) // args.channels
    groups = [list(range(g * size, (g + 1) * size)) for g in range(args.channels)]
    channels = await api.make_channels([[users[i] for i in g] for g in groups], prefix="typing")
    regions = ["us-east", "eu-west"]
    conn = await ec.connect(
        fleet.api_url, [u["token"] for u in users], [regions[i % 2] for i in range(len(users))], follow_goodbye=False
    )
    result["connect"] = {k: v for k, v in conn.items() if k != "gw"}
    result["connect"]["per_gateway"] = {g: conn["gw"].count(g) for g in set(conn["gw"]) if g}
    print(
        f"typing: {len(channels)} channels of {size}; connected {conn['connected']} ({result['connect']['per_gateway']})",
        flush=True,
    )
    if conn["failed"]:
        raise RuntimeError(f"connect failed: {conn['errors']}")
    user_of = {i: users[i]["id"] for i in range(len(users))}
    members_t = {t: np.array(g, dtype=np.int64) for t, g in enumerate(groups)}
    members_c = {channels[t]: g for t, g in enumerate(groups)}
    senders = [(i, channels[t]) for t, g in enumerate(groups) for i in g]
    watch = ProcWatch({**fleet.labelled_pids(), **ec.pids(), "poster (bench)": os.getpid()})
    poster = Poster(api, [(channels[t], users[g[0]]["token"]) for t, g in enumerate(groups)])
    # warm-up: every channel, typing once everywhere (not reported)
    await ec.typing(senders, 1.0, 1.0)
    await poster.run(args.msg_rate, 2.0)
    await poster.settle()
    await asyncio.sleep(1.0)
    await ec.dump()

    steps = []
    for rep in range(args.repeats):
        for rate, burst in args.rates:
            label = "none" if rate <= 0 else (f"{rate:g}/s" if burst == 1 else f"{rate:g}/s in bursts of {burst}")
            poster.posts = []
            c0, t0 = fleet.typing_counters(), watch.times()
            slow0 = fleet.slow_consumers()
            started = time.monotonic()
            if rate > 0:
                await ec.typing(senders, burst / rate, args.step_s, burst=burst)
            await poster.run(args.msg_rate, args.step_s)
            await poster.settle()
            step_s = time.monotonic() - started
            await asyncio.sleep(1.0)  # the last typing events land
            exp = sum(len(members_t[p["target"]]) for p in poster.posts if p["ok"])
            await ec.wait_msgs(exp, max_s=20.0, idle_s=3.0)
            c1, t1 = fleet.typing_counters(), watch.times()
            slow1 = fleet.slow_consumers()
            rec = await ec.dump()
            d = deliveries(rec["msgs"], poster.posts, members_t)
            post_by_id = {p["id"]: p for p in poster.posts}
            lat = (
                (d["recv"][:, 2] - np.array([post_by_id[int(x)]["send_us"] for x in d["recv"][:, 1]], dtype=np.int64))
                / 1e3
                if len(d["recv"])
                else np.zeros(0)
            )
            ty = match_typing(rec["sent"], rec["typ"], user_of, members_c)
            gw = {k: c1.get(k, 0.0) - c0.get(k, 0.0) for k in set(c0) | set(c1)}
            cpu = {k: (t1[k][0] + t1[k][1]) - (t0[k][0] + t0[k][1]) for k in t1}
            deliv = d["delivered"] + ty["matched"]
            r = {
                "repeat": rep,
                "label": label,
                "typing_rate_per_conn": rate,
                "burst": burst,
                "step_s": step_s,
                "typing": ty,
                "gateway_typing_outcomes": gw,
                "slow_consumer_cuts": slow1 - slow0,
                "typing_sent_per_s": ty["sends"] / step_s,
                "typing_accepted_per_s": gw.get("sent", 0.0) / step_s,
                "typing_delivered_per_s": ty["matched"] / step_s,
                "messages": {
                    "posts_ok": sum(1 for p in poster.posts if p["ok"]),
                    "expected": d["expected"],
                    "delivered": d["delivered"],
                    "lost": d["lost"],
                    "duplicates": d["duplicates"],
                    "latency_ms": {
                        "p50": pct(lat, 50),
                        "p99": pct(lat, 99),
                        "max": float(lat.max()) if len(lat) else None,
                    },
                },
                "cpu_s": cpu,
                "deliveries": deliv,
                "cpu_us_per_delivery": {k: (v * 1e6 / deliv if deliv else None) for k, v in cpu.items()},
            }
            steps.append(r)
            print(
                f"  typing {label}: sent {r['typing_sent_per_s']:.0f}/s, gw accepted {r['typing_accepted_per_s']:.0f}/s, "
                f"delivered {r['typing_delivered_per_s']:.0f}/s, typing p50 {fmt(ty['latency_ms']['p50'], 2)} p99 {fmt(ty['latency_ms']['p99'], 2)} ms; "
                f"msgs p50 {fmt(r['messages']['latency_ms']['p50'], 2)} p99 {fmt(r['messages']['latency_ms']['p99'], 2)} ms, lost {d['lost']} dup {d['duplicates']}; "
                f"gw outcomes { ({k: int(v) for k, v in gw.items() if v}) }",
                flush=True,
            )
    result["steps"] = steps
    result["summary"] = aggregate(steps)


def aggregate(steps: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for label in dict.fromkeys(s["label"] for s in steps):
        g = [s for s in steps if s["label"] == label]
        rate = g[0]["typing_rate_per_conn"]
        labels = list(g[0]["cpu_s"])
        outcomes = sorted({k for s in g for k in s["gateway_typing_outcomes"]})
        out.append(
            {
                "label": label,
                "typing_rate_per_conn": rate,
                "burst": g[0]["burst"],
                "repeats": len(g),
                "typing_sent_per_s": med([s["typing_sent_per_s"] for s in g]),
                "typing_accepted_per_s": med([s["typing_accepted_per_s"] for s in g]),
                "typing_delivered_per_s": med([s["typing_delivered_per_s"] for s in g]),
                "typing_latency_ms": {q: med([s["typing"]["latency_ms"][q] for s in g]) for q in ("p50", "p99")},
                "typing_latency_max_ms": max((s["typing"]["latency_ms"]["max"] or 0) for s in g),
                "typing_sends": sum(s["typing"]["sends"] for s in g),
                "typing_dropped_before_fanout": sum(s["typing"]["dropped_before_fanout"] for s in g),
                "typing_missing_after_fanout": sum(s["typing"]["missing_after_fanout"] for s in g),
                "typing_expected_after_fanout": sum(s["typing"]["expected_after_fanout"] for s in g),
                "typing_matched": sum(s["typing"]["matched"] for s in g),
                "typing_unmatched_receipts": sum(
                    s["typing"]["unmatched_receipts"] + s["typing"]["extra_receipts"] for s in g
                ),
                "gateway_typing_outcomes": {
                    k: sum(s["gateway_typing_outcomes"].get(k, 0) for s in g) for k in outcomes
                },
                "slow_consumer_cuts": sum(s["slow_consumer_cuts"] for s in g),
                "msg_latency_ms": {q: med([s["messages"]["latency_ms"][q] for s in g]) for q in ("p50", "p99")},
                "msg_latency_max_ms": max((s["messages"]["latency_ms"]["max"] or 0) for s in g),
                "msg_lost": sum(s["messages"]["lost"] for s in g),
                "msg_duplicates": sum(s["messages"]["duplicates"] for s in g),
                "msg_expected": sum(s["messages"]["expected"] for s in g),
                "deliveries_per_s": med([s["deliveries"] / s["step_s"] for s in g]),
                "cpu_s": {k: med([s["cpu_s"][k] for s in g]) for k in labels},
                "cpu_us_per_delivery": {k: med([s["cpu_us_per_delivery"][k] for s in g]) for k in labels},
            }
        )
    return out


def render(result: dict[str, Any]) -> str:
    rows = []
    for s in result["summary"]:
        o = s["gateway_typing_outcomes"]
        drops = ", ".join(f"{k} {int(v):,}" for k, v in o.items() if k != "sent" and v) or "none"
        rows.append(
            [
                s["label"],
                fmt(s["typing_sent_per_s"], 0),
                fmt(s["typing_accepted_per_s"], 0),
                fmt(s["typing_delivered_per_s"], 0),
                fmt(s["typing_latency_ms"]["p50"], 2),
                fmt(s["typing_latency_ms"]["p99"], 2),
                f"{s['typing_dropped_before_fanout']:,} / {s['typing_sends']:,}",
                drops,
                f"{s['typing_missing_after_fanout']:,} / {s['typing_expected_after_fanout']:,}",
                fmt(s["msg_latency_ms"]["p50"], 2),
                fmt(s["msg_latency_ms"]["p99"], 2),
                fmt(s["msg_latency_max_ms"], 0),
                f"{s['msg_lost']} / {s['msg_expected']:,}",
                s["msg_duplicates"],
            ]
        )
    lines = [
        md_table(
            [
                "typing per conn",
                "typing sent/s",
                "accepted by gateways/s",
                "typing delivered/s",
                "typing p50 ms",
                "typing p99 ms",
                "sends dropped before fan-out / sent",
                "gateway drop reasons (its counters)",
                "lost after fan-out / expected",
                "msg p50 ms",
                "msg p99 ms",
                "msg max ms",
                "msg lost / expected",
                "msg dup",
            ],
            rows,
        )
    ]
    labels = [k for k in result["summary"][0]["cpu_s"] if not k.startswith("presence") or True]
    head = ["process"] + [
        f"typing {s['label']} ({fmt(s['deliveries_per_s'], 0)} deliveries/s)" for s in result["summary"]
    ]
    prow = []
    for label in labels:
        vals = [s["cpu_us_per_delivery"].get(label) for s in result["summary"]]
        if all((v or 0) * max(1.0, 1) < 0.05 for v in vals):
            continue
        prow.append(
            [label]
            + [f"{fmt(v, 1)} ({fmt(s['cpu_s'][label], 2)})" for v, s in zip(vals, result["summary"], strict=False)]
        )
    lines += [
        "",
        "CPU µs per delivery (typing + message deliveries; CPU-seconds in the step), median of the repeats:",
        "",
        md_table(head, prow),
    ]
    cfg = result["config"]
    c = result["connect"]
    lines += [
        "",
        f"Load: {c['connected']} connections on {len(c['per_gateway'])} gateways ({', '.join(f'{v}' for v in c['per_gateway'].values())}), "
        f"{cfg['channels']} channels of {cfg['clients'] // cfg['channels']}, {cfg['msg_rate']:g} messages/s during every {cfg['step_s']:g} s step, "
        f"{cfg['repeats']} repeat(s). A typing event is delivered to the {cfg['clients'] // cfg['channels'] - 1} other members of its channel.",
    ]
    m = result["machine"]
    lines.append(
        f"Machine: {m['nproc']} cores, {m['cpu_model']}, {m['ram_gib']} GiB RAM, Python {m['python']}, uvloop {m['uvloop']} (shared, noisy: medians quoted); 1-min load average {result['loadavg_1m']['start']:.1f} at start, {result['loadavg_1m']['end']:.1f} at end."
    )
    return "\n".join(lines)


def plot(result: dict[str, Any], name: str) -> None:
    pyplot = plt()
    ss = result["summary"]
    x = [s["typing_rate_per_conn"] for s in ss]
    fig, axes = pyplot.subplots(1, 2, figsize=(11, 4.2))
    ax = axes[0]
    ax.plot(x, [s["msg_latency_ms"]["p50"] for s in ss], "o-", label="message p50")
    ax.plot(x, [s["msg_latency_ms"]["p99"] for s in ss], "s-", label="message p99")
    tx = [s for s in ss if s["typing_rate_per_conn"] > 0]
    ax.plot(
        [s["typing_rate_per_conn"] for s in tx], [s["typing_latency_ms"]["p50"] for s in tx], "o--", label="typing p50"
    )
    ax.plot(
        [s["typing_rate_per_conn"] for s in tx], [s["typing_latency_ms"]["p99"] for s in tx], "s--", label="typing p99"
    )
    ax.set_yscale("log")
    ax.set_xlabel("typing sends/s per connection")
    ax.set_ylabel("latency, ms")
    ax.set_title("latency: messages and typing")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    ax = axes[1]
    ax.plot(x, [s["typing_sent_per_s"] for s in ss], "o-", label="typing sent/s")
    ax.plot(x, [s["typing_accepted_per_s"] for s in ss], "^-", label="accepted by gateways/s")
    ax.plot(
        x,
        [s["typing_delivered_per_s"] / 49 if False else s["typing_delivered_per_s"] for s in ss],
        "s-",
        label="typing delivered/s (to sockets)",
    )
    ax.set_xlabel("typing sends/s per connection")
    ax.set_ylabel("events/s")
    ax.set_yscale("symlog")
    ax.set_title("typing throughput")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    c = result["connect"]
    fig.suptitle(
        f"rtm typing, {c['connected']} connections, {result['config']['msg_rate']:g} msgs/s, {result['machine']['nproc']} cores"
    )
    save_figure(fig, name)


def main(argv: list[str] | None = None) -> int:
    return run_benchmark(NAME, parse_args(argv), run, render, plot, loadavg=True)


if __name__ == "__main__":
    sys.exit(main())
