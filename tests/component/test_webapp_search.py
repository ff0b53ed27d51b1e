"""``search.messages`` against the real webapp store over HTTP: who finds what (public channels of
the caller's team, private conversations only as a member, never another team's), deleted and
edited messages, modifiers, paging and sorting, Slack's errors, and the index kept by searches
alone: posting never touches it (webapp_stub/search.py, search_index.py)."""

from __future__ import annotations

import asyncio
import sqlite3
import threading
from typing import Any

from tests.support import async_wait_until
from tests.webapp_harness import Webapp, ok
from webapp_stub import search as search_method
from webapp_stub import search_index
from webapp_stub.search_reader import THREAD_NAME

WAIT_S = 10.0  # the longest any step waits for another (an event), on a slow machine


async def search(webapp: Webapp, token: str, query: str, **body: Any) -> dict[str, Any]:
    return (await ok(webapp, "search.messages", token, query=query, **body))["messages"]  # type: ignore[no-any-return]


async def texts(webapp: Webapp, token: str, query: str, **body: Any) -> list[str]:
    return [m["text"] for m in (await search(webapp, token, query, **body))["matches"]]


async def error_of(webapp: Webapp, token: str, **body: Any) -> str:
    status, reply = await webapp.call("search.messages", token, json_body=body)
    assert status == 200 and reply["ok"] is False, reply
    return str(reply["error"])


async def test_a_user_finds_public_channels_and_only_the_private_conversations_it_is_in(webapp: Webapp) -> None:
    alice, bob, carol, dave = (webapp.user(n) for n in ("alice", "bob", "carol", "dave"))
    general = webapp.channel("general")
    vault = (await ok(webapp, "conversations.create", alice["token"], name="vault", is_private=True))["channel"]["id"]
    await ok(webapp, "conversations.invite", alice["token"], channel=vault, users=bob["id"])
    dm = (await ok(webapp, "conversations.open", alice["token"], users=bob["id"]))["channel"]["id"]
    group = (await ok(webapp, "conversations.open", alice["token"], users=f"{bob['id']},{dave['id']}"))["channel"]["id"]
    public = (await ok(webapp, "conversations.create", bob["token"], name="lonely"))["channel"]["id"]
    for channel, text in ((general, "kumquat general"), (vault, "kumquat vault"), (dm, "kumquat dm")):
        await ok(webapp, "chat.postMessage", alice["token"], channel=channel, text=text)
    await ok(webapp, "chat.postMessage", alice["token"], channel=group, text="kumquat group")
    await ok(webapp, "chat.postMessage", bob["token"], channel=public, text="kumquat lonely")  # carol is not in it

    assert sorted(await texts(webapp, bob["token"], "kumquat")) == [
        "kumquat dm",
        "kumquat general",
        "kumquat group",
        "kumquat lonely",
        "kumquat vault",
    ]
    # carol: the public channels of her team, including one she never joined; no private one
    assert sorted(await texts(webapp, carol["token"], "kumquat")) == ["kumquat general", "kumquat lonely"]
    assert sorted(await texts(webapp, dave["token"], "kumquat")) == [
        "kumquat general",
        "kumquat group",
        "kumquat lonely",
    ]
    # a filter narrows, never widens: in: a private channel she is not in finds nothing
    assert await texts(webapp, carol["token"], f"kumquat in:<#{vault}>") == []
    assert await texts(webapp, carol["token"], "kumquat in:#vault") == []
    assert await texts(webapp, bob["token"], f"kumquat in:<#{vault}|vault>") == ["kumquat vault"]
    # after leaving, the private channel's messages are gone from her answers
    await ok(webapp, "conversations.leave", bob["token"], channel=vault)
    assert "kumquat vault" not in await texts(webapp, bob["token"], "kumquat")


async def test_another_team_finds_nothing_of_this_team(webapp: Webapp) -> None:
    store = webapp.server.store
    other = store.create_team("Elsewhere", "elsewhere")
    _, mallory_token = store.create_user(other.id, "mallory")
    alice, general = webapp.user("alice"), webapp.channel("general")
    await ok(webapp, "chat.postMessage", alice["token"], channel=general, text="teamsecret plans")
    assert (await search(webapp, mallory_token, "teamsecret"))["total"] == 0
    assert await texts(webapp, mallory_token, f"teamsecret in:<#{general}>") == []
    assert await texts(webapp, alice["token"], "teamsecret") == ["teamsecret plans"]


async def test_deleted_messages_never_show_and_edits_are_found_by_their_new_text(webapp: Webapp) -> None:
    alice, general = webapp.user("alice"), webapp.channel("general")
    token = alice["token"]
    first = (await ok(webapp, "chat.postMessage", token, channel=general, text="walrus original"))["ts"]
    gone = (await ok(webapp, "chat.postMessage", token, channel=general, text="walrus doomed"))["ts"]
    assert sorted(await texts(webapp, token, "walrus")) == ["walrus doomed", "walrus original"]  # both indexed
    await ok(webapp, "chat.update", token, channel=general, ts=first, text="narwhal rewritten")
    await ok(webapp, "chat.update", token, channel=general, ts=first, text="narwhal rewritten twice")
    await ok(webapp, "chat.delete", token, channel=general, ts=gone)
    assert await texts(webapp, token, "walrus") == []
    assert await texts(webapp, token, "original") == []
    assert await texts(webapp, token, "narwhal") == ["narwhal rewritten twice"]
    # the deleted top row's rowid is reused by the next post: that post is indexed all the same
    await ok(webapp, "chat.postMessage", token, channel=general, text="walrus reborn")
    assert await texts(webapp, token, "walrus") == ["walrus reborn"]
    # edited and deleted before any search indexed them
    late = (await ok(webapp, "chat.postMessage", token, channel=general, text="okapi early"))["ts"]
    await ok(webapp, "chat.update", token, channel=general, ts=late, text="okapi late")
    assert await texts(webapp, token, "okapi") == ["okapi late"]
    _assert_index_exact(webapp)


def _assert_index_exact(webapp: Webapp) -> None:
    """FTS5's integrity check: the index holds exactly the current text of every row it covers."""
    conn = webapp.server.store.conn
    conn.execute("INSERT INTO search_fts (search_fts, rank) VALUES ('integrity-check', 0)")
    assert conn.execute("SELECT count(*) FROM search_stale").fetchone()[0] == 0


async def test_posting_does_not_touch_the_index_until_a_search(webapp: Webapp) -> None:
    alice, general = webapp.user("alice"), webapp.channel("general")
    await search(webapp, alice["token"], "anything")
    store = webapp.server.store
    before = search_index.mark(store.conn)
    statements: list[str] = []
    store.conn.set_trace_callback(statements.append)
    try:
        for i in range(5):
            await ok(webapp, "chat.postMessage", alice["token"], channel=general, text=f"quokka {i}")
    finally:
        store.conn.set_trace_callback(None)
    assert statements and not [s for s in statements if "search" in s], statements
    assert search_index.mark(store.conn) == before
    assert len(await texts(webapp, alice["token"], "quokka")) == 5
    assert search_index.mark(store.conn) > before


async def test_modifiers_sorting_paging_and_highlight(webapp: Webapp) -> None:
    alice, bob = webapp.user("alice"), webapp.user("bob")
    general, random = webapp.channel("general"), webapp.channel("random")
    stamps = []
    for i in range(7):
        who, channel = (alice, general) if i % 2 == 0 else (bob, random)
        reply = await ok(webapp, "chat.postMessage", who["token"], channel=channel, text=f"pangolin number{i}")
        stamps.append(reply["ts"])
    token = alice["token"]
    newest = await search(webapp, token, "pangolin", sort="timestamp", count=3)
    assert [m["ts"] for m in newest["matches"]] == stamps[::-1][:3]
    assert newest["total"] == 7
    assert newest["paging"] == {"count": 3, "total": 7, "page": 1, "pages": 3}
    last = await search(webapp, token, "pangolin", sort="timestamp", count=3, page=3)
    assert [m["ts"] for m in last["matches"]] == [stamps[0]]
    assert last["pagination"] == {
        "total_count": 7,
        "page": 3,
        "per_page": 3,
        "page_count": 3,
        "first": 7,
        "last": 7,
    }
    oldest = await search(webapp, token, "pangolin", sort="timestamp", sort_dir="asc", count=2)
    assert [m["ts"] for m in oldest["matches"]] == stamps[:2]
    assert (await search(webapp, token, "pangolin", page=4, count=3))["matches"] == []
    assert len(await texts(webapp, token, "pangolin from:@bob")) == 3
    assert len(await texts(webapp, token, "pangolin from:me")) == 4
    assert len(await texts(webapp, token, f"pangolin from:<@{bob['id']}> in:#random")) == 3
    assert await texts(webapp, token, "pangolin from:@bob in:#general") == []
    assert await texts(webapp, token, "pangolin from:@nobody") == []
    assert await texts(webapp, token, "pangolin -number3 -number5 in:random") == ["pangolin number1"]
    assert await texts(webapp, token, '"number4 pangolin"') == []
    assert await texts(webapp, token, '"pangolin number4"') == ["pangolin number4"]
    assert len(await texts(webapp, token, "pango*")) == 7
    assert await texts(webapp, token, "number6", highlight=True) == ["pangolin \ue000number6\ue001"]
    for text in ("zebu among many other words in this one", "zebu zebu zebu", "a zebu here"):
        await ok(webapp, "chat.postMessage", token, channel=general, text=text)
    best_first = await texts(webapp, token, "zebu")
    assert best_first[0] == "zebu zebu zebu" and best_first[-1] == "zebu among many other words in this one"
    assert await texts(webapp, token, "zebu", sort="score", sort_dir="asc") == best_first[::-1]
    match = (await search(webapp, token, "number6"))["matches"][0]
    assert match["channel"]["id"] == general and match["channel"]["name"] == "general"
    assert match["channel"]["is_private"] is False and match["user"] == alice["id"] and match["username"] == "alice"
    assert match["permalink"].endswith(f"/archives/{general}/p{stamps[6].replace('.', '')}")
    assert match["type"] == "message" and match["iid"] and match["team"] == webapp.seed["team"]["id"]


async def test_bad_input_gets_slack_errors_and_is_counted(webapp: Webapp) -> None:
    alice = webapp.user("alice")
    bot = next(u for u in webapp.seed["users"] if u["is_bot"])
    assert await error_of(webapp, alice["token"]) == "no_query"
    assert await error_of(webapp, alice["token"], query="   ") == "no_query"
    assert await error_of(webapp, alice["token"], query="x" * 501) == "invalid_arguments"
    assert await error_of(webapp, alice["token"], query=" ".join(["w"] * 17)) == "invalid_arguments"
    assert await error_of(webapp, alice["token"], query="x", count="lots") == "invalid_arguments"
    assert await error_of(webapp, bot["token"], query="anything") == "not_allowed_token_type"
    # operators and punctuation only: nothing to search for, answered empty, never an FTS error
    for query in ('"', "-", "*", "!!! ???", "AND OR NOT", '" OR "', "NEAR(a b)", "(", "in:#"):
        messages = await search(webapp, alice["token"], query)
        assert messages["matches"] == [] and messages["total"] == 0, query
    async with webapp.session.get(f"{webapp.url}/metrics") as resp:
        text = await resp.text()
    assert 'rtm_errors_total{kind="no_query"} 2.0' in text
    assert 'rtm_webapp_requests_total{method="search.messages",outcome="not_allowed_token_type"} 1.0' in text


def test_a_database_from_before_search_gets_the_tables(tmp_path: Any) -> None:
    path = tmp_path / "old.db"
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE marks (name TEXT PRIMARY KEY, value REAL NOT NULL) WITHOUT ROWID")
    conn.close()
    from webapp_stub.store import Store

    store = Store(str(path))
    try:
        assert search_index.available(store.conn) and search_index.mark(store.conn) == 0
    finally:
        store.close()


async def test_a_backlog_is_indexed_a_bounded_chunk_per_search_and_the_answer_says_so(
    webapp: Webapp, monkeypatch: Any
) -> None:
    alice, general = webapp.user("alice"), webapp.channel("general")
    monkeypatch.setattr(search_index, "MAX_INDEX_ROWS_PER_SEARCH", 3)
    for i in range(5):
        await ok(webapp, "chat.postMessage", alice["token"], channel=general, text=f"capybara {i}")
    first = await ok(webapp, "search.messages", alice["token"], query="capybara")
    assert first["warning"] == "search_index_incomplete"
    assert first["response_metadata"] == {"warnings": ["search_index_incomplete"]}
    assert first["messages"]["total"] == 3  # the oldest three: what is indexed, nothing false
    second = await ok(webapp, "search.messages", alice["token"], query="capybara")
    assert "warning" not in second and second["messages"]["total"] == 5


async def test_a_search_considers_the_newest_matches_up_to_its_bound_and_says_so(
    webapp: Webapp, monkeypatch: Any
) -> None:
    alice, general = webapp.user("alice"), webapp.channel("general")
    monkeypatch.setattr(search_method, "MAX_CANDIDATES", 3)
    stamps = [
        (await ok(webapp, "chat.postMessage", alice["token"], channel=general, text=f"axolotl {i}"))["ts"]
        for i in range(5)
    ]
    reply = await ok(webapp, "search.messages", alice["token"], query="axolotl", sort="timestamp")
    assert reply["warning"] == "search_results_capped"
    assert [m["ts"] for m in reply["messages"]["matches"]] == stamps[:1:-1]
    assert reply["messages"]["total"] == 3
    exact = await ok(webapp, "search.messages", alice["token"], query="axolotl 0")
    assert "warning" not in exact and exact["messages"]["total"] == 1


async def test_searches_past_their_tier_are_ratelimited_while_everything_else_is_answered(webapp: Webapp) -> None:
    """A search holds the event loop far longer than a post: Slack's Tier 2 per token
    (METHOD_RATE_LIMITS_PER_MINUTE), then 429 with Retry-After; other methods and other users go on."""
    from webapp_stub.ratelimit import METHOD_RATE_LIMITS_PER_MINUTE

    alice, bob = webapp.user("alice"), webapp.user("bob")
    general = webapp.channel("general")
    tier = METHOD_RATE_LIMITS_PER_MINUTE["search.messages"]
    for _ in range(tier):
        await search(webapp, alice["token"], "anything")
    url = f"{webapp.url}/api/search.messages"
    headers = {"Authorization": f"Bearer {alice['token']}"}
    async with webapp.session.post(url, headers=headers, json={"query": "anything"}) as resp:
        assert resp.status == 429 and int(resp.headers["Retry-After"]) >= 1
        assert await resp.json() == {"ok": False, "error": "ratelimited"}
    await ok(webapp, "chat.postMessage", alice["token"], channel=general, text="still posting")
    assert await texts(webapp, bob["token"], "posting") == ["still posting"]


async def test_a_slow_search_holds_up_no_other_call_and_searches_at_once_are_bounded(
    webapp: Webapp, monkeypatch: Any
) -> None:
    """The search's read runs on its thread (search_reader.py): while it is held there, posts and
    other calls are answered; past MAX_SEARCHES_IN_FLIGHT, a search is refused with 429."""
    from webapp_stub.search_reader import MAX_SEARCHES_IN_FLIGHT, SEARCH_BUSY_RETRY_AFTER_S

    alice, bob, general = webapp.user("alice"), webapp.user("bob"), webapp.channel("general")
    started, release = threading.Event(), threading.Event()
    real_find = search_method.find

    def held_find(*args: Any, **kwargs: Any) -> Any:  # on the reader's thread
        started.set()
        assert release.wait(WAIT_S)
        return real_find(*args, **kwargs)

    monkeypatch.setattr(search_method, "find", held_find)
    await ok(webapp, "chat.postMessage", alice["token"], channel=general, text="tapir before")
    searches = [asyncio.ensure_future(search(webapp, alice["token"], "tapir"))]
    try:
        assert await asyncio.to_thread(started.wait, WAIT_S)
        await ok(webapp, "chat.postMessage", bob["token"], channel=general, text="tapir during")
        assert (await ok(webapp, "auth.test", bob["token"]))["user_id"] == bob["id"]
        assert not searches[0].done()  # answered before the search
        searches += [
            asyncio.ensure_future(search(webapp, bob["token"], "tapir")) for _ in range(MAX_SEARCHES_IN_FLIGHT - 1)
        ]
        reader = webapp.server.store.search_reader
        assert reader is not None

        async def all_admitted() -> bool:
            return reader.in_flight >= MAX_SEARCHES_IN_FLIGHT

        await async_wait_until(all_admitted, WAIT_S, "every search admitted")
        url, headers = f"{webapp.url}/api/search.messages", {"Authorization": f"Bearer {bob['token']}"}
        async with webapp.session.post(url, headers=headers, json={"query": "tapir"}) as resp:
            assert resp.status == 429 and resp.headers["Retry-After"] == str(SEARCH_BUSY_RETRY_AFTER_S)
            assert await resp.json() == {"ok": False, "error": "ratelimited"}
    finally:
        release.set()
    first, *others = await asyncio.wait_for(asyncio.gather(*searches), WAIT_S)
    # "during" is found too if a later search indexed it before this one's read began (its snapshot)
    assert "tapir before" in [m["text"] for m in first["matches"]]
    assert all(o["total"] == 2 for o in others)
    assert reader.refused == 1


async def test_the_search_thread_and_its_connection_are_gone_after_the_webapp_stops(webapp: Webapp) -> None:
    await search(webapp, webapp.user("alice")["token"], "anything")
    reader = webapp.server.store.search_reader
    assert reader is not None and reader.open
    assert [t for t in threading.enumerate() if t.name.startswith(THREAD_NAME)]
    await webapp.stop()
    assert not reader.open
    assert not [t for t in threading.enumerate() if t.name.startswith(THREAD_NAME)]
