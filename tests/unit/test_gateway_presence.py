"""gateway.presence: reference-counted watches, online counts, Slack's presence_change shapes,
and the batches a gateway sends to its presence servers (against fake links)."""

from __future__ import annotations

import asyncio
import json
from typing import Any

from gateway.presence import FLUSH_INTERVAL_S, GatewayPresence
from gateway.presence_watches import PresenceWatches, presence_events
from gateway.state import Session
from services.ring import RingDocument
from tests.support import FakeClientGateway, FakeConn, FakeLink, FakePresenceGateway, RecordingPresence, Socket


def session(sid: int, user: str = "UA", team: str = "T1") -> Session:
    return Session(sid=sid, user=user, team=team, write=Socket().write)


def events(frames: list[bytes]) -> list[dict[str, Any]]:
    return [json.loads(f) for f in frames]


def test_presence_change_shapes() -> None:
    assert events(presence_events([("U1", "active")])) == [
        {"type": "presence_change", "user": "U1", "presence": "active"}
    ]
    assert events(presence_events([("U1", "away"), ("U2", "active"), ("U3", "away")])) == [
        {"type": "presence_change", "users": ["U1", "U3"], "presence": "away"},
        {"type": "presence_change", "user": "U2", "presence": "active"},
    ]


def test_online_counts_report_first_and_last_connection_only() -> None:
    model = PresenceWatches()
    assert model.connect("U1", "T1") is True
    assert model.connect("U1", "T1") is False
    assert model.online_team == {"U1": "T1"}  # what its online report says of its team
    assert model.disconnect("U1") is False
    assert model.disconnect("U1") is True
    assert model.disconnect("U1") is False and model.online == {} and model.online_team == {}


def test_watches_are_reference_counted() -> None:
    model = PresenceWatches()
    a, b = session(1), session(2)
    first = model.replace(a, ["U1", "U2"])
    assert first.subscribe == ["U1", "U2"] and first.answer == []
    second = model.replace(b, ["U2", "U3"])
    assert second.subscribe == ["U3"] and second.answer == []  # U2 asked for already, not answered yet
    tell = model.apply([("U1", "active"), ("U2", "away"), ("U3", "away")])
    assert tell == {a: [("U1", "active"), ("U2", "away")], b: [("U2", "away"), ("U3", "away")]}
    third = model.replace(session(3), ["U1"])
    assert third.subscribe == [] and third.answer == [("U1", "active")]  # known: answered at once
    assert model.replace(a, ["U2"]).unsubscribe == []  # U1 still watched by session 3
    assert model.drop(b).unsubscribe == ["U3"]
    assert sorted(model.drop(a).unsubscribe) == ["U2"]
    assert set(model.watchers) == {"U1"} and set(model.known) == {"U1"}


def test_changes_reach_only_watchers_and_only_when_different() -> None:
    model = PresenceWatches()
    a, b = session(1), session(2)
    model.replace(a, ["U1"])
    model.replace(b, ["U2"])
    model.apply([("U1", "away"), ("U2", "away")])
    assert model.apply([("U1", "active"), ("U9", "active")]) == {a: [("U1", "active")]}  # nobody watches U9
    assert model.apply([("U1", "active")]) == {}  # a re-sync's state that did not change: silence
    again = model.replace(a, ["U1", "U2"])  # U2: known through b
    assert again.answer == [("U2", "away")] and again.subscribe == []


def test_unwatched_while_waiting_is_not_answered() -> None:
    model = PresenceWatches()
    a = session(1)
    model.replace(a, ["U1"])
    assert model.replace(a, []).unsubscribe == ["U1"]
    assert model.apply([("U1", "active")]) == {}


def test_a_session_is_told_only_of_its_own_teams_users() -> None:
    """Finding 5 (docs/authz-review.md): a user of another team is answered away, at once or
    when the PS answers, and that session hears none of the user's changes; its own team's
    watchers hear them as before."""
    model = PresenceWatches()
    mine, theirs = session(1, team="T1"), session(2, team="T2")
    model.replace(mine, ["U1"])
    model.replace(theirs, ["U1"])
    assert model.apply([("U1", "active")], ["T1"]) == {mine: [("U1", "active")], theirs: [("U1", "away")]}
    assert model.apply([("U1", "away")], ["T1"]) == {mine: [("U1", "away")]}
    assert model.apply([("U1", "active")], [None]) == {mine: [("U1", "active")]}  # the team stays known
    later = session(3, team="T2")
    assert model.replace(later, ["U1"]).answer == [("U1", "away")]  # from what the gateway knows
    teammate = session(4, team="T1")
    assert model.replace(teammate, ["U1"]).answer == [("U1", "active")]
    assert model.presence_for(theirs, "U1") == "away" and model.presence_for(mine, "U1") == "active"
    assert model.withheld == 5
    for gone in (mine, theirs, later):
        model.drop(gone)
    assert model.drop(teammate).unsubscribe == ["U1"] and model.team == {}  # forgotten with the last watch


def test_a_user_whose_team_no_server_said_is_shown_to_every_team() -> None:
    """A rolling upgrade: a PS older than the team field (no ``teams``), or a user reported
    online by an older gateway (nil team), is shown as before the rule, to every team."""
    model = PresenceWatches()
    a, b = session(1, team="T1"), session(2, team="T2")
    model.replace(a, ["U1", "U2"])
    model.replace(b, ["U1", "U2"])
    assert model.apply([("U1", "active")]) == {a: [("U1", "active")], b: [("U1", "active")]}
    assert model.apply([("U2", "active")], [None]) == {a: [("U2", "active")], b: [("U2", "active")]}
    assert model.withheld == 0


# -- GatewayPresence over fake links -----------------------------------------------------------------


async def settle() -> None:
    # wait-ok: the flush is timer-driven by design (at most one per interval); two intervals cover it
    await asyncio.sleep(2 * FLUSH_INTERVAL_S)  # wait-ok


def presence_with_one_server() -> tuple[GatewayPresence, FakeConn]:
    presence = GatewayPresence(FakePresenceGateway())
    presence.follower.ring.update(RingDocument(version=3, slots={"ps-0": "ps-a"}))
    link = FakeLink()
    presence.links["ps-a"] = link  # type: ignore[assignment]
    presence.epoch_of["ps-a"] = 42
    return presence, link.conn


async def test_reports_and_watches_are_batched_per_server() -> None:
    presence, conn = presence_with_one_server()
    tabs = [session(1, "UA"), session(2, "UA"), session(3, "UB")]
    for s in tabs:
        presence.attached(s)
    presence.subscribe(tabs[0], ["U1", "U2"])
    presence.subscribe(tabs[2], ["U2", "U3"])
    await settle()
    assert [(m["op"], sorted(m["users"])) for m in conn.sent] == [
        ("online", ["UA", "UB"]),
        ("psub", ["U1", "U2", "U3"]),
    ]
    assert all(m["epoch"] == 42 and m["gw"] == "gw-test" and m["rv"] == 3 for m in conn.sent)
    assert conn.sent[0]["teams"] == ["T1", "T1"] and "teams" not in conn.sent[1]  # each online user's team
    conn.sent.clear()
    presence.detached(tabs[1])  # UA's second tab: still online, watched nothing
    await settle()
    assert conn.sent == []
    presence.detached(tabs[0])  # UA's last tab: offline; U1 unwatched, U2 still watched by UB's tab
    await settle()
    assert [(m["op"], m["users"]) for m in conn.sent] == [("offline", ["UA"]), ("punsub", ["U1"])]


async def test_pushes_reach_the_watching_sessions_in_slacks_shape() -> None:
    presence, _ = presence_with_one_server()
    sockets = {1: Socket(), 2: Socket()}
    a, b = Session(1, "UA", "T1", sockets[1].write), Session(2, "UB", "T1", sockets[2].write)
    for s in (a, b):
        presence.attached(s)
    presence.subscribe(a, ["U1", "U2"])
    presence.subscribe(b, ["U3"])
    conn = presence.links["ps-a"].conn
    presence.on_push(conn, {"op": "presence", "changes": [["U1", "active"], ["U2", "active"], ["U3", "away"]]})  # type: ignore[arg-type]
    assert sockets[1].events == [{"type": "presence_change", "users": ["U1", "U2"], "presence": "active"}]
    assert sockets[2].events == [{"type": "presence_change", "user": "U3", "presence": "away"}]


async def test_a_stopping_gateway_reports_nobody_offline() -> None:
    presence, conn = presence_with_one_server()
    s = session(1, "UA")
    presence.attached(s)
    await settle()
    conn.sent.clear()
    presence.gw.stopping = True
    presence.detached(s)
    await settle()
    assert conn.sent == []


async def test_a_session_closed_before_attach_changes_nothing() -> None:
    presence, conn = presence_with_one_server()
    presence.attached(session(1, "UA"))
    presence.detached(session(2, "UA"))  # never attached
    await settle()
    assert presence.model.online == {"UA": 1}
    assert [m["op"] for m in conn.sent] == ["online"]


# -- client frames: presence_sub and presence_query reach gateway/presence.py -----------------------


def test_client_presence_frames_are_checked_and_handed_over() -> None:
    from gateway.client_messages import ClientError, ClientMessages

    gw = FakeClientGateway()
    gw.presence = RecordingPresence()
    handler = ClientMessages(gw)
    sock = Socket()
    s = Session(1, "UA", "T1", sock.write)
    handler.handle(None, s, json.dumps({"type": "presence_sub", "ids": ["U1", "U2"]}))  # type: ignore[arg-type]
    handler.handle(None, s, json.dumps({"type": "presence_query", "ids": ["U3"]}))  # type: ignore[arg-type]
    assert gw.presence.calls == [("sub", ["U1", "U2"]), ("query", ["U3"])]
    handler.handle(None, s, json.dumps({"id": 7, "type": "presence_query", "ids": ["U"] * 501}))  # type: ignore[arg-type]
    handler.handle(None, s, json.dumps({"type": "presence_sub", "ids": "U1"}))  # type: ignore[arg-type]
    assert [e["error"]["code"] for e in sock.events] == [ClientError.BAD_IDS, ClientError.BAD_IDS]
    assert sock.events[0]["reply_to"] == 7 and sock.events[1]["type"] == "error"
    assert len(gw.presence.calls) == 2


async def test_a_big_push_is_written_in_slices_and_in_order() -> None:
    from gateway.presence import TELL_SLICE_SESSIONS

    presence, conn = presence_with_one_server()
    sockets = [Socket() for _ in range(TELL_SLICE_SESSIONS + 10)]
    sessions = [Session(i, f"U{i}", "T1", sock.write) for i, sock in enumerate(sockets)]
    for s in sessions:
        presence.attached(s)
        presence.subscribe(s, ["UX"])
    presence.on_push(conn, {"op": "presence", "changes": [["UX", "active"]]})  # type: ignore[arg-type]
    presence.on_push(conn, {"op": "presence", "changes": [["UX", "away"]]})  # type: ignore[arg-type]
    assert sum(len(sock.frames) for sock in sockets) == 0  # too many sessions: written in later turns
    await asyncio.sleep(0)  # wait-ok: one event-loop turn, which is what is under test
    assert sum(len(sock.frames) for sock in sockets) == TELL_SLICE_SESSIONS
    for _ in range(4):
        await asyncio.sleep(0)  # wait-ok: event-loop turns, counted
    assert all([e["presence"] for e in sock.events] == ["active", "away"] for sock in sockets)


class SyncConn(FakeConn):
    """A presence server's connection that grants leases and answers queries from ``answers``."""

    def __init__(self, answers: dict[str, Any] | None = None) -> None:
        super().__init__()
        self.answers = answers or {}

    async def request(self, message: dict[str, Any], timeout_s: float = 5.0) -> dict[str, Any]:
        if message["op"] == "query":
            return dict(self.answers)
        return {"epoch": message.get("epoch", 0), "ttl_s": 5.0}


class QueryLink(FakeLink):
    async def request(self, message: dict[str, Any], timeout_s: float = 5.0) -> dict[str, Any]:
        return await self.conn.request(message, timeout_s)  # type: ignore[no-any-return]


async def test_a_resync_reports_each_online_users_team() -> None:
    presence, _ = presence_with_one_server()
    presence.attached(session(1, "UA", team="T1"))
    presence.attached(session(2, "UB", team="T2"))
    conn = SyncConn()
    await presence.sync("ps-a", conn, "connect")  # type: ignore[arg-type]
    online = next(m for m in conn.sent if m["op"] == "online")
    assert dict(zip(online["users"], online["teams"], strict=True)) == {"UA": "T1", "UB": "T2"}


async def test_pushes_and_queries_tell_a_session_of_another_team_away() -> None:
    presence, _ = presence_with_one_server()
    answers = {"presence": [["U1", "active"], ["U2", "active"]], "teams": ["T1", None], "not_owner": []}
    presence.links["ps-a"] = QueryLink(SyncConn(answers))  # type: ignore[assignment]
    sockets = {1: Socket(), 2: Socket()}
    mine, theirs = Session(1, "UA", "T1", sockets[1].write), Session(2, "UB", "T2", sockets[2].write)
    for s in (mine, theirs):
        presence.gw.state.sessions[s.sid] = s
        presence.attached(s)
        presence.subscribe(s, ["U3"])
    conn = presence.links["ps-a"].conn
    presence.on_push(conn, {"op": "presence", "changes": [["U3", "away"]], "teams": ["T1"]})  # type: ignore[arg-type]
    presence.on_push(conn, {"op": "presence", "changes": [["U3", "active"]], "teams": ["T1"]})  # type: ignore[arg-type]
    assert [e["presence"] for e in sockets[1].events] == ["away", "active"]
    assert [e["presence"] for e in sockets[2].events] == ["away"]  # the answer to its sub; no push after
    for s in (mine, theirs):
        await presence._query(s, [], ["U1", "U2"])
        presence.query(s, ["U3"])  # known here: answered at once
    told = [(e.get("users") or [e["user"]], e["presence"]) for e in sockets[2].events[1:]]
    assert told == [(["U1"], "away"), (["U2"], "active"), (["U3"], "away")]  # U2: team not said (older PS)
    assert [e["presence"] for e in sockets[1].events[2:]] == ["active", "active"]
    assert presence.withheld._value.get() == 4  # the sub's answer, the push, the queries of U1 and U3


async def test_a_query_answer_out_of_shape_is_counted_and_answers_nothing() -> None:
    presence, _ = presence_with_one_server()
    bad = {"presence": [["U1", "active"]], "teams": ["T1", "T2"]}
    presence.links["ps-a"] = QueryLink(SyncConn(bad))  # type: ignore[assignment]
    sock = Socket()
    s = Session(1, "UA", "T2", sock.write)
    presence.gw.state.sessions[s.sid] = s
    presence.attached(s)
    await presence._query(s, [], ["U1"])
    assert sock.events == []
    assert presence.gw.metrics.errors.labels("ps_bad_reply")._value.get() == 1
