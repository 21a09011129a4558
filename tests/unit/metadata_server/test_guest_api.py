"""The guest listener through a WSGI test client; REMOTE_ADDR stands for the TCP source address."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
from werkzeug.test import Client

from metadata_server.app import create_guest_app
from metadata_server.guest import GuestApp
from metadata_server.store import Store

from .conftest import AUTH, D1, D2


def get(app: GuestApp, address: str, path: str, method: str = "GET", **kw: object):  # type: ignore[no-untyped-def]
    return Client(app).open(path, method=method, environ_base={"REMOTE_ADDR": address}, **kw)


def test_guest_text_endpoint_is_exact_per_droplet(two_droplets: GuestApp) -> None:
    r1, r2 = get(two_droplets, D1, "/v1/maintenance_event"), get(two_droplets, D2, "/v1/maintenance_event")
    assert (r1.status_code, r1.data) == (200, b"live_migrate")
    assert (r2.status_code, r2.data) == (200, b"")
    assert r1.headers["Content-Type"].startswith("text/plain")
    assert r1.headers["ETag"].startswith('"') and r1.headers["ETag"] != r2.headers["ETag"]
    assert get(two_droplets, "127.0.0.9", "/v1/maintenance_event").status_code == 404


def test_guest_json_details_and_metadata(two_droplets: GuestApp) -> None:
    doc = get(two_droplets, D1, "/v1/maintenance_event.json").json
    assert doc["event"] == "live_migrate" and doc["id"] == "ev-1" and doc["state"] == "scheduled"
    assert doc["not_before"] == doc["deadline"] == "2026-12-01T02:00:00Z"
    assert doc["acknowledged"] is None and doc["etag"]
    assert get(two_droplets, D2, "/v1/maintenance_event.json").json["event"] == ""
    assert get(two_droplets, D1, "/metadata/v1/id").data == b"d1"
    assert get(two_droplets, D1, "/metadata/v1/hostname").data == b"web-1"
    meta = get(two_droplets, D1, "/metadata/v1.json").json
    assert meta["droplet_id"] == "d1" and meta["region"] == "fra1"
    assert meta["maintenance_event"]["event"] == "live_migrate"
    assert get(two_droplets, "127.0.0.9", "/metadata/v1/id").status_code == 404


def test_guest_ack_updates_details_and_etag(two_droplets: GuestApp) -> None:
    before = get(two_droplets, D1, "/v1/maintenance_event").headers["ETag"]
    r = get(two_droplets, D1, "/v1/maintenance_event/ack", "POST", json={"id": "ev-1", "action": "offline"})
    assert r.status_code == 200
    assert r.json["acknowledged"] == "offline" and r.json["power_on_after"] is True
    assert get(two_droplets, D1, "/v1/maintenance_event").headers["ETag"] != before


@pytest.mark.parametrize(
    ("address", "body", "status", "field"),
    [
        (D1, {"id": "ev-2", "action": "ready"}, 409, None),  # not the current event
        (D2, {"id": "ev-1", "action": "ready"}, 409, None),  # d2 has no event (and ev-1 is d1's)
        (D1, {"id": "ev-1", "action": "reboot"}, 400, "action"),
        (D1, {"id": "ev-1"}, 400, "action"),
        (D1, {"action": "ready"}, 400, "id"),
        (D1, {"id": "ev-1", "action": "ready", "power_on_after": "yes"}, 400, "power_on_after"),
        (D1, {"id": "ev-1", "action": "ready", "extra": 1}, 400, "extra"),
        (D1, ["ev-1"], 400, None),
        ("127.0.0.9", {"id": "ev-1", "action": "ready"}, 404, None),
    ],
)
def test_guest_bad_ack_is_refused_and_changes_nothing(
    two_droplets: GuestApp, address: str, body: object, status: int, field: str | None
) -> None:
    r = get(two_droplets, address, "/v1/maintenance_event/ack", "POST", json=body)
    assert r.status_code == status
    assert r.json is not None and r.json.get("field") == field
    assert get(two_droplets, D1, "/v1/maintenance_event.json").json["acknowledged"] is None


def test_guest_deeply_nested_ack_is_400_not_500(two_droplets: GuestApp) -> None:
    raw = b'{"id": ' + b"[" * 2000 + b"]" * 2000 + b"}"  # under the 4 KiB limit
    r = get(two_droplets, D1, "/v1/maintenance_event/ack", "POST", data=raw)
    assert r.status_code == 400
    assert r.json is not None and r.json["error"] == "invalid_json"
    assert get(two_droplets, D1, "/v1/maintenance_event.json").json["acknowledged"] is None


@pytest.mark.parametrize("header", ["X-Forwarded-For", "Forwarded"])
@pytest.mark.parametrize("path", ["/v1/maintenance_event", "/v1/maintenance_event.json", "/metadata/v1/id"])
def test_guest_forwarded_requests_are_403(two_droplets: GuestApp, header: str, path: str) -> None:
    r = get(two_droplets, D1, path, headers={header: D2})
    assert r.status_code == 403
    assert b"live_migrate" not in r.data


def test_guest_oversized_body_is_413(two_droplets: GuestApp) -> None:
    assert get(two_droplets, D1, "/v1/maintenance_event", data=b"x" * 5000).status_code == 413
    r = get(two_droplets, D1, "/v1/maintenance_event/ack", "POST", data=b"{" + b" " * 5000 + b"}")
    assert r.status_code == 413
    assert get(two_droplets, D1, "/v1/maintenance_event").data == b"live_migrate"


@pytest.mark.parametrize(
    ("query", "field"),
    [
        ("wait_for_change=yes", "wait_for_change"),
        ("wait_for_change=true&timeout_sec=0", "timeout_sec"),
        ("wait_for_change=true&timeout_sec=301", "timeout_sec"),
        ("wait_for_change=true&timeout_sec=-5", "timeout_sec"),
        ("wait_for_change=true&timeout_sec=1.5", "timeout_sec"),
        ("wait_for_change=true&timeout_sec=%D9%A1%D9%A2", "timeout_sec"),  # Arabic-Indic "12"
        ("wait_for_change=true&timeout_sec=%EF%BC%95", "timeout_sec"),  # fullwidth "5"
        ("wait_for_change=true&last_etag=" + "a" * 129, "last_etag"),
        ("wait_for_change=true&last_etag=%00%01", "last_etag"),
        ("wait_for_change=true&last_etag=%C3%A9", "last_etag"),
    ],
)
def test_guest_bad_long_poll_parameters_are_400(two_droplets: GuestApp, query: str, field: str) -> None:
    r = get(two_droplets, D1, "/v1/maintenance_event.json?" + query)
    assert r.status_code == 400
    assert r.json["field"] == field
    text = get(two_droplets, D1, "/v1/maintenance_event?" + query)
    assert text.status_code == 400 and text.data.count(b"\n") == 1


def test_guest_unknown_paths_and_methods(two_droplets: GuestApp) -> None:
    assert get(two_droplets, D1, "/v1/nothing").status_code == 404
    assert get(two_droplets, D1, "/admin/v1/droplets", headers=AUTH).status_code == 404
    r = get(two_droplets, D1, "/v1/maintenance_event", "DELETE")
    assert r.status_code == 405 and "GET" in r.headers["Allow"]
    assert get(two_droplets, D1, "/v1/maintenance_event/ack").status_code == 405
    assert get(two_droplets, D1, "/v1/maintenance_event", "HEAD").data == b""


def test_guest_long_poll_answers_at_once_when_etag_differs(two_droplets: GuestApp) -> None:
    r = get(two_droplets, D1, '/v1/maintenance_event?wait_for_change=true&last_etag="stale"&timeout_sec=30')
    assert r.data == b"live_migrate"


def test_guest_long_poll_wakes_on_admin_change_and_caps_waiters(
    two_droplets: GuestApp, admin: Client
) -> None:
    etag = get(two_droplets, D2, "/v1/maintenance_event").headers["ETag"].strip('"')
    url = f"/v1/maintenance_event?wait_for_change=true&last_etag={etag}&timeout_sec=30"
    answers: list[tuple[float, bytes]] = []

    def wait() -> None:
        r = get(two_droplets, D2, url)
        answers.append((time.monotonic(), r.data))

    waiters = [threading.Thread(target=wait) for _ in range(2)]
    for w in waiters:
        w.start()
    deadline = time.monotonic() + 5
    while two_droplets.hub.held() < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert two_droplets.hub.held() == 2
    over = get(two_droplets, D2, url)  # the cap is 2 in this fixture
    assert over.status_code == 429 and over.headers["Retry-After"] == "1"
    assert get(two_droplets, D1, "/v1/maintenance_event").data == b"live_migrate"  # others still served
    changed_at = time.monotonic()
    admin.put(
        "/admin/v1/droplets/d2/maintenance",
        json={"id": "ev-9", "event": "offline_migrate", "state": "scheduled"},
        headers=AUTH,
    )
    for w in waiters:
        w.join(5)
    assert [body for _, body in answers] == [b"offline_migrate", b"offline_migrate"]
    assert all(at - changed_at < 1.0 for at, _ in answers)


def test_guest_long_poll_times_out_with_unchanged_answer(two_droplets: GuestApp) -> None:
    etag = get(two_droplets, D2, "/v1/maintenance_event").headers["ETag"]
    start = time.monotonic()
    r = get(two_droplets, D2, f"/v1/maintenance_event?wait_for_change=true&last_etag={etag}&timeout_sec=1")
    assert 0.9 < time.monotonic() - start < 5
    assert (r.status_code, r.data, r.headers["ETag"]) == (200, b"", etag)


def test_guest_registered_in_another_process_is_known_before_the_watcher_looks(tmp_path: Path) -> None:
    """The admin API answered, so every guest worker must know the droplet, whether its watcher looked yet or not.

    Seen in CI under load: a droplet registered, one worker already answered it, and a new connection to another
    worker (watcher a few ms behind) was told 404 "no droplet has the address".
    """
    db = tmp_path / "s.db"
    app = create_guest_app(db, watch=False)  # a worker whose watcher has not looked since it started
    assert get(app, "127.0.0.44", "/v1/maintenance_event").status_code == 404
    Store(db).put_droplet("late", ["127.0.0.44"], "late-1", None)  # the admin process's commit
    r = get(app, "127.0.0.44", "/v1/maintenance_event.json")
    assert r.status_code == 200 and r.json["event"] == ""
    assert get(app, "127.0.0.44", "/metadata/v1/hostname").data == b"late-1"
    # Strangers still are not droplets.
    assert get(app, "127.0.0.45", "/v1/maintenance_event").status_code == 404
