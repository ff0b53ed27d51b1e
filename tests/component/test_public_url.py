"""Behind an edge proxy: rtm.connect hands out the URL a gateway registered as its
public URL (gateway --public-url -> Consul meta public_url), else ws://address:port."""

from __future__ import annotations

from pathlib import Path

import aiohttp
import pytest

from gateway.app import build_parser as gateway_parser
from services.discovery import Instance
from tests.support import FleetCA
from webapp_stub.app import FixedDiscovery, WebappServer, build_parser
from webapp_stub.seed import seed_demo

SECRET = "public-url-secret"


async def connect_url(tmp_path: Path, gateway: Instance) -> str:
    seed = seed_demo(str(tmp_path), users=1, channels=1, bots=0)
    tls = FleetCA(tmp_path / "tls").flags("webapp", "webapp-public-url")
    args = build_parser().parse_args(
        ["--host", "127.0.0.1", "--port", "0", "--data-dir", str(tmp_path), "--secret", SECRET, *tls]
    )
    server = WebappServer(args, discovery=FixedDiscovery({"admin-server": [], "gateway": [gateway]}))
    info = await server.start()
    try:
        async with aiohttp.ClientSession() as http:
            headers = {"Authorization": f"Bearer {seed['users'][0]['token']}"}
            async with http.post(f"{info['url']}/api/rtm.connect", headers=headers) as resp:
                reply = await resp.json()
    finally:
        await server.stop()
    assert reply["ok"], reply
    return str(reply["url"])


async def test_rtm_connect_uses_the_registered_public_url(tmp_path: Path) -> None:
    edge = Instance(
        id="gw-1",
        service="gateway",
        address="127.0.0.3",
        port=8765,
        tags=("region=us-east",),
        meta={"region": "us-east", "public_url": "wss://edge.example:8443/gw/us-east-1/"},
    )
    url = await connect_url(tmp_path, edge)
    assert url.startswith("wss://edge.example:8443/gw/us-east-1/ws/"), url
    assert "/" not in url.removeprefix("wss://edge.example:8443/gw/us-east-1/ws/")


async def test_rtm_connect_without_a_public_url_names_the_gateway_itself(tmp_path: Path) -> None:
    plain = Instance(
        id="gw-1",
        service="gateway",
        address="127.0.0.3",
        port=8765,
        tags=("region=us-east",),
        meta={"region": "us-east"},
    )
    assert (await connect_url(tmp_path, plain)).startswith("ws://127.0.0.3:8765/ws/")


def test_gateway_takes_public_url_from_flag_or_env(monkeypatch: pytest.MonkeyPatch) -> None:
    assert gateway_parser().parse_args(["--public-url", "wss://e/gw/a"]).public_url == "wss://e/gw/a"
    monkeypatch.setenv("RTM_PUBLIC_URL", "wss://e/gw/b")
    assert gateway_parser().parse_args([]).public_url == "wss://e/gw/b"
