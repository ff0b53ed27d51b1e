"""Fixtures the webapp's component tests share: a fake admin server and the webapp in-process.

A module that needs a different admin server (test_webapp_hardening's refusing one) overrides
``fake_as`` and ``webapp`` with its own.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.webapp_harness import FakeAdminServer, Webapp, start


@pytest.fixture
async def fake_as() -> AsyncIterator[FakeAdminServer]:
    server = FakeAdminServer()
    await server.start()
    yield server
    if server.server is not None:
        await server.kill()


@pytest.fixture
async def webapp(tmp_path: Path, fake_as: FakeAdminServer) -> AsyncIterator[Webapp]:
    app = await start(tmp_path, fake_as)
    yield app
    await app.session.close()
    await app.stop()
