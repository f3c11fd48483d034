"""The documentation holds together: links resolve, cited documents and sections exist, the README stays short.

Each checker is a plain function from text to a list of problems, run on the repository and on a
deliberately broken sample, so that a checker that stopped finding anything would fail here too.
"""

from __future__ import annotations

import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
ALGORITHM = ROOT / "docs" / "algorithm.md"
README_MAX_LINES = 250
# The retired design document's name, spelled so that this file does not cite it itself.
RETIRED_DOC = "SP" + "EC"
TEXT_SUFFIXES = {".py", ".pyi", ".cpp", ".cc", ".cu", ".cuh", ".h", ".hpp", ".sh", ".md", ".txt", ".toml", ".cfg"}


def _markdown_files() -> list[pathlib.Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def _source_files() -> list[pathlib.Path]:
    """The files that may cite documents: the package, kernels, tests, benchmark scripts, examples, docs."""
    files = []
    for folder in ("masked_optim", "csrc", "tests", "examples", "docs"):
        files += [p for p in (ROOT / folder).rglob("*") if p.is_file() and p.suffix in TEXT_SUFFIXES]
    files += sorted((ROOT / "benchmarks").glob("*.py")) + sorted((ROOT / "benchmarks").glob("*.sh"))
    files.append(ROOT / "README.md")
    # This file's own samples are deliberately broken (they test the checkers below).
    return sorted(set(files) - {pathlib.Path(__file__).resolve()})


# ------------------------------------------------------------------------------------- checkers


def _without_code(text: str) -> str:
    """Markdown text with fenced code blocks and inline code spans blanked (their brackets are not links)."""
    text = re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)
    return re.sub(r"`[^`\n]*`", "``", text)


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: markup dropped, lower case, punctuation removed, spaces to hyphens."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link's text
    text = text.replace("`", "").replace("*", "").strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(markdown: str) -> set[str]:
    """The anchors of every heading of a markdown text (duplicates numbered as GitHub does)."""
    seen: dict[str, int] = {}
    out = set()
    for match in re.finditer(r"^#{1,6}[ \t]+(.+?)[ \t]*#*$", re.sub(r"^```.*?^```", "", markdown, flags=re.S | re.M), re.M):
        base = slug(match.group(1))
        n = seen.get(base, 0)
        seen[base] = n + 1
        out.add(base if n == 0 else f"{base}-{n}")
    return out


def link_problems(path: pathlib.Path, text: str, root: pathlib.Path = ROOT) -> list[str]:
    """Relative links of a markdown file that name no file of the repository, or no heading of it."""
    problems = []
    for target in re.findall(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)", _without_code(text)):
        if re.match(r"[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
            continue
        file_part, _, anchor = target.partition("#")
        if not file_part:  # an anchor in this very text
            if anchor not in anchors(text):
                problems.append(f"{path.name}: link {target!r}: no heading with anchor #{anchor}")
            continue
        dest = (path.parent / file_part).resolve()
        if root.resolve() not in (dest, *dest.parents) or not dest.exists():
            problems.append(f"{path.name}: link {target!r}: no such file in the repository")
            continue
        if anchor:
            if dest.suffix != ".md" or dest.is_dir():
                problems.append(f"{path.name}: link {target!r}: an anchor into a file that is not markdown")
            elif anchor not in anchors(dest.read_text()):
                problems.append(f"{path.name}: link {target!r}: no heading with anchor #{anchor}")
    return problems


def citation_problems(path: pathlib.Path, text: str, root: pathlib.Path = ROOT) -> list[str]:
    """Documents a file cites that the repository does not hold: the retired design document, or a
    ``*.md`` path that exists neither beside the file nor from the repository root."""
    problems = []
    if re.search(rf"\b{RETIRED_DOC}\b", text):
        problems.append(f"{path.name}: cites {RETIRED_DOC}, which is not part of the repository")
    for name in set(re.findall(r"(?<![\w/.:-])([\w.-]+(?:/[\w.-]+)*\.md)\b", text)):
        if not ((path.parent / name).exists() or (root / name).exists()):
            problems.append(f"{path.name}: names {name}, which is not in the repository")
    return problems


def section_numbers(markdown: str) -> set[str]:
    """Numbers of numbered headings: ``## 2. The masked step`` -> 2, ``### 2.3 Water-filling`` -> 2.3."""
    return set(re.findall(r"^#{1,6}[ \t]+(\d+(?:\.\d+)*)\.?[ \t]", markdown, re.M))


_CITATION = re.compile(r"docs/algorithm\.md\s+(§\s*\d+(?:\.\d+)*(?:(?:\s*,\s*|\s+and\s+|\s*/\s*)§\s*\d+(?:\.\d+)*)*)")


def cited_sections(text: str) -> list[str]:
    """Every section number cited as ``docs/algorithm.md §N`` (also ``§2 and §4``, ``§2, §4``)."""
    return [n.rstrip(".") for group in _CITATION.findall(text) for n in re.findall(r"§\s*(\d+(?:\.\d+)*)", group)]


def section_problems(path: pathlib.Path, text: str, sections: set[str]) -> list[str]:
    return [f"{path.name}: cites docs/algorithm.md §{n}, which has no such heading"
            for n in cited_sections(text) if n not in sections]


# --------------------------------------------------------------------------- the repository


@pytest.mark.parametrize("path", _markdown_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_resolves(path):
    assert link_problems(path, path.read_text()) == []


def test_no_file_cites_a_document_the_repository_lacks():
    problems = [p for f in _source_files() for p in citation_problems(f, f.read_text(errors="replace"))]
    assert problems == []


def test_every_algorithm_citation_names_a_heading():
    sections = section_numbers(ALGORITHM.read_text())
    cited = {(f, n) for f in _source_files() for n in cited_sections(f.read_text(errors="replace"))}
    assert len(cited) > 20, "the code cites the algorithm by section; finding almost none means the pattern broke"
    problems = [p for f in _source_files() for p in section_problems(f, f.read_text(errors="replace"), sections)]
    assert problems == []


def test_algorithm_has_the_eight_top_level_sections_in_order():
    numbers = re.findall(r"^## (\d+)\. ", ALGORITHM.read_text(), re.M)
    assert numbers == [str(i) for i in range(1, 9)]


def test_readme_is_short():
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) <= README_MAX_LINES, f"README.md has {len(lines)} lines; move detail to docs/"


def test_readme_links_every_document_in_docs():
    readme = (ROOT / "README.md").read_text()
    for doc in sorted((ROOT / "docs").glob("*.md")):
        assert f"](docs/{doc.name}" in readme, f"README.md does not link docs/{doc.name}"


# ------------------------------------------------------------------- the checkers can fail


def test_link_checker_catches_a_missing_file_and_a_missing_anchor(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.md").write_text("# A\n\n## 2.3 Water-filling: the constant\n")
    page = tmp_path / "README.md"
    good = "[a](docs/a.md) [w](docs/a.md#23-water-filling-the-constant) [self](#intro) [web](https://x.org/y.md)\n# Intro\n"
    assert link_problems(page, good, root=tmp_path) == []
    bad = "[gone](docs/missing.md) [anchor](docs/a.md#24-sampling) ![fig](docs/fig.png) [self](#nowhere)\n# Intro\n"
    found = link_problems(page, bad, root=tmp_path)
    assert len(found) == 4, found
    assert link_problems(page, "[out](../../etc/passwd)", root=tmp_path)  # outside the repository
    assert link_problems(page, "```\n[gone](docs/missing.md)\n```\n`[x](y.md)`", root=tmp_path) == []  # code is not a link


def test_slug_matches_githubs_anchors():
    assert slug("5. Diagnosing & Re-learning") == "5-diagnosing--re-learning"
    assert slug("3.2 The softmax rule (the paper's)") == "32-the-softmax-rule-the-papers"
    assert slug("watch (`acc` accelerometer, `gyro` gyroscope; subject folds)") == "watch-acc-accelerometer-gyro-gyroscope-subject-folds"
    assert anchors("# A\n## A\n```\n# not a heading\n```\n") == {"a", "a-1"}


def test_citation_checker_catches_the_retired_document_and_missing_files(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "algorithm.md").write_text("")
    src = tmp_path / "mod.py"
    assert citation_problems(src, "see docs/algorithm.md and README", root=tmp_path) == []
    assert citation_problems(src, f"as {RETIRED_DOC} §3 says", root=tmp_path)
    assert citation_problems(src, "see docs/design.md", root=tmp_path)
    assert citation_problems(src, "DATASET_SPECS = ()", root=tmp_path) == []  # a name, not a citation


def test_section_checker_catches_a_missing_heading():
    sections = section_numbers("## 1. The problem\n## 2. The step\n### 2.3 Water-filling\n#### 2.3.1 Rounds\n")
    assert sections == {"1", "2", "2.3", "2.3.1"}
    text = "(docs/algorithm.md §2.3) docs/algorithm.md §2 and §4; docs/algorithm.md §9. docs/algorithm.md §2.5, §1"
    assert cited_sections(text) == ["2.3", "2", "4", "9", "2.5", "1"]
    found = section_problems(pathlib.Path("x.py"), text, sections)
    assert sorted(found) == sorted(f"x.py: cites docs/algorithm.md §{n}, which has no such heading" for n in ("4", "9", "2.5"))
