"""Gap fills and shared history reads: what the gateway reads from the webapp's history.

A gap (an event arrived whose seq is past the next expected) or a session
catching up (it attached behind the channel's cursor) is filled from the
webapp's ``/internal/history``, in order, within a
:class:`gateway.gap_budget.GapBudget`. Sessions catching up from the same place
share one read. When a fill cannot be done, or held events pass their bound,
the sessions concerned are ended with 4010 (``RESYNC``) instead of skipping
events (docs/hardening-gateway.md).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Coroutine
from typing import Any, Protocol

from prometheus_client import Counter

from gateway.gap_budget import GapBudget, GapUnfilled
from gateway.state import Effects, Fetch, GatewayState, Session
from gateway.webapp_client import WebappCalls
from services.errors import CloseCode
from services.metrics import ServiceMetrics
from services.ops import REVOKE_CTL

log = logging.getLogger("rtm.gateway")

HISTORY_PAGE_EVENTS = 500
FETCH_RETRY_DELAY_S = 0.5
HISTORY_CONCURRENCY = 8  # history fetches in flight to the webapp at once (a failover fetches many)

Spawn = Callable[[Coroutine[Any, Any, Any]], None]
# A history read: the events (seq, json) and, apart, the ``ctl`` of those that carry one (seq, ctl).
HistoryRead = tuple[list[tuple[int, bytes]], list[tuple[int, dict[str, Any]]]]


class SessionEnder(Protocol):
    """How a session is ended like a drain moves it (:class:`gateway.drain.Mover`)."""

    def detach(self, session: Session) -> dict[str, int]: ...

    async def finish(
        self,
        session: Session,
        where: dict[str, int],
        reason: str,
        slots: asyncio.Semaphore,
        code: CloseCode = CloseCode.GOING_AWAY,
    ) -> None: ...


class History:
    """Reads the webapp's history into the gateway's state; ends what cannot be filled."""

    def __init__(
        self,
        *,
        state: GatewayState,
        webapp: WebappCalls,
        metrics: ServiceMetrics,
        deliveries: Counter,
        spawn: Spawn,
        apply: Callable[[Effects], None],
        mover: SessionEnder,
        end_revoked: Callable[[list[Session]], None],
        end_slots: asyncio.Semaphore,
        clock: Callable[[], float],
        gap_fill_budget_s: float,
        max_gap_fill_attempts: int,
    ) -> None:
        self.state = state
        self.webapp = webapp
        self.metrics = metrics
        self.deliveries = deliveries
        self.spawn = spawn
        self.apply = apply  # effects of a join/leave read from history
        self.mover = mover
        self.end_revoked = end_revoked  # closes sessions whose token was revoked (4003)
        self.end_slots = end_slots  # sessions being ended (resume + goodbye) at once
        self.clock = clock
        self.gap_fill_budget_s = gap_fill_budget_s
        self.max_gap_fill_attempts = max_gap_fill_attempts
        self.gap_budgets: dict[str, GapBudget] = {}  # channel -> the budget of its open gap
        self.history_slots = asyncio.Semaphore(HISTORY_CONCURRENCY)
        # (channel, after_seq, upto_seq) -> the webapp read in flight: a region drain moves
        # hundreds of sessions that stopped at the same place, and they share one read
        self.history_reads: dict[tuple[str, int, int | None], asyncio.Future[HistoryRead]] = {}
        m = metrics
        self.gap_fills = m.counter(
            "rtm_gw_gap_fills_total", "History fetches to fill a gap or catch a session up", ["kind"]
        )
        for kind in ("gap", "session"):  # the series exist at 0, so increase() counts the first one
            self.gap_fills.labels(kind)
        self.shared_history_reads = m.counter(
            "rtm_gw_shared_history_reads_total", "History fetches served by a read already in flight for the same range"
        )
        self.sessions_ended = m.counter(
            "rtm_gw_sessions_ended_total", "Sessions ended with 4010 to reconnect and catch up", ["reason"]
        )
        for reason in ("gap_unfilled", "held_overflow"):
            self.sessions_ended.labels(reason)

    def forget_gap(self, channel: str) -> None:
        """Nobody here watches ``channel`` any more: its open gap's budget goes."""
        self.gap_budgets.pop(channel, None)

    async def fetch_history(self, fetch: Fetch) -> None:
        """Fill a gap (or catch one session up) from the webapp's history, in order.

        Within the gap's :class:`gateway.gap_budget.GapBudget`; when it is spent, or
        anything in the fill fails, the affected sessions are ended with 4010
        (:meth:`end_unfilled`) rather than let skip events or stay held.
        """
        self.gap_fills.labels("session" if fetch.session else "gap").inc()
        if fetch.session is None:
            budget = self.gap_budgets.get(fetch.channel)
            if budget is None:
                budget = self.gap_budgets[fetch.channel] = self.new_gap_budget()
        else:
            budget = self.new_gap_budget()
        try:
            key = (fetch.channel, fetch.after_seq, fetch.upto_seq)
            reading = self.history_reads.get(key)
            if reading is None:  # sessions catching up from the same place share one read
                reading = self.history_reads[key] = asyncio.ensure_future(self.read_history(*key, budget=budget))
                reading.add_done_callback(lambda _: self.history_reads.pop(key, None))
            else:
                self.shared_history_reads.inc()
            events, ctls = await asyncio.shield(reading)
            if fetch.session is not None:
                # joins and leaves in this session's catch-up are its own (the read may be shared)
                for seq, ctl in ctls:
                    self.apply_ctl(fetch.channel, ctl, seq, fetch.session)
                self.state.fill_session(fetch.session, fetch.channel, events)
                return
            for seq, ctl in ctls:
                self.apply_ctl(fetch.channel, ctl, seq)
            before = self.state.stats.delivered
            again = self.state.fill(fetch.channel, events)
            self.deliveries.inc(self.state.stats.delivered - before)
            if fetch.channel not in self.state.gaps:
                self.gap_budgets.pop(fetch.channel, None)
            if again is not None:
                if budget.expired(self.clock()):
                    raise GapUnfilled(f"history of {fetch.channel} still has a hole after {again.after_seq}")
                await asyncio.sleep(FETCH_RETRY_DELAY_S)  # the webapp's history may lag a moment behind
                self.spawn(self.fetch_history(again))
        except Exception as exc:  # the budget is spent, or the fill itself failed: never stay held
            self.end_unfilled(fetch, exc)
        finally:
            self.settle()
            self.check_overflows()

    def settle(self) -> None:
        """Sessions that reached the end of a channel they left stop following it."""
        if self.state.departures:
            self.apply(self.state.settle())

    def new_gap_budget(self) -> GapBudget:
        return GapBudget(self.clock(), self.gap_fill_budget_s, self.max_gap_fill_attempts)

    async def read_history(
        self, channel: str, after: int, upto: int | None, budget: GapBudget | None = None
    ) -> HistoryRead:
        """The webapp's history of ``channel`` with after < seq <= upto (None: to the newest), paged,
        and the ``ctl`` of its events that carry one (applied by the caller, per reader).

        Failed reads are retried with backoff within ``budget``; when it is spent this raises
        :class:`GapUnfilled`. It never returns part of the range as if it were all of it.
        """
        budget = budget or self.new_gap_budget()
        events: list[tuple[int, bytes]] = []
        ctls: list[tuple[int, dict[str, Any]]] = []
        while True:
            try:
                async with self.history_slots:
                    reply = await self.webapp.call(
                        "/internal/history", {"channel": channel, "after_seq": after, "limit": HISTORY_PAGE_EVENTS}
                    )
            except Exception as exc:
                delay = budget.after_failure(self.clock())
                log.warning("history of %s after %s failed (attempt %d): %s", channel, after, budget.failures, exc)
                if delay is None:
                    self.metrics.error("history_fetch_failed")
                    raise GapUnfilled(f"history of {channel} after {after}: {budget.failures} reads failed") from exc
                await asyncio.sleep(delay)
                continue
            for event in reply["events"]:
                seq = int(event["seq"])
                if upto is not None and seq > upto:
                    break
                events.append((seq, str(event["json"]).encode()))
                ctl = event.get("ctl")
                if isinstance(ctl, dict):
                    ctls.append((seq, ctl))
                after = seq
            if not reply.get("has_more") or (upto is not None and after >= upto):
                return events, ctls

    def end_unfilled(self, fetch: Fetch, exc: BaseException) -> None:
        """A gap could not be filled: end the sessions it holds (4010) instead of skipping events."""
        if fetch.session is not None:
            sessions = [fetch.session] if fetch.session.sid in self.state.sessions else []
        else:
            self.gap_budgets.pop(fetch.channel, None)
            sessions = list(self.state.channels.get(fetch.channel, ())) if fetch.channel in self.state.gaps else []
        if not sessions:
            return
        self.metrics.error("gap_unfilled")
        log.warning(
            "gap in %s after %s not filled (%r): ending %d sessions with %d",
            fetch.channel,
            fetch.after_seq,
            exc,
            len(sessions),
            CloseCode.RESYNC,
        )
        self.end_sessions(sessions, "gap_unfilled")

    def check_overflows(self) -> None:
        """Sessions whose held events passed their bound are ended (4010), never silently skipped ahead."""
        if not (self.state.overflowing_channels or self.state.overflowing_sessions):
            return
        channels, sessions = self.state.take_overflows()
        for channel in channels:
            self.gap_budgets.pop(channel, None)
            sessions.extend(self.state.channels.get(channel, ()))
        if sessions:
            self.metrics.error("held_overflow")
            log.warning("held events past their bound in %s: ending %d sessions", channels, len(set(sessions)))
            self.end_sessions(list(dict.fromkeys(sessions)), "held_overflow")

    def end_sessions(self, sessions: list[Session], reason: str) -> None:
        """End ``sessions`` as a drain moves them (position noted and delivery stopped in one
        step, a resume record left where the webapp takes it, goodbye), closing with 4010."""
        for session in sessions:
            if session.sid not in self.state.sessions:
                continue
            where = self.mover.detach(session)
            self.sessions_ended.labels(reason).inc()
            self.spawn(self.mover.finish(session, where, reason, self.end_slots, CloseCode.RESYNC))

    def apply_ctl(self, channel: str, ctl: Any, seq: int | None = None, session: Session | None = None) -> None:
        """A join, leave or token revoke carried by event ``seq`` of user channel ``channel``: for every
        session of that user whose stream holds the event, or for ``session`` alone (its own catch-up)."""
        if not isinstance(ctl, dict):
            return
        if REVOKE_CTL in ctl:
            tid = str(ctl[REVOKE_CTL])
            if session is not None:
                revoked = [session] if self.state.revoked_session(session, tid) else []
            else:
                revoked = self.state.revoked(channel, tid, at=seq)
            if revoked:
                self.end_revoked(revoked)
        if "join" in ctl:
            joined, since = str(ctl["join"]), int(ctl.get("since", 0))
            if session is not None:
                self.apply(self.state.join_session(session, joined, since))
            else:
                self.apply(self.state.join(channel, joined, since, at=seq))
        if "leave" in ctl:
            left, upto = str(ctl["leave"]), (int(ctl["upto"]) if "upto" in ctl else None)
            if session is not None:
                self.apply(self.state.leave_session(session, left, upto))
            else:
                self.apply(self.state.leave(channel, left, upto, at=seq))
        self.settle()
