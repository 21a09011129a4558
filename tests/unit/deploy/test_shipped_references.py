"""The product's comments, docstrings and docs point only at what ships with it (issue 16.6). The design
document, the style guide and the build machine's notes live outside the repository: a reader of an installed
package or a checkout cannot follow a pointer to them, so the code names a docs/*.md section instead, or says
in place what the reader needs."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]
PACKAGES = ("host_engine", "metadata_server", "guest_sdk", "guest_agent")
# A maintainer reading the tests and benchmarks in a checkout follows the same pointers.
DEVELOPMENT = ("tests", "bench")
# "§11" alone is the design document's numbering too.
UNSHIPPED = re.compile(r"DESIGN\.md|DESIGN §|§ ?\d|STYLE\.md|\.\./shared")
DOC_REF = re.compile(r"(?<![\w/.-])docs/[\w.-]+\.md")
# Files that name the unshipped documents on purpose, to check they are not cited.
NAMES_THEM = {
    Path("tests/unit/deploy/test_shipped_references.py"),  # this file: the pattern
    Path("tests/integration/test_packaging.py"),  # asserts the built package's README does not cite them
}


def _shipped_text_files() -> list[Path]:
    files = [
        p for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*")) if p.suffix in {".py", ".service"}
    ]
    return [*files, ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def _development_files() -> list[Path]:
    return [
        p
        for top in DEVELOPMENT
        for p in sorted((ROOT / top).rglob("*.py"))
        if "__pycache__" not in p.parts and p.relative_to(ROOT) not in NAMES_THEM
    ]


def test_nothing_points_at_a_file_outside_the_repository() -> None:
    hits = [
        f"{path.relative_to(ROOT)}:{n}: {line.strip()}"
        for path in _shipped_text_files()
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)
        if UNSHIPPED.search(line)
    ]
    assert hits == [], "\n".join(hits)


def test_the_docs_the_code_cites_exist() -> None:
    missing = [
        f"{path.relative_to(ROOT)}: {ref}"
        for path in _shipped_text_files()
        if path.suffix == ".py"
        for ref in DOC_REF.findall(path.read_text(encoding="utf-8"))
        if not (ROOT / ref).is_file()
    ]
    assert missing == [], "\n".join(missing)


def test_tests_and_benchmarks_point_at_no_file_outside_the_repository() -> None:
    """A test's docstring says which documented behaviour it checks: a docs/*.md section, not the design."""
    hits = [
        f"{path.relative_to(ROOT)}:{n}: {line.strip()}"
        for path in _development_files()
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)
        if UNSHIPPED.search(line)
    ]
    assert hits == [], "\n".join(hits)


def test_the_docs_tests_and_benchmarks_cite_exist() -> None:
    missing = [
        f"{path.relative_to(ROOT)}: {ref}"
        for path in _development_files()
        for ref in DOC_REF.findall(path.read_text(encoding="utf-8"))
        if not (ROOT / ref).is_file()
    ]
    assert missing == [], "\n".join(missing)
