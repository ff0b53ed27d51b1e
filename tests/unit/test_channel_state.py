"""Unit tests for channel_server.state: the ChannelTable in-memory model."""

from __future__ import annotations

from typing import Any

from channel_server.state import ChannelTable, Published, mask_indexes
from services import wire


def decode(frame: bytes) -> dict[str, Any]:
    (msg,) = wire.FrameDecoder().feed(frame)
    return msg


def seqs(frames: list[bytes]) -> list[int]:
    return [decode(frame)["seq"] for frame in frames]


def publish_n(table: ChannelTable, channel: str, first: int, last: int) -> None:
    for seq in range(first, last + 1):
        assert table.publish(channel, seq, b'{"n":%d}' % seq, float(seq)) is not None


def test_mask_indexes() -> None:
    assert list(mask_indexes(0)) == []
    assert list(mask_indexes(0b1)) == [0]
    assert list(mask_indexes(0b101100)) == [2, 3, 5]
    assert list(mask_indexes(1 << 70)) == [70]


def test_gateway_indexes_are_small_and_stable() -> None:
    table = ChannelTable()
    assert table.index_of("gw-a") == 0
    assert table.index_of("gw-b") == 1
    assert table.index_of("gw-a") == 0
    assert table.index_of("gw-c") == 2


def test_subscribe_and_unsubscribe_masks() -> None:
    table = ChannelTable()
    a, b = table.index_of("gw-a"), table.index_of("gw-b")
    assert table.subscribe(a, "C1", -1) == []
    assert table.subscribers == {"C1": 0b01}
    table.subscribe(b, "C1", -1)
    table.subscribe(a, "C1", -1)  # idempotent
    assert table.subscribers == {"C1": 0b11}
    table.subscribe(b, "C2", -1)
    assert table.subscribers == {"C1": 0b11, "C2": 0b10}
    table.unsubscribe(a, "C1")
    assert table.subscribers == {"C1": 0b10, "C2": 0b10}
    table.unsubscribe(b, "C1")
    assert "C1" not in table.subscribers  # an empty mask costs no entry
    table.unsubscribe(a, "C9")  # never subscribed: no-op, no entry
    assert table.subscribers == {"C2": 0b10}


def test_publish_reports_frame_and_subscriber_mask() -> None:
    table = ChannelTable()
    a, b = table.index_of("gw-a"), table.index_of("gw-b")
    table.subscribe(a, "C1", -1)
    table.subscribe(b, "C1", -1)
    result = table.publish("C1", 1, b'{"type":"message"}', 12.5, ctl={"join": "C9", "since": 3})
    assert isinstance(result, Published)
    assert result.mask == 0b11
    assert decode(result.frame) == {
        "op": "ev",
        "ch": "C1",
        "seq": 1,
        "json": b'{"type":"message"}',
        "t0": 12.5,
        "ctl": {"join": "C9", "since": 3},
    }
    assert result.frame == wire.encode_event("C1", 1, b'{"type":"message"}', 12.5, {"join": "C9", "since": 3})


def test_publish_without_subscribers_still_records() -> None:
    table = ChannelTable()
    result = table.publish("C1", 1, b"{}", 0.0)
    assert result is not None and result.mask == 0
    assert table.last_seq == {"C1": 1}
    assert [seq for seq, _ in table.history["C1"]] == [1]


def test_replay_since_seq_from_history_in_order() -> None:
    table = ChannelTable()
    publish_n(table, "C1", 1, 10)
    index = table.index_of("gw-a")
    replay = table.subscribe(index, "C1", 6)
    assert seqs(replay) == [7, 8, 9, 10]
    assert [decode(frame)["json"] for frame in replay] == [b'{"n":%d}' % n for n in (7, 8, 9, 10)]
    # The replayed frames are the very bytes fanned out live.
    assert replay == [frame for seq, frame in table.history["C1"] if seq > 6]


def test_replay_edges() -> None:
    table = ChannelTable()
    publish_n(table, "C1", 1, 5)
    index = table.index_of("gw-a")
    assert seqs(table.subscribe(index, "C1", 0)) == [1, 2, 3, 4, 5]
    assert table.subscribe(index, "C1", 5) == []
    assert table.subscribe(index, "C1", 99) == []
    assert table.subscribe(index, "C1", -1) == []  # live only
    assert table.subscribe(index, "C-empty", 0) == []


def test_history_is_bounded() -> None:
    table = ChannelTable(history_events=3)
    publish_n(table, "C1", 1, 10)
    assert [seq for seq, _ in table.history["C1"]] == [8, 9, 10]
    assert seqs(table.subscribe(table.index_of("gw"), "C1", 0)) == [8, 9, 10]
    assert table.history_bytes == sum(len(frame) for _, frame in table.history["C1"])


def test_history_bytes_accounting_across_channels_and_forget() -> None:
    table = ChannelTable(history_events=4)
    publish_n(table, "C1", 1, 9)
    publish_n(table, "C2", 1, 2)
    expected = sum(len(frame) for held in table.history.values() for _, frame in held)
    assert table.history_bytes == expected
    table.forget("C1")
    assert table.history_bytes == sum(len(frame) for _, frame in table.history["C2"])
    table.forget("C2")
    assert table.history_bytes == 0


def test_zero_history_keeps_nothing_but_still_dedups() -> None:
    table = ChannelTable(history_events=0)
    publish_n(table, "C1", 1, 3)
    assert table.history == {}
    assert table.history_bytes == 0
    assert table.publish("C1", 3, b"{}", 0.0) is None
    assert table.subscribe(table.index_of("gw"), "C1", 0) == []


def test_dedup_of_seq_not_above_last() -> None:
    table = ChannelTable()
    publish_n(table, "C1", 1, 5)
    assert table.publish("C1", 5, b"again", 0.0) is None
    assert table.publish("C1", 2, b"old", 0.0) is None
    assert table.last_seq["C1"] == 5
    assert [seq for seq, _ in table.history["C1"]] == [1, 2, 3, 4, 5]
    # A later seq (even with a hole before it) is applied.
    assert table.publish("C1", 8, b"{}", 0.0) is not None
    assert table.last_seq["C1"] == 8
    assert table.publish("C1", 7, b"{}", 0.0) is None


def test_dedup_is_per_channel() -> None:
    table = ChannelTable()
    publish_n(table, "C1", 1, 5)
    assert table.publish("C2", 1, b"{}", 0.0) is not None


def test_transient_events_are_fanned_out_and_not_stored() -> None:
    table = ChannelTable()
    index = table.index_of("gw-a")
    table.subscribe(index, "C1", -1)
    publish_n(table, "C1", 1, 2)
    history_before = list(table.history["C1"])
    bytes_before = table.history_bytes
    result = table.publish("C1", None, b'{"type":"user_typing"}', 3.0)
    assert result is not None
    assert result.mask == 1 << index
    assert decode(result.frame)["seq"] is None
    assert list(table.history["C1"]) == history_before
    assert table.history_bytes == bytes_before
    assert table.last_seq["C1"] == 2
    # Transient publishes are never deduplicated against each other.
    assert table.publish("C1", None, b'{"type":"user_typing"}', 3.0) is not None


def test_transient_on_a_fresh_channel_allocates_nothing() -> None:
    table = ChannelTable()
    result = table.publish("C1", None, b"{}", 0.0)
    assert result is not None and result.mask == 0
    assert table.history == {}
    assert table.last_seq == {}
    assert table.subscribers == {}
    assert table.known_channels() == set()


def test_forget() -> None:
    table = ChannelTable()
    a, b = table.index_of("gw-a"), table.index_of("gw-b")
    table.subscribe(a, "C1", -1)
    table.subscribe(b, "C1", -1)
    table.subscribe(a, "C2", -1)
    publish_n(table, "C1", 1, 3)
    assert table.forget("C1") == 0b11
    assert "C1" not in table.subscribers
    assert "C1" not in table.history
    assert "C1" not in table.last_seq
    assert table.known_channels() == {"C2"}
    # After forgetting, seq 1 is new again (the channel moved away and back).
    assert table.publish("C1", 1, b"{}", 0.0) is not None
    assert table.forget("C-never") == 0


def test_drop_gateway() -> None:
    table = ChannelTable()
    a, b = table.index_of("gw-a"), table.index_of("gw-b")
    for channel in ("C1", "C2", "C3"):
        table.subscribe(a, channel, -1)
    table.subscribe(b, "C2", -1)
    publish_n(table, "C1", 1, 2)
    assert table.drop_gateway(a) == 3
    assert table.subscribers == {"C2": 0b10}
    assert table.publish("C1", 3, b"{}", 0.0).mask == 0  # type: ignore[union-attr]
    assert table.drop_gateway(a) == 0
    assert [seq for seq, _ in table.history["C1"]] == [1, 2, 3]  # history survives the gateway
    # The gateway comes back with its old index.
    assert table.index_of("gw-a") == a


def test_no_history_entry_for_a_channel_that_never_got_an_event() -> None:
    table = ChannelTable()
    index = table.index_of("gw-a")
    for i in range(1000):
        table.subscribe(index, f"C{i}", 0)  # with a since_seq: a replay lookup
    for i in range(0, 1000, 2):
        table.unsubscribe(index, f"C{i}")
    assert table.history == {}
    assert table.last_seq == {}
    assert len(table.subscribers) == 500
    assert all(mask == 1 for mask in table.subscribers.values())
    table.publish("C1", 1, b"{}", 0.0)
    assert list(table.history) == ["C1"]


def test_known_channels() -> None:
    table = ChannelTable()
    table.subscribe(table.index_of("gw"), "C1", -1)
    table.publish("C2", 1, b"{}", 0.0)
    assert table.known_channels() == {"C1", "C2"}


def test_a_disconnected_gateways_index_is_reused_so_masks_stay_small() -> None:
    table = ChannelTable()
    a = table.index_of("gw-a")
    table.subscribe(a, "C1", -1)
    for n in range(1000):  # gateways come and go (restarts get new instance ids)
        index = table.index_of(f"gw-{n}")
        table.subscribe(index, "C1", -1)
        assert index == 1
        table.drop_gateway(index)
    assert table.subscribers["C1"] == 0b1
    assert max(table.gateway_index.values()) == 0
    b, c = table.index_of("gw-b"), table.index_of("gw-c")
    assert (b, c) == (1, 2)
    table.drop_gateway(a)
    assert table.index_of("gw-d") == 0  # the lowest free index first
    assert table.index_of("gw-b") == 1  # a connected gateway keeps its index
