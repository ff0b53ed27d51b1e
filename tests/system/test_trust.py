"""Trust inside the fleet, on the real fleet (``rtm up``): strangers get nothing,
each role is refused what it may not send, and the fleet keeps serving."""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import json
import os
import ssl
import uuid
from pathlib import Path
from typing import Any

import aiohttp
import psutil
import pytest

from rtmctl.launcher import rtm_argv
from services import wire
from services.certs import FleetCertificates, issue, make_ca, write_private
from services.connection import PeerConnection, connect
from services.errors import PeerError
from services.identity import PeerIdentity
from services.ring import PRESENCE_RING_KEY
from services.tls import TLS_HANDSHAKE_BURST, WireTrust, client_context
from tests.support import DEFAULT_WAIT_S, async_wait_until
from tests.system.harness import Fleet, channel_ring, consul_client
from tests.system.test_bad_input import error_count, still_delivers

INTERNAL_SERVICES = ("channel-server", "admin-server", "presence", "charm")
WAVE = 64  # connections opened at once in the handshake-rate test
MAX_WAVES = (TLS_HANDSHAKE_BURST + 40 * 10) // WAVE + 1  # the burst and 40 s of refill at 10/s
MAX_TAIL_LINES = 200  # lines of an `rtm tail` read while waiting for one event


def internal_ports(fleet: Fleet) -> list[tuple[str, dict[str, Any], int]]:
    """(service, process, port) of every internal port: the msgpack servers and the webapp's internal listener."""
    ports = [(s, p, int(p["port"])) for s in INTERNAL_SERVICES for p in fleet.processes(s)]
    webapp = fleet.processes("webapp")[0]
    return [*ports, ("webapp", webapp, int(webapp["internal_port"]))]


async def hung_up(reader: asyncio.StreamReader) -> bytes:
    try:
        return await asyncio.wait_for(reader.read(), DEFAULT_WAIT_S)
    except (ConnectionResetError, ssl.SSLError):
        return b""


async def test_a_stranger_without_a_certificate_gets_nothing_on_any_internal_port(fleet: Fleet) -> None:
    no_cert = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    no_cert.check_hostname = False
    no_cert.verify_mode = ssl.CERT_NONE  # a stranger who does not care who answers
    general = fleet.channel("general")
    for service, proc, port in internal_ports(fleet):
        before = await error_count(proc, "auth")
        # Plaintext: a sub of a channel's whole history, as an unauthenticated stranger would try.
        reader, writer = await asyncio.open_connection(proc["host"], port)
        writer.write(wire.encode({"op": "sub", "id": 1, "gw": "gw-us-east-0", "chans": [[general, 0]]}))
        assert await hung_up(reader) == b"", f"{service} answered a plaintext stranger"
        writer.close()
        # TLS without a client certificate.
        reader, writer = await asyncio.open_connection(proc["host"], port, ssl=no_cert)
        writer.write(
            wire.encode({"op": "ping", "id": 1}) if service != "webapp" else b"GET /internal/ HTTP/1.1\r\n\r\n"
        )
        assert await hung_up(reader) == b"", f"{service} answered a stranger without a certificate"
        writer.close()

        async def counted(proc: dict[str, Any] = proc, before: float = before) -> bool:
            return await error_count(proc, "auth") >= before + 2

        await async_wait_until(counted, what=f"{service} counts both refusals")
    await still_delivers(fleet)


async def test_a_source_over_its_handshake_rate_is_cut_off_and_counted(fleet: Fleet) -> None:
    """A stranger (from 127.0.0.3) opens connections and never finishes a handshake: once it holds
    its burst, its next connection is closed at accept, before any TLS work, and counted as
    ``handshake_rate``; the fleet's own processes (127.0.0.1) are served as before."""
    stranger = ("127.0.0.3", 0)
    cs, webapp = fleet.processes("channel-server")[0], fleet.processes("webapp")[0]
    for proc, port in ((cs, int(cs["port"])), (webapp, int(webapp["internal_port"]))):
        before = await error_count(proc, "handshake_rate")
        held: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []

        async def counted(proc: dict[str, Any] = proc, before: float = before) -> bool:
            return await error_count(proc, "handshake_rate") >= before + 1

        try:
            # Waves of connections that never finish a handshake, each held open, until one is cut
            # off: more than the burst plus what the rate refills meanwhile (a loaded server accepts
            # slowly). Bounded: at most MAX_WAVES waves, then one bounded wait for the count.
            for _wave in range(MAX_WAVES):
                opened = await asyncio.gather(
                    *(asyncio.open_connection(proc["host"], port, local_addr=stranger) for _ in range(WAVE)),
                    return_exceptions=True,
                )
                held += [c for c in opened if not isinstance(c, BaseException)]
                if len(held) >= TLS_HANDSHAKE_BURST and await counted():
                    break
            else:
                await async_wait_until(counted, what=f"{proc['id']} counts connections over the handshake rate")
            # Nothing is ever answered: over the rate closed at once, the rest at the handshake timeout.
            assert await hung_up(held[-1][0]) == b""
        finally:
            for _, writer in held:
                writer.close()
    await still_delivers(fleet)


async def refused_op(fleet: Fleet, proc: dict[str, Any], trust: WireTrust, msg: dict[str, Any]) -> None:
    before = await error_count(proc, "forbidden")
    conn = await connect(proc["host"], int(proc["port"]), PeerConnection, trust=trust)
    try:
        with pytest.raises(PeerError) as refused:
            await conn.request(msg, DEFAULT_WAIT_S)
        assert refused.value.code == "forbidden", refused.value
        assert (await conn.request({"op": "ping"}, DEFAULT_WAIT_S))["op"] == "ok"  # still connected, may ping
    finally:
        conn.close()
    assert await error_count(proc, "forbidden") == before + 1


async def test_each_role_is_refused_what_it_may_not_send(fleet: Fleet) -> None:
    cs, ps = fleet.processes("channel-server")[0], fleet.processes("presence")[0]
    admin, charm = fleet.processes("admin-server")[0], fleet.processes("charm")[0]
    general = fleet.channel("general")
    webapp = fleet.trust("webapp", "webapp-0")
    gateway = fleet.trust("gateway", "gw-test-stranger")
    pub = {"op": "pub", "ch": general, "seq": 10**9, "json": b"{}", "t0": 0.0}
    await refused_op(fleet, cs, webapp, {"op": "sub", "gw": "webapp-0", "chans": [[general, 0]]})
    await refused_op(fleet, cs, webapp, pub)  # the webapp publishes through an admin server only
    await refused_op(fleet, cs, gateway, pub)  # a gateway publishes only transient events
    await refused_op(fleet, admin, gateway, pub)
    await refused_op(fleet, ps, webapp, {"op": "lease", "gw": "webapp-0", "epoch": 1})
    await refused_op(fleet, charm, gateway, {"op": "ring_add_slot", "ring": "channel"})
    await refused_op(fleet, charm, webapp, {"op": "ring_remove_slot", "ring": "channel", "slot": "cs-0"})
    await still_delivers(fleet)


async def test_a_gateway_certificate_cannot_claim_another_gateways_id(fleet: Fleet) -> None:
    cs, ps = fleet.processes("channel-server")[0], fleet.processes("presence")[0]
    real = fleet.processes("gateway")[0]["id"]
    impostor = fleet.trust("gateway", "gw-impostor")
    await refused_op(fleet, cs, impostor, {"op": "sub", "gw": real, "chans": [[fleet.channel("general"), 0]]})
    await refused_op(fleet, ps, impostor, {"op": "release", "gw": real})  # would drop its users' presence
    await still_delivers(fleet)  # the real gateway kept its stream


async def test_the_webapp_internal_endpoints_take_only_gateway_certificates(fleet: Fleet) -> None:
    proc = fleet.processes("webapp")[0]
    url = f"https://{proc['host']}:{proc['internal_port']}/internal/bootstrap"
    body = {"user": fleet.user("bob")["id"]}
    before = await error_count(proc, "forbidden")
    for service, status in (("admin-server", 403), ("gateway", 200)):
        connector = aiohttp.TCPConnector(ssl=fleet.trust(service, f"{service}-internal-test").client)
        async with aiohttp.ClientSession(connector=connector) as http:
            async with http.post(url, json=body) as resp:
                assert resp.status == status, service
                reply = await resp.json(content_type=None)
        assert reply["ok"] is (status == 200), reply
    assert await error_count(proc, "forbidden") == before + 1
    async with aiohttp.ClientSession() as http:  # the public port has no /internal/ at all
        async with http.post(f"{fleet.info['webapp_url']}/internal/bootstrap", json=body) as resp:
            assert resp.status == 404


# -- the audit of issue 12 (docs/trust.md, "Tests") ---------------------------------------------------------

# Every listening socket of the fleet, by service: which ports are its internal wire (mutual TLS, each
# tested with strangers above and below) and which are public by design (metrics and health, the Web
# API, the websockets, Consul's HTTP API under ACLs: tests/system/test_consul_acl.py).
INTERNAL_PORT_FIELDS = {
    "channel-server": ("port",),
    "admin-server": ("port",),
    "presence": ("port",),
    "charm": ("port",),
    "webapp": ("internal_port",),
}
PUBLIC_PORT_FIELDS = {
    "channel-server": ("metrics_port",),
    "admin-server": ("metrics_port",),
    "presence": ("metrics_port",),
    "charm": ("metrics_port",),
    "webapp": ("port",),  # the Web API, the browser client, /metrics and /healthz
    "gateway": ("port", "metrics_port"),  # the websockets; /metrics and /healthz
    "consul-dev": ("port",),  # Consul's HTTP API, ACLs with default deny
}
STRANGER_SOURCE = "127.0.0.5"  # the certificate tests' own source address: their log lines are told apart


def listening(pid: int, children: bool = True) -> set[tuple[str, int]]:
    """(address, port) of every TCP socket ``pid`` (and, with ``children``, any child of it) listens on."""
    root = psutil.Process(pid)
    found: set[tuple[str, int]] = set()
    for proc in (root, *(root.children(recursive=True) if children else ())):
        for conn in proc.net_connections(kind="inet"):
            if conn.status == psutil.CONN_LISTEN:
                found.add((conn.laddr.ip, conn.laddr.port))
    return found


def test_every_listening_port_is_the_internal_wire_or_public_by_design(fleet: Fleet) -> None:
    """No process listens on a port the stranger tests do not know of, nor off loopback; and the
    internal ports are exactly the ones :func:`internal_ports` hands those tests."""
    internal: set[int] = set()
    for proc in fleet.processes():
        service = proc["service"]
        assert service in PUBLIC_PORT_FIELDS, f"a process of an unknown service: {proc}"
        fields = INTERNAL_PORT_FIELDS.get(service, ()) + PUBLIC_PORT_FIELDS[service]
        expected = {int(proc[f]) for f in fields}
        sockets = listening(int(proc["pid"]))
        assert {port for _, port in sockets} == expected, (proc["name"], sockets, fields)
        assert all(ipaddress.ip_address(address).is_loopback for address, _ in sockets), (proc["name"], sockets)
        internal |= {int(proc[f]) for f in INTERNAL_PORT_FIELDS.get(service, ())}
    assert listening(fleet.proc.pid, children=False) == set(), "rtm up itself listens on nothing"
    assert {port for _, _, port in internal_ports(fleet)} == internal


async def test_the_public_ports_expose_metrics_and_health_only_and_no_secret(fleet: Fleet) -> None:
    """What the public-by-design ports give a stranger: ``/metrics`` and ``/healthz`` (counters,
    ring versions, instance ids), never a secret or a token; the ``--debug-faults`` endpoint does
    not exist without the flag (``rtm up`` does not give it)."""
    secrets = [(fleet.data_dir / name).read_text().strip() for name in ("secret", "consul-acl-token")]
    secrets += [(fleet.data_dir / "operator-token").read_text().strip()]
    secrets += [user["token"] for user in fleet.seed["users"]]
    tls_keys = [path.read_text() for path in (fleet.data_dir / "tls").glob("*.key")]
    async with aiohttp.ClientSession() as http:
        for proc in fleet.processes():
            if proc["service"] == "consul-dev":
                base = fleet.info["consul_url"]
            else:
                base = f"http://{proc['host']}:{proc['metrics_port']}"
            for path in ("/metrics", "/healthz"):
                async with http.get(base + path) as resp:
                    assert resp.status == 200, (proc["name"], path)
                    body = await resp.text()
                leaked = [s[:6] for s in secrets if s and s in body]
                assert not leaked and "PRIVATE KEY" not in body, (proc["name"], path, leaked)
                assert not any(key.strip() and key.strip() in body for key in tls_keys)
            if proc["service"] in ("channel-server", "presence"):  # where --debug-faults would serve it
                async with http.post(base + "/debug/consul-partition", params={"on": "1"}) as resp:
                    assert resp.status == 404, proc["name"]  # absent without --debug-faults


def refusal_log_lines(fleet: Fleet, source: str) -> dict[str, int]:
    """How many ``refused`` lines each process logged for ``source`` (fleet.log: ``[rtm-up] [name] ...``)."""
    counts: dict[str, int] = {}
    for line in (fleet.data_dir / "fleet.log").read_text(errors="replace").splitlines():
        if f"refused ('{source}'" in line:
            name = line.split("] [", 1)[1].split("]", 1)[0] if "] [" in line else "?"
            counts[name] = counts.get(name, 0) + 1
    return counts


async def test_other_ca_expired_and_uncertified_peers_are_refused_everywhere_and_logged_once(
    fleet: Fleet, tmp_path: Path
) -> None:
    """On every internal port of the real fleet, from one source: a certificate of another CA (what a
    certificate of a CA retired by rotation is to the fleet), an expired certificate of the fleet's
    own CA, and no certificate at all. Each gets no byte and a closed connection, each is counted
    once in that process's ``rtm_errors_total{kind="auth"}``, and each process logs the source once
    (the minute's other refusals are not logged); the fleet keeps serving."""
    now = datetime.datetime.now(datetime.UTC)
    other = issue(make_ca(now), PeerIdentity("gateway", "gw-us-east-0"), now)  # a real gateway's name
    expired = issue(
        FleetCertificates(fleet.data_dir / "tls").ensure_ca(),
        PeerIdentity("gateway", "gw-us-east-0"),
        now - datetime.timedelta(days=30),
        valid_days=1,
    )
    fleet_ca = fleet.data_dir / "tls" / "ca.crt"
    contexts: list[tuple[str, ssl.SSLContext]] = []
    for name, issued in (("other-ca", other), ("expired", expired)):
        write_private(tmp_path / f"{name}.crt", issued.cert_pem)
        write_private(tmp_path / f"{name}.key", issued.key_pem)
        contexts.append((name, client_context(fleet_ca, tmp_path / f"{name}.crt", tmp_path / f"{name}.key")))
    no_cert = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    no_cert.check_hostname = False
    no_cert.load_verify_locations(fleet_ca)
    contexts.append(("no certificate", no_cert))
    general = fleet.channel("general")
    for service, proc, port in internal_ports(fleet):
        before = await error_count(proc, "auth")
        for what, context in contexts:
            reader, writer = await asyncio.open_connection(
                proc["host"], port, ssl=context, local_addr=(STRANGER_SOURCE, 0)
            )
            ask = wire.encode({"op": "sub", "id": 1, "gw": "gw-us-east-0", "chans": [[general, 0]]})
            writer.write(ask if service != "webapp" else b"POST /internal/history HTTP/1.1\r\n\r\n")
            assert await hung_up(reader) == b"", f"{service} answered a peer with {what}"
            writer.close()

        async def counted(proc: dict[str, Any] = proc, before: float = before) -> bool:
            return await error_count(proc, "auth") >= before + len(contexts)

        await async_wait_until(counted, what=f"{service} counts each refusal")
        assert await error_count(proc, "auth") == before + len(contexts), service
    names = {proc["name"] for _, proc, _ in internal_ports(fleet)}

    async def logged() -> bool:
        return set(refusal_log_lines(fleet, STRANGER_SOURCE)) >= names

    await async_wait_until(logged, what="every process logs the stranger")
    await still_delivers(fleet)  # time for any further line to reach the log
    lines = refusal_log_lines(fleet, STRANGER_SOURCE)
    assert all(lines[name] == 1 for name in names), lines


# Who may send what (docs/trust.md, DESIGN.md "Trust"), written out here rather than read from
# services.authz, so that the running fleet is checked against the documents, not against itself.
ROLES = ("webapp", "admin-server", "channel-server", "gateway", "presence", "charm", "operator")
MAY_SEND = {
    "channel-server": {"pub": {"admin-server"}, "pubs": {"admin-server"}, "sub": {"gateway"}},
    "admin-server": {"pub": {"webapp"}, "pubs": {"webapp"}},
    "presence": {"lease": {"gateway"}, "release": {"gateway"}, "query": {"gateway"}},
    "charm": {"ring_add_slot": {"operator"}, "ring_remove_slot": {"operator"}},
}
MAY_SEND["channel-server"] |= {"unsub": {"gateway"}, "seqs": {"gateway"}}
MAY_SEND["presence"] |= {"get_presence": {"webapp"}, "set_presence": {"webapp"}}
MAY_SEND["presence"] |= {op: {"gateway"} for op in ("online", "offline", "psub", "punsub", "synced")}
PRESENCE_PUSHES = frozenset({"online", "offline", "psub", "punsub", "synced"})


def op_message(op: str, gw: str, channel: str, user: str) -> dict[str, Any]:
    """A well-formed ``op`` as its rightful sender would send it (``gw``: the sender's own id)."""
    pub = {"ch": channel, "seq": 10**9, "json": b'{"type":"message","text":"forged"}', "t0": 0.0}
    return {
        "pub": {"op": "pub", **pub},
        "pubs": {"op": "pubs", "evs": [pub]},
        "sub": {"op": "sub", "gw": gw, "chans": [[channel, 0]]},
        "unsub": {"op": "unsub", "gw": gw, "chans": [channel]},
        "seqs": {"op": "seqs", "gw": gw, "chans": [channel]},
        "lease": {"op": "lease", "gw": gw, "epoch": 1},
        "release": {"op": "release", "gw": gw},
        "query": {"op": "query", "users": [user]},
        "get_presence": {"op": "get_presence", "user": user},
        "set_presence": {"op": "set_presence", "users": [[user, "away"]]},
        "synced": {"op": "synced", "gw": gw, "epoch": 1},
        "ring_add_slot": {"op": "ring_add_slot", "ring": "channel"},
        "ring_remove_slot": {"op": "ring_remove_slot", "ring": "channel", "slot": "cs-0"},
    }.get(op) or {"op": op, "gw": gw, "users": [user], "epoch": 1}  # online, offline, psub, punsub


async def send_refused(conn: PeerConnection, msg: dict[str, Any]) -> None:
    """Send ``msg``: a request must be answered ``forbidden``; a push has no answer (a ping after it
    on the same connection is answered once the push was handled: the count can be read then)."""
    if msg["op"] in PRESENCE_PUSHES:
        conn.send(msg)
    else:
        with pytest.raises(PeerError) as refused:
            await conn.request(msg, DEFAULT_WAIT_S)
        assert refused.value.code == "forbidden", (msg["op"], refused.value)
    assert (await conn.request({"op": "ping"}, DEFAULT_WAIT_S))["op"] == "ok"


async def health(proc: dict[str, Any]) -> dict[str, Any]:
    async with aiohttp.ClientSession() as http:
        async with http.get(f"http://{proc['host']}:{proc['metrics_port']}/healthz") as resp:
            return dict(await resp.json())


async def test_every_role_is_refused_every_op_it_may_not_send_on_every_server(fleet: Fleet) -> None:
    """Each of the seven roles, with a valid certificate of the fleet's CA, sends each server every op
    that server serves and the role may not send (under its own id, so the role is the only reason):
    each is answered ``forbidden`` (a push dropped), counted once, the connection stays usable, and
    nothing changes: no gateway or lease is registered under the sender, the rings keep their
    versions, no forged event reaches a client."""
    general, bob = fleet.channel("general"), fleet.user("bob")["id"]
    rings_before = [channel_ring(fleet).version, consul_client(fleet).kv.get(PRESENCE_RING_KEY)[1]["ModifyIndex"]]
    client = await fleet.connect("bob")
    for service, served in MAY_SEND.items():
        proc = fleet.processes(service)[0]
        forbidden_before = await error_count(proc, "forbidden")
        health_before = await health(proc)
        sent = 0
        for role in ROLES:
            instance = f"audit-{role}"
            conn = await connect(proc["host"], int(proc["port"]), PeerConnection, trust=fleet.trust(role, instance))
            try:
                for op, senders in served.items():
                    if role not in senders:
                        await send_refused(conn, op_message(op, instance, general, bob))
                        sent += 1
            finally:
                conn.close()
        assert await error_count(proc, "forbidden") == forbidden_before + sent, service
        after = await health(proc)
        for field in ("gateways", "leases", "ring_version"):
            assert after.get(field) == health_before.get(field), (service, field, health_before, after)
    assert rings_before == [
        channel_ring(fleet).version,
        consul_client(fleet).kv.get(PRESENCE_RING_KEY)[1]["ModifyIndex"],
    ]
    await still_delivers(fleet)
    assert not any("forged" in str(e.get("text", "")) for e in client.events), client.events
    await client.close()


async def test_a_gateway_certificate_cannot_act_for_another_gateway_with_any_op(fleet: Fleet) -> None:
    """Every op that names a gateway (``gw``), at the channel server and the presence server, sent
    under another gateway's valid certificate naming a real gateway: refused, counted, and the real
    gateway keeps its stream and its presence lease."""
    cs, ps = fleet.processes("channel-server")[0], fleet.processes("presence")[0]
    real = fleet.processes("gateway")[0]["id"]
    general, bob = fleet.channel("general"), fleet.user("bob")["id"]
    impostor = fleet.trust("gateway", "gw-audit-impostor")
    for proc, ops in (
        (cs, ("sub", "unsub", "seqs")),
        (ps, ("lease", "release", "online", "offline", "psub", "punsub", "synced")),
    ):
        before, health_before = await error_count(proc, "forbidden"), await health(proc)
        conn = await connect(proc["host"], int(proc["port"]), PeerConnection, trust=impostor)
        try:
            for op in ops:
                await send_refused(conn, op_message(op, real, general, bob))
        finally:
            conn.close()
        assert await error_count(proc, "forbidden") == before + len(ops), proc["name"]
        after = await health(proc)
        assert (after["gateways"], after.get("leases")) == (health_before["gateways"], health_before.get("leases"))
    await still_delivers(fleet)  # the real gateway kept its stream


async def test_the_readmes_commands_need_nothing_more_typed(fleet: Fleet, tmp_path: Path) -> None:
    """README: ``rtm tail bob`` and ``rtm post alice general "hello"``, run where ``rtm up`` keeps its
    data (``./.rtm``), with no flag, token or certificate given, against the fleet as it runs; then
    ``rtm users add frank --join general`` and ``rtm post frank general ...``, seen by bob's tail;
    then ``rtm top`` shows every process working."""
    (tmp_path / ".rtm").symlink_to(fleet.data_dir)
    env = {k: v for k, v in os.environ.items() if not k.startswith("RTM_") and not k.startswith("CONSUL_")}
    text = f"readme-{uuid.uuid4().hex[:8]}"
    tail = await asyncio.create_subprocess_exec(
        *rtm_argv("tail", "bob"),
        cwd=tmp_path,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    try:
        assert tail.stdout is not None
        first = await asyncio.wait_for(tail.stdout.readline(), DEFAULT_WAIT_S)
        assert first.startswith(b"connected as bob"), first
        post = await asyncio.create_subprocess_exec(
            *rtm_argv("post", "alice", "general", text), cwd=tmp_path, env=env, stdout=asyncio.subprocess.PIPE
        )
        out, _ = await asyncio.wait_for(post.communicate(), DEFAULT_WAIT_S)
        assert post.returncode == 0 and b"posted to #general as alice" in out, out
        await read_until(tail.stdout, text.encode())
        # README, "your own people and apps": a person added while the fleet runs joins #general through
        # the Web API (bob's connection is told), and posts there at once under their own name
        add = await asyncio.create_subprocess_exec(
            *rtm_argv("users", "add", "frank", "--join", "general"),
            cwd=tmp_path,
            env=env,
            stdout=asyncio.subprocess.PIPE,
        )
        out, _ = await asyncio.wait_for(add.communicate(), DEFAULT_WAIT_S)
        assert add.returncode == 0, out
        frank = json.loads(out)
        joined = await read_until(tail.stdout, b"member_joined_channel")
        # the author column: frank's id, or his name once his team_join (announced within a second) is in
        named = (frank["id"].encode(), b"frank")
        assert joined.split()[1] == b"#general" and joined.split()[2] in named, joined
        post = await asyncio.create_subprocess_exec(
            *rtm_argv("post", "frank", "general", text + "-frank"),
            cwd=tmp_path,
            env=env,
            stdout=asyncio.subprocess.PIPE,
        )
        out, _ = await asyncio.wait_for(post.communicate(), DEFAULT_WAIT_S)
        assert post.returncode == 0 and b"posted to #general as frank" in out, out
        line = await read_until(tail.stdout, (text + "-frank").encode())
        assert line.split()[2] in named, line
        await assert_rtm_top_shows_the_fleet(fleet, tmp_path, env)
    finally:
        tail.terminate()
        await asyncio.wait_for(tail.wait(), DEFAULT_WAIT_S)


async def assert_rtm_top_shows_the_fleet(fleet: Fleet, cwd: Path, env: dict[str, str]) -> None:
    """README: ``rtm top --count 2``: two tables (into a pipe: a blank line between), each with a row
    per process of fleet.json, every one up; on the second, CPU % and the rates are numbers."""
    top = await asyncio.create_subprocess_exec(
        *rtm_argv("top", "--count", "2", "--interval-s", "0.5"),
        cwd=cwd,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(top.communicate(), DEFAULT_WAIT_S)
    assert top.returncode == 0 and not err, (out, err)
    fleet.reload()
    names = {p["name"]: p for p in fleet.processes()}
    tables = out.decode().split("\n\n")
    assert len(tables) == 2, out
    for table in tables:
        rows = {line.split()[0]: line.split() for line in table.splitlines()[2:]}
        assert set(rows) == {*names, "total"}, table
        for name, proc in names.items():
            assert rows[name][1:4] == [proc["service"], str(proc["pid"]), "up"], table
        assert rows["total"][1:3] == [f"{len(names)}/{len(names)}", "up"], table
    second = {line.split()[0]: line.split() for line in tables[1].splitlines()[2:]}
    for name in names:
        cpu, rss, fds, errors = (float(v) for v in second[name][4:8])  # numbers, not "-"
        assert cpu >= 0 and rss > 0 and fds > 0 and errors >= 0, second[name]
    assert second["webapp"][8] == "posts/s" and float(second["webapp"][9]) >= 0, second["webapp"]


async def read_until(stream: asyncio.StreamReader, wanted: bytes, max_lines: int = MAX_TAIL_LINES) -> bytes:
    """The first line of ``stream`` that holds ``wanted`` (each read with its own timeout, at most
    ``max_lines`` lines)."""
    seen: list[bytes] = []
    for _ in range(max_lines):
        seen.append(await asyncio.wait_for(stream.readline(), DEFAULT_WAIT_S))
        assert seen[-1], seen  # the tail ended
        if wanted in seen[-1]:
            return seen[-1]
    raise AssertionError(f"no line with {wanted!r} in {seen}")
