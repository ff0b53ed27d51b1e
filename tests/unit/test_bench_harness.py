"""bench/harness.py's FleetRun: a benchmark stopped with SIGTERM still stops its fleet."""

from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Any

import pytest

from bench import harness


class FakeFleetProcess:
    def __init__(self) -> None:
        self.stopped = False

    def stop(self, grace_s: float) -> None:
        self.stopped = True


class FakeLocalFleet:
    def __init__(self) -> None:
        self.proc = FakeFleetProcess()
        self.info: dict[str, Any] = {"processes": []}
        self.seed: dict[str, Any] = {}
        self.startup_s = 0.0


def test_sigterm_inside_a_run_stops_its_fleet_and_puts_the_handler_back(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    fleet = FakeLocalFleet()
    monkeypatch.setattr(harness.LocalFleet, "up", lambda *args, **kwargs: fleet)
    caught: list[int] = []

    def default(signum: int, _frame: Any) -> None:  # stands in for SIG_DFL: a missed SIGTERM fails, not kills
        caught.append(signum)

    monkeypatch.setattr(signal, "getsignal", lambda _signum: signal.SIG_DFL)  # as in a benchmark's process
    previous = signal.signal(signal.SIGTERM, default)
    try:
        with pytest.raises(SystemExit) as left, harness.FleetRun():
            os.kill(os.getpid(), signal.SIGTERM)  # `kill <benchmark>`
            for _ in range(1000):  # the handler runs between bytecodes; bounded
                pass
            pytest.fail("SIGTERM did not leave the run")
        assert left.value.code == 128 + signal.SIGTERM and not caught
        assert fleet.proc.stopped
        assert signal.signal(signal.SIGTERM, previous) is default  # put back
    finally:
        signal.signal(signal.SIGTERM, previous)
