"""How long and how often a gateway tries to fill one gap from the webapp's history, sans I/O.

A gap (events a channel server did not deliver, or a held session's catch-up)
is filled from the webapp. While it is open, the channel's (or session's)
later events are held, so a gap may not stay open for ever: each one gets a
:class:`GapBudget` of :data:`GAP_FILL_BUDGET_S` seconds and
:data:`MAX_GAP_FILL_ATTEMPTS` failed reads, with backoff between reads. When
the budget is spent the gateway does not skip the missing events: it ends the
affected sessions with close code 4010 (``CloseCode.RESYNC``), after leaving
a resume record where it can, so each client reconnects through
``rtm.connect`` and catches up through the normal path.

A budget spans the whole gap: a fill that still leaves a hole fetches again
under the same budget.
"""

from __future__ import annotations

from dataclasses import dataclass

# A webapp restart takes a few seconds; a failover's burst of history reads
# drains within a few more. 30 s of retries covers both; past that the webapp
# is down, and holding events for longer only grows memory while the clients
# see nothing: they are better served by reconnecting and reading history.
GAP_FILL_BUDGET_S = 30.0
MAX_GAP_FILL_ATTEMPTS = 20
HISTORY_RETRY_INITIAL_S = 0.25
HISTORY_RETRY_MAX_S = 4.0


class GapUnfilled(Exception):
    """A gap's budget is spent (or its fill failed): its sessions must reconnect."""


@dataclass
class GapBudget:
    """The time and failed reads one gap may still spend."""

    started_s: float
    budget_s: float = GAP_FILL_BUDGET_S
    max_attempts: int = MAX_GAP_FILL_ATTEMPTS
    failures: int = 0

    @property
    def deadline_s(self) -> float:
        return self.started_s + self.budget_s

    def expired(self, now_s: float) -> bool:
        return now_s >= self.deadline_s

    def after_failure(self, now_s: float) -> float | None:
        """A read failed: the delay before the next one, or None when the budget is spent
        (attempts used up, or the next read would start past the deadline)."""
        self.failures += 1
        if self.failures >= self.max_attempts:
            return None
        delay = min(HISTORY_RETRY_MAX_S, HISTORY_RETRY_INITIAL_S * 2.0 ** (self.failures - 1))
        if now_s + delay >= self.deadline_s:
            return None
        return delay
