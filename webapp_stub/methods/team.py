"""``team.info``: the caller's team."""

from __future__ import annotations

from typing import Any

from webapp_stub.api import Call, WebApi, method
from webapp_stub.args import str_arg
from webapp_stub.errors import ApiError
from webapp_stub.seed import EMAIL_DOMAIN


@method("team.info")
def team_info(api: WebApi, call: Call) -> dict[str, Any]:
    """Slack's team object; ``team`` may name the caller's own team only (``team_not_found`` otherwise)."""
    wanted = str_arg(call.args, "team") or call.me.team
    team = api.store.team(wanted) if wanted == call.me.team else None
    if team is None:
        raise ApiError("team_not_found")
    return {
        "team": {
            **team.to_api(),
            "email_domain": EMAIL_DOMAIN,
            "icon": {"image_default": True},
            "avatar_base_url": "",
            "is_verified": False,
        }
    }
