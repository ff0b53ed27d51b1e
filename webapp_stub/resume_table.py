"""Resume records in the webapp's SQLite (``resume_records``): the rows of a :class:`ResumeBook`.

Each write is one :meth:`~webapp_stub.database.Database.transaction`, so in the
webapp process it joins the open group-commit batch (:mod:`webapp_stub.commit`):
the drain of a gateway that posts thousands of records at once costs one
fsync per event-loop turn, shared with the posts of that turn, not one per
record. The internal endpoint that wrote a record answers only once that batch
is committed (``synchronous=FULL``), so the gateway says ``goodbye`` only after
the record would survive a kill of the webapp, or a power loss.

The table holds the token's id (:func:`webapp_stub.resume.token_id`), never the
token. Expired rows are deleted by the book as it meets them, and at load.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any

from webapp_stub.database import Database
from webapp_stub.resume import ResumeRecord

_COLUMNS = "id, user, token_id, channels, until, carried, expires_at, claimed, holder, retake_until, reclaimable"


class ResumeTable:
    """:class:`webapp_stub.resume.ResumeRows` on the webapp's database."""

    def __init__(self, db: Database) -> None:
        self.db = db

    def load(self) -> Iterable[ResumeRecord]:
        rows = self.db.conn.execute(f"SELECT {_COLUMNS} FROM resume_records").fetchall()
        return [_record(row) for row in rows]

    def put(self, record: ResumeRecord) -> None:
        with self.db.transaction() as conn:
            conn.execute(
                f"INSERT OR REPLACE INTO resume_records ({_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    record.id,
                    record.user,
                    record.token_id,
                    _json(record.channels),
                    _json(record.until),
                    _json(record.carried),
                    record.expires_at,
                    int(record.claimed),
                    record.holder,
                    record.retake_until,
                    int(record.reclaimable),
                ),
            )

    def mark(self, record: ResumeRecord) -> None:
        with self.db.transaction() as conn:
            conn.execute(
                "UPDATE resume_records SET claimed = ?, holder = ?, retake_until = ?, reclaimable = ? WHERE id = ?",
                (int(record.claimed), record.holder, record.retake_until, int(record.reclaimable), record.id),
            )

    def drop(self, rid: str) -> None:
        with self.db.transaction() as conn:
            conn.execute("DELETE FROM resume_records WHERE id = ?", (rid,))


def _json(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"))


def _record(row: tuple[Any, ...]) -> ResumeRecord:
    rid, user, tid, channels, until, carried, expires_at, claimed, holder, retake_until, reclaimable = row
    return ResumeRecord(
        id=str(rid),
        user=str(user),
        channels={str(k): int(v) for k, v in json.loads(channels).items()},
        expires_at=float(expires_at),
        claimed=bool(claimed),
        until={str(k): int(v) for k, v in json.loads(until).items()},
        carried=list(json.loads(carried)),
        token_id=str(tid),
        holder=str(holder or ""),
        retake_until=float(retake_until or 0.0),
        reclaimable=bool(reclaimable),
    )
