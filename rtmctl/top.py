"""``rtm top [--interval-s S] [--count N] [--data-dir DIR]``: how hard each process of the fleet works, live.

Every ``--interval-s`` this reads ``DATA_DIR/fleet.json`` (``rtm up`` rewrites it when it restarts
a process), scrapes every process's ``/metrics`` at once (each within :data:`SCRAPE_TIMEOUT_S`; one
that does not answer shows as ``down``) and prints one table: per process its CPU % (the growth of
``process_cpu_seconds_total`` over the time between two scrapes), resident memory, open fds,
``rtm_errors_total`` per second over every kind, and the work its service does (:data:`WORK`:
posts per second for the webapp, events in and out for a channel server, deliveries and open
client websockets for a gateway, ...); then a total line. On a terminal each table replaces the
last; into a pipe the tables follow each other, a blank line between them. ``--count N`` stops
after N tables; Ctrl-C ends it.

Rates need two scrapes of the same process: on the first table, for a process that just
appeared, and for one that restarted (another pid or start time; its counters began again from
0) they show as ``-`` until the next table, never negative. :class:`TopModel` holds that logic,
sans I/O: scrapes in, rows out; :func:`run` is the HTTP around it.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from rtmctl.demo_client import fleet_file
from rtmctl.operator import FLEET_HINT
from services.config import Parser, env_default
from services.identity import ADMIN_SERVER, CHANNEL_SERVER, CHARM, GATEWAY, PRESENCE, WEBAPP

DEFAULT_INTERVAL_S = 2.0
MIN_INTERVAL_S = 0.1  # below this the scrapes themselves would be most of the fleet's work
MAX_INTERVAL_S = 60.0
MAX_COUNT = 1_000_000  # tables; 0 (the default) runs until Ctrl-C
SCRAPE_TIMEOUT_S = 2.0  # one process's /metrics; a process slower than this shows as down
MAX_METRICS_BYTES = 4 * 1024 * 1024  # of one /metrics answer (a fleet process's is ~20 KiB)
MIB = 1024 * 1024
CONSUL_DEV = "consul-dev"

CPU = "process_cpu_seconds_total"
RSS = "process_resident_memory_bytes"
OPEN_FDS = "process_open_fds"
STARTED = "process_start_time_seconds"
ERRORS = "rtm_errors_total"

CLEAR_HOME = "\x1b[H\x1b[2J"  # ANSI: cursor home, clear the screen
FIRST_NOTE = "rates need two scrapes: '-' until the next table"


@dataclass(frozen=True)
class Work:
    """One figure of a service's work: a counter shown per second, or a gauge shown as it is."""

    label: str
    sample: str  # the sample's name in /metrics, summed over its label sets
    rate: bool = True


# What each service does, in its own metrics (the one or two figures that say it).
WORK: dict[str, tuple[Work, ...]] = {
    WEBAPP: (Work("posts/s", "rtm_webapp_posts_total"), Work("req/s", "rtm_webapp_requests_total")),
    ADMIN_SERVER: (Work("fwd/s", "rtm_as_events_forwarded_total"),),
    CHANNEL_SERVER: (Work("in/s", "rtm_cs_events_in_total"), Work("out/s", "rtm_cs_events_out_total")),
    GATEWAY: (Work("deliv/s", "rtm_gw_deliveries_total"), Work("conns", "rtm_gw_connections", rate=False)),
    PRESENCE: (Work("upd/s", "rtm_ps_updates_in_total"), Work("push/s", "rtm_ps_updates_out_total")),
    CHARM: (Work("leader", "rtm_charm_is_leader", rate=False), Work("writes/s", "rtm_charm_ring_writes_total")),
    CONSUL_DEV: (Work("req/s", "rtm_consul_dev_requests_total"),),
}
WANTED = frozenset({CPU, RSS, OPEN_FDS, STARTED, ERRORS} | {w.sample for ws in WORK.values() for w in ws})


@dataclass(frozen=True)
class Process:
    """One process as ``fleet.json`` lists it."""

    name: str
    service: str
    pid: int
    host: str
    metrics_port: int

    @classmethod
    def from_fleet(cls, entry: Mapping[str, Any]) -> Process:
        host = str(entry.get("host") or "")
        return cls(
            name=str(entry["name"]),
            service=str(entry["service"]),
            pid=int(entry["pid"]),
            host="127.0.0.1" if host in ("", "0.0.0.0", "::") else host,  # listening everywhere: ask locally
            metrics_port=int(entry["metrics_port"]),
        )

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.metrics_port}/metrics"


@dataclass(frozen=True)
class Scrape:
    """One process's ``/metrics`` at one moment: ``at`` (monotonic seconds) and the sums of the
    samples ``rtm top`` reads, by sample name."""

    at: float
    values: Mapping[str, float]


def parse(text: str, wanted: frozenset[str] = WANTED) -> dict[str, float]:
    """The samples named in ``wanted`` of a Prometheus text exposition, each summed over its label sets."""
    sums: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name in wanted:
                sums[sample.name] = sums.get(sample.name, 0.0) + sample.value
    return sums


@dataclass(frozen=True)
class Row:
    """One line of the table; None is a figure not known (down, or a rate before its second scrape)."""

    name: str
    service: str
    pid: int | None
    up: bool
    cpu_percent: float | None = None
    rss_mib: float | None = None
    open_fds: float | None = None
    errors_per_s: float | None = None
    work: tuple[tuple[str, str], ...] = ()  # (label, figure as shown) of each of WORK[service]


@dataclass(frozen=True)
class Table:
    rows: list[Row]
    total: Row
    first: bool  # no rates anywhere yet: the first scrape


class TopModel:
    """Successive scrapes of the fleet in, table rows out (sans I/O). It keeps each process's last
    good scrape, so a rate spans the time since then, also across a scrape that failed."""

    def __init__(self) -> None:
        self._last: dict[str, tuple[int, Scrape]] = {}  # process name -> (its pid then, its last scrape)
        self._tables = 0

    def table(self, processes: list[Process], scrapes: Mapping[str, Scrape | None]) -> Table:
        """The table for ``processes`` (fleet.json's list now) given this round's ``scrapes`` (None: down)."""
        rows = []
        for proc in sorted(processes, key=lambda p: (p.service, p.name)):
            scrape = scrapes.get(proc.name)
            rows.append(self._row(proc, scrape, self._last.get(proc.name)))
            if scrape is not None:
                self._last[proc.name] = (proc.pid, scrape)
        listed = {p.name for p in processes}
        self._last = {name: last for name, last in self._last.items() if name in listed}
        self._tables += 1
        return Table(rows=rows, total=total_row(rows), first=self._tables == 1)

    def _row(self, proc: Process, now: Scrape | None, last: tuple[int, Scrape] | None) -> Row:
        if now is None:
            return Row(proc.name, proc.service, proc.pid, up=False)
        before = last[1] if last is not None and same_run(proc.pid, last[0], now, last[1]) else None
        cpu = rate(now, before, CPU, missing_is_zero=False)
        rss = now.values.get(RSS)
        work = tuple(
            (w.label, figure(rate(now, before, w.sample)) if w.rate else figure(now.values.get(w.sample), 0))
            for w in WORK.get(proc.service, ())
        )
        return Row(
            name=proc.name,
            service=proc.service,
            pid=proc.pid,
            up=True,
            cpu_percent=None if cpu is None else 100.0 * cpu,
            rss_mib=None if rss is None else rss / MIB,
            open_fds=now.values.get(OPEN_FDS),
            errors_per_s=rate(now, before, ERRORS),
            work=work,
        )


def same_run(pid: int, last_pid: int, now: Scrape, before: Scrape) -> bool:
    """Whether two scrapes are of the same run of a process (same pid and start time), so that
    its counters kept counting between them."""
    if pid != last_pid:
        return False
    started, started_before = now.values.get(STARTED), before.values.get(STARTED)
    return started is None or started_before is None or started == started_before


def rate(now: Scrape, before: Scrape | None, sample: str, missing_is_zero: bool = True) -> float | None:
    """Per second growth of a counter between two scrapes of one run; None without an earlier
    scrape, or if the counter went down (a reset not otherwise seen). A counter with labels has no
    sample until its first count: absent is 0 (``missing_is_zero``)."""
    if before is None or now.at <= before.at:
        return None
    default = 0.0 if missing_is_zero else None
    value, previous = now.values.get(sample, default), before.values.get(sample, default)
    if value is None or previous is None or value < previous:
        return None
    return (value - previous) / (now.at - before.at)


def total_row(rows: list[Row]) -> Row:
    """The sums over the processes that answered (CPU % of one core each: 200 is two cores busy)."""

    def total(figure: str) -> float | None:
        values = [getattr(r, figure) for r in rows if getattr(r, figure) is not None]
        return sum(values) if values else None

    up = sum(1 for r in rows if r.up)
    return Row(
        name="total",
        service=f"{up}/{len(rows)} up",
        pid=None,
        up=up == len(rows),
        cpu_percent=total("cpu_percent"),
        rss_mib=total("rss_mib"),
        open_fds=total("open_fds"),
        errors_per_s=total("errors_per_s"),
    )


HEADER = (
    f"{'NAME':<16} {'SERVICE':<15} {'PID':>7} {'STATE':<5} {'CPU%':>6} {'RSS MiB':>8} {'FDS':>5} {'ERR/s':>7}  WORK"
)


def figure(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def format_row(row: Row) -> str:
    state = "" if row.pid is None else ("up" if row.up else "down")
    work = "  ".join(f"{label} {value}" for label, value in row.work)
    return (
        f"{row.name:<16} {row.service:<15} {'' if row.pid is None else row.pid:>7} {state:<5} "
        f"{figure(row.cpu_percent):>6} {figure(row.rss_mib):>8} {figure(row.open_fds, 0):>5} "
        f"{figure(row.errors_per_s):>7}  {work}"
    ).rstrip()


def format_table(table: Table, title: str) -> str:
    """The table as text: a title line, the header, a line per process, the total."""
    lines = [title + (f"  ({FIRST_NOTE})" if table.first else ""), HEADER]
    lines += [format_row(row) for row in table.rows]
    lines.append(format_row(table.total))
    return "\n".join(lines) + "\n"


# ---- I/O ------------------------------------------------------------------------------------


def fleet_processes(data_dir: Path) -> list[Process] | None:
    """The processes of ``DATA_DIR/fleet.json``; None if there is none (or none readable)."""
    fleet = fleet_file(data_dir)
    if fleet is None:
        return None
    try:
        return [Process.from_fleet(entry) for entry in fleet.get("processes", [])]
    except (KeyError, TypeError, ValueError):
        return None


async def scrape(http: aiohttp.ClientSession, proc: Process) -> Scrape | None:
    """``proc``'s metrics now; None if it does not answer in time, or not with metrics."""
    try:
        async with http.get(proc.url) as resp:
            if resp.status != 200:
                return None
            body = await resp.content.read(MAX_METRICS_BYTES)
        return Scrape(at=time.monotonic(), values=parse(body.decode("utf-8", "replace")))
    except (aiohttp.ClientError, TimeoutError, OSError, ValueError):
        return None


async def scrape_all(http: aiohttp.ClientSession, processes: list[Process]) -> dict[str, Scrape | None]:
    """Every process's scrape, all at once."""
    results = await asyncio.gather(*(scrape(http, proc) for proc in processes))
    return {proc.name: result for proc, result in zip(processes, results, strict=True)}


async def run(data_dir: Path, interval_s: float, count: int, out: TextIO) -> int:
    """Print a table every ``interval_s`` (``count`` of them; 0: until cancelled)."""
    processes = fleet_processes(data_dir)
    if processes is None:
        print(f"rtm top: no {data_dir / 'fleet.json'}: {FLEET_HINT}", file=sys.stderr)
        return 1
    model, tty, shown = TopModel(), out.isatty(), 0
    next_at = time.monotonic()
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=SCRAPE_TIMEOUT_S)) as http:
        while True:
            table = model.table(processes, await scrape_all(http, processes))
            title = f"rtm top  {time.strftime('%H:%M:%S')}  every {interval_s:g} s  {data_dir}"
            out.write((CLEAR_HOME if tty else "\n" if shown else "") + format_table(table, title))
            out.flush()
            shown += 1
            if count and shown >= count:
                return 0
            next_at = max(next_at + interval_s, time.monotonic())  # a slow round does not make the next ones bunch up
            await asyncio.sleep(next_at - time.monotonic())  # wait-ok: the display's period
            processes = fleet_processes(data_dir) or processes  # rtm up rewrote it (a restart); gone: the last list


def build_parser() -> Parser:
    from rtmctl.cli import COMMANDS  # its one-line summary

    parser = Parser(prog="rtm top", description=COMMANDS["top"][1])
    parser.add(
        "--interval-s",
        DEFAULT_INTERVAL_S,
        "seconds between tables",
        at_least=MIN_INTERVAL_S,
        at_most=MAX_INTERVAL_S,
    )
    parser.add("--count", 0, "stop after this many tables (0: until Ctrl-C)", at_least=0, at_most=MAX_COUNT)
    parser.add_argument("--data-dir", default=env_default("--data-dir", "./.rtm"), help="rtm up's data directory")
    return parser


def main(argv: list[str]) -> int:
    args: argparse.Namespace = build_parser().parse_args(argv)
    try:
        return asyncio.run(run(Path(args.data_dir), args.interval_s, args.count, sys.stdout))
    except KeyboardInterrupt:  # Ctrl-C: the way to leave it
        return 0
