"""Every ```python block of README.md and docs/*.md runs as written, or says why not.

A block that cannot run here (a signature, an outline, real hypervisors) carries the line
``<!-- not run: REASON -->`` right above its fence; every other block runs as its own program, inside a network
namespace this test creates, where a real metadata server answers on the droplet's address,
http://169.254.169.254 (the default of ``MaintenanceClient()``) and the droplet is registered with that address.
So the README's three-line example runs exactly as a droplet owner would type it.
"""

from __future__ import annotations

import os
import re
import secrets
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.support import require, require_binary, require_root

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
METADATA_ADDRESS = "169.254.169.254"
ADMIN_PORT = 8775
SKIP_MARK = re.compile(r"^<!-- not run: (?P<why>\S.*?) -->$")
FENCE = re.compile(r"^```python\n(?P<code>.*?)^```$", re.DOTALL | re.MULTILINE)
BLOCK_TIMEOUT_S = 60
START_TIMEOUT_S = 20


@dataclass(frozen=True)
class Block:
    doc: Path
    line: int
    code: str
    not_run: str | None  # the reason given above the fence

    @property
    def name(self) -> str:
        return f"{self.doc.relative_to(ROOT)}:{self.line}"


def python_blocks() -> list[Block]:
    found = []
    for doc in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        text = doc.read_text()
        for m in FENCE.finditer(text):
            line = text.count("\n", 0, m.start()) + 1
            above = text[: m.start()].rstrip("\n").rsplit("\n", 1)[-1]
            mark = SKIP_MARK.match(above)
            found.append(Block(doc, line, m.group("code"), mark.group("why") if mark else None))
    return found


BLOCKS = python_blocks()


def test_the_docs_have_python_blocks_and_most_run() -> None:
    assert len(BLOCKS) >= 5
    run = [b for b in BLOCKS if b.not_run is None]
    assert len(run) > len(BLOCKS) // 2, [b.name for b in BLOCKS if b.not_run]
    assert any(b.doc.name == "README.md" for b in run)


class Droplet:
    """A network namespace that stands for a droplet: its metadata server answers on 169.254.169.254:80."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.ns = f"dlm-docs-{os.getpid()}"
        self.token = secrets.token_hex(16)
        self.server: subprocess.Popen[bytes] | None = None

    def exec(self, *argv: str, **kw: object) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["ip", "netns", "exec", self.ns, *argv],
            capture_output=True,
            text=True,
            check=False,
            **kw,  # type: ignore[arg-type]
        )

    def start(self) -> None:
        subprocess.run(["ip", "netns", "add", self.ns], check=True, timeout=30)
        for cmd in (
            ["ip", "link", "set", "lo", "up"],
            ["ip", "addr", "add", f"{METADATA_ADDRESS}/32", "dev", "lo"],
        ):
            assert self.exec(*cmd, timeout=30).returncode == 0
        token_file = self.workdir / "admin-token"
        token_file.write_text(self.token)
        token_file.chmod(0o600)
        log = (self.workdir / "server.log").open("ab")
        self.server = subprocess.Popen(
            ["ip", "netns", "exec", self.ns, str(BIN / "metadata-server"), "serve",
             "--guest-listen", f"{METADATA_ADDRESS}:80", "--admin-listen", f"127.0.0.1:{ADMIN_PORT}",
             "--db", str(self.workdir / "state.sqlite3"), "--admin-token-file", str(token_file)],
            stdout=log, stderr=log,
        )  # fmt: skip
        deadline = time.monotonic() + START_TIMEOUT_S
        while self.admin("PUT", "/admin/v1/droplets/docs-1", {"addresses": [METADATA_ADDRESS]}) not in (
            200,
            201,
        ):
            assert self.server.poll() is None, (self.workdir / "server.log").read_text()
            assert time.monotonic() < deadline, (self.workdir / "server.log").read_text()
            time.sleep(0.2)

    def admin(self, method: str, path: str, doc: object = None) -> int:
        """One admin request from inside the namespace; the HTTP status (0: no answer)."""
        script = (
            "import json, sys, requests\n"
            "try:\n"
            f"    r = requests.request({method!r}, 'http://127.0.0.1:{ADMIN_PORT}{path}', json={doc!r},"
            f" headers={{'Authorization': 'Bearer {self.token}'}}, timeout=2)\n"
            "    print(r.status_code)\n"
            "except requests.RequestException:\n"
            "    print(0)\n"
        )
        out = self.exec(sys.executable, "-c", script, timeout=30)
        return int(out.stdout.strip() or 0)

    def stop(self) -> None:
        if self.server is not None and self.server.poll() is None:
            self.server.terminate()
            try:
                self.server.wait(15)
            except subprocess.TimeoutExpired:
                self.server.kill()
                self.server.wait()
        subprocess.run(["ip", "netns", "del", self.ns], check=False, timeout=30)


@pytest.fixture(scope="module")
def droplet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Droplet]:
    require_root("creates a network namespace that stands for a droplet")
    require_binary("ip", "install iproute2")
    require((BIN / "metadata-server").exists(), "metadata-server not installed in this venv")
    d = Droplet(tmp_path_factory.mktemp("docs-droplet"))
    try:
        d.start()
        yield d
    finally:
        d.stop()


@pytest.mark.parametrize("block", [b for b in BLOCKS if b.not_run is None], ids=lambda b: b.name)
def test_docs_python_block_runs(block: Block, droplet: Droplet, tmp_path: Path) -> None:
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(tmp_path),
        "GUEST_SDK_URL": f"http://{METADATA_ADDRESS}",
        "WATCH_SECONDS": "1",
    }
    done = droplet.exec(
        "env", "-i", *[f"{k}={v}" for k, v in env.items()], sys.executable, "-c", block.code,
        timeout=BLOCK_TIMEOUT_S, cwd=tmp_path,
    )  # fmt: skip
    assert done.returncode == 0, f"{block.name}:\n{done.stdout}\n{done.stderr}"
    assert "Traceback" not in done.stderr


@pytest.mark.parametrize("block", [b for b in BLOCKS if b.not_run is not None], ids=lambda b: b.name)
def test_docs_python_block_not_run_says_why(block: Block) -> None:
    assert block.not_run and len(block.not_run) >= 10, block.name
