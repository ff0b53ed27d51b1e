"""Per-process log files (rtmctl/log_file.py) and the launcher's pump that writes them."""

from __future__ import annotations

import json
import logging
import os
import stat
import sys
import time
from pathlib import Path

import pytest

from rtmctl.launcher import LaunchError, start
from rtmctl.log_file import LAUNCHER_LOGGER, LOG_FILE_MAX_BYTES, ProcessLogFile, Rotation, launcher_line, previous_path
from services.process import READY_PREFIX
from tests.support import DEFAULT_WAIT_S

LINE = "2026-12-07 15:00:00,000 cs-1 INFO rtm.channel_server: a line of 64 bytes, newline too....\n"


def test_a_file_rotates_before_the_line_that_would_pass_its_bound() -> None:
    rotation = Rotation(max_bytes=100)
    assert [rotation.before_write(40) for _ in range(3)] == [False, False, True]  # 80 + 40 > 100
    assert rotation.written == 40  # the new file holds the line that made it
    assert rotation.before_write(60) is False  # exactly 100: still fits


def test_a_line_longer_than_the_bound_is_written_whole_into_a_file_of_its_own() -> None:
    rotation = Rotation(max_bytes=10)
    assert rotation.before_write(50) is False  # an empty file takes any line
    assert rotation.before_write(1) is True


def test_the_count_starts_at_the_size_of_the_file_appended_to() -> None:
    rotation = Rotation(max_bytes=100, written=90)
    assert rotation.before_write(20) is True


def test_the_launchers_own_lines_look_like_the_processes_lines() -> None:
    now = 1_796_655_600.25  # 2026-12-07 15:00:00.25 UTC
    assert launcher_line("cs-1", "started (pid 7)", now) == (
        f"2026-12-07 15:00:00,250 cs-1 INFO {LAUNCHER_LOGGER}: started (pid 7)\n"
    )
    entry = json.loads(launcher_line("cs-1", "started (pid 7)", now, json_format=True))
    assert entry == {
        "ts": now,
        "level": "info",
        "logger": LAUNCHER_LOGGER,
        "instance": "cs-1",
        "msg": "started (pid 7)",
    }
    # the same shape as services.logs' plain format: time, instance, level, logger: message
    fmt = logging.Formatter("%(asctime)s cs-1 %(levelname)s %(name)s: %(message)s")
    fmt.converter = time.gmtime
    record = logging.LogRecord(LAUNCHER_LOGGER, logging.INFO, __file__, 1, "started (pid 7)", None, None)
    record.created, record.msecs = now, 250.0
    assert fmt.format(record) + "\n" == launcher_line("cs-1", "started (pid 7)", now)


def test_the_directory_is_private_the_file_too_and_a_reopened_file_is_appended_to(tmp_path: Path) -> None:
    path = tmp_path / "logs" / "cs-1.log"
    for text in ("first run\n", "second run\n"):
        log = ProcessLogFile(path, max_bytes=1000)
        log.open()
        log.write(text)
        log.close()
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert path.read_text() == "first run\nsecond run\n"


def test_each_line_is_on_disk_once_written(tmp_path: Path) -> None:
    log = ProcessLogFile(tmp_path / "cs-1.log")
    log.open()
    log.write(LINE)
    assert (tmp_path / "cs-1.log").read_text() == LINE  # flushed, though still open
    log.close()


def test_rotation_keeps_one_previous_file_and_bounds_both(tmp_path: Path) -> None:
    path = tmp_path / "cs-1.log"
    lines = [LINE.replace("a line", f"line {i:02d}") for i in range(10)]
    log = ProcessLogFile(path, max_bytes=len(lines[0]) * 3)  # three lines a file
    log.open()
    for line in lines:
        log.write(line)
    log.close()
    assert path.read_text() == "".join(lines[9:])
    assert previous_path(path).read_text() == "".join(lines[6:9])
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(previous_path(path).stat().st_mode) == 0o600
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cs-1.log", "cs-1.log.1"]


def test_a_write_that_fails_warns_once_and_turns_the_file_off(tmp_path: Path) -> None:
    path = tmp_path / "cs-1.log"
    path.symlink_to("/dev/full")  # every write: ENOSPC, as on a full disk
    warnings: list[str] = []
    log = ProcessLogFile(path, warn=warnings.append)
    log.open()
    for _ in range(3):
        log.write(LINE)  # never raises
    assert log.failed
    assert len(warnings) == 1 and str(path) in warnings[0] and "No space left" in warnings[0]


def test_a_file_that_cannot_be_opened_warns_once_and_stays_off(tmp_path: Path) -> None:
    (tmp_path / "logs").write_text("a file where the directory should be")
    warnings: list[str] = []
    log = ProcessLogFile(tmp_path / "logs" / "cs-1.log", warn=warnings.append)
    log.open()
    log.write(LINE)
    log.close()
    assert log.failed and len(warnings) == 1


def child(code: str) -> list[str]:
    return [sys.executable, "-c", code]


READY = f"print({READY_PREFIX!r} + '{{}}', flush=True)"


def test_the_launcher_writes_every_line_of_a_run_between_its_start_and_its_exit_code(tmp_path: Path) -> None:
    path = tmp_path / "logs" / "demo.log"
    code = f"print('before ready', flush=True); {READY}; import sys; print('on stderr', file=sys.stderr); sys.exit(3)"
    proc = start("demo", child(code), log_file=ProcessLogFile(path), ready_timeout_s=DEFAULT_WAIT_S)
    proc.popen.wait(timeout=DEFAULT_WAIT_S)
    proc.wait_output(DEFAULT_WAIT_S)
    lines = path.read_text().splitlines()
    assert lines[0].endswith(f"demo INFO {LAUNCHER_LOGGER}: started (pid {proc.pid})")
    assert lines[1:4] == ["before ready", f"{READY_PREFIX}{{}}", "on stderr"]
    assert lines[4].endswith(f"{LAUNCHER_LOGGER}: output ended; exited with 3")
    assert len(lines) == 5


def test_a_child_that_dies_before_ready_leaves_its_last_words_in_its_file(tmp_path: Path) -> None:
    path = tmp_path / "demo.log"
    with pytest.raises(LaunchError, match="exited with 2"):
        start("demo", child("import sys; print('bad flag'); sys.exit(2)"), log_file=ProcessLogFile(path))
    assert "bad flag\n" in path.read_text()


def test_a_failing_file_never_stops_the_pump(tmp_path: Path) -> None:
    """The file fails at the first line; the pump still drains everything the child writes
    (far more than a pipe holds: a stopped pump would leave the child blocked and never exiting)."""
    path = tmp_path / "demo.log"
    path.symlink_to("/dev/full")
    warnings: list[str] = []
    lines = 20_000  # about 600 KB, ten pipes' worth
    code = f"{READY}\nfor i in range({lines}): print(f'line {{i:05d}} of the child, padded to thirty', flush=False)"
    log = ProcessLogFile(path, warn=warnings.append)
    proc = start("demo", child(code), log_file=log, ready_timeout_s=DEFAULT_WAIT_S)
    assert proc.popen.wait(timeout=DEFAULT_WAIT_S) == 0
    proc.wait_output(DEFAULT_WAIT_S)
    assert proc.log_tail[-1] == f"line {lines - 1:05d} of the child, padded to thirty\n"
    assert len(warnings) == 1 and log.failed
    assert os.path.realpath(path) == "/dev/full"


def test_a_stopped_process_has_its_end_in_its_file_when_stop_returns(tmp_path: Path) -> None:
    path = tmp_path / "demo.log"
    code = f"{READY}; import time; time.sleep(60)"  # wait-ok: the child only has to stay alive until stopped
    proc = start("demo", child(code), log_file=ProcessLogFile(path), ready_timeout_s=DEFAULT_WAIT_S)
    assert proc.stop(grace_s=DEFAULT_WAIT_S) == -15
    assert path.read_text().endswith(f"{LAUNCHER_LOGGER}: output ended; exited with -15\n")


def test_rtm_up_gives_each_process_its_file_unless_told_not_to(tmp_path: Path) -> None:
    from rtmctl.fleet import Fleet, build_parser

    fleet = Fleet(build_parser().parse_args(["--data-dir", str(tmp_path)]))
    log = fleet.log_file("webapp")
    assert log is not None and log.path == tmp_path.resolve() / "logs" / "webapp.log"
    assert log.rotation.max_bytes == LOG_FILE_MAX_BYTES == 16 * 1024 * 1024
    assert f"{tmp_path.resolve()}/logs/<name>.log" in fleet.logs_where()
    off = Fleet(build_parser().parse_args(["--data-dir", str(tmp_path), "--log-file-max-bytes", "0"]))
    assert off.log_file("webapp") is None and "no file" in off.logs_where()


def test_a_ready_line_that_is_not_json_is_read_past_not_the_pumps_end(tmp_path: Path) -> None:
    """A line that starts like the ready line but holds no JSON used to raise in the pump thread,
    which then read nothing more: the child blocked on a full pipe (review13). Now it is an ordinary
    line, the real ready line after it counts, and the pump keeps draining."""
    path = tmp_path / "demo.log"
    noise = "import sys; [print('x' * 1000) for _ in range(200)]; sys.stdout.flush()"  # 200 KB: past a pipe's buffer
    code = f"print({READY_PREFIX!r} + 'not json', flush=True); {READY}; {noise}"
    proc = start("demo", child(code), log_file=ProcessLogFile(path), ready_timeout_s=DEFAULT_WAIT_S)
    assert proc.ready == {}
    assert proc.popen.wait(timeout=DEFAULT_WAIT_S) == 0  # it never blocked on its output
    proc.wait_output(DEFAULT_WAIT_S)
    lines = path.read_text().splitlines()
    assert lines[1:3] == [f"{READY_PREFIX}not json", f"{READY_PREFIX}{{}}"] and lines.count("x" * 1000) == 200
