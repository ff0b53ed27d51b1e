"""Socket Mode envelopes of one app, sans I/O: which connection gets each event,
acknowledgements, redelivery, and events kept while the app has no connection.

Commands in (an event for the app, a connection opened or closed, an ack, the
clock ticked), sends out (:class:`Send`: a connection id and the envelope to
write). No clock of its own: every call takes ``now`` (seconds), so the unit
tests drive it with a fake one.

Contract (Slack's Socket Mode, docs/socket-mode.md):

* Each event becomes one envelope (``type: events_api``, a fresh
  ``envelope_id``) sent to exactly one open connection of the app, round
  robin, first with ``retry_attempt`` 0 and ``retry_reason`` "".
* ``{"envelope_id": E}`` from *any* connection of the app acknowledges E (the
  SDKs answer on their newest connection, also for an envelope an older one
  received).
* An envelope not acknowledged within :data:`ACK_TIMEOUT_S` is sent again, to
  an open connection (round robin), with ``retry_attempt`` + 1 and
  ``retry_reason`` ``"timeout"``; after :data:`MAX_RETRY_ATTEMPTS` retries it
  is given up and counted ``undelivered``.
* With no open connection, envelopes wait, in order, for at most
  :data:`PENDING_KEEP_S`, and are sent when a connection opens; older ones are
  counted ``expired``. At most :data:`MAX_ENVELOPES_PER_APP` are held (waiting
  and in flight); past that the oldest waiting one is dropped and counted
  ``overflow``.
* :meth:`EnvelopeBook.hand_over` gives up every unacknowledged envelope (to
  be carried to another gateway when the app's connections move), and
  :meth:`EnvelopeBook.take_over` takes such a list in; an envelope keeps its
  id, so an ack the app sends for it on its new connection still counts.
"""

from __future__ import annotations

import json
import uuid
from collections import deque
from dataclasses import dataclass
from typing import Any

ACK_TIMEOUT_S = 3.0  # Slack: an envelope not acknowledged within 3 seconds is retried
MAX_RETRY_ATTEMPTS = 3  # Slack retries an event up to 3 times
PENDING_KEEP_S = 60.0  # how long events wait for an app that has no open connection
MAX_ENVELOPES_PER_APP = 10_000  # waiting + in flight, per app


def acked_envelope(frame: str | bytes) -> str | None:
    """The ``envelope_id`` an app's frame acknowledges (a ``payload`` beside it is ignored), or None
    for anything else: not JSON, JSON nested deeper than the parser goes (RecursionError, which used
    to end the app's connection with 1011), not an object, no string ``envelope_id``."""
    try:
        body = json.loads(frame)
    except (ValueError, RecursionError):  # ValueError: UnicodeDecodeError of a binary frame too
        return None
    envelope_id = body.get("envelope_id") if isinstance(body, dict) else None
    return envelope_id if isinstance(envelope_id, str) else None


RETRY_REASON_TIMEOUT = "timeout"


@dataclass
class Envelope:
    envelope_id: str
    payload: dict[str, Any]  # the Events API event_callback
    created_at: float
    attempts: int = 0  # times sent so far
    sent_at: float = 0.0
    conn: int | None = None  # the connection it was last sent on

    def frame(self) -> dict[str, Any]:
        """The envelope as written on the websocket for its next send."""
        retry = max(0, self.attempts - 1)
        return {
            "envelope_id": self.envelope_id,
            "payload": self.payload,
            "type": "events_api",
            "accepts_response_payload": False,
            "retry_attempt": retry,
            "retry_reason": RETRY_REASON_TIMEOUT if retry else "",
        }

    def to_carried(self, now: float) -> dict[str, Any]:
        """What a resume record carries: id, payload, sends so far and the ack time left."""
        left = max(0.0, self.sent_at + ACK_TIMEOUT_S - now) if self.attempts else 0.0
        return {"envelope_id": self.envelope_id, "payload": self.payload, "attempts": self.attempts, "ack_left_s": left}


@dataclass
class Send:
    conn: int
    envelope: dict[str, Any]

    def text(self) -> str:
        return json.dumps(self.envelope, separators=(",", ":"))


@dataclass
class EnvelopeStats:
    sent: int = 0
    retried: int = 0
    acked: int = 0
    undelivered: int = 0
    expired: int = 0
    overflow: int = 0
    unknown_acks: int = 0


class EnvelopeBook:
    """The envelopes of one app on this gateway."""

    def __init__(
        self,
        ack_timeout_s: float = ACK_TIMEOUT_S,
        max_retry_attempts: int = MAX_RETRY_ATTEMPTS,
        pending_keep_s: float = PENDING_KEEP_S,
        max_envelopes: int = MAX_ENVELOPES_PER_APP,
    ) -> None:
        self.ack_timeout_s = ack_timeout_s
        self.max_retry_attempts = max_retry_attempts
        self.pending_keep_s = pending_keep_s
        self.max_envelopes = max_envelopes
        self.connections: list[int] = []
        self.next_conn = 0
        self.waiting: deque[Envelope] = deque()
        self.in_flight: dict[str, Envelope] = {}
        self.stats = EnvelopeStats()

    def __len__(self) -> int:
        return len(self.waiting) + len(self.in_flight)

    # -- commands ------------------------------------------------------------------
    def add(self, payload: dict[str, Any], now: float) -> list[Send]:
        """A new event for the app."""
        envelope = Envelope(str(uuid.uuid4()), payload, now)
        if len(self) >= self.max_envelopes:
            if self.waiting:
                self.waiting.popleft()
            self.stats.overflow += 1
            if len(self) >= self.max_envelopes:
                return []  # everything held is in flight: the new one is the one dropped
        if not self.connections:
            self.waiting.append(envelope)
            return []
        return [self._send(envelope, now)]

    def open(self, conn: int, now: float) -> list[Send]:
        """A connection of the app opened: it takes what was waiting, in order."""
        if conn not in self.connections:
            self.connections.append(conn)
        self._expire(now)
        sends = []
        while self.waiting:
            sends.append(self._send(self.waiting.popleft(), now))
        return sends

    def close(self, conn: int) -> None:
        """A connection closed: what it had not acknowledged is retried on time, on another."""
        if conn in self.connections:
            self.connections.remove(conn)

    def ack(self, envelope_id: str) -> bool:
        """``{"envelope_id": E}`` from any connection of the app."""
        if self.in_flight.pop(envelope_id, None) is not None:
            self.stats.acked += 1
            return True
        for envelope in self.waiting:  # carried over from another gateway, not yet re-sent
            if envelope.envelope_id == envelope_id:
                self.waiting.remove(envelope)
                self.stats.acked += 1
                return True
        self.stats.unknown_acks += 1
        return False

    def tick(self, now: float) -> list[Send]:
        """Retry what is past its ack deadline; expire what waited too long."""
        sends = []
        for envelope in list(self.in_flight.values()):
            if envelope.sent_at + self.ack_timeout_s > now:
                continue
            del self.in_flight[envelope.envelope_id]
            if envelope.attempts > self.max_retry_attempts:
                self.stats.undelivered += 1
                continue
            if self.connections:
                self.stats.retried += 1
                sends.append(self._send(envelope, now))
            else:
                self.waiting.appendleft(envelope)
        self._expire(now)
        return sends

    def hand_over(self, now: float) -> list[dict[str, Any]]:
        """Every unacknowledged envelope, oldest first, removed from here (the app is moving)."""
        carried = sorted(self.in_flight.values(), key=lambda e: e.created_at) + list(self.waiting)
        self.in_flight.clear()
        self.waiting.clear()
        return [e.to_carried(now) for e in carried]

    def take_over(self, carried: list[dict[str, Any]], now: float) -> None:
        """Envelopes handed over by another gateway: each is sent when its ack time runs out
        (one already sent) or when a connection takes it (one never sent)."""
        for item in carried[: self.max_envelopes]:
            try:
                envelope = Envelope(str(item["envelope_id"]), dict(item["payload"]), now, int(item.get("attempts", 0)))
                left = float(item.get("ack_left_s", 0.0))
            except (KeyError, TypeError, ValueError):
                continue
            if envelope.attempts:  # in flight elsewhere: wait out its ack deadline here
                envelope.sent_at = now + left - self.ack_timeout_s
                self.in_flight[envelope.envelope_id] = envelope
            else:
                self.waiting.append(envelope)

    # -- internals ------------------------------------------------------------------
    def _send(self, envelope: Envelope, now: float) -> Send:
        conn = self.connections[self.next_conn % len(self.connections)]
        self.next_conn += 1
        envelope.attempts += 1
        envelope.sent_at = now
        envelope.conn = conn
        self.in_flight[envelope.envelope_id] = envelope
        self.stats.sent += 1
        return Send(conn, envelope.frame())

    def _expire(self, now: float) -> None:
        while self.waiting and self.waiting[0].created_at + self.pending_keep_s <= now:
            self.waiting.popleft()
            self.stats.expired += 1


__all__ = [
    "ACK_TIMEOUT_S",
    "MAX_ENVELOPES_PER_APP",
    "MAX_RETRY_ATTEMPTS",
    "PENDING_KEEP_S",
    "Envelope",
    "EnvelopeBook",
    "EnvelopeStats",
    "Send",
]
