"""``rtm.connect``: a signed, single-use websocket ticket on a gateway of the caller's region."""

from __future__ import annotations

from typing import Any

from services.ticket import INCARNATION_META, mint
from webapp_stub.api import (
    Call,
    WebApi,
    method,
)
from webapp_stub.errors import ApiError

REGION_HEADER = "X-Rtm-Region"


@method("rtm.connect")
def rtm_connect(api: WebApi, call: Call) -> dict[str, Any]:
    """A signed, single-use ticket URL on a gateway; it names the user's oldest
    pending resume record, if the fleet moved one of their connections."""
    user = call.me
    region = str(call.args.get("region") or "")
    if not region and call.request is not None:
        region = call.request.headers.get(REGION_HEADER, "")
    gateway = api.gateways.pick(region or api.region)
    if gateway is None:
        raise ApiError("service_unavailable")
    resume = api.resume.claim(user.id)
    if resume:
        api.resumes.labels("claimed").inc()
    ticket = mint(
        api.keys.ticket_signing,
        user.id,
        user.team,
        gateway.id,
        api.clock(),
        resume=resume,
        incarnation=gateway.meta.get(INCARNATION_META, ""),
    )
    team = api.store.team(user.team)
    # behind an edge proxy a gateway registers the URL clients reach it at (gateway --public-url)
    base = gateway.meta.get("public_url") or f"ws://{gateway.address}:{gateway.port}"
    return {
        "url": f"{base.rstrip('/')}/ws/{ticket}",
        "self": {"id": user.id, "name": user.name},
        "team": team.to_api() if team else {"id": user.team, "name": user.team, "domain": user.team.lower()},
    }
