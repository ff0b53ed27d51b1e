"""The write side of one client websocket, as the fan-out sees it.

The gateway fans an event out by writing one pre-built websocket frame (server
frames are unmasked, so the bytes are the same for every client) straight to
each client's transport, as ``websockets.broadcast()`` does. That write is the
gateway's hot path: per delivery, the kernel's ``send()`` costs this machine
about 9 µs and everything else must stay well under the rest of a 12.5 µs
budget. Measured with real sockets, each extra Python object touched per write
costs more than it does in a warm micro-benchmark, because the kernel's send
path evicts the CPU caches between two writes. So a :class:`ClientSocket`
keeps what one write needs in one small slotted object, and a session's
``write`` is its bound method: no closure, no dictionary lookups per delivery.

A client that stops reading is cut off (close code 4008) once its unsent
backlog passes ``max_bytes`` or ``max_frames`` frames written since the
buffer was last empty.

Under load one read from a Channel Server holds several events. While a
:class:`Cork` is held for such a burst, writes are queued per socket; at
release each socket gets its frames in one ``send()``. That is where the
kernel's cost goes, so a burst of k events to a socket costs about one
delivery's worth instead of k. A single event is written at once: coalescing
never adds latency.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

from websockets.asyncio.server import ServerConnection
from websockets.frames import Frame, Opcode

log = logging.getLogger("rtm.gateway.client_socket")

# The gateway's keepalive ping: one pre-built frame written to every socket per sweep.
KEEPALIVE_PING_PAYLOAD = b"rtm-keepalive"
KEEPALIVE_PING_FRAME = Frame(Opcode.PING, KEEPALIVE_PING_PAYLOAD).serialize(mask=False)
# A connection from an address with too many handshakes in progress, refused at the TCP accept.
HANDSHAKE_RETRY_AFTER_S = 5
HANDSHAKES_REFUSED_RESPONSE = (
    f"HTTP/1.1 429 Too Many Requests\r\nRetry-After: {HANDSHAKE_RETRY_AFTER_S}\r\n"
    "Content-Length: 0\r\nConnection: close\r\n\r\n"
).encode()


class ClientConnection(ServerConnection):
    """A client websocket kept alive by the gateway's sweep instead of a task per connection.

    The sweep writes :data:`KEEPALIVE_PING_FRAME` and sets ``awaiting_pong``;
    the client's pong clears it. A socket still awaiting its pong at the next
    sweep is dead. websockets' own ``ping()`` costs a future and a random
    payload per ping, and its ``ping_interval`` a task per connection.
    """

    awaiting_pong = False
    # Set by the listener when handshakes in progress are bounded per address (gateway/limits.py):
    # called at the TCP accept (False: refused, the connection is answered 429 and closed), and when
    # the connection ends; the listener also ends the count when the upgrade request has arrived.
    handshake_start: Callable[[ClientConnection], bool] | None = None
    handshake_end: Callable[[ClientConnection], None] | None = None
    handshake_source: str | None = None  # the address its handshake in progress counts under

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        start = self.handshake_start
        if start is not None and not start(self):
            self.transport.write(HANDSHAKES_REFUSED_RESPONSE)  # uvloop's transport is no asyncio.Transport
            self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        end = self.handshake_end
        if end is not None:
            end(self)
        super().connection_lost(exc)

    def acknowledge_pings(self, data: bytes) -> None:
        if data == KEEPALIVE_PING_PAYLOAD:
            self.awaiting_pong = False
        else:
            super().acknowledge_pings(data)


class Cork:
    """While held, client writes queue per socket; :meth:`release` writes each socket's queue at once."""

    __slots__ = ("active", "dirty")

    def __init__(self) -> None:
        self.active = False
        self.dirty: list[ClientSocket] = []  # sockets with queued frames, in first-write order

    def hold(self) -> None:
        self.active = True

    def release(self) -> None:
        self.active = False
        dirty, self.dirty = self.dirty, []
        for client in dirty:
            try:
                client.flush()
            except Exception:  # one socket's failure must not strand the others' queued frames
                log.exception("flushing the frames queued for client sid %s failed", client.sid)
                client.queued = None


class ClientSocket:
    __slots__ = (
        "ws",
        "transport",
        "sid",
        "max_bytes",
        "max_frames",
        "on_slow",
        "cork",
        "queued",
        "queued_frames",
        "cut",
    )

    def __init__(
        self, ws: Any, sid: int, max_bytes: int, max_frames: int, on_slow: Callable[[ClientSocket], None], cork: Cork
    ) -> None:
        self.ws = ws
        self.transport = ws.transport
        self.sid = sid
        self.max_bytes = max_bytes
        self.max_frames = max_frames
        self.on_slow = on_slow
        self.cork = cork
        self.queued: list[bytes] | None = None  # frames held by the cork
        self.queued_frames = 0  # frames written since the transport's buffer was last empty
        self.cut = False

    def write(self, frame: bytes) -> bool:
        """Write one frame (or queue it while corked); False when the socket is gone or cut off."""
        if self.cut:
            return False
        if self.cork.active:
            return self._queue(frame)
        transport = self.transport
        if transport.is_closing():
            return False
        try:
            transport.write(frame)
        except RuntimeError:  # the client half-closed (write_eof) in between: it is leaving
            return False
        pending = transport.get_write_buffer_size()
        if not pending:  # the kernel took it all: the client keeps up
            self.queued_frames = 0
            return True
        return self._backlogged(pending, 1)

    def _queue(self, frame: bytes) -> bool:
        if self.transport.is_closing():
            return False
        if self.queued is None:
            self.queued = [frame]
            self.cork.dirty.append(self)
        else:
            self.queued.append(frame)
        return True

    def flush(self) -> None:
        """Write the frames queued while corked, in order, in one ``send()``."""
        frames, self.queued = self.queued, None
        if not frames or self.cut:
            return
        transport = self.transport
        if transport.is_closing():
            return
        try:
            transport.write(frames[0] if len(frames) == 1 else b"".join(frames))
        except RuntimeError:
            return
        pending = transport.get_write_buffer_size()
        if not pending:
            self.queued_frames = 0
        else:
            self._backlogged(pending, len(frames))

    def _backlogged(self, pending: int, frames: int) -> bool:
        self.queued_frames += frames
        if pending > self.max_bytes or self.queued_frames > self.max_frames:
            self.cut = True
            self.on_slow(self)
            return False
        return True
