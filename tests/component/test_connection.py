"""Component tests for services.connection over real localhost sockets.

Framing, requests, buffers and links, on the plaintext wire (``--wire-tls
off``) so raw sockets can write broken frames; the TLS layer under them has
its own tests in test_tls_wire.py.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from services import ops, wire
from services.connection import MAX_IDLE_TIMEOUT_GROUPS, PeerConnection, PeerLimits, PeerLink, connect, serve
from services.errors import (
    BadMessage,
    ConnectionLost,
    ErrorCode,
    FrameTimeout,
    FrameTooLarge,
    IdleTimeout,
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


# -- limits: bad messages, in-flight requests, half-sent frames, idle peers ----------------------


class Validating(Endpoint):
    """An endpoint whose handlers parse through services.ops, counting what it refuses."""

    def __init__(self, **conn_kwargs: Any) -> None:
        self.bad: list[tuple[str, bool]] = []
        self.kinds: list[str] = []
        super().__init__(on_bad_message=self.count, **conn_kwargs)

    def count(self, conn: PeerConnection, exc: BadMessage, was_request: bool) -> None:
        self.bad.append((exc.op, was_request))
        self.kinds.append(exc.kind)

    def handle(self, conn: PeerConnection, msg: dict[str, Any]) -> Any:
        if msg["op"] == "pub":
            ops.parse_as(msg, ops.Publish)
            return wire.reply_ok(msg["id"])
        if msg["op"] == "hold":
            return self._hold(msg["id"])
        return super().handle(conn, msg)

    async def _hold(self, request_id: int) -> dict[str, Any]:
        await self.release.wait()
        return wire.reply_ok(request_id)

    release = asyncio.Event()


async def test_a_bad_request_is_answered_bad_request_and_the_connection_stays() -> None:
    endpoint = await Validating().start()
    try:
        client = await dial(endpoint.port)
        with pytest.raises(PeerError) as info:
            await client.request({"op": "pub", "ch": "C1", "seq": 2**63, "json": b"{}"})
        assert info.value.code == ErrorCode.BAD_REQUEST and "seq" in info.value.reply["detail"]
        assert endpoint.bad == [("pub", True)]
        assert (await client.request({"op": "pub", "ch": "C1", "seq": 1, "json": b"{}"}))["op"] == "ok"
        assert endpoint.errors.empty() and client.is_open
        client.close()
    finally:
        await endpoint.stop()


async def test_a_bad_push_is_dropped_and_counted_and_the_link_stays() -> None:
    endpoint = await Validating().start()
    try:
        bad: list[str] = []

        def on_push(conn: PeerConnection, msg: dict[str, Any]) -> None:
            record = ops.parse_as(msg, ops.Event)  # what a gateway does with an ev
            received.append(record.seq)

        received: list[int | None] = []
        client = await connect(
            HOST,
            endpoint.port,
            lambda: PeerConnection(
                name="gw", on_push=on_push, on_bad_message=lambda c, exc, was_request: bad.append(exc.detail)
            ),
            trust=PLAIN,
        )
        server_side = await within(endpoint.accepted.get())
        server_side.send({"op": "ev", "ch": "C1", "seq": None, "json": b"{}", "t0": 1.0, "ctl": [1]})
        server_side.send({"op": "ev", "ch": 7, "seq": 1, "json": b"{}", "t0": 1.0})
        server_side.send({"op": "ev", "ch": "C1", "seq": 2, "json": b"{}", "t0": 1.0})
        assert (await client.request({"op": "echo", "x": 1}))["echo"] == 1
        for _ in range(100):
            if received:
                break
            await asyncio.sleep(0.01)  # wait-ok: bounded poll for the push
        assert received == [2]
        assert len(bad) == 2 and "ctl" in bad[0] and "ch" in bad[1]
        assert client.is_open
        client.close()
    finally:
        await endpoint.stop()


async def test_requests_in_flight_are_capped_with_backpressure_then_refusal() -> None:
    Validating.release = asyncio.Event()
    endpoint = await Validating(limits=PeerLimits(max_requests_in_flight=2)).start()
    try:
        client = await dial(endpoint.port)
        held = [client.begin_request({"op": "hold"}, timeout_s=WAIT_S) for _ in range(3)]  # one read, three requests
        with pytest.raises(PeerError) as info:
            await within(held[2])
        assert info.value.code == ErrorCode.UNAVAILABLE
        assert endpoint.kinds == ["requests_over_cap"]  # counted, and not as a bad request
        server_side = endpoint.conns[0]
        assert server_side._paused  # at the cap: the server reads no more from this peer
        later = client.begin_request({"op": "echo", "x": "later"}, timeout_s=WAIT_S)
        await asyncio.sleep(0.05)  # wait-ok: give the paused server a chance to (wrongly) read it
        assert not later.done()
        Validating.release.set()
        for future in held[:2]:
            assert (await within(future))["op"] == "ok"
        assert (await within(later))["echo"] == "later"  # reading resumed below the cap
        client.close()
    finally:
        await endpoint.stop()


async def test_a_half_sent_frame_is_cut_off_after_the_frame_timeout() -> None:
    endpoint = await Endpoint(limits=PeerLimits(frame_timeout_s=0.2)).start()
    try:
        good = await dial(endpoint.port)
        reader, writer = await asyncio.open_connection(HOST, endpoint.port)
        started = asyncio.get_running_loop().time()
        writer.write(wire.encode({"op": "echo", "x": "y"})[:3])  # 3 bytes of a frame, then nothing
        await writer.drain()
        error = await within(endpoint.errors.get())
        assert isinstance(error, FrameTimeout)
        assert 0.15 < asyncio.get_running_loop().time() - started < 2.0
        try:
            assert await within(reader.read()) == b""
        except ConnectionResetError:
            pass
        writer.close()
        # A frame sent slowly but steadily is not cut off: its pieces keep completing frames.
        for _ in range(5):
            assert (await good.request({"op": "echo", "x": "ok"}))["echo"] == "ok"
            await asyncio.sleep(0.05)  # wait-ok: spread requests over more than one frame timeout
        good.close()
    finally:
        await endpoint.stop()


async def test_a_silent_peer_is_closed_after_the_idle_timeout_and_keepalives_keep_a_quiet_link() -> None:
    quick = PeerLimits(idle_timeout_s=0.3, keepalive_interval_s=0.05)
    endpoint = await Endpoint(limits=quick).start()
    try:
        quiet = await connect(HOST, endpoint.port, lambda: PeerConnection(name="quiet", limits=quick), trust=PLAIN)
        reader, writer = await asyncio.open_connection(HOST, endpoint.port)  # connects, never sends
        error = await within(endpoint.errors.get())
        assert isinstance(error, IdleTimeout)
        writer.close()
        await asyncio.sleep(0.5)  # wait-ok: longer than the idle timeout, with nothing but keepalives
        assert quiet.is_open
        assert (await quiet.request({"op": "echo", "x": "still"}))["echo"] == "still"
        assert endpoint.errors.empty()
        quiet.close()
    finally:
        await endpoint.stop()


async def test_a_4_gib_length_header_is_refused_at_once() -> None:
    endpoint = await Endpoint().start()
    try:
        reader, writer = await asyncio.open_connection(HOST, endpoint.port)
        writer.write(wire.HEADER.pack(0xFFFFFFFF))
        await writer.drain()
        error = await within(endpoint.errors.get(), 2.0)
        assert isinstance(error, FrameTooLarge) and error.length == 0xFFFFFFFF
        assert endpoint.conns[-1].decoder.buffered_bytes == 0
        writer.close()
    finally:
        await endpoint.stop()


# -- the publish path: corked writes, requests answered from a future's callback -------------


class CountingTransport:
    """Enough of a transport to count writes: each ``write`` is one syscall on a real one."""

    def __init__(self) -> None:
        self.writes: list[bytes] = []
        self.closing = False

    def get_extra_info(self, name: str) -> None:
        return None

    def is_closing(self) -> bool:
        return self.closing

    def write(self, data: bytes) -> None:
        self.writes.append(bytes(data))

    def get_write_buffer_size(self) -> int:
        return 0

    def close(self) -> None:
        self.closing = True

    def abort(self) -> None:
        self.closing = True


async def test_corked_writes_of_one_turn_leave_in_one_write_in_order() -> None:
    conn = PeerConnection(coalesce_writes=True)
    transport = CountingTransport()
    conn.connection_made(transport)  # type: ignore[arg-type]
    frames = [wire.encode_event("C1", seq, b"{}", 1.0) for seq in range(1, 6)]
    for frame in frames:
        conn.write(frame)
    assert transport.writes == []  # corked until the end of this turn
    await asyncio.sleep(0)  # wait-ok: one loop turn, when the cork is pulled
    assert transport.writes == [b"".join(frames)]
    conn.write(frames[0])
    conn.close()  # closing flushes what is corked first
    assert transport.writes[-1] == frames[0]
    conn._stop_limit_timers()


async def test_a_corked_connection_still_cuts_off_a_slow_peer() -> None:
    conn = PeerConnection(coalesce_writes=True, max_send_buffer_bytes=100)
    transport = CountingTransport()
    conn.connection_made(transport)  # type: ignore[arg-type]
    conn.write(b"x" * 60)
    with pytest.raises(SendBufferFull):
        conn.write(b"x" * 60)  # corked bytes count against the bound
    assert transport.closing
    await asyncio.sleep(0)  # wait-ok: the flush finds the connection gone and writes nothing
    assert transport.writes == []
    conn._stop_limit_timers()


async def test_requests_answered_by_a_future_reply_in_completion_order_and_count_in_flight() -> None:
    futures: list[asyncio.Future[dict[str, Any]]] = []
    served: list[PeerConnection] = []

    def handle(conn: PeerConnection, msg: dict[str, Any]) -> Any:
        served.append(conn)
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        future.request_id = msg["id"]  # type: ignore[attr-defined]
        futures.append(future)
        return future

    server = await serve(
        HOST, 0, lambda: PeerConnection(name="server", on_request=handle, coalesce_writes=True), trust=PLAIN
    )
    port = server.sockets[0].getsockname()[1]
    client = await dial(port, coalesce_writes=True)
    try:
        replies = [client.begin_request({"op": "x"}, timeout_s=WAIT_S) for _ in range(3)]
        for _ in range(200):
            if len(futures) == 3:
                break
            await asyncio.sleep(0.01)  # wait-ok: polling, bounded, for the server to read the requests
        assert len(futures) == 3
        assert served[0].requests_in_flight == 3  # each counts against the cap, with no task
        futures[2].set_result(wire.reply_ok(futures[2].request_id, n=2))  # type: ignore[attr-defined]
        futures[0].set_exception(ValueError("bug"))
        futures[1].set_exception(BadMessage("x", "field: bad"))
        assert (await within(replies[2]))["n"] == 2
        with pytest.raises(PeerError) as internal:
            await within(replies[0])
        assert internal.value.code == ErrorCode.INTERNAL
        with pytest.raises(PeerError) as bad:
            await within(replies[1])
        assert bad.value.code == ErrorCode.BAD_REQUEST
        assert served[0].requests_in_flight == 0
    finally:
        client.close()
        server.close()


async def test_requests_with_one_timeout_share_one_deadline_timer_and_each_still_times_out(
    endpoint: Endpoint,
) -> None:
    # Issue 17: a timer per request cost ~5 µs under uvloop; requests that share a timeout
    # share one timer (RequestDeadlines), and each still fails on its own deadline.
    client = await dial(endpoint.port)
    try:
        answered = [client.begin_request({"op": "echo", "x": n}, timeout_s=0.3) for n in range(50)]
        silent = client.begin_request({"op": "silent"}, timeout_s=0.3)
        other = client.begin_request({"op": "silent"}, timeout_s=0.2)  # another timeout: its own timer
        assert sorted(client._deadlines) == [0.2, 0.3]
        assert [(await within(f))["echo"] for f in answered] == list(range(50))
        assert len(client._deadlines[0.3]) == 1  # answered requests left it; the silent one waits
        with pytest.raises(RequestTimeout) as info:
            await within(other)
        assert "silent" in str(info.value) and not silent.done()  # each on its own deadline
        with pytest.raises(RequestTimeout):
            await within(silent)
        assert client._pending == {} and client._deadlines == {}
        assert (await client.request({"op": "echo", "x": 1}, timeout_s=0.3))["echo"] == 1
    finally:
        client.close()


async def test_answered_requests_with_computed_timeouts_leave_no_timers_behind(endpoint: Endpoint) -> None:
    # A caller that passes a remaining budget (admin_server's routed publish) makes one timeout group
    # per request; once answered, those groups (and their timers) go at once beyond a few kept ones.
    client = await dial(endpoint.port)
    try:
        for n in range(200):
            assert (await within(client.begin_request({"op": "echo", "x": n}, timeout_s=5.0 + n / 1000)))["echo"] == n
        assert len(client._deadlines) <= MAX_IDLE_TIMEOUT_GROUPS + 1
        assert client._pending == {}
    finally:
        client.close()
