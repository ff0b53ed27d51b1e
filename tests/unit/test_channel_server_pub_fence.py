"""A channel server that starts owning a slot between two pipelined publishes of one channel
applies them in seq order: the second is held (``not_owner``) until the refused first comes back.

Before channel_server/pub_fence.py, it refused pub 5 (the ring naming it owner not read yet),
applied pub 6, and then dropped the admin server's retry of 5 as a duplicate (5 <= last seq 6):
5 was never fanned out here, never in its history for a later ``sub since``, and the admin
server answered the webapp ``ok`` for it.
"""

from __future__ import annotations

from typing import Any

import msgpack

from channel_server.app import ChannelServer
from channel_server.pub_fence import PubFence
from services.identity import ADMIN_SERVER, GATEWAY, PeerIdentity
from tests.unit import test_channel_server_sub
from tests.unit.test_channel_server_sub import Conn, rings

server = test_channel_server_sub.server  # the same channel-server fixture


def pub(channel: str, seq: int, rv: int, request_id: int) -> dict[str, Any]:
    return {"op": "pub", "id": request_id, "ch": channel, "seq": seq, "json": b'{"n":%d}' % seq, "t0": 1.0, "rv": rv}


def seqs_written(conn: Conn) -> list[int]:
    return [msgpack.unpackb(frame[4:], raw=False)["seq"] for frame in conn.frames]


async def test_a_slot_owned_between_two_pipelined_pubs_applies_both_in_order(server: ChannelServer) -> None:
    v1, v2, channel = rings()  # v1: the channel's slot is another server's; v2: ours (a spare promoted)
    server.follower.apply(v1)
    admin = Conn(PeerIdentity(ADMIN_SERVER, "as-1"))
    # The admin server acts on v2 already; pub 5 arrives before this server has read v2...
    refused = server.handle_request(admin, pub(channel, 5, 2, 15))
    assert refused["op"] == "err" and refused["code"] == "not_owner"
    # ...then it reads v2, a gateway subscribes from the channel's bootstrap seq (4), and pub 6,
    # pipelined behind 5 on the same connection, arrives
    server.follower.apply(v2)
    gateway = Conn(PeerIdentity(GATEWAY, "gw-a"))
    server.handle_request(gateway, {"op": "sub", "id": 1, "gw": "gw-a", "chans": [[channel, 4]], "rv": 2})
    held = server.handle_request(admin, pub(channel, 6, 2, 16))
    assert held["op"] == "err" and held["code"] == "not_owner"  # not applied ahead of 5
    # the admin server's slow lane retries 5, then 6 (in order: admin_server/slow_lane.py)
    assert server.handle_request(admin, pub(channel, 5, 2, 17)) == {"op": "ok", "id": 17}
    assert server.handle_request(admin, pub(channel, 6, 2, 18)) == {"op": "ok", "id": 18}
    assert seqs_written(gateway) == [5, 6]  # both fanned out, in order (before: only 6)
    assert [seq for seq, _ in server.table.history[channel]] == [5, 6]  # both held for a later sub since
    assert channel not in server.fences[admin].refused  # the fence lifted
    assert server.handle_request(admin, pub(channel, 7, 2, 19)) == {"op": "ok", "id": 19}
    assert server.fenced._value.get() == 1  # type: ignore[attr-defined]


async def test_the_fence_is_per_connection_and_lifts_when_the_refused_seq_is_applied_elsewhere(
    server: ChannelServer,
) -> None:
    v1, v2, channel = rings()
    server.follower.apply(v1)
    first, second = Conn(PeerIdentity(ADMIN_SERVER, "as-1")), Conn(PeerIdentity(ADMIN_SERVER, "as-2"))
    assert server.handle_request(first, pub(channel, 5, 2, 1))["code"] == "not_owner"
    server.follower.apply(v2)
    assert server.handle_request(first, pub(channel, 6, 2, 2))["code"] == "not_owner"
    # the webapp resent from 5 through another admin server: that connection is not held
    assert server.handle_request(second, pub(channel, 5, 2, 3))["op"] == "ok"
    assert server.handle_request(second, pub(channel, 6, 2, 4))["op"] == "ok"
    assert server.handle_request(first, pub(channel, 7, 2, 5))["op"] == "ok"  # 5 applied: the fence lifted
    server.on_connection_closed(first, None)  # type: ignore[arg-type]
    assert first not in server.fences


def test_pub_fence_rules() -> None:
    fence = PubFence(max_channels=2)
    fence.refuse("C1", 5, 0.0)
    assert not fence.holds("C1", 4, 3, 0.0)  # an earlier one still in flight passes
    assert not fence.holds("C1", 5, 3, 0.0)  # the refused one, back
    assert fence.holds("C1", 6, 3, 0.0)
    assert fence.holds("C1", 6, -1, 0.0)  # a channel new here: nothing applied yet
    assert not fence.holds("C1", None, 3, 0.0)  # transient
    assert not fence.holds("C2", 6, 3, 0.0)  # another channel
    fence.refuse("C1", 6, 0.0)
    fence.refuse("C1", 4, 0.0)  # lowest 4, highest 6
    assert not fence.holds("C1", 4, 3, 0.0)
    assert fence.holds("C1", 5, 3, 0.0)  # 4 not applied yet
    assert not fence.holds("C1", 5, 4, 0.0)  # in order: the next one
    assert fence.holds("C1", 7, 5, 0.0)
    assert not fence.holds("C1", 7, 6, 0.0) and len(fence) == 0  # the highest refused applied: lifted
    fence.refuse("C1", 1, 0.0)
    fence.refuse("C2", 1, 0.0)
    fence.refuse("C3", 1, 0.0)  # past the bound: the oldest is forgotten
    assert fence.evictions == 1 and list(fence.refused) == ["C2", "C3"]
    fence.forget({"C2"})
    assert list(fence.refused) == ["C3"]


def test_a_pub_fence_lifts_after_its_hold() -> None:
    fence = PubFence(hold_s=30.0)
    fence.refuse("C1", 5, 100.0)
    assert fence.holds("C1", 6, 3, 129.9)
    assert not fence.holds("C1", 6, 3, 130.0) and len(fence) == 0  # stale: lifted whatever happened


async def test_a_refusal_for_a_slot_moved_away_holds_nothing_when_the_slot_comes_back(server: ChannelServer) -> None:
    # The slot is ours (v2), then another's (v3); the admin server still acts on v2 and sends
    # pub 6 here: refused, and its retry goes to the new owner, never here. When v4 gives the
    # slot back, this connection's later publishes of the channel must be applied, not held
    # for a pub 6 that will never come back (before: refused for good).
    _, v2, channel = rings()
    v3 = v2.with_owner("cs-1", "inst-elsewhere")
    v4 = v3.with_owner("cs-1", "spare-1")
    server.follower.apply(v2)
    server.follower.apply(v3)
    server.on_ring_change(v2, v3)
    admin = Conn(PeerIdentity(ADMIN_SERVER, "as-1"))
    assert server.handle_request(admin, pub(channel, 6, 2, 1))["code"] == "not_owner"
    assert admin not in server.fences or channel not in server.fences[admin].refused
    server.follower.apply(v4)
    server.on_ring_change(v3, v4)
    assert server.handle_request(admin, pub(channel, 7, 4, 2)) == {"op": "ok", "id": 2}
    assert server.handle_request(admin, pub(channel, 8, 4, 3)) == {"op": "ok", "id": 3}
