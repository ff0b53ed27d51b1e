"""Who may read and say what, as a user: the Web API refuses every read and write of a
conversation to a caller who may not see it (a private channel or DM it is not in, another
team's channel), every edit of another's message, every membership change by an outsider,
and writes to an archived channel (docs/authz-review.md).

The webapp in-process on a real port, called over HTTP with each user's own token; every
refusal is also checked to have changed nothing.
"""

from __future__ import annotations

import time
from typing import Any

from tests.webapp_harness import Webapp


async def error_of(webapp: Webapp, method: str, token: str, **body: Any) -> str | None:
    """The Slack error code of a call (None if it succeeded)."""
    status, reply = await webapp.call(method, token, json_body=body)
    assert status == 200, (method, status, reply)
    return None if reply.get("ok") else str(reply.get("error"))


async def ok(webapp: Webapp, method: str, token: str, **body: Any) -> dict[str, Any]:
    status, reply = await webapp.call(method, token, json_body=body)
    assert status == 200 and reply.get("ok"), (method, body, reply)
    return reply


async def test_a_non_member_can_neither_read_nor_write_a_private_channel_dm_or_group_dm(webapp: Webapp) -> None:
    alice, bob, carol = (webapp.user(n) for n in ("alice", "bob", "carol"))
    vault = (await ok(webapp, "conversations.create", alice["token"], name="vault", is_private=True))["channel"]["id"]
    await ok(webapp, "conversations.invite", alice["token"], channel=vault, users=bob["id"])
    dm = (await ok(webapp, "conversations.open", alice["token"], users=bob["id"]))["channel"]["id"]
    group = (await ok(webapp, "conversations.open", alice["token"], users=f"{bob['id']},{webapp.user('dave')['id']}"))[
        "channel"
    ]["id"]
    for conversation in (vault, dm, group):
        ts = (await ok(webapp, "chat.postMessage", alice["token"], channel=conversation, text="secret"))["ts"]
        await ok(webapp, "chat.postMessage", bob["token"], channel=conversation, text="reply", thread_ts=ts)
        await ok(webapp, "reactions.add", bob["token"], channel=conversation, timestamp=ts, name="eyes")
        await ok(webapp, "pins.add", alice["token"], channel=conversation, timestamp=ts)
        mark = {"channel": conversation}
        calls: list[tuple[str, dict[str, Any]]] = [
            ("conversations.history", mark),
            ("conversations.replies", {**mark, "ts": ts}),
            ("conversations.info", mark),
            ("conversations.members", mark),
            ("conversations.mark", {**mark, "ts": ts}),
            ("conversations.open", mark),
            ("conversations.join", mark),
            ("conversations.leave", mark),
            ("conversations.invite", {**mark, "users": carol["id"]}),
            ("conversations.kick", {**mark, "user": bob["id"]}),
            ("conversations.rename", {**mark, "name": "mine-now"}),
            ("conversations.archive", mark),
            ("conversations.setTopic", {**mark, "topic": "owned"}),
            ("conversations.setPurpose", {**mark, "purpose": "owned"}),
            ("chat.getPermalink", {**mark, "message_ts": ts}),
            ("chat.postMessage", {**mark, "text": "let me in"}),
            ("chat.postMessage", {**mark, "text": "let me in", "thread_ts": ts}),
            ("chat.meMessage", {**mark, "text": "waves"}),
            ("chat.postEphemeral", {**mark, "user": bob["id"], "text": "psst"}),
            ("chat.scheduleMessage", {**mark, "text": "later", "post_at": 4_000_000_000}),
            ("chat.update", {**mark, "ts": ts, "text": "forged"}),
            ("chat.delete", {**mark, "ts": ts}),
            ("reactions.get", {**mark, "timestamp": ts}),
            ("reactions.add", {**mark, "timestamp": ts, "name": "skull"}),
            ("reactions.remove", {**mark, "timestamp": ts, "name": "eyes"}),
            ("pins.list", mark),
            ("pins.add", {**mark, "timestamp": ts}),
            ("pins.remove", {**mark, "timestamp": ts}),
            ("bookmarks.list", {"channel_id": conversation}),
            ("bookmarks.add", {"channel_id": conversation, "title": "x", "type": "link", "link": "https://x.test"}),
            ("chat.scheduledMessages.list", mark),
        ]
        for method, body in calls:
            assert await error_of(webapp, method, carol["token"], **body) == "channel_not_found", (conversation, method)
        # nothing changed: the messages, the reaction, the pin and the members are as they were
        history = (await ok(webapp, "conversations.history", alice["token"], channel=conversation))["messages"]
        assert [m["text"] for m in history] == ["secret"] and history[0]["reactions"][0]["users"] == [bob["id"]]
        assert len((await ok(webapp, "pins.list", alice["token"], channel=conversation))["items"]) == 1
        members = (await ok(webapp, "conversations.members", alice["token"], channel=conversation))["members"]
        assert carol["id"] not in members and bob["id"] in members
    # nor does the conversation show in her lists, or in what her gateway connects her to
    for types in ("public_channel,private_channel,mpim,im",):
        listed = (await ok(webapp, "conversations.list", carol["token"], types=types))["channels"]
        assert not {c["id"] for c in listed} & {vault, dm, group}
        listed = (await ok(webapp, "users.conversations", carol["token"], user=bob["id"], types=types))["channels"]
        assert not {c["id"] for c in listed} & {vault, dm, group}
    status, boot = await webapp.internal("bootstrap", {"user": carol["id"]})
    assert status == 200 and not {c["id"] for c in boot["channels"]} & {vault, dm, group}


async def test_nobody_edits_or_deletes_another_users_message_bots_included(webapp: Webapp) -> None:
    alice, bob = webapp.user("alice"), webapp.user("bob")
    bot = next(u for u in webapp.seed["users"] if u["is_bot"])
    general = webapp.channel("general")
    ts = (await ok(webapp, "chat.postMessage", alice["token"], channel=general, text="mine"))["ts"]
    for token in (bob["token"], bot["token"]):
        assert await error_of(webapp, "chat.update", token, channel=general, ts=ts, text="forged") == (
            "cant_update_message"
        )
        assert await error_of(webapp, "chat.delete", token, channel=general, ts=ts) == "cant_delete_message"
        assert await error_of(webapp, "reactions.remove", token, channel=general, timestamp=ts, name="eyes") == (
            "no_reaction"
        )
    (message,) = (await ok(webapp, "conversations.history", alice["token"], channel=general, limit=1))["messages"]
    assert message["text"] == "mine" and "edited" not in message
    # an app-level token opens Socket Mode connections and calls nothing else
    app_token = webapp.seed["apps"][0]["app_token"]
    for method in ("chat.postMessage", "conversations.history", "auth.test"):
        assert await error_of(webapp, method, app_token, channel=general, text="x") == "not_allowed_token_type"


async def test_another_teams_user_sees_nothing_of_this_team(webapp: Webapp) -> None:
    store = webapp.server.store
    other = store.create_team("Elsewhere", "elsewhere")
    _, mallory = store.create_user(other.id, "mallory")
    alice, general = webapp.user("alice"), webapp.channel("general")
    ts = (await ok(webapp, "chat.postMessage", alice["token"], channel=general, text="team only"))["ts"]
    for method, body, code in (
        ("conversations.history", {"channel": general}, "channel_not_found"),
        ("conversations.info", {"channel": general}, "channel_not_found"),
        ("conversations.members", {"channel": general}, "channel_not_found"),
        ("conversations.join", {"channel": general}, "channel_not_found"),
        ("conversations.history", {"channel": "#general"}, "channel_not_found"),
        ("chat.postMessage", {"channel": general, "text": "hi"}, "channel_not_found"),
        ("chat.postMessage", {"channel": alice["id"], "text": "hi"}, "user_not_found"),
        ("chat.getPermalink", {"channel": general, "message_ts": ts}, "channel_not_found"),
        ("reactions.add", {"channel": general, "timestamp": ts, "name": "eyes"}, "channel_not_found"),
        ("pins.list", {"channel": general}, "channel_not_found"),
        ("bookmarks.list", {"channel_id": general}, "channel_not_found"),
        ("conversations.open", {"users": alice["id"]}, "user_not_found"),
        ("users.info", {"user": alice["id"]}, "user_not_found"),
        ("users.profile.get", {"user": alice["id"]}, "user_not_found"),
        ("users.getPresence", {"user": alice["id"]}, "user_not_found"),
        ("reminders.add", {"user": alice["id"], "text": "x", "time": "in 5 minutes"}, "user_not_found"),
        ("team.info", {"team": webapp.seed["team"]["id"]}, "team_not_found"),
    ):
        assert await error_of(webapp, method, mallory, **body) == code, (method, body)
    listed = (await ok(webapp, "conversations.list", mallory, types="public_channel"))["channels"]
    assert listed == []
    assert (await ok(webapp, "users.list", mallory))["members"][0]["team_id"] == other.id


async def test_only_a_member_removes_others_from_a_channel(webapp: Webapp) -> None:
    """A user who is not in a public channel (they can see it, but are not in it) cannot
    kick its members: ``not_in_channel``, as ``conversations.invite`` answers an outsider."""
    alice, bob, carol = (webapp.user(n) for n in ("alice", "bob", "carol"))
    crew = (await ok(webapp, "conversations.create", alice["token"], name="crew"))["channel"]["id"]
    await ok(webapp, "conversations.invite", alice["token"], channel=crew, users=bob["id"])
    assert await error_of(webapp, "conversations.kick", carol["token"], channel=crew, user=bob["id"]) == (
        "not_in_channel"
    )
    assert await error_of(webapp, "conversations.kick", carol["token"], channel=crew, user=alice["id"]) == (
        "not_in_channel"
    )
    members = (await ok(webapp, "conversations.members", alice["token"], channel=crew))["members"]
    assert sorted(members) == sorted([alice["id"], bob["id"]])
    await ok(webapp, "conversations.kick", alice["token"], channel=crew, user=bob["id"])  # a member may


async def test_an_archived_channel_refuses_writes_and_membership_changes(webapp: Webapp) -> None:
    """Slack's ``is_archived`` for everything that writes to an archived channel or changes its
    members (``conversations.leave`` lists it); reads still work."""
    alice, bob, carol = (webapp.user(n) for n in ("alice", "bob", "carol"))
    old = (await ok(webapp, "conversations.create", alice["token"], name="old"))["channel"]["id"]
    await ok(webapp, "conversations.invite", alice["token"], channel=old, users=bob["id"])
    ts = (await ok(webapp, "chat.postMessage", alice["token"], channel=old, text="last words"))["ts"]
    await ok(webapp, "conversations.archive", alice["token"], channel=old)
    for method, token, body in (
        ("chat.postMessage", alice, {"text": "x"}),
        ("chat.update", alice, {"ts": ts, "text": "x"}),
        ("chat.meMessage", alice, {"text": "x"}),
        ("chat.postEphemeral", alice, {"user": bob["id"], "text": "x"}),
        ("chat.scheduleMessage", alice, {"text": "x", "post_at": int(time.time()) + 3600}),
        ("reactions.add", alice, {"timestamp": ts, "name": "eyes"}),
        ("pins.add", alice, {"timestamp": ts}),
        ("conversations.setTopic", alice, {"topic": "x"}),
        ("conversations.rename", alice, {"name": "older"}),
        ("conversations.join", carol, {}),
        ("conversations.invite", alice, {"users": carol["id"]}),
        ("conversations.leave", bob, {}),
        ("conversations.kick", alice, {"user": bob["id"]}),
    ):
        assert await error_of(webapp, method, token["token"], channel=old, **body) == "is_archived", method
    members = (await ok(webapp, "conversations.members", alice["token"], channel=old))["members"]
    assert sorted(members) == sorted([alice["id"], bob["id"]])
    history = (await ok(webapp, "conversations.history", bob["token"], channel=old))["messages"]
    assert [m["text"] for m in history] == ["last words"]


async def test_a_bot_reads_the_messages_only_of_conversations_it_is_in(webapp: Webapp) -> None:
    """Finding 6: Slack's conversations.history, per token type: "Bot token: any conversation
    the relevant bot is a member of. User token: ... all public conversations". A bot token
    reading a public channel it is not in is ``not_in_channel`` (history and replies); once the
    bot joins (or is invited) it reads; a user not in the channel still reads it. A private
    channel the bot is not in stays ``channel_not_found``, as for anyone not in it."""
    alice, carol = webapp.user("alice"), webapp.user("carol")
    bot = next(u for u in webapp.seed["users"] if u["is_bot"])
    lobby = (await ok(webapp, "conversations.create", alice["token"], name="lobby"))["channel"]["id"]
    porch = (await ok(webapp, "conversations.create", alice["token"], name="porch"))["channel"]["id"]
    vault = (await ok(webapp, "conversations.create", alice["token"], name="vault", is_private=True))["channel"]["id"]
    threads = {}
    for channel in (lobby, porch, vault):
        ts = (await ok(webapp, "chat.postMessage", alice["token"], channel=channel, text="root"))["ts"]
        await ok(webapp, "chat.postMessage", alice["token"], channel=channel, text="reply", thread_ts=ts)
        threads[channel] = ts

        await ok(webapp, "pins.add", alice["token"], channel=channel, timestamp=ts)

    async def reads(token: str, channel: str) -> tuple[str | None, ...]:
        return (
            await error_of(webapp, "conversations.history", token, channel=channel),
            await error_of(webapp, "conversations.replies", token, channel=channel, ts=threads[channel]),
            # a message's reactions come with the message, and pins with the pinned messages (review11)
            await error_of(webapp, "reactions.get", token, channel=channel, timestamp=threads[channel]),
            await error_of(webapp, "pins.list", token, channel=channel),
            # a permalink would tell whether a ts exists there (session 12)
            await error_of(webapp, "chat.getPermalink", token, channel=channel, message_ts=threads[channel]),
        )

    assert await reads(bot["token"], lobby) == ("not_in_channel",) * 5
    assert await reads(bot["token"], porch) == ("not_in_channel",) * 5
    assert await reads(bot["token"], vault) == ("channel_not_found",) * 5
    assert await reads(carol["token"], lobby) == (None,) * 5  # a user token reads every public channel
    replies = (await ok(webapp, "conversations.replies", carol["token"], channel=lobby, ts=threads[lobby]))["messages"]
    assert [m["text"] for m in replies] == ["root", "reply"]

    await ok(webapp, "conversations.join", bot["token"], channel=lobby)  # as a Slack app does (channels:join)
    await ok(webapp, "conversations.invite", alice["token"], channel=porch, users=bot["id"])
    for channel in (lobby, porch):
        assert await reads(bot["token"], channel) == (None,) * 5
        history = (await ok(webapp, "conversations.history", bot["token"], channel=channel))["messages"]
        assert "root" in [m["text"] for m in history]
    await ok(webapp, "conversations.leave", bot["token"], channel=lobby)
    assert await reads(bot["token"], lobby) == ("not_in_channel",) * 5  # membership, read live

    async with webapp.session.get(f"{webapp.url}/metrics") as resp:
        text = await resp.text()
    assert 'rtm_webapp_requests_total{method="conversations.history",outcome="not_in_channel"} 3.0' in text
    assert 'rtm_webapp_requests_total{method="conversations.replies",outcome="not_in_channel"} 3.0' in text
