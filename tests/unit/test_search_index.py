"""The search index (webapp_stub/search_index.py) stays exact whatever the order of posts, edits,
deletes and bounded catch-ups: a message is found by its current text once indexed, never by an old
one, never after its delete, and a rowid SQLite reuses after a delete is indexed too."""

from __future__ import annotations

import asyncio
import tempfile
from unittest import mock

from hypothesis import example, given, settings
from hypothesis import strategies as st

from webapp_stub import search_index, search_reader
from webapp_stub.seed import seed_demo
from webapp_stub.store import Store

WORDS = ("apple", "berry", "cherry", "damson")
OPS = st.one_of(
    st.tuples(st.just("post"), st.sampled_from(WORDS)),
    st.tuples(st.just("edit"), st.integers(0, 5), st.sampled_from(WORDS)),
    st.tuples(st.just("delete"), st.integers(0, 5)),
    st.tuples(st.just("search"), st.integers(1, 4), st.integers(1, 3)),
    # a search's catch-up as search.messages runs it: in slices (search_reader.py), within its bounds
    st.tuples(st.just("sliced"), st.integers(1, 6), st.integers(1, 4), st.integers(1, 2)),
)


def found(store: Store, word: str) -> set[int]:
    """Rowids the index finds ``word`` in, as a search reads it (rows still recorded left out)."""
    rows = store.conn.execute(
        "SELECT rowid FROM search_fts WHERE search_fts MATCH ? AND rowid NOT IN (SELECT id FROM search_stale)",
        (f'"{word}"',),
    )
    return {r[0] for r in rows}


def truth(store: Store, word: str, upto: int) -> set[int]:
    rows = store.conn.execute("SELECT id, text FROM messages WHERE id <= ?", (upto,))
    return {r[0] for r in rows if word in r[1].split()}


@settings(max_examples=20, deadline=None)
@given(st.lists(OPS, max_size=30))
# the newest message deleted after a search indexed it: the next post takes its rowid
@example([("post", "apple"), ("search", 4, 3), ("delete", 0), ("search", 4, 3), ("post", "berry")])
# a row recorded as edited, then above a lowered mark, reused and caught up
@example([("post", "apple"), ("post", "berry"), ("search", 4, 3), ("delete", 0), ("post", "cherry")])
# ... while an earlier edit's record is drained first and the reused row's record waits, then an edit
@example(
    [
        ("post", "apple"),
        ("post", "berry"),
        ("search", 4, 3),
        ("edit", 1, "damson"),
        ("delete", 0),
        ("post", "cherry"),
        ("search", 4, 1),
        ("edit", 0, "apple"),
    ]
)
@example([("post", "apple"), ("search", 4, 1), ("edit", 0, "berry"), ("edit", 0, "cherry"), ("search", 1, 1)])
def test_any_history_of_changes_leaves_an_exact_index(ops: list[tuple[object, ...]]) -> None:
    with tempfile.TemporaryDirectory() as data:
        seed = seed_demo(data, users=1, channels=1, bots=0)
        store = Store(data)
        try:
            user = store.user(seed["users"][0]["id"])
            channel = store.channel(seed["channels"][0]["id"])
            assert user is not None and channel is not None
            posted: list[str] = []
            for op in ops:
                if op[0] == "post":
                    posted.append(store.post_message(channel, user, f"x {op[1]}")[0]["ts"])
                elif op[0] in ("edit", "delete") and posted:
                    ts = posted[-1 - int(op[1]) % len(posted)]  # type: ignore[call-overload]  # the newest mostly
                    try:
                        if op[0] == "edit":
                            store.update_message(channel, user, ts, f"y {op[2]}")
                        else:
                            store.delete_message(channel, user, ts)
                    except Exception as exc:  # already deleted
                        assert getattr(exc, "code", None) == "message_not_found"
                elif op[0] in ("search", "sliced"):
                    if op[0] == "search":
                        with store.transaction() as db:
                            search_index.catch_up(db, max_rows=int(op[1]), max_stale=int(op[2]))  # type: ignore[call-overload]
                    else:
                        sliced_catch_up(store, *(int(n) for n in op[1:]))  # type: ignore[call-overload]
                    stale = {r[0] for r in store.conn.execute("SELECT id FROM search_stale")}
                    for word in WORDS:  # what a search finds is true, if not yet all
                        assert found(store, word) <= truth(store, word, search_index.mark(store.conn)) - stale
            with store.transaction() as db:
                while search_index.catch_up(db, max_rows=3, max_stale=2).behind:
                    pass
            last = int(store.conn.execute("SELECT coalesce(max(id), 0) FROM messages").fetchone()[0])
            for word in WORDS:
                assert found(store, word) == truth(store, word, last)
            store.conn.execute("INSERT INTO search_fts (search_fts, rank) VALUES ('integrity-check', 0)")
            assert occurrences_indexed(store) == occurrences(store)

        finally:
            store.close()


def sliced_catch_up(store: Store, rows: int, stale: int, slice_size: int) -> None:
    """One search's catch-up in slices of ``slice_size`` rows and records, at most ``rows`` and ``stale``."""
    with (
        mock.patch.object(search_index, "MAX_INDEX_ROWS_PER_SEARCH", rows),
        mock.patch.object(search_index, "MAX_STALE_PER_SEARCH", stale),
        mock.patch.object(search_reader, "CATCH_UP_SLICE_ROWS", slice_size),
        mock.patch.object(search_reader, "CATCH_UP_SLICE_STALE", slice_size),
        mock.patch.object(search_reader, "CATCH_UP_PAUSE_S", 0),
    ):
        asyncio.run(search_reader.catch_up(store, asyncio.Lock()))


def occurrences_indexed(store: Store) -> dict[str, int]:
    """How often the index holds each word (a row indexed twice counts twice)."""
    store.conn.execute("CREATE VIRTUAL TABLE IF NOT EXISTS temp.vocab USING fts5vocab(main, search_fts, 'row')")
    return {str(term): int(cnt) for term, cnt in store.conn.execute("SELECT term, cnt FROM temp.vocab") if cnt}


def occurrences(store: Store) -> dict[str, int]:
    counts: dict[str, int] = {}
    for (text,) in store.conn.execute("SELECT text FROM messages"):
        for word in text.lower().split():
            counts[word] = counts.get(word, 0) + 1
    return counts
