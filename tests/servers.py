"""The real metadata server, started through its CLI on loopback ports, for integration tests (the launcher
is the lab's, ``host_engine.lab.launch``; here: the strict stop and the leftover checks).

with MetadataServer.start(tmp_path) as ms:
    ms.register("d1", ["127.0.0.2"])
    ms.set_event("d1", "ev-1")
    subprocess.run(["curl", "--interface", "127.0.0.2", ms.guest_url + "/v1/maintenance_event"])
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Self

from host_engine.lab.launch import MetadataServerProcess, free_port

__all__ = [
    "BIN",
    "LEFTOVER_TIMEOUT_S",
    "MetadataServer",
    "curl",
    "free_port",
    "port_is_free",
    "session_processes",
]

# After `serve` has exited, however it was stopped, every process of its tree must be gone and both ports
# free within this time; `kill -9` included (the arbiters then stop gracefully, ~2 s).
LEFTOVER_TIMEOUT_S = 6.0
BIN = Path(sys.executable).parent / "metadata-server"


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


class MetadataServer(MetadataServerProcess):
    """The lab's launcher (``host_engine.lab.launch``), stopped the strict way: once ``serve`` has exited,
    nothing it started may be left and both ports must be free, else the test fails."""

    @classmethod
    @contextmanager
    def start(cls, workdir: Path, *extra_args: str) -> Iterator[Self]:
        with cls.running(workdir, *extra_args) as server:
            yield server

    def after_stop(self, session: int) -> None:
        self.assert_nothing_left(session)

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

    def kill9_and_restart(self) -> None:
        self.stop(signal.SIGKILL)
        self.launch()

    def wipe_and_restart(self) -> None:
        """A server that lost its state (a new disk, a reinstall)."""
        self.stop()
        for suffix in ("", "-wal", "-shm"):
            Path(str(self.db_path) + suffix).unlink(missing_ok=True)
        self.launch()


def curl(url: str, source: str, *args: str, timeout_s: float = 10) -> subprocess.CompletedProcess[bytes]:
    """``curl --interface SOURCE`` as a guest would run it; body on stdout, bytes exact."""
    return subprocess.run(
        ["curl", "-sS", "--noproxy", "*", "--interface", source, "--max-time", str(timeout_s), *args, url],
        capture_output=True,
        check=False,
        timeout=timeout_s + 5,
    )
