"""``api.test``, ``auth.test`` and ``auth.revoke``: is the API up, who is this token, end it."""

from __future__ import annotations

import logging
from typing import Any

from webapp_stub.api import (
    Call,
    WebApi,
    flag,
    method,
)
from webapp_stub.errors import ApiError
from webapp_stub.resume import token_id

log = logging.getLogger("rtm.webapp.api")

# auth.revoke replies once the channel servers have written its event to the gateways (so that a
# post made after the reply cannot reach a revoked connection first), or after this long: a fleet
# that cannot take the event now gets it from the hand-off later, and the reply says revoked.
REVOKE_FANOUT_WAIT_S = 2.0
# The largest --revoke-fanout-wait-s accepted: an auth.revoke call may be held this long.
MAX_REVOKE_FANOUT_WAIT_S = 60.0


@method("api.test", auth=False)
def api_test(api: WebApi, call: Call) -> dict[str, Any]:
    args = {k: v for k, v in call.args.items() if k != "token"}
    if args.get("error"):
        raise ApiError(str(args["error"]))
    return {"args": args} if args else {}


@method("auth.test")
def auth_test(api: WebApi, call: Call) -> dict[str, Any]:
    user = call.me
    team = api.store.team(user.team)
    base = f"{call.request.scheme}://{call.request.host}/" if call.request is not None else "/"
    reply: dict[str, Any] = {
        "url": base,
        "team": team.name if team else user.team,
        "user": user.name,
        "team_id": user.team,
        "user_id": user.id,
        "is_enterprise_install": False,
    }
    if user.bot_id:
        reply["bot_id"] = user.bot_id
    return reply


# Not ``writes=True``: a user ending a leaked token is never told ``ratelimited`` because the
# hand-off outbox is full; the one event it adds per token is bounded by the tokens there are.
@method("auth.revoke")
async def auth_revoke(api: WebApi, call: Call) -> dict[str, Any]:
    """Revoke the calling token (Slack's ``auth.revoke``); with ``test`` true, only say it would.
    The next call with it gets ``invalid_auth``: the token cache forgets it at once. Its open
    websockets are closed (4003, after a ``tokens_revoked`` event) by the gateways that hold them,
    on the event this publishes on the user's channel; its resume records are forgotten. The reply
    waits (``--revoke-fanout-wait-s``) until that event was written to the gateways, so that what
    the user posts after it does not reach a revoked connection first (docs/authz-review.md)."""
    if flag(call.args, "test") or not call.token:
        return {"revoked": False}
    events = api.store.revoke_token(str(call.token))
    if events:
        api.publish(events)
        # watched from now: the event may be fanned out before its commit's callers resume
        fanned_out = api.handoff.settled(events[0], api.revoke_fanout_wait_s or REVOKE_FANOUT_WAIT_S)
        try:
            # The revoke's own batch: if its commit fails the token was never revoked (the DELETE
            # rolled back): CommitFailed, answered internal_error, never "revoked": true.
            await api.durable()
        except BaseException:
            fanned_out.cancel()
            raise
        api.resume.revoke(call.me.id, token_id(str(call.token)))
        if not await fanned_out:
            log.warning("auth.revoke of a token of %s: its event not fanned out yet; replying", call.me.id)
            api.metrics.error("revoke_fanout_late")
    return {"revoked": bool(events)}
