"""Secret files: mode 0600 from creation, never widened, never chmod-ed afterwards."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from services.secret_file import (
    create_secret_file,
    ensure_private_dir,
    ensure_secret_file,
    new_token,
    replace_secret_file,
)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture(autouse=True)
def permissive_umask() -> object:
    """A umask that would leave an ordinary file world-readable: the mode must not depend on it."""
    old = os.umask(0o000)
    try:
        yield None
    finally:
        os.umask(old)


def test_create_makes_0600_and_refuses_to_overwrite(tmp_path: Path) -> None:
    path = tmp_path / "token"
    create_secret_file(path, "s3cret\n")
    assert mode(path) == 0o600 and path.read_text() == "s3cret\n"
    with pytest.raises(FileExistsError):
        create_secret_file(path, "other\n")
    assert path.read_text() == "s3cret\n"


def test_replace_is_atomic_and_0600_even_over_a_world_readable_file(tmp_path: Path) -> None:
    path = tmp_path / "seed.json"
    path.write_text("{}")
    path.chmod(0o644)
    replace_secret_file(path, '{"users": []}')
    assert mode(path) == 0o600 and path.read_text() == '{"users": []}'
    assert [p.name for p in tmp_path.iterdir()] == ["seed.json"]  # no temporary left behind


def test_ensure_creates_once_then_reuses(tmp_path: Path) -> None:
    path = tmp_path / "secret"
    first = ensure_secret_file(path)
    assert mode(path) == 0o600 and len(first) >= 40
    assert ensure_secret_file(path, lambda: "never used") == first
    assert new_token() != new_token()


def test_ensure_refuses_an_empty_file(tmp_path: Path) -> None:
    path = tmp_path / "secret"
    create_secret_file(path, "")
    with pytest.raises(ValueError, match="empty"):
        ensure_secret_file(path)


def test_private_dir_is_0700(tmp_path: Path) -> None:
    ensure_private_dir(tmp_path / "a" / "b")
    assert mode(tmp_path / "a" / "b") == 0o700
