"""The admin API through Flask's test client: auth, validation naming the field, the event lifecycle."""

from __future__ import annotations

import pytest
from werkzeug.test import Client

from .conftest import AUTH


def put(admin: Client, path: str, body: object) -> object:
    return admin.put(path, json=body, headers=AUTH)


@pytest.mark.parametrize(
    "headers",
    [{}, {"Authorization": "Bearer wrong-token-wrong-token"}, {"Authorization": "Basic dXNlcjpwYXNz"},
     {"Authorization": "Bearer " + "t" * 31}, {"Authorization": "Bearer " + "t" * 33}],
)  # fmt: skip
def test_admin_without_valid_token_is_401_and_changes_nothing(admin: Client, headers: dict[str, str]) -> None:
    r = admin.put("/admin/v1/droplets/d1", json={"addresses": ["127.0.0.2"]}, headers=headers)
    assert r.status_code == 401
    assert r.json is not None and r.json["error"] == "unauthorized"
    assert admin.get("/healthz", headers=headers).status_code == 401
    assert admin.get("/admin/v1/droplets", headers=AUTH).json == {"droplets": []}


def test_admin_register_replace_and_delete_droplet(admin: Client) -> None:
    r = admin.put(
        "/admin/v1/droplets/d1", json={"addresses": ["127.0.0.2"], "hostname": "web-1"}, headers=AUTH
    )
    assert r.status_code == 201
    r = admin.put("/admin/v1/droplets/d1", json={"addresses": ["127.0.0.3"], "region": "fra1"}, headers=AUTH)
    assert r.status_code == 200
    doc = admin.get("/admin/v1/droplets/d1", headers=AUTH).json
    assert doc == {
        "id": "d1", "addresses": ["127.0.0.3"], "hostname": None, "region": "fra1", "event": None, "ack": None,
    }  # fmt: skip
    assert admin.delete("/admin/v1/droplets/d1", headers=AUTH).status_code == 204
    assert admin.get("/admin/v1/droplets/d1", headers=AUTH).status_code == 404
    assert admin.delete("/admin/v1/droplets/d1", headers=AUTH).status_code == 404


def test_admin_address_owned_by_another_droplet_is_409(admin: Client) -> None:
    assert (
        admin.put("/admin/v1/droplets/a", json={"addresses": ["10.0.0.1"]}, headers=AUTH).status_code == 201
    )
    r = admin.put("/admin/v1/droplets/b", json={"addresses": ["10.0.0.2", "10.0.0.1"]}, headers=AUTH)
    assert r.status_code == 409
    assert r.json is not None and r.json["error"] == "address_in_use"
    assert admin.get("/admin/v1/droplets/b", headers=AUTH).status_code == 404


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({}, "addresses"),
        ({"addresses": []}, "addresses"),
        ({"addresses": "127.0.0.2"}, "addresses"),
        ({"addresses": ["not-an-ip"]}, "addresses"),
        ({"addresses": [7]}, "addresses"),
        ({"addresses": ["127.0.0.2", "127.0.0.2"]}, "addresses"),
        ({"addresses": ["127.0.0.2"] * 100}, "addresses"),
        ({"addresses": ["fe80::1%eth0"]}, "addresses"),  # a scope never appears in a source address
        ({"addresses": ["127.0.0.2", "::ffff:127.0.0.2"]}, "addresses"),  # one address, two spellings
        ({"addresses": ["127.0.0.2"], "hostname": 5}, "hostname"),
        ({"addresses": ["127.0.0.2"], "hostname": "x" * 300}, "hostname"),
        ({"addresses": ["127.0.0.2"], "region": "bad\nregion"}, "region"),
        ({"addresses": ["127.0.0.2"], "owner": "eve"}, "owner"),
    ],
)
def test_admin_malformed_droplet_body_is_400_naming_field(admin: Client, body: object, field: str) -> None:
    r = admin.put("/admin/v1/droplets/d1", json=body, headers=AUTH)
    assert r.status_code == 400, r.json
    assert r.json is not None and r.json["field"] == field
    assert admin.get("/admin/v1/droplets", headers=AUTH).json == {"droplets": []}


def test_admin_ipv4_mapped_address_is_the_ipv4_address(admin: Client) -> None:
    assert (
        admin.put("/admin/v1/droplets/a", json={"addresses": ["127.0.0.2"]}, headers=AUTH).status_code == 201
    )
    r = admin.put("/admin/v1/droplets/b", json={"addresses": ["::ffff:127.0.0.2"]}, headers=AUTH)
    assert r.status_code == 409
    assert r.json is not None and r.json["error"] == "address_in_use"
    r = admin.put("/admin/v1/droplets/c", json={"addresses": ["::FFFF:7f00:3"]}, headers=AUTH)
    assert r.status_code == 201
    assert r.json is not None and r.json["addresses"] == ["127.0.0.3"]  # stored as the guest is seen


def test_admin_deeply_nested_json_is_400_not_500(admin: Client) -> None:
    raw = b'{"addresses": ' + b"[" * 3000 + b"]" * 3000 + b"}"
    r = admin.put("/admin/v1/droplets/d1", data=raw, headers={**AUTH, "Content-Type": "application/json"})
    assert r.status_code == 400
    assert r.json is not None and r.json["error"] == "invalid_json"
    assert admin.get("/admin/v1/droplets", headers=AUTH).json == {"droplets": []}


def test_admin_deadline_equal_to_or_after_not_before_is_accepted(admin: Client) -> None:
    admin.put("/admin/v1/droplets/d1", json={"addresses": ["127.0.0.2"]}, headers=AUTH)
    same = {**EVENT, "deadline": "2026-12-01T01:00:00Z"}  # the same moment as not_before, another offset
    assert admin.put("/admin/v1/droplets/d1/maintenance", json=same, headers=AUTH).status_code == 201
    later = {**EVENT, "deadline": "2026-12-01T03:00:00Z"}
    r = admin.put("/admin/v1/droplets/d1/maintenance", json=later, headers=AUTH)
    assert r.status_code == 200
    assert r.json is not None and r.json["event"]["deadline"] == "2026-12-01T03:00:00Z"
    no_start = {
        "id": "ev-2",
        "event": "live_migrate",
        "state": "scheduled",
        "deadline": "2020-01-01T00:00:00Z",
    }
    assert admin.put("/admin/v1/droplets/d1/maintenance", json=no_start, headers=AUTH).status_code == 201


@pytest.mark.parametrize("raw", [b"", b"{", b"[1,2]", b"null", b"\xff\xfe", b'"text"'])
def test_admin_non_object_body_is_400(admin: Client, raw: bytes) -> None:
    r = admin.put("/admin/v1/droplets/d1", data=raw, headers={**AUTH, "Content-Type": "application/json"})
    assert r.status_code == 400
    assert r.json is not None and r.json["error"] == "invalid_json"


def test_admin_bad_droplet_id_and_oversized_body(admin: Client) -> None:
    r = admin.put("/admin/v1/droplets/" + "x" * 65, json={"addresses": ["127.0.0.2"]}, headers=AUTH)
    assert r.status_code == 400
    r = admin.put("/admin/v1/droplets/bad%20id", json={"addresses": ["127.0.0.2"]}, headers=AUTH)
    assert r.status_code == 400
    big = {"addresses": ["127.0.0.2"], "hostname": "x" * 70_000}
    assert admin.put("/admin/v1/droplets/d1", json=big, headers=AUTH).status_code == 413


EVENT = {
    "id": "ev-1",
    "event": "live_migrate",
    "state": "scheduled",
    "not_before": "2026-12-01T02:00:00+01:00",
}


@pytest.mark.parametrize(
    ("patch", "field"),
    [
        ({"id": None}, "id"),
        ({"id": "has space"}, "id"),
        ({"id": "x" * 65}, "id"),
        ({"event": "reboot"}, "event"),
        ({"event": None}, "event"),
        ({"state": "done"}, "state"),
        ({"not_before": "tomorrow"}, "not_before"),
        ({"not_before": "2026-12-01T02:00:00"}, "not_before"),
        ({"not_before": 1764554400}, "not_before"),
        ({"deadline": "2026-13-01T00:00:00Z"}, "deadline"),
        ({"deadline": "2026-12-01T00:59:59Z"}, "deadline"),  # one second before not_before
        ({"deadline": "2020-01-01T00:00:00Z"}, "deadline"),  # long past, before not_before
        ({"colour": "red"}, "colour"),
    ],
)
def test_admin_malformed_event_body_is_400_naming_field(
    admin: Client, patch: dict[str, object], field: str
) -> None:
    admin.put("/admin/v1/droplets/d1", json={"addresses": ["127.0.0.2"]}, headers=AUTH)
    body = {k: v for k, v in {**EVENT, **patch}.items() if v is not None}
    r = admin.put("/admin/v1/droplets/d1/maintenance", json=body, headers=AUTH)
    assert r.status_code == 400, r.json
    assert r.json is not None and r.json["field"] == field
    assert admin.get("/admin/v1/droplets/d1", headers=AUTH).json["event"] is None  # type: ignore[index]


def test_admin_event_lifecycle_normalises_times_and_keeps_ack_for_same_id(admin: Client) -> None:
    admin.put("/admin/v1/droplets/d1", json={"addresses": ["127.0.0.2"]}, headers=AUTH)
    assert admin.put("/admin/v1/droplets/d9/maintenance", json=EVENT, headers=AUTH).status_code == 404
    r = admin.put("/admin/v1/droplets/d1/maintenance", json=EVENT, headers=AUTH)
    assert r.status_code == 201
    event = r.json["event"]  # type: ignore[index]
    assert event["not_before"] == "2026-12-01T01:00:00Z"
    assert event["deadline"] == "2026-12-01T01:00:00Z"  # defaults to not_before
    assert event["event"] == "live_migrate" and event["state"] == "scheduled"
    notified_at = event["notified_at"]
    r = admin.put("/admin/v1/droplets/d1/maintenance", json={**EVENT, "state": "in_progress"}, headers=AUTH)
    assert r.status_code == 200
    assert r.json["event"]["notified_at"] == notified_at  # type: ignore[index]
    assert admin.delete("/admin/v1/droplets/d1/maintenance", headers=AUTH).status_code == 204
    assert admin.get("/admin/v1/droplets/d1", headers=AUTH).json["event"] is None  # type: ignore[index]
    assert admin.delete("/admin/v1/droplets/d9/maintenance", headers=AUTH).status_code == 404


def test_admin_healthz_and_metrics(admin: Client) -> None:
    admin.put("/admin/v1/droplets/d1", json={"addresses": ["127.0.0.2"]}, headers=AUTH)
    admin.put("/admin/v1/droplets/d1/maintenance", json=EVENT, headers=AUTH)
    assert admin.get("/healthz", headers=AUTH).json == {"status": "ok"}
    text = admin.get("/metrics", headers=AUTH).get_data(as_text=True)
    assert 'metadata_server_events{event="live_migrate",state="scheduled"} 1.0' in text
    assert (
        'metadata_server_requests_total{endpoint="/admin/v1/droplets/<droplet_id>",listener="admin",status="201"}'
        in text
    )
