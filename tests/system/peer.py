"""Speaking msgpack to fleet servers as a legitimate peer, for fault tests.

:func:`dial` is the one place system tests open a msgpack connection to a
fleet process. When the fleet's listeners require mutual TLS, this is the
only function that must present a certificate (a fleet identity of the
role the test plays: ``as`` for an admin server, ``gw`` for a gateway).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from services.connection import PeerConnection, connect

PushHandler = Callable[[PeerConnection, dict[str, Any]], None]


async def dial(proc: dict[str, Any], name: str, on_push: PushHandler | None = None) -> PeerConnection:
    """A msgpack connection to fleet process ``proc`` (an entry of fleet.json), as peer ``name``."""
    return await connect(
        str(proc["host"]), int(proc["port"]), lambda: PeerConnection(name=name, on_push=on_push or ignore)
    )


async def open_raw(proc: dict[str, Any]) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A bare TCP connection to ``proc``'s msgpack port, for byte-level faults (half frames, huge headers)."""
    return await asyncio.open_connection(str(proc["host"]), int(proc["port"]))


def ignore(conn: PeerConnection, msg: dict[str, Any]) -> None:
    pass


async def metric(proc: dict[str, Any], name: str, **labels: str) -> float:
    """The value of one sample on ``proc``'s /metrics (0 when absent)."""
    async with aiohttp.ClientSession() as http:
        async with http.get(f"http://{proc['host']}:{proc['metrics_port']}/metrics") as resp:
            text = await resp.text()
    want = tuple(sorted(labels.items()))
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and tuple(sorted(sample.labels.items())) == want:
                return float(sample.value)
    return 0.0


async def error_count(proc: dict[str, Any], kind: str) -> float:
    return await metric(proc, "rtm_errors_total", kind=kind)
