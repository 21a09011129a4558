"""The real metadata server, started through its CLI on loopback, used the way guests and the engine do."""

from __future__ import annotations

import concurrent.futures
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest
import requests

from tests.servers import BIN, MetadataServer, curl, free_port
from tests.support import require_binary
from tests.tls import self_signed

DROPLETS = {f"d{n}": f"127.0.0.{n}" for n in range(2, 7)}


@pytest.fixture
def server(tmp_path: Path):  # type: ignore[no-untyped-def]
    require_binary("curl")
    with MetadataServer.start(tmp_path / "ms") as ms:
        for droplet_id, address in DROPLETS.items():
            ms.register(droplet_id, [address], hostname=f"host-{droplet_id}")
        yield ms


def test_server_each_source_address_sees_only_its_own_flag(server: MetadataServer) -> None:
    server.set_event("d2", "ev-a", "live_migrate")
    server.set_event("d4", "ev-b", "offline_migrate")
    expected = {"d2": b"live_migrate", "d3": b"", "d4": b"offline_migrate", "d5": b"", "d6": b""}
    for droplet_id, address in DROPLETS.items():
        out = curl(server.guest_url + "/v1/maintenance_event", address)
        assert out.returncode == 0, out.stderr
        assert out.stdout == expected[droplet_id]
        assert curl(server.guest_url + "/metadata/v1/id", address).stdout == droplet_id.encode()
    stranger = curl(server.guest_url + "/v1/maintenance_event", "127.0.0.77", "-w", "%{http_code}")
    assert stranger.stdout.endswith(b"404")


def test_server_long_poll_wakes_on_admin_change(server: MetadataServer) -> None:
    head = curl(server.guest_url + "/v1/maintenance_event", "127.0.0.3", "-D", "-").stdout
    etag = next(
        line.split(b":", 1)[1].strip() for line in head.split(b"\r\n") if line.lower().startswith(b"etag")
    )
    url = f"{server.guest_url}/v1/maintenance_event?wait_for_change=true&last_etag={etag.decode()}&timeout_sec=60"
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        waiting = pool.submit(curl, url, "127.0.0.3")
        deadline = time.monotonic() + 5
        while "metadata_server_held_long_polls 1.0" not in server.admin("GET", "/metrics").text:
            assert time.monotonic() < deadline, "the long-poll was never held"
            time.sleep(0.02)
        changed = time.monotonic()
        server.set_event("d3", "ev-c")
        out = waiting.result(timeout=5)
        assert time.monotonic() - changed < 1.0
    assert out.stdout == b"live_migrate"


def test_server_restart_and_kill9_keep_every_acknowledged_event(server: MetadataServer) -> None:
    server.set_event("d2", "ev-1", not_before="2026-12-01T02:00:00Z")
    etag = requests.head(server.guest_url + "/v1/maintenance_event", timeout=5)  # 404 from 127.0.0.1
    assert etag.status_code == 404
    before = curl(server.guest_url + "/v1/maintenance_event.json", "127.0.0.2").stdout
    server.restart()
    assert curl(server.guest_url + "/v1/maintenance_event.json", "127.0.0.2").stdout == before
    # kill -9 right after each acknowledged write: none may be lost.
    for n, droplet_id in enumerate(("d3", "d4", "d5")):
        server.set_event(droplet_id, f"ev-k{n}", "offline_migrate")
        server.kill9_and_restart()
    server.clear_event("d2")
    server.kill9_and_restart()
    seen = {d: curl(server.guest_url + "/v1/maintenance_event", a).stdout for d, a in DROPLETS.items()}
    assert seen == {
        "d2": b"",
        "d3": b"offline_migrate",
        "d4": b"offline_migrate",
        "d5": b"offline_migrate",
        "d6": b"",
    }


def test_server_admin_rejects_bad_tokens_and_changes_nothing(server: MetadataServer) -> None:
    for headers in ({}, {"Authorization": "Bearer nope"}, {"Authorization": f"Bearer {server.token}x"}):
        r = requests.put(
            server.admin_url + "/admin/v1/droplets/d2/maintenance",
            json={"id": "ev-x", "event": "live_migrate", "state": "scheduled"},
            headers=headers,
            timeout=5,
        )
        assert r.status_code == 401
    assert curl(server.guest_url + "/v1/maintenance_event", "127.0.0.2").stdout == b""


def test_server_hostile_guests_get_4xx_while_others_are_served(server: MetadataServer) -> None:
    server.set_event("d6", "ev-6")
    url = server.guest_url + "/v1/maintenance_event"

    def code(*args: str, path: str = "/v1/maintenance_event") -> str:
        out = curl(server.guest_url + path, "127.0.0.2", "-o", "/dev/null", "-w", "%{http_code}", *args)
        return out.stdout.decode()

    assert code("-H", "X-Forwarded-For: 127.0.0.6") == "403"
    assert code("-H", "Forwarded: for=127.0.0.6") == "403"
    assert code("--data-binary", "x" * 10_000, "-X", "GET") == "413"
    assert code(path="/v1/maintenance_event?wait_for_change=true&last_etag=" + "e" * 200) == "400"
    assert code(path="/v1/maintenance_event?wait_for_change=true&timeout_sec=999") == "400"
    assert code(path="/v1/maintenance_event?wait_for_change=true&timeout_sec=abc") == "400"
    assert code("--path-as-is", path="/v1/../../etc/passwd") in {"400", "404"}
    assert code(path="/v2/maintenance_event") == "404"
    assert code("-X", "PUT") == "405"
    assert code("-X", "POST", "--data", "{}", path="/v1/maintenance_event/ack") == "400"
    assert (
        code("-X", "POST", "--data", '{"id": "ev-6", "action": "ready"}', path="/v1/maintenance_event/ack")
        == "409"
    )
    assert curl(url, "127.0.0.6").stdout == b"live_migrate"  # others keep being served


@pytest.fixture
def capped_server(tmp_path: Path):  # type: ignore[no-untyped-def]
    require_binary("curl")
    with MetadataServer.start(tmp_path / "ms", "--workers", "2", "--max-waits-per-droplet", "2") as ms:
        ms.register("d2", ["127.0.0.2"])
        ms.register("d3", ["127.0.0.3"])
        ms.set_event("d3", "ev-3")
        yield ms


def test_server_caps_long_polls_per_droplet_with_429(capped_server: MetadataServer) -> None:
    url = capped_server.guest_url + "/v1/maintenance_event"
    head = curl(url, "127.0.0.2", "-D", "-", "-o", "/dev/null").stdout.decode()
    tag = next(
        line.split(":", 1)[1].strip() for line in head.split("\r\n") if line.lower().startswith("etag")
    )
    poll = f"{url}?wait_for_change=true&last_etag={tag}&timeout_sec=30"
    argv = [
        "curl",
        "-s",
        "--interface",
        "127.0.0.2",
        "-o",
        "/dev/null",
        "-w",
        "%{http_code}",
        "--max-time",
        "40",
    ]
    # 2 workers x cap 2 (the cap is per worker process): at most 4 held; a fifth must be refused whichever
    # worker takes it. Which worker accepts which connection is the kernel's choice: one worker may take 3 or
    # more of the 5 and refuse all past its own 2, so more than one 429 is allowed, never more than 4 held.
    procs = [subprocess.Popen([*argv, poll], stdout=subprocess.PIPE) for _ in range(5)]
    try:
        deadline = time.monotonic() + 10
        refused = []
        while time.monotonic() < deadline and not refused:
            refused = [p for p in procs if p.poll() is not None]
            time.sleep(0.05)
        assert refused, "no long-poll past the cap was refused"
        assert refused[0].stdout is not None and refused[0].stdout.read() == b"429"
        assert curl(url, "127.0.0.3").stdout == b"live_migrate"  # another droplet is still served
        capped_server.set_event("d2", "ev-2")
        codes = [p.communicate(timeout=10)[0].decode() for p in procs if p is not refused[0]]
        held = codes.count("200")
        assert set(codes) <= {"200", "429"}, codes
        # Every held long-poll woke on the change; at least one worker's cap held.
        assert 2 <= held <= 4, codes
    finally:
        for p in procs:
            p.kill()
            p.wait()


def test_server_sigterm_is_a_clean_fast_shutdown_even_with_held_long_polls(server: MetadataServer) -> None:
    head = curl(
        server.guest_url + "/v1/maintenance_event", "127.0.0.2", "-D", "-", "-o", "/dev/null"
    ).stdout.decode()
    tag = next(
        line.split(":", 1)[1].strip() for line in head.split("\r\n") if line.lower().startswith("etag")
    )
    poll = f"{server.guest_url}/v1/maintenance_event?wait_for_change=true&last_etag={tag}&timeout_sec=120"
    result: list[subprocess.CompletedProcess[bytes]] = []
    waiter = threading.Thread(
        target=lambda: result.append(curl(poll, "127.0.0.2", "-w", " %{http_code}", timeout_s=60))
    )
    waiter.start()
    time.sleep(0.5)
    start = time.monotonic()
    assert server.stop(signal.SIGTERM) == 0
    assert time.monotonic() - start < 5
    waiter.join(10)
    assert result and result[0].returncode == 0  # answered, not cut off: told to come back
    assert result[0].stdout.endswith(b" 503")


def test_server_tls_admin_listener(tmp_path: Path) -> None:
    cert, key = self_signed(tmp_path)
    with MetadataServer.start(
        tmp_path / "ms", "--admin-tls-cert", str(cert), "--admin-tls-key", str(key)
    ) as ms:
        assert ms.admin_url.startswith("https://")
        assert ms.admin("GET", "/healthz").json() == {"status": "ok"}
        ms.register("d1", ["127.0.0.2"])  # the engine's path, over TLS, verified against the certificate
        with pytest.raises(requests.ConnectionError):
            requests.get(f"http://127.0.0.1:{ms.admin_port}/healthz", timeout=2)
        with pytest.raises(requests.exceptions.SSLError):
            requests.get(ms.admin_url + "/healthz", timeout=2)  # not trusted without the certificate


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(BIN), *args], capture_output=True, text=True, timeout=30, env=env, check=False)


@pytest.fixture
def token_file(tmp_path: Path) -> Path:
    path = tmp_path / "token"
    path.write_text("k" * 32)
    path.chmod(0o600)
    return path


def test_cli_refuses_to_start_without_a_token(tmp_path: Path) -> None:
    out = run_cli("serve", "--guest-listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:1", "--db",
                  str(tmp_path / "db"), env={"PATH": "/usr/bin:/bin"})  # fmt: skip
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == [
        "metadata-server: error: no admin token: give --admin-token-file or set METADATA_SERVER_ADMIN_TOKEN"
    ]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--guest-listen", "nonsense"], "--guest-listen: expected HOST:PORT"),
        (["--guest-listen", "localhost:80"], "is not an IP address"),
        (["--admin-listen", "127.0.0.1:99999"], "--admin-listen: expected HOST:PORT"),
        (["--admin-listen", "0.0.0.0:8775"], "not a loopback address"),
        (["--admin-tls-cert", "/nonexistent.pem"], "must be given together"),
        (["--workers", "0"], "--workers must be from 1 to 64"),
        (["--workers", "many"], "Invalid value for '--workers'"),
        (["--no-such-flag"], "No such option '--no-such-flag'"),
        (["--log-level", "loud"], "Invalid value for '--log-level'"),
    ],
)
def test_cli_bad_flags_are_one_clear_line(
    tmp_path: Path, token_file: Path, args: list[str], message: str
) -> None:
    base = ["serve", "--guest-listen", f"127.0.0.1:{free_port()}", "--admin-listen", f"127.0.0.1:{free_port()}",
            "--db", str(tmp_path / "db"), "--admin-token-file", str(token_file)]  # fmt: skip
    out = run_cli(*base, *args)
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], out.stderr


def test_cli_short_or_world_readable_token_is_refused(tmp_path: Path, token_file: Path) -> None:
    base = ["serve", "--guest-listen", f"127.0.0.1:{free_port()}", "--admin-listen", f"127.0.0.1:{free_port()}",
            "--db", str(tmp_path / "db")]  # fmt: skip
    token_file.chmod(0o644)
    assert "readable by other users" in run_cli(*base, "--admin-token-file", str(token_file)).stderr
    out = run_cli(*base, env={"PATH": "/usr/bin:/bin", "METADATA_SERVER_ADMIN_TOKEN": "short"})
    assert out.returncode == 2 and "at least 16" in out.stderr


def test_cli_port_in_use_is_one_clear_line(tmp_path: Path, token_file: Path) -> None:
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        out = run_cli("serve", "--guest-listen", f"127.0.0.1:{port}", "--admin-listen", f"127.0.0.1:{free_port()}",
                      "--db", str(tmp_path / "db"), "--admin-token-file", str(token_file))  # fmt: skip
    assert out.returncode == 3
    assert out.stderr.strip().splitlines() == [
        f"metadata-server: error: --guest-listen 127.0.0.1:{port}: address already in use"
    ]


def test_cli_unusable_state_file_is_one_clear_line(tmp_path: Path, token_file: Path) -> None:
    bad = tmp_path / "not-sqlite"
    bad.write_bytes(b"this is not a database" * 100)
    out = run_cli("serve", "--guest-listen", f"127.0.0.1:{free_port()}", "--admin-listen",
                  f"127.0.0.1:{free_port()}", "--db", str(bad), "--admin-token-file", str(token_file))  # fmt: skip
    assert out.returncode == 2
    assert "cannot open state file" in out.stderr and len(out.stderr.strip().splitlines()) == 1
    assert bad.read_bytes() == b"this is not a database" * 100  # nothing lost


def test_cli_help_explains_every_flag() -> None:
    out = run_cli("serve", "--help")
    assert out.returncode == 0
    for flag in ("--guest-listen", "--admin-listen", "--db", "--admin-token-file", "--admin-tls-cert",
                 "--insecure-admin", "--max-waits-per-droplet"):  # fmt: skip
        assert flag in out.stdout
