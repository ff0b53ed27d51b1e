"""Calibration: the latency floor this machine puts under a message path shaped like rtm's.

No rtm code is involved. Five trivial processes (uvloop, 127.0.0.1 only,
every port bound as port 0 and passed on) copy rtm's hops:

    poster (this process, aiohttp client, paced at R posts/s)
      --HTTP POST--> webapp (aiohttp server: prepares {"ok":true}, writes the event on, returns the reply)
      --TCP, 4-byte big-endian length + msgpack map--> admin (decode, re-encode, write on)
      --same framing--> channel (decode, re-encode, write on)
      --same framing--> gateway (websockets server: the event's JSON as one text frame to every client)
      --websocket--> client process (picows, like rtm's load clients; records receipt time)

Each post's text is ``m<id>:<send ns>``; times are ``time.perf_counter_ns()``
(CLOCK_MONOTONIC, one clock for every process on the machine). Per offered
rate it reports the HTTP round trip (p50/p99/max), end-to-end latency (request
sent -> websocket frame received: p50/p90/p99/max), lost posts, steal time
from /proc/stat (fraction of wall time × cores), other processes' CPU and the
path's CPU per post. A separate "timer lag" process (a lone uvloop loop doing
``asyncio.sleep(0.01)`` over and over) runs throughout: its oversleep is
reported for an idle window (the path up, no posts) and during every step.

Compare rtm's own latency (``bench/fanout.py``) with this, measured in the
same session: what rtm adds above these numbers is rtm's.

    python -m bench.hops            # 20, 50, 100 posts/s, 1,000 posts each (about 1.5 minutes)
    python -m bench.hops --quick    # 100 posts each (about 15 s)

Every process started here is stopped at the end, also on an error or Ctrl-C;
the children also exit by themselves when this process's end of their stdin
closes (so they do not outlive it even if it is killed).

Why one module over 500 lines: the calibration's roles (poster, hops, client, timer) run as child
processes of this same module so that every hop runs exactly the code the controller describes;
splitting the roles would let them drift apart.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from array import array
from collections.abc import Callable
from typing import Any

import psutil

from bench.harness import (
    REPO_ROOT,
    fmt,
    install_uvloop,
    machine_info,
    md_table,
    plt,
    publish,
    save_figure,
    system_busy_s,
)
from bench.stats import pct, percentiles
from services.connection import set_nodelay

NAME = "hops"
CHANNEL = "C0123456789A"
USER = "U0123456789A"
TEAM = "T0123456789A"
MARK = b'"text":"m'
WA_MARK = b'"wa":'
CHILD_READY_TIMEOUT_S = 30.0
CHILD_REPLY_TIMEOUT_S = 60.0
ROLES = ("gateway", "channel", "admin", "webapp", "client", "timer")


# ============================================================================================
# The child processes
# ============================================================================================


def frame(message: dict[str, Any]) -> bytes:
    import msgpack

    body = msgpack.packb(message, use_bin_type=True)
    return len(body).to_bytes(4, "big") + body


class Link(asyncio.Protocol):
    """The downstream end of a hop: written to, never read."""

    def __init__(self) -> None:
        self.transport: Any = None  # uvloop's TCPTransport is not an asyncio.Transport subclass

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        set_nodelay(transport)
        self.transport = transport

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None


class FrameIn(asyncio.Protocol):
    """Upstream side: 4-byte big-endian length + one msgpack map per frame, each map to ``on_message``."""

    def __init__(self, on_message: Callable[[dict[str, Any]], None]) -> None:
        import msgpack

        self.on_message = on_message
        self.buf = bytearray()
        self.unpackb = msgpack.unpackb

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        set_nodelay(transport)

    def data_received(self, data: bytes) -> None:
        buf = self.buf
        buf += data
        while len(buf) >= 4:
            n = int.from_bytes(buf[:4], "big")
            if len(buf) < 4 + n:
                break
            message = self.unpackb(bytes(buf[4 : 4 + n]), raw=False)
            del buf[: 4 + n]
            self.on_message(message)


class Child:
    """What every child role shares: the ready line, commands on stdin, exit at stdin's end."""

    def __init__(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.done = asyncio.Event()
        self.commands: dict[str, Callable[[], dict[str, Any]]] = {}
        threading.Thread(target=self._stdin, name="stdin", daemon=True).start()

    def _stdin(self) -> None:
        try:
            for line in sys.stdin:
                cmd = line.strip()
                if cmd:
                    self.loop.call_soon_threadsafe(self._command, cmd)
        finally:
            try:
                self.loop.call_soon_threadsafe(self.done.set)
            except RuntimeError:  # loop already closed
                pass

    def _command(self, cmd: str) -> None:
        handler = self.commands.get(cmd)
        reply = handler() if handler else {"error": f"unknown command {cmd!r}"}
        self.reply(reply)

    @staticmethod
    def reply(obj: dict[str, Any]) -> None:
        sys.stdout.write(json.dumps(obj) + "\n")
        sys.stdout.flush()


async def connect_link(port: int) -> Link:
    _, link = await asyncio.get_running_loop().create_connection(Link, "127.0.0.1", port)
    return link


async def role_forwarder(args: argparse.Namespace) -> None:
    """admin / channel: decode each frame, re-encode it, write it downstream."""
    child = Child()
    link = await connect_link(args.down)
    op = "ev" if args.role == "channel" else "pub"

    def on_message(message: dict[str, Any]) -> None:
        message["op"] = op
        if link.transport is not None:
            link.transport.write(frame(message))

    srv = await asyncio.get_running_loop().create_server(lambda: FrameIn(on_message), "127.0.0.1", 0)
    child.reply({"ready": True, "port": srv.sockets[0].getsockname()[1]})
    await child.done.wait()
    srv.close()


async def role_gateway(args: argparse.Namespace) -> None:
    """A websockets server, plus a frame link in: each event's JSON as a text frame to every connected client."""
    from websockets.asyncio.server import broadcast, serve

    child = Child()
    clients: set[Any] = set()

    async def handler(ws: Any) -> None:
        clients.add(ws)
        try:
            await ws.wait_closed()
        finally:
            clients.discard(ws)

    def on_message(message: dict[str, Any]) -> None:
        broadcast(clients, message["json"], text=True)

    ws_server = await serve(handler, "127.0.0.1", 0, compression=None, ping_interval=None)
    srv = await asyncio.get_running_loop().create_server(lambda: FrameIn(on_message), "127.0.0.1", 0)
    child.commands["clients"] = lambda: {"clients": len(clients)}
    child.reply(
        {"ready": True, "ws_port": list(ws_server.sockets)[0].getsockname()[1], "port": srv.sockets[0].getsockname()[1]}
    )
    await child.done.wait()
    srv.close()
    ws_server.close()


async def role_webapp(args: argparse.Namespace) -> None:
    """aiohttp: read the post, prepare the reply, write the event to the admin link, return the reply."""
    from aiohttp import web

    child = Child()
    link = await connect_link(args.down)
    seq = 0

    async def post_message(request: web.Request) -> web.Response:
        nonlocal seq
        wa = (
            time.perf_counter_ns()
        )  # handler entered: splits the path into its legs (``"wa"``, last field of the event)
        body = await request.json()
        seq += 1
        ts = f"{time.time():.6f}"
        event = json.dumps(
            {
                "type": "message",
                "channel": body["channel"],
                "user": USER,
                "text": body["text"],
                "ts": ts,
                "team": TEAM,
                "event_ts": ts,
                "wa": wa,
            },
            separators=(",", ":"),
        ).encode()
        resp = web.json_response({"ok": True, "channel": body["channel"], "ts": ts})
        if link.transport is not None:
            link.transport.write(
                frame(
                    {"op": "pub", "ch": body["channel"], "seq": seq, "json": event, "t0": time.time(), "eid": f"e{seq}"}
                )
            )
        return resp

    app = web.Application()
    app.router.add_post("/api/chat.postMessage", post_message)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    child.reply({"ready": True, "port": port})
    await child.done.wait()
    await runner.cleanup()


async def role_client(args: argparse.Namespace) -> None:
    """picows websocket clients (as rtm's load clients); each text frame's post id and receipt time recorded."""
    from picows import WSFrame, WSListener, WSMsgType, WSTransport, ws_connect

    child = Child()
    ids, recv, conns, was = array("q"), array("q"), array("q"), array("q")
    clock = time.perf_counter_ns

    class Listener(WSListener):  # type: ignore[misc]
        def __init__(self, idx: int) -> None:
            self.idx = idx

        def on_ws_frame(self, transport: WSTransport, frame_: WSFrame) -> None:
            if frame_.msg_type == WSMsgType.TEXT:
                now = clock()
                payload = frame_.get_payload_as_bytes()
                i = payload.find(MARK)
                if i >= 0:
                    j = payload.find(b":", i + len(MARK))
                    ids.append(int(payload[i + len(MARK) : j]))
                    recv.append(now)
                    k = payload.rfind(WA_MARK)
                    was.append(int(payload[k + len(WA_MARK) : payload.find(b"}", k)]) if k >= 0 else 0)
                    conns.append(self.idx)
            elif frame_.msg_type == WSMsgType.CLOSE:
                transport.disconnect()

    transports = []
    for idx in range(args.clients):
        transport, _ = await ws_connect(lambda idx=idx: Listener(idx), f"ws://127.0.0.1:{args.ws}/")
        transports.append(transport)

    def dump() -> dict[str, Any]:
        out = {"id": ids.tolist(), "recv_ns": recv.tolist(), "conn": conns.tolist(), "webapp_ns": was.tolist()}
        del ids[:], recv[:], conns[:], was[:]
        return out

    child.commands["dump"] = dump
    child.reply({"ready": True, "connected": len(transports)})
    await child.done.wait()
    for transport in transports:
        transport.disconnect()


async def role_timer(args: argparse.Namespace) -> None:
    """A lone loop: asyncio.sleep(interval) over and over; each oversleep recorded with its start time."""
    child = Child()
    start, lag = array("q"), array("q")
    clock = time.perf_counter_ns
    want = int(args.interval * 1e9)

    def dump() -> dict[str, Any]:
        out = {"start_ns": start.tolist(), "lag_ns": lag.tolist()}
        del start[:], lag[:]
        return out

    child.commands["dump"] = dump
    child.reply({"ready": True})

    async def ticks() -> None:
        while True:
            t = clock()
            await asyncio.sleep(args.interval)
            start.append(t)
            lag.append(clock() - t - want)

    task = asyncio.ensure_future(ticks())
    await child.done.wait()
    task.cancel()


def child_main(args: argparse.Namespace) -> int:
    import uvloop

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C: the parent stops us (closing our stdin)
    roles = {
        "gateway": role_gateway,
        "channel": role_forwarder,
        "admin": role_forwarder,
        "webapp": role_webapp,
        "client": role_client,
        "timer": role_timer,
    }
    uvloop.run(roles[args.role](args))
    return 0


# ============================================================================================
# The parent: start, pace, measure, stop
# ============================================================================================


class Proc:
    """One child: ``python -m bench.hops --role ROLE``; JSON lines on stdout; stopped by closing its stdin."""

    def __init__(self, label: str, role: str, *extra: str) -> None:
        self.label = label
        env = dict(os.environ)
        env["PYTHONPATH"] = str(REPO_ROOT) + os.pathsep + env.get("PYTHONPATH", "")
        self.popen = subprocess.Popen(
            [sys.executable, "-m", "bench.hops", "--role", role, *extra],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            cwd=str(REPO_ROOT),
            env=env,
            text=True,
        )
        self.lines: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._read, name=f"{label}-stdout", daemon=True).start()
        self.ready: dict[str, Any] = {}

    def wait_ready(self) -> Proc:
        self.ready = self.line(CHILD_READY_TIMEOUT_S)
        if not self.ready.get("ready"):
            raise RuntimeError(f"{self.label}: not ready: {self.ready}")
        return self

    @property
    def pid(self) -> int:
        return self.popen.pid

    def _read(self) -> None:
        assert self.popen.stdout is not None
        for line in self.popen.stdout:
            self.lines.put(line)
        self.lines.put(None)

    def line(self, timeout_s: float) -> dict[str, Any]:
        try:
            line = self.lines.get(timeout=timeout_s)
        except queue.Empty:
            raise RuntimeError(f"{self.label}: no answer in {timeout_s:.0f} s") from None
        if line is None:
            raise RuntimeError(f"{self.label}: exited (code {self.popen.poll()})")
        reply: dict[str, Any] = json.loads(line)
        return reply

    def call(self, cmd: str, timeout_s: float = CHILD_REPLY_TIMEOUT_S) -> dict[str, Any]:
        assert self.popen.stdin is not None
        self.popen.stdin.write(cmd + "\n")
        self.popen.stdin.flush()
        return self.line(timeout_s)

    def stop(self) -> None:
        p = self.popen
        try:
            if p.stdin is not None and not p.stdin.closed:
                p.stdin.close()
        except OSError:
            pass
        for step in (None, p.terminate, p.kill):
            if step is not None:
                try:
                    step()
                except OSError:
                    pass
            try:
                p.wait(timeout=5)
                return
            except subprocess.TimeoutExpired:
                continue


def steal_ticks() -> int:
    with open("/proc/stat") as f:
        fields = f.readline().split()
    return int(fields[8]) if fields[0] == "cpu" and len(fields) > 8 else 0


def cpu_s(pid: int) -> float:
    try:
        t = psutil.Process(pid).cpu_times()
        return float(t.user + t.system)
    except psutil.Error:
        return float("nan")


class Window:
    """Wall time, steal time, every watched process's CPU and the whole machine's busy CPU over a span."""

    def __init__(self, pids: dict[str, int]) -> None:
        self.pids = pids
        self.t0_ns = time.perf_counter_ns()
        self.steal0 = steal_ticks()
        self.busy0 = system_busy_s()
        self.cpu0 = {k: cpu_s(p) for k, p in pids.items()}

    def close(self) -> dict[str, Any]:
        t1_ns = time.perf_counter_ns()
        steal1, busy1 = steal_ticks(), system_busy_s()
        cpu = {k: cpu_s(p) - self.cpu0[k] for k, p in self.pids.items()}
        wall = (t1_ns - self.t0_ns) / 1e9
        ncpu = os.cpu_count() or 1
        steal_s = (steal1 - self.steal0) / os.sysconf("SC_CLK_TCK")
        ours = sum(v for v in cpu.values() if v == v)
        return {
            "t0_ns": self.t0_ns,
            "t1_ns": t1_ns,
            "wall_s": wall,
            "steal_s": steal_s,
            "steal_fraction": steal_s / (wall * ncpu),
            "cpu_s": cpu,
            "ours_cores": ours / wall,
            "others_cores": max(0.0, (busy1 - self.busy0) - ours) / wall,
        }


async def measure(args: argparse.Namespace, webapp_port: int, pids: dict[str, int]) -> dict[str, Any]:
    import aiohttp

    url = f"http://127.0.0.1:{webapp_port}/api/chat.postMessage"
    loop = asyncio.get_running_loop()
    next_id = 0
    posts: dict[int, dict[str, Any]] = {}

    async with aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=64), timeout=aiohttp.ClientTimeout(total=30)
    ) as session:

        async def one(pid: int, scheduled_ns: int) -> None:
            post = posts[pid]
            send = time.perf_counter_ns()
            post["send_ns"] = send
            post["late_ns"] = send - scheduled_ns
            try:
                async with session.post(url, json={"channel": CHANNEL, "text": f"m{pid}:{send}"}) as resp:
                    reply = await resp.json()
                post["http_ns"] = time.perf_counter_ns() - send
                post["ok"] = bool(reply.get("ok"))
            except Exception as exc:  # noqa: BLE001 - counted as a failed post
                post["error"] = repr(exc)

        async def paced(rate: float, n: int) -> list[int]:
            nonlocal next_id
            ids, tasks = [], []
            t0 = loop.time()
            t0_ns = time.perf_counter_ns()
            for i in range(n):
                delay = t0 + i / rate - loop.time()
                if delay > 0:
                    await asyncio.sleep(delay)
                pid = next_id
                next_id += 1
                posts[pid] = {"ok": False}
                ids.append(pid)
                tasks.append(asyncio.ensure_future(one(pid, t0_ns + int(i * 1e9 / rate))))
            await asyncio.wait(tasks, timeout=60)
            return ids

        # warm-up (not counted): connections, caches, the first frames through every hop
        warm = await paced(20.0, args.warmup_posts)
        await asyncio.sleep(0.5)

        steps: list[dict[str, Any]] = []
        w = Window(pids)
        await asyncio.sleep(args.idle_s)
        steps.append({"step": "idle", "rate": 0, "ids": [], **w.close()})
        print(f"  idle {args.idle_s:g} s done", flush=True)
        for rate in args.rates:
            await asyncio.sleep(args.pause_s)
            w = Window(pids)
            ids = await paced(rate, args.posts)
            await asyncio.sleep(args.drain_s)  # the last frames reach the client
            steps.append({"step": f"{rate:g}/s", "rate": rate, "ids": ids, **w.close()})
            ok = sum(1 for i in ids if posts[i].get("ok"))
            print(f"  {rate:g} posts/s: {ok}/{len(ids)} acknowledged in {steps[-1]['wall_s']:.1f} s", flush=True)
    return {"posts": posts, "steps": steps, "warmup_ids": warm}


def analyse(
    raw: dict[str, Any], client_dump: dict[str, Any], timer_dump: dict[str, Any], nclients: int
) -> list[dict[str, Any]]:
    import numpy as np

    posts = raw["posts"]
    recv: dict[int, list[int]] = {}
    webapp_ns: dict[int, int] = {}
    for pid, t, wa in zip(client_dump["id"], client_dump["recv_ns"], client_dump["webapp_ns"], strict=False):
        recv.setdefault(pid, []).append(t)
        webapp_ns[pid] = wa
    t_start = np.asarray(timer_dump["start_ns"], dtype=np.int64)
    t_lag = np.asarray(timer_dump["lag_ns"], dtype=np.int64)
    rows = []
    for st in raw["steps"]:
        sel = (t_start >= st["t0_ns"]) & (t_start < st["t1_ns"])
        lag_ms = t_lag[sel] / 1e6
        row: dict[str, Any] = {
            "step": st["step"],
            "offered_posts_s": st["rate"],
            "wall_s": st["wall_s"],
            "timer_lag_ms": percentiles(lag_ms, (50, 99))
            | {"samples": int(sel.sum()), "min": float(lag_ms.min()) if lag_ms.size else None},
            "steal_fraction": st["steal_fraction"],
            "steal_s": st["steal_s"],
            "others_cores": st["others_cores"],
            "ours_cores": st["ours_cores"],
            "cpu_s": st["cpu_s"],
        }
        ids = st["ids"]
        if ids:
            ok = [i for i in ids if posts[i].get("ok")]
            http_ms = [posts[i]["http_ns"] / 1e6 for i in ok]
            e2e_ms, lost, dup = [], 0, 0
            to_webapp, webapp_to_reply, webapp_to_client = [], [], []
            for i in ok:
                got = recv.get(i, [])
                if len(got) < nclients:
                    lost += nclients - len(got)
                dup += max(0, len(got) - nclients)
                e2e_ms += [(t - posts[i]["send_ns"]) / 1e6 for t in got]
                wa = webapp_ns.get(i)
                if wa:
                    to_webapp.append((wa - posts[i]["send_ns"]) / 1e6)
                    webapp_to_reply.append((posts[i]["send_ns"] + posts[i]["http_ns"] - wa) / 1e6)
                    webapp_to_client += [(t - wa) / 1e6 for t in got]
            sends = sorted(posts[i]["send_ns"] for i in ids if "send_ns" in posts[i])
            span_s = (sends[-1] - sends[0]) / 1e9 if len(sends) > 1 else float("nan")
            late_ms = [posts[i]["late_ns"] / 1e6 for i in ids if "late_ns" in posts[i]]
            row.update(
                {
                    "posts": len(ids),
                    "acknowledged": len(ok),
                    "failed": len(ids) - len(ok),
                    "errors": sorted({posts[i]["error"] for i in ids if "error" in posts[i]})[:5],
                    "achieved_posts_s": (len(sends) - 1) / span_s if span_s == span_s and span_s > 0 else None,
                    "deliveries_expected": len(ok) * nclients,
                    "lost": lost,
                    "duplicates": dup,
                    "http_ms": percentiles(http_ms, (50, 90, 99)),
                    "e2e_ms": percentiles(e2e_ms, (50, 90, 99)),
                    "e2e_minus_http_p50_ms": (pct(e2e_ms, 50) or 0.0) - (pct(http_ms, 50) or 0.0)
                    if e2e_ms and http_ms
                    else None,
                    "legs_ms": {  # from the webapp handler's entry time, carried in the event
                        "poster_to_webapp_handler": percentiles(to_webapp, (50, 99)),
                        "webapp_handler_to_poster_reply": percentiles(webapp_to_reply, (50, 99)),
                        "webapp_handler_to_client_frame": percentiles(webapp_to_client, (50, 99)),
                    },
                    "poster_send_late_ms": percentiles(late_ms, (50, 99)),
                    "cpu_us_per_post": {k: v * 1e6 / len(ids) for k, v in st["cpu_s"].items()},
                    "path_cpu_us_per_post": sum(
                        v for k, v in st["cpu_s"].items() if k not in ("timer", "poster (bench)") and v == v
                    )
                    * 1e6
                    / len(ids),
                }
            )
        rows.append(row)
    return rows


def render(result: dict[str, Any]) -> str:
    rows = []
    for r in result["steps"]:
        tl = r["timer_lag_ms"]
        lag = f"{fmt(tl['p50'], 2)} / {fmt(tl['p99'], 2)} / {fmt(tl['max'], 1)}"
        common = [lag, f"{r['steal_fraction'] * 100:.1f}%", fmt(r["others_cores"], 2)]
        if r["step"] == "idle":
            rows.append(
                [
                    f"idle ({r['wall_s']:.0f} s, path up, no posts)",
                    "–",
                    "–",
                    "–",
                    "–",
                    "–",
                    "–",
                    "–",
                    "–",
                    "–",
                    *common,
                    "–",
                ]
            )
            continue
        h, e = r["http_ms"], r["e2e_ms"]
        rows.append(
            [
                f"{r['offered_posts_s']:g}",
                f"{r['acknowledged']:,} ({r['lost']} lost)",
                fmt(r["achieved_posts_s"], 1),
                fmt(h["p50"], 2),
                fmt(h["p99"], 2),
                fmt(h["max"], 1),
                fmt(e["p50"], 2),
                fmt(e["p90"], 2),
                fmt(e["p99"], 2),
                fmt(e["max"], 1),
                *common,
                fmt(r["path_cpu_us_per_post"], 0),
            ]
        )
    lines = [
        md_table(
            [
                "offered posts/s",
                "posts acknowledged",
                "achieved posts/s",
                "HTTP p50 ms",
                "HTTP p99 ms",
                "HTTP max ms",
                "end-to-end p50 ms",
                "p90 ms",
                "p99 ms",
                "max ms",
                "timer lag p50 / p99 / max ms (10 ms sleeps)",
                "steal (of wall × cores)",
                "others' CPU, cores",
                "path CPU µs/post",
            ],
            rows,
        )
    ]
    cfg = result["config"]
    lines += [
        "",
        "Path (no rtm code; one process per hop, uvloop, 127.0.0.1): poster (this benchmark, aiohttp client, paced open-loop) "
        '-HTTP POST-> webapp (aiohttp; prepares `{"ok":true}`, writes the event on, returns the reply) '
        "-TCP, 4-byte length + msgpack map-> admin -> channel (each decodes, re-encodes, writes on) "
        f"-> gateway (websockets {result['machine']['packages'].get('websockets')}, one text frame per client) "
        f"-websocket-> {cfg['clients']} client(s) in a separate process (picows). "
        "End-to-end = request sent -> frame received, `time.perf_counter_ns()` in both processes (CLOCK_MONOTONIC). "
        f"{cfg['posts']:,} posts per rate after {cfg['warmup_posts']} warm-up posts.",
        "Timer lag: a separate, otherwise idle uvloop process doing `asyncio.sleep(0.01)` in a loop throughout; oversleep = "
        "measured sleep − 10 ms (uvloop/libuv timers have 1 ms resolution). Steal: the `steal` column of /proc/stat's `cpu` line "
        "over the step. Others' CPU: the machine's busy CPU minus this benchmark's processes. "
        "Path CPU: webapp + admin + channel + gateway + client process, CPU-µs per post (psutil user+system; "
        f"10 ms ticks, so ±{10e3 / cfg['posts']:.0f} µs/post per process).",
    ]
    cpu_rows = [r for r in result["steps"] if r["step"] != "idle"]
    if cpu_rows:
        legs = [
            ("poster_to_webapp_handler", "request sent -> webapp handler entered"),
            ("webapp_handler_to_poster_reply", "handler entered -> poster has the reply"),
            ("webapp_handler_to_client_frame", "handler entered -> client has the frame (4 hops)"),
        ]
        lines += [
            "",
            "The legs, split at the webapp handler's entry (its `perf_counter_ns()` travels in the event), p50 / p99 ms:",
            "",
            md_table(
                ["offered posts/s"] + [label for _, label in legs],
                [
                    [f"{r['offered_posts_s']:g}"]
                    + [f"{fmt(r['legs_ms'][k]['p50'], 2)} / {fmt(r['legs_ms'][k]['p99'], 2)}" for k, _ in legs]
                    for r in cpu_rows
                ],
            ),
            "",
        ]
    if cpu_rows:
        labels = [k for k in cpu_rows[0]["cpu_us_per_post"] if k != "timer"]
        lines.append(
            "CPU µs per post by process: "
            + "; ".join(
                f"{r['step']}: " + ", ".join(f"{k} {r['cpu_us_per_post'][k]:.0f}" for k in labels) for r in cpu_rows
            )
            + "."
        )
    m = result["machine"]
    lines.append(
        f"Machine: {m['nproc']} cores, {m['cpu_model']}, {m['ram_gib']} GiB RAM, Python {m['python']}, uvloop {m['uvloop']}, "
        f"aiohttp {m['packages'].get('aiohttp')}, kernel {m['kernel']} (shared, noisy); 1-min load average "
        f"{result['loadavg_1m']['start']:.1f} at start, {result['loadavg_1m']['end']:.1f} at end; {m['date']}."
    )
    return "\n".join(lines)


def plot(result: dict[str, Any], name: str) -> None:
    pyplot = plt()
    steps = [r for r in result["steps"] if r["step"] != "idle"]
    idle = next((r for r in result["steps"] if r["step"] == "idle"), None)
    x = [r["offered_posts_s"] for r in steps]
    from matplotlib.ticker import FuncFormatter

    fig, ax = pyplot.subplots(figsize=(9.5, 4.6))
    for key, style, label in (("p50", "o-", "p50"), ("p90", "s-", "p90"), ("p99", "^-", "p99"), ("max", "v:", "max")):
        ax.plot(x, [r["e2e_ms"][key] for r in steps], style, label=f"end-to-end {label}")
    for key, style in (("p50", "o--"), ("p99", "^--")):
        ax.plot(x, [r["http_ms"][key] for r in steps], style, color="grey", alpha=0.8, label=f"HTTP round trip {key}")
    if idle is not None:
        for key, ls in (("p50", ":"), ("p99", "-.")):
            v = idle["timer_lag_ms"][key]
            if v is not None and v > 0:
                ax.axhline(v, color="black", ls=ls, lw=0.8, label=f"timer lag {key}, idle ({v:.2f} ms)")
    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.set_xticks(x)
    ax.set_xlabel("offered posts/s")
    ax.set_ylabel("ms")
    ax.set_title(f"Latency floor of a 5-hop path, no rtm code ({result['machine']['nproc']} cores)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    save_figure(fig, name)


def run(args: argparse.Namespace) -> dict[str, Any]:
    result: dict[str, Any] = {
        "benchmark": NAME,
        "machine": machine_info(),
        "argv": sys.argv[1:],
        "config": {k: v for k, v in vars(args).items() if k not in ("role", "down", "ws", "interval")},
    }
    load0 = os.getloadavg()[0]
    started = time.monotonic()
    procs: list[Proc] = []
    try:

        def start(label: str, *extra: str) -> Proc:
            proc = Proc(label, label, *extra)
            procs.append(proc)  # appended before waiting: stopped in the finally even if it never gets ready
            return proc.wait_ready()

        timer = start("timer", "--interval", "0.01")
        gateway = start("gateway")
        channel = start("channel", "--down", str(gateway.ready["port"]))
        admin = start("admin", "--down", str(channel.ready["port"]))
        webapp = start("webapp", "--down", str(admin.ready["port"]))
        client = start("client", "--ws", str(gateway.ready["ws_port"]), "--clients", str(args.clients))
        deadline = time.monotonic() + 10
        while gateway.call("clients")["clients"] < args.clients:
            if time.monotonic() > deadline:
                raise RuntimeError("the gateway does not see every client")
            time.sleep(0.05)
        pids = {p.label: p.pid for p in procs}
        pids["poster (bench)"] = os.getpid()
        result["pids"] = pids
        result["startup_s"] = time.monotonic() - started
        print(
            f"hops: path up in {result['startup_s']:.1f} s ({', '.join(f'{k} {v}' for k, v in pids.items())}); rates {args.rates}, {args.posts} posts each",
            flush=True,
        )
        raw = asyncio.run(measure(args, webapp.ready["port"], pids))
        client_dump = client.call("dump")
        timer_dump = timer.call("dump")
    finally:
        for p in reversed(procs):
            p.stop()
    result["loadavg_1m"] = {"start": load0, "end": os.getloadavg()[0]}
    result["steps"] = analyse(raw, client_dump, timer_dump, args.clients)
    warm = set(raw["warmup_ids"])
    result["warmup"] = {"posts": len(warm), "received": sum(1 for i in client_dump["id"] if i in warm)}
    return result


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m bench.hops", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--rates", default="20,50,100", help="offered posts/s, comma-separated")
    p.add_argument("--posts", type=int, default=1000, help="posts per rate")
    p.add_argument("--clients", type=int, default=1, help="websocket clients (one delivery per post each)")
    p.add_argument("--idle-s", type=float, default=5.0, help="idle window for the timer-lag line")
    p.add_argument("--quick", action="store_true", help="100 posts per rate, 2 s idle window (about 15 s)")
    p.add_argument("--role", choices=ROLES, help=argparse.SUPPRESS)
    p.add_argument("--down", type=int, help=argparse.SUPPRESS)
    p.add_argument("--ws", type=int, help=argparse.SUPPRESS)
    p.add_argument("--interval", type=float, default=0.01, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.warmup_posts, args.pause_s, args.drain_s = 40, 1.0, 0.5
    if args.quick:
        args.posts, args.idle_s, args.warmup_posts, args.pause_s, args.drain_s = 100, 2.0, 20, 0.3, 0.3
    args.rates = [float(x) for x in str(args.rates).split(",")]
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.role:
        return child_main(args)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # run the finally blocks (children stopped)
    install_uvloop()
    started = time.monotonic()
    result = run(args)
    result["elapsed_s"] = time.monotonic() - started
    publish(NAME + ("-quick" if args.quick else ""), result, render, plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
