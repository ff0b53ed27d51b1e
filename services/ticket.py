"""Signed, short-lived, single-use websocket tickets.

``rtm.connect`` mints a ticket naming the user, the team and the gateway it is
for; the gateway verifies the HMAC, the expiry and the gateway id, and
remembers each ticket's nonce until it expires so it cannot be used twice.
The ticket travels in the URL path (the Slack SDK sends no other credential).

Format: ``base64url(json payload) + "." + base64url(hmac_sha256(secret, payload))``.
The clock is passed in, so this module is pure.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import secrets
from dataclasses import dataclass

from services.errors import RtmError

TICKET_TTL_S = 30.0
# Bound on remembered nonces: at most this many unexpired tickets are tracked.
MAX_REMEMBERED_TICKETS = 1_000_000


class InvalidTicket(RtmError):
    """Forged, malformed, expired, for another gateway, or already used."""


@dataclass(frozen=True)
class Ticket:
    user: str
    team: str
    gateway: str
    expires_at: float
    nonce: str
    resume: str = ""  # id of a resume record at the webapp: the connection was moved, replay what it missed
    app: str = ""  # a Socket Mode connection of this app (``A…``; ``user`` is its bot user), else ""


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def mint(
    secret: bytes,
    user: str,
    team: str,
    gateway: str,
    now_s: float,
    ttl_s: float = TICKET_TTL_S,
    resume: str = "",
    app: str = "",
) -> str:
    body = {"u": user, "t": team, "g": gateway, "exp": round(now_s + ttl_s, 3), "n": secrets.token_hex(8)}
    if resume:
        body["r"] = resume
    if app:
        body["a"] = app
    payload = json.dumps(body, separators=(",", ":")).encode()
    signature = hmac.new(secret, payload, hashlib.sha256).digest()
    return _b64(payload) + "." + _b64(signature)


class TicketVerifier:
    """Verifies tickets for one gateway and enforces single use."""

    def __init__(self, secret: bytes, gateway: str) -> None:
        self.secret = secret
        self.gateway = gateway
        self._used: dict[str, float] = {}

    def verify(self, token: str, now_s: float) -> Ticket:
        try:
            payload_b64, signature_b64 = token.split(".", 1)
            payload = _unb64(payload_b64)
            signature = _unb64(signature_b64)
        except ValueError:
            raise InvalidTicket("malformed ticket") from None
        expected = hmac.new(self.secret, payload, hashlib.sha256).digest()
        if not hmac.compare_digest(expected, signature):
            raise InvalidTicket("bad signature")
        try:
            data = json.loads(payload)
            ticket = Ticket(
                user=str(data["u"]),
                team=str(data["t"]),
                gateway=str(data["g"]),
                expires_at=float(data["exp"]),
                nonce=str(data["n"]),
                resume=str(data.get("r", "")),
                app=str(data.get("a", "")),
            )
        except (ValueError, KeyError, TypeError):
            raise InvalidTicket("malformed ticket payload") from None
        if ticket.expires_at < now_s:
            raise InvalidTicket("ticket expired")
        if ticket.gateway != self.gateway:
            raise InvalidTicket("ticket is for another gateway")
        self._forget_expired(now_s)
        if ticket.nonce in self._used:
            raise InvalidTicket("ticket already used")
        if len(self._used) >= MAX_REMEMBERED_TICKETS:
            raise InvalidTicket("too many outstanding tickets")
        self._used[ticket.nonce] = ticket.expires_at
        return ticket

    def _forget_expired(self, now_s: float) -> None:
        if len(self._used) < 1024:
            return
        for nonce in [n for n, exp in self._used.items() if exp < now_s]:
            del self._used[nonce]
