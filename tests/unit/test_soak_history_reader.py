"""bench.soak.HistoryReader: a failed history read (the webapp restarting under the chaos) is tried
again, a bounded number of times within a bounded time, instead of being lost to the verdict."""

from __future__ import annotations

from typing import Any

import aiohttp
import pytest

from bench.soak import HistoryReader


class FlakyTraffic:
    """The Web API of a webapp that fails the first ``failures`` calls (a restart), then answers."""

    def __init__(self, failures: int) -> None:
        self.failures = failures
        self.calls: list[str] = []
        self.users = [{"token": "xoxp-1"}]

    async def call(self, method: str, token: str, **params: Any) -> dict[str, Any]:
        self.calls.append(method)
        if self.failures > 0:
            self.failures -= 1
            raise aiohttp.ClientConnectionError("webapp restarting")
        if method == "users.conversations":
            return {"ok": True, "channels": [{"id": "C1"}]}
        return {"ok": True, "messages": [{"ts": "1700000000.000100"}], "has_more": False}


async def test_a_failed_history_read_is_retried_and_kept() -> None:
    traffic = FlakyTraffic(failures=2)
    reader = HistoryReader(traffic, workers=0, attempts=5, retry_delay_s=0.001, retry_budget_s=5.0)  # type: ignore[arg-type]
    await reader.read_with_retries(0, sid=7, closed_us=1_700_000_000_000_000)
    assert reader.counts["retried"] == 2
    assert reader.reads[7]["C1"].ts == {"1700000000.000100"} and reader.reads[7]["C1"].complete


async def test_retries_are_bounded_in_count() -> None:
    traffic = FlakyTraffic(failures=100)
    reader = HistoryReader(traffic, workers=0, attempts=3, retry_delay_s=0.001, retry_budget_s=5.0)  # type: ignore[arg-type]
    with pytest.raises(aiohttp.ClientError):
        await reader.read_with_retries(0, sid=7, closed_us=1_700_000_000_000_000)
    assert len(traffic.calls) == 3 and reader.counts["retried"] == 2 and 7 not in reader.reads


async def test_retries_are_bounded_in_time() -> None:
    traffic = FlakyTraffic(failures=100)
    reader = HistoryReader(traffic, workers=0, attempts=100, retry_delay_s=0.01, retry_budget_s=0.05)  # type: ignore[arg-type]
    with pytest.raises(aiohttp.ClientError):
        await reader.read_with_retries(0, sid=7, closed_us=1_700_000_000_000_000)
    assert len(traffic.calls) <= 4  # 0.01 + 0.02 fit the budget, 0.04 more does not
