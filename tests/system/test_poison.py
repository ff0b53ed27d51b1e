"""Issue 13 against the real fleet (``rtm up``): one user's oversized post and edit
get clear errors and stop nobody, and an event the fleet refuses for good is
dead-lettered, counted, listed by ``rtm status``, redrivable, and never blocks
the events behind it."""

from __future__ import annotations

import json
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from rtmctl.launcher import rtm_argv
from tests.support import DEFAULT_WAIT_S, async_wait_until
from tests.system.harness import Fleet
from tests.system.test_bad_input import scrape
from webapp_stub.handoff import HANDOFF_MARK
from webapp_stub.seed import seed_demo
from webapp_stub.store import Store

CLI_TIMEOUT_S = 60.0


def rich_text_blocks(total_chars: int, blocks: int = 50) -> str:
    """``blocks`` as a form field: text in rich_text elements, which only the event size bounds."""
    per = total_chars // blocks
    return json.dumps([{"type": "rich_text", "elements": [{"type": "text", "text": "b" * per}]}] * blocks)


def rtm(*args: str) -> str:
    done = subprocess.run(rtm_argv(*args), capture_output=True, text=True, timeout=CLI_TIMEOUT_S, check=False)
    return done.stdout + done.stderr


async def webapp_metric(fleet: Fleet, name: str, **labels: str) -> float:
    proc = fleet.processes("webapp")[0]
    samples = await scrape(proc["host"], proc["port"])
    return sum(v for (n, ls), v in samples.items() if n == name and all((k, w) in ls for k, w in labels.items()))


async def delivered_everywhere(fleet: Fleet) -> None:
    """A fresh post in every seeded channel reaches a connected member."""
    client = await fleet.connect("bob")
    try:
        alice = fleet.user("alice")["token"]
        for channel in fleet.seed["channels"]:
            text = f"still-flowing-{uuid.uuid4().hex[:8]}"
            reply = await fleet.api("chat.postMessage", alice, channel=channel["id"], text=text)
            assert reply["ok"], reply
            await client.wait_texts([text], channel["id"])
    finally:
        await client.close()


async def test_oversized_post_and_edit_get_clear_errors_and_stop_nobody(fleet: Fleet) -> None:
    alice = fleet.user("alice")["token"]
    general = fleet.channel("general")
    reply = await fleet.api("chat.postMessage", alice, channel=general, blocks=rich_text_blocks(2_200_000))
    assert reply == {"ok": False, "error": "msg_too_long"}
    reply = await fleet.api(
        "chat.postMessage",
        alice,
        channel=general,
        blocks=json.dumps([{"type": "section", "text": {"type": "mrkdwn", "text": "x" * 2_200_000}}]),
    )
    assert reply == {"ok": False, "error": "invalid_blocks"}
    posted = await fleet.api("chat.postMessage", alice, channel=general, text="to be edited")
    assert posted["ok"], posted
    reply = await fleet.api("chat.update", alice, channel=general, ts=posted["ts"], blocks=rich_text_blocks(2_200_000))
    assert reply == {"ok": False, "error": "msg_too_long"}
    assert await webapp_metric(fleet, "rtm_errors_total", kind="msg_too_long") >= 2
    await delivered_everywhere(fleet)


@pytest.fixture(scope="module")
def poisoned_fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Fleet, list[str]]]:
    """A fleet started on a database written before the limits existed: it holds the issue's
    4.4 MB edit event (and its 2.2 MB post) in the hand-off's replay window."""
    data_dir: Path = tmp_path_factory.mktemp("poisoned")
    store = Store(data_dir, max_event_bytes=64 * 1024 * 1024)  # as the unfixed webapp did
    seed = seed_demo(store, users=5, channels=2, bots=1)
    (data_dir / "seed.json").write_text(json.dumps(seed))
    alice = store.user(seed["users"][0]["id"])
    general = store.channel(seed["channels"][0]["id"])
    blocks = json.loads(rich_text_blocks(2_200_000))
    message, post_event = store.post_message(general, alice, "huge", extra={"blocks": blocks})
    _, edit_event = store.update_message(general, alice, message["ts"], "huger", extra={"blocks": blocks * 2})
    assert len(edit_event.json) > 4 * 1024 * 1024  # larger than the wire frame
    after = store.post_message(general, alice, "behind the poison")[1]
    store.set_mark(HANDOFF_MARK, post_event.t0 - 60)  # a crash before they were handed off: replayed at start
    store.close()
    handle = Fleet.up(data_dir)
    try:
        yield handle, [post_event.eid, edit_event.eid, after.eid]
    finally:
        handle.down()


async def test_a_poisoned_replay_is_dead_lettered_and_the_fleet_delivers(
    poisoned_fleet: tuple[Fleet, list[str]],
) -> None:
    fleet, (post_eid, edit_eid, _after_eid) = poisoned_fleet

    async def parked() -> float:
        return await webapp_metric(fleet, "rtm_deadletter_total", reason="too_large")

    await async_wait_until(parked, what="the oversized events to be parked")
    assert await webapp_metric(fleet, "rtm_deadletter_total", reason="too_large") == 2
    assert await webapp_metric(fleet, "rtm_deadletter_parked") == 2
    status = rtm("status", "--data-dir", str(fleet.data_dir))
    assert "dead letters: 2" in status and post_eid in status and edit_eid in status and "too_large" in status, status
    await delivered_everywhere(fleet)  # nothing behind the poison is blocked, in any channel

    # a redrive goes back through the live outbox; still too large, it is parked again, not sent
    said = rtm("deadletter", "redrive", edit_eid, "--data-dir", str(fleet.data_dir))
    assert "will be sent again" in said, said

    async def redriven() -> float:
        return await webapp_metric(fleet, "rtm_deadletter_redriven_total", outcome="parked_again")

    await async_wait_until(redriven, timeout_s=DEFAULT_WAIT_S, what="the redrive")
    listing = rtm("deadletter", "list", "--data-dir", str(fleet.data_dir))
    line = next(line for line in listing.splitlines() if edit_eid in line)
    assert "parked" in line and "redrives=1" in line, listing
    await delivered_everywhere(fleet)
