"""A search's catch-up in slices with the loop served between them, one catch-up at a time, and the
reader: a thread and a read-only connection of its own, closed with the store
(webapp_stub/search_reader.py)."""

from __future__ import annotations

import asyncio
import sqlite3
import threading
from pathlib import Path
from typing import Any

import pytest

from webapp_stub import search_index, search_reader
from webapp_stub.errors import ApiError
from webapp_stub.search import reader_of
from webapp_stub.seed import seed_demo
from webapp_stub.store import Store

BACKLOG = 12


@pytest.fixture
def store(tmp_path: Path) -> Any:
    seed = seed_demo(str(tmp_path), users=1, channels=1, bots=0)
    store = Store(str(tmp_path))
    user, channel = store.user(seed["users"][0]["id"]), store.channel(seed["channels"][0]["id"])
    assert user is not None and channel is not None
    for i in range(BACKLOG):
        store.post_message(channel, user, f"gecko {i}")
    yield store
    store.close()


def _reader_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith(search_reader.THREAD_NAME)]


async def test_the_catch_up_lets_the_loop_run_between_its_slices(store: Store, monkeypatch: Any) -> None:
    monkeypatch.setattr(search_reader, "CATCH_UP_SLICE_ROWS", 3)
    marks: list[int] = []
    done = asyncio.Event()

    async def watch() -> None:  # another task on the loop: it sees the catch-up part done
        while not done.is_set():
            marks.append(search_index.mark(store.conn))
            await asyncio.sleep(0)  # wait-ok: a yield, so the catch-up's slices and this task take turns

    watcher = asyncio.ensure_future(watch())
    progress = await search_reader.catch_up(store, asyncio.Lock())
    done.set()
    await asyncio.wait_for(watcher, 5)
    assert progress == search_index.CatchUp(BACKLOG, 0, False)
    assert {3, 6, 9} <= set(marks)  # the loop ran after each slice


async def test_two_catch_ups_at_once_index_each_row_once(store: Store, monkeypatch: Any) -> None:
    monkeypatch.setattr(search_reader, "CATCH_UP_SLICE_ROWS", 2)
    lock = asyncio.Lock()
    first, second = await asyncio.gather(search_reader.catch_up(store, lock), search_reader.catch_up(store, lock))
    assert first.indexed + second.indexed == BACKLOG and not first.behind and not second.behind
    assert second.indexed == 0  # it waited for the first, then found nothing left
    counted = store.conn.execute("SELECT count(*) FROM search_fts WHERE search_fts MATCH 'gecko'").fetchone()[0]
    assert counted == BACKLOG


async def test_a_search_past_the_bound_is_ratelimited(store: Store) -> None:
    reader = search_reader.SearchReader(store.path, max_in_flight=1)
    with reader.admitted():
        with pytest.raises(ApiError) as refused:
            with reader.admitted():
                pass
    assert refused.value.code == "ratelimited" and refused.value.status == 429
    assert refused.value.headers == {"Retry-After": str(search_reader.SEARCH_BUSY_RETRY_AFTER_S)}
    assert reader.refused == 1 and reader.in_flight == 0
    with reader.admitted():  # room again
        pass


async def test_the_reader_reads_committed_data_read_only_and_is_gone_with_the_store(store: Store) -> None:
    reader = reader_of(store)
    assert not reader.open and not _reader_threads()  # made at the first search, not before
    assert await reader.read(lambda conn: conn.execute("SELECT count(*) FROM messages").fetchone()[0]) == BACKLOG
    assert reader.open and _reader_threads()
    with pytest.raises(sqlite3.OperationalError):  # read-only
        await reader.read(lambda conn: conn.execute("DELETE FROM messages"))
    store.close()
    assert not reader.open and not _reader_threads()
    with pytest.raises(ApiError) as closed:
        await reader.read(lambda conn: 1)
    assert closed.value.code == "service_unavailable"
    assert reader_of(store) is reader  # no new thread for a closed store


async def test_a_read_past_its_time_is_stopped_and_answered_search_timeout(store: Store) -> None:
    """A read is bounded in time (MAX_SEARCH_READ_S): SQLite's progress handler stops it, the
    search is answered ``search_timeout``, and the reader serves the next read as before."""
    reader = search_reader.SearchReader(store.path, max_read_s=0.0, progress_steps=1)
    slow = "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 1000000) SELECT count(*) FROM n"
    try:
        with pytest.raises(ApiError) as stopped:
            await reader.read(lambda conn: conn.execute(slow).fetchone()[0])
        assert stopped.value.code == "search_timeout"
        reader.max_read_s = 60.0
        assert await reader.read(lambda conn: conn.execute("SELECT count(*) FROM messages").fetchone()[0]) == BACKLOG
    finally:
        reader.close()
