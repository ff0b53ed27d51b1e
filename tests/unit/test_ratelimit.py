"""The webapp's rate limits (webapp_stub/ratelimit.py) on a fake clock: per token and method,
a method's own smaller bucket, and a method's bucket shared by every token."""

from __future__ import annotations

from webapp_stub.ratelimit import RateLimiter


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def allowed(limiter: RateLimiter, token: str, method: str, times: int) -> int:
    return sum(1 for _ in range(times) if limiter.retry_after(token, method) == 0)


def test_each_token_and_method_has_its_bucket_refilled_evenly() -> None:
    clock = Clock()
    limiter = RateLimiter(60, clock, method_limits={}, shared_limits={})
    assert allowed(limiter, "a", "auth.test", 100) == 60
    assert limiter.retry_after("a", "auth.test") == 1  # one a second
    assert allowed(limiter, "a", "users.list", 100) == 60  # per method
    assert allowed(limiter, "b", "auth.test", 100) == 60  # per token
    clock.now += 10
    assert allowed(limiter, "a", "auth.test", 100) == 10


def test_a_costly_method_has_a_smaller_bucket_per_token_and_one_shared_by_all() -> None:
    clock = Clock()
    limiter = RateLimiter(6000, clock, method_limits={"search.messages": 20}, shared_limits={"search.messages": 30})
    assert allowed(limiter, "a", "search.messages", 100) == 20
    assert limiter.retry_after("a", "search.messages") == 3  # 20 a minute: one every 3 s
    assert allowed(limiter, "b", "search.messages", 100) == 10  # the shared bucket's 30 are spent
    assert allowed(limiter, "c", "search.messages", 1) == 0
    assert allowed(limiter, "c", "auth.test", 100) == 100  # other methods are not touched
    clock.now += 2  # the shared bucket refills one a 2 s; c's own is full
    assert allowed(limiter, "c", "search.messages", 5) == 1


def test_a_refused_call_spends_nothing() -> None:
    """A call refused by the shared bucket leaves the caller's own bucket as it was, and the other
    way round (one refusal must not also cost the other bucket a unit)."""
    clock = Clock()
    limiter = RateLimiter(6000, clock, method_limits={"m": 2}, shared_limits={"m": 3})
    assert allowed(limiter, "a", "m", 5) == 2  # a's own bucket: 2; the shared one: 1 left
    assert allowed(limiter, "b", "m", 5) == 1  # the shared one's last
    clock.now += 30  # the shared one refills 1.5 (3 a minute), a's own 1 (2 a minute)
    assert allowed(limiter, "a", "m", 5) == 1


def test_zero_turns_every_limit_off() -> None:
    limiter = RateLimiter(0, Clock(), method_limits={"m": 1}, shared_limits={"m": 1})
    assert allowed(limiter, "a", "m", 50) == 50


def test_a_method_limit_never_exceeds_the_general_one() -> None:
    limiter = RateLimiter(5, Clock(), method_limits={"m": 20}, shared_limits={})
    assert allowed(limiter, "a", "m", 50) == 5
