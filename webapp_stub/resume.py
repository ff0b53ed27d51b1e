"""Resume records: where a connection that the fleet moves stopped, until it reconnects.

Sans-I/O (an injectable clock, no awaits; the rows go to a :class:`ResumeRows`
sink, SQLite in the webapp: :mod:`webapp_stub.resume_table`). The flow
(DESIGN.md, "Ordering and no loss"): a gateway that is about to send
``goodbye`` posts, for each of its connections, the user, the *token id* of the
token the connection was opened with, and the last seq it delivered on each
channel (``POST /internal/resume``); the webapp keeps that record here for
:data:`RESUME_TTL_S`. The client's next ``rtm.connect`` (with the same token)
:meth:`claims <ResumeBook.claim>` the oldest pending record of that user and
token and names it in the ticket; the gateway passes it to
``/internal/bootstrap``, which :meth:`takes <ResumeBook.take>` it and answers
the recorded seqs, so the new gateway replays what the connection missed,
exactly once.

Contract
--------
* Records are durable: every change is written to the :class:`ResumeRows` sink
  in the call that makes it, and a book built on the same rows (a restarted
  webapp) holds the same records, claimed and taken state included. The
  webapp's sink joins the group commit (:mod:`webapp_stub.commit`), and the
  internal endpoint replies only once that batch is committed, so a record the
  gateway was answered for (and said ``goodbye`` after) survives a kill of the
  webapp process, and a power loss (docs/hardening-gateway.md, "Resume records").
* Records are per token: a record is claimed only by an ``rtm.connect`` with
  the token whose connection was moved (its :func:`token_id`: a hash, never
  the token). Two devices of one user, with two tokens, never take each
  other's records (a device that resumed from another's position would skip
  or repeat events). Connections opened with one token share its records,
  oldest first. A Socket Mode app's records are keyed by the app id alone
  (token id ""): any connection of an app takes over its envelopes.
* A record is used at most once: ``take`` (the bootstrap) removes it. Only the
  same *holder* (the ticket nonce of the connection whose bootstrap took it;
  tickets are single-use, so no other connection has it) may take it again,
  within :data:`RETAKE_GRACE_S`: a gateway whose bootstrap call timed out after
  the webapp had taken the record retries it and gets the same answer, instead
  of a fresh bootstrap that would skip what the moved connection missed.
  ``claim`` hands each record to one ``rtm.connect``, unless every record of
  the token is claimed and not yet taken: then a retry gets the oldest again.
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
* A record whose connection went away before its ``goodbye`` is *withdrawn*
  (:meth:`ResumeBook.withdraw`): the client closed the socket itself (or lost
  it) while the gateway was leaving the record, so it never learns it was
  moved, and its next ``rtm.connect`` may come before the record exists and
  start fresh. Left pending, the record would be claimed by a *later* move of
  the same token and replay, from the old position, events that client already
  had (docs/soak.md, Findings). A record that an ``rtm.connect`` has already
  claimed stays: that connection resumes from it, which is right for it.
* A revoked token's records are gone at once (:meth:`ResumeBook.revoke`, called by
  ``auth.revoke``), pending, claimed and taken alike: its ``rtm.connect`` answers
  ``invalid_auth``, and a ticket minted before the revoke is refused at the bootstrap.
* Records expire :data:`RESUME_TTL_S` after they were added, claimed or not.
  An expired or unknown record is simply absent: the connection starts at its
  bootstrap like a new one (and reads what it missed with history).
* Bounded: at most :data:`MAX_RESUME_RECORDS` live records in all and
  :data:`MAX_RESUME_RECORDS_PER_USER` per user (an app counts as a user).
  Beyond either, :meth:`add` refuses the new record (``ApiError``
  ``too_many_resume_records``) rather than forgetting an older one: the
  gateway then closes that one connection with 4010 and no ``goodbye`` (the
  client catches up from history, and knows it must), whereas forgetting a
  record whose ``goodbye`` was already sent would start that client at a fresh
  bootstrap silently.
"""

from __future__ import annotations

import hashlib
import secrets
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol

from webapp_stub.errors import ApiError

# Long enough for a client to notice goodbye, call rtm.connect (which it may
# retry with backoff) and reconnect; short enough that a client that never
# comes back does not pin memory or rows.
RESUME_TTL_S = 120.0
# A generous bound: one gateway's connections in a drain.
MAX_RESUME_RECORDS = 200_000
# One user's moved connections waiting at once: a gateway holds at most 50 per user
# (gateway/limits.py, DEFAULT_MAX_CONNECTIONS_PER_USER), and a drained region moves all of its
# gateways' at once; this is five gateways' worth. Beyond it the gateway closes the extra ones
# with 4010 (they catch up from history).
MAX_RESUME_RECORDS_PER_USER = 256
# How long the holder of a taken record may take it again (its gateway retrying a
# bootstrap whose reply it did not get): a few of the gateway's bootstrap attempts.
RETAKE_GRACE_S = 60.0
TOKEN_ID_HEX_CHARS = 32  # 128 bits of SHA-256: tells tokens apart, reveals nothing of one
TOKEN_ID_LABEL = b"rtm/v1 resume token id\x00"


def token_id(token: str) -> str:
    """The id of an API token that its resume records are keyed by: a SHA-256 of the token under a
    fixed label, never the token. Tokens are 128-bit random (webapp_stub/codecs.py), so the id
    (which travels in tickets and sits in the table) cannot be turned back into one."""
    return hashlib.sha256(TOKEN_ID_LABEL + token.encode()).hexdigest()[:TOKEN_ID_HEX_CHARS]


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
    token_id: str = ""  # :func:`token_id` of the token the moved connection was opened with
    # Taken by a bootstrap: the ticket nonce that took it, until when it may take it again,
    # and whether claim may still hand it out once more (see the module's contract).
    holder: str = ""
    retake_until: float = 0.0
    reclaimable: bool = False

    @property
    def key(self) -> tuple[str, str]:
        return self.user, self.token_id


class ResumeRows(Protocol):
    """Where the book keeps its records durably (:class:`webapp_stub.resume_table.ResumeTable`)."""

    def load(self) -> Iterable[ResumeRecord]:
        """Every stored record (live, taken or expired)."""
        ...

    def put(self, record: ResumeRecord) -> None:
        """Store ``record`` as it is now (insert or replace)."""
        ...

    def mark(self, record: ResumeRecord) -> None:
        """Store ``record``'s state (claimed, holder, retake_until, reclaimable); the rest of it
        is as :meth:`put` stored it (its channels are not written again)."""
        ...

    def drop(self, rid: str) -> None:
        """Forget record ``rid`` (no error if it is not stored)."""
        ...


class MemoryRows:
    """Rows that live as long as the process (tests, tools): a dict."""

    def __init__(self) -> None:
        self.rows: dict[str, ResumeRecord] = {}

    def load(self) -> Iterable[ResumeRecord]:
        return list(self.rows.values())

    def put(self, record: ResumeRecord) -> None:
        self.rows[record.id] = ResumeRecord(**{**record.__dict__})

    def mark(self, record: ResumeRecord) -> None:
        self.put(record)

    def drop(self, rid: str) -> None:
        self.rows.pop(rid, None)


Key = tuple[str, str]  # (user or app id, token id)


class ResumeBook:
    """The live resume records, by id and per (user, token id) in arrival order."""

    def __init__(
        self,
        ttl_s: float = RESUME_TTL_S,
        max_records: int = MAX_RESUME_RECORDS,
        clock: Callable[[], float] = time.time,
        retake_grace_s: float = RETAKE_GRACE_S,
        rows: ResumeRows | None = None,
        max_records_per_user: int = MAX_RESUME_RECORDS_PER_USER,
    ) -> None:
        """``clock`` is wall time: records outlive the process, so their expiry must mean the same
        after a restart. With ``rows``, the records stored there are loaded (a restart)."""
        self.ttl_s = ttl_s
        self.max_records = max_records
        self.max_records_per_user = max_records_per_user
        self.clock = clock
        self.retake_grace_s = retake_grace_s
        self.rows: ResumeRows = rows if rows is not None else MemoryRows()
        # rid -> record taken by a holder that may take it again, in retake_until order
        self._taken: OrderedDict[str, ResumeRecord] = OrderedDict()
        # key -> taken record ids that claim may hand out once more (not yet refused to another holder)
        self._reclaimable: dict[Key, list[str]] = {}
        self._records: OrderedDict[str, ResumeRecord] = OrderedDict()  # oldest first: expiry order
        self._pending: dict[Key, deque[str]] = {}  # key -> record ids not yet taken, oldest first
        self._per_user: dict[str, int] = {}  # user -> live (untaken) records
        self._load()

    def __len__(self) -> int:
        return len(self._records)

    def _load(self) -> None:
        """Rebuild the book from its rows (what a previous process of the webapp left)."""
        stored = list(self.rows.load())
        for record in sorted((r for r in stored if not r.holder), key=lambda r: r.expires_at):
            self._insert(record)
        for record in sorted((r for r in stored if r.holder), key=lambda r: r.retake_until):
            self._taken[record.id] = record
            if record.reclaimable:
                self._reclaimable.setdefault(record.key, []).append(record.id)
        self._expire()

    def _insert(self, record: ResumeRecord) -> None:
        self._records[record.id] = record
        self._pending.setdefault(record.key, deque()).append(record.id)
        self._per_user[record.user] = self._per_user.get(record.user, 0) + 1

    def add(
        self,
        user: str,
        channels: dict[str, int],
        carried: list[Any] | None = None,
        until: dict[str, int] | None = None,
        token_id: str = "",
    ) -> str:
        """Record where a moved connection of ``user`` (opened with the token of ``token_id``) stopped,
        and the leaves it had not reached yet (``until``); returns the record id. Raises
        ``ApiError("too_many_resume_records")`` past either bound (see the module's contract)."""
        self._expire()
        if len(self._records) >= self.max_records or self._per_user.get(user, 0) >= self.max_records_per_user:
            raise ApiError("too_many_resume_records")
        record = ResumeRecord(
            secrets.token_urlsafe(12),
            user,
            dict(channels),
            self.clock() + self.ttl_s,
            carried=list(carried or []),
            until=dict(until or {}),
            token_id=token_id,
        )
        self._insert(record)
        self.rows.put(record)
        return record.id

    def claim(self, user: str, token_id: str = "") -> str:
        """The id of the oldest unclaimed record of ``user`` and ``token_id``, now claimed; "" if none.

        With no unclaimed record left, the oldest claimed one that no
        bootstrap has taken yet is handed out again: the ticket that claimed it
        failed (expired, refused, the socket never opened), and the client is
        retrying ``rtm.connect``; without the record it would skip what it
        missed. With no pending record, a record taken by a bootstrap that may
        have failed is handed out once more (see the contract above).
        """
        self._expire()
        key = (user, token_id)
        pending = self._pending.get(key)
        if not pending:
            return self._taken_once_more(key)
        fallback = ""
        for rid in pending:
            record = self._records.get(rid)
            if record is None:
                continue
            if not record.claimed:
                record.claimed = True
                self.rows.mark(record)
                return rid
            fallback = fallback or rid
        return fallback

    def withdraw(self, rid: str, user: str) -> bool:
        """Forget record ``rid`` of ``user`` if no ``rtm.connect`` has claimed it yet: its connection
        closed before it was told ``goodbye`` (see the module's contract). False if it is claimed,
        taken, expired, unknown or another user's; nothing changes then."""
        self._expire()
        record = self._records.get(rid)
        if record is None or record.user != user or record.claimed:
            return False
        self._drop(rid)
        self.rows.drop(rid)
        return True

    def revoke(self, user: str, token_id: str) -> int:
        """The token of ``token_id`` was revoked (``auth.revoke``): forget every record of ``user`` and
        that token, pending, claimed or taken, so that no ticket minted before the revoke resumes from
        one (the bootstrap refuses such a ticket anyway: ``token_revoked``). Returns how many."""
        self._expire()
        key = (user, token_id)
        rids = list(self._pending.get(key, ()))
        for rid in rids:
            self._drop(rid)
            self.rows.drop(rid)
        taken = [record for record in self._taken.values() if record.key == key]
        for record in taken:
            del self._taken[record.id]
            self._forget_taken(record)
        return len(rids) + len(taken)

    def _taken_once_more(self, key: Key) -> str:
        """The oldest record of ``key`` taken by a holder within the grace and not refused to
        another holder yet, or "": its ticket's bootstrap will be refused (the client resyncs)."""
        for rid in self._reclaimable.get(key, ()):
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
            if taken is not None and taken.user == user:
                if holder and taken.holder == holder:
                    return taken
                self._not_reclaimable(taken)  # refused to another connection: handed out no more
            return None
        self._drop(rid)
        if not holder:
            self.rows.drop(rid)
            return record
        while len(self._taken) >= self.max_records:
            _, old = self._taken.popitem(last=False)
            self._forget_taken(old)
        record.holder, record.retake_until, record.reclaimable = holder, self.clock() + self.retake_grace_s, True
        self._taken[rid] = record
        self._reclaimable.setdefault(record.key, []).append(rid)
        self.rows.mark(record)
        return record

    def confirm(self, rid: str, user: str, holder: str) -> bool:
        """The connection holding taken record ``rid`` got its ``hello``: the record is handed out no
        more (the holder may still take it again within the grace). False if ``rid`` is not taken
        by that holder of ``user`` (unknown, past the grace, another's)."""
        self._expire()
        taken = self._taken.get(rid)
        if not holder or taken is None or taken.holder != holder or taken.user != user:
            return False
        self._not_reclaimable(taken)
        return True

    def _not_reclaimable(self, record: ResumeRecord) -> None:
        rids = self._reclaimable.get(record.key)
        if rids is not None and record.id in rids:
            rids.remove(record.id)
            if not rids:
                del self._reclaimable[record.key]
        if record.reclaimable:
            record.reclaimable = False
            if record.id in self._taken:
                self.rows.mark(record)

    def _forget_taken(self, record: ResumeRecord) -> None:
        record.reclaimable = False  # gone: nothing to write but its removal
        self._not_reclaimable(record)
        self.rows.drop(record.id)

    def _drop(self, rid: str) -> None:
        record = self._records.pop(rid, None)
        if record is None:
            return
        pending = self._pending.get(record.key)
        if pending is not None:
            try:
                pending.remove(rid)
            except ValueError:
                pass
            if not pending:
                del self._pending[record.key]
        left = self._per_user.get(record.user, 1) - 1
        if left > 0:
            self._per_user[record.user] = left
        else:
            self._per_user.pop(record.user, None)

    def _expire(self) -> None:
        now = self.clock()
        while self._taken:
            record = next(iter(self._taken.values()))
            if record.retake_until > now:
                break
            del self._taken[record.id]
            self._forget_taken(record)
        while self._records:
            rid, record = next(iter(self._records.items()))
            if record.expires_at > now:
                return
            self._drop(rid)
            self.rows.drop(rid)
