"""``rtm logs [NAME ...] [-n LINES] [-f]``: what the fleet's processes said, from their log files.

``rtm up`` writes each process's output to ``DATA_DIR/logs/<name>.log`` (:mod:`rtmctl.log_file`).
This prints the last LINES lines of each named process's file (every process's when none is named),
reaching into the previous file ``<name>.log.1`` when the current one holds fewer. With more than
one process each line starts with ``[name] ``. A NAME is a process's name in ``fleet.json`` (as
``rtm status`` and ``rtm kill`` show them) or its instance id, or a ring slot (``cs-1``, ``ps-0``)
as ``rtm kill`` takes it: the process that serves the slot now, as the ring document in the fleet's
Consul says (:func:`rtmctl.operator.slot_owner`; a Consul that cannot be read is one sentence, exit
2). With ``-f`` it then prints lines as they are written, following each file across its rotation,
until Ctrl-C; the processes and the fleet need not be running (the files are read, nothing else;
only a slot name asks Consul, once, at the start).

Following is a loop over the files, every :data:`FOLLOW_POLL_S`: read what was added to the open
file, then look at the path: when it names another file (rotated: the rest of the old one is read
first, as the writer may have added to it between that read and the look) or a shorter one
(truncated), read it from its start. :func:`follow_action` decides
that from two stats; the rest is I/O.
"""

from __future__ import annotations

import argparse
import enum
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from rtmctl.log_file import LOG_SUFFIX, log_dir, log_path, previous_path
from services.config import env_default

DEFAULT_LINES = 50
FOLLOW_POLL_S = 0.25  # how often -f looks for new lines: a person reading, not a machine
READ_BLOCK_BYTES = 64 * 1024  # the tail of a file is read backwards in blocks of this size


class SlotUnresolved(LookupError):
    """A ring slot whose owner now is not a process with a log here (or that has no owner)."""


class ConsulUnreadable(Exception):
    """The fleet's Consul could not be asked who serves a slot (a sentence saying why)."""


class UnknownProcess(LookupError):
    """A NAME that is neither a log file's name nor an instance id in ``fleet.json``."""

    def __init__(self, name: str, known: list[str]) -> None:
        super().__init__(f"no process named {name!r}; known: {', '.join(known) if known else 'none'}")
        self.name = name
        self.known = known


@dataclass(frozen=True)
class FileId:
    """Which file a path or an open file is (device and inode), and its size."""

    device: int
    inode: int
    size: int

    @classmethod
    def of(cls, stat: os.stat_result) -> FileId:
        return cls(stat.st_dev, stat.st_ino, stat.st_size)

    def same_file(self, other: FileId) -> bool:
        return (self.device, self.inode) == (other.device, other.inode)


class FollowAction(enum.Enum):
    WAIT = "wait"  # nothing new: look again later
    REOPEN = "reopen"  # the path names a new file (rotated) or a shorter one (truncated): read it from its start


def follow_action(opened: FileId | None, position: int, on_disk: FileId | None) -> FollowAction:
    """What to do after reading an open file (``opened``, read up to ``position``) to its end, given
    what its path names now (``on_disk``; None when there is no file there, e.g. mid-rotation)."""
    if on_disk is None:
        return FollowAction.WAIT
    if opened is None or not opened.same_file(on_disk) or on_disk.size < position:
        return FollowAction.REOPEN
    return FollowAction.WAIT


def last_lines(file: BinaryIO, count: int) -> tuple[list[bytes], int]:
    """The last ``count`` complete lines of ``file`` and the offset just after the last one (where
    following goes on; a line being written without its newline yet is left to it)."""
    end = os.fstat(file.fileno()).st_size
    chunks: list[bytes] = []
    newlines, position = 0, end
    while position > 0 and newlines <= count:
        size = min(READ_BLOCK_BYTES, position)
        position -= size
        file.seek(position)
        chunk = file.read(size)
        chunks.insert(0, chunk)
        newlines += chunk.count(b"\n")
    data = b"".join(chunks)
    complete = data[: data.rfind(b"\n") + 1]
    lines = complete.splitlines(keepends=True)
    if position > 0:  # the first line may be cut: more than count lines were read anyway
        lines = lines[1:]
    return lines[-count:] if count else [], position + len(complete)


def tail(path: Path, count: int) -> tuple[list[bytes], BinaryIO | None]:
    """The last ``count`` lines of a process's log (from ``NAME.log.1`` too when ``NAME.log`` holds
    fewer), and ``NAME.log`` open at the end of those lines (None if there is no such file)."""
    try:
        current = open(path, "rb")  # noqa: SIM115 - returned to the caller, who follows it
    except FileNotFoundError:
        current = None
    lines: list[bytes] = []
    if current is not None:
        lines, end = last_lines(current, count)
        current.seek(end)
    if len(lines) < count:
        try:
            with open(previous_path(path), "rb") as previous:
                lines = last_lines(previous, count - len(lines))[0] + lines
        except FileNotFoundError:
            pass
    return lines, current


class Follower:
    """One process's log being followed: the open file, where reading got to, a partial last line."""

    def __init__(self, name: str, path: Path, file: BinaryIO | None) -> None:
        self.name = name
        self.path = path
        self.file = file
        self.partial = b""

    def read_new(self) -> list[bytes]:
        """The complete lines added since the last call, across a rotation or truncation."""
        lines = self._read_open()
        opened = FileId.of(os.fstat(self.file.fileno())) if self.file is not None else None
        position = self.file.tell() if self.file is not None else 0
        try:
            on_disk: FileId | None = FileId.of(os.stat(self.path))
        except FileNotFoundError:
            on_disk = None
        if follow_action(opened, position, on_disk) is FollowAction.REOPEN:
            lines += self._read_open()  # what the writer added to the old file since it was read, then rotated
            self.close()
            if self.partial:  # the old file ended without a newline: its last line, as it is
                lines.append(self.partial + b"\n")
                self.partial = b""
            try:
                self.file = open(self.path, "rb")  # noqa: SIM115 - held while following
            except FileNotFoundError:
                return lines
            lines += self._read_open()
        return lines

    def _read_open(self) -> list[bytes]:
        if self.file is None:
            return []
        data = self.partial + self.file.read()
        complete = data.rfind(b"\n") + 1
        self.partial = data[complete:]
        return data[:complete].splitlines(keepends=True)

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None


def known_processes(data_dir: Path) -> dict[str, str]:
    """Every name ``rtm logs`` takes, to the name of its log file: the log files' names, and the
    names and instance ids of the processes in ``fleet.json``."""
    names: dict[str, str] = {}
    directory = log_dir(data_dir)
    if directory.is_dir():
        names.update(
            {p.name.removesuffix(LOG_SUFFIX): p.name.removesuffix(LOG_SUFFIX) for p in directory.glob("*.log")}
        )
    try:
        fleet = json.loads((data_dir / "fleet.json").read_text())
    except (OSError, ValueError):
        return names
    for process in fleet.get("processes", []):
        names.setdefault(process["name"], process["name"])
        names.setdefault(process["id"], process["name"])
    return names


def writes_no_files(data_dir: Path) -> bool:
    """Whether ``fleet.json`` says its ``rtm up`` writes no log files (``log_dir`` empty:
    ``--log-file-max-bytes 0``) and none from an earlier run are there to read."""
    try:
        fleet = json.loads((data_dir / "fleet.json").read_text())
    except (OSError, ValueError):
        return False
    return fleet.get("log_dir") == "" and not any(log_dir(data_dir).glob(f"*{LOG_SUFFIX}"))


def through_ring(data_dir: Path, given: list[str], known: dict[str, str]) -> list[str]:
    """``given``, each ring slot in it (``cs-N``, ``ps-N``; a name that is not also a known one)
    replaced by the instance id of the process serving it now, as ``rtm kill`` resolves it. Raises
    :class:`ConsulUnreadable` and :class:`SlotUnresolved`."""
    from rtmctl import operator  # py-consul and requests: only when a slot is given

    slots = {name: service for name in given if name not in known and (service := operator.slot_service(name))}
    if not slots:
        return given
    try:
        client = operator.fleet_client(data_dir)
        owners = {slot: operator.slot_owner(client, service, slot) for slot, service in slots.items()}
    except operator.CONSUL_FAILURES as exc:
        raise ConsulUnreadable(f"cannot look up ring slots: {operator.consul_failure(exc, flags=False)}") from None
    for slot, owner in owners.items():
        if owner is None:
            raise SlotUnresolved(f"the {slots[slot]} ring has no slot {slot} with an owner now (see rtm status)")
        if owner not in known:
            raise SlotUnresolved(f"slot {slot} is served by {owner}, which has no log in {log_dir(data_dir)}")
    return [owners.get(name) or name for name in given]


def resolve(given: list[str], known: dict[str, str]) -> list[str]:
    """The log names of the processes ``given`` (every one when none is); raises :class:`UnknownProcess`."""
    if not given:
        return sorted(set(known.values()))
    listed = sorted(set(known.values()))
    resolved = []
    for name in given:
        if name not in known:
            raise UnknownProcess(name, listed)
        if known[name] not in resolved:
            resolved.append(known[name])
    return resolved


def show(lines: list[bytes], prefix: str) -> None:
    out = sys.stdout
    for line in lines:
        out.write(prefix + line.decode("utf-8", "replace"))
    out.flush()


def follow(followers: list[Follower], prefixed: bool) -> None:
    """Print new lines of every file as they come, until Ctrl-C (KeyboardInterrupt)."""
    while True:
        quiet = True
        for follower in followers:
            lines = follower.read_new()
            if lines:
                quiet = False
                show(lines, f"[{follower.name}] " if prefixed else "")
        if quiet:
            time.sleep(FOLLOW_POLL_S)  # wait-ok: polling files that another process appends to


def build_parser() -> argparse.ArgumentParser:
    from rtmctl.cli import COMMANDS  # its one-line summary

    parser = argparse.ArgumentParser(prog="rtm logs", description=COMMANDS["logs"][1])
    parser.add_argument(
        "names",
        nargs="*",
        metavar="NAME",
        help="process names or ids as in fleet.json, or ring slots cs-N, ps-N (default: all)",
    )
    parser.add_argument(
        "-n", "--lines", type=int, default=DEFAULT_LINES, help=f"last lines of each (default {DEFAULT_LINES})"
    )
    parser.add_argument("-f", "--follow", action="store_true", help="then print new lines as they come, until Ctrl-C")
    parser.add_argument("--data-dir", default=env_default("--data-dir", "./.rtm"), help="rtm up's data directory")
    return parser


def main(argv: list[str]) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.lines < 0:
        parser.error(f"-n must be at least 0, not {args.lines}")
    data_dir = Path(args.data_dir)
    known = known_processes(data_dir)
    if writes_no_files(data_dir):
        print(
            f"rtm logs: the fleet in {data_dir} writes no log files (`rtm up --log-file-max-bytes 0`); "
            "`rtm up --verbose` prints its processes' output on its terminal",
            file=sys.stderr,
        )
        return 1
    if not known:
        print(
            f"rtm logs: no logs in {log_dir(data_dir)} (give the --data-dir that `rtm up` was started with)",
            file=sys.stderr,
        )
        return 1
    try:
        names = resolve(through_ring(data_dir, args.names, known), known)
    except ConsulUnreadable as exc:
        print(f"rtm logs: {exc}", file=sys.stderr)
        return 2
    except (SlotUnresolved, UnknownProcess) as exc:
        print(f"rtm logs: {exc}", file=sys.stderr)
        return 1
    prefixed = len(names) > 1
    followers = []
    for name in names:
        path = log_path(log_dir(data_dir), name)
        lines, file = tail(path, args.lines)
        if file is None and not previous_path(path).exists():
            print(f"rtm logs: {name} has no log file (yet) at {path}", file=sys.stderr)
        show(lines, f"[{name}] " if prefixed else "")
        followers.append(Follower(name, path, file))
    try:
        if args.follow:
            follow(followers, prefixed)
    except KeyboardInterrupt:
        pass
    finally:
        for follower in followers:
            follower.close()
    return 0
