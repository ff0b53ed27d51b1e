"""``rtm restore BACKUP --data-dir D``: a backup put where ``rtm up --data-dir D`` starts from it.

The data directory is locked for the restore's whole length as ``rtm up`` locks it
(``DATA_DIR/rtm-up.lock``, :func:`rtmctl.fleet_lock.hold_data_dir`): a fleet running on it refuses
the restore, and an ``rtm up`` started meanwhile is refused. BACKUP (a file of ``rtm backup``) is
copied the way a backup is made (:func:`rtmctl.backup.staged_copy`: one read transaction's
``VACUUM INTO`` a 0600 temporary file beside ``webapp.db``, fsynced), then checked (SQLite's
``integrity_check`` and the rtm tables): a file that is not a whole rtm database changes nothing
(a data directory the restore made for it is taken away again).

An existing database is replaced only with ``--force``, and kept: ``webapp.db`` becomes
``webapp.db.before-restore``, and its ``-wal`` and ``-journal`` (committed data not yet
checkpointed) go with it under the matching names, so SQLite opens the kept one whole. Its
``-shm`` (an index of that WAL) is removed. Nothing of the old database is left beside the new
one: a stale WAL beside a restored database would be applied to it by the next open and corrupt
it. A ``webapp.db.before-restore`` from an earlier restore is never overwritten.

The files the database names are copied from ``BACKUP.files/`` (:func:`restore_files`: a directory
holding anything but regular files named by file ids is refused, nothing followed) into a staged
directory renamed to ``DATA_DIR/files`` before the database is renamed into place; ``--force``
keeps the old one as ``files.before-restore``. Files the database names that have no bytes there
(or no ``BACKUP.files`` at all: a backup made before files were carried) are said in a warning.

Then the database is opened once with the current code (the webapp's :func:`migrate`, as at every
start) and ``seed.json`` is rewritten from it (:func:`webapp_stub.seed.write_seed_file`, as ``rtm seed``
and ``rtm users`` write it), so ``rtm tail`` and ``rtm post`` know the backup's users and tokens.
The fleet's secret, Consul tokens and TLS files in D are left as they are; in a new directory
``rtm up`` makes new ones (docs/hardening-webapp.md, "Backups").
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sqlite3
import sys
import time
from dataclasses import replace
from pathlib import Path

from rtmctl.backup import (
    JOURNAL_SUFFIXES,
    SHM_SUFFIX,
    BackupError,
    Snapshot,
    failure,
    install,
    refuse_same_file,
    sidecar,
    staged_copy,
)
from rtmctl.backup_files import (
    FileCopy,
    UnsafeFiles,
    check_restorable,
    check_room,
    discard,
    files_beside,
    fill,
    install_dir,
    named_files,
    staged_dir,
)
from rtmctl.fleet_lock import UP_LOCK_FILE, hold_data_dir
from rtmctl.launcher import LaunchError
from services.config import env_default
from services.errors import CONFIG_ERROR_EXIT_CODE
from services.secret_file import ensure_private_dir
from webapp_stub import search_index
from webapp_stub.database import DB_FILE
from webapp_stub.file_store import FILES_DIR
from webapp_stub.seed import SEED_FILE, write_seed_file
from webapp_stub.store import Store

KEPT_SUFFIX = ".before-restore"  # webapp.db.before-restore: the database a --force restore replaced
KEPT_FILES = FILES_DIR + KEPT_SUFFIX  # files.before-restore: the files directory it replaced


def database_files(database: Path) -> list[Path]:
    """``database`` and the files SQLite keeps beside it that hold its data, those that exist."""
    return [p for p in (database, *(sidecar(database, s) for s in JOURNAL_SUFFIXES)) if p.exists()]


def set_aside(database: Path, kept: Path) -> None:
    """Rename ``database`` and its journals to ``kept`` and the matching names; remove its -shm."""
    for suffix in ("", *JOURNAL_SUFFIXES):
        old = sidecar(database, suffix)
        if old.exists():
            os.replace(old, sidecar(kept, suffix))
    sidecar(database, SHM_SUFFIX).unlink(missing_ok=True)


def rewrite_seed(data_dir: Path, database: Path) -> int | None:
    """Open ``database`` with the current code (it migrates, as the webapp does at start) and write
    ``seed.json`` from it; returns the users written. A database without a team gets no seed.json
    (``rtm up`` seeds one): the old one, another database's tokens, is removed. Returns None then."""
    store = Store(database)
    try:
        try:
            seed = write_seed_file(str(data_dir), store)
        except LookupError:
            (data_dir / SEED_FILE).unlink(missing_ok=True)
            return None
    finally:
        store.close()
    return len(seed["users"])


def reindex(staged: Path) -> None:
    """Rebuild the search index of the checked copy from its messages (:func:`search_index.rebuild`):
    the backup's own index pages are not checked by SQLite and are never used. Raises
    :class:`BackupError`."""
    try:
        with contextlib.closing(sqlite3.connect(staged, isolation_level=None)) as conn:
            search_index.rebuild(conn)
    except sqlite3.Error as exc:
        raise failure(f"could not rebuild the search index of the copy of {staged.name}", exc) from None


def files_present(files: Path) -> bool:
    """Whether ``DATA_DIR/files`` holds anything (an empty one, as the webapp makes it, does not count)."""
    if not os.path.lexists(files):
        return False
    return not (files.is_dir() and not files.is_symlink() and not any(files.iterdir()))


def check_place(data_dir: Path, *, force: bool) -> bool:
    """Whether ``data_dir`` holds a database or files to set aside; refused without ``force``, or
    when an earlier restore's are still there. Raises :class:`BackupError`."""
    database, files = data_dir / DB_FILE, data_dir / FILES_DIR
    kept, kept_files = sidecar(database, KEPT_SUFFIX), data_dir / KEPT_FILES
    there = [p for p, found in ((database, database_files(database)), (files, files_present(files))) if found]
    if there and not force:
        said = " and ".join(str(p) for p in there)
        raise BackupError(
            f"{said} exist{'s' if len(there) == 1 else ''}: give --force to replace (kept as *{KEPT_SUFFIX})"
        )
    present = bool(there)
    if present and (database_files(kept) or os.path.lexists(kept_files)):
        raise BackupError(f"{kept} or {kept_files} is there from an earlier restore: move it away first")
    return present


def restore_files(backup: Path, staged_db: Path, target: Path) -> FileCopy:
    """Copy the files the staged database names from ``BACKUP.files`` into the new directory
    ``target``; none when the backup has no files directory (``source_absent``: made before files
    were backed up). Raises :class:`BackupError` (an unsafe entry, a failing disk)."""
    source, wanted = files_beside(backup), named_files(staged_db)
    if not os.path.lexists(source):
        return FileCopy(target, 0, 0, tuple(sorted(wanted)), source_absent=True)
    try:
        check_restorable(source)
        check_room(target, wanted)
        return fill(target, source, wanted)
    except UnsafeFiles as exc:
        raise BackupError(f"{exc}: it is refused") from None
    except OSError as exc:
        raise failure(f"could not copy the files of {source}", exc) from None


def put_in_place(backup: Path, data_dir: Path) -> Snapshot:
    """The checked copy of ``backup`` and its files staged in ``data_dir``, the old ones set aside,
    then both renamed into place: the files first, so the database is never newer than its files.
    Raises :class:`BackupError`."""
    database, files = data_dir / DB_FILE, data_dir / FILES_DIR
    with staged_copy(backup, database) as (staged, snapshot), contextlib.ExitStack() as stack:
        try:
            target = stack.enter_context(staged_dir(files))
        except OSError as exc:
            raise failure(f"cannot write in {data_dir}", exc) from None
        copied = restore_files(backup, staged, target)
        try:
            set_aside(database, sidecar(database, KEPT_SUFFIX))
            if files_present(files):
                os.replace(files, data_dir / KEPT_FILES)
            discard(files)  # an empty one, as the webapp makes it
        except OSError as exc:
            raise failure(f"could not keep the old database and files as {KEPT_SUFFIX}", exc) from None
        reindex(staged)
        try:
            install_dir(target, files)
        except OSError as exc:
            raise failure(f"could not put the files at {files}", exc) from None
        install(staged, database)
    return replace(snapshot, files=replace(copied, directory=files))


def restore(backup: Path, data_dir: Path, *, force: bool) -> tuple[Snapshot, bool, int | None]:
    """Put ``backup`` in ``data_dir`` as its ``webapp.db``, and its files (``BACKUP.files``) as
    ``files/``; returns what it holds, whether an old database or files were kept aside, and the
    users written to seed.json. Raises :class:`BackupError`."""
    if not backup.is_file():
        raise BackupError(f"no backup file at {backup}")
    database = data_dir / DB_FILE
    refuse_same_file(backup, database, "restore a copy of it, made by rtm backup")
    made = not data_dir.exists()  # a refused restore takes away the directory it made (below)
    try:
        ensure_private_dir(data_dir)
        lock = hold_data_dir(data_dir)
    except LaunchError as exc:
        raise BackupError(str(exc)) from None
    except OSError as exc:
        raise failure(f"cannot use {data_dir}", exc) from None
    restored = False
    try:
        present = check_place(data_dir, force=force)
        snapshot = put_in_place(backup, data_dir)
        restored = True
        try:
            users = rewrite_seed(data_dir, database)
        except (OSError, sqlite3.Error) as exc:
            raise failure(f"{database} is restored, but opening it to write {SEED_FILE} failed", exc) from None
        return snapshot, present, users
    finally:
        if made and not restored:  # not a directory holding only a lock file, which `rtm up` would seed
            with contextlib.suppress(OSError):
                (data_dir / UP_LOCK_FILE).unlink()
                data_dir.rmdir()  # only if empty: nothing else of anyone's is removed
        os.close(lock)


def build_parser() -> argparse.ArgumentParser:
    from rtmctl.cli import COMMANDS  # its one-line summary

    parser = argparse.ArgumentParser(prog="rtm restore", description=COMMANDS["restore"][1])
    parser.add_argument("backup", metavar="BACKUP", help="a file written by rtm backup (its files from BACKUP.files/)")
    parser.add_argument(
        "--data-dir", default=env_default("--data-dir", "./.rtm"), help="where rtm up will find it (webapp.db)"
    )
    parser.add_argument(
        "--force",
        action="store_true",
        help=f"replace an existing webapp.db and files (kept as webapp.db{KEPT_SUFFIX}, {KEPT_FILES})",
    )
    return parser


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    started = time.monotonic()
    data_dir = Path(args.data_dir)
    try:
        snapshot, kept, users = restore(Path(args.backup), data_dir, force=args.force)
    except BackupError as exc:
        print(f"rtm restore: {exc}", file=sys.stderr)
        return CONFIG_ERROR_EXIT_CODE
    aside = f"; the old ones are {data_dir / DB_FILE}{KEPT_SUFFIX} and {data_dir / KEPT_FILES}" if kept else ""
    seeded = f"{data_dir / SEED_FILE} lists {users} users" if users is not None else "no team, so no seed.json"
    print(
        f"restored {args.backup} to {data_dir / DB_FILE}: {snapshot.describe()}{aside}; {seeded}; "
        f"in {time.monotonic() - started:.2f}s",
        flush=True,
    )
    if snapshot.files is not None and snapshot.files.missing:
        print(f"rtm restore: warning: {missing_files(Path(args.backup), snapshot.files)}", file=sys.stderr, flush=True)
    return 0


def missing_files(backup: Path, copied: FileCopy) -> str:
    """The warning of a restore whose database names files it has no bytes for (downloads: 404)."""
    count = len(copied.missing)
    if copied.source_absent:
        return (
            f"{count} files named by the database have no bytes: there is no {files_beside(backup)} "
            "(a backup made before rtm backup copied files?); their downloads answer 404"
        )
    return (
        f"{count} files named by the database are not in {files_beside(backup)} (deleted while the backup "
        "was taken, or removed from it since); their downloads answer 404"
    )
