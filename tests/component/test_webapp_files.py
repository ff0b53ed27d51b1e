"""Files against the real webapp over HTTP (webapp_stub/files.py, file_store.py, file_transfer.py): the
v2 flow end to end, who may read a file, the upload ticket (single use, expiry), the size limit on a
streamed body, the download's headers, deletion, Slack's errors and the sweep of files never
completed."""

from __future__ import annotations

import asyncio
import json
import os
import stat
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp

from tests.support import async_wait_until
from tests.webapp_harness import (
    FakeAdminServer,
    Webapp,
    clock_ahead,
    error_of,
    file_state,
    held_body,
    metrics_text,
    ok,
    post_bytes,
    start,
)
from webapp_stub import file_store


async def upload(webapp: Webapp, token: str, name: str, data: bytes, **complete: Any) -> dict[str, Any]:
    """files_upload_v2's three steps; the completed file object."""
    got = await ok(webapp, "files.getUploadURLExternal", token, filename=name, length=len(data))
    assert (await post_bytes(webapp, got["upload_url"], data))[0] == 200
    files = [{"id": got["file_id"], "title": complete.pop("title", name)}]
    done = await ok(webapp, "files.completeUploadExternal", token, files=json.dumps(files), **complete)
    assert done["files"][0]["id"] == got["file_id"]
    return done["files"][0]  # type: ignore[no-any-return]


async def download(webapp: Webapp, url: str, token: str | None) -> tuple[int, bytes, Any]:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    async with webapp.session.get(url, headers=headers) as resp:
        return resp.status, await resp.read(), resp.headers


def events_of(fake_as: FakeAdminServer, channel: str) -> list[dict[str, Any]]:
    return [json.loads(p["json"]) for p in fake_as.pubs_for(channel)]


async def test_the_v2_flow_shares_a_message_with_the_file_fanned_out_and_downloadable(
    webapp: Webapp, fake_as: FakeAdminServer
) -> None:
    alice, bob, general = webapp.user("alice"), webapp.user("bob"), webapp.channel("general")
    data = b"quarterly numbers\n" * 100
    shared = await upload(webapp, alice["token"], "notes.txt", data, channel_id=general, initial_comment="here")
    assert shared["name"] == "notes.txt" and shared["size"] == len(data) and shared["channels"] == [general]
    assert shared["mimetype"] == "text/plain" and shared["user"] == alice["id"]

    async def arrived() -> bool:
        return len(events_of(fake_as, general)) >= 2

    await async_wait_until(arrived, what="the file's message and file_shared at the admin server")
    message, file_shared = events_of(fake_as, general)[-2:]
    assert message["type"] == "message" and message["subtype"] == "file_share" and message["text"] == "here"
    assert message["files"][0]["id"] == shared["id"] and message["upload"] is True
    assert file_shared["type"] == "file_shared" and file_shared["file_id"] == shared["id"]
    history = (await ok(webapp, "conversations.history", bob["token"], channel=general))["messages"]
    assert history[0]["files"][0]["id"] == shared["id"] and history[0]["ts"] == message["ts"]

    status, body, headers = await download(webapp, shared["url_private_download"], bob["token"])
    assert status == 200 and body == data
    assert headers["Content-Type"] == "text/plain; charset=utf-8" and headers["Content-Disposition"].startswith(
        "attachment;"
    )
    info = (await ok(webapp, "files.info", bob["token"], file=shared["id"]))["file"]
    assert info["id"] == shared["id"] and info["channels"] == [general]
    listed = await ok(webapp, "files.list", bob["token"])
    assert [f["id"] for f in listed["files"]] == [shared["id"]] and listed["paging"]["total"] == 1

    directory = Path(webapp.server.args.data_dir) / "files"
    assert stat.S_IMODE(directory.stat().st_mode) == 0o700
    assert [p.name for p in directory.iterdir()] == [shared["id"]]
    assert stat.S_IMODE((directory / shared["id"]).stat().st_mode) == 0o600


async def test_only_readers_of_a_conversation_it_is_in_see_a_file_and_another_team_never(webapp: Webapp) -> None:
    alice, bob, carol = (webapp.user(n) for n in ("alice", "bob", "carol"))
    vault = (await ok(webapp, "conversations.create", alice["token"], name="vault", is_private=True))["channel"]["id"]
    await ok(webapp, "conversations.invite", alice["token"], channel=vault, users=bob["id"])
    secret = await upload(webapp, alice["token"], "plan.pdf", b"%PDF-secret", channel_id=vault)
    private = await upload(webapp, alice["token"], "draft.txt", b"mine only")  # shared nowhere
    store = webapp.server.store
    other = store.create_team("Elsewhere", "elsewhere")
    _, mallory = store.create_user(other.id, "mallory")

    assert (await download(webapp, secret["url_private"], bob["token"]))[1] == b"%PDF-secret"
    for token in (carol["token"], mallory):
        assert await error_of(webapp, "files.info", token, file=secret["id"]) == "file_not_found"
        assert (await ok(webapp, "files.list", token))["files"] == []
        status, body, _ = await download(webapp, secret["url_private_download"], token)
        assert status == 404 and b"secret" not in body
    for token in (bob["token"], carol["token"], mallory):
        assert await error_of(webapp, "files.info", token, file=private["id"]) == "file_not_found"
        assert (await download(webapp, private["url_private"], token))[0] == 404
    assert (await download(webapp, private["url_private"], alice["token"]))[1] == b"mine only"
    assert {f["id"] for f in (await ok(webapp, "files.list", alice["token"]))["files"]} == {secret["id"], private["id"]}
    assert (await download(webapp, secret["url_private"], None))[0] == 401
    assert (await download(webapp, secret["url_private"], "xoxp-nobody"))[0] == 401
    # a public channel: every user of the team reads its files, a bot only as a member
    public = (await ok(webapp, "conversations.create", alice["token"], name="open"))["channel"]["id"]
    board = await upload(webapp, alice["token"], "board.txt", b"public", channel_id=public)
    bot = next(u for u in webapp.seed["users"] if u["is_bot"])
    assert (await download(webapp, board["url_private"], carol["token"]))[1] == b"public"
    assert (await download(webapp, board["url_private"], bot["token"]))[0] == 404
    assert await error_of(webapp, "files.info", bot["token"], file=board["id"]) == "file_not_found"
    await ok(webapp, "conversations.invite", alice["token"], channel=public, users=bot["id"])
    assert (await download(webapp, board["url_private"], bot["token"]))[1] == b"public"
    # bob leaves: the file goes with the conversation
    await ok(webapp, "conversations.leave", bob["token"], channel=vault)
    assert (await download(webapp, secret["url_private"], bob["token"]))[0] == 404


async def test_an_upload_url_is_good_once_and_expires(webapp: Webapp) -> None:
    alice = webapp.user("alice")
    got = await ok(webapp, "files.getUploadURLExternal", alice["token"], filename="a.txt", length=3)
    assert (await post_bytes(webapp, got["upload_url"], b"abc"))[0] == 200
    status, text = await post_bytes(webapp, got["upload_url"], b"abc")
    assert status == 404 and "invalid_upload_url" in text
    assert (await post_bytes(webapp, got["upload_url"][:-1] + "A", b"abc"))[0] == 404

    late = await ok(webapp, "files.getUploadURLExternal", alice["token"], filename="b.txt", length=3)
    with clock_ahead(webapp, file_store.UPLOAD_TICKET_TTL_S + 1):
        status, text = await post_bytes(webapp, late["upload_url"], b"abc")
    assert status == 404 and "upload_url_expired" in text
    files = json.dumps([{"id": late["file_id"]}])
    assert await error_of(webapp, "files.completeUploadExternal", alice["token"], files=files) == "file_not_found"


async def test_files_never_completed_are_swept_rows_and_bytes(webapp: Webapp) -> None:
    alice = webapp.user("alice")
    got = await ok(webapp, "files.getUploadURLExternal", alice["token"], filename="a.txt", length=3)
    assert (await post_bytes(webapp, got["upload_url"], b"abc"))[0] == 200
    kept = await upload(webapp, alice["token"], "kept.txt", b"kept")
    service = webapp.server.api.files
    assert service is not None
    assert await service.sweep() == 0
    with clock_ahead(webapp, service.pending_ttl_s + 1):
        assert await service.sweep() == 1
    assert [p.name for p in service.directory.iterdir()] == [kept["id"]]
    assert file_store.get(webapp.server.store.conn, got["file_id"]) is None


async def slow_body(chunks: int, sent: list[int]) -> AsyncIterator[bytes]:
    for _ in range(chunks):
        sent[0] += 1
        yield b"x" * 65536


async def test_a_body_past_the_limit_is_refused_while_it_streams(tmp_path: Path, fake_as: FakeAdminServer) -> None:
    app = await start(tmp_path, fake_as, "--max-file-bytes", "100000")
    try:
        token = app.user("alice")["token"]
        too_big = {"filename": "big.bin", "length": 100001}
        assert await error_of(app, "files.getUploadURLExternal", token, **too_big) == "file_upload_size_restricted"
        got = await ok(app, "files.getUploadURLExternal", token, filename="big.bin", length=100000)
        sent = [0]
        try:  # 64 MiB, chunked (no Content-Length): refused at the first byte past 100,000
            status, text = await post_bytes(app, got["upload_url"], slow_body(1024, sent))
            assert status == 413 and "file_too_large" in text
        except aiohttp.ClientError:
            pass  # the webapp answered and closed while the body was still going out
        assert sent[0] < 1024
        assert list((tmp_path / "files").iterdir()) == []
        again = await ok(app, "files.getUploadURLExternal", token, filename="big.bin", length=10)
        status, text = await post_bytes(app, again["upload_url"], b"y" * 11, headers={"Content-Length": "11"})
        assert status == 413
        short = await ok(app, "files.getUploadURLExternal", token, filename="s.bin", length=10)
        assert (await post_bytes(app, short["upload_url"], b"y" * 9))[0] == 400
        assert list((tmp_path / "files").iterdir()) == []
    finally:
        await app.session.close()
        await app.stop()


async def test_downloads_never_run_as_html_or_script_and_images_may_be_inline(webapp: Webapp) -> None:
    alice, general = webapp.user("alice"), webapp.channel("general")
    page = await upload(webapp, alice["token"], "x.html", b"<script>alert(1)</script>", channel_id=general)
    svg = await upload(webapp, alice["token"], "x.svg", b"<svg onload='alert(1)'/>", channel_id=general)
    png = await upload(webapp, alice["token"], "pic.PNG", b"\x89PNG\r\n\x1a\n", channel_id=general)
    for shared in (page, svg):
        for url in (shared["url_private"], shared["url_private_download"]):
            status, _, headers = await download(webapp, url, alice["token"])
            assert status == 200 and headers["Content-Type"] == "application/octet-stream"
            assert headers["Content-Disposition"].startswith("attachment;")
            assert headers["X-Content-Type-Options"] == "nosniff"
            assert headers["Content-Security-Policy"] == "sandbox; default-src 'none'"
    _, _, headers = await download(webapp, png["url_private"], alice["token"])
    assert headers["Content-Type"] == "image/png" and headers["Content-Disposition"].startswith("inline;")
    assert headers["Content-Security-Policy"] == "sandbox; default-src 'none'"
    _, _, headers = await download(webapp, png["url_private_download"], alice["token"])
    assert headers["Content-Disposition"].startswith("attachment;")
    odd = await upload(webapp, alice["token"], 'a/b?c#d "é" ..txt', b"odd", channel_id=general)
    assert odd["url_private"].endswith("/a_b_c_d_____..txt")
    status, body, headers = await download(webapp, odd["url_private_download"], alice["token"])
    assert status == 200 and body == b"odd" and headers["Content-Type"] == "text/plain; charset=utf-8"
    assert headers["Content-Disposition"] == (
        "attachment; filename=\"a/b?c#d ___ ..txt\"; filename*=UTF-8''a%2Fb%3Fc%23d%20%22%C3%A9%22%20..txt"
    )


async def test_the_uploader_deletes_a_file_and_its_messages_show_a_tombstone(
    webapp: Webapp, fake_as: FakeAdminServer
) -> None:
    alice, bob, general = webapp.user("alice"), webapp.user("bob"), webapp.channel("general")
    shared = await upload(webapp, alice["token"], "gone.txt", b"bye", channel_id=general, initial_comment="soon gone")
    assert await error_of(webapp, "files.delete", bob["token"], file=shared["id"]) == "cant_delete_file"
    await ok(webapp, "files.delete", alice["token"], file=shared["id"])
    assert await error_of(webapp, "files.info", alice["token"], file=shared["id"]) == "file_deleted"
    assert await error_of(webapp, "files.delete", alice["token"], file=shared["id"]) == "file_deleted"
    assert (await download(webapp, shared["url_private"], alice["token"]))[0] == 404
    assert not (Path(webapp.server.args.data_dir) / "files" / shared["id"]).exists()
    history = (await ok(webapp, "conversations.history", bob["token"], channel=general))["messages"]
    assert history[0]["files"] == [{"id": shared["id"], "mode": "tombstone"}] and history[0]["text"] == "soon gone"
    assert (await ok(webapp, "files.list", bob["token"]))["files"] == []

    async def told() -> bool:
        return any(e.get("type") == "file_deleted" for e in events_of(fake_as, general))

    await async_wait_until(told, what="file_deleted at the admin server")
    changed = [e for e in events_of(fake_as, general) if e.get("subtype") == "message_changed"]
    assert changed[-1]["message"]["files"] == [{"id": shared["id"], "mode": "tombstone"}]


async def test_bad_input_gets_slacks_codes_and_is_counted(webapp: Webapp) -> None:
    alice, bob, general = webapp.user("alice"), webapp.user("bob"), webapp.channel("general")
    token = alice["token"]
    get = "files.getUploadURLExternal"
    assert await error_of(webapp, get, token, filename="a.txt") == "missing_argument"
    assert await error_of(webapp, get, token, filename="a.txt", length=0) == "missing_argument"
    assert await error_of(webapp, get, token, filename="a.txt", length="-1") == "invalid_arguments"
    assert await error_of(webapp, get, token, length=3) == "invalid_arguments"
    assert await error_of(webapp, get, token, filename="a\u202etxt.exe", length=3) == "invalid_arguments"
    assert await error_of(webapp, get, token, filename="x" * 256, length=3) == "invalid_arguments"
    assert await error_of(webapp, get, token, filename="a.png", length=3, alt_txt="x" * 1001) == "alt_txt_too_large"
    complete = "files.completeUploadExternal"
    assert await error_of(webapp, complete, token, files="nope") == "invalid_arguments"
    assert await error_of(webapp, complete, token, files="[]") == "invalid_arguments"
    waiting = await ok(webapp, get, token, filename="w.txt", length=3)
    one = json.dumps([{"id": waiting["file_id"]}])
    assert await error_of(webapp, complete, token, files=one) == "file_not_found"  # not uploaded yet
    assert (await post_bytes(webapp, waiting["upload_url"], b"abc"))[0] == 200
    assert await error_of(webapp, complete, bob["token"], files=one) == "file_not_found"  # not bob's
    lonely = (await ok(webapp, "conversations.create", bob["token"], name="lonely"))["channel"]["id"]
    assert await error_of(webapp, complete, token, files=one, channel_id=lonely) == "not_in_channel"
    assert await error_of(webapp, complete, token, files=one, channel_id="C000NOPE") == "channel_not_found"
    await ok(webapp, complete, token, files=one, channel_id=general)  # a refusal changed nothing
    assert await error_of(webapp, complete, token, files=one, channel_id=general) == "file_not_found"  # once
    for _ in range(file_store.MAX_PENDING_FILES_PER_USER - 1):
        await ok(webapp, get, bob["token"], filename="p.txt", length=1)
    status, reply = await webapp.call(get, bob["token"], json_body={"filename": "p.txt", "length": 1})
    assert status == 200 and reply["ok"]
    status, reply = await webapp.call(get, bob["token"], json_body={"filename": "p.txt", "length": 1})
    assert status == 429 and reply["error"] == "ratelimited"
    async with webapp.session.get(f"{webapp.url}/metrics") as resp:
        text = await resp.text()
    for code in ("missing_argument", "alt_txt_too_large", "file_not_found", "not_in_channel"):
        assert f'rtm_errors_total{{kind="{code}"}}' in text, code
    assert os.listdir(Path(webapp.server.args.data_dir) / "files")  # the completed file is there


async def test_the_sweep_never_removes_an_upload_under_way_and_removes_it_after(webapp: Webapp) -> None:
    alice = webapp.user("alice")
    service = webapp.server.api.files
    assert service is not None
    got = await ok(webapp, "files.getUploadURLExternal", alice["token"], filename="slow.bin", length=20)
    halfway, release = asyncio.Event(), asyncio.Event()
    body = held_body(b"x" * 10, b"y" * 10, release, sent=halfway)
    sending = asyncio.create_task(post_bytes(webapp, got["upload_url"], body))
    await halfway.wait()
    await async_wait_until(lambda: file_state(webapp, got["file_id"], "uploading"), what="the upload under way")
    with clock_ahead(webapp, service.pending_ttl_s + 1):
        assert await service.sweep() == 0
        release.set()
        assert (await sending)[0] == 200
        assert await service.sweep() == 1  # uploaded, never completed, its time up
    assert list(service.directory.iterdir()) == []


async def test_the_urls_are_on_the_public_url_when_one_is_set(tmp_path: Path, fake_as: FakeAdminServer) -> None:
    app = await start(tmp_path, fake_as, "--public-url", "https://chat.example.com")
    try:
        token, general = app.user("alice")["token"], app.channel("general")
        got = await ok(app, "files.getUploadURLExternal", token, filename="a.txt", length=1)
        assert got["upload_url"].startswith("https://chat.example.com/upload/v1/")
        local = got["upload_url"].replace("https://chat.example.com", app.url)  # as the edge would forward it
        assert (await post_bytes(app, local, b"a"))[0] == 200
        files = json.dumps([{"id": got["file_id"]}])
        shared = (await ok(app, "files.completeUploadExternal", token, files=files, channel_id=general))["files"][0]
        assert (
            shared["url_private"] == f"https://chat.example.com/files-pri/{shared['user_team']}-{got['file_id']}/a.txt"
        )
    finally:
        await app.session.close()
        await app.stop()


async def test_a_forged_host_never_reaches_the_urls_others_receive(webapp: Webapp, fake_as: FakeAdminServer) -> None:
    alice, general = webapp.user("alice"), webapp.channel("general")
    got = await ok(webapp, "files.getUploadURLExternal", alice["token"], filename="a.txt", length=1)
    assert (await post_bytes(webapp, got["upload_url"], b"a"))[0] == 200
    files = json.dumps([{"id": got["file_id"]}])
    status, reply = await webapp.call(
        "files.completeUploadExternal",
        alice["token"],
        json_body={"files": files, "channel_id": general},
        headers={"Host": "evil.example"},
    )
    assert status == 200 and reply["ok"], reply
    assert reply["files"][0]["url_private"].startswith("http://evil.example/")  # the caller's own answer

    async def arrived() -> bool:
        return any("files" in e for e in events_of(fake_as, general))

    await async_wait_until(arrived, what="the file's message")
    (message,) = [e for e in events_of(fake_as, general) if "files" in e]
    assert message["files"][0]["url_private"].startswith(webapp.url + "/files-pri/")


async def test_a_users_files_stay_within_its_storage_quota_and_others_go_on(
    tmp_path: Path, fake_as: FakeAdminServer
) -> None:
    app = await start(tmp_path, fake_as, "--max-file-storage-bytes-per-user", "100")
    try:
        alice, bob, general = app.user("alice")["token"], app.user("bob")["token"], app.channel("general")
        get = "files.getUploadURLExternal"
        kept = await upload(app, alice, "a.bin", b"a" * 60, channel_id=general)  # complete: 60 of 100
        assert await error_of(app, get, alice, filename="b.bin", length=41) == "storage_limit_reached"
        pending = await ok(app, get, alice, filename="b.bin", length=40)  # asked for: counted at once
        assert await error_of(app, get, alice, filename="c.bin", length=1) == "storage_limit_reached"
        bobs = await upload(app, bob, "bob.bin", b"b" * 100, channel_id=general)  # bob's own quota
        await ok(app, "chat.postMessage", alice, channel=general, text="posting goes on")
        assert (await post_bytes(app, pending["upload_url"], b"b" * 40))[0] == 200
        await ok(app, "files.delete", alice, file=kept["id"])  # deleted: its bytes count no more
        late = await ok(app, get, alice, filename="c.bin", length=60)
        service = app.server.api.files
        assert service is not None
        service.max_storage_per_user = 99  # lowered since the URL was handed out: checked again at the bytes
        status, text = await post_bytes(app, late["upload_url"], b"c" * 60)
        assert status == 507 and "storage_limit_reached" in text
        assert sorted(p.name for p in service.directory.iterdir()) == sorted([pending["file_id"], bobs["id"]])
        assert await file_state(app, late["file_id"], "failed")
        assert 'rtm_errors_total{kind="storage_limit_reached"} 3.0' in await metrics_text(app)
    finally:
        await app.session.close()
        await app.stop()


async def test_uploads_leave_the_disk_reserve_free_even_when_the_disk_fills_meanwhile(
    tmp_path: Path, fake_as: FakeAdminServer
) -> None:
    app = await start(tmp_path, fake_as, "--min-free-disk-bytes", "1000")
    service = app.server.api.files
    assert service is not None
    free = [1500]
    service.free_bytes = lambda path: free[0]  # statvfs, faked: deterministic
    try:
        alice, bob, general = app.user("alice")["token"], app.user("bob")["token"], app.channel("general")
        get = "files.getUploadURLExternal"
        assert await error_of(app, get, alice, filename="big.bin", length=501) == "storage_limit_reached"
        got = await ok(app, get, alice, filename="ok.bin", length=500)  # 1,500 - 500 leaves the 1,000
        halfway, release = asyncio.Event(), asyncio.Event()
        body = held_body(b"x" * 100, b"y" * 400, release, sent=halfway)
        sending = asyncio.create_task(post_bytes(app, got["upload_url"], body))
        await halfway.wait()
        free[0] = 1200  # something else wrote 300 bytes meanwhile: 400 more would leave 800
        release.set()
        status, text = await sending
        assert status == 507 and "storage_limit_reached" in text
        assert list(service.directory.iterdir()) == []  # the part file went
        assert await file_state(app, got["file_id"], "failed")
        await ok(app, "chat.postMessage", bob, channel=general, text="the chat goes on")
        free[0] = 10_000
        await upload(app, alice, "later.bin", b"z" * 500, channel_id=general)
        assert 'rtm_errors_total{kind="storage_limit_reached"} 2.0' in await metrics_text(app)
    finally:
        await app.session.close()
        await app.stop()
