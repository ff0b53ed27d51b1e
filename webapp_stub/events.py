"""Reading the event log: a channel's events after a seq, restart replay, and the hand-off marks."""

from __future__ import annotations

import json

from webapp_stub.database import Database
from webapp_stub.models import Event

# The hand-off's replay at start (EventLog.events_since): read through events_created, named, since
# SQLite's planner would rather scan the whole log in key order than sort the few recent events.
EVENTS_SINCE_SQL = (
    "SELECT e.channel, e.seq, e.json, e.ctl, e.created_at FROM events e INDEXED BY events_created "
    "WHERE e.created_at >= ? "
    "AND NOT EXISTS (SELECT 1 FROM dead_letters d WHERE d.channel = e.channel AND d.seq = e.seq "
    "AND d.state != 'delivered') ORDER BY e.channel, e.seq"
)


class EventLog(Database):
    """The ``events`` table read back (gateway history, restart replay) and the ``marks`` table."""

    def events_after(self, channel: str, after_seq: int, limit: int = 500) -> tuple[list[Event], bool]:
        """Events of ``channel`` with seq > ``after_seq`` in seq order, and whether more follow."""
        rows = self.conn.execute(
            "SELECT seq, json, ctl, created_at FROM events WHERE channel = ? AND seq > ? ORDER BY seq LIMIT ?",
            (channel, after_seq, limit + 1),
        ).fetchall()
        events = [
            Event(channel, seq, text, None if ctl is None else json.loads(ctl), t0) for seq, text, ctl, t0 in rows
        ]
        return events[:limit], len(events) > limit

    def events_since(self, created_at: float) -> list[Event]:
        """Every event created at or after ``created_at``, in seq order per channel (restart
        replay), except dead letters (an operator redrives those): only what is recent is read
        (:data:`EVENTS_SINCE_SQL`), not every event ever stored."""
        rows = self.conn.execute(EVENTS_SINCE_SQL, (created_at,)).fetchall()
        return [Event(ch, seq, text, None if ctl is None else json.loads(ctl), t0) for ch, seq, text, ctl, t0 in rows]

    def event(self, channel: str, seq: int) -> Event | None:
        """One stored event, or None."""
        row = self.conn.execute(
            "SELECT json, ctl, created_at FROM events WHERE channel = ? AND seq = ?", (channel, seq)
        ).fetchone()
        if row is None:
            return None
        return Event(channel, seq, row[0], None if row[1] is None else json.loads(row[1]), row[2])

    def get_mark(self, name: str) -> float | None:
        row = self.conn.execute("SELECT value FROM marks WHERE name = ?", (name,)).fetchone()
        return float(row[0]) if row else None

    def set_mark(self, name: str, value: float) -> None:
        self.conn.execute(
            "INSERT INTO marks (name, value) VALUES (?, ?) ON CONFLICT (name) DO UPDATE SET value = excluded.value",
            (name, value),
        )
