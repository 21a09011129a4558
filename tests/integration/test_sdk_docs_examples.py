"""Every Python example in docs/sdk.md runs, as written, against the real metadata server on loopback.

The examples read the service's URL from GUEST_SDK_URL; the droplet here is 127.0.0.1, the address a
client on loopback sends from by default.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from guest_sdk import MaintenanceClient, NotOnDroplet
from tests.servers import MetadataServer
from tests.support import require

DOC = Path(__file__).resolve().parents[2] / "docs" / "sdk.md"
EXAMPLE_TIMEOUT_S = 30


def python_examples() -> list[str]:
    """The ```python blocks that are whole programs (they import guest_sdk and run something)."""
    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.DOTALL)
    return [b for b in blocks if "from guest_sdk import" in b and "with MaintenanceClient(URL)" in b]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MetadataServer]:
    require(Path(sys.executable).parent.joinpath("metadata-server").exists(), "metadata-server not installed")
    with MetadataServer.start(tmp_path_factory.mktemp("docs")) as ms:
        ms.register("docs-1", ["127.0.0.1"], hostname="docs")
        with MaintenanceClient(ms.guest_url) as client:
            give_up = time.monotonic() + 5
            while True:
                try:
                    client.event()
                    break
                except NotOnDroplet:
                    assert time.monotonic() < give_up
                    time.sleep(0.01)
        yield ms


def run(example: str, server: MetadataServer) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "GUEST_SDK_URL": server.guest_url, "WATCH_SECONDS": "1"}
    return subprocess.run(
        [sys.executable, "-c", example],
        capture_output=True,
        text=True,
        timeout=EXAMPLE_TIMEOUT_S,
        env=env,
        check=False,
    )


def test_sdk_docs_have_the_common_cases() -> None:
    text = DOC.read_text()
    for heading in ("## Check before a deploy", "## Block a batch job", "## Drain a worker queue"):
        assert heading in text
    assert len(python_examples()) >= 4


@pytest.mark.parametrize("state", ["none", "live_migrate"])
def test_sdk_docs_examples_run(server: MetadataServer, state: str) -> None:
    if state == "none":
        server.admin("DELETE", "/admin/v1/droplets/docs-1/maintenance")
    else:
        server.set_event("docs-1", "ev-docs", not_before="2026-12-01T02:00:00Z")
    with MaintenanceClient(server.guest_url) as client:
        client.wait(timeout_s=5) if state != "none" else client.wait_until_clear(timeout_s=5)
    for example in python_examples():
        if state != "none" and "wait_until_clear(" in example:
            # The batch-job example waits for the end: end it, as the engine would, once it says it waits.
            proc = subprocess.Popen(
                [sys.executable, "-c", example],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                env={**os.environ, "GUEST_SDK_URL": server.guest_url, "PYTHONUNBUFFERED": "1"},
            )
            guard = threading.Timer(EXAMPLE_TIMEOUT_S, proc.kill)  # bounds the readline below
            guard.start()
            try:
                assert proc.stdout is not None
                first = proc.stdout.readline()
                server.admin("DELETE", "/admin/v1/droplets/docs-1/maintenance")
                out, err = proc.communicate(timeout=EXAMPLE_TIMEOUT_S)
            finally:
                guard.cancel()
            assert proc.returncode == 0, err
            assert "waiting until it is over" in first
            assert "starting the batch job" in out
            server.set_event("docs-1", "ev-docs", not_before="2026-12-01T02:00:00Z")
            with MaintenanceClient(server.guest_url) as client:
                client.wait(timeout_s=5)
            continue
        done = run(example, server)
        if "clear to deploy" in example:
            assert (done.returncode == 0) == (state == "none"), done.stderr
            continue
        assert done.returncode == 0, done.stderr
        assert "Traceback" not in done.stderr
    if state != "none":
        # The drain example acknowledged the event as ready.
        record = server.admin("GET", "/admin/v1/droplets/docs-1").json()
        assert record["event"]["acknowledged"] == "ready"
