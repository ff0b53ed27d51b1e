"""Trust inside the fleet, on the real fleet (``rtm up``): strangers get nothing,
each role is refused what it may not send, and the fleet keeps serving."""

from __future__ import annotations

import asyncio
import ssl
from typing import Any

import aiohttp
import pytest

from services import wire
from services.connection import PeerConnection, connect
from services.errors import PeerError
from services.tls import TLS_HANDSHAKE_BURST, WireTrust
from tests.support import DEFAULT_WAIT_S, async_wait_until
from tests.system.harness import Fleet
from tests.system.test_bad_input import error_count, still_delivers

INTERNAL_SERVICES = ("channel-server", "admin-server", "presence", "charm")
WAVE = 64  # connections opened at once in the handshake-rate test
MAX_WAVES = (TLS_HANDSHAKE_BURST + 40 * 10) // WAVE + 1  # the burst and 40 s of refill at 10/s


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
