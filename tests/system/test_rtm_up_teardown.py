"""`rtm up` leaves no process behind, even when whoever read its output is gone.

A benchmark or script that starts `rtm up` with a pipe for its output and then dies closes
that pipe; `rtm up`'s next print then raises BrokenPipeError. Before, that print stood in
front of the teardown, so a SIGTERM left all fifteen fleet processes running.
"""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import time
from pathlib import Path

import psutil

from rtmctl.launcher import rtm_argv
from rtmctl.ports import free_port_base
from services.process import READY_PREFIX
from tests.support import DEFAULT_WAIT_S, wait_until

READY_TIMEOUT_S = 120.0 * (DEFAULT_WAIT_S / 10.0)


def read_ready_line(fd: int, proc: subprocess.Popen[bytes]) -> dict[str, object]:
    """Read the pipe until the ready line; bounded in time."""
    deadline = time.monotonic() + READY_TIMEOUT_S
    buffered = b""
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"rtm up exited with {proc.returncode}"
        ready, _, _ = select.select([fd], [], [], 0.5)
        if not ready:
            continue
        chunk = os.read(fd, 65536)
        assert chunk, "rtm up closed its output before its ready line"
        buffered += chunk
        for line in buffered.decode(errors="replace").splitlines():
            if line.startswith(READY_PREFIX):
                return dict(json.loads(line[len(READY_PREFIX) :]))
    raise AssertionError("rtm up printed no ready line in time")


def gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def test_sigterm_with_its_output_pipe_closed_stops_every_process(tmp_path: Path) -> None:
    read_end, write_end = os.pipe()
    argv = rtm_argv("up", "--data-dir", str(tmp_path / "fleet"), "--port-base", str(free_port_base()))
    proc = subprocess.Popen(argv, stdout=write_end, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL)
    os.close(write_end)
    pids: list[int] = []
    try:
        info = read_ready_line(read_end, proc)
        processes = info["processes"]
        assert isinstance(processes, list)
        pids = [int(p["pid"]) for p in processes]
        assert len(pids) >= 10 and not any(gone(pid) for pid in pids)
        os.close(read_end)  # the reader goes away, as a killed benchmark's would
        read_end = -1
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
        wait_until(lambda: all(gone(pid) for pid in pids), DEFAULT_WAIT_S * 3, "every fleet process to stop")
    finally:
        if read_end >= 0:
            os.close(read_end)
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)
        for pid in pids:  # never leave a process behind, even when the test fails
            if not gone(pid):
                os.kill(pid, signal.SIGKILL)
