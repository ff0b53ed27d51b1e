"""The gateway's history reads: sessions that catch up from the same place share one webapp read."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import pytest

from gateway.app import Gateway, build_parser
from gateway.state import Fetch, Session
from tests.support import FleetCA


class FakeWebapp:
    """Answers /internal/history from a list of events; counts the calls; can hold them."""

    def __init__(self, channel: str, last_seq: int) -> None:
        self.events = [{"seq": n, "json": json.dumps({"ch": channel, "seq": n})} for n in range(1, last_seq + 1)]
        self.calls: list[dict[str, Any]] = []
        self.release = asyncio.Event()

    async def call(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        assert path == "/internal/history"
        self.calls.append(body)
        await self.release.wait()
        after, limit = int(body["after_seq"]), int(body["limit"])
        page = [e for e in self.events if e["seq"] > after][:limit]
        return {"events": page, "has_more": len([e for e in self.events if e["seq"] > after]) > limit}

    async def close(self) -> None:
        pass


class Socket:
    def __init__(self) -> None:
        self.frames: list[bytes] = []

    def write(self, frame: bytes) -> bool:
        self.frames.append(frame)
        return True


@pytest.fixture
async def gw(fleet_ca: FleetCA) -> AsyncIterator[Gateway]:
    """A gateway that is never started: its state and history reads only."""
    flags = fleet_ca.flags("gateway", "gw-test")
    gateway = Gateway(build_parser().parse_args(["--secret", "s", "--instance-id", "gw-test", *flags]))
    yield gateway
    await gateway.discovery.close()


async def test_sessions_catching_up_from_the_same_place_share_one_read(gw: Gateway) -> None:
    webapp = gw.webapp = FakeWebapp("C1", 8)  # type: ignore[assignment]
    first = Session(sid=1, user="U1", team="T1", write=Socket().write)
    gw.state.attach(first, [("C1", 8)])
    sockets = [Socket() for _ in range(5)]
    sessions = [Session(sid=10 + i, user=f"U{10 + i}", team="T1", write=s.write) for i, s in enumerate(sockets)]
    fetches = [gw.state.attach(s, [("C1", 3)]).fetch[0] for s in sessions]  # each behind the cursor: held
    assert all(f == Fetch("C1", 3, 8, s) for f, s in zip(fetches, sessions, strict=False))
    pending = [asyncio.ensure_future(gw.fetch_history(f)) for f in fetches]
    other = asyncio.ensure_future(gw.fetch_history(Fetch("C1", 5, 8, None)))  # a different range reads apart
    for _ in range(3):
        await asyncio.sleep(0)  # wait-ok: let every fetch reach the webapp or join a read in flight
    assert [c["after_seq"] for c in webapp.calls] == [3, 5]
    webapp.release.set()
    await asyncio.wait_for(asyncio.gather(*pending, other), 5.0)
    for sock in sockets:  # each session got 4..8 once, in order
        assert [json.loads(f[2:])["seq"] for f in sock.frames] == [4, 5, 6, 7, 8]
    assert gw.history_reads == {}
    assert gw.shared_history_reads._value.get() == 4  # type: ignore[attr-defined]


async def test_a_read_pages_through_long_histories(gw: Gateway, monkeypatch: Any) -> None:
    import gateway.app as app

    monkeypatch.setattr(app, "HISTORY_PAGE_EVENTS", 3)
    webapp = gw.webapp = FakeWebapp("C1", 10)  # type: ignore[assignment]
    webapp.release.set()
    events = await gw.read_history("C1", 2, 9)
    assert [seq for seq, _ in events] == list(range(3, 10))
    assert [c["after_seq"] for c in webapp.calls] == [2, 5, 8]
