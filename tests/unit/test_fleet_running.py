"""``rtm up`` refuses a data directory whose fleet is still running (rtmctl.fleet.running_supervisor):
a second fleet would share its SQLite database and overwrite its fleet.json, orphaning the first."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from rtmctl.fleet import running_supervisor

SLEEP = "import time; time.sleep(60)"


def write_fleet_json(data_dir: Path, pid: int) -> None:
    (data_dir / "fleet.json").write_text(json.dumps({"supervisor_pid": pid}))


def test_a_live_rtm_up_is_found_and_anything_else_is_not(tmp_path: Path) -> None:
    assert running_supervisor(tmp_path) is None  # no fleet.json
    (tmp_path / "fleet.json").write_text("{not json")
    assert running_supervisor(tmp_path) is None
    up = subprocess.Popen([sys.executable, "-c", SLEEP, "rtm", "up"])  # argv: ... -c CODE rtm up
    other = subprocess.Popen([sys.executable, "-c", SLEEP])  # a reused pid: not an rtm up
    try:
        write_fleet_json(tmp_path, up.pid)
        assert running_supervisor(tmp_path) == up.pid
        write_fleet_json(tmp_path, other.pid)
        assert running_supervisor(tmp_path) is None
    finally:
        for proc in (up, other):
            proc.kill()
            proc.wait()
    write_fleet_json(tmp_path, up.pid)  # gone: a stale fleet.json does not block a new start
    assert running_supervisor(tmp_path) is None
