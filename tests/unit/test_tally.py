"""webapp_stub.tally: plain-int counters and histograms expose exactly what prometheus_client's
Counter and Histogram expose for the same updates (without ``_created``)."""

from __future__ import annotations

import random

import pytest
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

from services.metrics import LATENCY_BUCKETS_S
from webapp_stub.tally import TallyCounter, TallyHistogram


def exposition(registry: CollectorRegistry) -> list[str]:
    text = generate_latest(registry).decode()
    return sorted(line for line in text.splitlines() if "_created" not in line)


def test_counters_and_histograms_expose_what_prometheus_clients_own_do() -> None:
    rng = random.Random(4)
    ours, theirs = CollectorRegistry(), CollectorRegistry()
    counter = TallyCounter(ours, "rtm_x_requests_total", "Requests", ["method", "outcome"])
    plain = TallyCounter(ours, "rtm_x_posts_total", "Posts")
    histogram = TallyHistogram(ours, "rtm_x_request_seconds", "Time", LATENCY_BUCKETS_S, ["method"])
    ref_counter = Counter("rtm_x_requests_total", "Requests", ["method", "outcome"], registry=theirs)
    ref_plain = Counter("rtm_x_posts_total", "Posts", registry=theirs)
    ref_histogram = Histogram("rtm_x_request_seconds", "Time", ["method"], buckets=LATENCY_BUCKETS_S, registry=theirs)
    for _ in range(2000):
        method, outcome = rng.choice(["chat.postMessage", "auth.test"]), rng.choice(["ok", "invalid_auth"])
        counter.inc(method, outcome)
        ref_counter.labels(method, outcome).inc()
        plain.inc()
        ref_plain.inc()
        seconds = rng.choice([*LATENCY_BUCKETS_S, 0.0, 1e-6, 30.0, rng.random() * 0.01, rng.random() * 25])
        histogram.observe(seconds, method)
        ref_histogram.labels(method).observe(seconds)
    assert exposition(ours) == exposition(theirs)  # a value on a bound lands in that bucket (le)
    assert counter.get("auth.test", "ok") == ref_counter.labels("auth.test", "ok")._value.get()


def test_a_name_taken_twice_is_refused_as_prometheus_client_refuses_it() -> None:
    registry = CollectorRegistry()
    TallyCounter(registry, "rtm_x_total", "X")
    with pytest.raises(ValueError):
        Counter("rtm_x_total", "X", registry=registry)
