"""``conversations.*`` and ``users.conversations``: channels, DMs, membership, history, replies."""

from __future__ import annotations

from typing import Any

from webapp_stub.api import Call, WebApi, method
from webapp_stub.args import flag, int_arg, paged, str_arg
from webapp_stub.call_args import conversation, types_arg, user_arg, users_arg
from webapp_stub.errors import ApiError
from webapp_stub.models import (
    DEFAULT_HISTORY_PAGE,
    DEFAULT_PAGE,
    MAX_HISTORY_PAGE,
    MAX_PAGE,
    Channel,
)


@method("conversations.list")
def conversations_list(api: WebApi, call: Call) -> dict[str, Any]:
    page = api.store.list_conversations(
        call.me,
        types=types_arg(call),
        limit=int_arg(call.args, "limit", DEFAULT_PAGE, MAX_PAGE),
        cursor=str_arg(call.args, "cursor"),
        exclude_archived=flag(call.args, "exclude_archived"),
    )
    mine = api.store.memberships(call.me.id, [c.id for c in page.items])
    channels = [conversation(api, c, call.me, **({} if c.is_im else {"is_member": c.id in mine})) for c in page.items]
    return paged("channels", channels, page.next_cursor)


@method("users.conversations")
def users_conversations(api: WebApi, call: Call) -> dict[str, Any]:
    """The conversations ``user`` (default: the caller) is in, that the caller may see."""
    member = user_arg(api, call, default_me=True)
    page = api.store.list_conversations(
        call.me,
        types=types_arg(call),
        member_of=member.id,
        limit=int_arg(call.args, "limit", DEFAULT_PAGE, MAX_PAGE),
        cursor=str_arg(call.args, "cursor"),
        exclude_archived=flag(call.args, "exclude_archived"),
    )
    return paged("channels", [conversation(api, c, call.me) for c in page.items], page.next_cursor)


def readable_channel(api: WebApi, call: Call) -> Channel:
    """The conversation whose messages the caller reads (``conversations.history``/``.replies``):
    one it may see (:meth:`WebApi.channel_arg`; a private channel, DM or group DM only as a
    member, else ``channel_not_found``) and, for a bot token, one its bot is a member of, else
    ``not_in_channel``. Slack's conversations.history, per token type: "Bot token: any
    conversation the relevant bot is a member of. User token: any private conversation the
    user is a member of, and all public conversations" (docs/authz-review.md, finding 6)."""
    channel = api.channel_arg(call)
    check_reader(api, call, channel)
    return channel


def check_reader(api: WebApi, call: Call, channel: Channel) -> None:
    """``not_in_channel`` for a bot token that is not a member of ``channel``, which the caller may
    see: what a bot reads of a conversation (its history, a thread, a message's reactions, its pins)
    it reads only as a member. Slack's scopes say so: channels:history "in public channels that your
    Slack app has been added to", reactions:read "in channels and conversations that your Slack app
    has been added to"; pins.list returns the pinned messages, so the same (docs/authz-review.md,
    finding 6)."""
    if call.me.is_bot and not api.store.is_member(channel.id, call.me.id):
        raise ApiError("not_in_channel")


@method("conversations.history")
def conversations_history(api: WebApi, call: Call) -> dict[str, Any]:
    channel = readable_channel(api, call)
    messages, more, cursor = api.store.history(
        channel.id,
        limit=int_arg(call.args, "limit", DEFAULT_HISTORY_PAGE, MAX_HISTORY_PAGE),
        cursor=str_arg(call.args, "cursor"),
        oldest=str_arg(call.args, "oldest"),
        latest=str_arg(call.args, "latest"),
        inclusive=flag(call.args, "inclusive"),
    )
    return paged("messages", messages, cursor, has_more=more, pin_count=0)


@method("conversations.replies")
def conversations_replies(api: WebApi, call: Call) -> dict[str, Any]:
    channel = readable_channel(api, call)
    ts = str_arg(call.args, "ts")
    if not ts:
        raise ApiError("thread_not_found")
    messages, more, cursor = api.store.replies(
        channel.id,
        ts,
        limit=int_arg(call.args, "limit", DEFAULT_HISTORY_PAGE, MAX_HISTORY_PAGE),
        cursor=str_arg(call.args, "cursor"),
    )
    return paged("messages", messages, cursor, has_more=more)


@method("conversations.create", writes=True)
def conversations_create(api: WebApi, call: Call) -> dict[str, Any]:
    channel, events = api.store.create_channel(call.me, call.args.get("name"), is_private=flag(call.args, "is_private"))
    api.publish(events)
    return {"channel": channel.to_api(is_member=True)}


@method("conversations.join", writes=True)
def conversations_join(api: WebApi, call: Call) -> dict[str, Any]:
    channel = api.channel_arg(call)
    if channel.is_private:
        raise ApiError("method_not_supported_for_channel_type")
    already, events = api.store.join_channel(channel, call.me)
    api.publish(events)
    reply: dict[str, Any] = {"channel": channel.to_api(is_member=True)}
    if already:
        reply["warning"] = "already_in_channel"
        reply["response_metadata"] = {"warnings": ["already_in_channel"]}
    return reply


@method("conversations.leave", writes=True)
def conversations_leave(api: WebApi, call: Call) -> dict[str, Any]:
    channel = api.channel_arg(call)
    was_not_in, events = api.store.leave_channel(channel, call.me)
    api.publish(events)
    return {"not_in_channel": True} if was_not_in else {}


@method("conversations.invite", writes=True)
def conversations_invite(api: WebApi, call: Call) -> dict[str, Any]:
    channel = api.channel_arg(call)
    users = users_arg(api, call)
    if not users:
        raise ApiError("no_user")
    api.publish(api.store.invite(channel, call.me, users))
    return {"channel": channel.to_api(is_member=True)}


@method("conversations.kick", writes=True)
def conversations_kick(api: WebApi, call: Call) -> dict[str, Any]:
    channel = api.channel_arg(call)
    target = user_arg(api, call)
    api.publish(api.store.kick(channel, call.me, target))
    return {}


@method("conversations.rename", writes=True)
def conversations_rename(api: WebApi, call: Call) -> dict[str, Any]:
    channel = api.channel_arg(call)
    renamed, events = api.store.rename_channel(channel, call.me, call.args.get("name"))
    api.publish(events)
    return {"channel": renamed.to_api(is_member=True)}


@method("conversations.archive", writes=True)
def conversations_archive(api: WebApi, call: Call) -> dict[str, Any]:
    api.publish(api.store.archive_channel(api.channel_arg(call), call.me, archived=True))
    return {}


@method("conversations.unarchive", writes=True)
def conversations_unarchive(api: WebApi, call: Call) -> dict[str, Any]:
    api.publish(api.store.archive_channel(api.channel_arg(call), call.me, archived=False))
    return {}


@method("conversations.open", writes=True)
def conversations_open(api: WebApi, call: Call) -> dict[str, Any]:
    """Open (creating on first use) the DM with ``users`` (one id) or the group DM
    (several); or reopen ``channel``, a DM the caller is in."""
    users = users_arg(api, call, too_many="too_many_users")
    if users:
        channel, already, events = api.store.open_dm(call.me, users)
        api.publish(events)
    elif str_arg(call.args, "channel"):
        channel = api.channel_arg(call)
        if channel.kind == "channel":
            raise ApiError("method_not_supported_for_channel_type")
        already = True
    else:
        raise ApiError("users_list_not_supplied")
    reply: dict[str, Any] = {
        "channel": conversation(api, channel, call.me) if flag(call.args, "return_im") else {"id": channel.id}
    }
    if already:
        reply.update(no_op=True, already_open=True)
    return reply


@method("conversations.members")
def conversations_members(api: WebApi, call: Call) -> dict[str, Any]:
    channel = api.channel_arg(call)
    page = api.store.list_members(
        channel.id, limit=int_arg(call.args, "limit", DEFAULT_PAGE, MAX_PAGE), cursor=str_arg(call.args, "cursor")
    )
    return paged("members", page.items, page.next_cursor)


@method("conversations.info")
def conversations_info(api: WebApi, call: Call) -> dict[str, Any]:
    """The conversation, with ``num_members`` if asked, and for a member its read position
    ``last_read`` (where ``conversations.mark`` put it; ``0000000000.000000`` before any), as Slack's."""
    channel = api.channel_arg(call)
    extra: dict[str, Any] = {}
    if flag(call.args, "include_num_members"):
        extra["num_members"] = api.store.member_count(channel.id)
    if api.store.is_member(channel.id, call.me.id):
        extra["last_read"] = api.store.last_read(channel.id, call.me.id)
    return {"channel": conversation(api, channel, call.me, **extra)}


def _set_detail(api: WebApi, call: Call, kind: str) -> dict[str, Any]:
    channel = api.channel_arg(call)
    value = str_arg(call.args, kind)  # an object or array: invalid_arguments
    if value is None:
        raise ApiError("invalid_arguments")
    api.publish(api.store.set_detail(channel, call.me, kind, value))
    return {"channel": conversation(api, channel, call.me)}


@method("conversations.setTopic", writes=True)
def conversations_set_topic(api: WebApi, call: Call) -> dict[str, Any]:
    """Set ``topic`` (at most 250 characters; "" clears it); posts ``channel_topic`` in the channel."""
    return _set_detail(api, call, "topic")


@method("conversations.setPurpose", writes=True)
def conversations_set_purpose(api: WebApi, call: Call) -> dict[str, Any]:
    """Set ``purpose`` (at most 250 characters; "" clears it); posts ``channel_purpose`` in the channel."""
    return _set_detail(api, call, "purpose")


@method("conversations.mark", writes=True)
def conversations_mark(api: WebApi, call: Call) -> dict[str, Any]:
    """Move the caller's read position to ``ts``; ``channel_marked`` to all of the caller's connections."""
    channel = api.channel_arg(call)
    api.publish(api.store.mark(channel, call.me, call.args.get("ts")))
    return {}
