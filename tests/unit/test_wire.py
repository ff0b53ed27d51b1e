"""Unit tests for services.wire: the sans-I/O length-prefixed msgpack codec."""

from __future__ import annotations

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from services import wire
from services.errors import FrameTooLarge, MalformedFrame


def raw_frame(body: bytes) -> bytes:
    return wire.HEADER.pack(len(body)) + body


def test_encode_is_length_prefixed_msgpack() -> None:
    frame = wire.encode({"op": "ping", "id": 7})
    (length,) = wire.HEADER.unpack_from(frame)
    assert length == len(frame) - wire.HEADER_BYTES
    assert msgpack.unpackb(frame[wire.HEADER_BYTES :], raw=False) == {"op": "ping", "id": 7}


def test_single_frame_round_trip_keeps_bytes_as_bytes() -> None:
    message = {"op": "pub", "ch": "C1", "seq": 3, "json": b'{"type":"message"}', "t0": 1.5}
    decoder = wire.FrameDecoder()
    assert decoder.feed(wire.encode(message)) == [message]
    assert decoder.error is None
    assert decoder.buffered_bytes == 0


def test_split_frames_byte_by_byte() -> None:
    messages = [{"op": "ev", "ch": f"C{i}", "seq": i, "json": b"x" * i} for i in range(5)]
    stream = b"".join(wire.encode(m) for m in messages)
    decoder = wire.FrameDecoder()
    out = []
    for index in range(len(stream)):
        out.extend(decoder.feed(stream[index : index + 1]))
    assert out == messages
    assert decoder.error is None
    assert decoder.buffered_bytes == 0


def test_partial_frame_is_buffered_until_complete() -> None:
    frame = wire.encode({"op": "ping"})
    decoder = wire.FrameDecoder()
    assert decoder.feed(frame[:3]) == []  # not even a whole header
    assert decoder.buffered_bytes == 3
    assert decoder.feed(frame[3:-1]) == []
    assert decoder.buffered_bytes == len(frame) - 1
    assert decoder.feed(frame[-1:]) == [{"op": "ping"}]
    assert decoder.buffered_bytes == 0


def test_merged_frames_in_one_chunk() -> None:
    messages = [{"op": "ev", "ch": "C", "seq": i} for i in range(100)]
    decoder = wire.FrameDecoder()
    assert decoder.feed(b"".join(wire.encode(m) for m in messages)) == messages
    assert decoder.buffered_bytes == 0


def test_merged_chunk_ending_in_a_partial_frame_keeps_the_tail() -> None:
    first, second = wire.encode({"op": "a"}), wire.encode({"op": "b", "pad": "y" * 50})
    decoder = wire.FrameDecoder()
    assert decoder.feed(first + second[:10]) == [{"op": "a"}]
    assert decoder.buffered_bytes == 10
    assert decoder.feed(second[10:]) == [{"op": "b", "pad": "y" * 50}]
    assert decoder.buffered_bytes == 0


def test_oversize_declared_length_rejected_before_buffering() -> None:
    decoder = wire.FrameDecoder(max_frame_bytes=1024)
    header = wire.HEADER.pack(0xFFFFFFFF)
    assert decoder.feed(header) == []
    assert isinstance(decoder.error, FrameTooLarge)
    assert decoder.error.length == 0xFFFFFFFF
    assert decoder.error.limit == 1024
    assert decoder.buffered_bytes == 0
    # The body that follows is never buffered: the decoder is dead.
    assert decoder.feed(b"\x00" * 100_000) == []
    assert decoder.buffered_bytes == 0


def test_oversize_with_body_in_the_same_chunk_does_not_keep_it() -> None:
    decoder = wire.FrameDecoder(max_frame_bytes=1024)
    assert decoder.feed(wire.HEADER.pack(2048) + b"z" * 2048) == []
    assert isinstance(decoder.error, FrameTooLarge)
    assert decoder.buffered_bytes == 0


def test_frame_exactly_at_the_limit_is_accepted() -> None:
    body = msgpack.packb({"op": "x", "pad": "p" * 100}, use_bin_type=True)
    decoder = wire.FrameDecoder(max_frame_bytes=len(body))
    assert decoder.feed(raw_frame(body)) == [{"op": "x", "pad": "p" * 100}]
    too_small = wire.FrameDecoder(max_frame_bytes=len(body) - 1)
    assert too_small.feed(raw_frame(body)) == []
    assert isinstance(too_small.error, FrameTooLarge)


def test_frames_before_an_error_are_returned() -> None:
    decoder = wire.FrameDecoder(max_frame_bytes=64)
    good = wire.encode({"op": "ok", "id": 1})
    assert decoder.feed(good + wire.HEADER.pack(65)) == [{"op": "ok", "id": 1}]
    assert isinstance(decoder.error, FrameTooLarge)
    assert decoder.buffered_bytes == 0


def test_garbage_bytes_are_malformed() -> None:
    decoder = wire.FrameDecoder()
    # A plausible length, then bytes that are not one msgpack object (0xc1 is never used).
    assert decoder.feed(raw_frame(b"\xc1\xc1\xc1\xc1")) == []
    assert isinstance(decoder.error, MalformedFrame)
    assert decoder.buffered_bytes == 0


def test_trailing_bytes_inside_a_frame_are_malformed() -> None:
    body = msgpack.packb({"op": "x"}) + msgpack.packb(1)
    decoder = wire.FrameDecoder()
    assert decoder.feed(raw_frame(body)) == []
    assert isinstance(decoder.error, MalformedFrame)


def test_empty_frame_is_malformed() -> None:
    decoder = wire.FrameDecoder()
    assert decoder.feed(raw_frame(b"")) == []
    assert isinstance(decoder.error, MalformedFrame)


@pytest.mark.parametrize(
    "value",
    [[1, 2, 3], "op", 42, None, {"id": 1}, {"op": 5}, {"op": None}],
    ids=["list", "str", "int", "nil", "map-without-op", "int-op", "nil-op"],
)
def test_valid_msgpack_that_is_not_a_map_with_a_string_op(value: object) -> None:
    decoder = wire.FrameDecoder()
    assert decoder.feed(raw_frame(msgpack.packb(value, use_bin_type=True))) == []
    assert isinstance(decoder.error, MalformedFrame)


def test_decoder_is_dead_after_an_error() -> None:
    decoder = wire.FrameDecoder()
    decoder.feed(raw_frame(msgpack.packb([1])))
    error = decoder.error
    assert isinstance(error, MalformedFrame)
    assert decoder.feed(wire.encode({"op": "ping"})) == []
    assert decoder.error is error
    assert decoder.buffered_bytes == 0


def test_encode_event_without_ctl() -> None:
    frame = wire.encode_event("C1", 12, b'{"type":"message","text":"hi"}', 1700000000.25)
    decoder = wire.FrameDecoder()
    assert decoder.feed(frame) == [
        {"op": "ev", "ch": "C1", "seq": 12, "json": b'{"type":"message","text":"hi"}', "t0": 1700000000.25}
    ]


def test_encode_event_with_ctl() -> None:
    frame = wire.encode_event("U1", 4, b"{}", 2.0, ctl={"join": "C9", "since": 12})
    (msg,) = wire.FrameDecoder().feed(frame)
    assert msg == {"op": "ev", "ch": "U1", "seq": 4, "json": b"{}", "t0": 2.0, "ctl": {"join": "C9", "since": 12}}


def test_encode_event_transient_seq_is_nil() -> None:
    (msg,) = wire.FrameDecoder().feed(wire.encode_event("C1", None, b"{}", 0.0))
    assert msg["seq"] is None
    assert "ctl" not in msg


def test_replies() -> None:
    assert wire.reply_ok(3, version=7) == {"op": "ok", "id": 3, "version": 7}
    assert wire.reply_err(4, "not_owner", "moved", version=8) == {
        "op": "err",
        "id": 4,
        "code": "not_owner",
        "detail": "moved",
        "version": 8,
    }


# -- properties: whatever the bytes and however they are cut, frames or a recorded error ----------
def chunked(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})
    return [data[a:b] for a, b in zip(points, points[1:], strict=False)]


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=2048), st.lists(st.integers(min_value=0, max_value=4096), max_size=8))
def test_arbitrary_bytes_in_any_chunks_give_frames_or_an_error_never_an_exception(data: bytes, cuts: list[int]) -> None:
    decoder = wire.FrameDecoder(max_frame_bytes=1024)
    frames = []
    for chunk in chunked(data, cuts):
        frames += decoder.feed(chunk)
        assert decoder.buffered_bytes <= 1024 + wire.HEADER_BYTES  # never more than one frame is held
    for frame in frames:
        assert isinstance(frame, dict) and isinstance(frame["op"], str)
    if decoder.error is not None:
        assert decoder.buffered_bytes == 0


MESSAGES = st.dictionaries(
    st.text(max_size=6),
    st.none() | st.integers(min_value=-(2**63), max_value=2**64 - 1) | st.text(max_size=20) | st.binary(max_size=20),
    max_size=5,
).map(lambda m: {**m, "op": "x"})


@settings(max_examples=300, deadline=None)
@given(st.lists(MESSAGES, min_size=1, max_size=6), st.lists(st.integers(min_value=0, max_value=4096), max_size=8))
def test_valid_frames_in_any_chunks_come_out_whole_and_in_order(
    messages: list[dict[str, object]], cuts: list[int]
) -> None:
    data = b"".join(wire.encode(m) for m in messages)
    decoder = wire.FrameDecoder()
    out = []
    for chunk in chunked(data, cuts):
        out += decoder.feed(chunk)
    assert out == messages
    assert decoder.error is None and decoder.buffered_bytes == 0


@settings(max_examples=200, deadline=None)
@given(st.integers(min_value=1025, max_value=2**32 - 1), st.binary(max_size=64))
def test_any_length_header_above_the_limit_is_refused_at_once(length: int, tail: bytes) -> None:
    decoder = wire.FrameDecoder(max_frame_bytes=1024)
    assert decoder.feed(wire.HEADER.pack(length) + tail) == []
    assert isinstance(decoder.error, FrameTooLarge) and decoder.buffered_bytes == 0
