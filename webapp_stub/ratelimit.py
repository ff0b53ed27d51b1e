"""Per-token, per-method rate limits: token buckets, answered with HTTP 429 and ``Retry-After``."""

from __future__ import annotations

import math
import time
from collections.abc import Callable

DEFAULT_RATE_LIMIT_PER_MINUTE = 6000  # generous: tests and benchmarks must not trip it
MAX_RATE_BUCKETS = 100_000  # beyond this, full (idle) buckets are forgotten


class RateLimiter:
    """Token buckets per (token, method): ``per_minute`` burst, refilled evenly. 0 disables."""

    def __init__(self, per_minute: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.capacity = float(per_minute)
        self.rate_per_s = per_minute / 60.0
        self.clock = clock
        self._buckets: dict[tuple[str, str], tuple[float, float]] = {}

    def retry_after(self, token: str, method: str) -> int:
        """0 and one unit spent if allowed, else whole seconds until the next unit."""
        if self.capacity <= 0:
            return 0
        now = self.clock()
        key = (token, method)
        bucket = self._buckets.get(key)
        tokens = (
            self.capacity if bucket is None else min(self.capacity, bucket[0] + (now - bucket[1]) * self.rate_per_s)
        )
        if tokens >= 1.0:
            self._buckets[key] = (tokens - 1.0, now)
            if len(self._buckets) > MAX_RATE_BUCKETS:
                self._forget_idle(now)
            return 0
        self._buckets[key] = (tokens, now)
        return max(1, math.ceil((1.0 - tokens) / self.rate_per_s))

    def _forget_idle(self, now: float) -> None:
        full_after_s = self.capacity / self.rate_per_s
        for key in [k for k, (_, at) in self._buckets.items() if now - at >= full_after_s]:
            del self._buckets[key]
