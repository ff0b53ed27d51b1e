"""gateway.history: sessions that catch up from the same place share one webapp read, reads page
through long histories, and a gap that cannot be filled ends its sessions with 4010 (through the
gateway's own drain) instead of skipping events or holding them for ever."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
from websockets.protocol import State

from gateway.app import RESUME_TIMEOUT_S, Gateway, build_parser
from gateway.state import Fetch, Session
from services.errors import CloseCode
from tests.support import DEFAULT_WAIT_S, FleetCA, HeldHistoryWebapp, HistoryWebapp, Parts, RecordingWs, Socket


@pytest.fixture
async def parts() -> AsyncIterator[Parts]:
    built = Parts()
    yield built
    await built.close()


async def test_sessions_catching_up_from_the_same_place_share_one_read(parts: Parts) -> None:
    webapp = parts.history.webapp = HeldHistoryWebapp("C1", 8)
    first = Session(sid=1, user="U1", team="T1", write=Socket().write)
    parts.state.attach(first, [("C1", 8)])
    sockets = [Socket() for _ in range(5)]
    sessions = [Session(sid=10 + i, user=f"U{10 + i}", team="T1", write=s.write) for i, s in enumerate(sockets)]
    fetches = [parts.state.attach(s, [("C1", 3)]).fetch[0] for s in sessions]  # each behind the cursor: held
    assert all(f == Fetch("C1", 3, 8, s) for f, s in zip(fetches, sessions, strict=False))
    history = parts.history
    pending = [asyncio.ensure_future(history.fetch_history(f)) for f in fetches]
    other = asyncio.ensure_future(history.fetch_history(Fetch("C1", 5, 8, None)))  # a different range reads apart
    for _ in range(3):
        await asyncio.sleep(0)  # wait-ok: let every fetch reach the webapp or join a read in flight
    assert [c["after_seq"] for c in webapp.calls] == [3, 5]
    webapp.release.set()
    await asyncio.wait_for(asyncio.gather(*pending, other), 5.0)
    for sock in sockets:  # each session got 4..8 once, in order
        assert sock.seqs() == [4, 5, 6, 7, 8]
    assert history.history_reads == {}
    assert history.shared_history_reads._value.get() == 4  # type: ignore[attr-defined]


async def test_a_read_pages_through_long_histories(parts: Parts, monkeypatch: Any) -> None:
    import gateway.history

    monkeypatch.setattr(gateway.history, "HISTORY_PAGE_EVENTS", 3)
    webapp = parts.history.webapp = HeldHistoryWebapp("C1", 10)
    webapp.release.set()
    events, ctls = await parts.history.read_history("C1", 2, 9)
    assert ctls == []
    assert [seq for seq, _ in events] == list(range(3, 10))
    assert [c["after_seq"] for c in webapp.calls] == [2, 5, 8]


# -- sessions ended with 4010, through the gateway's drain (never started: no sockets) ----------------


@pytest.fixture
async def gw(fleet_ca: FleetCA) -> AsyncIterator[Gateway]:
    args = ["--secret", "s", "--instance-id", "gw-test", "--gap-fill-budget-s", "0.6", "--max-gap-fill-attempts", "3"]
    args += fleet_ca.flags("gateway", "gw-test")
    gateway = Gateway(build_parser().parse_args(args))
    yield gateway
    gateway.channel_links.stop_retries()
    for task in list(gateway.tasks):
        task.cancel()
    await asyncio.gather(*gateway.tasks, return_exceptions=True)
    await gateway.discovery.close()


def attach(gw: Gateway, sid: int, channels: list[tuple[str, int]]) -> tuple[Session, Socket, RecordingWs]:
    sock, ws = Socket(), RecordingWs()
    session = Session(sid=sid, user=f"U{sid}", team="T1", write=sock.write)
    gw.sockets[sid] = ws  # type: ignore[assignment]
    gw.apply(gw.state.attach(session, channels))
    return session, sock, ws


async def until(predicate: Any, what: str) -> None:
    deadline = asyncio.get_running_loop().time() + DEFAULT_WAIT_S
    while not predicate():
        assert asyncio.get_running_loop().time() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.01)  # wait-ok: bounded poll of the gateway's tasks


@pytest.mark.parametrize("failure", ["webapp_down", "malformed_history"])
async def test_an_unfillable_gap_ends_its_sessions_with_4010_and_holds_nothing(gw: Gateway, failure: str) -> None:
    if failure == "webapp_down":
        webapp = HistoryWebapp(lambda body: ConnectionError("webapp down"))
    else:
        webapp = HistoryWebapp(lambda body: {"events": [{"no-seq": 1}], "has_more": False})  # a fill that raises
    gw.history.webapp = webapp
    gw.webapp = webapp  # type: ignore[assignment]  # resume records
    s1, sock1, ws1 = attach(gw, 1, [("C1", 3), ("C9", 0)])
    s2, sock2, ws2 = attach(gw, 2, [("C1", 3)])
    _, sock3, ws3 = attach(gw, 3, [("C9", 0)])  # not in the gap's channel: untouched
    fetch = gw.state.deliver("C1", 6, json.dumps({"seq": 6}).encode())  # 4 and 5 never came
    assert fetch == Fetch("C1", 3, 5)
    await gw.history.fetch_history(fetch)
    await until(lambda: ws1.closed and ws2.closed, "both sessions of C1 closed")
    assert ws1.closed == [CloseCode.RESYNC] and ws2.closed == [CloseCode.RESYNC]
    assert ws1.sent == [] and ws3.closed == []  # the webapp refused the resume records: no goodbye
    assert sock1.frames == [] and sock2.frames == []  # nothing skipped ahead
    assert "C1" not in gw.state.gaps and "C1" not in gw.state.channels  # held nowhere
    assert gw.state.sessions.keys() == {3}
    assert gw.history.sessions_ended.labels("gap_unfilled")._value.get() == 2  # type: ignore[attr-defined]
    resumes = [body for path, body in webapp.calls if path == "/internal/resume"]
    assert {tuple(sorted(r["channels"].items())) for r in resumes} == {(("C1", 3), ("C9", 0)), (("C1", 3),)}
    if failure == "webapp_down":
        assert len([c for c in webapp.calls if c[0] == "/internal/history"]) <= 3  # --max-gap-fill-attempts


async def test_a_held_session_whose_catch_up_fails_is_ended_alone(gw: Gateway) -> None:
    gw.history.webapp = gw.webapp = HistoryWebapp(lambda body: ConnectionError("webapp down"))  # type: ignore[assignment]
    _, sock1, ws1 = attach(gw, 1, [("C1", 0)])
    for n in (1, 2, 3):
        gw.state.deliver("C1", n, json.dumps({"seq": n}).encode())
    s2, sock2, ws2 = attach(gw, 2, [("C1", 1)])  # behind: held while (1, 3] is read
    await until(lambda: ws2.closed, "the held session closed")
    assert ws2.closed == [CloseCode.RESYNC] and ws1.closed == []
    assert sock1.seqs() == [1, 2, 3] and sock2.frames == []
    assert gw.state.sessions.keys() == {1}


async def test_a_session_moved_before_it_reached_a_leave_carries_it_in_its_resume_record(gw: Gateway) -> None:
    webapp = ResumeWebapp()
    gw.webapp = webapp  # type: ignore[assignment]  # resume records
    s1, _, ws1 = attach(gw, 1, [("U1", 10), ("C7", 5)])
    s1.token_id = "tid-1"  # from its ticket: the record is claimed by that token only
    gw.apply(gw.state.leave("U1", "C7", upto=7, at=11))  # C7 has not reached the leave here yet
    where = gw.mover.detach(s1)
    await gw.mover.finish(s1, where, "test", asyncio.Semaphore(1))
    resumes = [body for path, body in webapp.calls if path == "/internal/resume"]
    assert [{k: v for k, v in r.items() if k != "deadline"} for r in resumes] == [
        {"user": "U1", "token_id": "tid-1", "channels": {"U1": 10, "C7": 5}, "until": {"C7": 7}}
    ]
    assert all(time.time() < r["deadline"] <= time.time() + RESUME_TIMEOUT_S for r in resumes)
    assert ws1.closed == [CloseCode.GOING_AWAY] and gw.mover.pending_leaves == {}


# -- a move whose resume record the webapp does not take (docs/soak.md, Findings) ------------------


class ResumeWebapp:
    """``/internal/resume`` taken, or failing with ``error`` (a timeout: the webapp too slow to answer)."""

    def __init__(self, error: BaseException | None = None, on_resume: Any = None) -> None:
        self.error = error
        self.on_resume = on_resume  # called while the record is being left (the client closes then)
        self.calls: list[tuple[str, dict[str, Any]]] = []

    async def call(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        self.calls.append((path, body))
        if path == "/internal/resume/withdraw":
            return {"ok": True, "withdrawn": True}
        assert path == "/internal/resume"
        if self.on_resume is not None:
            self.on_resume()
        if self.error is not None:
            raise self.error
        return {"ok": True, "resume": f"r{len(self.calls)}"}

    async def close(self) -> None:
        pass


async def test_a_moved_session_whose_resume_record_was_taken_gets_goodbye_and_1001(gw: Gateway) -> None:
    gw.webapp = ResumeWebapp()  # type: ignore[assignment]
    _, _, ws = attach(gw, 1, [("C1", 3)])
    assert await gw.mover.move_all(1000.0, "region drained") == 1
    assert ws.sent == ['{"type":"goodbye"}'] and ws.closed == [CloseCode.GOING_AWAY]
    assert gw.mover.resume_failures._value.get() == 0  # type: ignore[attr-defined]


@pytest.mark.parametrize("how", ["socket_gone", "close_frame_arrived"])
async def test_a_moved_session_whose_client_closed_before_goodbye_has_its_record_withdrawn(
    gw: Gateway, how: str
) -> None:
    """The client closed its socket itself while the record was being left (a reconnect of its
    own, docs/soak.md, Findings): it never gets the goodbye and starts fresh, so its record is
    withdrawn; left pending, its token's next move would claim it and replay old events."""
    sockets = gw.sockets

    def client_closes() -> None:
        if how == "socket_gone":  # the handler saw the close and forgot the socket
            sockets.pop(1, None)
        else:  # its close frame was read: the websocket is closing
            ws.state = State.CLOSING

    webapp = ResumeWebapp(on_resume=client_closes)
    gw.webapp = webapp  # type: ignore[assignment]
    session, _, ws = attach(gw, 1, [("C1", 3)])
    session.token_id = "tid-1"
    assert await gw.mover.move_all(1000.0, "region drained") == 1
    assert ws.sent == []  # no goodbye
    assert [(p, b) for p, b in webapp.calls if p != "/internal/resume"] == [
        ("/internal/resume/withdraw", {"user": "U1", "resume": "r1"})
    ]
    assert gw.mover.goodbye_missed._value.get() == 1  # type: ignore[attr-defined]
    assert gw.mover.resume_failures._value.get() == 0  # type: ignore[attr-defined]


async def test_a_record_whose_withdrawal_fails_is_retried_then_counted(gw: Gateway, monkeypatch: Any) -> None:
    import gateway.app

    monkeypatch.setattr(gateway.app, "RESUME_WITHDRAW_RETRY_S", 0.0)
    calls: list[str] = []

    class DownAfterResume:
        async def call(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
            calls.append(path)
            if path == "/internal/resume":
                return {"ok": True, "resume": "r1"}
            raise ConnectionError("webapp down")

    gw.webapp = DownAfterResume()  # type: ignore[assignment]
    attach(gw, 1, [("C1", 3)])
    assert not await gw.withdraw_resume("U1", "r1")
    assert calls == ["/internal/resume/withdraw"] * gateway.app.MAX_RESUME_WITHDRAW_ATTEMPTS
    assert gw.metrics.errors.labels("resume_withdraw_failed")._value.get() == 1  # type: ignore[attr-defined]


async def test_a_moved_session_whose_resume_record_was_not_taken_gets_no_goodbye(gw: Gateway) -> None:
    """The webapp did not take the record in time: the new connection would start at a fresh
    bootstrap, so the client must not be told it resumes (goodbye); 4010 sends it through
    the normal catch-up instead, and nothing is skipped silently."""
    gw.webapp = ResumeWebapp(TimeoutError())  # type: ignore[assignment]
    _, _, ws = attach(gw, 1, [("C1", 3)])
    assert await gw.mover.move_all(1000.0, "region drained") == 1
    assert ws.sent == [] and ws.closed == [CloseCode.RESYNC]
    assert gw.mover.resume_failures._value.get() == 1  # type: ignore[attr-defined]
    assert gw.state.sessions == {}


async def test_a_revoke_read_in_a_sessions_own_catch_up_ends_that_session(parts: Parts) -> None:
    """A session that attached behind its user channel's cursor catches up from history; the revoke
    of its token is among what it reads: it is ended (end_revoked), after the events before it.
    A session of the user's other token, catching up the same way, is not."""
    leaked, own = "a" * 32, "b" * 32
    revoke = json.dumps({"type": "tokens_revoked", "tokens": {"oauth": ["U1"]}})
    events = [
        {"seq": 5, "json": json.dumps({"type": "message", "seq": 5})},
        {"seq": 6, "json": revoke, "ctl": {"revoke": leaked}},
    ]
    parts.history.webapp = HistoryWebapp(lambda body: {"ok": True, "events": events, "has_more": False})
    first = Session(sid=1, user="U1", team="T1", write=Socket().write)
    parts.state.attach(first, [("U1", 4)])
    parts.state.deliver("U1", 5, b'{"seq":5}')
    parts.state.deliver("U1", 6, revoke.encode())  # the gateway's cursor is past the revoke
    socks = {tid: Socket() for tid in (leaked, own)}
    for sid, tid in ((2, leaked), (3, own)):
        late = Session(sid=sid, user="U1", team="T1", write=socks[tid].write, token_id=tid)
        fetch = parts.state.attach(late, [("U1", 4)]).fetch[0]  # behind the cursor: held, caught up
        await asyncio.wait_for(parts.history.fetch_history(fetch), DEFAULT_WAIT_S)
    assert parts.revoked == [2]
    assert [e["type"] for e in socks[leaked].events] == ["message", "tokens_revoked"]
    assert [e["type"] for e in socks[own].events] == ["message", "tokens_revoked"]
