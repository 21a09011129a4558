"""The real metadata server, started through its CLI on loopback ports, for integration tests.

with MetadataServer.start(tmp_path) as ms:
    ms.register("d1", ["127.0.0.2"])
    ms.set_event("d1", "ev-1")
    subprocess.run(["curl", "--interface", "127.0.0.2", ms.guest_url + "/v1/maintenance_event"])
"""

from __future__ import annotations

import contextlib
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import requests

START_TIMEOUT_S = 20.0
# After `serve` has exited, however it was stopped, every process of its tree must be gone and both ports
# free within this time; `kill -9` included (the arbiters then stop gracefully, ~2 s).
LEFTOVER_TIMEOUT_S = 6.0
BIN = Path(sys.executable).parent / "metadata-server"


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def port_is_free(port: int, host: str = "127.0.0.1") -> bool:
    """Nothing listens on the port (connections left in TIME_WAIT do not count, as for the server)."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
        return True


def session_processes(session_id: int) -> dict[int, str]:
    """Live (not zombie) processes of a session, pid -> command line; orphans keep their session id."""
    found: dict[int, str] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
        except OSError:
            continue  # ended meanwhile
        fields = stat.rsplit(")", 1)[1].split()
        state, session = fields[0], int(fields[3])
        if session == session_id and state not in ("Z", "X"):
            found[int(entry)] = cmdline.replace(b"\0", b" ").decode(errors="replace").strip()
    return found


@dataclass
class MetadataServer:
    workdir: Path
    guest_port: int
    admin_port: int
    token: str
    extra_args: list[str] = field(default_factory=list)
    proc: subprocess.Popen[bytes] | None = None

    @classmethod
    @contextmanager
    def start(cls, workdir: Path, *extra_args: str) -> Iterator[MetadataServer]:
        workdir.mkdir(parents=True, exist_ok=True)
        server = cls(workdir, free_port(), free_port(), secrets.token_hex(16), list(extra_args))
        server.token_file.write_text(server.token)
        server.token_file.chmod(0o600)
        server.launch()
        try:
            yield server
        finally:
            server.stop()

    # ---- addresses ------------------------------------------------------------------------------------

    @property
    def token_file(self) -> Path:
        return self.workdir / "admin-token"

    @property
    def db_path(self) -> Path:
        return self.workdir / "state.sqlite3"

    @property
    def guest_url(self) -> str:
        return f"http://127.0.0.1:{self.guest_port}"

    @property
    def tls_cert(self) -> str | None:
        """The admin listener's certificate when started with ``--admin-tls-cert``: clients verify against it."""
        args = self.extra_args
        return args[args.index("--admin-tls-cert") + 1] if "--admin-tls-cert" in args else None

    @property
    def admin_url(self) -> str:
        scheme = "https" if self.tls_cert else "http"
        return f"{scheme}://127.0.0.1:{self.admin_port}"

    @property
    def log_path(self) -> Path:
        return self.workdir / "server.log"

    def argv(self) -> list[str]:
        return [
            str(BIN), "serve",
            "--guest-listen", f"127.0.0.1:{self.guest_port}",
            "--admin-listen", f"127.0.0.1:{self.admin_port}",
            "--db", str(self.db_path),
            "--admin-token-file", str(self.token_file),
            *self.extra_args,
        ]  # fmt: skip

    # ---- lifecycle ------------------------------------------------------------------------------------

    def launch(self) -> None:
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen(self.argv(), stdout=log, stderr=log, start_new_session=True)
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"metadata-server exited {self.proc.returncode}: {self.log_path.read_text()}"
                )
            try:
                if self.admin("GET", "/healthz", timeout=1).status_code == 200 and self._guest_up():
                    return
            except requests.RequestException:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"metadata-server did not come up: {self.log_path.read_text()}")
            time.sleep(0.05)

    def _guest_up(self) -> bool:
        r = requests.get(self.guest_url + "/v1/maintenance_event", timeout=1)
        return r.status_code in (200, 404)

    def stop(self, sig: int = signal.SIGTERM, timeout_s: float = 15) -> int | None:
        """Signal `serve` alone (as a supervisor would), wait for it, then check nothing of it is left."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        code = self.proc.returncode
        session = self.proc.pid
        self.proc = None
        self.assert_nothing_left(session)
        return code

    def assert_nothing_left(self, session: int) -> None:
        """Every process `serve` started has ended and both ports are free, or fail (after killing them)."""
        deadline = time.monotonic() + LEFTOVER_TIMEOUT_S
        while True:
            left = session_processes(session)
            bound = [p for p in (self.guest_port, self.admin_port) if not port_is_free(p)]
            if not left and not bound:
                return
            if time.monotonic() > deadline:
                break
            time.sleep(0.05)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(session, signal.SIGKILL)  # clean up for the next test, then report
        raise AssertionError(
            f"{LEFTOVER_TIMEOUT_S:.0f} s after metadata-server serve (pid {session}) ended, "
            f"still running: {left or 'nothing'}; ports still bound: {bound or 'none'}"
        )

    def restart(self) -> None:
        self.stop()
        self.launch()

    def kill9_and_restart(self) -> None:
        self.stop(signal.SIGKILL)
        self.launch()

    def wipe_and_restart(self) -> None:
        """A server that lost its state (a new disk, a reinstall)."""
        self.stop()
        for suffix in ("", "-wal", "-shm"):
            Path(str(self.db_path) + suffix).unlink(missing_ok=True)
        self.launch()

    # ---- admin API ------------------------------------------------------------------------------------

    def admin(
        self, method: str, path: str, *, json: Any = None, timeout: float = 5, **kw: Any
    ) -> requests.Response:
        headers = {"Authorization": f"Bearer {self.token}", **kw.pop("headers", {})}
        kw.setdefault("verify", self.tls_cert or True)
        return requests.request(
            method, self.admin_url + path, json=json, headers=headers, timeout=timeout, **kw
        )

    def register(self, droplet_id: str, addresses: list[str], **fields: Any) -> requests.Response:
        r = self.admin("PUT", f"/admin/v1/droplets/{droplet_id}", json={"addresses": addresses, **fields})
        r.raise_for_status()
        return r

    def set_event(
        self,
        droplet_id: str,
        event_id: str,
        event: str = "live_migrate",
        state: str = "scheduled",
        not_before: str | None = None,
        deadline: str | None = None,
    ) -> requests.Response:
        body: dict[str, Any] = {"id": event_id, "event": event, "state": state}
        if not_before is not None:
            body["not_before"] = not_before
        if deadline is not None:
            body["deadline"] = deadline
        r = self.admin("PUT", f"/admin/v1/droplets/{droplet_id}/maintenance", json=body)
        r.raise_for_status()
        return r

    def clear_event(self, droplet_id: str) -> requests.Response:
        r = self.admin("DELETE", f"/admin/v1/droplets/{droplet_id}/maintenance")
        r.raise_for_status()
        return r


def curl(url: str, source: str, *args: str, timeout_s: float = 10) -> subprocess.CompletedProcess[bytes]:
    """``curl --interface SOURCE`` as a guest would run it; body on stdout, bytes exact."""
    return subprocess.run(
        ["curl", "-sS", "--noproxy", "*", "--interface", source, "--max-time", str(timeout_s), *args, url],
        capture_output=True,
        check=False,
        timeout=timeout_s + 5,
    )
