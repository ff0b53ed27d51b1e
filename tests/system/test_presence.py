"""Presence end to end, through real processes started by ``rtm up``: gateways report
who is online to the presence servers (PS) and forward ``presence_change`` only to
the clients that subscribed, and only of users of their own team; leases, and CHARM's
failover of a PS."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from presence.state import LEASE_TTL_S
from rtmctl.fleet import SEED_BOTS, SEED_CHANNELS
from tests.support import DEFAULT_WAIT_S, async_wait_until
from tests.system.harness import Client, Fleet, consul_client, process_by_id
from webapp_stub.seed import SEED_FILE, seed_demo
from webapp_stub.store import Store

FAILOVER_TIMEOUT_S = 30.0
SEED_USERS = 6
OTHER_TEAM_FILE = "other_team.json"  # a second team's users (not in seed.json: the tests there are one team's)
OTHER_TEAM_USERS = ("mallory", "trudy")
# A dead gateway's users go away within its lease; the PS sweeps leases every
# 0.25 s and the push takes milliseconds.
LEASE_MARGIN_S = 1.5


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    data_dir: Path = tmp_path_factory.mktemp("presence")
    # The demo team as `rtm seed` makes it, and a second team beside it, before the fleet starts.
    store = Store(data_dir)
    seed = seed_demo(store, users=SEED_USERS, channels=SEED_CHANNELS, bots=SEED_BOTS)
    other = store.create_team("Elsewhere", "elsewhere")
    others = []
    for name in OTHER_TEAM_USERS:
        user, token = store.create_user(other.id, name)
        others.append({"id": user.id, "name": name, "token": token, "team": other.id})
    store.close()
    for name, content in ((SEED_FILE, seed), (OTHER_TEAM_FILE, others)):
        (data_dir / name).write_text(json.dumps(content))
        (data_dir / name).chmod(0o600)  # user tokens, as rtm seed writes them
    handle = Fleet.up(data_dir, "--seed-users", str(SEED_USERS))
    try:
        yield handle
    finally:
        handle.down()


def presence_ring(fleet: Fleet) -> Any:
    from services.ring import PRESENCE_RING_KEY, HashRing, RingDocument

    _, raw = consul_client(fleet).kv.get(PRESENCE_RING_KEY)
    return HashRing(RingDocument.from_json(raw["Value"] if raw else None))


def seen(client: Client, user: str, since: int = 0) -> list[str]:
    """Every presence this client was told ``user`` has, in order (both of Slack's shapes)."""
    out = []
    for e in client.events[since:]:
        if e.get("type") == "presence_change" and (e.get("user") == user or user in e.get("users", ())):
            out.append(str(e["presence"]))
    return out


async def connect_other(fleet: Fleet, name: str, region: str) -> Client:
    """Connect as a user of the second team."""
    other = json.loads((fleet.data_dir / OTHER_TEAM_FILE).read_text())
    user = next(u for u in other if u["name"] == name)
    client = Client(fleet, name, user["token"], region=region)
    await client.open()
    return client


def other_user(fleet: Fleet, name: str) -> dict[str, Any]:
    return dict(next(u for u in json.loads((fleet.data_dir / OTHER_TEAM_FILE).read_text()) if u["name"] == name))


async def wait_presence(client: Client, user: str, presence: str, timeout_s: float = DEFAULT_WAIT_S) -> None:
    await client.wait_for(lambda c: seen(c, user)[-1:] == [presence], timeout_s, f"{user} {presence}")


async def query(client: Client, user: str) -> str:
    """Ask through presence_query; the answer follows whatever was sent before it."""
    before = len(client.events)
    await client.send({"type": "presence_query", "ids": [user]})
    await client.wait_for(lambda c: len(seen(c, user, before)) > 0, what=f"presence_query of {user}")
    return seen(client, user, before)[0]


async def test_watchers_see_connects_and_last_disconnects_and_nobody_else(fleet: Fleet) -> None:
    bob_id = fleet.user("bob")["id"]
    alice = await fleet.connect("alice", "eu-west")
    carol = await fleet.connect("carol", "eu-west")  # never subscribes to bob
    await alice.send({"type": "presence_sub", "ids": [bob_id]})
    await wait_presence(alice, bob_id, "away")
    bob = await fleet.connect("bob", "us-east")
    await wait_presence(alice, bob_id, "active")
    tab = await fleet.connect("bob", "eu-west")
    await tab.close()
    assert await query(alice, bob_id) == "active"  # a barrier: nothing about bob came before it
    assert seen(alice, bob_id)[-2:] == ["active", "active"]
    await bob.close()
    await wait_presence(alice, bob_id, "away")
    assert await query(carol, bob_id) == "away"
    carol.events = [e for e in carol.events if e.get("type") != "presence_change"]  # drop the query's answer
    assert seen(carol, bob_id) == []
    assert seen(alice, bob_id) == ["away", "active", "active", "away"]
    for client in (alice, carol):
        await client.close()


async def test_presence_stays_inside_a_team(fleet: Fleet) -> None:
    """A user of another team is answered away, by presence_sub and presence_query, whether the
    gateway knows the user's presence already or asks a presence server, and hears nothing when
    that user comes and goes; users of one team see each other as before, in both teams."""
    bob_id, dave_id = fleet.user("bob")["id"], fleet.user("dave")["id"]
    mallory_id = other_user(fleet, "mallory")["id"]
    alice = await fleet.connect("alice", "eu-west")
    await alice.send({"type": "presence_sub", "ids": [bob_id, mallory_id]})
    await wait_presence(alice, bob_id, "away")
    bob = await fleet.connect("bob", "us-east")
    dave = await fleet.connect("dave", "us-east")
    await wait_presence(alice, bob_id, "active")
    mallory = await connect_other(fleet, "mallory", "eu-west")  # the gateway alice is on: it knows bob
    trudy = await connect_other(fleet, "trudy", "us-east")
    await trudy.send({"type": "presence_sub", "ids": [mallory_id]})
    await wait_presence(trudy, mallory_id, "active")  # the other team sees itself
    await mallory.send({"type": "presence_sub", "ids": [bob_id]})
    await wait_presence(mallory, bob_id, "away")  # answered from what the gateway knows
    assert await query(mallory, bob_id) == "away"
    assert await query(mallory, dave_id) == "away"  # watched by nobody on this gateway: a PS answers
    assert await query(alice, dave_id) == "active"
    assert await query(alice, mallory_id) == "away"  # mallory is online, in another team
    tab = await fleet.connect("bob", "eu-west")
    await tab.close()
    await bob.close()
    await wait_presence(alice, bob_id, "away")
    assert await query(mallory, bob_id) == "away"  # a barrier: every push about bob came before it
    assert seen(mallory, bob_id) == ["away", "away", "away"]  # the sub's answer and two queries: no push
    assert seen(alice, mallory_id) == ["away", "away"]  # the sub's answer and the query
    await mallory.close()
    await wait_presence(trudy, mallory_id, "away")
    for client in (alice, dave, trudy):
        await client.close()


async def test_presence_sub_replaces_the_set_and_batches(fleet: Fleet) -> None:
    ids = {name: fleet.user(name)["id"] for name in ("bob", "carol", "dave")}
    alice = await fleet.connect("alice", "us-east")
    await alice.send({"type": "presence_sub", "ids": [ids["bob"], ids["carol"], ids["dave"]]})
    await alice.wait_for(lambda c: all(seen(c, u) for u in ids.values()), what="the answer for all three")
    assert all(seen(alice, u) == ["away"] for u in ids.values())
    # Three users on two presence servers: at least two answered together, in the batched form.
    assert any(e["type"] == "presence_change" and len(e.get("users", ())) >= 2 for e in alice.events)
    await alice.send({"type": "presence_sub", "ids": [ids["dave"]]})  # bob and carol dropped
    bob = await fleet.connect("bob", "eu-west")
    dave = await fleet.connect("dave", "eu-west")
    await wait_presence(alice, ids["dave"], "active")
    assert seen(alice, ids["bob"]) == ["away"]
    await alice.send({"type": "presence_query", "ids": ["x"] * 501})
    await alice.wait_for(
        lambda c: any(e.get("ok") is False or e.get("type") == "error" for e in c.events), what="error"
    )
    for client in (alice, bob, dave):
        await client.close()


async def test_set_presence_away_shows_as_away(fleet: Fleet) -> None:
    bob = fleet.user("bob")
    alice = await fleet.connect("alice", "eu-west")
    await alice.send({"type": "presence_sub", "ids": [bob["id"]]})
    bob_ws = await fleet.connect("bob", "us-east")
    await wait_presence(alice, bob["id"], "active")
    assert (await fleet.api("users.setPresence", bob["token"], presence="away"))["ok"]
    await wait_presence(alice, bob["id"], "away")
    got = await fleet.api("users.getPresence", fleet.user("alice")["token"], user=bob["id"])
    assert got == {"ok": True, "presence": "away"}
    mine = await fleet.api("users.getPresence", bob["token"])
    assert mine["presence"] == "away" and mine["online"] is True and mine["manual_away"] is True
    assert (await fleet.api("users.setPresence", bob["token"], presence="auto"))["ok"]
    await wait_presence(alice, bob["id"], "active")
    await bob_ws.close()
    await wait_presence(alice, bob["id"], "away")
    await alice.close()


async def test_killed_gateways_users_go_away_within_the_lease(fleet: Fleet) -> None:
    bob_id = fleet.user("bob")["id"]
    alice = await fleet.connect("alice", "eu-west")
    await alice.send({"type": "presence_sub", "ids": [bob_id]})
    bob = await fleet.connect("bob", "us-east")
    await wait_presence(alice, bob_id, "active")
    assert bob.gateway_port != alice.gateway_port
    gateway = next(p for p in fleet.processes("gateway") if p["port"] == bob.gateway_port)
    fleet.kill(gateway["pid"])
    killed = time.monotonic()
    await wait_presence(alice, bob_id, "away", timeout_s=LEASE_TTL_S + LEASE_MARGIN_S)
    assert time.monotonic() - killed <= LEASE_TTL_S + LEASE_MARGIN_S
    await alice.close()


async def test_killed_presence_server_is_replaced_and_watchers_stay_right(fleet: Fleet) -> None:
    bob = fleet.user("bob")
    ring = presence_ring(fleet)
    slot, victim = ring.slot_for(bob["id"]), ring.owner_for(bob["id"])
    # Someone else on the same slot, online but set away by hand: the webapp re-sends that.
    away = next(
        (u for u in fleet.seed["users"] if u["name"] not in ("alice", "bob") and ring.slot_for(u["id"]) == slot), None
    )
    alice = await fleet.connect("alice", "eu-west")
    await alice.send({"type": "presence_sub", "ids": [bob["id"]] + ([away["id"]] if away else [])})
    bob_ws = await fleet.connect("bob", "us-east")
    await wait_presence(alice, bob["id"], "active")
    away_ws = None
    if away is not None:
        away_ws = await fleet.connect(away["name"], "us-east")
        assert (await fleet.api("users.setPresence", away["token"], presence="away"))["ok"]
        await wait_presence(alice, away["id"], "away")
    before = len(alice.events)
    fleet.kill(process_by_id(fleet, victim)["pid"])

    async def promoted() -> str | None:
        now = presence_ring(fleet)
        owner = now.doc.slots.get(slot)
        return owner if now.version > ring.version and owner not in (None, victim) else None

    await async_wait_until(promoted, timeout_s=FAILOVER_TIMEOUT_S, what=f"CHARM to replace {victim} in {slot}")

    async def webapp_says_active() -> bool:
        got = await fleet.api("users.getPresence", fleet.user("alice")["token"], user=bob["id"])
        return got.get("presence") == "active"

    await async_wait_until(webapp_says_active, what="the new presence server to know bob is online")
    assert await query(alice, bob["id"]) == "active"
    if away is not None:
        assert await query(alice, away["id"]) == "away"
        assert (await fleet.api("users.setPresence", away["token"], presence="auto"))["ok"]
        await wait_presence(alice, away["id"], "active")
        await away_ws.close()
    assert "away" not in seen(alice, bob["id"], before)  # no flap while the slot moved
    # Alice's subscription moved with bob's slot, without reconnecting.
    await bob_ws.close()
    await wait_presence(alice, bob["id"], "away")
    bob_ws = await fleet.connect("bob", "us-east")
    await wait_presence(alice, bob["id"], "active")
    assert not alice.closed.is_set()
    for client in (alice, bob_ws):
        await client.close()
