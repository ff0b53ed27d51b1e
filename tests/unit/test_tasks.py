"""services.tasks.Tasks: held until done, cancelled together, failures logged."""

from __future__ import annotations

import asyncio
import logging

import pytest

from services.tasks import Tasks


def test_a_task_is_held_until_it_ends_and_returns_its_result() -> None:
    async def scenario() -> None:
        tasks = Tasks("test")
        gate = asyncio.Event()

        async def work() -> int:
            await gate.wait()
            return 7

        task = tasks.spawn(work(), "work")
        assert task.get_name() == "work"
        assert len(tasks) == 1 and list(tasks) == [task]
        gate.set()
        assert await asyncio.wait_for(task, 1.0) == 7
        await asyncio.sleep(0)  # wait-ok: one loop turn, for the done callback
        assert len(tasks) == 0

    asyncio.run(scenario())


def test_cancel_all_cancels_and_waits_for_every_task() -> None:
    async def scenario() -> None:
        tasks = Tasks("test")
        spawned = [tasks.spawn(asyncio.Event().wait()) for _ in range(3)]
        await asyncio.sleep(0)  # wait-ok: one loop turn, for the done callback
        await asyncio.wait_for(tasks.cancel_all(), 1.0)
        assert all(t.cancelled() for t in spawned)
        await asyncio.sleep(0)  # wait-ok: one loop turn, for the done callback
        assert len(tasks) == 0

    asyncio.run(scenario())


def test_a_failing_task_is_logged_with_owner_and_name(caplog: pytest.LogCaptureFixture) -> None:
    async def fail() -> None:
        raise RuntimeError("boom")

    async def scenario() -> None:
        tasks = Tasks("owner-x")
        task = tasks.spawn(fail(), "failing")
        await asyncio.wait([task], timeout=1.0)
        await asyncio.sleep(0)  # wait-ok: one loop turn, for the done callback

    with caplog.at_level(logging.ERROR, logger="rtm.tasks"):
        asyncio.run(scenario())
    assert any("owner-x task failing failed" in r.getMessage() and r.exc_info for r in caplog.records)


def test_a_cancelled_task_is_not_logged(caplog: pytest.LogCaptureFixture) -> None:
    async def scenario() -> None:
        tasks = Tasks("test")
        tasks.spawn(asyncio.Event().wait())
        await asyncio.sleep(0)  # wait-ok: one loop turn, for the done callback
        await tasks.cancel_all()

    with caplog.at_level(logging.ERROR, logger="rtm.tasks"):
        asyncio.run(scenario())
    assert not caplog.records
