"""The gateway's client of the webapp's internal endpoints: bootstrap, history, resume, calls."""

from __future__ import annotations

from typing import Any, Protocol

import aiohttp

from services.directory import ServiceDirectory
from services.errors import ConnectionLost, PeerError
from services.tls import WireTrust

WEBAPP_TIMEOUT_S = 5.0  # one internal call (--webapp-timeout-s)


class WebappClient:
    """The webapp's internal endpoints: bootstrap and history.

    They are on the webapp's internal listener (Consul meta ``internal_port``),
    which admits only fleet certificates of role gateway: the client presents
    this gateway's certificate (mutual TLS, docs/trust.md).
    """

    def __init__(
        self, directory: ServiceDirectory, trust: WireTrust, fixed_url: str = "", timeout_s: float = WEBAPP_TIMEOUT_S
    ) -> None:
        self.directory = directory
        self.timeout_s = timeout_s
        self.trust = trust
        self.fixed_url = fixed_url.rstrip("/")
        self.session: aiohttp.ClientSession | None = None

    def base_url(self) -> str:
        if self.fixed_url:
            return self.fixed_url
        scheme = "https" if self.trust.enabled else "http"
        for inst in self.directory.instances.values():
            internal_port = inst.meta.get("internal_port")
            if internal_port:
                return f"{scheme}://{inst.address}:{internal_port}"
        raise ConnectionLost("no healthy webapp with an internal_port in Consul")

    async def call(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        if self.session is None:
            client_tls = self.trust.client
            connector = aiohttp.TCPConnector(ssl=client_tls) if client_tls is not None else None
            self.session = aiohttp.ClientSession(
                connector=connector, timeout=aiohttp.ClientTimeout(total=self.timeout_s)
            )
        async with self.session.post(self.base_url() + path, json=body) as resp:
            reply: dict[str, Any] = await resp.json(content_type=None)
        if not reply.get("ok"):
            raise PeerError(str(reply.get("error", "webapp_error")), reply)
        return reply

    async def close(self) -> None:
        if self.session is not None:
            await self.session.close()


class WebappCalls(Protocol):
    """What the gateway's parts need of :class:`WebappClient` (tests pass a fake)."""

    async def call(self, path: str, body: dict[str, Any]) -> dict[str, Any]: ...
