"""When the next group commit may start, and the next hand-off may go: both follow the load
(sans-I/O).

Every group commit costs the fleet about the same whatever it carries: the COMMIT and its fsync,
the hand-off's ``pubs`` frame, and the admin server's reads and writes to each channel server,
each a wake-up of another process (docs/publish-path.md, round 8: about 350 µs of the admin
server's CPU per commit, against 6-7 µs per post). Under load, :mod:`webapp_stub.commit` paces
the commits: after a commit of two writes or more, the next one starts no sooner than the
interval this class gives after that commit began.

The interval grows with the rate of writes, so that posts share a commit's cost more as CPU
grows scarce, and stays short while there is time to spare:

* at or below ``base_rate_per_s`` writes per second (:data:`COMMIT_PACING_BASE_RATE_PER_S`,
  500), it is ``min_interval_s`` (:data:`~webapp_stub.commit.MIN_COMMIT_INTERVAL_S`, 5 ms);
* above, it grows in proportion to the rate (10 ms at 1,000 writes per second, 20 ms at
  2,000), up to ``max_interval_s`` (:data:`COMMIT_INTERVAL_CAP_S`, 20 ms).

So the commits per second, and with them what the commits cost the fleet, fall as the load
rises, and a post waits for its commit at most ``max_interval_s``. A post at light load waits for
nothing: a commit of one write is not paced.

The rate is an exponentially weighted mean of each commit's writes over the time since the one
before it, that time taken as at least ``min_interval_s``: commits of one write in consecutive
loop turns (a coincidence at light load) never look like load. The newest commit weighs at least
:data:`RATE_WEIGHT`, and more the longer it came after the one before (:data:`RATE_TIME_CONSTANT_S`):
after a pause the load of before is forgotten, not carried into the next burst. Time comes in as
an argument; no clock is read here.

The hand-off is paced by the same rate (:func:`handoff_interval_s`, round 9 of
docs/publish-path.md). A client that waits for each answer caps a commit at its connections (32
posts for the peers' generator, however long the interval), but the hand-off is not on its path:
its ``pubs`` may carry several commits' events, and the admin server's cost, about 350 µs per
``pubs`` besides 6-7 µs per event, falls with it. Above
:data:`HANDOFF_PACING_BASE_RATE_PER_S` (1,000) writes per second, the hand-off sends at most once
per interval, which grows in proportion to the rate above that base, up to
:data:`HANDOFF_INTERVAL_CAP_S` (30 ms) at twice it, or as soon as :data:`HANDOFF_BATCH_EVENTS`
events wait; at or below the base it sends at once. So only delivery waits, by at most the cap and
only under load; the HTTP answer never does.
"""

from __future__ import annotations

import math

# Writes per second up to which the paced commit interval is its minimum (--min-commit-interval-s);
# above, the interval grows in proportion to the rate, up to COMMIT_INTERVAL_CAP_S.
COMMIT_PACING_BASE_RATE_PER_S = 500.0
# The longest paced commit interval (--commit-interval-cap-s): under any load, a post waits at most
# this long for its commit to start.
COMMIT_INTERVAL_CAP_S = 0.02
# The weight of the newest commit in the rate's moving mean: about the last 1/RATE_WEIGHT commits
# count (a quarter of a second at 2,000 writes per second and a 20 ms interval).
RATE_WEIGHT = 0.2
# The rate forgets with time too: a commit that comes ``gap`` after the one before weighs at least
# 1 - exp(-gap / RATE_TIME_CONSTANT_S), so after a pause of a second the rate is the new commit's
# alone (a review found a burst's 20 ms interval held the first batches after a long pause).
RATE_TIME_CONSTANT_S = 0.1

# Writes per second above which the hand-off is paced (--handoff-pacing-base-rate-per-s): at or
# below, it sends as soon as a commit is done.
HANDOFF_PACING_BASE_RATE_PER_S = 1000.0
# The longest the hand-off holds its events under load (--handoff-interval-cap-s; 0: never), reached
# at twice the base rate: about two of the commits that a 32-connection client fills at 2,000 posts
# per second. Every delivery under that load may wait this much longer.
HANDOFF_INTERVAL_CAP_S = 0.03
# The longest hold the hand-off accepts from its interval, whatever computes it (and the largest
# --handoff-interval-cap-s): every delivery under load may wait this long.
MAX_HANDOFF_INTERVAL_S = 1.0
# A held send goes at once when this many events wait (--handoff-batch-events): one pubs of them
# costs the admin server about 350 µs besides 6-7 µs per event, so past 48 waiting longer saves
# under 7.5 µs per event. Where commits are this large, the hand-off never waits; a 32-connection
# client's commits of 30 posts wait for the next commit, not for the whole interval.
HANDOFF_BATCH_EVENTS = 48


def handoff_interval_s(rate_per_s: float, base_rate_per_s: float, cap_s: float) -> float:
    """The least time between two sends of the hand-off at ``rate_per_s`` writes per second: 0 up
    to ``base_rate_per_s``, growing in proportion above it, ``cap_s`` from twice it on."""
    if cap_s <= 0 or rate_per_s <= base_rate_per_s:
        return 0.0
    return cap_s * min(1.0, (rate_per_s - base_rate_per_s) / base_rate_per_s)


class CommitPacer:
    """The paced commit interval, from the writes each commit carried and when it began."""

    __slots__ = ("min_interval_s", "max_interval_s", "base_rate_per_s", "rate_per_s", "_last_at")

    def __init__(
        self,
        min_interval_s: float,
        max_interval_s: float = COMMIT_INTERVAL_CAP_S,
        base_rate_per_s: float = COMMIT_PACING_BASE_RATE_PER_S,
    ) -> None:
        self.min_interval_s = min_interval_s
        self.max_interval_s = max(min_interval_s, max_interval_s)
        self.base_rate_per_s = base_rate_per_s
        self.rate_per_s = 0.0  # writes per second, the moving mean
        self._last_at: float | None = None  # when the last commit began (the caller's clock)

    def committed(self, at: float, writes: int) -> None:
        """A commit that began at ``at`` carried ``writes`` writes."""
        if self._last_at is not None and self.min_interval_s > 0:
            gap_s = max(at - self._last_at, self.min_interval_s)
            weight = max(RATE_WEIGHT, -math.expm1(-gap_s / RATE_TIME_CONSTANT_S))
            self.rate_per_s += weight * (writes / gap_s - self.rate_per_s)
        self._last_at = at

    @property
    def interval_s(self) -> float:
        """The least time from the last commit's start to the next one's, under load."""
        if self.min_interval_s <= 0 or self.rate_per_s <= self.base_rate_per_s:
            return self.min_interval_s
        return min(self.min_interval_s * self.rate_per_s / self.base_rate_per_s, self.max_interval_s)
