"""webapp_stub.read_cache: answers kept in memory until any change to their tables."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from tests.support import FakeClock
from webapp_stub.read_cache import MISSING, ReadCache


@pytest.fixture
def conn(tmp_path: Path) -> sqlite3.Connection:
    db = sqlite3.connect(tmp_path / "t.db", isolation_level=None)
    db.execute("CREATE TABLE t (k TEXT PRIMARY KEY, v TEXT)")
    db.execute("CREATE TABLE other (k TEXT)")
    db.execute("INSERT INTO t VALUES ('a', '1')")
    return db


def test_kept_until_any_change_to_its_tables_only(conn: sqlite3.Connection) -> None:
    cache = ReadCache(conn, "t", ("t",), FakeClock(), foreign_check_s=10.0)
    assert cache.get("a") is MISSING
    cache.put("a", "1")
    assert cache.get("a") == "1"
    conn.execute("INSERT INTO other VALUES ('x')")  # another table: kept
    assert cache.get("a") == "1"
    for change in ("INSERT INTO t VALUES ('b', '2')", "UPDATE t SET v = '3' WHERE k = 'zz'", "DELETE FROM t"):
        cache.put("a", "1")
        conn.execute(change)
        if conn.total_changes and "zz" not in change:
            assert cache.get("a") is MISSING, change


def test_nothing_is_kept_while_a_change_may_still_be_rolled_back(conn: sqlite3.Connection) -> None:
    cache = ReadCache(conn, "t", ("t",), FakeClock(), foreign_check_s=10.0)
    conn.execute("BEGIN")
    conn.execute("UPDATE t SET v = 'uncommitted'")
    cache.put("a", "uncommitted")  # refused: the change is not committed
    assert cache.get("a") is MISSING
    conn.execute("ROLLBACK")
    assert cache.get("a") is MISSING
    cache.put("a", "1")
    assert cache.get("a") == "1"


def test_a_transaction_that_ended_lets_answers_be_kept_again_inside_the_next(conn: sqlite3.Connection) -> None:
    cache = ReadCache(conn, "t", ("t",), FakeClock(), foreign_check_s=10.0)
    conn.execute("BEGIN")
    conn.execute("UPDATE t SET v = '2'")
    conn.execute("COMMIT")
    cache.transaction_ended()
    conn.execute("BEGIN")  # the next transaction reads before anything else changes the table
    cache.put("a", "2")
    assert cache.get("a") == "2"
    conn.execute("UPDATE t SET v = '3'")  # a change in it: dropped, and nothing kept until it ends
    assert cache.get("a") is MISSING
    cache.transaction_ended()  # told too early (still open): changes nothing
    cache.put("a", "3")
    assert cache.get("a") is MISSING
    conn.execute("ROLLBACK")
    cache.transaction_ended()
    cache.put("a", "2")
    assert cache.get("a") == "2"


def test_another_connections_commit_is_seen_within_foreign_check_s(conn: sqlite3.Connection, tmp_path: Path) -> None:
    clock = FakeClock()
    cache = ReadCache(conn, "t", ("t",), clock, foreign_check_s=0.1)
    cache.put("a", "1")
    assert cache.get("a") == "1"
    other = sqlite3.connect(tmp_path / "t.db", isolation_level=None)
    other.execute("UPDATE t SET v = '2'")  # no trigger here: TEMP triggers belong to `conn` alone
    other.close()
    assert cache.get("a") == "1"  # within the bound
    clock.advance(0.1)
    assert cache.get("a") is MISSING


def test_bounded(conn: sqlite3.Connection) -> None:
    cache = ReadCache(conn, "t", ("t",), FakeClock(), max_entries=3)
    for key in "abcd":
        cache.put(key, key)
    assert len(cache) <= 3 and cache.get("d") == "d"
