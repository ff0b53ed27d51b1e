"""bench.tls's ladder: the gateways' fixed cost against their cost per delivery, TLS off and on.

One fleet (``rtm up``) per call of :func:`fleet_ladder`, ``--clients`` websocket
clients connected; the gateways' CPU (nanosecond-exact from schedstat; the
user/system split, wakeups and read/write syscalls from /proc) while idle for
one websocket ping round, then at each rate of a ladder on the 20-member channels
and on #general. :func:`ladder_fit` fits the marginal CPU per delivery over the
loaded steps; ``perf record`` (:func:`perf_window`) and ``strace -c``
(:func:`strace_window`) say where a gateway's CPU goes. docs/trust.md, "Cost,
measured", has what it found.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from bench import fanout
from bench.stats import med

LADDER_IDLE_S = 20.0  # idle window: one websocket ping round (gateway --ws-ping-interval-s) and 2 link keepalives
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


async def sample_for(argv: list[str], seconds: float, stop_timeout_s: float) -> None:
    """Run a sampling tool (``strace``, ``perf record``) for ``seconds``, then stop it with
    SIGINT (both write their output on SIGINT) and wait at most ``stop_timeout_s``."""
    import signal

    proc = await asyncio.create_subprocess_exec(
        *argv, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL
    )
    await asyncio.sleep(seconds)
    proc.send_signal(signal.SIGINT)
    await asyncio.wait_for(proc.wait(), stop_timeout_s)


async def strace_window(pid: int, seconds: float, out_path: Path) -> str:
    """``strace -c -f`` on ``pid`` for ``seconds``: syscall counts (the summary table), or '' without strace."""
    exe = shutil.which("strace")
    if exe is None:
        return ""
    await sample_for([exe, "-c", "-f", "-p", str(pid), "-o", str(out_path)], seconds, 30)
    return out_path.read_text() if out_path.exists() else ""


PERF_S = 12.0  # each perf record window (--perf)


async def perf_window(pids: list[int], seconds: float, out_path: Path) -> dict[str, str]:
    """``perf record -e cpu-clock`` (software clock: works in VMs without hardware counters) on
    ``pids`` for ``seconds``; returns ``perf report`` by shared object and by symbol (text), or {}."""
    exe = shutil.which("perf")
    if exe is None:
        return {}
    argv = [exe, "record", "-e", "cpu-clock", "-F", "1999", "-p", ",".join(str(p) for p in pids), "-o", str(out_path)]
    await sample_for(argv, seconds, 60)
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
