"""Per-token, per-method rate limits: token buckets, answered with HTTP 429 and ``Retry-After``.

Every method has one bucket per token of ``--rate-limit-per-minute``. A few methods cost the
webapp's event loop far more than a post and have a smaller bucket of their own, as Slack's tiers
do (:data:`METHOD_RATE_LIMITS_PER_MINUTE`), and one bucket shared by every token
(:data:`SHARED_RATE_LIMITS_PER_MINUTE`), so that many users together cannot take the loop from
everyone else's posts either. ``--rate-limit-per-minute 0`` turns every limit off (tests,
benchmarks).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping

DEFAULT_RATE_LIMIT_PER_MINUTE = 6000  # generous: tests and benchmarks must not trip it
MAX_RATE_BUCKETS = 100_000  # beyond this, full (idle) buckets are forgotten
# search.messages costs 10-130 ms of work (the index's catch-up, the query: docs/slack-compat.md), a post
# about 0.1 ms; most of it off the event loop (webapp_stub/search_reader.py), but it takes a core
# meanwhile: Slack's Tier 2 per token (20 a minute), and 5 a second for the whole webapp.
METHOD_RATE_LIMITS_PER_MINUTE: Mapping[str, int] = {"search.messages": 20}
SHARED_RATE_LIMITS_PER_MINUTE: Mapping[str, int] = {"search.messages": 300}
BUCKET_REFILL_S = 60.0  # every bucket refills its whole capacity (a minute's worth) in a minute
SHARED = ""  # the token of a method's shared bucket (no real token is empty: not_authed first)


class RateLimiter:
    """Token buckets per (token, method): ``per_minute`` burst, refilled evenly, or the method's own
    smaller ``method_limits``; and per method in ``shared_limits``, one more bucket for every token
    together. ``per_minute`` 0 disables them all."""

    def __init__(
        self,
        per_minute: int,
        clock: Callable[[], float] = time.monotonic,
        *,
        method_limits: Mapping[str, int] = METHOD_RATE_LIMITS_PER_MINUTE,
        shared_limits: Mapping[str, int] = SHARED_RATE_LIMITS_PER_MINUTE,
    ) -> None:
        self.per_minute = per_minute
        self.clock = clock
        self.method_limits = {m: min(n, per_minute) for m, n in method_limits.items()}
        self.shared_limits = dict(shared_limits)
        self._buckets: dict[tuple[str, str], tuple[float, float]] = {}

    def retry_after(self, token: str, method: str) -> int:
        """0 and one unit spent if allowed (from the shared bucket too, if the method has one),
        else whole seconds until the next unit. Every request calls it: a method without limits of
        its own (every post) costs one dictionary lookup more than a single bucket would."""
        if self.per_minute <= 0:
            return 0
        now = self.clock()
        shared = self.shared_limits.get(method)
        own = self.method_limits.get(method, self.per_minute)
        if shared is not None:
            tokens = self._available(SHARED, method, shared, now)
            if tokens < 1.0:
                return self._refuse(SHARED, method, shared, tokens, now)
        tokens = self._available(token, method, own, now)
        if tokens < 1.0:
            return self._refuse(token, method, own, tokens, now)
        self._buckets[(token, method)] = (tokens - 1.0, now)
        if shared is not None:
            self._buckets[(SHARED, method)] = (self._available(SHARED, method, shared, now) - 1.0, now)
        if len(self._buckets) > MAX_RATE_BUCKETS:
            self._forget_idle(now)
        return 0

    def _available(self, token: str, method: str, per_minute: int, now: float) -> float:
        """The units in the bucket of ``(token, method)`` at ``now`` (a new bucket is full)."""
        bucket = self._buckets.get((token, method))
        if bucket is None:
            return float(per_minute)
        return min(float(per_minute), bucket[0] + (now - bucket[1]) * per_minute / 60.0)

    def _refuse(self, token: str, method: str, per_minute: int, tokens: float, now: float) -> int:
        """Keep the bucket's ``tokens`` as of ``now``; whole seconds until it holds one unit."""
        self._buckets[(token, method)] = (tokens, now)
        return max(1, math.ceil((1.0 - tokens) * 60.0 / per_minute))

    def _forget_idle(self, now: float) -> None:
        """Forget buckets idle long enough to be full again (a new one starts full: nothing changes)."""
        for key in [k for k, (_, at) in self._buckets.items() if now - at >= BUCKET_REFILL_S]:
            del self._buckets[key]
