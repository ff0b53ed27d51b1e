"""Mutual TLS on the fleet's msgpack wire: contexts, identities, refusals.

A :class:`WireTrust` is what one process needs to speak on the wire: its own
certificate and key, the fleet CA it trusts, and the handshake deadline. It
builds two ``ssl.SSLContext``s, both TLS 1.3 only and both requiring the
peer's certificate (mutual TLS):

* the server context accepts a client only with a certificate the fleet CA
  signed, that is valid now, and that names a fleet identity;
* the client context checks the same of the server. Host names are not
  checked: a fleet certificate names a workload (``spiffe://rtm/<service>/
  <instance>``), not a host; :func:`services.connection.connect` checks the
  server's identity (its service) instead.

``--wire-tls off`` gives :meth:`WireTrust.off`: plaintext, no identities, no
authorization. It exists to measure what TLS costs and to debug with a packet
capture; it is never a default, and every process that runs with it says so
in its log at start.

:class:`RefusalLog` is the sans-I/O rule for logging refused handshakes: at
most once per source address per :data:`REFUSAL_LOG_INTERVAL_S`, so a
scanner cannot fill the disk (every refusal is still counted in
``rtm_errors_total{kind="auth"}``).

:class:`HandshakeLimiter` is the sans-I/O per-source rate limit on TLS
handshakes: a server-side handshake costs a few milliseconds of CPU (key
exchange, signature, chain verification) before the server knows whether the
peer holds a certificate, so without a limit anyone who can reach a port can
keep a core busy. Each source address has a token bucket
(``--tls-handshake-burst`` tokens, refilled at ``--tls-handshake-rate-per-s``);
a handshake takes a token when the TCP connection is accepted and gives it
back when it succeeds, so verified fleet peers never run their bucket down and
a source that only fails is held to the rate. A connection from an empty
bucket is closed before any TLS work, counted as
``rtm_errors_total{kind="handshake_rate"}`` and logged like a refusal.
"""

from __future__ import annotations

import logging
import ssl
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from services.errors import ConfigError, HandshakeRateLimited
from services.identity import BadIdentity, PeerIdentity

log = logging.getLogger("rtm.tls")

# A peer that has not finished its handshake after this long is disconnected
# (and counted): a TLS 1.3 handshake on localhost takes about a millisecond,
# across regions a few round trips.
TLS_HANDSHAKE_TIMEOUT_S = 5.0
REFUSAL_LOG_INTERVAL_S = 60.0
# Sources remembered by the refusal log; the oldest is forgotten past this
# (then it may be logged once more early: harmless).
MAX_REFUSAL_LOG_SOURCES = 4096
# Per-source handshake budget (HandshakeLimiter). The burst covers a legitimate
# wave of concurrent dials from one address: on one machine (``rtm up``) every
# process is 127.0.0.1, and a gateway's HTTP client to the webapp opens up to 100
# connections at once. The rate bounds what a source that never completes a
# handshake costs: 10/s x ~2 ms of server CPU is about 2 % of a core.
TLS_HANDSHAKE_RATE_PER_S = 10.0
TLS_HANDSHAKE_BURST = 256
# Sources tracked by the limiter; the least recently seen is forgotten past this
# (it starts again with a full bucket: the bound is on memory, not on attackers).
MAX_HANDSHAKE_SOURCES = 4096
WIRE_TLS_ON = "on"
WIRE_TLS_OFF = "off"


class TrustConfigError(ConfigError):
    """The TLS flags do not describe usable credentials (missing file, wrong identity)."""


def _context(purpose: int, ca: Path, cert: Path, key: Path) -> ssl.SSLContext:
    ctx = ssl.SSLContext(purpose)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.verify_mode = ssl.CERT_REQUIRED
    if purpose == ssl.PROTOCOL_TLS_CLIENT:
        ctx.check_hostname = False  # identities, not host names: see the module doc
    ctx.load_verify_locations(cafile=str(ca))
    ctx.load_cert_chain(certfile=str(cert), keyfile=str(key))
    return ctx


def server_context(ca: Path, cert: Path, key: Path) -> ssl.SSLContext:
    """Accepts only clients with a certificate from the fleet CA (``ca``)."""
    return _context(ssl.PROTOCOL_TLS_SERVER, ca, cert, key)


def client_context(ca: Path, cert: Path, key: Path) -> ssl.SSLContext:
    """Presents ``cert`` and accepts only servers with a certificate from ``ca``."""
    return _context(ssl.PROTOCOL_TLS_CLIENT, ca, cert, key)


def identity_from_peercert(peercert: dict[str, Any] | None) -> PeerIdentity:
    """The fleet identity in a verified peer certificate (``SSLObject.getpeercert()``).

    Raises :class:`BadIdentity` when there is no certificate or it does not
    carry exactly one ``spiffe://rtm/...`` URI SAN.
    """
    if not peercert:
        raise BadIdentity("the peer presented no certificate")
    uris = [value for kind, value in peercert.get("subjectAltName", ()) if kind == "URI"]
    if len(uris) != 1:
        raise BadIdentity(f"the peer certificate must carry exactly one URI SAN, has {len(uris)}")
    return PeerIdentity.from_uri(uris[0])


def transport_identity(transport: Any) -> PeerIdentity | None:
    """The verified identity of the peer of a TLS transport; None for a plaintext one.

    Raises :class:`BadIdentity` for a TLS peer whose certificate names no fleet identity.
    """
    ssl_object = transport.get_extra_info("ssl_object") if transport is not None else None
    if ssl_object is None:
        return None
    return identity_from_peercert(ssl_object.getpeercert())


@dataclass(frozen=True, slots=True)
class WireTrust:
    """One process's credentials on the wire (see the module doc).

    ``identity`` is the process's own (from its certificate); ``server`` and
    ``client`` are None when TLS is off.
    """

    identity: PeerIdentity | None
    server: ssl.SSLContext | None
    client: ssl.SSLContext | None
    handshake_timeout_s: float = TLS_HANDSHAKE_TIMEOUT_S
    handshake_rate_per_s: float = TLS_HANDSHAKE_RATE_PER_S
    handshake_burst: int = TLS_HANDSHAKE_BURST

    @property
    def enabled(self) -> bool:
        return self.server is not None

    @classmethod
    def off(cls) -> WireTrust:
        """Plaintext, no identities: ``--wire-tls off`` (measurement and debugging only)."""
        return cls(None, None, None)

    @classmethod
    def load(
        cls,
        ca: Path | str,
        cert: Path | str,
        key: Path | str,
        handshake_timeout_s: float = TLS_HANDSHAKE_TIMEOUT_S,
        handshake_rate_per_s: float = TLS_HANDSHAKE_RATE_PER_S,
        handshake_burst: int = TLS_HANDSHAKE_BURST,
    ) -> WireTrust:
        """Load credentials; raises :class:`TrustConfigError` if a file is missing or unusable."""
        paths = [Path(ca), Path(cert), Path(key)]
        for path, what in zip(paths, ("--tls-ca", "--tls-cert", "--tls-key"), strict=True):
            if not path.is_file():
                raise TrustConfigError(f"{what}: no such file {str(path)!r}")
        from services.certs import identity_of

        try:
            identity = identity_of(paths[1].read_bytes())
            return cls(
                identity,
                server_context(*paths),
                client_context(*paths),
                handshake_timeout_s,
                handshake_rate_per_s,
                handshake_burst,
            )
        except (BadIdentity, ssl.SSLError, ValueError) as exc:
            raise TrustConfigError(f"unusable TLS credentials ({paths[1]}): {exc}") from exc


def add_flags(parser: Any) -> None:
    """The TLS flags of every fleet process (``parser`` is a :class:`services.config.Parser`)."""
    parser.add("--tls-ca", "", "fleet CA certificate (PEM) this process trusts")
    parser.add("--tls-cert", "", "this process's certificate (PEM), its identity as a spiffe://rtm/... URI SAN")
    parser.add("--tls-key", "", "this process's private key (PEM)")
    parser.add(
        "--wire-tls",
        WIRE_TLS_ON,
        "mutual TLS on the internal wire: on, or off (plaintext, no identities; measurement and debugging only)",
        choices=[WIRE_TLS_ON, WIRE_TLS_OFF],
    )
    parser.add("--tls-handshake-timeout-s", TLS_HANDSHAKE_TIMEOUT_S, "seconds a peer has to finish its TLS handshake")
    parser.add(
        "--tls-handshake-rate-per-s",
        TLS_HANDSHAKE_RATE_PER_S,
        "TLS handshakes per second one source address may start once its burst is spent (successful ones are given back)",
    )
    parser.add("--tls-handshake-burst", TLS_HANDSHAKE_BURST, "TLS handshakes one source address may start at once")


def cert_instance(args: Any) -> str:
    """The instance id in ``--tls-cert`` (empty if none is given or TLS is off)."""
    if getattr(args, "wire_tls", WIRE_TLS_OFF) != WIRE_TLS_ON or not getattr(args, "tls_cert", ""):
        return ""
    from services.certs import identity_of

    try:
        return identity_of(Path(args.tls_cert).read_bytes()).instance
    except (OSError, BadIdentity, ValueError):
        return ""


def trust_from_args(args: Any, service: str) -> WireTrust:
    """The process's :class:`WireTrust` from its flags.

    With TLS on, the certificate must name ``service`` and ``args.instance_id``:
    a process cannot run under another process's identity. Raises
    :class:`TrustConfigError` with a message that names the flag to fix.
    """
    if args.wire_tls == WIRE_TLS_OFF:
        log.warning("--wire-tls off: the internal wire is PLAINTEXT and unauthenticated (measurement/debug only)")
        return WireTrust.off()
    if not (args.tls_ca and args.tls_cert and args.tls_key):
        raise TrustConfigError(
            f"{service} needs --tls-ca, --tls-cert and --tls-key (or RTM_TLS_CA, RTM_TLS_CERT, RTM_TLS_KEY); "
            "`rtm up` and deploy/ make them"
        )
    trust = WireTrust.load(
        args.tls_ca,
        args.tls_cert,
        args.tls_key,
        args.tls_handshake_timeout_s,
        float(getattr(args, "tls_handshake_rate_per_s", TLS_HANDSHAKE_RATE_PER_S)),
        int(getattr(args, "tls_handshake_burst", TLS_HANDSHAKE_BURST)),
    )
    assert trust.identity is not None
    instance = getattr(args, "instance_id", "")
    if trust.identity.service != service or (instance and trust.identity.instance != instance):
        raise TrustConfigError(
            f"--tls-cert names {trust.identity}, but this process is {service}/{instance or '?'}: "
            "each process runs under its own certificate"
        )
    return trust


class RefusalLog:
    """Whether to log a refused peer now: once per source per interval (sans-I/O, clock passed in)."""

    def __init__(self, interval_s: float = REFUSAL_LOG_INTERVAL_S, max_sources: int = MAX_REFUSAL_LOG_SOURCES) -> None:
        self.interval_s = interval_s
        self.max_sources = max_sources
        self._last: OrderedDict[str, float] = OrderedDict()
        self.suppressed = 0  # refusals not logged since the last one that was

    def should_log(self, source: str, now: float) -> bool:
        last = self._last.get(source)
        if last is not None and now - last < self.interval_s:
            self.suppressed += 1
            return False
        self._last[source] = now
        self._last.move_to_end(source)
        while len(self._last) > self.max_sources:
            self._last.popitem(last=False)
        return True

    def take_suppressed(self) -> int:
        count, self.suppressed = self.suppressed, 0
        return count


def refusal_kind(exc: BaseException) -> str:
    """The ``rtm_errors_total`` kind of a refused peer: ``handshake_rate`` or ``auth``."""
    return "handshake_rate" if isinstance(exc, HandshakeRateLimited) else "auth"


class HandshakeLimiter:
    """Per-source token buckets for TLS handshakes (see the module doc; sans-I/O, clock passed in).

    :meth:`take` when a connection is accepted (False: refuse it without any TLS
    work), :meth:`give_back` when its handshake succeeded.
    """

    def __init__(
        self,
        rate_per_s: float = TLS_HANDSHAKE_RATE_PER_S,
        burst: int = TLS_HANDSHAKE_BURST,
        max_sources: int = MAX_HANDSHAKE_SOURCES,
    ) -> None:
        if rate_per_s < 0 or burst < 1:
            raise ValueError(f"handshake limit needs rate >= 0 and burst >= 1, got {rate_per_s}, {burst}")
        self.rate_per_s = rate_per_s
        self.burst = burst
        self.max_sources = max_sources
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()  # source -> (tokens, at)

    def _tokens(self, source: str, now: float) -> float:
        bucket = self._buckets.get(source)
        if bucket is None:
            return float(self.burst)
        tokens, at = bucket
        return min(float(self.burst), tokens + max(0.0, now - at) * self.rate_per_s)

    def take(self, source: str, now: float) -> bool:
        """One handshake from ``source`` may start now (a token is taken), or not."""
        tokens = self._tokens(source, now)
        if tokens < 1.0:
            self._buckets[source] = (tokens, now)
            self._buckets.move_to_end(source)
            return False
        self._buckets[source] = (tokens - 1.0, now)
        self._buckets.move_to_end(source)
        while len(self._buckets) > self.max_sources:
            self._buckets.popitem(last=False)
        return True

    def give_back(self, source: str, now: float) -> None:
        """A handshake of ``source`` succeeded: its token is returned."""
        if source in self._buckets:
            self._buckets[source] = (min(float(self.burst), self._tokens(source, now) + 1.0), now)

    def tokens(self, source: str, now: float) -> float:
        """Handshakes ``source`` may start now (for tests and health)."""
        return self._tokens(source, now)
