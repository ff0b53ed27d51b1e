"""Calibration: what one websocket delivery costs this machine below the gateway's own code.

The gateway's fan-out is, per delivery, one ``transport.write(frame)`` of the
same pre-built frame to a client's TCP socket (uvloop), so its CPU per
delivery cannot go below what the kernel and uvloop charge for one small
write on loopback (on loopback the sender's CPU also pays for the receiving
side's TCP processing). This measures exactly that, with no rtm code: a
sender process holding N sockets (default 1,000) writes one 180-byte frame to
each, R rounds at a paced rate (like posts to a channel of N members), to a
receiver process (uvloop) that drains them. Reported: sender CPU µs per
write (psutil user+system, split), receiver CPU µs per frame.

    python -m bench.floor            # 1,000 sockets, 20 rounds/s and unpaced
    python -m bench.floor --quick
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing as mp
import sys
import time
from typing import Any

import psutil

from bench.harness import install_uvloop, machine_info, md_table, save_json, save_text

NAME = "floor"
FRAME = (
    b"\x81\x7e\x00\xb0"
    + b'{"type":"message","channel":"C0123456789A","user":"U0123456789A","text":"m123456:1700000000000000","ts":"1700000000.000100","team":"T0123456789A","client_msg_id":"x","event_ts":"1"}'[
        :176
    ]
)


def receiver(port_q: Any, stop_ev: Any) -> None:
    import uvloop

    class Sink(asyncio.Protocol):
        def data_received(self, data: bytes) -> None:
            pass

    async def main() -> None:
        srv = await asyncio.get_running_loop().create_server(Sink, "127.0.0.1", 0, backlog=4096)
        port_q.put(srv.sockets[0].getsockname()[1])
        while not stop_ev.is_set():
            await asyncio.sleep(0.2)

    uvloop.run(main())


class Nop(asyncio.Protocol):
    pass


def times(pid: int) -> tuple[float, float]:
    t = psutil.Process(pid).cpu_times()
    return float(t.user), float(t.system)


async def run(args: argparse.Namespace) -> dict[str, Any]:
    port_q: Any = mp.Queue()
    stop_ev = mp.Event()
    proc = mp.Process(target=receiver, args=(port_q, stop_ev), daemon=True)
    proc.start()
    transports = []
    try:
        port = port_q.get(timeout=20)
        loop = asyncio.get_running_loop()
        for _ in range(args.sockets):
            t, _ = await loop.create_connection(Nop, "127.0.0.1", port)
            transports.append(t)
        await asyncio.sleep(1.0)
        me = psutil.Process().pid
        rows = []
        for rate in args.rates:
            rounds = args.rounds if rate == 0 else max(1, int(rate * args.seconds))
            s0, r0 = times(me), times(proc.pid)
            t0 = time.monotonic()
            for i in range(rounds):
                if rate:
                    delay = t0 + i / rate - time.monotonic()
                    if delay > 0:
                        await asyncio.sleep(delay)
                for t in transports:
                    t.write(FRAME)
                if not rate and i % 10 == 9:
                    await asyncio.sleep(0)
            await asyncio.sleep(0.5)
            s1, r1 = times(me), times(proc.pid)
            writes = rounds * len(transports)
            row = {
                "rounds_per_s": rate or "unpaced",
                "writes": writes,
                "sender_us_per_write": (s1[0] + s1[1] - s0[0] - s0[1]) * 1e6 / writes,
                "sender_user_us": (s1[0] - s0[0]) * 1e6 / writes,
                "sender_sys_us": (s1[1] - s0[1]) * 1e6 / writes,
                "receiver_us_per_frame": (r1[0] + r1[1] - r0[0] - r0[1]) * 1e6 / writes,
                "elapsed_s": time.monotonic() - t0,
            }
            rows.append(row)
            print(
                f"  {row['rounds_per_s']!s:>8} rounds/s: sender {row['sender_us_per_write']:.1f} µs/write "
                f"(user {row['sender_user_us']:.1f}, sys {row['sender_sys_us']:.1f}), receiver {row['receiver_us_per_frame']:.1f} µs/frame",
                flush=True,
            )
        return {
            "benchmark": NAME,
            "machine": machine_info(),
            "sockets": args.sockets,
            "frame_bytes": len(FRAME),
            "rows": rows,
        }
    finally:
        for t in transports:
            t.close()
        stop_ev.set()
        proc.join(timeout=10)
        if proc.is_alive():
            proc.kill()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m bench.floor", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--sockets", type=int, default=1000)
    p.add_argument("--rates", default="5,20,0", help="rounds/s (one write to every socket per round); 0 = unpaced")
    p.add_argument("--seconds", type=float, default=8.0)
    p.add_argument("--rounds", type=int, default=200, help="rounds of the unpaced run")
    p.add_argument("--quick", action="store_true")
    args = p.parse_args(argv)
    if args.quick:
        args.seconds, args.rounds = 2.0, 50
    args.rates = [float(x) for x in args.rates.split(",")]
    install_uvloop()
    result = asyncio.run(run(args))
    name = NAME + ("-quick" if args.quick else "")
    save_json(name, result)
    table = md_table(
        ["rounds/s (writes/s)", "sender CPU µs/write", "user", "sys", "receiver CPU µs/frame"],
        [
            [
                f"{r['rounds_per_s']}"
                + (f" ({r['rounds_per_s'] * args.sockets:,.0f})" if r["rounds_per_s"] != "unpaced" else ""),
                f"{r['sender_us_per_write']:.1f}",
                f"{r['sender_user_us']:.1f}",
                f"{r['sender_sys_us']:.1f}",
                f"{r['receiver_us_per_frame']:.1f}",
            ]
            for r in result["rows"]
        ],
    )
    save_text(f"{name}.md", table + "\n")
    print()
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
