"""rtmctl.fleet_plan: ``rtm up``'s certificates are reused across restarts, and renewed before they expire."""

from __future__ import annotations

import datetime
from pathlib import Path

import pytest
from cryptography import x509

from rtmctl.fleet_plan import RENEW_WITHIN, credentials
from services.certs import FleetCertificates, issue, write_private
from services.identity import CHANNEL_SERVER, PeerIdentity

NAME = "channel-server-0"


def stored(certs: FleetCertificates, issued_at: datetime.datetime, valid_days: float) -> bytes:
    """Store a certificate for ``NAME`` (cs-kept) issued at ``issued_at``; return its PEM."""
    issued = issue(certs.ensure_ca(), PeerIdentity(CHANNEL_SERVER, "cs-kept"), issued_at, valid_days=valid_days)
    write_private(certs.paths(NAME).cert, issued.cert_pem)
    write_private(certs.paths(NAME).key, issued.key_pem)
    return issued.cert_pem


def expiry(certs: FleetCertificates) -> datetime.datetime:
    return x509.load_pem_x509_certificate(certs.paths(NAME).cert.read_bytes()).not_valid_after_utc


def test_a_first_start_issues_and_a_restart_reuses(tmp_path: Path) -> None:
    certs = FleetCertificates(tmp_path)
    iid, flags = credentials(certs, NAME, CHANNEL_SERVER, "cs-new")
    assert iid == "cs-new" and str(certs.paths(NAME).cert) in flags
    first = certs.paths(NAME).cert.read_bytes()
    assert credentials(certs, NAME, CHANNEL_SERVER, "cs-other")[0] == "cs-new"  # the same process
    assert certs.paths(NAME).cert.read_bytes() == first


@pytest.mark.parametrize(
    ("age_days", "valid_days"),
    [(400, 365), (355, 365), (1, 1)],  # expired a month ago; expires in 10 days; expires within the day
)
def test_an_expired_or_expiring_certificate_is_renewed_under_the_same_identity(
    tmp_path: Path, age_days: float, valid_days: float
) -> None:
    certs = FleetCertificates(tmp_path)
    now = datetime.datetime.now(datetime.UTC)
    old = stored(certs, now - datetime.timedelta(days=age_days), valid_days)
    iid, _ = credentials(certs, NAME, CHANNEL_SERVER, "cs-new")
    assert iid == "cs-kept"  # the instance id survives the renewal
    assert certs.paths(NAME).cert.read_bytes() != old
    assert expiry(certs) - now > RENEW_WITHIN
    assert certs.existing_identity(NAME) == PeerIdentity(CHANNEL_SERVER, "cs-kept")


def test_a_certificate_valid_beyond_the_renewal_window_is_kept(tmp_path: Path) -> None:
    certs = FleetCertificates(tmp_path)
    now = datetime.datetime.now(datetime.UTC)
    kept = stored(certs, now - datetime.timedelta(days=100), 365)
    credentials(certs, NAME, CHANNEL_SERVER, "cs-new")
    assert certs.paths(NAME).cert.read_bytes() == kept


def test_a_child_inherits_no_fleet_secret_it_was_not_given(monkeypatch: pytest.MonkeyPatch) -> None:
    """An operator's shell may export the fleet's secrets (e.g. after sourcing deploy/.env): a
    child of rtm up gets only those rtm up gives it, never one from rtm up's own environment."""
    from rtmctl.fleet import FLEET_SECRET_ENVS
    from rtmctl.launcher import child_environment

    for name in FLEET_SECRET_ENVS:
        monkeypatch.setenv(name, "stray-" + name)
    monkeypatch.setenv("RTM_LOG_LEVEL", "DEBUG")  # anything else is inherited as before
    given = {FLEET_SECRET_ENVS[0]: "given"}
    env = child_environment(given, [n for n in FLEET_SECRET_ENVS if n not in given])
    assert env[FLEET_SECRET_ENVS[0]] == "given"
    assert not any(value.startswith("stray-") for value in env.values())
    assert env["RTM_LOG_LEVEL"] == "DEBUG" and env["PYTHONUNBUFFERED"] == "1"
