"""Run the real ``guest-agent`` as a subprocess against the real metadata server (helpers + a smoke test).

Hooks in these tests are real programs that append a line to a file, so "ran exactly once" is a line count.
The power-off command is always a harmless ``sh -c 'echo ... >> file'``.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from host_engine.lab.launch import GuestAgentProcess, agent_config
from tests.servers import MetadataServer

AGENT_BIN = Path(sys.executable).parent / "guest-agent"
DROPLET = "d1"
ADDRESS = "127.0.0.2"
WAIT_S = 15.0  # generous: a bound that proves the mechanism, not a latency measurement


def append_hook(name: str, out: Path, *, extra: str = "", **fields: Any) -> dict[str, Any]:
    """A command hook that appends ``<event id> <unix time>`` to ``out`` (then runs ``extra`` shell)."""
    script = f'echo "$MAINTENANCE_EVENT_ID $(date +%s.%N)" >> {out}' + (f"; {extra}" if extra else "")
    return {"name": name, "command": ["/bin/sh", "-c", script], **fields}


def render_config(
    *,
    metadata_url: str,
    workdir: Path,
    source_address: str = ADDRESS,
    agent: dict[str, Any] | None = None,
    hooks: dict[str, list[dict[str, Any]]] | None = None,
) -> str:
    """The lab's agent config with these tests' defaults: a journal in ``workdir``, a harmless power-off
    command, no deadline margin, backoff capped at 1 s."""
    policy = {
        "journal_path": str(workdir / "journal.json"),
        "power_off_command": ["/bin/sh", "-c", f"echo poweroff >> {workdir / 'poweroff'}"],
        "deadline_margin_s": 0,
        **(agent or {}),
    }
    metadata = {"url": metadata_url, "source_address": source_address, "max_backoff_s": 1}
    return agent_config(metadata=metadata, agent=policy, hooks=hooks)


@dataclass
class AgentProcess(GuestAgentProcess):
    """The lab's agent launcher (``host_engine.lab.launch``), with waits that fail the test with its log."""

    def wait_for(self, check: Callable[[], object], what: str, timeout_s: float = WAIT_S) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if check():
                return
            if self.proc is not None and self.proc.poll() is not None:
                pytest.fail(f"agent exited ({self.proc.returncode}) while waiting for {what}:\n{self.log()}")
            time.sleep(0.02)
        pytest.fail(f"timed out after {timeout_s} s waiting for {what}:\n{self.log()}")

    def wait_status(self, event_id: str, status: str, timeout_s: float = WAIT_S) -> None:
        self.wait_for(
            lambda: (self.event(event_id) or {}).get("status") == status, f"{event_id} {status}", timeout_s
        )


def lines(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


@pytest.fixture
def metadata(tmp_path: Path) -> Iterator[MetadataServer]:
    with MetadataServer.start(tmp_path / "metadata") as ms:
        ms.register(DROPLET, [ADDRESS])
        yield ms


@pytest.fixture
def agent_factory(tmp_path: Path, metadata: MetadataServer) -> Iterator[Callable[..., AgentProcess]]:
    started: list[AgentProcess] = []

    def make(**kw: Any) -> AgentProcess:
        workdir = tmp_path / "agent"
        workdir.mkdir(exist_ok=True)
        config = workdir / "config.toml"
        config.write_text(render_config(metadata_url=metadata.guest_url, workdir=workdir, **kw))
        agent = AgentProcess(workdir, config)
        started.append(agent)
        return agent

    yield make
    for agent in started:
        if agent.proc is not None and agent.proc.poll() is None:
            agent.proc.kill()
            agent.proc.wait(10)


@pytest.mark.slow
def test_agent_harness_starts_idle_and_stops_on_sigterm(agent_factory: Callable[..., AgentProcess]) -> None:
    agent = agent_factory().start()
    agent.wait_for(lambda: "guest-agent started" in agent.log(), "the start line")
    assert agent.stop() == 0
    assert "guest-agent stopped" in agent.log()
