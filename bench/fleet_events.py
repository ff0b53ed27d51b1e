"""Shared pieces of the failover, typing and drain benchmarks (on top of :mod:`bench.harness`).

* :class:`LoggedFleet`: :class:`bench.harness.FleetRun` with ``--verbose`` and
  ``RTM_LOG_FORMAT=json``, every fleet log line copied to a file, parsed on demand.
* :class:`EvClients`: :mod:`bench.load_client` processes recording events (typing, goodbye-following).
* :class:`Poster`: paced ``chat.postMessage`` over HTTP; each text is
  ``m<post id>:<send µs>``; keeps send and acknowledgement times.
* Consul look-ups (the channel ring, healthy instances), Prometheus scraping,
  channel creation, percentiles.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import re
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np

from bench.harness import FleetRun, LoadClients


def now_us() -> int:
    return time.time_ns() // 1000


# -- the fleet, with its log -------------------------------------------------------------------


class LoggedFleet(FleetRun):
    """``rtm up --verbose`` with JSON log lines, copied to ``self.log_path`` as they come."""

    def __init__(self, *args: str, env: dict[str, str] | None = None) -> None:
        super().__init__(*args, "--verbose", env={"RTM_LOG_FORMAT": "json", **(env or {})})
        fd, name = tempfile.mkstemp(prefix="rtm-bench-log-", suffix=".log")
        os.close(fd)
        self.log_path = Path(name)
        self._log_file: Any = None

    def __enter__(self) -> LoggedFleet:
        self._log_file = open(self.log_path, "w", buffering=1)  # noqa: SIM115 - closed in stop()
        self.echo = self._log_file
        try:
            super().__enter__()
        except BaseException:
            self._log_file.close()
            raise
        return self

    def stop(self) -> None:
        try:
            super().stop()
        finally:
            if self._log_file is not None:
                try:
                    self._log_file.close()
                except Exception:  # noqa: BLE001 - the pump may still hold it
                    pass

    def reload(self) -> None:
        self.info = json.loads((self.data_dir / "fleet.json").read_text())

    def log_lines(self) -> list[dict[str, Any]]:
        """Every JSON log line so far: {ts, level, logger, instance, msg, proc}."""
        out = []
        for line in self.log_path.read_text(errors="replace").splitlines():
            m = re.match(r"^(?:\[[^\]]+\] )*\[([^\]]+)\] (\{.*\})\s*$", line)
            if not m:
                continue
            try:
                entry = json.loads(m.group(2))
            except ValueError:
                continue
            entry["proc"] = m.group(1)
            out.append(entry)
        return out

    def remove_log(self) -> None:
        try:
            self.log_path.unlink()
        except OSError:
            pass

    # -- Consul -----------------------------------------------------------------------------
    def consul(self) -> Any:
        from rtmctl.operator import fleet_client

        return fleet_client(self.data_dir)

    def ring(self) -> Any:
        from services.ring import CHANNEL_RING_KEY, HashRing, RingDocument

        _, raw = self.consul().kv.get(CHANNEL_RING_KEY)
        return HashRing(RingDocument.from_json(raw["Value"] if raw else None))

    def healthy(self, service: str) -> list[dict[str, Any]]:
        _, entries = self.consul().health.service(service, passing=True)
        return [{"id": e["Service"]["ID"], "tags": e["Service"]["Tags"], "port": e["Service"]["Port"]} for e in entries]

    def process(self, instance_id: str) -> dict[str, Any]:
        self.reload()
        return next(p for p in self.info["processes"] if p["id"] == instance_id)

    def metrics(self, instance_id: str) -> str:
        self.reload()  # the instance may have been restarted since
        return super().metrics(instance_id)


def scrape(fleet: FleetRun, service: str, name: str) -> dict[str, dict[str, float]]:
    """``name``'s samples on every ``service`` process of ``fleet``: {instance id: {labels: value}}."""
    return {p["id"]: prom_values(fleet.metrics(p["id"]), name) for p in fleet.processes(service)}


def prom_values(text: str, name: str) -> dict[str, float]:
    """``name``'s samples in a Prometheus text page, keyed by their label string ('' if none)."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        if not line.startswith(name):
            continue
        m = re.match(re.escape(name) + r"(\{[^}]*\})?\s+(\S+)", line)
        if m:
            out[m.group(1) or ""] = float(m.group(2))
    return out


# -- clients ---------------------------------------------------------------------------------------


class EvClients(LoadClients):
    """Several :mod:`bench.load_client` processes recording ``events``; connection ``i`` of process ``k``
    is global connection ``offsets[k] + i``."""

    def __init__(self, count: int) -> None:
        super().__init__(count, records="events")
        self.offsets: list[int] = []
        self.tmp = Path(tempfile.mkdtemp(prefix="rtm-evclients-"))

    def pids(self) -> dict[str, int]:
        return {f"client proc {c.index}": c.pid for c in self.clients}

    async def stop(self) -> None:
        try:
            await super().stop()
        finally:
            shutil.rmtree(self.tmp, ignore_errors=True)

    async def connect(
        self,
        api_url: str,
        tokens: list[str],
        regions: list[str],
        follow_goodbye: bool,
        concurrency: int = 50,
        timeout_s: float = 30.0,
    ) -> dict[str, Any]:
        """Global connection ``i`` is ``tokens[i]``; split into contiguous blocks, one per process."""
        n = len(self.clients)
        size = (len(tokens) + n - 1) // n
        blocks = [(k * size, min(len(tokens), (k + 1) * size)) for k in range(n)]
        self.offsets = [b[0] for b in blocks]
        replies = await self.all(
            "connect",
            per_client=[{"tokens": tokens[a:b], "regions": regions[a:b]} for a, b in blocks],
            api_url=api_url,
            reconnect="goodbye" if follow_goodbye else "never",
            concurrency=concurrency,
            timeout_s=timeout_s,
        )
        gw: list[str | None] = []
        errors: dict[str, int] = {}
        for r in replies:
            gw += r["gw"]
            for k, v in r["errors"].items():
                errors[k] = errors.get(k, 0) + v
        return {
            "connected": sum(r["connected"] for r in replies),
            "failed": sum(r["failed"] for r in replies),
            "errors": errors,
            "gw": gw,
            "elapsed_s": max(r["elapsed_s"] for r in replies),
        }

    def proc_of(self, conn: int) -> tuple[int, int]:
        k = max(i for i, off in enumerate(self.offsets) if off <= conn)
        return k, conn - self.offsets[k]

    async def stat(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for r in await self.all("stat"):
            for k, v in r.items():
                if k != "ok":
                    out[k] = out.get(k, 0) + int(v)
        return out

    async def typing(
        self, senders: list[tuple[int, str]], interval_s: float, duration_s: float, burst: int = 1
    ) -> None:
        per: list[list[tuple[int, str]]] = [[] for _ in self.clients]
        for conn, ch in senders:
            k, local = self.proc_of(conn)
            per[k].append((local, ch))
        await self.all(
            "typing_schedule",
            per_client=[{"senders": p} for p in per],
            interval_s=interval_s,
            duration_s=duration_s,
            burst=burst,
        )

    async def dump(self) -> dict[str, Any]:
        """Every process's records, with global connection numbers and channel/user ids as strings."""
        paths = [str(self.tmp / f"c{i}.npz") for i in range(len(self.clients))]
        replies = await self.all("dump", per_client=[{"path": p} for p in paths])
        msgs, typ, sent, moves, move_gw, closed = [], [], [], [], [], []
        move_errors: dict[str, int] = {}
        for off, path, reply in zip(self.offsets, paths, replies, strict=False):
            data = np.load(path)
            chan = {v: k for k, v in reply["chan"].items()}
            user = {v: k for k, v in reply["user"].items()}
            m = data["msgs"].copy()
            m[:, 0] += off
            msgs.append(m)
            for row in data["typ"]:
                typ.append((int(row[0]) + off, chan[int(row[1])], user[int(row[2])], int(row[3])))
            for row in data["sent"]:
                sent.append((int(row[0]) + off, chan[int(row[1])], int(row[2])))
            mv = data["moves"].copy()
            if len(mv):
                mv[:, 0] += off
            moves.append(mv)
            move_gw += reply["move_gw"]
            closed += [(c + off, t, code) for c, t, code in reply["closed"]]
            for k, v in reply.get("move_errors", {}).items():
                move_errors[k] = move_errors.get(k, 0) + v
            os.unlink(path)
        return {
            "msgs": np.concatenate(msgs) if msgs else np.zeros((0, 3), np.int64),
            "typ": typ,
            "sent": sent,
            "moves": np.concatenate(moves) if moves else np.zeros((0, 6), np.int64),
            "move_gw": move_gw,
            "closed": closed,
            "move_errors": move_errors,
        }

    async def wait_msgs(self, expected: int, max_s: float = 30.0, idle_s: float = 3.0) -> int:
        """Until the clients recorded ``expected`` message frames, or nothing new for ``idle_s``."""
        deadline = time.monotonic() + max_s
        last, last_change = -1, time.monotonic()
        got = 0
        while time.monotonic() < deadline:
            got = (await self.stat())["msgs"]
            if got >= expected:
                await asyncio.sleep(0.3)  # a duplicate would come right behind
                return got
            if got != last:
                last, last_change = got, time.monotonic()
            elif time.monotonic() - last_change > idle_s:
                return got
            await asyncio.sleep(0.1)
        return got


# -- the Web API, posting --------------------------------------------------------------------------


class Api:
    def __init__(self, api_url: str, limit: int = 100) -> None:
        self.api_url = api_url
        self.http = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=limit), timeout=aiohttp.ClientTimeout(total=60)
        )

    async def close(self) -> None:
        await self.http.close()

    async def call(self, method: str, token: str, **fields: Any) -> dict[str, Any]:
        async with self.http.post(
            self.api_url + method, data=fields, headers={"Authorization": f"Bearer {token}"}
        ) as r:
            return dict(await r.json(content_type=None))

    async def make_channels(self, groups: list[list[dict[str, Any]]], prefix: str) -> list[str]:
        """One channel per group of users (the first creates it, the rest join); returns the ids."""
        sem = asyncio.Semaphore(16)
        out = [""] * len(groups)

        async def one(g: int, members: list[dict[str, Any]]) -> None:
            async with sem:
                reply = await self.call("conversations.create", members[0]["token"], name=f"{prefix}-{g:04d}")
                if not reply.get("ok"):
                    raise RuntimeError(f"conversations.create: {reply}")
                cid = reply["channel"]["id"]
                for m in members[1:]:
                    r = await self.call("conversations.join", m["token"], channel=cid)
                    if not r.get("ok"):
                        raise RuntimeError(f"conversations.join: {r}")
                out[g] = cid

        await asyncio.gather(*(one(g, m) for g, m in enumerate(groups)))
        return out


class Poster:
    """Posts ``m<id>:<send µs>`` round-robin over targets at a fixed rate, from one task.

    ``posts`` holds, per post: id, target index, send µs, ack µs (0 until acked), ok."""

    def __init__(self, api: Api, targets: list[tuple[str, str]], max_inflight: int = 64) -> None:
        self.api = api
        self.targets = targets  # (channel id, poster token)
        self.sem = asyncio.Semaphore(max_inflight)
        self.ids = itertools.count(1)
        self.posts: list[dict[str, Any]] = []
        self.tasks: set[asyncio.Task[None]] = set()
        self.errors: dict[str, int] = {}

    async def _one(self, post: dict[str, Any]) -> None:
        channel, token = self.targets[post["target"]]
        try:
            reply = await self.api.call("chat.postMessage", token, channel=channel, text=post["text"])
            post["ok"] = bool(reply.get("ok"))
            if not post["ok"]:
                self.errors[str(reply.get("error"))] = self.errors.get(str(reply.get("error")), 0) + 1
        except Exception as exc:  # noqa: BLE001 - counted as a failed post
            post["ok"] = False
            self.errors[type(exc).__name__] = self.errors.get(type(exc).__name__, 0) + 1
        finally:
            post["ack_us"] = now_us()
            self.sem.release()

    async def run(
        self, rate: float, duration_s: float, stop: asyncio.Event | None = None, targets: list[int] | None = None
    ) -> None:
        """Post at ``rate``/s for ``duration_s`` (or until ``stop``), round-robin over ``targets``."""
        loop = asyncio.get_running_loop()
        idx = targets if targets is not None else list(range(len(self.targets)))
        t0 = loop.time()
        n_max = int(rate * duration_s) + 1
        for i in range(n_max):
            at = t0 + i / rate
            delay = at - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            if loop.time() - t0 >= duration_s or (stop is not None and stop.is_set()):
                break
            await self.sem.acquire()
            pid = next(self.ids)
            send = now_us()
            post = {
                "id": pid,
                "target": idx[i % len(idx)],
                "send_us": send,
                "ack_us": 0,
                "ok": False,
                "text": f"m{pid}:{send}",
            }
            self.posts.append(post)
            task = asyncio.ensure_future(self._one(post))
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)

    async def settle(self, timeout_s: float = 60.0) -> None:
        if self.tasks:
            await asyncio.wait(list(self.tasks), timeout=timeout_s)


def deliveries(
    msgs: np.ndarray, posts: list[dict[str, Any]], members: dict[int, np.ndarray], conn_ok: Any = None
) -> dict[str, Any]:
    """Compare what the clients got with what the webapp acknowledged.

    ``members[target]`` are the connections that must get every acked post to
    that target. Returns lost, duplicates, unexpected counts and, per received
    (post, conn), latency (µs), plus the per-post arrays.
    """
    if not posts:
        return {"expected": 0, "lost": 0, "duplicates": 0, "unexpected": 0}
    pid = np.array([p["id"] for p in posts], dtype=np.int64)
    lo, hi = int(pid.min()), int(pid.max())
    m = msgs[(msgs[:, 1] >= lo) & (msgs[:, 1] <= hi)]
    BITS = 24
    keys = (m[:, 1] << BITS) | m[:, 0]
    uniq, first, counts = np.unique(keys, return_index=True, return_counts=True)
    dup = int((counts - 1).sum())
    exp_parts = []
    for p in posts:
        if p["ok"]:
            mem = members[p["target"]]
            exp_parts.append((np.int64(p["id"]) << BITS) | mem)
    expected = np.concatenate(exp_parts) if exp_parts else np.zeros(0, np.int64)
    hit = np.isin(uniq, expected)
    got = np.isin(expected, uniq)
    lost_keys = expected[~got]
    return {
        "expected": int(len(expected)),
        "delivered": int(hit.sum()),
        "lost": int(len(lost_keys)),
        "duplicates": dup,
        "unexpected": int((~hit).sum()),
        "lost_sample": [(int(k >> BITS), int(k & ((1 << BITS) - 1))) for k in lost_keys[:20]],
        "lost_conns": np.unique(lost_keys & ((1 << BITS) - 1)),
        "lost_keys": lost_keys,
        "recv": m[first[hit]],  # (conn, post, recv µs), first receipt of each expected delivery
    }
