"""What `pip show` and PyPI display: a license file that exists, and project URLs a user can follow."""

from __future__ import annotations

import tomllib
from pathlib import Path
from urllib.parse import urlsplit

ROOT = Path(__file__).resolve().parents[3]


def test_project_urls_and_license_file_are_declared() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    urls = project["urls"]
    assert {"Homepage", "Documentation", "Issues"} <= set(urls)
    for url in urls.values():
        parts = urlsplit(url)
        assert parts.scheme == "https" and parts.netloc, url
    assert project["license"] == "Apache-2.0"
    for name in project["license-files"]:
        assert (ROOT / name).is_file(), name
