"""One key per job from the fleet secret (HKDF, RFC 5869)."""

from __future__ import annotations

import hashlib
import hmac

import pytest

from services.keys import HKDF_SALT, KEY_BYTES, TICKET_SIGNING_INFO, FleetKeys, derive_key
from services.ticket import InvalidTicket, TicketVerifier, mint

OTHER_JOB_INFO = b"rtm/v1 some other job"  # what another job's key would be derived under


def rfc5869_hkdf_sha256(ikm: bytes, salt: bytes, info: bytes, length: int) -> bytes:
    """RFC 5869 section 2, written out: extract, then expand."""
    prk = hmac.new(salt, ikm, hashlib.sha256).digest()
    okm, block, counter = b"", b"", 1
    while len(okm) < length:
        block = hmac.new(prk, block + info + bytes([counter]), hashlib.sha256).digest()
        okm += block
        counter += 1
    return okm[:length]


def test_rfc5869_test_case_1() -> None:
    ikm = bytes.fromhex("0b" * 22)
    salt = bytes.fromhex("000102030405060708090a0b0c")
    info = bytes.fromhex("f0f1f2f3f4f5f6f7f8f9")
    expected = "3cb25f25faacd57a90434f64d0362f2a2d2d0a90cf1a5a4c5db02d56ecc4c5bf34007208d5b887185865"
    assert rfc5869_hkdf_sha256(ikm, salt, info, 42).hex() == expected


def test_keys_are_hkdf_of_the_fleet_secret_with_distinct_labels() -> None:
    secret = b"fleet-secret"
    keys = FleetKeys.from_secret(secret)
    assert keys.ticket_signing == rfc5869_hkdf_sha256(secret, HKDF_SALT, TICKET_SIGNING_INFO, KEY_BYTES)
    other_job = derive_key(secret, OTHER_JOB_INFO)
    assert other_job == rfc5869_hkdf_sha256(secret, HKDF_SALT, OTHER_JOB_INFO, KEY_BYTES)
    assert len({keys.ticket_signing, other_job, secret}) == 3
    assert FleetKeys.from_secret(b"other-secret").ticket_signing != keys.ticket_signing


def test_an_empty_secret_is_refused() -> None:
    with pytest.raises(ValueError):
        derive_key(b"", TICKET_SIGNING_INFO)


def test_a_ticket_signed_with_the_fleet_secret_or_another_jobs_key_is_refused() -> None:
    keys = FleetKeys.from_secret(b"fleet-secret")
    verifier = TicketVerifier(keys.ticket_signing, "gw-1")
    verifier.verify(mint(keys.ticket_signing, "U1", "T1", "gw-1", now_s=100.0), now_s=100.0)
    other_job = derive_key(b"fleet-secret", OTHER_JOB_INFO)
    for wrong in (b"fleet-secret", other_job, other_job.hex().encode()):
        with pytest.raises(InvalidTicket, match="bad signature"):
            verifier.verify(mint(wrong, "U1", "T1", "gw-1", now_s=100.0), now_s=100.0)
