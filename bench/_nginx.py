"""A private nginx for benchmarks: own config, pid file, logs and temp dirs in a temp dir, own loopback port.

with Nginx.start(port, body=b"live_migrate") as ng:
    ...  # http://127.0.0.1:port/v1/maintenance_event answers the body
"""

from __future__ import annotations

import contextlib
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

CONFIG = """\
worker_processes {workers};
daemon off;
master_process on;
pid {dir}/nginx.pid;
error_log {dir}/error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {dir}/client_body;
    proxy_temp_path {dir}/proxy;
    keepalive_requests 10000000;
    keepalive_timeout 75s;
    server {{
        listen 127.0.0.1:{port} backlog=2048;
        location = {path} {{
            default_type "text/plain; charset=utf-8";
            add_header Cache-Control no-store;
            return 200 "{body}";
        }}
    }}
}}
"""


@dataclass
class Nginx:
    port: int
    proc: subprocess.Popen[bytes]
    workdir: Path

    @classmethod
    @contextlib.contextmanager
    def start(
        cls, port: int, body: str = "live_migrate", path: str = "/v1/maintenance_event", workers: int = 2
    ) -> Iterator[Nginx]:
        binary = shutil.which("nginx") or "/usr/sbin/nginx"
        workdir = Path(tempfile.mkdtemp(prefix="bench-nginx-"))
        conf = workdir / "nginx.conf"
        conf.write_text(CONFIG.format(workers=workers, dir=workdir, port=port, path=path, body=body))
        log = (workdir / "stderr.log").open("wb")
        proc = subprocess.Popen(
            [binary, "-p", str(workdir), "-c", str(conf), "-e", str(workdir / "error.log")],
            stdout=log,
            stderr=log,
            start_new_session=True,
        )
        ng = cls(port, proc, workdir)
        try:
            ng._wait_up()
            yield ng
        finally:
            ng.stop()
            shutil.rmtree(workdir, ignore_errors=True)

    def _wait_up(self, timeout_s: float = 10) -> None:
        deadline = time.monotonic() + timeout_s
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"nginx exited {self.proc.returncode}: {self.logs()}")
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", self.port), 0.5):
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"nginx did not come up: {self.logs()}")
            time.sleep(0.05)

    def logs(self) -> str:
        parts = []
        for name in ("stderr.log", "error.log"):
            with contextlib.suppress(OSError):
                parts.append((self.workdir / name).read_text())
        return "\n".join(parts)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)  # fast shutdown: no waiting for idle keep-alives
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
