"""System-test harness: the real fleet started by ``rtm up``, and websocket clients.

The fleet runs exactly as a user runs it (``rtm up --data-dir TMP --port-base
B``), each service a separate OS process, through the runner the benchmarks use
too (:mod:`rtmctl.local_fleet`); tests read ``fleet.json`` and ``seed.json``
instead of scraping output, and stop everything at the end.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Self

import aiohttp
import websockets

from rtmctl.local_fleet import LocalFleet
from services.certs import FleetCertificates
from services.identity import PeerIdentity
from services.tls import WireTrust
from tests.support import DEFAULT_WAIT_S

FLEET_READY_TIMEOUT_S = 90.0
REGIONS = ("us-east", "eu-west")  # rtm up's default regions, one gateway each


@dataclass
class Fleet(LocalFleet):
    """The fleet as a test sees it: :class:`rtmctl.local_fleet.LocalFleet` plus clients and credentials."""

    @classmethod
    def up(
        cls,
        data_dir: Path,
        *extra: str,
        env: dict[str, str] | None = None,
        echo: IO[str] | None = None,
        ready_timeout_s: float = FLEET_READY_TIMEOUT_S,
        cwd: str | None = None,
    ) -> Self:
        """``rtm up --verbose``; every process's log lines go to ``echo``, by default DATA_DIR/fleet.log
        (to read when a test fails)."""
        if echo is None:
            echo = open(data_dir / "fleet.log", "w")  # noqa: SIM115 - lives as long as the fleet
        return super().up(data_dir, "--verbose", *extra, env=env, echo=echo, ready_timeout_s=ready_timeout_s, cwd=cwd)

    def trust(self, service: str, instance: str) -> WireTrust:
        """Credentials from this fleet's own CA (DATA_DIR/tls), as a test process that dials servers directly."""
        certs = FleetCertificates(self.data_dir / "tls")
        paths = certs.ensure(f"test-{service}-{instance}", PeerIdentity(service, instance))
        return WireTrust.load(paths.ca, paths.cert, paths.key)

    def tls_flags(self, service: str, instance: str) -> list[str]:
        """``--tls-*`` flags for one more process a test starts itself (a certificate from this fleet's CA)."""
        certs = FleetCertificates(self.data_dir / "tls")
        paths = certs.ensure(f"test-{service}-{instance}", PeerIdentity(service, instance))
        return ["--tls-ca", str(paths.ca), "--tls-cert", str(paths.cert), "--tls-key", str(paths.key)]

    def kill(self, pid: int, sig: int = signal.SIGKILL) -> None:
        os.kill(pid, sig)

    async def api(self, method: str, token: str | None = None, **params: Any) -> dict[str, Any]:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        async with aiohttp.ClientSession() as http:
            async with http.post(self.api_url + method, data=params, headers=headers) as resp:
                return dict(await resp.json(content_type=None))

    async def connect(self, name: str, region: str = "", follow_goodbye: bool = False) -> Client:
        """Connect as a seeded user; ``region`` is the hint rtm.connect gets (else the webapp's default)."""
        user = self.user(name)
        client = Client(self, name, user["token"], region=region, follow_goodbye=follow_goodbye)
        await client.open()
        return client


@dataclass
class Client:
    """A websocket client that records every event it receives."""

    fleet: Fleet
    name: str
    token: str
    region: str = ""
    events: list[dict[str, Any]] = field(default_factory=list)
    url: str = ""
    ws: Any = None
    closed: asyncio.Event = field(default_factory=asyncio.Event)
    close_code: int | None = None
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    follow_goodbye: bool = False  # like Slack's clients: on goodbye, rtm.connect again and go on
    urls: list[str] = field(default_factory=list)  # every URL this client was connected to, in order
    _reader: asyncio.Task[None] | None = None

    async def open(self) -> None:
        await self._connect()
        self.closed = asyncio.Event()
        self._reader = asyncio.create_task(self._read())

    async def _connect(self) -> None:
        reply = await self.fleet.api("rtm.connect", self.token, **({"region": self.region} if self.region else {}))
        assert reply["ok"], reply
        self.url = reply["url"]
        self.urls.append(self.url)
        self.ws = await websockets.connect(self.url, max_size=None)
        first = json.loads(await asyncio.wait_for(self.ws.recv(), DEFAULT_WAIT_S))
        assert first == {"type": "hello"}, first

    @property
    def gateway_port(self) -> int:
        return int(self.url.split("://", 1)[1].split("/", 1)[0].rsplit(":", 1)[1])

    async def _read(self) -> None:
        try:
            while True:
                async for raw in self.ws:
                    event = json.loads(raw)
                    self.events.append(event)
                    self.changed.set()
                    if event.get("type") == "goodbye" and self.follow_goodbye:
                        break
                else:
                    return
                await self.ws.close()
                await self._connect()
        except websockets.ConnectionClosed:
            pass
        finally:
            self.close_code = self.ws.close_code
            self.closed.set()
            self.changed.set()

    def messages(self, channel: str | None = None) -> list[dict[str, Any]]:
        return [
            e for e in self.events if e.get("type") == "message" and (channel is None or e.get("channel") == channel)
        ]

    def texts(self, channel: str | None = None) -> list[str]:
        return [str(e.get("text")) for e in self.messages(channel)]

    async def wait_for(self, predicate: Any, timeout_s: float = DEFAULT_WAIT_S, what: str = "event") -> None:
        deadline = time.monotonic() + timeout_s
        while not predicate(self):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"{self.name}: timed out waiting for {what}; got {self.events[-5:]}")
            self.changed.clear()
            try:
                await asyncio.wait_for(self.changed.wait(), remaining)
            except TimeoutError:
                pass

    async def wait_texts(self, texts: list[str], channel: str | None = None, timeout_s: float = DEFAULT_WAIT_S) -> None:
        await self.wait_for(lambda c: all(t in c.texts(channel) for t in texts), timeout_s, f"texts {texts}")

    async def send(self, body: dict[str, Any] | str | bytes) -> None:
        await self.ws.send(body if isinstance(body, (str, bytes)) else json.dumps(body))

    async def close(self) -> None:
        if self.ws is not None:
            await self.ws.close()
        if self._reader is not None:
            await asyncio.wait_for(self._reader, DEFAULT_WAIT_S)


def consul_client(fleet: Fleet) -> Any:
    """py-consul for the fleet's Consul, with the dev agent's management token ``rtm up`` made
    (DATA_DIR/consul-acl-token; no fleet process holds it): tests also write what no role may
    (a malformed ring, for one). ``rtmctl.operator.fleet_client`` is the operator's."""
    from rtmctl.operator import consul_address
    from rtmctl.operator import consul_client as client_for

    token = (fleet.data_dir / "consul-acl-token").read_text(encoding="utf-8").strip()
    return client_for(consul_address(str(fleet.data_dir)), token)


def channel_ring(fleet: Fleet) -> Any:
    from services.ring import CHANNEL_RING_KEY, HashRing, RingDocument

    _, raw = consul_client(fleet).kv.get(CHANNEL_RING_KEY)
    return HashRing(RingDocument.from_json(raw["Value"] if raw else None))


def process_by_id(fleet: Fleet, instance_id: str) -> dict[str, Any]:
    fleet.reload()
    return next(p for p in fleet.info["processes"] if p["id"] == instance_id)


@dataclass
class Load:
    """A steady poster: posts round-robin over channels, one at a time, and keeps
    the texts that the webapp acknowledged, per channel, in post (= seq) order."""

    fleet: Fleet
    tokens: list[str]  # posters take turns, as many users would (each has its own rate limit)
    channels: list[str]
    posted: dict[str, list[str]] = field(default_factory=dict)
    errors: list[Any] = field(default_factory=list)
    stop: asyncio.Event = field(default_factory=asyncio.Event)
    max_posts: int = 2000
    prefix: str = "load-"  # texts are f"{prefix}{n}": a test that runs several loads tells them apart

    async def run(self) -> None:
        n = 0
        async with aiohttp.ClientSession() as http:
            while not self.stop.is_set() and n < self.max_posts:
                channel = self.channels[n % len(self.channels)]
                text = f"{self.prefix}{n}"
                async with http.post(
                    self.fleet.api_url + "chat.postMessage",
                    data={"channel": channel, "text": text},
                    headers={"Authorization": f"Bearer {self.tokens[n % len(self.tokens)]}"},
                ) as resp:
                    reply = await resp.json(content_type=None)
                    retry_after = float(resp.headers.get("Retry-After", "1"))
                if reply.get("error") == "ratelimited":  # a real client waits as told, then goes on
                    await asyncio.sleep(retry_after)  # wait-ok: Retry-After is the protocol's instruction
                    continue
                if reply.get("ok"):
                    self.posted.setdefault(channel, []).append(text)
                else:
                    self.errors.append(reply)
                n += 1
