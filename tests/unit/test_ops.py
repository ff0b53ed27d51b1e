"""The declared op table: every op parses into its record or refuses with a clear BadMessage."""

from __future__ import annotations

from dataclasses import fields
from typing import Any

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from services import ops, wire
from services.errors import BadMessage

# One valid example per op: the table must cover every op, and each must round-trip.
EXAMPLES: dict[str, dict[str, Any]] = {
    "pub": {"op": "pub", "ch": "C0A1B2C3D4E", "seq": 7, "json": b"{}", "t0": 1.5, "eid": "e7", "ctl": None},
    "pubs": {
        "op": "pubs",
        "evs": [
            {"ch": "C0A1B2C3D4E", "seq": 7, "json": b"{}", "t0": 1.5, "eid": "e7"},
            {"ch": "U0A1B2C3D4E", "seq": 3, "json": b"{}", "t0": 1.5, "ctl": {"join": "C1", "since": 2}},
        ],
        "rv": 4,
    },
    "sub": {"op": "sub", "gw": "gw-us-east-0", "chans": [["C1", -1], ["C2", 0], ["C3", 12]], "rv": 3},
    "unsub": {"op": "unsub", "gw": "gw-us-east-0", "chans": ["C1", "C2"]},
    "seqs": {"op": "seqs", "gw": "gw-us-east-0", "chans": ["C1", "C2"]},
    "ev": {"op": "ev", "ch": "C1", "seq": None, "json": b'{"type":"user_typing"}', "t0": 2.0, "ctl": {"from": "U1"}},
    "moved": {"op": "moved", "chans": ["C1"], "version": 4},
    "ping": {"op": "ping"},
    "lease": {"op": "lease", "gw": "gw-1", "epoch": 1_765_000_000_000_000_000, "rv": 2},  # time.time_ns()-based
    "release": {"op": "release", "gw": "gw-1"},
    "query": {"op": "query", "users": ["U1", "U2"], "rv": 1},
    "online": {"op": "online", "gw": "gw-1", "users": ["U1", "U2"], "epoch": 3, "rv": 1, "teams": ["T1", None]},
    "offline": {"op": "offline", "gw": "gw-1", "users": ["U1"], "epoch": 3},
    "psub": {"op": "psub", "gw": "gw-1", "users": ["U1"], "epoch": 3},
    "punsub": {"op": "punsub", "gw": "gw-1", "users": ["U1"]},
    "synced": {"op": "synced", "gw": "gw-1", "epoch": 3},
    "presence": {"op": "presence", "changes": [["U1", "away"], ["U2", "active"]], "teams": ["T1", None]},
    "not_owner": {"op": "not_owner", "users": ["U1"], "version": 2},
    "set_presence": {"op": "set_presence", "users": [["U1", "auto"], ["U2", "away"]], "rv": 1},
    "get_presence": {"op": "get_presence", "user": "U1"},
    "ring_add_slot": {"op": "ring_add_slot", "ring": "channel"},
    "ring_remove_slot": {"op": "ring_remove_slot", "ring": "presence", "slot": "ps-2"},
}


def test_every_op_has_an_example_and_a_complete_declaration() -> None:
    assert set(EXAMPLES) == set(ops.OPS)
    for name, cls in ops.OPS.items():
        assert cls.OP == name
        assert cls.DIRECTION in ("request", "push")
        assert cls.SENT_BY and cls.SENDERS
        assert [f.name for f in fields(cls)] == list(cls.SCHEMA)  # type: ignore[arg-type]


@pytest.mark.parametrize("name", sorted(EXAMPLES))
def test_each_op_round_trips_through_its_record(name: str) -> None:
    record = ops.parse(EXAMPLES[name])
    assert isinstance(record, ops.OPS[name])
    again = ops.parse(msgpack.unpackb(msgpack.packb(record.to_message(), use_bin_type=True), raw=False))
    assert again == record


def test_the_ev_encoder_agrees_with_the_event_record() -> None:
    frame = wire.encode_event("C1", 5, b"{}", 3.25, {"join": "C9", "since": 2})
    (decoded,) = wire.FrameDecoder().feed(frame)
    assert ops.parse_as(decoded, ops.Event) == ops.Event(
        ch="C1", seq=5, json=b"{}", t0=3.25, ctl={"join": "C9", "since": 2}
    )


def refused(message: dict[str, Any], *words: str) -> BadMessage:
    with pytest.raises(BadMessage) as info:
        ops.parse(message)
    for word in words:
        assert word in str(info.value), info.value
    return info.value


@pytest.mark.parametrize(
    ("change", "words"),
    [
        ({"seq": 2**63}, ("seq", "outside")),  # the seq that made a channel server ack everything as a duplicate
        ({"seq": 2**53}, ("seq", "outside")),
        ({"seq": 0}, ("seq",)),
        ({"seq": -5}, ("seq",)),
        ({"seq": 1.5}, ("seq", "integer")),
        ({"seq": True}, ("seq", "bool")),
        ({"seq": None, "ctl": [1, 2]}, ("ctl", "map")),  # the ctl that made every gateway drop its link
        ({"seq": None, "ctl": "from"}, ("ctl", "map")),
        ({"ctl": {"evil": 1}}, ("ctl", "unknown")),
        ({"ctl": {"join": 5}}, ("ctl", "join")),
        ({"ctl": {"since": 3}}, ("since without join",)),
        ({"ctl": {"upto": 3}}, ("upto without leave",)),
        ({"ctl": {"leave": "C1A2B3", "upto": 0}}, ("upto",)),
        ({"ctl": {"revoke": "xoxp-a-token-not-its-id"}}, ("revoke", "token id")),  # never the token itself
        ({"ctl": {"revoke": "A" * 32}}, ("revoke", "token id")),
        ({"ch": 12345}, ("ch", "int")),  # the int channel
        ({"ch": "general"}, ("ch", "channel id")),
        ({"ch": "C" * 40}, ("ch",)),
        ({"json": "text"}, ("json", "bytes")),
        ({"json": b"x" * (ops.MAX_EVENT_JSON_BYTES + 1)}, ("json", "MAX_EVENT_JSON_BYTES")),
        ({"t0": float("nan")}, ("t0",)),
        ({"t0": float("inf")}, ("t0",)),
        ({"t0": -1}, ("t0",)),
        ({"eid": "e" * 1000}, ("eid",)),
        ({"rv": -1}, ("rv",)),
    ],
)
def test_pub_fields_are_checked(change: dict[str, Any], words: tuple[str, ...]) -> None:
    refused({**EXAMPLES["pub"], **change}, "bad pub", *words)


def test_a_revoke_ctl_carries_a_token_id() -> None:
    """auth.revoke's user-channel event passes every hop's check (else it would be dead-lettered)."""
    tid = "0123456789abcdef" * 2
    record = ops.parse_as({**EXAMPLES["pub"], "ch": "U0A1B2C3D4E", "ctl": {ops.REVOKE_CTL: tid}}, ops.Publish)
    assert record.ctl == {"revoke": tid}


def test_a_missing_required_field_is_named() -> None:
    message = dict(EXAMPLES["pub"])
    del message["seq"]
    refused(message, "seq is missing")


def test_a_transient_pub_has_a_nil_seq() -> None:
    record = ops.parse_as({**EXAMPLES["pub"], "seq": None, "ctl": {"from": "U1"}}, ops.Publish)
    assert record.seq is None and record.ctl == {"from": "U1"}


def test_sub_with_400k_channels_is_refused_by_name_of_the_limit() -> None:
    message = {"op": "sub", "gw": "gw-1", "chans": [[f"C{i:X}0", -1] for i in range(400_000)]}
    refused(message, "chans", str(ops.MAX_SUB_CHANNELS))


@pytest.mark.parametrize(
    "chans",
    [[["C1"]], [["C1", -2]], [["C1", 2**53]], [[1, 0]], "C1", [["C1", None]], [["C1", 0, 0]]],
)
def test_sub_entries_are_pairs_of_channel_and_since(chans: Any) -> None:
    refused({"op": "sub", "gw": "gw-1", "chans": chans}, "chans")


def test_unknown_and_unexpected_ops_are_refused() -> None:
    refused({"op": "nope"}, "unknown op")
    refused({"id": 1}, "string op")
    with pytest.raises(BadMessage, match="unknown op here"):
        ops.parse(EXAMPLES["lease"], (ops.Publish, ops.Subscribe))


def test_unknown_top_level_fields_are_ignored() -> None:
    assert ops.parse({**EXAMPLES["ping"], "id": 3, "future_field": [1]}) == ops.Ping()


def test_presence_values_are_checked() -> None:
    refused({"op": "presence", "changes": [["U1", "busy"]]}, "changes")
    refused({"op": "set_presence", "users": [["U1", "active"]]}, "users")
    refused({"op": "online", "gw": "gw-1", "users": ["U1"] * (ops.MAX_BATCH_USERS + 1)}, "users")


def test_presence_teams_go_one_per_user_or_change_and_may_be_absent() -> None:
    """Finding 5 (docs/authz-review.md): ``teams`` beside ``online`` users and ``presence``
    changes, of the same length, team ids or nil; an older peer's message without it parses."""
    online = ops.parse_as(EXAMPLES["online"], ops.Online)
    assert online.teams == ["T1", None]
    assert ops.parse_as({**EXAMPLES["online"], "teams": None}, ops.Online).teams is None
    old = {k: v for k, v in EXAMPLES["presence"].items() if k != "teams"}
    assert ops.parse_as(old, ops.PresenceChanges).teams is None
    refused({**EXAMPLES["online"], "teams": ["T1"]}, "1 entries for 2 users")
    refused({**EXAMPLES["presence"], "teams": ["T1", None, "T2"]}, "3 entries for 2 changes")
    refused({**EXAMPLES["online"], "teams": ["T1", "../x"]}, "teams")
    refused({**EXAMPLES["presence"], "teams": "T1"}, "teams")
    refused({**EXAMPLES["online"], "teams": ["T1"] * (ops.MAX_BATCH_USERS + 1)}, "teams")


def test_a_query_answer_is_checked_with_its_teams() -> None:
    answer = {"presence": [["U1", "active"], ["U2", "away"]], "teams": ["T1", None], "not_owner": []}
    assert ops.query_answer(answer) == [("U1", "active", "T1"), ("U2", "away", None)]
    assert ops.query_answer({"presence": [["U1", "active"]]}) == [("U1", "active", None)]  # an older server
    for bad in (
        {**answer, "teams": ["T1"]},
        {**answer, "teams": [1, 2]},
        {**answer, "presence": [["U1", "busy"], ["U2", "away"]]},
        {**answer, "presence": "U1"},
    ):
        with pytest.raises(BadMessage, match="query"):
            ops.query_answer(bad)


def test_ring_ops_are_checked() -> None:
    refused({"op": "ring_add_slot", "ring": "other"}, "ring")
    refused({"op": "ring_remove_slot", "ring": "channel", "slot": "../etc"}, "slot")


# -- properties: whatever the map, a record or a clear error ------------------------------------
SCALARS = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**64), max_value=2**64)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=40)
    | st.binary(max_size=40)
)
VALUES = st.recursive(
    SCALARS,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)


def near_valid(name: str) -> st.SearchStrategy[dict[str, Any]]:
    """The op's valid example with some fields replaced by arbitrary values, some removed."""
    example = EXAMPLES[name]
    keys = sorted(k for k in example if k != "op")
    return st.tuples(
        st.dictionaries(st.sampled_from(keys), VALUES, max_size=len(keys)) if keys else st.just({}),
        st.sets(st.sampled_from(keys)) if keys else st.just(set()),
    ).map(lambda pair: {k: v for k, v in {**example, **pair[0]}.items() if k not in pair[1]})


@settings(max_examples=400, deadline=None)
@given(st.sampled_from(sorted(EXAMPLES)).flatmap(near_valid))
def test_any_near_valid_map_parses_or_is_refused_clearly(message: dict[str, Any]) -> None:
    try:
        record = ops.parse(message)
    except BadMessage as exc:
        assert exc.op and exc.detail
        return
    assert isinstance(record, ops.OPS[message["op"]])
    if isinstance(record, ops.Publishes) and any(isinstance(item, BadMessage) for item in record.evs):
        with pytest.raises(ValueError):  # a refused item is answered alone, never sent on
            record.to_message()
        return
    assert ops.parse(record.to_message()) == record  # what was accepted is clean enough to send again


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.text(max_size=8) | st.sampled_from(["op", "ch", "seq"]), VALUES, max_size=6))
def test_any_map_at_all_parses_or_is_refused_clearly(message: dict[str, Any]) -> None:
    try:
        ops.parse(message)
    except BadMessage:
        pass


def test_batches_cut_a_list_to_its_limit() -> None:
    assert ops.batches(list(range(5)), 2) == [[0, 1], [2, 3], [4]]
    assert ops.batches([], 2) == [[]]


# -- pubs: many events in one frame (issue 17) ---------------------------------------------------
def pubs_of(*items: Any) -> dict[str, Any]:
    return {"op": "pubs", "evs": list(items)}


GOOD_ITEM = {"ch": "C1", "seq": 1, "json": b"{}", "t0": 1.0}


def test_pubs_refuses_a_bad_item_alone_and_keeps_the_others_in_order() -> None:
    bad = {"ch": "C1", "seq": 2, "json": b"{}", "ctl": {"nope": 1}}
    record = ops.parse_as(pubs_of(GOOD_ITEM, bad, "not a map", {**GOOD_ITEM, "seq": 3}), ops.Publishes)
    first, second, third, fourth = record.evs
    assert first == ops.Publish(ch="C1", seq=1, json=b"{}", t0=1.0)
    assert isinstance(second, BadMessage) and "evs item 1" in second.detail and "ctl" in second.detail
    assert isinstance(third, BadMessage) and "evs item 2" in third.detail and "map" in third.detail
    assert isinstance(fourth, ops.Publish) and fourth.seq == 3


def test_pubs_refuses_the_whole_frame_beyond_its_count_and_byte_bounds() -> None:
    refused({"op": "pubs", "evs": []}, "evs", "at least one")
    refused({"op": "pubs", "evs": {"ch": "C1"}}, "evs", "list")
    refused(pubs_of(*[GOOD_ITEM] * (ops.MAX_PUBS_EVENTS + 1)), "evs", "MAX_PUBS_EVENTS")
    big = {**GOOD_ITEM, "json": b"x" * (ops.MAX_PUBS_JSON_BYTES // 2 + 1)}
    refused(pubs_of(big, big), "evs", "MAX_PUBS_JSON_BYTES")
    assert len(ops.parse_as(pubs_of(*[GOOD_ITEM] * ops.MAX_PUBS_EVENTS), ops.Publishes).evs) == ops.MAX_PUBS_EVENTS


def test_an_items_own_rv_is_dropped_the_batch_rv_counts() -> None:
    record = ops.parse_as({"op": "pubs", "evs": [{**GOOD_ITEM, "rv": 9}], "rv": 2}, ops.Publishes)
    assert record.rv == 2 and record.evs[0] == ops.Publish(ch="C1", seq=1, json=b"{}", t0=1.0)
    assert record.to_message() == {"op": "pubs", "evs": [GOOD_ITEM], "rv": 2}


def _full_check(item: dict[str, Any]) -> ops.Publish | BadMessage:
    """What ``pubs`` made of an item before its fast check (field by field, every spec)."""
    try:
        record = ops._record(ops.Publish, "pubs", item)
    except BadMessage as exc:
        return exc
    return ops.Publish(record.ch, record.seq, record.json, record.t0, record.eid, record.ctl)


NEAR_ITEM_VALUES = {
    "ch": st.sampled_from(["C0A1B2C3D4E", "C1", "c1", "C", "C" * 33, "", "C1\n", 5, None, b"C1"]),
    "seq": st.one_of(st.sampled_from([1, 0, -1, 2**53 - 1, 2**53, True, None, 1.0, "1"]), st.integers(-10, 2**60)),
    "json": st.sampled_from([b"{}", b"", b"x" * (ops.MAX_EVENT_JSON_BYTES + 1), "{}", None, bytearray(b"{}")]),
    "t0": st.one_of(
        st.sampled_from(
            [1.5, 0.0, -0.0, -1.0, float("nan"), float("inf"), ops.MAX_T0_S, ops.MAX_T0_S * 2, 3, None, "1"]
        ),
        st.floats(),
    ),
    "eid": st.sampled_from(["e1", "", "x" * ops.MAX_EID_CHARS, "x" * (ops.MAX_EID_CHARS + 1), 7, None]),
    "ctl": st.sampled_from([None, {"join": "C1"}, {"nope": 1}, 3]),
    "rv": st.sampled_from([None, 2, -1, "x"]),
    "extra": st.sampled_from([1, None]),
}


@settings(max_examples=1500, deadline=None)
@given(st.fixed_dictionaries({}, optional=NEAR_ITEM_VALUES))
def test_the_fast_item_check_accepts_exactly_what_the_full_check_accepts(item: dict[str, Any]) -> None:
    # Issue 17: pubs items in the webapp's shape skip the field-by-field check; anything the
    # fast check takes must be what the full check takes, with the same record.
    fast = ops._plain_publish(item)
    full = _full_check(item)
    if fast is not None:
        assert fast == full, (item, fast, full)
    data = item.get("json")
    if type(data) is bytes and len(data) > ops.MAX_PUBS_JSON_BYTES:
        return  # the whole frame is refused (its byte bound) before any item counts
    (parsed,) = ops.publish_items([item])
    if isinstance(full, BadMessage):
        assert isinstance(parsed, BadMessage) and full.detail in parsed.detail
    else:
        assert parsed == full


def test_the_webapps_item_shape_takes_the_fast_check_and_a_known_channel_skips_the_regex() -> None:
    item = {"ch": "C0A1B2C3D4E", "seq": 7, "json": b"{}", "t0": 1.5, "eid": "e7"}
    assert ops._plain_publish(item) == ops.Publish("C0A1B2C3D4E", 7, b"{}", 1.5, "e7")
    assert "C0A1B2C3D4E" in ops._checked_channel_ids
    assert ops._plain_publish({**item, "ch": "c0a1"}) is None  # not remembered: checked again each time
    assert "c0a1" not in ops._checked_channel_ids
    assert ops._plain_publish({**item, "ctl": {"join": "C1"}}) is None  # other shapes: the full check
