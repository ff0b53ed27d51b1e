"""The chaos soak's verdict: every connection's received stream against the webapp's database.

Sans-I/O: plain data in (the persisted events, the connections each client
held, what each received, the history each client read after a fresh
reconnect), a :class:`Verdict` out. Unit-tested in ``tests/unit/test_soak_check.py``.

What a connection must have seen (DESIGN.md, "Ordering and no loss")
--------------------------------------------------------------------
A *client* is one user with one websocket at a time. Its connections
(*sessions*) form *segments*: a session that the fleet moved (``goodbye`` and
close, then ``rtm.connect`` again: a drain or a gateway shutdown) continues its
predecessor's segment, because its new gateway resumes where the old one
stopped; any other new session (after a gateway crash, a keepalive close, or a
reconnect the client chose) starts a new segment at its own bootstrap.

For each segment and each channel the client's user was ever a member of
(its user channel ``U…`` and team channel ``T…`` always), in seq order:

* The segment's **start** in that channel is its bootstrap seq + 1. The
  bootstrap is read by the gateway between the websocket's opening (``t_ws``)
  and ``hello``, so every event created after ``hello`` is at or after the
  start, and none created before ``t_ws`` is. The start is the smaller of
  the first seq created after ``hello`` and the first seq the segment received.
* Its **end** is the channel's last seq if the segment's last session was
  still open when the soak ended (after traffic stopped and deliveries
  settled), else the last seq the segment received in that channel: what was
  in flight when a connection died is not owed to it (it is owed to the
  client's next segment through ``conversations.history``, checked below).
* Between start and end, an event is **required** when the user was a member
  at that seq: after the seq of its ``member_joined_channel`` (exclusive: the
  join's ``since``) and before the seq of its ``member_left_channel``. The
  join and leave events themselves, and events after a leave, race the
  membership change on the user channel: allowed, not required.
* Everything else is accounted for by reason (:data:`REASONS`): never silently dropped.

Checks, per client and channel over all its sessions in arrival order: a
required event not received is **lost**; a seq received twice is
**duplicated**; a seq received after a higher one is **reordered**. A
received frame that matches no persisted event is **unmatched**.

Between two segments, the events the client was owed but never got (the old
connection's tail and the time away) are what it must read with
``conversations.history`` after its new ``hello``: every plain message posted
in that range must be in the history the client read, unless it was deleted
before the read (``lost_from_history`` otherwise). Edits, reactions and
membership events in the range show up as the state history returns and are
counted, not itemised.

Why one module of ~500 lines: it is the soak's verdict, one sans-I/O pass whose parts (event keys,
segments of a session, history reads, the per-reason accounting) share one data model and must
change together; splitting it would spread one definition of "lost" over several files. Its unit
tests (tests/unit/test_soak_check.py) read it as one.
"""

from __future__ import annotations

import hashlib
import json
from bisect import bisect_left, bisect_right
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Any

INFINITE_SEQ = 1 << 62
MAX_EXAMPLES = 20  # failures kept with their details per kind

# Why a (client, event) pair was not required, or what happened to it.
REASONS = {
    "delivered": "required and received exactly once, in order",
    "lost": "required and never received (a failure)",
    "delivered_membership_race": "received; the join/leave event itself, or after a leave but before the leave reached the client",
    "not_member_race": "not received; the user's own join/leave event in that channel (allowed either way)",
    "not_member": "the user was not a member at that seq",
    "bootstrap_race": "created between the first websocket's opening and its hello, not received (before its bootstrap)",
    "tail_at_close": "created before the connection closed, not yet delivered when it closed (owed to history)",
    "away": "created while the client had no connection (owed to history)",
    "after_last_close": "created after the client's last connection closed for good",
}
FAILURES = ("lost", "duplicated", "reordered", "lost_from_history")


def event_key(payload: bytes) -> int:
    """The 64-bit key the soak clients record per received frame: blake2b of the exact bytes."""
    return int.from_bytes(hashlib.blake2b(payload, digest_size=8).digest(), "little", signed=True)


@dataclass(frozen=True)
class DbEvent:
    """One row of the webapp's ``events`` table (``created_us``: its ``created_at`` in µs)."""

    channel: str
    seq: int
    created_us: int
    json: str


@dataclass
class Session:
    """One websocket a client held. Times are unix µs (0: never happened);
    ``start`` is ``first``, ``moved`` (after a goodbye: resumes) or anything else (fresh)."""

    sid: int
    client: int
    t_ws_us: int
    t_hello_us: int
    t_close_us: int = 0
    close_code: int = 0
    start: str = "first"


@dataclass
class HistoryRead:
    """What a client read with ``conversations.history`` in one channel after a fresh reconnect."""

    read_us: int
    oldest_us: int
    ts: set[str]
    complete: bool = True


@dataclass
class Verdict:
    pairs: Counter[str] = field(default_factory=Counter)  # (client, event) pairs by reason
    failures: Counter[str] = field(default_factory=Counter)
    examples: dict[str, list[dict[str, Any]]] = field(default_factory=lambda: defaultdict(list))
    history: Counter[str] = field(default_factory=Counter)  # how owed events were found in history
    lost_by_cause: Counter[str] = field(default_factory=Counter)
    unmatched: int = 0
    early: int = 0  # received but created before its fresh segment's websocket opened
    tail_age_s: list[float] = field(default_factory=list)  # per tail event: close time - created
    sessions: int = 0
    segments: int = 0
    clients: int = 0
    received: int = 0

    def fail(self, failure: str, **detail: Any) -> None:
        self.failures[failure] += 1
        if len(self.examples[failure]) < MAX_EXAMPLES:
            self.examples[failure].append(detail)

    @property
    def ok(self) -> bool:
        return not any(self.failures[k] for k in (*FAILURES, "delivered_to_non_member")) and not self.unmatched

    def as_dict(self) -> dict[str, Any]:
        ages = sorted(self.tail_age_s)
        return {
            "ok": self.ok,
            "clients": self.clients,
            "connections": self.sessions,
            "segments": self.segments,
            "frames_checked": self.received,
            "lost": self.failures["lost"],
            "lost_by_cause": dict(self.lost_by_cause),
            "duplicated": self.failures["duplicated"],
            "reordered": self.failures["reordered"],
            "lost_from_history": self.failures["lost_from_history"],
            "unmatched_frames": self.unmatched,
            "delivered_to_non_member": self.failures["delivered_to_non_member"],
            "received_before_bootstrap": self.early,
            "pairs_by_reason": dict(self.pairs),
            "history": dict(self.history),
            "tail_age_s": {
                "n": len(ages),
                "p50": ages[len(ages) // 2] if ages else None,
                "max": ages[-1] if ages else None,
            },
            "examples": {k: v for k, v in self.examples.items() if v},
        }


@dataclass
class _Parsed:
    type: str
    subtype: str
    user: str
    ts: str
    deleted_ts: str
    channel: str  # the payload's ``channel`` when it is an id (channel_left names the channel left)


def _parse(text: str) -> _Parsed:
    doc = json.loads(text)
    return _Parsed(
        str(doc.get("type", "")),
        str(doc.get("subtype", "")),
        str(doc.get("user", "")) if isinstance(doc.get("user"), str) else "",
        str(doc.get("ts", "")),
        str(doc.get("deleted_ts", "")),
        doc["channel"] if isinstance(doc.get("channel"), str) else "",
    )


def event_kind(text: str) -> str:
    """``type`` or ``type/subtype`` of an event's JSON, for the tables."""
    p = _parse(text)
    return f"{p.type}/{p.subtype}" if p.subtype else p.type


def ts_us(ts: str) -> int:
    sec, _, frac = ts.partition(".")
    return int(sec) * 1_000_000 + int((frac + "000000")[:6])


class _Channel:
    """A channel's events in seq order, with what the check needs per event."""

    def __init__(self, events: list[DbEvent]) -> None:
        events.sort(key=lambda e: e.seq)
        self.seqs = [e.seq for e in events]
        self.created = [e.created_us for e in events]
        self.created_max = []  # non-decreasing (a clock step back cannot confuse the bisect)
        top = 0
        for t in self.created:
            top = max(top, t)
            self.created_max.append(top)
        self.parsed = [_parse(e.json) for e in events]
        # membership changes: user -> [(seq, +1 join / -1 leave)]
        self.changes: dict[str, list[tuple[int, int]]] = defaultdict(list)
        self.deleted_at: dict[str, int] = {}  # deleted message ts -> the deletion's created_us
        self.left: dict[str, list[int]] = defaultdict(list)  # (a user channel) channel left -> seqs of its *_left
        for e, p in zip(events, self.parsed, strict=True):
            if p.type == "member_joined_channel" and p.user:
                self.changes[p.user].append((e.seq, 1))
            elif p.type == "member_left_channel" and p.user:
                self.changes[p.user].append((e.seq, -1))
            elif p.subtype == "message_deleted" and p.deleted_ts:
                self.deleted_at[p.deleted_ts] = e.created_us
            elif p.type in ("channel_left", "group_left") and p.channel:
                self.left[p.channel].append(e.seq)

    def first_created_after(self, t_us: int) -> int:
        """The first seq created after ``t_us`` (INFINITE_SEQ if none)."""
        i = bisect_right(self.created_max, t_us)
        return self.seqs[i] if i < len(self.seqs) else INFINITE_SEQ


def _member_at(changes: list[tuple[int, int]], initially: bool, seq: int) -> bool:
    """Whether the user of ``changes`` (in seq order) was in the channel when event ``seq`` was
    made (its own join or leave event counts as in)."""
    member = initially
    for at, change in changes:
        if at >= seq:
            return member or at == seq
        member = change == 1
    return member


def _membership(changes: list[tuple[int, int]], initially: bool, seqs: list[int]) -> list[tuple[str, int]]:
    """Per event of the channel: (``member``, -1), (``race``, -1) for the join or leave event itself,
    (``after_leave``, k) after the user's k-th leave (0-based), or (``no``, -1)."""
    out = []
    member, leaves = initially, 0
    after_leave = False
    by_seq = dict(changes)
    for seq in seqs:
        change = by_seq.get(seq)
        if change == 1:
            out.append(("race", -1))
            member, after_leave = True, False
        elif change == -1:
            out.append(("race", -1))
            member, after_leave = False, True
            leaves += 1
        elif member:
            out.append(("member", -1))
        elif after_leave:
            out.append(("after_leave", leaves - 1))
        else:
            out.append(("no", -1))
    return out


def check(
    events: list[DbEvent],
    sessions: list[Session],
    received: list[tuple[int, int]],
    client_users: dict[int, tuple[str, str]],
    initial_channels: dict[int, set[str]],
    history: dict[int, dict[str, HistoryRead]],
) -> Verdict:
    """The verdict.

    ``received``: (sid, key) per frame, in arrival order (per client, its sessions' frames in the order
    they arrived; sessions of one client never overlap in time). ``client_users``: client -> (user id,
    team id). ``initial_channels``: client -> conversations its user was in with no join event in the
    database (seeded). ``history``: sid of a fresh segment's first session -> channel -> what it read."""
    v = Verdict()
    by_channel: dict[str, list[DbEvent]] = defaultdict(list)
    for e in events:
        by_channel[e.channel].append(e)
    chans = {ch: _Channel(evs) for ch, evs in by_channel.items()}
    where: dict[int, list[tuple[str, int]]] = defaultdict(list)
    for e in events:
        where[event_key(e.json.encode())].append((e.channel, e.seq))

    sess_by_client: dict[int, list[Session]] = defaultdict(list)
    for s in sorted(sessions, key=lambda s: (s.client, s.t_ws_us, s.sid)):
        sess_by_client[s.client].append(s)
    session_of = {s.sid: s for s in sessions}
    frames_by_client: dict[int, list[tuple[int, int]]] = defaultdict(list)
    for sid, key in received:
        frames_by_client[session_of[sid].client].append((sid, key))

    v.clients = len(sess_by_client)
    v.sessions = len(sessions)
    for client, sess in sess_by_client.items():
        user, team = client_users[client]
        _check_client(
            v,
            client,
            user,
            team,
            sess,
            frames_by_client.get(client, []),
            chans,
            where,
            initial_channels.get(client, set()),
            history,
        )
    return v


def _check_client(
    v: Verdict,
    client: int,
    user: str,
    team: str,
    sess: list[Session],
    frames: list[tuple[int, int]],
    chans: dict[str, _Channel],
    where: dict[int, list[tuple[str, int]]],
    initial: set[str],
    history: dict[int, dict[str, HistoryRead]],
) -> None:
    # segments: a moved session continues its predecessor's
    segments: list[list[Session]] = []
    for s in sess:
        if s.start == "moved" and segments:
            segments[-1].append(s)
        else:
            segments.append([s])
    v.segments += len(segments)
    seg_of = {s.sid: i for i, seg in enumerate(segments) for s in seg}

    # each frame to (channel, seq); duplicates and reordering per channel over the client's whole life
    got: dict[str, list[set[int]]] = defaultdict(lambda: [set() for _ in segments])
    last: dict[str, int] = {}
    seen: dict[str, set[int]] = defaultdict(set)
    arrival: dict[tuple[str, int], int] = {}  # (channel, seq) -> index of its first arrival at this client
    for n, (sid, key) in enumerate(frames):
        v.received += 1
        cands = where.get(key)
        if not cands:
            v.unmatched += 1
            if len(v.examples["unmatched"]) < MAX_EXAMPLES:
                v.examples["unmatched"].append({"client": client, "user": user, "sid": sid, "key": key})
            continue
        # identical JSON in several channels (``channel_left`` names no user): this client's own
        # user channel, never another user's
        mine = [(cc, cs) for cc, cs in cands if cc == user or not cc.startswith("U")] or cands
        ch = mine[0][0]
        prev = last.get(ch, 0)
        seqs = sorted(cs for cc, cs in mine if cc == ch)
        # identical JSON (a user's second leave of a channel is byte for byte its first): the next one
        # in order at which this user was in the channel, else the next one in order
        later = [s for s in seqs if s > prev] or seqs[:1]
        if len(later) > 1 and ch not in (user, team):
            changes = chans[ch].changes.get(user, [])
            later = [s for s in later if _member_at(changes, ch in initial, s)] or later
        seq = later[0]
        sk = seg_of[sid]
        detail = {"client": client, "user": user, "channel": ch, "seq": seq, "sid": sid, "segment": sk}
        if seq in seen[ch]:
            v.fail("duplicated", **detail)
        elif seq < prev:
            v.fail("reordered", **detail, after=prev)
        seen[ch].add(seq)
        arrival.setdefault((ch, seq), n)
        last[ch] = max(prev, seq)
        got[ch][sk].add(seq)
        fc = chans[ch]
        i = bisect_left(fc.seqs, seq)
        if i < len(fc.seqs) and fc.created[i] < segments[sk][0].t_ws_us:
            v.early += 1

    # the channels this client is accounted over
    relevant = {user, team} | set(initial)
    for ch, chan in chans.items():
        if user in chan.changes:
            relevant.add(ch)
    t_first = sess[0].t_ws_us
    for ch in sorted(relevant):
        c = chans.get(ch)
        if c is None:
            continue
        always = ch in (user, team)
        status = (
            [("member", -1)] * len(c.seqs) if always else _membership(c.changes.get(user, []), ch in initial, c.seqs)
        )
        own = chans.get(user)
        left_seqs = own.left.get(ch, []) if own is not None else []
        # per segment: [start, end] in seq space
        ranges = []
        for j, seg in enumerate(segments):
            rec = got[ch][j] if ch in got else set()
            start = c.first_created_after(seg[0].t_hello_us) if seg[0].t_hello_us else INFINITE_SEQ
            if rec:
                start = min(start, min(rec))
            open_at_end = seg[-1].t_close_us == 0
            end = INFINITE_SEQ if open_at_end else (max(rec) if rec else start - 1)
            ranges.append((start, end))
        for idx, seq in enumerate(c.seqs):
            created = c.created[idx]
            if created < t_first:
                continue  # before the client's first connection: nothing to account
            k = _segment_for(ranges, seq)
            st, leave_k = status[idx]
            if k is not None:
                rec = got[ch][k] if ch in got else set()
                if st == "member":
                    if seq in rec:
                        v.pairs["delivered"] += 1
                    else:
                        v.pairs["lost"] += 1
                        p = c.parsed[idx]
                        cause = _loss_cause(segments[k], c.changes.get(user, []), c, created)
                        v.lost_by_cause[cause] += 1
                        v.fail(
                            "lost",
                            cause=cause,
                            client=client,
                            user=user,
                            channel=ch,
                            seq=seq,
                            kind=p.type + (f"/{p.subtype}" if p.subtype else ""),
                            segment=k,
                            sids=[s.sid for s in segments[k]],
                            created_us=created,
                        )
                elif st == "race":
                    v.pairs["delivered_membership_race" if seq in rec else "not_member_race"] += 1
                elif st == "after_leave" and seq in rec:
                    # allowed only until the leave reached the client: a gateway stops the channel
                    # when it handles the *_left event of the user channel, before or as it writes it
                    left_at = arrival.get((user, left_seqs[leave_k])) if leave_k < len(left_seqs) else None
                    if left_at is not None and arrival[(ch, seq)] > left_at:
                        v.fail(
                            "delivered_to_non_member", client=client, user=user, channel=ch, seq=seq, after_leave=True
                        )
                    else:
                        v.pairs["delivered_membership_race"] += 1
                else:
                    v.pairs["not_member"] += 1  # (a delivery here is counted below as unexpected)
                    if seq in rec:
                        v.fail("delivered_to_non_member", client=client, user=user, channel=ch, seq=seq)
                continue
            if st != "member":
                v.pairs["not_member_race" if st == "race" else "not_member"] += 1
                continue
            # outside every segment: before the first, between two, or after the last
            nxt = next((j for j, (s0, _) in enumerate(ranges) if s0 > seq), None)
            if nxt == 0:
                v.pairs["bootstrap_race"] += 1
                continue
            prev_k = (nxt - 1) if nxt is not None else len(segments) - 1
            t_close = segments[prev_k][-1].t_close_us
            if t_close and created <= t_close:
                v.pairs["tail_at_close"] += 1
                v.tail_age_s.append((t_close - created) / 1e6)
            elif nxt is None:
                v.pairs["after_last_close"] += 1
                continue
            else:
                v.pairs["away"] += 1
            if nxt is None:
                v.history["never_reconnected"] += 1
                continue
            _check_history(v, client, user, ch, seq, c, idx, history.get(segments[nxt][0].sid))


MOVE_RACE_S = 5.0  # a session is detached at its old gateway at most this long before its close


def _loss_cause(segment: list[Session], changes: list[tuple[int, int]], c: _Channel, created_us: int) -> str:
    """Why a required event may have been lost, as far as the data tells: ``membership_changed_during_move``
    when it was created during a move of the connection (from :data:`MOVE_RACE_S` before the old
    session closed to the new one's hello) and the user joined or left that channel from
    :data:`MOVE_RACE_S` before the close to :data:`MOVE_RACE_S` after the new hello (while the new
    gateway may still be catching the session up); ``during_move`` for other losses in a move's
    window; else ``other``."""
    race_us = int(MOVE_RACE_S * 1e6)
    for old, new in zip(segment, segment[1:], strict=False):
        lo, hi = old.t_close_us - race_us, new.t_hello_us
        if lo <= created_us <= hi:
            for seq, _ in changes:
                i = bisect_left(c.seqs, seq)
                if i < len(c.seqs) and c.seqs[i] == seq and lo <= c.created[i] <= hi + race_us:
                    return "membership_changed_during_move"
            return "during_move"
    return "other"


def _segment_for(ranges: list[tuple[int, int]], seq: int) -> int | None:
    for k, (start, end) in enumerate(ranges):
        if start <= seq <= end:
            return k
    return None


def _check_history(
    v: Verdict,
    client: int,
    user: str,
    ch: str,
    seq: int,
    c: _Channel,
    idx: int,
    reads: dict[str, HistoryRead] | None,
) -> None:
    """An event the client was owed across a fresh reconnect: is it in what the client read?"""
    p = c.parsed[idx]
    if not ch.startswith(("C", "G", "D")):
        v.history["user_or_team_channel"] += 1  # not conversations: nothing to read them from
        return
    if p.type != "message" or p.subtype:
        v.history["state_only"] += 1  # edits, deletions, reactions, membership: history shows the result
        return
    read = (reads or {}).get(ch)
    if read is None:
        v.history["not_read"] += 1  # the client no longer a member, or its read failed (counted by the driver)
        return
    deleted = c.deleted_at.get(p.ts)
    if p.ts in read.ts:
        v.history["found"] += 1
    elif deleted is not None and deleted <= read.read_us:
        v.history["deleted_before_read"] += 1
    elif ts_us(p.ts) <= read.oldest_us or not read.complete:
        v.history["older_than_read"] += 1
    else:
        v.fail("lost_from_history", client=client, user=user, channel=ch, seq=seq, ts=p.ts, read_us=read.read_us)
