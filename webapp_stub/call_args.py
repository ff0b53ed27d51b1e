"""The argument helpers that method handlers share to resolve a call's arguments into users,
conversations and a message's content (out of :mod:`webapp_stub.api`, whose dispatch they do not need).
Each raises Slack's error code as :class:`~webapp_stub.errors.ApiError`."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from webapp_stub.args import json_arg, str_arg
from webapp_stub.errors import ApiError
from webapp_stub.limits import check_attachments, check_blocks
from webapp_stub.models import MAX_USERS_ENTRIES, MAX_USERS_LISTED, Channel, User

if TYPE_CHECKING:
    from webapp_stub.api import Call, WebApi


def user_arg(api: WebApi, call: Call, name: str = "user", default_me: bool = False) -> User:
    """A user of the caller's team named by ``name``; ``user_not_found`` otherwise."""
    user_id = str_arg(call.args, name)
    if not user_id:
        if default_me:
            return call.me
        raise ApiError("user_not_found")
    user = api.store.user(user_id)
    if user is None or user.team != call.me.team:
        raise ApiError("user_not_found")
    return user


def users_arg(api: WebApi, call: Call, name: str = "users", too_many: str = "invalid_arguments") -> list[User]:
    """User ids, comma-separated or a JSON array, each once ([] if none); ``user_not_found``, ``too_many``."""
    value = call.args.get(name)
    if value is None or value == "":
        return []
    listed = value if isinstance(value, list) else str(value).split(",", MAX_USERS_ENTRIES)  # the rest: 1 more
    ids = [user_id for user_id in dict.fromkeys(str(item).strip() for item in listed) if user_id]
    if len(ids) > MAX_USERS_LISTED or len(listed) > MAX_USERS_ENTRIES:
        raise ApiError(too_many)
    users = []
    for user_id in ids:
        user = api.store.user(user_id)
        if user is None or user.team != call.me.team:
            raise ApiError("user_not_found")
        users.append(user)
    return users


def conversation(api: WebApi, channel: Channel, viewer: User, **extra: Any) -> dict[str, Any]:
    """The conversation object as ``viewer`` sees it (a DM names the other member)."""
    if channel.is_im:
        return channel.to_api(user=api.store.dm_peer(channel, viewer.id), is_open=True, **extra)
    if "is_member" not in extra:
        extra["is_member"] = api.store.is_member(channel.id, viewer.id)
    for kind, detail in api.store.details(channel.id).items():
        extra.setdefault(kind, detail)
    return channel.to_api(**extra)


def message_content(call: Call) -> tuple[str, dict[str, Any]]:
    """``text`` and the ``blocks``/``attachments`` of a message argument set, within
    Slack's limits (:mod:`webapp_stub.limits`). Raises ``invalid_blocks_format``,
    ``invalid_blocks``, ``invalid_attachments``, ``too_many_attachments``."""
    text = str_arg(call.args, "text") or ""  # an object or array: invalid_arguments, not its repr
    extra: dict[str, Any] = {}
    try:
        blocks = json_arg(call.args, "blocks")
    except ApiError:
        raise ApiError("invalid_blocks_format") from None
    if blocks is not None:
        blocks = check_blocks(blocks)
        if blocks:
            extra["blocks"] = blocks
    attachments = json_arg(call.args, "attachments")
    if attachments is not None:
        attachments = check_attachments(attachments)
        if attachments:
            extra["attachments"] = attachments
    return text, extra


CONVERSATION_TYPES = frozenset({"public_channel", "private_channel", "mpim", "im"})


def types_arg(call: Call) -> set[str]:
    types = {t.strip() for t in str(call.args.get("types") or "public_channel").split(",") if t.strip()}
    if not types or not types <= CONVERSATION_TYPES:
        raise ApiError("invalid_types")
    return types
