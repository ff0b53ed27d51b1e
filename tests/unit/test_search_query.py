"""search.messages' query language (webapp_stub/search_query.py): words, phrases, prefixes,
exclusions and modifiers to an FTS5 MATCH expression that SQLite always accepts, and paging."""

from __future__ import annotations

import sqlite3

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from webapp_stub.search_query import (
    MAX_COUNT,
    MAX_PAGE,
    MAX_QUERY_CHARS,
    MAX_QUERY_TERMS,
    MAX_QUERY_TOKENS,
    Paging,
    QueryError,
    Term,
    paging,
    parse,
)


@pytest.fixture(scope="module")
def fts() -> sqlite3.Connection:
    conn = sqlite3.connect(":memory:")
    conn.execute("CREATE VIRTUAL TABLE t USING fts5(text)")
    conn.executemany(
        "INSERT INTO t (text) VALUES (?)",
        [("deploy failed again",), ("the deploy worked",), ("café au lait",), ("AND OR NOT NEAR",)],
    )
    return conn


def matching(conn: sqlite3.Connection, query: str) -> list[str]:
    expression = parse(query).match()
    if expression is None:
        return []
    return [r[0] for r in conn.execute("SELECT text FROM t WHERE t MATCH ? ORDER BY rowid", (expression,))]


def test_words_phrases_prefixes_and_exclusions(fts: sqlite3.Connection) -> None:
    assert matching(fts, "deploy") == ["deploy failed again", "the deploy worked"]
    assert matching(fts, "deploy failed") == ["deploy failed again"]
    assert matching(fts, '"failed deploy"') == []
    assert matching(fts, '"deploy failed"') == ["deploy failed again"]
    assert matching(fts, "depl*") == ["deploy failed again", "the deploy worked"]
    assert matching(fts, "deploy -failed") == ["the deploy worked"]
    assert matching(fts, 'deploy -"failed again"') == ["the deploy worked"]
    assert matching(fts, "-failed") == []  # nothing to search for
    assert matching(fts, "CAFÉ") == ["café au lait"]
    assert matching(fts, "and or not") == ["AND OR NOT NEAR"]  # operators are words here
    assert matching(fts, "d*") == []  # a one-letter prefix is a word, not a prefix


def test_the_expression_holds_only_quoted_tokens_and_operators() -> None:
    assert parse('deploy* -x "a-b" NEAR(c)').match() == '("deploy"* AND "a b" AND "NEAR c") NOT ("x")'
    assert Term(("a", "b"), prefix=True).fts() == '"a b"*'


def test_modifiers() -> None:
    query = parse("in:#General in:<#C123|general> in:random from:@Bob from:<@U9> from:me words")
    assert query.channels == ("#general", "C123", "#random")
    assert query.users == ("@bob", "U9", "me")
    assert parse("words").channels == () and parse("words").users == ()
    # unknown modifiers, and malformed ones, are searched as words: never silently dropped
    assert parse("before:2024-01-01").match() == '("before 2024 01 01")'
    assert parse("from:bob").users == ("@bob",)  # as in:general takes a name without its #
    assert parse("from:<U1>").match() == '("from U1")'
    assert parse("in:<C1>").match() == '("in C1")'
    assert parse("in:#x").match() is None


def test_refusals() -> None:
    for blank in (None, "", "   \n"):
        with pytest.raises(QueryError) as err:
            parse(blank)
        assert err.value.code == "no_query"
    for query in ("x" * (MAX_QUERY_CHARS + 1), " ".join(["w"] * (MAX_QUERY_TERMS + 1))):
        with pytest.raises(QueryError) as err:
            parse(query)
        assert err.value.code == "invalid_arguments"
    parse(" ".join(["w"] * MAX_QUERY_TERMS))
    # tokens, not pieces: one piece of many tokens, or few pieces of several, excluded ones too
    half = MAX_QUERY_TOKENS // 2
    for allowed, query in (
        (True, "-".join(["w"] * MAX_QUERY_TOKENS)),
        (False, "-".join(["w"] * (MAX_QUERY_TOKENS + 1))),
        (True, f'"{" ".join(["a"] * half)}" -{".".join(["b"] * half)}'),
        (False, f'"{" ".join(["a"] * half)}" -{".".join(["b"] * (half + 1))}'),
    ):
        if allowed:
            parse(query)
        else:
            with pytest.raises(QueryError) as err:
                parse(query)
            assert err.value.code == "invalid_arguments"


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=MAX_QUERY_CHARS))
def test_any_text_parses_or_is_refused_and_fts5_accepts_the_expression(text: str) -> None:
    conn = sqlite3.connect(":memory:")
    conn.execute("CREATE VIRTUAL TABLE t USING fts5(text)")
    conn.execute("INSERT INTO t (text) VALUES (?)", (text,))
    try:
        query = parse(text)
    except QueryError as err:
        assert err.code in ("no_query", "invalid_arguments")
        return
    expression = query.match()
    if expression is not None:
        conn.execute("SELECT count(*) FROM t WHERE t MATCH ?", (expression,)).fetchone()


@given(
    st.lists(st.sampled_from(["deploy", "-x", '"a b"', "in:#c", "from:me", "é*", "!!", "(", '"', "OR"]), max_size=16)
)
def test_composed_queries_are_valid_fts5(words: list[str]) -> None:
    conn = sqlite3.connect(":memory:")
    conn.execute("CREATE VIRTUAL TABLE t USING fts5(text)")
    try:
        expression = parse(" ".join(words)).match()
    except QueryError:
        return
    if expression is not None:
        conn.execute("SELECT count(*) FROM t WHERE t MATCH ?", (expression,)).fetchone()


def test_paging() -> None:
    assert paging(0, 0) == Paging(20, 1)
    assert paging(500, 3) == Paging(MAX_COUNT, 3)
    page = paging(3, 3)
    assert page.offset == 6 and not page.beyond
    assert page.shapes(7, 1) == {
        "paging": {"count": 3, "total": 7, "page": 3, "pages": 3},
        "pagination": {"total_count": 7, "page": 3, "per_page": 3, "page_count": 3, "first": 7, "last": 7},
    }
    assert paging(20, 1).shapes(0, 0)["pagination"] == {
        "total_count": 0,
        "page": 1,
        "per_page": 20,
        "page_count": 0,
        "first": 0,
        "last": 0,
    }
    assert paging(20, MAX_PAGE + 1).beyond
