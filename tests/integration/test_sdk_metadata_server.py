"""The guest SDK against the real metadata server on loopback: each simulated droplet has its own 127.0.0.N.

The SDK must report exactly what `curl --interface 127.0.0.N` prints, wake on an admin change within a second,
and keep telling the caller about a known event while the server is down.
"""

from __future__ import annotations

import itertools
import json
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from guest_sdk import (
    EventConflict,
    EventKind,
    MaintenanceClient,
    MaintenanceEvent,
    MetadataUnavailable,
    NotOnDroplet,
    WaitTimeout,
)
from guest_sdk.models import normalize_etag
from tests.servers import MetadataServer, curl
from tests.support import require, require_binary

# The admin API answers once the change is committed; the guest workers pick it up a few ms later (they
# watch the store), so a test reads a change it just made with wait(), never with an immediate event().
VISIBLE_WITHIN_S = 5.0

# droplet id -> (its source address, what the engine set: None or (event id, event, state, not_before))
DROPLETS: dict[str, tuple[str, tuple[str, str, str, str | None] | None]] = {
    "d2": ("127.0.0.2", None),
    "d3": ("127.0.0.3", ("ev-3", "live_migrate", "scheduled", "2026-12-01T02:00:00Z")),
    "d4": ("127.0.0.4", ("ev-4", "live_migrate", "in_progress", None)),
    "d5": ("127.0.0.5", ("ev-5:offline", "offline_migrate", "scheduled", "2026-12-01T03:30:00Z")),
}
WAKE_BOUND_S = 1.0  # a long-poll wakes on the change: far less than a poll interval


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MetadataServer]:
    require(Path(sys.executable).parent.joinpath("metadata-server").exists(), "metadata-server not installed")
    with MetadataServer.start(tmp_path_factory.mktemp("metadata")) as ms:
        for droplet_id, (address, event) in DROPLETS.items():
            ms.register(droplet_id, [address], hostname=f"web-{droplet_id}")
            if event is not None:
                event_id, kind, state, not_before = event
                ms.set_event(droplet_id, event_id, event=kind, state=state, not_before=not_before)
        for address, event in DROPLETS.values():
            with MaintenanceClient(ms.guest_url, source_address=address) as client:
                if event is not None:
                    assert client.wait(timeout_s=VISIBLE_WITHIN_S).id == event[0]
        yield ms


_next_address = itertools.count(20)


@pytest.fixture
def droplet(server: MetadataServer) -> Iterator[tuple[str, str]]:
    """A fresh droplet with no event on its own address (127.0.0.20 and up), removed afterwards."""
    n = next(_next_address)
    droplet_id, address = f"t{n}", f"127.0.0.{n}"
    server.register(droplet_id, [address])
    with MaintenanceClient(server.guest_url, source_address=address) as client:
        give_up = time.monotonic() + VISIBLE_WITHIN_S
        while True:
            try:
                client.event()
                break
            except NotOnDroplet:
                assert time.monotonic() < give_up, "registration never became visible to the guest"
                time.sleep(0.01)
    yield droplet_id, address
    server.admin("DELETE", f"/admin/v1/droplets/{droplet_id}")


def _client(server: MetadataServer, address: str, **kwargs: object) -> MaintenanceClient:
    return MaintenanceClient(server.guest_url, source_address=address, **kwargs)  # type: ignore[arg-type]


def _curl(server: MetadataServer, path: str, address: str, *args: str) -> subprocess.CompletedProcess[bytes]:
    require_binary("curl")
    return curl(server.guest_url + path, address, *args)


def _headers(raw: bytes) -> dict[str, str]:
    head = raw.split(b"\r\n\r\n", 1)[0].decode("latin-1").split("\r\n")[1:]
    return {k.strip().lower(): v.strip() for k, v in (line.split(":", 1) for line in head if ":" in line)}


@pytest.mark.parametrize("droplet_id", sorted(DROPLETS))
def test_sdk_event_equals_what_curl_prints(server: MetadataServer, droplet_id: str) -> None:
    address, expected = DROPLETS[droplet_id]
    printed = _curl(server, "/v1/maintenance_event", address)
    assert printed.returncode == 0, printed.stderr
    with _client(server, address) as client:
        ev = client.event()
    assert ev.raw.encode() == printed.stdout  # byte for byte
    assert ev.kind is EventKind.from_value(printed.stdout.decode().strip())
    assert ev.kind is (EventKind.NONE if expected is None else EventKind.from_value(expected[1]))
    # The same ETag curl sees in the header.
    head = _curl(server, "/v1/maintenance_event", address, "-D", "-", "-o", "/dev/null")
    assert ev.etag == normalize_etag(_headers(head.stdout)["etag"])


@pytest.mark.parametrize("droplet_id", sorted(DROPLETS))
def test_sdk_details_equal_the_json_curl_prints(server: MetadataServer, droplet_id: str) -> None:
    address, expected = DROPLETS[droplet_id]
    printed = _curl(server, "/v1/maintenance_event.json", address)
    doc = json.loads(printed.stdout)
    with _client(server, address) as client:
        ev = client.details()
        assert client.supports_json is True
    assert ev == MaintenanceEvent.from_json(doc)
    assert ev.raw == doc["event"]
    assert (ev.id, ev.state, ev.etag) == (doc["id"], doc["state"], doc["etag"])
    if expected is not None:
        event_id, kind, state, not_before = expected
        assert (ev.id, ev.raw, ev.state) == (event_id, kind, state)
        assert ev.to_json_dict()["not_before"] == not_before


def test_sdk_cli_prints_what_curl_prints(server: MetadataServer) -> None:
    for droplet_id, (address, _) in DROPLETS.items():
        printed = _curl(server, "/v1/maintenance_event", address)
        proc = subprocess.run(
            [sys.executable, "-m", "guest_sdk", "--url", server.guest_url, "--source-address", address],
            capture_output=True,
            timeout=30,
            check=False,
        )
        expected_code = {b"": 0, b"live_migrate": 10, b"offline_migrate": 11}[printed.stdout]
        assert proc.returncode == expected_code, (droplet_id, proc.stderr)
        assert proc.stdout == (printed.stdout + b"\n" if printed.stdout else b"")


def test_sdk_unknown_address_is_not_on_droplet(server: MetadataServer) -> None:
    printed = _curl(server, "/v1/maintenance_event", "127.0.0.250", "-o", "/dev/null", "-w", "%{http_code}")
    assert printed.stdout == b"404"
    with _client(server, "127.0.0.250") as client:
        with pytest.raises(NotOnDroplet):
            client.event()
        with pytest.raises(NotOnDroplet):
            client.details()


def test_sdk_wait_wakes_on_admin_change(server: MetadataServer, droplet: tuple[str, str]) -> None:
    droplet_id, address = droplet
    result: dict[str, object] = {}

    def waiter() -> None:
        with _client(server, address) as client:
            result["event"] = client.wait(timeout_s=20)
            result["at"] = time.monotonic()
            result["long_poll"] = client.uses_long_poll

    thread = threading.Thread(target=waiter)
    thread.start()
    time.sleep(0.5)  # let the waiter reach its long-poll
    assert thread.is_alive()
    server.set_event(droplet_id, "ev-wake", not_before="2026-12-01T02:00:00Z")
    changed_at = time.monotonic()
    thread.join(timeout=10)
    assert not thread.is_alive()
    ev = result["event"]
    assert isinstance(ev, MaintenanceEvent)
    assert (ev.kind, ev.id) == (EventKind.LIVE_MIGRATE, "ev-wake")
    assert result["long_poll"] is True
    assert float(result["at"]) - changed_at < WAKE_BOUND_S  # type: ignore[arg-type]


def test_sdk_wait_until_clear_wakes_on_admin_clear(server: MetadataServer, droplet: tuple[str, str]) -> None:
    droplet_id, address = droplet
    server.set_event(droplet_id, "ev-clear")
    with _client(server, address) as client:
        assert client.wait(timeout_s=VISIBLE_WITHIN_S).id == "ev-clear"
        timer = threading.Timer(0.5, server.clear_event, args=(droplet_id,))
        timer.start()
        started = time.monotonic()
        ev = client.wait_until_clear(timeout_s=20)
        took = time.monotonic() - started
        timer.join()
    assert ev.kind is EventKind.NONE
    assert took < 0.5 + WAKE_BOUND_S


def test_sdk_wait_times_out(server: MetadataServer, droplet: tuple[str, str]) -> None:
    _, address = droplet
    with _client(server, address) as client:
        started = time.monotonic()
        with pytest.raises(WaitTimeout):
            client.wait(timeout_s=1)
        assert 1.0 <= time.monotonic() - started < 1.0 + WAKE_BOUND_S


def test_sdk_watch_yields_each_admin_change_once(server: MetadataServer, droplet: tuple[str, str]) -> None:
    droplet_id, address = droplet

    def engine() -> None:
        # The same state twice in a row is no change, so it must not be yielded.
        for state in ("scheduled", "in_progress", "in_progress", None):
            time.sleep(0.3)
            if state is None:
                server.clear_event(droplet_id)
            else:
                server.set_event(droplet_id, "ev-w", state=state)

    seen: list[tuple[EventKind, str | None]] = []
    thread = threading.Thread(target=engine)
    with _client(server, address) as client:
        thread.start()
        for ev in client.watch(timeout_s=10):
            seen.append((ev.kind, ev.state))
            if len(seen) == 4:
                break
    thread.join(timeout=10)
    assert seen == [
        (EventKind.NONE, None),
        (EventKind.LIVE_MIGRATE, "scheduled"),
        (EventKind.LIVE_MIGRATE, "in_progress"),
        (EventKind.NONE, None),
    ]


def test_sdk_acknowledge_reaches_the_admin_api(server: MetadataServer, droplet: tuple[str, str]) -> None:
    droplet_id, address = droplet
    server.set_event(droplet_id, "ev-ack", event="offline_migrate")
    with _client(server, address) as client:
        ev = client.wait(timeout_s=VISIBLE_WITHIN_S)
        with pytest.raises(EventConflict):
            client.acknowledge("ev-other", "ready")
        acked = client.acknowledge(ev.id or "", "offline", power_on_after=False)
    assert acked.acknowledged == "offline"
    assert acked.etag != ev.etag  # the ack is part of what the guest sees
    record = server.admin("GET", f"/admin/v1/droplets/{droplet_id}").json()
    assert record["event"]["acknowledged"] == "offline"
    assert record["event"]["power_on_after"] is False


def test_sdk_unavailable_while_event_known_then_recovers(
    server: MetadataServer, droplet: tuple[str, str]
) -> None:
    droplet_id, address = droplet
    server.set_event(droplet_id, "ev-down")
    with _client(server, address, retry_attempts=2, retry_initial_backoff_s=0.05) as client:
        assert client.wait(timeout_s=5).id == "ev-down"
        server.stop(signal.SIGKILL)
        try:
            with pytest.raises(MetadataUnavailable) as info:
                client.event()
            assert info.value.last_known is not None
            assert info.value.last_known.kind is EventKind.LIVE_MIGRATE
            with pytest.raises(MetadataUnavailable):
                client.wait_until_clear(timeout_s=5)  # never "cleared" because the server is gone
        finally:
            server.launch()
        assert client.event().kind is EventKind.LIVE_MIGRATE  # state survived the restart


def test_sdk_wait_rides_through_a_server_restart(server: MetadataServer, droplet: tuple[str, str]) -> None:
    droplet_id, address = droplet
    server.set_event(droplet_id, "ev-restart")
    with _client(server, address) as client:
        assert client.wait(timeout_s=VISIBLE_WITHIN_S).id == "ev-restart"
    result: dict[str, object] = {}

    def waiter() -> None:
        # Enough attempts to span a restart (full-jitter backoff capped at 1 s).
        with _client(server, address, retry_attempts=30, retry_max_backoff_s=1.0) as client:
            try:
                result["event"] = client.wait_until_clear(timeout_s=60)
            except Exception as e:
                result["error"] = e

    thread = threading.Thread(target=waiter)
    thread.start()
    time.sleep(0.5)
    server.kill9_and_restart()
    time.sleep(0.5)
    server.clear_event(droplet_id)
    thread.join(timeout=30)
    assert not thread.is_alive()
    assert "error" not in result, result.get("error")
    ev = result["event"]
    assert isinstance(ev, MaintenanceEvent)
    assert ev.kind is EventKind.NONE


def test_sdk_wait_keeps_long_polling_across_a_graceful_restart(
    server: MetadataServer, droplet: tuple[str, str]
) -> None:
    droplet_id, address = droplet
    server.set_event(droplet_id, "ev-term")
    result: dict[str, object] = {}
    with _client(server, address, retry_attempts=40, retry_max_backoff_s=1.0) as client:
        assert client.wait(timeout_s=VISIBLE_WITHIN_S).id == "ev-term"

        def waiter() -> None:
            try:
                result["event"] = client.wait_until_clear(timeout_s=60)
            except Exception as e:  # handed to the main thread's assertion
                result["error"] = e

        thread = threading.Thread(target=waiter)
        thread.start()
        time.sleep(0.5)
        server.restart()  # SIGTERM: the server answers every held long-poll at once, unchanged
        time.sleep(0.5)
        assert thread.is_alive()
        server.clear_event(droplet_id)
        changed_at = time.monotonic()
        thread.join(timeout=30)
        assert not thread.is_alive()
        assert "error" not in result, result.get("error")
        assert isinstance(result["event"], MaintenanceEvent)
        assert result["event"].kind is EventKind.NONE
        assert time.monotonic() - changed_at < WAKE_BOUND_S + 1.0  # at most one short pause after the restart
        assert client.uses_long_poll  # one early answer is a restart, not a server that cannot long-poll
