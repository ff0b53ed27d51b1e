"""Signed, short-lived, single-use websocket tickets.

``rtm.connect`` mints a ticket naming the user, the team, the gateway it is
for and that gateway's *incarnation* (a random id the gateway makes at each
start and registers in Consul meta, :data:`INCARNATION_META`); the gateway
verifies the HMAC, the expiry, the gateway id and the incarnation, and
remembers each ticket's nonce until it expires so it cannot be used twice.

The nonces live in the gateway process's memory, so a restart forgets them;
the incarnation is what keeps a ticket captured before the restart (within its
TTL) from being replayed on the restarted gateway: that ticket names the
previous incarnation and is refused. (Keeping the nonces somewhere durable
would cost a write per connect; binding the ticket to one process lifetime
costs nothing.)

The webapp learns a gateway's incarnation from Consul, so for a moment after a
restart it may still mint with the previous one. A ticket whose incarnation is
not the gateway's own is therefore still accepted when it was *issued* (its
``iat``) after the gateway process started: a ticket captured before the
restart was issued before it, and stays refused. Across machines this compares
the webapp's clock with the gateway's: a webapp clock ahead of the gateway's by
``d`` lets a ticket issued in the last ``d`` before a restart be replayed after
it (only while the webapp's view is stale is that check needed at all).
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
from collections import deque
from dataclasses import dataclass

from services.errors import RtmError

TICKET_TTL_S = 30.0
# Bound on remembered nonces: at most this many unexpired tickets are tracked.
MAX_REMEMBERED_TICKETS = 1_000_000


# The gateway's Consul meta key for its incarnation (read by the webapp when it mints).
INCARNATION_META = "incarnation"


class InvalidTicket(RtmError):
    """Forged, malformed, expired, for another gateway (or an earlier start of it), or already used."""


def new_incarnation() -> str:
    """A gateway process's incarnation: random, made once per start."""
    return secrets.token_hex(8)


@dataclass(frozen=True)
class Ticket:
    user: str
    team: str
    gateway: str
    expires_at: float
    nonce: str
    resume: str = ""  # id of a resume record at the webapp: the connection was moved, replay what it missed
    app: str = ""  # a Socket Mode connection of this app (``A…``; ``user`` is its bot user), else ""
    incarnation: str = ""  # the start of the gateway it was minted for (its Consul meta)
    issued_at: float = 0.0  # when the webapp minted it (its clock); 0: not said
    # the id of the API token rtm.connect was called with (a hash: webapp_stub.resume.token_id);
    # the gateway names it in the connection's resume record, so only that token resumes it
    token_id: str = ""


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
    incarnation: str = "",
    token_id: str = "",
) -> str:
    """A ticket for ``user`` on ``gateway`` (its current ``incarnation``, from its Consul meta)."""
    body = {
        "u": user,
        "t": team,
        "g": gateway,
        "exp": round(now_s + ttl_s, 3),
        "iat": round(now_s, 3),
        "n": secrets.token_hex(8),
    }
    if incarnation:
        body["i"] = incarnation
    if resume:
        body["r"] = resume
    if app:
        body["a"] = app
    if token_id:
        body["k"] = token_id
    payload = json.dumps(body, separators=(",", ":")).encode()
    signature = hmac.new(secret, payload, hashlib.sha256).digest()
    return _b64(payload) + "." + _b64(signature)


class NonceStore:
    """The nonces of tickets already used, each kept until its ticket expires.

    Expiry is O(1) amortized: nonces sit in a deque in the order they were
    used, each with a *forget time* that is its ticket's expiry clamped to be
    no earlier than the one before it, so the deque is ordered by forget time
    and :meth:`forget_expired` pops from the front only what is due. Tickets
    are minted with one TTL, so expiries arrive nearly in order and the clamp
    keeps a nonce at most a clock skew longer than needed; keeping one longer
    is safe (its ticket is refused as expired anyway). At most ``max_nonces``
    are held: past that a verify is refused rather than the store grown.
    """

    def __init__(self, max_nonces: int = MAX_REMEMBERED_TICKETS) -> None:
        self.max_nonces = max_nonces
        self._nonces: set[str] = set()
        self._by_expiry: deque[tuple[float, str]] = deque()

    def __len__(self) -> int:
        return len(self._nonces)

    def __contains__(self, nonce: str) -> bool:
        return nonce in self._nonces

    def forget_expired(self, now_s: float) -> None:
        """Drop every nonce whose forget time has passed (amortized O(1) per nonce ever added)."""
        by_expiry = self._by_expiry
        while by_expiry and by_expiry[0][0] < now_s:
            self._nonces.discard(by_expiry.popleft()[1])

    def add(self, nonce: str, expires_at: float) -> bool:
        """Remember ``nonce`` until ``expires_at``; False if it is already known or the store is full."""
        if nonce in self._nonces or len(self._nonces) >= self.max_nonces:
            return False
        if self._by_expiry and self._by_expiry[-1][0] > expires_at:
            expires_at = self._by_expiry[-1][0]  # keep the deque ordered: forget no earlier than the one before
        self._nonces.add(nonce)
        self._by_expiry.append((expires_at, nonce))
        return True


class TicketVerifier:
    """Verifies tickets for one gateway process and enforces single use.

    ``incarnation`` is this process's (:func:`new_incarnation`) and
    ``started_at`` when it started (wall clock): a ticket minted for another
    incarnation of the same gateway id is refused unless it was issued after
    ``started_at`` (the webapp had not yet seen the new incarnation; see the
    module doc).
    """

    def __init__(
        self,
        secret: bytes,
        gateway: str,
        max_nonces: int = MAX_REMEMBERED_TICKETS,
        incarnation: str = "",
        started_at: float = float("inf"),
    ) -> None:
        self.secret = secret
        self.gateway = gateway
        self.incarnation = incarnation
        self.started_at = started_at
        self._used = NonceStore(max_nonces)

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
                incarnation=str(data.get("i", "")),
                issued_at=float(data.get("iat", 0.0)),
                token_id=str(data.get("k", "")),
            )
        except (ValueError, KeyError, TypeError):
            raise InvalidTicket("malformed ticket payload") from None
        if ticket.expires_at < now_s:
            raise InvalidTicket("ticket expired")
        if ticket.gateway != self.gateway:
            raise InvalidTicket("ticket is for another gateway")
        if ticket.incarnation != self.incarnation and ticket.issued_at < self.started_at:
            raise InvalidTicket("ticket is for an earlier start of this gateway")
        self._used.forget_expired(now_s)
        if ticket.nonce in self._used:
            raise InvalidTicket("ticket already used")
        if not self._used.add(ticket.nonce, ticket.expires_at):
            raise InvalidTicket("too many outstanding tickets")
        return ticket
