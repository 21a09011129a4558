"""Predictions kept with a migration: ``evacuate --predict`` stores them, ``report`` sets them against the
actual numbers, and the notice PUT carries them (falling back for a metadata server that predates them)."""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime

import requests

from host_engine.expectation import Expected, actual, predicted, with_prediction
from host_engine.metadata.client import AdminClient
from host_engine.store import Store
from tests.unit.host_engine.cli_run import ok, only_migration
from tests.unit.host_engine.conftest import FakeClock
from tests.unit.host_engine.fake_admin import FakeAdmin, answering

URL = "http://127.0.0.1:8002"
OLD_SERVER_FIELDS = {"id", "event", "state", "not_before", "deadline"}  # an event before predictions


def test_expected_reads_garbage_as_absent() -> None:
    assert predicted({}) is None
    assert predicted({"predicted": "soon"}) is None
    assert predicted({"predicted": {"duration_s": -1}}) is None
    assert predicted({"predicted": {"duration_s": True}}) is None
    p = predicted({"predicted": {"duration_s": 12.3, "downtime_ms": "x", "bytes_transferred": 5}})
    assert p == Expected(12.3, None, 5)
    assert p.for_guest() == {"expected_duration_s": 12.3}  # no downtime: predicted not to converge
    # Beyond the server's bounds a value is left out rather than refused there.
    assert Expected(8 * 24 * 3600.0, 4e6).for_guest() == {}


def test_evacuate_predict_stores_a_prediction_per_migration(
    db: str, clock: FakeClock, admin: FakeAdmin
) -> None:
    ok(db, clock, "evacuate", "hv1", "--start", "+1h", "--predict")
    store = Store.open(db)
    try:
        found = {m.droplet_id: predicted(m.stats) for m in store.list_migrations()}
    finally:
        store.close()
    assert set(found) == {"web1", "big"}
    web1, big = found["web1"], found["big"]
    assert web1 is not None and big is not None
    assert 0 < web1.duration_s < big.duration_s  # 5 GiB copies faster than 204 GiB
    assert web1.bytes_transferred is not None and web1.bytes_transferred >= 5 * 2**30


def test_evacuate_without_predict_stores_none(db: str, clock: FakeClock, admin: FakeAdmin) -> None:
    ok(db, clock, "evacuate", "hv1", "--start", "+1h")
    store = Store.open(db)
    try:
        assert [predicted(m.stats) for m in store.list_migrations()] == [None, None]
    finally:
        store.close()


def test_report_shows_predicted_vs_actual(db: str, clock: FakeClock, admin: FakeAdmin) -> None:
    ok(db, clock, "migrate", "web1", "--to", "hv2", "--now", "--unsafe-short-notice", "--sim-speed", "1")
    m = only_migration(db)
    real = actual(m)
    assert real is not None and real.duration_s is not None and real.downtime_ms is not None
    before = ok(db, clock, "report", m.id)
    assert "predicted" not in before.output
    store = Store.open(db)
    try:
        store.update_migration(m.id, stats=with_prediction(m.stats, Expected(12.3, 250.0, 5 * 2**30)))
    finally:
        store.close()
    out = ok(db, clock, "report", m.id).output
    line = f"predicted 12.3 s / 250 ms downtime, actual {real.duration_s:.1f} s / {real.downtime_ms:.0f} ms"
    assert line in out.splitlines()
    doc = json.loads(ok(db, clock, "report", m.id, "--json").output)
    assert doc["predicted"] == {"duration_s": 12.3, "downtime_ms": 250.0, "bytes_transferred": 5 * 2**30}
    assert doc["actual"]["duration_s"] == real.duration_s and doc["actual"]["downtime_ms"] == real.downtime_ms


class OldServer(FakeAdmin):
    """A metadata server from before predictions: it refuses the event fields it does not know (docs/metadata-server.md, "Admin API")."""

    def _handle(self, request: requests.PreparedRequest) -> tuple[int, dict[str, str], str]:
        if (request.method, (request.url or "").endswith("/maintenance")) == ("PUT", True):
            unknown = sorted(set(json.loads(request.body or b"{}")) - OLD_SERVER_FIELDS)
            if unknown:
                doc = {
                    "error": "unknown_field",
                    "message": f"unknown field {unknown[0]!r}",
                    "field": unknown[0],
                }
                return 400, {}, json.dumps(doc)
        return super()._handle(request)


def test_notice_put_carries_the_prediction_and_an_old_server_still_gets_the_event() -> None:
    nb = datetime(2026, 12, 1, 2, 0, tzinfo=UTC)
    expected = {"expected_downtime_ms": 250.0, "expected_duration_s": 12.3}
    with (
        answering(FakeAdmin(URL)) as rsps,
        AdminClient(URL, "s3cret", attempts=1, sleep=time.sleep) as client,
    ):
        client.put_droplet("d1", ["10.0.0.1"])
        client.set_event("d1", "m-1-live", "live_migrate", "scheduled", not_before=nb, expected=expected)
        sent = json.loads(rsps.calls[-1].request.body or b"{}")
        assert {k: sent[k] for k in expected} == expected
    old = OldServer(URL)
    with answering(old), AdminClient(URL, "s3cret", attempts=1, sleep=time.sleep) as client:
        client.put_droplet("d1", ["10.0.0.1"])
        client.set_event("d1", "m-1-live", "live_migrate", "scheduled", not_before=nb, expected=expected)
    assert old.event("d1") is not None and old.event("d1")["id"] == "m-1-live"  # type: ignore[index]
