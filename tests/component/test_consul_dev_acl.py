"""The dev Consul agent with ACLs on (``--acl-token``), as its own process.

With the management token, py-consul's own clients (sync and aio, ``token=``)
work as without ACLs. Without it, raw HTTP gets real Consul's answers under
``default_policy = "deny"`` (docs/consul-acl.md): 403 ``ACL not found`` for
an unknown token, 403 ``Permission denied`` for a write or a named read, and
empty lists for health/catalog reads; ``/v1/status/leader`` stays open.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import aiohttp
import consul
import consul.aio
import pytest
from consul.callback import CB

from consul_dev.app import ACL_TOKEN_ENV
from consul_dev.node import KV_MAX_VALUE_BYTES, NODE_NAME
from rtmctl import launcher
from services.config import CONSUL_HTTP_TOKEN_ENV, CONSUL_HTTP_TOKEN_FILE_ENV, CONSUL_TOKEN_ENV
from services.regions import REGION_MAP_KEY, drained_key
from tests.support import DEFAULT_WAIT_S, async_wait_until, consul_dev_agent

REPO_ROOT = Path(__file__).resolve().parents[2]
TOKEN = secrets.token_hex(16)
CONSUL_HTTP_TOKEN_ENVS = (CONSUL_HTTP_TOKEN_ENV, CONSUL_HTTP_TOKEN_FILE_ENV)
CLI_TIMEOUT_S = 60.0
ANONYMOUS_SUFFIX = ". The anonymous token is used implicitly when a request does not specify a token."


@pytest.fixture(scope="module")
def agent() -> Iterator[launcher.RunningProcess]:
    with consul_dev_agent("consul-dev-acl", env={ACL_TOKEN_ENV: TOKEN}) as proc:
        assert proc.ready["acl"] is True
        yield proc


@pytest.fixture
def base(agent: launcher.RunningProcess) -> str:
    return f"http://127.0.0.1:{agent.ready['port']}"


@pytest.fixture
def admin(agent: launcher.RunningProcess) -> consul.Consul:
    client = consul.Consul(host="127.0.0.1", port=agent.ready["port"], token=TOKEN)
    client.token = TOKEN  # py-consul lets CONSUL_HTTP_TOKEN override token=; the test wants its own
    return client


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


async def call(http: aiohttp.ClientSession, method: str, url: str, **kwargs: object) -> tuple[int, str, dict[str, str]]:
    async with http.request(method, url, **kwargs) as resp:  # type: ignore[arg-type]
        return resp.status, await resp.text(), dict(resp.headers)


def denied(resource: str, name: str) -> str:
    return f"Permission denied: anonymous token lacks permission '{resource}' on \"{name}\"{ANONYMOUS_SUFFIX}"


def acl_refusals(admin: consul.Consul, reason: str) -> float:
    text = admin.http.get(lambda r: r.body, "/metrics")
    for line in str(text).splitlines():
        if line.startswith(f'rtm_consul_dev_acl_refusals_total{{reason="{reason}"}}'):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_py_consul_sync_client_with_the_token_does_everything(admin: consul.Consul) -> None:
    assert admin.agent.service.register("web", service_id="web-1", port=80, check=consul.Check.ttl("30s"))
    assert admin.agent.check.ttl_pass("service:web-1")
    _, entries = admin.health.service("web", passing=True)
    assert [e["Service"]["ID"] for e in entries] == ["web-1"]
    assert "web" in admin.catalog.services()[1]
    assert admin.kv.put("rtm/ring/channel", '{"version": 1}')
    assert admin.kv.get("rtm/ring/channel")[1]["Value"] == b'{"version": 1}'
    session = admin.session.create(ttl=10)
    assert admin.kv.put("rtm/charm/leader", "me", acquire=session)
    assert admin.session.destroy(session)
    # py-consul's agent.self() sends no token (a gap in py-consul, not in the agent): pass it by hand
    me = admin.http.get(CB.json(), "/v1/agent/self", headers=admin.prepare_headers())
    assert me["Config"]["NodeName"] == "rtm-dev"


async def test_py_consul_aio_client_with_the_token(agent: launcher.RunningProcess) -> None:
    client = consul.aio.Consul(host="127.0.0.1", port=agent.ready["port"], token=TOKEN)
    client.token = TOKEN
    try:
        await client.agent.service.register("chat", service_id="chat-1", check=consul.Check.ttl("30s"))
        await client.agent.check.ttl_pass("service:chat-1")
        index, entries = await client.health.service("chat", passing=True)
        assert [e["Service"]["ID"] for e in entries] == ["chat-1"]
        assert await client.kv.put("rtm/regions/drained/eu-west", "1")
        _, keys = await client.kv.get("rtm/regions/drained/", keys=True)
        assert keys == ["rtm/regions/drained/eu-west"]
        await client.agent.service.deregister("chat-1")
    finally:
        await client.close()


def test_py_consul_without_a_token_is_refused(agent: launcher.RunningProcess, admin: consul.Consul) -> None:
    stranger = consul.Consul(host="127.0.0.1", port=agent.ready["port"])
    stranger.token = None
    with pytest.raises(consul.ACLPermissionDenied):
        stranger.kv.put("rtm/ring/channel", "owned")
    with pytest.raises(consul.ACLPermissionDenied):
        stranger.kv.get("rtm/ring/channel")
    with pytest.raises(consul.ACLPermissionDenied):
        stranger.agent.service.register("webapp", service_id="fake-webapp", port=1)
    assert stranger.health.service("web")[1] == []  # filtered, as real Consul does for the anonymous token
    assert stranger.catalog.services()[1] == {}
    # nothing changed
    assert admin.kv.get("rtm/ring/channel")[1]["Value"] == b'{"version": 1}'
    assert "webapp" not in admin.catalog.services()[1]


async def test_anonymous_requests_get_real_consuls_answers(
    base: str, http: aiohttp.ClientSession, admin: consul.Consul
) -> None:
    admin.agent.service.register("web", service_id="web-1", port=80, check=consul.Check.ttl("30s"))
    admin.kv.put("rtm/ring/channel", '{"version": 1}')
    before = acl_refusals(admin, "permission_denied")

    # KV and sessions: the detailed text (Consul >= 1.12: KeyReadAllowed, KeyWriteAllowed,
    # KeyWritePrefixAllowed, SessionWriteAllowed; deploy/ runs 1.19)
    ring = "rtm/ring/channel"
    assert (await call(http, "GET", f"{base}/v1/kv/{ring}"))[:2] == (403, denied("key:read", ring))
    assert (await call(http, "PUT", f"{base}/v1/kv/{ring}", data=b"x"))[:2] == (403, denied("key:write", ring))
    assert (await call(http, "DELETE", f"{base}/v1/kv/rtm?recurse"))[:2] == (403, denied("key:write", "rtm"))
    status, body, _ = await call(http, "PUT", f"{base}/v1/session/create")
    assert (status, body) == (403, denied("session:write", "rtm-dev"))
    # KV lists are filtered to nothing: 404, as for no keys
    assert (await call(http, "GET", f"{base}/v1/kv/rtm/?recurse"))[:2] == (404, "")
    assert (await call(http, "GET", f"{base}/v1/kv/rtm/?keys"))[:2] == (404, "")
    # but not at the root, where Consul's KVSGetKeys answers an empty list (never 404)
    status, body, headers = await call(http, "GET", f"{base}/v1/kv/?keys")
    assert (status, body) == (200, "[]") and "X-Consul-Results-Filtered-By-ACLs" not in headers

    # agent endpoints: the detailed text naming the anonymous token
    status, body, _ = await call(http, "GET", f"{base}/v1/agent/self")
    assert (status, body) == (403, denied("agent:read", "rtm-dev"))
    status, body, _ = await call(http, "PUT", f"{base}/v1/agent/service/register", json={"Name": "webapp"})
    assert (status, body) == (403, denied("service:write", "webapp"))
    status, body, _ = await call(http, "PUT", f"{base}/v1/agent/check/pass/service:web-1")
    assert (status, body) == (403, denied("service:write", "web"))
    status, body, _ = await call(http, "PUT", f"{base}/v1/agent/service/deregister/web-1")
    assert (status, body) == (403, denied("service:write", "web"))
    # unknown IDs are still 404 (Consul vets the existing registration)
    assert (await call(http, "PUT", f"{base}/v1/agent/check/pass/nope"))[0] == 404

    # health and catalog reads: filtered, 200 with nothing; the filtered header is masked for anonymous
    status, body, headers = await call(http, "GET", f"{base}/v1/health/service/web")
    assert (status, body) == (200, "[]")
    assert "X-Consul-Results-Filtered-By-ACLs" not in headers
    assert headers["X-Consul-Default-ACL-Policy"] == "deny"
    assert int(headers["X-Consul-Index"]) >= 1
    assert (await call(http, "GET", f"{base}/v1/catalog/services"))[:2] == (200, "{}")
    assert (await call(http, "GET", f"{base}/v1/agent/services"))[:2] == (200, "{}")
    assert (await call(http, "GET", f"{base}/v1/session/list"))[:2] == (200, "[]")

    # open without a token, as in real Consul
    assert (await call(http, "GET", f"{base}/v1/status/leader"))[0] == 200
    assert (await call(http, "GET", f"{base}/v1/catalog/datacenters"))[:2] == (200, '["dc1"]')

    # refused, counted, and nothing changed
    assert acl_refusals(admin, "permission_denied") == before + 8
    assert admin.kv.get("rtm/ring/channel")[1]["Value"] == b'{"version": 1}'
    assert "web-1" in admin.agent.services()


@pytest.mark.parametrize(
    "how",
    [
        {"headers": {"X-Consul-Token": "not-the-token"}},
        {"params": {"token": "not-the-token"}},
        {"headers": {"Authorization": "Bearer not-the-token"}},
    ],
)
async def test_an_unknown_token_gets_acl_not_found_everywhere(
    base: str, http: aiohttp.ClientSession, admin: consul.Consul, how: dict[str, dict[str, str]]
) -> None:
    before = acl_refusals(admin, "acl_not_found")
    paths = [  # every endpoint the fleet uses (services/discovery.py, charm/, rtmctl/operator.py)
        ("GET", "/v1/kv/rtm/ring/channel"),
        ("GET", "/v1/kv/rtm/regions/drained/?recurse"),
        ("GET", "/v1/kv/rtm/?keys"),
        ("PUT", "/v1/kv/rtm/ring/channel"),
        ("PUT", "/v1/kv/rtm/ring/channel?cas=1"),
        ("PUT", "/v1/kv/rtm/charm/leader?acquire=5e1a7a0e-0000-4000-8000-000000000000"),
        ("DELETE", "/v1/kv/rtm/regions/drained/us-east"),
        ("GET", "/v1/health/service/web"),
        ("GET", "/v1/health/service/web?passing=1&index=1&wait=60s"),
        ("GET", "/v1/catalog/services"),
        ("GET", "/v1/agent/self"),
        ("GET", "/v1/agent/services"),
        ("PUT", "/v1/agent/service/register"),  # with a valid body (below): Consul decodes it first
        ("PUT", "/v1/agent/service/deregister/web-1"),
        ("PUT", "/v1/agent/check/pass/service:web-1"),
        ("PUT", "/v1/session/create"),
        ("PUT", "/v1/session/renew/5e1a7a0e-0000-4000-8000-000000000000"),
        ("PUT", "/v1/session/destroy/5e1a7a0e-0000-4000-8000-000000000000"),
        ("GET", "/v1/session/info/5e1a7a0e-0000-4000-8000-000000000000"),
    ]
    for method, path in paths:
        body_of = {"json": {"Name": "web", "ID": "web-2"}} if path.endswith("/register") else {}
        status, body, _ = await asyncio.wait_for(call(http, method, base + path, **how, **body_of), DEFAULT_WAIT_S)
        assert (status, body) == (403, "ACL not found"), path
    assert acl_refusals(admin, "acl_not_found") == before + len(paths)


async def test_the_token_works_in_every_place_consul_reads_it(base: str, http: aiohttp.ClientSession) -> None:
    for how in (
        {"headers": {"X-Consul-Token": TOKEN}},
        {"params": {"token": TOKEN}},
        {"headers": {"Authorization": f"Bearer {TOKEN}"}},
    ):
        status, _, _ = await call(http, "PUT", f"{base}/v1/kv/rtm/probe", data=b"1", **how)
        assert status == 200, how
        status, body, _ = await call(http, "GET", f"{base}/v1/kv/rtm/probe?raw", **how)
        assert (status, body) == (200, "1"), how
    # ?token= wins over the header, as in Consul's parseTokenInternal
    status, body, _ = await call(
        http, "GET", f"{base}/v1/kv/rtm/probe", params={"token": "wrong"}, headers={"X-Consul-Token": TOKEN}
    )
    assert (status, body) == (403, "ACL not found")


async def test_sessions_and_locks_without_the_token_are_refused_and_change_nothing(
    base: str, http: aiohttp.ClientSession, admin: consul.Consul
) -> None:
    """CHARM's leader lock (a session and an ``acquire``) as a stranger would attack it: renew,
    destroy, take or release it. Refused with Consul's texts; an unknown session is looked up
    before the token is checked (Consul's Session.Apply and Session.Renew), so it gets the
    state's answer; the session and the lock are untouched."""
    session = admin.session.create(ttl=30)
    lock = "rtm/charm/leader-audit"  # not rtm/charm/leader: a test above released it, its lock-delay runs
    assert admin.kv.put(lock, "me", acquire=session)
    before = acl_refusals(admin, "permission_denied")
    write_session = (403, denied("session:write", "rtm-dev"))
    assert (await call(http, "PUT", f"{base}/v1/session/renew/{session}"))[:2] == write_session
    assert (await call(http, "PUT", f"{base}/v1/session/destroy/{session}"))[:2] == write_session
    for flag in ("acquire", "release"):
        status, body, _ = await call(http, "PUT", f"{base}/v1/kv/{lock}?{flag}={session}", data=b"thief")
        assert (status, body) == (403, denied("key:write", lock)), flag
    assert (await call(http, "GET", f"{base}/v1/session/info/{session}"))[:2] == (200, "[]")  # filtered
    assert acl_refusals(admin, "permission_denied") == before + 4
    unknown = "5e1a7a0e-0000-4000-8000-000000000000"
    assert (await call(http, "PUT", f"{base}/v1/session/renew/{unknown}"))[:2] == (
        404,
        f"Session id '{unknown}' not found",
    )
    assert (await call(http, "PUT", f"{base}/v1/session/destroy/{unknown}"))[:2] == (200, "true")
    wrong = {"headers": {"X-Consul-Token": "not-the-token"}}
    assert (await call(http, "PUT", f"{base}/v1/session/renew/{unknown}", **wrong))[:2] == (403, "ACL not found")
    # nothing changed: the session lives and still holds the lock
    assert admin.session.info(session)[1]["ID"] == session
    assert admin.kv.get(lock)[1]["Session"] == session
    assert admin.session.destroy(session)


async def test_blocking_queries_without_the_token(base: str, http: aiohttp.ClientSession, admin: consul.Consul) -> None:
    """A watch as the fleet runs it (``?index=N&wait=...``): an unknown token, or a single key
    the anonymous token may not read, is refused at once (Consul resolves the token before it
    blocks, and checks the key on the query's first run); a filtered list blocks as usual and
    wakes on a change, with nothing in it."""
    admin.agent.service.register("watched", service_id="watched-1", check=consul.Check.ttl("30s"))
    admin.kv.put("rtm/ring/channel", '{"version": 1}')
    status, _, headers = await call(http, "GET", f"{base}/v1/health/service/watched", params={"token": TOKEN})
    index = int(headers["X-Consul-Index"])
    blocking = {"index": str(index), "wait": "60s"}  # far longer than the bound on each answer below
    wrong = {"X-Consul-Token": "not-the-token"}
    answer = call(http, "GET", f"{base}/v1/health/service/watched", params=blocking, headers=wrong)
    assert (await asyncio.wait_for(answer, DEFAULT_WAIT_S))[:2] == (403, "ACL not found")
    answer = call(http, "GET", f"{base}/v1/kv/rtm/ring/channel", params=blocking)
    assert (await asyncio.wait_for(answer, DEFAULT_WAIT_S))[:2] == (403, denied("key:read", "rtm/ring/channel"))
    # the anonymous token's filtered watch: it blocks until the index moves, then answers nothing
    watch = asyncio.ensure_future(call(http, "GET", f"{base}/v1/health/service/watched", params=blocking))

    async def waiting() -> bool:
        return blocking_queries(admin) >= 1

    await async_wait_until(waiting, what="the anonymous watch is blocking")
    assert not watch.done()
    admin.agent.service.register("watched", service_id="watched-2", check=consul.Check.ttl("30s"))
    status, body, headers = await asyncio.wait_for(watch, DEFAULT_WAIT_S)
    assert (status, body) == (200, "[]")
    assert int(headers["X-Consul-Index"]) > index
    for service_id in ("watched-1", "watched-2"):
        admin.agent.service.deregister(service_id)


async def test_an_oversized_kv_put_is_413_before_the_token_is_checked(base: str, http: aiohttp.ClientSession) -> None:
    """Consul's HTTP layer checks the body's size before the RPC that resolves the token."""
    status, body, _ = await call(http, "PUT", f"{base}/v1/kv/rtm/big", data=b"x" * (KV_MAX_VALUE_BYTES + 1))
    assert status == 413 and body.startswith("Request body("), body


def blocking_queries(admin: consul.Consul) -> float:
    text = admin.http.get(lambda r: r.body, "/metrics")
    for line in str(text).splitlines():
        if line.startswith("rtm_consul_dev_blocking_queries "):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_rtm_commands_read_the_token_where_consuls_own_tools_do(
    agent: launcher.RunningProcess, admin: consul.Consul, tmp_path: Path
) -> None:
    """``CONSUL_HTTP_TOKEN`` and ``CONSUL_HTTP_TOKEN_FILE`` (as Consul's CLI reads them), after
    ``RTM_CONSUL_TOKEN``; without a token, or with a wrong one, a real ``rtm drain`` process is
    refused with a clear error, exit 1, and writes nothing."""
    address = f"127.0.0.1:{agent.ready['port']}"
    clean = {k: v for k, v in os.environ.items() if k not in (CONSUL_TOKEN_ENV, *CONSUL_HTTP_TOKEN_ENVS)}
    token_file = tmp_path / "consul-token"
    token_file.write_text(TOKEN + "\n")  # a test's own token for a throwaway agent

    def drain(region: str, **env: str) -> subprocess.CompletedProcess[str]:
        argv = launcher.rtm_argv("drain", region, "--consul", address, "--data-dir", str(tmp_path / "no-fleet"))
        return subprocess.run(
            argv, env={**clean, **env}, capture_output=True, text=True, timeout=CLI_TIMEOUT_S, check=False
        )

    for region, env in (
        ("r-none", {}),
        ("r-wrong", {"CONSUL_HTTP_TOKEN": "not-the-token"}),
        ("r-rtm-wins", {"RTM_CONSUL_TOKEN": "not-the-token", "CONSUL_HTTP_TOKEN": TOKEN}),
    ):
        done = drain(region, **env)
        assert done.returncode == 1, (region, done.stderr)
        assert "Consul refused the request" in done.stderr and "Traceback" not in done.stderr, done.stderr
        assert admin.kv.get(drained_key(region))[1] is None, region
    for region, env in (
        ("r-http-token", {"CONSUL_HTTP_TOKEN": TOKEN}),
        ("r-token-file", {"CONSUL_HTTP_TOKEN_FILE": str(token_file)}),
        ("r-rtm-token", {"RTM_CONSUL_TOKEN": TOKEN, "CONSUL_HTTP_TOKEN": "not-the-token"}),
    ):
        done = drain(region, **env)
        assert done.returncode == 0, (region, done.stderr)
        assert admin.kv.get(drained_key(region))[1] is not None, region
        admin.kv.delete(drained_key(region))


def test_rtm_drain_refuses_a_region_the_fleet_does_not_know(
    agent: launcher.RunningProcess, admin: consul.Consul, tmp_path: Path
) -> None:
    """A mistyped region used to be "drained" (a flag nobody reads) with exit 0; with a region map
    in Consul, ``rtm drain`` names the known regions and writes nothing."""
    address = f"127.0.0.1:{agent.ready['port']}"
    env = {**{k: v for k, v in os.environ.items() if k not in CONSUL_HTTP_TOKEN_ENVS}, CONSUL_TOKEN_ENV: TOKEN}
    admin.kv.put(REGION_MAP_KEY, json.dumps({"us-east": ["eu-west"], "eu-west": ["us-east"]}))
    try:
        for region, code, said in (
            ("us-eats", 1, "rtm drain: no region 'us-eats'; known: eu-west, us-east"),
            ("eu-west", 0, ""),
        ):
            argv = launcher.rtm_argv("drain", region, "--consul", address, "--data-dir", str(tmp_path / "no-fleet"))
            done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=CLI_TIMEOUT_S, check=False)
            assert (done.returncode, done.stderr.strip()) == (code, said), region
            assert (admin.kv.get(drained_key(region))[1] is not None) == (code == 0), region
    finally:
        admin.kv.delete(drained_key("eu-west"))
        admin.kv.delete(REGION_MAP_KEY)


def test_rtm_undrain_refuses_a_region_the_fleet_does_not_know(
    agent: launcher.RunningProcess, admin: consul.Consul, tmp_path: Path
) -> None:
    """``rtm undrain us-eats`` used to say "region us-eats undrained" with exit 0 while us-east stayed
    drained; a region neither drained nor known is refused as ``rtm drain`` refuses it, a known one
    not drained is said to be so, and a drained one (even one the map no longer has) is undrained."""
    address = f"127.0.0.1:{agent.ready['port']}"
    env = {**{k: v for k, v in os.environ.items() if k not in CONSUL_HTTP_TOKEN_ENVS}, CONSUL_TOKEN_ENV: TOKEN}
    admin.kv.put(REGION_MAP_KEY, json.dumps({"us-east": ["eu-west"], "eu-west": ["us-east"]}))
    admin.kv.put(drained_key("us-east"), "1")
    admin.kv.put(drained_key("old-region"), "1")
    try:
        for region, code, said in (
            ("us-eats", 1, "rtm undrain: no region 'us-eats'; known: eu-west, us-east"),
            ("eu-west", 0, "region eu-west was not drained: it takes new clients"),
            ("us-east", 0, "region us-east undrained: it takes new clients again"),
            ("old-region", 0, "region old-region undrained: it takes new clients again"),
        ):
            argv = launcher.rtm_argv("undrain", region, "--consul", address, "--data-dir", str(tmp_path / "no-fleet"))
            done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=CLI_TIMEOUT_S, check=False)
            assert (done.returncode, (done.stdout + done.stderr).strip()) == (code, said), region
            assert admin.kv.get(drained_key(region))[1] is None, region
    finally:
        for region in ("us-east", "old-region"):
            admin.kv.delete(drained_key(region))
        admin.kv.delete(REGION_MAP_KEY)


# -- tokens with rules (--acl-tokens-file) -------------------------------------------------------

GW_SECRET = secrets.token_hex(16)
GW_ACCESSOR = "6a1f0c3e-0000-4000-8000-00000000a11e"
READ = {"policy": "read"}
ROLE_TOKENS = {
    GW_SECRET: {
        "AccessorID": GW_ACCESSOR,
        "Description": "rtm gateway",
        "Rules": {
            "service": {"gateway": {"policy": "write"}},
            "node_prefix": {"": READ},
            "key_prefix": {"rtm/": READ},
        },
    }
}


@pytest.fixture(scope="module")
def roles_agent(tmp_path_factory: pytest.TempPathFactory) -> Iterator[launcher.RunningProcess]:
    """An agent with a management token and one token with rules, from a tokens file."""
    path = tmp_path_factory.mktemp("acl") / "tokens.json"
    path.write_text(json.dumps(ROLE_TOKENS))
    with consul_dev_agent("consul-dev-roles", "--acl-tokens-file", str(path), env={ACL_TOKEN_ENV: TOKEN}) as proc:
        yield proc


def partial_denied(permission: str, name: str) -> str:
    return f"Permission denied: token with AccessorID '{GW_ACCESSOR}' lacks permission '{permission}' on \"{name}\""


async def test_a_token_with_rules_gets_filtered_lists_and_named_refusals(
    roles_agent: launcher.RunningProcess, http: aiohttp.ClientSession
) -> None:
    base = f"http://127.0.0.1:{roles_agent.ready['port']}"
    admin = consul.Consul(host="127.0.0.1", port=roles_agent.ready["port"], token=TOKEN)
    admin.token = TOKEN
    gw = {"headers": {"X-Consul-Token": GW_SECRET}}
    for name in ("gateway", "webapp"):
        assert admin.agent.service.register(name, service_id=f"{name}-1", check=consul.Check.ttl("30s"))
    assert admin.kv.put("rtm/ring/channel", "{}") and admin.kv.put("private/x", "y")
    # lists: what the token may read, and the header that says something was left out
    status, body, headers = await call(http, "GET", f"{base}/v1/catalog/services", **gw)
    assert status == 200 and json.loads(body) == {"gateway": []}
    assert headers["X-Consul-Results-Filtered-By-ACLs"] == "true"
    status, body, headers = await call(http, "GET", f"{base}/v1/health/service/webapp", **gw)
    assert (status, body, headers["X-Consul-Results-Filtered-By-ACLs"]) == (200, "[]", "true")
    status, body, headers = await call(http, "GET", f"{base}/v1/health/service/gateway", **gw)
    assert status == 200 and [e["Service"]["ID"] for e in json.loads(body)] == ["gateway-1"]
    assert "X-Consul-Results-Filtered-By-ACLs" not in headers  # nothing was removed
    status, body, headers = await call(http, "GET", f"{base}/v1/agent/services", **gw)
    assert list(json.loads(body)) == ["gateway-1"] and headers["X-Consul-Results-Filtered-By-ACLs"] == "true"
    status, body, headers = await call(http, "GET", f"{base}/v1/kv/?recurse", **gw)
    assert [e["Key"] for e in json.loads(body)] == ["rtm/ring/channel"]
    assert headers["X-Consul-Results-Filtered-By-ACLs"] == "true"
    status, body, headers = await call(http, "GET", f"{base}/v1/kv/private/?keys", **gw)
    assert (status, headers["X-Consul-Results-Filtered-By-ACLs"]) == (404, "true")  # nothing left: 404
    # one object: a refusal that names the token
    assert (await call(http, "GET", f"{base}/v1/kv/private/x", **gw))[:2] == (
        403,
        partial_denied("key:read", "private/x"),
    )
    assert (await call(http, "PUT", f"{base}/v1/kv/rtm/ring/channel", data=b"{}", **gw))[:2] == (
        403,
        partial_denied("key:write", "rtm/ring/channel"),
    )
    assert (await call(http, "DELETE", f"{base}/v1/kv/rtm/?recurse", **gw))[:2] == (
        403,
        partial_denied("key:write", "rtm/"),
    )
    assert (await call(http, "PUT", f"{base}/v1/agent/service/deregister/webapp-1", **gw))[:2] == (
        403,
        partial_denied("service:write", "webapp"),
    )
    # its own: allowed
    assert (await call(http, "PUT", f"{base}/v1/agent/check/pass/service:gateway-1", **gw))[0] == 200
    # py-consul with the token raises Consul's permission error
    client = consul.Consul(host="127.0.0.1", port=roles_agent.ready["port"], token=GW_SECRET)
    client.token = GW_SECRET
    with pytest.raises(consul.ACLPermissionDenied):
        client.kv.put("rtm/ring/channel", "{}")
    # nothing changed
    assert admin.kv.get("rtm/ring/channel")[1]["Value"] == b"{}"
    assert "webapp-1" in admin.agent.services()


async def test_a_registration_cannot_take_another_services_check(
    roles_agent: launcher.RunningProcess, http: aiohttp.ClientSession
) -> None:
    """A service registration names its checks: a gateway's token that names a webapp's check (or
    the node's) would move it to a gateway and stop the webapp's own passes. Refused; stricter than
    Consul, whose service registration vets only the service (docs/consul-acl.md)."""
    base = f"http://127.0.0.1:{roles_agent.ready['port']}"
    admin = consul.Consul(host="127.0.0.1", port=roles_agent.ready["port"], token=TOKEN)
    admin.token = TOKEN
    gw = {"headers": {"X-Consul-Token": GW_SECRET}}
    assert admin.agent.service.register("webapp", service_id="webapp-2", check=consul.Check.ttl("30s"))
    for taken in ("service:webapp-2", "serfHealth"):
        body = json.dumps({"Name": "gateway", "ID": "gateway-x", "Checks": [{"CheckID": taken, "TTL": "30s"}]})
        status, text, _ = await call(http, "PUT", f"{base}/v1/agent/service/register", data=body.encode(), **gw)
        permission = ("service:write", "webapp") if taken.startswith("service:") else ("node:write", NODE_NAME)
        assert (status, text) == (403, partial_denied(*permission)), taken
    checks = admin.agent.checks()
    assert checks["service:webapp-2"]["ServiceID"] == "webapp-2" and "gateway-x" not in admin.agent.services()
    # its own checks, new or its own: allowed
    body = json.dumps({"Name": "gateway", "ID": "gateway-x", "Checks": [{"CheckID": "gw-x-ttl", "TTL": "30s"}]})
    assert (await call(http, "PUT", f"{base}/v1/agent/service/register", data=body.encode(), **gw))[0] == 200
    assert (await call(http, "PUT", f"{base}/v1/agent/service/register", data=body.encode(), **gw))[0] == 200


@pytest.mark.parametrize(
    ("content", "error"),
    [("{", "not JSON"), (json.dumps({"s": {"AccessorID": "a", "Rules": {"acl": "write"}}}), "unsupported rule block")],
)
def test_the_agent_refuses_to_start_with_a_bad_tokens_file(tmp_path: Path, content: str, error: str) -> None:
    path = tmp_path / "tokens.json"
    path.write_text(content)
    argv = [sys.executable, "-m", "consul_dev", "--port", "0", "--acl-tokens-file", str(path)]
    done = subprocess.run(argv, cwd=REPO_ROOT, capture_output=True, text=True, timeout=CLI_TIMEOUT_S, check=False)
    assert done.returncode == 2 and error in done.stderr and "Traceback" not in done.stderr, done.stderr
    missing = [*argv[:-1], str(tmp_path / "missing.json")]
    done = subprocess.run(missing, cwd=REPO_ROOT, capture_output=True, text=True, timeout=CLI_TIMEOUT_S, check=False)
    assert done.returncode == 2 and "missing.json" in done.stderr, done.stderr
