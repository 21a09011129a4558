"""`python -m guest_sdk`: what it prints and the exit status for each kind of event and error."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import requests
import responses
from click.testing import CliRunner

from guest_sdk.__main__ import main
from tests.unit.guest_sdk.conftest import BASE, JSON_URL, TEXT_URL, event_json


@pytest.fixture
def runner() -> CliRunner:
    return CliRunner()


@pytest.mark.parametrize(
    ("body", "code", "printed"),
    [
        ("", 0, ""),
        ("live_migrate", 10, "live_migrate\n"),
        ("offline_migrate\n", 11, "offline_migrate\n"),
        ("host_reboot", 12, "host_reboot\n"),
    ],
)
def test_cli_exit_status_says_the_kind(
    http: responses.RequestsMock, runner: CliRunner, body: str, code: int, printed: str
) -> None:
    http.get(TEXT_URL, body=body)
    result = runner.invoke(main, ["--url", BASE], catch_exceptions=False)
    assert result.exit_code == code
    assert result.stdout == printed


def test_cli_json_prints_details(http: responses.RequestsMock, runner: CliRunner) -> None:
    http.get(JSON_URL, json=event_json(acknowledged="ready"))
    result = runner.invoke(main, ["--url", BASE, "--json"], catch_exceptions=False)
    assert result.exit_code == 10
    doc = json.loads(result.stdout)
    assert doc["event"] == "live_migrate"
    assert doc["id"] == "ev-1"
    assert doc["acknowledged"] == "ready"
    assert doc["not_before"] == "2026-12-01T02:00:00Z"


def test_cli_json_from_text_only_server_has_nulls(http: responses.RequestsMock, runner: CliRunner) -> None:
    http.get(JSON_URL, status=404)
    http.get(TEXT_URL, body="offline_migrate")
    result = runner.invoke(main, ["--url", BASE, "--json"], catch_exceptions=False)
    assert result.exit_code == 11
    doc = json.loads(result.stdout)
    assert doc["event"] == "offline_migrate"
    assert doc["id"] is None
    assert doc["etag"] is None


def test_cli_wait_returns_the_scheduled_event(http: responses.RequestsMock, runner: CliRunner) -> None:
    http.get(JSON_URL, json=event_json("", etag="e0"))
    http.get(JSON_URL, json=event_json("live_migrate", etag="e1"))
    result = runner.invoke(main, ["--url", BASE, "--wait", "--timeout", "30"], catch_exceptions=False)
    assert result.exit_code == 10
    assert result.stdout == "live_migrate\n"
    assert "wait_for_change=true" in str(http.calls[1].request.url)


def test_cli_wait_clear(http: responses.RequestsMock, runner: CliRunner) -> None:
    http.get(JSON_URL, json=event_json("live_migrate", etag="e1"))
    http.get(JSON_URL, json=event_json("", etag="e2"))
    result = runner.invoke(main, ["--url", BASE, "--wait-clear"], catch_exceptions=False)
    assert result.exit_code == 0
    assert result.stdout == ""


def test_cli_wait_timeout_is_an_error(http: responses.RequestsMock, runner: CliRunner) -> None:
    http.get(JSON_URL, json=event_json("", etag="e0"))
    result = runner.invoke(main, ["--url", BASE, "--wait", "--timeout", "0"], catch_exceptions=False)
    assert result.exit_code == 1
    assert "timed out" in result.stderr


@pytest.mark.parametrize(
    ("answer", "message"),
    [
        ({"status": 404, "body": "no droplet"}, "no droplet"),
        ({"status": 400, "body": "bad"}, "HTTP 400"),
        ({"body": requests.exceptions.SSLError("tls")}, "TLS"),
        ({"body": "<html>oops</html>"}, "not an event value"),
    ],
)
def test_cli_errors_exit_1_with_one_line(
    http: responses.RequestsMock, runner: CliRunner, answer: dict[str, object], message: str
) -> None:
    http.get(TEXT_URL, **answer)
    result = runner.invoke(main, ["--url", BASE], catch_exceptions=False)
    assert result.exit_code == 1
    assert message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert "Traceback" not in result.stderr


def test_cli_bad_url_is_an_error(runner: CliRunner) -> None:
    result = runner.invoke(main, ["--url", "169.254.169.254"], catch_exceptions=False)
    assert result.exit_code == 1
    assert "http(s) URL" in result.stderr


def test_cli_url_from_environment(http: responses.RequestsMock, runner: CliRunner) -> None:
    http.get("http://127.0.0.9:8123/v1/maintenance_event", body="live_migrate")
    result = runner.invoke(main, [], env={"GUEST_SDK_URL": "http://127.0.0.9:8123"}, catch_exceptions=False)
    assert result.exit_code == 10


def test_cli_runs_as_a_module_and_reports_unreachable_service() -> None:
    # Port 9 on 127.0.0.1 refuses connections; one attempt, so nothing sleeps between retries.
    proc = subprocess.run(
        [sys.executable, "-m", "guest_sdk", "--url", "http://127.0.0.1:9", "--attempts", "1"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 1
    assert "guest_sdk: error:" in proc.stderr
    assert "connection failed" in proc.stderr
