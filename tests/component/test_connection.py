"""Component tests for services.connection over real localhost sockets.

Framing, requests, buffers and links, on the plaintext wire (``--wire-tls
off``) so raw sockets can write broken frames; the TLS layer under them has
its own tests in test_tls_wire.py.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from services import wire
from services.connection import PeerConnection, PeerLink, connect, serve
from services.errors import (
    ConnectionLost,
    ErrorCode,
    FrameTooLarge,
    MalformedFrame,
    NotOwner,
    PeerError,
    RequestTimeout,
    SendBufferFull,
)
from services.tls import WireTrust
from tests.support import DEFAULT_WAIT_S, free_port

HOST = "127.0.0.1"
PLAIN = WireTrust.off()
WAIT_S = DEFAULT_WAIT_S


class Endpoint:
    """The server side: records its connections, pushes, protocol errors and closes."""

    def __init__(self, **conn_kwargs: Any) -> None:
        self.conn_kwargs = conn_kwargs
        self.conns: list[PeerConnection] = []
        self.pushes: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self.errors: asyncio.Queue[BaseException] = asyncio.Queue()
        self.closes: asyncio.Queue[BaseException | None] = asyncio.Queue()
        self.accepted: asyncio.Queue[PeerConnection] = asyncio.Queue()
        self.server: asyncio.Server | None = None
        self.port = 0

    def handle(self, conn: PeerConnection, msg: dict[str, Any]) -> Any:
        op = msg["op"]
        request_id = msg["id"]
        if op == "echo":
            return wire.reply_ok(request_id, echo=msg.get("x"))
        if op == "slow_echo":
            return self._slow_echo(request_id, msg.get("x"))
        if op == "refuse":
            return wire.reply_err(request_id, ErrorCode.BAD_REQUEST, "refused")
        if op == "sub":
            return wire.reply_err(request_id, ErrorCode.NOT_OWNER, "not mine", version=7)
        if op == "boom":
            raise ValueError("handler bug")
        if op == "silent":
            return None
        return wire.reply_err(request_id, ErrorCode.UNKNOWN_OP, op)

    async def _slow_echo(self, request_id: int, x: Any) -> dict[str, Any]:
        await asyncio.sleep(0)  # wait-ok: yields once, to make the reply asynchronous
        return wire.reply_ok(request_id, echo=x)

    def factory(self) -> PeerConnection:
        conn = PeerConnection(
            name="server",
            on_request=self.handle,
            on_push=lambda c, m: self.pushes.put_nowait(m),
            on_close=lambda c, reason: self.closes.put_nowait(reason),
            on_protocol_error=lambda c, err: self.errors.put_nowait(err),
            **self.conn_kwargs,
        )
        self.conns.append(conn)
        self.accepted.put_nowait(conn)
        return conn

    async def start(self, port: int = 0) -> Endpoint:
        self.server = await serve(HOST, port, self.factory, trust=PLAIN)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
            for conn in self.conns:
                conn.abort()
            await self.server.wait_closed()
            self.server = None


@pytest.fixture
async def endpoint() -> Any:
    ep = await Endpoint().start()
    yield ep
    await ep.stop()


async def dial(port: int, **kwargs: Any) -> PeerConnection:
    return await connect(HOST, port, lambda: PeerConnection(name="client", **kwargs), trust=PLAIN)


async def within(awaitable: Any, timeout_s: float = WAIT_S) -> Any:
    return await asyncio.wait_for(awaitable, timeout_s)


# -- request / reply ----------------------------------------------------------------------


async def test_request_reply(endpoint: Endpoint) -> None:
    client = await dial(endpoint.port)
    try:
        reply = await client.request({"op": "echo", "x": [1, "two", b"\x03"]})
        assert reply == {"op": "ok", "id": 1, "echo": [1, "two", b"\x03"]}
        # Awaitable handlers reply too, and concurrent requests are matched by id.
        replies = await asyncio.gather(*(client.request({"op": "slow_echo", "x": n}) for n in range(20)))
        assert [r["echo"] for r in replies] == list(range(20))
        assert client._pending == {}
    finally:
        client.close()


async def test_err_reply_raises_peer_error(endpoint: Endpoint) -> None:
    client = await dial(endpoint.port)
    try:
        with pytest.raises(PeerError) as caught:
            await client.request({"op": "refuse"})
        assert not isinstance(caught.value, NotOwner)
        assert caught.value.code == ErrorCode.BAD_REQUEST
        assert caught.value.reply["detail"] == "refused"
        with pytest.raises(NotOwner) as not_owner:
            await client.request({"op": "sub", "gw": "gw-1", "chans": [["C1", -1]]})
        assert not_owner.value.code == ErrorCode.NOT_OWNER
        assert not_owner.value.version == 7
        # The connection is still good after error replies.
        assert (await client.request({"op": "echo", "x": 1}))["echo"] == 1
    finally:
        client.close()


async def test_handler_exception_is_an_internal_error_not_a_disconnect(endpoint: Endpoint) -> None:
    client = await dial(endpoint.port)
    try:
        with pytest.raises(PeerError) as caught:
            await client.request({"op": "boom"})
        assert caught.value.code == ErrorCode.INTERNAL
        assert "handler bug" in caught.value.reply["detail"]
        assert (await client.request({"op": "echo", "x": 2}))["echo"] == 2
    finally:
        client.close()


async def test_requests_to_a_connection_that_serves_none_are_refused(endpoint: Endpoint) -> None:
    client = await dial(endpoint.port)
    try:
        server_conn = await within(endpoint.accepted.get())
        with pytest.raises(PeerError) as caught:
            await server_conn.request({"op": "echo"}, timeout_s=WAIT_S)
        assert caught.value.code == ErrorCode.UNKNOWN_OP
    finally:
        client.close()


async def test_request_timeout(endpoint: Endpoint) -> None:
    client = await dial(endpoint.port)
    try:
        with pytest.raises(RequestTimeout):
            await client.request({"op": "silent"}, timeout_s=0.1)
        assert client._pending == {}
        assert client.is_open
        assert (await client.request({"op": "echo", "x": 3}))["echo"] == 3
    finally:
        client.close()


async def test_pending_request_fails_when_the_connection_drops(endpoint: Endpoint) -> None:
    client = await dial(endpoint.port)
    server_conn = await within(endpoint.accepted.get())
    # The abort runs once the request is registered and sent, while it waits.
    asyncio.get_running_loop().call_soon(server_conn.abort)
    with pytest.raises(ConnectionLost):
        await client.request({"op": "silent"}, timeout_s=WAIT_S)
    assert client._pending == {}
    await within(client.closed)
    with pytest.raises(ConnectionLost):
        client.send({"op": "ping"})
    with pytest.raises(ConnectionLost):
        await client.request({"op": "echo"})


# -- pushes -------------------------------------------------------------------------------


async def test_pushes_both_ways(endpoint: Endpoint) -> None:
    received: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
    client = await dial(endpoint.port, on_push=lambda c, m: received.put_nowait(m))
    try:
        for seq in range(1, 4):
            client.send({"op": "pub", "ch": "C1", "seq": seq, "json": b"{}"})
        got = [await within(endpoint.pushes.get()) for _ in range(3)]
        assert [m["seq"] for m in got] == [1, 2, 3]
        assert all("id" not in m for m in got)
        server_conn = endpoint.conns[0]
        frame = wire.encode_event("C1", 9, b'{"type":"message"}', 1.0)
        server_conn.write(frame)  # a pre-encoded fan-out frame
        assert await within(received.get()) == {
            "op": "ev",
            "ch": "C1",
            "seq": 9,
            "json": b'{"type":"message"}',
            "t0": 1.0,
        }
    finally:
        client.close()


async def test_a_read_of_several_pushes_is_bracketed_as_a_burst() -> None:
    calls: list[Any] = []
    conn = PeerConnection(on_push=lambda c, m: calls.append(m["seq"]), on_burst=calls.append)

    class Transport:  # enough of one for a connection that only receives
        def get_extra_info(self, name: str) -> None:
            return None

        def is_closing(self) -> bool:
            return False

        def abort(self) -> None:
            pass

    conn.connection_made(Transport())  # type: ignore[arg-type]
    one = wire.encode_event("C1", 1, b"{}", 1.0)
    conn.data_received(one)  # a single frame: no burst
    assert calls == [1]
    calls.clear()
    conn.data_received(wire.encode_event("C1", 2, b"{}", 1.0) + wire.encode_event("C1", 3, b"{}", 1.0))
    assert calls == [True, 2, 3, False]
    calls.clear()

    def failing(c: Any, m: Any) -> None:
        raise RuntimeError("bad push")

    conn.on_push = failing  # a push that fails still closes the burst
    conn.data_received(one + one)
    assert calls[0] is True and calls[-1] is False


# -- protocol errors ------------------------------------------------------------------------


async def test_garbage_disconnects_that_peer_only(endpoint: Endpoint) -> None:
    good = await dial(endpoint.port)
    try:
        assert (await good.request({"op": "echo", "x": "before"}))["echo"] == "before"
        reader, writer = await asyncio.open_connection(HOST, endpoint.port)
        writer.write(wire.HEADER.pack(4) + b"\xc1\xc1\xc1\xc1")
        await writer.drain()
        error = await within(endpoint.errors.get())
        assert isinstance(error, MalformedFrame)
        reason = await within(endpoint.closes.get())
        assert reason is error
        # The raw peer sees its connection end.
        try:
            assert await within(reader.read()) == b""
        except ConnectionResetError:
            pass
        writer.close()
        # The server keeps serving the other connection, and new ones.
        assert (await good.request({"op": "echo", "x": "after"}))["echo"] == "after"
        late = await dial(endpoint.port)
        assert (await late.request({"op": "echo", "x": "late"}))["echo"] == "late"
        late.close()
        assert endpoint.errors.empty()
    finally:
        good.close()


async def test_oversized_frame_disconnects() -> None:
    endpoint = await Endpoint(max_frame_bytes=1024).start()
    try:
        client = await dial(endpoint.port)
        pending = asyncio.ensure_future(client.request({"op": "echo", "x": "y" * 2048}, timeout_s=WAIT_S))
        error = await within(endpoint.errors.get())
        assert isinstance(error, FrameTooLarge)
        assert error.limit == 1024
        assert error.length > 2048
        assert isinstance(await within(endpoint.closes.get()), FrameTooLarge)
        with pytest.raises(ConnectionLost):
            await within(pending)
        await within(client.closed)
        assert not client.is_open
        # A frame right under the limit is still fine on a new connection.
        other = await dial(endpoint.port)
        assert (await other.request({"op": "echo", "x": "y" * 900}))["echo"] == "y" * 900
        other.close()
    finally:
        await endpoint.stop()


async def test_slow_reader_is_disconnected_when_the_send_buffer_overflows() -> None:
    limit = 64 * 1024
    endpoint = await Endpoint(max_send_buffer_bytes=limit).start()
    try:
        client = await dial(endpoint.port)
        server_conn = await within(endpoint.accepted.get())
        assert client.transport is not None
        client.transport.pause_reading()
        frame = wire.encode({"op": "ev", "ch": "C1", "json": b"x" * (256 * 1024)})
        written = 0
        with pytest.raises(SendBufferFull) as caught:
            for _ in range(2000):  # ~500 MiB: far beyond any kernel socket buffer
                server_conn.write(frame)
                written += 1
        assert caught.value.limit_bytes == limit
        assert caught.value.pending_bytes > limit
        assert written < 2000
        # The slow peer was disconnected, not waited for.
        reason = await within(endpoint.closes.get())
        assert isinstance(reason, SendBufferFull)
        assert server_conn.close_reason is reason
        with pytest.raises(ConnectionLost):
            server_conn.write(frame)
        client.transport.resume_reading()
        await within(client.closed)
    finally:
        await endpoint.stop()


# -- PeerLink ------------------------------------------------------------------------------


async def test_peer_link_reconnects_after_a_server_restart() -> None:
    port = free_port()
    endpoint = await Endpoint().start(port)
    connected: asyncio.Queue[PeerConnection] = asyncio.Queue()
    disconnects: list[int] = []

    async def on_connected(conn: PeerConnection) -> None:
        # Like a gateway's resubscribe: a request on the fresh connection.
        reply = await conn.request({"op": "echo", "x": "hello"})
        assert reply["echo"] == "hello"
        connected.put_nowait(conn)

    link = PeerLink(
        "test-link",
        address=lambda: (HOST, port),
        factory=lambda: PeerConnection(name="link-client"),
        trust=PLAIN,
        on_connected=on_connected,
        on_disconnected=lambda: disconnects.append(1),
    )
    link.start()
    try:
        first = await within(connected.get())
        assert link.connected
        assert (await link.request({"op": "echo", "x": 1}))["echo"] == 1

        await endpoint.stop()
        await within(first.closed)
        assert disconnects == [1]
        assert not link.connected

        endpoint = await Endpoint().start(port)
        second = await within(connected.get())
        assert second is not first
        assert link.conn is second
        assert link.connected
        assert (await link.request({"op": "echo", "x": 2}))["echo"] == 2
        assert len(endpoint.conns) == 1
    finally:
        await link.close()
        await endpoint.stop()


async def test_peer_link_waits_for_a_server_that_is_not_up_yet() -> None:
    port = free_port()
    connects: list[PeerConnection] = []

    async def on_connected(conn: PeerConnection) -> None:
        connects.append(conn)

    link = PeerLink(
        "late",
        address=lambda: (HOST, port),
        factory=lambda: PeerConnection(name="c"),
        on_connected=on_connected,
        trust=PLAIN,
    )
    link.start()
    endpoint = Endpoint()
    try:
        with pytest.raises(ConnectionLost):
            await link.wait_connected(0.1)  # nothing listens yet
        await endpoint.start(port)
        # A request made while the link is down waits for it to come up.
        assert (await link.request({"op": "echo", "x": "up"}, timeout_s=WAIT_S))["echo"] == "up"
        assert len(connects) == 1
    finally:
        await link.close()
        await endpoint.stop()


async def test_peer_link_retries_when_on_connected_fails() -> None:
    endpoint = await Endpoint().start()
    attempts: list[PeerConnection] = []
    ready = asyncio.Event()

    async def on_connected(conn: PeerConnection) -> None:
        attempts.append(conn)
        if len(attempts) == 1:
            raise RuntimeError("resubscribe failed")
        ready.set()

    link = PeerLink(
        "flaky",
        address=lambda: (HOST, endpoint.port),
        factory=lambda: PeerConnection(name="c"),
        trust=PLAIN,
        on_connected=on_connected,
    )
    link.start()
    try:
        await within(ready.wait())
        assert len(attempts) == 2
        assert attempts[0].closed.done()
        assert isinstance(attempts[0].close_reason, RuntimeError)
        assert (await link.request({"op": "echo", "x": 5}))["echo"] == 5
    finally:
        await link.close()
        await endpoint.stop()


async def test_peer_link_close_closes_the_connection() -> None:
    endpoint = await Endpoint().start()
    link = PeerLink(
        "closing", address=lambda: (HOST, endpoint.port), factory=lambda: PeerConnection(name="c"), trust=PLAIN
    )
    link.start()
    try:
        conn = await link.wait_connected(WAIT_S)
        await link.close()
        await within(conn.closed)
        assert not link.connected
        await within(endpoint.closes.get())
    finally:
        await endpoint.stop()
