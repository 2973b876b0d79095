"""The README and docs/: every relative link and anchor resolves, no machine path, the settings
reference is the one the code generates."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from conftest import REPO_SETTINGS

from core.settings import splice_reference

REPO = REPO_SETTINGS.parent
PAGES = [REPO / "README.md", *sorted((REPO / "docs").rglob("*.md"))]
LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)|!\[[^\]]*\]\(([^)\s]+)\)")


def slug(heading: str) -> str:
    """GitHub's anchor of a heading."""
    text = re.sub(r"[`*]", "", heading.strip().lower())  # GitHub keeps underscores (chip_args -> #chip_args)
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(page: Path) -> set[str]:
    text = re.sub(r"(?ms)^```.*?^```", "", page.read_text(encoding="utf-8"))  # no headings in code blocks
    return {slug(m.group(1)) for m in re.finditer(r"(?m)^#{1,6} (.+)$", text)}


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(REPO)))
def test_links_resolve(page: Path) -> None:
    text = re.sub(r"(?ms)^```.*?^```", "", page.read_text(encoding="utf-8"))
    broken = []
    for match in LINK.finditer(text):
        target = match.group(1) or match.group(2)
        if re.match(r"^[a-z]+:", target):
            continue
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        if not dest.exists() or (anchor and dest.suffix == ".md" and anchor not in anchors(dest)):
            broken.append(target)
    assert broken == []


def test_the_readme_stays_short_and_every_stage_has_a_page() -> None:
    assert len((REPO / "README.md").read_bytes()) <= 15_000
    for stage in (
        "download",
        "sample",
        "mosaic",
        "chip",
        "mask",
        "split",
        "flatten",
        "summarize",
        "predict",
        "evaluate",
    ):
        assert (REPO / "docs" / "stages" / f"{stage}.md").is_file(), stage


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(REPO)))
def test_no_machine_paths(page: Path) -> None:
    text = page.read_text(encoding="utf-8")
    assert str(REPO) not in text
    assert not re.search(r"(?<![\w.])/(work|root|home/(?!you/))[/\w]", text), "a path of one machine"


def test_the_settings_reference_is_current() -> None:
    page = REPO / "docs" / "settings.md"
    text = page.read_text(encoding="utf-8")
    assert splice_reference(text) == text, "run make readme"


def test_a_section_null_turns_off_has_its_own_row() -> None:
    from core.settings import settings_reference

    rows = settings_reference().splitlines()
    at = rows.index(
        "| `filter` | LabelFilter or null | (the keys below) | Polygons kept; applied when the attribute exists; null = "
        "every polygon. |"
    )  # (only its keys were listed: that null is allowed was nowhere)
    assert rows[at + 1].startswith("| `filter.attribute` |")
