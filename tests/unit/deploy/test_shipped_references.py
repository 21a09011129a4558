"""The product's comments, docstrings and docs point only at what ships with it (issue 16.6). The design
document, the style guide and the build machine's notes live outside the repository: a reader of an installed
package or a checkout cannot follow a pointer to them, so the code names a docs/*.md section instead, or says
in place what the reader needs."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]
PACKAGES = ("host_engine", "metadata_server", "guest_sdk", "guest_agent")
UNSHIPPED = re.compile(r"DESIGN\.md|DESIGN §|STYLE\.md|\.\./shared")
DOC_REF = re.compile(r"(?<![\w/.-])docs/[\w.-]+\.md")


def _shipped_text_files() -> list[Path]:
    files = [
        p for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*")) if p.suffix in {".py", ".service"}
    ]
    return [*files, ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


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
