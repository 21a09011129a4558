"""The real daemons as child processes on loopback: ``metadata-server serve`` and ``guest-agent run``.

One launcher for the demo, the tests and the benchmarks::

    with MetadataServerProcess.running(workdir) as server:      # free ports, a fresh admin token
        server.register("d1", ["127.0.0.2"])
        agent = GuestAgentProcess(workdir / "agent", workdir / "agent" / "config.toml")
        agent.write_config(agent_config(metadata={"url": server.guest_url, "source_address": "127.0.0.2"}))
        agent.start()
        ...
        agent.stop()

Each child leads its own session (a Ctrl-C at a terminal reaches only the parent, which stops them), gets
an environment without proxies or the daemons' override variables, and writes its output to a log file in
its working directory. ``stop`` signals the daemon alone, as a supervisor would, and SIGKILLs whatever is
left of its process group afterwards (``after_stop``; the tests check instead that nothing is left).
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Self

import requests

from host_engine.errors import HostEngineError
from host_engine.metadata.client import AdminClient

START_TIMEOUT_S = 20.0
# A daemon gets this long to exit after its signal, then its process group is killed.
STOP_TIMEOUT_S = 15.0
# A guest agent may be waiting for a hook to finish when told to stop.
AGENT_STOP_TIMEOUT_S = 30.0
POLL_S = 0.05
ADMIN_TIMEOUT_S = 5.0


class LaunchFailed(HostEngineError):
    """A daemon could not be started (not installed, exited, never answered)."""


def bin_path(name: str) -> str:
    """The console script ``name`` next to this Python (the venv), else on PATH."""
    beside = Path(sys.executable).parent / name
    if beside.exists():
        return str(beside)
    found = shutil.which(name)
    if found is None:
        raise LaunchFailed(
            f"`{name}` not found next to {sys.executable} or on PATH (pip install -e '.[host]')"
        )
    return found


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def clean_env() -> dict[str, str]:
    """The environment for children: no proxies, none of the agent's, server's or engine's override
    variables."""
    drop = ("GUEST_AGENT_", "METADATA_SERVER_", "HOST_ENGINE_")
    env = {k: v for k, v in os.environ.items() if not k.startswith(drop)}
    env["NO_PROXY"] = env["no_proxy"] = "127.0.0.1,localhost"
    return env


def spawn(argv: Sequence[str], log_path: Path) -> subprocess.Popen[bytes]:
    """Start ``argv`` as the leader of a new session, its output appended to ``log_path``."""
    with log_path.open("ab") as log_file:
        return subprocess.Popen(
            list(argv), stdout=log_file, stderr=log_file, start_new_session=True, env=clean_env()
        )


def signal_group(proc: subprocess.Popen[bytes], sig: int = signal.SIGTERM) -> None:
    """Signal the child's process group (it leads one), if the child still runs."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)


def kill_group(leader: int) -> None:
    """SIGKILL whatever is left of the process group ``leader`` led."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(leader, signal.SIGKILL)


def stop_process(proc: subprocess.Popen[bytes], sig: int, timeout_s: float) -> int:
    """Send ``sig`` to the child alone, wait ``timeout_s`` for it, then SIGKILL its group; its exit code."""
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            kill_group(proc.pid)
            proc.wait(timeout_s)
    return proc.returncode


def reap(proc: subprocess.Popen[bytes], timeout_s: float = STOP_TIMEOUT_S) -> None:
    """Wait for a signalled child, then SIGKILL whatever is left of its group."""
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout_s)
    kill_group(proc.pid)
    if proc.poll() is None:
        proc.wait(timeout_s)


def _tail(path: Path, chars: int = 2000) -> str:
    return path.read_text(errors="replace")[-chars:] if path.exists() else ""


# ---- metadata-server serve -----------------------------------------------------------------------------


@dataclass
class MetadataServerProcess:
    """``metadata-server serve`` on two loopback ports, its state, token and log in ``workdir``.

    Ports 0 and an empty token are chosen at the first ``launch`` (free ports, a random token written to
    ``token_file``, mode 0600); ``extra_args`` go to ``serve`` as they are (``--workers 4``, TLS);
    ``program`` is the executable (default: this environment's ``metadata-server``; a benchmark may measure a
    patched copy).
    """

    workdir: Path
    guest_port: int = 0
    admin_port: int = 0
    token: str = ""
    extra_args: list[str] = field(default_factory=list)
    proc: subprocess.Popen[bytes] | None = None
    program: str = ""

    @classmethod
    @contextlib.contextmanager
    def running(cls, workdir: Path, *extra_args: str, program: str = "") -> Iterator[Self]:
        """A server on free ports for the length of the ``with`` block."""
        server = cls(workdir, extra_args=list(extra_args), program=program)
        server.launch()
        try:
            yield server
        finally:
            server.stop()

    # ---- where it is ----------------------------------------------------------------------------------

    @property
    def token_file(self) -> Path:
        return self.workdir / "admin-token"

    @property
    def db_path(self) -> Path:
        return self.workdir / "state.sqlite3"

    @property
    def log_path(self) -> Path:
        return self.workdir / "server.log"

    @property
    def guest_url(self) -> str:
        return f"http://127.0.0.1:{self.guest_port}"

    @property
    def tls_cert(self) -> str | None:
        """The admin listener's certificate (``--admin-tls-cert``): clients verify against it."""
        args = self.extra_args
        return args[args.index("--admin-tls-cert") + 1] if "--admin-tls-cert" in args else None

    @property
    def admin_url(self) -> str:
        scheme = "https" if self.tls_cert else "http"
        return f"{scheme}://127.0.0.1:{self.admin_port}"

    def argv(self) -> list[str]:
        return [
            self.program or bin_path("metadata-server"), "serve",
            "--guest-listen", f"127.0.0.1:{self.guest_port}",
            "--admin-listen", f"127.0.0.1:{self.admin_port}",
            "--db", str(self.db_path),
            "--admin-token-file", str(self.token_file),
            *self.extra_args,
        ]  # fmt: skip

    # ---- lifecycle ------------------------------------------------------------------------------------

    def _prepare(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        if not self.guest_port:
            self.guest_port = free_port()
        if not self.admin_port:
            self.admin_port = free_port()
        if not self.token:
            self.token = secrets.token_hex(16)
        if not self.token_file.exists() or self.token_file.read_text() != self.token:
            self.token_file.write_text(self.token)
            self.token_file.chmod(0o600)

    def launch(self) -> None:
        """Start ``serve``, wait until both listeners answer (``LaunchFailed`` if it exits or never does)."""
        self._prepare()
        self.proc = proc = spawn(self.argv(), self.log_path)
        deadline = time.monotonic() + START_TIMEOUT_S
        while not self.up():
            if proc.poll() is not None:
                self.proc = None
                raise LaunchFailed(f"metadata-server exited {proc.returncode}: {_tail(self.log_path)}")
            if time.monotonic() > deadline:
                self.stop()
                raise LaunchFailed(f"metadata-server did not come up: {_tail(self.log_path)}")
            time.sleep(POLL_S)

    def up(self) -> bool:
        """Both listeners answer: the admin health check with the token, the guest endpoint at all."""
        try:
            admin = self.admin("GET", "/healthz", timeout=1)
            guest = requests.get(self.guest_url + "/v1/maintenance_event", timeout=1)
        except requests.RequestException:
            return False
        return admin.status_code == 200 and guest.status_code in (200, 404)

    def stop(self, sig: int = signal.SIGTERM, timeout_s: float = STOP_TIMEOUT_S) -> int | None:
        """Signal ``serve`` alone (as a supervisor would) and wait for it; then ``after_stop``. Its exit code
        (None if it was not running)."""
        if self.proc is None:
            return None
        proc, self.proc = self.proc, None
        code = stop_process(proc, sig, timeout_s)
        self.after_stop(proc.pid)
        return code

    def after_stop(self, session: int) -> None:
        """What is done once ``serve`` (which led ``session``) has exited: kill whatever it left behind."""
        kill_group(session)

    def restart(self) -> None:
        self.stop()
        self.launch()

    # ---- its admin API --------------------------------------------------------------------------------

    def client(self) -> AdminClient:
        """The engine's admin client for this server."""
        return AdminClient(self.admin_url, self.token, timeout_s=ADMIN_TIMEOUT_S, attempts=3)

    def admin(
        self, method: str, path: str, *, json: Any = None, timeout: float = ADMIN_TIMEOUT_S, **kw: Any
    ) -> requests.Response:
        """One raw admin request with the token (the response as it is, for status codes and bodies)."""
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


# ---- guest-agent run -----------------------------------------------------------------------------------


def toml_value(value: object) -> str:
    """A TOML literal for the agent's config: booleans, strings, numbers, lists of them."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    return str(value)


def agent_config(
    *,
    metadata: Mapping[str, object],
    agent: Mapping[str, object] | None = None,
    hooks: Mapping[str, Sequence[Mapping[str, object]]] | None = None,
) -> str:
    """A ``guest-agent`` config file: its ``[metadata]`` and ``[agent]`` tables, then each phase's hooks as
    an array of tables (``{"on_notice": [{"name": ..., "command": [...]}]}``)."""
    lines = ["[metadata]", *(f"{k} = {toml_value(v)}" for k, v in metadata.items())]
    lines += ["", "[agent]", *(f"{k} = {toml_value(v)}" for k, v in (agent or {}).items())]
    for phase, items in (hooks or {}).items():
        for item in items:
            lines += ["", f"[[{phase}]]", *(f"{k} = {toml_value(v)}" for k, v in item.items())]
    return "\n".join(lines) + "\n"


@dataclass
class GuestAgentProcess:
    """``guest-agent run --config config_path``, its log in ``workdir`` (and, by convention, its journal)."""

    workdir: Path
    config_path: Path
    proc: subprocess.Popen[bytes] | None = None

    @property
    def log_path(self) -> Path:
        return self.workdir / "agent.log"

    @property
    def journal_path(self) -> Path:
        return self.workdir / "journal.json"

    def write_config(self, text: str) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(text)

    def start(self) -> Self:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.proc = spawn([bin_path("guest-agent"), "run", "--config", str(self.config_path)], self.log_path)
        return self

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def started(self) -> bool:
        """It logged its start line (it reads its config and journal first)."""
        return "guest-agent started" in self.log()

    def stop(self, sig: int = signal.SIGTERM, timeout_s: float = AGENT_STOP_TIMEOUT_S) -> int | None:
        """Signal the agent alone and wait for it (its hooks run in sessions of their own). Its exit code."""
        if self.proc is None:
            return None
        proc, self.proc = self.proc, None
        code = stop_process(proc, sig, timeout_s)
        kill_group(proc.pid)
        return code

    def kill9(self) -> None:
        """``kill -9`` the agent only (a hook it runs, if any, is left to finish as after a real crash)."""
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait(STOP_TIMEOUT_S)
            self.proc = None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def journal(self) -> dict[str, Any]:
        """The agent's journal as it is on disk (empty while it has none or is rewriting it)."""
        try:
            doc: dict[str, Any] = json.loads(self.journal_path.read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return {"events": {}, "active": None}
        return doc

    def event(self, event_id: str) -> dict[str, Any] | None:
        ev: dict[str, Any] | None = self.journal().get("events", {}).get(event_id)
        return ev

    def hook_outcome(self, event_id: str, phase: str, name: str) -> str | None:
        """The journal's outcome of hook ``phase/name`` for the event (None: not recorded)."""
        ev = self.event(event_id)
        rec = (ev or {}).get("hooks", {}).get(f"{phase}/{name}")
        return rec.get("outcome") if rec else None
