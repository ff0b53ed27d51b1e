"""``users.*`` and ``bots.info``: the team's people and bots, and their presence."""

from __future__ import annotations

from typing import Any

from webapp_stub.api import Call, WebApi, method
from webapp_stub.args import int_arg, json_arg, paged, str_arg
from webapp_stub.call_args import user_arg
from webapp_stub.errors import ApiError
from webapp_stub.models import (
    MAX_PAGE,
)

# users.getPresence when no presence server answers: "active" if seen this recently
# (a Web API call or a gateway connecting the user). Slack's own auto-away
# follows 10 minutes of inactivity in its clients; the same figure here.
PRESENCE_ACTIVE_WINDOW_S = 600.0


@method("users.list")
def users_list(api: WebApi, call: Call) -> dict[str, Any]:
    page = api.store.list_users(
        call.me.team, limit=int_arg(call.args, "limit", MAX_PAGE, MAX_PAGE), cursor=str_arg(call.args, "cursor")
    )
    # each with the stored profile (title, status, email, ...), as users.info: one read per user
    members = [api.store.user_object(u) for u in page.items]
    return paged("members", members, page.next_cursor, cache_ts=int(api.clock()))


@method("users.info")
def users_info(api: WebApi, call: Call) -> dict[str, Any]:
    """Slack's user object with the stored profile (``users.profile.set``'s fields, the email)."""
    return {"user": api.store.user_object(user_arg(api, call))}


@method("users.getPresence")
async def users_get_presence(api: WebApi, call: Call) -> dict[str, Any]:
    """From the presence server that owns the user: ``active`` when they have a
    connection on some gateway and are not set ``away`` by hand. When no presence
    server answers, the webapp's own estimate: ``active`` if not set away and seen
    (a Web API call, or a gateway connecting them) within
    :data:`PRESENCE_ACTIVE_WINDOW_S`. Details only for oneself, as Slack."""
    user = user_arg(api, call, default_me=True)
    found = await api.presence.get(user.id) if api.presence is not None else None
    if found is not None:
        presence, online = str(found["presence"]), bool(found["online"])
        manual_away, last_activity = bool(found["manual_away"]), int(found.get("last_activity") or 0)
    else:
        seen = api.last_seen.get(user.id)
        online = seen is not None and api.clock() - seen < PRESENCE_ACTIVE_WINDOW_S
        manual_away = user.presence == "away"
        presence = "active" if online and not manual_away else "away"
        last_activity = int(seen or 0)
    if user.id != call.me.id:
        return {"presence": presence}
    return {
        "presence": presence,
        "online": online,
        "auto_away": not online and not manual_away,
        "manual_away": manual_away,
        "last_activity": last_activity,
    }


@method("users.setPresence", writes=True)
async def users_set_presence(api: WebApi, call: Call) -> dict[str, Any]:
    """Persisted first (SQLite is the durable copy), then told to the user's presence
    server, which pushes the change to watchers; if it cannot be told now, the webapp
    re-sends every manual away when its link to that server comes back."""
    presence = str(call.args.get("presence") or "")
    api.publish(api.store.set_presence(call.me, presence))
    if api.presence is not None:
        await api.presence.set_manual(call.me.id, presence)
    return {}


@method("bots.info")
def bots_info(api: WebApi, call: Call) -> dict[str, Any]:
    """The bot behind a ``B…`` id (the caller's own when ``bot`` is absent and it is a bot)."""
    bot_id = str_arg(call.args, "bot") or call.me.bot_id or ""
    user = api.store.bot(bot_id) if bot_id else None
    if user is None or user.team != call.me.team:
        raise ApiError("bot_not_found")
    app = api.store.app_of_bot(user.id)
    return {
        "bot": {
            "id": user.bot_id,
            "deleted": False,
            "name": app.name if app is not None else user.name,
            "updated": app.created if app is not None else 0,
            "app_id": app.id if app is not None else "",
            "user_id": user.id,
            "icons": {},
        }
    }


@method("users.profile.get")
def users_profile_get(api: WebApi, call: Call) -> dict[str, Any]:
    """The profile of ``user`` (default: the caller). Raises ``user_not_found``."""
    return {"profile": api.store.profile(user_arg(api, call, default_me=True))}


@method("users.profile.set", writes=True)
def users_profile_set(api: WebApi, call: Call) -> dict[str, Any]:
    """Set fields of the caller's profile, from ``profile`` (a JSON object) or ``name`` + ``value``.

    Only one's own profile (Slack lets admins set others': ``cannot_update_admin_user``
    here, as nobody is an admin). Raises ``invalid_profile``, ``too_long``,
    ``invalid_email``, ``email_taken``, ``invalid_emoji``. Emits ``user_change``.
    """
    target = str_arg(call.args, "user")
    if target and target != call.me.id:
        raise ApiError("cannot_update_admin_user")
    try:
        profile = json_arg(call.args, "profile")
    except ApiError:
        raise ApiError("invalid_profile") from None
    name = str_arg(call.args, "name")
    if profile is None and name:
        profile = {name: call.args.get("value", "")}
    if not isinstance(profile, dict):
        raise ApiError("invalid_profile")
    updated, events = api.store.set_profile(call.me, profile)
    api.publish(events)
    return {"profile": updated}


@method("users.lookupByEmail")
def users_lookup_by_email(api: WebApi, call: Call) -> dict[str, Any]:
    """The team member with ``email``; Slack's ``users_not_found`` otherwise (``invalid_email`` for none)."""
    email = str_arg(call.args, "email")
    if not email:
        raise ApiError("invalid_email")
    user = api.store.user_by_email(call.me.team, email)
    if user is None:
        raise ApiError("users_not_found")
    return {"user": api.store.user_object(user)}
