"""The admin server's forwarding on real sockets (issue 17): the fast path answers from
futures without a task per publish and keeps arrival order; a publish whose slot has no
live owner takes the slow path, and later publishes of that slot queue behind it, so a
channel's events reach its channel server in order when the owner comes.

The admin and channel servers run in this process without Consul; the ring and the
channel server's address are applied by hand, as the Consul watches would."""

from __future__ import annotations

import asyncio
import logging
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from admin_server.app import AdminServer
from admin_server.app import build_parser as admin_parser
from channel_server.app import ChannelServer
from services import ops, wire
from services.connection import PeerConnection, connect, serve
from services.discovery import Instance
from services.errors import PeerError
from services.ring import RingDocument
from tests.support import DEFAULT_WAIT_S, FleetCA

HOST = "127.0.0.1"
NO_CONSUL = "127.0.0.1:1"
CHANNEL = "C0A1B2C3D4E"
POSTS = 300
CA = FleetCA(Path(tempfile.mkdtemp(prefix="rtm-test-ca-")))  # this module's fleet CA


async def dial(port: int, service: str, instance: str, **kwargs: Any) -> PeerConnection:
    """Dial a fleet server as ``service``/``instance``, with that identity's certificate."""
    return await connect(HOST, port, lambda: PeerConnection(name=instance, **kwargs), trust=CA.trust(service, instance))


def pub(seq: int) -> dict[str, Any]:
    return {"op": "pub", "ch": CHANNEL, "seq": seq, "json": f'{{"n":{seq}}}'.encode(), "t0": 1.0}


@pytest.fixture
async def fleet() -> AsyncIterator[tuple[AdminServer, int, ChannelServer, int]]:
    cs = CA.channel_server()
    cs_server = await serve(HOST, 0, cs.make_connection, trust=cs.trust)
    cs_port = int(cs_server.sockets[0].getsockname()[1])
    admin = AdminServer(
        admin_parser().parse_args(
            ["--instance-id", "as-test", "--consul", NO_CONSUL, "--ttl-s", "600", "--route-budget-s", "20"]
            + CA.flags("admin-server", "as-test")
        )
    )
    admin.channel_servers._apply([Instance("cs-test", "channel-server", HOST, cs_port)])
    as_server = await serve(HOST, 0, admin.make_connection, trust=admin.trust)
    yield admin, int(as_server.sockets[0].getsockname()[1]), cs, cs_port
    as_server.close()
    cs_server.close()
    for conn in list(cs.gateways.values()):
        conn.abort()
    await asyncio.gather(*(link.close() for link in admin.links.values()))
    await admin.discovery.close()
    await cs.discovery.close()


async def subscribe(cs_port: int) -> tuple[PeerConnection, asyncio.Queue[dict[str, Any]]]:
    """A gateway subscribed to CHANNEL (live); its ``ev`` pushes go to the queue."""
    pushes: asyncio.Queue[dict[str, Any]] = asyncio.Queue()

    def on_push(conn: PeerConnection, message: dict[str, Any]) -> None:
        if message["op"] == "ev":
            pushes.put_nowait(message)

    gateway = await dial(cs_port, "gateway", "gw-1", on_push=on_push)
    await gateway.request({"op": "sub", "gw": "gw-1", "chans": [[CHANNEL, -1]]})
    return gateway, pushes


async def routed_to_cs_test(
    admin: AdminServer, port: int, cs_port: int
) -> tuple[PeerConnection, asyncio.Queue[dict[str, Any]], PeerConnection]:
    """Slot cs-0 routed to the test's channel server, a gateway subscribed there and a webapp
    dialled into the admin server: (gateway, its pushes, webapp)."""
    admin.follower.apply(RingDocument(version=1, slots={"cs-0": "cs-test"}))
    gateway, pushes = await subscribe(cs_port)
    webapp = await dial(port, "webapp", "webapp-1", coalesce_writes=True)
    return gateway, pushes, webapp


async def seqs(pushes: asyncio.Queue[dict[str, Any]], count: int) -> list[int]:
    got = []
    try:
        for _ in range(count):
            got.append((await asyncio.wait_for(pushes.get(), DEFAULT_WAIT_S))["seq"])
    except TimeoutError:
        pass
    return got


async def test_the_fast_path_forwards_in_order_without_a_task_per_publish(
    fleet: tuple[AdminServer, int, ChannelServer, int],
) -> None:
    admin, port, cs, cs_port = fleet
    gateway, pushes, webapp = await routed_to_cs_test(admin, port, cs_port)
    try:
        # The first publish opens the link to the channel server (slow path, once).
        assert (await webapp.request(pub(1), timeout_s=DEFAULT_WAIT_S))["cs"] == "cs-test"
        tasks_before = len(asyncio.all_tasks())
        replies = [webapp.begin_request(pub(n), timeout_s=DEFAULT_WAIT_S) for n in range(2, POSTS + 1)]
        served = admin_connections(admin)
        done = await asyncio.wait_for(asyncio.gather(*replies), DEFAULT_WAIT_S)
        assert all(r["op"] == "ok" and r["cs"] == "cs-test" for r in done)
        assert await seqs(pushes, POSTS) == list(range(1, POSTS + 1))
        gateway.close()
        assert len(asyncio.all_tasks()) <= tasks_before + 2  # no task per publish
        assert admin.pubs_in_flight == 0 and admin.slow_slots == {}
        assert all(conn.requests_in_flight == 0 for conn in served)
    finally:
        webapp.close()
        gateway.close()


def admin_connections(admin: AdminServer) -> list[PeerConnection]:
    return [link.conn for link in admin.links.values() if link.conn is not None]


async def park_on_the_slow_path(admin: AdminServer, cs: ChannelServer, count: int, refusals: int) -> None:
    """Until ``count`` publishes of CHANNEL are on the admin's slow path and the channel
    server has refused ``refusals`` publishes: then none of them is still on the wire."""
    for _ in range(1000):  # bounded: polling a condition
        if admin.slow_slots.get("cs-0") == count and cs.not_owner.labels("pub")._value.get() >= refusals:
            return
        await asyncio.sleep(0.01)  # wait-ok: polling a condition, bounded
    raise AssertionError(f"slow path {admin.slow_slots}, refusals {cs.not_owner.labels('pub')._value.get()}")


async def test_publishes_refused_not_owner_retry_in_order_and_later_ones_do_not_overtake_them(
    fleet: tuple[AdminServer, int, ChannelServer, int],
) -> None:
    admin, port, cs, cs_port = fleet
    gateway, pushes, webapp = await routed_to_cs_test(admin, port, cs_port)
    try:
        assert (await webapp.request(pub(1), timeout_s=DEFAULT_WAIT_S))["op"] == "ok"  # the link is up
        cs.follower.apply(RingDocument(version=2, slots={"cs-0": "cs-other"}))  # the slot moves away
        first = [webapp.begin_request(pub(n), timeout_s=DEFAULT_WAIT_S) for n in range(2, 51)]
        # Until all were refused not_owner on both paths: none is on its way to the channel server.
        await park_on_the_slow_path(admin, cs, 49, refusals=2 * 49)
        cs.follower.apply(RingDocument(version=3, slots={"cs-0": "cs-test"}))  # and back, with no state
        # After its `moved` the gateway resubscribes from the last seq it has, as a real one does
        # (the first retry may be applied before this sub: it is replayed, not missed).
        await gateway.request({"op": "sub", "gw": "gw-1", "chans": [[CHANNEL, 1]]})
        # The owner accepts again and the link is up, but these must not overtake 2..50.
        later = [webapp.begin_request(pub(n), timeout_s=DEFAULT_WAIT_S) for n in range(51, 101)]
        await asyncio.sleep(0.05)  # wait-ok: room for a wrong fast path to deliver them first
        admin.follower.apply(RingDocument(version=3, slots={"cs-0": "cs-test"}))  # wakes the waiting ones
        done = await asyncio.wait_for(asyncio.gather(*first, *later), DEFAULT_WAIT_S)
        assert all(r["op"] == "ok" for r in done)
        # An overtaking 51 would have made 2..50 "duplicates" at the channel server: never delivered.
        assert await seqs(pushes, 100) == list(range(1, 101))
        assert cs.duplicates._value.get() == 0  # none was dropped as already applied
        assert admin.pubs_in_flight == 0 and admin.slow_slots == {}
        assert admin.retries.labels("not_owner")._value.get() >= 49
    finally:
        webapp.close()
        gateway.close()


async def test_a_publish_arriving_as_a_failover_ends_does_not_overtake_the_ones_queued_behind_it(
    fleet: tuple[AdminServer, int, ChannelServer, int],
) -> None:
    """The window when the retrying publish of a slot is acknowledged: the ones queued behind
    it have not been written again yet. One arriving then must queue behind them, not be
    written first (the channel server would then drop them as duplicates: silent loss)."""
    admin, port, cs, cs_port = fleet
    gateway, pushes, webapp = await routed_to_cs_test(admin, port, cs_port)
    try:
        assert (await webapp.request(pub(1), timeout_s=DEFAULT_WAIT_S))["op"] == "ok"  # the link is up
        cs.follower.apply(RingDocument(version=2, slots={"cs-0": "cs-other"}))  # the slot moves away
        first = [webapp.begin_request(pub(n), timeout_s=DEFAULT_WAIT_S) for n in (2, 3)]
        await park_on_the_slow_path(admin, cs, 2, refusals=4)  # each refused on both paths
        cs.follower.apply(RingDocument(version=3, slots={"cs-0": "cs-test"}))  # and back
        await gateway.request({"op": "sub", "gw": "gw-1", "chans": [[CHANNEL, 1]]})  # after its `moved`
        arrivals: list[asyncio.Future[dict[str, Any]]] = []
        admin_acknowledged = admin.links["cs-test"].conn
        assert admin_acknowledged is not None
        original = admin_acknowledged._dispatch

        def dispatch(frame: dict[str, Any]) -> None:  # the channel server's ok for 2 reaches the admin
            original(frame)
            if frame.get("op") == "ok" and not arrivals:
                admin.pubs_in_flight += 1  # as handle_request counts it
                arrivals.append(asyncio.ensure_future(admin.forward(0, ops.parse_as(pub(4), ops.Publish))))

        admin_acknowledged._dispatch = dispatch  # type: ignore[method-assign]
        admin.follower.apply(RingDocument(version=3, slots={"cs-0": "cs-test"}))  # wakes the retrying one
        done = await asyncio.wait_for(asyncio.gather(*first), DEFAULT_WAIT_S)
        assert arrivals, "4 did not arrive"
        late = await asyncio.wait_for(arrivals[0], DEFAULT_WAIT_S)
        assert [r["op"] for r in done] == ["ok", "ok"] and late["op"] == "ok"
        assert not any(r.get("duplicate") for r in [*done, late])
        assert await seqs(pushes, 4) == [1, 2, 3, 4]
        assert cs.duplicates._value.get() == 0
        assert admin.pubs_in_flight == 0 and admin.slow_slots == {}
    finally:
        webapp.close()
        gateway.close()


async def test_a_channel_server_writes_one_turns_events_to_a_gateway_in_one_write(
    fleet: tuple[AdminServer, int, ChannelServer, int],
) -> None:
    """--batch-gateway-events (the default): the events of publishes that reach the channel
    server in one read leave for each gateway in one transport write (one TLS record), in order;
    with it off, one write each (what the TLS cost of the fan-out path was)."""
    _, _, cs, cs_port = fleet
    gateway, pushes = await subscribe(cs_port)
    (gw_conn,) = cs.gateways.values()
    assert gw_conn.coalesce_writes
    writes: list[int] = []
    transport = gw_conn.transport
    assert transport is not None
    gw_conn.transport = WriteCounter(transport, writes)  # type: ignore[assignment]
    sender = await dial(cs_port, "admin-server", "as-1")
    try:
        assert sender.transport is not None
        batch = 8
        for round_, start in enumerate((1, 1 + batch)):
            if round_ == 1:
                gw_conn.coalesce_writes = False  # --no-batch-gateway-events
            writes.clear()
            # One write from the admin server: the channel server reads the publishes in one read.
            sender.transport.write(b"".join(wire.encode({**pub(n), "id": n}) for n in range(start, start + batch)))
            assert await seqs(pushes, batch) == list(range(start, start + batch))
            assert len(writes) == (1 if round_ == 0 else batch), writes
    finally:
        gw_conn.transport = transport  # type: ignore[assignment]
        sender.close()
        gateway.close()


class WriteCounter:
    """A transport whose writes are counted (everything else is the real one's)."""

    def __init__(self, transport: Any, writes: list[int]) -> None:
        self._transport = transport
        self._writes = writes

    def write(self, data: bytes) -> None:
        self._writes.append(len(data))
        self._transport.write(data)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


# -- pubs: many events in one frame, both hops (issue 17) ------------------------------------
def item(seq: int, channel: str = CHANNEL) -> dict[str, Any]:
    return {"ch": channel, "seq": seq, "json": f'{{"n":{seq}}}'.encode(), "t0": 1.0}


def pubs(*items: dict[str, Any]) -> dict[str, Any]:
    return {"op": "pubs", "evs": list(items)}


async def test_pubs_are_forwarded_in_one_frame_per_channel_server_in_order(
    fleet: tuple[AdminServer, int, ChannelServer, int],
) -> None:
    admin, port, cs, cs_port = fleet
    gateway, pushes, webapp = await routed_to_cs_test(admin, port, cs_port)
    seen: list[str] = []
    original = cs.handle_request

    def recording(conn: PeerConnection, msg: dict[str, Any]) -> Any:
        seen.append(msg["op"])
        return original(conn, msg)

    cs.handle_request = recording  # type: ignore[method-assign]
    try:
        first = await webapp.request(pubs(item(1)), timeout_s=DEFAULT_WAIT_S)  # opens the link (slow path)
        assert first["res"] == ["ok"]
        seen.clear()
        replies = [
            webapp.begin_request(pubs(*(item(n) for n in range(start, start + 50))), timeout_s=DEFAULT_WAIT_S)
            for start in range(2, POSTS, 50)
        ]
        done = await asyncio.wait_for(asyncio.gather(*replies), DEFAULT_WAIT_S)
        assert all(r["op"] == "ok" and r["res"] == ["ok"] * 50 for r in done)
        assert await seqs(pushes, 1 + 50 * len(replies)) == list(range(1, 2 + 50 * len(replies)))
        assert seen == ["pubs"] * len(replies)  # one frame per batch on the second hop too
        dup = await webapp.request(pubs(item(2), item(400)), timeout_s=DEFAULT_WAIT_S)
        assert dup["res"] == ["duplicate", "ok"]
        assert admin.pubs_in_flight == 0 and admin.slow_slots == {}
    finally:
        webapp.close()
        gateway.close()


async def test_one_bad_event_in_a_batch_is_refused_alone_and_blocks_nothing(
    fleet: tuple[AdminServer, int, ChannelServer, int],
) -> None:
    """Issue 13's per-event semantics inside a batch: the bad one gets its own code, the
    others of the same channel, before and after it, are applied and delivered in order."""
    admin, port, cs, cs_port = fleet
    gateway, pushes, webapp = await routed_to_cs_test(admin, port, cs_port)
    try:
        await webapp.request(pubs(item(1)), timeout_s=DEFAULT_WAIT_S)
        errors_before = admin.metrics.errors.labels("bad_request")._value.get()
        bad = {**item(3), "ctl": {"no_such_key": 1}}
        reply = await webapp.request(
            pubs(item(2), bad, "not a map", {**item(4), "ch": "lowercase"}, item(5)), timeout_s=DEFAULT_WAIT_S
        )
        assert reply["op"] == "ok"
        assert reply["res"] == ["ok", "bad_request", "bad_request", "bad_request", "ok"]
        details = dict(reply["det"])
        assert "ctl" in details[1] and "map" in details[2] and "ch" in details[3]
        assert admin.metrics.errors.labels("bad_request")._value.get() == errors_before + 3
        assert await seqs(pushes, 3) == [1, 2, 5]  # 3 and 4 are gaps the gateways fill from history
        after = await webapp.request(pubs(item(6)), timeout_s=DEFAULT_WAIT_S)
        assert after["res"] == ["ok"] and await seqs(pushes, 1) == [6]  # the channel is not blocked
        assert admin.pubs_in_flight == 0
    finally:
        webapp.close()
        gateway.close()


async def test_a_channel_servers_detail_reaches_the_event_it_was_given_for(
    fleet: tuple[AdminServer, int, ChannelServer, int],
) -> None:
    """A channel server's ``det`` indexes its own ``pubs`` (the events of the batch it serves),
    not the webapp's batch: after a bad item the admin server kept, the two differ."""
    admin, port, cs, cs_port = fleet
    gateway, pushes, webapp = await routed_to_cs_test(admin, port, cs_port)
    original = cs.handle_request

    def refusing(conn: PeerConnection, msg: dict[str, Any]) -> Any:
        if msg["op"] == "pubs" and len(msg["evs"]) == 2:  # the group of the batch below
            return wire.reply_ok(msg["id"], res=["ok", "internal"], det=[[1, "the disk is on fire"]])
        return original(conn, msg)

    cs.handle_request = refusing  # type: ignore[method-assign]
    try:
        await webapp.request(pubs(item(1)), timeout_s=DEFAULT_WAIT_S)  # opens the link (slow path)
        reply = await webapp.request(pubs("not a map", item(2), item(3)), timeout_s=DEFAULT_WAIT_S)
        assert reply["res"] == ["bad_request", "ok", "internal"]
        assert dict(reply["det"])[2] == "the disk is on fire"
        assert admin.pubs_in_flight == 0
    finally:
        cs.handle_request = original  # type: ignore[method-assign]
        webapp.close()
        gateway.close()


async def test_pubs_refused_not_owner_continue_on_the_slow_path_in_order(
    fleet: tuple[AdminServer, int, ChannelServer, int],
) -> None:
    admin, port, cs, cs_port = fleet
    gateway, pushes, webapp = await routed_to_cs_test(admin, port, cs_port)
    try:
        assert (await webapp.request(pubs(item(1)), timeout_s=DEFAULT_WAIT_S))["res"] == ["ok"]
        cs.follower.apply(RingDocument(version=2, slots={"cs-0": "cs-other"}))  # the slot moves away
        first = webapp.begin_request(pubs(*(item(n) for n in range(2, 51))), timeout_s=DEFAULT_WAIT_S)
        await park_on_the_slow_path(admin, cs, 49, refusals=2 * 49)  # refused in the pubs, then as pubs
        cs.follower.apply(RingDocument(version=3, slots={"cs-0": "cs-test"}))
        await gateway.request({"op": "sub", "gw": "gw-1", "chans": [[CHANNEL, 1]]})  # from its last seq
        later = webapp.begin_request(pubs(*(item(n) for n in range(51, 101))), timeout_s=DEFAULT_WAIT_S)
        await asyncio.sleep(0.05)  # wait-ok: room for a wrong fast path to deliver them first
        admin.follower.apply(RingDocument(version=3, slots={"cs-0": "cs-test"}))  # wakes the waiting ones
        done = await asyncio.wait_for(asyncio.gather(first, later), DEFAULT_WAIT_S)
        assert [r["res"] for r in done] == [["ok"] * 49, ["ok"] * 50]
        assert await seqs(pushes, 100) == list(range(1, 101))
        assert cs.duplicates._value.get() == 0
        assert admin.pubs_in_flight == 0 and admin.slow_slots == {}
    finally:
        webapp.close()
        gateway.close()


async def test_a_batch_beyond_the_in_flight_bound_is_refused_whole(
    fleet: tuple[AdminServer, int, ChannelServer, int],
) -> None:
    admin, port, cs, cs_port = fleet
    admin.follower.apply(RingDocument(version=1, slots={"cs-0": "cs-test"}))
    admin.args.max_pubs_in_flight = 10
    webapp = await dial(port, "webapp", "webapp-1", coalesce_writes=True)
    try:
        admin.pubs_in_flight = 1  # another publish being forwarded
        with pytest.raises(PeerError) as info:
            await webapp.request(pubs(*(item(n) for n in range(1, 11))), timeout_s=DEFAULT_WAIT_S)
        assert info.value.code == "unavailable"  # transient: the webapp resends, in order
        assert admin.pubs_in_flight == 1
        admin.pubs_in_flight = 0
        reply = await webapp.request(pubs(*(item(n) for n in range(1, 11))), timeout_s=DEFAULT_WAIT_S)
        assert reply["res"] == ["ok"] * 10
    finally:
        webapp.close()


async def test_a_batch_larger_than_the_whole_bound_is_admitted_when_nothing_else_is_in_flight(
    fleet: tuple[AdminServer, int, ChannelServer, int],
) -> None:
    """--max-pubs-in-flight below the webapp's batch (up to ops.MAX_PUBS_EVENTS events): refused
    whole every time, the webapp's resend (the same batch, from its oldest unacknowledged event)
    would never pass, and the hand-off would stall for good behind it."""
    admin, port, cs, cs_port = fleet
    admin.follower.apply(RingDocument(version=1, slots={"cs-0": "cs-test"}))
    admin.args.max_pubs_in_flight = 10
    webapp = await dial(port, "webapp", "webapp-1", coalesce_writes=True)
    try:
        reply = await webapp.request(pubs(*(item(n) for n in range(1, 12))), timeout_s=DEFAULT_WAIT_S)
        assert reply["res"] == ["ok"] * 11
        assert admin.pubs_in_flight == 0
    finally:
        webapp.close()


async def outcome(reply: asyncio.Future[dict[str, Any]]) -> str:
    """ "ok", or the error code the request was answered with."""
    try:
        return str((await asyncio.wait_for(reply, DEFAULT_WAIT_S))["op"])
    except PeerError as exc:
        return exc.code


async def test_a_publish_given_up_fails_the_later_ones_of_its_channel_so_the_resend_keeps_order(
    fleet: tuple[AdminServer, int, ChannelServer, int],
) -> None:
    """Publish 2 exhausts its route budget while 3 (its own budget not spent) waits behind it.
    Before: 3 went out when the owner came back, and the webapp's resend of 2 was then dropped
    at the channel server as a duplicate (3 > 2 applied): never fanned out, not in its history.
    Now 3 is answered unavailable with 2, and so is 4, which the webapp had pipelined behind
    them, until 2 is resent: the resend delivers 2, 3, 4 in order."""
    admin, port, cs, cs_port = fleet
    gateway, pushes, webapp = await routed_to_cs_test(admin, port, cs_port)
    try:
        assert (await webapp.request(pub(1), timeout_s=DEFAULT_WAIT_S))["op"] == "ok"  # the link is up
        cs.follower.apply(RingDocument(version=2, slots={"cs-0": "cs-other"}))  # the slot has no owner here
        admin.args.route_budget_s = 0.3  # 2's budget runs out soon...
        second = webapp.begin_request(pub(2), timeout_s=DEFAULT_WAIT_S)
        await park_on_the_slow_path(admin, cs, 1, refusals=2)
        admin.args.route_budget_s = 20.0  # ...3's does not
        third = webapp.begin_request(pub(3), timeout_s=DEFAULT_WAIT_S)
        await park_on_the_slow_path(admin, cs, 2, refusals=2)
        assert await outcome(second) == "unavailable"
        cs.follower.apply(RingDocument(version=3, slots={"cs-0": "cs-test"}))  # the owner is back
        await gateway.request({"op": "sub", "gw": "gw-1", "chans": [[CHANNEL, 1]]})  # after its `moved`
        admin.follower.apply(RingDocument(version=3, slots={"cs-0": "cs-test"}))
        assert await outcome(third) == "unavailable"  # not delivered ahead of 2
        fourth = webapp.begin_request(pub(4), timeout_s=DEFAULT_WAIT_S)  # the webapp had pipelined it behind them
        assert await outcome(fourth) == "unavailable"
        resent = [await webapp.request(pub(n), timeout_s=DEFAULT_WAIT_S) for n in (2, 3, 4)]  # the rewind
        assert [r["op"] for r in resent] == ["ok", "ok", "ok"] and not any(r.get("duplicate") for r in resent)
        assert await seqs(pushes, 4) == [1, 2, 3, 4]
        assert cs.duplicates._value.get() == 0
        assert admin.held_back._value.get() == 2
        assert admin.pubs_in_flight == 0 and admin.slow_slots == {}
    finally:
        webapp.close()
        gateway.close()


async def test_a_ring_barrier_shorter_than_the_forward_timeout_is_warned_about(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Allowed (it trades order for latency at a ring change), but said at start: raising
    --forward-timeout-s alone would otherwise turn barriers into a silent reordering."""

    def admin(*flags: str) -> AdminServer:
        base = ["--instance-id", "as-test", "--consul", NO_CONSUL, *CA.flags("admin-server", "as-test")]
        return AdminServer(admin_parser().parse_args(base + list(flags)))

    with caplog.at_level(logging.WARNING, logger="rtm"):
        for server in (admin(), admin("--forward-timeout-s", "3", "--ring-barrier-s", "6")):
            await server.discovery.close()
        assert "--ring-barrier-s" not in caplog.text
        server = admin("--forward-timeout-s", "5")
        await server.discovery.close()
    assert "--ring-barrier-s 4 is below --forward-timeout-s 5" in caplog.text
