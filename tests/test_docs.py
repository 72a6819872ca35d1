"""The docs' links and pictures point at files that exist (a moved report must not leave the README broken)."""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LINK = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)|<img[^>]*\bsrc=\"([^\"]+)\"")


def relative_targets(markdown: Path) -> list[str]:
    """The link and image targets of a Markdown file that name a file of the repository (no URLs)."""
    found = [a or b for a, b in LINK.findall(markdown.read_text(encoding="utf-8"))]
    return [t for t in found if not re.match(r"[a-z]+:", t)]


def test_every_relative_link_and_picture_of_the_readme_and_docs_exists():
    files = [REPO / "README.md", *sorted((REPO / "docs").rglob("*.md"))]
    missing = [f"{md.relative_to(REPO)}: {target}" for md in files for target in relative_targets(md)
               if not (md.parent / target).exists()]
    assert not missing, "; ".join(missing)


def test_the_link_check_sees_links_pictures_and_anchors(tmp_path):
    page = tmp_path / "page.md"
    page.write_text('[a](docs/a.md#part) ![b](b.png) <img src="c.png" width="9"> [web](https://example.org)\n')
    assert relative_targets(page) == ["docs/a.md", "b.png", "c.png"]
