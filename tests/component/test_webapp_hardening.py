"""Issue 13 at the webapp, over real HTTP and msgpack sockets: Slack's limits where
messages enter, Web API inputs that used to answer internal_error, outbox
backpressure (429), dead letters with the ``rtm deadletter`` commands, and group
commit. The webapp runs in-process (FixedDiscovery) against a fake Admin Server."""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import io
import json
import logging
import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from rtmctl import operator
from services import wire
from services.connection import PeerConnection
from tests.support import async_wait_until
from tests.webapp_harness import FakeAdminServer, Webapp, start
from webapp_stub.resume import token_id

MIB = 1024 * 1024


class RefusingAdminServer(FakeAdminServer):
    """Answers ``bad_request`` to every pub whose JSON contains :attr:`poison` (while set)."""

    def __init__(self) -> None:
        super().__init__()
        self.poison: bytes | None = b"POISON"
        self.refused: list[str] = []

    def on_request(self, conn: PeerConnection, msg: dict[str, Any]) -> dict[str, Any] | None:
        if msg["op"] == "pub" and self.poison and self.poison in msg["json"]:
            self.refused.append(msg["eid"])
            return wire.reply_err(msg["id"], "bad_request", "refused by the test")
        if msg["op"] == "pubs":  # a batch: the poisoned events are refused alone, the others taken
            results = []
            for item in msg["evs"]:
                if self.poison and self.poison in item["json"]:
                    self.refused.append(item["eid"])
                    results.append("bad_request")
                else:
                    self.pubs.append({"op": "pub", **item})
                    results.append("ok")
            return wire.reply_ok(
                msg["id"], res=results, det=[[i, "refused by the test"] for i, r in enumerate(results) if r != "ok"]
            )
        return super().on_request(conn, msg)


@pytest.fixture
async def fake_as() -> AsyncIterator[RefusingAdminServer]:
    server = RefusingAdminServer()
    await server.start()
    yield server
    if server.server is not None:
        await server.kill()


@pytest.fixture
async def webapp(tmp_path: Path, fake_as: RefusingAdminServer) -> AsyncIterator[Webapp]:
    app = await start(tmp_path, fake_as, "--max-refusals", "3")
    yield app
    await app.session.close()
    await app.stop()


async def metrics(app: Webapp) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    async with app.session.get(f"{app.url}/metrics") as resp:
        text = await resp.text()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def metric(values: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **labels: str) -> float:
    return sum(v for (n, ls), v in values.items() if n == name and all((k, w) in ls for k, w in labels.items()))


def rich_text_blocks(total_chars: int, blocks: int = 50) -> list[dict[str, Any]]:
    """Blocks whose text is not in text objects (rich_text elements): only the event size bounds them."""
    per = total_chars // blocks
    return [{"type": "rich_text", "elements": [{"type": "text", "text": "b" * per}]} for _ in range(blocks)]


async def test_the_issue_oversized_post_and_edit_get_clear_errors(webapp: Webapp, fake_as: RefusingAdminServer) -> None:
    alice, general = webapp.user("alice"), webapp.channel("general")
    token = alice["token"]
    # 2.2 MB of blocks: in one section's text, or spread where only the event size bounds it
    for blocks, code in (
        ([{"type": "section", "text": {"type": "mrkdwn", "text": "x" * 2_200_000}}], "invalid_blocks"),
        (rich_text_blocks(2_200_000), "msg_too_long"),
        (rich_text_blocks(100, blocks=51), "invalid_blocks"),
    ):
        status, reply = await webapp.call("chat.postMessage", token, json_body={"channel": general, "blocks": blocks})
        assert (status, reply) == (200, {"ok": False, "error": code})
    status, reply = await webapp.call(
        "chat.postMessage", token, json_body={"channel": general, "attachments": [{"text": "a"}] * 101}
    )
    assert reply == {"ok": False, "error": "too_many_attachments"}
    status, reply = await webapp.call("chat.postMessage", token, data={"channel": general, "blocks": "[{"})
    assert reply == {"ok": False, "error": "invalid_blocks_format"}
    # the same limits on the gateway's send path
    _, reply = await webapp.internal(
        "call/chat.postMessage",
        {"user": alice["id"], "token_id": token_id(token), "channel": general, "blocks": rich_text_blocks(2_200_000)},
    )
    assert reply == {"ok": False, "error": "msg_too_long"}

    # 600 KB is a message; an edit adding 600 KB more makes an event (message + previous_message) too large
    status, posted = await webapp.call(
        "chat.postMessage", token, json_body={"channel": general, "text": "big", "blocks": rich_text_blocks(600_000)}
    )
    assert posted["ok"], posted
    status, reply = await webapp.call(
        "chat.update",
        token,
        json_body={"channel": general, "ts": posted["ts"], "blocks": rich_text_blocks(600_000)},
    )
    assert reply == {"ok": False, "error": "msg_too_long"}
    status, after = await webapp.call("chat.postMessage", token, json_body={"channel": general, "text": "after"})
    assert after["ok"]

    async def delivered() -> bool:
        return any(json.loads(p["json"]).get("text") == "after" for p in fake_as.pubs_for(general))

    await async_wait_until(delivered, what="the message after the refusals")
    assert max(len(p["json"]) for p in fake_as.pubs) <= MIB  # nothing above the event limit was handed off
    values = await metrics(webapp)
    assert metric(values, "rtm_errors_total", kind="msg_too_long") == 3
    assert metric(values, "rtm_errors_total", kind="invalid_blocks") == 2
    assert metric(values, "rtm_errors_total", kind="too_many_attachments") == 1


async def test_web_api_inputs_get_slack_codes_never_internal_error(webapp: Webapp) -> None:
    alice, general = webapp.user("alice"), webapp.channel("general")
    token = alice["token"]
    _, posted = await webapp.call("chat.postMessage", token, json_body={"channel": general, "text": "target"})
    huge = "99999999999999999999.000000"
    raw_json = {"Content-Type": "application/json"}
    cases: list[tuple[dict[str, Any], str]] = [
        (  # a JSON number beyond a double: Python reads it as infinity
            {"method": "conversations.history", "data": b'{"channel": "%s", "limit": 1e400}' % general.encode()},
            "invalid_arguments",
        ),
        # ... which json.dumps writes as Infinity, not JSON
        ({"method": "conversations.history", "json_body": {"channel": general, "limit": 1e400}}, "invalid_json"),
        ({"method": "conversations.history", "data": {"channel": general, "limit": "1e400"}}, "invalid_arguments"),
        ({"method": "conversations.history", "data": {"channel": general, "oldest": huge}}, "invalid_ts_oldest"),
        ({"method": "conversations.history", "data": {"channel": general, "latest": huge}}, "invalid_ts_latest"),
        (
            {
                "method": "conversations.history",
                "data": {"channel": general, "cursor": "dHM6OTk5OTk5OTk5OTk5OTk5OTk5OTk5"},
            },
            "invalid_cursor",
        ),
        ({"method": "chat.update", "data": {"channel": general, "ts": huge, "text": "x"}}, "invalid_ts"),
        ({"method": "chat.delete", "data": {"channel": general, "ts": "9" * 20}}, "invalid_ts"),
        ({"method": "reactions.add", "data": {"channel": general, "timestamp": huge, "name": "+1"}}, "invalid_ts"),
        ({"method": "conversations.replies", "data": {"channel": general, "ts": huge}}, "thread_not_found"),
        (
            {
                "method": "chat.postMessage",
                "data": b'{"channel": "%s", "text": "\\ud800"}' % general.encode(),
                "headers": raw_json,
            },
            "invalid_json",
        ),
        ({"method": "chat.postMessage", "data": b"[" * 200_000, "headers": raw_json}, "invalid_json"),
        (
            {"method": "chat.postMessage", "data": {"channel": general, "blocks": "[" * 200_000}},
            "invalid_blocks_format",
        ),
        ({"method": "users.list", "data": {"cursor": "dXNlcjo5OTk5OTk5OTk5OTk5OTk5OTk5OTk="}}, "invalid_cursor"),
    ]
    for spec, code in cases:
        name = spec.pop("method")
        status, reply = await webapp.call(name, token, **spec)
        assert (status, reply) == (200, {"ok": False, "error": code}), (name, spec)
    # a lone surrogate percent-encoded in the query string
    status, reply = await webapp.call("chat.postMessage", token, params=f"channel={general}&text=%ED%A0%80")
    assert reply["ok"] or reply["error"] != "internal_error"
    # internal endpoints: the same bodies, Slack codes too
    gateway_tls = aiohttp.TCPConnector(ssl=webapp.ca.trust("gateway", "gw-hardening").client)
    async with aiohttp.ClientSession(connector=gateway_tls) as internal:  # a gateway's certificate
        for body in (b"[" * 200_000, b'{"channel": "\\udc00"}'):
            async with internal.post(f"{webapp.internal_url}/internal/history", data=body, headers=raw_json) as resp:
                assert (resp.status, await resp.json()) == (200, {"ok": False, "error": "invalid_json"})
        resume = b'{"user": "%s", "token_id": "t", "channels": {"%s": 1e400}}' % (
            alice["id"].encode(),
            general.encode(),
        )
        async with internal.post(f"{webapp.internal_url}/internal/resume", data=resume, headers=raw_json) as resp:
            assert (resp.status, await resp.json()) == (200, {"ok": False, "error": "invalid_arguments"})
    _, reply = await webapp.internal("history", {"channel": general, "after_seq": 10**30})
    assert reply == {"ok": False, "error": "invalid_arguments"}
    values = await metrics(webapp)
    assert metric(values, "rtm_errors_total", kind="internal_error") == 0
    assert metric(values, "rtm_errors_total", kind="invalid_ts_oldest") == 1
    _, still = await webapp.call("conversations.history", token, data={"channel": general})
    assert still["ok"] and posted["ts"] in [m["ts"] for m in still["messages"]]  # and the server serves on


async def test_text_that_is_an_object_or_array_is_invalid_arguments_not_its_repr(webapp: Webapp) -> None:
    """A JSON body's ``text`` (or ``topic``) must be a string: an object or array used to be stored
    and fanned out as its Python repr (``"{'a': 1}"``)."""
    alice, bob, general = webapp.user("alice"), webapp.user("bob"), webapp.channel("general")
    token = alice["token"]
    _, posted = await webapp.call("chat.postMessage", token, json_body={"channel": general, "text": "kept"})
    for bad in ({"a": 1}, [1, 2]):
        for name, body in (
            ("chat.postMessage", {"channel": general, "text": bad}),
            ("chat.update", {"channel": general, "ts": posted["ts"], "text": bad}),
            ("chat.meMessage", {"channel": general, "text": bad}),
            ("chat.postEphemeral", {"channel": general, "user": bob["id"], "text": bad}),
            ("conversations.setTopic", {"channel": general, "topic": bad}),
            ("conversations.setPurpose", {"channel": general, "purpose": bad}),
        ):
            status, reply = await webapp.call(name, token, json_body=body)
            assert (status, reply) == (200, {"ok": False, "error": "invalid_arguments"}), (name, bad)
    _, history = await webapp.call("conversations.history", token, data={"channel": general})
    assert [m["text"] for m in history["messages"]][0] == "kept"
    _, number = await webapp.call("chat.postMessage", token, json_body={"channel": general, "text": 5})
    assert number["ok"] and number["message"]["text"] == "5"  # a number is still taken as its text


async def test_a_json_boolean_is_stored_as_true_or_false_not_its_python_repr(webapp: Webapp) -> None:
    """A JSON body's ``true`` where a string goes used to be stored and fanned out as Python's
    ``"True"``; it is now the text a form would carry, ``"true"`` (a number stays its text)."""
    alice, general = webapp.user("alice"), webapp.channel("general")
    token = alice["token"]
    _, posted = await webapp.call("chat.postMessage", token, json_body={"channel": general, "text": True})
    assert posted["ok"] and posted["message"]["text"] == "true", posted
    _, topic = await webapp.call("conversations.setTopic", token, json_body={"channel": general, "topic": False})
    assert topic["ok"] and topic["channel"]["topic"]["value"] == "false", topic
    _, reminder = await webapp.call("reminders.add", token, json_body={"text": True, "time": "in 5 minutes"})
    assert reminder["ok"] and reminder["reminder"]["text"] == "true", reminder
    _, history = await webapp.call("conversations.history", token, data={"channel": general})
    stored = [m["text"] for m in history["messages"]]
    assert "true" in stored and not any("True" in text or "False" in text for text in stored), stored


async def test_nan_and_infinity_are_refused_not_fanned_out_as_invalid_json(
    webapp: Webapp, fake_as: RefusingAdminServer
) -> None:
    """Python's JSON reader takes ``NaN`` and ``Infinity`` (and reads ``1e400`` as infinity); they
    used to be stored, answered and handed off as ``NaN``/``Infinity``, which no JSON parser of a
    client reads. Now ``invalid_json`` (``invalid_blocks``/``invalid_attachments`` for 1e400)."""
    alice, general = webapp.user("alice"), webapp.channel("general")
    token, raw_json = alice["token"], {"Content-Type": "application/json"}
    _, posted = await webapp.call("chat.postMessage", token, json_body={"channel": general, "text": "target"})
    message = f'"channel": "{general}", "ts": "{posted["ts"]}"'
    cases = [
        ('"text": "t", "blocks": [{"type": "divider", "x": NaN}]', "invalid_json"),
        ('"text": "t", "attachments": [{"text": "a", "x": -Infinity}]', "invalid_json"),
        ('"text": NaN', "invalid_json"),
        ('"text": "t", "blocks": [{"type": "divider", "x": 1e400}]', "invalid_blocks"),
        ('"text": "t", "attachments": [{"text": "a", "x": 1e400}]', "invalid_attachments"),
    ]
    for fields, code in cases:
        body = f"{{{message}, {fields}}}"
        status, reply = await webapp.call("chat.update", token, data=body.encode(), headers=raw_json)  # aiohttp's
        assert (status, reply) == (200, {"ok": False, "error": code}), body
        # a post on a new connection, which the lean post front reads
        head = f"POST /api/chat.postMessage HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n"
        head += f"Content-Type: application/json\r\nConnection: close\r\nContent-Length: {len(body)}\r\n\r\n"
        answer = await raw_request(webapp, head.encode() + body.encode())
        assert json.loads(answer.partition(b"\r\n\r\n")[2]) == {"ok": False, "error": code}, body
    _, after = await webapp.call("chat.postMessage", token, json_body={"channel": general, "text": "after"})
    assert after["ok"]

    async def delivered() -> bool:
        return any(json.loads(p["json"]).get("text") == "after" for p in fake_as.pubs_for(general))

    await async_wait_until(delivered, what="the message after the refusals")
    assert not [p for p in fake_as.pubs if b"NaN" in p["json"] or b"Infinity" in p["json"]]
    values = await metrics(webapp)
    assert metric(values, "rtm_errors_total", kind="invalid_json") == 6
    assert metric(values, "rtm_errors_total", kind="internal_error") == 0


async def test_nan_stored_before_the_refusal_reads_back_as_null(webapp: Webapp) -> None:
    """Rows a webapp stored before NaN and Infinity were refused (blocks, an edit's kept extras, a
    profile field) hold them as Python wrote them; the encoder now refuses them, so read as they are
    they broke every history page and profile that showed them. They read back as null (review13)."""
    alice, general = webapp.user("alice"), webapp.channel("general")
    token = alice["token"]
    _, posted = await webapp.call("chat.postMessage", token, json_body={"channel": general, "text": "old"})
    await webapp.call("users.profile.set", token, json_body={"profile": {"title": "t"}})
    with contextlib.closing(sqlite3.connect(webapp.server.store.path, timeout=10)) as db, db:
        db.execute(
            "UPDATE messages SET extra = ? WHERE channel = ? AND ts = ?",
            (
                '{"blocks": [{"type": "divider", "x": NaN}], "attachments": [{"text": "a", "y": -Infinity}]}',
                general,
                posted["ts"],
            ),
        )
        db.execute("UPDATE profiles SET fields = ? WHERE user = ?", ('{"title": "t", "x": NaN}', alice["id"]))
    _, history = await webapp.call("conversations.history", token, data={"channel": general, "limit": 5})
    assert history["ok"], history
    (old,) = [m for m in history["messages"] if m["ts"] == posted["ts"]]
    assert old["blocks"] == [{"type": "divider", "x": None}] and old["attachments"][0]["y"] is None
    _, edited = await webapp.call(
        "chat.update", token, json_body={"channel": general, "ts": posted["ts"], "text": "new"}
    )
    assert edited["ok"], edited
    _, profile = await webapp.call("users.profile.get", token)
    assert profile["ok"] and profile["profile"]["title"] == "t", profile
    _, info = await webapp.call("users.info", token, data={"user": alice["id"]})
    assert info["ok"], info


async def test_a_users_list_is_bounded_before_any_lookup(webapp: Webapp) -> None:
    """``users`` of conversations.invite/open was looked up id by id: 250,000 ids in one 4 MB body
    held the event loop (everyone's posts) for seconds. Now at most 1,000 distinct ids, each once."""
    alice, bob, carol = webapp.user("alice"), webapp.user("bob"), webapp.user("carol")
    random = webapp.channel("random")
    many = ",".join(f"U{i:011d}" for i in range(1001))
    _, reply = await webapp.call("conversations.invite", alice["token"], data={"channel": random, "users": many})
    assert reply == {"ok": False, "error": "invalid_arguments"}
    _, reply = await webapp.call("conversations.open", alice["token"], data={"users": many})
    assert reply == {"ok": False, "error": "too_many_users"}
    # 4 MiB of entries is refused before they are read (it held the event loop 0.3 s), blanks too
    _, reply = await webapp.call("conversations.open", alice["token"], json_body={"users": "," * (4 * MIB - 1024)})
    assert reply == {"ok": False, "error": "too_many_users"}
    # the same id 100,000 times is one id
    _, reply = await webapp.call("conversations.open", alice["token"], data={"users": ",".join([bob["id"]] * 100_000)})
    assert reply["ok"] and reply["channel"]["id"].startswith("D"), reply
    _, reply = await webapp.call(
        "conversations.open", alice["token"], json_body={"users": [bob["id"], carol["id"], bob["id"], " "]}
    )
    assert reply["ok"] and reply["channel"]["id"].startswith("G"), reply


async def test_bodies_of_many_tiny_values_are_refused_before_they_hold_the_loop(webapp: Webapp) -> None:
    """4 MiB bodies of tiny values (no token needed: the body is read first) took 0.5-2.7 s each to
    parse and check, holding everyone's requests. Their shape is now bounded before that work
    (args.py: MAX_JSON_CONTAINERS, MAX_ARGS_VALUES, MAX_FORM_FIELDS), and a body past
    LARGE_BODY_BYTES is parsed on the body thread, the lean front leaving such posts to aiohttp."""
    before = await metrics(webapp)
    four_mib = 4 * 1024 * 1024 - 64
    containers = b'{"a":[' + b",".join([b"[]"] * (four_mib // 3)) + b"]}"
    values = b'{"a":[' + b",".join([b"0"] * (four_mib // 2)) + b"]}"
    fields = b"&".join([b"a="] * (four_mib // 3))
    for body, ctype, code in (
        (containers, "application/json", "invalid_json"),
        (values, "application/json", "invalid_json"),
        (fields, "application/x-www-form-urlencoded", "invalid_form_data"),
    ):
        for method in ("auth.test", "chat.postMessage"):  # aiohttp's path and the lean front's
            status, reply = await webapp.call(method, data=body, headers={"Content-Type": ctype})
            assert (status, reply) == (200, {"ok": False, "error": code}), (method, ctype)
    after = await metrics(webapp)
    assert (
        metric(after, "rtm_errors_total", kind="invalid_json") - metric(before, "rtm_errors_total", kind="invalid_json")
        == 4
    )
    # a large post of its own right: 30,000 "é" are 180 KB as a form, past LARGE_BODY_BYTES
    alice, general = webapp.user("alice"), webapp.channel("general")
    handed = webapp.server.front.handed_over
    text = "é" * 30_000
    async with aiohttp.ClientSession() as fresh:  # a new connection, so the lean front sees it first
        form = {"channel": general, "text": text, "token": alice["token"]}
        async with fresh.post(f"{webapp.url}/api/chat.postMessage", data=form) as resp:
            reply = await resp.json()
    assert reply["ok"] and reply["message"]["text"] == text, reply.get("error")
    assert webapp.server.front.handed_over == handed + 1  # the lean front left it to aiohttp
    assert (
        webapp.server.body_parser is not None and len(webapp.server.body_parser.executor._threads) == 1
    )  # parsed there
    _, history = await webapp.call("conversations.history", alice["token"], data={"channel": general, "limit": 1})
    assert history["messages"][0]["text"] == text


async def raw_request(app: Webapp, request: bytes) -> bytes:
    """Send one request on a new connection; everything the webapp sends until it closes it."""
    host, port = app.url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(request)
    try:
        return await asyncio.wait_for(reader.read(), 5)  # to EOF: the webapp closes the connection
    finally:
        writer.close()


async def test_bodies_that_do_not_decode_are_slack_errors_not_internal_error(
    webapp: Webapp, caplog: pytest.LogCaptureFixture
) -> None:
    """A body whose Content-Encoding does not decode (gzip that is not), or a multipart part in an
    unknown charset, used to answer internal_error with a traceback logged (two for the body: the
    webapp's, then aiohttp's when it read the rest after the answer); and the lean post front read a
    gzip body as if it were plain. Now: Slack's codes, counted, the connection closed after a body that
    did not decode (its parser gave up), and a real gzip post is posted."""
    alice, general = webapp.user("alice"), webapp.channel("general")
    auth = f"Authorization: Bearer {alice['token']}\r\n"
    not_gzip = (
        f"POST /api/auth.test HTTP/1.1\r\nHost: x\r\n{auth}Content-Type: application/x-www-form-urlencoded\r\n"
        "Content-Encoding: gzip\r\nContent-Length: 3\r\n\r\nx=1"
    )
    with caplog.at_level(logging.WARNING):
        answer = await raw_request(webapp, not_gzip.encode())
        head, _, body = answer.partition(b"\r\n\r\n")
        assert b" 200 " in head.split(b"\r\n")[0] and b"Connection: close" in head, answer
        assert json.loads(body) == {"ok": False, "error": "invalid_form_data"}
        part = (
            b'--zz\r\nContent-Disposition: form-data; name="text"\r\nContent-Type: text/plain; charset=bogus\r\n\r\nhi'
        )
        status, reply = await webapp.call(
            "auth.test",
            alice["token"],
            data=part + b"\r\n--zz--\r\n",
            headers={"Content-Type": "multipart/form-data; boundary=zz"},
        )
        assert (status, reply) == (200, {"ok": False, "error": "invalid_charset"})
        zipped = gzip.compress(f"channel={general}&text=zipped".encode())
        post = (  # on a new connection: the lean front's (the session's was handed to aiohttp above)
            f"POST /api/chat.postMessage HTTP/1.1\r\nHost: x\r\n{auth}Connection: close\r\n"
            "Content-Type: application/x-www-form-urlencoded\r\nContent-Encoding: gzip\r\n"
            f"Content-Length: {len(zipped)}\r\n\r\n"
        )
        reply = json.loads((await raw_request(webapp, post.encode() + zipped)).partition(b"\r\n\r\n")[2])
        assert reply["ok"] and reply["message"]["text"] == "zipped", reply
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info], caplog.text
    values = await metrics(webapp)
    assert metric(values, "rtm_errors_total", kind="invalid_form_data") == 1
    assert metric(values, "rtm_errors_total", kind="invalid_charset") == 1
    assert metric(values, "rtm_errors_total", kind="internal_error") == 0


async def test_malformed_http_is_refused_and_counted_without_a_traceback(
    webapp: Webapp, caplog: pytest.LogCaptureFixture
) -> None:
    """aiohttp answers a request it cannot parse with 400, but logged each at ERROR with a traceback:
    any client could fill the log with them. Now each is counted as ``bad_http_request``, one line
    at debug. (A post with bare LF line endings was held by the lean front until its request timeout.)"""
    token = webapp.user("alice")["token"]
    heads = [
        "POST /api/auth.test HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n\r\n",
        "POST /api/auth.test HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nContent-Length: 5\r\n\r\nx=1ab",
        "POST /api/auth.test HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n\r\n",
        "POST /api/chat.postMessage HTTP/1.1\r\nHost: x\x00y\r\nContent-Length: 3\r\n\r\nx=1",  # the lean front's
        "POST /api/chat.postMessage HTTP/1.1\nHost: x\nContent-Length: 3\n\nx=1",  # waited for the request timeout
        f"POST /api/auth.test HTTP/1.1\r\nHost: x\r\nX: {'a' * 9000}\r\n\r\n",
        f"POST /api/auth.test?token={token} HTTP/1.1\r\nHost: x\r\nContent-Encoding: br\r\nContent-Length: 3\r\n\r\nx=1",
    ]
    with caplog.at_level(logging.INFO):
        for head in heads:
            answer = await raw_request(webapp, head.encode())
            assert answer.split(b"\r\n", 1)[0].split(b" ")[1] == b"400", (head[:60], answer)
    assert not [r for r in caplog.records if r.levelno >= logging.INFO or r.exc_info], caplog.text
    values = await metrics(webapp)
    assert metric(values, "rtm_errors_total", kind="bad_http_request") == len(heads)
    _, still = await webapp.call("auth.test", token)
    assert still["ok"]


async def test_a_declared_oversized_body_is_refused_at_once(webapp: Webapp) -> None:
    """A Content-Length above the limit is answered 413 ``request_too_large`` without waiting for
    a body that may never come (it used to hold the request until the client gave up)."""
    host, port = webapp.url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    head = (
        "POST /api/auth.test HTTP/1.1\r\nHost: x\r\nContent-Type: application/x-www-form-urlencoded\r\n"
        f"Authorization: Bearer {webapp.user('alice')['token']}\r\nContent-Length: {30 * MIB}\r\n\r\nx=1"
    )
    writer.write(head.encode())
    try:
        answer = await asyncio.wait_for(reader.read(4096), 5)
    finally:
        writer.close()
    status_line, _, rest = answer.partition(b"\r\n")
    assert b" 413 " in status_line, answer
    assert json.loads(rest.partition(b"\r\n\r\n")[2]) == {"ok": False, "error": "request_too_large"}
    _, still = await webapp.call("auth.test", webapp.user("alice")["token"])
    assert still["ok"]


async def test_a_client_hanging_up_mid_body_is_counted_as_gone_not_internal_error(webapp: Webapp) -> None:
    """A client that closes before its body arrives used to be logged as a failure with a traceback
    and counted as ``internal_error``."""
    host, port = webapp.url.removeprefix("http://").split(":")
    _, writer = await asyncio.open_connection(host, int(port))
    writer.write(b"POST /api/auth.test HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\nx=1")
    await writer.drain()
    writer.close()

    async def counted() -> bool:
        return metric(await metrics(webapp), "rtm_errors_total", kind="client_gone") == 1

    await async_wait_until(counted, what="the hang-up counted")
    assert metric(await metrics(webapp), "rtm_errors_total", kind="internal_error") == 0


async def test_full_outbox_answers_ratelimited_and_persists_nothing(tmp_path: Path) -> None:
    fake_as = FakeAdminServer()
    await fake_as.start()
    app = await start(tmp_path, fake_as, "--max-outbox-events", "3")
    try:
        alice, general = app.user("alice"), app.channel("general")
        await fake_as.kill()  # no Admin Server: the outbox fills
        texts = []
        for i in range(10):
            status, reply = await app.call(
                "chat.postMessage", alice["token"], json_body={"channel": general, "text": f"q{i}"}
            )
            if status == 429:
                break
            assert reply["ok"], reply
            texts.append(f"q{i}")
        assert status == 429 and reply == {"ok": False, "error": "ratelimited"}
        assert len(texts) == 3
        async with app.session.post(
            f"{app.url}/api/reactions.add",
            json={"channel": general, "timestamp": "1.000001", "name": "+1"},
            headers={"Authorization": f"Bearer {alice['token']}"},
        ) as resp:
            assert resp.status == 429 and resp.headers["Retry-After"] == "1"
        _, history = await app.call("conversations.history", alice["token"], data={"channel": general})
        assert [m["text"] for m in history["messages"]] == texts[::-1]  # the refused post was not persisted
        values = await metrics(app)
        assert metric(values, "rtm_webapp_backpressure_total") == 2
        await fake_as.start()  # back: the outbox drains, writes are taken again

        async def accepted() -> bool:
            status, _ = await app.call("chat.postMessage", alice["token"], json_body={"channel": general, "text": "ok"})
            return status == 200

        await async_wait_until(accepted, what="the outbox to drain")
        got = [json.loads(p["json"]).get("text") for p in fake_as.pubs_for(general)]
        assert [t for t in got if t in texts] == texts  # everything that was answered ok was delivered, in order
    finally:
        await app.session.close()
        await app.stop()
        if fake_as.server is not None:
            await fake_as.kill()


def run_cli(*argv: str) -> tuple[int, str]:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = operator.main(list(argv))
    return code, out.getvalue()


async def test_refused_event_is_dead_lettered_listed_and_redriven(
    tmp_path: Path, webapp: Webapp, fake_as: RefusingAdminServer
) -> None:
    alice, general, random = webapp.user("alice"), webapp.channel("general"), webapp.channel("random")
    token = alice["token"]
    texts = ["before", "POISON", "after"]
    for text in texts:
        _, reply = await webapp.call("chat.postMessage", token, json_body={"channel": general, "text": text})
        assert reply["ok"]
    _, other = await webapp.call("chat.postMessage", token, json_body={"channel": random, "text": "elsewhere"})

    def applied(channel: str) -> list[str]:
        return [json.loads(p["json"])["text"] for p in fake_as.pubs_for(channel)]  # refused pubs are not recorded

    async def moved_on() -> bool:
        return "after" in applied(general) and "elsewhere" in applied(random)

    await async_wait_until(moved_on, what="the events behind the refused one")

    async def parked() -> bool:
        # read as the operator's command does, from its own connection: the park is written in
        # the webapp's open group-commit batch, visible to the webapp's connection before it is
        # committed (the in-process read raced the commit and the listing came back empty)
        return "parked" in run_cli("deadletter", "list", "--data-dir", str(tmp_path))[1]

    await async_wait_until(parked, what="the refused event to be parked and committed")
    assert applied(general) == ["before", "after"]
    poison = fake_as.refused[0]
    assert fake_as.refused == [poison] * 3  # three identical refusals, then parked
    code, listing = run_cli("deadletter", "list", "--data-dir", str(tmp_path))
    assert code == 0 and poison in listing and "bad_request" in listing and "parked" in listing
    values = await metrics(webapp)
    assert metric(values, "rtm_deadletter_total", reason="bad_request") == 1
    assert metric(values, "rtm_deadletter_parked") == 1
    async with webapp.session.get(f"{webapp.url}/healthz") as resp:
        assert (await resp.json())["dead_letters"] == 1

    assert run_cli("deadletter", "redrive", "C-nope:1", "--data-dir", str(tmp_path))[0] == 1
    assert run_cli("deadletter", "redrive", "garbage", "--data-dir", str(tmp_path))[0] == 2
    fake_as.poison = None  # the cause is fixed downstream
    code, said = run_cli("deadletter", "redrive", poison, "--data-dir", str(tmp_path))
    assert code == 0, said

    async def redelivered() -> bool:
        return "POISON" in applied(general)

    await async_wait_until(redelivered, what="the redriven event")

    async def resolved() -> bool:
        row = (
            sqlite3.connect(tmp_path / "webapp.db")
            .execute("SELECT state FROM dead_letters WHERE channel || ':' || seq = ?", (poison,))
            .fetchone()
        )
        return row == ("delivered",)

    await async_wait_until(resolved, what="the dead letter to be marked delivered")
    assert "dead letters: none" in run_cli("deadletter", "list", "--data-dir", str(tmp_path))[1]
    values = await metrics(webapp)
    assert metric(values, "rtm_deadletter_redriven_total", outcome="delivered") == 1
    assert other["ok"]


@pytest.mark.parametrize("fsync_thread", [False, True])
async def test_concurrent_posts_share_commits_and_keep_seqs_gapless(
    tmp_path: Path, fake_as: FakeAdminServer, fsync_thread: bool
) -> None:
    webapp = await start(tmp_path, fake_as, "--commit-fsync-thread" if fsync_thread else "--no-commit-fsync-thread")
    try:
        await _concurrent_posts_share_commits(webapp, fake_as, fsync_thread)
    finally:
        await webapp.session.close()
        await webapp.stop()


async def _concurrent_posts_share_commits(webapp: Webapp, fake_as: FakeAdminServer, fsync_thread: bool) -> None:
    alice, general = webapp.user("alice"), webapp.channel("general")
    store = webapp.server.store
    assert webapp.server.commits.fsync_thread is fsync_thread
    # FULL durability: FULL's COMMIT fsyncs inline, or NORMAL and the group commit's thread fsyncs the WAL
    assert store.conn.execute("PRAGMA synchronous").fetchone()[0] == (1 if fsync_thread else 2)
    before = store.last_seq(general)
    replies = await asyncio.gather(
        *(
            webapp.call("chat.postMessage", alice["token"], json_body={"channel": general, "text": f"c{i}"})
            for i in range(40)
        )
    )
    assert all(status == 200 and reply["ok"] for status, reply in replies)
    commits = webapp.server.commits
    values = await metrics(webapp)
    batches = metric(values, "rtm_webapp_commit_batch_writes_count")
    assert 1 <= batches < 40 and commits.batches >= batches  # several posts per commit

    async def all_handed_off() -> bool:
        return len(fake_as.pubs_for(general)) >= 40

    await async_wait_until(all_handed_off, what="40 pubs")
    seqs = [p["seq"] for p in fake_as.pubs_for(general)]
    assert seqs == list(range(before + 1, before + 41))  # gapless, in commit order
    assert commits.syncs >= 1 if fsync_thread else commits.syncs == 0  # the thread's fsyncs
