"""``kill -9`` the real agent between hooks, during a hook and between phases, then start it again.

Across both lives every finished hook ran exactly once; an interrupted one was re-run only when marked
idempotent (and reported either way); after-hooks run even when the flag cleared while the agent was dead.
In production systemd kills what is left of the unit's processes when the agent dies; the tests do the same
to the interrupted hook's process group.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.integration import test_agent_harness as harness
from tests.integration.test_agent_harness import AGENT_BIN, DROPLET, AgentProcess, append_hook, lines
from tests.servers import MetadataServer

metadata = harness.metadata
agent_factory = harness.agent_factory

pytestmark = pytest.mark.slow


def _kill_hook_group(pid_file: Path) -> None:
    """What systemd does to the rest of the unit's cgroup when its main process dies."""
    with contextlib.suppress(ProcessLookupError, FileNotFoundError, ValueError):
        os.killpg(int(pid_file.read_text().split()[0]), signal.SIGKILL)


def test_agent_crash_between_hooks_runs_each_finished_hook_once(
    tmp_path: Path, metadata: MetadataServer, agent_factory: Callable[..., AgentProcess]
) -> None:
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    agent = agent_factory(
        hooks={
            "on_notice": [
                append_hook("a", a),
                # b writes its line only at its end; killed before or during it, it must run (once) later.
                {
                    "name": "b",
                    "command": [
                        "/bin/sh",
                        "-c",
                        f"echo $$ > {tmp_path / 'b.pid'}; sleep 1; echo done >> {b}",
                    ],
                    "idempotent": True,
                },
                append_hook("c", c),
            ]
        }
    ).start()
    metadata.set_event(DROPLET, "ev-1", event="live_migrate", state="scheduled")
    agent.wait_for(lambda: agent.hook_outcome("ev-1", "on_notice", "a") == "ok", "hook a to finish")
    agent.kill9()  # right after a's end was journaled: before or just as b starts
    _kill_hook_group(tmp_path / "b.pid")
    assert lines(c) == []

    agent.start()
    agent.wait_status("ev-1", "drained")
    assert len(lines(a)) == 1
    assert lines(b) == ["done"]
    assert len(lines(c)) == 1


@pytest.mark.parametrize("idempotent", [False, True])
def test_agent_crash_during_a_hook_handles_it_as_configured(
    tmp_path: Path, metadata: MetadataServer, agent_factory: Callable[..., AgentProcess], idempotent: bool
) -> None:
    started, done, after = tmp_path / "started", tmp_path / "done", tmp_path / "after"
    pid = tmp_path / "slow.pid"
    script = f"echo $$ > {pid}; echo x >> {started}; sleep 3; echo x >> {done}"
    agent = agent_factory(
        hooks={
            "on_notice": [
                {"name": "slow", "command": ["/bin/sh", "-c", script], "idempotent": idempotent},
                append_hook("after-slow", after),
            ]
        }
    ).start()
    metadata.set_event(DROPLET, "ev-2", event="live_migrate", state="scheduled")
    agent.wait_for(lambda: lines(started), "the slow hook to start")
    agent.kill9()
    _kill_hook_group(pid)

    agent.start()
    agent.wait_status("ev-2", "drained", timeout_s=30)
    assert len(lines(after)) == 1
    if idempotent:
        assert len(lines(started)) == 2  # run again...
        assert len(lines(done)) == 1  # ...and finished exactly once
        assert agent.hook_outcome("ev-2", "on_notice", "slow") == "ok"
        assert "running it again (idempotent)" in agent.log()
    else:
        assert len(lines(started)) == 1  # not run again
        assert lines(done) == []
        assert agent.hook_outcome("ev-2", "on_notice", "slow") == "interrupted"
        assert "not idempotent, so not run again" in agent.log()
    status = subprocess.run(
        [str(AGENT_BIN), "status", "--config", str(agent.config_path)],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert f"on_notice/slow: {'ok' if idempotent else 'interrupted'}" in status.stdout


def test_agent_crash_between_phases_then_flag_cleared_while_down(
    tmp_path: Path, metadata: MetadataServer, agent_factory: Callable[..., AgentProcess]
) -> None:
    drain, restore = tmp_path / "drain", tmp_path / "restore"
    agent = agent_factory(
        hooks={
            "on_notice": [append_hook("drain", drain)],
            "after_migration": [append_hook("restore", restore)],
        }
    ).start()
    metadata.set_event(DROPLET, "ev-3", event="live_migrate", state="scheduled")
    agent.wait_status("ev-3", "drained")
    agent.kill9()
    metadata.clear_event(DROPLET)  # the migration finished while the agent was dead

    agent.start()
    agent.wait_status("ev-3", "done")
    assert len(lines(drain)) == 1
    assert len(lines(restore)) == 1


def test_agent_crash_during_after_migration_resumes_it(
    tmp_path: Path, metadata: MetadataServer, agent_factory: Callable[..., AgentProcess]
) -> None:
    drain, r1, r2 = tmp_path / "drain", tmp_path / "r1", tmp_path / "r2"
    agent = agent_factory(
        hooks={
            "on_notice": [append_hook("drain", drain)],
            "after_migration": [
                append_hook("r1", r1, extra=f"echo $$ > {tmp_path / 'r1.pid'}; sleep 3"),
                append_hook("r2", r2),
            ],
        }
    ).start()
    metadata.set_event(DROPLET, "ev-4", event="live_migrate", state="scheduled")
    agent.wait_status("ev-4", "drained")
    metadata.clear_event(DROPLET)
    agent.wait_for(lambda: lines(r1), "r1 to start")
    agent.kill9()
    _kill_hook_group(tmp_path / "r1.pid")

    agent.start()  # the flag is clear: the restore phase is resumed, r1 (not idempotent) is not re-run
    agent.wait_status("ev-4", "done")
    assert len(lines(drain)) == 1
    assert len(lines(r1)) == 1
    assert len(lines(r2)) == 1
    assert agent.hook_outcome("ev-4", "after_migration", "r1") == "interrupted"


def test_agent_crash_in_the_shutdown_path_never_powers_off_twice(
    tmp_path: Path, metadata: MetadataServer, agent_factory: Callable[..., AgentProcess]
) -> None:
    stop_app = tmp_path / "stop-app"
    agent = agent_factory(hooks={"before_offline": [append_hook("stop-app", stop_app)]}).start()
    metadata.set_event(DROPLET, "ev-5", event="offline_migrate", state="scheduled")
    poweroff = agent.workdir / "poweroff"
    agent.wait_for(lambda: lines(poweroff), "the power-off command")
    agent.kill9()  # the machine "goes down"; on the next boot the event is still set
    agent.start()
    agent.wait_for(lambda: "resuming event_id=ev-5" in agent.log(), "the restart")
    agent.wait_status("ev-5", "powered_off")
    assert lines(poweroff) == ["poweroff"]
    assert len(lines(stop_app)) == 1
