"""The browser client's routes (webapp_stub/client.py) on a real port: the page, its
files and nothing else, the security headers, and the demo sign-in list only in demo mode."""

from __future__ import annotations

import subprocess
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from rtmctl.launcher import child_environment, rtm_argv
from services.errors import CONFIG_ERROR_EXIT_CODE
from services.metrics import ServiceMetrics
from tests.support import DEFAULT_WAIT_S
from webapp_stub.client import CONTENT_SECURITY_POLICY, MAX_DEMO_USERS, BrowserClient, static_files
from webapp_stub.seed import seed_demo
from webapp_stub.store import Store

Serve = Callable[[bool], Any]


@pytest.fixture
async def serve(tmp_path: Path) -> AsyncIterator[Serve]:
    """``await serve(demo)`` -> (base URL, metrics, seed) for a webapp serving only the client routes."""
    runners: list[web.AppRunner] = []
    stores: list[Store] = []

    async def start(demo: bool) -> tuple[str, ServiceMetrics, dict[str, Any]]:
        store = Store(str(tmp_path / f"db-{len(stores)}"))
        stores.append(store)
        seed = seed_demo(store, users=MAX_DEMO_USERS + 5, bots=1)
        metrics = ServiceMetrics("webapp", "webapp-test")
        app = web.Application()
        app.add_routes(BrowserClient(store, metrics, demo=demo).routes())
        runner = web.AppRunner(app)
        await runner.setup()
        runners.append(runner)
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        return f"http://127.0.0.1:{port}", metrics, seed

    yield start
    for runner in runners:
        await runner.cleanup()
    for store in stores:
        store.close()


def counter(metrics: ServiceMetrics, name: str, **labels: str) -> float:
    value = metrics.registry.get_sample_value(name, labels)
    return float(value or 0.0)


async def test_the_page_and_its_modules_are_served_with_security_headers(serve: Serve) -> None:
    base, metrics, _ = await serve(True)
    async with aiohttp.ClientSession() as http:
        async with http.get(base + "/") as resp:
            assert resp.status == 200
            assert resp.headers["Content-Type"].startswith("text/html")
            assert resp.headers["Content-Security-Policy"] == CONTENT_SECURITY_POLICY
            assert resp.headers["X-Content-Type-Options"] == "nosniff"
            body = await resp.text()
            assert '<script type="module" src="/client/js/main.js">' in body
        for name in static_files():
            async with http.get(f"{base}/client/{name}") as resp:
                assert resp.status == 200, name
                assert resp.headers["Content-Security-Policy"] == CONTENT_SECURITY_POLICY
        async with http.get(base + "/client/js/app.js") as resp:
            assert resp.headers["Content-Type"].startswith("text/javascript")  # ES modules need a JS type
        async with http.get(base + "/client/js/missing.js") as resp:
            assert resp.status == 404 and await resp.json() == {"ok": False, "error": "not_found"}
    assert counter(metrics, "rtm_webapp_client_requests_total", route="index", outcome="ok") == 1
    assert counter(metrics, "rtm_webapp_client_requests_total", route="file", outcome="not_found") == 1
    assert counter(metrics, "rtm_errors_total", kind="client_file_not_found") == 1


@pytest.mark.parametrize(
    "path",
    [
        "/client/../client.py",
        "/client/%2e%2e/client.py",
        "/client/..%2fclient.py",
        "/client/js/../../client.py",
        "/client/nope.js",
        "/client/js/",
        "/client//etc/passwd",
    ],
)
async def test_nothing_outside_the_static_files_is_served(serve: Serve, path: str) -> None:
    base, metrics, _ = await serve(True)
    async with aiohttp.ClientSession() as http:
        async with http.get(base + path) as resp:
            assert resp.status == 404
            text = await resp.text()
            assert "BrowserClient" not in text and "root:" not in text
    # aiohttp normalises some of these before routing (then no route matches at all); the
    # ones that reach the handler are counted
    refused = counter(metrics, "rtm_webapp_client_requests_total", route="file", outcome="not_found")
    assert refused == counter(metrics, "rtm_errors_total", kind="client_file_not_found")


async def test_a_permalink_opens_the_page_and_any_other_archives_path_is_not_found(serve: Serve) -> None:
    base, metrics, _ = await serve(False)
    async with aiohttp.ClientSession() as http:
        async with http.get(base + "/") as resp:
            page = await resp.read()
        async with http.get(base + "/archives/C0A1B2C3D4E/p1700000000000100?thread_ts=1700000000.000050") as resp:
            assert resp.status == 200
            assert resp.headers["Content-Security-Policy"] == CONTENT_SECURITY_POLICY
            assert await resp.read() == page
        for path in (
            "/archives/C0A1B2C3D4E/p170000000000010",  # a digit short
            "/archives/C0A1B2C3D4E/1700000000.000100",
            "/archives/../p1700000000000100",
            "/archives/c0a1/p1700000000000100",
            "/archives/U0A1B2C3D4E/p1700000000000100",
        ):
            async with http.get(base + path) as resp:
                assert resp.status == 404, path
    assert counter(metrics, "rtm_webapp_client_requests_total", route="permalink", outcome="ok") == 1
    # aiohttp normalises "/archives/../p…" before routing; the other four reach the handler
    assert counter(metrics, "rtm_webapp_client_requests_total", route="permalink", outcome="not_found") == 4


async def test_demo_users_list_people_with_tokens_only_in_demo_mode(serve: Serve) -> None:
    base, metrics, seed = await serve(True)
    async with aiohttp.ClientSession() as http:
        async with http.get(base + "/demo/users") as resp:
            assert resp.status == 200
            assert resp.headers["Cache-Control"] == "no-store"
            body = await resp.json()
    assert body["ok"] and body["team"]["id"] == seed["team"]["id"]
    people = [u for u in seed["users"] if not u["is_bot"]][:MAX_DEMO_USERS]
    assert [(u["id"], u["name"], u["token"]) for u in body["users"]] == [
        (u["id"], u["name"], u["token"]) for u in people
    ]
    assert len(body["users"]) == MAX_DEMO_USERS  # bounded however large the seed

    base, metrics, _ = await serve(False)
    async with aiohttp.ClientSession() as http:
        async with http.get(base + "/demo/users") as resp:
            assert resp.status == 404
            assert await resp.json() == {"ok": False, "error": "demo_mode_off"}
        async with http.get(base + "/") as resp:
            assert resp.status == 200  # the page itself is served either way: sign-in by token
    assert counter(metrics, "rtm_errors_total", kind="demo_mode_off") == 1


@pytest.mark.parametrize(
    ("flags", "said"),
    [
        (["--wire-tls", "off", "--public-url", "https://edge/rtm"], "--public-url must be http(s)://host[:port]"),
        ([], "webapp needs --tls-ca, --tls-cert and --tls-key"),  # TrustConfigError is a ConfigError too
    ],
)
def test_a_flag_the_webapp_cannot_start_with_is_said_in_one_line(tmp_path: Path, flags: list[str], said: str) -> None:
    argv = rtm_argv("webapp", "--data-dir", str(tmp_path), "--port", "0", *flags)
    done = subprocess.run(argv, capture_output=True, text=True, timeout=DEFAULT_WAIT_S, env=child_environment(None))
    assert done.returncode == CONFIG_ERROR_EXIT_CODE
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith(f"rtm webapp: {said}"), done.stderr
    assert "Traceback" not in done.stderr
