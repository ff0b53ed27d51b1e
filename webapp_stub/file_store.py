"""Files: their rows in SQLite (``files``, ``file_shares``), their bytes on disk, who may read them,
and Slack's file object (docs/slack-compat.md, "Files").

A file is born by ``files.getUploadURLExternal`` (state ``waiting``: a row with the SHA-256 of its
upload ticket), gets its bytes by one POST to its upload URL (``uploading`` while they arrive,
then ``uploaded``; webapp_stub/file_transfer.py), is shared by ``files.completeUploadExternal``
(``complete``; one ``file_shares`` row per message that carries it) and ends by ``files.delete``
(``deleted``: the row stays so that later calls answer ``file_deleted``, the bytes go). A file not
complete :data:`PENDING_FILE_TTL_S` after it was asked for is removed, row and bytes
(:func:`expired_pending`).

On disk: ``DATA_DIR/files/`` (0700), one file per upload named by its file id (``F`` and hex
digits, made here: never from user input), 0600, written as ``<id>.part`` and renamed once whole
and fsynced.

Who may read a file (docs/authz-review.md, "Files"): its uploader; anyone of its team who may read
a conversation it is shared in: a public channel for a user token, any conversation the reader is
a member of (a bot token reads only conversations its bot is in, as ``conversations.history``).
Another team never. One SQL condition, :data:`_READABLE`, decides it for ``files.info``,
``files.list`` and the downloads.
"""

from __future__ import annotations

import hashlib
import os
import re
import sqlite3
import unicodedata
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from webapp_stub.errors import ApiError
from webapp_stub.models import User

FILES_DIR = "files"
# A file never completed (files.completeUploadExternal) is removed this long after its URL was
# asked for: an hour, room for a slow upload of the largest file and the call after it.
PENDING_FILE_TTL_S = 3600.0
# The upload ticket in the URL: single use, and good for this long after it was handed out.
UPLOAD_TICKET_TTL_S = 600.0
# Files asked for and not complete, per user, at once (their bytes are on disk until they expire).
MAX_PENDING_FILES_PER_USER = 20
# The bytes of one user's files, complete and pending (--max-file-storage-bytes-per-user): files
# never expire, so without it one user fills the webapp's disk 50 MiB at a time.
MAX_FILE_STORAGE_BYTES_PER_USER = 1024**3
# A file's name and title: characters, no control or bidi-override characters.
MAX_FILENAME_CHARS = 255
MAX_TITLE_CHARS = 255
MAX_ALT_TXT_CHARS = 1000  # Slack's: "longer than the limit of 1000 character" is alt_txt_too_large
FILE_ID = re.compile(r"F[0-9A-F]{16}")
_URL_UNSAFE = re.compile(r"[^A-Za-z0-9._-]")

# The content types a file is served with, by its extension, and nothing else: anything not here
# is served as application/octet-stream. No type a browser runs (HTML, SVG, XML, JavaScript) is
# here; images may be shown inline, everything else is an attachment (file_transfer.py).
SERVED_TYPES: dict[str, tuple[str, str]] = {
    "png": ("image/png", "PNG"),
    "jpg": ("image/jpeg", "JPEG"),
    "jpeg": ("image/jpeg", "JPEG"),
    "gif": ("image/gif", "GIF"),
    "webp": ("image/webp", "WebP"),
    "txt": ("text/plain", "Plain Text"),
    "csv": ("text/csv", "CSV"),
    "md": ("text/plain", "Markdown (raw)"),
    "log": ("text/plain", "Plain Text"),
    "json": ("application/json", "JSON"),
    "pdf": ("application/pdf", "PDF"),
    "zip": ("application/zip", "Zip"),
    "gz": ("application/gzip", "GZip"),
    "mp3": ("audio/mpeg", "MP3"),
    "mp4": ("video/mp4", "MPEG 4 Video"),
}
OCTET_STREAM = "application/octet-stream"
INLINE_TYPES = frozenset({"image/png", "image/jpeg", "image/gif", "image/webp"})

FILES_SCHEMA = """
CREATE TABLE IF NOT EXISTS files (
    id TEXT PRIMARY KEY,
    team TEXT NOT NULL,
    user TEXT NOT NULL,
    name TEXT NOT NULL,
    title TEXT NOT NULL,
    alt_txt TEXT,
    length INTEGER NOT NULL,
    size INTEGER,
    state TEXT NOT NULL,
    ticket_hash TEXT,
    ticket_expires REAL NOT NULL,
    created INTEGER NOT NULL,
    expires_at REAL
) WITHOUT ROWID;
CREATE UNIQUE INDEX IF NOT EXISTS files_ticket ON files (ticket_hash) WHERE ticket_hash IS NOT NULL;
CREATE INDEX IF NOT EXISTS files_user ON files (user, state);
CREATE INDEX IF NOT EXISTS files_expiry ON files (expires_at) WHERE expires_at IS NOT NULL;
CREATE TABLE IF NOT EXISTS file_shares (
    file TEXT NOT NULL,
    channel TEXT NOT NULL,
    ts TEXT NOT NULL,
    PRIMARY KEY (file, channel, ts)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS file_shares_channel ON file_shares (channel, file);
"""

# Whether the caller (team, id, is_bot, id) may read file ``f``: its uploader, or a conversation of
# its team it is shared in that the caller may read (as conversations.history reads).
_READABLE = (
    "f.team = ? AND (f.user = ? OR EXISTS (SELECT 1 FROM file_shares s JOIN channels c ON c.id = s.channel "
    "WHERE s.file = f.id AND c.team = f.team AND ((c.kind = 'channel' AND c.is_private = 0 AND ? = 0) "
    "OR EXISTS (SELECT 1 FROM members mb WHERE mb.channel = c.id AND mb.user = ?))))"
)
_COLUMNS = "id, team, user, name, title, alt_txt, length, size, state, created"


@dataclass(frozen=True)
class FileRow:
    """One row of ``files``."""

    id: str
    team: str
    user: str
    name: str
    title: str
    alt_txt: str | None
    length: int
    size: int | None
    state: str
    created: int

    @property
    def extension(self) -> str:
        stem, dot, ext = self.name.rpartition(".")
        return ext.lower() if dot and stem and ext.isascii() and ext.isalnum() and len(ext) <= 10 else ""

    @property
    def mimetype(self) -> str:
        """The one content type the file is served with (:data:`SERVED_TYPES`)."""
        return SERVED_TYPES.get(self.extension, (OCTET_STREAM, ""))[0]


def ticket_hash(ticket: str) -> str:
    """What the row keeps of an upload ticket: its SHA-256 (a stolen database holds no live URL)."""
    return hashlib.sha256(ticket.encode()).hexdigest()


def check_name(value: str | None, limit: int, *, required: bool) -> str:
    """A file name or title: at most ``limit`` characters, no control, format (bidi overrides,
    zero-width) or surrogate characters, not blank if ``required``. Raises ``invalid_arguments``."""
    text = (value or "").strip()
    if required and not text:
        raise ApiError("invalid_arguments")
    if len(text) > limit or any(unicodedata.category(ch) in ("Cc", "Cf", "Cs", "Zl", "Zp") for ch in text):
        raise ApiError("invalid_arguments")
    return text


def files_dir(data_dir: str | os.PathLike[str]) -> Path:
    """``DATA_DIR/files``, made 0700 if missing (and made 0700 again if it is not)."""
    path = Path(data_dir) / FILES_DIR
    path.mkdir(mode=0o700, exist_ok=True)
    if path.stat().st_mode & 0o077:
        path.chmod(0o700)
    return path


def blob_path(directory: Path, file_id: str) -> Path:
    """The bytes of ``file_id`` (checked against :data:`FILE_ID`: never a path from outside)."""
    if not FILE_ID.fullmatch(file_id):
        raise ValueError(f"not a file id: {file_id!r}")
    return directory / file_id


def url_name(name: str) -> str:
    """The name as the last segment of the file's URLs: what is not ``[A-Za-z0-9._-]`` becomes ``_``
    (the name is decoration there: the route reads the file id only)."""
    return _URL_UNSAFE.sub("_", name).strip(".") or "file"


def get(conn: sqlite3.Connection, file_id: str) -> FileRow | None:
    row = conn.execute(f"SELECT {_COLUMNS} FROM files WHERE id = ?", (file_id,)).fetchone()
    return FileRow(*row) if row else None


def readable(conn: sqlite3.Connection, file_id: str, me: User) -> FileRow:
    """The file ``me`` may read (complete or not: a file not yet shared only to its uploader).
    Raises ``file_not_found`` (also for what ``me`` may not read) or ``file_deleted``."""
    row = conn.execute(
        f"SELECT {_COLUMNS.replace('id,', 'f.id,', 1)} FROM files f WHERE f.id = ? AND {_READABLE}",
        (file_id, me.team, me.id, int(me.is_bot), me.id),
    ).fetchone()
    if row is None:
        raise ApiError("file_not_found")
    found = FileRow(*row)
    if found.state == "deleted":
        raise ApiError("file_deleted")
    return found


def list_readable(
    conn: sqlite3.Connection, me: User, filters: list[tuple[str, Any]], count: int, page: int
) -> tuple[list[FileRow], int]:
    """The complete files ``me`` may read, newest first, one page: (rows, total). ``filters``:
    SQL conditions on ``f`` with one parameter each."""
    where = " AND ".join([f"f.state = 'complete' AND {_READABLE}", *(clause for clause, _ in filters)])
    params = [me.team, me.id, int(me.is_bot), me.id, *(value for _, value in filters)]
    total = int(conn.execute(f"SELECT count(*) FROM files f WHERE {where}", params).fetchone()[0])
    rows = conn.execute(
        f"SELECT {_COLUMNS.replace('id,', 'f.id,', 1)} FROM files f WHERE {where} "
        "ORDER BY f.created DESC, f.id DESC LIMIT ? OFFSET ?",
        [*params, count, (page - 1) * count],
    ).fetchall()
    return [FileRow(*row) for row in rows], total


def reads_conversation(conn: sqlite3.Connection, channel: str, me: User) -> bool:
    """Whether ``me`` may read ``channel``'s files as :data:`_READABLE` reads them: a public channel of
    its team (a user token), or a conversation it is a member of."""
    found = conn.execute("SELECT kind, is_private, team FROM channels WHERE id = ?", (channel,)).fetchone()
    if found is None or found[2] != me.team:
        return False
    return (found[0] == "channel" and not found[1] and not me.is_bot) or _member(conn, channel, me.id)


def shares(conn: sqlite3.Connection, file_id: str) -> list[tuple[str, str]]:
    """(channel, ts) of every message that carries the file, oldest first."""
    rows = conn.execute("SELECT channel, ts FROM file_shares WHERE file = ? ORDER BY ts", (file_id,))
    return [(str(channel), str(ts)) for channel, ts in rows]


def pending_count(conn: sqlite3.Connection, user: str, now: float) -> int:
    """Files ``user`` asked for that are not complete and not expired."""
    row = conn.execute(
        "SELECT count(*) FROM files WHERE user = ? AND state IN ('waiting', 'uploading', 'uploaded') AND expires_at > ?",
        (user, now),
    ).fetchone()
    return int(row[0])


def storage_used(conn: sqlite3.Connection, user: str, now: float) -> int:
    """The bytes ``user``'s files take or may take: complete files by their size, files asked for
    and not expired by the ``length`` their URL was asked with (deleted, failed and expired: none)."""
    row = conn.execute(
        "SELECT coalesce(sum(coalesce(size, length)), 0) FROM files WHERE user = ? AND (state = 'complete' "
        "OR (state IN ('waiting', 'uploading', 'uploaded') AND expires_at > ?))",
        (user, now),
    ).fetchone()
    return int(row[0])


def expired_pending(conn: sqlite3.Connection, now: float, limit: int) -> list[str]:
    """Up to ``limit`` files never completed whose time is up (their rows and bytes to remove)."""
    rows = conn.execute(
        "SELECT id FROM files WHERE expires_at IS NOT NULL AND expires_at <= ? ORDER BY expires_at LIMIT ?",
        (now, limit),
    )
    return [str(row[0]) for row in rows]


def file_object(row: FileRow, base_url: str, conn: sqlite3.Connection, viewer: User | None) -> dict[str, Any]:
    """Slack's file object (docs.slack.dev/reference/objects/file-object) for ``viewer``: the
    conversations it is shared in that the viewer may see (all of them for ``None``, the
    uploader's message)."""
    ext = row.extension
    mimetype, pretty = SERVED_TYPES.get(ext, (OCTET_STREAM, "Binary"))
    quoted = url_name(row.name)
    url = f"{base_url}/files-pri/{row.team}-{row.id}/{quoted}"
    channels: list[str] = []
    groups: list[str] = []
    ims: list[str] = []
    is_public = False
    for channel, _ts in shares(conn, row.id):
        found = conn.execute("SELECT kind, is_private FROM channels WHERE id = ?", (channel,)).fetchone()
        if found is None:
            continue
        kind, private = found
        if viewer is not None and (private or viewer.is_bot) and not _member(conn, channel, viewer.id):
            continue
        target = ims if kind == "im" else groups if private else channels
        if channel not in target:
            target.append(channel)
        is_public = is_public or not private
    obj: dict[str, Any] = {
        "id": row.id,
        "created": row.created,
        "timestamp": row.created,
        "name": row.name,
        "title": row.title or row.name,
        "mimetype": mimetype,
        "filetype": ext or "binary",
        "pretty_type": pretty,
        "user": row.user,
        "user_team": row.team,
        "editable": False,
        "size": row.size if row.size is not None else row.length,
        "mode": "hosted",
        "is_external": False,
        "external_type": "",
        "is_public": is_public,
        "public_url_shared": False,
        "display_as_bot": False,
        "username": "",
        "url_private": url,
        "url_private_download": f"{base_url}/files-pri/{row.team}-{row.id}/download/{quoted}",
        "channels": channels,
        "groups": groups,
        "ims": ims,
        "comments_count": 0,
        "has_rich_preview": False,
    }
    if row.alt_txt:
        obj["alt_txt"] = row.alt_txt
    return obj


def _member(conn: sqlite3.Connection, channel: str, user: str) -> bool:
    return conn.execute("SELECT 1 FROM members WHERE channel = ? AND user = ?", (channel, user)).fetchone() is not None
