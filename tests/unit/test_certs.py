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
    with pytest.raises(InvalidSignature):
        x509.load_pem_x509_certificate(old_cert).verify_directly_issued_by(new_ca)
