"""The whole system end to end: the demo's evacuation as a test, then again with things breaking mid-way.

Real processes on loopback (one ``metadata-server``, one ``guest-agent`` per droplet, each from its own
127.0.0.N address), the engine and executor in the test process on SQLite with the simulated hypervisor.
Assertions are the demo's own consistency checks (``Demo.verify``) plus what each scenario adds: every
droplet on exactly one host (store = simulator), every hook ran exactly once (hook output files = agents'
journals), and the store, the metadata server and the agents agree on where each droplet is and that no
event is left.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import pytest
from click.testing import CliRunner

from guest_agent.config import Phase
from guest_agent.states import EventStatus
from guest_sdk import MaintenanceClient
from guest_sdk.models import EventKind
from host_engine.cli import cli
from host_engine.lab.demo import (
    DROPLETS,
    EVACUATE,
    Demo,
    DemoOptions,
    ScenarioAgent,
    check_bystander,
    check_moved,
)
from host_engine.models import Migration
from host_engine.states import MigrationState

pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.timeout(150)]

RESTART_DOWN_S = 1.5  # the metadata server stays down at least this long mid-evacuation ...
MAX_DOWN_S = 15.0  # ... and until another migration completed meanwhile (its flag cannot be cleared then)


@pytest.fixture
def demo(tmp_path: Path) -> Iterator[Demo]:
    lines: list[str] = []
    with Demo(DemoOptions(workdir=tmp_path / "demo", timeout_s=90.0), echo=lines.append) as d:
        d.setup()
        yield d
    # Demo.close stopped every process: nothing it started may outlive it.
    assert d.server is not None and d.server.proc is None
    assert all(a.proc is None for a in d.agents.values())


def assert_agrees(demo: Demo) -> None:
    """Store, simulator, metadata server and agents tell one story."""
    assert demo.verify() == []
    assert demo.store is not None and demo.server is not None
    store = demo.store
    for did, mid in demo.migrations.items():
        m = store.get_migration(mid)
        assert m.state is MigrationState.COMPLETED, did
        assert store.get_droplet(did).host == m.target_host != EVACUATE
        assert demo.world.hosts_holding(did) == [m.target_host]
    # Each guest, asking from its own address as a droplet does, reads "no event".
    for did, agent in demo.agents.items():
        with MaintenanceClient(demo.server.guest_url, source_address=agent.address) as client:
            assert client.event().kind is EventKind.NONE, did


def test_e2e_evacuation_ends_consistent(demo: Demo) -> None:
    written = demo.evacuate()
    assert {m.droplet_id for m in written} == {d.id for d in demo.options.droplets if d.host == EVACUATE}
    started = time.monotonic()
    demo.run()
    assert time.monotonic() - started < 60
    assert_agrees(demo)
    rows = {r.droplet: r for r in demo.rows()}
    # The owner who prefers offline got an offline migration; the injected fault cost one retry.
    assert rows["batch-1"].result.startswith("completed (offline")
    assert "2 attempts" in rows["logs-1"].result
    assert "batch-1" in demo.powered_off and "batch-1" in demo.booted
    # Every guest was told ahead (unsafe short notice: seconds, not minutes) and its drain hook ran first.
    for r in rows.values():
        assert r.lead_s is not None and r.lead_s > 3.0, r


@dataclass
class Chaos:
    """Breaks things between engine ticks: kill -9 an agent mid-event; restart the metadata server."""

    victim: str = "web-1"
    killed_at: float | None = None
    server_down_at: float | None = None
    server_back_at: float | None = None
    completed_at_down: int = 0
    completed_while_down: int = 0
    notes: list[str] = field(default_factory=list)

    def __call__(self, demo: Demo) -> None:
        self._kill_agent(demo)
        self._restart_server(demo)

    def _kill_agent(self, demo: Demo) -> None:
        """Once the victim's drain hook is done and it waits for the flag to clear: kill -9, start again."""
        if self.killed_at is not None:
            return
        agent = demo.agents[self.victim]
        journal = agent.journal()
        active = journal.get("active")
        event = journal.get("events", {}).get(active) if active else None
        if event is None or event.get("status") != EventStatus.DRAINED.value:
            return
        assert agent.proc is not None
        agent.proc.send_signal(signal.SIGKILL)
        agent.proc.wait(10)
        agent.proc = None
        self.killed_at = time.time()  # wall clock: the hooks stamp their lines with `date +%s.%N`
        self.notes.append(f"killed {self.victim}'s agent with -9 while {active} was drained")
        agent.start()

    def _restart_server(self, demo: Demo) -> None:
        """When the first migration has completed and others still run: down for a while, then back."""
        assert demo.store is not None and demo.server is not None
        if self.server_back_at is not None:
            return
        states = [demo.store.get_migration(mid).state for mid in demo.migrations.values()]
        completed = states.count(MigrationState.COMPLETED)
        if self.server_down_at is None:
            if completed and any(not s.is_terminal for s in states):
                demo.server.stop()
                self.server_down_at = time.monotonic()
                self.completed_at_down = completed
                self.notes.append(f"metadata server down with states {sorted(s.value for s in states)}")
            return
        down_s = time.monotonic() - self.server_down_at
        if (down_s >= RESTART_DOWN_S and completed > self.completed_at_down) or down_s >= MAX_DOWN_S:
            self.completed_while_down = completed - self.completed_at_down
            demo.server.launch()
            self.server_back_at = time.monotonic()


def test_e2e_metadata_server_restart_and_agent_kill9_mid_evacuation(demo: Demo) -> None:
    chaos = Chaos()
    demo.evacuate()
    demo.run(on_tick=chaos)
    assert chaos.killed_at is not None, "the agent was never killed"
    assert chaos.server_back_at is not None, "the metadata server was never restarted"
    # A migration finished while the server was down: the engine could not clear its flag then, and did later.
    assert chaos.completed_while_down >= 1, chaos.notes
    assert_agrees(demo)
    # The killed agent resumed from its journal: the drain ran once (before the kill), the restore once (after).
    victim = demo.agents[chaos.victim]
    runs = victim.hook_runs()
    assert [(r.phase, r.hook) for r in runs] == [
        (Phase.ON_NOTICE, "lb-drain"),
        (Phase.AFTER_MIGRATION, "lb-ready"),
    ]
    assert runs[0].at < chaos.killed_at < runs[1].at


def test_e2e_demo_command_is_registered() -> None:
    result = CliRunner().invoke(cli, ["demo", "--help"], catch_exceptions=False)
    assert result.exit_code == 0
    assert "--keep" in result.output


def _processes_mentioning(text: str) -> list[str]:
    """Command lines of live processes that mention ``text`` (the demo's working directory)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if text in cmdline:
            found.append(cmdline)
    return found


HOST_ENGINE = Path(sys.executable).parent / "host-engine"


def test_e2e_host_engine_demo_exits_0_and_leaves_no_process(tmp_path: Path) -> None:
    workdir = tmp_path / "demo"
    started = time.monotonic()
    done = subprocess.run(
        [str(HOST_ENGINE), "demo", "--workdir", str(workdir)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert time.monotonic() - started < 60
    assert "consistent after" in done.stdout
    assert "draining web-1 from the load balancer" in done.stdout
    assert _processes_mentioning(str(workdir)) == []


def test_e2e_host_engine_demo_ctrl_c_stops_everything(tmp_path: Path) -> None:
    workdir = tmp_path / "demo"
    # Through a tiny exec wrapper that restores SIGINT's default: a test runner started as a shell's background
    # job passes SIGINT on ignored, and a terminal's Ctrl-C never is.
    argv = [str(HOST_ENGINE), "demo", "--workdir", str(workdir)]
    wrapper = "import os, signal, sys; signal.signal(signal.SIGINT, signal.SIG_DFL); os.execv(sys.argv[1], sys.argv[1:])"
    proc = subprocess.Popen(
        [sys.executable, "-c", wrapper, *argv], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    try:
        deadline = time.monotonic() + 60
        assert proc.stdout is not None
        for line in proc.stdout:  # wait until the evacuation is under way
            if "running: attempt 1" in line or time.monotonic() > deadline:
                break
        assert _processes_mentioning(str(workdir)), "the demo's processes should be running now"
        proc.send_signal(signal.SIGINT)
        rest, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, rest[-3000:]
    assert "interrupted" in rest
    assert _processes_mentioning(str(workdir)) == []


def test_e2e_host_engine_demo_that_fails_exits_1_and_leaves_no_process(tmp_path: Path) -> None:
    workdir = tmp_path / "demo"
    done = subprocess.run(
        [str(HOST_ENGINE), "demo", "--workdir", str(workdir), "--timeout", "2"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 1, done.stdout[-3000:]
    assert "not finished after 2 s" in done.stdout
    assert _processes_mentioning(str(workdir)) == []


def test_e2e_demo_checks_catch_a_hook_run_twice_and_a_bystander_that_saw_an_event(tmp_path: Path) -> None:
    """The demo's verdict is only worth something if its checks fail when they should (no processes here)."""
    web1 = next(d for d in DROPLETS if d.id == "web-1")
    agent = ScenarioAgent.for_droplet(web1, "127.0.0.11", tmp_path / "web-1")
    agent.workdir.mkdir()
    now = datetime.now(UTC)
    m = Migration("m-1", "web-1", "hv-1", "hv-3", MigrationState.COMPLETED, "ev-1", now, now, now)
    lines = ["1.0 on_notice lb-drain ev-1 x", "2.0 after_migration lb-ready ev-1 x"]
    agent.hooks_path.write_text("\n".join(lines) + "\n")
    hooks = {"on_notice/lb-drain": {"outcome": "ok"}, "after_migration/lb-ready": {"outcome": "ok"}}
    agent.journal_path.write_text(
        json.dumps({"active": None, "events": {"ev-1": {"status": "done", "hooks": hooks}}})
    )
    assert check_moved("web-1", agent, m) == []
    agent.hooks_path.write_text("\n".join([*lines, "3.0 after_migration lb-ready ev-1 x"]) + "\n")
    assert check_moved("web-1", agent, m) == [
        "web-1: after_migration/lb-ready ran 2 times, expected exactly once"
    ]
    assert check_bystander("web-1", agent) != []
