"""README and docs/ stay navigable: every relative link and anchor resolves, every page is one
click from README, and README opens with its two commands."""

import re
from collections import Counter
from pathlib import Path

import pytest

from conftest import REPO

PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")


def github_anchors(markdown: str) -> set:
    """The anchors GitHub gives a page's headings (lower case, punctuation dropped, spaces to
    hyphens, repeats numbered), code blocks skipped."""
    anchors, seen, in_code = set(), Counter(), False
    for line in markdown.splitlines():
        if line.startswith("```"):
            in_code = not in_code
        match = None if in_code else re.match(r"^#{1,6} (.*)$", line)
        if match:
            slug = re.sub(r"[^\w\- ]", "", match.group(1).strip().lower()).replace(" ", "-")
            anchors.add(slug if not seen[slug] else f"{slug}-{seen[slug]}")
            seen[slug] += 1
    return anchors


def links(page: Path) -> list:
    """Relative link targets of a page, outside code blocks."""
    text = re.sub(r"```.*?```", "", page.read_text(encoding="utf-8"), flags=re.S)
    return [target for target in LINK.findall(text) if not re.match(r"^[a-z]+:", target)]


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.relative_to(REPO).as_posix())
def test_every_link_and_anchor_resolves(page):
    broken = []
    for target in links(page):
        path, _, anchor = target.partition("#")
        file = (page.parent / path).resolve() if path else page
        if not file.exists():
            broken.append(f"{target}: no file {file}")
        elif anchor and file.suffix == ".md" and anchor not in github_anchors(file.read_text(encoding="utf-8")):
            broken.append(f"{target}: no heading with anchor #{anchor} in {file.name}")
    assert not broken, f"{page.name}: " + "; ".join(broken)


def test_every_docs_page_is_linked_from_readme_and_links_back():
    readme_links = {(REPO / target.partition("#")[0]).resolve() for target in links(REPO / "README.md")}
    for page in PAGES[1:]:
        assert page.resolve() in readme_links, f"README does not link {page.relative_to(REPO)}"
        assert "../README.md" in links(page), f"{page.relative_to(REPO)} has no link back to README"


def test_readme_opens_with_its_two_commands():
    text = (REPO / "README.md").read_text(encoding="utf-8")
    assert text.startswith("```\n")
    block = text.split("```")[1].strip("\n").splitlines()
    assert len(block) == 2 and all(line.startswith("python3 -m venv .venv") for line in block)
