"""``rtm.connect`` as the benchmarks' client processes call it: one POST, retried as a Slack client does.

The one copy of the call for ``bench.loadclient``, ``bench.evclient`` and ``bench.soakclient``. Each
passes its own retry rule (attempts, delay, which errors are retryable): the rules differ on purpose
for now -- the fan-out and failover clients count a server error as a failure to report, the soak's
clients ride through it as Slack's do -- and are named constants in each client so the difference is
visible. Choosing one rule for all three would change what the benchmarks report (the numbers in
docs/benchmarks.md were measured with these rules).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Collection
from typing import Any

import aiohttp

RATELIMITED_ONLY = ("ratelimited",)
OVERLOAD = ("ratelimited", "service_unavailable")
SLACK_RETRYABLE = ("ratelimited", "service_unavailable", "fatal_error", "internal_error")


class RtmConnectError(RuntimeError):
    """rtm.connect said no, with an error that is not retryable or kept failing."""


async def rtm_connect(
    http: aiohttp.ClientSession,
    api_url: str,
    token: str,
    region: str = "",
    *,
    attempts: int,
    retry_delay_s: float,
    retryable: Collection[str],
    on_retry: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """POST ``rtm.connect`` (with the ``region`` hint when set) until it is ok; returns the reply (``url`` ...).

    A retryable error waits ``retry_delay_s`` and asks again, up to ``attempts`` requests in all;
    ``on_retry(error)`` is told of each retry. Raises :class:`RtmConnectError` otherwise."""
    reply: dict[str, Any] = {}
    for _ in range(attempts):
        form = {"region": region} if region else {}
        async with http.post(api_url + "rtm.connect", data=form, headers={"Authorization": f"Bearer {token}"}) as resp:
            reply = await resp.json(content_type=None)
        if reply.get("ok"):
            return reply
        error = str(reply.get("error"))
        if error not in retryable:
            raise RtmConnectError(f"rtm.connect: {error}")
        if on_retry is not None:
            on_retry(error)
        await asyncio.sleep(retry_delay_s)
    raise RtmConnectError(f"rtm.connect: {reply.get('error')} {attempts} times")
