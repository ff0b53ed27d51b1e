"""The house stays in order (issue 11): in the service packages, no function over
:data:`MAX_FUNCTION_LINES` lines, and no module over :data:`MAX_MODULE_LINES` lines
unless its docstring says why it is one module (a paragraph starting with
:data:`REASON_MARK`).

A long function is split into named steps that read as the domain; a long module is
split where it has a seam, else it says at its top why it has none.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

from tests.support import CODE_PACKAGES as PACKAGES  # bench/ and tests/ are not service code
from tests.support import REPO_ROOT as ROOT

MAX_FUNCTION_LINES = 60
MAX_MODULE_LINES = 500
REASON_MARK = "Why one module"

# Pending: files being reshaped on another branch (empty now: every service module is in
# shape). test_pending_entries_are_still_needed fails as soon as an entry is in shape, so
# the list only shrinks.
PENDING: set[str] = set()


@dataclass(frozen=True)
class Finding:
    path: str
    what: str

    def __str__(self) -> str:
        return f"{self.path}: {self.what}"


def findings_in(path: str, source: str) -> list[Finding]:
    """What is out of shape in one module's ``source``."""
    tree = ast.parse(source)
    found = []
    lines = len(source.splitlines())
    docstring = ast.get_docstring(tree) or ""
    if lines > MAX_MODULE_LINES and not any(p.strip().startswith(REASON_MARK) for p in docstring.split("\n\n")):
        found.append(Finding(path, f"{lines} lines, and no '{REASON_MARK} ...' paragraph in its docstring"))
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno is not None:
            length = node.end_lineno - node.lineno + 1
            if length > MAX_FUNCTION_LINES:
                found.append(Finding(path, f"{node.name} (line {node.lineno}) is {length} lines"))
    return found


def service_modules() -> list[Path]:
    return sorted(p for package in PACKAGES for p in (ROOT / package).rglob("*.py"))


def all_findings() -> list[Finding]:
    found = []
    for module in service_modules():
        path = module.relative_to(ROOT).as_posix()
        found += findings_in(path, module.read_text(encoding="utf-8"))
    return found


def test_service_code_is_in_shape() -> None:
    found = [f for f in all_findings() if f.path not in PENDING]
    assert not found, "out of shape (split it, or say why it is one module):\n" + "\n".join(map(str, found))


def test_pending_entries_are_still_needed() -> None:
    out_of_shape = {f.path for f in all_findings()}
    in_shape = sorted(PENDING - out_of_shape)
    assert not in_shape, f"in shape now: remove from PENDING in {Path(__file__).name}: {in_shape}"


def test_the_packages_are_there() -> None:
    assert len(service_modules()) > 100  # a moved package would make the check vacuous


def _function(name: str, body_lines: int) -> str:
    return f"def {name}() -> None:\n" + "    x = 1\n" * body_lines


def test_a_long_function_is_found() -> None:
    source = _function("fits", MAX_FUNCTION_LINES - 1) + _function("too_long", MAX_FUNCTION_LINES)
    assert [f.what for f in findings_in("m.py", source)] == [
        f"too_long (line {MAX_FUNCTION_LINES + 1}) is {MAX_FUNCTION_LINES + 1} lines"
    ]


def test_a_long_module_needs_its_reason() -> None:
    body = "x = 1\n" * MAX_MODULE_LINES
    assert findings_in("m.py", '"""A module."""\n' + body)
    reason = f'"""A module.\n\n{REASON_MARK} of this size: its parts share one lifecycle.\n"""\n'
    assert not findings_in("m.py", reason + body)
    assert not findings_in("m.py", '"""A module."""\n' + body[: -len("x = 1\n")])
