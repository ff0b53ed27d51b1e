"""``rtm logs`` (rtmctl/logs.py): the last lines of each process's file, and following them."""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path

import pytest

from rtmctl import logs
from rtmctl.log_file import ProcessLogFile, log_dir, log_path, previous_path
from rtmctl.logs import FileId, FollowAction, Follower, UnknownProcess, follow_action, last_lines, resolve, tail
from tests.support import DEFAULT_WAIT_S, free_port, interruptible_child

A, B = FileId(1, 10, 0), FileId(1, 11, 0)


def sized(file: FileId, size: int) -> FileId:
    return FileId(file.device, file.inode, size)


def test_follow_reopens_when_the_path_names_another_file_or_a_shorter_one() -> None:
    assert follow_action(sized(A, 100), 100, sized(A, 100)) is FollowAction.WAIT  # nothing new
    assert follow_action(sized(A, 100), 100, sized(A, 150)) is FollowAction.WAIT  # read on the open file
    assert follow_action(sized(A, 100), 100, sized(B, 5)) is FollowAction.REOPEN  # rotated
    assert follow_action(sized(A, 100), 100, sized(A, 20)) is FollowAction.REOPEN  # truncated
    assert follow_action(sized(A, 100), 100, None) is FollowAction.WAIT  # mid-rotation: no file yet
    assert follow_action(None, 0, sized(B, 0)) is FollowAction.REOPEN  # the file appeared


def lines_of(count: int, start: int = 0) -> list[bytes]:
    return [f"line {i}\n".encode() for i in range(start, start + count)]


@pytest.mark.parametrize("count", [0, 1, 3, 10, 20])
def test_last_lines_stops_before_a_line_still_being_written(tmp_path: Path, count: int) -> None:
    path = tmp_path / "x.log"
    path.write_bytes(b"".join(lines_of(10)) + b"half a li")
    with open(path, "rb") as file:
        got, end = last_lines(file, count)
    assert got == lines_of(10)[-count:] if count else got == []
    assert end == path.stat().st_size - len(b"half a li")


def test_last_lines_reads_a_big_file_backwards_in_blocks(tmp_path: Path) -> None:
    path = tmp_path / "x.log"
    many = lines_of(50_000)  # more than a block
    path.write_bytes(b"".join(many))
    with open(path, "rb") as file:
        assert last_lines(file, 3)[0] == many[-3:]
        assert last_lines(file, 20_000)[0] == many[-20_000:]


def test_tail_reaches_into_the_previous_file_when_the_current_one_is_short(tmp_path: Path) -> None:
    path = tmp_path / "cs-1.log"
    previous_path(path).write_bytes(b"".join(lines_of(5)))
    path.write_bytes(b"".join(lines_of(2, start=5)))
    got, file = tail(path, 4)
    assert file is not None
    file.close()
    assert got == lines_of(4, start=3)


def test_a_follower_reads_on_across_a_rotation_without_losing_a_line(tmp_path: Path) -> None:
    path = tmp_path / "cs-1.log"
    writer = ProcessLogFile(path, max_bytes=len(b"line 0\n") * 3)  # three lines a file
    writer.open()
    writer.write("line 0\n")
    seen, file = tail(path, 10)
    follower = Follower("cs-1", path, file)
    try:
        for i in range(1, 8):  # rotates twice; the follower reads after each line
            writer.write(f"line {i}\n")
            seen += follower.read_new()
    finally:
        writer.close()
        follower.close()
    assert seen == lines_of(8)


def test_a_follower_prints_a_line_once_it_is_complete(tmp_path: Path) -> None:
    path = tmp_path / "cs-1.log"
    path.write_bytes(b"half")
    follower = Follower("cs-1", path, None)
    try:
        assert follower.read_new() == []
        with open(path, "ab") as file:
            file.write(b" a line\nthe last line, cut\n"[:-1])
        assert follower.read_new() == [b"half a line\n"]
        os.replace(path, previous_path(path))  # rotated with the cut line last: it is printed as it is
        path.write_bytes(b"next\n")
        assert follower.read_new() == [b"the last line, cut\n", b"next\n"]
    finally:
        follower.close()


def test_a_follower_that_looks_only_after_a_rotation_reads_the_old_file_to_its_end_first(tmp_path: Path) -> None:
    path = tmp_path / "cs-1.log"
    writer = ProcessLogFile(path, max_bytes=len(b"line 0\n") * 2)
    writer.open()
    follower = Follower("cs-1", path, tail(path, 0)[1])
    try:
        for i in range(4):  # line 0, 1 in the old file (now .1), 2, 3 in the new one
            writer.write(f"line {i}\n")
        assert follower.read_new() == lines_of(4)
    finally:
        writer.close()
        follower.close()


def test_a_line_written_and_rotated_away_while_the_follower_looks_reaches_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The writer adds a line and rotates between the follower's read of the open file and its look
    at the path: the old file's last line is read before the new file is, not skipped."""
    path = tmp_path / "cs-1.log"
    writer = ProcessLogFile(path, max_bytes=len(b"line 0\n") * 2)
    writer.open()
    writer.write("line 0\n")
    follower = Follower("cs-1", path, tail(path, 10)[1])
    stat = os.stat

    def stat_after_the_writer(target: object) -> os.stat_result:  # the writer runs just before the look
        monkeypatch.setattr(os, "stat", stat)
        writer.write("line 1\n")
        writer.write("line 2\n")  # rotates: line 0 and 1 in the old file
        return stat(target)  # type: ignore[arg-type]

    try:
        monkeypatch.setattr(os, "stat", stat_after_the_writer)
        assert follower.read_new() == [b"line 1\n", b"line 2\n"]
    finally:
        writer.close()
        follower.close()


def test_a_follower_waits_for_a_file_that_is_not_there_yet(tmp_path: Path) -> None:
    path = tmp_path / "cs-1.log"
    follower = Follower("cs-1", path, None)
    assert follower.read_new() == []
    path.write_bytes(b"line 0\n")
    assert follower.read_new() == [b"line 0\n"]
    follower.close()


def write_fleet(data_dir: Path, names: dict[str, str]) -> None:
    """Log files for ``names`` (name -> instance id) and a fleet.json that lists them."""
    for name in names:
        writer = ProcessLogFile(log_path(log_dir(data_dir), name))
        writer.open()
        for i in range(3):
            writer.write(f"{name} line {i}\n")
        writer.close()
    processes = [{"name": name, "id": iid} for name, iid in names.items()]
    (data_dir / "fleet.json").write_text(json.dumps({"processes": processes}))


def test_names_are_log_files_or_instance_ids_and_an_unknown_one_lists_them(tmp_path: Path) -> None:
    write_fleet(tmp_path, {"webapp": "webapp-0", "cs-1": "cs-1"})
    known = logs.known_processes(tmp_path)
    assert resolve([], known) == ["cs-1", "webapp"]
    assert resolve(["webapp-0", "webapp"], known) == ["webapp"]
    with pytest.raises(UnknownProcess) as caught:
        resolve(["cs-9"], known)
    assert caught.value.known == ["cs-1", "webapp"]
    assert str(caught.value) == "no process named 'cs-9'; known: cs-1, webapp"


def run_logs(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = logs.main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def test_rtm_logs_prints_one_process_bare_and_several_prefixed(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    write_fleet(tmp_path, {"webapp": "webapp-0", "cs-1": "cs-1"})
    assert run_logs(["webapp-0", "-n", "2", "--data-dir", str(tmp_path)], capsys) == (
        0,
        "webapp line 1\nwebapp line 2\n",
        "",
    )
    code, out, _ = run_logs(["-n", "1", "--data-dir", str(tmp_path)], capsys)
    assert (code, out) == (0, "[cs-1] cs-1 line 2\n[webapp] webapp line 2\n")


def test_rtm_logs_refuses_an_unknown_name_and_a_directory_without_logs(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    write_fleet(tmp_path, {"webapp": "webapp-0"})
    code, out, err = run_logs(["nope", "--data-dir", str(tmp_path)], capsys)
    assert (code, out) == (1, "") and "no process named 'nope'; known: webapp" in err
    code, out, err = run_logs(["--data-dir", str(tmp_path / "elsewhere")], capsys)
    assert (code, out) == (1, "") and "no logs in" in err


def test_rtm_logs_of_a_fleet_that_writes_no_files_says_so(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """``rtm up --log-file-max-bytes 0`` (fleet.json's ``log_dir`` empty): one sentence, exit 1, even
    with ``-f`` (before: a "has no log file (yet)" line per process, exit 0; ``-f`` waited forever)."""
    processes = [{"name": "webapp", "id": "webapp-0"}, {"name": "cs-1", "id": "cs-1"}]
    (tmp_path / "fleet.json").write_text(json.dumps({"log_dir": "", "processes": processes}))
    for argv in (["--data-dir", str(tmp_path)], ["webapp", "-f", "--data-dir", str(tmp_path)]):
        code, out, err = run_logs(argv, capsys)
        assert (code, out) == (1, "")
        assert err == (
            f"rtm logs: the fleet in {tmp_path} writes no log files (`rtm up --log-file-max-bytes 0`); "
            "`rtm up --verbose` prints its processes' output on its terminal\n"
        )


def test_a_slot_name_without_a_reachable_consul_is_one_sentence(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``rtm logs cs-0`` asks the fleet's Consul which process serves the slot; none answers at the
    address fleet.json names: one sentence, exit 2. A process's own name needs no Consul."""
    write_fleet(tmp_path, {"webapp": "webapp-0", "cs-1a2b3c": "cs-1a2b3c"})
    fleet = json.loads((tmp_path / "fleet.json").read_text())
    port = free_port()  # nobody listens there
    (tmp_path / "fleet.json").write_text(json.dumps({**fleet, "consul_url": f"http://127.0.0.1:{port}"}))
    for slot in ("cs-0", "ps-1"):
        code, out, err = run_logs([slot, "--data-dir", str(tmp_path)], capsys)
        assert (code, out) == (2, "") and err.count("\n") == 1, err
        assert err.startswith(f"rtm logs: cannot look up ring slots: cannot reach Consul at 127.0.0.1:{port}; "), err
    assert run_logs(["cs-1a2b3c", "-n", "1", "--data-dir", str(tmp_path)], capsys) == (0, "cs-1a2b3c line 2\n", "")
    code, _, err = run_logs(["cs-x", "--data-dir", str(tmp_path)], capsys)  # no slot name: no Consul either
    assert code == 1 and "no process named 'cs-x'" in err


def test_rtm_logs_follow_prints_new_lines_until_interrupted(tmp_path: Path) -> None:
    """The real command in a child: -f prints a line written after it started, and Ctrl-C ends it quietly."""
    write_fleet(tmp_path, {"webapp": "webapp-0"})
    argv = [sys.executable, "-m", "rtmctl.cli", "logs", "webapp", "-n", "1", "-f", "--data-dir", str(tmp_path)]
    with interruptible_child(argv) as proc:
        assert proc.stdout is not None
        assert proc.stdout.readline() == b"webapp line 2\n"  # the tail, printed before following
        writer = ProcessLogFile(log_path(log_dir(tmp_path), "webapp"))
        writer.open()
        writer.write("written while following\n")
        writer.close()
        assert proc.stdout.readline() == b"written while following\n"
        proc.send_signal(signal.SIGINT)  # as Ctrl-C
        assert proc.wait(timeout=DEFAULT_WAIT_S) == 0
        assert proc.stderr is not None and b"Traceback" not in proc.stderr.read()


def test_rtm_logs_is_an_rtm_command_with_a_one_line_summary() -> None:
    from rtmctl.cli import COMMANDS, USAGE

    module, summary = COMMANDS["logs"]
    assert module == "rtmctl.logs" and "\n" not in summary
    assert f"  {'logs':<15} {summary}" in USAGE
