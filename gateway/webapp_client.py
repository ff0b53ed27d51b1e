"""The gateway's client of the webapp's internal endpoints: bootstrap, history, resume, calls."""

from __future__ import annotations

import logging
import time
from typing import Any, Protocol

import aiohttp
from aiohttp.client_proto import ResponseHandler
from aiohttp.tracing import Trace

from services.directory import ServiceDirectory
from services.errors import ConnectionLost, PeerError
from services.identity import WEBAPP, BadIdentity
from services.tls import RefusalLog, WireTrust, transport_identity

log = logging.getLogger("rtm.gateway.webapp")

WEBAPP_TIMEOUT_S = 5.0  # one internal call (--webapp-timeout-s)


class WebappConnector(aiohttp.TCPConnector):
    """aiohttp's connector, handing out a TLS connection only to a server whose fleet
    certificate is a webapp's.

    The TLS context checks the chain (the fleet CA) and the validity; which *service* the
    server is, it cannot: without this check any fleet process's certificate would do, so a
    stolen key of another role plus a webapp registration in Consul would receive the
    gateways' bootstraps and could answer them (docs/trust.md, as :func:`services.connection.connect`
    does with ``expect``). A connection to another service is closed before any request is
    written on it and fails as an :class:`aiohttp.ClientConnectionError`.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.refusal_log = RefusalLog()  # a refused server is logged at most once a minute

    async def _create_connection(
        self, req: aiohttp.ClientRequest, traces: list[Trace], timeout: aiohttp.ClientTimeout
    ) -> ResponseHandler:
        proto = await super()._create_connection(req, traces, timeout)
        try:
            identity = transport_identity(proto.transport)
        except BadIdentity:
            identity = None
        if identity is None or identity.service != WEBAPP:
            proto.close()
            source = f"{req.url.host}:{req.url.port}"
            if self.refusal_log.should_log(source, time.monotonic()):
                skipped = self.refusal_log.take_suppressed()
                more = f" ({skipped} more refusals not logged)" if skipped else ""
                log.warning("refused %s as the webapp: it is %s%s", source, identity, more)
            raise aiohttp.ClientConnectionError(f"{req.url.host}:{req.url.port} is {identity}, expected a {WEBAPP}")
        return proto


class WebappClient:
    """The webapp's internal endpoints: bootstrap and history.

    They are on the webapp's internal listener (Consul meta ``internal_port``),
    which admits only fleet certificates of role gateway: the client presents
    this gateway's certificate (mutual TLS, docs/trust.md), and talks only to a
    server whose certificate is a webapp's (:class:`WebappConnector`).
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
            connector = WebappConnector(ssl=client_tls) if client_tls is not None else None
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
