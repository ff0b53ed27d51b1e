"""Keepalive: the gateway pings every client each interval and closes one that stops answering.

The fleet runs with a short ping interval (``RTM_WS_PING_INTERVAL_S``) so that
a dead client is found within a few seconds; a live client (websockets answers
pings by itself) is never disturbed.
"""

from __future__ import annotations

import asyncio
import base64
import os
import struct
import uuid
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from gateway.client_socket import KEEPALIVE_PING_PAYLOAD
from services.errors import CloseCode
from tests.system.harness import Fleet

PING_INTERVAL_S = 0.5
WAIT_S = 15.0  # for any one expected frame: many ping intervals


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    data_dir: Path = tmp_path_factory.mktemp("fleet")
    handle = Fleet.up(data_dir, env={"RTM_WS_PING_INTERVAL_S": str(PING_INTERVAL_S)})
    try:
        yield handle
    finally:
        handle.down()


class SilentClient:
    """A websocket client that completes the handshake, then reads frames and never answers a ping."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def open(cls, url: str) -> SilentClient:
        parts = urlsplit(url)
        reader, writer = await asyncio.open_connection(parts.hostname, parts.port)
        key = base64.b64encode(os.urandom(16)).decode()
        writer.write(
            f"GET {parts.path} HTTP/1.1\r\nHost: {parts.netloc}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n".encode()
        )
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), WAIT_S)
        assert head.startswith(b"HTTP/1.1 101"), head
        return cls(reader, writer)

    async def frame(self) -> tuple[int, bytes]:
        """The next (opcode, payload) from the server (server frames are unmasked)."""
        first, second = await asyncio.wait_for(self.reader.readexactly(2), WAIT_S)
        length = second & 0x7F
        if length == 126:
            (length,) = struct.unpack(">H", await self.reader.readexactly(2))
        elif length == 127:
            (length,) = struct.unpack(">Q", await self.reader.readexactly(8))
        return first & 0x0F, await self.reader.readexactly(length)

    def close(self) -> None:
        self.writer.close()


async def test_a_client_that_stops_answering_pings_is_closed_and_others_stay(fleet: Fleet) -> None:
    live = await fleet.connect("bob")
    reply = await fleet.api("rtm.connect", fleet.user("carol")["token"])
    assert reply["ok"], reply
    silent = await SilentClient.open(reply["url"])
    try:
        pings = 0
        for _ in range(200):  # hello, maybe events, pings, then the close
            opcode, payload = await silent.frame()
            if opcode == 0x9:
                assert payload == KEEPALIVE_PING_PAYLOAD
                pings += 1
            elif opcode == 0x8:
                (code,) = struct.unpack(">H", payload[:2])
                assert code == CloseCode.INTERNAL_ERROR, payload
                assert b"keepalive" in payload[2:]
                break
        else:
            raise AssertionError("no close frame after 200 frames")
        assert pings == 1, "closed at the sweep after the unanswered ping"
    finally:
        silent.close()
    # The live client answered every ping of those sweeps and still gets posts.
    assert not live.closed.is_set()
    text = f"after-keepalive-{uuid.uuid4().hex[:8]}"
    general = fleet.channel("general")
    posted = await fleet.api("chat.postMessage", fleet.user("alice")["token"], channel=general, text=text)
    assert posted["ok"], posted
    await live.wait_texts([text], general)
    assert not live.closed.is_set()
    await live.close()


async def sweeps_passed(fleet: Fleet, name: str) -> int:
    """Wait through the sweeps that find a silent client dead (a ping, then the close); return its pings."""
    reply = await fleet.api("rtm.connect", fleet.user(name)["token"])
    assert reply["ok"], reply
    silent = await SilentClient.open(reply["url"])
    pings = 0
    try:
        for _ in range(200):
            opcode, _ = await silent.frame()
            if opcode == 0x9:
                pings += 1
            elif opcode == 0x8:
                return pings
        raise AssertionError("no close frame after 200 frames")
    finally:
        silent.close()


async def test_a_client_that_answers_pings_stays_through_many_sweeps(fleet: Fleet) -> None:
    live = await fleet.connect("dave")
    sweeps = 0
    for _ in range(3):  # each silent client lives through 1-2 sweeps: 3 of them, at least 3 sweeps
        sweeps += 1 + await sweeps_passed(fleet, "eve")
    assert sweeps >= 3
    assert not live.closed.is_set(), f"live client closed with {live.close_code}"
    await live.close()
