"""``files.getUploadURLExternal``, ``files.completeUploadExternal``, ``files.info``, ``files.list``,
``files.delete``: Slack's way of sharing files since ``files.upload`` was retired, as
``slack_sdk``'s ``WebClient.files_upload_v2`` drives it (docs/slack-compat.md, "Files").

The file's rows and who may read it are in webapp_stub/file_store.py, its bytes over HTTP in
webapp_stub/file_transfer.py. Sharing posts a message through the same store call as
``chat.postMessage`` (``post_message``: membership checked in its transaction, the channel's next
seq, the same hand-off to the fleet), with subtype ``file_share`` and the ``files`` array, then a
``file_shared`` event on the channel. ``chat.postMessage`` itself is untouched.
"""

from __future__ import annotations

import secrets
from typing import Any

from webapp_stub import file_store
from webapp_stub.api import Call, WebApi, json_arg, method, str_arg
from webapp_stub.codecs import dumps, stored_loads, ts_to_us, us_to_ts
from webapp_stub.errors import ApiError
from webapp_stub.file_transfer import STORAGE_REFUSED, FileService
from webapp_stub.models import Channel, Event, User

MAX_FILES_PER_COMPLETE = 10  # files shared by one files.completeUploadExternal (Slack's SDK sends one per file)
MAX_SHARE_CHANNELS = 10  # conversations one call shares to (Slack's: 100, channels_limit_exceeded)
MAX_FILES_LIST_COUNT = 200  # files.list's count at most (its default: 100, as Slack's): bounded work per call
TOMBSTONE = "tombstone"


def _service(api: WebApi) -> FileService:
    service = api.files
    if service is None:
        raise ApiError("file_uploads_disabled")
    return service


@method("files.getUploadURLExternal", writes=True)
def get_upload_url_external(api: WebApi, call: Call) -> dict[str, Any]:
    """Raises ``invalid_arguments`` (no or bad filename, bad length), ``missing_argument`` (length 0
    or none), ``file_upload_size_restricted`` (past --max-file-bytes), ``alt_txt_too_large``,
    ``ratelimited`` (429: --max-pending-files-per-user not yet completed), ``storage_limit_reached``
    (the caller's files past --max-file-storage-bytes-per-user with this one, or the disk's free space
    below --min-free-disk-bytes after it)."""
    service = _service(api)
    name = file_store.check_name(str_arg(call.args, "filename"), file_store.MAX_FILENAME_CHARS, required=True)
    raw = str_arg(call.args, "length")
    if raw is None or raw.strip() in ("", "0"):
        raise ApiError("missing_argument")
    if not (raw.strip().isascii() and raw.strip().isdigit()) or len(raw.strip()) > 18:
        raise ApiError("invalid_arguments")
    length = int(raw)
    if length > service.max_file_bytes:
        raise ApiError("file_upload_size_restricted")
    alt_txt = str_arg(call.args, "alt_txt") or None
    if alt_txt is not None and len(alt_txt) > file_store.MAX_ALT_TXT_CHARS:
        raise ApiError("alt_txt_too_large")
    me, now = call.me, api.clock()
    file_id, ticket = "F" + secrets.token_hex(8).upper(), secrets.token_urlsafe(32)
    with api.store.transaction() as db:
        if file_store.pending_count(db, me.id, now) >= service.max_pending_per_user:
            raise ApiError("ratelimited", status=429, headers={"Retry-After": "60"})
        if service.over_quota(me.id, length) or not service.disk_room(length):
            raise ApiError(STORAGE_REFUSED)
        db.execute(
            "INSERT INTO files (id, team, user, name, title, alt_txt, length, size, state, ticket_hash, "
            "ticket_expires, created, expires_at) VALUES (?, ?, ?, ?, '', ?, ?, NULL, 'waiting', ?, ?, ?, ?)",
            (
                file_id,
                me.team,
                me.id,
                name,
                alt_txt,
                length,
                file_store.ticket_hash(ticket),
                now + file_store.UPLOAD_TICKET_TTL_S,
                int(now),
                now + service.pending_ttl_s,
            ),
        )
    return {"upload_url": f"{service.base_url(call.request)}/upload/v1/{ticket}", "file_id": file_id}


def _files_arg(call: Call) -> list[tuple[str, str]]:
    """``files``: [{"id", "title"?}, ...], 1 to :data:`MAX_FILES_PER_COMPLETE`, each id once."""
    try:
        listed = json_arg(call.args, "files")
    except ApiError:
        raise ApiError("invalid_arguments") from None
    if not isinstance(listed, list) or not 0 < len(listed) <= MAX_FILES_PER_COMPLETE:
        raise ApiError("invalid_arguments")
    wanted: dict[str, str] = {}
    for item in listed:
        if not isinstance(item, dict) or not isinstance(item.get("id"), str):
            raise ApiError("invalid_arguments")
        title = item.get("title")
        if title is not None and not isinstance(title, str):
            raise ApiError("invalid_arguments")
        wanted[item["id"]] = file_store.check_name(title, file_store.MAX_TITLE_CHARS, required=False)
    return list(wanted.items())


def _targets(api: WebApi, call: Call) -> list[Channel]:
    """``channel_id`` and/or ``channels`` (ids, or user ids: their DM): what to share to."""
    named = [str_arg(call.args, "channel_id") or ""] + (str_arg(call.args, "channels") or "").split(",")
    ids = list(dict.fromkeys(value.strip() for value in named if value.strip()))
    if len(ids) > MAX_SHARE_CHANNELS:
        raise ApiError("channels_limit_exceeded")
    channels: list[Channel] = []
    for value in ids:
        if value[:1] in ("U", "W") and api.store.user(value) is not None:
            peer = api.store.user(value)
            if peer is None or peer.team != call.me.team:
                raise ApiError("channel_not_found")
            channel, _, events = api.store.open_dm(call.me, [peer])
            api.publish(events)
            channels.append(channel)
        else:
            channels.append(api.store.visible_channel(value, call.me))
    return channels


@method("files.completeUploadExternal", writes=True)
def complete_upload_external(api: WebApi, call: Call) -> dict[str, Any]:
    """Share the caller's uploaded files: one ``file_share`` message per conversation (with
    ``initial_comment``, in ``thread_ts``'s thread), then ``file_shared``; with no conversation the
    file stays private to its uploader. Raises ``invalid_arguments``, ``file_not_found`` (not the
    caller's, not uploaded, already complete), ``channel_not_found``, ``channels_limit_exceeded``,
    and what ``chat.postMessage`` raises (``not_in_channel``, ``is_archived``, ``msg_too_long``,
    ``invalid_thread_ts``, ``thread_not_found``)."""
    service = _service(api)
    wanted = _files_arg(call)
    channels = _targets(api, call)
    thread_ts = str_arg(call.args, "thread_ts") or None
    if thread_ts is not None and len(channels) > 1:
        raise ApiError("invalid_arguments")  # Slack: "only one channel when using thread_ts"
    text = str_arg(call.args, "initial_comment") or ""
    # The message's file objects go to everyone in the conversation: their URLs are never built from
    # this request's Host header (a forged one would send readers' tokens elsewhere): stored_base_url.
    store, me, base = api.store, call.me, service.stored_base_url()
    events: list[Event] = []
    with store.transaction() as db:
        rows = []
        for file_id, title in wanted:
            row = file_store.get(db, file_id)
            if row is None or row.user != me.id or row.state != "uploaded":
                raise ApiError("file_not_found")
            db.execute(
                "UPDATE files SET state = 'complete', title = ?, expires_at = NULL WHERE id = ?",
                (title or row.name, file_id),
            )
            rows.append(file_store.get(db, file_id))
        for channel in channels:
            events += _share(api, channel, me, [row for row in rows if row is not None], base, text, thread_ts)
        reply_base = service.base_url(call.request)
        shared = [file_store.file_object(row, reply_base, db, me) for row in rows if row is not None]
    api.publish(events)
    for _ in channels:
        api.posts.inc()
    return {"files": shared}


def _share(
    api: WebApi, channel: Channel, me: User, rows: list[file_store.FileRow], base: str, text: str, thread_ts: str | None
) -> list[Event]:
    """The ``file_share`` message of ``rows`` in ``channel`` (posted as chat.postMessage posts), its
    ``file_shares`` rows and a ``file_shared`` per file (inside the caller's transaction)."""
    # Everyone who reads this conversation gets these objects: they name this conversation only,
    # never the others the file went to (a private channel or DM of an earlier share; finding 12).
    key = "channels" if not channel.is_private else "ims" if channel.is_im else "groups"
    objs = []
    for row in rows:
        obj = file_store.file_object(row, base, api.store.conn, None)
        obj.update({"channels": [], "groups": [], "ims": [], "is_public": not channel.is_private})
        obj[key] = [channel.id]
        objs.append(obj)
    extra = {"files": objs, "upload": True, "display_as_bot": False}
    message, event = api.store.post_message(channel, me, text, thread_ts=thread_ts, extra=extra, subtype="file_share")
    events = [event]
    for row in rows:
        api.store.conn.execute(
            "INSERT INTO file_shares (file, channel, ts) VALUES (?, ?, ?)", (row.id, channel.id, message["ts"])
        )
        shared = {"type": "file_shared", "channel_id": channel.id, "file_id": row.id, "user_id": me.id}
        events.append(_file_event(api, channel.id, {**shared, "file": {"id": row.id}}))
    return events


def _file_event(api: WebApi, channel: str, payload: dict[str, Any]) -> Event:
    """An event of ``channel`` with its next seq and ``event_ts`` (inside a transaction)."""
    seq, event_us = api.store._next_seq(channel, with_ts=True)
    return api.store._append_event(channel, {**payload, "event_ts": us_to_ts(event_us)}, seq=seq)


@method("files.info")
def files_info(api: WebApi, call: Call) -> dict[str, Any]:
    """The file, if the caller may read it. Raises ``file_not_found``, ``file_deleted``."""
    service = _service(api)
    row = file_store.readable(api.store.conn, str_arg(call.args, "file") or "", call.me)
    obj = file_store.file_object(row, service.base_url(call.request), api.store.conn, call.me)
    return {"file": obj, "comments": [], "response_metadata": {"next_cursor": ""}}


@method("files.list")
def files_list(api: WebApi, call: Call) -> dict[str, Any]:
    """The complete files the caller may read, newest first, by ``user``, ``channel``, ``ts_from``,
    ``ts_to``; ``count`` (default 100) and ``page`` (from 1), with Slack's ``paging``."""
    service = _service(api)
    filters: list[tuple[str, Any]] = []
    if user := str_arg(call.args, "user"):
        filters.append(("f.user = ?", user))
    # A conversation the caller may not read lists nothing: which of its readable files also went to
    # another's DM or a private channel is not its business (finding 13).
    listable = True
    if channel := str_arg(call.args, "channel"):
        listable = file_store.reads_conversation(api.store.conn, channel, call.me)
        filters.append(("EXISTS (SELECT 1 FROM file_shares x WHERE x.file = f.id AND x.channel = ?)", channel))
    for name, clause in (("ts_from", "f.created >= ?"), ("ts_to", "f.created <= ?")):
        if value := str_arg(call.args, name):
            try:
                filters.append((clause, ts_to_us(value) // 1_000_000))
            except ValueError:
                raise ApiError("invalid_arguments") from None
    count, page = _number(call, "count", 100, MAX_FILES_LIST_COUNT), _number(call, "page", 1, 10**6)
    rows, total = file_store.list_readable(api.store.conn, call.me, filters, count, page) if listable else ([], 0)
    base = service.base_url(call.request)
    files = [file_store.file_object(row, base, api.store.conn, call.me) for row in rows]
    pages = max(1, -(-total // count))
    return {"files": files, "paging": {"count": count, "total": total, "page": page, "pages": pages}}


def _number(call: Call, name: str, default: int, maximum: int) -> int:
    value = str_arg(call.args, name)
    if not value:
        return default
    if not (value.strip().isascii() and value.strip().isdigit()) or len(value.strip()) > 9:
        raise ApiError("invalid_arguments")
    return min(max(int(value), 1), maximum)


@method("files.delete", writes=True)
async def files_delete(api: WebApi, call: Call) -> dict[str, Any]:
    """The uploader deletes its file: the bytes go, every message carrying it shows a tombstone
    (``message_changed``), and ``file_deleted`` goes to each conversation it was shared in.
    Raises ``file_not_found``, ``file_deleted``, ``cant_delete_file`` (not the uploader)."""
    service = _service(api)
    store, me = api.store, call.me
    row = file_store.readable(store.conn, str_arg(call.args, "file") or "", me)
    if row.user != me.id:
        raise ApiError("cant_delete_file")
    events: list[Event] = []
    with store.transaction() as db:
        db.execute("UPDATE files SET state = 'deleted', expires_at = NULL WHERE id = ?", (row.id,))
        shared = file_store.shares(db, row.id)
        for channel_id, ts in shared:
            events.extend(_tombstone(api, channel_id, ts, row.id, me))
        for channel_id in dict.fromkeys(channel for channel, _ in shared):
            events.append(_file_event(api, channel_id, {"type": "file_deleted", "file_id": row.id}))
    api.publish(events)
    await api.durable()  # the row says deleted for good before the bytes go
    service.remove_bytes(row.id)
    return {}


def _tombstone(api: WebApi, channel_id: str, ts: str, file_id: str, me: Any) -> list[Event]:
    """The message at ``ts`` with the file as Slack's tombstone (``message_changed``); nothing if
    the message or its channel is gone, or the channel archived."""
    channel = api.store.channel(channel_id)
    found = api.store.conn.execute(
        "SELECT text, extra FROM messages WHERE channel = ? AND ts_us = ?", (channel_id, ts_to_us(ts))
    ).fetchone()
    if channel is None or channel.is_archived or found is None or not found[1]:
        return []
    extra = stored_loads(found[1])
    extra["files"] = [
        {"id": file_id, "mode": TOMBSTONE} if item.get("id") == file_id else item for item in extra.get("files", [])
    ]
    _message, event = api.store.update_message(channel, me, ts, str(found[0]), extra=stored_loads(dumps(extra)))
    return [event]
