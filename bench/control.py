"""The control loop of the benchmarks' child processes: JSON-line requests on stdin, one JSON-line reply each on stdout.

Used by :mod:`bench.load_client` and the ``--role`` processes of
:mod:`bench.broadcast` (driven by :class:`bench.harness.LoadClient`). Standard library only:
it runs inside measured processes, which should not import more than they need.
"""

from __future__ import annotations

import asyncio
import json
import sys
import threading
from collections.abc import Awaitable, Callable
from typing import Any

Handler = Callable[[dict[str, Any]], Awaitable[dict[str, Any]]]


async def control_loop(handlers: dict[str, Handler]) -> None:
    """Answer each request ``{"cmd": ..., ...}`` with ``await handlers[cmd](request)``, in order.

    An unknown command or a handler's exception is answered ``{"ok": false, "error": ...}``.
    ``handlers["quit"]`` must stop the process's work: the loop returns after answering ``quit``,
    and when stdin closes (the controller went away) it runs that handler (with ``{}``) and returns."""
    loop = asyncio.get_running_loop()
    lines: asyncio.Queue[str | None] = asyncio.Queue()

    def reader() -> None:
        for line in sys.stdin:
            loop.call_soon_threadsafe(lines.put_nowait, line)
        loop.call_soon_threadsafe(lines.put_nowait, None)

    threading.Thread(target=reader, daemon=True).start()
    while True:
        line = await lines.get()
        if line is None:  # the controller went away: stop
            await handlers["quit"]({})
            return
        req = json.loads(line)
        cmd = req.get("cmd")
        handler = handlers.get(cmd)
        try:
            reply = await handler(req) if handler else {"ok": False, "error": f"unknown cmd {cmd!r}"}
        except Exception as exc:  # noqa: BLE001 - reported to the controller
            reply = {"ok": False, "error": repr(exc)}
        sys.stdout.write(json.dumps(reply) + "\n")
        sys.stdout.flush()
        if cmd == "quit":
            return
