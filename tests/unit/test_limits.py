"""webapp_stub.limits and the Web API's argument parsing: Slack's codes, whatever the input.

The Hypothesis properties say: any value, of any shape, either parses or raises
ApiError with a Slack error code; no other exception escapes, and no input can
exhaust the stack.
"""

from __future__ import annotations

import asyncio
import json
import threading
from typing import Any
from unittest import mock

import pytest
from aiohttp import web
from aiohttp.streams import StreamReader
from aiohttp.test_utils import make_mocked_request
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from webapp_stub.api import Call, check_text, flag, int_arg, json_arg, parse_json_body, str_arg
from webapp_stub.args import walk_text
from webapp_stub.call_args import message_content
from webapp_stub.codecs import dumps
from webapp_stub.limits import MAX_ATTACHMENTS, MAX_BLOCKS, MAX_CONTENT_DEPTH, check_attachments, check_blocks
from webapp_stub.store import ApiError, decode_cursor, encode_cursor, ts_to_us

SLACK_CODE_CHARS = set("abcdefghijklmnopqrstuvwxyz_")

# Every JSON value: what a JSON body or a form field's JSON can hold.
json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(st.characters(codec=None)),  # lone surrogates included
    lambda children: st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=8), children, max_size=5),
    max_leaves=30,
)
arg_values = json_values | st.text() | st.sampled_from(["1e400", "-0", "99999999999999999999", "NaN", "0x10", ""])


def section(text: str) -> dict[str, Any]:
    return {"type": "section", "text": {"type": "mrkdwn", "text": text}}


def is_slack_code(code: str) -> bool:
    return bool(code) and set(code) <= SLACK_CODE_CHARS and code != "internal_error"


# -- blocks and attachments ----------------------------------------------------------------------


def test_blocks_within_slack_limits_pass() -> None:
    blocks = [section("x" * 3000)] * MAX_BLOCKS
    assert check_blocks(blocks) is blocks
    fields = {"type": "section", "fields": [{"type": "plain_text", "text": "y" * 2000}] * 10}
    assert check_blocks([fields, {"type": "header", "text": {"type": "plain_text", "text": "h" * 150}}])


@pytest.mark.parametrize(
    ("blocks", "code"),
    [
        ("not a list", "invalid_blocks_format"),
        ({"type": "section"}, "invalid_blocks_format"),
        ([1, 2], "invalid_blocks_format"),
        ([{"text": "no type"}], "invalid_blocks_format"),
        ([section("x")] * (MAX_BLOCKS + 1), "invalid_blocks"),
        ([section("x" * 3001)], "invalid_blocks"),
        ([section("x" * 2_200_000)], "invalid_blocks"),  # the 2.2 MB of blocks
        ([{"type": "section", "fields": [{"type": "mrkdwn", "text": "y" * 2001}]}], "invalid_blocks"),
        ([{"type": "section", "fields": [{"type": "mrkdwn", "text": "y"}] * 11}], "invalid_blocks"),
        ([{"type": "header", "text": {"type": "plain_text", "text": "h" * 151}}], "invalid_blocks"),
        ([{"type": "markdown", "text": "m" * 12_001}], "invalid_blocks"),
        ([{"type": "divider", "block_id": "b" * 256}], "invalid_blocks"),
        ([{"type": "context", "elements": [{"type": "plain_text"}]}], "invalid_blocks"),
        ([{"type": [1], "text": {"type": {"a": 1}, "text": "unhashable types"}}], "invalid_blocks_format"),
    ],
)
def test_blocks_beyond_slack_limits_get_slack_codes(blocks: Any, code: str) -> None:
    with pytest.raises(ApiError) as caught:
        check_blocks(blocks)
    assert caught.value.code == code


def test_nesting_is_bounded_without_recursion() -> None:
    deep: Any = {"type": "rich_text", "elements": []}
    node = deep
    for _ in range(100_000):  # far deeper than the interpreter's stack
        child: dict[str, Any] = {"type": "rich_text_section", "elements": []}
        node["elements"].append(child)
        node = child
    with pytest.raises(ApiError) as caught:
        check_blocks([deep])
    assert caught.value.code == "invalid_blocks"
    shallow: Any = {"type": "rich_text", "elements": []}
    node = shallow
    for _ in range(MAX_CONTENT_DEPTH // 2 - 1):
        child = {"type": "rich_text_section", "elements": []}
        node["elements"].append(child)
        node = child
    assert check_blocks([shallow])


def test_attachments_limits() -> None:
    assert check_attachments([{"text": "a"}] * MAX_ATTACHMENTS)
    for value, code in (
        ([{"text": "a"}] * (MAX_ATTACHMENTS + 1), "too_many_attachments"),
        ("x", "invalid_attachments"),
        ([1], "invalid_attachments"),
    ):
        with pytest.raises(ApiError) as caught:
            check_attachments(value)
        assert caught.value.code == code


# -- the Web API's argument parsing --------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [("1e400", "invalid_arguments"), (float("inf"), "invalid_arguments"), (float("nan"), "invalid_arguments")],
)
def test_int_arg_refuses_what_is_not_an_integer(value: Any, expected: str) -> None:
    with pytest.raises(ApiError) as caught:
        int_arg({"limit": value}, "limit", 100, 1000)
    assert caught.value.code == expected


def test_int_arg_clamps_huge_integers() -> None:
    assert int_arg({"limit": 10**400}, "limit", 100, 1000) == 1000
    assert int_arg({"limit": "99999999999999999999"}, "limit", 100, 1000) == 1000


@pytest.mark.parametrize("ts", ["99999999999999999999.000000", "99999999999999999999", "1.1234567", "١.٢", "²"])
def test_ts_beyond_any_slack_ts_is_refused(ts: str) -> None:
    with pytest.raises(ValueError):
        ts_to_us(ts)


def test_cursor_keys_beyond_sqlite_integers_are_invalid() -> None:
    for key in ("99999999999999999999", "-1", "1.5", "١٢"):
        with pytest.raises(ApiError) as caught:
            from webapp_stub.codecs import int_cursor

            int_cursor(encode_cursor("ts", key), "ts")
        assert caught.value.code == "invalid_cursor"
    with pytest.raises(ApiError):
        decode_cursor("\ud800", "ts")


def test_json_bodies() -> None:
    assert parse_json_body(b'{"text": "hi \\u00e9"}') == {"text": "hi \u00e9"}
    not_json = (b'{"text": NaN}', b'{"blocks": [{"type": "divider", "x": Infinity}]}', b'{"limit": -Infinity}')
    for raw in (b'{"text": "\\ud800"}', b"[" * 100_000, b'{"a":' * 50 + b"1" + b"}" * 50, b"[1]", b"\xff", *not_json):
        with pytest.raises(ApiError) as caught:
            parse_json_body(raw)
        assert caught.value.code == "invalid_json"


def test_form_blocks_deeply_nested_or_with_surrogates() -> None:
    for raw in (
        "[" * 100_000,
        '[{"type": "section", "text": {"type": "mrkdwn", "text": "\\udc00"}}]',
        '[{"type": "x", "n": NaN}]',
    ):
        with pytest.raises(ApiError) as caught:
            message_content(Call(None, {"blocks": raw}, None))
        assert caught.value.code == "invalid_blocks_format"


def _parse(fn: Any, *args: Any) -> None:
    try:
        fn(*args)
    except ApiError as exc:
        assert is_slack_code(exc.code), exc.code


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(value=arg_values)
def test_any_argument_value_parses_or_gets_a_slack_code(value: Any) -> None:
    args = {"x": value}
    _parse(int_arg, args, "x", 100, 1000)
    _parse(flag, args, "x")
    _parse(str_arg, args, "x")
    _parse(json_arg, args, "x")
    _parse(check_text, args, "invalid_arguments")
    _parse(message_content, Call(None, {"text": value, "blocks": value, "attachments": value}, None))
    if isinstance(value, str):
        try:
            ts_to_us(value)
        except ValueError:
            pass
        _parse(decode_cursor, value, "ts")


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(body=json_values)
def test_any_json_body_parses_or_gets_invalid_json(body: Any) -> None:
    try:
        raw = json.dumps(body)  # surrogates become \\udXXX escapes, as a client would send them
    except ValueError:  # NaN/Infinity are not JSON; Python writes them anyway, so this never happens
        return
    try:
        parsed = parse_json_body(raw.encode())
    except ApiError as exc:
        assert exc.code == "invalid_json"
        return
    assert isinstance(parsed, dict)
    json.dumps(parsed, ensure_ascii=False, allow_nan=False).encode()  # what passes is JSON, valid Unicode throughout


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(blocks=json_values)
def test_any_blocks_value_passes_or_gets_a_block_code(blocks: Any) -> None:
    try:
        dumps(check_blocks(blocks))  # what passes can be stored and fanned out as JSON
    except ApiError as exc:
        assert exc.code in ("invalid_blocks", "invalid_blocks_format")
    try:
        dumps(check_attachments(blocks))
    except ApiError as exc:
        assert exc.code in ("invalid_attachments", "too_many_attachments")


def test_numbers_json_cannot_carry_are_refused_in_blocks_and_attachments() -> None:
    """``1e400`` in a JSON body reads as infinity: it was stored and fanned out as ``Infinity``."""
    for huge in (float("inf"), float("-inf"), float("nan")):
        with pytest.raises(ApiError) as caught:
            check_blocks([{"type": "divider", "style": {"n": [huge]}}])
        assert caught.value.code == "invalid_blocks"
        with pytest.raises(ApiError) as caught:
            check_attachments([{"text": "a", "ts": huge}])
        assert caught.value.code == "invalid_attachments"
    assert check_attachments([{"text": "a", "ts": 1.5}]) == [{"text": "a", "ts": 1.5}]
    with pytest.raises(ValueError):
        dumps({"x": float("inf")})  # and the encoder never writes one


def _verdict(check: Any, value: Any, max_depth: int) -> str:
    try:
        check(value, "invalid_arguments", max_depth)
    except ApiError as exc:
        return exc.code
    return "ok"


@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow])
@given(
    value=st.dictionaries(st.text(st.characters(codec=None), max_size=8), st.text(st.characters(codec=None)))
    | st.dictionaries(st.text(max_size=8), json_values, max_size=4)
    | json_values,
    max_depth=st.integers(0, 3),
)
def test_check_texts_fast_path_agrees_with_the_whole_walk(value: Any, max_depth: int) -> None:
    # check_text answers a flat object of strings in C (round 4 of docs/publish-path.md)
    assert _verdict(check_text, value, max_depth) == _verdict(walk_text, value, max_depth)


# -- shapes bounded before the work they cost (webapp_stub/args.py; docs/hardening-webapp.md, 5) --------


def test_a_json_text_of_too_many_arrays_and_objects_is_refused_before_it_is_parsed() -> None:
    from webapp_stub.args import MAX_JSON_CONTAINERS, loads

    within = "[" + ",".join(["[]"] * (MAX_JSON_CONTAINERS - 1)) + "]"
    assert len(loads(within)) == MAX_JSON_CONTAINERS - 1
    with pytest.raises(ValueError, match="arrays and objects"):
        loads("[" + ",".join(["{}"] * MAX_JSON_CONTAINERS) + "]")
    with pytest.raises(ApiError, match="invalid_json"):
        parse_json_body(b'{"a": [' + b",".join([b"[]"] * MAX_JSON_CONTAINERS) + b"]}")
    with pytest.raises(ApiError, match="invalid_blocks"):  # a JSON argument of a form is bounded alike
        json_arg({"blocks": "[" + ",".join(["[]"] * MAX_JSON_CONTAINERS) + "]"}, "blocks")


def test_the_walk_looks_at_a_bounded_number_of_values_and_refuses_before_stacking_more() -> None:
    from webapp_stub.args import MAX_ARGS_VALUES

    walk_text({"a": [0] * (MAX_ARGS_VALUES - 3)}, "invalid_json")  # the object, its key, the list, its items
    with pytest.raises(ApiError, match="invalid_json"):
        walk_text({"a": [0] * (MAX_ARGS_VALUES - 2)}, "invalid_json")
    with pytest.raises(ApiError, match="invalid_json"):
        walk_text({str(i): "" for i in range(MAX_ARGS_VALUES)}, "invalid_json")
    with pytest.raises(ApiError, match="invalid_json"):  # two million values: refused at the list, not walked
        parse_json_body(b'{"a": [' + b",".join([b"0"] * 2_000_000) + b"]}")


def test_a_form_of_more_fields_than_aiohttp_allows_a_multipart_one_is_invalid_form_data() -> None:
    from webapp_stub.args import MAX_FORM_FIELDS, parse_body

    form = "application/x-www-form-urlencoded"
    assert len(parse_body("&".join(f"a{i}=" for i in range(MAX_FORM_FIELDS)).encode(), form)) == MAX_FORM_FIELDS
    with pytest.raises(ApiError, match="invalid_form_data"):
        parse_body("&".join(f"a{i}=" for i in range(MAX_FORM_FIELDS + 1)).encode(), form)
    assert parse_body(b"text=" + b"%26" * 5_000, form) == {"text": "&" * 5_000}  # an escaped "&" is not a field


def mocked_post(body: bytes, ctype: str, app: web.Application, query: str = "") -> web.Request:
    """A request to ``read_args`` with ``body`` already arrived."""
    payload = StreamReader(mock.Mock(_reading_paused=False), 2**16, loop=asyncio.get_running_loop())
    payload.feed_data(body)
    payload.feed_eof()
    headers = {"Content-Type": ctype, "Content-Length": str(len(body))}
    return make_mocked_request("POST", f"/api/auth.test{query}", headers=headers, app=app, payload=payload)


async def test_a_large_body_is_checked_on_the_body_thread_and_not_again_in_the_event_loop(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Its walk (up to MAX_ARGS_VALUES values, about 12 ms) ran a second time in the event loop,
    before the token is known: the body thread took the parse off the loop but not the walk."""
    from webapp_stub import args as args_module

    walked_in: list[str] = []
    walk = args_module.walk_text

    def spy(*a: Any, **kw: Any) -> None:
        walked_in.append(threading.current_thread().name)
        walk(*a, **kw)

    monkeypatch.setattr(args_module, "walk_text", spy)
    app = web.Application()
    parser = args_module.BodyThread()
    try:
        app[args_module.BODY_PARSER_KEY] = parser
        body = b'{"a": [' + b",".join([b'"x"'] * 30_000) + b"]}"
        assert len(body) > args_module.LARGE_BODY_BYTES
        parsed = await args_module.read_args(mocked_post(body, "application/json", app, "?token=t"))
    finally:
        parser.close()
    assert len(parsed["a"]) == 30_000 and parsed["token"] == "t"
    assert walked_in and all(name.startswith("rtm-body-parser") for name in walked_in), walked_in


async def test_large_bodies_waiting_for_the_body_thread_are_bounded() -> None:
    """At most MAX_LARGE_BODIES_WAITING wait (each holds its body); the next is ratelimited at once."""
    from webapp_stub.args import BodyThread

    parser = BodyThread(max_waiting=2)
    gate = threading.Event()
    try:
        parser.executor.submit(gate.wait, 10)  # the thread busy
        form = "application/x-www-form-urlencoded"
        waiting = [asyncio.create_task(parser.parse(b"a=1", form)), asyncio.create_task(parser.parse(b"b=2", form))]
        await asyncio.sleep(0)  # wait-ok: one loop turn, so both tasks have entered parse()
        assert parser.waiting == 2
        with pytest.raises(ApiError, match="ratelimited") as refused:
            await parser.parse(b"c=3", form)
        assert refused.value.status == 429 and refused.value.headers == {"Retry-After": "1"}
        gate.set()
        assert await asyncio.gather(*waiting) == [{"a": "1"}, {"b": "2"}]
        assert parser.waiting == 0
    finally:
        gate.set()
        parser.close()
