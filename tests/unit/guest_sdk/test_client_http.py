"""MaintenanceClient over HTTP, faked at the transport with `responses`: status classes, retries, limits."""

from __future__ import annotations

import json
from collections.abc import Callable

import pytest
import requests
import responses

from guest_sdk import (
    EventConflict,
    EventKind,
    GuestSDKError,
    MaintenanceClient,
    MetadataUnavailable,
    NotOnDroplet,
    NotSupportedByServer,
    ProtocolError,
    RequestRejected,
)
from tests.unit.guest_sdk.conftest import ACK_URL, JSON_URL, TEXT_URL, FakeClock, event_json

MakeClient = Callable[..., MaintenanceClient]


def _json_body(doc: object) -> str:
    return json.dumps(doc)


# -- the text endpoint -----------------------------------------------------------------------------


def test_client_event_reads_text_value_and_etag(
    http: responses.RequestsMock, make_client: MakeClient
) -> None:
    http.get(TEXT_URL, body="live_migrate", headers={"ETag": '"e1"'})
    ev = make_client().event()
    assert ev.kind is EventKind.LIVE_MIGRATE
    assert ev.raw == "live_migrate"
    assert ev.etag == "e1"


@pytest.mark.parametrize(("status", "body"), [(200, ""), (204, "")])
def test_client_event_empty_body_is_no_event(
    http: responses.RequestsMock, make_client: MakeClient, status: int, body: str
) -> None:
    http.get(TEXT_URL, body=body, status=status)
    ev = make_client().event()
    assert ev.kind is EventKind.NONE
    assert not ev.scheduled


def test_client_event_unknown_value_is_reported(
    http: responses.RequestsMock, make_client: MakeClient
) -> None:
    http.get(TEXT_URL, body="  host_reboot\n")
    ev = make_client().event()
    assert ev.kind is EventKind.OTHER
    assert ev.value == "host_reboot"


@pytest.mark.parametrize(
    "body",
    [
        b"\xff\xfe\x00\x01binary",
        b"\x00\x00\x00\x00",
        b"<html><head><title>502 Bad Gateway</title></head></html>",
        b"live_migrate\x1b[31m",
    ],
)
def test_client_event_binary_or_garbage_body_is_protocol_error(
    http: responses.RequestsMock, make_client: MakeClient, body: bytes
) -> None:
    http.get(TEXT_URL, body=body)
    with pytest.raises(ProtocolError):
        make_client().event()


def test_client_event_oversized_body_is_refused(
    http: responses.RequestsMock, make_client: MakeClient
) -> None:
    http.get(TEXT_URL, body="a" * 5000)
    with pytest.raises(ProtocolError, match="cap"):
        make_client(max_response_bytes=4096).event()


def test_client_event_oversized_content_length_is_refused_before_reading(
    http: responses.RequestsMock, make_client: MakeClient
) -> None:
    http.get(
        TEXT_URL,
        body="live_migrate",
        headers={"Content-Length": str(10**9)},
        auto_calculate_content_length=False,
    )
    with pytest.raises(ProtocolError, match="cap"):
        make_client().event()


# -- status classes ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "error"),
    [
        (400, RequestRejected),
        (401, RequestRejected),
        (403, RequestRejected),
        (404, NotOnDroplet),
        (405, RequestRejected),
        (409, EventConflict),
        (413, RequestRejected),
        (501, ProtocolError),
        (505, ProtocolError),
        (418, RequestRejected),
    ],
)
def test_client_status_4xx_and_non_transient_5xx_fail_at_once(
    http: responses.RequestsMock,
    make_client: MakeClient,
    fake_clock: FakeClock,
    status: int,
    error: type[Exception],
) -> None:
    rsp = http.get(TEXT_URL, body="refused\n", status=status)
    with pytest.raises(error):
        make_client().event()
    assert rsp.call_count == 1  # never retried
    assert fake_clock.sleeps == []


@pytest.mark.parametrize("status", [429, 500, 502, 503, 504, 599])
def test_client_status_transient_is_retried_then_unavailable(
    http: responses.RequestsMock, make_client: MakeClient, fake_clock: FakeClock, status: int
) -> None:
    rsp = http.get(TEXT_URL, body="busy", status=status)
    with pytest.raises(MetadataUnavailable, match=str(status)):
        make_client(retry_attempts=4, retry_initial_backoff_s=0.5, retry_max_backoff_s=4.0).event()
    assert rsp.call_count == 4
    assert len(fake_clock.sleeps) == 3
    assert all(0 < s <= 4.0 for s in fake_clock.sleeps)


def test_client_retry_recovers_after_transient_errors(
    http: responses.RequestsMock, make_client: MakeClient, fake_clock: FakeClock
) -> None:
    http.get(TEXT_URL, status=503)
    http.get(TEXT_URL, body=requests.exceptions.ConnectionError("reset"))
    http.get(TEXT_URL, body="offline_migrate")
    ev = make_client().event()
    assert ev.kind is EventKind.OFFLINE_MIGRATE
    assert len(fake_clock.sleeps) == 2


def test_client_retry_backoff_is_jittered_and_grows(
    http: responses.RequestsMock, make_client: MakeClient, fake_clock: FakeClock
) -> None:
    http.get(TEXT_URL, status=503)
    runs = []
    for _ in range(20):
        fake_clock.sleeps.clear()
        with pytest.raises(MetadataUnavailable):
            make_client(retry_attempts=5, retry_initial_backoff_s=1.0, retry_max_backoff_s=8.0).event()
        runs.append(list(fake_clock.sleeps))
    assert all(len(r) == 4 for r in runs)
    # Full jitter: the n-th wait lies in [min, initial * 2**n], and the waits are not all the same.
    for run in runs:
        for n, s in enumerate(run):
            assert 0 < s <= min(8.0, 1.0 * 2**n) + 1e-9
    assert len({round(r[3], 6) for r in runs}) > 1


@pytest.mark.parametrize("retry_after", ["7", "Thu, 01 Jan 2099 00:00:00 GMT"])
def test_client_retry_after_is_honoured(
    http: responses.RequestsMock, make_client: MakeClient, fake_clock: FakeClock, retry_after: str
) -> None:
    http.get(TEXT_URL, status=429, headers={"Retry-After": retry_after})
    http.get(TEXT_URL, body="live_migrate")
    ev = make_client(retry_initial_backoff_s=0.25).event()
    assert ev.kind is EventKind.LIVE_MIGRATE
    (slept,) = fake_clock.sleeps
    expected = 7.0 if retry_after == "7" else 30.0  # an HTTP-date far away is capped at 30 s
    assert expected <= slept <= expected + 0.25


def test_client_retry_after_on_503_is_honoured(
    http: responses.RequestsMock, make_client: MakeClient, fake_clock: FakeClock
) -> None:
    http.get(TEXT_URL, status=503, headers={"Retry-After": "3"})
    http.get(TEXT_URL, body="")
    make_client().event()
    assert 3.0 <= fake_clock.sleeps[0] <= 3.25


@pytest.mark.parametrize(
    "exc",
    [
        requests.exceptions.ConnectionError("refused"),
        requests.exceptions.ConnectTimeout("connect timeout"),
        requests.exceptions.ReadTimeout("read timeout"),
        requests.exceptions.ChunkedEncodingError("closed mid-body"),
    ],
)
def test_client_transport_errors_are_retried_then_unavailable(
    http: responses.RequestsMock, make_client: MakeClient, fake_clock: FakeClock, exc: Exception
) -> None:
    rsp = http.get(TEXT_URL, body=exc)
    with pytest.raises(MetadataUnavailable) as info:
        make_client(retry_attempts=3).event()
    assert rsp.call_count == 3
    assert isinstance(info.value, ConnectionError)
    assert isinstance(info.value, GuestSDKError)


def test_client_tls_error_is_not_retried(
    http: responses.RequestsMock, make_client: MakeClient, fake_clock: FakeClock
) -> None:
    rsp = http.get(TEXT_URL, body=requests.exceptions.SSLError("bad certificate"))
    with pytest.raises(MetadataUnavailable, match="TLS"):
        make_client().event()
    assert rsp.call_count == 1


def test_client_unavailable_while_event_known_carries_the_event(
    http: responses.RequestsMock, make_client: MakeClient
) -> None:
    http.get(TEXT_URL, body="live_migrate")
    http.get(TEXT_URL, body=requests.exceptions.ConnectionError("gone"))
    client = make_client()
    assert client.event().kind is EventKind.LIVE_MIGRATE
    with pytest.raises(MetadataUnavailable) as info:
        client.event()  # never a silent "no event"
    assert info.value.last_known is not None
    assert info.value.last_known.kind is EventKind.LIVE_MIGRATE


def test_client_redirect_is_not_followed(
    http: responses.RequestsMock, make_client: MakeClient, fake_clock: FakeClock
) -> None:
    http.get(TEXT_URL, status=302, headers={"Location": "http://198.51.100.7/v1/maintenance_event"})
    elsewhere = http.get("http://198.51.100.7/v1/maintenance_event", body="live_migrate")
    with pytest.raises(ProtocolError, match="redirect"):
        make_client().event()
    assert elsewhere.call_count == 0


def test_client_requests_carry_explicit_timeouts_and_no_proxies(
    http: responses.RequestsMock, make_client: MakeClient
) -> None:
    http.get(TEXT_URL, body="")
    make_client(timeout_s=3.0, connect_timeout_s=1.5).event()
    kwargs = http.calls[0].request.req_kwargs  # type: ignore[attr-defined]
    assert kwargs["timeout"] == (1.5, 3.0)
    assert not kwargs["proxies"]


# -- details -----------------------------------------------------------------------------------------


def test_client_details_reads_json(http: responses.RequestsMock, make_client: MakeClient) -> None:
    http.get(JSON_URL, json=event_json(etag="j1"), headers={"ETag": '"j1"'})
    client = make_client()
    ev = client.details()
    assert (ev.kind, ev.id, ev.state, ev.etag) == (EventKind.LIVE_MIGRATE, "ev-1", "scheduled", "j1")
    assert client.supports_json is True


def test_client_details_from_text_only_server(http: responses.RequestsMock, make_client: MakeClient) -> None:
    missing = http.get(JSON_URL, status=404, body="Not Found")
    text = http.get(TEXT_URL, body="live_migrate")
    client = make_client()
    ev = client.details()
    assert ev.kind is EventKind.LIVE_MIGRATE
    assert (ev.id, ev.state, ev.not_before, ev.deadline, ev.acknowledged, ev.etag) == (None,) * 6
    assert client.supports_json is False
    client.details()
    assert missing.call_count == 1  # learnt once
    assert text.call_count == 2


def test_client_details_json_path_answering_text_falls_back(
    http: responses.RequestsMock, make_client: MakeClient
) -> None:
    http.get(JSON_URL, body="live_migrate", content_type="text/plain")
    http.get(TEXT_URL, body="live_migrate")
    assert make_client().details().kind is EventKind.LIVE_MIGRATE


def test_client_details_unknown_address_is_not_on_droplet(
    http: responses.RequestsMock, make_client: MakeClient
) -> None:
    http.get(
        JSON_URL, status=404, json={"error": "unknown_droplet", "message": "no droplet has this address"}
    )
    http.get(TEXT_URL, status=404, body="no droplet has this address\n")
    client = make_client()
    with pytest.raises(NotOnDroplet, match="no droplet has this address"):
        client.details()
    assert client.supports_json is None


@pytest.mark.parametrize(
    "body", ["{not json", '"live_migrate"', "[]", '{"event": 5}', '{"event": "live_migrate", "etag": 7}']
)
def test_client_details_malformed_json_is_protocol_error(
    http: responses.RequestsMock, make_client: MakeClient, body: str
) -> None:
    http.get(JSON_URL, body=body, content_type="application/json")
    with pytest.raises(ProtocolError):
        make_client().details()


def test_client_json_error_body_fields_are_exposed(
    http: responses.RequestsMock, make_client: MakeClient
) -> None:
    http.get(
        JSON_URL,
        status=400,
        json={"error": "invalid_parameter", "message": "timeout_sec must be 1-300", "field": "timeout_sec"},
    )
    with pytest.raises(RequestRejected) as info:
        make_client().details()
    assert (info.value.status, info.value.code, info.value.field) == (400, "invalid_parameter", "timeout_sec")
    assert "timeout_sec must be 1-300" in str(info.value)


# -- acknowledge -------------------------------------------------------------------------------------


def test_client_acknowledge_posts_and_returns_updated_event(
    http: responses.RequestsMock, make_client: MakeClient
) -> None:
    rsp = http.post(ACK_URL, json=event_json(acknowledged="offline", etag="e2"))
    ev = make_client().acknowledge("ev-1", "offline", power_on_after=False)
    assert ev.acknowledged == "offline"
    assert ev.etag == "e2"
    assert json.loads(rsp.calls[0].request.body) == {
        "id": "ev-1",
        "action": "offline",
        "power_on_after": False,
    }


def test_client_acknowledge_other_event_is_conflict(
    http: responses.RequestsMock, make_client: MakeClient
) -> None:
    http.post(
        ACK_URL, status=409, json={"error": "not_current_event", "message": "ev-0 is not the current event"}
    )
    with pytest.raises(EventConflict) as info:
        make_client().acknowledge("ev-0", "ready")
    assert info.value.code == "not_current_event"


def test_client_acknowledge_bad_action_is_refused_locally(make_client: MakeClient) -> None:
    with pytest.raises(ValueError, match="ready"):
        make_client().acknowledge("ev-1", "later")


def test_client_acknowledge_on_text_only_server_is_not_supported(
    http: responses.RequestsMock, make_client: MakeClient
) -> None:
    http.post(ACK_URL, status=404, body="Not Found")
    http.get(TEXT_URL, body="live_migrate")
    client = make_client()
    with pytest.raises(NotSupportedByServer):
        client.acknowledge("ev-1", "ready")
    with pytest.raises(NotSupportedByServer):
        client.acknowledge("ev-1", "ready")  # known now: no request at all
    assert len(http.calls) == 2


def test_client_acknowledge_transient_failure_is_retried(
    http: responses.RequestsMock, make_client: MakeClient, fake_clock: FakeClock
) -> None:
    http.post(ACK_URL, status=503)
    http.post(ACK_URL, json=event_json(acknowledged="ready"))
    assert make_client().acknowledge("ev-1", "ready").acknowledged == "ready"
    assert len(fake_clock.sleeps) == 1


# -- construction ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs",
    [
        {"base_url": "169.254.169.254"},
        {"base_url": "ftp://169.254.169.254"},
        {"timeout_s": 0},
        {"connect_timeout_s": -1},
        {"poll_interval_s": 0},
        {"long_poll_timeout_s": 301},
        {"retry_attempts": 0},
    ],
)
def test_client_constructor_refuses_bad_settings(kwargs: dict[str, object]) -> None:
    with pytest.raises(ValueError):  # noqa: PT011 - each case has its own message
        MaintenanceClient(**kwargs)  # type: ignore[arg-type]


def test_client_context_manager_closes_owned_session_only() -> None:
    session = requests.Session()
    with MaintenanceClient(session=session) as client:
        assert client.base_url == "http://169.254.169.254"
    # The caller's session is still usable: the client did not close it.
    assert session.adapters
    session.close()
