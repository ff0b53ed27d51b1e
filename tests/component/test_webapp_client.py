"""The gateway's client of the webapp's internal endpoints talks only to a webapp's certificate.

Over real sockets and mutual TLS (:func:`services.connection.serve`, the gate every fleet server
uses): a server with a fleet certificate of another service, or of another CA, gets no request;
the webapp's own certificate is served as before.
"""

from __future__ import annotations

import datetime
import logging
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from gateway.webapp_client import WebappClient
from services.certs import issue, make_ca, write_private
from services.connection import serve
from services.directory import ServiceDirectory
from services.discovery import Discovery
from services.identity import CHANNEL_SERVER, GATEWAY, PRESENCE, WEBAPP, PeerIdentity
from services.tls import WireTrust
from tests.support import FleetCA

HOST = "127.0.0.1"
NO_CONSUL = "127.0.0.1:1"  # never contacted: the client is given the webapp's URL


class InternalServer:
    """An ``/internal/bootstrap`` behind the fleet's TLS gate, under ``trust``'s certificate; counts requests."""

    def __init__(self, trust: WireTrust) -> None:
        self.trust = trust
        self.requests = 0
        self.port = 0

    async def bootstrap(self, request: web.Request) -> web.Response:
        self.requests += 1
        return web.json_response({"ok": True, "channels": []})

    async def __aenter__(self) -> InternalServer:
        app = web.Application()
        app.add_routes([web.post("/internal/bootstrap", self.bootstrap)])
        self.runner = web.AppRunner(app)
        await self.runner.setup()
        assert self.runner.server is not None
        self.server = await serve(HOST, 0, self.runner.server, trust=self.trust)
        self.port = int(self.server.sockets[0].getsockname()[1])
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.server.close()
        await self.runner.cleanup()


@pytest.fixture
async def directory() -> AsyncIterator[ServiceDirectory]:
    discovery = Discovery(NO_CONSUL)
    yield ServiceDirectory(discovery, WEBAPP)
    await discovery.close()


async def bootstrap(fleet_ca: FleetCA, directory: ServiceDirectory, server: InternalServer) -> dict[str, object]:
    client = WebappClient(directory, fleet_ca.trust(GATEWAY, "gw-1"), f"https://{HOST}:{server.port}")
    try:
        return await client.call("/internal/bootstrap", {"user": "U1"})
    finally:
        await client.close()


async def test_the_webapps_certificate_is_served(fleet_ca: FleetCA, directory: ServiceDirectory) -> None:
    async with InternalServer(fleet_ca.trust(WEBAPP, "webapp-0")) as server:
        assert (await bootstrap(fleet_ca, directory, server))["ok"] is True
        assert server.requests == 1


@pytest.mark.parametrize("service", [PRESENCE, CHANNEL_SERVER, GATEWAY])
async def test_a_fleet_certificate_of_another_service_gets_no_request(
    fleet_ca: FleetCA, directory: ServiceDirectory, service: str
) -> None:
    """What a stolen key of another role, registered in Consul as the webapp, would get: nothing."""
    async with InternalServer(fleet_ca.trust(service, f"{service}-impostor")) as server:
        with pytest.raises(aiohttp.ClientConnectionError, match=f"expected a {WEBAPP}"):
            await bootstrap(fleet_ca, directory, server)
        assert server.requests == 0


async def test_a_webapp_certificate_of_another_ca_gets_no_request(
    fleet_ca: FleetCA, directory: ServiceDirectory, tmp_path: Path
) -> None:
    now = datetime.datetime.now(datetime.UTC)
    other = issue(make_ca(now), PeerIdentity(WEBAPP, "webapp-0"), now)
    ca, cert, key = tmp_path / "ca.crt", tmp_path / "webapp.crt", tmp_path / "webapp.key"
    write_private(cert, other.cert_pem)
    write_private(key, other.key_pem)
    write_private(ca, fleet_ca.certs.ca_path.read_bytes())  # it trusts the gateway; the gateway does not trust it
    async with InternalServer(WireTrust.load(ca, cert, key)) as server:
        with pytest.raises(aiohttp.ClientConnectorCertificateError):
            await bootstrap(fleet_ca, directory, server)
        assert server.requests == 0


async def test_a_refused_server_is_logged_once_a_minute_and_refused_every_time(
    fleet_ca: FleetCA, directory: ServiceDirectory, caplog: pytest.LogCaptureFixture
) -> None:
    async with InternalServer(fleet_ca.trust(CHANNEL_SERVER, "cs-impostor")) as server:
        client = WebappClient(directory, fleet_ca.trust(GATEWAY, "gw-1"), f"https://{HOST}:{server.port}")
        try:
            with caplog.at_level(logging.WARNING, logger="rtm"):
                for _ in range(3):
                    with pytest.raises(aiohttp.ClientConnectionError, match=f"expected a {WEBAPP}"):
                        await client.call("/internal/bootstrap", {"user": "U1"})
        finally:
            await client.close()
        assert server.requests == 0
    assert len([r for r in caplog.records if "as the webapp" in r.getMessage()]) == 1
