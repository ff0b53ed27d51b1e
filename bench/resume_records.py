"""What a drain's resume records cost the webapp now that they are durable (docs/hardening-gateway.md,
"Resume records are durable and per token").

Starts a webapp in this process on real ports (the test harness's, ``tests.webapp_harness``: a
seeded demo team, a fake admin server), then posts ``--records`` resume records to
``/internal/resume`` with a gateway's certificate, ``--concurrency`` at once (a draining gateway
moves up to ``MAX_MOVES_IN_FLIGHT`` = 256 sessions at once), and prints the group commits (fsyncs)
they took and the CPU per record of this process (the HTTP client and the webapp together:
psutil user+system). ``--memory`` measures the old way for comparison: records in memory only,
answered without waiting for a commit.

Usage: ``python -m bench.resume_records [--records 2000] [--concurrency 256] [--memory]``.
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
import psutil
from aiohttp import web

from gateway.drain import MAX_MOVES_IN_FLIGHT
from tests.webapp_harness import FakeAdminServer, start
from webapp_stub.internal import InternalEndpoints
from webapp_stub.resume import ResumeBook, token_id


async def measure(records: int, concurrency: int, memory: bool) -> dict[str, Any]:
    if memory:  # before the routes are made from it
        InternalEndpoints.handle_resume = _not_durable  # type: ignore[method-assign]
    fake = FakeAdminServer()
    await fake.start()
    webapp = await start(Path(tempfile.mkdtemp(prefix="rtm-resume-bench-")), fake)
    api = webapp.server.api
    if memory:
        api.resume = ResumeBook(clock=api.clock)
    api.resume.max_records_per_user = records + 1  # a few seeded users stand for many
    users = webapp.seed["users"]
    connector = aiohttp.TCPConnector(ssl=webapp.ca.trust("gateway", "gw-bench").client, limit=concurrency)
    slots = asyncio.Semaphore(concurrency)
    proc = psutil.Process()
    try:
        async with aiohttp.ClientSession(connector=connector) as http:

            async def post(i: int) -> None:
                user = users[i % len(users)]
                body = {"user": user["id"], "token_id": token_id(f"tok-{i}"), "channels": {user["id"]: 0}}
                async with slots, http.post(f"{webapp.internal_url}/internal/resume", json=body) as resp:
                    reply = await resp.json()
                    assert reply["ok"], reply

            await post(0)  # the connection pool warm
            commits, cpu, started = webapp.server.commits.batches, proc.cpu_times(), time.perf_counter()
            await asyncio.gather(*(post(i) for i in range(1, records + 1)))
            wall = time.perf_counter() - started
            after = proc.cpu_times()
            commits = webapp.server.commits.batches - commits
    finally:
        await webapp.session.close()
        await webapp.stop()
        await fake.kill()
    cpu_s = (after.user + after.system) - (cpu.user + cpu.system)
    return {
        "records": records,
        "commits": commits,
        "records_per_commit": round(records / max(1, commits), 1),
        "cpu_us_per_record": round(cpu_s / records * 1e6),
        "wall_s": round(wall, 2),
        "load_average": [round(x, 2) for x in psutil.getloadavg()],
    }


async def _not_durable(self: InternalEndpoints, request: web.Request) -> web.Response:
    """``/internal/resume`` as it was: answered without waiting for a commit."""
    return await self._answer(request, "internal.resume", self._resume, durable=False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--records", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=MAX_MOVES_IN_FLIGHT)
    parser.add_argument("--memory", action="store_true", help="the old way: in memory, not waiting for a commit")
    args = parser.parse_args()
    print(asyncio.run(measure(args.records, args.concurrency, args.memory)))


if __name__ == "__main__":
    main()
