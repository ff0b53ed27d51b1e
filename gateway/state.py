"""A gateway's in-memory model, sans I/O: which local sockets watch which channels,
and how far each channel's event stream has been delivered.

Commands in (attach a session, an event arrived, a session left), effects out
(channels to subscribe at or unsubscribe from their Channel Servers, history
to fetch). Delivery writes pre-encoded websocket frames through each
session's ``write`` callable; nothing here awaits.

Ordering and no loss, per channel:

* ``cursor[ch]`` is the highest seq delivered to this gateway's sockets.
  An event with seq <= cursor is a duplicate and is dropped; seq ==
  cursor + 1 is delivered; a larger seq opens a *gap*: the event and every
  later one are held in ``gaps[ch]`` while the history in between is fetched
  (:class:`Effects.fetch`), then delivered in order by :meth:`fill`.
* A session that attaches to a channel already flowing here starts at *its*
  bootstrap seq ``b``: if the gateway is ahead (b < cursor), the session is
  held for that channel and a per-session fetch of (b, cursor] is issued; if
  the gateway is behind (b > cursor), the session gets a *floor* and skips
  events up to b, which it saw in its bootstrap.

Joins and leaves (the ``ctl`` of events on the user's own channel) take effect
at their place in that channel: a session whose bootstrap already reflects one
(its user channel starts at or past the event's seq, ``at``) ignores it. A join
starts the session in the channel at the join's ``since``. A leave names
``upto``, the channel's seq of the leave: the session still gets every event of
the channel up to it (it may be catching up, or the channel's stream may lag
the user channel's), none after; then it is gone (:meth:`GatewayState.settle`).
This is what makes a moved connection's resume exact: see docs/design.md.
A revoke (``ctl = {"revoke": token id}``) names the sessions of the user opened with that
token, at its place in the user channel the same way (:meth:`GatewayState.revoked`); the
caller closes them (docs/authz-review.md, finding 7).
While a leave waits for ``upto`` the session is no longer a member (:meth:`Session.member_of`):
no transient event of the channel reaches it, and it gets nothing past ``upto``. The wait is
bounded: if ``upto`` has not reached the session within ``leave_timeout_s``
(:data:`LEAVE_UPTO_TIMEOUT_S`), the leave takes effect anyway (:meth:`GatewayState.expire_leaves`,
counted in ``stats.forced_leaves``); see docs/hardening-gateway.md.

Held events are bounded: at most ``max_held_per_channel`` behind a gateway gap
and ``max_held_per_session`` for a held session. Past either bound nothing
is dropped here; the channel (or session) is reported by
:meth:`GatewayState.take_overflows`, and the gateway ends the affected
sessions with a reconnect close code (see docs/hardening-gateway.md).

Why one module: cursors, gaps, floors, holds and pending leaves together keep one
invariant (each session gets each channel's events exactly once, in order, and none
after it left); every command reads and changes several of them at once, so they
are kept in one class rather than spread over modules that would each hold half of it.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from websockets.frames import Frame, Opcode

WriteFn = Callable[[bytes], bool]  # returns False when the socket is gone or too slow
LIVE_ONLY = -1
# Live events held behind an unfilled gap, per channel (the whole gateway's copy),
# and per held session while its own catch-up is read: a gap of a busy channel
# fills within seconds; 10,000 events is minutes of the busiest channel's traffic
# and, at a few hundred bytes each, a few MB.
MAX_HELD_EVENTS_PER_CHANNEL = 10_000
MAX_HELD_EVENTS_PER_SESSION = 10_000
# A leave waits for the channel's event ``upto`` (the leave itself) to reach the session. It
# arrives within milliseconds, or through a gap fill or a catch-up, which end the session
# with 4010 if they take longer than their budget (--gap-fill-budget-s, 30 s). Past this
# bound, twice that budget, the leave takes effect without it: a user who left a channel must
# not stay subscribed to it because one event went missing.
LEAVE_UPTO_TIMEOUT_S = 60.0
# Pending-leave deadlines held at once (one per leave still waiting for its ``upto``, and stale
# ones of leaves reached or superseded until their time comes). A join/leave storm must not grow
# them for LEAVE_UPTO_TIMEOUT_S: past the bound the stale ones are dropped, and if that is not
# enough the oldest pending leaves take effect at once (counted in stats.forced_leaves).
MAX_PENDING_LEAVES = 100_000


def text_frame(payload: bytes) -> bytes:
    """One unmasked websocket text frame carrying ``payload``: identical for every client."""
    return Frame(Opcode.TEXT, payload).serialize(mask=False)


@dataclass(eq=False, slots=True, weakref_slot=True)
class Session:
    """One client websocket."""

    sid: int
    user: str
    team: str
    write: WriteFn
    channels: set[str] = field(default_factory=set)
    floor: dict[str, int] = field(default_factory=dict)  # channel -> skip seqs <= this
    hold: dict[str, list[tuple[int, bytes]]] = field(default_factory=dict)  # channel -> held frames
    hold_from: dict[str, int] = field(default_factory=dict)  # channel -> seq the held session has reached
    until: dict[str, int] = field(default_factory=dict)  # channel -> left: deliver seqs <= this, then leave
    rejoin: dict[str, int] = field(default_factory=dict)  # channel -> back in before ``until``: skip to this
    leave_by: dict[str, float] = field(default_factory=dict)  # channel -> pending leave: forced at this time
    token_id: str = ""  # its ticket's token id: a resume record of it is claimed by that token only

    def member_of(self, channel: str) -> bool:
        """Whether the user is in ``channel`` for this session: it follows the channel and has
        not left it (a leave still delivering up to ``upto`` counts as left, unless back in)."""
        return channel in self.channels and (channel not in self.until or channel in self.rejoin)


@dataclass
class Fetch:
    """Fetch history of ``channel`` with after_seq < seq <= upto_seq (None: up to the newest)."""

    channel: str
    after_seq: int
    upto_seq: int | None
    session: Session | None = None  # None: for the whole gateway (a gap)


@dataclass
class Effects:
    subscribe: list[tuple[str, int]] = field(default_factory=list)  # (channel, since_seq)
    unsubscribe: list[str] = field(default_factory=list)
    fetch: list[Fetch] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.subscribe or self.unsubscribe or self.fetch)


@dataclass
class DeliveryStats:
    delivered: int = 0  # socket writes
    duplicates: int = 0
    gaps: int = 0
    dropped_sessions: int = 0
    forced_leaves: int = 0  # pending leaves whose ``upto`` did not arrive within the bound


class GatewayState:
    def __init__(
        self,
        max_held_per_channel: int = MAX_HELD_EVENTS_PER_CHANNEL,
        max_held_per_session: int = MAX_HELD_EVENTS_PER_SESSION,
        clock: Callable[[], float] = time.monotonic,
        leave_timeout_s: float = LEAVE_UPTO_TIMEOUT_S,
        max_pending_leaves: int = MAX_PENDING_LEAVES,
    ) -> None:
        self.max_held_per_channel = max_held_per_channel
        self.max_pending_leaves = max_pending_leaves
        self.max_held_per_session = max_held_per_session
        self.clock = clock
        self.leave_timeout_s = leave_timeout_s
        # (deadline, session, channel) of pending leaves, oldest first (one timeout: deadlines
        # are in order); an entry whose leave was reached or superseded is skipped.
        self.leave_deadlines: deque[tuple[float, Session, str]] = deque()
        # Channels and sessions whose held events passed their bound (see take_overflows).
        self.overflowing_channels: set[str] = set()
        self.overflowing_sessions: set[Session] = set()
        self.sessions: dict[int, Session] = {}
        self.channels: dict[str, set[Session]] = {}
        self.users: dict[str, set[Session]] = {}
        self.cursor: dict[str, int] = {}
        self.gaps: dict[str, list[tuple[int, bytes]]] = {}
        # channel -> its sessions that are not simply at the cursor (a floor or a hold
        # on that channel). Fan-out checks only these, so the common case, a channel
        # whose sessions are all level, is one tight loop of writes.
        self.uneven: dict[str, set[Session]] = {}
        # (session, channel): the session reached its ``until`` in the channel; settle() ends them.
        self.departures: list[tuple[Session, str]] = []
        self.stats = DeliveryStats()

    # -- sessions -----------------------------------------------------------------
    def attach(self, session: Session, channels: list[tuple[str, int]], until: dict[str, int] | None = None) -> Effects:
        """Add a session watching ``channels`` [(channel, bootstrap_seq)]; ``until``: channels it
        left while it was being moved, each with the seq of the leave (a resumed session)."""
        self.sessions[session.sid] = session
        self.users.setdefault(session.user, set()).add(session)
        effects = Effects()
        for channel, seq in channels:
            self._join(session, channel, seq, effects)
        for channel, upto in (until or {}).items():
            if channel in session.channels:
                self._leave(session, channel, effects, upto)
        return effects

    def join(self, user: str, channel: str, seq: int, at: int | None = None) -> Effects:
        """``user`` joined ``channel`` (whose seq was ``seq`` then): every local session of theirs follows it.

        ``at``: the seq of the join's event on the user's channel; sessions whose stream of that
        channel starts at or past it (their bootstrap already has the join) are left alone.
        """
        effects = Effects()
        for session in self.users.get(user, ()):
            if self._sees(session, at):
                self._join(session, channel, seq, effects)
        return effects

    def leave(self, user: str, channel: str, upto: int | None = None, at: int | None = None) -> Effects:
        """``user`` left ``channel`` at its seq ``upto`` (None: at once): their sessions get the
        channel's events up to ``upto``, none after. ``at`` as for :meth:`join`."""
        effects = Effects()
        for session in list(self.users.get(user, ())):
            if self._sees(session, at):
                self._leave(session, channel, effects, upto)
        return effects

    def revoked(self, user: str, token_id: str, at: int | None = None) -> list[Session]:
        """The token of ``token_id`` was revoked (``auth.revoke``; event ``at`` of ``user``'s channel):
        the local sessions of ``user`` opened with it, which the caller closes. Their ``at`` as for
        :meth:`join`: a session whose bootstrap came after the revoke cannot exist (the webapp
        refuses it), so one that does not see the event was not opened with the token. Sessions of
        the user opened with another token, and those without a token id (Socket Mode), stay."""
        if not token_id:
            return []
        return [s for s in self.users.get(user, ()) if s.token_id == token_id and self._sees(s, at)]

    def revoked_session(self, session: Session, token_id: str) -> bool:
        """:meth:`revoked` for one session (a revoke read in that session's own catch-up)."""
        return bool(token_id) and session.sid in self.sessions and session.token_id == token_id

    def join_session(self, session: Session, channel: str, seq: int) -> Effects:
        """:meth:`join` for one session (a join read in that session's own catch-up)."""
        effects = Effects()
        if session.sid in self.sessions:
            self._join(session, channel, seq, effects)
        return effects

    def leave_session(self, session: Session, channel: str, upto: int | None = None) -> Effects:
        """:meth:`leave` for one session (a leave read in that session's own catch-up)."""
        effects = Effects()
        if session.sid in self.sessions:
            self._leave(session, channel, effects, upto)
        return effects

    def settle(self) -> Effects:
        """End the sessions that reached the end of a channel they left (see :meth:`leave`)."""
        effects = Effects()
        departures, self.departures = self.departures, []
        for session, channel in departures:
            if session.sid in self.sessions and channel in session.until and channel not in session.rejoin:
                self._leave(session, channel, effects)
        return effects

    def expire_leaves(self) -> Effects:
        """Leaves still waiting for their ``upto`` after ``leave_timeout_s`` take effect now."""
        effects = Effects()
        now = self.clock()
        deadlines = self.leave_deadlines
        while deadlines and deadlines[0][0] <= now:
            deadline, session, channel = deadlines.popleft()
            if session.sid in self.sessions and session.leave_by.get(channel) == deadline:
                if channel in session.until and channel not in session.rejoin:
                    self.stats.forced_leaves += 1
                    self._leave(session, channel, effects)
        return effects

    def _pending(self, entry: tuple[float, Session, str]) -> bool:
        deadline, session, channel = entry
        return (
            session.sid in self.sessions
            and session.leave_by.get(channel) == deadline
            and channel in session.until
            and channel not in session.rejoin
        )

    def _make_room_for_a_leave(self, effects: Effects) -> None:
        """:data:`MAX_PENDING_LEAVES` deadlines are held: drop the stale ones, and if at least a
        quarter of the bound is still pending, force the oldest pending leaves now."""
        live = deque(entry for entry in self.leave_deadlines if self._pending(entry))
        self.leave_deadlines = live
        keep = self.max_pending_leaves * 3 // 4
        while len(live) > keep:
            _, session, channel = live.popleft()
            self.stats.forced_leaves += 1
            self._leave(session, channel, effects)

    def pending_leaves(self, session: Session) -> dict[str, int]:
        """Channels ``session`` left but has not yet received up to the leave: channel -> ``upto``.
        A moved session's resume record carries them (see :meth:`position`)."""
        return {ch: upto for ch, upto in session.until.items() if ch not in session.rejoin}

    def _sees(self, session: Session, at: int | None) -> bool:
        """Whether event ``at`` of ``session``'s own user channel is (or will be) in its stream:
        not when the session's bootstrap started that channel at or past it."""
        if at is None:
            return True
        floor = session.floor.get(session.user)
        if floor is not None and at <= floor:
            return False
        held_from = session.hold_from.get(session.user)
        return held_from is None or at > held_from

    def detach(self, session: Session) -> Effects:
        effects = Effects()
        if self.sessions.pop(session.sid, None) is None:
            return effects
        for channel in list(session.channels):
            self._leave(session, channel, effects)
        users = self.users.get(session.user)
        if users is not None:
            users.discard(session)
            if not users:
                del self.users[session.user]
        return effects

    def _join(self, session: Session, channel: str, seq: int, effects: Effects) -> None:
        if channel in session.channels:
            until = session.until.get(channel)
            if until is not None and seq >= until:  # back in before it reached its leave
                session.rejoin[channel] = seq
                session.leave_by.pop(channel, None)
            return
        session.channels.add(channel)
        watchers = self.channels.get(channel)
        if watchers is None:
            self.channels[channel] = {session}
            self.cursor[channel] = seq
            effects.subscribe.append((channel, seq))
            return
        watchers.add(session)
        cursor = self.cursor.get(channel, LIVE_ONLY)
        if seq < cursor:
            session.hold[channel] = []
            session.hold_from[channel] = seq
            self._mark_uneven(session, channel)
            effects.fetch.append(Fetch(channel, seq, cursor, session))
        elif seq > cursor:
            session.floor[channel] = seq
            self._mark_uneven(session, channel)

    def _leave(self, session: Session, channel: str, effects: Effects, upto: int | None = None) -> None:
        if upto is not None and len(self.leave_deadlines) >= self.max_pending_leaves:
            self._make_room_for_a_leave(effects)
        if upto is not None and channel in session.channels and self._reached(session, channel) < upto:
            session.until[channel] = upto  # still owed events up to the leave: go when they are out
            session.rejoin.pop(channel, None)
            deadline = session.leave_by[channel] = self.clock() + self.leave_timeout_s
            self.leave_deadlines.append((deadline, session, channel))
            self._mark_uneven(session, channel)
            return
        session.channels.discard(channel)
        session.floor.pop(channel, None)
        session.hold.pop(channel, None)
        session.hold_from.pop(channel, None)
        session.until.pop(channel, None)
        session.rejoin.pop(channel, None)
        session.leave_by.pop(channel, None)
        self._mark_level(session, channel)
        watchers = self.channels.get(channel)
        if watchers is None:
            return
        watchers.discard(session)
        if not watchers:
            del self.channels[channel]
            self.cursor.pop(channel, None)
            self.gaps.pop(channel, None)
            effects.unsubscribe.append(channel)

    def _mark_uneven(self, session: Session, channel: str) -> None:
        self.uneven.setdefault(channel, set()).add(session)

    def _reached(self, session: Session, channel: str) -> int:
        """The seq up to which ``session`` has had (or skipped) everything of ``channel``."""
        if channel in session.hold:
            return session.hold_from.get(channel, LIVE_ONLY)
        return max(session.floor.get(channel, LIVE_ONLY), self.cursor.get(channel, LIVE_ONLY))

    def _level_if_even(self, session: Session, channel: str) -> None:
        if channel not in session.floor and channel not in session.hold and channel not in session.until:
            self._mark_level(session, channel)

    def _mark_level(self, session: Session, channel: str) -> None:
        """``session`` has neither a floor nor a hold on ``channel`` any more."""
        sessions = self.uneven.get(channel)
        if sessions is not None:
            sessions.discard(session)
            if not sessions:
                del self.uneven[channel]

    # -- events ----------------------------------------------------------------------
    def deliver(self, channel: str, seq: int | None, payload: bytes, exclude_user: str | None = None) -> Fetch | None:
        """An event arrived from a Channel Server. Returns a gap fetch when one opens.

        ``exclude_user`` (transient events only, e.g. typing): that user's own
        sessions are skipped.
        """
        watchers = self.channels.get(channel)
        if watchers is None:
            return None
        if seq is None:  # transient: no ordering, no history
            uneven = self.uneven.get(channel)  # sessions with a pending leave are among these
            if exclude_user is not None or uneven:
                watchers = {
                    s
                    for s in watchers
                    if s.user != exclude_user and (uneven is None or s not in uneven or s.member_of(channel))
                }
            self._write_all(watchers, channel, None, text_frame(payload))
            return None
        held = self.gaps.get(channel)
        if held is not None:
            held.append((seq, payload))
            if len(held) > self.max_held_per_channel:
                self.overflowing_channels.add(channel)
            return None
        cursor = self.cursor.get(channel, LIVE_ONLY)
        if cursor != LIVE_ONLY and seq <= cursor:
            self.stats.duplicates += 1
            return None
        if cursor != LIVE_ONLY and seq > cursor + 1:
            self.stats.gaps += 1
            self.gaps[channel] = [(seq, payload)]
            return Fetch(channel, cursor, seq - 1)
        self.cursor[channel] = seq
        self._write_all(watchers, channel, seq, text_frame(payload))
        return None

    def expect(self, channel: str, last_seq: int) -> Fetch | None:
        """A Channel Server says ``channel`` reached ``last_seq``: open a gap if we are behind."""
        cursor = self.cursor.get(channel)
        if cursor is None or cursor == LIVE_ONLY or channel in self.gaps or last_seq <= cursor:
            return None
        self.stats.gaps += 1
        self.gaps[channel] = []
        return Fetch(channel, cursor, last_seq)

    def catch_up(self, channel: str) -> Fetch | None:
        """The channel moved to a new owner (or its owner restarted) that may not
        hold what we missed: hold live events and fetch everything after the
        cursor from the webapp; :meth:`fill` then delivers both in order."""
        cursor = self.cursor.get(channel)
        if cursor is None or cursor == LIVE_ONLY or channel in self.gaps:
            return None
        self.gaps[channel] = []
        return Fetch(channel, cursor, None)

    def fill(self, channel: str, events: list[tuple[int, bytes]]) -> Fetch | None:
        """History for a gap arrived: deliver it and everything held behind it, in order.

        Returns a new fetch if the history did not close the gap.
        """
        held = self.gaps.pop(channel, None)
        if held is None or channel not in self.channels:
            return None
        pending = sorted({seq: payload for seq, payload in (events + held)}.items())
        for index, (seq, payload) in enumerate(pending):
            fetch = self.deliver(channel, seq, payload)
            if fetch is not None:  # still a hole: hold the rest again
                held = self.gaps[channel]
                held.extend(pending[index + 1 :])
                if len(held) > self.max_held_per_channel:
                    self.overflowing_channels.add(channel)
                return fetch
        return None

    def take_overflows(self) -> tuple[list[str], list[Session]]:
        """Channels and (still attached) sessions whose held events passed their bound since the
        last call. Their sessions cannot be kept exactly once in order without holding more:
        the caller ends them with a reconnect close code."""
        channels = [ch for ch in self.overflowing_channels if ch in self.gaps]
        sessions = [s for s in self.overflowing_sessions if s.sid in self.sessions]
        self.overflowing_channels.clear()
        self.overflowing_sessions.clear()
        return channels, sessions

    def position(self, session: Session) -> dict[str, int]:
        """Per channel, the seq up to which ``session`` has received everything:
        where a moved connection resumes (see DESIGN, "Ordering and no loss")."""
        where: dict[str, int] = {}
        for channel in session.channels:
            if channel in session.hold:
                where[channel] = session.hold_from.get(channel, LIVE_ONLY)
            elif channel in session.floor:
                where[channel] = session.floor[channel]
            else:  # a gap held at the gateway is delivered up to the cursor too
                where[channel] = self.cursor.get(channel, LIVE_ONLY)
        return {ch: seq for ch, seq in where.items() if seq != LIVE_ONLY}

    def fill_session(self, session: Session, channel: str, events: list[tuple[int, bytes]]) -> None:
        """A session's catch-up history arrived: send it, then what was held meanwhile."""
        session.hold_from.pop(channel, None)
        held = session.hold.pop(channel, None)
        self._level_if_even(session, channel)
        if held is None or session.sid not in self.sessions:
            return
        sent = set()
        for seq, payload in sorted(events + held):
            if seq in sent:
                continue
            sent.add(seq)
            if channel in session.until and not self._before_leave(session, channel, seq):
                continue
            if not session.write(text_frame(payload)):
                return
            self.stats.delivered += 1
        until = session.until.get(channel)
        if until is not None and channel not in session.rejoin and self.cursor.get(channel, LIVE_ONLY) >= until:
            self.departures.append((session, channel))

    def _write_all(self, watchers: set[Session], channel: str, seq: int | None, frame: bytes) -> None:
        uneven = self.uneven.get(channel) if seq is not None else None
        delivered = failed = 0
        if uneven is None:  # the hot path: one write per socket, nothing else
            for session in watchers:
                if session.write(frame):
                    delivered += 1
                else:
                    failed += 1
        else:
            for session in watchers:
                if session in uneven and not self._passes(session, channel, seq, frame):  # type: ignore[arg-type]
                    continue
                if session.write(frame):
                    delivered += 1
                else:
                    failed += 1
        self.stats.delivered += delivered
        self.stats.dropped_sessions += failed

    def _passes(self, session: Session, channel: str, seq: int, frame: bytes) -> bool:
        """Whether an uneven session takes event ``seq`` now: a held session queues it,
        a session with a floor skips it up to the floor, then is level again."""
        held = session.hold.get(channel)
        if held is not None:
            held.append((seq, _payload_of(frame)))
            if len(held) > self.max_held_per_session:
                self.overflowing_sessions.add(session)
            return False
        floor = session.floor.get(channel)
        if floor is not None:
            if seq <= floor:
                return False
            del session.floor[channel]
            self._level_if_even(session, channel)
        if channel in session.until:
            return self._before_leave(session, channel, seq)
        return True

    def _before_leave(self, session: Session, channel: str, seq: int) -> bool:
        """Whether ``session``, which left ``channel`` at ``until``, still takes event ``seq``:
        yes up to the leave; after it only if it came back (``rejoin``) and ``seq`` is past that."""
        until = session.until[channel]
        rejoin = session.rejoin.get(channel)
        if seq <= until:
            if seq == until and rejoin is None:
                self.departures.append((session, channel))
            return True
        if rejoin is None:
            self.departures.append((session, channel))
            return False
        if seq <= rejoin:
            return False
        del session.until[channel], session.rejoin[channel]
        session.leave_by.pop(channel, None)
        self._level_if_even(session, channel)
        return True


def _payload_of(frame: bytes) -> bytes:
    """The payload of an unmasked frame built by :func:`text_frame`."""
    length = frame[1] & 0x7F
    if length < 126:
        return frame[2:]
    if length == 126:
        return frame[4:]
    return frame[10:]
