"""The sans-I/O parts of the TLS layer: identities from certificates, flags, the refusal log."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from services.errors import HandshakeRateLimited
from services.identity import BadIdentity, PeerIdentity
from services.tls import (
    HandshakeLimiter,
    RefusalLog,
    TrustConfigError,
    WireTrust,
    cert_instance,
    identity_from_peercert,
    refusal_kind,
    trust_from_args,
)
from tests.support import FleetCA


def test_identity_from_a_verified_peer_certificate() -> None:
    cert = {"subjectAltName": (("URI", "spiffe://rtm/presence/ps-1"),)}
    assert identity_from_peercert(cert) == PeerIdentity("presence", "ps-1")


@pytest.mark.parametrize(
    "cert",
    [
        None,
        {},
        {"subjectAltName": (("DNS", "localhost"),)},
        {"subjectAltName": (("URI", "spiffe://rtm/gateway/a"), ("URI", "spiffe://rtm/gateway/b"))},
        {"subjectAltName": (("URI", "spiffe://other/gateway/a"),)},
        {"subjectAltName": (("URI", "spiffe://rtm/nosuchservice/a"),)},
    ],
)
def test_a_certificate_that_names_no_single_fleet_identity_is_refused(cert: dict | None) -> None:
    with pytest.raises(BadIdentity):
        identity_from_peercert(cert)


def test_refusals_are_logged_once_per_source_per_interval() -> None:
    limit = RefusalLog(interval_s=60.0, max_sources=2)
    assert limit.should_log("10.0.0.1", 0.0)
    assert not limit.should_log("10.0.0.1", 30.0)
    assert not limit.should_log("10.0.0.1", 59.9)
    assert limit.should_log("10.0.0.2", 59.9)  # another source: its own budget
    assert limit.take_suppressed() == 2 and limit.take_suppressed() == 0
    assert limit.should_log("10.0.0.1", 60.0)  # a minute later: once more
    assert limit.should_log("10.0.0.3", 61.0)  # bounded: 10.0.0.2 is forgotten
    assert len(limit._last) == 2


def test_a_source_may_start_its_burst_of_handshakes_then_the_rate() -> None:
    limiter = HandshakeLimiter(rate_per_s=2.0, burst=3)
    assert [limiter.take("10.0.0.9", 0.0) for _ in range(4)] == [True, True, True, False]
    assert not limiter.take("10.0.0.9", 0.4)  # 0.8 of a token: not yet
    assert limiter.take("10.0.0.9", 0.5) and not limiter.take("10.0.0.9", 0.5)  # one per 1/rate s
    assert limiter.take("10.0.0.1", 0.5)  # another source: its own bucket
    assert limiter.tokens("10.0.0.9", 100.0) == 3.0  # refills to the burst, no further


def test_successful_handshakes_are_given_back() -> None:
    limiter = HandshakeLimiter(rate_per_s=0.0, burst=2)  # nothing refills: only give_back does
    for _ in range(100):  # a fleet peer that dials again and again, always verified
        assert limiter.take("127.0.0.1", 0.0)
        limiter.give_back("127.0.0.1", 0.0)
    assert limiter.take("127.0.0.1", 0.0) and limiter.take("127.0.0.1", 0.0)  # two at once, unfinished
    assert not limiter.take("127.0.0.1", 0.0)
    limiter.give_back("127.0.0.1", 0.0)
    limiter.give_back("127.0.0.1", 0.0)
    limiter.give_back("127.0.0.1", 0.0)  # never past the burst
    assert limiter.tokens("127.0.0.1", 0.0) == 2.0


def test_the_limiter_remembers_a_bounded_number_of_sources() -> None:
    limiter = HandshakeLimiter(rate_per_s=0.0, burst=1, max_sources=2)
    assert limiter.take("a", 0.0) and limiter.take("b", 0.0) and limiter.take("c", 0.0)
    assert len(limiter._buckets) == 2 and limiter.tokens("a", 0.0) == 1.0  # "a" forgotten: full again
    with pytest.raises(ValueError):
        HandshakeLimiter(rate_per_s=1.0, burst=0)


def test_refusals_are_counted_by_kind() -> None:
    assert refusal_kind(HandshakeRateLimited("over")) == "handshake_rate"
    assert refusal_kind(ConnectionResetError()) == "auth"


def args(**given: object) -> argparse.Namespace:
    base = {"wire_tls": "on", "tls_ca": "", "tls_cert": "", "tls_key": "", "tls_handshake_timeout_s": 5.0}
    return argparse.Namespace(**{**base, **given})


def paths(fleet_ca: FleetCA, service: str, instance: str) -> dict[str, str]:
    flags = fleet_ca.flags(service, instance)
    return {"tls_ca": flags[1], "tls_cert": flags[3], "tls_key": flags[5]}


def test_a_process_runs_only_under_its_own_certificate(fleet_ca: FleetCA) -> None:
    own = paths(fleet_ca, "gateway", "gw-1")
    trust = trust_from_args(args(instance_id="gw-1", **own), "gateway")
    assert trust.enabled and trust.identity == PeerIdentity("gateway", "gw-1")
    assert cert_instance(args(**own)) == "gw-1"  # no --instance-id: the certificate's
    with pytest.raises(TrustConfigError, match="names gateway/gw-1"):
        trust_from_args(args(instance_id="gw-2", **own), "gateway")
    with pytest.raises(TrustConfigError, match="names gateway/gw-1"):
        trust_from_args(args(instance_id="gw-1", **own), "channel-server")


def test_missing_credentials_are_a_clear_error_and_off_is_explicit(tmp_path: Path) -> None:
    with pytest.raises(TrustConfigError, match="--tls-ca, --tls-cert and --tls-key"):
        trust_from_args(args(instance_id="x"), "gateway")
    with pytest.raises(TrustConfigError, match="--tls-ca: no such file"):
        WireTrust.load(tmp_path / "ca.crt", tmp_path / "c.crt", tmp_path / "c.key")
    off = trust_from_args(args(wire_tls="off"), "gateway")
    assert not off.enabled and off.identity is None
