"""Prometheus metrics and the health endpoint every process serves.

Each process builds one :class:`ServiceMetrics` (a private registry, so
several services can live in one test process) and serves ``/metrics`` and
``/healthz`` on its metrics port. Names follow Prometheus conventions:
``rtm_<what>_<unit>_total`` for counters, ``_seconds`` for latency.

Every registry also carries the standard process series (:func:`add_process_collectors`):
``process_cpu_seconds_total``, ``process_resident_memory_bytes``, ``process_open_fds`` and the
rest of prometheus_client's ``ProcessCollector`` (read from ``/proc/self`` on each scrape, nothing
in between; absent where there is no ``/proc``), and ``python_info``. ``rtm top`` reads them.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    generate_latest,
)

# End-to-end latency buckets (seconds): sub-millisecond to the 20 s that a
# failover may take.
LATENCY_BUCKETS_S = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0)
FANOUT_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000)

HealthFn = Callable[[], dict[str, Any]]


def add_process_collectors(registry: CollectorRegistry) -> None:
    """The standard ``process_*`` series of this process (CPU seconds, resident memory, open and
    maximum fds, start time; a few reads of ``/proc/self`` per scrape) and ``python_info``
    (computed once) on ``registry``."""
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)


class ServiceMetrics:
    """The metrics every service has, plus a factory for its own."""

    def __init__(self, service: str, instance: str) -> None:
        self.service = service
        self.instance = instance
        self.registry = CollectorRegistry()
        add_process_collectors(self.registry)
        self.errors = self.counter("rtm_errors_total", "Errors by kind (bad input, protocol, peer failures)", ["kind"])
        self.info = self.gauge(
            "rtm_process_info", "Always 1; labels say which process this is", ["service", "instance"]
        )
        self.info.labels(service, instance).set(1)

    def counter(self, name: str, doc: str, labels: list[str] | None = None) -> Counter:
        return Counter(name, doc, labels or [], registry=self.registry)

    def gauge(self, name: str, doc: str, labels: list[str] | None = None) -> Gauge:
        return Gauge(name, doc, labels or [], registry=self.registry)

    def histogram(self, name: str, doc: str, buckets: tuple[float, ...], labels: list[str] | None = None) -> Histogram:
        return Histogram(name, doc, labels or [], buckets=buckets, registry=self.registry)

    def error(self, kind: str) -> None:
        self.errors.labels(kind).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)


def metrics_routes(metrics: ServiceMetrics, health: HealthFn) -> list[web.RouteDef]:
    """``/metrics`` and ``/healthz`` routes, to mount on any aiohttp app."""

    async def get_metrics(_: web.Request) -> web.Response:
        return web.Response(body=metrics.render(), headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def get_health(_: web.Request) -> web.Response:
        report = {"ok": True, "service": metrics.service, "instance": metrics.instance, **health()}
        return web.json_response(report, status=200 if report["ok"] else 503)

    return [web.get("/metrics", get_metrics), web.get("/healthz", get_health)]


async def start_metrics_server(
    host: str, port: int, metrics: ServiceMetrics, health: HealthFn, extra_routes: list[web.RouteDef] | None = None
) -> tuple[int, Callable[[], Awaitable[None]]]:
    """Serve ``/metrics`` and ``/healthz`` (and ``extra_routes``); return the bound port and a stop function."""
    app = web.Application()
    app.add_routes(metrics_routes(metrics, health) + (extra_routes or []))
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    bound = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    return int(bound), runner.cleanup
