"""``rtm up`` runs the dev Consul agent with ACLs on (default deny): the fleet works with its token,
a stranger without it is refused and changes nothing; secret files are 0600, tokens never on a command line."""

from __future__ import annotations

import base64
import json
import stat
import subprocess
import uuid
from pathlib import Path

import aiohttp

from rtmctl.consul_roles import ROLES, SERVICE_ROLES, TOKENS_FILE
from rtmctl.launcher import rtm_argv
from services.regions import drained_key
from services.ring import CHANNEL_RING_KEY
from tests.system.harness import Fleet, consul_client

SECRET_FILES = ("secret", "consul-acl-token", "operator-token", "seed.json", "consul-acl-tokens.json")
NOT_SECRET_FILES = ("fleet.json", "fleet.log")  # addresses and pids; the test harness's copy of the fleet's log
CLI_TIMEOUT_S = 60.0


def denied(permission: str, name: str) -> str:
    """Consul's (>= 1.12) answer to the anonymous token under default deny."""
    return (
        f"Permission denied: anonymous token lacks permission '{permission}' on \"{name}\". "
        "The anonymous token is used implicitly when a request does not specify a token."
    )


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_secret_files_are_0600_in_a_0700_data_dir(fleet: Fleet) -> None:
    assert mode(fleet.data_dir) == 0o700
    for name in (*SECRET_FILES, "webapp.db", "webapp.db-wal"):  # the database holds user tokens too
        assert mode(fleet.data_dir / name) == 0o600, name


def test_every_file_rtm_up_makes_is_0600_and_every_directory_0700(fleet: Fleet) -> None:
    """Not only the files named above: anything that appears in DATA_DIR (the TLS directory, its
    keys and certificates, the database's companions) is private, but for what is known to hold no
    secret."""
    seen = set()
    for path in fleet.data_dir.rglob("*"):
        seen.add(str(path.relative_to(fleet.data_dir)))
        if path.is_dir():
            assert mode(path) == 0o700, path
        elif path.name not in NOT_SECRET_FILES:
            assert mode(path) == 0o600, path
    assert {"tls", "tls/ca.key", "tls/operator.key", "logs", "logs/webapp.log", "logs/consul-dev.log"} <= seen, seen


def test_no_secret_is_on_any_command_line(fleet: Fleet) -> None:
    secrets = [(fleet.data_dir / name).read_text().strip() for name in SECRET_FILES[:3]]
    secrets += list(role_tokens(fleet).values())
    pids = [fleet.proc.pid] + [p["pid"] for p in fleet.info["processes"]]
    for pid in pids:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
        for secret in secrets:
            assert secret not in cmdline, pid


def environ(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes().decode(errors="replace")
    return dict(item.split("=", 1) for item in raw.split("\0") if "=" in item)


def role_tokens(fleet: Fleet) -> dict[str, str]:
    """Each role's Consul token (role -> SecretID), from the dev agent's tokens file."""
    doc = json.loads((fleet.data_dir / TOKENS_FILE).read_text())
    return {body["Description"].removeprefix("rtm "): secret for secret, body in doc.items()}


def test_each_process_is_started_with_only_the_secrets_its_job_needs(fleet: Fleet) -> None:
    """The fleet secret only in the webapp and the gateways (the tickets' key), the operator token
    nowhere (no --debug-faults), the dev agent's management token and tokens file only in the
    agent; every other process sends its own role's Consul token, never the management token or
    another role's (docs/consul-acl.md)."""
    secret = (fleet.data_dir / "secret").read_text().strip()
    operator = (fleet.data_dir / "operator-token").read_text().strip()
    management = (fleet.data_dir / "consul-acl-token").read_text().strip()
    tokens = role_tokens(fleet)
    assert set(tokens) == set(ROLES) and len(set(tokens.values())) == len(ROLES)
    services = set()
    for proc in fleet.info["processes"]:
        values = environ(int(proc["pid"]))
        holds = set(values.values())
        service = proc["service"]
        services.add(service)
        assert (secret in holds) == (service in ("webapp", "gateway")), proc["name"]
        assert operator not in holds, proc["name"]
        agent = service == "consul-dev"
        assert (values.get("RTM_CONSUL_DEV_ACL_TOKEN") == management) == agent, proc["name"]
        assert (management in holds) == agent, proc["name"]
        assert ("RTM_CONSUL_DEV_ACL_TOKENS_FILE" in values) == agent, proc["name"]
        others = {token for role, token in tokens.items() if role != service}
        assert not holds & others, proc["name"]
        if agent:
            assert "RTM_CONSUL_TOKEN" not in values
        else:
            assert values.get("RTM_CONSUL_TOKEN") == tokens[service], proc["name"]
    assert services == {*SERVICE_ROLES, "consul-dev"}


async def assert_the_fleet_delivers(fleet: Fleet, tag: str) -> None:
    """alice's post to #general reaches bob's connection: the fleet, with its own tokens, works."""
    bob = await fleet.connect("bob")
    text = f"{tag}-{uuid.uuid4().hex[:8]}"
    reply = await fleet.api(
        "chat.postMessage", fleet.user("alice")["token"], channel=fleet.channel("general"), text=text
    )
    assert reply["ok"], reply
    await bob.wait_texts([text])
    await bob.close()


async def test_a_client_without_the_token_is_refused_while_the_fleet_works(fleet: Fleet) -> None:
    consul_url = fleet.info["consul_url"]
    ring_before = consul_client(fleet).kv.get(CHANNEL_RING_KEY)[1]["Value"]
    async with aiohttp.ClientSession() as http:

        async def call(method: str, path: str, **kwargs: object) -> tuple[int, str]:
            async with http.request(method, consul_url + path, **kwargs) as resp:  # type: ignore[arg-type]
                return resp.status, await resp.text()

        assert await call("GET", f"/v1/kv/{CHANNEL_RING_KEY}") == (403, denied("key:read", CHANNEL_RING_KEY))
        ring_write = (403, denied("key:write", CHANNEL_RING_KEY))
        assert await call("PUT", f"/v1/kv/{CHANNEL_RING_KEY}", data=b'{"version":999}') == ring_write
        drained = drained_key("us-east")
        assert await call("PUT", f"/v1/kv/{drained}", data=b"1") == (403, denied("key:write", drained))
        status, body = await call("PUT", "/v1/agent/service/register", json={"Name": "webapp", "ID": "fake", "Port": 1})
        assert status == 403 and body.startswith("Permission denied: anonymous token lacks permission 'service:write'")
        assert await call("GET", "/v1/health/service/gateway?passing=1") == (200, "[]")  # filtered
        assert await call("GET", "/v1/catalog/services") == (200, "{}")
        bad = {"headers": {"X-Consul-Token": str(uuid.uuid4())}}
        assert await call("GET", "/v1/health/service/gateway", **bad) == (403, "ACL not found")

    # nothing changed, and the fleet (which sends its token) works
    admin = consul_client(fleet)
    assert admin.kv.get(CHANNEL_RING_KEY)[1]["Value"] == ring_before
    assert admin.kv.get(drained_key("us-east"))[1] is None
    assert "fake" not in admin.agent.services()
    assert len(admin.health.service("gateway", passing=True)[1]) == 2
    await assert_the_fleet_delivers(fleet, "acl")


def test_rtm_status_finds_the_token_with_nothing_more_typed(fleet: Fleet) -> None:
    argv = rtm_argv("status", "--data-dir", str(fleet.data_dir))
    done = subprocess.run(argv, capture_output=True, text=True, timeout=CLI_TIMEOUT_S, check=False, env=None)
    assert done.returncode == 0, done.stderr
    assert "channel ring v" in done.stdout and "gateway (2)" in done.stdout, done.stdout
    info = json.loads((fleet.data_dir / "fleet.json").read_text())
    assert info["consul_url"].startswith("http://")


def accessor_of(fleet: Fleet, role: str) -> str:
    doc = json.loads((fleet.data_dir / TOKENS_FILE).read_text())
    return str(next(body["AccessorID"] for body in doc.values() if body["Description"] == f"rtm {role}"))


def refused(fleet: Fleet, role: str, permission: str, name: str) -> tuple[int, str]:
    """What the dev agent answers a known token that lacks a rule (Consul's PermissionDeniedByACL)."""
    text = f"Permission denied: token with AccessorID '{accessor_of(fleet, role)}' lacks permission '{permission}'"
    return 403, f'{text} on "{name}"'


async def agent_refusals(http: aiohttp.ClientSession, consul_url: str) -> float:
    async with http.get(f"{consul_url}/metrics") as resp:
        for line in (await resp.text()).splitlines():
            if line.startswith('rtm_consul_dev_acl_refusals_total{reason="permission_denied"}'):
                return float(line.rsplit(" ", 1)[1])
    return 0.0


async def test_each_roles_token_may_do_its_job_and_nothing_more(fleet: Fleet) -> None:
    """The gateway's token (any non-CHARM process's, as deploy/'s policies) reads the fleet but
    cannot rewrite the ring, drain a region, register as or deregister another service, or take
    a session; CHARM's writes the rings; the operator's drains and writes the region map but
    touches no ring and registers nothing. Each refusal is Consul's 403, counted, and changes nothing."""
    consul_url = fleet.info["consul_url"]
    tokens = role_tokens(fleet)
    admin = consul_client(fleet)
    ring_before = admin.kv.get(CHANNEL_RING_KEY)[1]
    webapp_id = next(p["id"] for p in fleet.processes("webapp"))
    async with aiohttp.ClientSession() as http:

        async def call(role: str, method: str, path: str, **kwargs: object) -> tuple[int, str]:
            headers = {"X-Consul-Token": tokens[role]}
            async with http.request(method, consul_url + path, headers=headers, **kwargs) as resp:  # type: ignore[arg-type]
                return resp.status, await resp.text()

        before = await agent_refusals(http, consul_url)
        # the gateway: reads what every process reads ...
        status, body = await call("gateway", "GET", f"/v1/kv/{CHANNEL_RING_KEY}")
        assert status == 200 and b64(json.loads(body)[0]) == ring_before["Value"]
        status, body = await call("gateway", "GET", "/v1/health/service/webapp?passing=1")
        assert status == 200 and [e["Service"]["ID"] for e in json.loads(body)] == [webapp_id]
        # ... and writes nothing of anyone else's
        ring = CHANNEL_RING_KEY
        assert await call("gateway", "PUT", f"/v1/kv/{ring}", data=b'{"version":999}') == refused(
            fleet, "gateway", "key:write", ring
        )
        assert await call("gateway", "DELETE", f"/v1/kv/{ring}") == refused(fleet, "gateway", "key:write", ring)
        drained = drained_key("us-east")
        assert await call("gateway", "PUT", f"/v1/kv/{drained}", data=b"1") == refused(
            fleet, "gateway", "key:write", drained
        )
        leader = "rtm/charm/leader"
        assert await call("gateway", "PUT", f"/v1/kv/{leader}", data=b"me") == refused(
            fleet, "gateway", "key:write", leader
        )
        assert await call("gateway", "PUT", f"/v1/agent/service/deregister/{webapp_id}") == refused(
            fleet, "gateway", "service:write", "webapp"
        )
        fake = {"Name": "webapp", "ID": "fake-webapp", "Port": 1}
        assert await call("gateway", "PUT", "/v1/agent/service/register", json=fake) == refused(
            fleet, "gateway", "service:write", "webapp"
        )
        assert await call("gateway", "PUT", f"/v1/agent/check/pass/service:{webapp_id}") == refused(
            fleet, "gateway", "service:write", "webapp"
        )
        assert await call("gateway", "PUT", "/v1/session/create", json={}) == refused(
            fleet, "gateway", "session:write", "rtm-dev"
        )
        assert await agent_refusals(http, consul_url) == before + 8

        # the operator: drains (and undrains) a region, writes the map; no ring, no registration
        probe = drained_key("acl-probe")  # a region no gateway serves: nothing moves
        assert await call("operator", "PUT", f"/v1/kv/{probe}", data=b"1") == (200, "true")
        assert await call("operator", "DELETE", f"/v1/kv/{probe}") == (200, "true")
        status, body = await call("operator", "GET", "/v1/kv/rtm/regions/map")
        region_map = json.loads(body)[0]
        cas = f"?cas={region_map['ModifyIndex']}"
        assert await call("operator", "PUT", f"/v1/kv/rtm/regions/map{cas}", data=b64(region_map)) == (200, "true")
        assert await call("operator", "PUT", f"/v1/kv/{ring}", data=b"{}") == refused(
            fleet, "operator", "key:write", ring
        )
        assert await call("operator", "PUT", "/v1/agent/service/register", json=fake) == refused(
            fleet, "operator", "service:write", "webapp"
        )

        # CHARM: writes the rings (here a scratch key under them, which no process watches)
        scratch = "rtm/ring/acl-probe"
        assert await call("charm", "PUT", f"/v1/kv/{scratch}", data=b"x") == (200, "true")
        assert await call("charm", "DELETE", f"/v1/kv/{scratch}") == (200, "true")
        assert await call("charm", "PUT", f"/v1/kv/{drained}", data=b"1") == refused(
            fleet, "charm", "key:write", drained
        )

        # a list holds only what the token may read, and says it was filtered
        assert admin.kv.put("outside-rtm/acl-probe", "x")
        try:
            async with http.get(f"{consul_url}/v1/kv/?keys", headers={"X-Consul-Token": tokens["gateway"]}) as resp:
                keys = await resp.json()
                assert resp.headers.get("X-Consul-Results-Filtered-By-ACLs") == "true"
            assert CHANNEL_RING_KEY in keys and "outside-rtm/acl-probe" not in keys
        finally:
            admin.kv.delete("outside-rtm/acl-probe")

    # nothing a refusal touched changed, and the fleet works
    assert admin.kv.get(CHANNEL_RING_KEY)[1]["Value"] == ring_before["Value"]
    assert admin.kv.get(drained_key("us-east"))[1] is None
    assert webapp_id in admin.agent.services() and "fake-webapp" not in admin.agent.services()
    assert len(admin.health.service("webapp", passing=True)[1]) == 1
    await assert_the_fleet_delivers(fleet, "roles")


def b64(entry: dict[str, object]) -> bytes:
    """The raw value of a KV entry as Consul's JSON gives it (base64)."""
    return base64.b64decode(str(entry["Value"]))


def test_rtm_drain_and_undrain_work_with_the_operators_token_and_nothing_typed(fleet: Fleet) -> None:
    admin = consul_client(fleet)
    for command in ("drain", "undrain"):  # a region of the fleet (nobody is connected to move)
        argv = rtm_argv(command, "eu-west", "--data-dir", str(fleet.data_dir))
        done = subprocess.run(argv, capture_output=True, text=True, timeout=CLI_TIMEOUT_S, check=False)
        assert done.returncode == 0, done.stderr
        assert (admin.kv.get(drained_key("eu-west"))[1] is not None) == (command == "drain")
    # a region the fleet does not know (a typo) is refused, and nothing is written
    argv = rtm_argv("drain", "acl-probe", "--data-dir", str(fleet.data_dir))
    done = subprocess.run(argv, capture_output=True, text=True, timeout=CLI_TIMEOUT_S, check=False)
    assert done.returncode == 1 and "no region 'acl-probe'" in done.stderr
    assert admin.kv.get(drained_key("acl-probe"))[1] is None


async def test_no_secret_token_or_ticket_is_in_any_log_file(fleet: Fleet) -> None:
    """Each process's output goes to DATA_DIR/logs/ (rtmctl/log_file.py): after a user connected
    (a signed ticket in the websocket URL), posted, and a call with a wrong token was refused, no
    file there holds the fleet secret, the operator or a Consul token, a user's token or the ticket."""
    alice = await fleet.connect("alice")
    try:
        general = fleet.channel("general")
        assert (await fleet.api("chat.postMessage", alice.token, channel=general, text="log probe"))["ok"]
        await alice.wait_texts(["log probe"], general)
        assert (await fleet.api("auth.test", "xoxp-not-a-token"))["ok"] is False
    finally:
        await alice.close()
    secrets = [(fleet.data_dir / name).read_text().strip() for name in SECRET_FILES[:3]]
    secrets += list(role_tokens(fleet).values()) + [u["token"] for u in fleet.seed["users"]]
    ticket = alice.url.rpartition("/ws/")[2]  # wss://gateway/ws/TICKET
    assert ticket and all(secrets)
    logs = sorted((fleet.data_dir / "logs").glob("*.log*"))
    assert len(logs) >= 10
    for path in logs:
        text = path.read_text()
        for secret in [*secrets, ticket]:
            assert secret not in text, path
