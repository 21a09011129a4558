"""What a droplet owner gets from ``pip install droplet-live-migration`` (no extras): every console script on the
PATH either works or says in one line which extra to install; every one answers ``--version``.

The engine's and the server's scripts come with the base install but need the ``host`` / ``server`` extra; they
used to die with a traceback (``No module named 'sqlalchemy'`` / ``'flask'``). One venv for the module: the same
base install as tests/integration/test_sdk_install.py (a copy of the sources, the machine's pip configuration).
"""

from __future__ import annotations

import os
import subprocess
import tomllib
import venv
from pathlib import Path

import pytest

from tests.integration.test_sdk_install import INSTALL_TIMEOUT_S, ROOT, copy_project
from tests.support import require

pytestmark = pytest.mark.slow

VERSION = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
RUN_TIMEOUT_S = 60


class BaseInstall:
    """A venv holding the project installed without extras; ``run`` starts one of its scripts."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.bin = root / "venv" / "bin"
        self.home = root / "home"
        self.home.mkdir()

    def run(self, *argv: str) -> subprocess.CompletedProcess[str]:
        env = {
            "PATH": f"{self.bin}:/usr/bin:/bin",
            "HOME": str(self.home),
            "XDG_STATE_HOME": str(self.home / "state"),
            "LANG": "C.UTF-8",
        }
        exe = self.bin / argv[0] if (self.bin / argv[0]).exists() else Path(argv[0])
        return subprocess.run(
            [str(exe), *argv[1:]],
            capture_output=True,
            text=True,
            timeout=RUN_TIMEOUT_S,
            check=False,
            cwd=self.root,
            env=env,
        )


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> BaseInstall:
    require((ROOT / "pyproject.toml").exists(), "the project sources are not beside the tests")
    root = tmp_path_factory.mktemp("base-install")
    copy_project(root / "src")
    venv.EnvBuilder(with_pip=True, clear=True).create(root / "venv")
    proc = subprocess.run(
        [str(root / "venv" / "bin" / "python"), "-m", "pip", "install", "--quiet",
         "--disable-pip-version-check", str(root / "src")],
        capture_output=True,
        text=True,
        timeout=INSTALL_TIMEOUT_S,
        check=False,
        env={**os.environ, "PIP_NO_INPUT": "1"},
    )  # fmt: skip
    require(
        proc.returncode == 0 or "No matching distribution" not in proc.stderr,
        f"no package index reachable for pip: {proc.stderr[-500:]}",
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    return BaseInstall(root)


def assert_names_the_extra(proc: subprocess.CompletedProcess[str], prog: str, extra: str) -> None:
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    assert proc.stdout == ""
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith(f"{prog}: error: ")
    assert f"pip install 'droplet-live-migration[{extra}]'" in lines[0]


@pytest.mark.parametrize(
    "argv",
    [
        ["--help"],
        [],
        ["host", "list"],
        ["--db", "x.db", "host", "add", "hv1", "--datacenter", "d", "--vcpus", "1", "--memory", "1G",
         "--disk", "1G"],
        ["status", "--json"],
        ["no-such-command"],
    ],
)  # fmt: skip
def test_base_install_host_engine_names_the_host_extra(base: BaseInstall, argv: list[str]) -> None:
    proc = base.run("host-engine", *argv)
    assert_names_the_extra(proc, "host-engine", "host")
    assert not (base.root / "x.db").exists()
    assert not (base.home / "state").exists()  # and no store was created on the way


@pytest.mark.parametrize(
    "argv",
    [
        ["--help"],
        ["serve", "--db", "state.db", "--guest-listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0"],
        ["serve"],
    ],
)
def test_base_install_metadata_server_names_the_server_extra(base: BaseInstall, argv: list[str]) -> None:
    proc = base.run("metadata-server", *argv)
    assert_names_the_extra(proc, "metadata-server", "server")
    assert not (base.root / "state.db").exists()


@pytest.mark.parametrize(
    ("argv", "prog"),
    [
        (["host-engine", "--version"], "host-engine"),
        (["metadata-server", "--version"], "metadata-server"),
        (["guest-agent", "--version"], "guest-agent"),
        (["python", "-m", "guest_sdk", "--version"], "python -m guest_sdk"),
    ],
)
def test_base_install_every_cli_answers_version(base: BaseInstall, argv: list[str], prog: str) -> None:
    proc = base.run(*argv)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == f"{prog}, version {VERSION}\n"
    assert proc.stderr == ""


def test_base_install_guest_side_works(base: BaseInstall) -> None:
    """The scripts the base install is for still start: ``guest-agent --help`` and ``python -m guest_sdk``."""
    helped = base.run("guest-agent", "--help")
    assert helped.returncode == 0 and "check-config" in helped.stdout, helped.stderr
    sdk = base.run("python", "-m", "guest_sdk", "--help")
    assert sdk.returncode == 0 and "--wait" in sdk.stdout, sdk.stderr
