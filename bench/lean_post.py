"""What a post costs the webapp in-process: the lean ``chat.postMessage`` path without sockets.

Builds the webapp's Web API over a real SQLite store (``synchronous=FULL``, a temporary
directory), seeds the demo team, and feeds whole HTTP requests (form bodies of about the peers'
200 bytes) to ``--connections`` lean-front connections (:class:`webapp_stub.http_front.FrontProtocol`
over a transport that only counts writes), then commits the batch, for each ``--batches`` size:
``--posts`` posts in batches of that many. It reports the process's CPU per post (user+system,
``time.process_time``): parsing, authentication, validation, SQL and the answer, plus each
commit's ``COMMIT`` and fsync shared by the batch. What it leaves out is the kernel's work per
request (reading it, writing the answer on a socket) and the event loop's wake-ups, which the
fleet's benchmarks include (docs/publish-path.md, round 8). Rate limits are off.

    python -m bench.lean_post --batches 10,40,200 --posts 20000 --rounds 3
    python -m bench.lean_post --batches 30 --channels 100 --posts 40000 --rounds 3

Writes ``bench/results/lean-post.{json,md}``.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
import urllib.parse
from typing import Any

import webapp_stub.methods  # noqa: F401  (registers the methods)
from bench.harness import install_uvloop, machine_info, md_table, save_json, save_text
from services.metrics import ServiceMetrics
from webapp_stub.api import WebApi
from webapp_stub.commit import GroupCommit
from webapp_stub.gateway_picker import GatewayPicker
from webapp_stub.http_front import FrontProtocol, HttpFront
from webapp_stub.models import Event
from webapp_stub.seed import seed_demo
from webapp_stub.store import Store

POSTS = 20_000
BATCHES = "10,40,200"
CHANNELS = 2  # the demo team's
TEXT_BYTES = 160  # with its id and the form's other fields, about the peers' 200-byte message


class CountingOutbox:
    """The hand-off, counting what it is given (no admin server)."""

    saturated = False

    def __init__(self) -> None:
        self.events = 0

    def publish(self, events: list[Event]) -> None:
        self.events += len(events)


class CountingTransport:
    """What FrontProtocol writes to, counting answers and failures."""

    def __init__(self) -> None:
        self.answers = 0
        self.failed = 0

    def write(self, data: bytes) -> None:
        self.answers += 1
        self.failed += b'"ok":false' in data

    def is_closing(self) -> bool:
        return False

    def get_extra_info(self, name: str, default: object = None) -> object:
        return ("127.0.0.1", 50_000) if name == "peername" else default

    def pause_reading(self) -> None: ...

    def resume_reading(self) -> None: ...

    def close(self) -> None: ...


def requests(token: str, channels: list[str], count: int) -> list[bytes]:
    out = []
    for i in range(count):
        text = f"{i}|" + "x" * TEXT_BYTES
        body = urllib.parse.urlencode({"token": token, "channel": channels[i % len(channels)], "text": text}).encode()
        head = (
            "POST /api/chat.postMessage HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/x-www-form-urlencoded"
        )
        out.append(f"{head}\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body)
    return out


async def one_run(posts: int, batch: int, channels: int) -> dict[str, Any]:
    """``posts`` posts through ``batch`` connections to ``channels`` channels in turn, one commit
    per ``batch`` posts."""
    with tempfile.TemporaryDirectory(prefix="rtm-lean-post-") as data_dir:
        store = Store(data_dir, background_checkpoints=True)  # as the webapp: WAL checkpoints on their thread
        demo = seed_demo(store, channels=channels)
        outbox = CountingOutbox()
        api = WebApi(store, outbox, GatewayPicker(None), ServiceMetrics("webapp", "bench"), secret=b"s" * 32)  # type: ignore[arg-type]
        api.commits = GroupCommit(store, outbox, min_interval_s=0.0)
        api.limiter.retry_after = lambda *args: 0  # type: ignore[method-assign]
        front = HttpFront(api, lambda: None, max_body_bytes=1 << 20)
        transports = [CountingTransport() for _ in range(batch)]
        protocols = [FrontProtocol(front) for _ in range(batch)]
        for protocol, transport in zip(protocols, transports, strict=True):
            protocol.connection_made(transport)  # type: ignore[arg-type]
        user, channels = demo["users"][0], [c["id"] for c in demo["channels"]]
        raw = requests(user["token"], channels, posts)
        started = time.process_time()
        for first in range(0, posts - posts % batch, batch):
            for protocol, request in zip(protocols, raw[first : first + batch], strict=True):
                protocol.data_received(request)
            api.commits.commit()
            await asyncio.sleep(0)  # the commit's callbacks: the answers
        cpu_s = time.process_time() - started
        store.close()
    answered = sum(t.answers for t in transports)
    return {
        "batch": batch,
        "posts": answered,
        "failed": sum(t.failed for t in transports),
        "events": outbox.events,
        "us_per_post": 1e6 * cpu_s / max(1, answered),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", default=BATCHES, help="posts per commit (= connections), one step each")
    parser.add_argument("--posts", type=int, default=POSTS, help="posts per step")
    parser.add_argument(
        "--rounds", type=int, default=3, help="passes over the steps, alternating; tables quote medians"
    )
    parser.add_argument(
        "--channels", type=int, default=CHANNELS, help="channels the posts go to, in turn (the peers' rooms: 100)"
    )
    args = parser.parse_args(argv)
    install_uvloop()
    batches = [int(b) for b in args.batches.split(",") if b]
    rows = [asyncio.run(one_run(args.posts, batch, args.channels)) for _ in range(args.rounds) for batch in batches]
    machine = machine_info()
    table = []
    for batch in batches:
        mine = [r for r in rows if r["batch"] == batch]
        each = ", ".join(f"{r['us_per_post']:.1f}" for r in mine)
        median = statistics.median(r["us_per_post"] for r in mine)
        table.append([batch, f"{median:.1f}", each, sum(r["failed"] for r in mine)])
    text = (
        f"# bench/lean_post ({machine.get('cpu_model', '')}, {machine.get('nproc')} CPUs, {machine.get('date')}, "
        f"commit {machine.get('rtm_commit')})\n\nCPU µs per post in-process (no sockets), {args.channels} channels, per commit size:\n\n"
        + md_table(["posts per commit", "µs/post (median)", "each round", "failed"], table)
        + "\n"
    )
    save_json("lean-post", {"benchmark": "lean_post", "machine": machine, "argv": argv, "rows": rows})
    save_text("lean-post.md", text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
