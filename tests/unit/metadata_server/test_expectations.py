"""The engine's prediction on an event: validated on PUT, stored, shown to the guest, old state files upgraded."""

from __future__ import annotations

import hashlib
import json
import sqlite3
from pathlib import Path

import pytest
from werkzeug.test import Client

from metadata_server.guest import GuestApp
from metadata_server.model import EventKind, EventState, compute_etag
from metadata_server.store import SCHEMA_VERSION, Store

from .conftest import AUTH, D1

EVENT = {"id": "ev-1", "event": "live_migrate", "state": "scheduled", "not_before": "2026-12-01T02:00:00Z"}


def _guest_json(app: GuestApp) -> dict[str, object]:
    app.hub.reload()
    r = Client(app).get("/v1/maintenance_event.json", environ_base={"REMOTE_ADDR": D1})
    assert r.status_code == 200
    doc = json.loads(r.data)
    assert isinstance(doc, dict)
    return doc


def test_expected_downtime_and_duration_reach_the_guest_json_and_admin_get(
    admin: Client, two_droplets: GuestApp
) -> None:
    before = _guest_json(two_droplets)
    assert before["expected_downtime_ms"] is None and before["expected_duration_s"] is None
    body = dict(EVENT, expected_downtime_ms=180.5, expected_duration_s=42)
    assert admin.put("/admin/v1/droplets/d1/maintenance", json=body, headers=AUTH).status_code == 200
    doc = _guest_json(two_droplets)
    assert (doc["expected_downtime_ms"], doc["expected_duration_s"]) == (180.5, 42.0)
    assert doc["etag"] != before["etag"]  # a long-polling guest hears of the new prediction
    event = admin.get("/admin/v1/droplets/d1", headers=AUTH).json["event"]  # type: ignore[index]
    assert (event["expected_downtime_ms"], event["expected_duration_s"]) == (180.5, 42.0)
    # A PUT without them (an older engine) clears them again: the server says only what it was told.
    assert admin.put("/admin/v1/droplets/d1/maintenance", json=EVENT, headers=AUTH).status_code == 200
    again = _guest_json(two_droplets)
    assert again["expected_downtime_ms"] is None and again["etag"] == before["etag"]


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("expected_downtime_ms", -1),
        ("expected_downtime_ms", 3_600_001),
        ("expected_downtime_ms", "100"),
        ("expected_downtime_ms", True),
        ("expected_downtime_ms", [1]),
        ("expected_duration_s", -0.5),
        ("expected_duration_s", 7 * 24 * 3600 + 1),
        ("expected_duration_s", 10**400),
        ("expected_duration_s", {"s": 1}),
    ],
)
def test_hostile_expectation_is_400_naming_the_field_and_changes_nothing(
    admin: Client, two_droplets: GuestApp, field: str, value: object
) -> None:
    r = admin.put("/admin/v1/droplets/d1/maintenance", json=dict(EVENT, **{field: value}), headers=AUTH)
    assert r.status_code == 400
    assert r.json is not None and r.json["field"] == field and r.json["error"] and r.json["message"]
    assert _guest_json(two_droplets)[field] is None


@pytest.mark.parametrize("literal", [b"NaN", b"Infinity", b"-Infinity"])
def test_non_finite_expectation_is_400(admin: Client, two_droplets: GuestApp, literal: bytes) -> None:
    raw = json.dumps(EVENT)[:-1].encode() + b', "expected_downtime_ms": ' + literal + b"}"
    r = admin.put(
        "/admin/v1/droplets/d1/maintenance",
        data=raw,
        headers={**AUTH, "Content-Type": "application/json"},
    )
    assert r.status_code == 400
    assert r.json is not None and r.json["field"] == "expected_downtime_ms"


def _version_2_file(path: Path) -> None:
    """A state file as the previous server wrote it (schema version 2, no expectation columns)."""
    c = sqlite3.connect(path)
    c.executescript(
        """
        CREATE TABLE droplets (id TEXT PRIMARY KEY, hostname TEXT, region TEXT);
        CREATE TABLE addresses (address TEXT PRIMARY KEY,
            droplet_id TEXT NOT NULL REFERENCES droplets(id) ON DELETE CASCADE);
        CREATE TABLE events (droplet_id TEXT PRIMARY KEY REFERENCES droplets(id) ON DELETE CASCADE,
            id TEXT NOT NULL, kind TEXT NOT NULL, state TEXT NOT NULL, not_before TEXT, deadline TEXT,
            notified_at TEXT NOT NULL, ack_action TEXT, ack_power_on_after INTEGER, ack_at TEXT);
        CREATE TABLE changes (droplet_id TEXT PRIMARY KEY, seq INTEGER NOT NULL);
        INSERT INTO droplets VALUES ('d1', 'web-1', NULL);
        INSERT INTO addresses VALUES ('127.0.0.2', 'd1');
        INSERT INTO events VALUES ('d1', 'ev-old', 'live_migrate', 'scheduled', '2026-12-01T02:00:00Z',
            '2026-12-01T02:00:00Z', '2026-11-30T00:00:00Z', 'ready', 1, '2026-11-30T01:00:00Z');
        INSERT INTO changes VALUES ('d1', 1);
        PRAGMA user_version=2;
        """
    )
    c.close()


def test_a_version_2_state_file_is_upgraded_and_its_event_reads_as_before(tmp_path: Path) -> None:
    path = tmp_path / "state.sqlite3"
    _version_2_file(path)
    store = Store(path)
    try:
        event = store.get("d1").event
        assert event is not None and event.id == "ev-old" and event.ack is not None
        assert event.expected_downtime_ms is None and event.expected_duration_s is None
        # The ETag is the one the old server gave this event, so a waiting guest is not woken for nothing.
        old = [
            "live_migrate",
            "ev-old",
            "scheduled",
            "2026-12-01T02:00:00Z",
            "2026-12-01T02:00:00Z",
            "ready",
            True,
        ]
        material = json.dumps(old, separators=(",", ":")).encode()
        assert compute_etag(event) == hashlib.sha256(material).hexdigest()[:20]
        store.set_event("d1", "ev-old", EventKind.LIVE_MIGRATE, EventState.IN_PROGRESS, None, None, "now")
    finally:
        store.close()
    c = sqlite3.connect(path)
    assert c.execute("PRAGMA user_version").fetchone() == (SCHEMA_VERSION,)
    c.close()
    Store(path).close()  # opening the upgraded file again is a no-op
