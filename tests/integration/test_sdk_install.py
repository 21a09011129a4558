"""`pip install .` into a fresh venv pulls in only requests, tenacity and click (and their own dependencies).

DESIGN.md §1: the guest install must carry nothing of Flask, SQL or libvirt. This builds the project from a copy
of its sources (so the build leaves nothing in the work tree) and installs it into a new venv with the machine's
ordinary pip configuration.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import venv
from pathlib import Path

import pytest

from tests.support import require

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("guest_sdk", "guest_agent", "host_engine", "metadata_server")
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
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, src / name)
    for package in PACKAGES:
        shutil.copytree(ROOT / package, src / package, ignore=shutil.ignore_patterns("__pycache__"))

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
