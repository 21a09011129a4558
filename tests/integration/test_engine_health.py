"""``host-engine run --metrics-listen`` as a real process (SQLite, the simulated hypervisor, a real metadata
server; PostgreSQL for the store outage): ``/livez`` and ``/readyz`` answer ``ok``/503 without a token and say
nothing else; ``/metrics`` carries the last successful tick and one ``up`` gauge per metadata server, which
goes to 0 within a bound once that server stops and back to 1 when it returns; hostile requests to the
listener get one line each, no traceback, and the engine goes on."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import requests

from host_engine.models import Droplet, Host
from host_engine.store import Store
from tests import pg
from tests.fleet import engine_run
from tests.integration.test_fleet_outage import start_server, stop_server
from tests.servers import MetadataServer, free_port

GIB = 1024**3
WAIT_S = 20.0
# A stopped metadata server shows as down within: the probe's period (10 s) and half of it, one request's
# retries against a refused port (~2 s), and room for a slow machine.
UP_GAUGE_BOUND_S = 40.0
UP = "host_engine_metadata_server_up"
TICK = "host_engine_last_successful_tick_timestamp_seconds"


def http() -> requests.Session:
    session = requests.Session()
    session.trust_env = False  # loopback only, never a proxy from the environment
    return session


def sample(text: str, name: str, **labels: str) -> float | None:
    wanted = "{" + ",".join(f'{k}="{v}"' for k, v in sorted(labels.items())) + "}" if labels else ""
    for line in text.splitlines():
        if line.startswith(name + wanted + " "):
            return float(line.rsplit(" ", 1)[1])
    return None


def wait_for(what: str, check: Callable[[], bool], log: Path, timeout_s: float = WAIT_S) -> float:
    """Seconds it took for ``check()`` to hold."""
    started = time.monotonic()
    while time.monotonic() - started < timeout_s:
        if check():
            return time.monotonic() - started
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}\n{log.read_text()[-4000:]}")


def add_host(db: str, name: str, url: str, token_file: Path) -> None:
    store = Store.open(db)
    try:
        store.add_host(
            Host(name=name, datacenter="lo", vcpus=16, memory_bytes=64 * GIB, disk_bytes=1024 * GIB,
                 metadata_url=url, metadata_token_file=str(token_file))
        )  # fmt: skip
    finally:
        store.close()


def setup_fleet(db: str, ms: MetadataServer) -> None:
    """hv1, hv2 served by ``ms``, web1 on hv1."""
    add_host(db, "hv1", ms.admin_url, ms.token_file)
    add_host(db, "hv2", ms.admin_url, ms.token_file)
    store = Store.open(db)
    try:
        store.add_droplet(
            Droplet(id="web1", host="hv1", vcpus=1, memory_bytes=GIB, disk_bytes=4 * GIB, addresses=("127.0.7.1",))
        )  # fmt: skip
    finally:
        store.close()


def run_options(port: int) -> tuple[str, ...]:
    """``run`` on the simulated hypervisor, polling every 200 ms, its metrics on ``port``."""
    return ("--driver", "sim", "--poll-interval", "200ms", "--metrics-listen", f"127.0.0.1:{port}",
            "--worker", "w-health")  # fmt: skip


def stop(proc: subprocess.Popen[bytes], log: Path) -> None:
    os.kill(proc.pid, signal.SIGTERM)
    assert proc.wait(timeout=15) == 0, log.read_text()[-4000:]
    assert "Traceback" not in log.read_text(), log.read_text()[-4000:]


def raw(port: int, data: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(data)
        chunks = []
        while chunk := s.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


def test_run_serves_probes_tick_and_up_gauges_and_a_stopped_server_goes_down(tmp_path: Path) -> None:
    db, log = str(tmp_path / "engine.db"), tmp_path / "engine.log"
    port, dead_port = free_port(), free_port()
    dead_label = f"http://127.0.0.1:{dead_port}"
    base = f"http://127.0.0.1:{port}"
    s = http()
    with MetadataServer.start(tmp_path / "ms") as ms:
        setup_fleet(db, ms)
        with engine_run(db, log, *run_options(port)) as proc:

            def metrics() -> str:
                return s.get(base + "/metrics", timeout=5).text

            def ready() -> bool:
                try:
                    return s.get(base + "/readyz", timeout=5).status_code == 200
                except requests.ConnectionError:
                    return False  # not listening yet

            wait_for("/readyz", ready, log)
            for path in ("/livez", "/readyz"):
                r = s.get(base + path, timeout=5)
                assert (r.status_code, r.text, r.headers["Content-Type"]) == (
                    200,
                    "ok\n",
                    "text/plain; charset=utf-8",
                )
            wait_for("the server's gauge", lambda: sample(metrics(), UP, server=ms.admin_url) == 1, log)
            wait_for("a successful tick", lambda: sample(metrics(), TICK, worker="w-health") is not None, log)
            text = metrics()
            last_tick = sample(text, TICK, worker="w-health")
            assert last_tick is not None and abs(last_tick - time.time()) < 60
            assert (sample(text, "host_engine_tick_duration_seconds_count") or 0) >= 1
            assert sample(text, "host_engine_store_up") == 1  # the executor's metrics are still there

            # The metadata server stops while the engine has nothing to tell it (reconciled a moment ago, no
            # notice due): its gauge drops within the bound all the same; the engine stays alive and ready.
            ms.stop()
            took = wait_for(
                "the stopped server's gauge to drop",
                lambda: sample(metrics(), UP, server=ms.admin_url) == 0,
                log,
                UP_GAUGE_BOUND_S,
            )
            assert took < UP_GAUGE_BOUND_S
            assert s.get(base + "/livez", timeout=5).text == "ok\n"
            assert s.get(base + "/readyz", timeout=5).text == "ok\n"
            later = sample(metrics(), TICK, worker="w-health")
            assert later is not None and later > last_tick  # ticks still succeed without the server
            ms.launch()
            wait_for(
                "the server's gauge back to 1",
                lambda: sample(metrics(), UP, server=ms.admin_url) == 1,
                log,
                UP_GAUGE_BOUND_S,
            )

            # A host added meanwhile names a server that is not there, with credentials in its URL: its gauge
            # appears, at 0, labelled without them.
            add_host(db, "hv3", f"http://engine:hunter2@127.0.0.1:{dead_port}/", ms.token_file)
            wait_for("the new server's gauge", lambda: sample(metrics(), UP, server=dead_label) == 0, log)
            text = metrics()
            assert "hunter2" not in text and "engine@" not in text  # the URL's credentials are not a label
            assert sample(text, UP, server=ms.admin_url) == 1

            # Hostile requests: one line each, nothing of the request or the software echoed.
            answers = {
                "unknown path": raw(port, b"GET /admin HTTP/1.1\r\nHost: x\r\n\r\n"),
                "POST": raw(port, b"POST /metrics HTTP/1.1\r\nContent-Length: 2\r\n\r\n{}"),
                "huge header": raw(port, b"GET /metrics HTTP/1.1\r\nX-A: " + b"a" * 100_000 + b"\r\n\r\n"),
                "many headers": raw(
                    port,
                    b"GET /livez HTTP/1.1\r\n" + b"".join(b"X-%d: 1\r\n" % i for i in range(500)) + b"\r\n",
                ),
                "garbage": raw(port, b"\x00\x01\x02 <script>alert(1)</script>\r\n\r\n"),
            }
            expected = {
                "unknown path": b"404 Not Found\n",
                "POST": b"405 Method Not Allowed\n",
                "huge header": b"431 Request Header Fields Too Large\n",
                "many headers": b"431 Request Header Fields Too Large\n",
                "garbage": b"400 Bad Request\n",
            }
            for what, answer in answers.items():
                body = answer.rpartition(b"\r\n\r\n")[2]
                assert body == expected[what], (what, answer[:500])
                for leak in (b"Python", b"BaseHTTP", b"<html", b"script", b"aaaa"):
                    assert leak not in answer, (what, answer[:500])
            assert "Allow: GET, HEAD" in answers["POST"].decode()
            assert s.get(base + "/livez", timeout=5).text == "ok\n"  # still serving
            assert proc.poll() is None
            stop(proc, log)


pg_server = pg.pg_server  # the module's own server: the test stops and starts it


@pytest.mark.postgres
def test_readyz_is_503_while_the_store_is_away_and_livez_stays_ok(
    pg_server: pg.PostgresServer, tmp_path: Path
) -> None:
    url, log = pg_server.new_database(), tmp_path / "engine.log"
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    s = http()

    def status(path: str) -> tuple[int, str]:
        try:
            r = s.get(base + path, timeout=10)
        except requests.ConnectionError:
            return 0, ""
        return r.status_code, r.text

    with engine_run(url, log, *run_options(port)) as proc:
        wait_for("/readyz", lambda: status("/readyz") == (200, "ok\n"), log)
        stop_server(pg_server)
        try:
            wait_for("/readyz to say not ready", lambda: status("/readyz") == (503, "not ready\n"), log)
            # The loop rides the outage out: alive, so a watchdog does not restart it.
            time.sleep(2)
            assert status("/livez") == (200, "ok\n")
            assert proc.poll() is None
        finally:
            start_server(pg_server)
        wait_for("/readyz to be ok again", lambda: status("/readyz") == (200, "ok\n"), log, 60)
        stop(proc, log)
