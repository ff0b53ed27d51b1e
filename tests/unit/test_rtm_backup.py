"""``rtm backup`` (rtmctl/backup.py): one read transaction's consistent copy, 0600, atomic, checked;
its refusals in one line with exit code 2."""

from __future__ import annotations

import os
import sqlite3
import stat
from pathlib import Path

import pytest

from rtmctl import backup as backup_module
from rtmctl.backup import BackupError, backup, check_database, main
from tests.support import add_file
from tests.support import post_in_general as post
from tests.support import seeded_store as seeded


def rows(path: Path, sql: str) -> list[tuple[object, ...]]:
    conn = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)
    try:
        return conn.execute(sql).fetchall()
    finally:
        conn.close()


def test_a_backup_is_a_checked_0600_copy_of_what_is_committed(tmp_path: Path) -> None:
    store = seeded(tmp_path / "data", posts=7)
    store.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    store.conn.execute("PRAGMA wal_autocheckpoint=0")  # what follows stays in the WAL, as under load
    post(store, "only in the wal")
    assert b"only in the wal" not in (tmp_path / "data" / "webapp.db").read_bytes()  # what a cp would miss
    out = tmp_path / "b.db"
    snapshot = backup(tmp_path / "data", out, force=False)
    store.close()
    assert stat.S_IMODE(out.stat().st_mode) == 0o600
    assert (snapshot.messages, snapshot.events, snapshot.size_bytes) == (8, 8, out.stat().st_size)
    assert rows(out, "SELECT text FROM messages ORDER BY seq DESC LIMIT 1") == [("only in the wal",)]
    assert snapshot.newest_ts == rows(out, "SELECT ts FROM messages ORDER BY ts_us DESC LIMIT 1")[0][0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b.db", "b.db.files", "data"]  # no temporary file left
    assert list((tmp_path / "b.db.files").iterdir()) == []  # no file uploaded: none to carry


def test_a_backup_is_one_snapshot_an_open_write_is_not_in_it(tmp_path: Path) -> None:
    """The read transaction sees the commits before it and nothing of a write still open."""
    store = seeded(tmp_path / "data", posts=3)
    store.conn.execute("BEGIN IMMEDIATE")
    store.conn.execute("UPDATE messages SET text = 'torn'")
    store.conn.execute("DELETE FROM events")
    first = backup(tmp_path / "data", tmp_path / "first.db", force=False)
    store.conn.execute("COMMIT")
    second = backup(tmp_path / "data", tmp_path / "second.db", force=False)
    store.close()
    assert (first.messages, first.events) == (3, 3)
    assert rows(tmp_path / "first.db", "SELECT count(*) FROM messages WHERE text = 'torn'") == [(0,)]
    assert (second.messages, second.events) == (3, 0)


def test_an_existing_out_is_kept_unless_forced(tmp_path: Path) -> None:
    seeded(tmp_path / "data", posts=1).close()
    out = tmp_path / "b.db"
    out.write_text("precious")
    with pytest.raises(BackupError, match="exists: give --force"):
        backup(tmp_path / "data", out, force=False)
    assert out.read_text() == "precious"
    assert backup(tmp_path / "data", out, force=True).messages == 1
    assert stat.S_IMODE(out.stat().st_mode) == 0o600


def test_a_failed_check_leaves_out_as_it_was_and_no_temporary_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    seeded(tmp_path / "data").close()
    out = tmp_path / "b.db"
    out.write_text("the last good backup")

    def failing_check(path: Path, name: Path) -> None:
        assert path.parent == out.parent and path.name.startswith(".b.db.")  # staged beside OUT
        raise BackupError(f"{name} fails SQLite's integrity check: simulated")

    monkeypatch.setattr(backup_module, "check_database", failing_check)
    with pytest.raises(BackupError, match="simulated"):
        backup(tmp_path / "data", out, force=True)
    assert out.read_text() == "the last good backup"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b.db", "data"]


def test_the_check_is_sqlites_full_integrity_check(tmp_path: Path) -> None:
    """An index that disagrees with its table passes quick_check; integrity_check finds it."""
    seeded(tmp_path / "data", posts=2).close()
    path = tmp_path / "data" / "webapp.db"
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode=DELETE")
    conn.execute("PRAGMA writable_schema=ON")
    conn.execute(
        "UPDATE sqlite_master SET sql = replace(sql, 'ON users (team)', 'ON users (name)') WHERE name = 'users_team'"
    )
    conn.close()
    conn = sqlite3.connect(path)
    assert conn.execute("PRAGMA quick_check").fetchall() == [("ok",)]
    conn.close()
    with pytest.raises(BackupError, match="fails SQLite's integrity check"):
        check_database(path, path)


def test_a_file_without_the_rtm_tables_is_not_an_rtm_database(tmp_path: Path) -> None:
    path = tmp_path / "other.db"
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE users (id TEXT)")
    conn.close()
    with pytest.raises(BackupError, match="not an rtm database .*no teams, tokens"):
        check_database(path, path)


@pytest.mark.parametrize(
    ("out", "said"),
    [
        ("data/webapp.db", "is the database"),
        ("data/webapp.db-wal", "is the database"),
        ("file/b.db", "cannot write"),
        ("nowhere/b.db", "no directory"),
        ("data", "is a directory"),
    ],
)
def test_refusals_are_one_line_and_exit_code_2(
    tmp_path: Path, out: str, said: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    seeded(tmp_path / "data").close()
    (tmp_path / "file").write_text("a file, not a directory")
    monkeypatch.chdir(tmp_path)
    before = sorted(os.listdir(tmp_path / "data"))
    assert main([out, "--data-dir", "data", "--force"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("rtm backup: ") and said in err and err.count("\n") == 1, err
    assert sorted(os.listdir(tmp_path / "data")) == before


def test_no_database_is_one_line_and_exit_code_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main([str(tmp_path / "b.db"), "--data-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err == f"rtm backup: no webapp database at {tmp_path / 'webapp.db'}: give the --data-dir of `rtm up`\n"
    assert not (tmp_path / "b.db").exists()


def test_the_line_it_prints(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    seeded(tmp_path / "data", posts=2).close()
    assert main([str(tmp_path / "b.db"), "--data-dir", str(tmp_path / "data")]) == 0
    line = capsys.readouterr().out
    assert line.startswith(f"backed up to {tmp_path / 'b.db'}: ") and line.count("\n") == 1
    assert ", 2 messages, 2 events, newest message ts " in line


@pytest.mark.parametrize(
    ("error", "said"),
    [
        (sqlite3.OperationalError("database or disk is full"), "database or disk is full"),
        (OSError(5, "Input/output error"), "Input/output error"),
    ],
)
def test_a_disk_error_is_one_line_exit_code_2_and_leaves_nothing(
    tmp_path: Path,
    error: Exception,
    said: str,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    seeded(tmp_path / "data").close()

    def failing_copy(source: Path, target: Path) -> None:
        target.write_bytes(b"half a copy")
        raise error

    monkeypatch.setattr(backup_module, "snapshot_into", failing_copy)
    assert main([str(tmp_path / "b.db"), "--data-dir", str(tmp_path / "data")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("rtm backup: could not copy ") and err.endswith(f": {said}\n"), err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data"]


def test_a_backup_carries_the_bytes_of_the_files_its_database_names(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Complete and uploaded files are copied (0700 directory, 0600 files, named by id); deleted,
    waiting ones are not; one whose bytes went since the snapshot (deleted meanwhile) is said in the
    line, not an error; a symlink in the files directory is never followed."""
    data = tmp_path / "data"
    store = seeded(data, posts=1)
    shared = add_file(store, data, b"shared bytes\n" * 10)
    uploaded = add_file(store, data, b"not shared yet", state="uploaded")
    add_file(store, data, None, state="deleted")
    add_file(store, data, None, state="waiting")
    gone = add_file(store, data, None)  # complete in the snapshot, unlinked before the copy
    secret = tmp_path / "secret.txt"
    secret.write_bytes(b"not a file of the webapp")
    planted = add_file(store, data, None)
    store.conn.execute("UPDATE files SET size = ? WHERE id = ?", (len(secret.read_bytes()), planted))
    (data / "files" / planted).symlink_to(secret)
    store.close()
    out = tmp_path / "b.db"
    assert main([str(out), "--data-dir", str(data)]) == 0
    line = capsys.readouterr().out
    files = tmp_path / "b.db.files"
    assert sorted(p.name for p in files.iterdir()) == sorted([shared, uploaded])
    assert (files / shared).read_bytes() == b"shared bytes\n" * 10
    assert stat.S_IMODE(files.stat().st_mode) == 0o700
    assert {stat.S_IMODE(p.lstat().st_mode) for p in files.iterdir()} == {0o600}
    assert f"; 2 files (144 bytes) in {files}, 2 named by the database not there (" in line
    assert gone in line and planted in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b.db", "b.db.files", "data", "secret.txt"]


def test_force_replaces_the_files_too_and_without_it_an_existing_files_directory_is_refused(
    tmp_path: Path,
) -> None:
    data = tmp_path / "data"
    store = seeded(data)
    first = add_file(store, data, b"first")
    store.close()
    out = tmp_path / "b.db"
    (tmp_path / "b.db.files").mkdir()
    with pytest.raises(BackupError, match=r"b\.db\.files exists: give --force"):
        backup(data, out, force=False)
    assert not out.exists()
    (tmp_path / "b.db.files" / "old").write_text("an older backup's")
    snapshot = backup(data, out, force=True)
    assert snapshot.files is not None and snapshot.files.copied == 1
    assert [p.name for p in (tmp_path / "b.db.files").iterdir()] == [first]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b.db", "b.db.files", "data"]  # nothing staged left


def test_the_files_are_in_place_before_the_database_is(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A crash between the two renames leaves the old database with the new files: never a new
    database beside files older than it."""
    data = tmp_path / "data"
    store = seeded(data)
    file_id = add_file(store, data, b"bytes")
    store.close()
    out = tmp_path / "b.db"
    out.write_text("the last good backup")

    def crash(staged: Path, target: Path) -> None:
        raise BackupError("simulated crash before the database's rename")

    monkeypatch.setattr(backup_module, "install", crash)
    with pytest.raises(BackupError, match="simulated"):
        backup(data, out, force=True)
    assert out.read_text() == "the last good backup"
    assert [p.name for p in (tmp_path / "b.db.files").iterdir()] == [file_id]


def test_a_backup_into_the_webapps_files_directory_is_refused(tmp_path: Path) -> None:
    data = tmp_path / "data"
    store = seeded(data)
    file_id = add_file(store, data, b"live bytes")
    store.close()
    with pytest.raises(BackupError, match="in the webapp's files directory"):
        backup(data, data / "files" / file_id, force=True)
    assert (data / "files" / file_id).read_bytes() == b"live bytes"
