"""The files' bytes of a backup: ``OUT.files/`` beside ``rtm backup``'s OUT, and back into
``DATA_DIR/files`` at ``rtm restore`` (docs/hardening-webapp.md, "Backups").

The database names the files; their bytes live in ``DATA_DIR/files/<id>`` (webapp_stub/file_store.py).
A file's bytes are written once, to ``<id>.part``, renamed to ``<id>`` when whole and fsynced, and
only then is its row marked ``uploaded``; nothing writes them again, and ``files.delete`` and the
sweep only unlink them (webapp_stub/file_transfer.py). So the bytes of every file a database
snapshot names as ``uploaded`` or ``complete`` are whole on disk from that snapshot on, until they
are unlinked: a copy taken after the snapshot is consistent with it, and a file unlinked meanwhile
is missing, never half there. They are copied, not hard-linked: a hard link is the live inode, and
would change with it if anything ever rewrote a file in place; a copy is the backup's own.

Every file is opened with ``O_NOFOLLOW`` (and ``O_NONBLOCK``: a FIFO never blocks the copy) below a
directory opened with ``O_NOFOLLOW``, must be a regular file of the size its row says, and is
created 0600 with ``O_EXCL`` in a 0700 directory made for the copy, by its file id only
(:data:`~webapp_stub.file_store.FILE_ID`, checked before any path is built). A restore refuses a
files directory holding anything else (a name that is no file id, a symlink, a directory, a file
with other hard links), and files larger than any upload or than the disk holds (:func:`check_room`).
"""

from __future__ import annotations

import errno
import os
import secrets
import shutil
import sqlite3
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from webapp_stub.file_store import FILE_ID
from webapp_stub.file_transfer import MAX_FILE_BYTES_LIMIT, MIN_FREE_DISK_BYTES, disk_free_bytes

FILES_SUFFIX = ".files"  # OUT.files: the files of the backup OUT
COPY_CHUNK_BYTES = 1024 * 1024
SHOWN_MISSING = 3  # missing file ids named in the summary line
_OPEN_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW


class UnsafeFiles(Exception):
    """A files directory to restore from holds something other than files named by file ids."""


@dataclass(frozen=True, slots=True)
class FileCopy:
    """The files a database names, as copied: how many and their bytes, and those not found (gone
    since the snapshot, or not a regular file of the size its row says)."""

    directory: Path  # where they were copied to
    copied: int
    bytes: int
    missing: tuple[str, ...]
    source_absent: bool = False  # no files directory at all (a backup made before they were backed up)

    def describe(self) -> str:
        text = f"{self.copied} files ({self.bytes} bytes) in {self.directory}"
        if self.missing:
            shown = ", ".join(self.missing[:SHOWN_MISSING]) + (", ..." if len(self.missing) > SHOWN_MISSING else "")
            text += f", {len(self.missing)} named by the database not there ({shown})"
        return text


def files_beside(path: Path) -> Path:
    """``OUT.files``: where the files of the backup ``OUT`` are."""
    return path.with_name(path.name + FILES_SUFFIX)


def named_files(database: Path) -> dict[str, int]:
    """``{file id: size}`` of the files ``database`` (a file nobody writes) names as uploaded or
    complete, whose bytes are on disk; none for a database from before files. Ids not of the
    :data:`FILE_ID` shape are left out: no path is ever built from them."""
    conn = sqlite3.connect(f"{database.resolve().as_uri()}?mode=ro&immutable=1", uri=True)
    try:
        rows = conn.execute("SELECT id, size FROM files WHERE state IN ('uploaded', 'complete')").fetchall()
    except sqlite3.OperationalError:  # no files table: a database from before file sharing
        return {}
    finally:
        conn.close()
    return {str(i): int(size or 0) for i, size in rows if FILE_ID.fullmatch(str(i))}


def _copy_one(source_dir: int, target_dir: int, name: str, size: int) -> bool:
    """Copy ``name`` if it is a regular file of ``size`` bytes (0600, fsynced); False if it is not
    there or is not such a file. Raises OSError for a failing disk."""
    try:
        src = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK, dir_fd=source_dir)
    except (FileNotFoundError, NotADirectoryError):
        return False
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.ENXIO):
            return False  # a symlink (never followed), a socket
        raise
    try:
        found = os.fstat(src)
        if not stat.S_ISREG(found.st_mode) or found.st_size != size:
            return False
        dst = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600, dir_fd=target_dir)
        try:
            written = 0
            while chunk := os.read(src, COPY_CHUNK_BYTES):
                written += len(chunk)
                view = memoryview(chunk)
                while view:
                    view = view[os.write(dst, view) :]
            os.fsync(dst)
        finally:
            os.close(dst)
        if written != size:  # never for bytes written once; said, not kept
            os.unlink(name, dir_fd=target_dir)
            return False
        return True
    finally:
        os.close(src)


def fill(target: Path, source: Path, wanted: dict[str, int]) -> FileCopy:
    """Copy the ``wanted`` files from the directory ``source`` into the new directory ``target``
    (fsynced); those not there as regular files of their size are the copy's ``missing``. A missing
    ``source`` (no file ever uploaded) misses every one. Raises OSError."""
    target_fd = os.open(target, _OPEN_DIR)
    try:
        try:
            source_fd = os.open(source, _OPEN_DIR)
        except FileNotFoundError:
            return FileCopy(target, 0, 0, tuple(sorted(wanted)))
        copied, total, missing = 0, 0, []
        try:
            for name, size in sorted(wanted.items()):
                if _copy_one(source_fd, target_fd, name, size):
                    copied, total = copied + 1, total + size
                else:
                    missing.append(name)
        finally:
            os.close(source_fd)
        os.fsync(target_fd)
    finally:
        os.close(target_fd)
    return FileCopy(target, copied, total, tuple(missing))


def check_restorable(source: Path) -> None:
    """Refuse a files directory to restore from that is a symlink, or holds anything but regular
    files named by file ids (checked with ``lstat``: no symlink is followed). Raises
    :class:`UnsafeFiles`, OSError."""
    if not stat.S_ISDIR(os.lstat(source).st_mode):
        raise UnsafeFiles(f"{source} is not a directory (a symlink is never followed)")
    fd = os.open(source, _OPEN_DIR)
    try:
        for name in os.listdir(fd):
            if not FILE_ID.fullmatch(name):
                raise UnsafeFiles(f"{source} holds {name!r}, which is not a file id")
            found = os.stat(name, dir_fd=fd, follow_symlinks=False)
            if not stat.S_ISREG(found.st_mode):
                raise UnsafeFiles(f"{source} holds {name}, which is not a regular file")
            if found.st_nlink != 1:  # rtm backup writes each file once; a link's bytes are another file's
                raise UnsafeFiles(f"{source} holds {name}, which has {found.st_nlink} hard links")
    finally:
        os.close(fd)


def check_room(target: Path, wanted: dict[str, int]) -> None:
    """Refuse files past the largest upload (:data:`MAX_FILE_BYTES_LIMIT`), or more than ``target``'s
    filesystem holds with the webapp's reserve (:data:`MIN_FREE_DISK_BYTES`) left free: a sparse file
    of any size takes no room in a backup and all of it once copied. Raises :class:`UnsafeFiles`."""
    for name, size in sorted(wanted.items()):
        if size > MAX_FILE_BYTES_LIMIT:
            raise UnsafeFiles(
                f"the database names {name} of {size} bytes, more than any upload ({MAX_FILE_BYTES_LIMIT})"
            )
    needed, free = sum(wanted.values()), disk_free_bytes(target)
    if needed and needed > free - MIN_FREE_DISK_BYTES:
        raise UnsafeFiles(
            f"its files need {needed} bytes and {target.parent} has {free} free, "
            f"of which the webapp keeps {MIN_FREE_DISK_BYTES} for its database"
        )


@contextmanager
def staged_dir(beside: Path) -> Iterator[Path]:
    """A new 0700 directory beside ``beside`` (same filesystem: renamed into place atomically),
    removed with what it holds if the caller leaves it there. Raises OSError."""
    tmp = beside.with_name(f".{beside.name}.{secrets.token_hex(4)}.tmp")
    os.mkdir(tmp, 0o700)
    try:
        yield tmp
    finally:
        discard(tmp)


def discard(path: Path) -> None:
    """Remove ``path``: a directory with what it holds, else the file or symlink itself."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif os.path.lexists(path):
        path.unlink()


def install_dir(staged: Path, target: Path) -> None:
    """Rename the directory ``staged`` to ``target`` and make it durable; an existing ``target`` is
    renamed aside first and removed after. Raises OSError."""
    old = target.with_name(f".{target.name}.{secrets.token_hex(4)}.old")
    replaced = os.path.lexists(target)
    if replaced:
        os.replace(target, old)
    os.replace(staged, target)
    fd = os.open(target.parent, _OPEN_DIR)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    if replaced:
        discard(old)
