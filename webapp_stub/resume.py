"""Resume records: where a connection that the fleet moves stopped, until it reconnects.

Sans-I/O (an injectable clock, no awaits). The flow (DESIGN.md, "Ordering and
no loss"): a gateway that is about to send ``goodbye`` posts, for each of its
connections, the user and the last seq it delivered on each channel
(``POST /internal/resume``); the webapp keeps that record here for
:data:`RESUME_TTL_S`. The client's next ``rtm.connect`` :meth:`claims <ResumeBook.claim>`
the user's oldest pending record and names it in the ticket; the gateway
passes it to ``/internal/bootstrap``, which :meth:`takes <ResumeBook.take>` it
and answers the recorded seqs, so the new gateway replays what the connection
missed, exactly once.

Contract
--------
* A record is used at most once: ``take`` (the bootstrap) removes it. Only the
  same *holder* (the ticket nonce of the connection whose bootstrap took it;
  tickets are single-use, so no other connection has it) may take it again,
  within :data:`RETAKE_GRACE_S`: a gateway whose bootstrap call timed out after
  the webapp had taken the record retries it and gets the same answer, instead
  of a fresh bootstrap that would skip what the moved connection missed.
  ``claim`` hands each record to one ``rtm.connect``, unless every record of
  the user is claimed and not yet taken: then a retry gets the oldest again.
* A record taken by a holder stays *claimable once more* within the grace:
  when its holder's bootstrap failed for good (every attempt of the gateway
  timed out, or the client went away before ``hello``), the client's next
  ``rtm.connect`` gets the taken record's id again, so that the new ticket's
  bootstrap (another holder) is refused and its gateway closes with 4010: the
  client is told to catch up from history, instead of a ticket naming no record
  that would start it silently at a fresh bootstrap and skip what it missed. A
  taken record refused to another holder is not handed out again (the client's
  next connection is a fresh one), nor one whose holder :meth:`confirmed
  <ResumeBook.confirm>` it (its gateway sent ``hello``: the resume happened, and
  the user's next connections are unrelated to it).
* Records expire :data:`RESUME_TTL_S` after they were added, claimed or not.
  An expired or unknown record is simply absent: the connection starts at its
  bootstrap like a new one (and reads what it missed with history).
* At most :data:`MAX_RESUME_RECORDS` live at once; beyond that the oldest
  are forgotten first (a gateway shutting down with more connections than
  that loses resume, not messages: they stay in history).
"""

from __future__ import annotations

import secrets
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

# Long enough for a client to notice goodbye, call rtm.connect (which it may
# retry with backoff) and reconnect; short enough that a client that never
# comes back does not pin memory.
RESUME_TTL_S = 120.0
# A generous bound: one gateway's connections in a drain.
MAX_RESUME_RECORDS = 200_000
# How long the holder of a taken record may take it again (its gateway retrying a
# bootstrap whose reply it did not get): a few of the gateway's bootstrap attempts.
RETAKE_GRACE_S = 60.0


@dataclass
class ResumeRecord:
    id: str
    user: str
    channels: dict[str, int]  # channel -> last seq the moved connection delivered
    expires_at: float
    claimed: bool = False
    # channel -> seq of a leave the connection had not yet reached (it is owed the events up to it)
    until: dict[str, int] = field(default_factory=dict)
    # A Socket Mode app's record (``user`` is then the app id) also carries the
    # envelopes its moved connections had not acknowledged (gateway/socket_mode.py).
    carried: list[Any] = field(default_factory=list)


class ResumeBook:
    """The live resume records, by id and per user in arrival order."""

    def __init__(
        self,
        ttl_s: float = RESUME_TTL_S,
        max_records: int = MAX_RESUME_RECORDS,
        clock: Callable[[], float] = time.monotonic,
        retake_grace_s: float = RETAKE_GRACE_S,
    ) -> None:
        self.ttl_s = ttl_s
        self.max_records = max_records
        self.clock = clock
        self.retake_grace_s = retake_grace_s
        # rid -> (holder, record, until): records taken by a holder that may take them again
        self._taken: OrderedDict[str, tuple[str, ResumeRecord, float]] = OrderedDict()
        # user -> taken record ids that claim may hand out once more (not yet refused to another holder)
        self._reclaimable: dict[str, list[str]] = {}
        self._records: OrderedDict[str, ResumeRecord] = OrderedDict()  # oldest first: expiry order
        self._pending: dict[str, deque[str]] = {}  # user -> record ids not yet taken, oldest first

    def __len__(self) -> int:
        return len(self._records)

    def add(
        self,
        user: str,
        channels: dict[str, int],
        carried: list[Any] | None = None,
        until: dict[str, int] | None = None,
    ) -> str:
        """Record where a moved connection of ``user`` stopped (and the leaves it had not reached
        yet, ``until``); returns the record id."""
        self._expire()
        while len(self._records) >= self.max_records:
            self._drop(next(iter(self._records)))
        record = ResumeRecord(
            secrets.token_urlsafe(12),
            user,
            dict(channels),
            self.clock() + self.ttl_s,
            carried=list(carried or []),
            until=dict(until or {}),
        )
        self._records[record.id] = record
        self._pending.setdefault(user, deque()).append(record.id)
        return record.id

    def claim(self, user: str) -> str:
        """The id of ``user``'s oldest unclaimed record, now claimed; "" if none.

        With no unclaimed record left, the oldest claimed one that no
        bootstrap has taken yet is handed out again: the ticket that claimed it
        failed (expired, refused, the socket never opened), and the client is
        retrying ``rtm.connect``; without the record it would skip what it
        missed. With no pending record, a record taken by a bootstrap that may
        have failed is handed out once more (see the contract above).
        """
        self._expire()
        pending = self._pending.get(user)
        if not pending:
            return self._taken_once_more(user)
        fallback = ""
        for rid in pending:
            record = self._records.get(rid)
            if record is None:
                continue
            if not record.claimed:
                record.claimed = True
                return rid
            fallback = fallback or rid
        return fallback

    def _taken_once_more(self, user: str) -> str:
        """The oldest record of ``user`` taken by a holder within the grace and not refused to
        another holder yet, or "": its ticket's bootstrap will be refused (the client resyncs)."""
        for rid in self._reclaimable.get(user, ()):
            if rid in self._taken:
                return rid
        return ""

    def take(self, rid: str, user: str) -> dict[str, int] | None:
        """Remove and return the channels of record ``rid`` if it is live and ``user``'s."""
        record = self.take_record(rid, user)
        return record.channels if record is not None else None

    def take_record(self, rid: str, user: str, holder: str = "") -> ResumeRecord | None:
        """Remove and return record ``rid`` if it is live and ``user``'s. With ``holder`` (the taking
        connection's ticket nonce), the same holder may take it again for ``retake_grace_s``."""
        self._expire()
        record = self._records.get(rid)
        if record is None or record.user != user:
            taken = self._taken.get(rid)
            if taken is not None and taken[1].user == user:
                if holder and taken[0] == holder:
                    return taken[1]
                self._not_reclaimable(user, rid)  # refused to another connection: handed out no more
            return None
        self._drop(rid)
        if holder:
            while len(self._taken) >= self.max_records:
                old, (_, old_record, _) = self._taken.popitem(last=False)
                self._not_reclaimable(old_record.user, old)
            self._taken[rid] = (holder, record, self.clock() + self.retake_grace_s)
            self._reclaimable.setdefault(user, []).append(rid)
        return record

    def confirm(self, rid: str, user: str, holder: str) -> bool:
        """The connection holding taken record ``rid`` got its ``hello``: the record is handed out no
        more (the holder may still take it again within the grace). False if ``rid`` is not taken
        by that holder of ``user`` (unknown, past the grace, another's)."""
        self._expire()
        taken = self._taken.get(rid)
        if not holder or taken is None or taken[0] != holder or taken[1].user != user:
            return False
        self._not_reclaimable(user, rid)
        return True

    def _not_reclaimable(self, user: str, rid: str) -> None:
        rids = self._reclaimable.get(user)
        if rids is None:
            return
        try:
            rids.remove(rid)
        except ValueError:
            pass
        if not rids:
            del self._reclaimable[user]

    def _drop(self, rid: str) -> None:
        record = self._records.pop(rid, None)
        if record is None:
            return
        pending = self._pending.get(record.user)
        if pending is not None:
            try:
                pending.remove(rid)
            except ValueError:
                pass
            if not pending:
                del self._pending[record.user]

    def _expire(self) -> None:
        now = self.clock()
        while self._taken:
            rid, (_, taken, until) = next(iter(self._taken.items()))
            if until > now:
                break
            del self._taken[rid]
            self._not_reclaimable(taken.user, rid)
        while self._records:
            rid, record = next(iter(self._records.items()))
            if record.expires_at > now:
                return
            self._drop(rid)
