"""``rtm up`` as a child process: the one fleet runner of the benchmarks and the system tests.

:meth:`LocalFleet.up` runs the fleet exactly as a user does (``rtm up --data-dir DIR --port-base B``,
each service its own OS process) on a port base that is free right now, waits for the supervisor's
ready line, and reads ``fleet.json``'s content (the ready line) and ``seed.json``; :meth:`LocalFleet.down`
stops the whole tree. The system tests (``tests/system/harness.py``) and the benchmarks
(``bench/harness.py``, ``bench/fleet_events.py``) both build on it. It lives in ``rtmctl`` -- installed
with the package, importing only the launcher and the port helper -- so that the benchmarks import no
test code and the tests need no benchmark extra.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Self

from rtmctl.launcher import RunningProcess, rtm_argv, start
from rtmctl.ports import free_port_base

FLEET_READY_TIMEOUT_S = 90.0  # rtm up on an idle 2-core machine is ready in ~10 s
FLEET_STOP_GRACE_S = 30.0


@dataclass
class LocalFleet:
    """A running ``rtm up`` and what it wrote: ``info`` (fleet.json) and ``seed`` (seed.json)."""

    data_dir: Path
    proc: RunningProcess
    info: dict[str, Any]
    seed: dict[str, Any]
    startup_s: float = 0.0

    @classmethod
    def up(
        cls,
        data_dir: Path,
        *extra: str,
        env: dict[str, str] | None = None,
        echo: IO[str] | None = None,
        ready_timeout_s: float = FLEET_READY_TIMEOUT_S,
        cwd: str | None = None,
    ) -> Self:
        """Start ``rtm up --data-dir DATA_DIR --port-base B EXTRA...`` and wait until it is ready.
        ``echo`` receives every log line after the ready line (each prefixed ``[rtm-up]``)."""
        base = free_port_base()
        argv = rtm_argv("up", "--data-dir", str(data_dir), "--port-base", str(base), *extra)
        started = time.monotonic()
        proc = start("rtm-up", argv, env=env, ready_timeout_s=ready_timeout_s, echo=echo, cwd=cwd)
        startup_s = time.monotonic() - started
        seed = json.loads((data_dir / "seed.json").read_text())
        return cls(data_dir=data_dir, proc=proc, info=proc.ready, seed=seed, startup_s=startup_s)

    def down(self, grace_s: float = FLEET_STOP_GRACE_S) -> None:
        """SIGTERM the supervisor (it stops every process it started); SIGKILL after ``grace_s``."""
        self.proc.stop(grace_s=grace_s)

    def reload(self) -> None:
        """Re-read fleet.json (rtm up rewrites it when it restarts a process)."""
        self.info = json.loads((self.data_dir / "fleet.json").read_text())

    @property
    def api_url(self) -> str:
        return str(self.info["api_url"])

    def processes(self, service: str | None = None) -> list[dict[str, Any]]:
        """fleet.json's processes, all or one service's."""
        return [p for p in self.info["processes"] if service is None or p["service"] == service]

    def user(self, name: str) -> dict[str, Any]:
        return next(u for u in self.seed["users"] if u["name"] == name)

    def channel(self, name: str) -> str:
        return str(next(c["id"] for c in self.seed["channels"] if c["name"] == name))
