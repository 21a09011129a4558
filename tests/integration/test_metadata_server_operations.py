"""Operating the metadata server: probes without a token, latency metrics across processes, and the
documented way to run its apps under the operator's own gunicorn (the command is read from the docs)."""

from __future__ import annotations

import contextlib
import os
import re
import resource
import shlex
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from tests.servers import MetadataServer, curl, free_port, port_is_free, session_processes
from tests.support import require_binary

DOCS = Path(__file__).resolve().parents[2] / "docs" / "metadata-server.md"
GUNICORN = Path(sys.executable).parent / "gunicorn"
TOKEN = "operator-token-" + "x" * 16
HISTOGRAM = "metadata_server_request_duration_seconds"


def test_server_probes_need_no_token_and_metrics_time_guest_requests(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    require_binary("curl")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("XDG_RUNTIME_DIR", raising=False)
    with MetadataServer.start(tmp_path / "ms") as ms:
        assert not (tmp_path / "home").exists()  # no gunicorn control socket: `serve` supervises
        ms.register("d2", ["127.0.0.2"], hostname="secret-host")
        for path in ("/livez", "/readyz"):
            r = requests.get(ms.admin_url + path, timeout=5)
            assert (r.status_code, r.text) == (200, "ok\n")
        assert requests.get(ms.admin_url + "/metrics", timeout=5).status_code == 401
        before = guest_requests_timed(ms)
        for _ in range(3):
            assert curl(ms.guest_url + "/v1/maintenance_event", "127.0.0.2").returncode == 0
        assert guest_requests_timed(ms) == before + 3  # gathered from the guest worker processes


def guest_requests_timed(ms: MetadataServer) -> float:
    series = f'{HISTOGRAM}_count{{endpoint="/v1/maintenance_event",listener="guest"}} '
    text = ms.admin("GET", "/metrics").text
    return sum(float(line.removeprefix(series)) for line in text.splitlines() if line.startswith(series))


def test_server_holds_more_connections_than_a_default_open_files_limit(tmp_path: Path) -> None:
    """Started with a soft limit of 256 descriptors (systemd's default is 1,024), as a service often is."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < 2_048:
        pytest.skip(f"the hard limit on open files ({hard}) leaves nothing to raise")
    with contextlib.ExitStack() as stack:
        resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard))
        try:
            ms = stack.enter_context(MetadataServer.start(tmp_path / "ms"))
        finally:
            resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))  # the server inherited 256
        idle = [stack.enter_context(socket.socket()) for _ in range(600)]
        for n, s in enumerate(idle):  # 60 from each of 10 sources: under the per-source cap
            s.bind((f"127.0.4.{n % 10 + 1}", 0))
            s.connect(("127.0.0.1", ms.admin_port))
        time.sleep(0.5)  # all accepted and held by the admin worker
        r = ms.admin("PUT", "/admin/v1/droplets/d2", json={"addresses": ["127.0.0.2"]}, timeout=5)
        assert r.status_code == 201


def documented_commands() -> list[str]:
    """The shell block that follows the marker naming this test in docs/metadata-server.md."""
    doc = DOCS.read_text()
    marker = f"<!-- run by tests/integration/{Path(__file__).name} -->"
    assert marker in doc, f"{DOCS} lost the marked gunicorn example"
    block = doc.split(marker, 1)[1].split("```sh\n", 1)[1].split("```", 1)[0]
    return [line for line in block.replace("\\\n", " ").splitlines() if line.strip()]


@pytest.fixture
def operator_gunicorn(tmp_path: Path) -> Iterator[tuple[str, str]]:
    """Both apps started exactly as documented, with loopback ports and a temporary state file."""
    lines = documented_commands()
    guest_port, admin_port = free_port(), free_port()
    db = tmp_path / "state.sqlite3"
    env = {**os.environ, "PATH": f"{GUNICORN.parent}:{os.environ['PATH']}"}
    procs: list[subprocess.Popen[bytes]] = []
    for line in lines:
        if line.startswith("export "):
            name, _value = line.removeprefix("export ").split("=", 1)
            if name == "METADATA_SERVER_ADMIN_TOKEN":
                env[name] = TOKEN
            elif name == "PROMETHEUS_MULTIPROC_DIR":
                (tmp_path / "metrics").mkdir()
                env[name] = str(tmp_path / "metrics")
            else:
                pytest.fail(f"unexpected variable in the documented commands: {line}")
            continue
        argv = shlex.split(line.split("#", 1)[0].removesuffix(" &"))
        assert argv[0] == "gunicorn", line
        argv = [re.sub(r"/var/lib/metadata-server/state\.sqlite3", str(db), a) for a in argv]
        argv = [a.replace("127.0.0.1:8775", f"127.0.0.1:{admin_port}") for a in argv]
        argv = [a.replace("169.254.169.254:80", f"127.0.0.1:{guest_port}") for a in argv]
        log = (tmp_path / f"gunicorn-{len(procs)}.log").open("wb")
        procs.append(
            subprocess.Popen(
                [str(GUNICORN), *argv[1:]], env=env, stdout=log, stderr=log, start_new_session=True
            )
        )
    assert len(procs) == 2
    try:
        yield f"http://127.0.0.1:{guest_port}", f"http://127.0.0.1:{admin_port}"
    finally:
        for p in procs:
            p.send_signal(signal.SIGTERM)
        for p in procs:
            p.wait(15)
            deadline = time.monotonic() + 5
            while session_processes(p.pid) and time.monotonic() < deadline:
                time.sleep(0.05)
            assert not session_processes(p.pid)
        assert port_is_free(guest_port) and port_is_free(admin_port)


def test_docs_gunicorn_command_runs_both_apps(operator_gunicorn: tuple[str, str], tmp_path: Path) -> None:
    require_binary("curl")
    guest_url, admin_url = operator_gunicorn
    auth = {"Authorization": f"Bearer {TOKEN}"}
    deadline = time.monotonic() + 20
    while True:
        try:
            guest_answers = requests.get(guest_url + "/v1/maintenance_event", timeout=1).status_code == 404
            if requests.get(admin_url + "/readyz", timeout=1).ok and guest_answers:  # 404: not a droplet
                break
        except requests.RequestException:  # not listening yet, or its workers still booting
            pass
        logs = "\n".join(p.read_text() for p in sorted(tmp_path.glob("gunicorn-*.log")))
        assert time.monotonic() < deadline, f"the documented gunicorn commands did not come up:\n{logs}"
        time.sleep(0.1)
    r = requests.put(
        admin_url + "/admin/v1/droplets/d2", json={"addresses": ["127.0.0.2"]}, headers=auth, timeout=5
    )
    assert r.status_code == 201, r.text
    event = {"id": "ev-1", "event": "live_migrate", "state": "scheduled"}
    r = requests.put(admin_url + "/admin/v1/droplets/d2/maintenance", json=event, headers=auth, timeout=5)
    assert r.status_code == 201, r.text
    deadline = time.monotonic() + 5
    while (out := curl(guest_url + "/v1/maintenance_event", "127.0.0.2").stdout) != b"live_migrate":
        assert time.monotonic() < deadline, out
        time.sleep(0.05)
    assert requests.get(admin_url + "/admin/v1/droplets", timeout=5).status_code == 401
    metrics = requests.get(admin_url + "/metrics", headers=auth, timeout=5).text
    assert f'{HISTOGRAM}_count{{endpoint="/v1/maintenance_event",listener="guest"}}' in metrics
