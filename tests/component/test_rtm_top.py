"""``rtm top``'s scraper (rtmctl/top.py) against real metrics endpoints (services/metrics.py on a
real port), and every process's standard ``process_*`` series there."""

from __future__ import annotations

import io
import json
import socket
from pathlib import Path

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from rtmctl import top
from services.metrics import ServiceMetrics, start_metrics_server

PROCESS_SERIES = {
    "process_cpu_seconds_total",
    "process_resident_memory_bytes",
    "process_open_fds",
    "process_max_fds",
    "process_start_time_seconds",
    "process_virtual_memory_bytes",
    "python_info",
}


def closed_port() -> int:
    """A port nobody listens on a moment later (bound, then released)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


async def test_a_metrics_endpoint_serves_the_process_series_and_rtm_top_reads_them(tmp_path: Path) -> None:
    metrics = ServiceMetrics("webapp", "webapp-0")
    posts = metrics.counter("rtm_webapp_posts_total", "Messages persisted")
    port, stop = await start_metrics_server("127.0.0.1", 0, metrics, dict)
    try:
        async with aiohttp.ClientSession() as http:
            async with http.get(f"http://127.0.0.1:{port}/metrics") as resp:
                text = await resp.text()
            names = {s.name for family in text_string_to_metric_families(text) for s in family.samples}
            assert names >= PROCESS_SERIES, PROCESS_SERIES - names

            proc = top.Process("webapp", "webapp", pid=1, host="127.0.0.1", metrics_port=port)
            posts.inc(3)
            scrape = await top.scrape(http, proc)
            assert scrape is not None
            assert scrape.values["rtm_webapp_posts_total"] == 3
            assert scrape.values[top.CPU] > 0 and scrape.values[top.RSS] > 0 and scrape.values[top.OPEN_FDS] > 0
            gone = top.Process("gone", "gateway", pid=2, host="127.0.0.1", metrics_port=closed_port())
            assert await top.scrape(http, gone) is None  # refused: down, no exception

        fleet = {
            "processes": [
                {"name": "webapp", "service": "webapp", "pid": 1, "host": "127.0.0.1", "metrics_port": port},
                {"name": "gone", "service": "gateway", "pid": 2, "host": "127.0.0.1", "metrics_port": closed_port()},
            ]
        }
        (tmp_path / "fleet.json").write_text(json.dumps(fleet))
        out = io.StringIO()  # not a terminal: tables one after another, a blank line between
        assert await top.run(tmp_path, top.MIN_INTERVAL_S, 2, out) == 0
    finally:
        await stop()
    first, second = out.getvalue().split("\n\n")
    assert top.FIRST_NOTE in first.splitlines()[0] and top.FIRST_NOTE not in second
    rows = {line.split()[0]: line.split() for line in second.splitlines()[2:]}
    assert set(rows) == {"webapp", "gone", "total"}
    assert rows["gone"][1:4] == ["gateway", "2", "down"]
    assert rows["webapp"][1:4] == ["webapp", "1", "up"]
    cpu, rss, fds = (float(v) for v in rows["webapp"][4:7])  # numbers, on the second table
    assert cpu >= 0 and rss > 0 and fds > 0
    assert rows["total"][1:3] == ["1/2", "up"]
