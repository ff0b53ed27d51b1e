"""``rtm restore`` (rtmctl/restore.py): a backup into a data directory, never under a running fleet,
never over a database without --force (and then the old one kept whole), no stale WAL beside it,
seed.json from the backup, the next seq after the backup's."""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import stat
from pathlib import Path

import pytest

from rtmctl.backup import backup
from rtmctl.fleet_lock import hold_data_dir
from rtmctl.restore import main
from tests.support import add_file
from tests.support import post_in_general as post
from tests.support import seeded_store as seeded
from webapp_stub.file_transfer import MAX_FILE_BYTES_LIMIT, MIN_FREE_DISK_BYTES
from webapp_stub.store import Store


@pytest.fixture
def backup_file(tmp_path: Path) -> Path:
    """A backup of a demo database with three posts in #general."""
    seeded(tmp_path / "source", posts=3).close()
    out = tmp_path / "backup.db"
    backup(tmp_path / "source", out, force=False)
    return out


def restore(backup_file: Path, data_dir: Path, *extra: str) -> int:
    return main([str(backup_file), "--data-dir", str(data_dir), *extra])


def general_seqs(data_dir: Path) -> list[int]:
    store = Store(str(data_dir))
    try:
        team = store.first_team()
        assert team is not None
        general = store.channel_by_name(team.id, "general")
        assert general is not None
        return [
            r[0] for r in store.conn.execute("SELECT seq FROM events WHERE channel = ? ORDER BY seq", (general.id,))
        ]
    finally:
        store.close()


def test_a_restore_into_a_new_directory_starts_where_the_backup_stopped(
    tmp_path: Path, backup_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data_dir = tmp_path / "new"
    assert restore(backup_file, data_dir) == 0
    assert "restored" in capsys.readouterr().out
    assert stat.S_IMODE((data_dir / "webapp.db").stat().st_mode) == 0o600
    seed = json.loads((data_dir / "seed.json").read_text())
    assert stat.S_IMODE((data_dir / "seed.json").stat().st_mode) == 0o600
    source = Store(str(tmp_path / "source"))
    tokens = {r[0] for r in source.conn.execute("SELECT token FROM tokens")}
    source.close()
    assert "alice" in {u["name"] for u in seed["users"]}
    assert {u["token"] for u in seed["users"]} <= tokens  # the backup's own tokens
    store = Store(str(data_dir))
    post(store, "after the restore")
    store.close()
    assert general_seqs(data_dir) == [1, 2, 3, 4]


def test_an_existing_database_is_replaced_only_with_force_and_kept_whole(
    tmp_path: Path, backup_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data_dir = tmp_path / "data"
    old = seeded(data_dir, posts=5)
    old.conn.execute("PRAGMA wal_autocheckpoint=0")
    post(old, "in the old wal only")
    # Leave the WAL behind as a killed webapp does: copy the files aside while the connection is open.
    files = {s: (data_dir / f"webapp.db{s}").read_bytes() for s in ("", "-wal", "-shm")}
    old.close()
    for suffix, content in files.items():
        (data_dir / f"webapp.db{suffix}").write_bytes(content)
    assert restore(backup_file, data_dir) == 2
    assert "give --force" in capsys.readouterr().err
    assert (data_dir / "webapp.db").read_bytes() == files[""]
    assert restore(backup_file, data_dir, "--force") == 0
    assert "webapp.db.before-restore" in capsys.readouterr().out
    names = sorted(p.name for p in data_dir.iterdir() if p.name.startswith("webapp.db"))
    assert names == ["webapp.db", "webapp.db.before-restore", "webapp.db.before-restore-wal"]
    assert general_seqs(data_dir) == [1, 2, 3]  # the backup's, no stale WAL applied
    kept = sqlite3.connect(data_dir / "webapp.db.before-restore")  # with its WAL: every commit there
    assert kept.execute("SELECT count(*) FROM messages").fetchone() == (6,)
    kept.close()
    assert restore(backup_file, data_dir, "--force") == 2  # the kept one is never overwritten
    assert "from an earlier restore" in capsys.readouterr().err


def test_no_restore_while_a_fleet_holds_the_directory(
    tmp_path: Path, backup_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    fd = hold_data_dir(data_dir)
    try:
        assert restore(backup_file, data_dir, "--force") == 2
    finally:
        os.close(fd)
    err = capsys.readouterr().err
    assert err.startswith("rtm restore: a fleet from") and err.count("\n") == 1
    assert not (data_dir / "webapp.db").exists()


@pytest.mark.parametrize(
    ("content", "said"),
    [(b"not sqlite at all " * 100, "not a whole rtm database"), (None, "not an rtm database")],
)
def test_a_file_that_is_not_an_rtm_database_changes_nothing(
    tmp_path: Path, content: bytes | None, said: str, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "bad.db"
    if content is None:
        conn = sqlite3.connect(bad)
        conn.execute("CREATE TABLE notes (text TEXT)")
        conn.close()
    else:
        bad.write_bytes(content)
    data_dir = tmp_path / "data"
    seeded(data_dir, posts=1).close()
    before = (data_dir / "webapp.db").read_bytes()
    assert restore(bad, data_dir, "--force") == 2
    err = capsys.readouterr().err
    assert err.startswith("rtm restore: ") and said in err and err.count("\n") == 1, err
    assert (data_dir / "webapp.db").read_bytes() == before
    assert sorted(p.name for p in data_dir.iterdir()) == ["rtm-up.lock", "webapp.db"]


def test_a_refused_restore_into_a_new_directory_leaves_no_directory(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``rtm restore notabackup --data-dir ./restored`` was refused but left ``restored/`` behind,
    holding only ``rtm-up.lock``, as if something had been restored there. A directory the
    restore made goes with a refusal; one that was there stays."""
    bad = tmp_path / "bad.db"
    bad.write_bytes(b"not a database")
    assert restore(bad, tmp_path / "new" / "restored") == 2
    assert "is not a whole rtm database" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.db", "new"]  # the parent was made; left
    assert list((tmp_path / "new").iterdir()) == []
    (tmp_path / "there").mkdir()
    assert restore(bad, tmp_path / "there") == 2
    assert [p.name for p in (tmp_path / "there").iterdir()] == ["rtm-up.lock"]


def test_a_missing_backup_or_the_database_itself_is_refused(
    tmp_path: Path, backup_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert restore(tmp_path / "nothing.db", tmp_path / "data") == 2
    assert capsys.readouterr().err == f"rtm restore: no backup file at {tmp_path / 'nothing.db'}\n"
    assert restore(tmp_path / "source" / "webapp.db", tmp_path / "source", "--force") == 2
    assert "is the database" in capsys.readouterr().err


STEAL_NEW_TOKENS = (
    "CREATE TRIGGER steal AFTER INSERT ON tokens BEGIN UPDATE users SET real_name = NEW.token WHERE name = 'bob'; END"
)


@pytest.mark.parametrize(
    ("crafted", "said"),
    [
        ([STEAL_NEW_TOKENS], "trigger steal"),
        (["CREATE VIEW everyone AS SELECT token AS text FROM tokens"], "view everyone"),
        (  # an index whose highlight reads another table's text: scheduled messages not yet sent
            [
                "DROP TABLE search_fts",
                "CREATE VIRTUAL TABLE search_fts USING fts5(text, content='scheduled_messages', content_rowid='rowid')",
            ],
            "virtual table search_fts",
        ),
        (
            ["DROP TABLE search_fts", "CREATE VIRTUAL TABLE search_fts USING fts5(text, tokenize='trigram')"],
            "virtual table search_fts",
        ),
    ],
)
def test_a_backup_holding_triggers_views_or_another_index_is_refused(
    tmp_path: Path, backup_file: Path, crafted: list[str], said: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """A trigger in a restored database runs at every write after the restore: this one hands each
    new user's token to whoever reads bob's profile (finding 9, docs/authz-review.md)."""
    conn = sqlite3.connect(backup_file)
    for statement in crafted:
        conn.execute(statement)
    conn.commit()
    conn.close()
    data_dir = tmp_path / "data"
    assert restore(backup_file, data_dir) == 2
    err = capsys.readouterr().err
    assert err.startswith("rtm restore: ") and said in err and err.count("\n") == 1, err
    assert not (data_dir / "webapp.db").exists() and not (data_dir / "seed.json").exists()


def test_the_search_index_is_rebuilt_from_the_messages_not_taken_from_the_backup(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A backup's FTS5 pages are not read by SQLite's integrity check: whatever they hold (here the
    index of a text that no message has, and garbage), the restored index is the messages' own,
    whole (its mark at the newest message), with nothing recorded as stale."""
    from webapp_stub import search_index

    store = seeded(tmp_path / "source", posts=3)
    try:
        with store.transaction() as db:
            search_index.catch_up(db)
            db.execute("INSERT INTO search_fts (rowid, text) VALUES (999999, 'planted')")  # no such message
            db.execute("INSERT INTO search_stale (id, text) VALUES (1, 'planted')")
    finally:
        store.close()
    out = tmp_path / "backup.db"
    backup(tmp_path / "source", out, force=False)
    data_dir = tmp_path / "new"
    assert restore(out, data_dir) == 0
    capsys.readouterr()
    restored = Store(str(data_dir))
    try:
        conn = restored.conn
        newest = conn.execute("SELECT max(id) FROM messages").fetchone()[0]
        assert search_index.mark(conn) == newest
        assert conn.execute("SELECT count(*) FROM search_stale").fetchone()[0] == 0
        assert conn.execute("SELECT count(*) FROM search_fts WHERE search_fts MATCH 'planted'").fetchone()[0] == 0
        found = {r[0] for r in conn.execute("SELECT rowid FROM search_fts WHERE search_fts MATCH 'post'")}
        posted = {r[0] for r in conn.execute("SELECT id FROM messages WHERE text LIKE '%post%'")}
        assert posted and found == posted
        conn.execute("INSERT INTO search_fts (search_fts) VALUES ('integrity-check')")  # FTS5's own check
    finally:
        restored.close()


@pytest.fixture
def with_files(tmp_path: Path) -> tuple[Path, dict[str, bytes]]:
    """A backup whose database names two files (complete, uploaded), their bytes in files.db.files."""
    source = tmp_path / "files-source"
    store = seeded(source, posts=1)
    files = {add_file(store, source, b"complete bytes"): b"complete bytes"}
    files[add_file(store, source, b"uploaded", state="uploaded")] = b"uploaded"
    store.close()
    out = tmp_path / "files.db"
    backup(source, out, force=False)
    return out, files


def test_a_restore_puts_the_backups_files_in_place_0700_0600(
    tmp_path: Path, with_files: tuple[Path, dict[str, bytes]], capsys: pytest.CaptureFixture[str]
) -> None:
    out, files = with_files
    (tmp_path / "files.db.files" / "F0123456789ABCDEF").write_bytes(b"named by no row")  # left out
    data_dir = tmp_path / "new"
    assert restore(out, data_dir) == 0
    said = capsys.readouterr()
    assert f"2 files (22 bytes) in {data_dir / 'files'}" in said.out and said.err == ""
    restored = data_dir / "files"
    assert {p.name: p.read_bytes() for p in restored.iterdir()} == files
    assert stat.S_IMODE(restored.stat().st_mode) == 0o700
    assert {stat.S_IMODE(p.stat().st_mode) for p in restored.iterdir()} == {0o600}
    assert not [p for p in data_dir.iterdir() if p.name.startswith(".")]  # nothing staged left


def test_force_keeps_the_old_files_aside_like_the_old_database(
    tmp_path: Path, with_files: tuple[Path, dict[str, bytes]], capsys: pytest.CaptureFixture[str]
) -> None:
    out, files = with_files
    data_dir = tmp_path / "data"
    store = seeded(data_dir)
    old = add_file(store, data_dir, b"the old fleet's")
    store.close()
    assert restore(out, data_dir) == 2
    assert "give --force" in capsys.readouterr().err
    assert restore(out, data_dir, "--force") == 0
    assert "files.before-restore" in capsys.readouterr().out
    assert (data_dir / "files.before-restore" / old).read_bytes() == b"the old fleet's"
    assert {p.name for p in (data_dir / "files").iterdir()} == set(files)
    (data_dir / "webapp.db.before-restore").rename(tmp_path / "moved.db")
    assert restore(out, data_dir, "--force") == 2  # the kept files are never overwritten either
    assert "from an earlier restore" in capsys.readouterr().err


@pytest.mark.parametrize("planted", ["name", "symlink", "directory", "files-symlink", "hard-link"])
def test_a_files_directory_holding_anything_but_files_named_by_id_is_refused(
    tmp_path: Path, with_files: tuple[Path, dict[str, bytes]], planted: str, capsys: pytest.CaptureFixture[str]
) -> None:
    out, files = with_files
    backup_files = tmp_path / "files.db.files"
    secret = tmp_path / "secret"
    secret.write_bytes(b"outside the backup")
    if planted == "name":
        (backup_files / "..evil").write_bytes(b"x")
    elif planted == "symlink":  # named as a file the database names: its bytes would be the secret's
        (backup_files / next(iter(files))).unlink()
        (backup_files / next(iter(files))).symlink_to(secret)
    elif planted == "directory":
        (backup_files / "F0123456789ABCDEF").mkdir()
    elif planted == "hard-link":  # finding 18: its bytes are whatever file it links (another of the operator's)
        os.link(backup_files / next(iter(files)), tmp_path / "linked")
    else:
        backup_files.rename(tmp_path / "elsewhere")
        backup_files.symlink_to(tmp_path / "elsewhere")
    data_dir = tmp_path / "data"
    assert restore(out, data_dir) == 2
    err = capsys.readouterr().err
    assert err.startswith("rtm restore: ") and "refused" in err and err.count("\n") == 1, err
    assert not data_dir.exists()  # nothing changed: the directory the restore made is taken away again


def test_a_backup_without_files_restores_with_a_warning_when_its_database_names_files(
    tmp_path: Path, with_files: tuple[Path, dict[str, bytes]], backup_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out, files = with_files
    (tmp_path / "files.db.files").rename(tmp_path / "moved")  # as a backup made before files were carried
    assert restore(out, tmp_path / "a") == 0
    err = capsys.readouterr().err
    assert err.startswith("rtm restore: warning: 2 files named by the database have no bytes: there is no ")
    assert err.count("\n") == 1
    shutil.rmtree(backup_file.with_name(backup_file.name + ".files"))
    assert restore(backup_file, tmp_path / "b") == 0  # names no file: no warning
    assert capsys.readouterr().err == ""
    (tmp_path / "moved").rename(tmp_path / "files.db.files")
    (tmp_path / "files.db.files" / next(iter(files))).unlink()
    assert restore(out, tmp_path / "c") == 0
    assert "1 files named by the database are not in " in capsys.readouterr().err


def test_files_larger_than_any_upload_or_than_the_disk_holds_are_refused(
    tmp_path: Path,
    with_files: tuple[Path, dict[str, bytes]],
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Finding 17: a crafted backup naming a sparse file of any size (no room in the backup) made the
    restore write all of it, filling the disk the restored database and every other program share."""
    out, files = with_files
    name = next(iter(files))
    huge = MAX_FILE_BYTES_LIMIT + 1
    with sqlite3.connect(out) as conn:
        conn.execute("UPDATE files SET size = ?, length = ? WHERE id = ?", (huge, huge, name))
    conn.close()
    os.truncate(tmp_path / "files.db.files" / name, huge)  # sparse: no block written
    assert restore(out, tmp_path / "a") == 2
    err = capsys.readouterr().err
    assert err.startswith(f"rtm restore: the database names {name} of {huge} bytes") and err.count("\n") == 1, err
    assert not (tmp_path / "a").exists()

    out, files = with_files
    with sqlite3.connect(out) as conn:
        conn.execute("UPDATE files SET size = ?, length = ? WHERE id = ?", (len(files[name]), len(files[name]), name))
    conn.close()
    os.truncate(tmp_path / "files.db.files" / name, len(files[name]))
    free = {"bytes": MIN_FREE_DISK_BYTES + 21}  # one byte short of the two files' 22 and the reserve
    monkeypatch.setattr("rtmctl.backup_files.disk_free_bytes", lambda _path: free["bytes"])
    assert restore(out, tmp_path / "b") == 2
    err = capsys.readouterr().err
    assert err.startswith("rtm restore: its files need 22 bytes") and err.count("\n") == 1, err
    assert not (tmp_path / "b").exists()
    free["bytes"] += 1
    assert restore(out, tmp_path / "b") == 0
    assert {p.name: p.read_bytes() for p in (tmp_path / "b" / "files").iterdir()} == files
