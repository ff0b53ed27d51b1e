"""``rtm.connect``: a signed, single-use websocket ticket on a gateway of the caller's region."""

from __future__ import annotations

from typing import Any

from services.discovery import Instance
from services.ticket import INCARNATION_META, mint
from webapp_stub.api import (
    Call,
    WebApi,
    method,
)
from webapp_stub.errors import ApiError
from webapp_stub.models import User
from webapp_stub.resume import token_id

REGION_HEADER = "X-Rtm-Region"


@method("rtm.connect")
def rtm_connect(api: WebApi, call: Call) -> dict[str, Any]:
    """A signed, single-use ticket URL on a gateway; it names the oldest pending resume
    record of the user and this token, if the fleet moved a connection opened with it."""
    user = call.me
    base, ticket = gateway_ticket(
        api, api.gateways.pick(caller_region(api, call)), user, user.id, token_id=token_id(call.token or "")
    )
    team = api.store.team(user.team)
    return {
        "url": f"{base}/ws/{ticket}",
        "self": {"id": user.id, "name": user.name},
        "team": team.to_api() if team else {"id": user.team, "name": user.team, "domain": user.team.lower()},
    }


def caller_region(api: WebApi, call: Call) -> str:
    """The region the caller asks for (``region`` argument, else the X-Rtm-Region header), else the webapp's own."""
    region = str(call.args.get("region") or "")
    if not region and call.request is not None:
        region = call.request.headers.get(REGION_HEADER, "")
    return region or api.region


def gateway_ticket(
    api: WebApi, gateway: Instance | None, user: User, resume_key: str, app: str = "", token_id: str = ""
) -> tuple[str, str]:
    """(the gateway's base URL, a ticket for ``user`` on it naming the oldest resume record
    under ``resume_key`` and ``token_id``, and carrying ``token_id``: the gateway's record of
    this connection, if the fleet moves it, is keyed by it); ``service_unavailable`` when no
    gateway was picked."""
    if gateway is None:
        raise ApiError("service_unavailable")
    resume = api.resume.claim(resume_key, token_id)
    if resume:
        api.resumes.labels("claimed").inc()
    ticket = mint(
        api.keys.ticket_signing,
        user.id,
        user.team,
        gateway.id,
        api.clock(),
        resume=resume,
        app=app,
        token_id=token_id,
        incarnation=gateway.meta.get(INCARNATION_META, ""),
    )
    # behind an edge proxy a gateway registers the URL clients reach it at (gateway --public-url)
    base = gateway.meta.get("public_url") or f"ws://{gateway.address}:{gateway.port}"
    return base.rstrip("/"), ticket
