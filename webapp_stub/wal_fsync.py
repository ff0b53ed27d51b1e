"""fsync of the webapp's SQLite WAL file, for the group commit's fsync thread and for events
committed without an fsync (the scheduler's): webapp_stub/commit.py says when it runs."""

from __future__ import annotations

import os


def wal_path_of(db_path: str) -> str | None:
    """The WAL file of the SQLite database at ``db_path`` (None for an in-memory one)."""
    if not db_path or db_path == ":memory:" or db_path.startswith("file:"):
        return None
    return db_path + "-wal"


class WalFsync:
    """fsync of the WAL through one descriptor kept open: one system call (and one release
    of the GIL) per sync instead of three. The webapp's connection keeps the WAL file from
    being deleted while it is open (SQLite removes it only when the last connection closes),
    so the descriptor always names the live file; after a failure it is opened again."""

    def __init__(self) -> None:
        self._fd: int | None = None
        self._path = ""

    def __call__(self, path: str) -> None:
        fd = self._fd
        if fd is None or path != self._path:
            self.close()
            fd = self._fd = os.open(path, os.O_RDONLY)
            self._path = path
        try:
            os.fsync(fd)
        except OSError:
            self.close()
            raise

    def close(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)
