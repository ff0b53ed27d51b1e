"""Files that hold secrets and tokens: created 0600 in one step, never chmod-ed afterwards.

A file written with ``write_text`` and then ``chmod``-ed is readable by
everyone between the two calls (and forever if the process dies between
them). Here the file is created by ``os.open(..., O_CREAT | O_EXCL, 0o600)``:
the mode is the file's from its first byte (the umask can only remove bits).

* :func:`create_secret_file` writes a new file; it fails if one exists.
* :func:`replace_secret_file` writes a temporary file that way and renames
  it over the target (atomic; readers see the old or the new content).
* :func:`ensure_secret_file` returns the content of an existing file, or
  creates it with a fresh value; two processes racing to create it agree on
  one value (the loser reads the winner's).

Which files: the fleet secret, the Consul ACL token, the operator token
(``DATA_DIR/secret``, ``consul-acl-token``, ``operator-token``), ``seed.json``
(user tokens); see ``docs/consul-acl.md``, "Secrets hygiene".
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Callable
from pathlib import Path

SECRET_FILE_MODE = 0o600
SECRET_DIR_MODE = 0o700
TOKEN_BYTES = 32  # 256 bits of randomness in every generated secret or token


def new_token() -> str:
    """A fresh random token (URL-safe text, :data:`TOKEN_BYTES` of randomness)."""
    return secrets.token_urlsafe(TOKEN_BYTES)


def create_secret_file(path: Path, content: str) -> None:
    """Create ``path`` with mode 0600 and ``content``; raises FileExistsError if it exists."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, SECRET_FILE_MODE)
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        fh.write(content)


def replace_secret_file(path: Path, content: str) -> None:
    """Write ``content`` to ``path`` (mode 0600) atomically, replacing any file there."""
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    create_secret_file(tmp, content)
    try:
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


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
