"""The gateway's client listener over real sockets: what a client without a ticket can hold."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import NamedTuple

import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosedError

from gateway.app import Gateway, build_parser
from services.errors import CloseCode
from tests.support import DEFAULT_WAIT_S, FleetCA, async_wait_until

MAX_HANDSHAKES = 3
HANDSHAKE_TIMEOUT_S = 1.0
HALF_OPEN_REQUEST = b"GET /ws/x HTTP/1.1\r\nHost: gw\r\n"  # a request line and a header, never finished
UPGRADE_REQUEST = (
    b"GET /ws/x HTTP/1.1\r\nHost: gw\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
)


class Listening(NamedTuple):
    gw: Gateway
    port: int


@pytest.fixture(params=["asyncio", "uvloop"])
def event_loop_policy(request: pytest.FixtureRequest) -> asyncio.AbstractEventLoopPolicy:
    """On both loops: the gateway runs on uvloop, whose transports are not ``asyncio.Transport``s
    (a refusal that assumed one raised in ``connection_made`` and left the connection open)."""
    if request.param == "uvloop":
        uvloop = pytest.importorskip("uvloop")
        return uvloop.EventLoopPolicy()  # type: ignore[no-any-return]
    return asyncio.DefaultEventLoopPolicy()


@pytest.fixture
async def listening(fleet_ca: FleetCA) -> AsyncIterator[Listening]:
    """A gateway's client listener alone on a free port (no Consul, no channel servers)."""
    args = [
        *("--secret", "s", "--instance-id", "gw-test", "--host", "127.0.0.1", "--port", "0"),
        *("--max-handshakes-per-address", str(MAX_HANDSHAKES), "--handshake-timeout-s", str(HANDSHAKE_TIMEOUT_S)),
        *fleet_ca.flags("gateway", "gw-test"),
    ]
    built = Gateway(build_parser().parse_args(args))
    port = await built.listener.start()
    yield Listening(built, port)
    await built.listener.close()
    built.channel_links.stop_retries()
    for task in list(built.tasks):
        task.cancel()
    await asyncio.gather(*built.tasks, return_exceptions=True)
    await built.discovery.close()


async def half_open(port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(HALF_OPEN_REQUEST)
    await writer.drain()
    return reader, writer


def handshake_refusals(gw: Gateway) -> float:
    return float(gw.listener.connects.labels("handshake_limit")._value.get())  # type: ignore[attr-defined]


async def test_half_open_handshakes_are_bounded_per_address_and_time_out(listening: Listening) -> None:
    """A slowloris: requests begun and never finished used to hold a descriptor each for websockets'
    open timeout, without limit (the per-address limit counts upgraded websockets only)."""
    gw, port = listening
    held = [await half_open(port) for _ in range(MAX_HANDSHAKES)]
    reader, writer = await half_open(port)  # one more: 429 at once, and closed
    answer = await asyncio.wait_for(reader.read(), DEFAULT_WAIT_S)
    assert answer.startswith(b"HTTP/1.1 429 ") and b"Retry-After: 5" in answer
    writer.close()
    assert handshake_refusals(gw) == 1
    reader, writer = await asyncio.open_connection("127.0.0.1", port)  # a whole upgrade request meanwhile
    writer.write(UPGRADE_REQUEST)
    assert (await asyncio.wait_for(reader.read(), DEFAULT_WAIT_S)).startswith(b"HTTP/1.1 429 ")
    writer.close()
    # the held ones are closed by the gateway within the handshake timeout, freeing the address
    for held_reader, held_writer in held:
        assert await asyncio.wait_for(held_reader.read(), HANDSHAKE_TIMEOUT_S + DEFAULT_WAIT_S) == b""
        held_writer.close()
    await async_wait_until(_nothing_held(gw), what="the address's handshakes released")
    with pytest.raises(ConnectionClosedError) as closed:  # upgraded now; its made-up ticket is refused
        async with connect(f"ws://127.0.0.1:{port}/ws/x", open_timeout=DEFAULT_WAIT_S) as ws:
            await ws.recv()
    assert closed.value.rcvd is not None and closed.value.rcvd.code == CloseCode.INVALID_TICKET
    assert gw.listener.handshakes.addresses == {}  # a finished handshake is no longer counted


async def test_completed_handshakes_do_not_count_against_the_bound(listening: Listening) -> None:
    """Only handshakes in progress count: more upgraded connections than the bound are fine."""
    gw, port = listening
    for _ in range(MAX_HANDSHAKES * 2):
        with pytest.raises(ConnectionClosedError):
            async with connect(f"ws://127.0.0.1:{port}/ws/x", open_timeout=DEFAULT_WAIT_S) as ws:
                await ws.recv()
    assert handshake_refusals(gw) == 0


def _nothing_held(gw: Gateway) -> object:
    async def check() -> bool:
        return not gw.listener.handshakes.addresses

    return check
