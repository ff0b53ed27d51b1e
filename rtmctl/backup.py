"""``rtm backup OUT``: a consistent copy of the webapp's database, taken while the fleet runs.

The fleet's durable state is one SQLite file, ``DATA_DIR/webapp.db``, in WAL mode: what is
committed lives partly in ``webapp.db-wal`` until a checkpoint copies it back, so a ``cp`` of the
file under load can be torn (pages of two moments, or committed posts missing). A backup is one
read transaction instead: a read-only connection of its own runs ``VACUUM INTO`` (SQLite ≥ 3.27),
which writes the database as that transaction sees it, one consistent snapshot, compacted, into a
new file. In WAL mode a reader never blocks the webapp's writer nor the other way round, so posts
keep being answered while it runs; the WAL only grows by what is posted meanwhile, since no
checkpoint may copy past a snapshot still read (docs/hardening-webapp.md, "Backups").

Not the online backup API (``sqlite3.Connection.backup``): run from another process, it starts
over each time another connection writes the source, and under steady posts it may never finish.

The copy is written to a temporary file beside OUT, created 0600 before SQLite opens it (it holds
every user's token: :mod:`services.secret_file`), fsynced, checked (:func:`check_database`: SQLite's full
``integrity_check``, the rtm tables), then renamed over OUT and the directory fsynced: OUT is the
old file or the whole new one, never a part. An existing OUT is kept unless ``--force``.

OUT is one file, the database: the users and their tokens are in it, and ``rtm restore``
(:mod:`rtmctl.restore`) writes ``seed.json`` from it. Beside it, ``OUT.files/`` holds the bytes of
the files the snapshot names (:func:`copy_files`, :mod:`rtmctl.backup_files`), renamed into place
before OUT is, so OUT is never newer than its files. Not in either: the fleet's secret, Consul
tokens and TLS CA and certificates (``DATA_DIR/secret``, ``consul-acl-token*``, ``operator-token``,
``tls/``).
"""

from __future__ import annotations

import argparse
import os
import secrets
import sqlite3
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

from rtmctl.backup_files import FileCopy, files_beside, fill, install_dir, named_files, staged_dir
from services.config import env_default
from services.errors import CONFIG_ERROR_EXIT_CODE, RtmError
from services.secret_file import create_secret_file
from webapp_stub.codecs import us_to_ts
from webapp_stub.database import DB_FILE
from webapp_stub.file_store import FILES_DIR
from webapp_stub.schema import CORE_TABLES, expected_virtual_tables, virtual_tables

# How long the backup's read connection waits for SQLite's locks. A WAL reader waits only while
# another connection recovers the WAL (after a crash) or the writer's backstop checkpoint resets it:
# milliseconds, but a webapp restarting on a large WAL may take seconds.
READ_BUSY_TIMEOUT_MS = 10_000
# The files SQLite keeps beside a database: its WAL and rollback journal (they belong to it, and
# hold committed data until checkpointed) and the WAL's shared-memory index (rebuilt from the WAL).
JOURNAL_SUFFIXES = ("-wal", "-journal")
SHM_SUFFIX = "-shm"


# The schema objects that run or read on the webapp's behalf, of which a database may hold only
# those rtm makes: triggers (run at each write of their table), views, and virtual tables (an FTS5
# table reads the rows of its ``content=`` table and splits words with its ``tokenize=``). rtm makes
# no trigger and no view, and one virtual table, search.messages' index; a file to restore holding
# another would act on everything written after the restore (a trigger copying each new token into
# a column its author can read: docs/authz-review.md, finding 9).
CODE_OBJECT_TYPES = ("trigger", "view")


class BackupError(RtmError):
    """What ``rtm backup`` or ``rtm restore`` refuses or fails at, as one sentence for the operator;
    the command prints it on one line and exits with :data:`CONFIG_ERROR_EXIT_CODE`."""


@dataclass(frozen=True, slots=True)
class Snapshot:
    """What a checked database file holds, as ``rtm backup`` and ``rtm restore`` report it."""

    size_bytes: int
    messages: int
    events: int
    newest_ts: str | None  # the newest message's ts, None without messages
    files: FileCopy | None = None  # the files' bytes copied with it (rtmctl/backup_files.py)

    def describe(self) -> str:
        newest = self.newest_ts if self.newest_ts is not None else "none"
        text = f"{self.size_bytes} bytes, {self.messages} messages, {self.events} events, newest message ts {newest}"
        return text + (f"; {self.files.describe()}" if self.files is not None else "")


def sidecar(database: Path, suffix: str) -> Path:
    """The file SQLite keeps beside ``database`` with ``suffix`` (``-wal``, ``-journal``, ``-shm``)."""
    return database.with_name(database.name + suffix)


def failure(what: str, exc: BaseException) -> BackupError:
    """``exc`` (an OSError or a SQLite error) said in one sentence about ``what``."""
    reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
    return BackupError(f"{what}: {reason}")


def snapshot_into(source: Path, target: Path) -> None:
    """Write ``source`` as one read transaction sees it into ``target`` (missing or empty) with
    ``VACUUM INTO``, from a read-only connection of its own. Raises ``sqlite3.Error``."""
    conn = sqlite3.connect(f"{source.resolve().as_uri()}?mode=ro", uri=True, isolation_level=None)
    try:
        conn.execute(f"PRAGMA busy_timeout={READ_BUSY_TIMEOUT_MS}")
        conn.execute("VACUUM INTO ?", (os.fspath(target),))
    finally:
        conn.close()


def check_database(path: Path, name: Path) -> Snapshot:
    """Check that ``path`` (a file nobody writes; ``name`` is what the errors call it) is a whole rtm
    database: SQLite's full ``integrity_check`` (every page, index and constraint; ``quick_check``
    skips the indexes against their tables) and the :data:`~webapp_stub.schema.CORE_TABLES`.
    Returns what it holds; raises :class:`BackupError`."""
    conn = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro&immutable=1", uri=True)
    try:
        verdict = [row[0] for row in conn.execute("PRAGMA integrity_check")]
        if verdict != ["ok"]:
            raise BackupError(f"{name} fails SQLite's integrity check: {verdict[0]}")
        tables = {row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        missing = [table for table in CORE_TABLES if table not in tables]
        if missing:
            raise BackupError(f"{name} is not an rtm database (it has no {', '.join(missing)} table)")
        foreign = foreign_objects(conn)
        if foreign:
            raise BackupError(f"{name} holds {', '.join(foreign[:3])}, which rtm never makes: it is refused")
        messages, newest_us = conn.execute("SELECT count(*), max(ts_us) FROM messages").fetchone()
        (events,) = conn.execute("SELECT count(*) FROM events").fetchone()
    except sqlite3.DatabaseError as exc:
        raise BackupError(f"{name} is not an rtm database ({exc})") from None
    finally:
        conn.close()
    newest = None if newest_us is None else us_to_ts(int(newest_us))
    return Snapshot(path.stat().st_size, int(messages), int(events), newest)


def foreign_objects(conn: sqlite3.Connection) -> list[str]:
    """What ``conn``'s database holds of :data:`CODE_OBJECT_TYPES`, and each virtual table that is not
    one rtm makes exactly as it makes it (another ``content=``, ``tokenize=``, module), as
    ``"trigger t"``, ``"virtual table v"``; empty for a database rtm wrote."""
    marks = ",".join("?" * len(CODE_OBJECT_TYPES))
    rows = conn.execute(
        f"SELECT type, name FROM sqlite_master WHERE type IN ({marks}) ORDER BY name", CODE_OBJECT_TYPES
    )
    found = [f"{kind} {name}" for kind, name in rows]
    rtm_tables = expected_virtual_tables()
    return found + [f"virtual table {n}" for n, sql in virtual_tables(conn).items() if rtm_tables.get(n) != sql]


def fsync_path(path: Path, *, directory: bool = False) -> None:
    """fsync ``path`` (a file, or with ``directory`` the directory, so a rename in it is durable)."""
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if directory else 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def staged_copy(source: Path, beside: Path) -> Iterator[tuple[Path, Snapshot]]:
    """A checked snapshot of ``source`` in a new temporary file beside ``beside`` (0600, fsynced),
    for the caller to :func:`install`; removed if the caller leaves it there. Raises
    :class:`BackupError` (the source is no rtm database, the disk refused, the check failed)."""
    tmp = beside.with_name(f".{beside.name}.{secrets.token_hex(4)}.tmp")
    try:
        try:
            create_secret_file(tmp, "")  # VACUUM INTO fills an empty file and keeps its mode
        except OSError as exc:
            raise failure(f"cannot write beside {beside}", exc) from None
        try:
            snapshot_into(source, tmp)
            fsync_path(tmp)
        except (OSError, sqlite3.Error) as exc:
            code = getattr(exc, "sqlite_errorcode", None)
            if code in (sqlite3.SQLITE_NOTADB, sqlite3.SQLITE_CORRUPT):
                raise BackupError(f"{source} is not a whole rtm database ({exc})") from None
            raise failure(f"could not copy {source} beside {beside}", exc) from None
        yield tmp, check_database(tmp, source)
    finally:
        tmp.unlink(missing_ok=True)


def install(staged: Path, target: Path) -> None:
    """Rename ``staged`` over ``target`` (atomic) and make the rename durable."""
    try:
        os.replace(staged, target)
        fsync_path(target.parent, directory=True)
    except OSError as exc:
        raise failure(f"could not put the copy at {target}", exc) from None


def refuse_same_file(path: Path, database: Path, what: str) -> None:
    """Refuse ``path`` when it is ``database`` or one of its SQLite files (a backup renamed over the
    live database, or a restore of the database onto itself, would ruin it)."""
    for candidate in (database, *(sidecar(database, s) for s in (*JOURNAL_SUFFIXES, SHM_SUFFIX))):
        try:
            same = path.exists() and candidate.exists() and path.samefile(candidate)
        except OSError:
            same = False
        if same or path.resolve() == candidate.resolve():
            raise BackupError(f"{path} is the database {database} itself ({what}): give another file")


def backup(data_dir: Path, out: Path, *, force: bool) -> Snapshot:
    """Write a checked, consistent copy of ``DATA_DIR/webapp.db`` to ``out`` (0600, atomic), and the
    bytes of the files it names to ``out.files/`` (:func:`copy_files`). Raises :class:`BackupError`:
    no database, ``out`` or ``out.files`` exists (without ``force``) or cannot be written."""
    source = data_dir / DB_FILE
    if not source.is_file():
        raise BackupError(f"no webapp database at {source}: give the --data-dir of `rtm up`")
    refuse_same_file(out, source, "the backup must go elsewhere")
    if out.is_dir():
        raise BackupError(f"{out} is a directory: give the backup's file name")
    if out.parent.resolve() == (data_dir / FILES_DIR).resolve():
        raise BackupError(f"{out} is in the webapp's files directory: the backup must go elsewhere")
    for existing in (out, files_beside(out)):
        if os.path.lexists(existing) and not force:
            raise BackupError(f"{existing} exists: give --force to replace it")
    if not out.parent.is_dir():
        raise BackupError(f"cannot write {out}: no directory {out.parent}")
    with staged_copy(source, out) as (staged, snapshot):
        copied = copy_files(data_dir / FILES_DIR, staged, files_beside(out))
        install(staged, out)
    return replace(snapshot, files=copied)


def copy_files(source: Path, snapshot: Path, target: Path) -> FileCopy:
    """Copy the bytes of every file the database ``snapshot`` names (uploaded or complete) from
    ``source`` into a staged directory beside ``target``, renamed to ``target``: before the
    database is renamed into place, so a backup's database is never newer than its files. A file
    gone since the snapshot (deleted, swept) is in the result's ``missing``. Raises :class:`BackupError`."""
    try:
        with staged_dir(target) as staged:
            copied = fill(staged, source, named_files(snapshot))
            install_dir(staged, target)
    except OSError as exc:
        raise failure(f"could not copy the files to {target}", exc) from None
    return replace(copied, directory=target)


def build_parser() -> argparse.ArgumentParser:
    from rtmctl.cli import COMMANDS  # its one-line summary

    parser = argparse.ArgumentParser(prog="rtm backup", description=COMMANDS["backup"][1])
    parser.add_argument(
        "out",
        metavar="OUT",
        help="the backup's file (one SQLite file, 0600; its files' bytes in OUT.files/; rtm restore reads both)",
    )
    parser.add_argument("--data-dir", default=env_default("--data-dir", "./.rtm"), help="where webapp.db is")
    parser.add_argument("--force", action="store_true", help="replace OUT and OUT.files if they exist")
    return parser


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    started = time.monotonic()
    out = Path(args.out)
    try:
        snapshot = backup(Path(args.data_dir), out, force=args.force)
    except BackupError as exc:
        print(f"rtm backup: {exc}", file=sys.stderr)
        return CONFIG_ERROR_EXIT_CODE
    print(f"backed up to {out}: {snapshot.describe()}, in {time.monotonic() - started:.2f}s", flush=True)
    return 0
