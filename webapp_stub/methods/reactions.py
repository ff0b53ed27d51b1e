"""``reactions.*``: add, remove, get."""

from __future__ import annotations

from typing import Any

from webapp_stub.api import (
    Call,
    WebApi,
    method,
)
from webapp_stub.args import str_arg
from webapp_stub.errors import ApiError
from webapp_stub.methods.conversations import check_reader
from webapp_stub.models import (
    Channel,
)


def reaction_target(api: WebApi, call: Call) -> tuple[Channel, str]:
    if not str_arg(call.args, "channel") and not str_arg(call.args, "timestamp"):
        raise ApiError("no_item_specified")
    channel = api.channel_arg(call)
    ts = str_arg(call.args, "timestamp")
    if not ts:
        raise ApiError("no_item_specified")
    return channel, ts


@method("reactions.add", writes=True)
def reactions_add(api: WebApi, call: Call) -> dict[str, Any]:
    channel, ts = reaction_target(api, call)
    api.publish([api.store.add_reaction(channel, call.me, ts, call.args.get("name"))])
    return {}


@method("reactions.remove", writes=True)
def reactions_remove(api: WebApi, call: Call) -> dict[str, Any]:
    channel, ts = reaction_target(api, call)
    api.publish([api.store.remove_reaction(channel, call.me, ts, call.args.get("name"))])
    return {}


@method("reactions.get")
def reactions_get(api: WebApi, call: Call) -> dict[str, Any]:
    channel, ts = reaction_target(api, call)
    check_reader(api, call, channel)
    return {"type": "message", "channel": channel.id, "message": api.store.message(channel.id, ts)}
