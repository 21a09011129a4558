"""``host-engine run`` as a real process: it sends a notice on time through a real metadata server, and
SIGTERM ends it cleanly."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from tests.servers import MetadataServer, curl
from tests.support import require_binary

BIN = Path(sys.executable).parent / "host-engine"


def he(db: Path, *args: str) -> subprocess.CompletedProcess[str]:
    r = subprocess.run(
        [str(BIN), "--db", str(db), *args], capture_output=True, text=True, timeout=60, check=False
    )
    assert r.returncode == 0, (args, r.stdout, r.stderr)
    return r


def test_engine_run_process_notifies_then_stops_on_sigterm(tmp_path: Path) -> None:
    require_binary("curl")
    db = tmp_path / "engine.db"
    with MetadataServer.start(tmp_path / "ms") as ms:
        for name in ("hv1", "hv2"):
            he(db, "host", "add", name, "--datacenter", "lo", "--vcpus", "4", "--memory", "8GiB", "--disk", "100GiB",
               "--metadata-url", ms.admin_url, "--metadata-token-file", str(ms.token_file))  # fmt: skip
        he(db, "droplet", "add", "web1", "--host", "hv1", "--vcpus", "1", "--memory", "1GiB", "--disk", "10GiB",
           "--address", "127.0.6.1")  # fmt: skip
        # Notice in ~4 s (start in 14 s, 10 s notice: explicitly unsafe, as only demos and tests may).
        he(db, "evacuate", "hv1", "--start", "+14s", "--notice", "10s", "--unsafe-short-notice")
        log = (tmp_path / "engine.log").open("w")
        proc = subprocess.Popen(
            [str(BIN), "--db", str(db), "run", "--poll-interval", "200ms"], stdout=log, stderr=log
        )
        try:
            deadline = time.monotonic() + 30
            seen = b""
            while time.monotonic() < deadline:
                seen = curl(ms.guest_url + "/v1/maintenance_event", "127.0.6.1").stdout
                if seen == b"live_migrate":
                    break
                time.sleep(0.2)
            assert seen == b"live_migrate", (tmp_path / "engine.log").read_text()
            status = he(db, "status").stdout
            assert "notified" in status
            os.kill(proc.pid, signal.SIGTERM)
            assert proc.wait(timeout=10) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            log.close()
        text = (tmp_path / "engine.log").read_text()
        assert "received SIGTERM" in text and "engine stopped" in text
