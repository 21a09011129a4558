"""``guest-agent status --json`` is for programs: a time nobody knows is ``null``, never the ``-`` the text
output shows (issue 15.9). The metadata service is faked at the transport (``responses``)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import responses
from click.testing import CliRunner

from guest_agent.cli import main
from guest_agent.journal import Journal

URL = "http://127.0.0.1:9"


def _event(**fields: Any) -> dict[str, Any]:
    doc = {"event": "", "id": None, "state": None, "not_before": None, "notified_at": None, "deadline": None,
           "acknowledged": None, "etag": '"e0"'}  # fmt: skip
    doc.update(fields)
    return doc


@pytest.mark.parametrize(
    "served",
    [_event(), _event(event="live_migrate", id="m-1-live", state="scheduled", etag='"e1"')],
    ids=["no event", "event without times"],
)
@responses.activate
def test_status_json_has_null_for_unknown_times(tmp_path: Path, served: dict[str, Any]) -> None:
    responses.get(f"{URL}/v1/maintenance_event.json", json=served, headers={"ETag": served["etag"]})
    journal_path = tmp_path / "journal.json"
    journal = Journal.open(journal_path)
    journal.begin_event(event_id="m-0-live", server_id="m-0-live", kind="live_migrate", deadline=None,
                        not_before=None)  # fmt: skip
    config = tmp_path / "config.toml"
    config.write_text(f'[metadata]\nurl = "{URL}"\ntimeout_s = 1\n[agent]\njournal_path = "{journal_path}"\n')

    r = CliRunner(env={"GUEST_AGENT_CONFIG": None}).invoke(
        main, ["status", "--config", str(config), "--json"], catch_exceptions=False
    )
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    assert doc["metadata"]["not_before"] is None and doc["metadata"]["deadline"] is None, doc
    assert doc["active"]["id"] == "m-0-live" and doc["active"]["deadline"] is None, doc
    assert doc["recent"][-1]["deadline"] is None
    assert isinstance(doc["active"]["first_seen"], str) and doc["active"]["first_seen"].endswith("Z")
    assert '"-"' not in r.stdout
