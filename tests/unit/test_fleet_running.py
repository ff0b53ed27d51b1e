"""``rtm up`` refuses a data directory whose fleet is still running (rtmctl.fleet.running_supervisor):
a second fleet would share its SQLite database and overwrite its fleet.json, orphaning the first."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from rtmctl import fleet
from rtmctl.fleet_lock import hold_data_dir, running_supervisor
from rtmctl.launcher import LaunchError, rtm_command

SLEEP = "import time; time.sleep(60)"  # wait-ok: the child process only has to stay alive


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


def test_the_data_directory_is_held_by_rtm_up_and_by_the_fleet_it_started(tmp_path: Path) -> None:
    """rtm up locks DATA_DIR/rtm-up.lock before anything else (two starts racing both passed the
    fleet.json check, which is written once the fleet is up), and its children inherit the lock:
    a fleet whose supervisor was SIGKILLed still holds the directory."""
    fd = hold_data_dir(tmp_path)
    with pytest.raises(LaunchError, match="already running"):
        hold_data_dir(tmp_path)  # a second rtm up
    child = subprocess.Popen([sys.executable, "-c", SLEEP], pass_fds=(fd,))  # as Fleet.launch starts one
    try:
        os.close(fd)  # the supervisor is gone
        with pytest.raises(LaunchError, match="already running"):
            hold_data_dir(tmp_path)
    finally:
        child.kill()
        child.wait()
    os.close(hold_data_dir(tmp_path))  # nobody holds it any more


def test_a_refused_rtm_up_says_one_line_and_nothing_about_stopping(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A second ``rtm up`` on a held directory printed "rtm up: stopping the fleet..." and "rtm up:
    stopped." around its refusal, as if it had stopped the running fleet; it started nothing."""
    fd = hold_data_dir(tmp_path)
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}  # main sets its own
    try:
        assert fleet.main(["--data-dir", str(tmp_path)]) == 1
    finally:
        os.close(fd)
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
    out, err = capsys.readouterr()
    assert out == ""
    assert err.startswith(f"rtm up: failed to start the fleet: a fleet from {tmp_path} is already running"), err
    assert len(err.strip().splitlines()) == 1, err


def test_the_commands_rtm_up_prints_to_copy_are_typed_as_rtm_was(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """README runs ``.venv/bin/rtm up`` with no venv activated; rtm up then printed ``rtm tail bob``,
    which that shell does not find. It prints ``rtm`` only when ``rtm`` on PATH is this one."""
    venv_rtm = tmp_path / ".venv" / "bin" / "rtm"
    venv_rtm.parent.mkdir(parents=True)
    venv_rtm.write_text("#!/bin/sh\n")
    venv_rtm.chmod(0o755)
    monkeypatch.setattr(sys, "argv", [".venv/bin/rtm", "up"])
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PATH", "/nonexistent")
    assert rtm_command() == ".venv/bin/rtm"
    monkeypatch.setenv("PATH", str(venv_rtm.parent))  # the venv activated
    assert rtm_command() == "rtm"
    monkeypatch.setattr(sys, "argv", ["/somewhere/rtmctl/cli.py", "up"])  # python -m rtmctl.cli
    assert rtm_command() == "rtm"
