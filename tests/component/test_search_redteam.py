"""Red-team review 14 of ``search.messages`` (webapp_stub/search.py): what a search tells a user
about messages it may not read, and what a query may cost. Each test here was a finding left to the
search's owner as a strict xfail; both are fixed (docs/authz-review.md, findings 10 and 19)."""

from __future__ import annotations

from typing import Any

import pytest

from tests.webapp_harness import Webapp, ok
from webapp_stub import search as search_method
from webapp_stub.search_query import MAX_QUERY_CHARS, QueryError, parse


@pytest.mark.parametrize("hidden_in", ["a dm of others", "another team"])
async def test_what_a_user_may_not_read_changes_nothing_in_its_answer(
    webapp: Webapp, monkeypatch: Any, hidden_in: str
) -> None:
    monkeypatch.setattr(search_method, "MAX_CANDIDATES", 3)
    carol, general = webapp.user("carol"), webapp.channel("general")
    for i in range(3):  # the probe: as many readable matches as the bound
        await ok(webapp, "chat.postMessage", carol["token"], channel=general, text=f"hunter2 probe {i}")
    if hidden_in == "a dm of others":
        alice, bob = webapp.user("alice"), webapp.user("bob")
        dm = (await ok(webapp, "conversations.open", alice["token"], users=bob["id"]))["channel"]["id"]
        await ok(webapp, "chat.postMessage", alice["token"], channel=dm, text="my password is hunter2")
    else:
        store = webapp.server.store
        other = store.create_team("Elsewhere", "elsewhere")
        mallory, _ = store.create_user(other.id, "mallory")
        channel, _ = store.create_channel(mallory, "secrets")
        store.post_message(channel, mallory, "the password is hunter2")
    reply = await ok(webapp, "search.messages", carol["token"], query="hunter2")
    # what carol reads: her three posts, whole, and no word of anything else
    assert "warning" not in reply, reply.get("warning")
    assert reply["messages"]["total"] == 3


@pytest.mark.parametrize("query", ["the." * 125, '"' + "a " * 240 + '"', "x-" * 200 + "x"])
def test_a_query_of_more_tokens_than_terms_allowed_is_invalid_arguments(query: str) -> None:
    assert len(query) <= MAX_QUERY_CHARS
    with pytest.raises(QueryError) as refused:
        parse(query)
    assert refused.value.code == "invalid_arguments"
