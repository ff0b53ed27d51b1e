from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.system.harness import Fleet


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    """The whole fleet, started by ``rtm up`` once per test module."""
    data_dir: Path = tmp_path_factory.mktemp("fleet")
    handle = Fleet.up(data_dir)
    try:
        yield handle
    finally:
        handle.down()
