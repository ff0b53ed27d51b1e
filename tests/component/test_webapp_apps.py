"""Apps, app-level tokens and the Web API methods Bolt apps call (issue 15 items 1, 2, 4),
through the official slack_sdk ``AsyncWebClient`` against the webapp on a real port."""

from __future__ import annotations

import json
from typing import Any
from urllib.parse import parse_qs, urlparse

import pytest
from slack_sdk.errors import SlackApiError
from slack_sdk.web.async_client import AsyncWebClient

from services.ticket import TicketVerifier
from tests.support import async_wait_until
from tests.webapp_harness import GATEWAY_INCARNATION, GATEWAY_INSTANCE, KEYS, FakeAdminServer, Webapp
from webapp_stub.seed import EMAIL_DOMAIN


def client(webapp: Webapp, token: str) -> AsyncWebClient:
    return AsyncWebClient(token=token, base_url=webapp.url + "/api/")


async def error_of(call: Any) -> str:
    with pytest.raises(SlackApiError) as info:
        await call
    return str(info.value.response["error"])


def events_of(fake_as: FakeAdminServer, channel: str) -> list[dict[str, Any]]:
    return [json.loads(p["json"]) for p in fake_as.pubs_for(channel)]


async def test_seed_has_an_app_with_token_and_manifest(webapp: Webapp) -> None:
    (app,) = webapp.seed["apps"]
    bot = webapp.user("rtmbot")
    assert app["id"].startswith("A") and app["app_token"].startswith(f"xapp-1-{app['id']}-")
    assert app["bot_user_id"] == bot["id"] and app["bot_id"] == bot["bot_id"]
    assert app["scopes"] == ["connections:write"]
    assert "app_mention" in app["manifest"]["settings"]["event_subscriptions"]["bot_events"]


async def test_auth_test_and_bots_info_for_the_bot_and_app(webapp: Webapp) -> None:
    (app,) = webapp.seed["apps"]
    bot = webapp.user("rtmbot")
    me = (await client(webapp, bot["token"]).auth_test()).data
    assert me["user_id"] == bot["id"] and me["bot_id"] == bot["bot_id"] and me["team_id"] == webapp.seed["team"]["id"]
    info = (await client(webapp, webapp.user("alice")["token"]).bots_info(bot=bot["bot_id"])).data["bot"]
    assert info["app_id"] == app["id"] and info["user_id"] == bot["id"] and info["id"] == bot["bot_id"]
    assert await error_of(client(webapp, bot["token"]).bots_info(bot="BNOPE")) == "bot_not_found"
    # an app-level token calls nothing but apps.connections.open
    assert await error_of(client(webapp, app["app_token"]).auth_test()) == "not_allowed_token_type"


async def test_apps_connections_open_gives_a_ticket_url_on_one_gateway(webapp: Webapp) -> None:
    (app,) = webapp.seed["apps"]
    reply = (await client(webapp, app["app_token"]).apps_connections_open(app_token=app["app_token"])).data
    url = urlparse(reply["url"])
    assert url.scheme == "ws" and url.port == GATEWAY_INSTANCE.port and url.path == "/link/"
    query = parse_qs(url.query)
    assert query["app_id"] == [app["id"]]
    ticket = TicketVerifier(KEYS.ticket_signing, GATEWAY_INSTANCE.id, incarnation=GATEWAY_INCARNATION).verify(
        query["ticket"][0], __import__("time").time()
    )
    assert ticket.app == app["id"] and ticket.user == app["bot_user_id"]
    again = (await client(webapp, app["app_token"]).apps_connections_open(app_token=app["app_token"])).data
    assert again["url"] != reply["url"]  # a new single-use ticket each time


async def test_apps_connections_open_refuses_other_tokens(webapp: Webapp) -> None:
    bot, alice = webapp.user("rtmbot"), webapp.user("alice")
    assert await error_of(client(webapp, bot["token"]).apps_connections_open(app_token=bot["token"])) == (
        "not_allowed_token_type"
    )
    assert await error_of(client(webapp, alice["token"]).apps_connections_open(app_token=alice["token"])) == (
        "not_allowed_token_type"
    )
    assert await error_of(client(webapp, "xapp-1-nope").apps_connections_open(app_token="xapp-1-nope")) == (
        "invalid_auth"
    )
    status, body = await webapp.call("apps.connections.open")
    assert body == {"ok": False, "error": "not_authed"}


async def test_set_topic_and_purpose(webapp: Webapp, fake_as: FakeAdminServer) -> None:
    alice, general = webapp.user("alice"), webapp.channel("general")
    web = client(webapp, alice["token"])
    reply = (await web.conversations_setTopic(channel=general, topic="launch day")).data
    assert reply["channel"]["topic"]["value"] == "launch day" and reply["channel"]["topic"]["creator"] == alice["id"]
    reply = (await web.conversations_setPurpose(channel=general, purpose="talk")).data
    assert reply["channel"]["purpose"]["value"] == "talk"
    info = (await web.conversations_info(channel=general)).data["channel"]
    assert info["topic"]["value"] == "launch day" and info["purpose"]["value"] == "talk"
    await async_wait_until(lambda: _async(len(events_of(fake_as, general)) >= 2), what="two messages")
    subtypes = [e.get("subtype") for e in events_of(fake_as, general)]
    assert subtypes[-2:] == ["channel_topic", "channel_purpose"]
    assert events_of(fake_as, general)[-2]["topic"] == "launch day"
    assert await error_of(web.conversations_setTopic(channel=general, topic="x" * 251)) == "too_long"
    assert await error_of(web.conversations_setTopic(channel="CNOPE", topic="x")) == "channel_not_found"
    eve_made = (await client(webapp, webapp.user("eve")["token"]).conversations_create(name="eves")).data
    assert await error_of(web.conversations_setPurpose(channel=eve_made["channel"]["id"], purpose="x")) == (
        "not_in_channel"
    )


async def _async(value: bool) -> bool:
    return value


async def test_mark_emits_channel_marked_to_the_user(webapp: Webapp, fake_as: FakeAdminServer) -> None:
    alice, general = webapp.user("alice"), webapp.channel("general")
    web = client(webapp, alice["token"])
    posted = (await web.chat_postMessage(channel=general, text="read me")).data
    assert (await web.conversations_info(channel=general)).data["channel"]["last_read"] == "0000000000.000000"
    assert (await web.conversations_mark(channel=general, ts=posted["ts"])).data["ok"]
    # the read position comes back in conversations.info (a member's only), as Slack's clients read it
    assert (await web.conversations_info(channel=general)).data["channel"]["last_read"] == posted["ts"]
    bob_info = (await client(webapp, webapp.user("bob")["token"]).conversations_info(channel=general)).data
    assert bob_info["channel"]["last_read"] == "0000000000.000000"  # his own, not alice's
    eve_made = (await client(webapp, webapp.user("eve")["token"]).conversations_create(name="eves-own")).data
    outside = (await web.conversations_info(channel=eve_made["channel"]["id"])).data["channel"]
    assert "last_read" not in outside and outside["is_member"] is False
    await async_wait_until(lambda: _async(bool(events_of(fake_as, alice["id"]))), what="channel_marked")
    marked = events_of(fake_as, alice["id"])[-1]
    assert marked["type"] == "channel_marked" and marked["channel"] == general and marked["ts"] == posted["ts"]
    # a mark where it already is writes nothing and says nothing (a client marks as it reads); back is a move
    earlier = "1600000000.000001"
    assert (await web.conversations_mark(channel=general, ts=posted["ts"])).data["ok"]
    assert (await web.conversations_mark(channel=general, ts=earlier)).data["ok"]

    def marks() -> list[str]:
        return [e["ts"] for e in events_of(fake_as, alice["id"]) if e["type"] == "channel_marked"]

    await async_wait_until(lambda: _async(len(marks()) >= 2), what="the mark back")
    assert marks() == [posted["ts"], earlier]
    assert (await web.conversations_info(channel=general)).data["channel"]["last_read"] == earlier
    assert await error_of(web.conversations_mark(channel=general, ts="yesterday")) == "invalid_timestamp"
    assert await error_of(web.conversations_mark(channel="CNOPE", ts=posted["ts"])) == "channel_not_found"


async def test_permalink_and_me_message(webapp: Webapp, fake_as: FakeAdminServer) -> None:
    alice, general = webapp.user("alice"), webapp.channel("general")
    web = client(webapp, alice["token"])
    posted = (await web.chat_postMessage(channel=general, text="root")).data
    link = (await web.chat_getPermalink(channel=general, message_ts=posted["ts"])).data
    assert link["channel"] == general
    assert link["permalink"] == f"{webapp.url}/archives/{general}/p{posted['ts'].replace('.', '')}"
    reply = (await web.chat_postMessage(channel=general, text="reply", thread_ts=posted["ts"])).data
    link = (await web.chat_getPermalink(channel=general, message_ts=reply["ts"])).data
    assert link["permalink"].endswith(f"?thread_ts={posted['ts']}&cid={general}")
    webapp.server.api.public_url = "https://edge.example:8443"  # --public-url, behind an edge proxy
    link = (await web.chat_getPermalink(channel=general, message_ts=posted["ts"])).data
    assert link["permalink"] == f"https://edge.example:8443/archives/{general}/p{posted['ts'].replace('.', '')}"
    assert await error_of(web.chat_getPermalink(channel=general, message_ts="1.000001")) == "message_not_found"
    assert await error_of(web.chat_getPermalink(channel="CNOPE", message_ts=posted["ts"])) == "channel_not_found"
    me = (await web.chat_meMessage(channel=general, text="waves")).data
    assert me["channel"] == general and me["ts"]
    history = (await web.conversations_history(channel=general, limit=1)).data["messages"]
    assert history[0]["subtype"] == "me_message" and history[0]["text"] == "waves"
    assert await error_of(web.chat_meMessage(channel=general, text="")) == "no_text"


async def test_profiles_and_lookup_by_email(webapp: Webapp, fake_as: FakeAdminServer) -> None:
    alice, bob = webapp.user("alice"), webapp.user("bob")
    team = webapp.seed["team"]["id"]
    web = client(webapp, alice["token"])
    profile = (await web.users_profile_get()).data["profile"]
    assert profile["email"] == f"alice@{EMAIL_DOMAIN}" and profile["display_name"] == "alice"
    found = (await web.users_lookupByEmail(email=f"bob@{EMAIL_DOMAIN}")).data["user"]
    assert found["id"] == bob["id"]
    assert await error_of(web.users_lookupByEmail(email="nobody@example.com")) == "users_not_found"
    updated = (await web.users_profile_set(profile={"status_text": "lunch", "status_emoji": ":taco:"})).data
    assert updated["profile"]["status_text"] == "lunch" and updated["profile"]["status_emoji"] == ":taco:"
    updated = (await web.users_profile_set(name="title", value="engineer")).data
    assert updated["profile"]["title"] == "engineer" and updated["profile"]["status_text"] == "lunch"
    assert (await client(webapp, bob["token"]).users_profile_get(user=alice["id"])).data["profile"]["title"] == (
        "engineer"
    )
    # users.info and users.list carry the stored profile too (session 12's walkthrough: no email there)
    seen = (await client(webapp, bob["token"]).users_info(user=alice["id"])).data["user"]["profile"]
    assert seen["title"] == "engineer" and seen["email"] == f"alice@{EMAIL_DOMAIN}" and seen["status_text"] == "lunch"
    members = (await client(webapp, bob["token"]).users_list()).data["members"]
    listed = next(m for m in members if m["id"] == alice["id"])["profile"]
    assert listed["title"] == "engineer" and listed["email"] == f"alice@{EMAIL_DOMAIN}"
    await async_wait_until(lambda: _async(len(events_of(fake_as, team)) >= 2), what="user_change")
    change = events_of(fake_as, team)[-1]
    assert change["type"] == "user_change" and change["user"]["id"] == alice["id"]
    assert change["user"]["profile"]["title"] == "engineer"
    assert await error_of(web.users_profile_set(profile={"status_text": "x" * 101})) == "too_long"
    assert await error_of(web.users_profile_set(profile={"email": "not-an-email"})) == "invalid_email"
    assert await error_of(web.users_profile_set(profile={"email": f"bob@{EMAIL_DOMAIN}"})) == "email_taken"
    assert await error_of(web.users_profile_set(profile={"title": "x"}, user=bob["id"])) == "cannot_update_admin_user"
    status, body = await webapp.call("users.profile.set", alice["token"], data={"profile": "{nope"})
    assert body == {"ok": False, "error": "invalid_profile"}
    assert await error_of(web.users_profile_get(user="UNOPE")) == "user_not_found"


async def test_team_info(webapp: Webapp) -> None:
    web = client(webapp, webapp.user("alice")["token"])
    team = (await web.team_info()).data["team"]
    assert team["id"] == webapp.seed["team"]["id"] and team["domain"] == webapp.seed["team"]["domain"]
    assert team["email_domain"] == EMAIL_DOMAIN
    assert await error_of(web.team_info(team="TNOPE")) == "team_not_found"
