"""``apps.connections.open``: a Socket Mode websocket URL for an app (app-level token only)."""

from __future__ import annotations

from typing import Any

from webapp_stub.api import Call, WebApi, method
from webapp_stub.errors import ApiError
from webapp_stub.methods.rtm import caller_region, gateway_ticket

CONNECTIONS_WRITE = "connections:write"
SOCKET_MODE_PATH = "/link/"  # Slack's: wss://wss-primary.slack.com/link/?ticket=...&app_id=...


@method("apps.connections.open", auth=False)
def apps_connections_open(api: WebApi, call: Call) -> dict[str, Any]:
    """A signed, single-use ``ws://<gateway>/link/?ticket=…&app_id=…`` on a gateway chosen like
    ``rtm.connect`` chooses, the same one for all of an app's connections while it serves.

    Slack's errors: ``not_authed`` (no token), ``invalid_auth`` (unknown token),
    ``not_allowed_token_type`` (a bot or user token), ``missing_scope`` (an app token
    without ``connections:write``). The ticket names the app's oldest resume record,
    if the fleet moved its connections (the envelopes they had not acknowledged ride
    along: gateway/socket_mode.py).
    """
    token = call.token
    if not token:
        raise ApiError("not_authed")
    found = api.store.app_by_token(token)
    if found is None:
        raise ApiError("not_allowed_token_type" if api.store.auth(token) is not None else "invalid_auth")
    app, scopes = found
    if CONNECTIONS_WRITE not in scopes:
        raise ApiError("missing_scope")
    wait_s = api.limiter.retry_after(token, "apps.connections.open")
    if wait_s:
        raise ApiError("ratelimited", status=429, headers={"Retry-After": str(wait_s)})
    bot = api.store.user(app.bot_user)
    if bot is None:
        raise ApiError("invalid_auth")
    gateway = api.gateways.pick_sticky(app.id, caller_region(api, call))
    base, ticket = gateway_ticket(api, gateway, bot, app.id, app=app.id)
    return {"url": f"{base}{SOCKET_MODE_PATH}?ticket={ticket}&app_id={app.id}"}
