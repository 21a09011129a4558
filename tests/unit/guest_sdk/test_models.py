"""MaintenanceEvent parsing: the text value, the JSON document, ETags."""

from __future__ import annotations

import dataclasses
from datetime import UTC, datetime

import pytest
from hypothesis import given
from hypothesis import strategies as st

from guest_sdk import EventKind, MaintenanceEvent, ProtocolError
from guest_sdk.models import normalize_etag
from tests.unit.guest_sdk.conftest import event_json


@pytest.mark.parametrize(
    ("body", "kind"),
    [
        ("", EventKind.NONE),
        ("\n", EventKind.NONE),
        ("   \r\n", EventKind.NONE),
        ("live_migrate", EventKind.LIVE_MIGRATE),
        ("live_migrate\n", EventKind.LIVE_MIGRATE),
        ("  live_migrate \r\n", EventKind.LIVE_MIGRATE),
        ("offline_migrate", EventKind.OFFLINE_MIGRATE),
        ("\toffline_migrate\n", EventKind.OFFLINE_MIGRATE),
        ("host_maintenance", EventKind.OTHER),
        ("LIVE_MIGRATE", EventKind.OTHER),
        ("reboot:2026-12-01", EventKind.OTHER),
    ],
)
def test_models_text_value_maps_to_kind_whitespace_tolerant(body: str, kind: EventKind) -> None:
    ev = MaintenanceEvent.from_text(body)
    assert ev.kind is kind
    assert ev.raw == body  # exactly what was sent
    assert ev.value == body.strip()
    assert ev.scheduled == (kind is not EventKind.NONE)
    assert (ev.id, ev.state, ev.not_before, ev.deadline, ev.acknowledged, ev.etag) == (None,) * 6


@pytest.mark.parametrize(
    "body",
    [
        "<html><body>Service Unavailable</body></html>",
        "live migrate",
        "a\x00b",
        "x" * 129,
        "live_migrate\nlive",
    ],
)
def test_models_text_garbage_is_protocol_error(body: str) -> None:
    with pytest.raises(ProtocolError):
        MaintenanceEvent.from_text(body)


def test_models_event_is_frozen() -> None:
    ev = MaintenanceEvent.from_text("live_migrate")
    with pytest.raises(dataclasses.FrozenInstanceError):
        ev.raw = "x"  # type: ignore[misc]


def test_models_json_document_fields() -> None:
    ev = MaintenanceEvent.from_json(event_json(acknowledged="ready", etag="abc"), etag="header-etag")
    assert ev.kind is EventKind.LIVE_MIGRATE
    assert ev.raw == "live_migrate"
    assert ev.id == "ev-1"
    assert ev.state == "scheduled"
    assert ev.not_before == datetime(2026, 12, 1, 2, 0, tzinfo=UTC)
    assert ev.deadline == ev.not_before
    assert ev.notified_at == datetime(2026, 12, 1, 1, 50, tzinfo=UTC)
    assert ev.acknowledged == "ready"
    assert ev.etag == "abc"  # the body's etag wins over the header's


def test_models_json_empty_event_and_header_etag_fallback() -> None:
    doc = event_json("")
    del doc["etag"]
    ev = MaintenanceEvent.from_json(doc, etag="h1")
    assert ev.kind is EventKind.NONE
    assert ev.etag == "h1"


def test_models_json_unknown_event_and_unknown_ack_are_reported_not_refused() -> None:
    ev = MaintenanceEvent.from_json(event_json("host_reboot", acknowledged="snoozed"))
    assert ev.kind is EventKind.OTHER
    assert ev.raw == "host_reboot"
    assert ev.acknowledged == "snoozed"


@pytest.mark.parametrize(
    "doc",
    [
        ["live_migrate"],
        "live_migrate",
        {"event": 3},
        {"event": "live_migrate", "id": 7},
        {"event": "live_migrate", "not_before": "tomorrow"},
        {"event": "live_migrate", "not_before": "2026-12-01T02:00:00"},  # no offset
        {"event": "<b>live</b>"},
        {"id": "ev-1", "state": "scheduled"},  # no event field: not "no event"
        {},
    ],
)
def test_models_json_wrong_shape_is_protocol_error(doc: object) -> None:
    with pytest.raises(ProtocolError):
        MaintenanceEvent.from_json(doc)


def test_models_same_content_ignores_etag() -> None:
    a = MaintenanceEvent.from_json(event_json(etag="one"))
    b = MaintenanceEvent.from_json(event_json(etag="two"))
    c = MaintenanceEvent.from_json(event_json(state="in_progress"))
    assert a.same_content(b)
    assert not a.same_content(c)
    assert not a.same_content(None)


def test_models_to_json_dict_round_trips() -> None:
    ev = MaintenanceEvent.from_json(event_json(acknowledged="offline"))
    doc = ev.to_json_dict()
    assert doc["kind"] == "live_migrate"
    assert doc["not_before"] == "2026-12-01T02:00:00Z"
    assert MaintenanceEvent.from_json(doc) == ev


@pytest.mark.parametrize(
    ("header", "tag"),
    [
        ('"abc"', "abc"),
        ("abc", "abc"),
        ('W/"abc"', "abc"),
        ("", None),
        (None, None),
        ('"' + "a" * 129 + '"', None),
    ],
)
def test_models_normalize_etag(header: str | None, tag: str | None) -> None:
    assert normalize_etag(header) == tag


@given(st.text(max_size=200))
def test_models_text_parsing_never_crashes_unexpectedly(body: str) -> None:
    # Any body either parses into some kind or is refused as a ProtocolError; nothing else escapes.
    try:
        ev = MaintenanceEvent.from_text(body)
    except ProtocolError:
        return
    assert ev.raw == body
    assert isinstance(ev.kind, EventKind)
