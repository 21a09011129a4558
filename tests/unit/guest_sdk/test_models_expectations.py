"""The optional prediction fields of the JSON event: read when sane, None (never an error) otherwise."""

from __future__ import annotations

import pytest

from guest_sdk.models import EventKind, MaintenanceEvent

BASE = {"event": "live_migrate", "id": "ev-1", "state": "scheduled", "etag": "abc"}


def test_sdk_reads_expected_downtime_and_duration() -> None:
    ev = MaintenanceEvent.from_json(dict(BASE, expected_downtime_ms=180.5, expected_duration_s=42))
    assert ev.expected_downtime_ms == 180.5 and ev.expected_duration_s == 42.0
    assert ev.to_json_dict()["expected_downtime_ms"] == 180.5
    other = MaintenanceEvent.from_json(dict(BASE, expected_downtime_ms=90, expected_duration_s=42))
    assert not ev.same_content(other)  # a new prediction is news to a waiting guest


def test_sdk_event_without_the_fields_reads_as_before() -> None:
    ev = MaintenanceEvent.from_json(BASE)
    assert ev.kind is EventKind.LIVE_MIGRATE and ev.id == "ev-1"
    assert ev.expected_downtime_ms is None and ev.expected_duration_s is None


@pytest.mark.parametrize(
    "bad", ["180", True, False, -1, float("nan"), float("inf"), 10**400, [1], {"ms": 1}, ""]
)
def test_sdk_garbage_prediction_is_none_not_an_exception(bad: object) -> None:
    ev = MaintenanceEvent.from_json(dict(BASE, expected_downtime_ms=bad, expected_duration_s=bad))
    assert ev.expected_downtime_ms is None and ev.expected_duration_s is None
    assert ev.kind is EventKind.LIVE_MIGRATE and ev.id == "ev-1"  # the rest of the event still reads
