"""``chat.*``: post, update, delete, post ephemeral."""

from __future__ import annotations

from typing import Any

from webapp_stub.api import Call, EncodedReply, WebApi, method
from webapp_stub.args import flag, str_arg
from webapp_stub.call_args import message_content, user_arg
from webapp_stub.errors import ApiError
from webapp_stub.messages import message_reply_json
from webapp_stub.methods.conversations import check_reader


@method("chat.postMessage", writes=True)
def chat_post_message(api: WebApi, call: Call) -> dict[str, Any]:
    """Post as the caller; ``channel`` may also be a user id (posts in the DM with them)."""
    target = str_arg(call.args, "channel") or ""
    if target[:1] in ("U", "W") and api.store.user(target) is not None:
        channel, _, events = api.store.open_dm(call.me, [user_arg(api, call, "channel")])
        api.publish(events)
    else:
        channel = api.channel_arg(call)
    text, extra = message_content(call)
    if not text and not extra:
        raise ApiError("no_text")
    thread_ts = str_arg(call.args, "thread_ts") or None
    message, event = api.store.post_message(
        channel, call.me, text, thread_ts=thread_ts, broadcast=flag(call.args, "reply_broadcast"), extra=extra or None
    )
    api.publish([event])
    api.posts.inc()
    fields = {"channel": channel.id, "ts": message["ts"], "message": message}
    encoded = message_reply_json(channel.id, message["ts"], event.json)  # the event's JSON, not encoded again
    return fields if encoded is None else EncodedReply(fields, encoded)


@method("chat.update", writes=True)
def chat_update(api: WebApi, call: Call) -> dict[str, Any]:
    channel = api.channel_arg(call)
    text, extra = message_content(call)
    if not text and not extra:
        raise ApiError("no_text")
    message, event = api.store.update_message(channel, call.me, call.args.get("ts"), text, extra=extra or None)
    api.publish([event])
    return {"channel": channel.id, "ts": message["ts"], "text": message["text"], "message": message}


@method("chat.delete", writes=True)
def chat_delete(api: WebApi, call: Call) -> dict[str, Any]:
    channel = api.channel_arg(call)
    ts, event = api.store.delete_message(channel, call.me, call.args.get("ts"))
    api.publish([event])
    return {"channel": channel.id, "ts": ts}


@method("chat.postEphemeral", writes=True)
def chat_post_ephemeral(api: WebApi, call: Call) -> dict[str, Any]:
    channel = api.channel_arg(call)
    target = user_arg(api, call)
    text, extra = message_content(call)
    if not text and not extra:
        raise ApiError("no_text")
    ts, event = api.store.post_ephemeral(channel, call.me, target, text)
    api.publish([event])
    return {"message_ts": ts}


@method("chat.meMessage", writes=True)
def chat_me_message(api: WebApi, call: Call) -> dict[str, Any]:
    """A ``/me`` message: subtype ``me_message``. Errors as ``chat.postMessage``."""
    channel = api.channel_arg(call)
    text = str_arg(call.args, "text") or ""
    if not text:
        raise ApiError("no_text")
    message, event = api.store.post_message(channel, call.me, text, subtype="me_message")
    api.publish([event])
    api.posts.inc()
    return {"channel": channel.id, "ts": message["ts"]}


@method("chat.getPermalink")
def chat_get_permalink(api: WebApi, call: Call) -> dict[str, Any]:
    """``<webapp>/archives/<channel>/p<ts without the dot>`` (with ``thread_ts`` and ``cid`` for a reply).

    Raises ``channel_not_found``, ``message_not_found`` (also for a missing or bad ``message_ts``),
    and ``not_in_channel`` for a bot outside the channel, which would otherwise learn whether a
    ``ts`` exists there (it reads that channel's messages only as a member: ``check_reader``)."""
    channel = api.channel_arg(call)
    check_reader(api, call, channel)
    try:
        message = api.store.message(channel.id, call.args.get("message_ts"))
    except ApiError as exc:
        if exc.code in ("invalid_arguments", "invalid_ts"):
            raise ApiError("message_not_found") from None
        raise
    return {
        "channel": channel.id,
        "permalink": permalink(api, call, channel.id, str(message["ts"]), message.get("thread_ts")),
    }


def permalink(api: WebApi, call: Call, channel: str, ts: str, thread_ts: str | None) -> str:
    """A message's permalink: ``<webapp>/archives/<channel>/p<ts without the dot>``, and for a reply
    ``?thread_ts=<thread>&cid=<channel>`` (chat.getPermalink, search.messages)."""
    base = api.public_url or (f"{call.request.scheme}://{call.request.host}" if call.request is not None else "")
    link = f"{base}/archives/{channel}/p{ts.replace('.', '')}"
    if thread_ts and thread_ts != ts:
        link += f"?thread_ts={thread_ts}&cid={channel}"
    return link
