"""Calibration: what one HTTP request costs this machine below the webapp's own code (issue 17).

The webapp's lean front (``webapp_stub/http_front.py``) reads each ``chat.postMessage`` from a
keep-alive connection (uvloop) and writes its answer once the group commit holding it is on disk.
Beneath any of rtm's code, each request then costs the kernel and uvloop a wake-up share, a
``read``, a ``data_received`` callback and a ``write`` (on loopback the sender's CPU also pays for
the receiving side's TCP processing). This measures exactly that, with no rtm code: a server
process (uvloop, an ``asyncio.Protocol``) that finds each request's end (its head, then
``Content-Length`` bytes) and answers with a fixed 250-byte JSON reply, either at once
(``now``) or, like the paced group commit under load, held and written together every
``--hold-ms`` or as soon as every connection waits for its answer (``held``). The client is ``bench.commit_pacing``'s: aiohttp, form bodies of the peers' size,
``--max-inflight`` unanswered, paced at each ``--rates``. Reported: the server's CPU µs per
request (psutil user+system over the step), and the client's latency.

    python -m bench.http_floor --rates 2000 --rounds 3

Writes ``bench/results/http-floor.{json,md}``.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing as mp
import statistics
import time
from typing import Any

import aiohttp
import psutil

from bench.harness import install_uvloop, machine_info, md_table, paced_requests, save_json, save_text
from bench.stats import pct

NAME = "http-floor"
REPLY_BODY = b'{"ok":true,"channel":"C0123456789A","ts":"1700000000.000100","message":{"type":"message",' + (
    b'"user":"U0123456789A","text":"' + b"x" * 120 + b'","ts":"1700000000.000100","team":"T0123456789A"}}'
)
REPLY = (
    b"HTTP/1.1 200 OK\r\nContent-Type: application/json; charset=utf-8\r\n"
    + f"Content-Length: {len(REPLY_BODY)}\r\nDate: Mon, 07 Dec 2026 12:00:00 GMT\r\n\r\n".encode()
    + REPLY_BODY
)
TEXT = "x" * 160  # with the form's other fields, about the peers' 200-byte message
HOLD_MS = 20.0  # the paced group commit's interval at 2,000 posts/s (webapp_stub/commit_pacer.py)
MAX_INFLIGHT = 32  # as the peers' generator keeps
SECONDS = 15.0
REPLY_TIMEOUT_S = 30.0
SERVER_READY_TIMEOUT_S = 30.0


class HeldAnswers:
    """The answers waiting for the next write-out, and the connections that could add to them."""

    def __init__(self) -> None:
        self.transports: list[asyncio.Transport] = []
        self.connections = 0

    def add(self, transport: asyncio.Transport) -> None:
        self.transports.append(transport)
        if len(self.transports) >= self.connections:  # nobody left to add to the batch
            self.write_out()

    def write_out(self) -> None:
        batch, self.transports = self.transports, []
        for transport in batch:
            transport.write(REPLY)


class FloorProtocol(asyncio.Protocol):
    """Find each request's end; answer now, or hand the answer to the held batch."""

    def __init__(self, held: HeldAnswers | None) -> None:
        self.held = held
        self.buf = bytearray()
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        if self.held is not None:
            self.held.connections += 1

    def connection_lost(self, exc: Exception | None) -> None:
        if self.held is not None:
            self.held.connections -= 1

    def data_received(self, data: bytes) -> None:
        self.buf += data
        while True:
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                return
            start = self.buf.find(b"Content-Length: ", 0, end)
            length = int(self.buf[start + 16 : self.buf.find(b"\r\n", start)]) if start >= 0 else 0
            if len(self.buf) < end + 4 + length:
                return
            del self.buf[: end + 4 + length]
            assert self.transport is not None
            if self.held is None:
                self.transport.write(REPLY)
            else:
                self.held.add(self.transport)


def serve(mode: str, hold_ms: float, port_q: Any) -> None:
    """The server process: listen on 127.0.0.1, answer until killed."""
    install_uvloop()

    async def main() -> None:
        loop = asyncio.get_running_loop()
        held = HeldAnswers() if mode == "held" else None
        server = await loop.create_server(lambda: FloorProtocol(held), "127.0.0.1", 0, backlog=1024)
        port_q.put(server.sockets[0].getsockname()[1])
        while True:
            await asyncio.sleep(hold_ms / 1000 if held is not None else 3600)
            if held is not None:
                held.write_out()

    asyncio.run(main())


async def step(port: int, server: psutil.Process, rate: float, seconds: float, max_inflight: int) -> dict[str, Any]:
    """Post at ``rate`` for ``seconds``: the server's CPU µs per request, the client's latency."""
    url = f"http://127.0.0.1:{port}/api/chat.postMessage"
    slots = asyncio.Semaphore(max_inflight)
    latencies: list[float] = []
    connector = aiohttp.TCPConnector(limit=max_inflight)
    async with aiohttp.ClientSession(connector=connector) as http:

        async def one(i: int) -> None:
            try:
                started = time.perf_counter()
                form = {"token": "xoxp-0123456789", "channel": "C0123456789A", "text": f"m{i} {TEXT}"}
                async with http.post(url, data=form) as reply:
                    await reply.read()
                latencies.append(time.perf_counter() - started)
            finally:
                slots.release()

        for i in range(max_inflight):  # open the connections before the step
            await slots.acquire()
            await one(i)
        cpu0 = sum(server.cpu_times()[:2])
        latencies.clear()
        elapsed = await paced_requests(rate, seconds, slots, one, REPLY_TIMEOUT_S)
        cpu1 = sum(server.cpu_times()[:2])
    done = max(1, len(latencies))
    return {
        "rate": rate,
        "achieved_s": len(latencies) / elapsed,
        "server_us_per_request": 1e6 * (cpu1 - cpu0) / done,
        "p50_ms": 1e3 * (pct(latencies, 50) or 0.0),
        "p99_ms": 1e3 * (pct(latencies, 99) or 0.0),
    }


def run_mode(mode: str, args: argparse.Namespace) -> list[dict[str, Any]]:
    """Start a server in ``mode``, post each rate at it, stop it."""
    ctx = mp.get_context("spawn")
    port_q = ctx.Queue()
    proc = ctx.Process(target=serve, args=(mode, args.hold_ms, port_q), daemon=True)
    proc.start()
    try:
        port = port_q.get(timeout=SERVER_READY_TIMEOUT_S)
        server = psutil.Process(proc.pid)
        rows = []
        for rate in (float(r) for r in args.rates.split(",")):
            row = asyncio.run(step(port, server, rate, args.seconds, args.max_inflight))
            rows.append({"mode": mode, **row})
            print(rows[-1], flush=True)
        return rows
    finally:
        proc.kill()
        proc.join(timeout=10)


def render(rows: list[dict[str, Any]], machine: dict[str, Any], args: argparse.Namespace) -> str:
    table = []
    for mode in args.modes.split(","):
        for rate in sorted({r["rate"] for r in rows}):
            runs = [r for r in rows if r["mode"] == mode and r["rate"] == rate]
            if not runs:
                continue
            cpu = [r["server_us_per_request"] for r in runs]
            table.append(
                [
                    mode,
                    f"{rate:,.0f}",
                    ", ".join(f"{v:.1f}" for v in cpu) + f" → **{statistics.median(cpu):.1f}**",
                    f"{statistics.median(r['achieved_s'] for r in runs):,.0f}",
                    f"{statistics.median(r['p50_ms'] for r in runs):.1f}",
                    f"{statistics.median(r['p99_ms'] for r in runs):.1f}",
                ]
            )
    head = (
        f"# bench/http_floor ({machine.get('cpu_model', '?')}, {machine.get('nproc', '?')} CPUs, "
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())})\n\n"
        f"Server CPU per request, no application code (`--hold-ms {args.hold_ms}`, "
        f"`--max-inflight {args.max_inflight}`, {args.seconds:.0f} s per step; each round → median):\n\n"
    )
    return head + md_table(["answers", "offered/s", "server µs/request", "requests/s", "p50 ms", "p99 ms"], table)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--modes", default="now,held", help="of now, held")
    parser.add_argument("--rates", default="2000", help="offered requests per second, one step each")
    parser.add_argument("--seconds", type=float, default=SECONDS, help="posting time per step")
    parser.add_argument("--hold-ms", type=float, default=HOLD_MS, help="held: answers written every this often")
    parser.add_argument("--max-inflight", type=int, default=MAX_INFLIGHT, help="unanswered requests at most")
    parser.add_argument("--rounds", type=int, default=1, help="passes over the modes, alternating")
    args = parser.parse_args(argv)
    install_uvloop()
    rows: list[dict[str, Any]] = []
    for _ in range(args.rounds):
        for mode in args.modes.split(","):
            rows.extend(run_mode(mode, args))
    machine = machine_info()
    save_json(NAME, {"machine": machine, "args": vars(args), "rows": rows})
    text = render(rows, machine, args)
    save_text(f"{NAME}.md", text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
