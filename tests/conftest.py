from __future__ import annotations

from pathlib import Path

import pytest

from tests.support import FleetCA


@pytest.fixture
def fleet_ca(tmp_path: Path) -> FleetCA:
    """A fleet CA in a temporary directory: ``fleet_ca.trust(service, instance)`` gives credentials."""
    return FleetCA(tmp_path / "tls")
