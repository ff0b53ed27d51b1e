"""Speaking msgpack to fleet servers as a legitimate peer, for fault tests.

:func:`dial` is the one place system tests open a msgpack connection to a
fleet process, with a certificate from the fleet's own CA (``DATA_DIR/tls``)
of the role the test plays: ``as`` an admin server, ``webapp`` the webapp,
``gw`` a gateway (``gw-stranger``); :func:`open_raw` is a TLS connection as
that gateway for byte-level faults, so the bytes reach the framing layer.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from services.connection import PeerConnection, connect
from services.tls import WireTrust
from tests.system.harness import Fleet

PushHandler = Callable[[PeerConnection, dict[str, Any]], None]


# The identity each peer name dials as.
PEERS = {
    "as": ("admin-server", "as-test-peer"),
    "webapp": ("webapp", "webapp-test-peer"),
    "gw": ("gateway", "gw-stranger"),
}


def credentials(fleet: Fleet, name: str) -> WireTrust:
    return fleet.trust(*PEERS[name])


async def dial(fleet: Fleet, proc: dict[str, Any], name: str, on_push: PushHandler | None = None) -> PeerConnection:
    """A msgpack connection to fleet process ``proc`` (an entry of fleet.json), as peer ``name``."""
    return await connect(
        str(proc["host"]),
        int(proc["port"]),
        lambda: PeerConnection(name=name, on_push=on_push or ignore),
        trust=credentials(fleet, name),
    )


async def open_raw(fleet: Fleet, proc: dict[str, Any]) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A TLS connection (as a gateway) to ``proc``'s msgpack port, for byte-level faults (half frames, huge headers)."""
    return await asyncio.open_connection(str(proc["host"]), int(proc["port"]), ssl=credentials(fleet, "gw").client)


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
