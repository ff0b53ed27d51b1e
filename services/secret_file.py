"""Files that hold secrets and tokens: created 0600 in one step, never chmod-ed afterwards.

A file written with ``write_text`` and then ``chmod``-ed is readable by
everyone between the two calls (and forever if the process dies between
them). Here the file is created by ``os.open(..., O_CREAT | O_EXCL, 0o600)``:
the mode is the file's from its first byte (the umask can only remove bits).

* :func:`create_secret_file` writes a new file; it fails if one exists.
* :func:`replace_secret_file` writes a temporary file that way, fsyncs it,
  renames it over the target (atomic; readers see the old or the new content)
  and fsyncs the directory (a crash leaves the old file or the whole new one).
* :func:`ensure_secret_file` returns the content of an existing file, or
  creates it with a fresh value; two processes racing to create it agree on
  one value (the loser reads the winner's).

A :class:`FileAccess` says who may read a file made for another user (the
deploy/ containers run as uid 10001): its owner (``os.fchown`` on the open
descriptor, before the first byte is written and before the file gets its
name; needs root) and its mode (0600, or 0640 for a group-readable file),
both set at creation, never afterwards.

Which files: the fleet secret, the Consul ACL token, the operator token
(``DATA_DIR/secret``, ``consul-acl-token``, ``operator-token``), ``seed.json``
(user tokens); see ``docs/consul-acl.md``, "Secrets hygiene".
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

SECRET_FILE_MODE = 0o600
SECRET_DIR_MODE = 0o700
GROUP_READABLE_FILE_MODE = 0o640
TOKEN_BYTES = 32  # 256 bits of randomness in every generated secret or token


@dataclass(frozen=True, slots=True)
class FileAccess:
    """The mode and (optionally) owner a secret file is created with (see the module doc)."""

    mode: int = SECRET_FILE_MODE
    uid: int | None = None  # None: the creating process's
    gid: int | None = None

    def __post_init__(self) -> None:
        if self.mode not in (SECRET_FILE_MODE, GROUP_READABLE_FILE_MODE):
            raise ValueError(f"a secret file is 0600 or 0640, not {self.mode:#o}")


PRIVATE = FileAccess()


def new_token() -> str:
    """A fresh random token (URL-safe text, :data:`TOKEN_BYTES` of randomness)."""
    return secrets.token_urlsafe(TOKEN_BYTES)


def create_secret_file(path: Path, content: str, access: FileAccess = PRIVATE) -> None:
    """Create ``path`` with mode 0600 (or ``access``) and ``content``; raises FileExistsError if it exists.

    The mode is given to ``os.open`` (the umask can only remove bits: a
    group-readable file needs a umask without 040); the owner is set on the
    descriptor before anything is written. Raises PermissionError if
    ``access`` names an owner and this process may not give files away."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, access.mode)
    try:
        if access.uid is not None or access.gid is not None:
            os.fchown(fd, -1 if access.uid is None else access.uid, -1 if access.gid is None else access.gid)
    except BaseException:
        os.close(fd)
        path.unlink(missing_ok=True)
        raise
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        fh.write(content)
        fh.flush()
        os.fsync(fh.fileno())  # on disk before it is renamed over anything (replace_secret_file)


def replace_secret_file(path: Path, content: str, access: FileAccess = PRIVATE) -> None:
    """Write ``content`` to ``path`` (mode 0600, or ``access``) atomically, replacing any file there:
    a temporary file beside it, fsynced, renamed over it, and the directory fsynced."""
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    create_secret_file(tmp, content, access)
    try:
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    directory = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(directory)  # the rename itself
    finally:
        os.close(directory)


def ensure_secret_file(path: Path, make: Callable[[], str] = new_token) -> str:
    """The first line of ``path``; if there is no such file, create it (0600) with ``make()``."""
    try:
        create_secret_file(path, make() + "\n")
    except FileExistsError:
        pass
    with open(path, encoding="utf-8") as fh:
        value = fh.readline().strip()
    if not value:
        raise ValueError(f"{path} is empty; remove it to have a new secret made")
    return value


def ensure_private_dir(path: Path) -> None:
    """Create ``path`` (and parents) with mode 0700 if missing; an existing directory is left as it is."""
    path.mkdir(mode=SECRET_DIR_MODE, parents=True, exist_ok=True)
