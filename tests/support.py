"""What tests share: free ports, bounded waits, a fake clock, and gateway stand-ins (a recording client
socket, the gateway as its client-message handler sees it). No test module imports another."""

from __future__ import annotations

import asyncio
import json
import socket
import struct
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from gateway.state import Session, text_frame
from services.metrics import ServiceMetrics

T = TypeVar("T")

# One factor scales every wait for slow machines (like websockets' test suite).
TIMEOUT_FACTOR = 1.0
DEFAULT_WAIT_S = 10.0 * TIMEOUT_FACTOR
POLL_INTERVAL_S = 0.02


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago on ``host``."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def wait_until(predicate: Callable[[], T], timeout_s: float = DEFAULT_WAIT_S, what: str = "condition") -> T:
    """Poll ``predicate`` until it returns a truthy value; fail after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")
        time.sleep(POLL_INTERVAL_S)  # wait-ok: bounded poll of a condition


async def async_wait_until(
    predicate: Callable[[], Awaitable[T]], timeout_s: float = DEFAULT_WAIT_S, what: str = "condition"
) -> T:
    """Async twin of :func:`wait_until` for coroutine predicates."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = await predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")
        await asyncio.sleep(POLL_INTERVAL_S)  # wait-ok: bounded poll of a condition


def free_port_base(span: int = 200, host: str = "127.0.0.1", attempts: int = 50) -> int:
    """A base port B such that B..B+span all bind right now (for ``rtm up --port-base``)."""
    import random

    for _ in range(attempts):
        base = random.randrange(20000, 60000 - span)
        socks = []
        try:
            for port in range(base, base + span):
                sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                socks.append(sock)
                sock.bind((host, port))
            return base
        except OSError:
            continue
        finally:
            for sock in socks:
                sock.close()
    raise RuntimeError(f"no free range of {span} ports found")


class FakeClock:
    """A clock that moves only when told to: pass it where code takes ``clock: Callable[[], float]``."""

    def __init__(self, start_s: float = 1000.0) -> None:
        self.now = start_s

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


# -- gateway stand-ins ----------------------------------------------------------------


def unframe(frame: bytes) -> bytes:
    """The payload of one unmasked, final websocket text frame (checked, not trusted)."""
    assert frame[0] == 0x81, "FIN + text opcode"
    assert frame[1] & 0x80 == 0, "server frames are unmasked"
    length = frame[1] & 0x7F
    offset = 2
    if length == 126:
        (length,) = struct.unpack_from(">H", frame, 2)
        offset = 4
    elif length == 127:
        (length,) = struct.unpack_from(">Q", frame, 2)
        offset = 10
    payload = frame[offset:]
    assert len(payload) == length
    return payload


class Socket:
    """A fake client socket: records what the gateway writes to it."""

    def __init__(self, alive: bool = True) -> None:
        self.frames: list[bytes] = []
        self.alive = alive

    def write(self, frame: bytes) -> bool:
        if not self.alive:
            return False
        self.frames.append(frame)
        return True

    @property
    def events(self) -> list[dict]:
        return [json.loads(unframe(frame)) for frame in self.frames]

    def seqs(self, channel: str | None = None) -> list[int | None]:
        return [e.get("seq") for e in self.events if channel is None or e["ch"] == channel]


class FakeConn:
    def __init__(self) -> None:
        self.sent: list[dict[str, Any]] = []

    def send(self, message: dict[str, Any]) -> None:
        self.sent.append(message)


class FakeLink:
    def __init__(self) -> None:
        self.conn: FakeConn | None = FakeConn()
        self.connected = True


class FakeRing:
    def owner_for(self, channel: str) -> str | None:
        return None if channel == "CORPHAN" else "cs-a"


class FakeWebapp:
    def __init__(self) -> None:
        self.calls: list[tuple[str, dict[str, Any]]] = []
        self.error: BaseException | None = None

    async def call(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        self.calls.append((path, body))
        if self.error is not None:
            raise self.error
        return {"ok": True, "ts": "1700000000.000100", "channel": body["channel"]}


class FakeClientGateway:
    """A stand-in for the gateway as gateway.client_messages sees it."""

    def __init__(self) -> None:
        self.metrics = ServiceMetrics("gateway", "gw-test")
        self.client_msgs = self.metrics.counter("rtm_gw_client_messages_total", "frames", ["type"])
        self.follower = type("Follower", (), {"ring": FakeRing()})()
        self.link = FakeLink()
        self.webapp = FakeWebapp()
        self.tasks: list[asyncio.Task[Any]] = []
        self.closed: list[Any] = []

    def link_to(self, owner: str) -> FakeLink:
        assert owner == "cs-a"
        return self.link

    def spawn(self, coro: Any) -> None:
        self.tasks.append(asyncio.ensure_future(coro))

    def send_json(self, session: Session, body: dict[str, Any]) -> None:
        session.write(text_frame(json.dumps(body).encode()))


class FakeWs:
    def __init__(self, gw: FakeClientGateway) -> None:
        self.gw = gw

    async def close(self, code: int, reason: str) -> None:
        self.gw.closed.append(code)
