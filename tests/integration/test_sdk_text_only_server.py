"""The guest SDK against a plain DigitalOcean-style endpoint: a bare string, no ETag, no JSON (404 for .json).

Everything must still work, by polling. The server is http.server on loopback, written here, and records what
it was asked so the tests can check the SDK did not spin or invent long-polls.
"""

from __future__ import annotations

import http.server
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest

from guest_sdk import (
    EventKind,
    MaintenanceClient,
    MaintenanceEvent,
    NotOnDroplet,
    NotSupportedByServer,
    WaitTimeout,
)
from tests.servers import curl
from tests.support import require_binary

POLL_INTERVAL_S = 0.1
WAKE_BOUND_S = 1.0  # polling at 0.1 s notices a change well within this


@dataclass
class TextOnlyServer:
    """Answers GET /v1/maintenance_event with the current value for known addresses; 404 for all else.

    No do_POST: like any plain server it answers a POST with http.server's own 501.
    """

    values: dict[str, str] = field(default_factory=dict)  # source address -> body
    requests: list[tuple[str, str]] = field(default_factory=list)  # (source address, path with query)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def set(self, address: str, value: str) -> None:
        with self.lock:
            self.values[address] = value

    def handler(self) -> type[http.server.BaseHTTPRequestHandler]:
        state = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:
                address = self.client_address[0]
                with state.lock:
                    state.requests.append((address, self.path))
                    value = state.values.get(address)
                path = self.path.split("?", 1)[0]
                if path != "/v1/maintenance_event" or value is None:
                    self._answer(404, b"Not Found")
                    return
                self._answer(200, value.encode())

            def _answer(self, status: int, body: bytes) -> None:
                self.send_response(status)
                self.send_header("Content-Type", "text/plain")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: object) -> None:
                pass

        return Handler


@pytest.fixture
def plain() -> Iterator[tuple[TextOnlyServer, str]]:
    state = TextOnlyServer()
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), state.handler())
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield state, f"http://127.0.0.1:{httpd.server_port}"
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=5)


def _client(url: str, address: str) -> MaintenanceClient:
    return MaintenanceClient(url, source_address=address, poll_interval_s=POLL_INTERVAL_S)


@pytest.mark.parametrize(
    ("address", "body", "kind"),
    [
        ("127.0.0.31", "", EventKind.NONE),
        ("127.0.0.32", "live_migrate", EventKind.LIVE_MIGRATE),
        ("127.0.0.33", "offline_migrate\n", EventKind.OFFLINE_MIGRATE),
        ("127.0.0.34", "host_reboot", EventKind.OTHER),
    ],
)
def test_sdk_text_only_event_and_details(
    plain: tuple[TextOnlyServer, str], address: str, body: str, kind: EventKind
) -> None:
    state, url = plain
    state.set(address, body)
    require_binary("curl")
    printed = curl(url + "/v1/maintenance_event", address)
    with _client(url, address) as client:
        ev = client.event()
        details = client.details()
        assert client.supports_json is False
        assert client.event() == ev
    assert ev.raw.encode() == printed.stdout
    assert ev.kind is kind
    assert ev.etag is None
    assert details == MaintenanceEvent(kind=kind, raw=body)  # every field it cannot know is None


def test_sdk_text_only_unknown_address_is_not_on_droplet(plain: tuple[TextOnlyServer, str]) -> None:
    _, url = plain
    with _client(url, "127.0.0.39") as client:
        with pytest.raises(NotOnDroplet):
            client.event()
        with pytest.raises(NotOnDroplet):
            client.details()


def test_sdk_text_only_wait_by_polling(plain: tuple[TextOnlyServer, str]) -> None:
    state, url = plain
    address = "127.0.0.35"
    state.set(address, "")
    timer = threading.Timer(0.5, state.set, args=(address, "live_migrate"))
    with _client(url, address) as client:
        timer.start()
        started = time.monotonic()
        ev = client.wait(timeout_s=10)
        took = time.monotonic() - started
        timer.join()
        assert client.uses_long_poll  # never tried: there was no ETag to long-poll with
    assert ev.kind is EventKind.LIVE_MIGRATE
    assert took < 0.5 + WAKE_BOUND_S
    paths = [p for a, p in state.requests if a == address]
    assert all("wait_for_change" not in p for p in paths)
    assert paths.count("/v1/maintenance_event.json") == 1  # learnt once, then only the text endpoint
    # Paced by the interval: no hot loop (about one request per 0.1 s, bounded generously).
    assert len(paths) <= 2 + took / POLL_INTERVAL_S * 1.5


def test_sdk_text_only_wait_until_clear_and_timeout(plain: tuple[TextOnlyServer, str]) -> None:
    state, url = plain
    address = "127.0.0.36"
    state.set(address, "offline_migrate")
    with _client(url, address) as client:
        assert client.wait(timeout_s=1).kind is EventKind.OFFLINE_MIGRATE
        started = time.monotonic()
        with pytest.raises(WaitTimeout):
            client.wait_until_clear(timeout_s=1)
        assert 1.0 <= time.monotonic() - started < 1.0 + WAKE_BOUND_S
        threading.Timer(0.3, state.set, args=(address, "")).start()
        assert client.wait_until_clear(timeout_s=10).kind is EventKind.NONE


def test_sdk_text_only_watch(plain: tuple[TextOnlyServer, str]) -> None:
    state, url = plain
    address = "127.0.0.37"
    state.set(address, "")

    def engine() -> None:
        for value in ("live_migrate", "live_migrate", "offline_migrate", ""):
            time.sleep(0.4)
            state.set(address, value)

    thread = threading.Thread(target=engine)
    seen = []
    with _client(url, address) as client:
        thread.start()
        for ev in client.watch(timeout_s=10):
            seen.append(ev.kind)
            if len(seen) == 4:
                break
    thread.join(timeout=10)
    assert seen == [EventKind.NONE, EventKind.LIVE_MIGRATE, EventKind.OFFLINE_MIGRATE, EventKind.NONE]


def test_sdk_text_only_acknowledge_is_not_supported(plain: tuple[TextOnlyServer, str]) -> None:
    state, url = plain
    state.set("127.0.0.38", "live_migrate")
    with _client(url, "127.0.0.38") as client, pytest.raises(NotSupportedByServer):
        client.acknowledge("ev-1", "ready")


def test_sdk_text_only_cli(plain: tuple[TextOnlyServer, str]) -> None:
    state, url = plain
    state.set("127.0.0.40", "live_migrate\n")
    base = [sys.executable, "-m", "guest_sdk", "--url", url, "--source-address", "127.0.0.40"]
    proc = subprocess.run(base, capture_output=True, timeout=30, check=False)
    assert (proc.returncode, proc.stdout) == (10, b"live_migrate\n")
    proc = subprocess.run([*base, "--json"], capture_output=True, timeout=30, check=False)
    assert proc.returncode == 10
    assert b'"id": null' in proc.stdout
    proc = subprocess.run(
        [*base, "--wait-clear", "--timeout", "1", "--poll-interval", "0.2"],
        capture_output=True,
        timeout=30,
        check=False,
    )
    assert proc.returncode == 1
    assert b"timed out" in proc.stderr
