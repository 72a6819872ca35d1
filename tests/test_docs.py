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


def layout_tree() -> set[str]:
    """The paths that docs/layout.md's tree names: an entry's depth is its indent (2 spaces a level)."""
    text = (REPO / "docs" / "layout.md").read_text(encoding="utf-8")
    block = text.split("```\n", 2)[1]
    folders: list[str] = []
    paths: set[str] = set()
    for line in block.splitlines():
        name = line.lstrip(" ").split(" ")[0]
        if not name or not re.fullmatch(r"[\w.]+/?", name):
            continue  # a continuation line
        indent = len(line) - len(line.lstrip(" "))
        depth = indent // 2
        if indent % 2 or depth > len(folders):
            continue  # a description's second line, indented under the description
        folders = folders[:depth]
        path = "/".join(folders + [name.rstrip("/")])
        paths.add(path)
        if name.endswith("/"):
            folders.append(name.rstrip("/"))
    return paths


def test_the_layout_page_maps_every_module_and_folder_of_both_packages():
    named = layout_tree()
    files = {str(p.relative_to(REPO)) for package in ("guided_diffusion", "evaluation")
             for p in (REPO / package).rglob("*") if p.suffix in (".py", ".sh") or p.is_dir()}
    # a sub-package's __init__.py holds only its docstring, which its folder's line gives
    files = {f for f in files if "__pycache__" not in f and not (f.count("/") == 2 and f.endswith("/__init__.py"))}
    assert not files - named, f"docs/layout.md does not name: {sorted(files - named)}"
    stale = [p for p in named if p.startswith(("guided_diffusion/", "evaluation/")) and not (REPO / p).exists()]
    assert not stale, f"docs/layout.md names what does not exist: {stale}"
