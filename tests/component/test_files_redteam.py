"""Red-team findings on file sharing (docs/authz-review.md, findings 12 to 16), against the real
webapp over HTTP: each test fails without its fix."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

from tests.support import async_wait_until
from tests.webapp_harness import Webapp, clock_ahead, error_of, file_state, held_body, metrics_text, ok, post_bytes
from webapp_stub.file_transfer import MAX_UPLOADS_IN_FLIGHT_PER_USER


async def uploaded(webapp: Webapp, token: str, data: bytes = b"abc") -> str:
    """A file of ``token``'s user with its bytes, not yet shared; its id."""
    got = await ok(webapp, "files.getUploadURLExternal", token, filename="a.txt", length=len(data))
    assert (await post_bytes(webapp, got["upload_url"], data))[0] == 200
    return str(got["file_id"])


async def shared_three_ways(webapp: Webapp) -> tuple[str, str, str]:
    """A file of alice's shared in one call to her private #vault, #general and her DM with bob:
    #general's id, #vault's and the file's."""
    alice, bob = webapp.user("alice"), webapp.user("bob")
    general = webapp.channel("general")
    vault = (await ok(webapp, "conversations.create", alice["token"], name="vault", is_private=True))["channel"]["id"]
    file_id = await uploaded(webapp, alice["token"])
    files = json.dumps([{"id": file_id}])
    await ok(
        webapp, "files.completeUploadExternal", alice["token"], files=files, channels=f"{vault},{general},{bob['id']}"
    )
    return general, vault, file_id


async def test_a_file_message_names_its_own_conversation_only(webapp: Webapp) -> None:
    """Finding 12: shared to a private channel, then #general and a DM in one call, the messages of
    #general and the DM named the private channel (``groups``) to everyone reading them."""
    alice, bob, carol = (webapp.user(n) for n in ("alice", "bob", "carol"))
    general, vault, file_id = await shared_three_ways(webapp)
    seen = (await ok(webapp, "conversations.history", carol["token"], channel=general))["messages"][0]["files"][0]
    assert (seen["channels"], seen["groups"], seen["ims"], seen["is_public"]) == ([general], [], [], True)
    dm = (await ok(webapp, "conversations.open", bob["token"], users=alice["id"]))["channel"]["id"]
    seen = (await ok(webapp, "conversations.history", bob["token"], channel=dm))["messages"][0]["files"][0]
    assert (seen["channels"], seen["groups"], seen["ims"], seen["is_public"]) == ([], [], [dm], False)
    assert (await ok(webapp, "files.info", carol["token"], file=file_id))["file"]["groups"] == []


async def test_files_list_by_a_conversation_the_caller_may_not_read_lists_nothing(webapp: Webapp) -> None:
    """Finding 13: ``files.list channel=<a private channel or DM of others>`` listed the caller's
    readable files that also went there: which files someone shared in a conversation one is not in."""
    alice, bob, carol = (webapp.user(n) for n in ("alice", "bob", "carol"))
    general, vault, file_id = await shared_three_ways(webapp)
    dm = (await ok(webapp, "conversations.open", bob["token"], users=alice["id"]))["channel"]["id"]
    for channel in (vault, dm, "CNOSUCH"):
        listed = await ok(webapp, "files.list", carol["token"], channel=channel)
        assert listed["files"] == [] and listed["paging"]["total"] == 0, channel
    for token, channel in ((carol["token"], general), (bob["token"], dm), (alice["token"], vault)):
        assert [f["id"] for f in (await ok(webapp, "files.list", token, channel=channel))["files"]] == [file_id]


async def test_one_user_holds_at_most_its_share_of_the_upload_slots(webapp: Webapp) -> None:
    """Finding 14: one user's slow uploads (a byte, then nothing until the read timeout) held every
    one of the 16 upload slots: everyone else's uploads were ``too_many_uploads`` for as long."""
    alice, bob = webapp.user("alice"), webapp.user("bob")
    release, held = asyncio.Event(), []
    for _ in range(MAX_UPLOADS_IN_FLIGHT_PER_USER + 1):
        got = await ok(webapp, "files.getUploadURLExternal", alice["token"], filename="a.txt", length=4)
        held.append(
            (
                got["upload_url"],
                asyncio.create_task(post_bytes(webapp, got["upload_url"], held_body(b"a", b"bcd", release))),
            )
        )

    async def streaming() -> bool:
        return len(webapp.server.api.files.uploading) >= MAX_UPLOADS_IN_FLIGHT_PER_USER  # type: ignore[union-attr]

    await async_wait_until(streaming, what="alice's uploads streaming")

    async def one_answered() -> bool:
        return any(task.done() for _, task in held)

    await async_wait_until(one_answered, what="the upload past alice's share answered")
    url, refused = next((url, task) for url, task in held if task.done())
    assert await refused == (429, '{"ok": false, "error": "too_many_uploads"}')
    other = await ok(webapp, "files.getUploadURLExternal", bob["token"], filename="b.txt", length=3)
    assert await post_bytes(webapp, other["upload_url"], b"xyz") == (200, "OK - 3")  # others go on
    release.set()
    assert [(await task)[0] for _, task in held if task is not refused] == [200] * MAX_UPLOADS_IN_FLIGHT_PER_USER
    assert await post_bytes(webapp, url, b"abcd") == (200, "OK - 4")  # the refused ticket stayed good
    assert 'rtm_errors_total{kind="too_many_uploads"}' in await metrics_text(webapp)


async def test_a_file_deleted_while_its_bytes_arrive_stays_deleted(webapp: Webapp) -> None:
    """Finding 15: ``files.delete`` during the upload was undone by the upload's failure: the row went
    back to ``failed`` (``files.info`` answered ok), then the sweep removed it (``file_not_found``),
    and the upload answered 500 ``file_write_failed`` with an ERROR in the log."""
    alice = webapp.user("alice")
    got = await ok(webapp, "files.getUploadURLExternal", alice["token"], filename="a.txt", length=6)
    release = asyncio.Event()
    task = asyncio.create_task(post_bytes(webapp, got["upload_url"], held_body(b"abc", b"def", release)))

    async def streaming() -> bool:
        return await file_state(webapp, got["file_id"], "uploading")

    await async_wait_until(streaming, what="the upload streaming")
    await ok(webapp, "files.delete", alice["token"], file=got["file_id"])
    release.set()
    assert await task == (404, '{"ok": false, "error": "upload_url_expired"}')
    assert await error_of(webapp, "files.info", alice["token"], file=got["file_id"]) == "file_deleted"
    service = webapp.server.api.files
    assert service is not None
    with clock_ahead(webapp, service.pending_ttl_s + 1):
        assert await service.sweep() == 0
    assert await error_of(webapp, "files.info", alice["token"], file=got["file_id"]) == "file_deleted"
    assert list(service.directory.iterdir()) == []


async def test_a_multipart_header_past_its_bound_is_refused_as_bad_form_data(webapp: Webapp) -> None:
    """Finding 16: a part header past aiohttp's 8,190 bytes (a chunked body: no Content-Length to
    refuse it by) escaped the upload's handler: 500, uncounted."""
    alice = webapp.user("alice")
    got = await ok(webapp, "files.getUploadURLExternal", alice["token"], filename="a.txt", length=3)

    async def body() -> AsyncIterator[bytes]:
        yield (
            b'--XX\r\nContent-Disposition: form-data; name="a"\r\nX-Big: ' + b"a" * 100_000 + b"\r\n\r\nv\r\n--XX--\r\n"
        )

    headers: dict[str, Any] = {"Content-Type": "multipart/form-data; boundary=XX"}
    assert await post_bytes(webapp, got["upload_url"], body(), headers=headers) == (
        400,
        '{"ok": false, "error": "invalid_form_data"}',
    )
    assert 'rtm_webapp_requests_total{method="files.upload",outcome="invalid_form_data"}' in await metrics_text(webapp)
