"""``--debug-faults``: the endpoints exist only with the flag, only on loopback, only for the operator."""

from __future__ import annotations

import subprocess

import aiohttp
import pytest

from rtmctl.launcher import rtm_argv
from services import debug_faults
from services.debug_faults import OPERATOR_TOKEN_HEADER
from services.discovery import Discovery
from services.errors import DebugFaultsRefused
from services.metrics import ServiceMetrics, start_metrics_server

OPERATOR_TOKEN = "operator-token-for-tests"
RUN_TIMEOUT_S = 30.0


def errors(metrics: ServiceMetrics, kind: str) -> float:
    value = metrics.registry.get_sample_value("rtm_errors_total", {"kind": kind})
    return float(value or 0.0)


async def test_fault_endpoint_refuses_requests_without_the_operator_token() -> None:
    discovery = Discovery("127.0.0.1:1")  # never contacted here
    metrics = ServiceMetrics("channel-server", "cs-test")
    routes = debug_faults.fault_routes(discovery, "127.0.0.1", OPERATOR_TOKEN, metrics)
    port, stop = await start_metrics_server("127.0.0.1", 0, metrics, dict, routes)
    url = f"http://127.0.0.1:{port}/debug/consul-partition"
    try:
        async with aiohttp.ClientSession() as http:
            for headers in ({}, {OPERATOR_TOKEN_HEADER: "wrong"}, {OPERATOR_TOKEN_HEADER: OPERATOR_TOKEN + "x"}):
                async with http.post(url, params={"on": "1"}, headers=headers) as resp:
                    assert (resp.status, await resp.json()) == (403, {"ok": False, "error": "forbidden"})
                assert discovery.partitioned is False  # nothing changed
            assert errors(metrics, "debug_forbidden") == 3
            async with http.post(url, params={"on": "1"}, headers={OPERATOR_TOKEN_HEADER: OPERATOR_TOKEN}) as resp:
                assert (resp.status, await resp.json()) == (200, {"ok": True, "partitioned": True})
            assert discovery.partitioned is True
            async with http.get(f"http://127.0.0.1:{port}/metrics") as resp:  # the rest still serves
                assert resp.status == 200
    finally:
        await stop()
        await discovery.close()


@pytest.mark.parametrize(("host", "token"), [("0.0.0.0", OPERATOR_TOKEN), ("10.1.2.3", OPERATOR_TOKEN), ("::", "t")])
def test_fault_routes_are_loopback_only(host: str, token: str) -> None:
    with pytest.raises(DebugFaultsRefused, match="loopback only"):
        debug_faults.check(host, token)


def test_fault_routes_need_an_operator_token() -> None:
    with pytest.raises(DebugFaultsRefused, match="operator-token"):
        debug_faults.check("127.0.0.1", "")
    debug_faults.check("127.0.1.2", "t")  # all of 127.0.0.0/8 is loopback
    debug_faults.check("localhost", "t")
    debug_faults.check("::1", "t")


@pytest.mark.parametrize("service", ["channel-server", "presence"])
def test_a_process_with_debug_faults_off_loopback_refuses_to_start(service: str) -> None:
    argv = rtm_argv(service, "--debug-faults", "--host", "0.0.0.0", "--operator-token", OPERATOR_TOKEN)
    done = subprocess.run(argv, capture_output=True, text=True, timeout=RUN_TIMEOUT_S, check=False)
    assert done.returncode != 0
    assert "loopback only" in done.stderr
    argv = rtm_argv(service, "--debug-faults", "--host", "127.0.0.1", "--operator-token", "")
    done = subprocess.run(argv, capture_output=True, text=True, timeout=RUN_TIMEOUT_S, check=False)
    assert done.returncode != 0
    assert "needs --operator-token" in done.stderr
