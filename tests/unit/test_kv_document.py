"""Consul KV documents: every malformed value is a BadDocument, never another exception;
followers keep the last good ring; the region map and drain flags are checked too."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from services import regions
from services.directory import RingFollower
from services.errors import BadDocument
from services.kv_document import MAX_KV_DOCUMENT_BYTES, load_json
from services.ring import CHANNEL_RING_KEY, RingDocument

GOOD = RingDocument(version=5, slots={"cs-0": "cs-a", "cs-1": "cs-b", "cs-2": None})

MALFORMED_RINGS = [
    b"[]",
    b"null",
    b'{"version": Infinity, "slots": {"cs-0": "a"}}',
    b'{"version": NaN, "slots": {}}',
    b"{not json",
    b'"a string"',
    b"7",
    b'{"version": "7", "slots": {}}',
    b'{"version": 7.0, "slots": {}}',
    b'{"version": true, "slots": {}}',
    b'{"version": -1, "slots": {}}',
    b'{"version": 9007199254740992, "slots": {}}',
    b'{"version": 1e400, "slots": {}}',
    b'{"slots": {"cs-0": "a"}}',
    b'{"version": 6, "slots": []}',
    b'{"version": 6, "slots": {"cs-0": 5}}',
    b'{"version": 6, "slots": {"": "a"}}',
    b'{"version": 6, "slots": {"cs-0": ["a"]}}',
    b"\xff\xfe\x00",
    b"[" * 100_000,
    b'{"version": 6, "slots": {' + b",".join(b'"s%d": null' % i for i in range(5000)) + b"}}",
    b" " * (MAX_KV_DOCUMENT_BYTES + 1),
]


@pytest.mark.parametrize("raw", MALFORMED_RINGS, ids=lambda raw: raw[:24].decode(errors="replace"))
def test_malformed_ring_documents_are_bad_documents(raw: bytes) -> None:
    with pytest.raises(BadDocument) as info:
        RingDocument.from_json(raw, CHANNEL_RING_KEY)
    assert info.value.key == CHANNEL_RING_KEY and info.value.detail


def test_a_good_ring_document_round_trips_and_absence_is_version_zero() -> None:
    assert RingDocument.from_json(GOOD.to_json()) == GOOD
    assert RingDocument.from_json(None) == RingDocument(version=0, slots={})


class Counted:
    def __init__(self) -> None:
        self.bad: list[BadDocument] = []

    def __call__(self, exc: BadDocument) -> None:
        self.bad.append(exc)


def follower() -> tuple[RingFollower, list[tuple[int, int]], Counted]:
    changes: list[tuple[int, int]] = []
    counted = Counted()
    f = RingFollower(
        discovery=None,  # type: ignore[arg-type]  # apply_raw never touches Consul
        on_change=lambda old, new: changes.append((old.version, new.version)),
        on_bad_document=counted,
    )
    return f, changes, counted


@pytest.mark.parametrize("raw", MALFORMED_RINGS[:8], ids=lambda raw: raw[:24].decode(errors="replace"))
def test_a_follower_keeps_the_last_good_ring_and_counts_a_bad_one(raw: bytes) -> None:
    f, changes, counted = follower()
    f.apply_raw(GOOD.to_json())
    f.apply_raw(raw)
    assert f.ring.doc == GOOD and f.ring.owner_for("C1") is not None
    assert len(counted.bad) == 1 and f.bad_documents == 1
    newer = GOOD.with_owner("cs-2", "cs-c")
    f.apply_raw(newer.to_json())  # the next good document is applied as usual
    assert f.ring.doc == newer and changes == [(0, 5), (5, 6)]


def test_an_older_version_is_refused_and_counted_an_equal_one_ignored_quietly() -> None:
    f, changes, counted = follower()
    f.apply_raw(GOOD.to_json())
    f.apply_raw(GOOD.to_json())  # a re-read of the same document: not an error
    assert counted.bad == []
    f.apply_raw(RingDocument(version=3, slots={"cs-0": "x"}).to_json())
    assert f.ring.doc == GOOD
    assert len(counted.bad) == 1 and "older" in str(counted.bad[0])
    f.apply_raw(None)  # the key deleted: keep the ring
    assert f.ring.doc == GOOD and len(counted.bad) == 2
    assert changes == [(0, 5)]


def test_region_map_is_checked() -> None:
    assert regions.parse_map(b'{"us-east": ["eu-west"], "eu-west": []}') == {"us-east": ["eu-west"], "eu-west": []}
    assert regions.parse_map(None) == {}
    for raw in (b"[]", b"null", b'{"us-east": "eu-west"}', b'{"US EAST": []}', b'{"a": [1]}', b"{bad", b"NaN"):
        with pytest.raises(BadDocument):
            regions.parse_map(raw)


def test_drain_flags_that_name_no_region_drain_nothing() -> None:
    drained, refused = regions.drained_regions(
        [regions.drained_key("us-east"), regions.DRAINED_PREFIX + "../x", regions.DRAINED_PREFIX, "other/key"]
    )
    assert drained == {"us-east"}
    assert len(refused) == 3


# -- properties --------------------------------------------------------------------------------
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=16,
)
RING_LIKE = st.fixed_dictionaries(
    {},
    optional={
        "version": JSON_VALUES | st.integers(min_value=-1, max_value=2**60),
        "slots": st.dictionaries(st.text(max_size=10), st.none() | st.text(max_size=10) | JSON_VALUES, max_size=5)
        | JSON_VALUES,
    },
)


def dumps(value: Any) -> bytes:
    return json.dumps(value, allow_nan=True).encode()


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=300) | JSON_VALUES.map(dumps) | RING_LIKE.map(dumps))
def test_any_value_is_a_ring_document_or_a_bad_document(raw: bytes) -> None:
    try:
        doc = RingDocument.from_json(raw)
    except BadDocument:
        return
    assert type(doc.version) is int and 0 <= doc.version < 2**53
    assert all(isinstance(s, str) and (o is None or isinstance(o, str)) for s, o in doc.slots.items())
    assert RingDocument.from_json(doc.to_json()) == doc


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300) | JSON_VALUES.map(dumps))
def test_any_value_is_a_region_map_or_a_bad_document(raw: bytes) -> None:
    try:
        region_map = regions.parse_map(raw)
    except BadDocument:
        return
    assert all(isinstance(r, str) and all(isinstance(o, str) for o in others) for r, others in region_map.items())


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=200) | st.text(max_size=200))
def test_load_json_raises_only_bad_document(raw: bytes | str) -> None:
    try:
        load_json("k", raw)
    except BadDocument:
        pass


async def test_a_watch_callback_that_raises_does_not_end_the_watch() -> None:
    from services.discovery import _call

    seen: list[bytes] = []

    async def callback(value: bytes) -> None:
        seen.append(value)
        raise ValueError("a value this callback cannot take")

    await _call(callback, b"[]")  # logged, not raised: the watch loop calls the next value
    await _call(lambda value: seen.append(value), b"{}")
    assert seen == [b"[]", b"{}"]
