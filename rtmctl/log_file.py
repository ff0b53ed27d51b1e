"""Per-process log files of ``rtm up``: ``DATA_DIR/logs/<name>.log``, bounded, written by the launcher.

Each process that ``rtm up`` starts writes to its pipe as before; the launcher's pump thread, which
drains that pipe, copies every line as the process wrote it (the processes' log format already
carries the UTC time and level: :func:`services.logs.configure`) into the process's file, flushed per
line so ``tail -f`` and ``rtm logs -f`` see it at once. The launcher adds one line of its own when it
starts a process and one when its output ends (with the exit code), in the processes' format, so a
file that a restarted process appends to shows where each run began and how it ended.

* Private: the directory is made 0700 and each file 0600 from its first byte
  (:mod:`services.secret_file`); logs hold user ids, channel ids and addresses.
* Bounded: a file that would pass ``max_bytes`` (``rtm up --log-file-max-bytes``, default
  :data:`LOG_FILE_MAX_BYTES`) is renamed ``<name>.log.1`` (replacing the previous one) and a new
  file begun, so a process keeps at most about twice that on disk. :class:`Rotation` decides when,
  without touching files.
* Never in the pump's way: a write that fails (disk full, the directory removed) prints one warning
  on ``rtm up``'s stderr and turns that file off; the pump goes on draining the pipe.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from services.secret_file import create_secret_file, ensure_private_dir

MIB = 1024 * 1024
# A process logs a few lines a second at INFO (none per request): 16 MiB is days of a quiet process
# and hours of a noisy one, and 15 processes times two files stay under half a gigabyte.
LOG_FILE_MAX_BYTES = 16 * MIB
LOG_FILE_MAX_BYTES_LIMIT = 1024 * MIB  # the most --log-file-max-bytes takes (a typo of units, not a wish)
LOG_DIR = "logs"  # under the data directory
LOG_SUFFIX = ".log"
PREVIOUS_SUFFIX = ".1"  # the one previous file kept at rotation
LAUNCHER_LOGGER = "rtm.launcher"  # the logger name on the launcher's own lines

Warn = Callable[[str], None]


def log_dir(data_dir: Path) -> Path:
    return data_dir / LOG_DIR


def log_path(directory: Path, name: str) -> Path:
    """The log file of the process named ``name`` (its name in ``fleet.json``)."""
    return directory / f"{name}{LOG_SUFFIX}"


def previous_path(path: Path) -> Path:
    """Where ``path`` goes when it rotates."""
    return path.with_name(path.name + PREVIOUS_SUFFIX)


@dataclass
class Rotation:
    """When a log file rotates: before a line that would take it past ``max_bytes``.

    A file holds at least one line, however long (a line is never split); ``written`` starts at the
    size of the file appended to."""

    max_bytes: int
    written: int = 0

    def before_write(self, size: int) -> bool:
        """Count a line of ``size`` bytes about to be written; True if the file must rotate first."""
        rotate = self.written > 0 and self.written + size > self.max_bytes
        if rotate:
            self.written = 0
        self.written += size
        return rotate


def launcher_line(name: str, text: str, now: float, json_format: bool = False) -> str:
    """A line of the launcher's own, in the format of the process's lines (see :mod:`services.logs`)."""
    if json_format:
        entry = {"ts": round(now, 6), "level": "info", "logger": LAUNCHER_LOGGER, "instance": name, "msg": text}
        return json.dumps(entry) + "\n"
    stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(now)) + f",{int(now % 1 * 1000):03d}"
    return f"{stamp} {name} INFO {LAUNCHER_LOGGER}: {text}\n"


def _warn_stderr(text: str) -> None:
    try:
        print(text, file=sys.stderr, flush=True)
    except (OSError, ValueError):  # our own stderr is gone: nothing more to do
        pass


class ProcessLogFile:
    """One process's log file. Only the process's pump thread writes it (after :meth:`open`)."""

    def __init__(self, path: Path, max_bytes: int = LOG_FILE_MAX_BYTES, warn: Warn = _warn_stderr) -> None:
        self.path = path
        self.rotation = Rotation(max_bytes)
        self.warn = warn
        self.failed = False
        self._file: BinaryIO | None = None

    def open(self) -> None:
        """Open the file for appending (made 0600, its directory 0700, if new); on error warn and stay off."""
        try:
            ensure_private_dir(self.path.parent)
            self._file = _open_private(self.path)
            self.rotation.written = os.fstat(self._file.fileno()).st_size
        except OSError as exc:
            self._fail("cannot open", exc)

    def write(self, line: str) -> None:
        """Append ``line`` and flush it; rotate first if it is due. Never raises."""
        if self._file is None:
            return
        data = line.encode("utf-8", "replace")
        try:
            if self.rotation.before_write(len(data)):
                self._rotate()
            assert self._file is not None
            self._file.write(data)
            self._file.flush()
        except OSError as exc:
            self._fail("cannot write", exc)

    def close(self) -> None:
        file, self._file = self._file, None
        if file is not None:
            try:
                file.close()
            except OSError as exc:  # the flush of nothing failed: nothing lost, say it anyway
                self.warn(f"rtm up: closing {self.path} failed: {exc}")

    def _rotate(self) -> None:
        self.close()
        os.replace(self.path, previous_path(self.path))
        self._file = _open_private(self.path)

    def _fail(self, what: str, exc: OSError) -> None:
        self.failed = True
        file, self._file = self._file, None
        if file is not None:
            try:
                file.close()
            except OSError:
                pass  # the write already failed; its warning below says so
        self.warn(f"rtm up: {what} {self.path} ({exc}); this process's output goes on to no file")


def _open_private(path: Path) -> BinaryIO:
    """``path`` opened for appending; created 0600 (:func:`services.secret_file.create_secret_file`) if missing."""
    try:
        create_secret_file(path, "")
    except FileExistsError:
        pass
    return open(path, "ab")  # noqa: SIM115 - held open by its ProcessLogFile
