"""The sdist (``python -m build --sdist``) carries what the README and the docs point to: the license, every
guide, and each file or directory they name (benchmarks, tests, scripts). Built from a copy of the tracked
sources, so the build leaves nothing in the work tree.
"""

from __future__ import annotations

import fnmatch
import importlib.util
import re
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from tests.support import require

ROOT = Path(__file__).resolve().parents[2]
BUILD_TIMEOUT_S = 300
# A path the README or a guide names: under one of the source tree's top-level directories (a trailing
# ``*`` is a glob, as in ``tests/integration/test_libvirt_*.py``).
PATH_REF = re.compile(
    r"(?<![\w/.-])((?:docs|bench|tests|scripts|\.ci|host_engine|metadata_server|guest_sdk|guest_agent)"
    r"/[\w./*-]*[\w*])"
)
MARKDOWN_LINK = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)")


def user_docs() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def tracked_files() -> list[str]:
    """The source tree without what git ignores (the venv, caches, build output)."""
    out = subprocess.run(
        ["git", "-C", str(ROOT), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        capture_output=True,
        check=False,
        timeout=60,
    )
    require(out.returncode == 0, "the sources are not a git checkout")
    return [p for p in out.stdout.decode().split("\0") if p]


@pytest.fixture(scope="module")
def sdist_members(tmp_path_factory: pytest.TempPathFactory) -> set[str]:
    """Paths inside the sdist, relative to its top directory."""
    require(importlib.util.find_spec("build") is not None, "`build` not installed (the dev extra has it)")
    tmp = tmp_path_factory.mktemp("sdist")
    src = tmp / "src"
    for rel in tracked_files():
        if (ROOT / rel).is_file():  # a file deleted in the work tree but not yet in git
            (src / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / rel, src / rel)
    proc = subprocess.run(
        [sys.executable, "-m", "build", "--sdist", "--outdir", str(tmp / "dist"), str(src)],
        capture_output=True,
        text=True,
        timeout=BUILD_TIMEOUT_S,
        check=False,
    )
    require(
        proc.returncode == 0 or "Could not find a version" not in proc.stderr + proc.stdout,
        f"no package index reachable for the build backend: {proc.stderr[-500:]}",
    )
    assert proc.returncode == 0, (proc.stdout[-2000:], proc.stderr[-2000:])
    [archive] = (tmp / "dist").glob("*.tar.gz")
    with tarfile.open(archive) as tar:
        names = tar.getnames()
    return {n.split("/", 1)[1] for n in names if "/" in n}


def test_sdist_carries_the_license_readme_and_every_guide(sdist_members: set[str]) -> None:
    assert {"LICENSE", "README.md", "pyproject.toml"} <= sdist_members
    guides = {f"docs/{p.name}" for p in (ROOT / "docs").glob("*.md")}
    assert guides and guides <= sdist_members, sorted(guides - sdist_members)
    assert not any("__pycache__" in m or m.endswith(".pyc") for m in sdist_members)


def test_license_is_the_apache_2_0_text() -> None:
    text = (ROOT / "LICENSE").read_text()
    assert "Apache License" in text and "Version 2.0, January 2004" in text
    assert "END OF TERMS AND CONDITIONS" in text and "APPENDIX: How to apply the Apache License" in text
    assert len(text) > 10_000  # the full text, not a pointer to it


def _exists_in(ref: str, members: set[str]) -> bool:
    ref = ref.rstrip("/.")
    if "*" in ref:
        return any(fnmatch.fnmatch(m, ref) for m in members)
    return ref in members or any(m.startswith(ref + "/") for m in members)


@pytest.mark.parametrize("doc", user_docs(), ids=lambda p: p.name)
def test_docs_point_only_to_files_the_sdist_ships(doc: Path, sdist_members: set[str]) -> None:
    text = doc.read_text()
    assert "DESIGN.md" not in text, "the design document is not shipped: say it here or in docs/"
    refs = set(PATH_REF.findall(text))
    for link in MARKDOWN_LINK.findall(text):
        if "://" in link or link.startswith("mailto:"):
            continue
        target = (doc.parent / link).resolve()
        assert target.is_relative_to(ROOT), f"{doc.name}: link {link} leaves the project"
        refs.add(str(target.relative_to(ROOT)))
    missing = sorted(r for r in refs if not _exists_in(r, sdist_members))
    assert not missing, f"{doc.name} names files the sdist does not ship: {missing}"


def test_every_markdown_link_in_the_docs_resolves() -> None:
    """A relative link resolves from the file it is in (``docs/a.md`` links to ``b.md``, not ``docs/b.md``)."""
    broken = []
    for doc in user_docs():
        for link in MARKDOWN_LINK.findall(doc.read_text()):
            if "://" not in link and not (doc.parent / link).exists():
                broken.append(f"{doc.relative_to(ROOT)}: {link}")
    assert not broken, broken
