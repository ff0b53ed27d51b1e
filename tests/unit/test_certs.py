"""The fleet CA and its certificates: identities, files, reuse, rotation."""

from __future__ import annotations

import datetime
import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.exceptions import InvalidSignature

from services.certs import FleetCertificates, identity_of, issue, make_ca
from services.identity import BadIdentity, PeerIdentity

NOW = datetime.datetime(2025, 1, 1, tzinfo=datetime.UTC)


def test_a_certificate_carries_its_identity_as_a_uri_san() -> None:
    ca = make_ca(NOW)
    cert = issue(ca, PeerIdentity("gateway", "gw-us-east-0"), NOW)
    assert identity_of(cert.cert_pem) == PeerIdentity("gateway", "gw-us-east-0")
    parsed = x509.load_pem_x509_certificate(cert.cert_pem)
    assert parsed.issuer == x509.load_pem_x509_certificate(ca.cert_pem).subject
    assert parsed.not_valid_after_utc == NOW + datetime.timedelta(days=365)


def test_a_certificate_without_a_fleet_identity_is_refused() -> None:
    ca = make_ca(NOW)
    with pytest.raises(BadIdentity):
        identity_of(ca.cert_pem)  # the CA has no URI SAN


def test_files_are_created_0600_and_reused(tmp_path: Path) -> None:
    certs = FleetCertificates(tmp_path / "tls")
    paths = certs.ensure("gw-0", PeerIdentity("gateway", "gw-0"))
    for path in (paths.ca, paths.cert, paths.key, tmp_path / "tls" / "ca.key"):
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
    assert stat.S_IMODE((tmp_path / "tls").stat().st_mode) == 0o700
    first = paths.cert.read_bytes()
    again = FleetCertificates(tmp_path / "tls").ensure("gw-0", PeerIdentity("gateway", "gw-0"))
    assert again.cert.read_bytes() == first  # reused on restart
    other = certs.ensure("gw-0", PeerIdentity("gateway", "gw-1"))  # another identity: issued anew
    assert identity_of(other.cert.read_bytes()).instance == "gw-1"
    assert certs.existing_identity("gw-0") == PeerIdentity("gateway", "gw-1")
    assert certs.existing_identity("nothing") is None


def test_rotation_makes_a_new_ca_and_reissues_every_certificate(tmp_path: Path) -> None:
    certs = FleetCertificates(tmp_path)
    certs.ensure("cs-0", PeerIdentity("channel-server", "cs-abc"))
    certs.ensure("operator", PeerIdentity("operator", "rtm-cli"))
    old_ca = certs.ca_path.read_bytes()
    old_cert = certs.paths("cs-0").cert.read_bytes()
    assert sorted(certs.rotate()) == ["cs-0", "operator"]
    assert certs.ca_path.read_bytes() != old_ca
    new_cert = certs.paths("cs-0").cert.read_bytes()
    assert new_cert != old_cert and identity_of(new_cert) == PeerIdentity("channel-server", "cs-abc")
    new_ca = x509.load_pem_x509_certificate(certs.ca_path.read_bytes())
    x509.load_pem_x509_certificate(new_cert).verify_directly_issued_by(new_ca)
    with pytest.raises((InvalidSignature, ValueError)):  # ValueError: each CA has its own name
        x509.load_pem_x509_certificate(old_cert).verify_directly_issued_by(new_ca)


def test_a_two_ca_rotation_takes_three_steps(tmp_path: Path) -> None:
    certs = FleetCertificates(tmp_path)
    certs.ensure("cs-0", PeerIdentity("channel-server", "cs-abc"))
    old_ca = x509.load_pem_x509_certificate(certs.ca_path.read_bytes())
    old_leaf = certs.paths("cs-0").cert.read_bytes()
    assert certs.rotation_phase() == "steady"

    assert certs.rotation_step() == ("trusting-both", [])  # begin: trust both, nothing reissued
    cas = [x509.load_pem_x509_certificate(pem) for pem in certs.trusted_cas()]
    assert cas[0] == old_ca and len(cas) == 2 and cas[1].subject != old_ca.subject  # issuer first; names differ
    assert certs.paths("cs-0").cert.read_bytes() == old_leaf
    assert stat.S_IMODE((tmp_path / "ca-next.key").stat().st_mode) == 0o600
    assert certs.is_current("cs-0", PeerIdentity("channel-server", "cs-abc"), datetime.timedelta(days=30))
    new_ca = cas[1]

    phase, issued = certs.rotation_step()  # reissue: every leaf from the new CA, which issues from now on
    assert (phase, issued) == ("reissued", ["cs-0"])
    assert [x509.load_pem_x509_certificate(p) for p in certs.trusted_cas()] == [new_ca, old_ca]
    x509.load_pem_x509_certificate(certs.paths("cs-0").cert.read_bytes()).verify_directly_issued_by(new_ca)
    assert not (tmp_path / "ca-next.key").exists()
    certs.ensure("gw-9", PeerIdentity("gateway", "gw-9"))  # a new process meanwhile: from the new CA
    x509.load_pem_x509_certificate(certs.paths("gw-9").cert.read_bytes()).verify_directly_issued_by(new_ca)

    assert certs.rotation_step() == ("steady", [])  # finish: the old CA is trusted no more
    assert [x509.load_pem_x509_certificate(p) for p in certs.trusted_cas()] == [new_ca]
    assert certs.rotation_phase() == "steady"
