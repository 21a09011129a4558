"""The shared retry policy and ``Retry-After`` parser (``guest_sdk.retry``), and the time bounds they give.

The same module drives the SDK client, the agent's webhooks and the engine's admin client, so a hostile
``Retry-After`` (negative, nan, huge, an HTTP-date) means the same thing everywhere.
"""

from __future__ import annotations

import math
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import responses

from guest_sdk import MaintenanceClient, MetadataUnavailable
from guest_sdk.retry import (
    RETRY_AFTER_MAX_S,
    RETRY_AFTER_MIN_S,
    RetryPolicy,
    TransientStatus,
    parse_retry_after,
)
from tests.unit.guest_sdk.conftest import JSON_URL, TEXT_URL, FakeClock

MakeClient = Callable[..., MaintenanceClient]
NOW = 1445412480.0  # Wed, 21 Oct 2015 07:28:00 GMT


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("3", 3.0),
        (" 7 ", 7.0),
        ("2.5", 2.5),
        ("0", RETRY_AFTER_MIN_S),  # "now" is not a busy loop
        ("99999", RETRY_AFTER_MAX_S),
        ("1e400", None),  # infinite
        ("-1", None),
        ("nan", None),
        ("NaN", None),
        ("inf", None),
        ("-inf", None),
        ("", None),
        ("soon", None),
        ("0x10", None),
        ("9" * 10_000, None),
        (None, None),
        ("Wed, 21 Oct 2015 07:28:10 GMT", 10.0),
        ("Wed, 21 Oct 2015 07:27:00 GMT", RETRY_AFTER_MIN_S),  # already past
        ("Thu, 01 Jan 2099 00:00:00 GMT", RETRY_AFTER_MAX_S),
        ("Wednesday, 21-Oct-15 07:28:05 GMT", 5.0),  # RFC 850 and asctime: HTTP says accept them too
        ("Wed Oct 21 07:28:05 2015", 5.0),
        ("Wed, 99 Oct 2015 07:28:10 GMT", None),
    ],
)
def test_retry_after_parser_clamps_and_rejects(value: str | None, expected: float | None) -> None:
    assert parse_retry_after(value, now_epoch_s=NOW) == expected


def test_retry_after_parser_bounds_are_parameters() -> None:
    assert parse_retry_after("100", min_s=0, max_s=300) == 100.0
    assert parse_retry_after("0", min_s=0, max_s=300) == 0.0


def _policy_run(
    policy: RetryPolicy, retry_after: float | None, *, deadline: float | None = None
) -> FakeClock:
    clock = FakeClock()
    attempts = 0

    def attempt() -> None:
        nonlocal attempts
        attempts += 1
        raise TransientStatus(503, "http://x", retry_after)

    with pytest.raises(TransientStatus):
        policy.retrying(sleep=clock.sleep, clock=clock.clock, deadline=deadline)(attempt)
    assert attempts == len(clock.sleeps) + 1
    return clock


def test_retry_policy_honours_a_retry_after_and_falls_back_to_backoff_without_one() -> None:
    clock = _policy_run(RetryPolicy(attempts=3, initial_backoff_s=0.5, max_backoff_s=4.0), 3.0)
    assert all(3.0 <= s <= 3.5 for s in clock.sleeps) and len(clock.sleeps) == 2
    clock = _policy_run(RetryPolicy(attempts=3, initial_backoff_s=0.5, max_backoff_s=4.0), None)
    assert len(clock.sleeps) == 2 and all(0 < s <= 4.0 for s in clock.sleeps)


def test_retry_policy_budget_bounds_the_retries_after_the_first_failure() -> None:
    policy = RetryPolicy(attempts=100, initial_backoff_s=0.5, max_backoff_s=4.0, budget_s=20.0)
    clock = _policy_run(policy, RETRY_AFTER_MAX_S)
    assert clock.sleeps == [] or clock.now - 1000.0 <= 20.0
    clock = _policy_run(policy, None)
    # Stopped by the budget, not by the attempts: the sleep it did not take (<= max_backoff_s) would have
    # ended past it. (The count of sleeps depends on the jitter.)
    assert len(clock.sleeps) < policy.attempts - 1
    assert 20.0 - policy.max_backoff_s < clock.now - 1000.0 <= 20.0


def test_retry_policy_never_sleeps_past_the_callers_deadline() -> None:
    policy = RetryPolicy(attempts=100, initial_backoff_s=0.5, max_backoff_s=4.0, budget_s=None)
    clock = _policy_run(policy, 5.0, deadline=1012.0)
    assert len(clock.sleeps) == 2 and clock.now <= 1012.0


@pytest.mark.parametrize(
    "kwargs",
    [
        {"attempts": 0},
        {"initial_backoff_s": 0},
        {"initial_backoff_s": 2, "max_backoff_s": 1},
        {"max_backoff_s": math.inf},
        {"budget_s": -1},
        {"budget_s": math.inf},
    ],
)
def test_retry_policy_refuses_nonsense(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError, match=r"must be|need"):
        RetryPolicy(**kwargs)  # type: ignore[arg-type]


# -- the client: every call is bounded -----------------------------------------------------------------


@pytest.mark.parametrize("retry_after", ["3600", "-1", "nan", "Thu, 01 Jan 2099 00:00:00 GMT"])
def test_client_call_gives_up_within_its_retry_budget(
    http: responses.RequestsMock, make_client: MakeClient, fake_clock: FakeClock, retry_after: str
) -> None:
    http.get(TEXT_URL, status=503, headers={"Retry-After": retry_after})
    client = make_client(retry_attempts=50)
    with pytest.raises(MetadataUnavailable):
        client.event()
    assert fake_clock.now - 1000.0 <= 60.0  # the default budget, whatever the server asked for
    assert all(s > 0 for s in fake_clock.sleeps)  # -1 / nan: the default backoff, never a busy loop


@pytest.mark.parametrize("method", ["event", "details"])
def test_client_call_with_timeout_gives_up_by_then(
    http: responses.RequestsMock, make_client: MakeClient, fake_clock: FakeClock, method: str
) -> None:
    http.get(TEXT_URL, status=503, headers={"Retry-After": "3600"})
    http.get(JSON_URL, status=503, headers={"Retry-After": "3600"})
    client = make_client(retry_attempts=50)
    with pytest.raises(MetadataUnavailable):
        getattr(client, method)(timeout_s=5)
    assert fake_clock.now - 1000.0 <= 5.0


def test_client_refuses_timeouts_that_cannot_work() -> None:
    for kwargs in ({"timeout_s": 1e300}, {"connect_timeout_s": math.inf}, {"poll_interval_s": 0}):
        with pytest.raises(ValueError, match="must be"):
            MaintenanceClient(**kwargs)  # type: ignore[arg-type]


# -- `python -m guest_sdk` against a real server that says "come back in an hour" -------------------------


class _BusyHandler(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        body = b"busy\n"
        self.send_response(503)
        self.send_header("Retry-After", "3600")
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def busy_server() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _BusyHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.parametrize("mode", [[], ["--json"], ["--wait"], ["--wait-clear"]])
def test_cli_timeout_bounds_every_mode_against_retry_after_3600(busy_server: str, mode: list[str]) -> None:
    started = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "guest_sdk", "--url", busy_server, "--timeout", "3", *mode],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    elapsed = time.monotonic() - started
    assert proc.returncode == 1, proc.stderr
    assert "HTTP 503" in proc.stderr
    assert elapsed < 15.0  # the issue: 180 s before


# -- the engine's admin client uses the same parser and policy ----------------------------------------------


@pytest.mark.parametrize(
    ("header", "low", "high"), [("date+20", 17.0, 21.0), ("-1", 0.0, 5.0), ("nan", 0.0, 5.0)]
)
def test_engine_admin_client_reads_retry_after_like_everyone_else(
    http: responses.RequestsMock, header: str, low: float, high: float
) -> None:
    from host_engine.metadata.client import AdminClient

    if header == "date+20":
        header = datetime.fromtimestamp(time.time() + 20, UTC).strftime("%a, %d %b %Y %H:%M:%S GMT")
    http.get("http://127.0.0.1:9/healthz", status=503, headers={"Retry-After": header})
    http.get("http://127.0.0.1:9/healthz", status=200)
    sleeps: list[float] = []
    with AdminClient("http://127.0.0.1:9", "token", sleep=sleeps.append) as client:
        assert client.healthz()
    assert len(sleeps) == 1
    assert low < sleeps[0] <= high, sleeps  # an HTTP-date is honoured; -1/nan: a real backoff, never 0
