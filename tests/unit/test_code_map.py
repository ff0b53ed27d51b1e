"""docs/code-map.md names every module of the tree, and names no module that is gone."""

from __future__ import annotations

import re

from tests.support import CODE_PACKAGES
from tests.support import REPO_ROOT as ROOT

CODE_MAP = ROOT / "docs" / "code-map.md"
PACKAGES = (*CODE_PACKAGES, "bench")


def listed_paths() -> set[str]:
    return set(re.findall(r"^- `([\w/.]+\.py)`", CODE_MAP.read_text(), re.M))


def modules() -> set[str]:
    return {str(p.relative_to(ROOT)) for package in PACKAGES for p in (ROOT / package).rglob("*.py")}


def test_every_module_is_on_the_code_map() -> None:
    missing = sorted(modules() - listed_paths())
    assert missing == [], f"add these to docs/code-map.md: {missing}"


def test_the_code_map_lists_no_missing_module() -> None:
    gone = sorted(p for p in listed_paths() if not (ROOT / p).exists())
    assert gone == [], f"docs/code-map.md lists modules that do not exist: {gone}"
