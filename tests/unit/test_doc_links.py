"""Every relative link of README.md and docs/*.md leads somewhere: the file exists (relative to the
page, as GitHub resolves it) and a ``#fragment`` names one of its headings. Before: the seven plots
of docs/benchmarks.md were linked as ``bench/results/...`` (docs/bench/results/, no such folder),
and docs/hardening-webapp.md's link to publish-path.md's round 8 led nowhere (its heading had been
lost when round 9 was written above it)."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^```.*?^```", re.S | re.M)
LINK = re.compile(r"\]\(([^)\s]+)\)")
HEADING = re.compile(r"^#+\s+(.*)$", re.M)


def slugs(page: Path) -> set[str]:
    """The anchors GitHub gives the page's headings: lowercased, punctuation but ``-`` and ``_``
    dropped, spaces as ``-``, a repeated one suffixed ``-1``, ``-2``."""
    seen: dict[str, int] = {}
    out: set[str] = set()
    for title in HEADING.findall(FENCE.sub("", page.read_text())):
        slug = re.sub(r"[^\w\- ]", "", title.strip().lower()).replace(" ", "-")
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        out.add(slug if count == 0 else f"{slug}-{count}")
    return out


def test_every_relative_link_of_the_docs_leads_to_a_file_and_a_heading() -> None:
    broken = []
    for page in PAGES:
        for link in LINK.findall(FENCE.sub("", page.read_text())):
            if link.startswith(("http://", "https://", "mailto:")):
                continue
            target, _, fragment = link.partition("#")
            path = (page.parent / target).resolve() if target else page
            if not path.exists():
                broken.append(f"{page.relative_to(ROOT)}: {link} (no file)")
            elif fragment and path.suffix == ".md" and fragment not in slugs(path):
                broken.append(f"{page.relative_to(ROOT)}: {link} (no such heading)")
    assert broken == [], "\n".join(broken)
