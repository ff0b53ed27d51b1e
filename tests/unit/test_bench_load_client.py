"""bench/load_client.py's connect rule (ConnectRetry) and bench/client_records.py's frame handlers, without
sockets; and bench/'s long modules say why they are one."""

from __future__ import annotations

import ast
import random
from collections import Counter
from types import SimpleNamespace
from typing import Any

import pytest

import bench.load_client
from bench.client_records import EventRecorder, LatencyRecorder, ReconnectRecord, SessionRecorder
from bench.load_client import (
    AFTER_FAILED_MOVE,
    BACKOFF_BASE_S,
    BACKOFF_MAX_S,
    MAX_RETRY_AFTER_S,
    MOVED,
    Client,
    ConnectRetry,
    GoodbyeBeforeHello,
    RtmConnectError,
    failure_reason,
)
from bench.soak_check import event_key
from tests.support import REPO_ROOT


def rule(max_attempts: int = 20, budget_s: float = 1000.0) -> ConnectRetry:
    return ConnectRetry(started_s=0.0, rng=random.Random(7), max_attempts=max_attempts, budget_s=budget_s)


def test_the_backoff_doubles_up_to_its_cap_with_jitter() -> None:
    retry = rule()
    waits = [retry.after_failure(ConnectionError("refused"), 0.0) for _ in range(8)]
    for n, wait in enumerate(waits, start=1):
        full = min(BACKOFF_MAX_S, BACKOFF_BASE_S * 2 ** (n - 1))
        assert wait is not None and 0.5 * full <= wait <= full
    assert max(w for w in waits if w is not None) <= BACKOFF_MAX_S


def test_a_retryable_rtm_connect_error_is_retried_and_one_outside_the_rule_is_not() -> None:
    assert rule().after_failure(RtmConnectError("service_unavailable"), 0.0) is not None
    assert rule().after_failure(RtmConnectError("fatal_error"), 0.0) is not None
    assert rule().after_failure(RtmConnectError("invalid_auth"), 0.0) is None


def test_retry_after_is_a_floor_capped_by_its_maximum() -> None:
    assert rule().after_failure(RtmConnectError("ratelimited", retry_after_s=2.0), 0.0) == 2.0
    capped = rule().after_failure(RtmConnectError("ratelimited", retry_after_s=3600.0), 0.0)
    assert capped == MAX_RETRY_AFTER_S


def test_a_goodbye_before_hello_is_retried_at_once() -> None:
    retry = rule()
    retry.after_failure(ConnectionError("x"), 0.0)
    assert retry.after_failure(GoodbyeBeforeHello("draining"), 0.0) == 0.0


def test_the_budget_is_bounded_in_attempts_and_in_time() -> None:
    retry = rule(max_attempts=3)
    assert retry.after_failure(ConnectionError("x"), 0.0) is not None
    assert retry.after_failure(ConnectionError("x"), 0.0) is not None
    assert retry.after_failure(ConnectionError("x"), 0.0) is None  # the third failure was the last attempt
    assert rule(budget_s=10.0).after_failure(ConnectionError("x"), 9.99) is None  # the wait would pass the budget


def test_a_failure_is_counted_by_its_rtm_connect_error_or_its_stage() -> None:
    assert failure_reason("rtm.connect", RtmConnectError("ratelimited")) == "ratelimited"
    assert failure_reason("hello", TimeoutError("late")) == "hello: TimeoutError: late"


def sess(idx: int = 3, sid: int = 100_000_005) -> Any:
    return SimpleNamespace(idx=idx, sid=sid, t_close_us=7, close_code=1006)


@pytest.mark.parametrize(
    "text",
    ['"text":"m42:1000"', '"text":"Reminder: m42:1000."'],  # a post, and Slackbot's reminder of one
)
def test_the_latency_recorder_reads_post_id_and_send_time_from_the_text(text: str) -> None:
    rec = LatencyRecorder()
    assert rec.on_text(sess(), b'{"type":"message",' + text.encode() + b',"ts":"1.2"}')
    assert (list(rec.conn), list(rec.post)) == ([3], [42])
    assert rec.lat[0] == rec.recv[0] - 1000
    assert not rec.on_text(sess(), b'{"type":"hello"}') and rec.other == 0  # hello is the client's, not "other"
    assert not rec.on_text(sess(), b'{"type":"pong"}') and rec.other == 1


def test_the_session_recorder_keeps_events_and_leaves_transient_frames() -> None:
    rec = SessionRecorder()
    event = b'{"type":"message","channel":"C1","text":"hi"}'
    assert rec.on_text(sess(), event)
    for transient in (b'{"type":"hello"}', b'{"type":"goodbye"}', b'{"type":"user_typing","channel":"C1"}'):
        assert not rec.on_text(sess(), transient)
    assert rec.on_text(sess(), b'{"ok":true,"reply_to":1}')  # a reply: consumed, not recorded
    assert list(zip(rec.sid, rec.key, strict=True)) == [(100_000_005, event_key(event))]
    assert rec.types == {"message": 1, "hello": 1, "goodbye": 1, "user_typing": 1, "(reply)": 1}


def test_the_session_recorder_reports_fresh_sessions_once_and_not_moves() -> None:
    rec = SessionRecorder()
    common = {"idx": 1, "goodbye_us": 0, "closed_us": 10, "asked_us": 11, "attempts": 1, "gw": "g"}
    rec.on_reconnect(ReconnectRecord(start="moved", hello_us=12, sid=2, **common))
    rec.on_reconnect(ReconnectRecord(start="after_close_1006", hello_us=13, sid=3, **common))
    rec.on_reconnect(ReconnectRecord(start="after_close_1006", hello_us=0, sid=0, **common))  # gave up
    assert rec.stat()["fresh"] == [[1, 3, 10, 13]]
    assert rec.stat()["fresh"] == []


def test_the_event_recorder_keeps_messages_typing_and_closes() -> None:
    rec = EventRecorder()
    assert rec.on_text(sess(), b'{"type":"message","text":"m9:5","ts":"1.2"}')
    assert rec.on_text(sess(), b'{"type":"user_typing","channel":"C1","user":"U1"}')
    assert not rec.on_text(sess(), b'{"type":"goodbye"}') and rec.other == 0
    rec.on_closed(sess())
    assert (list(rec.m_post), list(rec.t_chan), rec.closed) == ([9], [0], [(3, 7, 1006)])
    assert rec.stat() == {"msgs": 1, "typing": 1, "typing_sent": 0, "other": 0, "moves": 0, "closed": 1}


def test_every_bench_module_over_500_lines_says_why_it_is_one_module() -> None:
    """Issue 11: a long benchmark module is split where it has a seam, else its docstring says why it has none."""
    long_without_reason = []
    for module in sorted((REPO_ROOT / "bench").glob("*.py")):
        source = module.read_text(encoding="utf-8")
        docstring = ast.get_docstring(ast.parse(source)) or ""
        reasons = [p for p in docstring.split("\n\n") if p.strip().startswith("Why one module")]
        if len(source.splitlines()) > 500 and not reasons:
            long_without_reason.append(module.name)
    assert not long_without_reason


@pytest.mark.parametrize(
    ("failures", "starts"),
    [
        # a 4010 before hello: the resume record is gone; the next attempt is a fresh connection
        ([ConnectionError("closed before hello (code 4010)")], [MOVED, AFTER_FAILED_MOVE]),
        # any failed attempt may have used the record up (a bootstrap that failed): fresh from then on
        ([ConnectionError("closed before hello (code 4002)"), TimeoutError()], [MOVED] + [AFTER_FAILED_MOVE] * 2),
        # the new gateway drains too: it said goodbye before bootstrapping, the move still resumes
        ([GoodbyeBeforeHello("goodbye before hello (code 1001)")], [MOVED, MOVED]),
    ],
)
async def test_a_moved_reconnect_goes_on_fresh_after_a_failed_attempt(
    monkeypatch: pytest.MonkeyPatch, failures: list[Exception], starts: list[str]
) -> None:
    """A moved client that keeps saying "moved" after its resume was refused would be checked by the
    soak as resumed while the fleet started it at a fresh bootstrap (and it would never read history)."""
    monkeypatch.setattr(
        bench.load_client, "STATE", SimpleNamespace(rng=random.Random(1), max_attempts=5, budget_s=60.0, quitting=False)
    )
    monkeypatch.setattr(bench.load_client, "BACKOFF_BASE_S", 0.001)
    monkeypatch.setattr(bench.load_client, "BACKOFF_MAX_S", 0.001)
    client = Client(0, "xoxp-1", "us-east")
    asked: list[str] = []
    pending = list(failures)

    async def open_once(start: str) -> Any:
        asked.append(start)
        if pending:
            raise pending.pop(0)
        return SimpleNamespace(start=start)

    monkeypatch.setattr(client, "open_once", open_once)
    sess = await client.open(MOVED, Counter())
    assert asked == starts and sess.start == starts[-1]
