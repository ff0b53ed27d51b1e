"""Shared pieces of the benchmarks: the fleet, process accounting, load clients, output.

* :class:`FleetRun` starts ``rtm up`` as a real process tree (exactly as a user
  does) in a temporary data directory, through :class:`rtmctl.local_fleet.LocalFleet`
  (the runner the system tests use too), and always stops it.
* :class:`ProcWatch` measures CPU-seconds (psutil user+system) and RSS of any
  set of pids, and samples peak RSS in a thread.
* :class:`LoadClients` runs ``bench.load_client`` subprocesses (picows +
  uvloop), each holding many websockets, controlled by JSON lines on stdin.
* :func:`publish` finishes a benchmark: ``<name>.json``, ``.md`` and ``.png`` in
  ``bench/results/``, the table printed; :func:`md_table`, :func:`save_figure`,
  :func:`machine_info` for the reports.

Everything here is bounded in time: every wait has a deadline, and every
process started here is stopped (and, if it does not stop, killed) by the
code that started it.

Why one module over 500 lines: the benchmarks' shared toolbox (fleet run, process accounting,
foreign-load guard, load-client driver, publishing), each part small and used together by every
benchmark; each section below is headed by a ``# --`` line.
"""

from __future__ import annotations

import asyncio
import datetime as _dt
import json
import os
import platform
import re
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import psutil

from rtmctl.local_fleet import LocalFleet

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
RESULTS_DIR = BENCH_DIR / "results"
FLEET_READY_TIMEOUT_S = 180.0
CLIENT_REPLY_TIMEOUT_S = 600.0


# -- machine and limits ------------------------------------------------------------------------


def machine_info() -> dict[str, Any]:
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        import uvloop

        uv = uvloop.__version__
    except ImportError:  # pragma: no cover
        uv = ""
    pkgs = {}
    for name in ("picows", "websockets", "aiohttp", "msgpack"):
        try:
            pkgs[name] = __import__(name).__version__
        except Exception:  # noqa: BLE001 - report what we can
            pkgs[name] = "?"
    commit, dirty = "", []
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10
        ).stdout.strip()
        status = subprocess.run(
            ["git", "status", "--porcelain"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10
        ).stdout
        dirty = [line[3:] for line in status.splitlines() if line[3:] and not line[3:].startswith("bench/")]
    except (OSError, subprocess.SubprocessError):
        pass
    return {
        "rtm_commit": commit,
        "rtm_uncommitted_files": dirty,  # the fleet code measured = this commit plus these working-tree edits
        "nproc": os.cpu_count(),
        "cpu_model": model,
        "ram_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "python": platform.python_version(),
        "uvloop": uv,
        "packages": pkgs,
        "kernel": platform.release(),
        "date": _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
    }


def raise_nofile(want: int) -> tuple[int, int]:
    """Raise RLIMIT_NOFILE for this process (children inherit it): soft to the hard limit,
    and the hard limit itself to ``want`` when allowed (root). Returns the new (soft, hard)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < want:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, want))
            return resource.getrlimit(resource.RLIMIT_NOFILE)
        except (ValueError, OSError):
            pass
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    except (ValueError, OSError):
        pass
    return resource.getrlimit(resource.RLIMIT_NOFILE)


def rtm_env(**extra: str) -> dict[str, str]:
    env = {"RTM_RATE_LIMIT_PER_MINUTE": "0", "RTM_LOG_LEVEL": "WARNING"}
    env.update(extra)
    return env


# -- the fleet -----------------------------------------------------------------------------------


class FleetRun:
    """``rtm up`` in a temporary data directory; use as a context manager (stops it always)."""

    def __init__(self, *args: str, env: dict[str, str] | None = None, keep_dir: bool = False) -> None:
        self.args = list(args)
        self.env = rtm_env(**(env or {}))
        self.keep_dir = keep_dir
        self.data_dir = Path(tempfile.mkdtemp(prefix="rtm-bench-"))
        self.echo: IO[str] | None = None  # where the fleet's log lines go after its ready line
        self.proc: Any = None
        self.info: dict[str, Any] = {}
        self.seed: dict[str, Any] = {}
        self._sigterm: Any = None  # the SIGTERM handler before this run's (see _stop_on_sigterm)

    def __enter__(self) -> FleetRun:
        try:
            fleet = LocalFleet.up(
                self.data_dir,
                *self.args,
                env=self.env,
                echo=self.echo,
                ready_timeout_s=FLEET_READY_TIMEOUT_S,
                cwd=str(REPO_ROOT),
            )
        except BaseException:
            self._cleanup_dir()
            raise
        self.proc, self.info, self.seed, self.startup_s = fleet.proc, fleet.info, fleet.seed, fleet.startup_s
        self._stop_on_sigterm()
        return self

    def _stop_on_sigterm(self) -> None:
        """A benchmark stopped with SIGTERM (``kill``, a timeout) leaves by an exception, so
        ``__exit__`` stops the fleet; before, the benchmark died and its whole fleet ran on. Only
        in the main thread and over the default handler, which is put back by :meth:`stop`."""
        if threading.current_thread() is not threading.main_thread():
            return
        if signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
            return

        def leave(signum: int, _frame: Any) -> None:
            raise SystemExit(128 + signum)

        self._sigterm = signal.signal(signal.SIGTERM, leave)

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def stop(self) -> None:
        if self._sigterm is not None:
            signal.signal(signal.SIGTERM, self._sigterm)
            self._sigterm = None
        pids = [int(p["pid"]) for p in self.info.get("processes", [])]
        if self.proc is not None:
            try:
                self.proc.stop(grace_s=60.0)
            except Exception:  # noqa: BLE001 - fall through to the kill below
                pass
            self.proc = None
        for pid in pids:  # anything rtm up failed to stop (it should not happen)
            try:
                p = psutil.Process(pid)
                if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                    p.kill()
            except psutil.Error:
                pass
        self._cleanup_dir()

    def _cleanup_dir(self) -> None:
        if not self.keep_dir:
            shutil.rmtree(self.data_dir, ignore_errors=True)

    def _flag(self, name: str, default: Any) -> Any:
        if name in self.args:
            return self.args[self.args.index(name) + 1]
        return default

    def trust(self, service: str, instance: str) -> Any:
        """Credentials from this fleet's CA (DATA_DIR/tls) for a benchmark that dials servers directly."""
        from services.certs import FleetCertificates
        from services.identity import PeerIdentity
        from services.tls import WireTrust

        if self._flag("--wire-tls", "on") == "off":
            return WireTrust.off()
        paths = FleetCertificates(self.data_dir / "tls").ensure(f"bench-{instance}", PeerIdentity(service, instance))
        return WireTrust.load(paths.ca, paths.cert, paths.key)

    @property
    def api_url(self) -> str:
        return str(self.info["api_url"])

    def processes(self, service: str | None = None) -> list[dict[str, Any]]:
        return [p for p in self.info["processes"] if service is None or p["service"] == service]

    def metrics(self, instance_id: str) -> str:
        """The Prometheus text page (``/metrics``) of fleet process ``instance_id``."""
        import urllib.request

        p = next(p for p in self.info["processes"] if p["id"] == instance_id)
        with urllib.request.urlopen(f"http://{p['host']}:{p['metrics_port']}/metrics", timeout=5) as r:
            return str(r.read().decode())

    def labelled_pids(self) -> dict[str, int]:
        """Every fleet process by a short label (service/instance), plus the rtm up supervisor."""
        out: dict[str, int] = {}
        base = min(int(p["port"]) for p in self.info["processes"])  # dev Consul: port base + 0
        actives = int(self._flag("--channel-servers", 3))
        for p in sorted(self.info["processes"], key=lambda p: (p["service"], int(p["port"]))):
            service, iid = p["service"], str(p["id"])
            if service == "channel-server":
                i = int(p["port"]) - base - 20
                label = f"cs-{i}" + (" (spare)" if i >= actives else "")
            elif service in ("consul-dev", "webapp") and service not in out:
                label = service
            else:
                label = iid
            if label in out:
                label = f"{label} ({p['pid']})"
            out[label] = int(p["pid"])
        out["rtm up (supervisor)"] = int(self.info["supervisor_pid"])
        return out


# -- processes: CPU and memory -------------------------------------------------------------------


def cpu_seconds(pid: int) -> float:
    t = psutil.Process(pid).cpu_times()
    return float(t.user + t.system)


def rss_bytes(pid: int) -> int:
    return int(psutil.Process(pid).memory_info().rss)


def hwm_bytes(pid: int) -> int:
    """Peak RSS since the process started (VmHWM)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


async def settled_rss(pid: int, band_bytes: int, max_s: float, min_s: float) -> tuple[int, list[int]]:
    """Sample ``pid``'s RSS once a second; return (the last sample, all samples) as soon as
    3 consecutive samples lie within ``band_bytes`` (not before ``min_s``), or after ``max_s``."""
    samples: list[int] = []
    started = time.monotonic()
    while time.monotonic() - started < max_s:
        await asyncio.sleep(1.0)
        samples.append(rss_bytes(pid))
        last = samples[-3:]
        if time.monotonic() - started >= min_s and len(last) == 3 and max(last) - min(last) <= band_bytes:
            break
    return samples[-1], samples


class ProcWatch:
    """CPU and RSS accounting for labelled pids."""

    def __init__(self, pids: dict[str, int]) -> None:
        self.pids = dict(pids)
        self._peak: dict[str, int] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def add(self, label: str, pid: int) -> None:
        self.pids[label] = pid

    def cpu(self) -> dict[str, float]:
        """user+system CPU-seconds of each process so far."""
        return {label: u + s for label, (u, s) in self.times().items()}

    def times(self) -> dict[str, tuple[float, float]]:
        """(user, system) CPU-seconds of each process so far (NaN if it is gone)."""
        out = {}
        for label, pid in self.pids.items():
            try:
                t = psutil.Process(pid).cpu_times()
                out[label] = (float(t.user), float(t.system))
            except psutil.Error:
                out[label] = (float("nan"), float("nan"))
        return out

    def rss(self) -> dict[str, int]:
        out = {}
        for label, pid in self.pids.items():
            try:
                out[label] = rss_bytes(pid)
            except psutil.Error:
                out[label] = 0
        return out

    def hwm(self) -> dict[str, int]:
        out = {}
        for label, pid in self.pids.items():
            try:
                out[label] = hwm_bytes(pid)
            except OSError:
                out[label] = 0
        return out

    # peak RSS sampled in a thread, per measurement window
    def start_peaks(self, interval_s: float = 0.25) -> None:
        self.stop_peaks()
        self._peak = self.rss()
        self._stop = threading.Event()

        def run() -> None:
            while not self._stop.wait(interval_s):
                for label, value in self.rss().items():
                    if value > self._peak.get(label, 0):
                        self._peak[label] = value

        self._thread = threading.Thread(target=run, name="rss-sampler", daemon=True)
        self._thread.start()

    def stop_peaks(self) -> dict[str, int]:
        if self._thread is not None:
            self._stop.set()
            self._thread.join(timeout=5)
            self._thread = None
        return dict(self._peak)


def system_busy_s() -> float:
    """CPU-seconds the whole machine has been busy (all cores, all processes, kernel included)."""
    t = psutil.cpu_times()
    return float(t.user + t.nice + t.system + t.irq + t.softirq)


class ForeignLoad:
    """CPU used on this machine by processes we do not watch (other people's work on a shared box)."""

    def __init__(self, watch: ProcWatch) -> None:
        self.watch = watch
        self.budget_s = 0.0

    def mark(self) -> tuple[float, float]:
        return system_busy_s(), sum(v for v in self.watch.cpu().values() if v == v)

    @staticmethod
    def since(mark: tuple[float, float], now: tuple[float, float]) -> float:
        return max(0.0, (now[0] - mark[0]) - (now[1] - mark[1]))

    async def wait_quiet(
        self, max_cores: float = 0.15, max_wait_s: float = 60.0, total_budget_s: float = 300.0
    ) -> dict[str, float]:
        """Wait (bounded) until others use less than ``max_cores`` over a 1 s window; report what was seen."""
        waited = 0.0
        while True:
            m0, t0 = self.mark(), time.monotonic()
            await asyncio.sleep(1.0)
            cores = self.since(m0, self.mark()) / (time.monotonic() - t0)
            if cores < max_cores or waited >= max_wait_s or self.budget_s >= total_budget_s:
                return {"waited_s": waited, "foreign_cores_before": cores}
            await asyncio.sleep(2.0)
            waited += 3.0
            self.budget_s += 3.0


def diff(after: dict[str, float], before: dict[str, float]) -> dict[str, float]:
    return {k: after[k] - before.get(k, 0.0) for k in after}


# -- load clients ----------------------------------------------------------------------------------


class LoadClient:
    """One :mod:`bench.load_client` subprocess recording ``records`` (a :mod:`bench.client_records` kind):
    JSON line requests in, JSON line replies out.

    A subclass drives another child that speaks the same protocol by overriding :meth:`child_args`."""

    def __init__(self, index: int, records: str = "latency") -> None:
        self.index = index
        self.records = records
        self.proc: asyncio.subprocess.Process | None = None
        self.lock = asyncio.Lock()

    def child_args(self) -> list[str]:
        """The child's arguments after ``python``."""
        return ["-m", "bench.load_client", "--records", self.records]

    async def start(self, env: dict[str, str] | None = None) -> None:
        child_env = dict(os.environ)
        child_env.update(env or {})
        child_env["PYTHONPATH"] = str(REPO_ROOT) + os.pathsep + child_env.get("PYTHONPATH", "")
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable,
            *self.child_args(),
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            cwd=str(REPO_ROOT),
            env=child_env,
            limit=64 * 1024 * 1024,
        )

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    async def call(self, cmd: str, reply_timeout_s: float = CLIENT_REPLY_TIMEOUT_S, **fields: Any) -> dict[str, Any]:
        assert self.proc is not None and self.proc.stdin is not None and self.proc.stdout is not None
        async with self.lock:
            self.proc.stdin.write((json.dumps({"cmd": cmd, **fields}) + "\n").encode())
            await self.proc.stdin.drain()
            line = await asyncio.wait_for(self.proc.stdout.readline(), reply_timeout_s)
        if not line:
            raise RuntimeError(f"load client {self.index} exited (code {self.proc.returncode})")
        reply: dict[str, Any] = json.loads(line)
        if not reply.get("ok", False):
            raise RuntimeError(f"load client {self.index}: {cmd} failed: {reply}")
        return reply

    async def stop(self) -> None:
        if self.proc is None:
            return
        try:
            if self.proc.returncode is None:
                try:
                    await self.call("quit", reply_timeout_s=30)
                except Exception:  # noqa: BLE001 - killed below
                    pass
                try:
                    await asyncio.wait_for(self.proc.wait(), 15)
                except TimeoutError:
                    pass
        finally:
            if self.proc.returncode is None:
                self.proc.kill()
                await self.proc.wait()


class LoadClients:
    """Several load-client processes; use as an async context manager (always killed)."""

    def __init__(self, count: int, records: str = "latency") -> None:
        self.clients = [LoadClient(i, records) for i in range(count)]

    async def __aenter__(self) -> LoadClients:
        try:
            for c in self.clients:
                await c.start()
        except BaseException:
            await self.stop()
            raise
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.stop()

    async def stop(self) -> None:
        await asyncio.gather(*(c.stop() for c in self.clients), return_exceptions=True)

    def pids(self) -> dict[str, int]:
        return {f"load client {c.index}": c.pid for c in self.clients}

    async def all(
        self, cmd: str, per_client: list[dict[str, Any]] | None = None, **fields: Any
    ) -> list[dict[str, Any]]:
        calls = []
        for i, c in enumerate(self.clients):
            extra = dict(fields)
            if per_client is not None:
                extra.update(per_client[i])
            calls.append(c.call(cmd, **extra))
        return list(await asyncio.gather(*calls))

    @classmethod
    def of(cls, clients: list[LoadClient]) -> LoadClients:
        """Drive load-client processes made elsewhere (a subclass of :class:`LoadClient`) as one."""
        group = cls(0)
        group.clients = list(clients)
        return group

    async def connect_users(self, fleet: FleetRun, users: list[dict[str, Any]], **fields: Any) -> ConnectedUsers:
        """Connect ``users`` spread round-robin (process ``k`` gets ``users[k::n]``), the region hints rotated
        per process so that every gateway gets its share (``rtm.connect`` prefers the caller's region).
        Process ``k``'s ``i``-th connection is global connection ``offsets[k] + i``."""
        n = len(self.clients)
        chunks = [users[k::n] for k in range(n)]
        regions = sorted({str(p.get("region", "")) for p in fleet.processes("gateway")} - {""})
        started = time.monotonic()
        replies = await self.all(
            "connect",
            per_client=[
                {"tokens": [u["token"] for u in chunk], "regions": regions[k:] + regions[:k]}
                for k, chunk in enumerate(chunks)
            ],
            api_url=fleet.api_url,
            **fields,
        )
        out = ConnectedUsers(requested=len(users))
        offset = 0
        for chunk, reply in zip(chunks, replies, strict=True):
            out.offsets.append(offset)
            for i, (user, gw) in enumerate(zip(chunk, reply["gw"], strict=True)):
                if gw is not None:
                    out.conn_of_user[user["id"]] = offset + i
                    out.gw_of_user[user["id"]] = gw
            for k, v in reply["errors"].items():
                out.errors[k] = out.errors.get(k, 0) + v
            offset += len(chunk)
        out.elapsed_s = time.monotonic() - started
        return out

    async def frames(self) -> int:
        """Message frames the ``latency`` clients recorded since their last dump, every process together."""
        return sum(int(s["frames"]) for s in await self.all("stat"))

    async def wait_frames(self, expected: int, max_s: float = 30.0, idle_s: float = 3.0) -> int:
        """Until the clients recorded ``expected`` frames, or nothing new came for ``idle_s`` (at most ``max_s``)."""
        deadline = time.monotonic() + max_s
        last, last_change, got = -1, time.monotonic(), 0
        while time.monotonic() < deadline:
            got = await self.frames()
            if got >= expected:
                await asyncio.sleep(0.2)  # wait-ok: a duplicate would arrive right behind
                return got
            if got != last:
                last, last_change = got, time.monotonic()
            elif time.monotonic() - last_change > idle_s:
                return got
            await asyncio.sleep(0.05)  # wait-ok: bounded poll of the clients' counters
        return got

    async def collect(self, offsets: list[int], tmp: Path, closed: dict[int, int] | None = None) -> Any:
        """Every process's ``latency`` records (dumped, so cleared) as one (n, 4) int64 array with global
        connection numbers (process ``k``'s start at ``offsets[k]``); ``closed`` gets each connection's close µs."""
        import numpy as np

        paths = [str(tmp / f"c{i}.npy") for i in range(len(self.clients))]
        replies = await self.all("dump", per_client=[{"path": p} for p in paths])
        arrays = []
        for offset, path, reply in zip(offsets, paths, replies, strict=True):
            data = np.load(path)
            data[:, 0] += offset
            arrays.append(data)
            if closed is not None:
                for k, v in reply["closed"].items():
                    closed[int(k) + offset] = int(v)
        return np.concatenate(arrays) if arrays else np.zeros((0, 4), dtype=np.int64)


@dataclass
class ConnectedUsers:
    """What :meth:`LoadClients.connect_users` did: who is connected as which global connection, on which gateway."""

    requested: int
    offsets: list[int] = field(default_factory=list)
    conn_of_user: dict[str, int] = field(default_factory=dict)
    gw_of_user: dict[str, str] = field(default_factory=dict)  # host:port
    errors: dict[str, int] = field(default_factory=dict)
    elapsed_s: float = 0.0


# -- output ------------------------------------------------------------------------------------------


async def paced_requests(
    rate: float, seconds: float, slots: asyncio.Semaphore, one: Callable[[int], Any], timeout_s: float
) -> float:
    """Start ``one(i)`` (a coroutine that releases a slot when done) at ``t0 + i / rate`` for
    ``seconds``, each once a slot is free (the client's unanswered requests at most); wait for them
    all, at most ``timeout_s``; returns the seconds from the first start to then."""
    loop = asyncio.get_running_loop()
    tasks = []
    t0 = loop.time()
    for i in range(max(1, round(rate * seconds))):
        delay = t0 + i / rate - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        await slots.acquire()
        tasks.append(asyncio.ensure_future(one(i)))
    await asyncio.wait(tasks, timeout=timeout_s)
    return loop.time() - t0


def md_table(headers: list[str], rows: list[list[Any]]) -> str:
    def cell(v: Any) -> str:
        return str(v).replace("|", "\\|")

    out = ["| " + " | ".join(headers) + " |", "| " + " | ".join("---" for _ in headers) + " |"]
    out += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(out)


def save_json(name: str, data: dict[str, Any]) -> Path:
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path = RESULTS_DIR / f"{name}.json"
    path.write_text(json.dumps(data, indent=2, sort_keys=False, default=str) + "\n")
    return path


def save_text(name: str, text: str) -> Path:
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path = RESULTS_DIR / name
    path.write_text(text)
    return path


def plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as pyplot

    return pyplot


def save_figure(fig: Any, name: str) -> Path:
    """Lay ``fig`` out and write it as ``bench/results/<name>.png``."""
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    path = RESULTS_DIR / f"{name}.png"
    fig.savefig(path, dpi=110)
    return path


PLOT_DATA_KEY = "_plot"  # a result's data for plot() only (e.g. every delivery): left out of the JSON


def _without_plot_data(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _without_plot_data(v) for k, v in value.items() if k != PLOT_DATA_KEY}
    if isinstance(value, (list, tuple)):
        return [_without_plot_data(v) for v in value]
    return value


def run_benchmark(
    name: str,
    args: Any,
    run: Callable[[Any], Any],
    render: Callable[[dict[str, Any]], str],
    plot: Callable[[dict[str, Any], str], None],
    *,
    loadavg: bool = False,
) -> int:
    """The ``main`` of a benchmark: ``run(args)`` on uvloop, timed (``elapsed_s``; with ``loadavg``,
    the 1-minute load average before and after), then :func:`publish` as ``name`` (``-quick`` added)."""
    install_uvloop()
    started = time.monotonic()
    load0 = os.getloadavg()
    result = asyncio.run(run(args))
    result["elapsed_s"] = time.monotonic() - started
    if loadavg:
        result["loadavg_1m"] = {"start": load0[0], "end": os.getloadavg()[0]}
    publish(name + ("-quick" if args.quick else ""), result, render, plot)
    return 0


def publish(
    name: str,
    result: dict[str, Any],
    render: Callable[[dict[str, Any]], str],
    plot: Callable[[dict[str, Any], str], None],
) -> None:
    """Finish a benchmark run: write ``bench/results/<name>.json`` (the result without any
    :data:`PLOT_DATA_KEY` entries, at any depth; written first, so that a failing render or plot
    keeps the run), ``<name>.md`` (``render(result)``) and ``<name>.png`` (``plot(result, name)``),
    then print the table and what was written in ``result["elapsed_s"]`` seconds."""
    save_json(name, _without_plot_data(result))
    table = render(result)
    save_text(f"{name}.md", table + "\n")
    plot(result, name)
    print()
    print(table)
    print(f"\nwrote bench/results/{name}.json, {name}.md, {name}.png in {result['elapsed_s']:.0f}s")


def fmt(x: float | None, digits: int = 1) -> str:
    if x is None or x != x:  # None or NaN
        return "–"
    return f"{x:,.{digits}f}"


def mib(n: float) -> str:
    return f"{n / 2**20:,.1f}"


def install_uvloop() -> None:
    try:
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    except ImportError:  # pragma: no cover
        pass


def pyspy_available() -> str | None:
    exe = Path(sys.executable).parent / "py-spy"
    if exe.exists():
        return str(exe)
    return shutil.which("py-spy")


def pyspy_top(
    pid: int,
    duration_s: int,
    out_path: Path,
    native: bool = False,
    idle: bool = False,
    top_n: int = 15,
    rate_hz: int = 250,
) -> list[tuple[str, float, float]]:
    """Sample ``pid`` with py-spy for ``duration_s``; return the top functions by own and total share
    (with ``idle``, of all samples, waits included: where a thread blocks, not only where it computes).

    Writes the raw folded stacks to ``out_path``. Returns [(function, self %, total %)].
    """
    exe = pyspy_available()
    if exe is None:
        return []
    argv = [
        exe,
        "record",
        "-p",
        str(pid),
        "-d",
        str(duration_s),
        "-r",
        str(rate_hz),
        "-f",
        "raw",
        "-o",
        str(out_path),
    ]
    if native:  # py-spy reads native stacks only while the process is paused for each sample
        argv.append("--native")
    else:
        argv.append("--nonblocking")
    if idle:
        argv.append("--idle")
    subprocess.run(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=duration_s + 60, check=False)
    if not out_path.exists():
        return []
    own: dict[str, int] = {}
    total: dict[str, int] = {}
    samples = 0
    for line in out_path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        try:
            n = int(count)
        except ValueError:
            continue
        frames = [re.sub(r":\d+\)$", ")", f) for f in stack.split(";")]
        if not frames:
            continue
        samples += n
        leaf = frames[-1]
        own[leaf] = own.get(leaf, 0) + n
        for f in set(frames):
            total[f] = total.get(f, 0) + n
    if not samples:
        return []
    top = sorted(own.items(), key=lambda kv: -kv[1])[:top_n]
    return [(f, 100.0 * n / samples, 100.0 * total.get(f, 0) / samples) for f, n in top]
