"""The gateway's client of the webapp's internal endpoints: bootstrap, history, resume, calls."""

from __future__ import annotations

from typing import Any, Protocol

import aiohttp

from services.directory import ServiceDirectory
from services.errors import ConnectionLost, PeerError

WEBAPP_TIMEOUT_S = 5.0


class WebappClient:
    """The webapp's internal endpoints: bootstrap and history."""

    def __init__(self, directory: ServiceDirectory, secret: str, fixed_url: str = "") -> None:
        self.directory = directory
        self.secret = secret
        self.fixed_url = fixed_url.rstrip("/")
        self.session: aiohttp.ClientSession | None = None

    def base_url(self) -> str:
        if self.fixed_url:
            return self.fixed_url
        for inst in self.directory.instances.values():
            return f"http://{inst.address}:{inst.port}"
        raise ConnectionLost("no healthy webapp in Consul")

    async def call(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        if self.session is None:
            self.session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=WEBAPP_TIMEOUT_S))
        async with self.session.post(self.base_url() + path, json=body, headers={"X-Rtm-Secret": self.secret}) as resp:
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
