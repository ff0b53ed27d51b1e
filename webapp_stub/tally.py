"""Counters and histograms kept in plain Python numbers, exported when ``/metrics`` is read.

A ``prometheus_client`` counter takes a lock on every ``inc`` and a histogram two (its
bucket and its sum), through a few Python calls each: about 1.6 µs for the three updates
of one ``chat.postMessage`` (round 4 of docs/publish-path.md). The webapp updates its
per-request metrics only from the event loop's thread, and the scrape runs there too, so
no lock is needed: :class:`TallyCounter` and :class:`TallyHistogram` keep a dict of
ints (and one list of bucket counts per label set) and are ``prometheus_client``
collectors of their own, registered on the process's registry, that build the metric
families when scraped. The exposition is the same as a ``Counter``'s and a
``Histogram``'s (``_total``; ``_bucket{le}``, ``_count``, ``_sum``), without ``_created``.

Contract: every update from one thread (the event loop's); label values are given in the
order of the names (as ``labels(...)`` takes them). Sans-I/O.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Iterable, Iterator

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily, Metric


class TallyCounter:
    """A counter by label values, in plain ints (``name`` without ``_total``, as prometheus_client names it)."""

    def __init__(self, registry: CollectorRegistry, name: str, doc: str, labels: Iterable[str] = ()) -> None:
        self.name = name.removesuffix("_total")
        self.doc = doc
        self.labels = list(labels)
        self.values: dict[tuple[str, ...], int] = {}
        registry.register(self)

    def inc(self, *values: str) -> None:
        """Count one for these label values."""
        self.values[values] = self.values.get(values, 0) + 1

    def get(self, *values: str) -> int:
        return self.values.get(values, 0)

    def describe(self) -> list[Metric]:
        return [CounterMetricFamily(self.name, self.doc, labels=self.labels)]

    def collect(self) -> Iterator[Metric]:
        family = CounterMetricFamily(self.name, self.doc, labels=self.labels)
        for values, count in self.values.items():
            family.add_metric(list(values), count)
        yield family


class TallyHistogram:
    """A histogram by label values: per label set one list of bucket counts and a sum."""

    def __init__(
        self,
        registry: CollectorRegistry,
        name: str,
        doc: str,
        buckets: Iterable[float],
        labels: Iterable[str] = (),
    ) -> None:
        self.name = name
        self.doc = doc
        self.labels = list(labels)
        self.bounds = sorted(float(b) for b in buckets)
        if not self.bounds or self.bounds[-1] != float("inf"):
            self.bounds.append(float("inf"))
        self.counts: dict[tuple[str, ...], list[int]] = {}
        self.sums: dict[tuple[str, ...], float] = {}
        registry.register(self)

    def observe(self, amount: float, *values: str) -> None:
        """One observation for these label values (in the first bucket whose bound is >= it)."""
        row = self.counts.get(values)
        if row is None:
            row = self.counts[values] = [0] * len(self.bounds)
            self.sums[values] = 0.0
        row[bisect_left(self.bounds, amount)] += 1
        self.sums[values] += amount

    def describe(self) -> list[Metric]:
        return [HistogramMetricFamily(self.name, self.doc, labels=self.labels)]

    def collect(self) -> Iterator[Metric]:
        family = HistogramMetricFamily(self.name, self.doc, labels=self.labels)
        for values, row in self.counts.items():
            cumulative, buckets = 0, []
            for bound, count in zip(self.bounds, row, strict=True):
                cumulative += count
                buckets.append((_le(bound), cumulative))
            family.add_metric(list(values), buckets, self.sums[values])
        yield family


def _le(bound: float) -> str:
    """A bucket's ``le`` label as prometheus_client writes it."""
    return "+Inf" if bound == float("inf") else repr(bound)
