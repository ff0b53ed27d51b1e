"""Background tasks one owner starts: kept alive until done, cancelled together.

asyncio keeps only a weak reference to a task, so a fire-and-forget task must be
held somewhere until it finishes; every server and link that starts such tasks
holds them in one :class:`Tasks`. A task that ends with an exception nobody
awaits is logged here (with its name), instead of surfacing later as asyncio's
"Task exception was never retrieved" when the task is collected.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine, Iterator
from typing import Any, TypeVar

log = logging.getLogger("rtm.tasks")

T = TypeVar("T")


class Tasks:
    """The running background tasks of one owner (a server, a link, a directory)."""

    def __init__(self, owner: str = "") -> None:
        self.owner = owner
        self._running: set[asyncio.Task[Any]] = set()

    def spawn(self, coro: Coroutine[Any, Any, T], name: str | None = None) -> asyncio.Task[T]:
        """Run ``coro`` as a task held until it finishes; returns the task."""
        task = asyncio.ensure_future(coro)
        if name is not None:
            task.set_name(name)
        self._running.add(task)
        task.add_done_callback(self._done)
        return task

    def _done(self, task: asyncio.Task[Any]) -> None:
        self._running.discard(task)
        if task.cancelled():
            return
        exc = task.exception()
        if exc is not None:
            log.error("%s task %s failed", self.owner or "background", task.get_name(), exc_info=exc)

    def __len__(self) -> int:
        return len(self._running)

    def __iter__(self) -> Iterator[asyncio.Task[Any]]:
        return iter(list(self._running))

    async def cancel_all(self) -> None:
        """Cancel every running task and wait until each has ended."""
        running = list(self._running)
        for task in running:
            task.cancel()
        await asyncio.gather(*running, return_exceptions=True)
