"""Start rtm processes as real OS processes and wait for their ready line.

Every rtm process prints exactly one line ``RTM-READY {json}`` on stdout once
it is registered and serving (see :func:`services.process.announce_ready`).
The JSON carries at least ``service``, ``id``, ``host`` and ``port``. The
launcher reads stdout until that line appears (or the deadline passes, or the
process exits) and then keeps draining the pipe in a thread so the child never
blocks on a full pipe. That thread keeps the last :data:`LOG_TAIL_LINES` lines in memory and, given a
:class:`rtmctl.log_file.ProcessLogFile`, copies every line to the process's log file.

Used by ``rtm up`` (the supervisor) and by the integration tests, so both start
processes the same way.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from rtmctl.log_file import ProcessLogFile, launcher_line
from services.logs import LOG_FORMAT_ENV
from services.process import READY_PREFIX

READY_TIMEOUT_S = 20.0
STOP_GRACE_S = 8.0
LOG_TAIL_LINES = 200
EXIT_CODE_WAIT_S = 2.0  # how long the pump waits, at the end of a child's output, for its exit code
OUTPUT_DRAIN_WAIT_S = 2.0  # how long the supervisor waits for a dead child's last lines to be read


class LaunchError(RuntimeError):
    """A process exited or stayed silent before printing its ready line."""


@dataclass
class RunningProcess:
    """A started child process and what its ready line said."""

    name: str
    argv: list[str]
    popen: subprocess.Popen[str]
    ready: dict[str, Any] = field(default_factory=dict)
    log_tail: deque[str] = field(default_factory=lambda: deque(maxlen=LOG_TAIL_LINES))
    log_file: ProcessLogFile | None = None
    log_json: bool = False  # the child logs JSON lines (RTM_LOG_FORMAT=json): so do the launcher's own
    _pump: threading.Thread | None = None

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def kill(self) -> None:
        """SIGKILL the process (for failure tests and ``rtm kill``)."""
        if self.alive():
            self.popen.send_signal(signal.SIGKILL)
        self.popen.wait(timeout=STOP_GRACE_S)

    def stop(self, grace_s: float = STOP_GRACE_S) -> int:
        """SIGTERM, wait up to ``grace_s``, then SIGKILL. Returns the exit code, once the output is
        read to its end (bounded: :data:`OUTPUT_DRAIN_WAIT_S`), so the log file holds the last line."""
        if self.alive():
            try:
                self.popen.send_signal(signal.SIGTERM)
                self.popen.wait(timeout=grace_s)
            except subprocess.TimeoutExpired:
                self.popen.kill()
        code = self.popen.wait(timeout=grace_s)
        self.wait_output()
        return code

    def logs(self) -> str:
        return "".join(self.log_tail)

    def record(self, line: str) -> None:
        """One line of the child's output: into the in-memory tail and the log file (pump thread only)."""
        self.log_tail.append(line)
        if self.log_file is not None:
            self.log_file.write(line)

    def note(self, text: str) -> None:
        """A line of the launcher's own in the log file (not in the tail): a start, an end."""
        if self.log_file is not None:
            self.log_file.write(launcher_line(self.name, text, time.time(), self.log_json))

    def output_ended(self) -> None:
        """The child's output ended: note its exit code (if it comes within a bound) and close the file."""
        if self.log_file is None:
            return
        try:
            self.note(f"output ended; exited with {self.popen.wait(timeout=EXIT_CODE_WAIT_S)}")
        except subprocess.TimeoutExpired:
            self.note(f"output ended; still running after {EXIT_CODE_WAIT_S}s")
        self.log_file.close()

    def wait_output(self, timeout_s: float = OUTPUT_DRAIN_WAIT_S) -> None:
        """Wait (at most ``timeout_s``) until the pump has read the child's output to its end."""
        if self._pump is not None:
            self._pump.join(timeout=timeout_s)


def rtm_argv(*args: str) -> list[str]:
    """The argv that runs ``rtm ARGS`` with this interpreter (no PATH lookup)."""
    return [sys.executable, "-m", "rtmctl.cli", *args]


def rtm_command() -> str:
    """How to type ``rtm`` in the lines rtm up prints to copy: ``rtm`` when that is this one on PATH,
    else as it was typed (``.venv/bin/rtm``, README's way, where no venv is activated)."""
    typed = sys.argv[0]
    if Path(typed).name != "rtm":  # python -m rtmctl.cli, a test
        return "rtm"
    on_path = shutil.which("rtm")
    return "rtm" if on_path and Path(on_path).resolve() == Path(typed).resolve() else typed


def _pump_lines(stream: IO[str], proc: RunningProcess, echo: IO[str] | None) -> None:
    for line in stream:
        proc.record(line)
        if echo is not None:
            try:
                echo.write(f"[{proc.name}] {line}")
                echo.flush()
            except (OSError, ValueError):  # echo closed during shutdown: keep draining the pipe
                echo = None


def _read_output(
    proc: RunningProcess, echo: IO[str] | None, ready_box: list[dict[str, Any]], got_ready: threading.Event
) -> None:
    """The pump: read the child's output to its end; the ready line goes into ``ready_box``."""
    stdout = proc.popen.stdout
    assert stdout is not None
    try:
        for line in stdout:
            proc.record(line)
            if line.startswith(READY_PREFIX) and not ready_box:
                try:
                    ready_box.append(json.loads(line[len(READY_PREFIX) :]))
                except ValueError:  # not a ready line after all: keep reading (the pump must never stop)
                    continue
                got_ready.set()
                break
        else:
            got_ready.set()  # EOF: the process exited
            return
        _pump_lines(stdout, proc, echo)
    finally:
        proc.output_ended()


def child_environment(env: dict[str, str] | None, unset: Iterable[str] = ()) -> dict[str, str]:
    """A child's environment: ours, with ``env`` on top and the names in ``unset`` removed (the
    secrets a child must not inherit from whoever started us, whatever their shell exported)."""
    child_env = dict(os.environ)
    child_env["PYTHONUNBUFFERED"] = "1"
    if env:
        child_env.update(env)
    for name in unset:
        child_env.pop(name, None)
    return child_env


def start(
    name: str,
    argv: list[str],
    *,
    env: dict[str, str] | None = None,
    unset: Iterable[str] = (),
    ready_timeout_s: float = READY_TIMEOUT_S,
    echo: IO[str] | None = None,
    cwd: str | None = None,
    pass_fds: tuple[int, ...] = (),
    log_file: ProcessLogFile | None = None,
) -> RunningProcess:
    """Start ``argv`` and block until its ready line; raise :class:`LaunchError` if none.

    stderr is merged into stdout. With ``echo`` set, every output line after
    the ready line is copied there, prefixed with ``[name]``. With ``log_file``
    set, every output line (from the first) is appended to it, after a line
    saying the process started; the file is closed when the output ends.
    """
    child_env = child_environment(env, unset)
    popen = subprocess.Popen(
        argv,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        text=True,
        errors="replace",  # a stray byte must not end the pump (the child would block on a full pipe)
        bufsize=1,
        env=child_env,
        cwd=cwd,
        start_new_session=True,  # Ctrl-C at a terminal reaches the supervisor only
        pass_fds=pass_fds,
    )
    json_logs = child_env.get(LOG_FORMAT_ENV, "").lower() == "json"
    proc = RunningProcess(name=name, argv=argv, popen=popen, log_file=log_file, log_json=json_logs)
    if log_file is not None:
        log_file.open()
        proc.note(f"started (pid {popen.pid})")
    ready_box: list[dict[str, Any]] = []
    got_ready = threading.Event()

    def reader() -> None:
        _read_output(proc, echo, ready_box, got_ready)

    thread = threading.Thread(target=reader, name=f"pump-{name}", daemon=True)
    thread.start()
    proc._pump = thread
    deadline = time.monotonic() + ready_timeout_s
    while not got_ready.wait(timeout=0.05):
        if time.monotonic() > deadline:
            proc.stop(grace_s=2.0)
            raise LaunchError(f"{name}: no ready line within {ready_timeout_s}s\n{proc.logs()}")
    if not ready_box:
        popen.wait(timeout=STOP_GRACE_S)
        raise LaunchError(f"{name}: exited with {popen.returncode} before ready\n{proc.logs()}")
    proc.ready = ready_box[0]
    return proc
