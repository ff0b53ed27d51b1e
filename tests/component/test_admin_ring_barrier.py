"""The admin server's ring barrier (docs/wire.md, "Publishes refused mid-stream"), on real sockets.

Event 2 of a channel is in flight to its slot's old owner when the ring gives the slot to a
new owner; event 3 arrives. Before the barrier, 3 went straight to the new owner, which
applied it, and 2, refused ``not_owner`` by the old one, was retried there and dropped as a
duplicate: never fanned out, missing from the new owner's history. Now 3 waits until 2 is
answered (or lost, or timed out) and retried, so the new owner applies 2 then 3.

The admin server and two channel servers run in this process without Consul; rings and
addresses are applied by hand, as the Consul watches would."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import pytest

from admin_server.app import AdminServer
from admin_server.app import build_parser as admin_parser
from channel_server.app import ChannelServer
from services import ops
from services.connection import PeerConnection, serve
from services.discovery import Instance
from services.ring import HashRing, RingDocument
from tests.component.test_admin_forward import CA, HOST, NO_CONSUL, dial
from tests.support import DEFAULT_WAIT_S

V1 = RingDocument(version=1, slots={"cs-0": "cs-old", "cs-1": "cs-new"})
V2 = RingDocument(version=2, slots={"cs-0": "cs-new", "cs-1": "cs-new"})  # cs-0 moves to cs-new


def channel_in(slot: str) -> str:
    """A channel id that the ring maps to ``slot``."""
    ring = HashRing(V1)
    for n in range(1000):  # bounded: about half of them land in each slot
        channel = f"C{n:010d}"
        if ring.slot_for(channel) == slot:
            return channel
    raise AssertionError(f"no channel in {slot}")


MOVED = channel_in("cs-0")  # its slot changes owner
STAYS = channel_in("cs-1")  # its slot does not


def item(seq: int, channel: str = MOVED) -> dict[str, Any]:
    return {"ch": channel, "seq": seq, "json": f'{{"n":{seq}}}'.encode(), "t0": 1.0}


def request(seq: int, batched: bool, channel: str = MOVED) -> dict[str, Any]:
    """Event ``seq`` as a ``pub``, or as a ``pubs`` of one."""
    if batched:
        return {"op": "pubs", "evs": [item(seq, channel)]}
    return {"op": "pub", **item(seq, channel)}


def succeeded(reply: dict[str, Any], batched: bool) -> str:
    """ "ok", "duplicate", or the error code of one event's reply."""
    if batched:
        return str(reply["res"][0])
    return "duplicate" if reply.get("duplicate") else str(reply["op"])


@dataclass
class Fleet:
    admin: AdminServer
    admin_port: int
    old: ChannelServer
    new: ChannelServer
    applied: list[tuple[str, int | None, str]] = field(default_factory=list)  # at the new owner, in order
    held: list[tuple[Callable[[], dict[str, Any]], asyncio.Future[dict[str, Any]]]] = field(default_factory=list)
    got_held: asyncio.Event = field(default_factory=asyncio.Event)

    def hold_the_old_owner(self) -> None:
        """From now on the old owner answers no publish until :meth:`release` (a stall, a GC pause,
        a dead process whose connection is not closed yet)."""
        old = self.old
        answers = {"pub": old.handle_pub, "pubs": old.handle_pubs}

        def holding(op: str) -> Any:
            def hold(request_id: int, record: Any, conn: PeerConnection) -> asyncio.Future[dict[str, Any]]:
                future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
                self.held.append((lambda: answers[op](request_id, record, conn), future))
                self.got_held.set()
                return future

            return hold

        old.handle_pub = holding("pub")  # type: ignore[method-assign,assignment]
        old.handle_pubs = holding("pubs")  # type: ignore[method-assign,assignment]

    def release(self) -> None:
        """The old owner answers what it held, as it would now (its ring is v2: ``not_owner``)."""
        for answer, future in self.held:
            future.set_result(answer())
        self.held.clear()

    def change_the_ring(self) -> None:
        for follower in (self.old.follower, self.new.follower, self.admin.follower):
            follower.apply(V2)

    async def settled_at_the_new_owner(self) -> None:
        """Until the new owner has handled everything the admin server wrote to it so far."""
        conn = self.admin.links["cs-new"].conn
        assert conn is not None
        await conn.request({"op": "ping"}, timeout_s=DEFAULT_WAIT_S)


def admin_args(*extra: str) -> Any:
    return admin_parser().parse_args(
        ["--instance-id", "as-test", "--consul", NO_CONSUL, "--ttl-s", "600", "--route-budget-s", "20", *extra]
        + CA.flags("admin-server", "as-test")
    )


@pytest.fixture
async def fleet(request: pytest.FixtureRequest) -> AsyncIterator[Fleet]:
    extra = getattr(request, "param", ())
    old: ChannelServer = CA.channel_server("cs-old", slot="cs-0")
    new: ChannelServer = CA.channel_server("cs-new", slot="cs-1")
    for cs in (old, new):
        cs.follower.apply(V1)
    servers = [await serve(HOST, 0, cs.make_connection, trust=cs.trust) for cs in (old, new)]
    admin = AdminServer(admin_args(*extra))
    admin.channel_servers._apply(
        [
            Instance(cs_id, "channel-server", HOST, int(server.sockets[0].getsockname()[1]))
            for cs_id, server in zip(("cs-old", "cs-new"), servers, strict=True)
        ]
    )
    admin.follower.apply(V1)
    as_server = await serve(HOST, 0, admin.make_connection, trust=admin.trust)
    fleet = Fleet(admin, int(as_server.sockets[0].getsockname()[1]), old, new)
    apply_pub = new.apply_pub

    def recording(pub: ops.Publish, rv: int, conn: PeerConnection) -> str:
        result = apply_pub(pub, rv, conn)
        fleet.applied.append((pub.ch, pub.seq, result))
        return result

    new.apply_pub = recording  # type: ignore[method-assign]
    for cs_id in ("cs-old", "cs-new"):  # both links up, as in a running fleet
        await admin.link_to(cs_id).wait_connected(DEFAULT_WAIT_S)
    yield fleet
    fleet.release()
    as_server.close()
    for server in servers:
        server.close()
    await asyncio.gather(*(link.close() for link in admin.links.values()))
    for closing in (admin, old, new):
        await closing.discovery.close()


async def in_flight_to_the_old_owner_then_moved(fleet: Fleet, webapp: PeerConnection, batched: bool) -> Any:
    """Event 1 applied at the old owner; event 2 on the fast path to it, unanswered; then the
    ring gives the slot to the new owner. Returns 2's reply (a future)."""
    reply = await webapp.request(request(1, batched), timeout_s=DEFAULT_WAIT_S)
    assert succeeded(reply, batched) == "ok"
    fleet.hold_the_old_owner()
    second = webapp.begin_request(request(2, batched), timeout_s=DEFAULT_WAIT_S)
    await asyncio.wait_for(fleet.got_held.wait(), DEFAULT_WAIT_S)
    assert fleet.admin.slow_slots == {}, "2 must have gone the fast path"
    fleet.change_the_ring()
    return second


@pytest.mark.parametrize("batched", [False, True], ids=["pub", "pubs"])
async def test_the_new_owner_gets_the_event_in_flight_to_the_old_one_before_the_later_ones(
    fleet: Fleet, batched: bool
) -> None:
    admin = fleet.admin
    webapp = await dial(fleet.admin_port, "webapp", "webapp-1", coalesce_writes=True)
    try:
        second = await in_flight_to_the_old_owner_then_moved(fleet, webapp, batched)
        third = webapp.begin_request(request(3, batched), timeout_s=DEFAULT_WAIT_S)
        other = webapp.begin_request(request(1, batched, STAYS), timeout_s=DEFAULT_WAIT_S)  # another slot
        assert succeeded(await asyncio.wait_for(other, DEFAULT_WAIT_S), batched) == "ok"
        await fleet.settled_at_the_new_owner()
        # The other slot is not held; 3 waits for 2 (before the barrier, it was applied here now).
        assert fleet.applied == [(STAYS, 1, "ok")]
        assert admin.slow_slots == {"cs-0": 1} and admin.barriers._value.get() == 1
        fleet.release()  # the old owner answers 2: not_owner
        done = await asyncio.wait_for(asyncio.gather(second, third), DEFAULT_WAIT_S)
        assert [succeeded(r, batched) for r in done] == ["ok", "ok"]
        assert fleet.applied == [(STAYS, 1, "ok"), (MOVED, 2, "ok"), (MOVED, 3, "ok")]
        assert fleet.new.duplicates._value.get() == 0
        assert admin.pubs_in_flight == 0 and admin.slow_slots == {} and admin.fast_in_flight == {}
        assert admin.barriers_expired._value.get() == 0
        after = await webapp.request(request(4, batched), timeout_s=DEFAULT_WAIT_S)  # the fast path again
        assert succeeded(after, batched) == "ok" and admin.slow_slots == {}
    finally:
        webapp.close()


@pytest.mark.parametrize("fleet", [("--forward-timeout-s", "0.3")], indirect=True)
async def test_an_old_owner_that_never_answers_holds_the_slot_only_until_its_request_times_out(
    fleet: Fleet,
) -> None:
    """The barrier lifts when 2's attempt times out (--forward-timeout-s), not at its own bound
    (--ring-barrier-s, 4 s): 2 is retried at the new owner ahead of 3."""
    admin = fleet.admin
    webapp = await dial(fleet.admin_port, "webapp", "webapp-1", coalesce_writes=True)
    try:
        second = await in_flight_to_the_old_owner_then_moved(fleet, webapp, batched=False)
        moved_at = time.monotonic()
        third = webapp.begin_request(request(3, False), timeout_s=DEFAULT_WAIT_S)
        done = await asyncio.wait_for(asyncio.gather(second, third), DEFAULT_WAIT_S)
        held_s = time.monotonic() - moved_at
        assert [succeeded(r, False) for r in done] == ["ok", "ok"]
        assert fleet.applied == [(MOVED, 2, "ok"), (MOVED, 3, "ok")]
        assert admin.barriers_expired._value.get() == 0
        assert held_s < admin.args.ring_barrier_s, held_s
        assert admin.retries.labels("unreachable")._value.get() == 1  # 2's timed-out attempt
        assert admin.pubs_in_flight == 0 and admin.slow_slots == {} and admin.fast_in_flight == {}
    finally:
        webapp.close()


@pytest.mark.parametrize("fleet", [("--forward-timeout-s", "60", "--ring-barrier-s", "0.3")], indirect=True)
async def test_a_barrier_that_expires_lets_the_later_events_go(fleet: Fleet) -> None:
    """--ring-barrier-s below --forward-timeout-s trades order for latency: when it expires, 3
    goes to the new owner without waiting for 2 (counted); 2, answered later, is then a
    duplicate there, as before the barrier (the gateways fill it from the webapp's history)."""
    admin = fleet.admin
    webapp = await dial(fleet.admin_port, "webapp", "webapp-1", coalesce_writes=True)
    try:
        second = await in_flight_to_the_old_owner_then_moved(fleet, webapp, batched=False)
        third = await webapp.request(request(3, False), timeout_s=DEFAULT_WAIT_S)
        assert succeeded(third, False) == "ok"
        assert admin.barriers_expired._value.get() == 1
        assert fleet.applied == [(MOVED, 3, "ok")] and not second.done()
        fleet.release()
        assert succeeded(await asyncio.wait_for(second, DEFAULT_WAIT_S), False) == "duplicate"
        assert admin.pubs_in_flight == 0 and admin.slow_slots == {} and admin.fast_in_flight == {}
    finally:
        webapp.close()


async def test_a_slow_path_publish_on_the_wire_to_the_old_owner_is_not_overtaken_at_the_new_one(
    fleet: Fleet,
) -> None:
    """The same race on the slow path: 2 is written from the slot's lane to the old owner, the
    ring changes, and 3, behind it in the lane, must not be written to the new owner first."""
    admin = fleet.admin
    webapp = await dial(fleet.admin_port, "webapp", "webapp-1", coalesce_writes=True)
    try:
        fleet.hold_the_old_owner()
        admin.pubs_in_flight += 1  # as handle_request counts it
        second = asyncio.ensure_future(admin.forward(0, ops.parse_as(request(2, False), ops.Publish)))
        await asyncio.wait_for(fleet.got_held.wait(), DEFAULT_WAIT_S)
        fleet.change_the_ring()
        third = webapp.begin_request(request(3, False), timeout_s=DEFAULT_WAIT_S)  # joins 2's lane
        await webapp.request({"op": "ping"}, timeout_s=DEFAULT_WAIT_S)
        await fleet.settled_at_the_new_owner()
        assert fleet.applied == [] and admin.slow_slots == {"cs-0": 2}
        fleet.release()
        done = await asyncio.wait_for(asyncio.gather(second, third), DEFAULT_WAIT_S)
        assert [succeeded(r, False) for r in done] == ["ok", "ok"]
        assert fleet.applied == [(MOVED, 2, "ok"), (MOVED, 3, "ok")]
        assert admin.pubs_in_flight == 0 and admin.slow_slots == {}
    finally:
        webapp.close()


async def test_a_slow_path_publish_whose_link_is_closed_backs_off_and_gives_up_in_its_budget(fleet: Fleet) -> None:
    """A closed link stays "ready" with a closed connection (at exit, closing() closes the links).
    The slow path took its wait_connected() for a connection and looped without awaiting anything
    or checking its budget: a busy loop that a cancel could not stop (wait_for swallowed it)."""
    admin = fleet.admin
    fleet.change_the_ring()
    await admin.links["cs-new"].close()
    admin.args.route_budget_s = 0.3
    admin.pubs_in_flight += 1  # as handle_request counts it
    reply = await asyncio.wait_for(admin.forward(0, ops.parse_as(request(2, False), ops.Publish)), DEFAULT_WAIT_S)
    assert reply["op"] == "err" and reply["code"] == "unavailable"
    assert admin.retries.labels("unreachable")._value.get() >= 1
    assert admin.pubs_in_flight == 0 and admin.slow_slots == {}
