"""The metrics exposition and the journald-friendly log format."""

from __future__ import annotations

import logging

import pytest
import requests

from guest_agent.cli import setup_logging
from guest_agent.metrics import Metrics, serve
from guest_agent.states import HookOutcome


def test_metrics_render_prometheus_text() -> None:
    m = Metrics()
    m.event_seen("live_migrate", 612.5)
    m.hook_done("on_notice", "drain", 2.5, HookOutcome.OK)
    m.hook_done("on_notice", "drain", 1.5, HookOutcome.FAILED)
    m.metadata_up(True)
    text = m.render()
    assert 'guest_agent_events_seen_total{kind="live_migrate"} 1' in text
    assert "guest_agent_notice_lead_time_seconds 612.500" in text
    assert 'guest_agent_hook_duration_seconds_sum{phase="on_notice",hook="drain"} 4.000' in text
    assert 'guest_agent_hook_duration_seconds_count{phase="on_notice",hook="drain"} 2' in text
    assert 'guest_agent_hook_failures_total{phase="on_notice",hook="drain"} 1' in text
    assert 'guest_agent_hook_runs_total{phase="on_notice",hook="drain",outcome="ok"} 1' in text
    assert "guest_agent_metadata_up 1" in text
    assert "# TYPE guest_agent_hook_duration_seconds summary" in text


def test_metrics_served_on_loopback() -> None:
    m = Metrics()
    server = serve(m, "127.0.0.1", 0)
    try:
        port = server.server_address[1]
        r = requests.get(f"http://127.0.0.1:{port}/metrics", timeout=5)
        assert r.status_code == 200
        assert r.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        assert requests.get(f"http://127.0.0.1:{port}/other", timeout=5).status_code == 404
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.parametrize(("journal", "prefix"), [(True, "<3>guest_agent.test: "), (False, "")])
def test_logging_is_journald_friendly_under_systemd(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], journal: bool, prefix: str
) -> None:
    if journal:
        monkeypatch.setenv("JOURNAL_STREAM", "8:12345")
    else:
        monkeypatch.delenv("JOURNAL_STREAM", raising=False)
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    try:
        setup_logging("info")
        logging.getLogger("guest_agent.test").error("hook %s failed", "drain")
    finally:
        root.handlers[:], level = saved
        root.setLevel(level)
    err = capsys.readouterr().err.strip()
    assert err.endswith("guest_agent.test: hook drain failed")
    if prefix:
        assert err.startswith(prefix)
    else:
        assert " ERROR " in err
