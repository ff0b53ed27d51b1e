"""gateway.channel_links: the asyncio layer around the subscriptions, as one unit with fake links
and a fake webapp (tests.support.Parts, no sockets): a failed sub is sent again, reconciliation
repairs, events pushed over a link fan out, held events past their bound end their sessions."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import pytest

from gateway.app_events import AppProfile, app_events
from gateway.state import Session, _payload_of
from gateway.subscriptions import Phase
from services.app_event_names import APP_EVENTS
from services.errors import RequestTimeout, SendBufferFull
from services.ring import RingDocument
from tests.support import DEFAULT_WAIT_S, FakeLink, HistoryWebapp, Parts, ScriptedConn, Socket

OWNER = "cs-inst-0"


def ok_sub(message: dict[str, Any]) -> dict[str, Any]:
    return {"op": "ok", "not_owner": [], "last": {}}


@pytest.fixture
async def parts() -> AsyncIterator[Parts]:
    built = Parts()
    built.links.follower.ring.update(RingDocument(version=1, slots={"cs-0": OWNER}))
    built.links.links[OWNER] = FakeLink(ScriptedConn(ok_sub))  # never connected: no batches
    yield built
    await built.close()


def attach(parts: Parts, sid: int, channels: list[tuple[str, int]]) -> tuple[Session, Socket]:
    sock = Socket()
    session = Session(sid=sid, user=f"U{sid}", team="T1", write=sock.write)
    parts.links.apply(parts.state.attach(session, channels))
    return session, sock


async def until(predicate: Any, what: str) -> None:
    deadline = asyncio.get_running_loop().time() + DEFAULT_WAIT_S
    while not predicate():
        assert asyncio.get_running_loop().time() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.01)  # wait-ok: bounded poll of the links' tasks


def connect(parts: Parts, answer: Any) -> ScriptedConn:
    """The link to OWNER (re)connects: what its on_connected does, the first connect included."""
    conn = ScriptedConn(answer)
    parts.links.links[OWNER] = FakeLink(conn)
    parts.links.subs.link_up(OWNER)
    parts.links.schedule_flush(OWNER)
    return conn


async def test_a_timed_out_sub_is_sent_again_until_it_is_answered(parts: Parts) -> None:
    links = parts.links
    replies = iter([RequestTimeout("no reply"), RequestTimeout("no reply")])
    attach(parts, 1, [("C1", 4)])
    assert links.subs.channels["C1"].phase is Phase.PENDING  # the link has not connected yet
    conn = connect(parts, lambda m: next(replies, None) or ok_sub(m))
    await until(lambda: links.subs.channels["C1"].phase is Phase.CONFIRMED, "the sub to be confirmed")
    subs = [r for r in conn.requests if r["op"] == "sub"]
    assert len(subs) == 3 and all(r["chans"] == [["C1", 4]] for r in subs)
    assert links.sub_retries._value.get() == 2  # type: ignore[attr-defined]


async def test_a_sub_that_fails_in_any_way_is_still_sent_again(parts: Parts) -> None:
    replies = iter([SendBufferFull(10, 5), RuntimeError("a bug"), {"op": "ok", "not_owner": [], "last": "not a map"}])
    attach(parts, 1, [("C1", 4)])
    conn = connect(parts, lambda m: next(replies, None) or ok_sub(m))
    await until(lambda: parts.links.subs.channels["C1"].phase is Phase.CONFIRMED, "the sub to be confirmed")
    assert sum(r["op"] == "sub" for r in conn.requests) == 4


async def test_reconciliation_resubscribes_what_the_server_lost_and_fills_what_we_missed(parts: Parts) -> None:
    links = parts.links

    def answer(message: dict[str, Any]) -> dict[str, Any]:
        if message["op"] == "seqs":
            return {"op": "ok", "last": {"C1": 7, "C2": 3}, "missing": ["C2"], "not_owner": []}
        return ok_sub(message)

    last = {"C1": 7, "C2": 3}  # the webapp's history: C2 has nothing after 3

    def history(body: dict[str, Any]) -> dict[str, Any]:
        seqs = range(body["after_seq"] + 1, last[body["channel"]] + 1)
        return {"events": [{"seq": n, "json": json.dumps({"seq": n})} for n in seqs], "has_more": False}

    parts.history.webapp = HistoryWebapp(history)
    _, sock = attach(parts, 1, [("C1", 5), ("C2", 3)])
    conn = connect(parts, answer)
    await until(lambda: links.subs.count(Phase.CONFIRMED) == 2, "both subs confirmed")
    await links.reconcile(OWNER)
    await until(lambda: sock.seqs() == [6, 7], "C1's missed events 6 and 7 from the webapp")
    await until(lambda: sum(r["op"] == "sub" and ["C2", 3] in r["chans"] for r in conn.requests) == 2, "C2 again")
    assert links.repairs.labels("gap")._value.get() == 1  # type: ignore[attr-defined]
    assert links.repairs.labels("resubscribe")._value.get() == 1  # type: ignore[attr-defined]


async def test_pushed_events_fan_out_in_order(parts: Parts) -> None:
    conn = ScriptedConn(ok_sub)
    _, sock1 = attach(parts, 1, [("C1", 0)])
    _, sock2 = attach(parts, 2, [("C1", 0), ("C2", 0)])
    for ch, n in (("C1", 1), ("C2", 1), ("C1", 2)):
        parts.links.on_push(conn, {"op": "ev", "ch": ch, "seq": n, "json": json.dumps({"seq": n}).encode(), "t0": 1.0})  # type: ignore[arg-type]
    assert sock1.seqs() == [1, 2] and sock2.seqs() == [1, 1, 2]
    assert parts.links.persisted_in._value.get() == 3  # type: ignore[attr-defined]


async def test_a_ring_change_resubscribes_at_the_new_owner(parts: Parts) -> None:
    links = parts.links
    attach(parts, 1, [("C1", 4)])
    connect(parts, ok_sub)
    await until(lambda: links.subs.channels["C1"].phase is Phase.CONFIRMED, "the sub to be confirmed")
    new_owner = "cs-inst-1"
    conn = ScriptedConn(ok_sub)
    links.links[new_owner] = FakeLink(conn)  # type: ignore[assignment]
    old = links.follower.ring.doc
    links.follower.ring.update(RingDocument(version=2, slots={"cs-0": new_owner}))
    links.on_ring_change(old, links.follower.ring.doc)
    links.subs.link_up(new_owner)
    links.schedule_flush(new_owner)
    await until(lambda: any(r["op"] == "sub" for r in conn.requests), "the sub at the new owner")
    assert links.resubscribes._value.get() >= 1  # type: ignore[attr-defined]


async def test_held_events_past_the_bound_end_the_sessions(parts: Parts) -> None:
    parts.state.max_held_per_channel = 5
    parts.history.webapp = HistoryWebapp(lambda body: ConnectionError("slow"))
    _, sock = attach(parts, 1, [("C1", 1)])
    conn = ScriptedConn(ok_sub)
    fetch = parts.state.deliver("C1", 3, b'{"seq":3}')
    assert fetch is not None
    for n in range(4, 10):
        parts.links.on_push(
            conn, {"op": "ev", "ch": "C1", "seq": n, "json": json.dumps({"seq": n}).encode(), "t0": 1.0}
        )  # type: ignore[arg-type]
    await until(lambda: parts.ended, "the session ended")
    assert parts.ended == [(1, "held_overflow")] and sock.frames == []
    assert parts.history.sessions_ended.labels("held_overflow")._value.get() == 1  # type: ignore[attr-defined]


async def test_a_revoke_on_the_user_channel_ends_that_tokens_sessions_and_no_other(parts: Parts) -> None:
    """auth.revoke's event on U1's channel (ctl revoke = the token's id): U1's session opened with that
    token gets the ``tokens_revoked`` event and is closed (end_revoked); U1's session of another token
    keeps receiving, also the later events of a shared channel."""
    conn = ScriptedConn(ok_sub)
    leaked, own = "a" * 32, "b" * 32
    thief_sock, mine_sock = Socket(), Socket()
    thief = Session(sid=1, user="U1", team="T1", write=thief_sock.write, token_id=leaked)
    mine = Session(sid=2, user="U1", team="T1", write=mine_sock.write, token_id=own)
    for session in (thief, mine):
        parts.links.apply(parts.state.attach(session, [("U1", 4), ("C1", 0)]))
    revoke = json.dumps({"type": "tokens_revoked", "tokens": {"oauth": ["U1"]}}).encode()
    parts.links.on_push(conn, {"op": "ev", "ch": "U1", "seq": 5, "json": revoke, "t0": 1.0, "ctl": {"revoke": leaked}})  # type: ignore[arg-type]
    assert parts.revoked == [1]
    assert [e["type"] for e in thief_sock.events] == ["tokens_revoked"]  # then it is closed
    parts.links.on_push(
        conn, {"op": "ev", "ch": "U1", "seq": 6, "json": revoke, "t0": 1.0, "ctl": {"revoke": "c" * 32}}
    )  # type: ignore[arg-type]
    assert parts.revoked == [1]  # another token of U1: nobody here
    parts.links.on_push(conn, {"op": "ev", "ch": "C1", "seq": 1, "json": b'{"type":"message"}', "t0": 1.0})  # type: ignore[arg-type]
    assert [e["type"] for e in mine_sock.events] == ["tokens_revoked", "tokens_revoked", "message"]


async def test_a_revoke_of_an_apps_bot_token_ends_the_bots_rtm_session_and_tells_the_app(parts: Parts) -> None:
    """auth.revoke of an app's bot token (ctl revoke = its id) on the bot's user channel: the bot's RTM
    session of that token is ended; the app's Socket Mode session of the same bot user (opened with
    the app-level token: no token id) is not, its app gets Slack's ``tokens_revoked`` (and nothing
    of the ctl), and it keeps receiving the bot's events (docs/socket-mode.md)."""
    conn = ScriptedConn(ok_sub)
    leaked = "a" * 32
    profile = AppProfile("A1", "T1", "UBOT", frozenset(APP_EVENTS))
    told: list[dict[str, Any]] = []

    def app_write(frame: bytes) -> bool:  # what gateway/socket_mode.py's session write maps
        told.extend(app_events(profile, json.loads(_payload_of(frame))))
        return True

    app = Session(sid=1, user="UBOT", team="T1", write=app_write)
    rtm_sock = Socket()
    rtm = Session(sid=2, user="UBOT", team="T1", write=rtm_sock.write, token_id=leaked)
    for session in (app, rtm):
        parts.links.apply(parts.state.attach(session, [("UBOT", 4), ("C1", 0)]))
    revoke = json.dumps({"type": "tokens_revoked", "tokens": {"bot": ["UBOT"]}}).encode()
    parts.links.on_push(
        conn, {"op": "ev", "ch": "UBOT", "seq": 5, "json": revoke, "t0": 1.0, "ctl": {"revoke": leaked}}
    )  # type: ignore[arg-type]
    assert parts.revoked == [2]  # the RTM session only
    assert told == [{"type": "tokens_revoked", "tokens": {"bot": ["UBOT"]}}]
    message = json.dumps({"type": "message", "channel": "C1", "user": "U1", "text": "after", "ts": "1.2"}).encode()
    parts.links.on_push(conn, {"op": "ev", "ch": "C1", "seq": 1, "json": message, "t0": 1.0})  # type: ignore[arg-type]
    assert [e["type"] for e in told] == ["tokens_revoked", "message"] and app.sid in parts.state.sessions
