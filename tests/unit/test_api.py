"""webapp_stub.api: WebApi.answer_now (the lean front's call without a task) answers only once
its writes are committed, exactly as WebApi.answer does, and counts every outcome."""

from __future__ import annotations

import asyncio
import json
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

import webapp_stub.methods  # noqa: F401  (registers the methods)
from services.metrics import ServiceMetrics
from tests.support import async_wait_until
from webapp_stub.api import Answer, WebApi
from webapp_stub.commit import CommitFailed, GroupCommit
from webapp_stub.errors import ApiError
from webapp_stub.gateway_picker import GatewayPicker
from webapp_stub.handoff import Handoff
from webapp_stub.internal import InternalEndpoints
from webapp_stub.models import Event
from webapp_stub.resume import token_id
from webapp_stub.seed import seed_demo
from webapp_stub.store import Store


class Outbox:
    saturated = False

    def __init__(self) -> None:
        self.published: list[Event] = []

    def publish(self, events: list[Event]) -> None:
        self.published.extend(events)


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    s = Store(str(tmp_path))
    yield s
    s.close()


def make_api(store: Store) -> tuple[WebApi, Outbox, dict[str, Any]]:
    demo = seed_demo(store)
    outbox = Outbox()
    api = WebApi(store, outbox, GatewayPicker(None), ServiceMetrics("webapp", "t"), secret=b"s" * 32)  # type: ignore[arg-type]
    api.commits = GroupCommit(store, outbox)
    return api, outbox, demo


def requests(api: WebApi, outcome: str) -> float:
    value = api.metrics.registry.get_sample_value(
        "rtm_webapp_requests_total", {"method": "chat.postMessage", "outcome": outcome}
    )
    return value or 0.0


def errors(api: WebApi, kind: str) -> float:
    return api.metrics.registry.get_sample_value("rtm_errors_total", {"kind": kind}) or 0.0


async def test_a_post_is_answered_only_after_its_commit(store: Store) -> None:
    api, outbox, demo = make_api(store)
    token, channel = demo["users"][0]["token"], demo["channels"][0]["id"]
    answers: list[Answer] = []
    waiting = [
        api.answer_now("chat.postMessage", {"channel": channel, "text": f"hi {i}"}, lambda a: token, answers.append)
        for i in range(3)
    ]
    assert all(w is not None for w in waiting) and answers == []  # one open batch, not committed
    peek = Store(store.path)
    assert peek.last_seq(channel) == 0
    await asyncio.gather(*(w for w in waiting if w is not None))
    await asyncio.sleep(0)  # wait-ok: the done callbacks run on the next loop turn
    assert peek.last_seq(channel) == 3  # committed before anyone was answered
    peek.close()
    assert [a[0] for a in answers] == [200] * 3
    replies = [json.loads(a[3] or "") for a in answers]
    assert [r["ok"] for r in replies] == [True] * 3 and [r["message"]["text"] for r in replies] == [
        "hi 0",
        "hi 1",
        "hi 2",
    ]
    assert [e.seq for e in outbox.published] == [1, 2, 3]
    assert requests(api, "ok") == 3


async def test_bad_input_is_answered_at_once_with_slacks_error_and_counted(store: Store) -> None:
    api, outbox, demo = make_api(store)
    token, channel = demo["users"][0]["token"], demo["channels"][0]["id"]
    answers: list[Answer] = []
    api.answer_now("chat.postMessage", ApiError("invalid_json"), lambda a: token, answers.append)
    api.answer_now("chat.postMessage", {"channel": channel, "text": "x"}, lambda a: None, answers.append)
    api.answer_now("chat.postMessage", {"channel": channel, "text": "x"}, lambda a: "xoxp-nope", answers.append)
    api.answer_now("chat.postMessage", {"channel": "C0NOPE", "text": "x"}, lambda a: token, answers.append)
    assert [a[2] for a in answers] == [
        {"ok": False, "error": code} for code in ("invalid_json", "not_authed", "invalid_auth", "channel_not_found")
    ]
    for code in ("invalid_json", "not_authed", "invalid_auth", "channel_not_found"):
        assert requests(api, code) == 1 and errors(api, code) == 1
    # the same as WebApi.answer gives for the same input
    same = await api.answer("chat.postMessage", None, {"channel": "C0NOPE", "text": "x"}, lambda a: token)
    assert same == answers[-1]
    assert outbox.published == []


async def test_a_failed_commit_answers_internal_error_and_publishes_nothing(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    api, outbox, demo = make_api(store)
    token, channel = demo["users"][0]["token"], demo["channels"][0]["id"]
    answers: list[Answer] = []
    waiting = api.answer_now("chat.postMessage", {"channel": channel, "text": "lost"}, lambda a: token, answers.append)
    assert waiting is not None

    def fail() -> None:
        store.conn.execute("ROLLBACK")
        store._in_batch = False
        raise sqlite3.OperationalError("disk I/O error")

    monkeypatch.setattr(store, "commit_batch", fail)
    with pytest.raises(CommitFailed):
        await waiting
    await asyncio.sleep(0)  # wait-ok: the done callback runs on the next loop turn
    assert answers == [(200, {}, {"ok": False, "error": "internal_error"}, None)]
    assert requests(api, "internal_error") == 1 and errors(api, "internal_error") == 1
    assert outbox.published == [] and store.last_seq(channel) == 0


async def test_an_async_method_through_answer_now_answers_as_answer_does_once_committed(store: Store) -> None:
    """answer_now's task for an async handler (users.setPresence): the same answers as answer,
    success and failure, the write committed before the answer, every outcome counted."""
    api, outbox, demo = make_api(store)
    alice, bob = demo["users"][0], demo["users"][1]
    answers: list[Answer] = []
    waiting = api.answer_now("users.setPresence", {"presence": "away"}, lambda a: alice["token"], answers.append)
    assert isinstance(waiting, asyncio.Task) and answers == []
    await waiting
    await asyncio.sleep(0)  # wait-ok: the done callback runs on the next loop turn
    peek = Store(store.path)
    assert peek.conn.execute("SELECT presence FROM users WHERE id = ?", (alice["id"],)).fetchone()[0] == "away"
    peek.close()
    same = await api.answer("users.setPresence", None, {"presence": "away"}, lambda a: bob["token"])
    assert answers == [same] == [(200, {}, {"ok": True}, None)]
    failed = api.answer_now("users.setPresence", {"presence": "asleep"}, lambda a: alice["token"], answers.append)
    assert failed is not None
    await failed
    await asyncio.sleep(0)  # wait-ok: the done callback runs on the next loop turn
    same = await api.answer("users.setPresence", None, {"presence": "asleep"}, lambda a: bob["token"])
    assert answers[1:] == [same] == [(200, {}, {"ok": False, "error": "invalid_presence"}, None)]
    counted = api.metrics.registry.get_sample_value
    assert counted("rtm_webapp_requests_total", {"method": "users.setPresence", "outcome": "ok"}) == 2
    assert counted("rtm_webapp_requests_total", {"method": "users.setPresence", "outcome": "invalid_presence"}) == 2
    assert [json.loads(e.json)["type"] for e in outbox.published] == ["manual_presence_change"] * 2


async def test_an_async_call_is_answered_even_when_the_commit_it_waits_for_fails(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An async call that failed waits for the batch it shares with another write; when that
    commit fails too, answer_now's caller still gets its one answer (internal_error)."""
    api, _, demo = make_api(store)
    assert api.commits is not None
    api.commits.window_s = 0.05  # the batch stays open until the async call waits for it
    alice, channel = demo["users"][0], demo["channels"][0]["id"]
    answers: list[Answer] = []
    posted = api.answer_now("chat.postMessage", {"channel": channel, "text": "x"}, lambda a: alice["token"], [].append)
    assert posted is not None  # a batch is open
    failed = api.answer_now("users.setPresence", {"presence": "asleep"}, lambda a: alice["token"], answers.append)
    assert isinstance(failed, asyncio.Task)

    def fail() -> None:
        store.conn.execute("ROLLBACK")
        store._in_batch = False
        raise sqlite3.OperationalError("disk I/O error")

    monkeypatch.setattr(store, "commit_batch", fail)
    await asyncio.wait({failed}, timeout=5.0)
    await asyncio.sleep(0)  # wait-ok: the done callback runs on the next loop turn
    assert answers == [(200, {}, {"ok": False, "error": "internal_error"}, None)]

    # aiohttp's path (WebApi.answer) answers the same instead of raising out (an HTTP 500)
    monkeypatch.undo()
    posted = api.answer_now("chat.postMessage", {"channel": channel, "text": "y"}, lambda a: alice["token"], [].append)
    assert posted is not None
    monkeypatch.setattr(store, "commit_batch", fail)
    answered = await asyncio.wait_for(
        api.answer("users.setPresence", None, {"presence": "asleep"}, lambda a: alice["token"]), 5.0
    )
    assert answered == (200, {}, {"ok": False, "error": "internal_error"}, None)


async def test_an_unknown_method_is_refused_before_its_arguments_are_read(store: Store) -> None:
    """unknown_method whatever the body (answer never reads it); a known method's unreadable
    arguments are its error, before auth; answer_now agrees."""
    api, _, demo = make_api(store)
    token = demo["users"][0]["token"]
    reads: list[str] = []

    async def unreadable() -> dict[str, Any]:
        reads.append("read")
        raise ApiError("invalid_json")

    unknown = await api.answer("no.such.method", None, unreadable, lambda a: token)
    assert unknown[2] == {"ok": False, "error": "unknown_method"} and reads == []
    assert (await api.answer("chat.postMessage", None, unreadable, lambda a: None))[2] == {
        "ok": False,
        "error": "invalid_json",
    }
    assert reads == ["read"]
    answers: list[Answer] = []
    api.answer_now("no.such.method", ApiError("invalid_json"), lambda a: token, answers.append)
    api.answer_now("chat.postMessage", ApiError("invalid_json"), lambda a: None, answers.append)
    assert [a[2]["error"] for a in answers] == ["unknown_method", "invalid_json"]
    counted = api.metrics.registry.get_sample_value
    assert counted("rtm_webapp_requests_total", {"method": "unknown", "outcome": "unknown_method"}) == 2


# -- /internal/ (webapp_stub/internal.py): the same answer for a failed commit ----------------
async def test_a_failed_commit_is_answered_internal_error_not_a_bare_500(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    api, outbox, demo = make_api(store)
    alice, channel = demo["users"][0]["id"], demo["channels"][0]["id"]
    app = web.Application()
    app.add_routes(InternalEndpoints(api, check_callers=False).routes())

    def fail() -> None:
        store.conn.execute("ROLLBACK")
        store._in_batch = False
        raise sqlite3.OperationalError("disk I/O error")

    async with TestClient(TestServer(app, host="127.0.0.1")) as client:
        monkeypatch.setattr(store, "commit_batch", fail)
        reply = await client.post(
            "/internal/call/chat.postMessage",
            json={"user": alice, "token_id": token_id(demo["users"][0]["token"]), "channel": channel, "text": "x"},
        )
        assert reply.status == 200
        assert await reply.json() == {"ok": False, "error": "internal_error"}
    assert errors(api, "internal_error") == 1
    assert api.metrics.registry.get_sample_value(
        "rtm_webapp_requests_total", {"method": "internal.chat.postMessage", "outcome": "internal_error"}
    )
    assert outbox.published == [] and store.last_seq(channel) == 0


class UnusedSender:
    """The hand-off's sender in a test whose Handoff is never started: nothing is sent."""

    connected = False

    async def ready(self, timeout_s: float) -> bool:
        return False

    def send(self, message: dict[str, Any], timeout_s: float) -> Any:
        raise AssertionError("the hand-off was not started")

    def failed(self, error: BaseException) -> None:
        pass

    async def close(self) -> None:
        pass


async def test_auth_revoke_whose_commit_fails_is_answered_internal_error_and_the_token_still_works(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    """auth.revoke's DELETE rides in a group commit like any write: if that commit fails the token
    was never revoked, so the caller (ending a leaked token) must hear internal_error, never
    ``"revoked": true`` (commit.py's contract: nothing of a failed batch is acknowledged); the
    token's resume records stay, and no fan-out waiter is left behind."""
    demo = seed_demo(store)
    handoff = Handoff(UnusedSender())
    api = WebApi(store, handoff, GatewayPicker(None), ServiceMetrics("webapp", "t"), secret=b"s" * 32)
    api.commits = GroupCommit(store, handoff)
    api.revoke_fanout_wait_s = 0.2  # the event never reaches the (unstarted) hand-off's admin server
    dave = demo["users"][0]
    rid = api.resume.add(dave["id"], {demo["channels"][0]["id"]: 0}, token_id=token_id(dave["token"]))
    await api.durable()  # the record's row is committed before commits start failing

    def fail() -> None:
        store.conn.execute("ROLLBACK")
        store._in_batch = False
        raise sqlite3.OperationalError("disk I/O error")

    monkeypatch.setattr(store, "commit_batch", fail)
    answered = await asyncio.wait_for(api.answer("auth.revoke", None, {}, lambda a: dave["token"]), 5.0)
    assert answered[2] == {"ok": False, "error": "internal_error"}
    monkeypatch.undo()
    user = store.auth(dave["token"])
    assert user is not None and user.id == dave["id"]  # the DELETE was rolled back: the token works
    assert rid in {r.id for r in api.resume._records.values()}
    assert handoff.outbox.pending() == []  # the rolled-back event was never handed off

    async def no_waiter_left() -> bool:  # the cancelled wait's task ends on a later loop turn
        return handoff._waiters == {}

    await async_wait_until(no_waiter_left, what="auth.revoke's fan-out waiter dropped")
