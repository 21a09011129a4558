"""The real agent started on a hostile journal: moved aside, one log line, and the agent works (no crash loop)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.integration import test_agent_harness as harness
from tests.integration.test_agent_harness import DROPLET, AgentProcess, append_hook, lines
from tests.servers import MetadataServer

metadata = harness.metadata
agent_factory = harness.agent_factory

pytestmark = pytest.mark.slow


@pytest.mark.parametrize(
    "content",
    [
        {"version": 1, "active": None, "events": []},  # AttributeError at start before
        {
            "version": 1,
            "active": "ev-0",
            "events": {
                "ev-0": {
                    "server_id": "ev-0",
                    "kind": "live_migrate",
                    "status": "draining",
                    "first_seen": 1.0,
                    "deadline": "tomorrow",  # TypeError every 5 s before
                    "not_before": None,
                    "simulated": False,
                    "history": [],
                    "hooks": {},
                    "data": {},
                }
            },
        },
    ],
    ids=["events-a-list", "deadline-a-string"],
)
def test_agent_starts_on_a_hostile_journal_and_handles_events(
    tmp_path: Path,
    metadata: MetadataServer,
    agent_factory: Callable[..., AgentProcess],
    content: object,
) -> None:
    drain = tmp_path / "drain"
    agent = agent_factory(hooks={"on_notice": [append_hook("drain", drain)]})
    agent.journal_path.write_text(json.dumps(content))
    agent.start()
    agent.wait_for(lambda: "moved aside" in agent.log(), "the journal to be moved aside")
    metadata.set_event(DROPLET, "ev-1", event="live_migrate", state="scheduled")
    agent.wait_status("ev-1", "drained")
    assert len(lines(drain)) == 1
    assert list(agent.workdir.glob("journal.json.corrupt-*"))
    assert "Traceback" not in agent.log()
    assert agent.stop() == 0
