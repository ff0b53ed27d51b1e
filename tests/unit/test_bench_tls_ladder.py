"""bench.tls_ladder arithmetic: the fit, the per-step rows and the perf report shares (no fleet)."""

from __future__ import annotations

from typing import Any

import pytest

from bench.tls_ladder import ladder_fit, ladder_rows, perf_share, render_ladder


def point(scenario: str, rate: float, deliveries_s: float, cpu_s: float, window_s: float = 10.0) -> dict[str, Any]:
    g = {"user_s": cpu_s * 0.7, "sys_s": cpu_s * 0.3, "run_s": cpu_s, "voluntary_ctxt_switches": 100.0}
    return {
        "scenario": scenario,
        "offered_posts_s": rate,
        "window_s": window_s,
        "deliveries": {"gw-a": int(deliveries_s * window_s)},
        "gateways": {"gw-a": g},
    }


def run(mode: str, per_delivery_us: float, fixed_cores: float) -> dict[str, Any]:
    points = [point("idle", 0.0, 0.0, 0.05)]
    for rate in (100.0, 500.0, 1000.0, 2000.0):
        deliveries_s = rate * 10
        points.append(point("small", rate, deliveries_s, (fixed_cores + deliveries_s * per_delivery_us / 1e6) * 10))
    return {"mode": mode, "points": points}


def test_the_fit_recovers_slope_and_intercept_from_the_loaded_steps() -> None:
    runs = [run("off", 5.0, 0.02), run("on", 5.5, 0.02)]
    fit = ladder_fit(runs, "on")["gw-a"]
    assert fit["slope_us_per_delivery"] == pytest.approx(5.5)
    assert fit["fixed_cpu_percent"] == pytest.approx(2.0)
    assert ladder_fit(runs, "off")["gw-a"]["slope_us_per_delivery"] == pytest.approx(5.0)


def test_rows_give_cost_per_delivery_and_the_table_says_what_tls_adds() -> None:
    result = {"ladder": [run("off", 5.0, 0.0), run("on", 5.5, 0.0)], "config": {}}
    rows = ladder_rows(result)
    assert rows[("small", 1000.0, "on")]["us_per_delivery"] == pytest.approx(5.5)
    assert rows[("idle", 0.0, "off")]["cpu_percent"] == pytest.approx(0.5)
    assert any("+10.0 %" in line for line in render_ladder(result))


def test_perf_share_sums_the_matching_lines() -> None:
    report = "    4.50%  libcrypto.so.3\n    1.00%  libssl.so.3\n   50.00%  libpython3.11.so.1.0\n"
    assert perf_share(report, ("libcrypto", "libssl")) == pytest.approx(5.5)
    assert perf_share(report, ("nothing",)) == 0.0
