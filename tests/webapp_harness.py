"""The webapp test harness: the webapp in this process on a real port, and a fake Admin Server.

Shared by the component tests of the webapp and the system tests that need a webapp of
their own (tests import it from here, never from another test module).
"""

from __future__ import annotations

import asyncio
import contextlib
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp

from services import wire
from services.connection import PeerConnection, serve
from services.discovery import Instance
from services.identity import ADMIN_SERVER, GATEWAY, WEBAPP
from services.keys import FleetKeys
from services.ticket import INCARNATION_META
from tests.support import FleetCA, free_port
from webapp_stub.app import FixedDiscovery, WebappServer, build_parser
from webapp_stub.seed import seed_demo

SECRET = "component-secret"
KEYS = FleetKeys.from_secret(SECRET.encode())  # the per-job keys the webapp derives from it


class FakeAdminServer:
    """Records every pub (each event of a ``pubs`` too) and answers ok; can be killed and
    restarted on the same port."""

    def __init__(self, ca: FleetCA | None = None) -> None:
        # The fleet CA of this test: the fake AS and the webapp get their certificates from it.
        self.ca = ca if ca is not None else FleetCA(Path(tempfile.mkdtemp(prefix="rtm-test-ca-")))
        self.port = free_port()
        self.pubs: list[dict[str, Any]] = []
        self.batches: list[list[str]] = []  # the eids of each request, in order (a pub is a batch of one)
        self.conns: set[PeerConnection] = set()
        self.server: asyncio.AbstractServer | None = None
        self.hold = False  # record pubs but never answer them (a hung or dying AS)

    @property
    def instance(self) -> Instance:
        return Instance(id="as-fake", service="admin-server", address="127.0.0.1", port=self.port)

    def on_request(self, conn: PeerConnection, msg: dict[str, Any]) -> dict[str, Any] | None:
        if msg["op"] == "pub":
            self.pubs.append(msg)
            self.batches.append([msg["eid"]])
            if self.hold:
                return None
        if msg["op"] == "pubs":  # the webapp's batches: each event recorded as the pub it stands for
            self.pubs.extend({"op": "pub", **item} for item in msg["evs"])
            self.batches.append([item["eid"] for item in msg["evs"]])
            if self.hold:
                return None
            return wire.reply_ok(msg["id"], res=["ok"] * len(msg["evs"]))
        return wire.reply_ok(msg["id"])

    def factory(self) -> PeerConnection:
        conn = PeerConnection(name="fake-as", on_request=self.on_request, on_close=lambda c, _: self.conns.discard(c))
        if self.server is None:  # killed while this connection was in its TLS handshake: it dies too
            asyncio.get_running_loop().call_soon(conn.abort)
        self.conns.add(conn)
        return conn

    async def start(self) -> None:
        self.server = await serve("127.0.0.1", self.port, self.factory, trust=self.ca.trust(ADMIN_SERVER, "as-fake"))

    async def kill(self) -> None:
        assert self.server is not None
        self.server.close()
        for conn in list(self.conns):
            conn.abort()
        await self.server.wait_closed()
        self.server = None

    def pubs_for(self, channel: str) -> list[dict[str, Any]]:
        return [p for p in self.pubs if p["ch"] == channel]


class Webapp:
    """A webapp started in this process (``server``: its live parts), its seed, and an HTTP session."""

    def __init__(
        self, info: dict[str, Any], seed: dict[str, Any], discovery: FixedDiscovery, server: WebappServer, ca: FleetCA
    ) -> None:
        self.url = info["url"]
        self.port = info["port"]
        self.internal_url = info["internal_url"]
        self.ca = ca
        self.seed = seed
        self.discovery = discovery
        self.server = server
        self.session = aiohttp.ClientSession()

    async def stop(self) -> None:
        await self.server.stop()

    def user(self, name: str) -> dict[str, Any]:
        return next(u for u in self.seed["users"] if u["name"] == name)

    def channel(self, name: str) -> str:
        return next(c["id"] for c in self.seed["channels"] if c["name"] == name)

    async def call(
        self,
        method: str,
        token: str | None = None,
        *,
        json_body: Any = None,
        data: Any = None,
        params: Any = None,
        http: str = "POST",
        headers: dict[str, str] | None = None,
    ) -> tuple[int, dict[str, Any]]:
        hdrs = dict(headers or {})
        if token:
            hdrs["Authorization"] = f"Bearer {token}"
        async with self.session.request(
            http, f"{self.url}/api/{method}", json=json_body, data=data, params=params, headers=hdrs
        ) as resp:
            return resp.status, await resp.json()

    async def internal(self, path: str, body: Any, role: str = GATEWAY) -> tuple[int, dict[str, Any]]:
        """Call the internal listener with a fleet certificate of ``role`` (a gateway's by default)."""
        connector = aiohttp.TCPConnector(ssl=self.ca.trust(role, f"{role}-caller").client)
        async with aiohttp.ClientSession(connector=connector) as session:
            async with session.post(f"{self.internal_url}/internal/{path}", json=body) as resp:
                return resp.status, await resp.json(content_type=None)


GATEWAY_INSTANCE = Instance(
    id="gw-test-0",
    service="gateway",
    address="127.0.0.1",
    port=45678,
    tags=("region=test",),
    meta={INCARNATION_META: "inc-test-0"},  # what a gateway registers at start (services/ticket.py)
)
GATEWAY_INCARNATION = GATEWAY_INSTANCE.meta[INCARNATION_META]


async def start(tmp_path: Path, fake_as: FakeAdminServer, *extra: str) -> Webapp:
    seed = seed_demo(str(tmp_path), users=5, channels=2, bots=1)
    tls = fake_as.ca.flags(WEBAPP, "webapp-test")
    args = build_parser().parse_args(
        ["--port", "0", "--data-dir", str(tmp_path), "--secret", SECRET, "--instance-id", "webapp-test", *tls, *extra]
    )
    discovery = FixedDiscovery({"admin-server": [fake_as.instance], "gateway": [GATEWAY_INSTANCE]})
    server = WebappServer(args, discovery=discovery)
    info = await server.start()
    meta = {"metrics_port": str(info["port"]), "internal_port": str(info["internal_port"])}
    assert discovery.registered["webapp-test"]["meta"] == meta
    return Webapp(info, seed, discovery, server, fake_as.ca)


# -- Web API calls and file sharing, as the component tests of the webapp make them ----


async def ok(webapp: Webapp, method: str, token: str, **body: Any) -> dict[str, Any]:
    """``method`` called with a JSON body; its reply, which must be ``ok``."""
    status, reply = await webapp.call(method, token, json_body=body)
    assert status == 200 and reply.get("ok"), (method, body, reply)
    return reply


async def error_of(webapp: Webapp, method: str, token: str, **body: Any) -> str:
    """``method`` called with a JSON body; the error code of its reply, which must not be ``ok``."""
    status, reply = await webapp.call(method, token, json_body=body)
    assert reply["ok"] is False, reply
    return str(reply["error"])


async def post_bytes(webapp: Webapp, url: str, data: Any, **kw: Any) -> tuple[int, str]:
    """A POST of ``data`` (bytes or an async iterator of them) to ``url``: status and text."""
    async with webapp.session.post(url, data=data, **kw) as resp:
        return resp.status, await resp.text()


async def metrics_text(webapp: Webapp) -> str:
    async with webapp.session.get(f"{webapp.url}/metrics") as resp:
        return await resp.text()


async def file_state(webapp: Webapp, file_id: str, state: str) -> bool:
    """Whether the file's row is in ``state`` (``uploading``, ``failed``, ...)."""
    from webapp_stub import file_store

    row = file_store.get(webapp.server.store.conn, file_id)
    return row is not None and row.state == state


async def held_body(
    first: bytes, rest: bytes, release: asyncio.Event, sent: asyncio.Event | None = None
) -> AsyncIterator[bytes]:
    """An upload body: ``first``, then (``sent`` set) nothing until ``release``, then ``rest``."""
    yield first
    if sent is not None:
        sent.set()
    await release.wait()
    yield rest


@contextlib.contextmanager
def clock_ahead(webapp: Webapp, seconds: float) -> Iterator[None]:
    """The webapp's API clock ``seconds`` ahead of real time (tickets and pending files expire)."""
    api = webapp.server.api
    real = api.clock
    api.clock = lambda: real() + seconds
    try:
        yield
    finally:
        api.clock = real
