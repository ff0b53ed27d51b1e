"""Dead letters: events the fleet refused for good, parked until an operator redrives them.

See :mod:`webapp_stub.handoff` (which parks them) and ``rtm deadletter`` (which redrives them).
"""

from __future__ import annotations

from webapp_stub.events import EventLog
from webapp_stub.models import DeadLetter, Event


class DeadLetterStore(EventLog):
    """The ``dead_letters`` table: park, list, redrive, resolve."""

    _DL_COLS = "channel, seq, reason, detail, refusals, state, redrives, parked_at, updated_at"

    def park_event(self, event: Event, reason: str, detail: str, refusals: int) -> None:
        """Record ``event`` as refused for good (state ``parked``); a re-park keeps its redrive count."""
        now = self.clock()
        with self.transaction() as db:
            db.execute(
                f"INSERT INTO dead_letters ({self._DL_COLS}) VALUES (?, ?, ?, ?, ?, 'parked', 0, ?, ?) "
                "ON CONFLICT (channel, seq) DO UPDATE SET reason = excluded.reason, detail = excluded.detail, "
                "refusals = dead_letters.refusals + excluded.refusals, state = 'parked', "
                "updated_at = excluded.updated_at",
                (event.channel, event.seq, reason, detail[:500], refusals, now, now),
            )

    def dead_letters(self, states: tuple[str, ...] = ("parked", "redrive", "redriving")) -> list[DeadLetter]:
        """Dead letters in the given states, oldest first."""
        marks = ",".join("?" * len(states))
        rows = self.conn.execute(
            f"SELECT {self._DL_COLS} FROM dead_letters WHERE state IN ({marks}) ORDER BY parked_at, channel, seq",
            states,
        ).fetchall()
        return [DeadLetter(*row) for row in rows]

    def dead_letter(self, channel: str, seq: int) -> DeadLetter | None:
        row = self.conn.execute(
            f"SELECT {self._DL_COLS} FROM dead_letters WHERE channel = ? AND seq = ?", (channel, seq)
        ).fetchone()
        return DeadLetter(*row) if row else None

    def request_redrive(self, channel: str, seq: int) -> DeadLetter | None:
        """Operator: send a parked dead letter again (state ``redrive``). None if there is no
        such dead letter; the row unchanged if it is not ``parked``."""
        with self.transaction() as db:
            db.execute(
                "UPDATE dead_letters SET state = 'redrive', updated_at = ? "
                "WHERE channel = ? AND seq = ? AND state = 'parked'",
                (self.clock(), channel, seq),
            )
        return self.dead_letter(channel, seq)

    def take_redrives(self) -> list[Event]:
        """The events an operator asked to redrive, now marked ``redriving`` (the webapp's
        dead-letter loop puts them back in the outbox). A request whose event is gone is
        marked delivered (nothing left to send)."""
        wanted = self.conn.execute("SELECT channel, seq FROM dead_letters WHERE state = 'redrive'").fetchall()
        if not wanted:
            return []
        events = []
        with self.transaction() as db:
            for channel, seq in wanted:
                event = self.event(channel, seq)
                state = "redriving" if event is not None else "delivered"
                db.execute(
                    "UPDATE dead_letters SET state = ?, redrives = redrives + 1, updated_at = ? "
                    "WHERE channel = ? AND seq = ?",
                    (state, self.clock(), channel, seq),
                )
                if event is not None:
                    events.append(event)
        return events

    def resume_redrives(self) -> int:
        """At start: redrives that were in the outbox when the last run stopped are asked for
        again (state ``redrive``), since restart replay skips dead letters. Returns how many."""
        with self.transaction() as db:
            return int(
                db.execute(
                    "UPDATE dead_letters SET state = 'redrive', redrives = redrives - 1 WHERE state = 'redriving'"
                ).rowcount
            )

    def resolve_dead_letter(self, channel: str, seq: int) -> None:
        """A redriven dead letter was acknowledged by an Admin Server: state ``delivered``."""
        with self.transaction() as db:
            db.execute(
                "UPDATE dead_letters SET state = 'delivered', updated_at = ? WHERE channel = ? AND seq = ?",
                (self.clock(), channel, seq),
            )

    def parked_count(self) -> int:
        """Dead letters not delivered (parked or on their way back)."""
        return int(self.conn.execute("SELECT count(*) FROM dead_letters WHERE state != 'delivered'").fetchone()[0])
