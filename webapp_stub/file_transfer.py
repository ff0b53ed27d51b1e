"""Files' bytes over HTTP on the webapp's public port: the upload to the URL
``files.getUploadURLExternal`` answers, the downloads at ``url_private`` and
``url_private_download``, and the removal of files never completed (docs/slack-compat.md, "Files";
docs/hardening-webapp.md, "7. Files").

**Upload** (``POST /upload/v1/<ticket>``, no token, as Slack's): the ticket is 256 random bits, kept
only as its SHA-256, good once and for :data:`~webapp_stub.file_store.UPLOAD_TICKET_TTL_S`. The body
(raw bytes, or a multipart form whose first file part is the file) is streamed to
``DATA_DIR/files/<id>.part`` (0600) a chunk at a time, never held whole: a body longer than the
``length`` the URL was asked for is refused (413) at the first byte past it (at once when its
``Content-Length`` says so), and its part file removed. Each read waits at most the request timeout,
the whole upload :data:`UPLOAD_DEADLINE_S`; at most :data:`MAX_UPLOADS_IN_FLIGHT` at once (503),
:data:`MAX_UPLOADS_IN_FLIGHT_PER_USER` of one user (429).
Once whole: fsync (on a thread), renamed to ``<id>``, the row ``uploaded``, answered 200 ``OK``.

**Storage** (docs/hardening-webapp.md, "7. Files"): a user's files, complete and pending, within
``--max-file-storage-bytes-per-user``, and ``--min-free-disk-bytes`` left free on the data
directory's filesystem for the database (a full disk stops every commit, so every post). Both are
checked when the URL is asked for (``files.getUploadURLExternal``, with its ``length``) and again
when the bytes arrive; the reserve also before each chunk is written (:meth:`FileService.disk_room`:
the free space less what is still to come), so a disk filled by something else meanwhile stops the
upload and its part file goes. Refused: ``storage_limit_reached`` (507 at the upload URL).

**Download** (``GET /files-pri/<team>-<id>/[download/]<name>``): ``Authorization: Bearer`` of a
user who may read the file (webapp_stub/file_store.py); anything else 404 (``file_not_found``,
never saying whether the file exists), no token 401. User bytes come from the browser client's
origin, so they must never run there: the content type comes from an allow-list by extension
(else ``application/octet-stream``), ``X-Content-Type-Options: nosniff``,
``Content-Security-Policy: sandbox; default-src 'none'``, and ``Content-Disposition: attachment``
except images at ``url_private`` (inline).
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Protocol
from urllib.parse import quote

from aiohttp import BodyPartReader, web
from aiohttp.http_exceptions import HttpProcessingError

from services.config import Parser
from services.metrics import ServiceMetrics
from webapp_stub import file_store
from webapp_stub.errors import ApiError
from webapp_stub.ratelimit import RateLimiter
from webapp_stub.store import Store

log = logging.getLogger("rtm.webapp.files")

# The largest file (Slack's is 1 GB; rtm keeps its files on the webapp's own disk): --max-file-bytes.
MAX_FILE_BYTES = 50 * 1024 * 1024
MAX_FILE_BYTES_LIMIT = 1024 * 1024 * 1024  # the flag's own bound: Slack's 1 GB
UPLOAD_CHUNK_BYTES = 64 * 1024  # read and written a chunk at a time: the memory one upload holds
UPLOAD_DEADLINE_S = 600.0  # a whole upload: 50 MiB at 85 KB/s
MAX_UPLOADS_IN_FLIGHT = 16  # uploads streaming at once (each holds a socket and a file descriptor)
# One user's uploads streaming at once: a quarter of the slots, so that one user trickling a byte a
# read timeout into each of its pending files' URLs cannot hold every slot for UPLOAD_DEADLINE_S.
MAX_UPLOADS_IN_FLIGHT_PER_USER = 4
MULTIPART_SLACK_BYTES = 64 * 1024  # what a multipart body may carry besides the file (its heads)
MAX_MULTIPART_PARTS = 8  # parts looked at for the file before the body is refused
SWEEP_INTERVAL_S = 60.0  # how often files never completed are looked for
SWEEP_BATCH = 200  # files removed per sweep at most (the rest at the next)
TICKET = re.compile(r"[A-Za-z0-9_-]{43}")  # secrets.token_urlsafe(32)
FILE_KEY = re.compile(r"(T[0-9A-Z]{1,20})-(F[0-9A-F]{16})")
FILE_CSP = "sandbox; default-src 'none'"
# Free space the files must leave on the data directory's filesystem (--min-free-disk-bytes): what
# the database needs to keep committing posts (under 1 KB a message, measured: 1 GiB is about a
# million more, and the WAL between checkpoints), in bytes rather than a share of the disk because
# that need does not grow with the disk. 0: files may fill the disk.
MIN_FREE_DISK_BYTES = 1024**3
MAX_STORAGE_FLAG_BYTES = 1024**5  # the storage flags' own bound: 1 PiB
STORAGE_REFUSED = "storage_limit_reached"  # Slack's code (files.upload's) when no more may be stored
DISK_WARNING_INTERVAL_S = 60.0  # the warning of uploads refused for the disk's reserve: once a minute at most


def disk_free_bytes(path: Path) -> int:
    """The bytes an unprivileged process may still write on ``path``'s filesystem (``statvfs``)."""
    stats = os.statvfs(path)
    return stats.f_bavail * stats.f_frsize


def add_file_flags(parser: Parser) -> None:
    """The webapp's flags of files (webapp_stub/file_transfer.py)."""
    parser.add(
        "--max-file-bytes",
        MAX_FILE_BYTES,
        "largest file uploaded (files.getUploadURLExternal's length; Slack's limit is 1 GB)",
        at_least=1,
        at_most=MAX_FILE_BYTES_LIMIT,
    )
    parser.add(
        "--max-pending-files-per-user",
        file_store.MAX_PENDING_FILES_PER_USER,
        "files one user asked upload URLs for and has not completed, at once (more: ratelimited)",
        at_least=1,
        at_most=10_000,
    )
    parser.add(
        "--pending-file-ttl-s",
        file_store.PENDING_FILE_TTL_S,
        "a file not completed (files.completeUploadExternal) this long after its URL was asked for is removed",
        above=0.0,
        at_most=7 * 86400.0,
    )
    parser.add(
        "--max-file-storage-bytes-per-user",
        file_store.MAX_FILE_STORAGE_BYTES_PER_USER,
        "bytes of one user's files, complete and pending (more: storage_limit_reached)",
        at_least=1,
        at_most=MAX_STORAGE_FLAG_BYTES,
    )
    parser.add(
        "--min-free-disk-bytes",
        MIN_FREE_DISK_BYTES,
        "free bytes an upload must leave on the data directory's filesystem, for the database (0: none)",
        at_least=0,
        at_most=MAX_STORAGE_FLAG_BYTES,
    )


class WebApiParts(Protocol):
    """What of :class:`webapp_stub.api.WebApi` the files' HTTP side uses (api.py imports this module)."""

    store: Store
    public_url: str
    limiter: RateLimiter
    metrics: ServiceMetrics

    def clock(self) -> float: ...

    async def durable(self) -> None: ...

    def count_request(self, method: str, outcome: str) -> None: ...

    def observe_latency(self, method: str, seconds: float) -> None: ...


class UploadRefused(Exception):
    """An upload answered with ``status`` and Slack-like ``code`` (counted in rtm_errors_total)."""

    def __init__(self, status: int, code: str) -> None:
        super().__init__(code)
        self.status, self.code = status, code


class FileService:
    """The files' directory, limits and HTTP routes; the sweep of files never completed."""

    def __init__(
        self,
        api: WebApiParts,
        data_dir: str,
        *,
        max_file_bytes: int = MAX_FILE_BYTES,
        max_pending_per_user: int = file_store.MAX_PENDING_FILES_PER_USER,
        pending_ttl_s: float = file_store.PENDING_FILE_TTL_S,
        read_timeout_s: float = 30.0,
        max_storage_per_user: int = file_store.MAX_FILE_STORAGE_BYTES_PER_USER,
        min_free_disk_bytes: int = MIN_FREE_DISK_BYTES,
        free_bytes: Callable[[Path], int] = disk_free_bytes,
    ) -> None:
        self.api = api
        self.directory = file_store.files_dir(data_dir)
        self.max_file_bytes = max_file_bytes
        self.max_pending_per_user = max_pending_per_user
        self.pending_ttl_s = pending_ttl_s
        self.read_timeout_s = read_timeout_s
        self.max_storage_per_user = max_storage_per_user
        self.min_free_disk_bytes = min_free_disk_bytes
        self.free_bytes = free_bytes  # statvfs, or a test's stand-in
        self._disk_warned_at = -DISK_WARNING_INTERVAL_S
        self.own_url = ""  # http://<advertised host>:<port>, set by app.py once the port is known
        self.uploading: dict[str, str] = {}  # file id -> its user: bytes arriving now (never swept under them)

    def routes(self) -> list[web.RouteDef]:
        return [
            web.post("/upload/v1/{ticket}", self.handle_upload),
            web.get("/files-pri/{key}/download/{name}", self.handle_download),
            web.get("/files-pri/{key}/{name}", self.handle_download),
        ]

    def base_url(self, request: web.Request | None) -> str:
        """The webapp's public URL (``--public-url``), else the request's own scheme and host."""
        if self.api.public_url or request is None:
            return self.api.public_url
        return f"{request.scheme}://{request.host}"

    def stored_base_url(self) -> str:
        """The base of URLs that are stored and shown to others (a file message's objects):
        ``--public-url``, else the webapp's own address; never a request's Host header."""
        return self.api.public_url or self.own_url

    # -- storage --------------------------------------------------------------------------------
    def over_quota(self, user: str, adding: int) -> bool:
        """Whether ``adding`` more bytes take ``user``'s files past --max-file-storage-bytes-per-user
        (complete and pending files counted, :func:`file_store.storage_used`)."""
        used = file_store.storage_used(self.api.store.conn, user, self.api.clock())
        return used + adding > self.max_storage_per_user

    def disk_room(self, remaining: int) -> bool:
        """Whether ``remaining`` more bytes leave --min-free-disk-bytes free for the database; a
        refusal is logged as a warning once a minute at most."""
        free = self.free_bytes(self.directory)
        if free - remaining >= self.min_free_disk_bytes:
            return True
        now = time.monotonic()
        if now - self._disk_warned_at >= DISK_WARNING_INTERVAL_S:
            self._disk_warned_at = now
            log.warning(
                "upload refused: %d bytes free on the files' disk, %d more would leave less than --min-free-disk-bytes %d",
                free,
                remaining,
                self.min_free_disk_bytes,
            )
        return False

    # -- upload ---------------------------------------------------------------------------------
    async def handle_upload(self, request: web.Request) -> web.Response:
        started = time.perf_counter()
        try:
            size = await self._upload(request)
        except UploadRefused as refused:
            self._count("files.upload", refused.code, started)
            return web.json_response({"ok": False, "error": refused.code}, status=refused.status)
        self._count("files.upload", "ok", started)
        return web.Response(text=f"OK - {size}")

    async def _upload(self, request: web.Request) -> int:
        """Claim the ticket, stream the body to disk, mark the file uploaded; the bytes received."""
        if len(self.uploading) >= MAX_UPLOADS_IN_FLIGHT:
            raise UploadRefused(503, "too_many_uploads")
        row = self._claim(request.match_info["ticket"])
        self.uploading[row.id] = row.user
        part = self.directory / f"{row.id}.part"
        try:
            # checked again as the bytes arrive: the flags may be lower since the URL was handed out
            if self.over_quota(row.user, 0) or not self.disk_room(row.length):
                raise UploadRefused(507, STORAGE_REFUSED)
            async with asyncio.timeout(UPLOAD_DEADLINE_S):
                size = await self._receive(request, row.length, part)
            await asyncio.to_thread(_publish_blob, part, file_store.blob_path(self.directory, row.id))
        except BaseException as exc:
            part.unlink(missing_ok=True)
            ours = self._mark_failed(row.id)
            if isinstance(exc, UploadRefused):
                raise
            if not ours and isinstance(exc, Exception):  # deleted under way: its part file went with it
                raise UploadRefused(404, "upload_url_expired") from exc
            if isinstance(exc, (TimeoutError, ConnectionError, asyncio.IncompleteReadError)):
                raise UploadRefused(408, "request_timeout") from exc
            if isinstance(exc, OSError):
                log.error("writing file %s failed", row.id, exc_info=exc)
                raise UploadRefused(500, "file_write_failed") from exc
            raise
        finally:
            self.uploading.pop(row.id, None)
        with self.api.store.transaction() as db:
            kept = db.execute(
                "UPDATE files SET state = 'uploaded', size = ? WHERE id = ? AND state = 'uploading'", (size, row.id)
            ).rowcount
        if not kept:  # its row went meanwhile (not by the sweep, which skips uploads under way): no bytes without it
            self.remove_bytes(row.id)
            raise UploadRefused(404, "upload_url_expired")
        await self.api.durable()
        return size

    def _claim(self, ticket: str) -> file_store.FileRow:
        """The file whose URL carries ``ticket``, now ``uploading`` (the ticket used up). Raises
        404 ``invalid_upload_url`` (unknown, used, expired), 429 ``too_many_uploads`` (its user's
        uploads already streaming: the ticket stays good)."""
        if not TICKET.fullmatch(ticket):
            raise UploadRefused(404, "invalid_upload_url")
        store = self.api.store
        with store.transaction() as db:
            found = db.execute(
                "SELECT id, ticket_expires, user FROM files WHERE ticket_hash = ? AND state = 'waiting'",
                (file_store.ticket_hash(ticket),),
            ).fetchone()
            if found is None:
                raise UploadRefused(404, "invalid_upload_url")
            if list(self.uploading.values()).count(found[2]) >= MAX_UPLOADS_IN_FLIGHT_PER_USER:
                raise UploadRefused(429, "too_many_uploads")
            now = self.api.clock()
            expired = found[1] < now  # used up all the same, and the file removed at the next sweep
            state, expires = ("failed", now) if expired else ("uploading", None)
            db.execute(
                "UPDATE files SET state = ?, ticket_hash = NULL, expires_at = coalesce(?, expires_at) WHERE id = ?",
                (state, expires, found[0]),
            )
        if expired:
            raise UploadRefused(404, "upload_url_expired")
        row = file_store.get(store.conn, str(found[0]))
        assert row is not None
        return row

    def _mark_failed(self, file_id: str) -> bool:
        """The file ``failed`` (removed by the next sweep) if it is still ``uploading``; False if it is
        not: ``files.delete`` took it meanwhile, and its row stays ``deleted`` (finding 15)."""
        try:
            with self.api.store.transaction() as db:
                return bool(
                    db.execute(
                        "UPDATE files SET state = 'failed', expires_at = ? WHERE id = ? AND state = 'uploading'",
                        (self.api.clock(), file_id),
                    ).rowcount
                )
        except Exception:  # a failing database: the sweep takes the row once its time is up
            return True

    async def _receive(self, request: web.Request, length: int, part: Path) -> int:
        """The file's bytes into ``part``: exactly ``length`` of them, else refused."""
        declared = request.content_length
        multipart = request.content_type.startswith("multipart/")
        if declared is not None and declared > length + (MULTIPART_SLACK_BYTES if multipart else 0):
            raise UploadRefused(413, "file_too_large")
        chunks = self._multipart_chunks(request) if multipart else self._raw_chunks(request)
        size = 0
        fd = os.open(part, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o600)
        try:
            async for chunk in chunks:
                if not self.disk_room(length - size):  # the disk filled by something else meanwhile
                    raise UploadRefused(507, STORAGE_REFUSED)
                size += len(chunk)
                if size > length:
                    raise UploadRefused(413, "file_too_large")
                view = memoryview(chunk)
                while view:
                    view = view[os.write(fd, view) :]
        finally:
            os.close(fd)
        if size != length:
            raise UploadRefused(400, "length_mismatch")
        return size

    async def _raw_chunks(self, request: web.Request) -> AsyncIterator[bytes]:
        while chunk := await asyncio.wait_for(request.content.readany(), self.read_timeout_s):
            yield chunk

    async def _multipart_chunks(self, request: web.Request) -> AsyncIterator[bytes]:
        """The first part with a filename (curl's ``-F file=@x``, Slack's ``-F filename=@x``)."""
        try:
            reader = await request.multipart()
            for _ in range(MAX_MULTIPART_PARTS):
                part = await asyncio.wait_for(reader.next(), self.read_timeout_s)
                if part is None:
                    break
                if isinstance(part, BodyPartReader) and part.filename is not None:
                    while chunk := await asyncio.wait_for(part.read_chunk(UPLOAD_CHUNK_BYTES), self.read_timeout_s):
                        yield chunk
                    return
                await asyncio.wait_for(part.release(), self.read_timeout_s)
        except (ValueError, HttpProcessingError):  # aiohttp's for a body that is no multipart form, or a
            raise UploadRefused(400, "invalid_form_data") from None  # part's header past its 8,190 bytes
        raise UploadRefused(400, "no_file_data")

    # -- download -------------------------------------------------------------------------------
    async def handle_download(self, request: web.Request) -> web.StreamResponse:
        started = time.perf_counter()
        try:
            row = self._downloadable(request)
        except ApiError as exc:
            self._count("files.download", exc.code, started)
            status = exc.status if exc.status != 200 else 401 if exc.code in ("not_authed", "invalid_auth") else 404
            return web.json_response({"ok": False, "error": exc.code}, status=status, headers=exc.headers)
        self._count("files.download", "ok", started)
        inline = "/download/" not in request.path and row.mimetype in file_store.INLINE_TYPES
        content_type = row.mimetype + ("; charset=utf-8" if row.mimetype.startswith("text/") else "")
        headers = {
            "Content-Type": content_type,
            "Content-Disposition": _disposition("inline" if inline else "attachment", row.name),
            "X-Content-Type-Options": "nosniff",
            "Content-Security-Policy": FILE_CSP,
            "Cross-Origin-Resource-Policy": "same-origin",
            "Referrer-Policy": "no-referrer",
            "Cache-Control": "private, no-cache",
        }
        return web.FileResponse(file_store.blob_path(self.directory, row.id), headers=headers)

    def _downloadable(self, request: web.Request) -> file_store.FileRow:
        """The file the request names, if its bearer may read it and its bytes are here. Raises
        ApiError: ``not_authed``, ``invalid_auth``, ``ratelimited`` (429), ``file_not_found``."""
        match = FILE_KEY.fullmatch(request.match_info["key"])
        auth = request.headers.get("Authorization", "")
        token = auth[7:].strip() if auth[:7].lower() == "bearer " else ""
        if not token:
            raise ApiError("not_authed")
        user = self.api.store.auth(token)
        if user is None:
            raise ApiError("invalid_auth")
        wait_s = self.api.limiter.retry_after(token, "files.download")
        if wait_s:
            raise ApiError("ratelimited", status=429, headers={"Retry-After": str(wait_s)})
        if match is None or match.group(1) != user.team:
            raise ApiError("file_not_found")
        row = file_store.readable(self.api.store.conn, match.group(2), user)
        if row.state not in ("uploaded", "complete"):
            raise ApiError("file_not_found")
        return row

    def _count(self, label: str, outcome: str, started: float) -> None:
        self.api.count_request(label, outcome)
        self.api.observe_latency(label, time.perf_counter() - started)
        if outcome != "ok":
            self.api.metrics.error(outcome)

    # -- the bytes' removal ---------------------------------------------------------------------
    def remove_bytes(self, file_id: str) -> None:
        """Unlink the file's bytes (and a part file), if any."""
        for path in (file_store.blob_path(self.directory, file_id), self.directory / f"{file_id}.part"):
            path.unlink(missing_ok=True)

    async def sweep_loop(self) -> None:
        """Every :data:`SWEEP_INTERVAL_S`, remove the files whose time to be completed is up."""
        while True:
            await asyncio.sleep(SWEEP_INTERVAL_S)
            try:
                await self.sweep()
            except Exception:  # a locked or failing database: next time
                log.exception("removing files never completed failed")

    async def sweep(self) -> int:
        """Remove (row, then bytes once that is durable) up to :data:`SWEEP_BATCH` expired files."""
        now = self.api.clock()
        with self.api.store.transaction() as db:
            gone = [f for f in file_store.expired_pending(db, now, SWEEP_BATCH) if f not in self.uploading]
            db.executemany("DELETE FROM files WHERE id = ? AND expires_at <= ?", [(f, now) for f in gone])
        await self.api.durable()
        for file_id in gone:
            self.remove_bytes(file_id)
        return len(gone)


def _publish_blob(part: Path, final: Path) -> None:
    """``part`` fsynced and renamed to ``final``, the directory fsynced (on a thread: off the loop)."""
    fd = os.open(part, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(part, final)
    dir_fd = os.open(final.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def _disposition(kind: str, name: str) -> str:
    """``attachment; filename="<ASCII>"; filename*=UTF-8''<name>`` (RFC 6266): no quote, backslash,
    control character or non-ASCII in the plain form."""
    plain = "".join(ch if ch.isascii() and ch.isprintable() and ch not in '"\\;' else "_" for ch in name) or "file"
    return f"{kind}; filename=\"{plain}\"; filename*=UTF-8''{quote(name, safe='')}"
