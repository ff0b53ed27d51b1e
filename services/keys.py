"""Separate keys for separate jobs, derived from one fleet secret with HKDF.

The fleet has one secret (``DATA_DIR/secret`` under ``rtm up``, ``RTM_SECRET``
in ``deploy/.env``). No job uses it directly: each gets its own key, derived
with HKDF-SHA256 (RFC 5869, ``cryptography``'s implementation) under a
distinct ``info`` label, so a key that leaks from one job (a header in a log,
say) neither is nor reveals the key of another, and a value made for one job
(a signature) means nothing to another.

| key | info label | who holds it | used for |
| --- | --- | --- | --- |
| ``ticket_signing`` | ``rtm/v1 websocket ticket signing`` | webapp (mints), gateways (verify) | HMAC-SHA256 of websocket tickets (:mod:`services.ticket`) |

What is not derived here, and why: the gateways' calls to the webapp's
``/internal/`` endpoints carry no shared secret any more (they were an
``X-Rtm-Secret`` header, then a key of its own from this module): they go
over mutual TLS with each process's own certificate and key (docs/trust.md),
generated apart. The Consul ACL tokens and the operator token
(``--debug-faults``) are generated apart too (``rtm up``,
``deploy/gen-cert.sh``): they are handed to processes that must not hold the
fleet secret. Resume
records need no key: their ids are random (96 bits) and travel inside the
signed ticket.

Changing a label changes the key: every holder must run the same labels.
"""

from __future__ import annotations

from dataclasses import dataclass

from cryptography.hazmat.primitives.hashes import SHA256
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

KEY_BYTES = 32  # SHA-256's output: a full-strength HMAC-SHA256 key
# A fixed, public salt (RFC 5869 3.1: optional; it separates rtm's use of the
# secret from any other use of the same bytes).
HKDF_SALT = b"rtm fleet secret"
TICKET_SIGNING_INFO = b"rtm/v1 websocket ticket signing"


def derive_key(fleet_secret: bytes, info: bytes, length: int = KEY_BYTES) -> bytes:
    """HKDF-SHA256(``fleet_secret``, salt :data:`HKDF_SALT`, ``info``) of ``length`` bytes.

    Raises ValueError for an empty secret (a fleet without a secret must not
    quietly sign with a well-known key).
    """
    if not fleet_secret:
        raise ValueError("the fleet secret is empty")
    return HKDF(algorithm=SHA256(), length=length, salt=HKDF_SALT, info=info).derive(fleet_secret)


@dataclass(frozen=True)
class FleetKeys:
    """The per-job keys of one fleet secret."""

    ticket_signing: bytes

    @classmethod
    def from_secret(cls, fleet_secret: bytes) -> FleetKeys:
        return cls(ticket_signing=derive_key(fleet_secret, TICKET_SIGNING_INFO))
