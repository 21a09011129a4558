"""`pip install .` into a fresh venv pulls in only requests, tenacity and click (and their own dependencies).

docs/sdk.md: the guest install must carry nothing of Flask, SQL or libvirt. This builds the project from a copy
of its sources (so the build leaves nothing in the work tree) and installs it into a new venv with the machine's
ordinary pip configuration.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import tomllib
import venv
from pathlib import Path

import pytest

from tests.support import require

ROOT = Path(__file__).resolve().parents[2]
# What requests, tenacity and click need, on Linux (click's colorama is Windows-only).
ALLOWED = {
    "droplet-live-migration",
    "requests",
    "charset-normalizer",
    "idna",
    "urllib3",
    "certifi",
    "tenacity",
    "click",
}
INSTALL_TIMEOUT_S = 300


def copy_project(dest: Path) -> None:
    """What a build of the project reads: pyproject, its top-level files, and the packages it includes."""
    dest.mkdir()
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    for path in ROOT.iterdir():
        if path.is_file() and (
            path.suffix in {".toml", ".md", ".cfg", ".in", ".txt"} or path.name.startswith("LICENSE")
        ):
            shutil.copy2(path, dest / path.name)
    patterns = config["tool"]["setuptools"]["packages"]["find"]["include"]
    packages = {p.split("*")[0].rstrip(".") for p in patterns}
    assert "guest_sdk" in packages
    for package in sorted(packages):
        if (ROOT / package).is_dir():
            shutil.copytree(ROOT / package, dest / package, ignore=shutil.ignore_patterns("__pycache__"))


def _names(python: Path) -> set[str]:
    out = subprocess.run(
        [str(python), "-m", "pip", "list", "--format", "json", "--disable-pip-version-check"],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout
    return {d["name"].lower().replace("_", "-") for d in json.loads(out)}


@pytest.mark.slow
def test_sdk_install_pulls_in_only_requests_tenacity_click(tmp_path: Path) -> None:
    require((ROOT / "pyproject.toml").exists(), "the project sources are not beside the tests")
    src = tmp_path / "src"
    copy_project(src)

    env_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=True, clear=True).create(env_dir)
    python = env_dir / "bin" / "python"
    seeded = _names(python)  # pip (and setuptools on 3.11): the venv's own, not ours

    proc = subprocess.run(
        [str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check", str(src)],
        capture_output=True,
        text=True,
        timeout=INSTALL_TIMEOUT_S,
        check=False,
    )
    require(
        proc.returncode == 0 or "No matching distribution" not in proc.stderr,
        f"no package index reachable for pip: {proc.stderr[-500:]}",
    )
    assert proc.returncode == 0, proc.stderr[-2000:]

    installed = _names(python) - seeded
    assert installed == ALLOWED, (
        f"unexpected: {sorted(installed - ALLOWED)}, missing: {sorted(ALLOWED - installed)}"
    )

    # The SDK imports and runs there; the server side's dependencies are not importable.
    check = (
        "import importlib.util, guest_sdk;"
        "from guest_sdk import MaintenanceClient;"
        "missing = [m for m in ('flask', 'sqlalchemy', 'libvirt', 'gunicorn', 'gevent')"
        " if importlib.util.find_spec(m) is not None];"
        "assert not missing, missing"
    )
    subprocess.run([str(python), "-c", check], check=True, timeout=60, cwd=tmp_path)
    helped = subprocess.run(
        [str(python), "-m", "guest_sdk", "--help"],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
    )
    assert helped.returncode == 0
    assert "--wait" in helped.stdout
