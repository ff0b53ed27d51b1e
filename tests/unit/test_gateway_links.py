"""The gateway's asyncio layer around its subscriptions and gap fills, with fake links and a fake
webapp (no sockets): a failed sub is sent again, reconciliation repairs, an unfillable gap ends
its sessions with 4010 instead of skipping or holding for ever."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import pytest

from gateway.app import Gateway, build_parser
from gateway.state import Fetch, Session
from gateway.subscriptions import Phase
from services.errors import CloseCode, RequestTimeout
from services.ring import RingDocument
from tests.support import DEFAULT_WAIT_S

OWNER = "cs-inst-0"


class FakeConn:
    """A channel-server connection: answers requests with a scripted handler."""

    def __init__(self, answer: Any) -> None:
        self.answer = answer
        self.requests: list[dict[str, Any]] = []
        self.is_open = True

    async def request(self, message: dict[str, Any], timeout_s: float = 5.0) -> dict[str, Any]:
        self.requests.append(message)
        result = self.answer(message)
        if isinstance(result, BaseException):
            raise result
        return dict(result)


class FakeLink:
    def __init__(self, conn: FakeConn) -> None:
        self.conn = conn
        self.connected = True

    async def close(self) -> None:
        pass


class FakeWs:
    def __init__(self) -> None:
        self.sent: list[str] = []
        self.closed: list[int] = []

    async def send(self, text: str) -> None:
        self.sent.append(text)

    async def close(self, code: int, reason: str = "") -> None:
        self.closed.append(code)


class FakeWebapp:
    def __init__(self, history: Any) -> None:
        self.history = history
        self.calls: list[tuple[str, dict[str, Any]]] = []

    async def call(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        self.calls.append((path, body))
        if path == "/internal/history":
            result = self.history(body)
            if isinstance(result, BaseException):
                raise result
            return dict(result)
        raise ConnectionError("webapp down")  # resume records are best effort

    async def close(self) -> None:
        pass


class Sock:
    def __init__(self) -> None:
        self.frames: list[bytes] = []

    def write(self, frame: bytes) -> bool:
        self.frames.append(frame)
        return True

    def seqs(self) -> list[int]:
        return [json.loads(f[2:])["seq"] for f in self.frames]


@pytest.fixture
async def gw() -> AsyncIterator[Gateway]:
    args = ["--secret", "s", "--instance-id", "gw-test", "--gap-fill-budget-s", "0.6", "--max-gap-fill-attempts", "3"]
    gateway = Gateway(build_parser().parse_args(args))
    gateway.follower.ring.update(RingDocument(version=1, slots={"cs-0": OWNER}))
    gateway.links[OWNER] = FakeLink(FakeConn(ok_sub))  # type: ignore[assignment]  # never connected: no batches
    yield gateway
    for task in list(gateway.tasks):
        task.cancel()
    await asyncio.gather(*gateway.tasks, return_exceptions=True)
    await gateway.discovery.close()


def attach(gw: Gateway, sid: int, channels: list[tuple[str, int]]) -> tuple[Session, Sock, FakeWs]:
    sock, ws = Sock(), FakeWs()
    session = Session(sid=sid, user=f"U{sid}", team="T1", write=sock.write)
    gw.sockets[sid] = ws  # type: ignore[assignment]
    gw.apply(gw.state.attach(session, channels))
    return session, sock, ws


async def until(predicate: Any, what: str) -> None:
    deadline = asyncio.get_running_loop().time() + DEFAULT_WAIT_S
    while not predicate():
        assert asyncio.get_running_loop().time() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.01)  # wait-ok: bounded poll of the gateway's tasks


def ok_sub(message: dict[str, Any]) -> dict[str, Any]:
    return {"op": "ok", "not_owner": [], "last": {}}


async def test_a_timed_out_sub_is_sent_again_until_it_is_answered(gw: Gateway) -> None:
    replies = iter([RequestTimeout("no reply"), RequestTimeout("no reply")])
    conn = FakeConn(lambda m: next(replies, None) or ok_sub(m))
    gw.links[OWNER] = FakeLink(conn)  # type: ignore[assignment]
    attach(gw, 1, [("C1", 4)])
    assert gw.subs.channels["C1"].phase is Phase.PENDING  # the link has not connected yet
    gw.subs.link_up(OWNER)  # what the link's on_connected does, the first connect included
    gw.schedule_flush(OWNER)
    await until(lambda: gw.subs.channels["C1"].phase is Phase.CONFIRMED, "the sub to be confirmed")
    subs = [r for r in conn.requests if r["op"] == "sub"]
    assert len(subs) == 3 and all(r["chans"] == [["C1", 4]] for r in subs)
    assert gw.sub_retries._value.get() == 2  # type: ignore[attr-defined]


async def test_reconciliation_resubscribes_what_the_server_lost_and_fills_what_we_missed(gw: Gateway) -> None:
    def answer(message: dict[str, Any]) -> dict[str, Any]:
        if message["op"] == "seqs":
            return {"op": "ok", "last": {"C1": 7, "C2": 3}, "missing": ["C2"], "not_owner": []}
        return ok_sub(message)

    conn = FakeConn(answer)
    gw.links[OWNER] = FakeLink(conn)  # type: ignore[assignment]
    last = {"C1": 7, "C2": 3}  # the webapp's history: C2 has nothing after 3

    def history(body: dict[str, Any]) -> dict[str, Any]:
        seqs = range(body["after_seq"] + 1, last[body["channel"]] + 1)
        return {"events": [{"seq": n, "json": json.dumps({"seq": n})} for n in seqs], "has_more": False}

    gw.webapp = FakeWebapp(history)  # type: ignore[assignment]
    _, sock, _ = attach(gw, 1, [("C1", 5), ("C2", 3)])
    gw.subs.link_up(OWNER)
    gw.schedule_flush(OWNER)
    await until(lambda: gw.subs.count(Phase.CONFIRMED) == 2, "both subs confirmed")
    await gw.reconcile(OWNER)
    await until(lambda: sock.seqs() == [6, 7], "C1's missed events 6 and 7 from the webapp")
    await until(lambda: sum(r["op"] == "sub" and ["C2", 3] in r["chans"] for r in conn.requests) == 2, "C2 again")
    assert gw.repairs.labels("gap")._value.get() == 1  # type: ignore[attr-defined]
    assert gw.repairs.labels("resubscribe")._value.get() == 1  # type: ignore[attr-defined]


@pytest.mark.parametrize("failure", ["webapp_down", "malformed_history"])
async def test_an_unfillable_gap_ends_its_sessions_with_4010_and_holds_nothing(gw: Gateway, failure: str) -> None:
    if failure == "webapp_down":
        webapp = FakeWebapp(lambda body: ConnectionError("webapp down"))
    else:
        webapp = FakeWebapp(lambda body: {"events": [{"no-seq": 1}], "has_more": False})  # a fill that raises
    gw.webapp = webapp  # type: ignore[assignment]
    s1, sock1, ws1 = attach(gw, 1, [("C1", 3), ("C9", 0)])
    s2, sock2, ws2 = attach(gw, 2, [("C1", 3)])
    _, sock3, ws3 = attach(gw, 3, [("C9", 0)])  # not in the gap's channel: untouched
    fetch = gw.state.deliver("C1", 6, json.dumps({"seq": 6}).encode())  # 4 and 5 never came
    assert fetch == Fetch("C1", 3, 5)
    await gw.fetch_history(fetch)
    await until(lambda: ws1.closed and ws2.closed, "both sessions of C1 closed")
    assert ws1.closed == [CloseCode.RESYNC] and ws2.closed == [CloseCode.RESYNC]
    assert ws1.sent == ['{"type":"goodbye"}'] and ws3.closed == []
    assert sock1.frames == [] and sock2.frames == []  # nothing skipped ahead
    assert "C1" not in gw.state.gaps and "C1" not in gw.state.channels  # held nowhere
    assert gw.state.sessions.keys() == {3}
    assert gw.sessions_ended.labels("gap_unfilled")._value.get() == 2  # type: ignore[attr-defined]
    resumes = [body for path, body in webapp.calls if path == "/internal/resume"]
    assert {tuple(sorted(r["channels"].items())) for r in resumes} == {(("C1", 3), ("C9", 0)), (("C1", 3),)}
    if failure == "webapp_down":
        assert len([c for c in webapp.calls if c[0] == "/internal/history"]) <= 3  # --max-gap-fill-attempts


async def test_a_held_session_whose_catch_up_fails_is_ended_alone(gw: Gateway) -> None:
    gw.webapp = FakeWebapp(lambda body: ConnectionError("webapp down"))  # type: ignore[assignment]
    _, sock1, ws1 = attach(gw, 1, [("C1", 0)])
    for n in (1, 2, 3):
        gw.state.deliver("C1", n, json.dumps({"seq": n}).encode())
    s2, sock2, ws2 = attach(gw, 2, [("C1", 1)])  # behind: held while (1, 3] is read
    await until(lambda: ws2.closed, "the held session closed")
    assert ws2.closed == [CloseCode.RESYNC] and ws1.closed == []
    assert sock1.seqs() == [1, 2, 3] and sock2.frames == []
    assert gw.state.sessions.keys() == {1}


async def test_held_events_past_the_bound_end_the_sessions(gw: Gateway) -> None:
    gw.state.max_held_per_channel = 5
    gw.webapp = FakeWebapp(lambda body: ConnectionError("slow"))  # type: ignore[assignment]
    _, sock, ws = attach(gw, 1, [("C1", 1)])
    conn = FakeConn(ok_sub)
    gw.links[OWNER] = FakeLink(conn)  # type: ignore[assignment]
    fetch = gw.state.deliver("C1", 3, b'{"seq":3}')
    assert fetch is not None
    for n in range(4, 10):
        gw.on_push(conn, {"op": "ev", "ch": "C1", "seq": n, "json": json.dumps({"seq": n}).encode(), "t0": 1.0})  # type: ignore[arg-type]
    await until(lambda: ws.closed, "the session closed")
    assert ws.closed == [CloseCode.RESYNC] and sock.frames == []
    assert gw.sessions_ended.labels("held_overflow")._value.get() == 1  # type: ignore[attr-defined]


async def test_a_sub_that_fails_in_any_way_is_still_sent_again(gw: Gateway) -> None:
    from services.errors import SendBufferFull

    replies = iter([SendBufferFull(10, 5), RuntimeError("a bug"), {"op": "ok", "not_owner": [], "last": "not a map"}])
    conn = FakeConn(lambda m: next(replies, None) or ok_sub(m))
    gw.links[OWNER] = FakeLink(conn)  # type: ignore[assignment]
    attach(gw, 1, [("C1", 4)])
    gw.subs.link_up(OWNER)
    gw.schedule_flush(OWNER)
    await until(lambda: gw.subs.channels["C1"].phase is Phase.CONFIRMED, "the sub to be confirmed")
    assert sum(r["op"] == "sub" for r in conn.requests) == 4
