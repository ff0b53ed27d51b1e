"""Mutual TLS on the msgpack wire, over real localhost sockets: who gets in, who does not.

Each refused peer gets no reply and a closed connection, and the server
counts it (``on_refused``) and keeps serving its fleet peers.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime
import ssl
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from services import wire
from services.certs import FleetCertificates, issue, make_ca, write_private
from services.connection import READ_BUFFER_BYTES, PeerConnection, PeerLink, connect, serve
from services.errors import HandshakeRateLimited, NotTrusted
from services.identity import CHANNEL_SERVER, GATEWAY, PeerIdentity
from services.tls import WireTrust, client_context
from tests.support import DEFAULT_WAIT_S, FleetCA

HOST = "127.0.0.1"


class Server:
    """A channel-server-like endpoint that answers ``ping`` with the caller's identity."""

    def __init__(self, trust: WireTrust, handshake_timeout_s: float | None = None, **limits: Any) -> None:
        if handshake_timeout_s is not None or limits:
            trust = dataclasses.replace(
                trust, handshake_timeout_s=handshake_timeout_s or trust.handshake_timeout_s, **limits
            )
        self.trust = trust
        self.refused: asyncio.Queue[tuple[str, BaseException]] = asyncio.Queue()
        self.requests: list[dict[str, Any]] = []
        self.server: asyncio.Server | None = None
        self.port = 0

    def handle(self, conn: PeerConnection, msg: dict[str, Any]) -> dict[str, Any]:
        self.requests.append(msg)
        return wire.reply_ok(msg["id"], you=str(conn.identity))

    async def start(self) -> Server:
        self.server = await serve(
            HOST,
            0,
            lambda: PeerConnection(name="server", on_request=self.handle),
            trust=self.trust,
            on_refused=lambda source, exc: self.refused.put_nowait((source, exc)),
        )
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def stop(self) -> None:
        assert self.server is not None
        self.server.close()


@pytest.fixture(params=["asyncio", "uvloop"])
def event_loop_policy(request: pytest.FixtureRequest) -> asyncio.AbstractEventLoopPolicy:
    """Every test here runs on both loops: the fleet's processes run on uvloop (and its
    TLS protocol on both sides, services/connection.py), the tests' own default is asyncio."""
    if request.param == "uvloop":
        uvloop = pytest.importorskip("uvloop")
        return uvloop.EventLoopPolicy()  # type: ignore[no-any-return]
    return asyncio.DefaultEventLoopPolicy()


@pytest.fixture
async def server(fleet_ca: FleetCA) -> AsyncIterator[Server]:
    srv = await Server(fleet_ca.trust(CHANNEL_SERVER, "cs-1")).start()
    yield srv
    await srv.stop()


async def assert_fleet_peer_served(fleet_ca: FleetCA, server: Server) -> None:
    conn = await connect(HOST, server.port, PeerConnection, trust=fleet_ca.trust(GATEWAY, "gw-1"))
    try:
        assert (await conn.request({"op": "ping"}))["you"] == "gateway/gw-1"
    finally:
        conn.close()


async def assert_refused(server: Server, reader: asyncio.StreamReader, source_ip: str = HOST) -> BaseException:
    try:
        assert await asyncio.wait_for(reader.read(), DEFAULT_WAIT_S) == b""  # closed, nothing answered
    except (ConnectionResetError, ssl.SSLError):
        pass
    source, exc = await asyncio.wait_for(server.refused.get(), DEFAULT_WAIT_S)
    assert source == source_ip
    assert server.requests == []
    return exc


async def test_both_sides_see_the_others_identity(fleet_ca: FleetCA, server: Server) -> None:
    conn = await connect(
        HOST, server.port, PeerConnection, trust=fleet_ca.trust(GATEWAY, "gw-1"), expect=CHANNEL_SERVER
    )
    try:
        assert conn.identity == PeerIdentity(CHANNEL_SERVER, "cs-1")
        assert (await conn.request({"op": "ping"}))["you"] == "gateway/gw-1"
    finally:
        conn.close()


async def test_a_plaintext_stranger_gets_nothing(fleet_ca: FleetCA, server: Server) -> None:
    reader, writer = await asyncio.open_connection(HOST, server.port)
    writer.write(wire.encode({"op": "sub", "id": 1, "gw": "gw-1", "chans": [["C1", 0]]}))
    exc = await assert_refused(server, reader)
    assert isinstance(exc, ssl.SSLError)
    writer.close()
    await assert_fleet_peer_served(fleet_ca, server)


async def tls_stranger(server: Server, ca: Path, cert: Path, key: Path) -> tuple[Any, Any]:
    """Dial with a client that trusts the server but presents ``cert``."""
    ctx = client_context(ca, cert, key)
    return await asyncio.open_connection(HOST, server.port, ssl=ctx)


def write_pair(tmp: Path, name: str, cert_pem: bytes, key_pem: bytes) -> tuple[Path, Path]:
    write_private(tmp / f"{name}.crt", cert_pem)
    write_private(tmp / f"{name}.key", key_pem)
    return tmp / f"{name}.crt", tmp / f"{name}.key"


async def test_no_client_certificate_is_refused(fleet_ca: FleetCA, server: Server) -> None:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.load_verify_locations(fleet_ca.certs.ca_path)
    reader, writer = await asyncio.open_connection(HOST, server.port, ssl=ctx)
    writer.write(wire.encode({"op": "ping", "id": 1}))
    await assert_refused(server, reader)
    writer.close()
    await assert_fleet_peer_served(fleet_ca, server)


async def test_a_certificate_of_another_ca_is_refused(fleet_ca: FleetCA, server: Server, tmp_path: Path) -> None:
    now = datetime.datetime.now(datetime.UTC)
    other = issue(make_ca(now), PeerIdentity(GATEWAY, "gw-1"), now)  # same name, wrong CA
    cert, key = write_pair(tmp_path, "other", other.cert_pem, other.key_pem)
    reader, writer = await tls_stranger(server, fleet_ca.certs.ca_path, cert, key)
    writer.write(wire.encode({"op": "ping", "id": 1}))
    exc = await assert_refused(server, reader)
    assert "certificate" in str(exc).lower()
    writer.close()
    await assert_fleet_peer_served(fleet_ca, server)


async def test_an_expired_certificate_is_refused(fleet_ca: FleetCA, server: Server, tmp_path: Path) -> None:
    ca = fleet_ca.certs.ensure_ca()
    long_ago = datetime.datetime.now(datetime.UTC) - datetime.timedelta(days=30)
    expired = issue(ca, PeerIdentity(GATEWAY, "gw-1"), long_ago, valid_days=1)
    cert, key = write_pair(tmp_path, "expired", expired.cert_pem, expired.key_pem)
    reader, writer = await tls_stranger(server, fleet_ca.certs.ca_path, cert, key)
    writer.write(wire.encode({"op": "ping", "id": 1}))
    exc = await assert_refused(server, reader)
    assert "expired" in str(exc).lower()
    writer.close()


async def test_a_certificate_from_before_a_ca_rotation_is_refused(tmp_path: Path) -> None:
    certs = FleetCertificates(tmp_path / "tls")
    old = certs.ensure("gw-1", PeerIdentity(GATEWAY, "gw-1"))
    old_dir = tmp_path / "old"
    old_dir.mkdir()
    old_cert, old_key = write_pair(old_dir, "gw-1", old.cert.read_bytes(), old.key.read_bytes())
    old_ca, _ = write_pair(old_dir, "ca", certs.ca_path.read_bytes(), b"")
    certs.ensure("cs-1", PeerIdentity(CHANNEL_SERVER, "cs-1"))
    certs.rotate()
    new = certs.paths("cs-1")
    server = await Server(WireTrust.load(new.ca, new.cert, new.key)).start()
    try:
        # The old gateway certificate, presented to a server that loaded the rotated CA.
        reader, writer = await tls_stranger(server, new.ca, old_cert, old_key)
        writer.write(wire.encode({"op": "ping", "id": 1}))
        await assert_refused(server, reader)
        writer.close()
        # And a process still on the old CA does not accept the new server either.
        with pytest.raises(ssl.SSLError):
            await connect(HOST, server.port, PeerConnection, trust=WireTrust.load(old_ca, old_cert, old_key))
        rotated = certs.paths("gw-1")
        conn = await connect(
            HOST, server.port, PeerConnection, trust=WireTrust.load(rotated.ca, rotated.cert, rotated.key)
        )
        assert (await conn.request({"op": "ping"}))["you"] == "gateway/gw-1"
        conn.close()
    finally:
        await server.stop()


def snapshot(certs: FleetCertificates, name: str, into: Path) -> WireTrust:
    """What a process named ``name`` loads when it (re)starts now: a copy of its files, so
    later steps of the rotation do not change what it runs with (as a running process)."""
    into.mkdir(parents=True, exist_ok=True)
    paths = certs.paths(name)
    ca, _ = write_pair(into, "ca", paths.ca.read_bytes(), b"")
    cert, key = write_pair(into, name, paths.cert.read_bytes(), paths.key.read_bytes())
    return WireTrust.load(ca, cert, key)


async def test_a_two_ca_rotation_rolls_without_refusals_then_refuses_the_retired_ca(tmp_path: Path) -> None:
    """``rtm certs rotate`` three times, each followed by a rolling restart: at every moment of every
    roll the channel server and the gateway (each restarted in turn, the other still running
    with the files it started with) accept each other; after the last, a certificate of the
    retired CA is refused and the retired CA's server is refused by the rolled gateway."""
    certs = FleetCertificates(tmp_path / "tls")
    certs.ensure("cs-1", PeerIdentity(CHANNEL_SERVER, "cs-1"))
    certs.ensure("gw-1", PeerIdentity(GATEWAY, "gw-1"))
    running = {name: snapshot(certs, name, tmp_path / "run-0" / name) for name in ("cs-1", "gw-1")}
    retired = dict(running)  # the processes as they ran under the old CA alone

    async def pair_works(server_trust: WireTrust, client_trust: WireTrust) -> None:
        server = await Server(server_trust).start()
        try:
            conn = await connect(HOST, server.port, PeerConnection, trust=client_trust, expect=CHANNEL_SERVER)
            assert (await conn.request({"op": "ping"}))["you"] == "gateway/gw-1"
            conn.close()
        finally:
            await server.stop()

    phases = []
    for step in range(3):
        phase, _ = certs.rotation_step()
        phases.append(phase)
        order = ("cs-1", "gw-1") if step % 2 == 0 else ("gw-1", "cs-1")
        for name in order:  # a rolling restart: one process at a time, checked after each
            running[name] = snapshot(certs, name, tmp_path / f"run-{step + 1}" / name)
            await pair_works(running["cs-1"], running["gw-1"])
    assert phases == ["trusting-both", "reissued", "steady"]
    assert len(certs.trusted_cas()) == 1

    server = await Server(running["cs-1"]).start()
    try:  # the retired CA's gateway certificate, presented to the rolled server: refused
        old_gw = tmp_path / "run-0" / "gw-1"
        reader, writer = await tls_stranger(server, certs.ca_path, old_gw / "gw-1.crt", old_gw / "gw-1.key")
        writer.write(wire.encode({"op": "ping", "id": 1}))
        assert "certificate" in str(await assert_refused(server, reader)).lower()
        writer.close()
    finally:
        await server.stop()
    old_server = await Server(retired["cs-1"]).start()
    try:  # and the rolled gateway does not accept a server that still holds a retired-CA certificate
        with pytest.raises(ssl.SSLError):
            await connect(HOST, old_server.port, PeerConnection, trust=running["gw-1"])
    finally:
        await old_server.stop()


async def test_a_ca_signed_certificate_without_a_fleet_identity_is_refused(
    fleet_ca: FleetCA, server: Server, tmp_path: Path
) -> None:
    ca = fleet_ca.certs.ensure_ca()
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    ca_cert = x509.load_pem_x509_certificate(ca.cert_pem)
    ca_key = serialization.load_pem_private_key(ca.key_pem, None)
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "no identity")]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .sign(ca_key, hashes.SHA256())  # type: ignore[arg-type]
    )
    pem_key = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    cert_path, key_path = write_pair(tmp_path, "anon", cert.public_bytes(serialization.Encoding.PEM), pem_key)
    reader, writer = await tls_stranger(server, fleet_ca.certs.ca_path, cert_path, key_path)
    writer.write(wire.encode({"op": "ping", "id": 1}))
    exc = await assert_refused(server, reader)
    assert "URI SAN" in str(exc)
    writer.close()


async def test_a_handshake_that_never_finishes_is_closed(fleet_ca: FleetCA) -> None:
    server = await Server(fleet_ca.trust(CHANNEL_SERVER, "cs-1"), handshake_timeout_s=0.3).start()
    try:
        reader, writer = await asyncio.open_connection(HOST, server.port)  # connects, never says hello
        exc = await assert_refused(server, reader)
        assert isinstance(exc, ConnectionError | TimeoutError)
        writer.close()
    finally:
        await server.stop()


async def test_a_source_over_its_handshake_rate_is_closed_before_any_tls_work(fleet_ca: FleetCA) -> None:
    """A stranger (from 127.0.0.2) spends its burst of handshakes, then is cut off at accept;
    fleet peers from another address are served meanwhile, and their handshakes are given back."""
    server = await Server(fleet_ca.trust(CHANNEL_SERVER, "cs-1"), handshake_rate_per_s=0.001, handshake_burst=3).start()
    stranger_ip = "127.0.0.2"
    stranger = (stranger_ip, 0)
    try:
        for _ in range(3):  # the burst: each gets a real handshake, fails it (plaintext), is refused as auth
            reader, writer = await asyncio.open_connection(HOST, server.port, local_addr=stranger)
            writer.write(b"not a ClientHello")
            assert isinstance(await assert_refused(server, reader, stranger_ip), ssl.SSLError)
            writer.close()
        for _ in range(2):  # past it: closed at accept, no handshake, reported as such
            reader, writer = await asyncio.open_connection(HOST, server.port, local_addr=stranger)
            exc = await assert_refused(server, reader, stranger_ip)
            assert isinstance(exc, HandshakeRateLimited)
            writer.close()
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # even a real TLS client from there gets no handshake
        ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
        with pytest.raises((ConnectionError, ssl.SSLError)):
            await asyncio.wait_for(
                asyncio.open_connection(HOST, server.port, ssl=ctx, local_addr=stranger), DEFAULT_WAIT_S
            )
        assert isinstance((await asyncio.wait_for(server.refused.get(), DEFAULT_WAIT_S))[1], HandshakeRateLimited)
        for _ in range(5):  # a fleet peer (127.0.0.1) dials more often than the burst: all served
            await assert_fleet_peer_served(fleet_ca, server)
        assert server.refused.empty()
    finally:
        await server.stop()


async def test_a_client_refuses_a_server_of_the_wrong_service(fleet_ca: FleetCA, server: Server) -> None:
    with pytest.raises(NotTrusted):
        await connect(HOST, server.port, PeerConnection, trust=fleet_ca.trust(GATEWAY, "gw-1"), expect="presence")


async def test_a_peer_link_dials_with_tls(fleet_ca: FleetCA, server: Server) -> None:
    link = PeerLink(
        "gw->cs",
        address=lambda: (HOST, server.port),
        factory=PeerConnection,
        trust=fleet_ca.trust(GATEWAY, "gw-1"),
        expect=CHANNEL_SERVER,
    )
    link.start()
    try:
        assert (await link.request({"op": "ping"}, DEFAULT_WAIT_S))["you"] == "gateway/gw-1"
    finally:
        await link.close()


async def test_the_wire_works_on_uvloop_too(fleet_ca: FleetCA) -> None:
    uvloop = pytest.importorskip("uvloop")

    async def run() -> str:
        server = await Server(fleet_ca.trust(CHANNEL_SERVER, "cs-1")).start()
        try:
            conn = await connect(HOST, server.port, PeerConnection, trust=fleet_ca.trust(GATEWAY, "gw-1"))
            reply = await conn.request({"op": "ping"})
            server.requests.clear()
            reader, writer = await asyncio.open_connection(HOST, server.port)
            writer.write(b"garbage")
            await assert_refused(server, reader)
            writer.close()
            conn.close()
            return str(reply["you"])
        finally:
            await server.stop()

    loop = uvloop.new_event_loop()
    try:
        assert await asyncio.to_thread(loop.run_until_complete, run()) == "gateway/gw-1"
    finally:
        loop.close()


class _ReadRecorder(PeerConnection):
    """A server connection that records what type of data each read handed it."""

    seen: list[type] = []

    def data_received(self, data: bytes | memoryview) -> None:
        _ReadRecorder.seen.append(type(data))
        super().data_received(data)


async def test_tls_reads_land_in_the_connections_own_buffer_whole_and_in_order(fleet_ca: FleetCA) -> None:
    """The loop's TLS layer decrypts into the connection's reused buffer (a buffered protocol: no
    256 KiB allocation per record, docs/trust.md), and frames of every size, one bigger than the
    buffer among them, arrive whole and in order."""
    _ReadRecorder.seen = []
    got: list[int] = []

    def handle(conn: PeerConnection, msg: dict[str, Any]) -> dict[str, Any]:
        got.append(len(msg["blob"]))
        return wire.reply_ok(msg["id"], n=len(msg["blob"]))

    server = await serve(
        HOST,
        0,
        lambda: _ReadRecorder(name="server", on_request=handle),
        trust=fleet_ca.trust(CHANNEL_SERVER, "cs-1"),
    )
    conn = await connect(
        HOST, server.sockets[0].getsockname()[1], PeerConnection, trust=fleet_ca.trust(GATEWAY, "gw-1")
    )
    sizes = [0, 1, 100, 16_000, 16_384, 70_000, READ_BUFFER_BYTES + 12_345, 5] * 3
    try:
        replies = await asyncio.gather(*(conn.request({"op": "ping", "blob": b"x" * n}, DEFAULT_WAIT_S) for n in sizes))
    finally:
        conn.close()
        server.close()
    assert [r["n"] for r in replies] == sizes
    assert got == sizes
    assert _ReadRecorder.seen and set(_ReadRecorder.seen) == {memoryview}
