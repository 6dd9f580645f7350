"""The docs stay readable and point at things that exist: ``docs/architecture.md`` is an index of
at most 150 lines and each topic page at most 250; every relative link and every repository
path named in the README, the changelog, ``docs/`` and memfit's source resolves; and docstrings
and ``docs/`` say what and why, leaving history to ``CHANGELOG.md``."""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
INDEX = ROOT / "docs" / "architecture.md"
PAGES = sorted(p for p in (ROOT / "docs").glob("*.md") if p != INDEX)
MARKDOWN = [ROOT / "README.md", ROOT / "CHANGELOG.md", INDEX, *PAGES]
SOURCES = sorted((ROOT / "src" / "memfit").rglob("*.py"))

LINK = re.compile(r"\]\(([^)\s#]+)(?:#[^)]*)?\)")
# a path inside the repository, as the docs and docstrings name one (a glob is fine)
PATH = re.compile(r"\b(?:src/memfit|benchmarks|docs|tests)/[\w./*-]*[\w*]\.(?:py|md)\b")
# phrases that tell when rather than what or why (issue 23)
HISTORY = re.compile(r"\b(?:the first version|in session \d+|last session|before this change)\b")


def _exists(path: str, base: Path) -> bool:
    return any(base.glob(path)) if "*" in path else (base / path).exists()


def test_index_and_topic_pages_are_short() -> None:
    assert len(INDEX.read_text().splitlines()) <= 150
    assert PAGES
    for page in PAGES:
        assert len(page.read_text().splitlines()) <= 250, page.name


@pytest.mark.parametrize("markdown", MARKDOWN, ids=lambda p: p.name)
def test_markdown_links_resolve(markdown: Path) -> None:
    text = markdown.read_text()
    missing = [
        target
        for target in LINK.findall(text)
        if "://" not in target and not target.startswith("mailto:")
        if not _exists(target, markdown.parent)
    ]
    assert not missing, f"{markdown.name} links to files that do not exist: {missing}"


def test_named_paths_exist() -> None:
    missing = [
        f"{source.relative_to(ROOT)}: {path}"
        for source in [*MARKDOWN, *SOURCES]
        for path in PATH.findall(source.read_text())
        if not _exists(path, ROOT)
    ]
    assert not missing, f"paths named that do not exist: {missing}"


def test_docstrings_and_docs_leave_history_to_the_changelog() -> None:
    found = [
        f"{source.relative_to(ROOT)}: {match.group(0)!r}"
        for source in [INDEX, *PAGES, *SOURCES]
        for match in HISTORY.finditer(source.read_text().lower())
    ]
    assert not found, f"history outside CHANGELOG.md: {found}"
