"""What tests share: free ports (re-exported from ``rtmctl.ports``, the one free-port helper), bounded
waits, a fake clock, and gateway stand-ins (a recording client socket, the gateway as its client-message handler sees it). No test module imports another."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
import signal
import struct
import subprocess
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

from websockets.exceptions import ConnectionClosed
from websockets.protocol import State

from gateway.state import GatewayState, Session
from rtmctl.ports import free_port as free_port  # re-exported: the one free-port helper
from rtmctl.ports import free_port_base as free_port_base
from services.certs import FleetCertificates
from services.identity import CHANNEL_SERVER, PeerIdentity
from services.metrics import ServiceMetrics
from services.ring import RingDocument
from services.tls import WireTrust
from webapp_stub import file_store
from webapp_stub.seed import seed_demo
from webapp_stub.store import Store

T = TypeVar("T")

# One factor scales every wait for slow machines (like websockets' test suite).
TIMEOUT_FACTOR = float(os.environ.get("RTM_TEST_TIMEOUT_FACTOR", "1"))  # e.g. 3 on a machine shared with other work
DEFAULT_WAIT_S = 10.0 * TIMEOUT_FACTOR
POLL_INTERVAL_S = 0.02

# The tree, as the tests that check its shape see it (imports, code map, sizes).
REPO_ROOT = Path(__file__).resolve().parents[1]
LIBRARY_PACKAGE = "services"
SERVICE_PACKAGES = ("channel_server", "admin_server", "gateway", "presence", "charm", "webapp_stub")
TOOLING_PACKAGES = ("rtmctl", "consul_dev")
CODE_PACKAGES = (LIBRARY_PACKAGE, *SERVICE_PACKAGES, *TOOLING_PACKAGES)  # what mypy checks strictly


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
    """A link's connection that records what is sent over it (typing pubs, presence batches)."""

    def __init__(self) -> None:
        self.sent: list[dict[str, Any]] = []
        self.is_open = True

    def send(self, message: dict[str, Any]) -> None:
        self.sent.append(message)


class ScriptedConn:
    """A channel-server connection: answers each request with ``answer(request)`` (raised if an exception)."""

    def __init__(self, answer: Callable[[dict[str, Any]], Any]) -> None:
        self.answer = answer
        self.requests: list[dict[str, Any]] = []
        self.is_open = True

    async def request(self, message: dict[str, Any], timeout_s: float = 5.0) -> dict[str, Any]:
        self.requests.append(message)
        result = self.answer(message)
        if isinstance(result, BaseException):
            raise result
        return dict(result)


class FakeLink:
    """A connected :class:`services.connection.PeerLink` over a fake connection."""

    def __init__(self, conn: Any = None) -> None:
        self.conn: Any = FakeConn() if conn is None else conn
        self.connected = True

    async def close(self) -> None:
        pass


class FakeWebapp:
    """The webapp's internal endpoints as client messages see them: every post is taken."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, dict[str, Any]]] = []
        self.error: BaseException | None = None

    async def call(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        self.calls.append((path, body))
        if self.error is not None:
            raise self.error
        return {"ok": True, "ts": "1700000000.000100", "channel": body["channel"]}


class HistoryWebapp:
    """``/internal/history`` answered by ``history(body)`` (raised if an exception); resume records refused."""

    def __init__(self, history: Callable[[dict[str, Any]], Any]) -> None:
        self.history = history
        self.calls: list[tuple[str, dict[str, Any]]] = []

    async def call(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        self.calls.append((path, body))
        if path == "/internal/history":
            result = self.history(body)
            if isinstance(result, BaseException):
                raise result
            return dict(result)
        raise ConnectionError("webapp down")  # resume records are best effort

    async def close(self) -> None:
        pass


class HeldHistoryWebapp:
    """Answers ``/internal/history`` from ``last_seq`` events of one channel, paged, once ``release`` is set."""

    def __init__(self, channel: str, last_seq: int) -> None:
        self.events = [{"seq": n, "json": json.dumps({"ch": channel, "seq": n})} for n in range(1, last_seq + 1)]
        self.calls: list[dict[str, Any]] = []
        self.release = asyncio.Event()

    async def call(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        assert path == "/internal/history"
        self.calls.append(body)
        await self.release.wait()
        after, limit = int(body["after_seq"]), int(body["limit"])
        later = [e for e in self.events if e["seq"] > after]
        return {"events": later[:limit], "has_more": len(later) > limit}

    async def close(self) -> None:
        pass


class RecordingPresence:
    """The gateway's presence as client messages hand frames to it."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, list[str]]] = []

    def subscribe(self, session: Session, ids: list[str]) -> None:
        self.calls.append(("sub", ids))

    def query(self, session: Session, ids: list[str]) -> None:
        self.calls.append(("query", ids))


class FakeClientGateway:
    """A stand-in for the gateway as gateway.client_messages sees it (its ``ClientGateway``)."""

    def __init__(self) -> None:
        self.metrics = ServiceMetrics("gateway", "gw-test")
        self.link = FakeLink()
        self.webapp = FakeWebapp()
        self.presence = RecordingPresence()
        self.tasks: list[asyncio.Task[Any]] = []
        self.closed: list[Any] = []

    def owner_for(self, channel: str) -> str | None:
        return None if channel == "CORPHAN" else "cs-a"

    def link_to(self, owner: str) -> FakeLink:
        assert owner == "cs-a"
        return self.link

    def spawn(self, coro: Any) -> None:
        self.tasks.append(asyncio.ensure_future(coro))


class FakeWs:
    def __init__(self, gw: FakeClientGateway) -> None:
        self.gw = gw

    async def close(self, code: int, reason: str) -> None:
        self.gw.closed.append(code)


NO_CONSUL = "127.0.0.1:1"  # nothing listens there: every Consul call fails at once


class FleetCA:
    """A fleet CA in a temporary directory, issuing certificates to tests (see tests/conftest.py)."""

    def __init__(self, directory: Path) -> None:
        self.certs = FleetCertificates(directory)
        self.certs.ensure_ca()

    def trust(self, service: str, instance: str = "") -> WireTrust:
        """Credentials for ``service/instance`` (instance defaults to ``<service>-test``)."""
        identity = PeerIdentity(service, instance or f"{service}-test")
        paths = self.certs.ensure(f"{identity.service}-{identity.instance}", identity)
        return WireTrust.load(paths.ca, paths.cert, paths.key)

    def channel_server(self, instance: str = "cs-test", slot: str = "cs-0") -> Any:
        """A channel server with this CA's credentials that owns ``slot`` (ring version 1) and
        has no Consul (every Consul call fails at once): for component tests that serve it."""
        from channel_server.app import ChannelServer, build_parser

        cs = ChannelServer(
            build_parser().parse_args(
                [
                    "--instance-id",
                    instance,
                    "--consul",
                    NO_CONSUL,
                    "--ttl-s",
                    "600",
                    *self.flags(CHANNEL_SERVER, instance),
                ]
            )
        )
        cs.follower.apply(RingDocument(version=1, slots={slot: instance}))
        return cs

    def flags(self, service: str, instance: str) -> list[str]:
        """The ``--tls-*`` flags of a process started as ``service/instance``."""
        paths = self.certs.ensure(f"{service}-{instance}", PeerIdentity(service, instance))
        return ["--tls-ca", str(paths.ca), "--tls-cert", str(paths.cert), "--tls-key", str(paths.key)]


class RecordingWs:
    """A client websocket that records what a drain or an ended session sends and how it closes."""

    def __init__(self) -> None:
        self.sent: list[str] = []
        self.closed: list[int] = []
        self.state = State.OPEN  # CLOSING: the client's own close frame has arrived

    async def send(self, text: str) -> None:
        if self.state is not State.OPEN:
            raise ConnectionClosed(None, None)
        self.sent.append(text)

    async def close(self, code: int, reason: str = "") -> None:
        self.closed.append(code)
        self.state = State.CLOSED


class FakePresenceGateway:
    """A stand-in for the gateway as gateway.presence sees it (its ``PresenceGateway``)."""

    def __init__(self) -> None:
        self.instance_id = "gw-test"
        self.metrics = ServiceMetrics("gateway", "gw-test")
        self.discovery: Any = None
        self.stopping = False
        self.draining = False
        self.state = GatewayState()
        self.trust = WireTrust.off()  # no links are dialled in these tests

    def spawn(self, coro: Any) -> None:
        coro.close()


class Parts:
    """A gateway's channel links and history wired as :class:`gateway.app.Gateway` wires them,
    without the gateway: fake links and webapp, no sockets. Sessions it ends are
    only recorded (``ended``): the drain's part is tested with the whole gateway."""

    def __init__(self, webapp: Any = None, gap_fill_budget_s: float = 0.6, max_gap_fill_attempts: int = 3) -> None:
        from gateway.channel_links import ChannelLinks
        from gateway.client_socket import Cork
        from gateway.history import History
        from services.discovery import Discovery

        self.metrics = ServiceMetrics("gateway", "gw-test")
        self.state = GatewayState()
        self.clock = time.monotonic  # requeued subs are retried on the event loop's timers
        self.tasks: set[asyncio.Task[Any]] = set()
        self.ended: list[tuple[int, str]] = []
        self.revoked: list[int] = []  # sids the history asked to close for a revoked token
        self.discovery = Discovery("127.0.0.1:8500")  # never reached: no watch is started
        deliveries = self.metrics.counter("rtm_gw_deliveries_total", "frames")
        self.history = History(
            state=self.state,
            webapp=webapp if webapp is not None else HistoryWebapp(lambda body: ConnectionError("down")),
            metrics=self.metrics,
            deliveries=deliveries,
            spawn=self.spawn,
            apply=lambda effects: self.links.apply(effects),
            mover=self,
            end_revoked=lambda sessions: self.revoked.extend(s.sid for s in sessions),
            end_slots=asyncio.Semaphore(8),
            clock=self.clock,
            gap_fill_budget_s=gap_fill_budget_s,
            max_gap_fill_attempts=max_gap_fill_attempts,
        )
        self.links = ChannelLinks(
            instance_id="gw-test",
            discovery=self.discovery,
            state=self.state,
            history=self.history,
            metrics=self.metrics,
            deliveries=deliveries,
            cork=Cork(),
            spawn=self.spawn,
            clock=self.clock,
            reconcile_interval_s=30.0,
            trust=WireTrust.off(),  # fake links only: nothing is dialled
        )

    def spawn(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    def detach(self, session: Session) -> dict[str, int]:  # the history's SessionEnder
        where = self.state.position(session)
        self.links.apply(self.state.detach(session))
        return where

    async def finish(self, session: Session, where: dict[str, int], reason: str, slots: Any, code: int = 1001) -> None:
        self.ended.append((session.sid, reason))

    async def close(self) -> None:
        self.links.stop_retries()
        for task in list(self.tasks):
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        await self.discovery.close()


@contextlib.contextmanager
def interruptible_child(argv: list[str]) -> Iterator[subprocess.Popen[bytes]]:
    """A child command to stop with SIGINT as Ctrl-C would, its output piped. SIGINT is restored in
    the child: a shell running the suite in the background (nohup, CI) starts its children with
    SIGINT ignored, which exec keeps, and Python then never turns it into KeyboardInterrupt. A hung
    read ends in a failed assertion (the child is killed after three waits); the child never outlives
    the block."""
    proc = subprocess.Popen(
        argv,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    watchdog = threading.Timer(DEFAULT_WAIT_S * 3, proc.kill)
    watchdog.start()
    try:
        yield proc
    finally:
        watchdog.cancel()
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def seeded_store(data_dir: Path, posts: int = 0) -> Store:
    """A demo database in ``data_dir`` with ``posts`` messages in #general, left open."""
    store = Store(str(data_dir))
    seed_demo(store)
    for i in range(posts):
        post_in_general(store, f"post {i}")
    return store


def add_file(store: Store, data_dir: Path, data: bytes | None, state: str = "complete") -> str:
    """A file of alice's in ``state`` (its row as files.py writes it) with ``data`` as its bytes in
    ``DATA_DIR/files`` (0600), or no bytes for None; its id."""
    file_id = "F" + secrets.token_hex(8).upper()
    alice = store.conn.execute("SELECT id, team FROM users WHERE name = 'alice'").fetchone()
    size = None if data is None else len(data)
    with store.transaction() as db:
        db.execute(
            "INSERT INTO files (id, team, user, name, title, alt_txt, length, size, state, ticket_hash, "
            "ticket_expires, created, expires_at) VALUES (?, ?, ?, 'x.bin', 'x.bin', NULL, ?, ?, ?, NULL, 0, 0, NULL)",
            (file_id, alice[1], alice[0], size or 1, size, state),
        )
    if data is not None:
        path = file_store.files_dir(data_dir) / file_id
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.write(fd, data)
        finally:
            os.close(fd)
    return file_id


def post_in_general(store: Store, text: str) -> None:
    """Alice's ``text`` in #general."""
    team = store.first_team()
    assert team is not None
    general = store.channel_by_name(team.id, "general")
    alice = store.user(str(store.conn.execute("SELECT id FROM users WHERE name = 'alice'").fetchone()[0]))
    assert general is not None and alice is not None
    store.post_message(general, alice, text)


@contextlib.contextmanager
def consul_dev_agent(name: str, *extra: str, env: dict[str, str] | None = None) -> Iterator[Any]:
    """The embedded dev Consul agent as its own process (``rtm consul-dev``), stopped on leaving.
    Port 0: the agent binds a free port itself and says which in its ready line (no race with
    another process taking a port picked beforehand). Yields the launcher's running process
    (``.ready`` holds the ready line: ``port``, ``acl``)."""
    import sys

    from rtmctl import launcher

    argv = [sys.executable, "-m", "consul_dev", "--host", "127.0.0.1", "--port", "0", *extra]
    proc = launcher.start(name, argv, cwd=str(REPO_ROOT), env=env)
    try:
        yield proc
    finally:
        proc.stop()
